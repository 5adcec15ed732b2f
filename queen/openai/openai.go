// Package openai is the queen's OpenAI-compatible HTTP edge: it authenticates a request, checks
// the little of its body the router needs (model, stream), asks queen/router for a worker and
// relays the request and the response unchanged, server-sent events flushed as they arrive. It
// turns router errors into OpenAI's error JSON and status codes; routing decisions live in the
// router.
package openai

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/rbee-dev/rbee/internal/jobid"
	"github.com/rbee-dev/rbee/internal/narrate"
	"github.com/rbee-dev/rbee/queen/router"
)

// Router is what the edge needs of queen/router.
type Router interface {
	Acquire(ctx context.Context, model, exclude string) (*router.Lease, error)
	Models() []string
}

// Config configures the edge. Zero fields take the defaults named beside them.
type Config struct {
	// Keys, if set, holds the API keys a request must present as Authorization: Bearer.
	Keys *Keys
	// MaxBody caps a request body in bytes (16 MiB).
	MaxBody int64
	// BodyTimeout bounds reading a request's body (30s).
	BodyTimeout time.Duration
	// MaxConcurrent caps the requests handled at once, queued ones included (1024).
	MaxConcurrent int
	// FirstByteTimeout bounds the wait for a worker's response headers (5m): a worker that
	// accepts the connection and never answers is given up on, and the request retried once.
	FirstByteTimeout time.Duration
	// Refuse, when set, is asked before each authenticated request: an error answers 503 with its
	// message and Retry-After, and nothing is routed (a queen that does not lead: its registry is
	// empty, so routing would fail obscurely or, worse, start workers it cannot account for).
	Refuse func() error
	// Upstream reaches the workers (NewUpstream's keep-alive pool).
	Upstream *Upstream
	Metrics  *Metrics
	Logger   *zap.Logger
}

func (c Config) withDefaults() Config {
	if c.MaxBody <= 0 {
		c.MaxBody = 16 << 20
	}
	if c.BodyTimeout <= 0 {
		c.BodyTimeout = 30 * time.Second
	}
	if c.MaxConcurrent <= 0 {
		c.MaxConcurrent = 1024
	}
	if c.FirstByteTimeout <= 0 {
		c.FirstByteTimeout = 5 * time.Minute
	}
	if c.Upstream == nil {
		c.Upstream = NewUpstream()
	}
	if c.Metrics == nil {
		c.Metrics = NewMetrics(nil)
	}
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
	return c
}

// Server is the HTTP API.
type Server struct {
	cfg  Config
	r    Router
	sem  chan struct{}
	mux  *http.ServeMux
	base time.Time
}

// New returns the HTTP API over r.
func New(cfg Config, r Router) *Server {
	s := &Server{cfg: cfg.withDefaults(), r: r, base: time.Now()}
	s.sem = make(chan struct{}, s.cfg.MaxConcurrent)
	s.mux = http.NewServeMux()
	s.mux.HandleFunc("GET /v1/models", s.models)
	for p := range inferPaths {
		s.mux.HandleFunc("POST "+p, func(w http.ResponseWriter, r *http.Request) { s.infer(w, r, jobid.FromContext(r.Context())) })
	}
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "invalid_request_error", "", "unknown_url",
			fmt.Sprintf("%s %s is not part of this API (GET /v1/models, POST /v1/chat/completions, /v1/completions, /v1/embeddings)", r.Method, r.URL.Path))
	})
	return s
}

// ServeHTTP authenticates, gives the request a job id and hands it to its handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var id string
	if v := r.Header[jobIDHeader]; len(v) > 0 {
		id = v[0]
	}
	if !validJobID(id) {
		id = jobid.New()
	}
	w.Header()[jobIDHeader] = []string{id}
	if s.cfg.Keys != nil && !s.cfg.Keys.Check(r.Header.Get("Authorization")) {
		s.cfg.Metrics.requests.WithLabelValues("", "401").Inc()
		w.Header().Set("WWW-Authenticate", `Bearer realm="rbee"`)
		writeError(w, http.StatusUnauthorized, "invalid_request_error", "", "invalid_api_key",
			"missing or wrong API key: send Authorization: Bearer <key>, a key from the queen's --api-keys-file")
		return
	}
	if s.cfg.Refuse != nil {
		if err := s.cfg.Refuse(); err != nil {
			s.cfg.Metrics.requests.WithLabelValues("", "503").Inc()
			w.Header().Set("Retry-After", strconv.Itoa(refuseRetryAfter))
			writeError(w, http.StatusServiceUnavailable, "server_error", "", "not_leader", err.Error())
			return
		}
	}
	// The inference endpoints straight, without the mux's matching or a copy of the request for
	// a new context: they are what the queen serves thousands of a second. Exactly the paths
	// the mux would route to them (clean, no escaped slash); anything else goes through it.
	if r.Method == http.MethodPost && r.URL.RawPath == "" && inferPaths[r.URL.Path] {
		s.infer(w, r, id)
		return
	}
	ctx := jobid.With(r.Context(), s.cfg.Logger, id)
	s.mux.ServeHTTP(w, r.WithContext(ctx))
}

var inferPaths = map[string]bool{"/v1/chat/completions": true, "/v1/completions": true, "/v1/embeddings": true}

// refuseRetryAfter is the Retry-After, in seconds, of a refused request: about how long an
// election takes to settle.
const refuseRetryAfter = 2

func validJobID(id string) bool {
	if len(id) == 0 || len(id) > 64 {
		return false
	}
	for _, c := range []byte(id) {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == ':' || c == '-') {
			return false
		}
	}
	return true
}

func (s *Server) models(w http.ResponseWriter, _ *http.Request) {
	names := s.r.Models()
	sort.Strings(names)
	type entry struct {
		ID      string `json:"id"`
		Object  string `json:"object"`
		Created int64  `json:"created"`
		OwnedBy string `json:"owned_by"`
	}
	out := struct {
		Object string  `json:"object"`
		Data   []entry `json:"data"`
	}{Object: "list", Data: []entry{}}
	for _, n := range names {
		out.Data = append(out.Data, entry{ID: n, Object: "model", Created: s.base.Unix(), OwnedBy: "rbee"})
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(out)
}

func (s *Server) infer(w http.ResponseWriter, r *http.Request, id string) {
	t0 := time.Now()
	select {
	case s.sem <- struct{}{}:
		defer func() { <-s.sem }()
	default:
		s.cfg.Metrics.requests.WithLabelValues("", "429").Inc()
		w.Header().Set("Retry-After", "1")
		writeError(w, http.StatusTooManyRequests, "rate_limit_exceeded", "", "too_many_requests",
			fmt.Sprintf("the queen is handling %d requests, its limit (--http-max-concurrent); retry shortly", s.cfg.MaxConcurrent))
		return
	}
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(time.Now().Add(s.cfg.BodyTimeout))
	body, err := readBody(http.MaxBytesReader(w, r.Body, s.cfg.MaxBody), r.ContentLength)
	_ = rc.SetReadDeadline(time.Time{})
	if err != nil {
		var mb *http.MaxBytesError
		if errors.As(err, &mb) {
			s.cfg.Metrics.requests.WithLabelValues("", "413").Inc()
			writeError(w, http.StatusRequestEntityTooLarge, "invalid_request_error", "", "request_too_large",
				fmt.Sprintf("the body is larger than %d bytes (--http-max-body)", s.cfg.MaxBody))
			return
		}
		s.cfg.Metrics.requests.WithLabelValues("", "400").Inc()
		writeError(w, http.StatusBadRequest, "invalid_request_error", "", "", "could not read the body: "+err.Error())
		return
	}
	model, stream, param, msg := parse(body)
	if msg != "" {
		s.cfg.Metrics.requests.WithLabelValues("", "400").Inc()
		writeError(w, http.StatusBadRequest, "invalid_request_error", param, "", msg)
		return
	}
	ctx := jobid.With(r.Context(), s.cfg.Logger, id, zap.String("model", model))
	p := &proxy{s: s, w: w, r: r, ctx: ctx, jobID: id, body: body, model: model, stream: stream, t0: t0, log: narrate.Logger(ctx)}
	code := p.run()
	if p.mm != nil && code == http.StatusOK {
		p.mm.ok.Inc()
	} else {
		s.cfg.Metrics.requests.WithLabelValues(model, strconv.Itoa(code)).Inc()
	}
	if p.mm != nil {
		p.mm.duration.Observe(time.Since(t0).Seconds())
		if p.tokens > 0 {
			p.mm.tokens.Add(float64(p.tokens))
		}
	} else {
		s.cfg.Metrics.duration.WithLabelValues(model).Observe(time.Since(t0).Seconds())
	}
}

// readBody reads a request body whole. Its buffer is sized from Content-Length, so that a
// typical body is read without growing it, but at most 64 KiB up front: a client that announces
// a large body and sends nothing must not make the queen allocate it.
func readBody(r io.Reader, contentLength int64) ([]byte, error) {
	n := int(min(max(contentLength, 0), 64<<10)) + 1 // +1: room to read the EOF without growing
	if contentLength < 0 {
		n = 4 << 10
	}
	b := make([]byte, 0, n)
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		k, err := r.Read(b[len(b):cap(b)])
		b = b[:len(b)+k]
		if err == io.EOF {
			return b, nil
		}
		if err != nil {
			return b, err
		}
	}
}

// writeError writes OpenAI's error shape.
func writeError(w http.ResponseWriter, code int, typ, param, errCode, msg string) {
	type body struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    *string `json:"code"`
	}
	b := body{Message: msg, Type: typ}
	if param != "" {
		b.Param = &param
	}
	if errCode != "" {
		b.Code = &errCode
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Del("Content-Length")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(struct {
		Error body `json:"error"`
	}{b})
}

// routeError answers a request the router could not place.
func routeError(w http.ResponseWriter, err error) int {
	switch {
	case errors.Is(err, router.ErrUnknownModel):
		writeError(w, http.StatusNotFound, "invalid_request_error", "model", "model_not_found",
			err.Error()+" (GET /v1/models lists the models)")
		return http.StatusNotFound
	case errors.Is(err, router.ErrQueueFull):
		w.Header().Set("Retry-After", "1")
		writeError(w, http.StatusTooManyRequests, "rate_limit_exceeded", "", "queue_full", err.Error())
		return http.StatusTooManyRequests
	case errors.Is(err, router.ErrQueueTimeout), errors.Is(err, router.ErrClosed), errors.Is(err, router.ErrNoWorker):
		w.Header().Set("Retry-After", "5")
		writeError(w, http.StatusServiceUnavailable, "server_error", "", "no_capacity", err.Error())
		return http.StatusServiceUnavailable
	case errors.Is(err, router.ErrStartFailed):
		w.Header().Set("Retry-After", "30")
		writeError(w, http.StatusServiceUnavailable, "server_error", "", "worker_start_failed", err.Error())
		return http.StatusServiceUnavailable
	default:
		writeError(w, http.StatusInternalServerError, "server_error", "", "", err.Error())
		return http.StatusInternalServerError
	}
}

// copyHeader copies src's end-to-end headers to dst. The value slices are shared, not copied:
// neither side changes them (src is a request or response already read, dst is written once).
func copyHeader(dst, src http.Header) {
	for k, vs := range src {
		dst[k] = vs
	}
	for _, c := range src["Connection"] {
		for f := range strings.SplitSeq(c, ",") {
			dst.Del(strings.TrimSpace(f))
		}
	}
	for _, h := range hopHeaders {
		delete(dst, h) // canonical already
	}
}
