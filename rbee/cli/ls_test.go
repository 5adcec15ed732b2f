package cli

import (
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/queen/registry"
	"github.com/rbee-dev/rbee/queen/server"
)

// rbee worker ls shows every worker, however many pages the queen's answer takes, against the
// queen's real ListWorkers.
func TestWorkerLsPagesThroughAll(t *testing.T) {
	reg := registry.New(registry.Config{Interval: time.Second})
	const n = 2*server.DefaultPageSize + 345
	for i := range n {
		w := registry.Worker{ID: fmt.Sprintf("w%05d", i), HiveID: "h1", Model: "m", Device: "cpu", PID: int32(100 + i), Port: 9100, State: registry.StateReady}
		if i%2 == 1 {
			w.HiveID, w.State = "h2", registry.StateBusy
		}
		if _, err := reg.Beat(w); err != nil {
			t.Fatal(err)
		}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	rbeev1.RegisterQueenServiceServer(s, server.New(server.Config{Registry: reg, QueenID: "q"}))
	go func() { _ = s.Serve(l) }()
	t.Cleanup(s.Stop)
	addr := l.Addr().String()

	out, errOut, code := runCLI("--queen", addr, "worker", "ls", "-o", "json")
	if code != ExitOK {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	var resp struct {
		Workers []struct{ WorkerID string }
		Next    string `json:"nextPageToken"`
	}
	if err := json.Unmarshal([]byte(out), &resp); err != nil {
		t.Fatal(err)
	}
	if len(resp.Workers) != n || resp.Next != "" {
		t.Fatalf("worker ls -o json: %d workers (token %q), want %d", len(resp.Workers), resp.Next, n)
	}
	for i, w := range resp.Workers {
		if want := fmt.Sprintf("w%05d", i); w.WorkerID != want {
			t.Fatalf("worker %d is %q, want %q", i, w.WorkerID, want)
		}
	}
	out, errOut, code = runCLI("--queen", addr, "worker", "ls")
	if lines := strings.Count(out, "\n"); code != ExitOK || lines != n+1 {
		t.Fatalf("worker ls: exit %d, %d lines, want %d; %s", code, lines, n+1, errOut)
	}
	out, _, code = runCLI("--queen", addr, "worker", "ls", "--hive", "h2", "--state", "busy", "--model", "m")
	if lines := strings.Count(out, "\n"); code != ExitOK || lines != n/2+1 || strings.Contains(out, "READY") {
		t.Fatalf("worker ls with filters: exit %d, %d lines, want %d", code, lines, n/2+1)
	}
	if _, errOut, code := runCLI("--queen", addr, "worker", "ls", "--state", "sleepy"); code != ExitUsage {
		t.Fatalf("--state sleepy: exit %d, want %d (%s)", code, ExitUsage, errOut)
	}
}
