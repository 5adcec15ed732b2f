package openai

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/rbee-dev/rbee/queen/router"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// registry is a fake of the router's registry: a fixed set of READY workers.
type registry struct{ events chan router.Event }

func (r registry) Watch(ctx context.Context) <-chan router.Event {
	out := make(chan router.Event)
	go func() {
		defer close(out)
		for {
			select {
			case <-ctx.Done():
				return
			case ev := <-r.events:
				select {
				case out <- ev:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return out
}
func (registry) Offers() []router.Offer    { return nil }
func (registry) SetLoad(string, int, bool) {}
func (registry) Spawn(context.Context, string) (string, error) {
	return "", fmt.Errorf("no spawns here")
}
func (registry) Delete(context.Context, string, time.Duration) error { return nil }

type fixture struct {
	url       string
	workerURL string // the first worker's
	api       *Server
	rt        *router.Router
}

// start serves the API over a router that knows workers (id -> handler), each with concurrency conc.
func start(t testing.TB, cfg Config, rcfg router.Config, conc int, workers ...http.Handler) fixture {
	t.Helper()
	var servers []*httptest.Server
	for _, h := range workers {
		ws := httptest.NewServer(h)
		t.Cleanup(ws.Close)
		servers = append(servers, ws)
	}
	return startOver(t, cfg, rcfg, conc, servers...)
}

// startOver is start with the workers' servers made by the caller.
func startOver(t testing.TB, cfg Config, rcfg router.Config, conc int, workers ...*httptest.Server) fixture {
	t.Helper()
	reg := registry{events: make(chan router.Event, 64)}
	rt := router.New(rcfg, reg, reg, reg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { rt.Run(ctx); close(done) }()
	var first string
	for i, ws := range workers {
		if i == 0 {
			first = ws.URL
		}
		reg.events <- router.Event{Type: router.EventAdded, Worker: router.Worker{
			ID: fmt.Sprintf("w%d", i), Model: "m", State: router.StateReady, URL: ws.URL, Concurrency: conc}}
	}
	reg.events <- router.Event{Type: router.EventSynced}
	<-rt.Synced()
	up := cfg.Upstream
	if up == nil {
		up = NewUpstream()
		cfg.Upstream = up
	}
	api := New(cfg, rt)
	s := httptest.NewServer(api)
	t.Cleanup(func() { s.Close(); up.CloseIdle(); cancel(); <-done })
	return fixture{url: s.URL, workerURL: first, api: api, rt: rt}
}

// completion answers a non-streaming request, or n SSE events then [DONE] for a streaming one.
func completion(n int) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Stream bool `json:"stream"`
		}
		_ = json.NewDecoder(r.Body).Decode(&req)
		if !req.Stream {
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprintf(w, `{"object":"chat.completion","path":%q,"auth":%q}`, r.URL.Path, r.Header.Get("Authorization"))
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range n {
			fmt.Fprintf(w, "data: {\"choices\":[{\"delta\":{\"content\":\"t%d \"}}]}\n\n", i)
			w.(http.Flusher).Flush()
		}
		fmt.Fprint(w, "data: [DONE]\n\n")
	}
}

type apiError struct {
	Error struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    *string `json:"code"`
	} `json:"error"`
}

func post(t *testing.T, url, body string, hdr ...string) (*http.Response, apiError, string) {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), "POST", url+"/v1/chat/completions", strings.NewReader(body))
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
	var e apiError
	_ = json.Unmarshal(b, &e)
	return resp, e, string(b)
}

func TestBadInputs(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "keys")
	if err := os.WriteFile(keyFile, []byte("# clients\nsk-test-0123456789abcdef\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	keys, err := LoadKeys(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	f := start(t, Config{Keys: keys, MaxBody: 1024}, router.Config{}, 0, completion(3))
	auth := []string{"Authorization", "Bearer sk-test-0123456789abcdef"}
	for _, tc := range []struct {
		name, body string
		hdr        []string
		code       int
		param      string
	}{
		{"malformed JSON", `{"model": "m",`, auth, 400, ""},
		{"not an object", `["m"]`, auth, 400, ""},
		{"missing model", `{"messages":[]}`, auth, 400, "model"},
		{"model not a string", `{"model": 7}`, auth, 400, "model"},
		{"control character", `{"model": "m\u0007"}`, auth, 400, "model"},
		{"stream not a boolean", `{"model": "m", "stream": "yes"}`, auth, 400, "stream"},
		{"unknown model", `{"model": "gpt-9"}`, auth, 404, "model"},
		{"body over the cap", `{"model": "m", "x": "` + strings.Repeat("a", 2000) + `"}`, auth, 413, ""},
		{"no API key", `{"model": "m"}`, nil, 401, ""},
		{"wrong API key", `{"model": "m"}`, []string{"Authorization", "Bearer sk-test-0123456789abcdeX"}, 401, ""},
		{"cluster-token style header", `{"model": "m"}`, []string{"Authorization", "sk-test-0123456789abcdef"}, 401, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, e, raw := post(t, f.url, tc.body, tc.hdr...)
			if resp.StatusCode != tc.code {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.code, raw)
			}
			if e.Error.Message == "" || e.Error.Type == "" || !strings.Contains(raw, `"param":`) || !strings.Contains(raw, `"code":`) {
				t.Fatalf("not OpenAI's error shape: %s", raw)
			}
			if got := ""; e.Error.Param != nil {
				got = *e.Error.Param
				if got != tc.param {
					t.Fatalf("param %q, want %q", got, tc.param)
				}
			} else if tc.param != "" {
				t.Fatalf("param null, want %q", tc.param)
			}
			if resp.Header.Get("x-job-id") == "" {
				t.Fatal("no x-job-id header")
			}
		})
	}
	// A good request passes through unchanged, and the client's key never reaches the worker.
	resp, _, raw := post(t, f.url, `{"model":"m","messages":[]}`, auth...)
	if resp.StatusCode != 200 || !strings.Contains(raw, `"path":"/v1/chat/completions","auth":""`) {
		t.Fatalf("good request: %d %s", resp.StatusCode, raw)
	}
}

// Each event reaches the client while the worker is still generating the next.
func TestStreamIsRelayedEventByEvent(t *testing.T) {
	step := make(chan struct{})
	worker := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range 3 {
			fmt.Fprintf(w, "data: {\"n\":%d}\n\n", i)
			w.(http.Flusher).Flush()
			select {
			case <-step:
			case <-r.Context().Done():
				return
			}
		}
		fmt.Fprint(w, "data: [DONE]\n\n")
	})
	f := start(t, Config{}, router.Config{}, 0, worker)
	req, _ := http.NewRequestWithContext(t.Context(), "POST", f.url+"/v1/chat/completions", strings.NewReader(`{"model":"m","stream":true}`))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("content type %q", ct)
	}
	rd := bufio.NewReader(resp.Body)
	for i := range 3 {
		line, err := rd.ReadString('\n')
		if err != nil || line != fmt.Sprintf("data: {\"n\":%d}\n", i) {
			t.Fatalf("event %d = %q, %v", i, line, err)
		}
		_, _ = rd.ReadString('\n')
		step <- struct{}{} // only now may the worker produce the next
	}
	rest, _ := io.ReadAll(rd)
	if string(rest) != "data: [DONE]\n\n" {
		t.Fatalf("tail %q", rest)
	}
}

func TestWorkerDyingMidStreamEndsWithErrorEvent(t *testing.T) {
	worker := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprint(w, "data: {\"n\":0}\n\n")
		w.(http.Flusher).Flush()
		conn, _, _ := w.(http.Hijacker).Hijack()
		conn.Close() // the worker process died
	})
	f := start(t, Config{}, router.Config{QueueWait: 200 * time.Millisecond}, 0, worker)
	resp, _, raw := post(t, f.url, `{"model":"m","stream":true}`)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	i := strings.Index(raw, "data: {\"error\":")
	if !strings.HasPrefix(raw, "data: {\"n\":0}\n\n") || i < 0 || !strings.HasSuffix(raw, "\n\n") {
		t.Fatalf("stream = %q, want the first event then an error event", raw)
	}
	var e apiError
	if err := json.Unmarshal([]byte(strings.TrimSpace(raw[i+len("data: "):])), &e); err != nil || e.Error.Type != "server_error" || *e.Error.Code != "worker_failed" {
		t.Fatalf("error event %q: %v", raw[i:], err)
	}
	// The worker is kept out of routing: with no other, the next request is not sent to it.
	resp, _, raw = post(t, f.url, `{"model":"m"}`)
	if resp.StatusCode != 503 {
		t.Fatalf("request after the failure: %d %s, want 503 (the only worker is out)", resp.StatusCode, raw)
	}
}

// A worker that accepts and never answers is given up on at the first-byte timeout and the
// request retried on another; with none left, 504.
func TestHangingWorkerIsRetriedThen504(t *testing.T) {
	var hung atomic.Int32
	hang := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.ReadAll(r.Body) // as a real server does; only then does net/http notice a closed connection
		hung.Add(1)
		<-r.Context().Done()
	})
	f := start(t, Config{FirstByteTimeout: 300 * time.Millisecond}, router.Config{QueueWait: 200 * time.Millisecond}, 0, hang, completion(1))
	for range 3 { // whichever the first pick, every request ends well
		resp, _, raw := post(t, f.url, `{"model":"m"}`)
		if resp.StatusCode != 200 {
			t.Fatalf("with one healthy worker: %d %s", resp.StatusCode, raw)
		}
	}

	g := start(t, Config{FirstByteTimeout: 200 * time.Millisecond}, router.Config{QueueWait: 100 * time.Millisecond}, 0, hang, hang)
	before := hung.Load()
	resp, e, raw := post(t, g.url, `{"model":"m"}`)
	if resp.StatusCode != 504 || *e.Error.Code != "worker_timeout" {
		t.Fatalf("all workers hang: %d %s, want 504", resp.StatusCode, raw)
	}
	if n := hung.Load() - before; n != 2 {
		t.Fatalf("%d attempts, want 2 (one retry)", n)
	}
}

func TestUnreachableWorkerIsRetried(t *testing.T) {
	dead := httptest.NewServer(http.NotFoundHandler())
	dead.Close()
	reg := registry{events: make(chan router.Event, 8)}
	rt := router.New(router.Config{}, reg, reg, reg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { rt.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	ok := httptest.NewServer(completion(1))
	defer ok.Close()
	reg.events <- router.Event{Type: router.EventAdded, Worker: router.Worker{ID: "dead", Model: "m", State: router.StateReady, URL: dead.URL}}
	reg.events <- router.Event{Type: router.EventAdded, Worker: router.Worker{ID: "ok", Model: "m", State: router.StateReady, URL: ok.URL}}
	reg.events <- router.Event{Type: router.EventSynced}
	<-rt.Synced()
	up := NewUpstream()
	defer up.CloseIdle()
	s := httptest.NewServer(New(Config{Upstream: up}, rt))
	defer s.Close()
	for range 4 {
		if resp, _, raw := post(t, s.URL, `{"model":"m"}`); resp.StatusCode != 200 {
			t.Fatalf("%d %s", resp.StatusCode, raw)
		}
	}
}

// A client that goes away cancels the worker's request at once.
func TestClientCancelReachesWorker(t *testing.T) {
	cancelled := make(chan time.Time, 1)
	worker := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprint(w, "data: {}\n\n")
		w.(http.Flusher).Flush()
		<-r.Context().Done()
		cancelled <- time.Now()
	})
	f := start(t, Config{}, router.Config{}, 0, worker)
	ctx, cancel := context.WithCancel(t.Context())
	req, _ := http.NewRequestWithContext(ctx, "POST", f.url+"/v1/chat/completions", strings.NewReader(`{"model":"m","stream":true}`))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = bufio.NewReader(resp.Body).ReadString('\n')
	t0 := time.Now()
	cancel()
	resp.Body.Close()
	select {
	case at := <-cancelled:
		if d := at.Sub(t0); d > 100*time.Millisecond {
			t.Fatalf("worker saw the cancellation after %v, want within 100ms", d)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("worker never saw the client go away")
	}
}

// All workers at their concurrency and the queue full: 429 with Retry-After; every request is
// answered exactly once, none lost.
func TestFullQueueIs429(t *testing.T) {
	release := make(chan struct{})
	var served atomic.Int32
	worker := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-release
		served.Add(1)
		fmt.Fprint(w, `{}`)
	})
	f := start(t, Config{}, router.Config{QueueSize: 2, QueueWait: time.Minute}, 1, worker)
	codes := make(chan int, 3)
	for range 3 { // one in flight, two queued
		go func() {
			resp, _, _ := post(t, f.url, `{"model":"m"}`)
			codes <- resp.StatusCode
		}()
	}
	for f.rt.Queued("m") < 2 {
		time.Sleep(5 * time.Millisecond)
	}
	resp, _, raw := post(t, f.url, `{"model":"m"}`)
	if resp.StatusCode != 429 || resp.Header.Get("Retry-After") == "" || !strings.Contains(raw, "queue_full") {
		t.Fatalf("over a full queue: %d %v %s, want 429 with Retry-After", resp.StatusCode, resp.Header, raw)
	}
	close(release)
	for range 3 {
		if c := <-codes; c != 200 {
			t.Fatalf("a queued request ended %d", c)
		}
	}
	if served.Load() != 3 {
		t.Fatalf("worker served %d, want 3", served.Load())
	}
}

func TestModelsAndUnknownPaths(t *testing.T) {
	f := start(t, Config{}, router.Config{}, 0, completion(1))
	resp, err := http.Get(f.url + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		Object string `json:"object"`
		Data   []struct {
			ID, Object string
		} `json:"data"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&list)
	resp.Body.Close()
	if list.Object != "list" || len(list.Data) != 1 || list.Data[0].ID != "m" || list.Data[0].Object != "model" {
		t.Fatalf("models = %+v", list)
	}
	for _, c := range []struct{ method, path string }{
		{"GET", "/v1/files"},
		{"GET", "/v1/chat/completions"},    // the inference endpoints take POST only
		{"POST", "/v1/chat%2Fcompletions"}, // an escaped slash is not a path separator
		{"POST", "/v1/models"},
	} {
		req, _ := http.NewRequestWithContext(t.Context(), c.method, f.url+c.path, strings.NewReader(`{"model":"m"}`))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 404 || !strings.Contains(string(b), "unknown_url") || resp.Header.Get("x-job-id") == "" {
			t.Fatalf("%s %s: %d %s, want 404 unknown_url", c.method, c.path, resp.StatusCode, b)
		}
	}
}

func TestEventCounter(t *testing.T) {
	stream := "data: {\"a\":1}\n\n: comment\n\ndata: {\"b\":2}\n\nevent: x\ndata:{}\n\ndata: [DONE]\n\n"
	for _, size := range []int{1, 2, 3, 7, len(stream)} {
		var c eventCounter
		for i := 0; i < len(stream); i += size {
			c.feed([]byte(stream[i:min(i+size, len(stream))]))
		}
		if c.events != 3 {
			t.Fatalf("chunks of %d: %d events, want 3", size, c.events)
		}
	}
}

// A queen that does not lead refuses every request, 503 in OpenAI's error shape with Retry-After
// and the refusal's words, before anything is routed; once it leads it serves.
func TestRefusedWhileStandby(t *testing.T) {
	var calls atomic.Int64
	worker := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { calls.Add(1); completion(1)(w, r) })
	var standby atomic.Bool
	standby.Store(true)
	f := start(t, Config{Refuse: func() error {
		if standby.Load() {
			return errors.New("not the leader; the leader is at 10.0.0.1:7833")
		}
		return nil
	}}, router.Config{}, 0, worker)
	resp, e, raw := post(t, f.url, `{"model":"m"}`)
	if resp.StatusCode != 503 || e.Error.Code == nil || *e.Error.Code != "not_leader" || e.Error.Type != "server_error" ||
		!strings.Contains(e.Error.Message, "the leader is at 10.0.0.1:7833") {
		t.Fatalf("request to a standby: %d %s, want 503 not_leader naming the leader", resp.StatusCode, raw)
	}
	if ra, err := strconv.Atoi(resp.Header.Get("Retry-After")); err != nil || ra < 1 {
		t.Fatalf("Retry-After %q, want a number of seconds", resp.Header.Get("Retry-After"))
	}
	mresp, err := http.Get(f.url + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	mresp.Body.Close()
	if mresp.StatusCode != 503 {
		t.Fatalf("GET /v1/models on a standby: %d, want 503", mresp.StatusCode)
	}
	if n := calls.Load(); n != 0 {
		t.Fatalf("a standby routed %d requests", n)
	}
	standby.Store(false) // elected
	if resp, _, raw := post(t, f.url, `{"model":"m"}`); resp.StatusCode != 200 || calls.Load() != 1 {
		t.Fatalf("request once leading: %d %s", resp.StatusCode, raw)
	}
}
