package e2e

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// openStream starts a streaming chat completion through the queen and returns its reader once the
// first event has arrived (the request is in flight on a worker).
func openStream(t *testing.T, url string, maxTokens int) (*bufio.Reader, func()) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	body := `{"model":"demo","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":` + strconv.Itoa(maxTokens) + `}`
	req, _ := http.NewRequestWithContext(ctx, "POST", url, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		cancel()
		t.Fatalf("stream: %d %s", resp.StatusCode, b)
	}
	br := bufio.NewReader(resp.Body)
	if line, err := br.ReadString('\n'); err != nil || !strings.HasPrefix(line, "data: ") {
		cancel()
		t.Fatalf("first line of the stream: %q, %v", line, err)
	}
	return br, func() { resp.Body.Close(); cancel() }
}

// listWorkers returns the workers the queen lists.
func listWorkers(t *testing.T, c rbeev1.QueenServiceClient) []*rbeev1.Worker {
	t.Helper()
	ws, err := c.ListWorkers(ctxT(t, 5*time.Second), &rbeev1.ListWorkersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return ws.GetWorkers()
}

// streamingFleet is a queen with its OpenAI API and two hives serving the model "demo" of a
// catalog, and a chat stream in flight on the one worker that stream started.
type streamingFleet struct {
	q      *proc
	c      rbeev1.QueenServiceClient
	url    string // the queen's chat completions
	hives  map[string]*proc
	w      *rbeev1.Worker // the worker serving the stream
	stream *bufio.Reader
	// closeStream ends the stream early; it is also called when the test ends.
	closeStream func()
}

// newStreamingFleet starts the fleet (hive ids prefix1-..., prefix2-...) and a stream of tokens.
func newStreamingFleet(t *testing.T, prefix, catalog string, tokens int) *streamingFleet {
	t.Helper()
	f := &streamingFleet{hives: map[string]*proc{}}
	q, addr, api := startQueenHTTP(t, "--scale-up-after", "0")
	f.q, f.url = q, api+"/v1/chat/completions"
	models := catalogFile(t, catalog)
	for _, id := range []string{uniqueID(prefix + "1"), uniqueID(prefix + "2")} {
		f.hives[id], _ = startHive(t, addr, id, "--models", models)
	}
	f.c, _ = dial(t, addr)
	f.stream, f.closeStream = openStream(t, f.url, tokens)
	t.Cleanup(f.closeStream)
	ws := listWorkers(t, f.c)
	if len(ws) != 1 {
		t.Fatalf("%d workers, want the one started for the stream", len(ws))
	}
	f.w = ws[0]
	cleanupMarked(t, f.w.GetWorkerId())
	return f
}

// chatsServed returns how many chat requests worker w's server (worker-stub --openai) has received.
func chatsServed(t *testing.T, w *rbeev1.Worker) float64 {
	t.Helper()
	n, ok := value(scrape(t, net.JoinHostPort("127.0.0.1", strconv.Itoa(int(w.GetPort())))), "rbee_stub_requests_total", map[string]string{"endpoint": "chat"})
	if !ok {
		t.Fatalf("worker %s's server has no rbee_stub_requests_total{endpoint=\"chat\"}", w.GetWorkerId())
	}
	return n
}

// A worker an operator deletes drains: from the moment the delete starts the router sends it no
// new request, while the stream in flight on it finishes, and a request arriving meanwhile starts
// another worker. The worker's hive is frozen (SIGSTOP) while the delete starts, so the worker gets
// no SIGTERM, reports READY and would serve: only the queen's drain keeps requests off it, not the
// worker's STOPPING, which comes later (and fast, which is why a test without the freeze could not
// tell a drain from none).
func TestDeletedWorkerDrains(t *testing.T) {
	// 60 tokens at 10 a second: in flight for about 6s on the model's first worker, A.
	f := newStreamingFleet(t, "drain", `models:
  demo:
    cmd: ["${SERVER}", "--port", "${PORT}", "--tokens-per-second", "10", "--drain-timeout", "30s"]
`, 60)
	q, c, url, a := f.q, f.c, f.url, f.w

	// A's hive stops running, by PID: the delete passes the queen's drain, then waits on the hive.
	hivePID := f.hives[a.GetHiveId()].cmd.Process.Pid
	if err := unix.Kill(hivePID, unix.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	// kill(2) returns before every thread of the hive has stopped: until then a thread still running
	// could take the delete. The hive is this test's child, so its parent hears when the stop is
	// complete.
	var info unix.Siginfo
	if err := unix.Waitid(unix.P_PID, hivePID, &info, unix.WSTOPPED|unix.WNOWAIT, nil); err != nil {
		t.Fatal(err)
	}
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			_ = unix.Kill(hivePID, unix.SIGCONT)
		}
	}
	t.Cleanup(resume) // before the hive's own stop, which needs it running
	type result struct {
		r   *rbeev1.DeleteWorkerResponse
		err error
	}
	deleted := make(chan result, 1)
	go func() {
		r, err := c.DeleteWorker(ctxT(t, 60*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: a.GetWorkerId(), GracePeriod: durationpbNew(20 * time.Second)})
		deleted <- result{r, err}
	}()
	q.await("router_drain of "+a.GetWorkerId(), func(l map[string]any) bool {
		return l["action"] == "router_drain" && l["worker_id"] == a.GetWorkerId()
	})

	// A request during the drain goes to a new worker, B, started for it; A, still READY and
	// serving its stream, gets none.
	if resp, b := postJSON(t, ctxT(t, 60*time.Second), url, `{"model":"demo","messages":[{"role":"user","content":"hi"}],"max_tokens":2}`); resp.StatusCode != 200 {
		t.Fatalf("request during the drain: %d %s", resp.StatusCode, b)
	}
	var b *rbeev1.Worker
	for _, w := range listWorkers(t, c) {
		switch {
		case w.GetWorkerId() == a.GetWorkerId() && w.GetState() != rbeev1.WorkerState_WORKER_STATE_READY:
			t.Fatalf("worker %s is %v while its hive is stopped; the test needs it READY (not yet signalled)", w.GetWorkerId(), w.GetState())
		case w.GetWorkerId() != a.GetWorkerId():
			b = w
			cleanupMarked(t, b.GetWorkerId())
		}
	}
	if n := chatsServed(t, a); n != 1 {
		t.Fatalf("worker %s, being deleted, received %v chat requests; want 1 (the stream in flight), none new", a.GetWorkerId(), n)
	}
	if b == nil {
		t.Fatal("no other worker after a request during the drain")
	}
	if n := chatsServed(t, b); n != 1 {
		t.Fatalf("worker %s, started during the drain, received %v chat requests; want the 1 sent meanwhile", b.GetWorkerId(), n)
	}

	// The hive runs again and stops A; the stream in flight finishes whole, within the grace.
	resume()
	rest, err := io.ReadAll(f.stream)
	if err != nil || !strings.Contains(string(rest), "data: [DONE]") || strings.Contains(string(rest), `"error"`) {
		t.Fatalf("the stream in flight during the drain: %q, %v; want it whole, ending in [DONE]", rest, err)
	}
	res := <-deleted
	if res.err != nil {
		t.Fatal(res.err)
	}
	if o := res.r.GetOutcome(); o != rbeev1.DeleteOutcome_DELETE_OUTCOME_EXITED {
		t.Fatalf("delete outcome %v, want EXITED (drained within the grace)", o)
	}
	nothingLeft(t, a.GetWorkerId())
}

// A hive dying with workers mid-request. Workers outlive their hive by design (the shim beats to
// the queen itself), so a stream in flight when the hive is SIGKILLed completes, and the worker
// keeps serving. When the worker itself is then SIGKILLed mid-stream (its shim and server), the
// stream ends with an error event and the next request is served by another worker, started on
// the hive still alive.
func TestHiveDyingWithWorkersMidRequest(t *testing.T) {
	f := newStreamingFleet(t, "hdie", `models:
  demo:
    cmd: ["${SERVER}", "--port", "${PORT}", "--tokens-per-second", "10"]
`, 20)
	c, url, w, stream, closeStream := f.c, f.url, f.w, f.stream, f.closeStream
	dead := f.hives[w.GetHiveId()]
	if err := dead.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	dead.exitCode(5 * time.Second)

	// The worker outlives its hive: the stream completes.
	rest, err := io.ReadAll(stream)
	closeStream()
	if err != nil || !strings.Contains(string(rest), "data: [DONE]") || strings.Contains(string(rest), `"error"`) {
		t.Fatalf("stream after its worker's hive died: %q, %v; want it whole, ending in [DONE]", rest, err)
	}
	// And it serves the next request.
	if resp, b := postJSON(t, ctxT(t, 30*time.Second), url, `{"model":"demo","messages":[{"role":"user","content":"hi"}],"max_tokens":2}`); resp.StatusCode != 200 {
		t.Fatalf("request after the hive died: %d %s", resp.StatusCode, b)
	}
	if n := len(listWorkers(t, c)); n != 1 {
		t.Fatalf("%d workers after a request to the orphaned worker, want still 1", n)
	}

	// Now the worker dies mid-stream: its shim and its server, by the PIDs that carry its id.
	stream, closeStream = openStream(t, url, 100)
	defer closeStream()
	pids := markedProcs(w.GetWorkerId())
	if len(pids) < 2 {
		t.Fatalf("worker %s has processes %v, want its shim and its server", w.GetWorkerId(), pids)
	}
	for _, p := range pids {
		_ = unix.Kill(p, unix.SIGKILL)
	}
	rest, _ = io.ReadAll(stream)
	closeStream()
	if !strings.Contains(string(rest), `data: {"error":`) || strings.Contains(string(rest), "[DONE]") {
		t.Fatalf("stream whose worker was killed: %q; want an error event and no [DONE]", rest)
	}
	for _, p := range pids {
		awaitGone(t, p, 5*time.Second)
	}

	// The next request goes to another worker, started on the live hive.
	if resp, b := postJSON(t, ctxT(t, 60*time.Second), url, `{"model":"demo","messages":[{"role":"user","content":"hi"}],"max_tokens":2}`); resp.StatusCode != 200 {
		t.Fatalf("request after the worker died: %d %s", resp.StatusCode, b)
	}
	var live string
	for id := range f.hives {
		if id != w.GetHiveId() {
			live = id
		}
	}
	found := false
	for _, o := range listWorkers(t, c) {
		cleanupMarked(t, o.GetWorkerId())
		if o.GetWorkerId() != w.GetWorkerId() && o.GetHiveId() == live {
			found = true
		}
	}
	if !found {
		t.Fatalf("no new worker on live hive %s after the first one died", live)
	}
}
