package main

// The load tool's counting, against real worker-stub --openai processes: what it reports must be
// what the servers did, or its figures mean nothing.

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/bench/internal/loopback"
)

// binDir holds the worker-stub built by TestMain.
var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "bench-inference-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	build := exec.Command("go", "build", "-o", filepath.Join(dir, "worker-stub"), "../../worker-stub")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building worker-stub:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func baseConfig() config {
	return config{path: "/v1/chat/completions", model: "stub", bin: binDir, concurrency: 4, n: 40,
		duration: 30 * time.Second, timeout: 10 * time.Second, maxTokens: 5}
}

// startStub runs one worker-stub --openai with extra flags for the test and returns its URL.
func startStub(t *testing.T, extra ...string) string {
	t.Helper()
	addr := loopback.FreeAddr()
	_, port, _ := net.SplitHostPort(addr)
	cmd, err := loopback.Start(filepath.Join(binDir, "worker-stub"), append([]string{"--openai", "--host", "127.0.0.1",
		"--port", port, "--model", "stub", "--log-level", "warn"}, extra...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loopback.Stop(cmd) })
	if err := loopback.AwaitHTTP("http://" + addr + "/health"); err != nil {
		t.Fatal(err)
	}
	return "http://" + addr
}

// TestCountsStreams: every request answered, and every event of every stream counted (the role
// chunk, max_tokens tokens, the finish chunk).
func TestCountsStreams(t *testing.T) {
	c := baseConfig()
	c.workers, c.stream = 2, true
	phases, err := run(t.Context(), c, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if len(phases) != 1 {
		t.Fatalf("%d phases; want 1", len(phases))
	}
	p := phases[0]
	if p.ok.Load() != 40 || p.failedTotal() != 0 || p.lat.Count() != 40 || p.ttfb.Count() != 40 {
		t.Fatalf("ok %d, failed %v, %d latencies; want 40 answered", p.ok.Load(), p.failed, p.lat.Count())
	}
	if want := int64(40 * (c.maxTokens + 2)); p.events.Load() != want {
		t.Fatalf("%d events; want %d", p.events.Load(), want)
	}
}

// TestCompareRunsBoth: -compare loads the workers straight, then -url, and reports both.
func TestCompareRunsBoth(t *testing.T) {
	c := baseConfig()
	c.workers, c.compare, c.url = 1, true, startStub(t)
	var out strings.Builder
	phases, err := run(t.Context(), c, &out)
	if err != nil {
		t.Fatal(err)
	}
	if len(phases) != 2 || phases[0].targets[0] == c.url || phases[1].targets[0] != c.url {
		t.Fatalf("phases %v; want straight to the started worker, then %s", phases, c.url)
	}
	for _, p := range phases {
		if p.ok.Load() != 40 || p.failedTotal() != 0 {
			t.Fatalf("%s: ok %d, failed %v; want 40 answered", p.name, p.ok.Load(), p.failed)
		}
	}
	if !strings.Contains(out.String(), "added by the hop") {
		t.Fatalf("report without the comparison:\n%s", out.String())
	}
}

// TestCompareWithBaseline: -baseline adds a phase through that hop between the two, and a
// comparison line for each hop.
func TestCompareWithBaseline(t *testing.T) {
	c := baseConfig()
	c.workers, c.compare, c.url, c.baseline = 1, true, startStub(t), startStub(t)
	var out strings.Builder
	phases, err := run(t.Context(), c, &out)
	if err != nil {
		t.Fatal(err)
	}
	if len(phases) != 3 || phases[1].targets[0] != c.baseline || phases[2].targets[0] != c.url {
		t.Fatalf("phases %v; want straight, then %s, then %s", phases, c.baseline, c.url)
	}
	for _, p := range phases {
		if p.ok.Load() != 40 || p.failedTotal() != 0 {
			t.Fatalf("%s: ok %d, failed %v; want 40 answered", p.name, p.ok.Load(), p.failed)
		}
	}
	if n := strings.Count(out.String(), "added by the hop"); n != 2 {
		t.Fatalf("%d comparisons, want 2:\n%s", n, out.String())
	}
}

// TestCountsFailures: answers that are errors, and streams cut before [DONE], are failures by kind.
func TestCountsFailures(t *testing.T) {
	c := baseConfig()
	c.url, c.model, c.n = startStub(t), "not-served", 7
	phases, err := run(t.Context(), c, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if p := phases[0]; p.ok.Load() != 0 || p.failed["404"] != 7 || !strings.Contains(p.firstErr, "not-served") {
		t.Fatalf("ok %d, failed %v (%s); want 7 failed with 404", p.ok.Load(), p.failed, p.firstErr)
	}

	c = baseConfig()
	c.url, c.stream, c.n, c.concurrency = startStub(t, "--die-mid-stream-after", "2"), true, 1, 1
	phases, err = run(t.Context(), c, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if p := phases[0]; p.ok.Load() != 0 || p.failed["stream cut"] != 1 || p.events.Load() != 3 {
		t.Fatalf("ok %d, failed %v, %d events; want 1 stream cut after 3 events", p.ok.Load(), p.failed, p.events.Load())
	}
}
