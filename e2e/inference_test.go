package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// The OpenAI API through the queen, against real worker-stub --openai servers. Until hives start
// such servers from a catalog (with a supervisor that heartbeats for them), the test does the
// supervisor's part: it starts the server and heartbeats its descriptor to the queen, which is
// exactly what the queen would learn from a real one.

// startQueenHTTP starts a queen serving the HTTP API on an ephemeral port; it returns the queen,
// its gRPC address and the API's base URL.
func startQueenHTTP(t *testing.T, args ...string) (*proc, string, string) {
	t.Helper()
	q := start(t, "queen", append([]string{"--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--heartbeat-interval", "200ms"}, args...)...)
	h := q.awaitAction("http_start")
	line := q.awaitAction("queen_start")
	return q, line["listen"].(string), "http://" + h["http_listen"].(string)
}

// stubServer is one worker-stub --openai process.
type stubServer struct {
	*proc
	port int
	url  string
}

func startStub(t *testing.T, model string, args ...string) *stubServer {
	t.Helper()
	p := start(t, "worker-stub", append([]string{"--openai", "--model", model, "--port", "0"}, args...)...)
	addr := p.awaitAction("worker_start")["addr"].(string)
	p.awaitAction("worker_ready")
	_, port, _ := net.SplitHostPort(addr)
	n, _ := strconv.Atoi(port)
	return &stubServer{proc: p, port: n, url: "http://" + addr}
}

// beatFor heartbeats a stub's descriptor to the queen as READY with the given concurrency, until
// the test ends or stop is called (which says STOPPING and closes the stream).
func beatFor(t *testing.T, queen, id string, s *stubServer, model string, concurrency uint32) (stop func()) {
	t.Helper()
	_, conn := dial(t, queen)
	hb := rbeev1.NewHeartbeatServiceClient(conn)
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := hb.WorkerHeartbeat(ctx)
	if err != nil {
		t.Fatal(err)
	}
	w := &rbeev1.Worker{WorkerId: id, HiveId: "shim-test", Model: model, Device: "cpu", Pid: int32(s.cmd.Process.Pid),
		Port: uint32(s.port), Address: "127.0.0.1", Concurrency: concurrency, State: rbeev1.WorkerState_WORKER_STATE_READY}
	var mu sync.Mutex
	send := func() error {
		mu.Lock()
		defer mu.Unlock()
		if err := stream.Send(&rbeev1.WorkerHeartbeatRequest{Worker: w}); err != nil {
			return err
		}
		_, err := stream.Recv()
		return err
	}
	if err := send(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		tk := time.NewTicker(200 * time.Millisecond)
		defer tk.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tk.C:
				if send() != nil {
					return
				}
			}
		}
	}()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			<-done
		})
	}
	t.Cleanup(stop)
	return stop
}

// awaitReady waits until n workers are READY (or BUSY: serving, at their concurrency).
func awaitReady(t *testing.T, queen string, n int) {
	t.Helper()
	c, _ := dial(t, queen)
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := c.ListWorkers(ctxT(t, 5*time.Second), &rbeev1.ListWorkersRequest{})
		if err != nil {
			t.Fatal(err)
		}
		ready := 0
		for _, w := range resp.GetWorkers() {
			if st := w.GetState(); st == rbeev1.WorkerState_WORKER_STATE_READY || st == rbeev1.WorkerState_WORKER_STATE_BUSY {
				ready++
			}
		}
		if ready >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d workers READY after 10s, want %d", ready, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func postJSON(t *testing.T, ctx context.Context, url, body string, hdr ...string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequestWithContext(ctx, "POST", url, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// The official OpenAI Go library, unchanged, against the queen: models, a completion, a stream
// token by token, embeddings, and an unknown model as its typed 404.
func TestOpenAIClientThroughQueen(t *testing.T) {
	_, queen, api := startQueenHTTP(t)
	a := startStub(t, "demo", "--tokens-per-second", "20")
	b := startStub(t, "demo", "--tokens-per-second", "20")
	beatFor(t, queen, "w-a", a, "demo", 4)
	beatFor(t, queen, "w-b", b, "demo", 4)
	awaitReady(t, queen, 2)

	client := openai.NewClient(option.WithBaseURL(api+"/v1/"), option.WithAPIKey("unused-on-loopback"), option.WithMaxRetries(0))
	ctx := ctxT(t, 30*time.Second)
	models, err := client.Models.List(ctx)
	if err != nil || len(models.Data) != 1 || models.Data[0].ID != "demo" {
		t.Fatalf("models: %+v, %v", models, err)
	}
	params := openai.ChatCompletionNewParams{Model: "demo", Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hello")},
		MaxTokens: openai.Int(10)}
	cc, err := client.Chat.Completions.New(ctx, params)
	if err != nil || len(cc.Choices) != 1 || cc.Choices[0].Message.Content == "" {
		t.Fatalf("completion: %+v, %v", cc, err)
	}

	// 20 tokens at 20/s: the last comes ~1s after the first. The first must reach the client
	// well before the last is generated.
	t0 := time.Now()
	params.MaxTokens = openai.Int(20)
	stream := client.Chat.Completions.NewStreaming(ctx, params)
	var first time.Duration
	var text strings.Builder
	chunks := 0
	for stream.Next() {
		c := stream.Current()
		if len(c.Choices) > 0 && c.Choices[0].Delta.Content != "" {
			if chunks == 0 {
				first = time.Since(t0)
			}
			chunks++
			text.WriteString(c.Choices[0].Delta.Content)
		}
	}
	total := time.Since(t0)
	if err := stream.Err(); err != nil {
		t.Fatalf("stream: %v", err)
	}
	if chunks != 20 || first > total-500*time.Millisecond {
		t.Fatalf("stream: %d content chunks, first after %v of %v; want 20, the first long before the end", chunks, first, total)
	}

	emb, err := client.Embeddings.New(ctx, openai.EmbeddingNewParams{Model: "demo", Input: openai.EmbeddingNewParamsInputUnion{OfString: openai.String("hi")}})
	if err != nil || len(emb.Data) != 1 || len(emb.Data[0].Embedding) == 0 {
		t.Fatalf("embeddings: %+v, %v", emb, err)
	}

	_, err = client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "no-such-model", Messages: params.Messages})
	var apiErr *openai.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 404 || apiErr.Code != "model_not_found" || apiErr.Param != "model" {
		t.Fatalf("unknown model: %v, want the client's 404 model_not_found", err)
	}
}

// Bad inputs against the real queen, each with OpenAI's error shape.
func TestInferenceBadInputs(t *testing.T) {
	_, queen, api := startQueenHTTP(t, "--http-max-body", "4096")
	s := startStub(t, "demo")
	beatFor(t, queen, "w-a", s, "demo", 0)
	awaitReady(t, queen, 1)
	url := api + "/v1/chat/completions"
	for _, tc := range []struct {
		name, body string
		code       int
		errCode    string
	}{
		{"malformed JSON", `{"model":"demo",`, 400, ""},
		{"missing model", `{"messages":[]}`, 400, ""},
		{"unknown model", `{"model":"nope"}`, 404, "model_not_found"},
		{"control characters", "{\"model\":\"de\\u0000mo\"}", 400, ""},
		{"stream not a boolean", `{"model":"demo","stream":1}`, 400, ""},
		{"body over the cap", `{"model":"demo","pad":"` + strings.Repeat("x", 5000) + `"}`, 413, "request_too_large"},
	} {
		resp, body := postJSON(t, ctxT(t, 10*time.Second), url, tc.body)
		var e struct {
			Error struct {
				Message, Type string
				Code          *string
			}
		}
		if err := json.Unmarshal([]byte(body), &e); err != nil || resp.StatusCode != tc.code || e.Error.Message == "" || e.Error.Type == "" {
			t.Errorf("%s: %d %s, want %d with an OpenAI error", tc.name, resp.StatusCode, body, tc.code)
		} else if tc.errCode != "" && (e.Error.Code == nil || *e.Error.Code != tc.errCode) {
			t.Errorf("%s: code %v, want %s", tc.name, e.Error.Code, tc.errCode)
		}
	}
}

// A worker that dies mid-stream: the stream ends with an error event and the next request goes
// to the other worker. A client that leaves: the worker counts the cancellation.
func TestInferenceFaults(t *testing.T) {
	_, queen, api := startQueenHTTP(t)
	dying := startStub(t, "demo", "--tokens-per-second", "100", "--die-mid-stream-after", "3")
	good := startStub(t, "demo", "--tokens-per-second", "20")
	stopGood := beatFor(t, queen, "w-good", good, "demo", 1)
	awaitReady(t, queen, 1)
	url := api + "/v1/chat/completions"

	// Concurrency 1 each: hold the good one with a slow stream, so the next goes to the dying one.
	hold, cancelHold := context.WithCancel(t.Context())
	defer cancelHold()
	req, _ := http.NewRequestWithContext(hold, "POST", url, strings.NewReader(`{"model":"demo","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":1000}`))
	held, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	line, _ := bufio.NewReader(held.Body).ReadString('\n')
	if !strings.HasPrefix(line, "data: ") {
		t.Fatalf("held stream: %q", line)
	}
	beatFor(t, queen, "w-dying", dying, "demo", 1)
	awaitReady(t, queen, 2)
	resp, body := postJSON(t, ctxT(t, 10*time.Second), url, `{"model":"demo","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":10}`)
	if resp.StatusCode != 200 || !strings.Contains(body, `data: {"error":`) || strings.Contains(body, "[DONE]") {
		t.Fatalf("stream from a worker that died: %d %q, want events then an error event", resp.StatusCode, body)
	}
	if n := strings.Count(body, `"content"`); n < 1 {
		t.Fatalf("no token before the error: %q", body)
	}
	dying.exitCode(5 * time.Second)

	// Client cancel: the held stream's worker sees it within 100ms.
	before := stubCounter(t, good.url, "rbee_stub_requests_cancelled_total")
	t0 := time.Now()
	cancelHold()
	held.Body.Close()
	for stubCounter(t, good.url, "rbee_stub_requests_cancelled_total") == before {
		if time.Since(t0) > 2*time.Second {
			t.Fatal("the worker never saw the client's cancellation")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if d := time.Since(t0); d > 100*time.Millisecond {
		t.Errorf("the worker saw the cancellation after %v, want within 100ms", d)
	}

	// The failed worker is not used again: requests go to the good one.
	for range 3 {
		if resp, body := postJSON(t, ctxT(t, 10*time.Second), url, `{"model":"demo","messages":[{"role":"user","content":"hi"}],"max_tokens":2}`); resp.StatusCode != 200 {
			t.Fatalf("after the failure: %d %s", resp.StatusCode, body)
		}
	}
	stopGood()
}

// stubCounter reads one sample of a /metrics page (a stub's, or the queen's).
func stubCounter(t *testing.T, url, name string) float64 {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) == 2 && f[0] == name {
			v, _ := strconv.ParseFloat(f[1], 64)
			return v
		}
	}
	t.Fatalf("%s not in the stub's metrics", name)
	return 0
}

// A worker that accepts and never answers: the request is retried on another after
// --first-byte-timeout; with only hanging workers, 504.
func TestInferenceHangingWorker(t *testing.T) {
	_, queen, api := startQueenHTTP(t, "--first-byte-timeout", "500ms", "--queue-wait", "300ms")
	hang := startStubNoReady(t, "demo", "--hang")
	beatFor(t, queen, "w-hang", hang, "demo", 0)
	awaitReady(t, queen, 1)
	url := api + "/v1/chat/completions"
	t0 := time.Now()
	resp, body := postJSON(t, ctxT(t, 10*time.Second), url, `{"model":"demo","messages":[{"role":"user","content":"hi"}]}`)
	if resp.StatusCode != 504 && resp.StatusCode != 503 {
		t.Fatalf("only a hanging worker: %d %s, want 504 (or 503 once it is out of routing)", resp.StatusCode, body)
	}
	if d := time.Since(t0); d > 3*time.Second {
		t.Fatalf("answered after %v: the timeout does not bound it", d)
	}

	good := startStub(t, "demo")
	beatFor(t, queen, "w-good", good, "demo", 0)
	awaitReady(t, queen, 2)
	for range 4 {
		if resp, body := postJSON(t, ctxT(t, 10*time.Second), url, `{"model":"demo","messages":[{"role":"user","content":"hi"}],"max_tokens":2}`); resp.StatusCode != 200 {
			t.Fatalf("with a good worker beside the hanging one: %d %s", resp.StatusCode, body)
		}
	}
}

// startStubNoReady starts a stub that never logs worker_ready (it hangs before loading).
func startStubNoReady(t *testing.T, model string, args ...string) *stubServer {
	t.Helper()
	p := start(t, "worker-stub", append([]string{"--openai", "--model", model, "--port", "0"}, args...)...)
	addr := p.awaitAction("worker_start")["addr"].(string)
	_, port, _ := net.SplitHostPort(addr)
	n, _ := strconv.Atoi(port)
	return &stubServer{proc: p, port: n, url: "http://" + addr}
}

// Every worker at its concurrency and the queue full: 429 with Retry-After; nothing lost.
func TestInferenceQueueFull(t *testing.T) {
	q, queen, api := startQueenHTTP(t, "--queue-size", "2", "--queue-wait", "30s", "--metrics-listen", "127.0.0.1:0")
	metricsURL := "http://" + q.awaitAction("metrics_start")["metrics_listen"].(string) + "/metrics"
	s := startStub(t, "demo", "--tokens-per-second", "20")
	beatFor(t, queen, "w-a", s, "demo", 1)
	awaitReady(t, queen, 1)
	url := api + "/v1/chat/completions"
	codes := make(chan int, 3)
	for range 3 { // one in flight (10 tokens at 20/s), two queued
		go func() {
			resp, _ := postJSON(t, context.Background(), url, `{"model":"demo","messages":[{"role":"user","content":"hi"}],"max_tokens":10}`)
			codes <- resp.StatusCode
		}()
	}
	c, _ := dial(t, queen)
	for { // BUSY in the registry once its one slot is taken, with its in-flight count
		w, err := c.GetWorker(ctxT(t, 5*time.Second), &rbeev1.GetWorkerRequest{WorkerId: "w-a"})
		if err != nil {
			t.Fatal(err)
		}
		if w.GetWorker().GetState() == rbeev1.WorkerState_WORKER_STATE_BUSY && w.GetWorker().GetInFlight() == 1 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	for stubCounter(t, strings.TrimSuffix(metricsURL, "/metrics"), `rbee_router_queued{model="demo"}`) < 2 {
		time.Sleep(10 * time.Millisecond)
	}
	resp, body := postJSON(t, ctxT(t, 10*time.Second), url, `{"model":"demo","messages":[{"role":"user","content":"hi"}],"max_tokens":1}`)
	if resp.StatusCode != 429 || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("over a full queue: %d %s, want 429 with Retry-After", resp.StatusCode, body)
	}
	for range 3 {
		if c := <-codes; c != 200 {
			t.Fatalf("a request in flight or queued ended %d", c)
		}
	}
	if n := stubCounter(t, s.url, "rbee_stub_requests_finished_total"); n != 3 {
		t.Fatalf("the worker finished %v requests, want the 3 admitted", n)
	}
}

// With a cluster token the API wants an API key from --api-keys-file, reloaded on SIGHUP.
func TestInferenceAPIKeys(t *testing.T) {
	dir := t.TempDir()
	tokenFile, keysFile := filepath.Join(dir, "token"), filepath.Join(dir, "keys")
	if err := os.WriteFile(tokenFile, []byte("cluster-token-0123456789abcdef0123\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keysFile, []byte("sk-first-key-0123456789\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// Without a keys file a queen with a token refuses to start the API.
	bad := start(t, "queen", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--token-file", tokenFile)
	if code := bad.exitCode(10 * time.Second); code != 2 {
		t.Fatalf("queen with a token and no --api-keys-file exited %d, want 2", code)
	}
	q, _, api := startQueenHTTP(t, "--token-file", tokenFile, "--api-keys-file", keysFile)
	url := api + "/v1/models"
	get := func(key string) int {
		req, _ := http.NewRequestWithContext(t.Context(), "GET", url, nil)
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for key, want := range map[string]int{"": 401, "sk-wrong-key-0123456789": 401, "cluster-token-0123456789abcdef0123": 401, "sk-first-key-0123456789": 200} {
		if got := get(key); got != want {
			t.Errorf("key %q: %d, want %d", key, got, want)
		}
	}
	if err := os.WriteFile(keysFile, []byte("sk-second-key-0123456789\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_ = q.cmd.Process.Signal(syscall.SIGHUP)
	q.await("keys reloaded", func(m map[string]any) bool { return m["msg"] == "API keys reloaded" })
	if get("sk-first-key-0123456789") != 401 || get("sk-second-key-0123456789") != 200 {
		t.Fatal("after SIGHUP the old key still works or the new one does not")
	}
	q.mu.Lock()
	leaked := strings.Contains(q.raw.String(), "sk-second-key") || strings.Contains(q.raw.String(), "sk-first-key")
	q.mu.Unlock()
	if leaked {
		t.Fatal("an API key appears in the queen's log")
	}
}

// At shutdown the queen lets a stream in flight finish, refuses new requests, and exits.
func TestInferenceShutdownDrains(t *testing.T) {
	q, queen, api := startQueenHTTP(t)
	s := startStub(t, "demo", "--tokens-per-second", "20")
	beatFor(t, queen, "w-a", s, "demo", 0)
	awaitReady(t, queen, 1)
	req, _ := http.NewRequestWithContext(t.Context(), "POST", api+"/v1/chat/completions", strings.NewReader(`{"model":"demo","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":20}`))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	rd := bufio.NewReader(resp.Body)
	if line, _ := rd.ReadString('\n'); !strings.HasPrefix(line, "data: ") {
		t.Fatalf("first line %q", line)
	}
	_ = q.cmd.Process.Signal(syscall.SIGTERM)
	rest, _ := io.ReadAll(rd)
	if !strings.Contains(string(rest), "data: [DONE]") {
		t.Fatalf("the stream in flight was cut at shutdown: %q", rest)
	}
	if code := q.exitCode(10 * time.Second); code != 0 {
		t.Fatalf("queen exited %d", code)
	}
	if _, err := http.Post(api+"/v1/models", "application/json", nil); err == nil {
		t.Fatal("the API still answers after the queen stopped")
	}
}

// rbee chat streams an answer through the queen; its failures are one sentence and an exit status.
func TestRbeeChat(t *testing.T) {
	_, queen, api := startQueenHTTP(t)
	s := startStub(t, "demo", "--tokens-per-second", "200")
	beatFor(t, queen, "w-a", s, "demo", 2)
	awaitReady(t, queen, 1)
	r := rbeeOK(t, queen, "chat", "--http", api, "--model", "demo", "--max-tokens", "5", "Say", "hello")
	if words := strings.Fields(r.stdout); len(words) == 0 || !strings.HasSuffix(r.stdout, "\n") {
		t.Fatalf("no answer: %v", r)
	}
	if got := stubCounter(t, s.url, "rbee_stub_requests_finished_total"); got != 1 {
		t.Fatalf("the worker finished %v requests, want 1", got)
	}
	r = rbee(t, queen, "chat", "--http", api, "--model", "nope", "hi")
	if r.code != 3 || !strings.Contains(r.stderr, `model "nope"`) {
		t.Fatalf("unknown model: %v, want exit 3 naming it", r)
	}
	r = rbee(t, queen, "chat", "--http", "http://127.0.0.1:1", "--model", "demo", "hi")
	if r.code != 4 || !strings.Contains(r.stderr, "cannot reach the queen's HTTP API") {
		t.Fatalf("no API: %v, want exit 4", r)
	}
	c, _ := dial(t, queen)
	for deadline := time.Now().Add(2 * time.Second); ; { // the router publishes its load coalesced
		w, err := c.GetWorker(ctxT(t, 5*time.Second), &rbeev1.GetWorkerRequest{WorkerId: "w-a"})
		if err != nil {
			t.Fatal(err)
		}
		if w.GetWorker().GetInFlight() == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("in flight still %d 2s after the last request", w.GetWorker().GetInFlight())
		}
		time.Sleep(10 * time.Millisecond)
	}
	r = rbeeOK(t, queen, "worker", "ls")
	if !strings.Contains(r.stdout, "IN-FLIGHT") || !strings.Contains(r.stdout, " 0/2 ") {
		t.Fatalf("worker ls lacks the in-flight column: %v", r)
	}
}
