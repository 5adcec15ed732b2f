package process

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/rbee-dev/rbee/internal/procstat"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestSpawnDeleteGraceful(t *testing.T) {
	forModes(t, func(t *testing.T, mode CgroupMode) {
		h := newHarness(t, mode, nil)
		s, _, _ := h.spawnReady("w1")
		fd := watch(t, s.PID)
		if (s.Cgroup != "") != (mode == CgroupAuto) {
			t.Fatalf("Spawned.Cgroup = %q in mode %v", s.Cgroup, mode)
		}
		if got := h.m.Live(); got != 1 {
			t.Fatalf("Live() = %d, want 1", got)
		}
		start := time.Now()
		out, err := h.m.Delete(t.Context(), Target{WorkerID: "w1", PID: s.PID, StartTime: s.StartTime}, 10*time.Second)
		took := time.Since(start)
		if err != nil || out != Exited {
			t.Fatalf("Delete = %v, %v; want exited", out, err)
		}
		if took > time.Second {
			t.Fatalf("graceful Delete took %v", took)
		}
		if alive(fd) {
			t.Fatal("worker still alive after Delete")
		}
		if got := h.m.Live(); got != 0 {
			t.Fatalf("Live() = %d right after delete, want 0", got)
		}
		h.m.tidying.Wait() // the cgroup is removed after the answer
		if s.Cgroup != "" {
			if _, err := os.Stat(s.Cgroup); !os.IsNotExist(err) {
				t.Fatalf("cgroup %s not removed: %v", s.Cgroup, err)
			}
		}
		if got := h.m.Live(); got != 0 {
			t.Fatalf("Live() = %d after delete, want 0", got)
		}
	})
}

func TestDeleteIgnoringSIGTERM(t *testing.T) {
	forModes(t, func(t *testing.T, mode CgroupMode) {
		h := newHarness(t, mode, nil)
		s, _, _ := h.spawnReady("stubborn", "FAKE_IGNORE_TERM=1")
		fd := watch(t, s.PID)
		const grace = 300 * time.Millisecond
		start := time.Now()
		out, err := h.m.Delete(t.Context(), Target{WorkerID: "stubborn", PID: s.PID, StartTime: s.StartTime}, grace)
		took := time.Since(start)
		if err != nil || out != Killed {
			t.Fatalf("Delete = %v, %v; want killed", out, err)
		}
		if took < grace || took > grace+time.Second {
			t.Fatalf("Delete took %v, want just over the %v grace", took, grace)
		}
		if alive(fd) {
			t.Fatal("worker still alive")
		}
	})
}

func TestDeleteGraceZero(t *testing.T) {
	forModes(t, func(t *testing.T, mode CgroupMode) {
		h := newHarness(t, mode, nil)
		s, _, _ := h.spawnReady("now")
		fd := watch(t, s.PID)
		out, err := h.m.Delete(t.Context(), Target{WorkerID: "now", PID: s.PID}, 0)
		if err != nil || out != Killed {
			t.Fatalf("Delete = %v, %v; want killed", out, err)
		}
		if alive(fd) {
			t.Fatal("worker still alive")
		}
	})
}

func TestDeleteAlreadyExited(t *testing.T) {
	forModes(t, func(t *testing.T, mode CgroupMode) {
		exits := make(chan Exit, 1)
		h := newHarness(t, mode, func(c *Config) { c.OnExit = func(e Exit) { exits <- e } })
		s, _, _ := h.spawnReady("brief", "FAKE_EXIT=0")
		<-exits // reaped
		tg := Target{WorkerID: "brief", PID: s.PID, StartTime: s.StartTime}
		for i := range 2 {
			out, err := h.m.Delete(t.Context(), tg, time.Second)
			if err != nil || out != AlreadyExited {
				t.Fatalf("Delete #%d = %v, %v; want already exited", i+1, out, err)
			}
		}
	})
}

func TestDeleteRefusesWhatIsNotTheWorker(t *testing.T) {
	forModes(t, func(t *testing.T, mode CgroupMode) {
		h := newHarness(t, mode, nil)
		// The victim records every catchable signal it gets; the only one must be the final SIGTERM.
		s, _, q := h.spawnReady("victim", "FAKE_NOTIFY=1")
		victim := watch(t, s.PID)
		other, _, _ := h.spawnReady("other")
		unrelated, unrelatedFD := startSleeper(t)
		// An unrelated process that even carries the marker of another worker id.
		marked, markedFD := startSleeper(t, envWorkerID+"=someone-else")
		// One with an empty environment, as a process inside an exec seems to have for a moment.
		bare := exec.Command("sleep", "600")
		bare.Env = []string{}
		if err := bare.Start(); err != nil {
			t.Fatal(err)
		}
		bareFD := watch(t, bare.Process.Pid)
		t.Cleanup(func() { bare.Process.Kill(); bare.Wait() })

		tid := 0
		ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", s.PID))
		for _, e := range ents {
			if n, _ := strconv.Atoi(e.Name()); n != s.PID && n > 0 {
				tid = n
				break
			}
		}
		if tid == 0 {
			t.Fatal("the Go worker has no second thread")
		}

		cases := []struct {
			name string
			tg   Target
			want string
		}{
			{"pid 0", Target{WorkerID: "victim", PID: 0}, "pid 0 is not a worker"},
			{"pid -1", Target{WorkerID: "victim", PID: -1}, "pid -1 is not a worker"},
			{"pid 1", Target{WorkerID: "victim", PID: 1}, "pid 1 is not a worker"},
			{"hive itself", Target{WorkerID: "victim", PID: os.Getpid()}, "the hive itself"},
			{"hive's parent", Target{WorkerID: "victim", PID: os.Getppid()}, "the hive's parent"},
			{"unrelated process", Target{WorkerID: "victim", PID: unrelated}, "environment lacks"},
			{"another worker id's marker", Target{WorkerID: "victim", PID: marked}, "environment lacks"},
			{"thread id of the worker", Target{WorkerID: "victim", PID: tid}, "thread"},
			{"wrong start time", Target{WorkerID: "victim", PID: s.PID, StartTime: s.StartTime + 1}, "start time"},
			{"another worker's pid", Target{WorkerID: "victim", PID: other.PID, StartTime: other.StartTime}, "worker other's process"},
			{"a kernel thread", Target{WorkerID: "victim", PID: kthread(t)}, "kernel thread"},
		}
		for _, c := range cases {
			for _, grace := range []time.Duration{0, time.Second} {
				out, err := h.m.Delete(t.Context(), c.tg, grace)
				if out != OutcomeUnknown {
					t.Errorf("%s: outcome %v", c.name, out)
				}
				if KindOf(err) != KindNotWorker || !strings.Contains(err.Error(), c.want) {
					t.Errorf("%s: err = %v, want KindNotWorker mentioning %q", c.name, err, c.want)
				}
			}
		}
		// An empty environment is what an exec in progress shows: refused once it stays so.
		start := time.Now()
		_, err := h.m.Delete(t.Context(), Target{WorkerID: "victim", PID: bare.Process.Pid}, time.Second)
		wantKind(t, err, KindNotWorker, "empty or unreadable")
		if took := time.Since(start); took < execWindow || took > execWindow+time.Second {
			t.Errorf("an empty environment refused after %v, want just over %v", took, execWindow)
		}
		if !alive(victim) || !alive(unrelatedFD) || !alive(markedFD) || !alive(bareFD) {
			t.Fatal("a refused Delete killed something")
		}

		if mode == CgroupAuto {
			// Moved into another worker's cgroup, the victim's marker alone proves nothing.
			procs := filepath.Join(other.Cgroup, "cgroup.procs")
			if err := os.WriteFile(procs, []byte(strconv.Itoa(s.PID)), 0); err != nil {
				t.Fatal(err)
			}
			_, err := h.m.Delete(t.Context(), Target{WorkerID: "victim", PID: s.PID, StartTime: s.StartTime}, 0)
			wantKind(t, err, KindNotWorker, "cgroup")
			if err := os.WriteFile(filepath.Join(s.Cgroup, "cgroup.procs"), []byte(strconv.Itoa(s.PID)), 0); err != nil {
				t.Fatal(err)
			}
		}

		out, err := h.m.Delete(t.Context(), Target{WorkerID: "victim", PID: s.PID, StartTime: s.StartTime}, 5*time.Second)
		if err != nil || out != Exited {
			t.Fatalf("final Delete = %v, %v", out, err)
		}
		// The victim exits on SIGTERM; Delete sends SIGCONT right after it, which may arrive first.
		for {
			r := q.next(t)
			if r.Signal == "SIGTERM" {
				break
			}
			if r.Signal != "SIGCONT" {
				t.Fatalf("the victim got %q before the final Delete's SIGTERM", r.Signal)
			}
		}
	})
}

func TestDeleteStoppedWorker(t *testing.T) {
	forModes(t, func(t *testing.T, mode CgroupMode) {
		h := newHarness(t, mode, nil)
		s, _, _ := h.spawnReady("frozen")
		fd := watch(t, s.PID)
		if err := unix.PidfdSendSignal(fd, unix.SIGSTOP, nil, 0); err != nil {
			t.Fatal(err)
		}
		waitState(t, s.PID, 'T')
		out, err := h.m.Delete(t.Context(), Target{WorkerID: "frozen", PID: s.PID, StartTime: s.StartTime}, 5*time.Second)
		if err != nil || out != Exited {
			t.Fatalf("Delete = %v, %v; want exited (SIGCONT lets SIGTERM act)", out, err)
		}
		if alive(fd) {
			t.Fatal("stopped worker survived")
		}
	})
}

func TestDeleteRemovesWorkerChildren(t *testing.T) {
	forModes(t, func(t *testing.T, mode CgroupMode) {
		for _, tc := range []struct {
			name string
			env  []string
			want Outcome
		}{
			{"graceful", nil, Exited},
			{"killed", []string{"FAKE_IGNORE_TERM=1"}, Killed},
		} {
			t.Run(tc.name, func(t *testing.T) {
				h := newHarness(t, mode, nil)
				s, r, _ := h.spawnReady("parent", append(tc.env, "FAKE_CHILDREN=3")...)
				if len(r.Children) != 3 {
					t.Fatalf("children %v", r.Children)
				}
				fds := []int{watch(t, s.PID)}
				for _, c := range r.Children {
					fds = append(fds, watch(t, c))
				}
				out, err := h.m.Delete(t.Context(), Target{WorkerID: "parent", PID: s.PID, StartTime: s.StartTime}, 300*time.Millisecond)
				if err != nil || out != tc.want {
					t.Fatalf("Delete = %v, %v; want %v", out, err, tc.want)
				}
				for i, fd := range fds {
					if alive(fd) {
						t.Errorf("process %d (index %d; last child is in its own session) survived", append([]int{s.PID}, r.Children...)[i], i)
					}
				}
			})
		}
	})
}

// TestSecondHiveDeletesOrphans kills a hive with -9 and deletes its workers from another one.
func TestSecondHiveDeletesOrphans(t *testing.T) {
	forModes(t, func(t *testing.T, mode CgroupMode) {
		q := newFIFO(t)
		self, _ := os.Executable()
		hive := exec.Command(self)
		cg := "auto"
		if mode == CgroupOff {
			cg = "off"
		}
		hive.Env = append(os.Environ(), envFake+"=hive", "FAKE_HIVE_N=2", "FAKE_REPORT="+q.path,
			"FAKE_LOGDIR="+t.TempDir(), "FAKE_CGROUPS="+cg)
		stdout, _ := hive.StdoutPipe()
		hive.Stderr = os.Stderr
		if err := hive.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { hive.Process.Kill(); hive.Wait() })
		sc := bufio.NewScanner(stdout)
		var spawned []Spawned
		for range 2 {
			if !sc.Scan() {
				t.Fatalf("fake hive: %v", sc.Err())
			}
			var s Spawned
			if err := json.Unmarshal(sc.Bytes(), &s); err != nil {
				t.Fatal(err)
			}
			spawned = append(spawned, s)
			watch(t, s.PID)
		}
		for range 2 {
			q.next(t) // both workers ready
		}
		hive.Process.Kill() // SIGKILL: the hive dies, its workers stay
		hive.Wait()

		h := newHarness(t, mode, nil)
		for i, s := range spawned {
			fd := watch(t, s.PID)
			if !alive(fd) {
				t.Fatalf("worker %d died with its hive", i)
			}
			want := []Outcome{Exited, Killed}[i] // worker 1 ignores SIGTERM
			out, err := h.m.Delete(t.Context(), Target{WorkerID: "orphan-" + strconv.Itoa(i), PID: s.PID, StartTime: s.StartTime}, 300*time.Millisecond)
			if err != nil || out != want {
				t.Fatalf("Delete orphan %d = %v, %v; want %v", i, out, err, want)
			}
			if alive(fd) {
				t.Fatalf("orphan %d still alive", i)
			}
			h.m.tidying.Wait()
			if s.Cgroup != "" {
				if _, err := os.Stat(s.Cgroup); !os.IsNotExist(err) {
					t.Fatalf("orphan cgroup %s left behind", s.Cgroup)
				}
			}
		}
		if spawned[0].Cgroup != "" {
			os.Remove(filepath.Dir(spawned[0].Cgroup)) // the dead hive's rbee-<hive-id>
		}
	})
}

func TestConcurrentDeletesShareOneOutcome(t *testing.T) {
	forModes(t, func(t *testing.T, mode CgroupMode) {
		h := newHarness(t, mode, nil)
		s, _, _ := h.spawnReady("twice", "FAKE_IGNORE_TERM=1")
		tg := Target{WorkerID: "twice", PID: s.PID, StartTime: s.StartTime}
		var wg sync.WaitGroup
		outs := make([]Outcome, 4)
		errs := make([]error, 4)
		for i := range outs {
			wg.Go(func() { outs[i], errs[i] = h.m.Delete(t.Context(), tg, 300*time.Millisecond) })
		}
		wg.Wait()
		for i := range outs {
			if errs[i] != nil || outs[i] != Killed {
				t.Fatalf("Delete #%d = %v, %v; want killed like the others (%v)", i, outs[i], errs[i], outs)
			}
		}
	})
}

func TestPorts(t *testing.T) {
	forModes(t, func(t *testing.T, mode CgroupMode) {
		port := freePort(t)
		h := newHarness(t, mode, func(c *Config) { c.PortLow, c.PortHigh = port, port })
		s, r, _ := h.spawnReady("p1")
		if s.Port != port {
			t.Fatalf("port %d, want %d", s.Port, port)
		}
		// Socket activation: LISTEN_PID names the worker itself, fd 3 listens on the reported port.
		if r.ListenPID != strconv.Itoa(s.PID) || r.ListenFDs != "1" || r.FD3Port != port || !r.FD3Listening {
			t.Fatalf("worker saw %+v; want LISTEN_PID=%d LISTEN_FDS=1 and fd 3 listening on %d", r, s.PID, port)
		}
		want := []string{"--worker-id", "p1", "--hive-id", h.cfg.HiveID, "--model", "m", "--device", "cpu", "--port", strconv.Itoa(port), "--queen", "127.0.0.1:1"}
		if !slices.Equal(r.Args[1:], want) {
			t.Fatalf("args %q, want %q", r.Args[1:], want)
		}
		c, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			t.Fatalf("dial the worker's port: %v", err)
		}
		c.Close()

		_, err = h.m.Spawn(t.Context(), SpawnSpec{WorkerID: "p2", Env: []string{envFake + "=worker"}})
		wantKind(t, err, KindExhausted, "no free port")

		if _, err := h.m.Delete(t.Context(), Target{WorkerID: "p1", PID: s.PID, StartTime: s.StartTime}, 5*time.Second); err != nil {
			t.Fatal(err)
		}
		s3, _, _ := h.spawnReady("p3") // the dead worker's port is free again, no bookkeeping
		if s3.Port != port {
			t.Fatalf("port %d after reuse, want %d", s3.Port, port)
		}
		if _, err := h.m.Delete(t.Context(), Target{WorkerID: "p3", PID: s3.PID}, 0); err != nil {
			t.Fatal(err)
		}
	})
}

func TestMaxWorkers(t *testing.T) {
	forModes(t, func(t *testing.T, mode CgroupMode) {
		h := newHarness(t, mode, func(c *Config) { c.MaxWorkers = 1 })
		s, _, _ := h.spawnReady("only")
		_, err := h.m.Spawn(t.Context(), SpawnSpec{WorkerID: "more", Env: []string{envFake + "=worker"}})
		wantKind(t, err, KindExhausted, "max workers")
		if _, err := h.m.Delete(t.Context(), Target{WorkerID: "only", PID: s.PID}, 0); err != nil {
			t.Fatal(err)
		}
	})
}

// logOf returns the path of the one log file of worker id in dir.
func logOf(t *testing.T, dir, id string) string {
	t.Helper()
	paths, _ := filepath.Glob(filepath.Join(dir, logPrefix+id+".*"+logSuffix))
	if len(paths) != 1 {
		t.Fatalf("log files of %s in %s: %v, want one", id, dir, paths)
	}
	return paths[0]
}

func TestLogCap(t *testing.T) {
	h := newHarness(t, CgroupOff, func(c *Config) { c.LogMaxBytes = 64 << 10 })
	h.spawnReady("chatty", "FAKE_LINES=4000") // ~270 KB
	path := logOf(t, h.cfg.LogDir, "chatty")
	h.m.capLogs()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(b)) > h.cfg.LogMaxBytes {
		t.Fatalf("log is %d bytes, cap %d", len(b), h.cfg.LogMaxBytes)
	}
	if !strings.HasPrefix(string(b), "line ") || !strings.HasSuffix(string(b), "line 3999 "+strings.Repeat("x", 60)+"\n") {
		t.Fatalf("capped log does not keep whole lines up to the last: starts %q", b[:min(len(b), 20)])
	}
}

// TestLogCapTouchesOnlyLiveWorkersLogs: --log-dir may hold an operator's own files; the cap
// must leave every file alone that is not the log of a live worker, whatever its name.
func TestLogCapTouchesOnlyLiveWorkersLogs(t *testing.T) {
	dir := t.TempDir()
	big := bytes.Repeat([]byte(strings.Repeat("y", 99)+"\n"), 2000) // 200 KB
	foreign := []string{"important.log", "chatty.log", logName("gone", time.Now())}
	for _, n := range foreign {
		if err := os.WriteFile(filepath.Join(dir, n), big, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	h := newHarness(t, CgroupOff, func(c *Config) { c.LogMaxBytes = 64 << 10; c.LogDir = dir })
	h.spawnReady("chatty", "FAKE_LINES=4000")
	h.m.capLogs()
	for _, n := range foreign {
		fi, err := os.Stat(filepath.Join(dir, n))
		if err != nil || fi.Size() != int64(len(big)) {
			t.Errorf("%s: %v, size %d; the hive must not touch files that are not a live worker's log", n, err, fi.Size())
		}
	}
	if fi, _ := os.Stat(logOf(t, dir, "chatty")); fi.Size() > 64<<10 {
		t.Errorf("the live worker's log was not capped: %d bytes", fi.Size())
	}
}

// TestLogCapAdoptsEarlierHivesWorkers: a restarted hive keeps capping the logs of the workers its
// predecessor spawned (found by their lock), though it never globs the directory on its ticks.
func TestLogCapAdoptsEarlierHivesWorkers(t *testing.T) {
	dir := t.TempDir()
	a := newHarness(t, CgroupOff, func(c *Config) { c.LogMaxBytes = 64 << 10; c.LogDir = dir })
	a.spawnReady("old", "FAKE_LINES=4000")
	a.m.Close()
	b := newHarness(t, CgroupOff, func(c *Config) { c.LogMaxBytes = 64 << 10; c.LogDir = dir })
	b.m.capLogs()
	if fi, _ := os.Stat(logOf(t, dir, "old")); fi.Size() > 64<<10 {
		t.Errorf("the earlier hive's worker's log was not capped: %d bytes", fi.Size())
	}
}

// TestLogPerLife: a worker id used again starts a new log, and the exit of the new process is
// reported with its own output, never its predecessor's.
func TestLogPerLife(t *testing.T) {
	exits := make(chan Exit, 1)
	h := newHarness(t, CgroupOff, func(c *Config) { c.OnExit = func(e Exit) { exits <- e } })
	h.spawnReady("d1", "FAKE_LINES=3", "FAKE_EXIT=3")
	if e := <-exits; !strings.Contains(e.LogTail, "line 2 ") {
		t.Fatalf("first life's exit: %+v", e)
	}
	h.spawnReady("d1", "FAKE_EXIT=4")
	if e := <-exits; e.ExitCode != 4 || e.LogTail != "" {
		t.Fatalf("second life's exit = %+v; want exit 4 and no output (it printed none)", e)
	}
	var got bytes.Buffer
	if err := h.m.Logs(t.Context(), "d1", 0, false, func(b []byte) error { got.Write(b); return nil }); err != nil {
		t.Fatal(err)
	}
	if got.Len() != 0 {
		t.Errorf("Logs(d1) shows the previous life's output: %q", got.String())
	}
}

// TestLogDirRemovedAfterStart: the worker still gets its log (the directories are made again, all
// that are missing, as os.MkdirAll would), and a log that cannot be made fails the worker with the
// reason, not a bare "exit status 126"; through each trampoline.
func TestLogDirRemovedAfterStart(t *testing.T) {
	forTrampolines(t, func(t *testing.T, tm trampolineMode) {
		exits := make(chan Exit, 1)
		top := filepath.Join(t.TempDir(), "logs")
		dir := filepath.Join(top, "hive", "workers")
		h := newHarness(t, CgroupOff, func(c *Config) { c.LogDir = dir; c.OnExit = func(e Exit) { exits <- e }; tm.edit(c) })
		check := expectPath(t, h.m, tm)
		if err := os.RemoveAll(top); err != nil {
			t.Fatal(err)
		}
		s, _, _ := h.spawnReady("w1", "FAKE_LINES=1")
		check(s.PID)
		if b, err := os.ReadFile(logOf(t, dir, "w1")); err != nil || !strings.HasPrefix(string(b), "line 0 ") {
			t.Fatalf("log after the directory was removed: %q, %v", b, err)
		}

		// Now a regular file where a directory should be: nothing can create it.
		if err := os.RemoveAll(top); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(top, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		h.spawn("w2", "FAKE_EXIT=0")
		e := <-exits
		if e.ExitCode != 126 || !strings.Contains(e.LogTail, "cannot give the worker its log file") || !strings.Contains(e.LogTail, dir) {
			t.Fatalf("Exit = %+v; want 126 with the reason naming the log directory", e)
		}
		err := h.m.Logs(t.Context(), "w2", 0, false, func([]byte) error { return nil })
		wantKind(t, err, KindNotFound, "no log of worker")
	})
}

func TestLogsTail(t *testing.T) {
	h := newHarness(t, CgroupOff, nil)
	h.spawnReady("tl", "FAKE_LINES=30")
	read := func(n int) string {
		var b bytes.Buffer
		if err := h.m.Logs(t.Context(), "tl", n, false, func(p []byte) error { b.Write(p); return nil }); err != nil {
			t.Fatal(err)
		}
		return b.String()
	}
	for _, tc := range []struct{ n, want, first int }{{5, 5, 25}, {1, 1, 29}, {30, 30, 0}, {500, 30, 0}, {0, 30, 0}} {
		got := strings.Split(strings.TrimSuffix(read(tc.n), "\n"), "\n")
		if len(got) != tc.want || !strings.HasPrefix(got[0], fmt.Sprintf("line %d ", tc.first)) {
			t.Errorf("tail %d: %d lines starting %q; want %d from line %d", tc.n, len(got), got[0], tc.want, tc.first)
		}
	}
	wantKind(t, h.m.Logs(t.Context(), "nobody", 0, false, func([]byte) error { return nil }), KindNotFound, "no log of worker")
	// A link planted in the log directory is not followed.
	if err := os.Symlink("/etc/passwd", filepath.Join(h.cfg.LogDir, logName("evil", time.Now()))); err != nil {
		t.Fatal(err)
	}
	var leaked bytes.Buffer
	if err := h.m.Logs(t.Context(), "evil", 0, false, func(b []byte) error { leaked.Write(b); return nil }); err == nil || leaked.Len() > 0 {
		t.Errorf("Logs through a symlink: %v, %q", err, leaked.String())
	}
	wantKind(t, h.m.Logs(t.Context(), "../etc", 0, false, func([]byte) error { return nil }), KindInvalid, "")
}

// TestLogsFollow: a follow sees what the worker writes next, and ends by itself once the worker
// is gone and everything it wrote was sent.
func TestLogsFollow(t *testing.T) {
	forModes(t, testLogsFollow)
}

// TestLogsFollowWithoutInotify: with no inotify instance to be had, a follow polls and still sees
// everything and ends.
func TestLogsFollowWithoutInotify(t *testing.T) {
	watchLog = func(string) (*os.File, error) { return nil, unix.EMFILE }
	t.Cleanup(func() { watchLog = newInotify })
	testLogsFollow(t, CgroupOff)
}

func testLogsFollow(t *testing.T, mode CgroupMode) {
	h := newHarness(t, mode, nil)
	s, _, q := h.spawnReady("fl", "FAKE_LINES=3", "FAKE_NOTIFY=1")
	chunks := make(chan string, 100)
	done := make(chan error, 1)
	go func() {
		done <- h.m.Logs(t.Context(), "fl", 2, true, func(b []byte) error { chunks <- string(b); return nil })
	}()
	var got strings.Builder
	until := func(want string) {
		t.Helper()
		timeout := time.After(15 * time.Second)
		for !strings.Contains(got.String(), want) {
			select {
			case c := <-chunks:
				got.WriteString(c)
			case <-timeout:
				t.Fatalf("follow did not show %q; got %q", want, got.String())
			}
		}
	}
	until("line 2 ")
	if strings.Contains(got.String(), "line 0 ") {
		t.Errorf("tail 2 showed line 0: %q", got.String())
	}
	fd := watch(t, s.PID)
	unix.PidfdSendSignal(fd, unix.SIGUSR1, nil, 0)
	q.next(t)
	until("got SIGUSR1\n")
	if _, err := h.m.Delete(t.Context(), Target{WorkerID: "fl", PID: s.PID}, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("follow did not end after the worker was deleted")
	}
	for len(chunks) > 0 {
		got.WriteString(<-chunks)
	}
	if !strings.HasSuffix(got.String(), "got SIGTERM\n") {
		t.Errorf("follow ended before the worker's last line: %q", got.String())
	}

	// A follow of a worker that is gone sends its log and ends at once.
	var after bytes.Buffer
	if err := h.m.Logs(t.Context(), "fl", 100, true, func(b []byte) error { after.Write(b); return nil }); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(after.String(), "line 0 ") || !strings.HasSuffix(after.String(), "got SIGTERM\n") {
		t.Errorf("log of the deleted worker: %q", after.String())
	}
}

// TestLogsFollowAcrossCaps: a follow goes on at the right place when the cap cuts the file under
// it: no line twice, in order, up to the last (lines the cap dropped before the follower read
// them are lost, as a cap must).
func TestLogsFollowAcrossCaps(t *testing.T) {
	h := newHarness(t, CgroupOff, func(c *Config) { c.LogMaxBytes = 64 << 10 })
	s, _, q := h.spawnReady("cc", "FAKE_LINES=3", "FAKE_NOTIFY=1", "FAKE_BURST=1500") // ~110 KB a burst
	var mu sync.Mutex
	var got bytes.Buffer
	done := make(chan error, 1)
	go func() {
		done <- h.m.Logs(t.Context(), "cc", 0, true, func(b []byte) error { mu.Lock(); got.Write(b); mu.Unlock(); return nil })
	}()
	fd := watch(t, s.PID)
	for range 3 {
		unix.PidfdSendSignal(fd, unix.SIGUSR1, nil, 0)
		q.next(t)
		h.m.capLogs()
	}
	if _, err := h.m.Delete(t.Context(), Target{WorkerID: "cc", PID: s.PID}, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("follow did not end")
	}
	lines := strings.Split(strings.TrimSuffix(got.String(), "\n"), "\n")
	seen := map[string]bool{}
	last := ""
	for _, l := range lines {
		if seen[l] && strings.HasPrefix(l, "burst ") {
			t.Fatalf("line %q sent twice", l)
		}
		seen[l] = true
		if strings.HasPrefix(l, "burst ") && last != "" && strings.HasPrefix(last, "burst ") {
			var b1, i1, b2, i2 int
			fmt.Sscanf(last, "burst %d line %d", &b1, &i1)
			fmt.Sscanf(l, "burst %d line %d", &b2, &i2)
			if b2 < b1 || (b2 == b1 && i2 <= i1) {
				t.Fatalf("%q after %q: out of order", l[:20], last[:20])
			}
		}
		last = l
	}
	if last != "got SIGTERM" || !seen["burst 3 line 1499 "+strings.Repeat("b", 60)] {
		t.Fatalf("follow ended with %q; want the last burst and SIGTERM", last)
	}
}

// TestLogsFollowCancelled: the caller's cancellation ends a follow of a live worker.
func TestLogsFollowCancelled(t *testing.T) {
	h := newHarness(t, CgroupOff, nil)
	h.spawnReady("fc", "FAKE_LINES=1")
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	first := make(chan struct{}, 1)
	go func() {
		done <- h.m.Logs(ctx, "fc", 0, true, func([]byte) error {
			select {
			case first <- struct{}{}:
			default:
			}
			return nil
		})
	}()
	<-first
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("cancelled follow: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("follow did not end when its caller cancelled")
	}
}

// TestLogRetention: logs of exited workers are removed past LogKeepExited (oldest first) and
// past LogKeepFor; a live worker's log never is, however old, nor anything not named as ours.
func TestLogRetention(t *testing.T) {
	exits := make(chan Exit, 1)
	dir := t.TempDir()
	h := newHarness(t, CgroupOff, func(c *Config) {
		c.LogDir, c.LogKeepExited, c.LogKeepFor = dir, 2, time.Hour
		c.OnExit = func(e Exit) { exits <- e }
	})
	old := time.Now().Add(-2 * time.Hour)
	h.spawnReady("live", "FAKE_LINES=1")
	if err := os.Chtimes(logOf(t, dir, "live"), old, old); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "rbee-worker-mine.log"), []byte("not ours\n"), 0o644)
	os.Chtimes(filepath.Join(dir, "rbee-worker-mine.log"), old, old)
	for i, id := range []string{"e1", "e2", "e3", "e4"} {
		h.spawnReady(id, "FAKE_LINES=1", "FAKE_EXIT=0")
		<-exits
		p := logOf(t, dir, id)
		// Distinct last-write times, in spawn order, without waiting for the clock.
		at := time.Now().Add(-time.Duration(10-i) * time.Second)
		os.Chtimes(p, at, at)
	}
	h.m.sweepLogs()
	names := func() []string {
		ents, _ := os.ReadDir(dir)
		var out []string
		for _, e := range ents {
			out = append(out, e.Name())
		}
		return out
	}
	has := func(prefix string) bool {
		return slices.ContainsFunc(names(), func(n string) bool { return strings.HasPrefix(n, prefix) })
	}
	for _, id := range []string{"e1", "e2"} {
		if has(logPrefix + id + ".") {
			t.Errorf("log of %s kept beyond LogKeepExited=2: %v", id, names())
		}
	}
	for _, id := range []string{"e3", "e4", "live"} {
		if !has(logPrefix + id + ".") {
			t.Errorf("log of %s removed: %v", id, names())
		}
	}
	if !has("rbee-worker-mine.log") {
		t.Errorf("a file not named as the hive's was removed")
	}
	// Past LogKeepFor an exited worker's log goes, however few there are.
	os.Chtimes(logOf(t, dir, "e3"), old, old)
	h.m.sweepLogs()
	if has(logPrefix+"e3.") || !has(logPrefix+"e4.") || !has(logPrefix+"live.") {
		t.Errorf("after e3 aged past LogKeepFor: %v", names())
	}
}

// TestLogRetentionOnExit: each exit removes the oldest exited workers' logs beyond LogKeepExited
// by itself, without a scan of the directory, and never a live worker's log or a file not ours.
func TestLogRetentionOnExit(t *testing.T) {
	exits := make(chan Exit, 1)
	dir := t.TempDir()
	h := newHarness(t, CgroupOff, func(c *Config) {
		c.LogDir, c.LogKeepExited, c.LogKeepFor = dir, 2, time.Hour // no timed sweep in this test
		c.OnExit = func(e Exit) { exits <- e }
	})
	has := func(id string) bool {
		ents, _ := os.ReadDir(dir)
		return slices.ContainsFunc(ents, func(e os.DirEntry) bool { return strings.HasPrefix(e.Name(), logPrefix+id+".") })
	}
	os.WriteFile(filepath.Join(dir, "rbee-worker-mine.log"), []byte("not ours\n"), 0o644)
	h.spawnReady("live", "FAKE_LINES=1")
	ids := []string{"e1", "e2", "e3", "e4", "e5"}
	for i, id := range ids {
		h.spawnReady(id, "FAKE_LINES=1", "FAKE_EXIT=0")
		if e := <-exits; e.WorkerID != id {
			t.Fatalf("exit of %s, want %s", e.WorkerID, id)
		}
		// The exit was reported after its log joined the exited ones: the count holds already.
		for j, prev := range ids[:i+1] {
			if want := j >= i-1; has(prev) != want {
				t.Fatalf("after %s exited: log of %s present %v, want %v", id, prev, has(prev), want)
			}
		}
	}
	if !has("live") {
		t.Error("a live worker's log was removed")
	}
	if _, err := os.Stat(filepath.Join(dir, "rbee-worker-mine.log")); err != nil {
		t.Errorf("a file not named as the hive's was removed: %v", err)
	}
}

func TestLogNames(t *testing.T) {
	at := time.Date(2026, 11, 28, 13, 4, 5, 6, time.UTC)
	n := logName("w-1", at)
	if n != "rbee-worker-w-1.20261128T130405.000000006Z.log" {
		t.Fatalf("logName = %q", n)
	}
	for _, tc := range []struct {
		name, id string
		ok       bool
	}{
		{n, "w-1", true},
		{"w-1.log", "", false},
		{"important.log", "", false},
		{"rbee-worker-w-1.log", "", false},
		{"rbee-worker-w-1.yesterday.log", "", false},
		{"rbee-worker-W.20261128T130405.000000006Z.log", "", false},
		{"rbee-worker-w-1.20261128T130405.000000006Z.log.1", "", false},
	} {
		id, ok := parseLogName(tc.name)
		if id != tc.id || ok != tc.ok {
			t.Errorf("parseLogName(%q) = %q, %v; want %q, %v", tc.name, id, ok, tc.id, tc.ok)
		}
	}
}

func TestOnExit(t *testing.T) {
	forModes(t, func(t *testing.T, mode CgroupMode) {
		exits := make(chan Exit, 1)
		h := newHarness(t, mode, func(c *Config) { c.OnExit = func(e Exit) { exits <- e } })
		s, _, _ := h.spawnReady("crashy", "FAKE_LINES=30", "FAKE_EXIT=3")
		e := <-exits
		if e.WorkerID != "crashy" || e.PID != s.PID || e.StartTime != s.StartTime || e.ExitCode != 3 || e.Signal != "" {
			t.Fatalf("Exit = %+v", e)
		}
		lines := strings.Split(e.LogTail, "\n")
		if len(lines) != 20 || !strings.HasPrefix(lines[0], "line 10 ") || !strings.HasPrefix(lines[19], "line 29 ") {
			t.Fatalf("log tail has %d lines: %q", len(lines), e.LogTail)
		}
		if s.Cgroup != "" {
			if _, err := os.Stat(s.Cgroup); !os.IsNotExist(err) {
				t.Fatalf("cgroup of an exited worker left behind")
			}
		}

		h.spawnReady("killed", "FAKE_KILLSELF=1")
		if e := <-exits; e.ExitCode != -1 || e.Signal != "SIGKILL" {
			t.Fatalf("Exit = %+v, want signal SIGKILL", e)
		}
	})
}

func TestOnExitNotCalledForDelete(t *testing.T) {
	called := make(chan Exit, 1)
	h := newHarness(t, CgroupOff, func(c *Config) { c.OnExit = func(e Exit) { called <- e } })
	s, _, _ := h.spawnReady("quiet")
	if _, err := h.m.Delete(t.Context(), Target{WorkerID: "quiet", PID: s.PID}, time.Second); err != nil {
		t.Fatal(err)
	}
	h.m.Close()
	h.m.reapers.Wait()
	select {
	case e := <-called:
		t.Fatalf("OnExit called for a deleted worker: %+v", e)
	default:
	}
}

func TestBadBinary(t *testing.T) {
	dir := t.TempDir()
	notExec := filepath.Join(dir, "plain")
	os.WriteFile(notExec, []byte("#!/bin/sh\n"), 0o644)
	for _, bin := range []string{filepath.Join(dir, "missing"), notExec, dir} {
		h := newHarness(t, CgroupOff, func(c *Config) { c.Binary = bin })
		_, err := h.m.Spawn(t.Context(), SpawnSpec{WorkerID: "w"})
		wantKind(t, err, KindBinary, bin)
	}
}

func TestInvalidArguments(t *testing.T) {
	h := newHarness(t, CgroupOff, nil)
	for _, g := range []time.Duration{-time.Nanosecond, MaxGrace + time.Nanosecond} {
		_, err := h.m.Delete(t.Context(), Target{WorkerID: "w", PID: 12345}, g)
		wantKind(t, err, KindInvalid, "grace")
	}
	for _, id := range []string{"", "../x", ".hidden", "a/b", "a@b", strings.Repeat("x", 129)} {
		_, err := h.m.Spawn(t.Context(), SpawnSpec{WorkerID: id})
		wantKind(t, err, KindInvalid, "worker id")
	}
	for _, spec := range []SpawnSpec{
		{WorkerID: "w", Env: []string{"RBEE_WORKER_TOKEN=a\x00b"}},
		{WorkerID: "w", Model: "m\x00"},
	} {
		_, err := h.m.Spawn(t.Context(), spec)
		wantKind(t, err, KindInvalid, "NUL")
	}
	// SPEC: a PID <= 1 is not a worker's process (FAILED_PRECONDITION at the edge), even negative.
	_, err := h.m.Delete(t.Context(), Target{WorkerID: "w", PID: -5}, 0)
	wantKind(t, err, KindNotWorker, "pid -5")
	if _, err := New(Config{PortLow: 10, PortHigh: 5}); KindOf(err) != KindInvalid {
		t.Fatalf("New with a reversed port range: %v", err)
	}
}

func TestCloseLeavesWorkersRunning(t *testing.T) {
	h := newHarness(t, CgroupOff, nil)
	s, _, _ := h.spawnReady("survivor")
	fd := watch(t, s.PID)
	h.m.Close()
	if !alive(fd) {
		t.Fatal("Close killed a worker")
	}
	// A fresh Manager still deletes it; the old one's reaper collects it.
	m2, err := New(h.cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	if out, err := m2.Delete(context.Background(), Target{WorkerID: "survivor", PID: s.PID, StartTime: s.StartTime}, time.Second); err != nil || out != Exited {
		t.Fatalf("Delete = %v, %v", out, err)
	}
}

// TestDeleteRightAfterSpawn deletes workers while they may still be passing from the trampoline
// to the worker binary, where /proc/PID/environ briefly reads empty.
func TestDeleteRightAfterSpawn(t *testing.T) {
	forModes(t, func(t *testing.T, mode CgroupMode) {
		h := newHarness(t, mode, nil)
		for i := range 100 {
			id := "fast" + strconv.Itoa(i)
			s := h.spawn(id)
			fd := watch(t, s.PID)
			out, err := h.m.Delete(t.Context(), Target{WorkerID: id, PID: s.PID, StartTime: s.StartTime}, time.Duration(i%2)*time.Second)
			if err != nil || (out != Killed && out != Exited) {
				t.Fatalf("Delete #%d = %v, %v", i, out, err)
			}
			if alive(fd) {
				t.Fatalf("worker #%d survived", i)
			}
		}
	})
}

// TestParallelSpawns starts workers from many goroutines at once: each gets its own port.
func TestParallelSpawns(t *testing.T) {
	forModes(t, func(t *testing.T, mode CgroupMode) {
		h := newHarness(t, mode, nil)
		const n = 8
		got := make([]Spawned, n)
		errs := make([]error, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				got[i], errs[i] = h.m.Spawn(t.Context(), SpawnSpec{WorkerID: "par" + strconv.Itoa(i), Env: []string{envFake + "=worker"}})
			})
		}
		wg.Wait()
		ports := map[int]bool{}
		for i, s := range got {
			if errs[i] != nil {
				t.Fatalf("Spawn #%d: %v", i, errs[i])
			}
			watch(t, s.PID)
			if ports[s.Port] {
				t.Fatalf("port %d handed out twice", s.Port)
			}
			ports[s.Port] = true
		}
		if live := h.m.Live(); live != n {
			t.Errorf("Live() = %d, want %d", live, n)
		}
		for i, s := range got {
			if out, err := h.m.Delete(t.Context(), Target{WorkerID: "par" + strconv.Itoa(i), PID: s.PID, StartTime: s.StartTime}, time.Second); err != nil || out == AlreadyExited {
				t.Fatalf("Delete #%d = %v, %v", i, out, err)
			}
		}
	})
}

// TestDeleteTidiesAfterAnswer: what Delete leaves for after its answer (closing its pidfds, removing
// the worker's cgroup) is done every time, and Close waits for it.
func TestDeleteTidiesAfterAnswer(t *testing.T) {
	forModes(t, func(t *testing.T, mode CgroupMode) {
		fds := func() int {
			ents, err := os.ReadDir("/proc/self/fd")
			if err != nil {
				t.Fatal(err)
			}
			return len(ents)
		}
		nativeTrampoline() // opened once per process, kept for good
		before := fds()
		h := newHarness(t, mode, nil)
		cycle := func(i int) Spawned {
			id := "tidy" + strconv.Itoa(i)
			s, err := h.m.Spawn(t.Context(), SpawnSpec{WorkerID: id, Env: []string{envFake + "=sleeper"}})
			if err != nil {
				t.Fatal(err)
			}
			out, err := h.m.Delete(t.Context(), Target{WorkerID: id, PID: s.PID, StartTime: s.StartTime}, time.Duration(i%2)*time.Second)
			if err != nil || (out != Exited && out != Killed) {
				t.Fatalf("Delete #%d = %v, %v", i, out, err)
			}
			return s
		}
		var cgroups []string
		for i := range 40 {
			cgroups = append(cgroups, cycle(i).Cgroup)
		}
		h.m.tidying.Wait()
		for _, cg := range cgroups {
			if _, err := os.Stat(cg); cg != "" && !os.IsNotExist(err) {
				t.Fatalf("cgroup %s left behind (%v)", cg, err)
			}
		}
		// Close waits for the clean-up of a Delete that has just answered.
		s := cycle(40)
		h.m.Close()
		if _, err := os.Stat(s.Cgroup); s.Cgroup != "" && !os.IsNotExist(err) {
			t.Fatalf("cgroup %s still there after Close (%v)", s.Cgroup, err)
		}
		h.m.reapers.Wait() // the reapers close the pidfds of Spawn and of the spare trampolines
		if after := fds(); after != before {
			t.Fatalf("%d descriptors open after 41 deletes and Close, %d before", after, before)
		}
	})
}

// TestDeleteGoneWorkerKillsItsLeftovers: a Delete of a worker that is gone, and not this hive's
// child, kills what it left in a cgroup of its id (here a process with the worker's environment
// that daemonised itself, as a server's helper may, left when the worker died with no hive to
// kill its cgroup), and leaves alone the cgroup of a live worker re-spawned under the same id, one
// that binds its port itself (worker-shim) and is marked by LISTEN_PID all the same.
func TestDeleteGoneWorkerKillsItsLeftovers(t *testing.T) {
	if _, ok := findCgroup2(); !ok {
		t.Skip("no writable cgroup v2 hierarchy")
	}
	forTrampolines(t, func(t *testing.T, tm trampolineMode) {
		h := newHarness(t, CgroupAuto, func(c *Config) { c.NoHandoff = true; tm.edit(c) })
		const id = "og"
		live, r, _ := h.spawnReady(id)
		if r.ListenPID != strconv.Itoa(live.PID) {
			t.Fatalf("a worker binding its own port saw LISTEN_PID=%q; want its own PID %d", r.ListenPID, live.PID)
		}
		liveFD := watch(t, live.PID)

		dir, cgfd, err := h.m.cg.create(h.cfg.HiveID, id, "left")
		if err != nil {
			t.Fatal(err)
		}
		left := exec.Command("/proc/self/exe")
		left.Env = append(os.Environ(), envFake+"=sleeper", envWorkerID+"="+id, envHiveID+"="+h.cfg.HiveID,
			envListenPID+"="+strconv.Itoa(live.PID)) // its parent's, as a worker's child inherits it
		left.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cgfd, Setsid: true}
		err = left.Start()
		unix.Close(cgfd)
		if err != nil {
			os.Remove(dir)
			t.Fatal(err)
		}
		watch(t, left.Process.Pid)
		waited := make(chan error, 1)
		go func() { waited <- left.Wait() }()
		t.Cleanup(func() { os.Remove(dir) })

		// The gone worker: a process of this id that has exited and been reaped.
		dead := exec.Command("/bin/true")
		if err := dead.Run(); err != nil {
			t.Fatal(err)
		}
		out, err := h.m.Delete(t.Context(), Target{WorkerID: id, PID: dead.Process.Pid}, 0)
		if err != nil || out != AlreadyExited {
			t.Fatalf("Delete of the gone worker = %v, %v; want AlreadyExited", out, err)
		}
		select {
		case <-waited:
		case <-time.After(10 * time.Second):
			t.Fatal("the process left in the gone worker's cgroup is still alive 10s after the Delete")
		}
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Errorf("the gone worker's cgroup %s is still there (%v)", dir, err)
		}
		if !alive(liveFD) {
			t.Fatal("the live worker of the same id was killed")
		}
		if p, err := cgroupPopulated(live.Cgroup); err != nil || !p {
			t.Fatalf("the live worker's cgroup: populated %v, %v", p, err)
		}
		if out, err := h.m.Delete(t.Context(), Target{WorkerID: id, PID: live.PID, StartTime: live.StartTime}, 0); err != nil || out != Killed {
			t.Fatalf("Delete of the live worker = %v, %v", out, err)
		}
	})
}

// A start check that fails (the queen's bound for the request has passed) stops a Spawn before any
// process exists and a Delete before any signal: KindLate, and nothing done. One that passes
// changes nothing.
func TestStartCheckAbandonsLateRequests(t *testing.T) {
	forModes(t, func(t *testing.T, mode CgroupMode) {
		h := newHarness(t, mode, nil)
		late := WithStartCheck(t.Context(), func() error { return errors.New("past the bound") })
		_, err := h.m.Spawn(late, SpawnSpec{WorkerID: "late", Model: "m", Device: "cpu", QueenAddress: "127.0.0.1:1",
			Env: []string{envFake + "=worker"}})
		wantKind(t, err, KindLate, "past the bound")
		if n := h.m.Live(); n != 0 {
			t.Fatalf("a late Spawn left %d live workers", n)
		}

		s, _, _ := h.spawnReady("kept")
		fd := watch(t, s.PID)
		_, err = h.m.Delete(late, Target{WorkerID: "kept", PID: s.PID, StartTime: s.StartTime}, 0)
		wantKind(t, err, KindLate, "past the bound")
		if !alive(fd) {
			t.Fatal("a late Delete signalled the worker")
		}
		inTime := WithStartCheck(t.Context(), func() error { return nil })
		if out, err := h.m.Delete(inTime, Target{WorkerID: "kept", PID: s.PID, StartTime: s.StartTime}, 0); err != nil || out != Killed {
			t.Fatalf("Delete in time = %v, %v; want killed", out, err)
		}
	})
}

// TestCgroupParentMadeAgain: the rbee-<hive-id> cgroup is made by the first Spawn, and made again
// by the next Spawn when it was removed meanwhile (an operator tidying up).
func TestCgroupParentMadeAgain(t *testing.T) {
	if _, ok := findCgroup2(); !ok {
		t.Skip("no writable cgroup v2 hierarchy")
	}
	h := newHarness(t, CgroupAuto, nil)
	for i := range 2 {
		id := "p" + strconv.Itoa(i)
		s, _, _ := h.spawnReady(id)
		if cg, err := ownCgroup(s.PID); err != nil || s.Cgroup == "" || h.m.cg2mount+cg != s.Cgroup {
			t.Fatalf("spawn %d: worker in cgroup %q (%v), want %q", i, cg, err, s.Cgroup)
		}
		if _, err := h.m.Delete(t.Context(), Target{WorkerID: id, PID: s.PID, StartTime: s.StartTime}, time.Second); err != nil {
			t.Fatal(err)
		}
		h.m.tidying.Wait()
		if err := os.Remove(filepath.Dir(s.Cgroup)); err != nil {
			t.Fatalf("remove the hive's cgroup after spawn %d: %v", i, err)
		}
	}
}

// TestSpawnStartTime checks that the start time Spawn returns is the one /proc/PID/stat gives, also
// once Spawn derives it from the clock instead of reading /proc (startTimeOf), so that a Delete
// with it is never refused as a reused PID.
func TestSpawnStartTime(t *testing.T) {
	mode := CgroupOff
	if _, ok := findCgroup2(); ok {
		mode = CgroupAuto
	}
	h := newHarness(t, mode, nil)
	for i := 0; i < 12; i++ {
		s := h.spawn("st" + strconv.Itoa(i))
		got, err := procstat.StartTime(s.PID)
		if err != nil {
			t.Fatal(err)
		}
		if s.StartTime != got {
			t.Fatalf("Spawn %d: start time %d, /proc says %d", i, s.StartTime, got)
		}
	}
	if n := h.m.tickMatches.Load(); n != trustTicks {
		t.Fatalf("after 12 Spawns, %d matched the derived start time, want %d: the derivation was not used", n, trustTicks)
	}
}
