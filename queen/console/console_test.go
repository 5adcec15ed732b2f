package console

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/queen/fleet"
	"github.com/rbee-dev/rbee/queen/registry"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const (
	testToken = "cluster-token-0123456789abcdef"
	testKey   = "api-key-0123456789abcdef"
)

// fakeFleet spawns and deletes in the registry alone, as the real fleet does once the hive answered.
type fakeFleet struct {
	reg *registry.Registry
	mu  sync.Mutex
	n   int
}

func (f *fakeFleet) Spawn(_ context.Context, spec fleet.SpawnSpec) (registry.Worker, error) {
	if spec.Model == "" {
		return registry.Worker{}, &fleet.Error{Kind: fleet.KindInvalid, Msg: "model: required"}
	}
	f.mu.Lock()
	f.n++
	id := "w-spawned" + string(rune('0'+f.n))
	f.mu.Unlock()
	if err := f.reg.Reserve(registry.Worker{ID: id, HiveID: "h1", Model: spec.Model, Device: "cpu"}); err != nil {
		return registry.Worker{}, err
	}
	return f.reg.Started(id, 4242, 9000, 1, "")
}

func (f *fakeFleet) Delete(_ context.Context, id string, grace time.Duration) (fleet.Deleted, error) {
	w, ok := f.reg.Remove(id, errors.New("deleted"))
	if !ok {
		return fleet.Deleted{}, &fleet.Error{Kind: fleet.KindNotFound, Msg: "worker " + id + " is not known"}
	}
	out := rbeev1.DeleteOutcome_DELETE_OUTCOME_EXITED
	if grace == 0 {
		out = rbeev1.DeleteOutcome_DELETE_OUTCOME_KILLED
	}
	return fleet.Deleted{Outcome: out, Worker: w}, nil
}

type fakeLogs struct{ lines []string }

func (l fakeLogs) Logs(ctx context.Context, id string, tail uint32, follow bool, send func([]byte) error) error {
	if id == "w-unknown" {
		return errors.New("worker w-unknown is not known")
	}
	for _, s := range l.lines {
		if err := send([]byte(s)); err != nil {
			return err
		}
	}
	if follow {
		<-ctx.Done()
		return ctx.Err()
	}
	return nil
}

type keys map[string]bool

func (k keys) Check(authorization string) bool {
	tok, ok := strings.CutPrefix(authorization, "Bearer ")
	return ok && k[tok]
}

type env struct {
	reg  *registry.Registry
	srv  *httptest.Server
	cl   *http.Client
	logs *observer.ObservedLogs
	chat *chatRecorder
}

type chatRecorder struct {
	mu  sync.Mutex
	req *http.Request
}

func (c *chatRecorder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c.mu.Lock()
	c.req = r.Clone(context.Background())
	c.mu.Unlock()
	w.Header().Set("Content-Type", "text/event-stream")
	for _, tok := range []string{"Hel", "lo"} {
		_, _ = io.WriteString(w, `data: {"choices":[{"delta":{"content":"`+tok+`"}}]}`+"\n\n")
		w.(http.Flusher).Flush()
	}
	_, _ = io.WriteString(w, "data: [DONE]\n\n")
}

func newEnv(t *testing.T, token string) *env {
	t.Helper()
	// Workers turn STALE only when a test says so: a stale-marking clock would add changes the
	// tests do not expect.
	reg := registry.New(registry.Config{Interval: time.Second, StaleAfter: time.Hour, WatchBuffer: 1024})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); reg.Run(ctx) }()
	core, obs := observer.New(zap.DebugLevel)
	e := &env{reg: reg, logs: obs, chat: &chatRecorder{}}
	c := New(Config{
		Registry: reg, Fleet: &fakeFleet{reg: reg}, Logs: fakeLogs{lines: []string{"loading\n", "ready\n"}},
		Chat: e.chat, Token: token, Keys: keys{testKey: true}, HivePoll: 20 * time.Millisecond, Logger: zap.New(core),
	})
	e.srv = httptest.NewServer(c)
	jar, _ := cookiejar.New(nil)
	e.cl = &http.Client{Jar: jar, Timeout: 10 * time.Second}
	t.Cleanup(func() {
		e.srv.CloseClientConnections()
		e.srv.Close()
		cancel()
		<-done
	})
	return e
}

// do sends a request as the console's page does (with the CSRF header) unless hdr overrides.
func (e *env) do(t *testing.T, method, path, body string, hdr ...string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, e.srv.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set(csrfHeader, "1")
	for i := 0; i+1 < len(hdr); i += 2 {
		if hdr[i] == "Host" {
			req.Host = hdr[i+1]
			continue
		}
		if hdr[i+1] == "" {
			req.Header.Del(hdr[i])
		} else {
			req.Header.Set(hdr[i], hdr[i+1])
		}
	}
	resp, err := e.cl.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(b)
}

func (e *env) beat(t *testing.T, id, hive, model string, s registry.State) {
	t.Helper()
	if _, err := e.reg.Beat(registry.Worker{ID: id, HiveID: hive, Model: model, Device: "cpu", PID: 100, Port: 9000, State: s}); err != nil {
		t.Fatal(err)
	}
}

// stream reads the console's event stream.
type stream struct {
	resp *http.Response
	sc   *bufio.Scanner
}

func (e *env) stream(t *testing.T) *stream {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, e.srv.URL+"/api/events", nil)
	resp, err := e.cl.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("events: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 4<<20)
	return &stream{resp: resp, sc: sc}
}

// next returns the next event's type and data.
func (s *stream) next(t *testing.T) (string, string) {
	t.Helper()
	typ, data := "", ""
	for s.sc.Scan() {
		line := s.sc.Text()
		switch {
		case line == "" && data != "":
			return typ, data
		case strings.HasPrefix(line, "event: "):
			typ = line[len("event: "):]
		case strings.HasPrefix(line, "data: "):
			data = line[len("data: "):]
		}
	}
	t.Fatalf("stream ended: %v", s.sc.Err())
	return "", ""
}

// ops collects worker ops until one satisfies stop.
func (s *stream) ops(t *testing.T, stop func(op) bool) []op {
	t.Helper()
	var all []op
	for {
		typ, data := s.next(t)
		if typ != "workers" {
			continue
		}
		var batch []op
		if err := json.Unmarshal([]byte(data), &batch); err != nil {
			t.Fatalf("workers event %q: %v", data, err)
		}
		for _, o := range batch {
			all = append(all, o)
			if stop(o) {
				return all
			}
		}
	}
}

func TestPageIsEmbeddedSelfContainedAndLight(t *testing.T) {
	e := newEnv(t, "")
	resp, body := e.do(t, http.MethodGet, "/", "")
	if resp.StatusCode != 200 || !strings.Contains(body, "/assets/app.js") {
		t.Fatalf("GET /: %d %.200s", resp.StatusCode, body)
	}
	if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'self'") {
		t.Fatalf("CSP %q: the page must load nothing from elsewhere", csp)
	}
	total := len(body)
	for _, a := range []string{"/assets/app.js", "/assets/app.css"} {
		r, b := e.do(t, http.MethodGet, a, "")
		if r.StatusCode != 200 {
			t.Fatalf("GET %s: %d", a, r.StatusCode)
		}
		total += len(b)
		for _, remote := range []string{"http://", "https://", "//fonts.", "cdn"} {
			if strings.Contains(b, remote) {
				t.Errorf("%s refers to %q: the console must work offline", a, remote)
			}
		}
		// A reload revalidates by ETag and gets no body.
		r2, _ := e.do(t, http.MethodGet, a, "", "If-None-Match", r.Header.Get("ETag"))
		if r2.StatusCode != http.StatusNotModified {
			t.Errorf("GET %s with its ETag: %d, want 304", a, r2.StatusCode)
		}
	}
	if total > 200<<10 {
		t.Errorf("first view is %d bytes uncompressed, over the 200 KB budget", total)
	}
	t.Logf("first view: %d bytes (html+js+css, uncompressed)", total)
	if r, _ := e.do(t, http.MethodGet, "/assets/nope.js", ""); r.StatusCode != 404 {
		t.Errorf("unknown asset: %d", r.StatusCode)
	}
}

func TestEventsSnapshotThenChangesAndRemovalReason(t *testing.T) {
	e := newEnv(t, "")
	e.beat(t, "w-a", "h1", "m1", registry.StateReady)
	e.beat(t, "w-b", "h1", "m2", registry.StateStarting)
	s := e.stream(t)

	typ, data := s.next(t)
	if typ != "hives" || data != "[]" {
		t.Fatalf("first event %s %s, want the (empty) hive list", typ, data)
	}
	snap := s.ops(t, func(o op) bool { return o.T == "s" })
	if len(snap) != 3 || snap[0].W.ID != "w-a" || snap[1].W.ID != "w-b" || snap[1].W.State != "STARTING" {
		t.Fatalf("snapshot %+v", snap)
	}

	e.beat(t, "w-b", "h1", "m2", registry.StateReady)
	got := s.ops(t, func(op) bool { return true })
	if got[0].T != "u" || got[0].W.ID != "w-b" || got[0].W.State != "READY" {
		t.Fatalf("change %+v", got[0])
	}
	if _, err := e.reg.Beat(registry.Worker{ID: "w-b", HiveID: "h1", Model: "m2", Device: "cpu", PID: 100, Port: 9000,
		State: registry.StateUnhealthy, StatusMessage: "GET /health: 503 Loading model", Concurrency: 4}); err != nil {
		t.Fatal(err)
	}
	got = s.ops(t, func(op) bool { return true })
	if w := got[0].W; w.State != "UNHEALTHY" || w.Status != "GET /health: 503 Loading model" || w.Concurrency != 4 {
		t.Fatalf("unhealthy %+v", w)
	}
	e.reg.Remove("w-a", errors.New("exit status 3: out of memory"))
	got = s.ops(t, func(op) bool { return true })
	if got[0].T != "r" || got[0].W.ID != "w-a" || !strings.Contains(got[0].Reason, "out of memory") {
		t.Fatalf("removal %+v", got[0])
	}

	if _, err := e.reg.HiveBeat(registry.Hive{ID: "h1", Address: "127.0.0.1:7835", Version: "v1", Devices: []string{"cpu", "cuda:0"},
		DeviceInfo: []registry.Device{{Name: "cpu"}, {Name: "cuda:0", Description: "NVIDIA A100-SXM4-80GB", MemoryTotal: 80 << 30, MemoryUsed: 1 << 30}},
		Models:     []registry.ModelOffer{{Name: "tiny", Concurrency: 4, TTL: 15 * time.Minute}}}); err != nil {
		t.Fatal(err)
	}
	for {
		typ, data := s.next(t)
		if typ != "hives" {
			continue
		}
		var hs []hiveJSON
		if err := json.Unmarshal([]byte(data), &hs); err != nil {
			t.Fatal(err)
		}
		if len(hs) == 1 && hs[0].ID == "h1" && hs[0].Address == "127.0.0.1:7835" && len(hs[0].Devices) == 2 &&
			hs[0].Devices[1] == (deviceJSON{Name: "cuda:0", Description: "NVIDIA A100-SXM4-80GB", MemoryTotal: 80 << 30, MemoryUsed: 1 << 30}) &&
			len(hs[0].Models) == 1 && hs[0].Models[0].Name == "tiny" && hs[0].Models[0].Concurrency == 4 && hs[0].Models[0].TTL == "15m0s" {
			break
		}
		t.Fatalf("hives %s", data)
	}
}

func TestEventsBatchManyChanges(t *testing.T) {
	e := newEnv(t, "")
	s := e.stream(t)
	s.ops(t, func(o op) bool { return o.T == "s" })
	for i := range 500 {
		e.beat(t, "w-"+string(rune('a'+i%26))+string(rune('a'+i/26)), "h1", "m", registry.StateReady)
	}
	n, events := 0, 0
	for n < 500 {
		typ, data := s.next(t)
		if typ != "workers" {
			continue
		}
		var batch []op
		_ = json.Unmarshal([]byte(data), &batch)
		n += len(batch)
		events++
	}
	if events > 100 {
		t.Errorf("500 changes came as %d events: they should be batched", events)
	}
}

func TestSpawnAndDelete(t *testing.T) {
	e := newEnv(t, "")
	resp, body := e.do(t, http.MethodPost, "/api/workers", `{"model":"tiny"}`)
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("spawn: %d %s", resp.StatusCode, body)
	}
	var w workerJSON
	_ = json.Unmarshal([]byte(body), &w)
	if w.Model != "tiny" || w.State != "STARTING" || w.PID != 4242 {
		t.Fatalf("spawned %+v", w)
	}
	if _, ok := e.reg.Get(w.ID); !ok {
		t.Fatal("spawned worker not in the registry")
	}

	for _, tc := range []struct {
		path, body string
		code       int
		msg        string
	}{
		{"/api/workers", `{"model":""}`, 400, "model"},
		{"/api/workers", `{"model":"x","gpu":1}`, 400, "gpu"},
		{"/api/workers", `not json`, 400, "JSON"},
	} {
		r, b := e.do(t, http.MethodPost, tc.path, tc.body)
		if r.StatusCode != tc.code || !strings.Contains(b, tc.msg) {
			t.Errorf("POST %s %s: %d %s, want %d mentioning %q", tc.path, tc.body, r.StatusCode, b, tc.code, tc.msg)
		}
	}

	if r, b := e.do(t, http.MethodDelete, "/api/workers/"+w.ID+"?grace=forever", ""); r.StatusCode != 400 || !strings.Contains(b, "grace") {
		t.Errorf("bad grace: %d %s", r.StatusCode, b)
	}
	r, b := e.do(t, http.MethodDelete, "/api/workers/"+w.ID+"?grace=0s", "")
	if r.StatusCode != 200 || !strings.Contains(b, `"outcome":"KILLED"`) {
		t.Fatalf("delete: %d %s", r.StatusCode, b)
	}
	if _, ok := e.reg.Get(w.ID); ok {
		t.Fatal("deleted worker still in the registry")
	}
	if r, b := e.do(t, http.MethodDelete, "/api/workers/"+w.ID, ""); r.StatusCode != 404 {
		t.Errorf("delete again: %d %s, want 404", r.StatusCode, b)
	}
}

func TestStateChangesNeedTheConsoleHeaderAndSameOrigin(t *testing.T) {
	e := newEnv(t, "")
	for _, tc := range []struct {
		name string
		hdr  []string
	}{
		{"no custom header (a cross-site form)", []string{csrfHeader, ""}},
		{"cross-site fetch", []string{"Sec-Fetch-Site", "cross-site"}},
		{"same-site other origin", []string{"Sec-Fetch-Site", "same-site"}},
		{"other origin", []string{"Origin", "http://evil.example"}},
	} {
		r, b := e.do(t, http.MethodPost, "/api/workers", `{"model":"tiny"}`, tc.hdr...)
		if r.StatusCode != http.StatusForbidden {
			t.Errorf("%s: %d %s, want 403", tc.name, r.StatusCode, b)
		}
	}
	if n := len(e.reg.List("")); n != 0 {
		t.Fatalf("%d workers spawned by refused requests", n)
	}
	r, _ := e.do(t, http.MethodPost, "/api/workers", `{"model":"tiny"}`, "Origin", e.srv.URL, "Sec-Fetch-Site", "same-origin")
	if r.StatusCode != http.StatusCreated {
		t.Errorf("same origin: %d", r.StatusCode)
	}
	// An open console answers only to loopback names (a DNS-rebinding page would be "same origin").
	r, _ = e.do(t, http.MethodGet, "/api/hives", "", "Host", "rebind.evil.example")
	if r.StatusCode != http.StatusForbidden {
		t.Errorf("open console under a foreign host name: %d, want 403", r.StatusCode)
	}
	r, _ = e.do(t, http.MethodGet, "/api/hives", "", "Host", "localhost:7834")
	if r.StatusCode != http.StatusOK {
		t.Errorf("open console as localhost: %d", r.StatusCode)
	}
}

func TestTokenLoginCookieAndRoles(t *testing.T) {
	e := newEnv(t, testToken)
	if r, _ := e.do(t, http.MethodGet, "/", ""); r.StatusCode != 200 {
		t.Fatalf("the page itself needs no login: %d", r.StatusCode)
	}
	for _, p := range []string{"/api/events", "/api/hives", "/api/workers/w-a/logs"} {
		if r, _ := e.do(t, http.MethodGet, p, ""); r.StatusCode != http.StatusUnauthorized {
			t.Errorf("GET %s without a session: %d, want 401", p, r.StatusCode)
		}
	}
	if r, _ := e.do(t, http.MethodPost, "/api/workers", `{"model":"tiny"}`); r.StatusCode != http.StatusUnauthorized {
		t.Errorf("spawn without a session: %d", r.StatusCode)
	}
	// The secret in the Authorization header is not a session either: only the login opens one.
	if r, _ := e.do(t, http.MethodGet, "/api/hives", "", "Authorization", "Bearer "+testToken); r.StatusCode != http.StatusUnauthorized {
		t.Errorf("bearer token on the console API: %d, want 401", r.StatusCode)
	}

	r, b := e.do(t, http.MethodPost, "/api/login", `{"secret":"wrong-token-0123456789"}`)
	if r.StatusCode != http.StatusUnauthorized || len(r.Cookies()) != 0 {
		t.Fatalf("wrong token: %d %s cookies %v", r.StatusCode, b, r.Cookies())
	}
	r, b = e.do(t, http.MethodPost, "/api/login", `{"secret":"`+testKey+`"}`)
	if r.StatusCode != 200 || !strings.Contains(b, `"role":"chat"`) {
		t.Fatalf("API key login: %d %s", r.StatusCode, b)
	}
	ck := r.Cookies()[0]
	if !ck.HttpOnly || ck.SameSite != http.SameSiteStrictMode || ck.Value == "" || strings.Contains(ck.Value, testKey) {
		t.Fatalf("session cookie %+v: want HttpOnly, SameSite=Strict, an id not the secret", ck)
	}
	if r, _ := e.do(t, http.MethodGet, "/api/hives", ""); r.StatusCode != 200 {
		t.Errorf("API key session watching: %d", r.StatusCode)
	}
	if r, b := e.do(t, http.MethodPost, "/api/workers", `{"model":"tiny"}`); r.StatusCode != http.StatusForbidden || !strings.Contains(b, "cluster token") {
		t.Errorf("API key session spawning: %d %s, want 403", r.StatusCode, b)
	}
	r, b = e.do(t, http.MethodPost, "/api/chat", `{"model":"m","stream":true,"messages":[]}`)
	if r.StatusCode != 200 || !strings.Contains(b, "Hel") {
		t.Fatalf("API key session chatting: %d %s", r.StatusCode, b)
	}
	e.chat.mu.Lock()
	fwd := e.chat.req
	e.chat.mu.Unlock()
	if fwd.URL.Path != "/v1/chat/completions" || fwd.Header.Get("Authorization") != "Bearer "+testKey || fwd.Header.Get("Cookie") != "" {
		t.Errorf("forwarded chat: path %s, auth %q, cookie %q", fwd.URL.Path, fwd.Header.Get("Authorization"), fwd.Header.Get("Cookie"))
	}

	r, b = e.do(t, http.MethodPost, "/api/login", `{"secret":"`+testToken+`"}`)
	if r.StatusCode != 200 || !strings.Contains(b, `"role":"admin"`) {
		t.Fatalf("token login: %d %s", r.StatusCode, b)
	}
	if r, b := e.do(t, http.MethodPost, "/api/workers", `{"model":"tiny"}`); r.StatusCode != http.StatusCreated {
		t.Errorf("admin spawn: %d %s", r.StatusCode, b)
	}
	if r, _ := e.do(t, http.MethodPost, "/api/logout", ""); r.StatusCode != http.StatusNoContent {
		t.Errorf("logout: %d", r.StatusCode)
	}
	if r, _ := e.do(t, http.MethodGet, "/api/hives", ""); r.StatusCode != http.StatusUnauthorized {
		t.Errorf("after logout: %d, want 401", r.StatusCode)
	}

	for _, entry := range e.logs.All() {
		text := entry.Message
		for k, v := range entry.ContextMap() {
			text += " " + k + "=" + strings.TrimSpace(strings.ReplaceAll(strings.ReplaceAll(toString(v), "\n", " "), "\t", " "))
		}
		if strings.Contains(text, testToken) || strings.Contains(text, testKey) {
			t.Errorf("a secret was logged: %s", text)
		}
	}
}

func toString(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func TestLoginIsRateLimited(t *testing.T) {
	e := newEnv(t, testToken)
	for range loginBurst {
		if r, _ := e.do(t, http.MethodPost, "/api/login", `{"secret":"nope"}`); r.StatusCode != http.StatusUnauthorized {
			t.Fatalf("wrong secret: %d", r.StatusCode)
		}
	}
	r, _ := e.do(t, http.MethodPost, "/api/login", `{"secret":"`+testToken+`"}`)
	if r.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("after %d failures: %d, want 429 even for the right token", loginBurst, r.StatusCode)
	}
}

func TestLogs(t *testing.T) {
	e := newEnv(t, "")
	r, b := e.do(t, http.MethodGet, "/api/workers/w-a/logs?tail=10", "")
	if r.StatusCode != 200 || !strings.Contains(b, `data: "loading\n"`) || !strings.Contains(b, "event: end") {
		t.Fatalf("logs: %d %s", r.StatusCode, b)
	}
	_, b = e.do(t, http.MethodGet, "/api/workers/w-unknown/logs", "")
	if !strings.Contains(b, "event: end\ndata: \"worker w-unknown is not known\"") {
		t.Errorf("unknown worker's log: %s", b)
	}
	if r, _ := e.do(t, http.MethodGet, "/api/workers/w-a/logs?tail=-1", ""); r.StatusCode != 400 {
		t.Errorf("bad tail: %d", r.StatusCode)
	}
	if r, _ := e.do(t, http.MethodGet, "/api/workers/../logs", ""); r.StatusCode == 200 {
		t.Errorf("bad id: %d", r.StatusCode)
	}

	c := New(Config{Registry: e.reg, Fleet: &fakeFleet{reg: e.reg}})
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodGet, "/api/workers/w-a/logs", nil)
	req.RemoteAddr, req.Host = "127.0.0.1:1", "127.0.0.1:7834"
	c.ServeHTTP(rec, req)
	if rec.Code != http.StatusNotImplemented {
		t.Errorf("logs without a source: %d", rec.Code)
	}
	rec = httptest.NewRecorder()
	req = httptest.NewRequest(http.MethodPost, "/api/chat", strings.NewReader("{}"))
	req.RemoteAddr, req.Host = "127.0.0.1:1", "127.0.0.1:7834"
	req.Header.Set(csrfHeader, "1")
	c.ServeHTTP(rec, req)
	if rec.Code != http.StatusServiceUnavailable || !strings.Contains(rec.Body.String(), "--http-listen") {
		t.Errorf("chat without an API: %d %s", rec.Code, rec.Body)
	}
}

// TestCloseEndsStreams: a graceful stop of the queen's HTTP server waits for requests in flight,
// and a page's stream never ends by itself; Close must end it (and a log follow) at once.
func TestCloseEndsStreams(t *testing.T) {
	reg := registry.New(registry.Config{Interval: time.Second, StaleAfter: time.Hour})
	c := New(Config{Registry: reg, Fleet: &fakeFleet{reg: reg}, Logs: fakeLogs{}})
	srv := httptest.NewServer(c)
	defer srv.Close()
	srv.Config.RegisterOnShutdown(c.Close)

	var bodies []io.ReadCloser
	for _, p := range []string{"/api/events", "/api/workers/w-a/logs?follow=1"} {
		resp, err := http.Get(srv.URL + p)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("GET %s: %v %v", p, err, resp)
		}
		bodies = append(bodies, resp.Body)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if err := srv.Config.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown held by open streams: %v", err)
	}
	rest, _ := io.ReadAll(bodies[1])
	if !strings.Contains(string(rest), "event: end\ndata: \"the queen is shutting down\"") {
		t.Errorf("a log follow ended by Close says %q", rest)
	}
	for _, b := range bodies {
		b.Close()
	}
}
