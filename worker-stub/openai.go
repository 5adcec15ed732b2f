package main

// The OpenAI mode's HTTP API, shaped after what llama.cpp's llama-server and vLLM answer (their
// documentation: llama.cpp tools/server/README.md, vLLM's "Production Metrics"), so that what
// passes against the stub also works against the real servers:
//
//	GET  /health, /v1/health   503 {"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}
//	                           while loading, then 200 {"status":"ok"}
//	GET  /v1/models            {"object":"list","data":[{"id":...,"object":"model",...}]}
//	POST /v1/chat/completions  chat.completion, or with "stream": true server-sent events of
//	                           chat.completion.chunk: a role chunk, one chunk per token, a chunk
//	                           with finish_reason, a usage chunk when stream_options.include_usage,
//	                           then "data: [DONE]"
//	POST /v1/completions       text_completion, streamed the same way
//	POST /v1/embeddings        {"object":"list","data":[{"object":"embedding",...}],...}
//	GET  /metrics              Prometheus text: vllm:num_requests_running/waiting (and the
//	                           llamacpp:requests_processing/deferred gauges), token counters,
//	                           rbee_stub_requests_cancelled_total
//
// Errors use the OpenAI error object {"error":{"message","type","param","code"}}, with the HTTP
// status as code as llama-server and vLLM do.

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rbee-dev/rbee/internal/narrate"
	"go.uber.org/zap"
)

// maxBodyBytes caps a request body; a larger one is refused with 413.
const maxBodyBytes = 16 << 20

// embeddingDims is the length of the stub's embedding vectors.
const embeddingDims = 16

// words are the stub's vocabulary: generated text cycles through them, one word a token.
var words = []string{"The", " bee", " hums", " over", " the", " hive", ",", " and", " the", " queen", " keeps", " count", "."}

// quotedWords are words as JSON strings.
var quotedWords = func() [][]byte {
	q := make([][]byte, len(words))
	for i, w := range words {
		q[i], _ = json.Marshal(w)
	}
	return q
}()

// stubServer is the OpenAI-compatible API of the stub. Its zero value is not usable; see
// newStubServer.
type stubServer struct {
	cfg   openaiConfig
	model string // served model name; "" accepts any
	log   *zap.Logger
	ctx   context.Context // cancelled when the server cuts requests (shutdown past the drain)
	// die ends the process mid-generation (--die-mid-stream-after), with a last word on stderr.
	die func(tokens int)

	routes   map[string]route
	handlers sync.WaitGroup // ServeHTTP calls in progress, for shutdown to wait on after a cut
	loaded   atomic.Bool
	hung     atomic.Bool   // --hang-after has passed: nothing is answered any more
	slots    chan struct{} // nil: no --concurrency limit
	created  int64         // unix seconds, for /v1/models
	ids      atomic.Uint64

	running, waiting            atomic.Int64
	finished, cancelled, cut    atomic.Int64 // inference requests
	promptTokens, genTokens     atomic.Int64
	chatReqs, complReqs, embReq atomic.Int64
}

func newStubServer(ctx context.Context, cfg openaiConfig, model string, log *zap.Logger, die func(int)) *stubServer {
	s := &stubServer{cfg: cfg, model: model, log: log, ctx: ctx, die: die, created: time.Now().Unix()}
	if cfg.concurrency > 0 {
		s.slots = make(chan struct{}, cfg.concurrency)
	}
	s.routes = map[string]route{
		"/health":              {http.MethodGet, s.health, false},
		"/v1/health":           {http.MethodGet, s.health, false},
		"/metrics":             {http.MethodGet, s.metrics, false},
		"/v1/models":           {http.MethodGet, s.models, true},
		"/v1/chat/completions": {http.MethodPost, s.chat, true},
		"/v1/completions":      {http.MethodPost, s.completions, true},
		"/v1/embeddings":       {http.MethodPost, s.embeddings, true},
	}
	return s
}

// apiError is the OpenAI error object.
type apiError struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    int     `json:"code"`
}

func writeError(w http.ResponseWriter, status int, typ, format string, args ...any) {
	writeJSON(w, status, map[string]apiError{"error": {Message: fmt.Sprintf(format, args...), Type: typ, Code: status}})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(append(b, '\n')) //nolint:errcheck // a client gone is not the server's problem
}

// route is one endpoint of the API.
type route struct {
	method string
	h      http.HandlerFunc
	loaded bool // answers 503 while the model loads, as llama-server does
}

func (s *stubServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.handlers.Add(1)
	defer s.handlers.Done()
	if s.hung.Load() {
		// A wedged server: the request was read, no answer comes until the client gives up
		// (or shutdown cuts it).
		<-r.Context().Done()
		return
	}
	rt, ok := s.routes[r.URL.Path]
	switch {
	case !ok:
		writeError(w, http.StatusNotFound, "not_found_error", "no route %s %s", r.Method, r.URL.Path)
	case r.Method != rt.method:
		w.Header().Set("Allow", rt.method)
		writeError(w, http.StatusMethodNotAllowed, "invalid_request_error", "%s %s: method not allowed, use %s", r.Method, r.URL.Path, rt.method)
	case rt.loaded && !s.loaded.Load():
		writeError(w, http.StatusServiceUnavailable, "unavailable_error", "Loading model")
	default:
		rt.h(w, r)
	}
}

func (s *stubServer) health(w http.ResponseWriter, _ *http.Request) {
	switch {
	case !s.loaded.Load():
		writeError(w, http.StatusServiceUnavailable, "unavailable_error", "Loading model")
	case s.cfg.unhealthyAfter > 0 && s.finished.Load() >= int64(s.cfg.unhealthyAfter):
		writeError(w, http.StatusServiceUnavailable, "unavailable_error", "unhealthy after %d requests (--unhealthy-after)", s.cfg.unhealthyAfter)
	default:
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	}
}

func (s *stubServer) servedModel(asked string) string {
	if asked != "" {
		return asked
	}
	if s.model != "" {
		return s.model
	}
	return "worker-stub"
}

func (s *stubServer) models(w http.ResponseWriter, _ *http.Request) {
	type model struct {
		ID      string `json:"id"`
		Object  string `json:"object"`
		Created int64  `json:"created"`
		OwnedBy string `json:"owned_by"`
	}
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": []model{{
		ID: s.servedModel(""), Object: "model", Created: s.created, OwnedBy: "rbee",
	}}})
}

// request is the part of a completion, chat or embeddings body the stub reads. Pointers tell a
// missing field from a zero one; json's type errors name the field that has the wrong type.
type request struct {
	Model               *string          `json:"model"`
	Messages            *[]chatMessage   `json:"messages"`
	Prompt              *json.RawMessage `json:"prompt"`
	Input               *json.RawMessage `json:"input"`
	Stream              *bool            `json:"stream"`
	MaxTokens           *int             `json:"max_tokens"`
	MaxCompletionTokens *int             `json:"max_completion_tokens"`
	EncodingFormat      *string          `json:"encoding_format"`
	StreamOptions       *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
}

type chatMessage struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

// decode reads and checks the body common to every POST endpoint; on a bad one it has written
// the error and returns false.
func (s *stubServer) decode(w http.ResponseWriter, r *http.Request) (request, bool) {
	var req request
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			writeError(w, http.StatusRequestEntityTooLarge, "invalid_request_error", "request body over %d bytes", tooBig.Limit)
		} else {
			writeError(w, http.StatusBadRequest, "invalid_request_error", "reading the request body: %v", err)
		}
		return req, false
	}
	if err := json.Unmarshal(body, &req); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) && typeErr.Field != "" {
			writeError(w, http.StatusBadRequest, "invalid_request_error", "`%s` must be of type %s, not %s", typeErr.Field, typeErr.Type, typeErr.Value)
		} else {
			writeError(w, http.StatusBadRequest, "invalid_request_error", "the body is not a JSON object: %v", err)
		}
		return req, false
	}
	asked := ""
	if req.Model != nil {
		asked = *req.Model
	}
	if s.model != "" && asked != "" && asked != s.model {
		// vLLM's answer to a model it does not serve.
		writeError(w, http.StatusNotFound, "NotFoundError", "The model `%s` does not exist.", asked)
		return req, false
	}
	return req, true
}

// maxTokensOf returns the request's token budget: max_completion_tokens, else max_tokens, else
// the --max-tokens default.
func (s *stubServer) maxTokensOf(w http.ResponseWriter, req request) (int, bool) {
	n := s.cfg.maxTokens
	for _, f := range []struct {
		name string
		v    *int
	}{{"max_tokens", req.MaxTokens}, {"max_completion_tokens", req.MaxCompletionTokens}} {
		if f.v == nil {
			continue
		}
		if *f.v < 0 || *f.v > maxTokensLimit {
			writeError(w, http.StatusBadRequest, "invalid_request_error", "`%s` must be in 0..%d, got %d", f.name, maxTokensLimit, *f.v)
			return 0, false
		}
		n = *f.v
	}
	return n, true
}

// countWords is the stub's tokenizer: one token a whitespace-separated word.
func countWords(s string) int { return len(strings.Fields(s)) }

// promptTokensOf counts the tokens of a prompt or input: a string, an array of strings, an array
// of token ids or an array of such arrays.
func promptTokensOf(raw json.RawMessage) (int, error) {
	var str string
	if json.Unmarshal(raw, &str) == nil {
		return countWords(str), nil
	}
	var list []json.RawMessage
	if err := json.Unmarshal(raw, &list); err != nil || len(list) == 0 {
		return 0, errors.New("must be a string or a non-empty array of strings or token ids")
	}
	n := 0
	for _, item := range list {
		var tok int
		if json.Unmarshal(item, &tok) == nil {
			n++
			continue
		}
		k, err := promptTokensOf(item)
		if err != nil {
			return 0, err
		}
		n += k
	}
	return n, nil
}

// messageTokens counts the tokens of a chat's messages, whose content is a string or an array of
// parts ({"type":"text","text":...}).
func messageTokens(msgs []chatMessage) (int, error) {
	n := 0
	for i, m := range msgs {
		if m.Role == "" {
			return 0, fmt.Errorf("messages[%d].role is missing", i)
		}
		if len(m.Content) == 0 || string(m.Content) == "null" {
			continue // an assistant message with tool calls only
		}
		var str string
		if json.Unmarshal(m.Content, &str) == nil {
			n += countWords(str)
			continue
		}
		var parts []struct {
			Type string `json:"type"`
			Text string `json:"text"`
		}
		if err := json.Unmarshal(m.Content, &parts); err != nil {
			return 0, fmt.Errorf("messages[%d].content must be a string or an array of parts", i)
		}
		for _, p := range parts {
			n += countWords(p.Text)
		}
	}
	return n, nil
}

type usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

func (s *stubServer) chat(w http.ResponseWriter, r *http.Request) {
	s.chatReqs.Add(1)
	req, ok := s.decode(w, r)
	if !ok {
		return
	}
	if req.Messages == nil || len(*req.Messages) == 0 {
		writeError(w, http.StatusBadRequest, "invalid_request_error", "`messages` is required and must be a non-empty array")
		return
	}
	prompt, err := messageTokens(*req.Messages)
	if err != nil {
		writeError(w, http.StatusBadRequest, "invalid_request_error", "%v", err)
		return
	}
	s.complete(w, r, req, prompt, true)
}

func (s *stubServer) completions(w http.ResponseWriter, r *http.Request) {
	s.complReqs.Add(1)
	req, ok := s.decode(w, r)
	if !ok {
		return
	}
	if req.Prompt == nil {
		writeError(w, http.StatusBadRequest, "invalid_request_error", "`prompt` is required")
		return
	}
	prompt, err := promptTokensOf(*req.Prompt)
	if err != nil {
		writeError(w, http.StatusBadRequest, "invalid_request_error", "`prompt` %v", err)
		return
	}
	s.complete(w, r, req, prompt, false)
}

// complete generates the answer of a chat (chat) or text completion, streamed or whole.
func (s *stubServer) complete(w http.ResponseWriter, r *http.Request, req request, promptTokens int, chat bool) {
	n, ok := s.maxTokensOf(w, req)
	if !ok {
		return
	}
	model := ""
	if req.Model != nil {
		model = *req.Model
	}
	model = s.servedModel(model)
	seq := strconv.FormatUint(s.ids.Add(1), 10)
	id, object := "cmpl-stub"+seq, "text_completion"
	if chat {
		id, object = "chatcmpl-stub"+seq, "chat.completion"
	}
	created := time.Now().Unix()
	ctx := r.Context()
	release, ok := s.admit(ctx, id)
	if !ok {
		return
	}
	defer release()
	s.promptTokens.Add(int64(promptTokens))
	stream := req.Stream != nil && *req.Stream
	s.log.Debug("request started", zap.String("request_id", id), zap.Bool("stream", stream), zap.Int("max_tokens", n),
		zap.Int("prompt_tokens", promptTokens))
	// ended releases the slot before the end is told, so that whoever reads the log line and then
	// /metrics sees the request gone.
	ended := func(got int, err error) bool {
		release()
		if err != nil {
			s.stopped(id, got, n)
			return false
		}
		s.finished.Add(1)
		return true
	}

	if stream {
		// OpenAI streams chat as chat.completion.chunk objects, completions as text_completion.
		if chat {
			object = "chat.completion.chunk"
		}
		s.stream(ctx, w, id, object, model, created, n, promptTokens, chat,
			req.StreamOptions != nil && req.StreamOptions.IncludeUsage, ended)
		return
	}
	var text strings.Builder
	got, err := s.generate(ctx, n, func(i int, tok string) error { text.WriteString(tok); return nil })
	if !ended(got, err) {
		return
	}
	u := usage{PromptTokens: promptTokens, CompletionTokens: got, TotalTokens: promptTokens + got}
	var choice any
	if chat {
		choice = map[string]any{"index": 0, "message": map[string]string{"role": "assistant", "content": text.String()},
			"logprobs": nil, "finish_reason": "length"}
	} else {
		choice = map[string]any{"index": 0, "text": text.String(), "logprobs": nil, "finish_reason": "length"}
	}
	writeJSON(w, http.StatusOK, map[string]any{"id": id, "object": object, "created": created, "model": model,
		"choices": []any{choice}, "usage": u})
}

// admit takes a generation slot (--concurrency), counting the request as waiting meanwhile; the
// returned func gives it back. It is false when the client left while waiting.
func (s *stubServer) admit(ctx context.Context, id string) (func(), bool) {
	if s.slots != nil {
		select {
		case s.slots <- struct{}{}:
		default:
			s.waiting.Add(1)
			s.log.Debug("request waiting for a slot", zap.String("request_id", id), zap.Int("concurrency", s.cfg.concurrency))
			select {
			case s.slots <- struct{}{}:
				s.waiting.Add(-1)
			case <-ctx.Done():
				s.waiting.Add(-1)
				s.stopped(id, 0, 0)
				return nil, false
			}
		}
	}
	s.running.Add(1)
	var once sync.Once
	return func() {
		once.Do(func() {
			s.running.Add(-1)
			if s.slots != nil {
				<-s.slots
			}
		})
	}, true
}

// stopped records a request that ended before its last token: the client left (cancelled), or
// the server cut it on shutdown.
func (s *stubServer) stopped(id string, got, want int) {
	ctx := narrate.WithLogger(context.Background(), s.log)
	if s.ctx.Err() != nil {
		s.cut.Add(1)
		narrate.Warn(ctx, actor, "request_cut", "request cut by shutdown", zap.String("request_id", id),
			zap.Int("tokens", got), zap.Int("max_tokens", want))
		return
	}
	s.cancelled.Add(1)
	narrate.Event(ctx, actor, "request_cancelled", "request cancelled by client", zap.String("request_id", id),
		zap.Int("tokens", got), zap.Int("max_tokens", want))
}

// generate produces n tokens at --tokens-per-second, calling emit for each. It stops at once when
// ctx ends (the client left, or shutdown cut it) and returns how many tokens were emitted.
func (s *stubServer) generate(ctx context.Context, n int, emit func(i int, tok string) error) (int, error) {
	var interval time.Duration
	if s.cfg.tokensPerSecond > 0 {
		interval = time.Duration(float64(time.Second) / s.cfg.tokensPerSecond)
	}
	start := time.Now()
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for i := range n {
		if interval > 0 {
			// Token i is due one interval after token i-1 was due: no drift from slow writes.
			wait := time.Until(start.Add(time.Duration(i+1) * interval))
			if timer == nil {
				timer = time.NewTimer(wait)
			} else {
				timer.Reset(wait)
			}
			select {
			case <-timer.C:
			case <-ctx.Done():
				return i, ctx.Err()
			}
		} else if err := ctx.Err(); err != nil {
			return i, err
		}
		if err := emit(i, words[i%len(words)]); err != nil {
			return i, err
		}
		s.genTokens.Add(1)
		if s.cfg.dieMidStreamAfter > 0 && i+1 == s.cfg.dieMidStreamAfter {
			s.die(i + 1)
		}
	}
	return n, nil
}

// stream answers as server-sent events, each flushed as soon as it is written. It calls ended
// once: with the error that stopped it early, or with nil before the final "data: [DONE]" (so
// that a client reading [DONE] finds the request counted).
func (s *stubServer) stream(ctx context.Context, w http.ResponseWriter, id, object, model string, created int64,
	n, promptTokens int, chat, includeUsage bool, ended func(int, error) bool) {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("Connection", "keep-alive")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	buf := make([]byte, 0, 512)
	write := func(b []byte) error {
		if _, err := w.Write(b); err != nil {
			return err
		}
		return rc.Flush()
	}
	send := func(v any) error {
		b, err := json.Marshal(v)
		if err != nil {
			return err
		}
		buf = append(append(append(buf[:0], "data: "...), b...), "\n\n"...)
		return write(buf)
	}
	chunk := func(choice map[string]any) map[string]any {
		return map[string]any{"id": id, "object": object, "created": created, "model": model, "choices": []any{choice}}
	}
	if chat {
		// vLLM and llama-server open a chat stream with the assistant's role.
		if err := send(chunk(map[string]any{"index": 0, "delta": map[string]string{"role": "assistant", "content": ""},
			"logprobs": nil, "finish_reason": nil})); err != nil {
			ended(0, err)
			return
		}
	}
	// A token's chunk differs from the next only in its text: marshal the rest once, so that the
	// stub is not the bottleneck of a relay benchmark.
	head, err := json.Marshal(map[string]any{"id": id, "object": object, "created": created, "model": model})
	if err != nil {
		ended(0, err)
		return
	}
	prefix := append(append([]byte("data: "), head[:len(head)-1]...), `,"choices":[{"index":0,"logprobs":null,"finish_reason":null,"text":`...)
	if chat {
		prefix = append(append([]byte("data: "), head[:len(head)-1]...), `,"choices":[{"index":0,"logprobs":null,"finish_reason":null,"delta":{"content":`...)
	}
	suffix := "}]}\n\n"
	if chat {
		suffix = "}}]}\n\n"
	}
	got, err := s.generate(ctx, n, func(i int, _ string) error {
		buf = append(append(append(buf[:0], prefix...), quotedWords[i%len(quotedWords)]...), suffix...)
		return write(buf)
	})
	if err != nil {
		ended(got, err)
		return
	}
	var last map[string]any
	if chat {
		last = chunk(map[string]any{"index": 0, "delta": map[string]string{}, "logprobs": nil, "finish_reason": "length"})
	} else {
		last = chunk(map[string]any{"index": 0, "text": "", "logprobs": nil, "finish_reason": "length"})
	}
	if err := send(last); err != nil {
		ended(got, err)
		return
	}
	if includeUsage {
		// OpenAI's stream_options.include_usage: one more chunk with no choices and the usage.
		u := map[string]any{"id": id, "object": object, "created": created, "model": model, "choices": []any{},
			"usage": usage{PromptTokens: promptTokens, CompletionTokens: got, TotalTokens: promptTokens + got}}
		if err := send(u); err != nil {
			ended(got, err)
			return
		}
	}
	ended(got, nil)
	write([]byte("data: [DONE]\n\n")) //nolint:errcheck // every token was delivered; a client gone now lost nothing

}

func (s *stubServer) embeddings(w http.ResponseWriter, r *http.Request) {
	s.embReq.Add(1)
	req, ok := s.decode(w, r)
	if !ok {
		return
	}
	if req.Input == nil {
		writeError(w, http.StatusBadRequest, "invalid_request_error", "`input` is required")
		return
	}
	var inputs []json.RawMessage
	var one string
	if json.Unmarshal(*req.Input, &one) == nil {
		inputs = []json.RawMessage{*req.Input}
	} else if err := json.Unmarshal(*req.Input, &inputs); err != nil || len(inputs) == 0 {
		writeError(w, http.StatusBadRequest, "invalid_request_error", "`input` must be a string or a non-empty array")
		return
	}
	// An array of token ids is one input, not many.
	var tok int
	if json.Unmarshal(inputs[0], &tok) == nil {
		inputs = []json.RawMessage{*req.Input}
	}
	// OpenAI's official clients ask for base64 (little-endian float32) by default; float is the
	// API's default. vLLM and llama-server answer both.
	base64Format := false
	if f := req.EncodingFormat; f != nil {
		switch *f {
		case "float":
		case "base64":
			base64Format = true
		default:
			writeError(w, http.StatusBadRequest, "invalid_request_error", "`encoding_format` must be float or base64, not %q", *f)
			return
		}
	}
	type embedding struct {
		Object    string `json:"object"`
		Index     int    `json:"index"`
		Embedding any    `json:"embedding"` // []float64, or a base64 string
	}
	data := make([]embedding, len(inputs))
	total := 0
	for i, in := range inputs {
		k, err := promptTokensOf(in)
		if err != nil {
			writeError(w, http.StatusBadRequest, "invalid_request_error", "`input[%d]` %v", i, err)
			return
		}
		total += k
		var vec any = embed(in)
		if base64Format {
			vec = float32Base64(embed(in))
		}
		data[i] = embedding{Object: "embedding", Index: i, Embedding: vec}
	}
	model := ""
	if req.Model != nil {
		model = *req.Model
	}
	s.promptTokens.Add(int64(total))
	s.finished.Add(1)
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": data, "model": s.servedModel(model),
		"usage": map[string]int{"prompt_tokens": total, "total_tokens": total}})
}

// float32Base64 encodes v as OpenAI's base64 embedding format: little-endian float32s.
func float32Base64(v []float64) string {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(float32(x)))
	}
	return base64.StdEncoding.EncodeToString(b)
}

// embed derives a unit vector from the input's bytes: the same input always gets the same vector.
func embed(in []byte) []float64 {
	v := make([]float64, embeddingDims)
	var norm float64
	for i := range v {
		h := fnv.New64a()
		h.Write([]byte{byte(i)})
		h.Write(in)
		v[i] = float64(int64(h.Sum64()>>11))/float64(1<<52) - 1
		norm += v[i] * v[i]
	}
	norm = math.Sqrt(norm)
	for i := range v {
		v[i] /= norm
	}
	return v
}

// metrics writes the Prometheus text format: the gauges routers read from vLLM and llama-server,
// under both servers' names, and the stub's own counters.
func (s *stubServer) metrics(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	label := `{model_name="` + strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace(s.servedModel("")) + `"}`
	var b strings.Builder
	metric := func(name, typ, help, labels string, v int64) {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n%s%s %d\n", name, help, name, typ, name, labels, v)
	}
	running, waiting := s.running.Load(), s.waiting.Load()
	metric("vllm:num_requests_running", "gauge", "Number of requests currently running.", label, running)
	metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", label, waiting)
	metric("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", label, s.promptTokens.Load())
	metric("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.", label, s.genTokens.Load())
	metric("llamacpp:requests_processing", "gauge", "Number of requests processing.", "", running)
	metric("llamacpp:requests_deferred", "gauge", "Number of requests deferred.", "", waiting)
	metric("llamacpp:prompt_tokens_total", "counter", "Number of prompt tokens processed.", "", s.promptTokens.Load())
	metric("llamacpp:tokens_predicted_total", "counter", "Number of generation tokens processed.", "", s.genTokens.Load())
	metric("rbee_stub_requests_finished_total", "counter", "Inference requests answered in full.", "", s.finished.Load())
	metric("rbee_stub_requests_cancelled_total", "counter", "Inference requests whose client left before the end; generation stopped.", "", s.cancelled.Load())
	metric("rbee_stub_requests_cut_total", "counter", "Inference requests cut by shutdown after --drain-timeout.", "", s.cut.Load())
	b.WriteString("# HELP rbee_stub_requests_total Inference requests received, by endpoint.\n# TYPE rbee_stub_requests_total counter\n")
	fmt.Fprintf(&b, "rbee_stub_requests_total{endpoint=\"chat\"} %d\n", s.chatReqs.Load())
	fmt.Fprintf(&b, "rbee_stub_requests_total{endpoint=\"completions\"} %d\n", s.complReqs.Load())
	fmt.Fprintf(&b, "rbee_stub_requests_total{endpoint=\"embeddings\"} %d\n", s.embReq.Load())
	io.WriteString(w, b.String()) //nolint:errcheck
}
