package process

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// trampolineMode is how a test's workers are started.
type trampolineMode int

const (
	viaSpare      trampolineMode = iota // a native trampoline started ahead, waiting for the Spawn
	viaFork                             // a native trampoline forked by the Spawn
	viaHiveBinary                       // the hive's own binary (where there is no native one)
)

func (tm trampolineMode) edit(c *Config) {
	c.noSpares = tm == viaFork
	c.hiveTrampoline = tm == viaHiveBinary
}

// forTrampolines runs f for each way of starting a worker this machine has.
func forTrampolines(t *testing.T, f func(t *testing.T, tm trampolineMode)) {
	for _, tm := range []trampolineMode{viaSpare, viaFork, viaHiveBinary} {
		t.Run([]string{"spare", "fork", "hive-binary"}[tm], func(t *testing.T) {
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
	if tm != viaSpare {
		return func(pid int) {
			m.mu.Lock()
			defer m.mu.Unlock()
			if m.spare != nil && m.spare.pid == pid {
				t.Fatalf("pid %d is a spare", pid)
			}
		}
	}
	select {
	case <-m.spareReady:
	case <-time.After(10 * time.Second):
		t.Fatal("no spare trampoline ready after 10s")
	}
	m.mu.Lock()
	want := m.spare.pid
	m.mu.Unlock()
	return func(pid int) {
		if pid != want {
			t.Fatalf("worker pid %d is not the spare's %d", pid, want)
		}
	}
}

func TestTrampolineHandsOver(t *testing.T) {
	forTrampolines(t, func(t *testing.T, tm trampolineMode) {
		for _, noHandoff := range []bool{false, true} {
			h := newHarness(t, CgroupOff, func(c *Config) { c.NoHandoff = noHandoff; tm.edit(c) })
			id := "tr" + strconv.FormatBool(noHandoff)
			check := expectPath(t, h.m, tm)
			// The hive's own value of a variable the spec sets too must not win.
			t.Setenv("FAKE_LINES", "7")
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

// TestSpare: a worker started from a spare trampoline is in its own cgroup, a spare is not a
// worker (Live, Delete), and Close ends the spare but not the workers.
func TestSpare(t *testing.T) {
	if _, err := nativeTrampoline(); err != nil {
		t.Skipf("no native trampoline: %v", err)
	}
	forModes(t, func(t *testing.T, mode CgroupMode) {
		h := newHarness(t, mode, nil)
		check := expectPath(t, h.m, viaSpare)
		s, _, _ := h.spawnReady("sp1")
		check(s.PID)
		if s.Cgroup != "" {
			if cg, err := ownCgroup(s.PID); err != nil || h.m.cg2mount+cg != s.Cgroup {
				t.Fatalf("worker in cgroup %q (%v), want %s", cg, err, s.Cgroup)
			}
		}
		expectPath(t, h.m, viaSpare) // the next one is ready
		h.m.mu.Lock()
		next := h.m.spare.pid
		h.m.mu.Unlock()
		nextFD := watch(t, next)
		if live := h.m.Live(); live != 1 {
			t.Fatalf("Live() = %d with one worker and a spare, want 1", live)
		}
		_, err := h.m.Delete(t.Context(), Target{WorkerID: "sp1", PID: next}, 0)
		wantKind(t, err, KindNotWorker, "")
		worker := watch(t, s.PID)
		h.m.Close()
		if !waitExit(nextFD, 5*time.Second) {
			t.Fatal("the spare outlived Close")
		}
		if !alive(worker) {
			t.Fatal("Close ended a worker")
		}
		if _, err := h.m.Delete(t.Context(), Target{WorkerID: "sp1", PID: s.PID, StartTime: s.StartTime}, time.Second); err != nil {
			t.Fatal(err)
		}
		if s.Cgroup != "" {
			h.m.tidying.Wait()
			os.Remove(filepath.Dir(s.Cgroup)) // Close ran while the worker still used it
		}
	})
}
