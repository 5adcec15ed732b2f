// Package e2e runs the real queen, hive and worker-stub binaries on loopback and drives them over
// gRPC (and grpcurl), the way an operator would.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// binDir holds the binaries built once for the whole package.
var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "rbee-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	// The tags of make build, so that what is tested is what ships.
	build := exec.Command("go", "build", "-tags", "grpcnotrace", "-o", dir+"/", "../queen", "../hive", "../worker-stub", "../worker-shim")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building binaries:", err)
		os.Exit(1)
	}
	grpcurl := exec.Command("go", "build", "-modfile=tools/go.mod", "-o", filepath.Join(dir, "grpcurl"), "github.com/fullstorydev/grpcurl/cmd/grpcurl")
	grpcurl.Dir = ".." // tools/go.mod names its module root by the go.mod beside it
	grpcurl.Stdout, grpcurl.Stderr = os.Stderr, os.Stderr
	if err := grpcurl.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building grpcurl:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// proc is one running program with its log lines parsed as they arrive.
type proc struct {
	t    *testing.T
	name string
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited and been reaped

	mu    sync.Mutex
	lines []map[string]any
	raw   bytes.Buffer
	cond  *sync.Cond
}

// start runs binary name with args; its stderr (zap JSON) is collected. The process is stopped
// (SIGTERM, then SIGKILL) when the test ends, and its log is printed if the test failed.
func start(t *testing.T, name string, args ...string) *proc {
	t.Helper()
	return startCmd(t, name, exec.Command(filepath.Join(binDir, name), args...))
}

// startCmd is start for a prepared command (another program, another namespace).
func startCmd(t *testing.T, name string, cmd *exec.Cmd) *proc {
	t.Helper()
	p := &proc{t: t, name: name, done: make(chan struct{}), cmd: cmd}
	p.cond = sync.NewCond(&p.mu)
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go p.read(stderr)
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.stop(syscall.SIGTERM, 10*time.Second)
		if t.Failed() {
			p.mu.Lock()
			t.Logf("--- %s log:\n%s", name, p.raw.String())
			p.mu.Unlock()
		}
	})
	return p
}

func (p *proc) read(r interface{ Read([]byte) (int, error) }) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var m map[string]any
		_ = json.Unmarshal(sc.Bytes(), &m)
		p.mu.Lock()
		p.raw.Write(sc.Bytes())
		p.raw.WriteByte('\n')
		if m != nil {
			p.lines = append(p.lines, m)
		}
		p.cond.Broadcast()
		p.mu.Unlock()
	}
	p.mu.Lock()
	p.lines = append(p.lines, map[string]any{"msg": "EOF"})
	p.cond.Broadcast()
	p.mu.Unlock()
}

// await waits for a log line for which match holds and returns it; it fails the test if the
// process exits or the bound passes first.
func (p *proc) await(what string, match func(map[string]any) bool) map[string]any {
	p.t.Helper()
	timer := time.AfterFunc(20*time.Second, func() { p.mu.Lock(); p.cond.Broadcast(); p.mu.Unlock() })
	defer timer.Stop()
	deadline := time.Now().Add(20 * time.Second)
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := 0; ; {
		for ; i < len(p.lines); i++ {
			if p.lines[i]["msg"] == "EOF" {
				p.t.Fatalf("%s exited before logging %s", p.name, what)
			}
			if match(p.lines[i]) {
				return p.lines[i]
			}
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("%s did not log %s within 20s", p.name, what)
		}
		p.cond.Wait()
	}
}

func (p *proc) awaitAction(action string) map[string]any {
	p.t.Helper()
	return p.await("action "+action, func(m map[string]any) bool { return m["action"] == action })
}

// stop signals the process and waits up to timeout for it to exit, then kills it.
func (p *proc) stop(sig syscall.Signal, timeout time.Duration) {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(timeout):
		p.t.Errorf("%s did not exit within %v of %v; killing it", p.name, timeout, sig)
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// exitCode waits for the process to exit and returns its exit status.
func (p *proc) exitCode(timeout time.Duration) int {
	p.t.Helper()
	select {
	case <-p.done:
	case <-time.After(timeout):
		p.t.Fatalf("%s still running after %v", p.name, timeout)
	}
	return p.cmd.ProcessState.ExitCode()
}

// startQueen starts a queen on an ephemeral loopback port and returns it with its address.
func startQueen(t *testing.T, args ...string) (*proc, string) {
	t.Helper()
	// No HTTP API unless a test asks (startQueenHTTP): its fixed default port would collide.
	q := start(t, "queen", append([]string{"--listen", "127.0.0.1:0", "--http-listen", "off"}, args...)...)
	line := q.awaitAction("queen_start")
	return q, line["listen"].(string)
}

// startHive starts a hive with id on an ephemeral port reporting to queen, and waits until the
// queen has registered it.
func startHive(t *testing.T, queen, id string, args ...string) (*proc, string) {
	t.Helper()
	h := start(t, "hive", append([]string{"--listen", "127.0.0.1:0", "--hive-id", id, "--queen", queen,
		"--log-dir", t.TempDir(), "--grace", "2s"}, args...)...)
	// Workers outlive their hive by design: whatever a test leaves of this hive's is killed by PID
	// when it ends (a worker-shim's server dies with it), so make test leaves no process behind.
	cleanupWorkers(t, id)
	line := h.awaitAction("hive_start")
	h.awaitAction("hive_registered")
	return h, line["listen"].(string)
}

// dial returns a QueenService client.
func dial(t *testing.T, addr string) (rbeev1.QueenServiceClient, *grpc.ClientConn) {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return rbeev1.NewQueenServiceClient(conn), conn
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

// workersOf returns the PIDs of live worker processes started for hive id (found in /proc by
// their --hive-id argument), so a test can assert that none is left and remove any it leaked.
func workersOf(hiveID string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		for i := 0; i+1 < len(args); i++ {
			if args[i] == "--hive-id" && args[i+1] == hiveID && (strings.HasSuffix(args[0], "worker-stub") || strings.HasSuffix(args[0], "worker-shim")) {
				if st, err := os.ReadFile("/proc/" + e.Name() + "/stat"); err == nil && !bytes.Contains(st, []byte(") Z ")) {
					pids = append(pids, pid)
				}
			}
		}
	}
	return pids
}

// noWorkersLeft fails the test if any worker of the hives is still running, and kills those it
// finds (by PID: they are this test's, named by its unique hive ids).
func noWorkersLeft(t *testing.T, hiveIDs ...string) {
	t.Helper()
	for _, h := range hiveIDs {
		if pids := workersOf(h); len(pids) > 0 {
			t.Errorf("worker processes of hive %s left running: %v", h, pids)
			for _, pid := range pids {
				_ = unix.Kill(pid, unix.SIGKILL)
			}
		}
	}
}

// cleanupWorkers registers a last-resort clean-up of the hives' workers.
func cleanupWorkers(t *testing.T, hiveIDs ...string) {
	t.Cleanup(func() {
		for _, h := range hiveIDs {
			for _, pid := range workersOf(h) {
				_ = unix.Kill(pid, unix.SIGKILL)
			}
		}
	})
}

// alive reports whether pid is a live (non-zombie) process.
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	return err == nil && !bytes.Contains(b, []byte(") Z "))
}

// uniqueID makes an id unique to this test run, so concurrent runs never touch each other's workers.
func uniqueID(prefix string) string {
	return fmt.Sprintf("%s-%d-%d", prefix, os.Getpid(), time.Now().UnixNano()%1_000_000)
}

func durationpbNew(d time.Duration) *durationpb.Duration { return durationpb.New(d) }

// hiveClient returns a HiveService client for a hive's address, for calls the queen would not make.
func hiveClient(t *testing.T, addr string) rbeev1.HiveServiceClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return rbeev1.NewHiveServiceClient(conn)
}
