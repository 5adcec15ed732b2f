package e2e

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// catalogFile writes a model catalog in which "${SERVER}" stands for worker-stub imitating an
// inference server that knows nothing of rbee (--openai: binds --port itself, no heartbeat).
func catalogFile(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "models.yaml")
	text = strings.ReplaceAll(text, `"${SERVER}"`, `"`+filepath.Join(binDir, "worker-stub")+`", "--openai", "--model", "${MODEL}"`)
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// markedProcs lists the live processes that carry worker id's marker: its shim, its server and
// whatever the server forked (found in /proc by their environment).
func markedProcs(id string) []int {
	var pids []int
	want := []byte("RBEE_WORKER_ID=" + id + "\x00")
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		env, err := os.ReadFile("/proc/" + e.Name() + "/environ")
		if err != nil || !strings.Contains(string(env), string(want)) || !alive(pid) {
			continue
		}
		pids = append(pids, pid)
	}
	return pids
}

// nothingLeft fails the test if a process of the workers is still there, and kills it.
func nothingLeft(t *testing.T, ids ...string) {
	t.Helper()
	for _, id := range ids {
		if pids := markedProcs(id); len(pids) > 0 {
			t.Errorf("processes of worker %s left running: %v", id, pids)
			for _, p := range pids {
				unix.Kill(p, unix.SIGKILL)
			}
		}
	}
}

// cleanupMarked registers a last-resort kill of the workers' processes.
func cleanupMarked(t *testing.T, ids ...string) {
	t.Cleanup(func() {
		for _, id := range ids {
			for _, p := range markedProcs(id) {
				unix.Kill(p, unix.SIGKILL)
			}
		}
	})
}

// catalogRig is one hive serving a catalog (see catalogFile) to a queen, and the id of the one
// worker a test spawns from it, whose processes are killed by PID when the test ends, whatever
// happens.
type catalogRig struct {
	t        *testing.T
	q        rbeev1.QueenServiceClient
	queen    string // the queen's address
	hive     *proc
	hiveID   string
	hiveAddr string
	models   string // the catalog file
	wid      string // the worker's id
}

// newCatalogRig starts a hive (id prefix-...) serving catalog to the queen at queen.
func newCatalogRig(t *testing.T, queen, prefix, catalog string, hiveArgs ...string) *catalogRig {
	t.Helper()
	r := &catalogRig{t: t, queen: queen, hiveID: uniqueID(prefix), models: catalogFile(t, catalog), wid: uniqueID("w")}
	cleanupMarked(t, r.wid)
	r.hive, r.hiveAddr = startHive(t, queen, r.hiveID, append([]string{"--models", r.models}, hiveArgs...)...)
	r.q, _ = dial(t, queen)
	return r
}

// spawnReady asks the queen for the rig's worker, of model, and waits until it is READY.
func (r *catalogRig) spawnReady(ctx context.Context, model string) (*rbeev1.Worker, error) {
	resp, err := r.q.SpawnWorker(ctx, &rbeev1.SpawnWorkerRequest{Model: model, WorkerId: r.wid, WaitReady: true})
	return resp.GetWorker(), err
}

// deleteWorker deletes the rig's worker (grace nil: the catalog's) and fails the test unless the
// outcome is want.
func (r *catalogRig) deleteWorker(ctx context.Context, grace *durationpb.Duration, want rbeev1.DeleteOutcome) {
	r.t.Helper()
	d, err := r.q.DeleteWorker(ctx, &rbeev1.DeleteWorkerRequest{WorkerId: r.wid, GracePeriod: grace})
	if err != nil || d.GetOutcome() != want {
		r.t.Fatalf("DeleteWorker(%s) = %v, %v; want %v", r.wid, d, err, want)
	}
}

// replaceHive starts a hive in place of the rig's, which is gone: same id, address and catalog.
func (r *catalogRig) replaceHive() {
	r.t.Helper()
	r.hive = start(r.t, "hive", "--listen", r.hiveAddr, "--hive-id", r.hiveID, "--queen", r.queen, "--log-dir", r.t.TempDir(), "--models", r.models)
	r.hive.awaitAction("hive_registered")
}

// awaitGone waits, bounded, until pid has exited (polling /proc: the test is not its parent).
func awaitGone(t *testing.T, pid int, within time.Duration) {
	t.Helper()
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return // already gone
	}
	defer unix.Close(fd)
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	if n, _ := unix.Poll(fds, int(within.Milliseconds())); n == 0 {
		t.Fatalf("PID %d still alive after %v", pid, within)
	}
}

// serverOf returns the server worker-shim shim started: its one child.
func serverOf(t *testing.T, shim int) int {
	t.Helper()
	var kids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
		if len(f) > 1 && f[1] == strconv.Itoa(shim) && f[0] != "Z" {
			n, _ := strconv.Atoi(e.Name())
			kids = append(kids, n)
		}
	}
	if len(kids) != 1 {
		t.Fatalf("worker-shim %d has children %v, want exactly its server", shim, kids)
	}
	return kids[0]
}

// A catalog model is served by a real server under worker-shim: READY once its health answers
// 200, the shim's PID registered, the server its child carrying the worker marker and the
// catalog's environment; the hive's catalog is visible in ListHives; delete leaves nothing.
func TestCatalogSpawnReadyDelete(t *testing.T) {
	_, addr := startQueen(t)
	// A host other than the default: the server binds it (${HOST}), the shim polls it there
	// and reports it as the worker's address.
	r := newCatalogRig(t, addr, "cat", `models:
  tiny:
    cmd: ["${SERVER}", "--port", "${PORT}", "--host", "${HOST}", "--load-time", "300ms"]
    env: {FAKE_TAG: "${MODEL}@${DEVICE}"}
    concurrency: 4
    grace: 3s
  gpu-only:
    cmd: ["${SERVER}", "--port", "${PORT}"]
    devices: ["cuda:0"]
`, "--worker-host", "127.0.0.2")
	q, hid, wid := r.q, r.hiveID, r.wid

	// The hive itself refuses what its catalog does not allow, whoever asks.
	hc := hiveClient(t, r.hiveAddr)
	for _, tc := range []struct{ model, device, want string }{
		{"llama-70b", "cpu", `model "llama-70b" is not in hive ` + hid + `'s catalog`},
		{"gpu-only", "cpu", `model "gpu-only" may not run on cpu`},
	} {
		_, err := hc.Spawn(ctxT(t, 10*time.Second), &rbeev1.SpawnRequest{WorkerId: uniqueID("x"), Model: tc.model, Device: tc.device, QueenAddress: addr})
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("hive Spawn(%s on %s) = %v; want FAILED_PRECONDITION with %q", tc.model, tc.device, err, tc.want)
		}
	}

	hives, err := q.ListHives(ctxT(t, 5*time.Second), &rbeev1.ListHivesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var offered []string
	for _, h := range hives.GetHives() {
		if h.GetHiveId() == hid {
			for _, m := range h.GetModels() {
				offered = append(offered, m.GetName())
				if m.GetName() == "tiny" && (m.GetConcurrency() != 4 || m.GetGrace().AsDuration() != 3*time.Second) {
					t.Errorf("offer %v: want concurrency 4, grace 3s", m)
				}
			}
		}
	}
	if !slices.Equal(offered, []string{"gpu-only", "tiny"}) {
		t.Fatalf("hive %s offers %q, want [gpu-only tiny]", hid, offered)
	}

	t0 := time.Now()
	w, err := r.spawnReady(ctxT(t, 30*time.Second), "tiny")
	if err != nil {
		t.Fatal(err)
	}
	if w.GetState() != rbeev1.WorkerState_WORKER_STATE_READY || w.GetConcurrency() != 4 || w.GetAddress() != "127.0.0.2" {
		t.Fatalf("worker = %v, want READY with concurrency 4 at 127.0.0.2", w)
	}
	if took := time.Since(t0); took < 300*time.Millisecond {
		t.Errorf("READY after %v, before the server's health answered 200", took)
	}
	shim := int(w.GetPid())
	cmdline, _ := os.ReadFile("/proc/" + strconv.Itoa(shim) + "/cmdline")
	if !strings.Contains(string(cmdline), "worker-shim") {
		t.Fatalf("registered PID %d is %q, want the worker-shim", shim, cmdline)
	}
	srv := serverOf(t, shim)
	st, _ := os.ReadFile("/proc/" + strconv.Itoa(srv) + "/stat")
	if f := strings.Fields(string(st[strings.LastIndexByte(string(st), ')')+2:])); f[1] != strconv.Itoa(shim) || f[2] != strconv.Itoa(shim) {
		t.Fatalf("server %d: parent %s, group %s; want both the shim %d", srv, f[1], f[2], shim)
	}
	env, _ := os.ReadFile("/proc/" + strconv.Itoa(srv) + "/environ")
	for _, kv := range []string{"RBEE_WORKER_ID=" + wid, "FAKE_TAG=tiny@cpu"} {
		if !slices.Contains(strings.Split(string(env), "\x00"), kv) {
			t.Errorf("server environment lacks %s", kv)
		}
	}
	if strings.Contains(string(env), "LISTEN_PID=") {
		t.Errorf("server inherited the shim's socket activation variables")
	}

	// A model the hive does not offer.
	_, err = q.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{Model: "llama-70b", WaitReady: true})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), `"llama-70b"`) || !strings.Contains(err.Error(), hid+" (offers gpu-only, tiny)") {
		t.Errorf("spawn of an unoffered model = %v, want FAILED_PRECONDITION naming it and the hive considered", err)
	}
	_, err = q.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{Model: "gpu-only", WaitReady: true})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), hid+" (offers gpu-only on cuda:0 only)") {
		t.Errorf("spawn of a cuda-only model on cpu = %v, want FAILED_PRECONDITION naming the devices", err)
	}

	// The shim forwards SIGTERM and exits with the server.
	r.deleteWorker(ctxT(t, 30*time.Second), nil, rbeev1.DeleteOutcome_DELETE_OUTCOME_EXITED)
	nothingLeft(t, wid)
}

// A hive refuses to start on a bad catalog, naming the line and the field; without --models it
// starts as always.
func TestCatalogBadFileStopsHive(t *testing.T) {
	_, addr := startQueen(t)
	models := catalogFile(t, "models:\n  tiny:\n    cmd: [\"${SERVER}\", \"--port\", \"${PROT}\"]\n")
	h := start(t, "hive", "--listen", "127.0.0.1:0", "--hive-id", uniqueID("bad"), "--queen", addr, "--models", models)
	if code := h.exitCode(20 * time.Second); code != 2 {
		t.Fatalf("hive with a bad catalog exited %d, want 2", code)
	}
	h.mu.Lock()
	out := h.raw.String()
	h.mu.Unlock()
	if !strings.Contains(out, "models.yaml:3: models.tiny.cmd[5]: unknown placeholder ${PROT}") {
		t.Fatalf("hive said %q; want the line, the field and the placeholder", out)
	}
}

// A server that never answers health with 200 is stopped once its load_timeout passes; the spawn
// fails with the reason.
func TestShimLoadTimeout(t *testing.T) {
	_, addr := startQueen(t)
	r := newCatalogRig(t, addr, "lt", `models:
  stuck:
    cmd: ["${SERVER}", "--port", "${PORT}", "--load-time", "1h", "--ignore-sigterm"]
    load_timeout: 1s
    grace: 300ms
`)
	t0 := time.Now()
	_, err := r.spawnReady(ctxT(t, 30*time.Second), "stuck")
	if status.Code(err) != codes.Aborted || !strings.Contains(err.Error(), "load_timeout 1s") || !strings.Contains(err.Error(), "503") {
		t.Fatalf("SpawnWorker = %v; want ABORTED naming load_timeout and the last health answer", err)
	}
	if took := time.Since(t0); took > 10*time.Second {
		t.Errorf("took %v; the load timeout is 1s and the grace 300ms", took)
	}
	nothingLeft(t, r.wid)
}

// A server that exits while loading fails the spawn at once with its status and its last output.
func TestShimServerExitsDuringLoad(t *testing.T) {
	_, addr := startQueen(t)
	r := newCatalogRig(t, addr, "ex", `models:
  oom:
    cmd: ["${SERVER}", "--port", "${PORT}", "--load-time", "200ms", "--fail-load", "ggml_cuda_init: CUDA out of memory", "--exit-code", "3"]
`)
	_, err := r.spawnReady(ctxT(t, 30*time.Second), "oom")
	if status.Code(err) != codes.Aborted || !strings.Contains(err.Error(), "exit status 3") || !strings.Contains(err.Error(), "CUDA out of memory") {
		t.Fatalf("SpawnWorker = %v; want ABORTED with exit status 3 and the server's output", err)
	}
	nothingLeft(t, r.wid)
}

// A server that ignores SIGTERM and forks children (one in a session of its own): delete kills
// the lot.
func TestShimDeleteForkingStubbornServer(t *testing.T) {
	_, addr := startQueen(t)
	r := newCatalogRig(t, addr, "fk", `models:
  stubborn:
    cmd: ["${SERVER}", "--port", "${PORT}", "--ignore-sigterm", "--spawn-children", "2"]
`)
	w, err := r.spawnReady(ctxT(t, 30*time.Second), "stubborn")
	if err != nil {
		t.Fatal(err)
	}
	pids := slices.DeleteFunc(markedProcs(r.wid), func(p int) bool { return p == int(w.GetPid()) })
	if len(pids) != 3 {
		t.Fatalf("server and children = %v, want 3 PIDs", pids)
	}
	r.deleteWorker(ctxT(t, 30*time.Second), durationpbNew(300*time.Millisecond), rbeev1.DeleteOutcome_DELETE_OUTCOME_KILLED)
	for _, p := range pids {
		if alive(p) {
			t.Errorf("PID %d of the server's tree alive after delete", p)
		}
	}
	nothingLeft(t, r.wid)
}

// SIGKILL of the shim takes the server with it through Pdeathsig alone: the hive is killed
// first, so nothing else (its reaper's group or cgroup kill) can be what stops the server. A new
// hive then deletes the worker as already gone, and kills what the server had forked (left in
// the worker's cgroup, where there are cgroups).
func TestShimKilledTakesServer(t *testing.T) {
	_, addr := startQueen(t)
	r := newCatalogRig(t, addr, "sk", `models:
  tiny:
    cmd: ["${SERVER}", "--port", "${PORT}", "--ignore-sigterm", "--spawn-children", "2"]
`)
	cgroups := r.hive.await("process manager", func(m map[string]any) bool {
		return m["msg"] == "process manager ready"
	})["cgroups"] == true
	w, err := r.spawnReady(ctxT(t, 30*time.Second), "tiny")
	if err != nil {
		t.Fatal(err)
	}
	srv := serverOf(t, int(w.GetPid()))
	r.hive.stop(syscall.SIGKILL, 10*time.Second)
	if !alive(srv) {
		t.Fatal("the server died with the hive")
	}
	if err := unix.Kill(int(w.GetPid()), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	awaitGone(t, srv, 5*time.Second)
	// The server goes when the shim's main thread does; the shim's other threads may still be
	// exiting, and a hive that finds them signals the shim and reports EXITED.
	awaitGone(t, int(w.GetPid()), 5*time.Second)

	r.replaceHive()
	r.deleteWorker(ctxT(t, 30*time.Second), nil, rbeev1.DeleteOutcome_DELETE_OUTCOME_ALREADY_EXITED)
	if !cgroups {
		t.Log("no writable cgroup v2 here: the server's children outlive it (see the README's limits)")
		return
	}
	nothingLeft(t, r.wid)
}

// A ready server whose health starts failing (here after it answered one request, as a server
// that wedges under load) is UNHEALTHY with the reason, then stopped once unhealthy_timeout
// passes, its exit reported like any other.
func TestShimUnhealthyThenStopped(t *testing.T) {
	_, addr := startQueen(t)
	r := newCatalogRig(t, addr, "uh", `models:
  flaky:
    cmd: ["${SERVER}", "--port", "${PORT}", "--unhealthy-after", "1"]
    unhealthy_timeout: 1s
`, "--grace", "500ms")
	wid := r.wid
	w, err := r.q.WatchWorkers(ctxT(t, 30*time.Second), &rbeev1.WatchWorkersRequest{HiveId: r.hiveID})
	if err != nil {
		t.Fatal(err)
	}
	ready, err := r.spawnReady(ctxT(t, 30*time.Second), "flaky")
	if err != nil {
		t.Fatal(err)
	}
	body := `{"model":"flaky","prompt":"hi","max_tokens":1}`
	resp, err := http.Post(fmt.Sprintf("http://127.0.0.1:%d/v1/completions", ready.GetPort()), "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	ev := watchUntil(t, w, "UNHEALTHY", isState(wid, rbeev1.WorkerState_WORKER_STATE_UNHEALTHY))
	if !strings.Contains(ev.GetWorker().GetStatusMessage(), "503") {
		t.Errorf("UNHEALTHY with status_message %q, want the failed health answer", ev.GetWorker().GetStatusMessage())
	}
	ev = watchUntil(t, w, "REMOVED", func(ev *rbeev1.WatchWorkersResponse) bool {
		return ev.GetType() == rbeev1.WatchEventType_WATCH_EVENT_TYPE_REMOVED && ev.GetWorker().GetWorkerId() == wid
	})
	if !strings.Contains(ev.GetReason(), "unhealthy_timeout 1s") {
		t.Errorf("REMOVED reason %q does not say it stayed unhealthy too long", ev.GetReason())
	}
	nothingLeft(t, wid)
}

// kill -9 of the hive while a server loads: the load completes, the worker turns READY, and a new
// hive deletes it by the same proof; nothing is left.
func TestShimSurvivesHiveKillDuringLoad(t *testing.T) {
	_, addr := startQueen(t)
	r := newCatalogRig(t, addr, "hl", `models:
  slow:
    cmd: ["${SERVER}", "--port", "${PORT}", "--load-time", "1500ms"]
`)
	w, err := r.q.WatchWorkers(ctxT(t, 30*time.Second), &rbeev1.WatchWorkersRequest{HiveId: r.hiveID})
	if err != nil {
		t.Fatal(err)
	}
	spawned, err := r.q.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{Model: "slow", WorkerId: r.wid})
	if err != nil {
		t.Fatal(err)
	}
	r.hive.stop(syscall.SIGKILL, 10*time.Second)
	ev := watchUntil(t, w, "READY", isState(r.wid, rbeev1.WorkerState_WORKER_STATE_READY))
	if ev.GetWorker().GetPid() != spawned.GetWorker().GetPid() {
		t.Fatalf("READY worker has PID %d, spawned as %d", ev.GetWorker().GetPid(), spawned.GetWorker().GetPid())
	}
	r.replaceHive()
	r.deleteWorker(ctxT(t, 30*time.Second), nil, rbeev1.DeleteOutcome_DELETE_OUTCOME_EXITED)
	nothingLeft(t, r.wid)
}

// A queen restarted while a served model is READY relearns it from the shim's heartbeats, same PID.
func TestShimQueenRestart(t *testing.T) {
	q1, addr := startQueen(t, "--heartbeat-interval", "200ms")
	r := newCatalogRig(t, addr, "qr", `models:
  tiny:
    cmd: ["${SERVER}", "--port", "${PORT}"]
    concurrency: 2
`)
	q, wid := r.q, r.wid
	spawned, err := r.spawnReady(ctxT(t, 30*time.Second), "tiny")
	if err != nil {
		t.Fatal(err)
	}
	q1.stop(syscall.SIGKILL, 10*time.Second)
	newID := start(t, "queen", "--http-listen", "off", "--listen", addr, "--heartbeat-interval", "200ms").awaitAction("queen_start")["queen_id"]
	w, err := q.WatchWorkers(ctxT(t, 30*time.Second), &rbeev1.WatchWorkersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	ev := watchUntil(t, w, "worker relearned READY", isState(wid, rbeev1.WorkerState_WORKER_STATE_READY))
	got := ev.GetWorker()
	if got.GetPid() != spawned.GetPid() || got.GetProcessStartTime() != spawned.GetProcessStartTime() ||
		got.GetConcurrency() != 2 || got.GetModel() != "tiny" {
		t.Fatalf("relearned %v; want PID %d, concurrency 2, model tiny", got, spawned.GetPid())
	}
	// The new queen learns the hive and its catalog too, and can delete the worker.
	r.hive.await("registration with the new queen", func(m map[string]any) bool {
		return m["action"] == "hive_registered" && m["queen_id"] == newID
	})
	hs, err := q.ListHives(ctxT(t, 5*time.Second), &rbeev1.ListHivesRequest{})
	if err != nil || len(hs.GetHives()) != 1 || len(hs.GetHives()[0].GetModels()) != 1 {
		t.Fatalf("ListHives on the new queen = %v, %v; want the hive with its one model", hs, err)
	}
	r.deleteWorker(ctxT(t, 30*time.Second), nil, rbeev1.DeleteOutcome_DELETE_OUTCOME_EXITED)
	nothingLeft(t, wid)
}

// With a cluster token, worker-shim beats with the worker's own token, and the server it starts
// gets neither that token nor the cluster's.
func TestShimWithClusterToken(t *testing.T) {
	tf := tokenFile(t)
	_, addr := startQueen(t, "--token-file", tf)
	r := newCatalogRig(t, addr, "tk", `models:
  tiny:
    cmd: ["${SERVER}", "--port", "${PORT}"]
`, "--token-file", tf)
	w, err := r.spawnReady(withToken(t, testToken), "tiny")
	if err != nil {
		t.Fatalf("SpawnWorker: %v (the shim must beat with its worker token)", err)
	}
	shim := int(w.GetPid())
	senv, _ := os.ReadFile("/proc/" + strconv.Itoa(shim) + "/environ")
	if !strings.Contains(string(senv), "RBEE_WORKER_TOKEN=") {
		t.Fatal("the shim was not handed its worker token")
	}
	env, _ := os.ReadFile("/proc/" + strconv.Itoa(serverOf(t, shim)) + "/environ")
	if strings.Contains(string(env), "RBEE_WORKER_TOKEN=") || strings.Contains(string(env), testToken) {
		t.Fatal("the server inherited a token")
	}
	r.deleteWorker(withToken(t, testToken), nil, rbeev1.DeleteOutcome_DELETE_OUTCOME_EXITED)
	nothingLeft(t, r.wid)
}

// A model whose catalog allows a long load is waited for past the queen's --start-timeout: its
// load_timeout is the bound, not the queen's default.
func TestCatalogLoadOutlastsStartTimeout(t *testing.T) {
	_, addr := startQueen(t, "--start-timeout", "1s")
	r := newCatalogRig(t, addr, "lo", `models:
  slow:
    cmd: ["${SERVER}", "--port", "${PORT}", "--load-time", "2500ms"]
    load_timeout: 1m
`)
	w, err := r.spawnReady(ctxT(t, 30*time.Second), "slow")
	if err != nil || w.GetState() != rbeev1.WorkerState_WORKER_STATE_READY {
		t.Fatalf("SpawnWorker of a model loading 2.5s with --start-timeout 1s = %v, %v; want READY", w, err)
	}
	r.deleteWorker(ctxT(t, 30*time.Second), nil, rbeev1.DeleteOutcome_DELETE_OUTCOME_EXITED)
	nothingLeft(t, r.wid)
}
