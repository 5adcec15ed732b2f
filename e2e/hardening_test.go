package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// TestExitBurstWhileQueenPaused: 80 workers whose last output is 20 lines of 1,000 characters
// exit while the queen is paused (SIGSTOP). When it continues, the hive reports every exit and
// stays registered: the queen forgets all 80 workers, lists the hive as READY, and spawns on it.
func TestExitBurstWhileQueenPaused(t *testing.T) {
	q, addr := startQueen(t)
	hid := uniqueID("burst")
	cleanupWorkers(t, hid)
	logDir := t.TempDir()
	h, _ := startHive(t, addr, hid, "--log-dir", logDir)
	qc, _ := dial(t, addr)

	const n = 80
	ids := make([]string, n)
	pids := make([]int, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	errs := make(chan error, n)
	for i := range n {
		ids[i] = "b" + string(rune('a'+i/26)) + string(rune('a'+i%26))
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			r, err := qc.SpawnWorker(ctxT(t, 60*time.Second), &rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: ids[i], HiveId: hid, WaitReady: true})
			if err != nil {
				errs <- err
				return
			}
			pids[i] = int(r.GetWorker().GetPid())
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("spawn: %v", err)
	}
	line := strings.Repeat("x", 999) + "\n"
	for _, id := range ids {
		f, err := os.OpenFile(filepath.Join(logDir, id+".log"), os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			t.Fatal(err)
		}
		_, err = f.WriteString(strings.Repeat(line, 20))
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
	}

	reconnects := h.countAction("hive_heartbeat_reconnect")
	qpid := q.cmd.Process.Pid
	if err := unix.Kill(qpid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	continued := false
	t.Cleanup(func() {
		if !continued {
			_ = unix.Kill(qpid, syscall.SIGCONT)
		}
	})
	for _, pid := range pids {
		_ = unix.Kill(pid, syscall.SIGKILL)
	}
	h.awaitCount("worker_exit", n)
	// The hive's stream to the paused queen breaks (no answer in three intervals); the exits wait.
	h.awaitCount("hive_heartbeat_reconnect", reconnects+1)
	continued = true
	if err := unix.Kill(qpid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}

	q.awaitCount("worker_exited", n)
	if l, err := qc.ListWorkers(ctxT(t, 5*time.Second), &rbeev1.ListWorkersRequest{HiveId: hid}); err != nil || len(l.GetWorkers()) != 0 {
		t.Fatalf("after the queen learned the exits it lists %d workers (err %v), want none", len(l.GetWorkers()), err)
	}
	hives, err := qc.ListHives(ctxT(t, 5*time.Second), &rbeev1.ListHivesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, hv := range hives.GetHives() {
		if hv.GetHiveId() == hid {
			found = true
			if hv.GetState() != rbeev1.HiveState_HIVE_STATE_READY {
				t.Errorf("hive %s is %v after the burst, want READY", hid, hv.GetState())
			}
		}
	}
	if !found {
		t.Fatalf("hive %s left the registry after the burst", hid)
	}
	r, err := qc.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: "after", HiveId: hid, WaitReady: true})
	if err != nil {
		t.Fatalf("spawn on the hive after the burst: %v", err)
	}
	if _, err := qc.DeleteWorker(ctxT(t, 30*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: r.GetWorker().GetWorkerId()}); err != nil {
		t.Fatal(err)
	}
	noWorkersLeft(t, hid)
}

// awaitCount waits until the process has logged action n times in all.
func (p *proc) awaitCount(action string, n int) {
	p.t.Helper()
	seen := 0
	p.await(fmt.Sprintf("action %s %d times", action, n), func(m map[string]any) bool {
		if m["action"] == action {
			seen++
		}
		return seen == n
	})
}

// countAction says how many times the process has logged action so far.
func (p *proc) countAction(action string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, m := range p.lines {
		if m["action"] == action {
			n++
		}
	}
	return n
}
