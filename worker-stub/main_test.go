package main

// These tests build the real worker-stub binary and run it against an in-process fake queen, the
// way a hive would start it. They wait on events (beats, stream opens and closes, process exits)
// with generous timeouts that only bound a failure.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/activation"
	"github.com/rbee-dev/rbee/internal/procstat"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/known/durationpb"
)

// waitFor bounds every wait for an event; reaching it is a failure.
const waitFor = 10 * time.Second

// stubBin is the worker-stub binary built by TestMain.
var stubBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "worker-stub-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	stubBin = filepath.Join(dir, "worker-stub")
	build := exec.Command("go", "build", "-o", stubBin, ".")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building worker-stub:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	// VerifyTestMain exits the process itself; Cleanup removes the binary first.
	goleak.VerifyTestMain(m, goleak.Cleanup(func(int) { os.RemoveAll(dir) }))
}

// streamEnd reports how a heartbeat stream ended at the queen: nil for a clean CloseSend (io.EOF).
type streamEnd struct{ err error }

// fakeQueen is a real gRPC server implementing WorkerHeartbeat: it records every beat and answers
// each with its id and a short interval.
type fakeQueen struct {
	rbeev1.UnimplementedHeartbeatServiceServer
	id       string
	interval time.Duration
	silent   bool // record beats but never answer

	beats  chan *rbeev1.Worker
	opened chan struct{}
	ended  chan streamEnd

	srv  *grpc.Server
	addr string
	done chan struct{}
}

// startQueen serves a fake queen on addr ("127.0.0.1:0" for any port) until the test ends.
func startQueen(t *testing.T, addr, id string, silent bool) *fakeQueen {
	t.Helper()
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("fake queen listen: %v", err)
	}
	q := &fakeQueen{
		id: id, interval: 50 * time.Millisecond, silent: silent,
		beats:  make(chan *rbeev1.Worker, 4096),
		opened: make(chan struct{}, 64),
		ended:  make(chan streamEnd, 64),
		srv:    grpc.NewServer(),
		addr:   lis.Addr().String(),
		done:   make(chan struct{}),
	}
	rbeev1.RegisterHeartbeatServiceServer(q.srv, q)
	go func() {
		defer close(q.done)
		q.srv.Serve(lis)
	}()
	t.Cleanup(q.stop)
	return q
}

// stop ends the queen abruptly, as a crash would; it is safe to call twice.
func (q *fakeQueen) stop() {
	q.srv.Stop()
	<-q.done
}

func (q *fakeQueen) WorkerHeartbeat(stream rbeev1.HeartbeatService_WorkerHeartbeatServer) error {
	q.opened <- struct{}{}
	for {
		req, err := stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = nil
			}
			q.ended <- streamEnd{err}
			return err
		}
		select {
		case q.beats <- req.GetWorker():
		default: // a test that stopped reading does not need more
		}
		if q.silent {
			continue
		}
		if err := stream.Send(&rbeev1.WorkerHeartbeatResponse{QueenId: q.id, Interval: durationpb.New(q.interval)}); err != nil {
			q.ended <- streamEnd{err}
			return err
		}
	}
}

// nextBeat returns the next beat the queen received.
func (q *fakeQueen) nextBeat(t *testing.T) *rbeev1.Worker {
	t.Helper()
	select {
	case w := <-q.beats:
		return w
	case <-time.After(waitFor):
		t.Fatalf("queen %s: no heartbeat within %s", q.id, waitFor)
		return nil
	}
}

// beatIn skips beats until one in state s arrives and returns it.
func (q *fakeQueen) beatIn(t *testing.T, s rbeev1.WorkerState) *rbeev1.Worker {
	t.Helper()
	deadline := time.After(waitFor)
	for {
		select {
		case w := <-q.beats:
			if w.GetState() == s {
				return w
			}
		case <-deadline:
			t.Fatalf("queen %s: no %s heartbeat within %s", q.id, s, waitFor)
			return nil
		}
	}
}

// stub is one running worker-stub process.
type stub struct {
	cmd    *exec.Cmd
	pid    int
	out    *logOutput
	exited chan struct{} // closed once Wait returned; cmd.ProcessState is set then
}

// startStub runs cmd (the stub, possibly behind a shell wrapper) and kills it by PID when the test
// ends. The output is logged when the test fails.
func startStub(t *testing.T, cmd *exec.Cmd) *stub {
	t.Helper()
	s := &stub{cmd: cmd, out: newLogOutput(), exited: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = s.out, s.out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start worker-stub: %v", err)
	}
	s.pid = cmd.Process.Pid
	go func() {
		cmd.Wait()
		close(s.exited)
	}()
	t.Cleanup(func() {
		syscall.Kill(s.pid, syscall.SIGKILL) // by PID; harmless once it has exited and been waited for
		<-s.exited
		if t.Failed() {
			t.Logf("worker-stub output:\n%s", s.out.String())
		}
	})
	return s
}

// stubCommand is the worker-stub command line for worker id and queen address, plus extra flags.
func stubCommand(id, queen string, extra ...string) *exec.Cmd {
	args := append([]string{"--worker-id", id, "--hive-id", "hive-t", "--model", "tiny", "--device", "cpu",
		"--port", "0", "--queen", queen}, extra...)
	cmd := exec.Command(stubBin, args...)
	cmd.Env = append(os.Environ(), "RBEE_WORKER_ID="+id)
	return cmd
}

// wait returns the stub's exit status.
func (s *stub) wait(t *testing.T) *os.ProcessState {
	t.Helper()
	select {
	case <-s.exited:
		return s.cmd.ProcessState
	case <-time.After(waitFor):
		t.Fatalf("worker-stub %d did not exit within %s", s.pid, waitFor)
		return nil
	}
}

// healthStatus asks the gRPC health service at addr for the server's overall status.
func healthStatus(t *testing.T, addr string) healthpb.HealthCheckResponse_ServingStatus {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(t.Context(), waitFor)
	defer cancel()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatalf("health check %s: %v", addr, err)
	}
	return resp.GetStatus()
}

func portAddr(port uint32) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))) }

// TestLifecycle follows one worker from start to SIGTERM: a full STARTING descriptor first, then
// READY with health SERVING, then a STOPPING beat, a clean stream close and exit status 0.
func TestLifecycle(t *testing.T) {
	q := startQueen(t, "127.0.0.1:0", "queen-a", false)
	s := startStub(t, stubCommand("w-life", q.addr, "--ready-after", "1s"))

	first := q.nextBeat(t)
	wantStart, err := procstat.StartTime(s.pid)
	if err != nil {
		t.Fatal(err)
	}
	if first.GetWorkerId() != "w-life" || first.GetHiveId() != "hive-t" || first.GetModel() != "tiny" ||
		first.GetDevice() != "cpu" || first.GetPid() != int32(s.pid) || first.GetProcessStartTime() != wantStart ||
		first.GetPort() == 0 || first.GetState() != rbeev1.WorkerState_WORKER_STATE_STARTING {
		t.Fatalf("first beat = %v; want the full STARTING descriptor of pid %d (start time %d)", first, s.pid, wantStart)
	}
	addr := portAddr(first.GetPort())
	if got := healthStatus(t, addr); got != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("health while STARTING = %v; want NOT_SERVING", got)
	}

	ready := q.beatIn(t, rbeev1.WorkerState_WORKER_STATE_READY)
	if ready.GetPid() != first.GetPid() || ready.GetPort() != first.GetPort() || ready.GetProcessStartTime() != wantStart {
		t.Errorf("READY beat %v differs from the first in identity", ready)
	}
	if got := healthStatus(t, addr); got != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("health when READY = %v; want SERVING", got)
	}

	if err := syscall.Kill(s.pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	q.beatIn(t, rbeev1.WorkerState_WORKER_STATE_STOPPING)
	// The stream that carried STOPPING ends with the worker's clean close. A stream before it may
	// have ended with an error: on a loaded machine the fake queen's 50 ms interval can go
	// unanswered for three intervals, and the worker then rightly starts a new stream.
	deadline := time.After(waitFor)
	for clean := false; !clean; {
		select {
		case e := <-q.ended:
			if e.err == nil {
				clean = true
			} else {
				t.Logf("an earlier heartbeat stream ended with %v", e.err)
			}
		case <-deadline:
			t.Fatal("heartbeat stream not closed cleanly after SIGTERM")
		}
	}
	if st := s.wait(t); st.ExitCode() != 0 {
		t.Fatalf("exit after SIGTERM: %v; want status 0", st)
	}
}

// TestInheritedListener passes a bound socket as fd 3 with LISTEN_FDS=1, as the hive does, and
// checks that the worker serves and reports that socket.
func TestInheritedListener(t *testing.T) {
	q := startQueen(t, "127.0.0.1:0", "queen-a", false)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f, err := lis.(*net.TCPListener).File()
	lis.Close() // the duplicate in f keeps the socket
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	port := uint32(lis.Addr().(*net.TCPAddr).Port)

	stubCmd := stubCommand("w-inherit", q.addr)
	// LISTEN_PID must be the worker's own PID, unknown before the start; the shell sets it to its
	// own and execs, which keeps the PID.
	cmd := exec.Command("/bin/sh", append([]string{"-c", `LISTEN_PID=$$ exec "$0" "$@"`}, stubCmd.Args...)...)
	cmd.Env = append(stubCmd.Env, activation.EnvListenFDs+"=1")
	cmd.ExtraFiles = []*os.File{f} // fd 3
	s := startStub(t, cmd)

	w := q.beatIn(t, rbeev1.WorkerState_WORKER_STATE_READY)
	if w.GetPort() != port || w.GetPid() != int32(s.pid) {
		t.Fatalf("beat reports pid %d port %d; want pid %d and the inherited port %d", w.GetPid(), w.GetPort(), s.pid, port)
	}
	if got := healthStatus(t, portAddr(port)); got != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health on the inherited socket = %v; want SERVING", got)
	}
}

// TestInheritedListenerForAnotherPID: LISTEN_PID naming another process means the socket on fd 3
// is not the worker's, so it listens on a port of its own.
func TestInheritedListenerForAnotherPID(t *testing.T) {
	q := startQueen(t, "127.0.0.1:0", "queen-a", false)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	f, err := lis.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd := stubCommand("w-notmine", q.addr)
	cmd.Env = append(cmd.Env, activation.EnvListenFDs+"=1", activation.EnvListenPID+"=1")
	cmd.ExtraFiles = []*os.File{f}
	startStub(t, cmd)

	w := q.beatIn(t, rbeev1.WorkerState_WORKER_STATE_READY)
	if inherited := uint32(lis.Addr().(*net.TCPAddr).Port); w.GetPort() == inherited || w.GetPort() == 0 {
		t.Fatalf("beat reports port %d; want a port of its own, not the foreign socket's %d", w.GetPort(), inherited)
	}
	if got := healthStatus(t, portAddr(w.GetPort())); got != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health on the worker's own port = %v; want SERVING", got)
	}
}

// TestIgnoreSIGTERM checks the test knob: after SIGTERM the worker keeps beating READY.
func TestIgnoreSIGTERM(t *testing.T) {
	q := startQueen(t, "127.0.0.1:0", "queen-a", false)
	s := startStub(t, stubCommand("w-stubborn", q.addr, "--ignore-sigterm"))
	q.beatIn(t, rbeev1.WorkerState_WORKER_STATE_READY)
	if err := syscall.Kill(s.pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// At 50ms a beat, ten beats span half a second after the signal arrived.
	for range 10 {
		if w := q.nextBeat(t); w.GetState() != rbeev1.WorkerState_WORKER_STATE_READY {
			t.Fatalf("beat after ignored SIGTERM in state %v; want READY", w.GetState())
		}
	}
	select {
	case <-s.exited:
		t.Fatalf("worker exited after an ignored SIGTERM: %v", s.cmd.ProcessState)
	default:
	}
}

// TestReconnectAfterQueenRestart stops the queen and starts a new one on the same address: the
// worker reconnects and sends its full descriptor to the new queen.
func TestReconnectAfterQueenRestart(t *testing.T) {
	q1 := startQueen(t, "127.0.0.1:0", "queen-1", false)
	s := startStub(t, stubCommand("w-reconnect", q1.addr))
	before := q1.beatIn(t, rbeev1.WorkerState_WORKER_STATE_READY)
	q1.stop()

	q2 := startQueen(t, q1.addr, "queen-2", false)
	after := q2.nextBeat(t)
	if after.GetWorkerId() != "w-reconnect" || after.GetPid() != int32(s.pid) || after.GetPort() != before.GetPort() ||
		after.GetProcessStartTime() != before.GetProcessStartTime() || after.GetHiveId() != "hive-t" ||
		after.GetModel() != "tiny" || after.GetState() != rbeev1.WorkerState_WORKER_STATE_READY {
		t.Fatalf("first beat to the new queen = %v; want the full READY descriptor %v", after, before)
	}
	// The worker keeps beating the new queen.
	q2.nextBeat(t)
}

// TestSilentQueen checks that a queen which accepts the stream but never answers is taken for gone:
// the worker tears the stream down and opens a new one.
func TestSilentQueen(t *testing.T) {
	q := startQueen(t, "127.0.0.1:0", "queen-mute", true)
	startStub(t, stubCommand("w-silent", q.addr))
	for i := range 2 {
		select {
		case <-q.opened:
		case <-time.After(waitFor):
			t.Fatalf("stream %d not opened within %s", i+1, waitFor)
		}
	}
	select {
	case e := <-q.ended:
		if e.err == nil {
			t.Fatal("the silent queen's first stream closed cleanly; want it torn down")
		}
	case <-time.After(waitFor):
		t.Fatal("first stream never ended")
	}
}

// TestSpawnChildren checks the --spawn-children knob: two sleeping children of the worker, one of
// them in a session of its own.
func TestSpawnChildren(t *testing.T) {
	q := startQueen(t, "127.0.0.1:0", "queen-a", false)
	s := startStub(t, stubCommand("w-parent", q.addr, "--spawn-children", "2"))
	q.nextBeat(t) // the children are started before the first beat

	parent, err := procstat.Read(s.pid)
	if err != nil {
		t.Fatal(err)
	}
	children := childrenOf(t, s.pid)
	if len(children) != 2 {
		t.Fatalf("worker %d has %d children %v; want 2", s.pid, len(children), children)
	}
	var newSession int
	for _, c := range children {
		if c.SID != parent.SID {
			newSession++
			if c.SID != c.PID {
				t.Errorf("child %d in session %d; want it to lead its own", c.PID, c.SID)
			}
		}
	}
	if newSession != 1 {
		t.Fatalf("%d children outside the worker's session %d; want 1 (%v)", newSession, parent.SID, children)
	}
}

// childrenOf lists the processes whose parent is pid, and kills them when the test ends.
func childrenOf(t *testing.T, pid int) []procstat.Stat {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []procstat.Stat
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, err := procstat.Read(p); err == nil && st.PPID == pid {
			out = append(out, st)
			t.Cleanup(func() {
				// By PID, and only while it is still the same process (a reused PID is not ours).
				if now, err := procstat.Read(st.PID); err == nil && now.StartTime == st.StartTime {
					syscall.Kill(st.PID, syscall.SIGKILL)
				}
			})
		}
	}
	return out
}

// TestExitAfter checks the crash knob: the worker exits by itself with the given status and says
// why on stderr.
func TestExitAfter(t *testing.T) {
	s := startStub(t, stubCommand("w-crash", "127.0.0.1:1", "--no-heartbeat", "--exit-after", "200ms", "--exit-code", "7"))
	if st := s.wait(t); st.ExitCode() != 7 {
		t.Fatalf("exit status %v; want 7", st)
	}
	if out := s.out.String(); !strings.Contains(out, "exiting with status 7") {
		t.Fatalf("no last word on stderr:\n%s", out)
	}
}

// TestCommandLine covers --version, --help and the argument checks, which exit before serving.
func TestCommandLine(t *testing.T) {
	tests := []struct {
		name     string
		args     []string
		env      string // RBEE_WORKER_ID; empty: unset
		wantCode int
		wantOut  string
	}{
		{name: "version", args: []string{"--version"}, wantOut: "worker-stub "},
		{name: "help", args: []string{"--help"}, wantOut: "--worker-id"},
		{name: "no worker id", args: []string{"--queen", "127.0.0.1:1"}, wantCode: 2, wantOut: "--worker-id is required"},
		{name: "env mismatch", args: []string{"--worker-id", "a", "--hive-id", "h", "--model", "m"}, env: "b", wantCode: 2, wantOut: "RBEE_WORKER_ID"},
		{name: "no model", args: []string{"--worker-id", "a", "--hive-id", "h"}, wantCode: 2, wantOut: "--model is required"},
		{name: "bad port", args: []string{"--worker-id", "a", "--hive-id", "h", "--model", "m", "--port", "70000"}, wantCode: 2, wantOut: "--port 70000"},
		{name: "unknown flag", args: []string{"--worker-id", "a", "--bogus"}, wantCode: 2, wantOut: "bogus"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cmd := exec.Command(stubBin, tt.args...)
			cmd.Env = os.Environ()
			if tt.env != "" {
				cmd.Env = append(cmd.Env, "RBEE_WORKER_ID="+tt.env)
			}
			s := startStub(t, cmd)
			st := s.wait(t)
			if st.ExitCode() != tt.wantCode || !strings.Contains(s.out.String(), tt.wantOut) {
				t.Fatalf("worker-stub %v: status %d, output %q; want %d and %q", tt.args, st.ExitCode(), s.out.String(), tt.wantCode, tt.wantOut)
			}
		})
	}
}

// TestWorkerHostIsBoundAndReported: with $RBEE_WORKER_HOST (set by the hive from --worker-host)
// the worker binds its port on that host and reports it as its address in every beat; without it,
// 127.0.0.1 and no address.
func TestWorkerHostIsBoundAndReported(t *testing.T) {
	for _, tc := range []struct {
		env, dial, want string
	}{
		{"127.0.0.2", "127.0.0.2", "127.0.0.2"},
		{"", "127.0.0.1", ""},
	} {
		t.Run("host="+tc.env, func(t *testing.T) {
			q := startQueen(t, "127.0.0.1:0", "queen-h", false)
			cmd := stubCommand("w-host", q.addr)
			if tc.env != "" {
				cmd.Env = append(cmd.Env, "RBEE_WORKER_HOST="+tc.env)
			}
			startStub(t, cmd)
			beat := q.nextBeat(t)
			if beat.GetAddress() != tc.want {
				t.Errorf("beat address %q, want %q", beat.GetAddress(), tc.want)
			}
			c, err := net.DialTimeout("tcp", net.JoinHostPort(tc.dial, strconv.Itoa(int(beat.GetPort()))), waitFor)
			if err != nil {
				t.Fatalf("worker not listening on %s: %v", tc.dial, err)
			}
			c.Close()
		})
	}
}
