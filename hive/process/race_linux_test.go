package process

import (
	"flag"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

var raceCycles = flag.Int("race-cycles", 2000, "spawn-then-delete cycles of TestDeleteRightAfterSpawnThroughWrapper (10000 for a benchmark-sized run)")

// TestDeleteRightAfterSpawnThroughWrapper deletes each worker right after Spawn returns (at once or up
// to 25 ms later), while it is still passing through its execs: the trampoline, a #!/bin/sh
// wrapper script, and the program the script execs. Every Delete must be accepted and leave
// nothing behind, whether the hive that spawned the worker deletes it or another one (a restarted
// hive: the worker is not its child), and whether the trampoline is the native one or the hive's
// own multithreaded binary (whose exec hides the environment longest).
func TestDeleteRightAfterSpawnThroughWrapper(t *testing.T) {
	forModes(t, func(t *testing.T, mode CgroupMode) {
		t.Run("spawner", func(t *testing.T) { deleteThroughWrapper(t, mode, true, false, *raceCycles) })
		t.Run("another-hive", func(t *testing.T) { deleteThroughWrapper(t, mode, false, true, max(*raceCycles/4, 1)) })
	})
}

func deleteThroughWrapper(t *testing.T, mode CgroupMode, useNative, byAnother bool, cycles int) {
	wrapper := filepath.Join(t.TempDir(), "wrapper")
	if err := os.WriteFile(wrapper, []byte("#!/bin/sh\nexec sleep 600\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, mode, func(c *Config) { c.Binary = wrapper; c.hiveTrampoline = !useNative })
	deleter := h.m
	if byAnother {
		m2, err := New(h.cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m2.Close() })
		deleter = m2
	}
	refused, survived := 0, 0
	var firstErr error
	for i := range cycles {
		id := "wrap" + strconv.Itoa(i)
		s, err := h.m.Spawn(t.Context(), SpawnSpec{WorkerID: id, Model: "m", Device: "cpu", QueenAddress: "127.0.0.1:1"})
		if err != nil {
			t.Fatalf("Spawn #%d: %v", i, err)
		}
		fd, err := unix.PidfdOpen(s.PID, 0)
		if err != nil {
			t.Fatalf("pidfd_open %d: %v", s.PID, err)
		}
		// Spread the Deletes over the worker's first milliseconds, where its execs happen (this
		// picks the moment of the Delete; nothing waits for anything).
		step, steps := 300*time.Microsecond, 16 // the native trampoline execs the script at once
		if !useNative {
			step, steps = 500*time.Microsecond, 50 // the hive binary starts its runtime first
		}
		if d := time.Duration(i%steps) * step; d > 0 {
			time.Sleep(d)
		}
		out, err := deleter.Delete(t.Context(), Target{WorkerID: id, PID: s.PID, StartTime: s.StartTime}, time.Duration(i%2)*time.Second)
		if err != nil || (out != Killed && out != Exited) {
			refused++
			if firstErr == nil {
				firstErr = err
			}
		}
		if alive(fd) {
			survived++
			unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
			waitExit(fd, killWait)
		}
		unix.Close(fd)
	}
	deleter.tidying.Wait()
	h.m.Close()
	h.m.reapers.Wait() // each reaper ends when its worker (or spare trampoline) has been collected
	if live := h.m.Live(); refused > 0 || survived > 0 || live > 0 {
		t.Fatalf("%d cycles: %d Deletes refused (first: %v), %d workers survived, Live() = %d", cycles, refused, firstErr, survived, live)
	}
	if mode == CgroupAuto {
		left, _ := filepath.Glob(filepath.Join(h.m.cg.mount, h.m.cg.own, hiveCgroupPrefix+h.cfg.HiveID, workerCgroupPrefix+"*"))
		if len(left) > 0 {
			t.Fatalf("%d worker cgroups left behind, e.g. %s", len(left), left[0])
		}
	}
	t.Logf("%d cycles, 0 refused, 0 survived, nothing left behind", cycles)
}
