package process

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/rbee-dev/rbee/internal/procstat"
)

// The test binary plays three more roles, chosen by RBEE_FAKE: a worker (spawned through the
// trampoline like a real one), a sleeping child of a worker, and a whole hive (to test a second
// hive deleting workers it did not spawn).
const envFake = "RBEE_FAKE"

func TestMain(m *testing.M) {
	RunTrampolineIfRequested()
	switch os.Getenv(envFake) {
	case "worker":
		fakeWorker()
	case "sleeper":
		for {
			time.Sleep(time.Hour) // a child that just exists until killed
		}
	case "hive":
		fakeHive()
	}
	goleak.VerifyTestMain(m)
}

// report is what a fake worker tells the test through its FIFO once it is ready.
type report struct {
	PID          int      `json:"pid"`
	ListenPID    string   `json:"listen_pid"`
	ListenFDs    string   `json:"listen_fds"`
	FD3Port      int      `json:"fd3_port"`
	FD3Listening bool     `json:"fd3_listening"`
	Children     []int    `json:"children"`
	Args         []string `json:"args"`
	Signal       string   `json:"signal,omitempty"` // set on later lines: a signal it received
}

// fakeWorker behaves as FAKE_* variables say: ignore SIGTERM, fork sleepers, print lines, report
// through the FIFO at FAKE_REPORT, then exit or wait.
func fakeWorker() {
	var out *os.File
	if p := os.Getenv("FAKE_REPORT"); p != "" {
		f, err := os.OpenFile(p, os.O_WRONLY, 0)
		if err != nil {
			fmt.Fprintln(os.Stderr, "open report fifo:", err)
			os.Exit(90)
		}
		out = f
	}
	send := func(r report) {
		if out != nil {
			b, _ := json.Marshal(r)
			out.Write(append(b, '\n'))
		}
	}
	if os.Getenv("FAKE_IGNORE_TERM") == "1" {
		signal.Ignore(syscall.SIGTERM)
	}
	var sigs chan os.Signal // nil, so the loop below is skipped, unless FAKE_NOTIFY=1
	if os.Getenv("FAKE_NOTIFY") == "1" {
		sigs = make(chan os.Signal, 4)
		signal.Notify(sigs, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGINT, syscall.SIGUSR1, syscall.SIGCONT)
	}
	r := report{PID: os.Getpid(), ListenPID: os.Getenv("LISTEN_PID"), ListenFDs: os.Getenv("LISTEN_FDS"), Args: os.Args}
	if sa, err := unix.Getsockname(3); err == nil {
		if in, ok := sa.(*unix.SockaddrInet4); ok {
			r.FD3Port = in.Port
		}
		v, err := unix.GetsockoptInt(3, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
		r.FD3Listening = err == nil && v == 1
	}
	n, _ := strconv.Atoi(os.Getenv("FAKE_CHILDREN"))
	for i := range n {
		cmd := exec.Command("/proc/self/exe")
		cmd.Env = append(os.Environ(), envFake+"=sleeper")
		if i == n-1 {
			cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true} // escapes the worker's group
		}
		if err := cmd.Start(); err != nil {
			fmt.Fprintln(os.Stderr, "start child:", err)
			os.Exit(91)
		}
		r.Children = append(r.Children, cmd.Process.Pid)
	}
	lines, _ := strconv.Atoi(os.Getenv("FAKE_LINES"))
	w := bufio.NewWriter(os.Stdout)
	for i := range lines {
		fmt.Fprintf(w, "line %d %s\n", i, strings.Repeat("x", 60))
	}
	w.Flush()
	send(r)
	if os.Getenv("FAKE_KILLSELF") == "1" {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
	}
	if c := os.Getenv("FAKE_EXIT"); c != "" {
		code, _ := strconv.Atoi(c)
		syscall.Exit(code) // not os.Exit: under -race that sleeps a second at exit
	}
	burst := 0
	for sigs != nil {
		s := <-sigs
		burst++
		if n, _ := strconv.Atoi(os.Getenv("FAKE_BURST")); n > 0 && s == syscall.SIGUSR1 {
			for i := range n {
				fmt.Fprintf(w, "burst %d line %d %s\n", burst, i, strings.Repeat("b", 60))
			}
			w.Flush()
		}
		fmt.Printf("got %s\n", unix.SignalName(s.(syscall.Signal))) // for the log followers
		send(report{PID: os.Getpid(), Signal: unix.SignalName(s.(syscall.Signal))})
		if s == syscall.SIGTERM {
			syscall.Exit(0)
		}
	}
	for {
		time.Sleep(time.Hour) // wait to be deleted; nothing is synchronised on this
	}
}

// fakeHive is a separate hive process: it spawns FAKE_HIVE_N workers, prints their Spawned as JSON
// lines on stdout and waits to be killed with -9.
func fakeHive() {
	mode := CgroupAuto
	if os.Getenv("FAKE_CGROUPS") == "off" {
		mode = CgroupOff
	}
	self, _ := os.Executable()
	m, err := New(Config{Binary: self, PortLow: 21000, PortHigh: 21999, LogDir: os.Getenv("FAKE_LOGDIR"), Cgroups: mode,
		HiveID: fmt.Sprintf("t%d", os.Getpid())})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(92)
	}
	n, _ := strconv.Atoi(os.Getenv("FAKE_HIVE_N"))
	for i := range n {
		env := []string{envFake + "=worker", "FAKE_REPORT=" + os.Getenv("FAKE_REPORT")}
		if i%2 == 1 {
			env = append(env, "FAKE_IGNORE_TERM=1")
		}
		s, err := m.Spawn(context.Background(), SpawnSpec{WorkerID: "orphan-" + strconv.Itoa(i), Env: env})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(93)
		}
		b, _ := json.Marshal(s)
		fmt.Println(string(b))
	}
	for {
		time.Sleep(time.Hour) // killed by the test
	}
}

// fifo is the test's end of a worker's report channel.
type fifo struct {
	path string
	f    *os.File
	r    *bufio.Reader
}

func newFIFO(t testing.TB) *fifo {
	t.Helper()
	p := filepath.Join(t.TempDir(), "report")
	if err := unix.Mkfifo(p, 0o600); err != nil {
		t.Fatal(err)
	}
	// O_RDWR so that opening does not wait for a writer and reads never see EOF between writers.
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &fifo{path: p, f: f, r: bufio.NewReader(f)}
}

// next waits (bounded) for the next report line.
func (q *fifo) next(t testing.TB) report {
	t.Helper()
	q.f.SetReadDeadline(time.Now().Add(15 * time.Second))
	line, err := q.r.ReadBytes('\n')
	if err != nil {
		t.Fatalf("waiting for a worker report: %v", err)
	}
	var r report
	if err := json.Unmarshal(line, &r); err != nil {
		t.Fatalf("report %q: %v", line, err)
	}
	return r
}

// harness is one Manager under test plus everything its test started.
type harness struct {
	t    *testing.T
	m    *Manager
	cfg  Config
	mode CgroupMode
	self string
}

var hiveSeq int

// forModes runs f once with cgroups (when this machine has a writable cgroup v2) and once without.
func forModes(t *testing.T, f func(t *testing.T, mode CgroupMode)) {
	t.Run("cgroup", func(t *testing.T) {
		if _, ok := findCgroup2(); !ok {
			t.Skip("no writable cgroup v2 hierarchy")
		}
		f(t, CgroupAuto)
	})
	t.Run("pgroup", func(t *testing.T) { f(t, CgroupOff) })
}

func newHarness(t *testing.T, mode CgroupMode, edit func(*Config)) *harness {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	// A hive id of its own keeps Live() blind to other hives running on this machine.
	hiveSeq++
	cfg := Config{Binary: self, PortLow: 21000, PortHigh: 21999, LogDir: t.TempDir(), Cgroups: mode,
		HiveID: fmt.Sprintf("t%d-%d", os.Getpid(), hiveSeq)}
	if edit != nil {
		edit(&cfg)
	}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if mode == CgroupAuto && !m.useCg {
		t.Fatal("cgroup mode requested but the Manager uses none")
	}
	h := &harness{t: t, m: m, cfg: m.cfg, mode: mode, self: self}
	t.Cleanup(func() {
		m.Close()
		m.reapers.Wait() // every test deletes what it spawned, so every reaper ends
		if m.useCg {
			dir := filepath.Join(m.cg.mount, m.cg.own, hiveCgroupPrefix+cfg.HiveID)
			if _, err := os.Stat(dir); !os.IsNotExist(err) {
				t.Errorf("Close left the empty cgroup %s", dir)
				os.Remove(dir)
			}
		}
	})
	return h
}

// spawn starts a fake worker with the given FAKE_* settings and registers its removal.
func (h *harness) spawn(id string, env ...string) Spawned {
	h.t.Helper()
	s, err := h.m.Spawn(h.t.Context(), SpawnSpec{WorkerID: id, Model: "m", Device: "cpu",
		QueenAddress: "127.0.0.1:1", Env: append([]string{envFake + "=worker"}, env...)})
	if err != nil {
		h.t.Fatalf("Spawn(%s): %v", id, err)
	}
	watchUnlessGone(h.t, s.PID) // the last resort if the Delete below were refused
	h.t.Cleanup(func() {
		// Idempotent: already deleted workers come back AlreadyExited.
		if _, err := h.m.Delete(context.Background(), Target{WorkerID: id, PID: s.PID, StartTime: s.StartTime}, 0); err != nil && KindOf(err) != KindNotWorker {
			h.t.Errorf("cleanup delete %s: %v", id, err)
		}
	})
	return s
}

// spawnReady spawns a worker reporting through a new FIFO and waits for its report.
func (h *harness) spawnReady(id string, env ...string) (Spawned, report, *fifo) {
	h.t.Helper()
	q := newFIFO(h.t)
	s := h.spawn(id, append(env, "FAKE_REPORT="+q.path)...)
	r := q.next(h.t)
	if r.PID != s.PID {
		h.t.Fatalf("report from pid %d, spawned %d", r.PID, s.PID)
	}
	return s, r, q
}

// watch opens a pidfd for a process the test knows about and kills it at cleanup if still alive.
func watch(t *testing.T, pid int) int {
	t.Helper()
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		t.Fatalf("pidfd_open %d: %v", pid, err)
	}
	killAtCleanup(t, fd)
	return fd
}

// killAtCleanup kills the process of pidfd fd, if it still runs, when the test ends.
func killAtCleanup(t *testing.T, fd int) {
	t.Cleanup(func() {
		if !exited(fd) {
			unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
			waitExit(fd, 5*time.Second)
		}
		unix.Close(fd)
	})
}

// watchUnlessGone is watch for a process that may already have exited and been reaped (a worker
// failing at once, e.g. before exec, can be gone before Spawn's caller looks).
func watchUnlessGone(t *testing.T, pid int) {
	t.Helper()
	fd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return
	}
	if err != nil {
		t.Fatalf("pidfd_open %d: %v", pid, err)
	}
	killAtCleanup(t, fd)
}

func alive(fd int) bool { return !exited(fd) }

// kthread returns the PID of a kernel thread (its /proc/PID/environ cannot even be opened), or
// skips the test where none is visible (a container's PID namespace).
func kthread(t *testing.T) int {
	t.Helper()
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 1 {
			continue
		}
		if st, err := procstat.Read(pid); err == nil && st.Flags&procstat.PFKThread != 0 {
			return pid
		}
	}
	t.Skip("no kernel thread visible in this PID namespace")
	return 0
}

// startSleeper starts an unrelated process (not through the Manager) and returns its pid and pidfd.
func startSleeper(t *testing.T, env ...string) (int, int) {
	t.Helper()
	self, _ := os.Executable()
	cmd := exec.Command(self)
	cmd.Env = append(append(os.Environ(), envFake+"=sleeper"), env...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	fd := watch(t, cmd.Process.Pid)
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd.Process.Pid, fd
}

// waitState waits, bounded, until /proc says pid is in state st. Stopping is asynchronous and
// no pidfd event announces it, so this re-reads /proc, yielding in between.
func waitState(t *testing.T, pid int, st byte) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		s, err := procstat.Read(pid)
		if err == nil && s.State == st {
			return
		}
		runtime.Gosched()
	}
	t.Fatalf("pid %d never reached state %c", pid, st)
}

func wantKind(t *testing.T, err error, k Kind, contains string) {
	t.Helper()
	if KindOf(err) != k {
		t.Fatalf("err = %v (kind %v), want kind %v", err, KindOf(err), k)
	}
	if contains != "" && !strings.Contains(err.Error(), contains) {
		t.Fatalf("err = %q, want it to mention %q", err, contains)
	}
}

// freePort returns a port that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

var _ = errors.Is
