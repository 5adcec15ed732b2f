package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

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
		// One file per worker life: rbee-worker-<id>.<spawn time>.log.
		files, _ := filepath.Glob(filepath.Join(logDir, "rbee-worker-"+id+".*.log"))
		if len(files) != 1 {
			t.Fatalf("worker %s has %d log files in %s, want 1", id, len(files), logDir)
		}
		f, err := os.OpenFile(files[0], os.O_WRONLY|os.O_APPEND, 0)
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

// holdPreface opens n connections to addr that send only the first line of the HTTP/2 preface and
// hold; they are closed when the test ends.
func holdPreface(t *testing.T, addr string, n int) {
	t.Helper()
	for range n {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if _, err := c.Write([]byte("PRI * HTTP/2.0\r\n")); err != nil {
			t.Fatal(err)
		}
	}
}

// TestShutdownWithHeldConnections: 50 connections that sent half an HTTP/2 preface and hold do
// not delay the queen's or the hive's exit after SIGTERM past its shutdown bound (5s with the
// default flags), and a call on a connection that was open before SIGTERM is refused as
// UNAVAILABLE once the shutdown began (health says NOT_SERVING), rather than served.
func TestShutdownWithHeldConnections(t *testing.T) {
	q, addr := startQueen(t)
	hid := uniqueID("held")
	h, hiveAddr := startHive(t, addr, hid)
	_, qconn := dial(t, addr)
	qc := rbeev1.NewQueenServiceClient(qconn)
	hconn, err := grpc.NewClient(hiveAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer hconn.Close()
	hc := rbeev1.NewHiveServiceClient(hconn)
	for _, tc := range []struct {
		name string
		p    *proc
		addr string
		conn *grpc.ClientConn
		call func() error
	}{
		{"hive", h, hiveAddr, hconn, func() error {
			_, err := hc.Delete(ctxT(t, 5*time.Second), &rbeev1.DeleteRequest{WorkerId: "nobody", Pid: 99999})
			return err
		}},
		{"queen", q, addr, qconn, func() error {
			_, err := qc.ListWorkers(ctxT(t, 5*time.Second), &rbeev1.ListWorkersRequest{})
			return err
		}},
	} {
		if err := tc.call(); status.Code(err) == codes.Unavailable {
			t.Fatalf("%s: call before shutdown: %v", tc.name, err)
		}
		wctx, stopWatch := context.WithCancel(t.Context())
		health, err := healthpb.NewHealthClient(tc.conn).Watch(wctx, &healthpb.HealthCheckRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if r, err := health.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("%s: health before shutdown: %v, %v", tc.name, r, err)
		}
		holdPreface(t, tc.addr, 50)
		begin := time.Now()
		if err := tc.p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if r, err := health.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
			t.Fatalf("%s: health after SIGTERM: %v, %v; want NOT_SERVING", tc.name, r, err)
		}
		stopWatch() // a prober that saw NOT_SERVING goes away
		if err := tc.call(); status.Code(err) != codes.Unavailable {
			t.Errorf("%s: a call on an open connection while shutting down: %v, want UNAVAILABLE", tc.name, err)
		}
		// The handshake timeout is 10s and the clients hold for the whole test: the server must
		// neither wait for them nor for that timeout.
		if code := tc.p.exitCode(30 * time.Second); code != 0 {
			t.Errorf("%s exited with %d", tc.name, code)
		}
		took := time.Since(begin)
		t.Logf("%s exited %v after SIGTERM", tc.name, took.Round(time.Millisecond))
		if took > 7*time.Second {
			t.Errorf("%s took %v to exit after SIGTERM with 50 held connections, want within its 5s bound", tc.name, took.Round(time.Millisecond))
		}
	}
}

// TestCLIErrorsSayWhoIsDown: with the queen up and a hive down, rbee says the hive cannot be
// reached (exit 4), not the queen; with the queen down it says the queen. Usage mistakes that
// used to pass (an unknown subcommand, a zero or negative --timeout) exit 2.
func TestCLIErrorsSayWhoIsDown(t *testing.T) {
	queen, hid := cliFleet(t)
	id := uniqueID("w")
	rbeeOK(t, queen, "worker", "spawn", "--model", "m", "--id", id, "--hive", hid, "--wait")
	dead := freeAddr(t)

	for _, tc := range []struct {
		name      string
		queen     string
		args      []string
		code      int
		want, not string
	}{
		{"unknown worker subcommand", queen, []string{"worker", "bogus"}, 2, `unknown command "bogus"`, ""},
		{"unknown hive subcommand", queen, []string{"hive", "rmm"}, 2, `unknown command "rmm"`, ""},
		{"zero timeout", queen, []string{"worker", "ls", "--timeout", "0"}, 2, "--timeout", ""},
		{"negative timeout", queen, []string{"status", "--timeout", "-5s"}, 2, "--timeout", ""},
		{"negative spawn timeout", queen, []string{"worker", "spawn", "--model", "m", "--timeout", "-1s"}, 2, "--timeout", ""},
		{"queen down", dead, []string{"worker", "rm", id}, 4, "cannot reach the queen at " + dead, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := rbee(t, tc.queen, tc.args...)
			if r.code != tc.code || !strings.Contains(r.stderr, tc.want) {
				t.Fatalf("want exit %d and %q; %v", tc.code, tc.want, r)
			}
		})
	}

	// The hive goes away; the queen stays.
	for _, pid := range pidsWithArg("hive", "--hive-id\x00"+hid) {
		_ = unix.Kill(pid, unix.SIGKILL)
		awaitExit(t, pid, 10*time.Second)
	}
	for _, args := range [][]string{{"worker", "rm", id}, {"worker", "spawn", "--model", "m", "--hive", hid}} {
		r := rbee(t, queen, args...)
		if r.code != 4 || strings.Contains(r.stderr, "cannot reach the queen") || !strings.Contains(r.stderr, "cannot reach hive "+hid) {
			t.Errorf("rbee %v with its hive down: want exit 4 saying the queen cannot reach hive %s; %v", args, hid, r)
		}
	}
	rbeeOK(t, queen, "status")
}

// inNetns prefixes a command so that it runs in a network namespace of its own (unshare -rn)
// whose loopback also carries 10.1.2.3: an address that is not loopback, reachable only there.
func inNetns(t *testing.T, argv ...string) []string {
	t.Helper()
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Skip("no unshare here")
	}
	if err := exec.Command("unshare", "-rn", "true").Run(); err != nil {
		t.Skipf("cannot make a network namespace here: %v", err)
	}
	return append([]string{"unshare", "-rn", "sh", "-c", `ip link set lo up && ip addr add 10.1.2.3/32 dev lo && exec "$@"`, "sh"}, argv...)
}

// TestTokenInClearIsWarnedAbout: a queen serving beyond loopback with a cluster token and no TLS,
// and rbee sending its token to such a queen, say loudly that the token crosses the network in
// clear text (the README's security model says so too); on loopback they say nothing.
func TestTokenInClearIsWarnedAbout(t *testing.T) {
	tok := tokenFile(t)
	argv := inNetns(t, filepath.Join(binDir, "queen"), "--http-listen", "off", "--listen", "10.1.2.3:7833", "--token-file", tok)
	q := &proc{t: t, name: "queen", done: make(chan struct{})}
	q.cond = sync.NewCond(&q.mu)
	q.cmd = exec.Command(argv[0], argv[1:]...)
	stderr, err := q.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := q.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go q.read(stderr)
	go func() { _ = q.cmd.Wait(); close(q.done) }()
	t.Cleanup(func() { q.stop(syscall.SIGTERM, 10*time.Second) })
	w := q.awaitAction("token_in_clear")
	if w["level"] != "warn" || !strings.Contains(w["msg"].(string), "clear text") {
		t.Errorf("warning line: %v", w)
	}
	q.awaitAction("queen_start")

	// rbee in a namespace of its own: 10.1.2.3 there has no queen, so the call fails at once.
	argv = inNetns(t, rbeeBinary(t), "--queen", "10.1.2.3:7833", "--timeout", "5s", "status")
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(rbeeEnv("10.1.2.3:7833"), "RBEE_TOKEN="+testToken)
	out, _ := cmd.CombinedOutput()
	if !strings.Contains(string(out), "rbee: warning: --queen 10.1.2.3:7833 is not a loopback address and TLS is off") {
		t.Errorf("rbee sending a token to 10.1.2.3 without TLS did not warn:\n%s", out)
	}
	if strings.Contains(string(out), testToken) {
		t.Errorf("rbee printed the token:\n%s", out)
	}

	// On loopback: no warning.
	_, addr := startQueen(t, "--token-file", tok)
	cmd = exec.Command(rbeeBinary(t), "--queen", addr, "status")
	cmd.Env = append(rbeeEnv(addr), "RBEE_TOKEN="+testToken)
	if out, err := cmd.CombinedOutput(); err != nil || strings.Contains(string(out), "warning") {
		t.Errorf("rbee on loopback: %v\n%s", err, out)
	}
}

// repeatedKeys returns the keys that occur more than once in the JSON object line.
func repeatedKeys(line []byte) ([]string, error) {
	dec := json.NewDecoder(bytes.NewReader(line))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, fmt.Errorf("not a JSON object: %s", line)
	}
	seen := map[string]bool{}
	var dup []string
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		k := tok.(string)
		if seen[k] {
			dup = append(dup, k)
		}
		seen[k] = true
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, err
		}
	}
	return dup, nil
}

// TestLogLinesHaveNoRepeatedKeys: over a spawn, a delete, a refused delete and a worker exiting
// on its own, no JSON log line of the queen or the hive carries a key twice (log processors keep
// one of them, or reject the line).
func TestLogLinesHaveNoRepeatedKeys(t *testing.T) {
	q, addr := startQueen(t)
	hid := uniqueID("keys")
	cleanupWorkers(t, hid)
	h, hiveAddr := startHive(t, addr, hid)
	qc, _ := dial(t, addr)
	for _, id := range []string{"k1", "k2"} {
		if _, err := qc.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: id, HiveId: hid, WaitReady: true}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := qc.DeleteWorker(ctxT(t, 30*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: "k1"}); err != nil {
		t.Fatal(err)
	}
	h.awaitAction("worker_delete_complete")
	// A Delete the hive refuses: the PID is not that worker's.
	if _, err := hiveClient(t, hiveAddr).Delete(ctxT(t, 10*time.Second), &rbeev1.DeleteRequest{WorkerId: "k9", Pid: int32(os.Getpid())}); err == nil {
		t.Fatal("the hive signalled the test process")
	}
	h.awaitAction("worker_delete_refused")
	k2, err := qc.GetWorker(ctxT(t, 5*time.Second), &rbeev1.GetWorkerRequest{WorkerId: "k2"})
	if err != nil {
		t.Fatal(err)
	}
	_ = unix.Kill(int(k2.GetWorker().GetPid()), unix.SIGKILL)
	q.awaitAction("worker_exited")

	for _, p := range []*proc{q, h} {
		p.mu.Lock()
		raw := bytes.Split(bytes.TrimSpace(p.raw.Bytes()), []byte("\n"))
		p.mu.Unlock()
		bad := 0
		for _, line := range raw {
			dup, err := repeatedKeys(line)
			if err != nil {
				t.Errorf("%s: %v", p.name, err)
				continue
			}
			if len(dup) > 0 {
				bad++
				t.Errorf("%s: keys %v repeated in %s", p.name, dup, line)
			}
		}
		t.Logf("%s: %d of %d lines with repeated keys", p.name, bad, len(raw))
	}
	noWorkersLeft(t, hid)
}

// TestLogFormatFollowsStderr: the programs log to stderr, so stderr decides JSON or console:
// stdout on a terminal and stderr to a pipe is JSON; stderr on a terminal is console lines.
func TestLogFormatFollowsStderr(t *testing.T) {
	for _, tc := range []struct {
		name      string
		stderrTTY bool
		wantJSON  bool
	}{
		{"stdout a terminal, stderr a pipe", false, true},
		{"stderr a terminal", true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			master, slave := openClosablePTY(t)
			out := collect(master)
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			piped := collect(r)
			cmd := exec.Command(filepath.Join(binDir, "queen"), "--http-listen", "off", "--listen", "127.0.0.1:0")
			cmd.Stdout, cmd.Stderr = slave, w
			logs := piped
			if tc.stderrTTY {
				cmd.Stdout, cmd.Stderr = w, slave
				logs = out
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			w.Close()
			defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
			logs.await(t, "queen serving", 20*time.Second)
			first, _, _ := strings.Cut(logs.String(), "\n")
			first = strings.TrimSpace(first)
			isJSON := json.Valid([]byte(first))
			if isJSON != tc.wantJSON {
				t.Errorf("first log line %q: JSON %t, want %t", first, isJSON, tc.wantJSON)
			}
		})
	}
}

// TestWorkerHost: a hive started with --worker-host 127.0.0.2 binds its workers' ports there
// (handed over, or bound by the worker itself from $RBEE_WORKER_HOST with --no-socket-handoff),
// not on 127.0.0.1, and the queen lists each worker with address 127.0.0.2; a default hive's
// workers stay on 127.0.0.1 with no address.
func TestWorkerHost(t *testing.T) {
	_, addr := startQueen(t)
	qc, _ := dial(t, addr)
	for _, tc := range []struct {
		name     string
		args     []string
		bindHost string
		address  string
	}{
		{"socket handed over", []string{"--worker-host", "127.0.0.2"}, "127.0.0.2", "127.0.0.2"},
		{"worker binds itself", []string{"--worker-host", "127.0.0.2", "--no-socket-handoff"}, "127.0.0.2", "127.0.0.2"},
		{"default", nil, "127.0.0.1", "127.0.0.1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hid := uniqueID("wh")
			cleanupWorkers(t, hid)
			startHive(t, addr, hid, tc.args...)
			r, err := qc.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{Model: "m", HiveId: hid, WaitReady: true})
			if err != nil {
				t.Fatal(err)
			}
			w := r.GetWorker()
			if w.GetAddress() != tc.address {
				t.Errorf("SpawnWorker answered address %q, want %q", w.GetAddress(), tc.address)
			}
			port := strconv.Itoa(int(w.GetPort()))
			c, err := net.DialTimeout("tcp", net.JoinHostPort(tc.bindHost, port), 5*time.Second)
			if err != nil {
				t.Errorf("worker not reachable at %s:%s: %v", tc.bindHost, port, err)
			} else {
				c.Close()
			}
			if tc.bindHost != "127.0.0.1" {
				if c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", port), 5*time.Second); err == nil {
					c.Close()
					t.Errorf("worker also reachable at 127.0.0.1:%s; want it bound on %s only", port, tc.bindHost)
				}
			}
			// The worker's own beats keep the address (a beat is the queen's only source after a restart).
			l, err := qc.ListWorkers(ctxT(t, 5*time.Second), &rbeev1.ListWorkersRequest{HiveId: hid})
			if err != nil || len(l.GetWorkers()) != 1 || l.GetWorkers()[0].GetAddress() != tc.address {
				t.Errorf("ListWorkers = %v, %v; want one worker with address %q", l, err, tc.address)
			}
			if r := rbeeOK(t, addr, "worker", "get", w.GetWorkerId()); !strings.Contains(r.stdout, "ADDRESS") || !strings.Contains(r.stdout, tc.address) {
				t.Errorf("rbee worker get does not show the address %s:\n%s", tc.address, r.stdout)
			}
			if _, err := qc.DeleteWorker(ctxT(t, 30*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: w.GetWorkerId()}); err != nil {
				t.Fatal(err)
			}
			noWorkersLeft(t, hid)
		})
	}
}

// TestPlacementByRoom: a spawn without --hive goes to a hive that can take the worker, not to the
// least-loaded one that cannot: hive "one-port" has its only port in use, "capped" is at its
// --max-workers, "roomy" has more workers than both but room. With every hive full the spawn is
// RESOURCE_EXHAUSTED naming each hive and why.
func TestPlacementByRoom(t *testing.T) {
	_, addr := startQueen(t)
	qc, _ := dial(t, addr)
	_, port, _ := net.SplitHostPort(freeAddr(t))
	onePort, capped, roomy := uniqueID("one"), uniqueID("cap"), uniqueID("roomy")
	cleanupWorkers(t, onePort, capped, roomy)
	startHive(t, addr, onePort, "--port-range", port+"-"+port)
	startHive(t, addr, capped, "--max-workers", "1")
	startHive(t, addr, roomy, "--max-workers", "4")
	spawn := func(hive string) (*rbeev1.Worker, error) {
		r, err := qc.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{Model: "m", HiveId: hive, WaitReady: true})
		return r.GetWorker(), err
	}
	for _, h := range []string{onePort, capped, roomy, roomy} {
		if _, err := spawn(h); err != nil {
			t.Fatalf("spawn on %s: %v", h, err)
		}
	}
	for range 2 {
		w, err := spawn("")
		if err != nil {
			t.Fatalf("spawn without a hive: %v", err)
		}
		if w.GetHiveId() != roomy {
			t.Errorf("spawn without a hive went to %s, want %s (the only one with room)", w.GetHiveId(), roomy)
		}
	}
	// roomy is now at its --max-workers too.
	_, err := spawn("")
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("spawn with every hive full: %v, want RESOURCE_EXHAUSTED", err)
	}
	for _, h := range []string{onePort, capped, roomy} {
		if !strings.Contains(status.Convert(err).Message(), "hive "+h+": no free worker slot") {
			t.Errorf("the refusal does not say why hive %s was passed over: %v", h, err)
		}
	}
	l, err := qc.ListWorkers(ctxT(t, 5*time.Second), &rbeev1.ListWorkersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range l.GetWorkers() {
		if _, err := qc.DeleteWorker(ctxT(t, 30*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: w.GetWorkerId()}); err != nil {
			t.Error(err)
		}
	}
	noWorkersLeft(t, onePort, capped, roomy)
}

// awaitHiveGone waits until the queen no longer lists hive id (it stopped beating and expired).
// The registry's expiry has no event a client can watch, so this polls ListHives.
func awaitHiveGone(t *testing.T, qc rbeev1.QueenServiceClient, id string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		l, err := qc.ListHives(ctxT(t, 5*time.Second), &rbeev1.ListHivesRequest{})
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, h := range l.GetHives() {
			found = found || h.GetHiveId() == id
		}
		if !found {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("hive %s still listed 20s after it stopped", id)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestWorkersOfAHiveBackUnderAnotherID: a hive stops and expires from the queen, and comes back on
// the same address under another id (a new --hive-id, or a renamed host). Its old workers keep
// running and beating; while no hive is at that address, deleting one says what the operator can
// do (FAILED_PRECONDITION); once the new hive is there, the queen deletes them through it.
func TestWorkersOfAHiveBackUnderAnotherID(t *testing.T) {
	_, addr := startQueen(t, "--heartbeat-interval", "200ms", "--expire-after", "1s")
	qc, _ := dial(t, addr)
	old, renamed := uniqueID("advh1"), uniqueID("advh9")
	cleanupWorkers(t, old, renamed)
	h1, hiveAddr := startHive(t, addr, old)
	pids := map[string]int32{}
	for _, id := range []string{"s1", "s2"} {
		r, err := qc.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: id, HiveId: old, WaitReady: true})
		if err != nil {
			t.Fatal(err)
		}
		pids[id] = r.GetWorker().GetPid()
	}
	h1.stop(syscall.SIGTERM, 10*time.Second)
	awaitHiveGone(t, qc, old)

	_, err := qc.DeleteWorker(ctxT(t, 30*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: "s2"})
	if msg := status.Convert(err).Message(); status.Code(err) != codes.FailedPrecondition ||
		!strings.Contains(msg, "start a hive at "+hiveAddr) || !strings.Contains(msg, fmt.Sprint(pids["s2"])) {
		t.Errorf("delete with no hive at the old address: %v; want FAILED_PRECONDITION saying to start a hive at %s, naming PID %d", err, hiveAddr, pids["s2"])
	}

	start(t, "hive", "--listen", hiveAddr, "--hive-id", renamed, "--queen", addr, "--log-dir", t.TempDir()).awaitAction("hive_registered")
	for _, id := range []string{"s1", "s2"} {
		if !alive(int(pids[id])) {
			t.Fatalf("worker %s (PID %d) died with its hive", id, pids[id])
		}
		d, err := qc.DeleteWorker(ctxT(t, 30*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: id, GracePeriod: durationpbNew(5 * time.Second)})
		if err != nil || d.GetOutcome() != rbeev1.DeleteOutcome_DELETE_OUTCOME_EXITED {
			t.Errorf("delete %s through the hive now at %s: %v, %v; want EXITED", id, hiveAddr, d, err)
		}
		if alive(int(pids[id])) {
			t.Errorf("worker %s (PID %d) still running after its delete", id, pids[id])
		}
	}
	noWorkersLeft(t, old, renamed)
}
