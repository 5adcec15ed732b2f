package process

import (
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rbee-dev/rbee/internal/procstat"
)

// trampolineMode is how a test's workers are started.
type trampolineMode int

const (
	viaZygote     trampolineMode = iota // cloned by the zygote, the native trampoline serving Spawns
	viaFork                             // a native trampoline forked by the Spawn
	viaHiveBinary                       // the hive's own binary (where there is no native one)
)

func (tm trampolineMode) edit(c *Config) {
	c.noZygote = tm == viaFork
	c.hiveTrampoline = tm == viaHiveBinary
}

// forTrampolines runs f for each way of starting a worker this machine has.
func forTrampolines(t *testing.T, f func(t *testing.T, tm trampolineMode)) {
	for _, tm := range []trampolineMode{viaZygote, viaFork, viaHiveBinary} {
		t.Run([]string{"zygote", "fork", "hive-binary"}[tm], func(t *testing.T) {
			if _, err := nativeTrampoline(); err != nil && tm != viaHiveBinary {
				t.Skipf("no native trampoline: %v", err)
			}
			f(t, tm)
		})
	}
}

// expectPath makes sure the next Spawn of m takes the path tm names; after it, check() says
// whether it did.
func expectPath(t *testing.T, m *Manager, tm trampolineMode) (check func(pid int)) {
	t.Helper()
	if tm == viaZygote {
		awaitZygote(t, m)
	}
	before := m.zygoteSpawns.Load()
	return func(pid int) {
		t.Helper()
		if got := m.zygoteSpawns.Load() - before; got != map[bool]int64{true: 1, false: 0}[tm == viaZygote] {
			t.Fatalf("pid %d: %d Spawns through the zygote, want the path %d", pid, got, tm)
		}
	}
}

// awaitZygote waits until m's zygote is ready.
func awaitZygote(t testing.TB, m *Manager) *zygote {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		m.mu.Lock()
		z := m.zyg
		m.mu.Unlock()
		if z != nil && !z.dead() {
			return z
		}
		select {
		case <-m.zygoteReady:
		case <-deadline:
			t.Fatal("no zygote ready after 10s")
		}
	}
}

func TestTrampolineHandsOver(t *testing.T) {
	forTrampolines(t, func(t *testing.T, tm trampolineMode) {
		for _, noHandoff := range []bool{false, true} {
			// The hive's own value of a variable the spec sets too must not win.
			t.Setenv("FAKE_LINES", "7")
			h := newHarness(t, CgroupOff, func(c *Config) { c.NoHandoff = noHandoff; tm.edit(c) })
			id := "tr" + strconv.FormatBool(noHandoff)
			check := expectPath(t, h.m, tm)
			s, r, _ := h.spawnReady(id, "FAKE_LINES=3")
			check(s.PID)
			if noHandoff {
				// LISTEN_PID still names the worker: the mark that tells it from what it forks.
				if r.ListenPID != strconv.Itoa(s.PID) || r.ListenFDs != "" || r.FD3Listening {
					t.Fatalf("no-handoff worker saw %+v; want LISTEN_PID=%d, no LISTEN_FDS and no fd 3", r, s.PID)
				}
			} else if r.ListenPID != strconv.Itoa(s.PID) || r.ListenFDs != "1" || r.FD3Port != s.Port || !r.FD3Listening {
				t.Fatalf("worker saw %+v; want LISTEN_PID=%d LISTEN_FDS=1 and fd 3 listening on %d", r, s.PID, s.Port)
			}
			// Its stdout is its log file, and nothing of the trampoline is left in its environment.
			b, err := os.ReadFile(logOf(t, h.cfg.LogDir, id))
			if err != nil || !strings.HasPrefix(string(b), "line 0 ") || strings.Count(string(b), "\n") != 3 {
				t.Fatalf("log %q, %v: want the worker's 3 lines", b, err)
			}
			env, _ := os.ReadFile("/proc/" + strconv.Itoa(s.PID) + "/environ")
			if strings.Contains(string(env), "RBEE_TRAMPOLINE") || strings.Count(string(env), "LISTEN_PID=") > 1 {
				t.Fatalf("worker environment %q", env)
			}
			if _, err := h.m.Delete(t.Context(), Target{WorkerID: id, PID: s.PID, StartTime: s.StartTime}, time.Second); err != nil {
				t.Fatal(err)
			}
		}
	})
}

// TestTrampolineExecFailure: a worker binary that passes the checks before the fork but cannot be
// exec'd is reported through OnExit with exit code 127 and the reason in its log.
func TestTrampolineExecFailure(t *testing.T) {
	forTrampolines(t, func(t *testing.T, tm trampolineMode) {
		bin := filepath.Join(t.TempDir(), "garbage")
		if err := os.WriteFile(bin, []byte("\x00\x01 not a program"), 0o755); err != nil {
			t.Fatal(err)
		}
		exits := make(chan Exit, 1)
		h := newHarness(t, CgroupOff, func(c *Config) {
			c.Binary = bin
			c.OnExit = func(e Exit) { exits <- e }
			tm.edit(c)
		})
		check := expectPath(t, h.m, tm)
		s, err := h.m.Spawn(t.Context(), SpawnSpec{WorkerID: "bad"})
		check(s.PID)
		if err != nil {
			t.Fatalf("Spawn: %v (the exec failure is the worker's, reported on exit)", err)
		}
		e := <-exits
		want := "rbee hive trampoline: exec worker " + bin + ": exec format error"
		if e.PID != s.PID || e.ExitCode != 127 || e.LogTail != want {
			t.Fatalf("Exit = %+v; want code 127 and log tail %q", e, want)
		}
	})
}

// TestZygote: a worker the zygote starts is born in its own cgroup, in its own session, as the
// hive's child (reaped and reported by the hive); the zygote is no worker (Live, Delete); a zygote
// that dies is replaced and the Spawn that finds it dead still starts its worker; Close ends the
// zygote but not the workers.
func TestZygote(t *testing.T) {
	if _, err := nativeTrampoline(); err != nil {
		t.Skipf("no native trampoline: %v", err)
	}
	forModes(t, func(t *testing.T, mode CgroupMode) {
		exits := make(chan Exit, 1)
		h := newHarness(t, mode, func(c *Config) { c.OnExit = func(e Exit) { exits <- e } })
		check := expectPath(t, h.m, viaZygote)
		s, _, _ := h.spawnReady("z1")
		check(s.PID)
		st, err := procstat.Read(s.PID)
		if err != nil || st.PPID != os.Getpid() || st.SID != s.PID {
			t.Fatalf("worker stat %+v, %v: want parent %d (the hive) and its own session", st, err, os.Getpid())
		}
		if s.Cgroup != "" {
			if cg, err := ownCgroup(s.PID); err != nil || h.m.cg2mount+cg != s.Cgroup {
				t.Fatalf("worker in cgroup %q (%v), want %s", cg, err, s.Cgroup)
			}
		}
		z := awaitZygote(t, h.m)
		zfd := watch(t, z.pid)
		if live := h.m.Live(); live != 1 {
			t.Fatalf("Live() = %d with one worker and the zygote, want 1", live)
		}
		_, err = h.m.Delete(t.Context(), Target{WorkerID: "z1", PID: z.pid}, 0)
		wantKind(t, err, KindNotWorker, "")

		// A worker that exits on its own is reaped and reported by the hive, its parent.
		check = expectPath(t, h.m, viaZygote)
		s2, _, _ := h.spawnReady("z2", "FAKE_EXIT=3")
		check(s2.PID)
		if e := <-exits; e.PID != s2.PID || e.ExitCode != 3 {
			t.Fatalf("Exit = %+v, want pid %d code 3", e, s2.PID)
		}

		// A dead zygote: the next Spawn forks its trampoline, and a new zygote serves the one after.
		unix.PidfdSendSignal(zfd, unix.SIGKILL, nil, 0)
		if !waitExit(zfd, 5*time.Second) {
			t.Fatal("the zygote survived SIGKILL")
		}
		<-z.c.reaped
		s3, _, _ := h.spawnReady("z3")
		check = expectPath(t, h.m, viaZygote)
		s4, _, _ := h.spawnReady("z4")
		check(s4.PID)

		z = awaitZygote(t, h.m)
		zfd = watch(t, z.pid)
		workers := []int{watch(t, s.PID), watch(t, s3.PID), watch(t, s4.PID)}
		h.m.Close()
		if !waitExit(zfd, 5*time.Second) {
			t.Fatal("the zygote outlived Close")
		}
		for _, w := range workers {
			if !alive(w) {
				t.Fatal("Close ended a worker")
			}
		}
		for _, sp := range []Spawned{s, s3, s4} {
			if _, err := h.m.Delete(t.Context(), Target{WorkerID: "z" + map[int]string{s.PID: "1", s3.PID: "3", s4.PID: "4"}[sp.PID], PID: sp.PID, StartTime: sp.StartTime}, time.Second); err != nil {
				t.Fatal(err)
			}
		}
		if s.Cgroup != "" {
			h.m.tidying.Wait()
			os.Remove(filepath.Dir(s.Cgroup)) // Close ran while the workers still used it
		}
	})
}

// TestZygoteRefusesMalformed: a request the zygote cannot use starts nothing and is answered, and
// the zygote serves the next Spawn.
func TestZygoteRefusesMalformed(t *testing.T) {
	if _, err := nativeTrampoline(); err != nil {
		t.Skipf("no native trampoline: %v", err)
	}
	h := newHarness(t, CgroupOff, nil)
	z := awaitZygote(t, h.m)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	good, _ := zygoteMsg("/nonexistent/log", "/bin/true", []string{"true"}, []string{listenPIDSlot}, false, false)
	for name, tc := range map[string]struct {
		msg []byte
		fds []int
	}{
		"cgroup flag without its descriptor": {msg: func() []byte { m, _ := zygoteMsg("l", "/bin/true", nil, nil, true, false); return m }(), fds: nil},
		"strings cut short":                  {msg: good[:len(good)-3]},
		"too short":                          {msg: []byte{1, 0, 0}},
	} {
		_, err := z.spawn(tc.msg, p[1], -1, -1)
		if !errors.Is(err, errZygoteRefused) {
			t.Fatalf("%s: %v, want the zygote's refusal", name, err)
		}
	}
	check := expectPath(t, h.m, viaZygote)
	s, _, _ := h.spawnReady("after-refusals")
	check(s.PID)
	if _, err := h.m.Delete(t.Context(), Target{WorkerID: "after-refusals", PID: s.PID, StartTime: s.StartTime}, time.Second); err != nil {
		t.Fatal(err)
	}
}

// TestZygoteDiesDuringSpawn: a zygote that dies while a Spawn waits for its answer leaves the
// Spawn to fork its trampoline into the same cgroup; the worker starts, and a new zygote serves
// the Spawns after.
func TestZygoteDiesDuringSpawn(t *testing.T) {
	if _, err := nativeTrampoline(); err != nil {
		t.Skipf("no native trampoline: %v", err)
	}
	forModes(t, func(t *testing.T, mode CgroupMode) {
		h := newHarness(t, mode, nil)
		z := awaitZygote(t, h.m)
		zfd := watch(t, z.pid)
		// Stopped, it reads no request; the hive, its parent, learns when it is.
		if err := unix.PidfdSendSignal(zfd, unix.SIGSTOP, nil, 0); err != nil {
			t.Fatal(err)
		}
		var info unix.Siginfo
		if err := unix.Waitid(unix.P_PIDFD, zfd, &info, unix.WSTOPPED|unix.WNOWAIT, nil); err != nil {
			t.Fatal(err)
		}
		type result struct {
			s   Spawned
			r   report
			err error
		}
		q := newFIFO(t)
		done := make(chan result, 1)
		go func() {
			s, err := h.m.Spawn(t.Context(), SpawnSpec{WorkerID: "orphaned-request", Env: []string{envFake + "=worker", "FAKE_REPORT=" + q.path}})
			done <- result{s: s, err: err}
		}()
		// Once the Spawn holds the zygote's lock it is sending its request or waiting for the
		// answer; either way the zygote's death is what it meets.
		for z.mu.TryLock() {
			z.mu.Unlock()
			runtime.Gosched()
		}
		unix.PidfdSendSignal(zfd, unix.SIGKILL, nil, 0)
		res := <-done
		if res.err != nil {
			t.Fatalf("Spawn: %v", res.err)
		}
		r := q.next(t)
		if r.ListenPID != strconv.Itoa(res.s.PID) {
			t.Fatalf("worker reported LISTEN_PID %s, want %d", r.ListenPID, res.s.PID)
		}
		if h.m.zygoteSpawns.Load() != 0 {
			t.Fatal("the Spawn counts as the zygote's")
		}
		if res.s.Cgroup != "" {
			if cg, err := ownCgroup(res.s.PID); err != nil || h.m.cg2mount+cg != res.s.Cgroup {
				t.Fatalf("worker in cgroup %q (%v), want %s", cg, err, res.s.Cgroup)
			}
		}
		check := expectPath(t, h.m, viaZygote)
		s2, _, _ := h.spawnReady("next")
		check(s2.PID)
		for id, s := range map[string]Spawned{"orphaned-request": res.s, "next": s2} {
			if _, err := h.m.Delete(t.Context(), Target{WorkerID: id, PID: s.PID, StartTime: s.StartTime}, time.Second); err != nil {
				t.Fatal(err)
			}
		}
	})
}
