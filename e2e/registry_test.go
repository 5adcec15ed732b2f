package e2e

import (
	"io"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// watchUntil reads a watch stream until match holds for an event, failing on error or after 20s.
func watchUntil(t *testing.T, w rbeev1.QueenService_WatchWorkersClient, what string, match func(*rbeev1.WatchWorkersResponse) bool) *rbeev1.WatchWorkersResponse {
	t.Helper()
	for {
		ev, err := w.Recv()
		if err != nil {
			t.Fatalf("watch ended before %s: %v", what, err)
		}
		if match(ev) {
			return ev
		}
	}
}

func isState(id string, st rbeev1.WorkerState) func(*rbeev1.WatchWorkersResponse) bool {
	return func(ev *rbeev1.WatchWorkersResponse) bool {
		return ev.GetWorker().GetWorkerId() == id && ev.GetWorker().GetState() == st
	}
}

// TestQueenRestartRelearnsFleet kills the queen with SIGKILL and checks that a new queen on the
// same address knows every worker (same PIDs) and the hive again, and can delete them.
func TestQueenRestartRelearnsFleet(t *testing.T) {
	q1, addr := startQueen(t, "--heartbeat-interval", "200ms")
	hid := uniqueID("hr")
	cleanupWorkers(t, hid)
	hive, _ := startHive(t, addr, hid)
	q, _ := dial(t, addr)
	pids := map[string]int32{}
	for _, id := range []string{"r1", "r2"} {
		r, err := q.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: id, WaitReady: true})
		if err != nil {
			t.Fatal(err)
		}
		pids[id] = r.GetWorker().GetPid()
	}
	q1.stop(syscall.SIGKILL, 10*time.Second)

	q2 := start(t, "queen", "--listen", addr, "--http-listen", "off", "--heartbeat-interval", "200ms")
	newID := q2.awaitAction("queen_start")["queen_id"]
	w, err := q.WatchWorkers(ctxT(t, 30*time.Second), &rbeev1.WatchWorkersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]int32{}
	for len(seen) < 2 {
		ev := watchUntil(t, w, "both workers back", func(ev *rbeev1.WatchWorkersResponse) bool {
			return ev.GetWorker().GetState() == rbeev1.WorkerState_WORKER_STATE_READY
		})
		seen[ev.GetWorker().GetWorkerId()] = ev.GetWorker().GetPid()
	}
	for id, pid := range pids {
		if seen[id] != pid {
			t.Errorf("after restart worker %s has PID %d, want %d", id, seen[id], pid)
		}
	}
	hive.await("registration with the new queen", func(m map[string]any) bool {
		return m["action"] == "hive_registered" && m["queen_id"] == newID
	})
	list, err := q.ListWorkers(ctxT(t, 5*time.Second), &rbeev1.ListWorkersRequest{})
	if err != nil || len(list.GetWorkers()) != 2 {
		t.Fatalf("ListWorkers after restart = %v, %v; want exactly 2 (no duplicates)", list, err)
	}
	for id := range pids {
		d, err := q.DeleteWorker(ctxT(t, 30*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: id})
		if err != nil || d.GetOutcome() != rbeev1.DeleteOutcome_DELETE_OUTCOME_EXITED {
			t.Fatalf("DeleteWorker(%s) through the restarted queen = %v, %v", id, d, err)
		}
	}
	noWorkersLeft(t, hid)
}

// TestStoppedWorkerGoesStaleAndBack stops a worker with SIGSTOP: the queen shows it STALE, and
// READY again after SIGCONT.
func TestStoppedWorkerGoesStaleAndBack(t *testing.T) {
	_, addr := startQueen(t, "--heartbeat-interval", "100ms", "--stale-after", "400ms")
	hid := uniqueID("hs")
	cleanupWorkers(t, hid)
	startHive(t, addr, hid)
	q, _ := dial(t, addr)
	r, err := q.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: "sleepy", WaitReady: true})
	if err != nil {
		t.Fatal(err)
	}
	pid := int(r.GetWorker().GetPid())
	w, err := q.WatchWorkers(ctxT(t, 30*time.Second), &rbeev1.WatchWorkersRequest{HiveId: hid})
	if err != nil {
		t.Fatal(err)
	}
	watchUntil(t, w, "snapshot", func(ev *rbeev1.WatchWorkersResponse) bool {
		return ev.GetType() == rbeev1.WatchEventType_WATCH_EVENT_TYPE_SYNCED
	})
	if err := unix.Kill(pid, unix.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Kill(pid, unix.SIGCONT) })
	watchUntil(t, w, "STALE", isState("sleepy", rbeev1.WorkerState_WORKER_STATE_STALE))
	if err := unix.Kill(pid, unix.SIGCONT); err != nil {
		t.Fatal(err)
	}
	watchUntil(t, w, "READY again", isState("sleepy", rbeev1.WorkerState_WORKER_STATE_READY))
	if _, err := q.DeleteWorker(ctxT(t, 30*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: "sleepy"}); err != nil {
		t.Fatal(err)
	}
	noWorkersLeft(t, hid)
}

// TestWatchSeesChangesInOrder follows one worker's life on a watch: added, ready, removed, with
// revisions that only grow.
func TestWatchSeesChangesInOrder(t *testing.T) {
	_, addr := startQueen(t)
	hid := uniqueID("hw")
	cleanupWorkers(t, hid)
	startHive(t, addr, hid)
	q, _ := dial(t, addr)
	w, err := q.WatchWorkers(ctxT(t, 30*time.Second), &rbeev1.WatchWorkersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	watchUntil(t, w, "snapshot", func(ev *rbeev1.WatchWorkersResponse) bool {
		return ev.GetType() == rbeev1.WatchEventType_WATCH_EVENT_TYPE_SYNCED
	})
	if _, err := q.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: "watched", WaitReady: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := q.DeleteWorker(ctxT(t, 30*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: "watched"}); err != nil {
		t.Fatal(err)
	}
	var types []rbeev1.WatchEventType
	var rev uint64
	for {
		ev, err := w.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if ev.GetRevision() <= rev {
			t.Fatalf("revision %d after %d", ev.GetRevision(), rev)
		}
		rev = ev.GetRevision()
		types = append(types, ev.GetType())
		if ev.GetType() == rbeev1.WatchEventType_WATCH_EVENT_TYPE_ADDED && ev.GetWorker().GetState() != rbeev1.WorkerState_WORKER_STATE_STARTING {
			t.Errorf("added as %v, want STARTING", ev.GetWorker().GetState())
		}
		if ev.GetType() == rbeev1.WatchEventType_WATCH_EVENT_TYPE_REMOVED {
			break
		}
	}
	if types[0] != rbeev1.WatchEventType_WATCH_EVENT_TYPE_ADDED {
		t.Fatalf("first event %v, want ADDED; all: %v", types[0], types)
	}
	for _, ty := range types[1 : len(types)-1] {
		if ty != rbeev1.WatchEventType_WATCH_EVENT_TYPE_UPDATED {
			t.Fatalf("events %v: want ADDED, UPDATED..., REMOVED", types)
		}
	}
	noWorkersLeft(t, hid)
}

// TestSlowWatcherResyncs holds a watch without reading while thousands of changes happen: the
// queen must not block, and the watcher must get RESET and a fresh snapshot that matches the
// registry, never a silent gap.
func TestSlowWatcherResyncs(t *testing.T) {
	_, addr := startQueen(t, "--watch-buffer", "8", "--max-beats-per-second", "0")
	q, conn := dial(t, addr)
	w, err := q.WatchWorkers(ctxT(t, 60*time.Second), &rbeev1.WatchWorkersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	beats := rbeev1.NewHeartbeatServiceClient(conn)
	churn := func(id string, n int) {
		st, err := beats.WorkerHeartbeat(ctxT(t, 60*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < n; i++ {
			s := rbeev1.WorkerState_WORKER_STATE_READY
			if i%2 == 0 {
				s = rbeev1.WorkerState_WORKER_STATE_BUSY
			}
			if err := st.Send(&rbeev1.WorkerHeartbeatRequest{Worker: &rbeev1.Worker{
				WorkerId: id, HiveId: "fake", Model: "m", Device: "cpu", Pid: 999999, Port: 1, State: s,
			}}); err != nil {
				t.Fatal(err)
			}
			if _, err := st.Recv(); err != nil {
				t.Fatal(err)
			}
		}
		_ = st.CloseSend()
		if _, err := st.Recv(); err != io.EOF {
			t.Fatalf("closing churn stream: %v", err)
		}
	}
	churn("churn", 5000) // every beat is a change (BUSY <-> READY); the watcher reads none
	churn("marker", 1)   // ends READY... then closed without STOPPING: STALE

	known := map[string]rbeev1.WorkerState{}
	reset := false
	for {
		ev, err := w.Recv()
		if err != nil {
			t.Fatal(err)
		}
		switch ev.GetType() {
		case rbeev1.WatchEventType_WATCH_EVENT_TYPE_RESET:
			reset = true
			known = map[string]rbeev1.WorkerState{}
		case rbeev1.WatchEventType_WATCH_EVENT_TYPE_ADDED, rbeev1.WatchEventType_WATCH_EVENT_TYPE_UPDATED:
			known[ev.GetWorker().GetWorkerId()] = ev.GetWorker().GetState()
		case rbeev1.WatchEventType_WATCH_EVENT_TYPE_REMOVED:
			delete(known, ev.GetWorker().GetWorkerId())
		}
		if known["marker"] == rbeev1.WorkerState_WORKER_STATE_STALE && known["churn"] == rbeev1.WorkerState_WORKER_STATE_STALE {
			break
		}
	}
	if !reset {
		t.Fatal("a watcher 5000 changes behind with an 8-event buffer was never sent RESET")
	}
	list, err := q.ListWorkers(ctxT(t, 5*time.Second), &rbeev1.ListWorkersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.GetWorkers()) != len(known) {
		t.Fatalf("watcher's view %v differs from ListWorkers %v", known, list.GetWorkers())
	}
	for _, lw := range list.GetWorkers() {
		if known[lw.GetWorkerId()] != lw.GetState() {
			t.Errorf("watcher has %s %v, registry %v", lw.GetWorkerId(), known[lw.GetWorkerId()], lw.GetState())
		}
	}
}
