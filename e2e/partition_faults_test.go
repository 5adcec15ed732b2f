package e2e

import (
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// queuedTo sums the bytes that h's TCP sockets to addr:port still hold unsent or unacknowledged
// (tx_queue in the namespace's own /proc/net/tcp): what would reach that peer once a cut link
// returns.
func queuedTo(t *testing.T, h *host, addr string, port int) int {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", h.ns, "cat", "/proc/net/tcp").Output()
	if err != nil {
		t.Fatalf("reading %s's /proc/net/tcp: %v", h.ns, err)
	}
	ip := net.ParseIP(addr).To4()
	want := fmt.Sprintf("%02X%02X%02X%02X:%04X", ip[3], ip[2], ip[1], ip[0], port)
	total := 0
	for _, line := range strings.Split(string(out), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 5 || f[2] != want {
			continue
		}
		tx, _, _ := strings.Cut(f[4], ":")
		n, err := strconv.ParseInt(tx, 16, 64)
		if err != nil {
			t.Fatalf("bad tx_queue %q in %q", f[4], line)
		}
		total += int(n)
	}
	return total
}

// A Delete sent the moment the hive is cut off, while the queen still takes it for live: the
// operator gets UNAVAILABLE once the queen gives up, and the request never starts on the hive, even
// when the network delivers it after healing. It does here: the queen's host (with neighbour timers
// short enough to expire within the cut) queues the Delete's last retransmission, and the reset
// that follows it, while the hive's address does not resolve, independently of the socket; the
// hive's first ARP request after healing flushes them, 15.3 s after sending, with a fresh gRPC
// deadline. Only its bound in the hive's clock (not_after) stops it there. After healing the worker
// still runs, and the retried Delete stops it with one SIGTERM in all.
func TestDeleteSentIntoAPartitionNeverArrivesLater(t *testing.T) {
	f := newFabric(t)
	qh, hh := f.addHost("q"), f.addHost("h")
	// Defaults (reachable 15-45 s, first probe after 5 s) make the entry expire within the cut in
	// some runs only (1 in 4 under CI's load); these make it every run. Nothing else changes.
	qh.sysctl("net/ipv4/neigh/eth0/base_reachable_time_ms", "1000")
	qh.sysctl("net/ipv4/neigh/eth0/delay_first_probe_time", "1")
	const interval = 500 * time.Millisecond
	queenAddr := qh.addr + ":7833"
	qh.start("queen", "--http-listen", "off", "--listen", queenAddr, "--insecure", "--heartbeat-interval", interval.String()).awaitAction("queen_start")
	hiveID := uniqueID("dcut")
	cleanupWorkers(t, hiveID)
	hive := hh.start("hive", "--listen", hh.addr+":7835", "--insecure", "--hive-id", hiveID, "--queen", queenAddr,
		"--log-dir", t.TempDir(), "--grace", "1s")
	hive.awaitAction("hive_registered")
	q := qh.dialFrom(queenAddr)
	ids := []string{"d0", "d1"}
	pids := map[string]int32{}
	for _, id := range ids {
		r, err := q.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{HiveId: hiveID, Model: "m", WorkerId: id, WaitReady: true})
		if err != nil {
			t.Fatalf("spawn %s: %v", id, err)
		}
		pids[id] = r.GetWorker().GetPid()
	}

	hh.cut()
	t0 := time.Now()
	// Grace 0: the queen gives up after its 15 s slack.
	_, err := q.DeleteWorker(ctxT(t, 60*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: "d0", GracePeriod: durationpbNew(0)})
	t.Logf("Delete sent into the partition: %v after %v", err, time.Since(t0).Round(time.Millisecond))
	if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), hiveID) {
		t.Fatalf("Delete sent into the partition = %v, want UNAVAILABLE naming hive %s", err, hiveID)
	}
	if n := queuedTo(t, qh, hh.addr, 7835); n > 0 {
		t.Errorf("%d bytes still queued from the queen to the hive after the failed Delete: they arrive when the link returns", n)
	}

	healed := time.Now()
	hh.heal()
	readyAt := awaitStates(t, q, ids, rbeev1.WorkerState_WORKER_STATE_READY, 30*time.Second)
	awaitHiveReady(t, q, hiveID)
	t.Logf("after healing: workers READY in %v, hive READY in %v", readyAt.Sub(healed).Round(time.Millisecond), time.Since(healed).Round(time.Millisecond))
	for id, pid := range pids {
		if !alive(int(pid)) {
			t.Errorf("worker %s (PID %d) was stopped after the Delete had failed", id, pid)
		}
	}
	if n := hive.count("worker_delete_start", ""); n > 0 {
		t.Errorf("the failed Delete started on the hive after healing (%d worker_delete_start lines)", n)
	}
	// Whether the held-up request was read before the reset that follows it is a race on the
	// hive's side; when it was, the hive said why it refused it.
	t.Logf("the held-up Delete reached the hive and was refused as late %d time(s)", hive.count("worker_delete_late", "d0"))

	d, err := q.DeleteWorker(ctxT(t, 30*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: "d0", GracePeriod: durationpbNew(time.Second)})
	if err != nil || d.GetOutcome() != rbeev1.DeleteOutcome_DELETE_OUTCOME_EXITED {
		t.Fatalf("Delete after healing = %v, %v; want EXITED", d, err)
	}
	if n := hive.count("worker_delete_sigterm", "d0"); n != 1 {
		t.Errorf("the hive sent SIGTERM to d0 %d times, want once", n)
	}
	if _, err := q.DeleteWorker(ctxT(t, 30*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: "d1"}); err != nil {
		t.Errorf("delete d1: %v", err)
	}
	noWorkersLeft(t, hiveID)
}

// A real hive refuses a Delete or Spawn whose bound in its clock has passed (ABORTED) or that was
// bounded in another hive process's clock (FAILED_PRECONDITION), with the worker untouched and no
// process started; the same Delete without a bound (a queen with no reading) stops the worker.
func TestHiveRefusesRequestsPastTheirBound(t *testing.T) {
	_, queen := startQueen(t, "--heartbeat-interval", "500ms")
	hiveID := uniqueID("bound")
	h, hiveAddr := startHive(t, queen, hiveID)
	q, _ := dial(t, queen)
	r, err := q.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{HiveId: hiveID, Model: "m", WorkerId: "b0", WaitReady: true})
	if err != nil {
		t.Fatal(err)
	}
	pid := r.GetWorker().GetPid()
	line := h.awaitAction("hive_start")
	instance, err := strconv.ParseUint(line["clock_instance"].(string), 16, 64)
	if err != nil {
		t.Fatalf("hive_start names no clock instance: %v (%v)", err, line)
	}
	hc := hiveClient(t, hiveAddr)
	past := &rbeev1.HiveClock{Instance: instance, Reading: durationpbNew(time.Nanosecond)}
	other := &rbeev1.HiveClock{Instance: instance + 1, Reading: durationpbNew(time.Hour)}
	for _, tc := range []struct {
		name string
		call func() error
		want codes.Code
	}{
		{"delete past its bound", func() error {
			_, err := hc.Delete(ctxT(t, 10*time.Second), &rbeev1.DeleteRequest{WorkerId: "b0", Pid: pid, NotAfter: past})
			return err
		}, codes.Aborted},
		{"delete in another process's clock", func() error {
			_, err := hc.Delete(ctxT(t, 10*time.Second), &rbeev1.DeleteRequest{WorkerId: "b0", Pid: pid, NotAfter: other})
			return err
		}, codes.FailedPrecondition},
		{"spawn past its bound", func() error {
			_, err := hc.Spawn(ctxT(t, 10*time.Second), &rbeev1.SpawnRequest{WorkerId: "b1", Model: "m", NotAfter: past})
			return err
		}, codes.Aborted},
	} {
		if err := tc.call(); status.Code(err) != tc.want || !strings.Contains(err.Error(), "nothing was done") {
			t.Errorf("%s = %v, want %v saying nothing was done", tc.name, err, tc.want)
		}
	}
	if !alive(int(pid)) || len(workersOf(hiveID)) != 1 {
		t.Fatalf("after the refusals: worker %d alive %v, hive's workers %v; want b0 alone, untouched", pid, alive(int(pid)), workersOf(hiveID))
	}
	if n := h.count("worker_delete_start", ""); n != 0 {
		t.Errorf("%d Deletes started on the hive; want none", n)
	}
	if _, err := hc.Delete(ctxT(t, 10*time.Second), &rbeev1.DeleteRequest{WorkerId: "b0", Pid: pid}); err != nil {
		t.Fatalf("Delete without a bound: %v", err)
	}
	noWorkersLeft(t, hiveID)
}

// count counts p's log lines with action (and worker_id, unless empty).
func (p *proc) count(action, workerID string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, l := range p.lines {
		if l["action"] == action && (workerID == "" || l["worker_id"] == workerID) {
			n++
		}
	}
	return n
}

// dropTo makes h drop, silently and on the way out, every packet it sends to dst, until undrop:
// a one-way fault (packets to h still arrive) that hits one destination only. It uses only tc and
// kernel features built in: packets for dst go to an htb class whose queue holds none.
func (h *host) dropTo(dst string) {
	h.f.t.Helper()
	for _, r := range [][]string{
		{"-n", h.ns, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "1", "r2q", "100000"},
		{"-n", h.ns, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:1", "htb", "rate", "10gbit"},
		{"-n", h.ns, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:2", "htb", "rate", "10gbit"},
		{"-n", h.ns, "qdisc", "add", "dev", "eth0", "parent", "1:2", "handle", "20:", "pfifo", "limit", "0"},
		{"-n", h.ns, "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "ip", "dst", dst + "/32", "flowid", "1:2"},
	} {
		if out, err := exec.Command("tc", r...).CombinedOutput(); err != nil {
			h.f.t.Skipf("one-way drops need tc with htb, u32 and pfifo: tc %s: %v: %s", strings.Join(r, " "), err, out)
		}
	}
}

func (h *host) undrop() {
	h.f.t.Helper()
	if out, err := exec.Command("tc", "-n", h.ns, "qdisc", "del", "dev", "eth0", "root").CombinedOutput(); err != nil {
		h.f.t.Fatalf("tc qdisc del: %v: %s", err, out)
	}
}

// The hive's own workers cut off one way: the queen has a second address that only workers use
// (its --advertise), and the hive's host drops what it sends there, while the hive's beats to the
// queen's first address flow and nothing toward the hive's host is touched. The workers turn
// STALE, not removed, their processes untouched; the hive stays READY; healed, they are READY
// again, the same processes.
func TestPartitionOneWayWorkersOnly(t *testing.T) {
	f := newFabric(t)
	qh, hh := f.addHost("q"), f.addHost("h")
	workersQueen := f.base + ".0.200"
	ipCmd(t, "-n", qh.ns, "addr", "add", workersQueen+"/24", "dev", "eth0")
	qh.start("queen", "--listen", "0.0.0.0:7833", "--advertise", workersQueen+":7833", "--insecure",
		"--heartbeat-interval", "500ms", "--stale-after", "1500ms").awaitAction("queen_start")
	hiveID := uniqueID("oneway")
	cleanupWorkers(t, hiveID)
	hh.start("hive", "--listen", hh.addr+":7835", "--insecure", "--hive-id", hiveID, "--queen", qh.addr+":7833",
		"--log-dir", t.TempDir()).awaitAction("hive_registered")
	q := qh.dialFrom(qh.addr + ":7833")
	r, err := q.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{HiveId: hiveID, Model: "m", WorkerId: "ow", WaitReady: true})
	if err != nil {
		t.Fatal(err)
	}
	pid := r.GetWorker().GetPid()

	hh.dropTo(workersQueen)
	awaitStates(t, q, []string{"ow"}, rbeev1.WorkerState_WORKER_STATE_STALE, 20*time.Second)
	time.Sleep(2 * time.Second) // the span over which nothing may happen; no event marks "nothing"
	hives, err := q.ListHives(ctxT(t, 5*time.Second), &rbeev1.ListHivesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hives.GetHives() {
		if h.GetHiveId() == hiveID && h.GetState() != rbeev1.HiveState_HIVE_STATE_READY {
			t.Errorf("the hive is %v while only its workers' packets are dropped, want READY", h.GetState())
		}
	}
	if ws := workersIn(t, q, hiveID); len(ws) != 1 || ws["ow"].GetState() != rbeev1.WorkerState_WORKER_STATE_STALE {
		t.Errorf("during the drop the queen lists %v, want ow STALE", ws)
	}
	if !alive(int(pid)) || len(workersOf(hiveID)) != 1 {
		t.Errorf("worker process %d alive %v, hive's workers %v: want the one process untouched", pid, alive(int(pid)), workersOf(hiveID))
	}

	healed := time.Now()
	hh.undrop()
	readyAt := awaitStates(t, q, []string{"ow"}, rbeev1.WorkerState_WORKER_STATE_READY, 30*time.Second)
	t.Logf("one-way drop healed: READY %v later", readyAt.Sub(healed).Round(time.Millisecond))
	if ws := workersIn(t, q, hiveID); len(ws) != 1 || ws["ow"].GetPid() != pid {
		t.Errorf("after healing the queen lists %v, want ow with PID %d", ws, pid)
	}
	if _, err := q.DeleteWorker(ctxT(t, 20*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: "ow"}); err != nil {
		t.Errorf("delete ow: %v", err)
	}
	noWorkersLeft(t, hiveID)
}
