package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The rbee binary is built once, beside the harness's binaries, the first time a CLI test needs it.
var (
	rbeeOnce sync.Once
	rbeeErr  error
)

func rbeeBinary(t *testing.T) string {
	t.Helper()
	rbeeOnce.Do(func() {
		out, err := exec.Command("go", "build", "-o", filepath.Join(binDir, "rbee"), "../rbee").CombinedOutput()
		if err != nil {
			rbeeErr = fmt.Errorf("building rbee: %v\n%s", err, out)
		}
	})
	if rbeeErr != nil {
		t.Fatal(rbeeErr)
	}
	return filepath.Join(binDir, "rbee")
}

// cliRun is one finished run of rbee.
type cliRun struct {
	args           []string
	stdout, stderr string
	code           int
}

func (r cliRun) String() string {
	return fmt.Sprintf("rbee %s: exit %d\nstdout:\n%s\nstderr:\n%s", strings.Join(r.args, " "), r.code, r.stdout, r.stderr)
}

// rbeeEnv is the environment rbee runs in: the test queen's address, and no token or queen
// address leaking in from the developer's shell.
func rbeeEnv(queen string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "RBEE_") && !strings.HasPrefix(kv, "PATH=") {
			env = append(env, kv)
		}
	}
	return append(env, "RBEE_QUEEN="+queen, "PATH="+binDir+string(filepath.ListSeparator)+os.Getenv("PATH"))
}

// rbee runs the CLI against queen with stdout and stderr as pipes (no terminal) and returns what
// it printed and its exit status; it must finish within a minute.
func rbee(t *testing.T, queen string, args ...string) cliRun {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, rbeeBinary(t), args...)
	cmd.Env = rbeeEnv(queen)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("rbee %v: %v", args, err)
	}
	if ctx.Err() != nil {
		t.Fatalf("rbee %v did not finish within a minute", args)
	}
	return cliRun{args: args, stdout: stdout.String(), stderr: stderr.String(), code: cmd.ProcessState.ExitCode()}
}

// rbeeOK runs rbee and fails the test unless it exits 0.
func rbeeOK(t *testing.T, queen string, args ...string) cliRun {
	t.Helper()
	r := rbee(t, queen, args...)
	if r.code != 0 {
		t.Fatalf("want exit 0; %v", r)
	}
	return r
}

// rbeeJSON runs rbee with -o json, expecting exit 0 and one JSON document on stdout.
func rbeeJSON(t *testing.T, queen string, args ...string) map[string]any {
	t.Helper()
	r := rbeeOK(t, queen, append(args, "-o", "json")...)
	var m map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &m); err != nil {
		t.Fatalf("stdout is not one JSON document: %v\n%v", err, r)
	}
	return m
}

// jworker is the part of the CLI's JSON view of a worker the tests look at (protojson names).
type jworker struct {
	WorkerID string `json:"workerId"`
	HiveID   string `json:"hiveId"`
	Model    string `json:"model"`
	Device   string `json:"device"`
	PID      int    `json:"pid"`
	Port     int    `json:"port"`
	State    string `json:"state"`
}

func decode[T any](t *testing.T, v any) T {
	t.Helper()
	b, _ := json.Marshal(v)
	var out T
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatalf("decoding %s: %v", b, err)
	}
	return out
}

// cliFleet starts a queen and one hive (extra hive flags allowed) for a CLI test and registers the
// clean-up of its workers; it returns the queen's address and the hive id.
func cliFleet(t *testing.T, hiveArgs ...string) (queen, hive string) {
	t.Helper()
	rbeeBinary(t)
	_, queen = startQueen(t)
	hive = uniqueID("cli")
	cleanupWorkers(t, hive)
	startHive(t, queen, hive, hiveArgs...)
	return queen, hive
}

// TestCLIWorkerLifecycle drives every command in table and JSON form through one worker's life.
func TestCLIWorkerLifecycle(t *testing.T) {
	queen, hive := cliFleet(t)
	id := uniqueID("w")

	// spawn --wait: READY, a live process, a port; progress lines go to stderr beside the JSON.
	spawned := decode[struct{ Worker jworker }](t, rbeeJSON(t, queen, "worker", "spawn", "--model", "llama-3-8b", "--hive", hive, "--id", id, "--wait"))
	w := spawned.Worker
	if w.WorkerID != id || w.HiveID != hive || w.Model != "llama-3-8b" || w.Device != "cpu" || w.State != "WORKER_STATE_READY" || w.Port == 0 {
		t.Fatalf("spawn --wait gave %+v", w)
	}
	if !alive(w.PID) {
		t.Fatalf("spawn --wait: pid %d is not a live process", w.PID)
	}

	t.Run("ls", func(t *testing.T) {
		for _, args := range [][]string{{"worker", "ls"}, {"worker", "ls", "--hive", hive}} {
			ls := decode[struct{ Workers []jworker }](t, rbeeJSON(t, queen, args...))
			if len(ls.Workers) != 1 || ls.Workers[0] != w {
				t.Errorf("%v -o json: %+v, want [%+v]", args, ls.Workers, w)
			}
		}
		if other := rbeeJSON(t, queen, "worker", "ls", "--hive", "no-such-hive"); len(other) != 0 {
			t.Errorf("ls of another hive: %v, want {}", other)
		}
		r := rbeeOK(t, queen, "worker", "ls")
		lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
		if len(lines) != 2 {
			t.Fatalf("want a header and one row: %v", r)
		}
		header := strings.Fields(lines[0])
		if strings.Join(header, " ") != "ID HIVE MODEL DEVICE STATE IN-FLIGHT PID PORT LAST BEAT" {
			t.Errorf("header %q", lines[0])
		}
		row := strings.Fields(lines[1])
		want := []string{id, hive, "llama-3-8b", "cpu", "READY", "0", fmt.Sprint(w.PID), fmt.Sprint(w.Port)}
		if len(row) != 10 || strings.Join(row[:8], " ") != strings.Join(want, " ") || row[9] != "ago" {
			t.Errorf("row %q, want %q then an age", lines[1], want)
		}
		// Aligned: every column starts at the same offset in header and row.
		if strings.Index(lines[0], "STATE") != strings.Index(lines[1], "READY") {
			t.Errorf("columns not aligned:\n%s", r.stdout)
		}
	})

	t.Run("get", func(t *testing.T) {
		got := decode[struct{ Worker jworker }](t, rbeeJSON(t, queen, "worker", "get", id))
		if got.Worker != w {
			t.Errorf("get -o json: %+v, want %+v", got.Worker, w)
		}
		r := rbeeOK(t, queen, "worker", "get", id)
		for _, want := range []string{"ID", id, "STATE", "READY", "PID", fmt.Sprint(w.PID), "PORT", fmt.Sprint(w.Port), "LAST BEAT"} {
			if !strings.Contains(r.stdout, want) {
				t.Errorf("get lacks %q: %v", want, r)
			}
		}
	})

	t.Run("hive ls", func(t *testing.T) {
		hs := decode[struct {
			Hives []struct {
				HiveID      string `json:"hiveId"`
				Address     string `json:"address"`
				State       string `json:"state"`
				WorkerCount int    `json:"workerCount"`
			}
		}](t, rbeeJSON(t, queen, "hive", "ls"))
		if len(hs.Hives) != 1 || hs.Hives[0].HiveID != hive || hs.Hives[0].State != "HIVE_STATE_READY" || hs.Hives[0].Address == "" {
			t.Errorf("hive ls -o json: %+v", hs.Hives)
		}
		r := rbeeOK(t, queen, "hive", "ls")
		if !strings.Contains(r.stdout, "ADDRESS") || !strings.Contains(r.stdout, hive) || !strings.Contains(r.stdout, "READY") {
			t.Errorf("hive ls: %v", r)
		}
	})

	t.Run("status", func(t *testing.T) {
		st := decode[struct {
			QueenID        string         `json:"queenId"`
			WorkerCount    int            `json:"workerCount"`
			HiveCount      int            `json:"hiveCount"`
			WorkersByState map[string]int `json:"workersByState"`
			HivesByState   map[string]int `json:"hivesByState"`
		}](t, rbeeJSON(t, queen, "status"))
		if st.QueenID == "" || st.WorkerCount != 1 || st.HiveCount != 1 || st.WorkersByState["WORKER_STATE_READY"] != 1 || st.HivesByState["HIVE_STATE_READY"] != 1 {
			t.Errorf("status -o json: %+v", st)
		}
		r := rbeeOK(t, queen, "status")
		for _, want := range []string{queen + " (reachable)", st.QueenID, "UPTIME", "READY 1"} {
			if !strings.Contains(r.stdout, want) {
				t.Errorf("status lacks %q: %v", want, r)
			}
		}
	})

	t.Run("rm", func(t *testing.T) {
		rm := decode[struct {
			Outcome string
			Worker  jworker
		}](t, rbeeJSON(t, queen, "worker", "rm", id, "--grace", "5s"))
		if rm.Outcome != "DELETE_OUTCOME_EXITED" || rm.Worker.WorkerID != id {
			t.Errorf("rm -o json: %+v", rm)
		}
		if alive(w.PID) {
			t.Errorf("pid %d still alive after rm", w.PID)
		}
		if r := rbee(t, queen, "worker", "get", id); r.code != 3 {
			t.Errorf("get after rm: want exit 3; %v", r)
		}
	})

	t.Run("table spawn and rm", func(t *testing.T) {
		id2 := uniqueID("w")
		r := rbeeOK(t, queen, "worker", "spawn", "--model", "m", "--id", id2)
		for _, want := range []string{id2, hive} {
			if !strings.Contains(r.stdout, want) {
				t.Errorf("spawn lacks %q: %v", want, r)
			}
		}
		// Without --wait the answer shows the state the queen has then: STARTING, or READY when
		// the worker (cloned by the zygote trampoline) beat before the answer was composed.
		if !strings.Contains(r.stdout, "STARTING") && !strings.Contains(r.stdout, "READY") {
			t.Errorf("spawn shows neither STARTING nor READY: %v", r)
		}
		r = rbeeOK(t, queen, "worker", "rm", id2)
		if !strings.HasPrefix(r.stdout, "worker "+id2+" exited (graceful) in ") {
			t.Errorf("rm: %v", r)
		}
	})
	noWorkersLeft(t, hive)
}

// TestCLIExitStatus checks the documented exit statuses and that errors are one human sentence.
func TestCLIExitStatus(t *testing.T) {
	queen, hive := cliFleet(t)
	// An address where nothing listens: a port bound, then closed.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := l.Addr().String()
	l.Close()

	for _, tc := range []struct {
		name    string
		queen   string
		args    []string
		code    int
		message string
	}{
		{"get unknown", queen, []string{"worker", "get", "no-such-worker"}, 3, `worker "no-such-worker"`},
		{"rm unknown", queen, []string{"worker", "rm", "no-such-worker"}, 3, `worker "no-such-worker"`},
		{"spawn on unknown hive", queen, []string{"worker", "spawn", "--model", "m", "--hive", "no-such-hive"}, 3, "no-such-hive"},
		{"queen unreachable", dead, []string{"worker", "ls"}, 4, "cannot reach the queen at " + dead},
		{"queen unreachable, status", dead, []string{"status", "-o", "json"}, 4, "cannot reach the queen"},
		{"bad device", queen, []string{"worker", "spawn", "--model", "m", "--device", "gpu0"}, 6, "device"},
		{"bad id", queen, []string{"worker", "get", "Not_An_Id"}, 6, "worker_id"},
		{"spawn without model", queen, []string{"worker", "spawn"}, 2, `"model"`},
		{"unknown flag", queen, []string{"worker", "ls", "--no-such-flag"}, 2, "no-such-flag"},
		{"unknown command", queen, []string{"workers"}, 2, "workers"},
		{"get without id", queen, []string{"worker", "get"}, 2, "worker id"},
		{"bad output format", queen, []string{"status", "-o", "yaml"}, 2, "yaml"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := rbee(t, tc.queen, tc.args...)
			if r.code != tc.code {
				t.Fatalf("want exit %d; %v", tc.code, r)
			}
			first, _, _ := strings.Cut(r.stderr, "\n")
			if !strings.HasPrefix(first, "rbee: ") || !strings.Contains(first, tc.message) {
				t.Errorf("want one line 'rbee: ...%s...' on stderr; %v", tc.message, r)
			}
			for _, bad := range []string{"rpc error", "code =", "goroutine ", "panic"} {
				if strings.Contains(r.stderr, bad) {
					t.Errorf("stderr shows %q; %v", bad, r)
				}
			}
			if r.stdout != "" {
				t.Errorf("stdout not empty on error; %v", r)
			}
		})
	}

	t.Run("already exists", func(t *testing.T) {
		id := uniqueID("w")
		rbeeOK(t, queen, "worker", "spawn", "--model", "m", "--id", id, "--wait")
		if r := rbee(t, queen, "worker", "spawn", "--model", "m", "--id", id); r.code != 10 {
			t.Errorf("want exit 10; %v", r)
		}
		rbeeOK(t, queen, "worker", "rm", id)
	})

	t.Run("unauthenticated", func(t *testing.T) {
		_, locked := startQueen(t, "--token-file", tokenFile(t))
		for _, tc := range []struct {
			env  []string
			want int
		}{
			{nil, 5},
			{[]string{"RBEE_TOKEN=wrong-token-0123456789"}, 5},
			{[]string{"RBEE_TOKEN=" + testToken}, 0},
		} {
			cmd := exec.Command(rbeeBinary(t), "worker", "ls")
			cmd.Env = append(rbeeEnv(locked), tc.env...)
			out, _ := cmd.CombinedOutput()
			if got := cmd.ProcessState.ExitCode(); got != tc.want {
				t.Errorf("rbee worker ls with %v: exit %d, want %d\n%s", tc.env, got, tc.want, out)
			}
			if strings.Contains(string(out), "wrong-token") || strings.Contains(string(out), testToken) {
				t.Errorf("rbee printed the token: %s", out)
			}
		}
	})
	noWorkersLeft(t, hive)
}

// stubWrapper writes a worker binary for the hive that runs worker-stub with extra test knobs.
func stubWrapper(t *testing.T, knobs ...string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "slow-worker")
	script := fmt.Sprintf("#!/bin/sh\nexec %s \"$@\" %s\n", filepath.Join(binDir, "worker-stub"), strings.Join(knobs, " "))
	if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestCLISpawnWaitFailures: a worker that is never READY is removed at the deadline (exit 8); one
// that exits while starting fails the spawn (exit 11). Neither leaves a process behind.
func TestCLISpawnWaitFailures(t *testing.T) {
	t.Run("deadline", func(t *testing.T) {
		queen, hive := cliFleet(t, "--worker-binary", stubWrapper(t, "--ready-after", "1h"))
		id := uniqueID("w")
		r := rbee(t, queen, "worker", "spawn", "--model", "m", "--id", id, "--wait", "--timeout", "2s")
		if r.code != 8 || !strings.Contains(r.stderr, "was not READY within 2s; it was removed") {
			t.Fatalf("want exit 8 and the worker removed; %v", r)
		}
		if !strings.Contains(r.stdout, "worker "+id+" STARTING") {
			t.Errorf("no progress shown; %v", r)
		}
		if ls := rbeeJSON(t, queen, "worker", "ls"); len(ls) != 0 {
			t.Errorf("worker still listed: %v", ls)
		}
		noWorkersLeft(t, hive)
	})
	t.Run("interrupted", func(t *testing.T) {
		queen, hive := cliFleet(t, "--worker-binary", stubWrapper(t, "--ready-after", "1h"))
		id := uniqueID("w")
		s := startRbee(t, queen, "worker", "spawn", "--model", "m", "--id", id, "--wait")
		s.await("the STARTING line", func(l string) bool { return l == "worker "+id+" STARTING" })
		if code := s.interrupt(); code != 1 {
			t.Errorf("Ctrl-C during spawn --wait: exit %d, want 1", code)
		}
		if got := s.stderr(); !strings.Contains(got, "interrupted while worker "+id+" was starting; it was removed") {
			t.Errorf("stderr after Ctrl-C: %q", got)
		}
		if r := rbee(t, queen, "worker", "get", id); r.code != 3 {
			t.Errorf("the interrupted worker is still known; %v", r)
		}
		noWorkersLeft(t, hive)
	})
	t.Run("exits while starting", func(t *testing.T) {
		queen, hive := cliFleet(t, "--worker-binary", stubWrapper(t, "--ready-after", "1h", "--exit-after", "300ms"))
		id := uniqueID("w")
		r := rbee(t, queen, "worker", "spawn", "--model", "m", "--id", id, "--wait", "--timeout", "30s")
		if r.code != 11 || !strings.Contains(r.stderr, "went away before it was READY") {
			t.Fatalf("want exit 11; %v", r)
		}
		noWorkersLeft(t, hive)
	})
}

// TestCLISpawnWaitProgress checks what spawn --wait shows: plain lines through a pipe, a spinner
// with the phase on a terminal; both end with the worker's id, hive, PID and port.
func TestCLISpawnWaitProgress(t *testing.T) {
	// The worker stays STARTING a moment, so there is progress to show.
	queen, hive := cliFleet(t, "--worker-binary", stubWrapper(t, "--ready-after", "700ms"))

	t.Run("plain", func(t *testing.T) {
		id := uniqueID("w")
		r := rbeeOK(t, queen, "worker", "spawn", "--model", "m", "--id", id, "--wait")
		if strings.ContainsAny(r.stdout+r.stderr, "\x1b\r") {
			t.Errorf("escape codes without a terminal: %q", r.stdout)
		}
		lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
		if len(lines) < 2 || lines[0] != "worker "+id+" STARTING" || !strings.HasPrefix(lines[len(lines)-1], "worker "+id+" READY on hive "+hive+", pid ") ||
			!strings.Contains(lines[len(lines)-1], ", port ") {
			t.Errorf("want 'worker %s STARTING' then 'worker %s READY on hive ..., pid ..., port ...'; %v", id, id, r)
		}
		rbeeOK(t, queen, "worker", "rm", id)
	})

	t.Run("terminal", func(t *testing.T) {
		id := uniqueID("w")
		out, code := runOnPTY(t, queen, "worker", "spawn", "--model", "m", "--id", id, "--wait")
		if code != 0 {
			t.Fatalf("exit %d on a terminal:\n%q", code, out)
		}
		if !strings.Contains(out, "\r\x1b[K") || !strings.ContainsAny(out, "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏") || !strings.Contains(out, "worker "+id+" STARTING") {
			t.Errorf("no spinner with the phase on a terminal:\n%q", out)
		}
		// The spinner line is cleared; the last line names the worker, its hive, PID and port.
		segs := strings.FieldsFunc(out, func(r rune) bool { return r == '\r' || r == '\n' })
		last := strings.TrimPrefix(segs[len(segs)-1], "\x1b[K")
		if !strings.HasPrefix(last, "worker "+id+" READY on hive "+hive+", pid ") || !strings.Contains(last, ", port ") {
			t.Errorf("last line %q; output:\n%q", last, out)
		}
		rbeeOK(t, queen, "worker", "rm", id)
	})
	noWorkersLeft(t, hive)
}

// runOnPTY runs rbee with a new pseudo-terminal as its controlling terminal and stdin, stdout and
// stderr, and returns everything it wrote and its exit status.
func runOnPTY(t *testing.T, queen string, args ...string) (string, int) {
	t.Helper()
	master, slave := openPTY(t)
	cmd := exec.Command(rbeeBinary(t), args...)
	cmd.Env = append(rbeeEnv(queen), "TERM=xterm")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	slave.Close() // the child holds it; reads of master end (EIO) when the child is gone

	var out bytes.Buffer
	read := make(chan struct{})
	go func() { _, _ = io.Copy(&out, master); close(read) }()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	select {
	case <-exited:
	case <-time.After(time.Minute):
		_ = cmd.Process.Kill()
		<-exited
		t.Fatal("rbee on a terminal did not finish within a minute")
	}
	select {
	case <-read:
	case <-time.After(10 * time.Second):
		t.Fatal("the terminal was not closed after rbee exited")
	}
	return out.String(), cmd.ProcessState.ExitCode()
}

// openPTY opens a pseudo-terminal pair with nothing but golang.org/x/sys/unix.
func openPTY(t *testing.T) (master, slave *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals here: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatalf("unlockpt: %v", err)
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatalf("ptsname: %v", err)
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatalf("open slave: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return m, s
}

// lineStream runs a long-lived rbee (a watch) and hands over its stdout lines as they come.
type lineStream struct {
	t      *testing.T
	cmd    *exec.Cmd
	lines  chan string
	done   chan struct{}
	errOut bytes.Buffer // rbee's stderr; read it only after done
}

// stderr returns what rbee wrote to stderr; call it after the process has exited.
func (s *lineStream) stderr() string {
	<-s.done
	return s.errOut.String()
}

func startRbee(t *testing.T, queen string, args ...string) *lineStream {
	t.Helper()
	s := &lineStream{t: t, lines: make(chan string, 1024), done: make(chan struct{})}
	s.cmd = exec.Command(rbeeBinary(t), args...)
	s.cmd.Env = rbeeEnv(queen)
	s.cmd.Stderr = &s.errOut
	stdout, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Wait only after the last read of the pipe, as os/exec requires.
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			s.lines <- sc.Text()
		}
		close(s.lines)
		_ = s.cmd.Wait()
		close(s.done)
	}()
	t.Cleanup(func() {
		select {
		case <-s.done:
		default:
			_ = s.cmd.Process.Kill()
			<-s.done
		}
		if t.Failed() {
			t.Logf("rbee %v stderr:\n%s", args, s.errOut.String())
		}
	})
	return s
}

// await returns the first line for which match holds, failing after 20s or at end of output.
func (s *lineStream) await(what string, match func(string) bool) string {
	s.t.Helper()
	timeout := time.After(20 * time.Second)
	for {
		select {
		case l, ok := <-s.lines:
			if !ok {
				s.t.Fatalf("rbee's output ended before %s", what)
			}
			if match(l) {
				return l
			}
		case <-timeout:
			s.t.Fatalf("rbee did not print %s within 20s", what)
		}
	}
}

// interrupt sends SIGINT and returns the exit status.
func (s *lineStream) interrupt() int {
	s.t.Helper()
	_ = s.cmd.Process.Signal(os.Interrupt)
	timeout := time.After(10 * time.Second)
	lines := s.lines
	for {
		select {
		case _, ok := <-lines: // drain, so the reader reaches EOF and Wait
			if !ok {
				lines = nil
			}
		case <-s.done:
			return s.cmd.ProcessState.ExitCode()
		case <-timeout:
			s.t.Fatal("rbee did not exit within 10s of SIGINT")
		}
	}
}

// TestCLIWatch follows a worker's life on `rbee worker watch`, as JSON lines and as text.
func TestCLIWatch(t *testing.T) {
	queen, hive := cliFleet(t)
	js := startRbee(t, queen, "worker", "watch", "--hive", hive, "-o", "json")
	txt := startRbee(t, queen, "worker", "watch")
	type event struct {
		Type   string
		Worker jworker
	}
	parse := func(l string) event {
		var e event
		if err := json.Unmarshal([]byte(l), &e); err != nil {
			t.Fatalf("watch -o json line is not one JSON object: %q: %v", l, err)
		}
		return e
	}
	js.await("SYNCED", func(l string) bool { return parse(l).Type == "WATCH_EVENT_TYPE_SYNCED" })
	txt.await("the table header", func(l string) bool { return strings.HasPrefix(l, "ID ") })

	id := uniqueID("w")
	rbeeOK(t, queen, "worker", "spawn", "--model", "m", "--id", id, "--wait")
	js.await("ADDED "+id, func(l string) bool {
		e := parse(l)
		return e.Type == "WATCH_EVENT_TYPE_ADDED" && e.Worker.WorkerID == id
	})
	js.await(id+" READY", func(l string) bool {
		e := parse(l)
		return e.Type == "WATCH_EVENT_TYPE_UPDATED" && e.Worker.WorkerID == id && e.Worker.State == "WORKER_STATE_READY"
	})
	txt.await("an ADDED line", func(l string) bool { return strings.Contains(l, " ADDED ") && strings.Contains(l, id) })
	txt.await("an UPDATED line with READY", func(l string) bool {
		return strings.Contains(l, " UPDATED ") && strings.Contains(l, id) && strings.Contains(l, "state=READY")
	})
	rbeeOK(t, queen, "worker", "rm", id)
	js.await("REMOVED "+id, func(l string) bool {
		e := parse(l)
		return e.Type == "WATCH_EVENT_TYPE_REMOVED" && e.Worker.WorkerID == id
	})
	txt.await("a REMOVED line", func(l string) bool { return strings.Contains(l, " REMOVED ") && strings.Contains(l, id) })

	if code := js.interrupt(); code != 0 {
		t.Errorf("watch -o json exited %d on Ctrl-C, want 0", code)
	}
	if code := txt.interrupt(); code != 0 {
		t.Errorf("watch exited %d on Ctrl-C, want 0", code)
	}
	noWorkersLeft(t, hive)
}

// TestCLIREADMETour runs the README's rbee tour verbatim against a fresh queen and hive, with
// bin/ (here: the test's binaries) first on PATH and RBEE_QUEEN naming the test queen.
func TestCLIREADMETour(t *testing.T) {
	queen, hive := cliFleet(t)
	cmds := readmeBlock(t, "cli-tour")
	if len(cmds) < 6 {
		t.Fatalf("the cli tour has %d commands", len(cmds))
	}
	for _, c := range cmds {
		c = strings.ReplaceAll(c, "127.0.0.1:7833", queen)
		cmd := exec.Command("bash", "-c", c)
		cmd.Env = rbeeEnv(queen)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v\n%s", c, err, out)
		}
	}
	noWorkersLeft(t, hive)
}
