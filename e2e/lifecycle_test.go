package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// stubbornWorker writes a worker binary that is worker-stub ignoring SIGTERM (exec keeps the PID,
// the environment and so the worker's identity).
func stubbornWorker(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "stubborn-worker")
	script := "#!/bin/sh\nexec " + filepath.Join(binDir, "worker-stub") + " --ignore-sigterm \"$@\"\n"
	if err := os.WriteFile(p, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestLifecycle is issue 2's end-to-end story: a queen and two hives, three workers spawned with
// wait_ready across both, listed and fetched with live PIDs, deleted gracefully and by force, and
// nothing left running.
func TestLifecycle(t *testing.T) {
	_, addr := startQueen(t)
	h1, h2 := uniqueID("h1"), uniqueID("h2")
	cleanupWorkers(t, h1, h2)
	hive1, _ := startHive(t, addr, h1)
	startHive(t, addr, h2, "--worker-binary", stubbornWorker(t))
	q, _ := dial(t, addr)

	hives, err := q.ListHives(ctxT(t, 5*time.Second), &rbeev1.ListHivesRequest{})
	if err != nil || len(hives.GetHives()) != 2 {
		t.Fatalf("ListHives = %v, %v; want both hives", hives, err)
	}

	// The job id given by the caller comes back in the response header and is on the hive's log
	// lines for that spawn.
	var header metadata.MD
	jctx := metadata.AppendToOutgoingContext(ctxT(t, 30*time.Second), "x-job-id", "job-e2e-1")
	a, err := q.SpawnWorker(jctx, &rbeev1.SpawnWorkerRequest{HiveId: h1, Model: "llama-3-8b", WorkerId: "a", WaitReady: true}, grpc.Header(&header))
	if err != nil {
		t.Fatalf("SpawnWorker a: %v", err)
	}
	if got := header.Get("x-job-id"); len(got) != 1 || got[0] != "job-e2e-1" {
		t.Errorf("x-job-id response header = %v, want job-e2e-1", got)
	}
	hive1.await("worker_spawned with job_id job-e2e-1", func(m map[string]any) bool {
		return m["action"] == "worker_spawned" && m["job_id"] == "job-e2e-1"
	})
	b, err := q.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{HiveId: h2, Model: "mistral-7b", Device: "cpu", WorkerId: "b", WaitReady: true})
	if err != nil {
		t.Fatalf("SpawnWorker b: %v", err)
	}
	// No hive given: the queen picks one, and makes the id.
	c, err := q.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{Model: "phi-3", WaitReady: true})
	if err != nil {
		t.Fatalf("SpawnWorker c: %v", err)
	}
	if c.GetWorker().GetWorkerId() == "" || c.GetWorker().GetHiveId() == "" {
		t.Fatalf("SpawnWorker c = %v: want a made id and a picked hive", c.GetWorker())
	}
	for _, w := range []*rbeev1.Worker{a.GetWorker(), b.GetWorker(), c.GetWorker()} {
		if w.GetState() != rbeev1.WorkerState_WORKER_STATE_READY || !alive(int(w.GetPid())) || w.GetPort() == 0 || w.GetProcessStartTime() == 0 {
			t.Errorf("spawned worker %v: want READY with a live PID, a port and a start time", w)
		}
	}

	list, err := q.ListWorkers(ctxT(t, 5*time.Second), &rbeev1.ListWorkersRequest{})
	if err != nil || len(list.GetWorkers()) != 3 {
		t.Fatalf("ListWorkers = %v, %v; want 3 workers", list, err)
	}
	only2, err := q.ListWorkers(ctxT(t, 5*time.Second), &rbeev1.ListWorkersRequest{HiveId: h2})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range only2.GetWorkers() {
		if w.GetHiveId() != h2 {
			t.Errorf("ListWorkers(hive %s) returned %v", h2, w)
		}
	}
	got, err := q.GetWorker(ctxT(t, 5*time.Second), &rbeev1.GetWorkerRequest{WorkerId: "b"})
	if err != nil || got.GetWorker().GetPid() != b.GetWorker().GetPid() || got.GetWorker().GetModel() != "mistral-7b" ||
		got.GetWorker().GetLastHeartbeatTime() == nil {
		t.Fatalf("GetWorker(b) = %v, %v", got, err)
	}

	// A worker that leaves on SIGTERM: EXITED, well under the 2s default grace.
	t0 := time.Now()
	del, err := q.DeleteWorker(ctxT(t, 30*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: "a"})
	took := time.Since(t0)
	if err != nil || del.GetOutcome() != rbeev1.DeleteOutcome_DELETE_OUTCOME_EXITED {
		t.Fatalf("DeleteWorker(a) = %v, %v; want EXITED", del, err)
	}
	if took > time.Second {
		t.Errorf("graceful delete took %v; want well under the 2s grace period", took)
	}
	if alive(int(a.GetWorker().GetPid())) {
		t.Errorf("worker a (PID %d) still alive after delete", a.GetWorker().GetPid())
	}
	if del.GetWorker().GetWorkerId() != "a" {
		t.Errorf("DeleteWorker response worker = %v, want a's last descriptor", del.GetWorker())
	}

	// A worker that ignores SIGTERM: KILLED, after the grace period.
	t0 = time.Now()
	del, err = q.DeleteWorker(ctxT(t, 30*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: "b", GracePeriod: durationpb.New(time.Second)})
	took = time.Since(t0)
	if err != nil || del.GetOutcome() != rbeev1.DeleteOutcome_DELETE_OUTCOME_KILLED {
		t.Fatalf("DeleteWorker(b) = %v, %v; want KILLED", del, err)
	}
	if took < time.Second || took > 3*time.Second {
		t.Errorf("forced delete took %v; want just over the 1s grace period", took)
	}
	if _, err := q.GetWorker(ctxT(t, 5*time.Second), &rbeev1.GetWorkerRequest{WorkerId: "b"}); status.Code(err) != codes.NotFound {
		t.Errorf("GetWorker(b) after delete: %v, want NOT_FOUND", err)
	}
	if _, err := q.DeleteWorker(ctxT(t, 30*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: c.GetWorker().GetWorkerId()}); err != nil {
		t.Fatalf("DeleteWorker(c): %v", err)
	}
	list, err = q.ListWorkers(ctxT(t, 5*time.Second), &rbeev1.ListWorkersRequest{})
	if err != nil || len(list.GetWorkers()) != 0 {
		t.Errorf("ListWorkers after deleting all = %v, %v; want none", list, err)
	}
	noWorkersLeft(t, h1, h2)
}

// TestBadInput checks that each bad request is refused with the code SPEC.md names.
func TestBadInput(t *testing.T) {
	_, addr := startQueen(t)
	hid := uniqueID("hb")
	cleanupWorkers(t, hid)
	startHive(t, addr, hid)
	q, _ := dial(t, addr)
	ctx := ctxT(t, 30*time.Second)
	tests := []struct {
		name string
		call func() error
		want codes.Code
	}{
		{"missing model", func() error {
			_, err := q.SpawnWorker(ctx, &rbeev1.SpawnWorkerRequest{HiveId: hid})
			return err
		}, codes.InvalidArgument},
		{"bad device", func() error {
			_, err := q.SpawnWorker(ctx, &rbeev1.SpawnWorkerRequest{HiveId: hid, Model: "m", Device: "gpu0"})
			return err
		}, codes.InvalidArgument},
		{"bad worker id", func() error {
			_, err := q.SpawnWorker(ctx, &rbeev1.SpawnWorkerRequest{HiveId: hid, Model: "m", WorkerId: "Bad_ID"})
			return err
		}, codes.InvalidArgument},
		{"unknown hive", func() error {
			_, err := q.SpawnWorker(ctx, &rbeev1.SpawnWorkerRequest{HiveId: "no-such-hive", Model: "m"})
			return err
		}, codes.NotFound},
		{"get unknown worker", func() error {
			_, err := q.GetWorker(ctx, &rbeev1.GetWorkerRequest{WorkerId: "no-such-worker"})
			return err
		}, codes.NotFound},
		{"delete unknown worker", func() error {
			_, err := q.DeleteWorker(ctx, &rbeev1.DeleteWorkerRequest{WorkerId: "no-such-worker"})
			return err
		}, codes.NotFound},
		{"negative grace", func() error {
			_, err := q.DeleteWorker(ctx, &rbeev1.DeleteWorkerRequest{WorkerId: "x", GracePeriod: durationpb.New(-time.Second)})
			return err
		}, codes.InvalidArgument},
		{"grace over 5 minutes", func() error {
			_, err := q.DeleteWorker(ctx, &rbeev1.DeleteWorkerRequest{WorkerId: "x", GracePeriod: durationpb.New(6 * time.Minute)})
			return err
		}, codes.InvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()
			if status.Code(err) != tt.want {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
			if status.Convert(err).Message() == "" {
				t.Fatal("error has no message")
			}
		})
	}
	// Nothing was spawned by any of them.
	list, err := q.ListWorkers(ctx, &rbeev1.ListWorkersRequest{})
	if err != nil || len(list.GetWorkers()) != 0 {
		t.Fatalf("ListWorkers = %v, %v; want none", list, err)
	}
	noWorkersLeft(t, hid)
}

// TestBadFlags checks that malformed flags stop a program at once with a message and status 2.
func TestBadFlags(t *testing.T) {
	for _, tt := range []struct {
		bin  string
		args []string
	}{
		{"queen", []string{"--hive", "nohostport"}},
		{"queen", []string{"--hive", "Bad_Id=127.0.0.1:1"}},
		{"queen", []string{"--hive", "h=127.0.0.1"}},
		{"queen", []string{"--hive", "h=127.0.0.1:1", "--hive", "h=127.0.0.1:2"}},
		{"queen", []string{"--heartbeat-interval", "1s", "--stale-after", "500ms"}},
		{"hive", []string{"--port-range", "9200-9100"}},
		{"hive", []string{"--grace", "-1s"}},
		{"hive", []string{"--hive-id", "UPPER"}},
		{"hive", []string{"--log-keep-for", "0s"}},
		{"hive", []string{"--log-keep-exited", "0"}},
	} {
		p := start(t, tt.bin, tt.args...)
		if code := p.exitCode(10 * time.Second); code != 2 {
			t.Errorf("%s %v exited %d, want 2", tt.bin, tt.args, code)
		}
	}
}

// TestWorkerBindingItsOwnPort runs workers that take no inherited socket (as most servers): with
// --no-socket-handoff the hive only chooses free, distinct ports and the workers bind them.
func TestWorkerBindingItsOwnPort(t *testing.T) {
	_, addr := startQueen(t)
	hid := uniqueID("hp")
	cleanupWorkers(t, hid)
	startHive(t, addr, hid, "--no-socket-handoff", "--port-range", "9400-9409")
	q, _ := dial(t, addr)
	ports := map[uint32]bool{}
	for _, id := range []string{"p1", "p2", "p3"} {
		r, err := q.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: id, WaitReady: true})
		if err != nil {
			t.Fatalf("SpawnWorker(%s): %v", id, err)
		}
		p := r.GetWorker().GetPort()
		if ports[p] {
			t.Fatalf("port %d handed out twice", p)
		}
		ports[p] = true
		env, _ := os.ReadFile("/proc/" + strconv.Itoa(int(r.GetWorker().GetPid())) + "/environ")
		if strings.Contains(string(env), "LISTEN_FDS=") {
			t.Errorf("worker %s was told LISTEN_FDS though nothing is handed over", id)
		}
	}
	for _, id := range []string{"p1", "p2", "p3"} {
		if _, err := q.DeleteWorker(ctxT(t, 30*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: id}); err != nil {
			t.Fatal(err)
		}
	}
	noWorkersLeft(t, hid)
}

// TestWorkerDyingAtStartSaysWhy: a worker that exits while starting fails the spawn at once with
// its exit status and last output, through the API, the watch and the CLI.
func TestWorkerDyingAtStartSaysWhy(t *testing.T) {
	bad := filepath.Join(t.TempDir(), "bad-worker")
	if err := os.WriteFile(bad, []byte("#!/bin/sh\necho 'loading llama: CUDA out of memory' >&2\nexit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	_, addr := startQueen(t)
	hid := uniqueID("hd")
	cleanupWorkers(t, hid)
	startHive(t, addr, hid, "--worker-binary", bad)
	q, _ := dial(t, addr)
	w, err := q.WatchWorkers(ctxT(t, 30*time.Second), &rbeev1.WatchWorkersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	_, err = q.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: "doomed", WaitReady: true})
	if status.Code(err) != codes.Aborted || !strings.Contains(err.Error(), "exit status 3") || !strings.Contains(err.Error(), "CUDA out of memory") {
		t.Fatalf("SpawnWorker = %v; want ABORTED with the exit status and the worker's last output", err)
	}
	if took := time.Since(t0); took > 5*time.Second {
		t.Errorf("the failure took %v; the hive reports exits at once", took)
	}
	ev := watchUntil(t, w, "REMOVED", func(ev *rbeev1.WatchWorkersResponse) bool {
		return ev.GetType() == rbeev1.WatchEventType_WATCH_EVENT_TYPE_REMOVED
	})
	if !strings.Contains(ev.GetReason(), "CUDA out of memory") {
		t.Errorf("REMOVED reason %q lacks the worker's output", ev.GetReason())
	}
	cmd := exec.Command(rbeeBinary(t), "worker", "spawn", "--model", "m", "--id", "doomed2", "--wait")
	cmd.Env = rbeeEnv(addr)
	out, _ := cmd.CombinedOutput()
	if code := cmd.ProcessState.ExitCode(); code != 11 || !strings.Contains(string(out), "CUDA out of memory") {
		t.Errorf("rbee worker spawn --wait: exit %d, output:\n%s\nwant exit 11 with the reason", code, out)
	}
	noWorkersLeft(t, hid)
}
