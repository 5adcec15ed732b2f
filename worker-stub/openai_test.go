package main

// Tests of the OpenAI mode against the real worker-stub binary (built by TestMain): they wait on
// the stub's own log lines and on what the HTTP client receives, never on sleeps; timeouts only
// bound a failure.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/worker/contract"
)

// logOutput collects a process's output and lets a test wait for a line.
type logOutput struct {
	mu      sync.Mutex
	b       bytes.Buffer
	changed chan struct{} // closed and replaced on every write
}

func newLogOutput() *logOutput { return &logOutput{changed: make(chan struct{})} }

func (o *logOutput) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.b.Write(p)
	close(o.changed)
	o.changed = make(chan struct{})
	return len(p), nil
}

func (o *logOutput) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.b.String()
}

// awaitAction returns the nth (1-based) JSON log line whose action is action.
func (o *logOutput) awaitAction(t *testing.T, action string, nth int) map[string]any {
	t.Helper()
	deadline := time.After(waitFor)
	for {
		o.mu.Lock()
		text, changed := o.b.String(), o.changed
		o.mu.Unlock()
		seen := 0
		for line := range strings.Lines(text) {
			var m map[string]any
			if json.Unmarshal([]byte(line), &m) == nil && m["action"] == action {
				if seen++; seen == nth {
					return m
				}
			}
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("no log line %d with action %q within %s", nth, action, waitFor)
			return nil
		}
	}
}

// awaitText waits until the output contains s.
func (o *logOutput) awaitText(t *testing.T, s string) {
	t.Helper()
	deadline := time.After(waitFor)
	for {
		o.mu.Lock()
		found, changed := strings.Contains(o.b.String(), s), o.changed
		o.mu.Unlock()
		if found {
			return
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("output never said %q within %s", s, waitFor)
		}
	}
}

// oaStub is one worker-stub running in OpenAI mode.
type oaStub struct {
	*stub
	addr   string // host:port it listens on
	url    string
	client *http.Client
}

// startOpenAI runs worker-stub --openai --port 0 with extra flags and env, waits until it
// listens, and kills it by PID when the test ends.
func startOpenAI(t *testing.T, env []string, args ...string) *oaStub {
	t.Helper()
	s := launch(t, env, append([]string{"--openai", "--port", "0"}, args...)...)
	start := s.out.awaitAction(t, "worker_start", 1)
	s.addr, _ = start["addr"].(string)
	s.url = "http://" + s.addr
	return s
}

// launch starts worker-stub with args, without waiting for anything.
func launch(t *testing.T, env []string, args ...string) *oaStub {
	t.Helper()
	cmd := exec.Command(stubBin, args...)
	cmd.Env = append(os.Environ(), env...)
	// No keep-alive: no idle connection outlives a test (goleak), and every request is a new
	// connection as a health checker's would be.
	tr := &http.Transport{DisableKeepAlives: true}
	t.Cleanup(tr.CloseIdleConnections) // after the stub is gone (clean-ups run last first)
	return &oaStub{stub: startStub(t, cmd), client: &http.Client{Transport: tr}}
}

func (s *oaStub) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := syscall.Kill(s.pid, sig); err != nil {
		t.Fatal(err)
	}
}

// do sends a request and returns the status and the whole body.
func (s *oaStub) do(t *testing.T, method, path, body string) (int, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), waitFor)
	defer cancel()
	resp, err := s.client.Do(newRequest(t, ctx, method, s.url+path, body))
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading the body: %v", method, path, err)
	}
	return resp.StatusCode, b
}

func newRequest(t *testing.T, ctx context.Context, method, url, body string) *http.Request {
	t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, r)
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	return req
}

// openStream posts body and returns the response of a streamed request, checked to be SSE.
func (s *oaStub) openStream(t *testing.T, ctx context.Context, path, body string) (*http.Response, *sseReader) {
	t.Helper()
	resp, err := s.client.Do(newRequest(t, ctx, http.MethodPost, s.url+path, body))
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("POST %s: %d %q %s; want 200 text/event-stream", path, resp.StatusCode, resp.Header.Get("Content-Type"), b)
	}
	return resp, &sseReader{r: bufio.NewReader(resp.Body)}
}

// sseReader reads server-sent events as the OpenAI servers send them: a "data: " line, then an
// empty line. Anything else is a format error.
type sseReader struct{ r *bufio.Reader }

// errDone is returned by next after "data: [DONE]".
var errDone = errors.New("[DONE]")

func (s *sseReader) next() (string, error) {
	line, err := s.r.ReadString('\n')
	if err != nil {
		return "", err
	}
	data, ok := strings.CutPrefix(line, "data: ")
	if !ok || !strings.HasSuffix(data, "\n") {
		return "", fmt.Errorf("event line %q does not start with \"data: \"", line)
	}
	blank, err := s.r.ReadString('\n')
	if err != nil {
		return "", err
	}
	if blank != "\n" {
		return "", fmt.Errorf("event %q not followed by an empty line but %q", data, blank)
	}
	data = strings.TrimSuffix(data, "\n")
	if data == "[DONE]" {
		return "", errDone
	}
	return data, nil
}

// chunk is a streamed chat.completion.chunk or text_completion.
type chunk struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	Model   string `json:"model"`
	Choices []struct {
		Index int `json:"index"`
		Delta *struct {
			Role    *string `json:"role"`
			Content *string `json:"content"`
		} `json:"delta"`
		Text         *string `json:"text"`
		FinishReason *string `json:"finish_reason"`
	} `json:"choices"`
	Usage *usage `json:"usage"`
}

func (s *sseReader) nextChunk(t *testing.T) chunk {
	t.Helper()
	data, err := s.next()
	if err != nil {
		t.Fatalf("reading an event: %v", err)
	}
	var c chunk
	if err := json.Unmarshal([]byte(data), &c); err != nil {
		t.Fatalf("event %q: %v", data, err)
	}
	return c
}

// tokenOf returns the token a chunk carries, or false for a chunk without one.
func tokenOf(c chunk) (string, bool) {
	if len(c.Choices) != 1 || c.Choices[0].FinishReason != nil {
		return "", false
	}
	ch := c.Choices[0]
	switch {
	case ch.Delta != nil && ch.Delta.Content != nil && ch.Delta.Role == nil:
		return *ch.Delta.Content, true
	case ch.Text != nil:
		return *ch.Text, true
	}
	return "", false
}

// apiErr decodes an OpenAI error body and checks its shape.
func apiErr(t *testing.T, status int, body []byte) apiError {
	t.Helper()
	var e struct {
		Error *apiError `json:"error"`
	}
	if err := json.Unmarshal(body, &e); err != nil || e.Error == nil {
		t.Fatalf("body %q is not an OpenAI error object (%v)", body, err)
	}
	if e.Error.Message == "" || e.Error.Type == "" || e.Error.Code != status {
		t.Fatalf("error %+v: want a message, a type and code %d", *e.Error, status)
	}
	return *e.Error
}

// metricValue reads one sample from /metrics.
func (s *oaStub) metricValue(t *testing.T, sample string) int64 {
	t.Helper()
	code, body := s.do(t, http.MethodGet, "/metrics", "")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d", code)
	}
	for line := range strings.Lines(string(body)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), sample+" "); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				t.Fatalf("/metrics %s: %v", sample, err)
			}
			return n
		}
	}
	t.Fatalf("/metrics has no sample %s:\n%s", sample, body)
	return 0
}

// TestOpenAIHealthFlipsAfterLoad: /health answers llama-server's 503 "Loading model" (and so does
// inference) for --load-time, then 200 {"status":"ok"}.
func TestOpenAIHealthFlipsAfterLoad(t *testing.T) {
	const load = 1500 * time.Millisecond
	t0 := time.Now()
	s := startOpenAI(t, nil, "--load-time", load.String(), "--model", "tiny")

	code, body := s.do(t, http.MethodGet, "/health", "")
	if code != http.StatusServiceUnavailable {
		t.Fatalf("/health while loading: %d %s; want 503", code, body)
	}
	if e := apiErr(t, code, body); e.Message != "Loading model" || e.Type != "unavailable_error" {
		t.Errorf("/health while loading: %+v; want llama-server's Loading model / unavailable_error", e)
	}
	code, body = s.do(t, http.MethodPost, "/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}]}`)
	if code != http.StatusServiceUnavailable {
		t.Errorf("chat while loading: %d %s; want 503", code, body)
	}

	s.out.awaitAction(t, "worker_ready", 1)
	code, body = s.do(t, http.MethodGet, "/health", "")
	if code != http.StatusOK || strings.TrimSpace(string(body)) != `{"status":"ok"}` {
		t.Fatalf("/health after load: %d %s; want 200 {\"status\":\"ok\"}", code, body)
	}
	if took := time.Since(t0); took < load {
		t.Fatalf("healthy %s after start; want no sooner than --load-time %s", took, load)
	}
}

// TestOpenAIChatStream reads a streamed chat completion line by line: a role chunk, one chunk per
// token, a chunk with finish_reason, the usage chunk asked for, then data: [DONE] and the end.
func TestOpenAIChatStream(t *testing.T) {
	s := startOpenAI(t, nil, "--model", "tiny")
	s.out.awaitAction(t, "worker_ready", 1)
	_, ev := s.openStream(t, t.Context(), "/v1/chat/completions",
		`{"model":"tiny","stream":true,"max_tokens":5,"stream_options":{"include_usage":true},
		  "messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"one two three"}]}]}`)

	first := ev.nextChunk(t)
	if first.Object != "chat.completion.chunk" || !strings.HasPrefix(first.ID, "chatcmpl-") || first.Model != "tiny" ||
		first.Created == 0 || len(first.Choices) != 1 || first.Choices[0].Delta == nil ||
		first.Choices[0].Delta.Role == nil || *first.Choices[0].Delta.Role != "assistant" {
		t.Fatalf("first chunk %+v; want the assistant's role in a chat.completion.chunk", first)
	}
	var text strings.Builder
	for i := range 5 {
		c := ev.nextChunk(t)
		tok, ok := tokenOf(c)
		if !ok || c.ID != first.ID || c.Object != first.Object || c.Choices[0].Index != 0 {
			t.Fatalf("chunk %d = %+v; want a token of %s", i, c, first.ID)
		}
		text.WriteString(tok)
	}
	if text.String() != "The bee hums over the" {
		t.Errorf("text %q; want the stub's five words", text.String())
	}
	fin := ev.nextChunk(t)
	if len(fin.Choices) != 1 || fin.Choices[0].FinishReason == nil || *fin.Choices[0].FinishReason != "length" {
		t.Fatalf("chunk after the tokens %+v; want finish_reason length", fin)
	}
	u := ev.nextChunk(t)
	if len(u.Choices) != 0 || u.Usage == nil || *u.Usage != (usage{PromptTokens: 5, CompletionTokens: 5, TotalTokens: 10}) {
		t.Fatalf("usage chunk %+v; want no choices and 5+5=10 tokens", u)
	}
	if _, err := ev.next(); err != errDone {
		t.Fatalf("after the usage chunk: %v; want data: [DONE]", err)
	}
	if _, err := ev.r.ReadByte(); err != io.EOF {
		t.Fatalf("after [DONE]: %v; want the end of the body", err)
	}
	if got := s.metricValue(t, "rbee_stub_requests_finished_total"); got != 1 {
		t.Errorf("finished requests %d; want 1", got)
	}
}

// TestOpenAIWholeAnswers checks the non-streamed shapes: chat.completion and text_completion with
// usage, a streamed text completion, embeddings and the model list.
func TestOpenAIWholeAnswers(t *testing.T) {
	s := startOpenAI(t, nil, "--model", "tiny", "--max-tokens", "3")
	s.out.awaitAction(t, "worker_ready", 1)

	code, body := s.do(t, http.MethodPost, "/v1/chat/completions", `{"model":"tiny","messages":[{"role":"user","content":"a b"}],"max_completion_tokens":4}`)
	var chat struct {
		ID, Object, Model string
		Choices           []struct {
			Index        int
			Message      struct{ Role, Content string }
			FinishReason string `json:"finish_reason"`
		}
		Usage usage
	}
	if err := json.Unmarshal(body, &chat); code != http.StatusOK || err != nil {
		t.Fatalf("chat: %d %s (%v)", code, body, err)
	}
	if chat.Object != "chat.completion" || chat.Model != "tiny" || len(chat.Choices) != 1 ||
		chat.Choices[0].Message.Role != "assistant" || chat.Choices[0].Message.Content != "The bee hums over" ||
		chat.Choices[0].FinishReason != "length" || chat.Usage != (usage{2, 4, 6}) {
		t.Fatalf("chat answer %s; want 4 tokens for a 2-token prompt", body)
	}

	// No max_tokens: the --max-tokens default (3); a prompt of two strings counts both.
	code, body = s.do(t, http.MethodPost, "/v1/completions", `{"prompt":["a b c","d"]}`)
	var cmpl struct {
		Object  string
		Choices []struct{ Text string }
		Usage   usage
	}
	if err := json.Unmarshal(body, &cmpl); code != http.StatusOK || err != nil {
		t.Fatalf("completions: %d %s (%v)", code, body, err)
	}
	if cmpl.Object != "text_completion" || len(cmpl.Choices) != 1 || cmpl.Choices[0].Text != "The bee hums" || cmpl.Usage != (usage{4, 3, 7}) {
		t.Fatalf("completion %s; want 3 tokens for a 4-token prompt", body)
	}

	_, ev := s.openStream(t, t.Context(), "/v1/completions", `{"prompt":"x","stream":true,"max_tokens":2}`)
	for i := range 2 {
		c := ev.nextChunk(t)
		if _, ok := tokenOf(c); !ok || c.Object != "text_completion" {
			t.Fatalf("streamed completion chunk %d = %+v; want a text_completion token", i, c)
		}
	}
	if c := ev.nextChunk(t); c.Choices[0].FinishReason == nil || *c.Choices[0].FinishReason != "length" {
		t.Fatalf("last completion chunk %+v; want finish_reason length", c)
	}
	if _, err := ev.next(); err != errDone {
		t.Fatalf("end of the completion stream: %v; want [DONE]", err)
	}

	code, body = s.do(t, http.MethodPost, "/v1/embeddings", `{"model":"tiny","input":["hello world","hello world","bye"]}`)
	var emb struct {
		Object string
		Data   []struct {
			Object    string
			Index     int
			Embedding []float64
		}
		Usage struct {
			PromptTokens int `json:"prompt_tokens"`
		}
	}
	if err := json.Unmarshal(body, &emb); code != http.StatusOK || err != nil {
		t.Fatalf("embeddings: %d %s (%v)", code, body, err)
	}
	if emb.Object != "list" || len(emb.Data) != 3 || emb.Usage.PromptTokens != 5 {
		t.Fatalf("embeddings %s; want 3 vectors and 5 prompt tokens", body)
	}
	for i, d := range emb.Data {
		var norm float64
		for _, x := range d.Embedding {
			norm += x * x
		}
		if d.Object != "embedding" || d.Index != i || len(d.Embedding) != embeddingDims || math.Abs(norm-1) > 1e-9 {
			t.Fatalf("embedding %d: %+v; want a unit vector of %d", i, d, embeddingDims)
		}
	}
	if fmt.Sprint(emb.Data[0].Embedding) != fmt.Sprint(emb.Data[1].Embedding) || fmt.Sprint(emb.Data[0].Embedding) == fmt.Sprint(emb.Data[2].Embedding) {
		t.Error("embeddings: equal inputs must get equal vectors, different ones different vectors")
	}

	// The official OpenAI clients ask for base64: little-endian float32s of the same vector.
	code, body = s.do(t, http.MethodPost, "/v1/embeddings", `{"input":"hello world","encoding_format":"base64"}`)
	var b64 struct {
		Data []struct{ Embedding string }
	}
	if err := json.Unmarshal(body, &b64); code != http.StatusOK || err != nil || len(b64.Data) != 1 {
		t.Fatalf("base64 embeddings: %d %s (%v)", code, body, err)
	}
	raw, err := base64.StdEncoding.DecodeString(b64.Data[0].Embedding)
	if err != nil || len(raw) != 4*embeddingDims {
		t.Fatalf("base64 embedding %q: %d bytes (%v); want %d float32s", b64.Data[0].Embedding, len(raw), err, embeddingDims)
	}
	for i, want := range emb.Data[0].Embedding {
		if got := math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:])); got != float32(want) {
			t.Fatalf("base64 embedding[%d] = %v; want %v as in the float answer", i, got, float32(want))
		}
	}
	if code, body := s.do(t, http.MethodPost, "/v1/embeddings", `{"input":"x","encoding_format":"int8"}`); code != http.StatusBadRequest {
		t.Fatalf("encoding_format int8: %d %s; want 400", code, body)
	}

	code, body = s.do(t, http.MethodGet, "/v1/models", "")
	var models struct {
		Object string
		Data   []struct{ ID, Object string }
	}
	if err := json.Unmarshal(body, &models); code != http.StatusOK || err != nil || models.Object != "list" ||
		len(models.Data) != 1 || models.Data[0].ID != "tiny" || models.Data[0].Object != "model" {
		t.Fatalf("models: %d %s (%v); want the one model tiny", code, body, err)
	}
}

// TestOpenAIBadRequests: every bad request gets the OpenAI error object with its status.
func TestOpenAIBadRequests(t *testing.T) {
	s := startOpenAI(t, nil, "--model", "tiny")
	s.out.awaitAction(t, "worker_ready", 1)
	msgs := `"messages":[{"role":"user","content":"hi"}]`
	tests := []struct {
		name, method, path, body string
		want                     int
		mention                  string
	}{
		{"malformed JSON", "POST", "/v1/chat/completions", `{"messages":`, 400, "JSON"},
		{"not an object", "POST", "/v1/chat/completions", `[1,2]`, 400, "JSON"},
		{"stream not a boolean", "POST", "/v1/chat/completions", `{"stream":"yes",` + msgs + `}`, 400, "stream"},
		{"model not a string", "POST", "/v1/chat/completions", `{"model":7,` + msgs + `}`, 400, "model"},
		{"no messages", "POST", "/v1/chat/completions", `{"model":"tiny"}`, 400, "messages"},
		{"empty messages", "POST", "/v1/chat/completions", `{"messages":[]}`, 400, "messages"},
		{"content not text", "POST", "/v1/chat/completions", `{"messages":[{"role":"user","content":5}]}`, 400, "content"},
		{"message without role", "POST", "/v1/chat/completions", `{"messages":[{"content":"hi"}]}`, 400, "role"},
		{"negative max_tokens", "POST", "/v1/chat/completions", `{"max_tokens":-1,` + msgs + `}`, 400, "max_tokens"},
		{"huge max_tokens", "POST", "/v1/completions", `{"prompt":"x","max_tokens":1000000000}`, 400, "max_tokens"},
		{"unknown model", "POST", "/v1/chat/completions", `{"model":"other",` + msgs + `}`, 404, "other"},
		{"no prompt", "POST", "/v1/completions", `{"model":"tiny"}`, 400, "prompt"},
		{"prompt not text", "POST", "/v1/completions", `{"prompt":{"a":1}}`, 400, "prompt"},
		{"no input", "POST", "/v1/embeddings", `{"model":"tiny"}`, 400, "input"},
		{"wrong method", "GET", "/v1/chat/completions", "", 405, "POST"},
		{"unknown path", "GET", "/v2/nothing", "", 404, "/v2/nothing"},
		{"body over the cap", "POST", "/v1/completions", `{"prompt":"` + strings.Repeat("x", maxBodyBytes) + `"}`, 413, "body"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, body := s.do(t, tt.method, tt.path, tt.body)
			if code != tt.want {
				t.Fatalf("%s %s: %d %s; want %d", tt.method, tt.path, code, body, tt.want)
			}
			if e := apiErr(t, code, body); !strings.Contains(e.Message, tt.mention) {
				t.Fatalf("error %q does not mention %q", e.Message, tt.mention)
			}
		})
	}
}

// TestOpenAITokensPaced: --tokens-per-second spaces the tokens, and each is flushed when made
// (the first arrives long before the last).
func TestOpenAITokensPaced(t *testing.T) {
	const tps, n = 20, 20
	s := startOpenAI(t, nil, "--tokens-per-second", strconv.Itoa(tps))
	s.out.awaitAction(t, "worker_ready", 1)
	sent := time.Now()
	_, ev := s.openStream(t, t.Context(), "/v1/chat/completions", fmt.Sprintf(`{"stream":true,"max_tokens":%d,"messages":[{"role":"user","content":"x"}]}`, n))
	var arrivals []time.Time
	for {
		data, err := ev.next()
		if err == errDone {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		var c chunk
		if err := json.Unmarshal([]byte(data), &c); err != nil {
			t.Fatal(err)
		}
		if _, ok := tokenOf(c); ok {
			arrivals = append(arrivals, time.Now())
		}
	}
	if len(arrivals) != n {
		t.Fatalf("%d tokens; want %d", len(arrivals), n)
	}
	interval := time.Second / tps
	if took := arrivals[n-1].Sub(sent); took < n*interval {
		t.Errorf("%d tokens at %d/s took %s; want at least %s", n, tps, took, n*interval)
	}
	if gap := arrivals[n-1].Sub(arrivals[0]); gap < n/2*interval {
		t.Errorf("first token only %s before the last; want it flushed as it was made (%s apart)", gap, (n-1)*interval)
	}
}

// TestOpenAICancelStopsGeneration: a client that leaves mid-stream stops the generation at once;
// the stub logs it and counts it in /metrics.
func TestOpenAICancelStopsGeneration(t *testing.T) {
	s := startOpenAI(t, nil, "--tokens-per-second", "50")
	s.out.awaitAction(t, "worker_ready", 1)
	ctx, cancel := context.WithCancel(t.Context())
	// 100,000 tokens at 50/s: only a cancellation ends this within the test's time.
	_, ev := s.openStream(t, ctx, "/v1/chat/completions", `{"stream":true,"max_tokens":100000,"messages":[{"role":"user","content":"x"}]}`)
	ev.nextChunk(t) // role
	if _, ok := tokenOf(ev.nextChunk(t)); !ok {
		t.Fatal("no first token")
	}
	cancel()
	line := s.out.awaitAction(t, "request_cancelled", 1)
	if tokens, _ := line["tokens"].(float64); tokens < 1 || tokens >= 100000 {
		t.Errorf("cancellation logged after %v tokens; want between the first and the last", line["tokens"])
	}
	if got := s.metricValue(t, "rbee_stub_requests_cancelled_total"); got != 1 {
		t.Errorf("rbee_stub_requests_cancelled_total %d; want 1", got)
	}
	if got := s.metricValue(t, `vllm:num_requests_running{model_name="worker-stub"}`); got != 0 {
		t.Errorf("requests running after the cancellation: %d; want 0", got)
	}
	if got := s.metricValue(t, "rbee_stub_requests_finished_total"); got != 0 {
		t.Errorf("finished requests %d; want 0", got)
	}
}

// TestOpenAICancelWholeAnswer: a client that gives up on a non-streamed answer stops its
// generation too.
func TestOpenAICancelWholeAnswer(t *testing.T) {
	s := startOpenAI(t, nil, "--tokens-per-second", "50", "--log-level", "debug")
	s.out.awaitAction(t, "worker_ready", 1)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	req := newRequest(t, ctx, http.MethodPost, s.url+"/v1/completions", `{"prompt":"x","max_tokens":100000}`)
	done := make(chan error, 1)
	go func() {
		resp, err := s.client.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		done <- err
	}()
	s.out.awaitText(t, "request started")
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled request: %v; want context.Canceled", err)
	}
	s.out.awaitAction(t, "request_cancelled", 1)
	if got := s.metricValue(t, "rbee_stub_requests_cancelled_total"); got != 1 {
		t.Errorf("rbee_stub_requests_cancelled_total %d; want 1", got)
	}
}

// TestOpenAIChildrenAndExitAfter: the heartbeat mode's --spawn-children and --exit-after work in
// the OpenAI mode too (a server that forks helpers, a server that crashes while serving).
func TestOpenAIChildrenAndExitAfter(t *testing.T) {
	s := startOpenAI(t, nil, "--spawn-children", "2", "--exit-after", "1s", "--exit-code", "5")
	s.out.awaitAction(t, "worker_children_spawned", 1)
	children := childrenOf(t, s.pid)
	if len(children) != 2 {
		t.Fatalf("server %d has %d children; want 2", s.pid, len(children))
	}
	if st := s.wait(t); st.ExitCode() != 5 {
		t.Fatalf("exit %v; want status 5 from --exit-after", st)
	}
	if !strings.Contains(s.out.String(), "exiting with status 5") {
		t.Fatalf("no last word on stderr:\n%s", s.out.String())
	}
}

// TestOpenAIGauges: with --concurrency 1 a second request waits; /metrics shows one running and
// one waiting under vLLM's and llama-server's names, and the waiting one runs when the first ends.
func TestOpenAIGauges(t *testing.T) {
	s := startOpenAI(t, nil, "--model", "m1", "--concurrency", "1", "--tokens-per-second", "50", "--log-level", "debug")
	s.out.awaitAction(t, "worker_ready", 1)
	body := `{"stream":true,"max_tokens":100000,"messages":[{"role":"user","content":"x"}]}`
	ctxA, cancelA := context.WithCancel(t.Context())
	_, evA := s.openStream(t, ctxA, "/v1/chat/completions", body)
	evA.nextChunk(t)

	ctxB, cancelB := context.WithCancel(t.Context())
	defer cancelB()
	type opened struct {
		resp *http.Response
		err  error
	}
	bDone := make(chan opened, 1)
	reqB := newRequest(t, ctxB, http.MethodPost, s.url+"/v1/chat/completions", body)
	go func() {
		resp, err := s.client.Do(reqB)
		bDone <- opened{resp, err}
	}()
	s.out.awaitText(t, "request waiting for a slot")
	for sample, want := range map[string]int64{
		`vllm:num_requests_running{model_name="m1"}`: 1, `vllm:num_requests_waiting{model_name="m1"}`: 1,
		"llamacpp:requests_processing": 1, "llamacpp:requests_deferred": 1,
	} {
		if got := s.metricValue(t, sample); got != want {
			t.Errorf("%s = %d; want %d", sample, got, want)
		}
	}

	cancelA()
	s.out.awaitAction(t, "request_cancelled", 1)
	var b opened
	select {
	case b = <-bDone:
	case <-time.After(waitFor):
		t.Fatal("the waiting request did not start after the first ended")
	}
	if b.err != nil {
		t.Fatal(b.err)
	}
	defer b.resp.Body.Close()
	evB := &sseReader{r: bufio.NewReader(b.resp.Body)}
	evB.nextChunk(t)
	if got := s.metricValue(t, `vllm:num_requests_waiting{model_name="m1"}`); got != 0 {
		t.Errorf("waiting once the second runs: %d; want 0", got)
	}
	if got := s.metricValue(t, `vllm:num_requests_running{model_name="m1"}`); got != 1 {
		t.Errorf("running once the second runs: %d; want 1", got)
	}
	cancelB()
	s.out.awaitAction(t, "request_cancelled", 2)
}

// TestOpenAIFailLoad: --fail-load answers 503 while loading, then exits with the message on
// stderr and --exit-code, as a server that runs out of GPU memory does.
func TestOpenAIFailLoad(t *testing.T) {
	s := startOpenAI(t, nil, "--load-time", "1s", "--fail-load", "CUDA out of memory", "--exit-code", "3")
	if code, body := s.do(t, http.MethodGet, "/health", ""); code != http.StatusServiceUnavailable {
		t.Fatalf("/health while loading: %d %s; want 503", code, body)
	}
	if st := s.wait(t); st.ExitCode() != 3 {
		t.Fatalf("exit %v; want status 3", st)
	}
	if out := s.out.String(); !strings.Contains(out, "worker-stub: failed to load model: CUDA out of memory\n") {
		t.Fatalf("stderr does not name the failure:\n%s", out)
	}
}

// TestOpenAIHang: --hang accepts connections and never answers; SIGTERM still stops it.
func TestOpenAIHang(t *testing.T) {
	s := startOpenAI(t, nil, "--hang")
	conn, err := net.Dial("tcp", s.addr)
	if err != nil {
		t.Fatalf("dial a hanging server: %v; want the connection accepted", err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	var buf [1]byte
	if n, err := conn.Read(buf[:]); n != 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read from a hanging server: %d bytes, %v; want nothing until the deadline", n, err)
	}
	s.signal(t, syscall.SIGTERM)
	if st := s.wait(t); st.ExitCode() != 0 {
		t.Fatalf("exit after SIGTERM: %v; want 0", st)
	}
}

// TestOpenAIHangAfter: once --hang-after has passed, health checks are read and never answered;
// SIGTERM still stops the server (the wedged requests are cut after the drain).
func TestOpenAIHangAfter(t *testing.T) {
	s := startOpenAI(t, nil, "--hang-after", "500ms", "--drain-timeout", "200ms")
	s.out.awaitAction(t, "worker_ready", 1)
	if code, _ := s.do(t, http.MethodGet, "/health", ""); code != http.StatusOK {
		t.Fatalf("/health before --hang-after: %d; want 200", code)
	}
	s.out.awaitAction(t, "worker_hang", 1)
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	resp, err := s.client.Do(newRequest(t, ctx, http.MethodGet, s.url+"/health", ""))
	if err == nil {
		resp.Body.Close()
		t.Fatalf("/health after --hang-after answered %d; want no answer", resp.StatusCode)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("/health after --hang-after: %v; want the client's deadline to pass", err)
	}
	// One more, left hanging for shutdown to cut.
	stuck := newRequest(t, t.Context(), http.MethodGet, s.url+"/health", "")
	go func() {
		if resp, err := s.client.Do(stuck); err == nil {
			resp.Body.Close()
		}
	}()
	s.signal(t, syscall.SIGTERM)
	if st := s.wait(t); st.ExitCode() != 0 {
		t.Fatalf("exit after SIGTERM: %v; want 0", st)
	}
}

// TestOpenAIUnhealthyAfter: /health turns 503 once --unhealthy-after requests have been answered.
func TestOpenAIUnhealthyAfter(t *testing.T) {
	s := startOpenAI(t, nil, "--unhealthy-after", "2")
	s.out.awaitAction(t, "worker_ready", 1)
	for i := range 2 {
		if code, body := s.do(t, http.MethodGet, "/health", ""); code != http.StatusOK {
			t.Fatalf("/health after %d requests: %d %s; want 200", i, code, body)
		}
		if code, body := s.do(t, http.MethodPost, "/v1/completions", `{"prompt":"x","max_tokens":1}`); code != http.StatusOK {
			t.Fatalf("request %d: %d %s", i+1, code, body)
		}
	}
	code, body := s.do(t, http.MethodGet, "/health", "")
	if code != http.StatusServiceUnavailable || !strings.Contains(apiErr(t, code, body).Message, "unhealthy") {
		t.Fatalf("/health after 2 requests: %d %s; want 503 unhealthy", code, body)
	}
}

// TestOpenAIDieMidStream: the process exits after --die-mid-stream-after tokens; the client gets
// those tokens, then a cut body without [DONE].
func TestOpenAIDieMidStream(t *testing.T) {
	s := startOpenAI(t, nil, "--die-mid-stream-after", "3", "--exit-code", "4")
	s.out.awaitAction(t, "worker_ready", 1)
	_, ev := s.openStream(t, t.Context(), "/v1/chat/completions", `{"stream":true,"max_tokens":10,"messages":[{"role":"user","content":"x"}]}`)
	ev.nextChunk(t) // role
	for i := range 3 {
		if _, ok := tokenOf(ev.nextChunk(t)); !ok {
			t.Fatalf("event %d is not a token", i)
		}
	}
	if data, err := ev.next(); err == nil || err == errDone {
		t.Fatalf("after 3 tokens: %q, %v; want the stream cut", data, err)
	}
	if st := s.wait(t); st.ExitCode() != 4 {
		t.Fatalf("exit %v; want status 4", st)
	}
	if !strings.Contains(s.out.String(), "dying after 3 tokens") {
		t.Fatalf("no last word on stderr:\n%s", s.out.String())
	}
}

// TestOpenAIIgnoreSIGTERM: with --ignore-sigterm the server keeps serving after SIGTERM.
func TestOpenAIIgnoreSIGTERM(t *testing.T) {
	s := startOpenAI(t, nil, "--ignore-sigterm")
	s.out.awaitAction(t, "worker_ready", 1)
	s.signal(t, syscall.SIGTERM)
	s.out.awaitAction(t, "worker_sigterm_ignored", 1)
	if code, body := s.do(t, http.MethodGet, "/health", ""); code != http.StatusOK {
		t.Fatalf("/health after an ignored SIGTERM: %d %s; want 200", code, body)
	}
}

// TestOpenAISIGTERMDrains: on SIGTERM the server stops accepting, lets the stream in flight
// finish, lingers --shutdown-delay and exits 0.
func TestOpenAISIGTERMDrains(t *testing.T) {
	const delay = time.Second
	s := startOpenAI(t, nil, "--tokens-per-second", "50", "--shutdown-delay", delay.String())
	s.out.awaitAction(t, "worker_ready", 1)
	_, ev := s.openStream(t, t.Context(), "/v1/chat/completions", `{"stream":true,"max_tokens":25,"messages":[{"role":"user","content":"x"}]}`)
	ev.nextChunk(t) // role
	sigAt := time.Now()
	s.signal(t, syscall.SIGTERM)
	tokens := 0
	for {
		data, err := ev.next()
		if err == errDone {
			break
		}
		if err != nil {
			t.Fatalf("stream during the drain: %v after %d tokens; want it finished", err, tokens)
		}
		var c chunk
		json.Unmarshal([]byte(data), &c)
		if _, ok := tokenOf(c); ok {
			tokens++
		}
	}
	if tokens != 25 {
		t.Fatalf("%d tokens during the drain; want all 25", tokens)
	}
	s.out.awaitAction(t, "worker_shutdown_delay", 1)
	if c, err := net.Dial("tcp", s.addr); err == nil {
		c.Close()
		t.Fatal("a stopping server accepted a new connection")
	}
	if st := s.wait(t); st.ExitCode() != 0 {
		t.Fatalf("exit after SIGTERM: %v; want 0", st)
	}
	if took := time.Since(sigAt); took < delay {
		t.Fatalf("exited %s after SIGTERM; want no sooner than --shutdown-delay %s", took, delay)
	}
}

// TestOpenAIDrainTimeoutCuts: a stream longer than --drain-timeout is cut, and the server exits 0.
func TestOpenAIDrainTimeoutCuts(t *testing.T) {
	s := startOpenAI(t, nil, "--tokens-per-second", "50", "--drain-timeout", "300ms")
	s.out.awaitAction(t, "worker_ready", 1)
	_, ev := s.openStream(t, t.Context(), "/v1/chat/completions", `{"stream":true,"max_tokens":100000,"messages":[{"role":"user","content":"x"}]}`)
	ev.nextChunk(t)
	s.signal(t, syscall.SIGTERM)
	for {
		_, err := ev.next()
		if err == errDone {
			t.Fatal("a 100,000-token stream finished within the drain")
		}
		if err != nil {
			break
		}
	}
	s.out.awaitAction(t, "request_cut", 1)
	if st := s.wait(t); st.ExitCode() != 0 {
		t.Fatalf("exit after SIGTERM: %v; want 0", st)
	}
}

// TestOpenAIWorkerHost: the host comes from RBEE_WORKER_HOST; the marker RBEE_WORKER_ID the
// server inherits from its supervisor needs no --worker-id.
func TestOpenAIWorkerHost(t *testing.T) {
	s := startOpenAI(t, []string{contract.EnvWorkerHost + "=127.0.0.2", contract.EnvWorkerID + "=w-inherited"})
	if host, _, _ := net.SplitHostPort(s.addr); host != "127.0.0.2" {
		t.Fatalf("listening on %s; want host 127.0.0.2 from $%s", s.addr, contract.EnvWorkerHost)
	}
	s.out.awaitAction(t, "worker_ready", 1)
	if code, _ := s.do(t, http.MethodGet, "/health", ""); code != http.StatusOK {
		t.Fatalf("/health on 127.0.0.2: %d", code)
	}
}

// TestOpenAICommandLine: the OpenAI mode's flag checks exit 2 before serving.
func TestOpenAICommandLine(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		wantOut string
	}{
		{"knob without --openai", []string{"--worker-id", "a", "--load-time", "1s"}, "--load-time needs --openai"},
		{"negative speed", []string{"--openai", "--tokens-per-second", "-1"}, "--tokens-per-second"},
		{"negative max tokens", []string{"--openai", "--max-tokens", "-3"}, "--max-tokens"},
		{"negative concurrency", []string{"--openai", "--concurrency", "-1"}, "--concurrency"},
		{"negative die", []string{"--openai", "--die-mid-stream-after", "-1"}, "--die-mid-stream-after"},
		{"heartbeat flag", []string{"--openai", "--queen", "127.0.0.1:1"}, "heartbeat mode"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := launch(t, nil, tt.args...)
			st := s.wait(t)
			if st.ExitCode() != 2 || !strings.Contains(s.out.String(), tt.wantOut) {
				t.Fatalf("worker-stub %v: status %d, output %q; want 2 and %q", tt.args, st.ExitCode(), s.out.String(), tt.wantOut)
			}
		})
	}
}
