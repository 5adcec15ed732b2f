package process

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rbee-dev/rbee/internal/procstat"
	"github.com/rbee-dev/rbee/worker/contract"
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

// zygoteRegions is MAXREGIONS in trampoline/trampoline.c: how many children may share the
// zygote's memory at once before it copies it instead.
const zygoteRegions = 32

// sharesMemory says whether processes a and b share their memory (kcmp KCMP_VM).
func sharesMemory(t *testing.T, a, b int) bool {
	t.Helper()
	r, _, errno := unix.Syscall6(unix.SYS_KCMP, uintptr(a), uintptr(b), 1 /* KCMP_VM */, 0, 0, 0)
	if errno == unix.ENOSYS {
		t.Skip("no kcmp in this kernel")
	}
	if errno != 0 {
		t.Fatalf("kcmp %d %d: %v", a, b, errno)
	}
	return r == 0
}

// TestZygoteRegionHeldUntilExec: a child of the zygote shares the zygote's memory and reads its
// arguments and environment from there until it execs or exits, so no later request may be
// received into that child's region before. Here each child is held before its exec (its log is
// a FIFO, whose open waits for a reader): more of them than the zygote has regions, then every
// other one let go and new requests sent while the rest still wait. Each worker must print its own
// argument, environment and PID; an exec that fails (a missing binary) still exits 127 with the
// reason in the log.
func TestZygoteRegionHeldUntilExec(t *testing.T) {
	if _, err := nativeTrampoline(); err != nil {
		t.Skipf("no native trampoline: %v", err)
	}
	h := newHarness(t, CgroupOff, nil)
	z := awaitZygote(t, h.m)
	dir := t.TempDir()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	const missing = "/nonexistent/rbee-zygote-test-worker"
	type held struct {
		name, fifo, arg, env, bin string
		pid                       int
	}
	start := func(name string, i int, bin string) held {
		t.Helper()
		w := held{name: name, fifo: filepath.Join(dir, name), bin: bin}
		if err := unix.Mkfifo(w.fifo, 0o600); err != nil {
			t.Fatal(err)
		}
		// Long and of a length of their own, so that another request's bytes cannot pass for them.
		n := i * 397 % 3000
		w.arg = name + ":" + strings.Repeat(string(rune('a'+i%26)), 500+n)
		w.env = name + ":" + strings.Repeat("e"+name, 100+n/3)
		msg, ok := zygoteMsg(w.fifo, bin, []string{"sh", "-c", `printf '%s\n' "$1" "$ZYG_TAG" "$LISTEN_PID" "$$"`, "sh", w.arg},
			[]string{"ZYG_TAG=" + w.env, listenPIDSlot}, false, false)
		if !ok {
			t.Fatal("request too large")
		}
		pid, err := z.spawn(msg, p[1], -1, -1)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		w.pid = pid
		t.Cleanup(func() { unix.Wait4(pid, nil, unix.WNOHANG, nil) }) // after watch's kill, if the test failed
		watch(t, pid)
		return w
	}
	// release opens the child's log for reading, which lets the child go on to exec, and checks
	// what the worker printed there and its exit.
	release := func(w held) {
		t.Helper()
		opened := make(chan *os.File, 1)
		go func() {
			f, _ := os.OpenFile(w.fifo, os.O_RDONLY, 0)
			opened <- f
		}()
		var f *os.File
		select {
		case f = <-opened:
		case <-time.After(10 * time.Second):
			if fd, err := unix.Open(w.fifo, unix.O_WRONLY|unix.O_NONBLOCK, 0); err == nil {
				unix.Close(fd) // lets the open above return
			}
			<-opened
			t.Fatalf("%s (pid %d) never opened its log", w.name, w.pid)
		}
		defer f.Close()
		f.SetReadDeadline(time.Now().Add(10 * time.Second))
		out, err := io.ReadAll(f)
		if err != nil {
			t.Fatalf("%s: read its log: %v", w.name, err)
		}
		var st unix.WaitStatus
		if _, err := unix.Wait4(w.pid, &st, 0, nil); err != nil {
			t.Fatalf("%s: wait4 %d: %v", w.name, w.pid, err)
		}
		want, code := fmt.Sprintf("%s\n%s\n%d\n%d\n", w.arg, w.env, w.pid, w.pid), 0
		if w.bin == missing {
			want, code = "rbee hive trampoline: exec worker "+missing+": no such file or directory\n", 127
		}
		if string(out) != want || !st.Exited() || st.ExitStatus() != code {
			t.Fatalf("%s (pid %d): log %.200q, status %v; want %.200q and exit code %d", w.name, w.pid, out, st, want, code)
		}
	}
	// wantShared checks which of ws share the zygote's memory: the first n, not the rest.
	wantShared := func(ws []held, n int) {
		t.Helper()
		for i, w := range ws {
			if got := sharesMemory(t, z.pid, w.pid); got != (i < n) {
				t.Fatalf("%s (%d of %d): shares the zygote's memory: %v, want %v", w.name, i, len(ws), got, i < n)
			}
		}
	}

	var first []held
	for i := range zygoteRegions + 8 {
		bin := "/bin/sh"
		if i == 3 {
			bin = missing
		}
		first = append(first, start(fmt.Sprintf("a%d", i), i, bin))
	}
	wantShared(first, zygoteRegions)
	// Every other one execs (or, a3, fails and exits): their regions are free again, the others'
	// are not.
	var rest []held
	for i, w := range first {
		if i%2 == 1 {
			release(w)
		} else {
			rest = append(rest, w)
		}
	}
	var second []held
	for i := range zygoteRegions/2 + 4 {
		second = append(second, start(fmt.Sprintf("b%d", i), 100+i, "/bin/sh"))
	}
	wantShared(second, zygoteRegions/2)
	for _, w := range slices.Backward(append(rest, second...)) {
		release(w)
	}
}

// TestZygoteManySpawns: Spawns sent back to back from several goroutines, each with long
// arguments and environment of its own, while earlier workers are still on their way to exec;
// every worker gets its own arguments, environment, LISTEN_PID and log.
func TestZygoteManySpawns(t *testing.T) {
	if _, err := nativeTrampoline(); err != nil {
		t.Skipf("no native trampoline: %v", err)
	}
	script := filepath.Join(t.TempDir(), "worker.sh")
	err := os.WriteFile(script, []byte("#!/bin/sh\nfor a in \"$@\"; do printf 'arg %s\\n' \"$a\"; done\n"+
		"printf 'id %s\\nenv %s\\npid %s %s\\n' \"$RBEE_WORKER_ID\" \"$ZYG_TAG\" \"$$\" \"$LISTEN_PID\"\n"), 0o755)
	if err != nil {
		t.Fatal(err)
	}
	forModes(t, func(t *testing.T, mode CgroupMode) {
		const n, senders = 200, 4
		exits := make(chan Exit, n)
		h := newHarness(t, mode, func(c *Config) { c.OnExit = func(e Exit) { exits <- e }; c.LogKeepExited = n })
		awaitZygote(t, h.m)
		before := h.m.zygoteSpawns.Load()
		tags := func(i int) (arg, env string) {
			c := string(rune('a' + i%26))
			return fmt.Sprintf("arg%d:", i) + strings.Repeat(c, 300+i*41%3000), fmt.Sprintf("env%d:", i) + strings.Repeat(c+c, 100+i*67%2000)
		}
		spawned := make([]Spawned, n)
		errs := make(chan error, senders)
		for g := range senders {
			go func() {
				for i := g; i < n; i += senders {
					arg, env := tags(i)
					s, err := h.m.Spawn(t.Context(), SpawnSpec{WorkerID: "many" + strconv.Itoa(i), Model: "m", Device: "cpu",
						QueenAddress: "127.0.0.1:1", Binary: script,
						Extra: func(int) ([]string, []string) { return []string{arg}, []string{"ZYG_TAG=" + env} }})
					if err != nil {
						errs <- fmt.Errorf("Spawn %d: %w", i, err)
						return
					}
					spawned[i] = s
				}
				errs <- nil
			}()
		}
		for range senders {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		if got := h.m.zygoteSpawns.Load() - before; got != n {
			t.Fatalf("%d of %d Spawns through the zygote", got, n)
		}
		byPID := map[int]int{}
		for i, s := range spawned {
			byPID[s.PID] = i
		}
		for range n {
			var e Exit
			select {
			case e = <-exits:
			case <-time.After(30 * time.Second):
				t.Fatal("workers still running after 30s")
			}
			i, ok := byPID[e.PID]
			if !ok || e.ExitCode != 0 {
				t.Fatalf("exit %+v: want one of the spawned workers, exit code 0", e)
			}
			s, id := spawned[i], "many"+strconv.Itoa(i)
			arg, env := tags(i)
			var want strings.Builder
			for _, a := range append(contract.Args{WorkerID: id, HiveID: h.cfg.HiveID, Model: "m", Device: "cpu", Port: s.Port,
				Queen: "127.0.0.1:1"}.Argv(script)[1:], arg) {
				fmt.Fprintf(&want, "arg %s\n", a)
			}
			fmt.Fprintf(&want, "id %s\nenv %s\npid %d %d\n", id, env, s.PID, s.PID)
			b, err := os.ReadFile(logOf(t, h.cfg.LogDir, id))
			if err != nil || string(b) != want.String() {
				t.Fatalf("worker %s (pid %d) log %.300q, %v; want %.300q", id, s.PID, b, err, want.String())
			}
		}
	})
}
