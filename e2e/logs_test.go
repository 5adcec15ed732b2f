package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/auth"
)

// chattyWorker is a worker binary that prints a few lines of its own, then becomes worker-stub.
func chattyWorker(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "chatty-worker")
	script := "#!/bin/sh\nfor i in 1 2 3; do echo \"hello $i from $RBEE_WORKER_ID\"; done\nexec " +
		filepath.Join(binDir, "worker-stub") + " \"$@\"\n"
	if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

// waitExit waits for a started rbee to exit by itself and returns its status.
func (s *lineStream) waitExit(d time.Duration) int {
	s.t.Helper()
	timeout := time.After(d)
	lines := s.lines
	for {
		select {
		case _, ok := <-lines:
			if !ok {
				lines = nil
			}
		case <-s.done:
			return s.cmd.ProcessState.ExitCode()
		case <-timeout:
			s.t.Fatalf("rbee did not exit within %v", d)
		}
	}
}

// TestCLIWorkerLogs: `rbee worker logs` shows a worker's output through the queen and its hive:
// the tail, a follow that sees new output and ends by itself when the worker is gone, and the
// log of a deleted worker.
func TestCLIWorkerLogs(t *testing.T) {
	queen, hive := cliFleet(t, "--worker-binary", chattyWorker(t))
	id := uniqueID("w")
	rbeeOK(t, queen, "worker", "spawn", "--model", "m", "--id", id, "--wait")

	// The queen may hear READY before worker-stub has logged it and its heartbeat's first answer:
	// follow until the log has both, after which it writes nothing until it is stopped.
	f := startRbee(t, queen, "worker", "logs", id, "--follow")
	ready, answered := false, false
	f.await("the worker's ready and heartbeat lines", func(l string) bool {
		ready = ready || strings.Contains(l, `"worker_ready"`)
		answered = answered || strings.Contains(l, "heartbeat stream answered")
		return ready && answered
	})

	all := rbeeOK(t, queen, "worker", "logs", id).stdout
	for i := 1; i <= 3; i++ {
		if !strings.Contains(all, fmt.Sprintf("hello %d from %s\n", i, id)) {
			t.Fatalf("rbee worker logs: no line %d of the worker's own output:\n%s", i, all)
		}
	}
	tail := rbeeOK(t, queen, "worker", "logs", id, "--tail", "2").stdout
	if n := strings.Count(tail, "\n"); n != 2 || !strings.HasSuffix(all, tail) {
		t.Errorf("--tail 2 printed %d lines, want the last 2 of the log:\n%s\nthe log:\n%s", n, tail, all)
	}

	// The follow sees what the worker writes when it is deleted, and ends by itself after.
	rbeeOK(t, queen, "worker", "rm", id)
	f.await("the worker's last words", func(l string) bool { return strings.Contains(l, `"worker_stopped"`) })
	if code := f.waitExit(20 * time.Second); code != 0 {
		t.Errorf("--follow after the worker was deleted: exit %d, want 0", code)
	}

	// Deleted, and still readable.
	after := rbeeOK(t, queen, "worker", "logs", id).stdout
	if !strings.Contains(after, "hello 1 from "+id) || !strings.Contains(after, `"worker_stopped"`) {
		t.Errorf("log of the deleted worker:\n%s", after)
	}

	// Ctrl-C ends a follow of a live worker, with success.
	id2 := uniqueID("w")
	rbeeOK(t, queen, "worker", "spawn", "--model", "m", "--id", id2, "--wait")
	f2 := startRbee(t, queen, "worker", "logs", id2, "-f")
	f2.await("the worker's output", func(l string) bool { return strings.Contains(l, "hello 3 from "+id2) })
	if code := f2.interrupt(); code != 0 {
		t.Errorf("Ctrl-C on --follow: exit %d, want 0", code)
	}
	rbeeOK(t, queen, "worker", "rm", id2)

	for _, tc := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"worker", "logs", "nobody-here"}, 3, "not known"},
		{[]string{"worker", "logs", "Bad/Id"}, 6, "worker_id"},
		{[]string{"worker", "logs", id, "--tail", "0"}, 2, "--tail"},
		{[]string{"worker", "logs", id, "-o", "json"}, 2, "-o json"},
	} {
		if r := rbee(t, queen, tc.args...); r.code != tc.code || !strings.Contains(r.stderr, tc.msg) {
			t.Errorf("want exit %d mentioning %q; %v", tc.code, tc.msg, r)
		}
	}
	noWorkersLeft(t, hive)
}

// TestLogsOfWorkerThatFailedToStart: the reason a worker died while loading stays readable after
// the queen removed it, and a new worker under the same id does not show it.
func TestLogsOfWorkerThatFailedToStart(t *testing.T) {
	bad := filepath.Join(t.TempDir(), "bad-worker")
	if err := os.WriteFile(bad, []byte("#!/bin/sh\necho 'loading llama: model file not found' >&2\nexit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	queen, hive := cliFleet(t, "--worker-binary", bad)
	r := rbee(t, queen, "worker", "spawn", "--model", "m", "--id", "d1", "--wait")
	if r.code != 11 {
		t.Fatalf("spawn of a failing worker: %v", r)
	}
	if out := rbeeOK(t, queen, "worker", "logs", "d1").stdout; out != "loading llama: model file not found\n" {
		t.Errorf("log of the failed worker: %q", out)
	}
	noWorkersLeft(t, hive)
}

// TestLogsNeedTheClusterToken: WorkerLogs (queen) and Logs (hive) open only with the cluster
// token; a worker's own token and no token are refused.
func TestLogsNeedTheClusterToken(t *testing.T) {
	tf := tokenFile(t)
	_, addr := startQueen(t, "--token-file", tf)
	hid := uniqueID("hl")
	cleanupWorkers(t, hid)
	_, haddr := startHive(t, addr, hid, "--token-file", tf)
	q, _ := dial(t, addr)
	if _, err := q.SpawnWorker(withToken(t, testToken), &rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: "lw", WaitReady: true}); err != nil {
		t.Fatal(err)
	}
	h := hiveClient(t, haddr)
	read := func(tok string, hive bool) ([]byte, error) {
		ctx := ctxT(t, 20*time.Second)
		if tok != "" {
			ctx = withToken(t, tok)
		}
		var out bytes.Buffer
		var recv func() ([]byte, error)
		if hive {
			st, err := h.Logs(ctx, &rbeev1.LogsRequest{WorkerId: "lw"})
			if err != nil {
				return nil, err
			}
			recv = func() ([]byte, error) { r, err := st.Recv(); return r.GetData(), err }
		} else {
			st, err := q.WorkerLogs(ctx, &rbeev1.WorkerLogsRequest{WorkerId: "lw"})
			if err != nil {
				return nil, err
			}
			recv = func() ([]byte, error) { r, err := st.Recv(); return r.GetData(), err }
		}
		for {
			b, err := recv()
			if err != nil {
				if errors.Is(err, io.EOF) {
					return out.Bytes(), nil
				}
				return out.Bytes(), err
			}
			out.Write(b)
		}
	}
	workerTok := auth.WorkerToken(testToken, "lw")
	for _, hive := range []bool{false, true} {
		name := "queen WorkerLogs"
		if hive {
			name = "hive Logs"
		}
		if out, err := read(testToken, hive); err != nil || !bytes.Contains(out, []byte(`"worker_start"`)) {
			t.Errorf("%s with the cluster token: %v, %q", name, err, out)
		}
		if out, err := read(workerTok, hive); status.Code(err) != codes.PermissionDenied || len(out) != 0 {
			t.Errorf("%s with the worker's own token: %v, %d bytes; want PERMISSION_DENIED and nothing", name, err, len(out))
		}
		if out, err := read("", hive); status.Code(err) != codes.Unauthenticated || len(out) != 0 {
			t.Errorf("%s without a token: %v, %d bytes; want UNAUTHENTICATED and nothing", name, err, len(out))
		}
	}
	if _, err := q.DeleteWorker(withToken(t, testToken), &rbeev1.DeleteWorkerRequest{WorkerId: "lw"}); err != nil {
		t.Fatal(err)
	}
	noWorkersLeft(t, hid)
}

// TestHiveLogRetention: with --log-keep-exited 1, the log of an exited worker is removed once a
// newer one exists; the newest stays readable.
func TestHiveLogRetention(t *testing.T) {
	queen, hive := cliFleet(t, "--worker-binary", chattyWorker(t), "--log-keep-exited", "1")
	for _, id := range []string{"r1", "r2"} {
		rbeeOK(t, queen, "worker", "spawn", "--model", "m", "--id", id, "--wait")
		rbeeOK(t, queen, "worker", "rm", id)
	}
	if r := rbee(t, queen, "worker", "logs", "r2"); r.code != 0 || !strings.Contains(r.stdout, "hello 1 from r2") {
		t.Errorf("newest exited worker's log: %v", r)
	}
	// r1's log goes when r2 exits: the sweep runs on each exit.
	if r := rbee(t, queen, "worker", "logs", "r1"); r.code != 3 || !strings.Contains(r.stderr, "no log of worker") {
		t.Errorf("log of r1, beyond --log-keep-exited 1: %v; want exit 3", r)
	}
	noWorkersLeft(t, hive)
}

// TestHiveDevices: with an nvidia-smi on PATH (a fake: no GPU here) the hive reports its GPUs with
// their memory, refuses a spawn on a GPU it lacks, and shows each worker only its own device.
func TestHiveDevices(t *testing.T) {
	dir := t.TempDir()
	smi := "#!/bin/sh\n" +
		"[ \"$1 $2\" = '--query-gpu=index,name,memory.total,memory.used --format=csv,noheader,nounits' ] || { echo bad args \"$@\" >&2; exit 2; }\n" +
		"echo '0, Tesla T4, 15360, 512'\necho '1, Tesla T4, 15360, 0'\n"
	if err := os.WriteFile(filepath.Join(dir, "nvidia-smi"), []byte(smi), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+string(filepath.ListSeparator)+os.Getenv("PATH")) // the hive inherits it
	queen, hive := cliFleet(t)
	q, _ := dial(t, queen)

	hs, err := q.ListHives(ctxT(t, 10*time.Second), &rbeev1.ListHivesRequest{})
	if err != nil || len(hs.GetHives()) != 1 {
		t.Fatalf("ListHives = %v, %v", hs, err)
	}
	h := hs.GetHives()[0]
	if got := strings.Join(h.GetDevices(), ","); got != "cpu,cuda:0,cuda:1" {
		t.Errorf("devices %q, want cpu,cuda:0,cuda:1", got)
	}
	if len(h.GetDeviceInfo()) != 3 || h.GetDeviceInfo()[1].GetDescription() != "Tesla T4" ||
		h.GetDeviceInfo()[1].GetMemoryTotalBytes() != 15360<<20 || h.GetDeviceInfo()[1].GetMemoryUsedBytes() != 512<<20 {
		t.Errorf("device_info %v", h.GetDeviceInfo())
	}
	if ls := rbeeOK(t, queen, "hive", "ls").stdout; !strings.Contains(ls, "cuda:0 0.5/15.0GiB") {
		t.Errorf("rbee hive ls does not show the GPU's memory:\n%s", ls)
	}

	_, err = q.SpawnWorker(ctxT(t, 10*time.Second), &rbeev1.SpawnWorkerRequest{Model: "m", Device: "cuda:7", WorkerId: "g7"})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "cuda:7") || !strings.Contains(err.Error(), "cpu, cuda:0, cuda:1") {
		t.Errorf("spawn on cuda:7 = %v; want FAILED_PRECONDITION naming it and the hive's devices", err)
	}
	if r := rbee(t, queen, "worker", "get", "g7"); r.code != 3 {
		t.Errorf("the refused worker is registered: %v", r)
	}
	for dev, want := range map[string]string{"cuda:0": "CUDA_VISIBLE_DEVICES=0", "cpu": "CUDA_VISIBLE_DEVICES="} {
		id := "g-" + strings.ReplaceAll(dev, ":", "")
		resp, err := q.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{Model: "m", Device: dev, WorkerId: id, WaitReady: true})
		if err != nil {
			t.Fatalf("spawn on %s: %v", dev, err)
		}
		env, err := os.ReadFile("/proc/" + strconv.Itoa(int(resp.GetWorker().GetPid())) + "/environ")
		if err != nil {
			t.Fatal(err)
		}
		vars := strings.Split(string(env), "\x00")
		var cuda []string
		for _, kv := range vars {
			if strings.HasPrefix(kv, "CUDA_VISIBLE_DEVICES=") {
				cuda = append(cuda, kv)
			}
		}
		if len(cuda) != 1 || cuda[0] != want {
			t.Errorf("worker on %s has %q in its environment, want exactly %q", dev, cuda, want)
		}
		rbeeOK(t, queen, "worker", "rm", id)
	}
	noWorkersLeft(t, hive)
}

// TestLogFollowDoesNotHoldShutdown: a follow in progress ends (UNAVAILABLE, exit 4) when the hive
// or the queen is stopped, instead of holding their graceful stop to its timeout.
func TestLogFollowDoesNotHoldShutdown(t *testing.T) {
	for _, who := range []string{"hive", "queen"} {
		t.Run(who, func(t *testing.T) {
			rbeeBinary(t)
			qp, queen := startQueen(t)
			hid := uniqueID("hs")
			cleanupWorkers(t, hid)
			hp, _ := startHive(t, queen, hid, "--worker-binary", chattyWorker(t))
			id := uniqueID("w")
			rbeeOK(t, queen, "worker", "spawn", "--model", "m", "--id", id, "--wait")
			f := startRbee(t, queen, "worker", "logs", id, "--follow")
			f.await("the worker's output", func(l string) bool { return strings.Contains(l, "hello 3 from "+id) })
			p := hp
			if who == "queen" {
				p = qp
			}
			t0 := time.Now()
			p.stop(syscall.SIGTERM, 20*time.Second)
			if took := time.Since(t0); took > 3*time.Second {
				t.Errorf("the %s took %v to stop with a follow open", who, took)
			}
			if strings.Contains(p.raw.String(), "graceful stop timed out") {
				t.Errorf("the %s's graceful stop timed out", who)
			}
			if code := f.waitExit(20 * time.Second); code != 4 {
				t.Errorf("follow when the %s stopped: exit %d, want 4 (unavailable)", who, code)
			}
			// The worker outlives what was stopped; this test's clean-up removes it by PID.
		})
	}
}

// TestReusedIDShowsOnlyItsOwnOutput: a worker id used again after a failure reports its own exit,
// not the previous process's last lines (each life has its own log).
func TestReusedIDShowsOnlyItsOwnOutput(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "once-chatty")
	script := "#!/bin/sh\nif [ -e " + dir + "/ran ]; then exit 4; fi\n: > " + dir + "/ran\n" +
		"echo 'loading llama: model file not found' >&2\nexit 3\n"
	if err := os.WriteFile(bad, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	queen, hive := cliFleet(t, "--worker-binary", bad)
	r := rbee(t, queen, "worker", "spawn", "--model", "m", "--id", "d1", "--wait")
	if r.code != 11 || !strings.Contains(r.stderr, "model file not found") {
		t.Fatalf("first d1: %v", r)
	}
	r = rbee(t, queen, "worker", "spawn", "--model", "m", "--id", "d1", "--wait")
	if r.code != 11 || !strings.Contains(r.stderr, "exit status 4") || strings.Contains(r.stderr, "model file not found") {
		t.Fatalf("second d1 (exits 4 without output): %v; want its own exit, not the first one's output", r)
	}
	if out := rbeeOK(t, queen, "worker", "logs", "d1").stdout; out != "" {
		t.Errorf("logs of the second d1: %q, want empty", out)
	}
	noWorkersLeft(t, hive)
}

// TestLogDirGoneAfterStart: a --log-dir removed while the hive runs is made again at the next
// spawn; one that cannot be made fails the spawn with the reason, not a bare exit status 126.
func TestLogDirGoneAfterStart(t *testing.T) {
	logDir := filepath.Join(t.TempDir(), "logs")
	queen, hive := cliFleet(t, "--log-dir", logDir, "--worker-binary", chattyWorker(t))
	if err := os.RemoveAll(logDir); err != nil {
		t.Fatal(err)
	}
	rbeeOK(t, queen, "worker", "spawn", "--model", "m", "--id", "ld1", "--wait")
	if out := rbeeOK(t, queen, "worker", "logs", "ld1").stdout; !strings.Contains(out, "hello 1 from ld1") {
		t.Errorf("log after the directory was removed: %q", out)
	}
	rbeeOK(t, queen, "worker", "rm", "ld1")

	if err := os.RemoveAll(logDir); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(logDir, nil, 0o644); err != nil { // a file where the directory was
		t.Fatal(err)
	}
	r := rbee(t, queen, "worker", "spawn", "--model", "m", "--id", "ld2", "--wait")
	if r.code != 11 || !strings.Contains(r.stderr, "exit status 126") || !strings.Contains(r.stderr, "cannot give the worker its log file") ||
		!strings.Contains(r.stderr, logDir) {
		t.Errorf("spawn with an unusable log dir: %v; want exit 11 with the reason", r)
	}
	noWorkersLeft(t, hive)
}

// TestLogDirForeignFilesUntouched: the hive caps its workers' logs and leaves everything else in
// --log-dir alone, however big and whatever it is called.
func TestLogDirForeignFilesUntouched(t *testing.T) {
	logDir := t.TempDir()
	big := bytes.Repeat([]byte(strings.Repeat("i", 99)+"\n"), 92_000) // 9.2 MB
	foreign := filepath.Join(logDir, "important.log")
	if err := os.WriteFile(foreign, big, 0o644); err != nil {
		t.Fatal(err)
	}
	chatty := filepath.Join(t.TempDir(), "nine-mb-worker")
	script := "#!/bin/sh\nhead -c 9000000 /dev/zero | tr '\\0' 'x' | fold -w 99\nexec " + filepath.Join(binDir, "worker-stub") + " \"$@\"\n"
	if err := os.WriteFile(chatty, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	queen, hive := cliFleet(t, "--log-dir", logDir, "--worker-binary", chatty)
	rbeeOK(t, queen, "worker", "spawn", "--model", "m", "--id", "big1", "--wait")
	// The cap runs every 2 s; wait (bounded) until it has cut the worker's own log.
	deadline := time.Now().Add(20 * time.Second)
	for {
		ents, _ := os.ReadDir(logDir)
		capped := false
		for _, e := range ents {
			if fi, err := e.Info(); err == nil && e.Name() != "important.log" && fi.Size() > 0 && fi.Size() <= 8<<20 {
				capped = true
			}
		}
		if capped {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the worker's 9 MB log was not capped within 20s: %v", ents)
		}
		time.Sleep(50 * time.Millisecond) // file sizes announce nothing; look again
	}
	if b, err := os.ReadFile(foreign); err != nil || !bytes.Equal(b, big) {
		t.Errorf("important.log was changed (%d bytes, was %d): the hive touched a file it did not create", len(b), len(big))
	}
	rbeeOK(t, queen, "worker", "rm", "big1")
	noWorkersLeft(t, hive)
}
