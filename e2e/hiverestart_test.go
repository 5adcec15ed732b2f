package e2e

import (
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// zombieChildren lists the zombie children of pid.
func zombieChildren(pid int) []int {
	var z []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) > 1 && f[0] == "Z" && f[1] == strconv.Itoa(pid) {
			n, _ := strconv.Atoi(e.Name())
			z = append(z, n)
		}
	}
	return z
}

// TestHiveKilledMidGrace kills the hive with SIGKILL while it waits out a worker's grace period.
// Every worker keeps running and beating; a new hive on the same address deletes them all (they
// are not its children) with the right outcome; neither hive leaves a zombie.
func TestHiveKilledMidGrace(t *testing.T) {
	_, addr := startQueen(t)
	hid := uniqueID("hk")
	cleanupWorkers(t, hid)
	bin := stubbornWorker(t)
	h1, hiveAddr := startHive(t, addr, hid, "--worker-binary", bin)
	q, _ := dial(t, addr)
	pids := map[string]int{}
	for _, id := range []string{"ka", "kb"} {
		r, err := q.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: id, WaitReady: true})
		if err != nil {
			t.Fatal(err)
		}
		pids[id] = int(r.GetWorker().GetPid())
	}
	errc := make(chan error, 1)
	go func() {
		_, err := q.DeleteWorker(ctxT(t, 60*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: "ka", GracePeriod: durationpbNew(30 * time.Second)})
		errc <- err
	}()
	h1.awaitAction("worker_delete_sigterm") // the hive is now waiting out ka's grace period
	h1pid := h1.cmd.Process.Pid
	h1.stop(syscall.SIGKILL, 10*time.Second)
	if err := <-errc; status.Code(err) != codes.Unavailable {
		t.Errorf("DeleteWorker while its hive died: %v, want UNAVAILABLE", err)
	}
	for id, pid := range pids {
		if !alive(pid) {
			t.Fatalf("worker %s (PID %d) died with its hive", id, pid)
		}
	}
	// Still beating: the queen keeps them, READY, with the same PIDs.
	list, err := q.ListWorkers(ctxT(t, 5*time.Second), &rbeev1.ListWorkersRequest{HiveId: hid})
	if err != nil || len(list.GetWorkers()) != 2 {
		t.Fatalf("ListWorkers after the hive died = %v, %v", list, err)
	}

	h2 := start(t, "hive", "--listen", hiveAddr, "--hive-id", hid, "--queen", addr, "--log-dir", t.TempDir(), "--worker-binary", bin)
	h2.awaitAction("hive_registered")
	for id, want := range map[string]rbeev1.DeleteOutcome{"ka": rbeev1.DeleteOutcome_DELETE_OUTCOME_KILLED, "kb": rbeev1.DeleteOutcome_DELETE_OUTCOME_KILLED} {
		d, err := q.DeleteWorker(ctxT(t, 30*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: id, GracePeriod: durationpbNew(200 * time.Millisecond)})
		if err != nil || d.GetOutcome() != want {
			t.Fatalf("DeleteWorker(%s) through the new hive = %v, %v; want %v", id, d, err, want)
		}
		if alive(pids[id]) {
			t.Errorf("worker %s (PID %d) alive after delete", id, pids[id])
		}
	}
	// The new hive's own children are reaped.
	r, err := q.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: "kc", WaitReady: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := q.DeleteWorker(ctxT(t, 30*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: "kc", GracePeriod: durationpbNew(0)}); err != nil {
		t.Fatal(err)
	}
	if z := zombieChildren(h2.cmd.Process.Pid); len(z) > 0 {
		t.Errorf("the new hive left zombie children %v (worker PID %d)", z, r.GetWorker().GetPid())
	}
	if z := zombieChildren(h1pid); len(z) > 0 {
		t.Errorf("zombies of the killed hive: %v", z)
	}
	noWorkersLeft(t, hid)
}
