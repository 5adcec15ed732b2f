package openai

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/rbee-dev/rbee/internal/jobid"
	"github.com/rbee-dev/rbee/internal/narrate"
	"github.com/rbee-dev/rbee/queen/router"
)

// statusClientGone is logged and counted for requests whose client left first (nginx's 499).
const statusClientGone = 499

// proxy relays one request to a worker and its response back.
type proxy struct {
	s      *Server
	w      http.ResponseWriter
	r      *http.Request
	ctx    context.Context
	log    *zap.Logger
	jobID  string
	body   []byte
	model  string
	stream bool
	t0     time.Time
	tokens int
	mm     *modelMetrics // the model's series, once the router placed the request
	// abort: the response broke off after it started and is not an event stream, so the client
	// must see a cut connection rather than a body that looks complete.
	abort bool
}

// run places the request and relays it, retrying once on another worker (or a new one) when the
// first could not be reached or did not answer before the response started. It returns the
// status code it answered with.
func (p *proxy) run() int {
	var exclude string
	var lastErr error
	for attempt := 0; attempt < 2; attempt++ {
		lease, err := p.s.r.Acquire(p.ctx, p.model, exclude)
		if err != nil {
			if p.ctx.Err() != nil {
				return statusClientGone
			}
			if lastErr != nil {
				return p.upstreamError(lastErr)
			}
			code := routeError(p.w, err)
			p.log.Info("request not placed", zap.Int("status", code), zap.Error(err))
			return code
		}
		p.mm = p.s.cfg.Metrics.model(p.model)
		wk := lease.Worker()
		resp, err := p.roundTrip(wk)
		if err != nil {
			if p.ctx.Err() != nil {
				lease.Release()
				return statusClientGone
			}
			lease.Fail(err)
			narrate.Warn(p.ctx, "queen", "router_retry", fmt.Sprintf("Worker %s failed before answering; retrying on another", wk.ID),
				zap.String("worker_id", wk.ID), zap.Int("attempt", attempt+1), zap.Error(err))
			exclude, lastErr = wk.ID, err
			continue
		}
		return p.relay(resp, lease, wk)
	}
	return p.upstreamError(lastErr)
}

func (p *proxy) upstreamError(err error) int {
	if errors.Is(err, errFirstByteTimeout) {
		writeError(p.w, http.StatusGatewayTimeout, "server_error", "", "worker_timeout",
			fmt.Sprintf("no worker answered within %v (--first-byte-timeout), after one retry", p.s.cfg.FirstByteTimeout))
		return http.StatusGatewayTimeout
	}
	writeError(p.w, http.StatusBadGateway, "server_error", "", "worker_unreachable",
		"the worker could not be reached, nor another on retry: "+err.Error())
	return http.StatusBadGateway
}

// roundTrip sends the request to wk and returns its response once the headers are in. Close
// the response's body when done with it; until then, the client going away cuts the worker's
// request.
func (p *proxy) roundTrip(wk router.Worker) (*http.Response, error) {
	host, err := workerHost(wk.URL)
	if err != nil {
		return nil, err
	}
	resp, err := p.s.cfg.Upstream.do(p.ctx, &upRequest{
		host: host, method: p.r.Method, requestURI: p.r.URL.RequestURI(), header: p.r.Header,
		skip:  skipToWorker, // the client's API key is the queen's business, not the worker's
		extra: [][2]string{{jobIDHeader, p.jobID}},
		body:  p.body, firstByte: p.s.cfg.FirstByteTimeout,
	})
	switch {
	case errors.Is(err, errFirstByteTimeout):
		return nil, fmt.Errorf("worker %s: %w", wk.ID, err)
	case err != nil:
		return nil, fmt.Errorf("worker %s at %s: %w", wk.ID, wk.URL, err)
	}
	return resp, nil
}

var (
	jobIDHeader  = http.CanonicalHeaderKey(jobid.MetadataKey)
	skipToWorker = []string{"Authorization", jobIDHeader}
)

// 8 KiB: an event is a few hundred bytes, and 200 open streams should not hold 32 KiB each.
var bufs = sync.Pool{New: func() any { b := make([]byte, 8<<10); return &b }}

// relay copies the worker's response to the client, each chunk flushed the moment it arrives.
func (p *proxy) relay(resp *http.Response, lease *router.Lease, wk router.Worker) int {
	defer resp.Body.Close()
	copyHeader(p.w.Header(), resp.Header)
	sse := strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream")
	p.w.WriteHeader(resp.StatusCode)
	rc := http.NewResponseController(p.w)
	if sse {
		_ = rc.Flush() // the client learns at once that the stream has started
	}
	bp := bufs.Get().(*[]byte)
	defer bufs.Put(bp)
	buf := *bp
	var ev eventCounter
	first := true
	for {
		n, err := resp.Body.Read(buf)
		if n > 0 {
			if first {
				first = false
				p.mm.ttfb.Observe(time.Since(p.t0).Seconds())
			}
			if sse {
				ev.feed(buf[:n])
			}
			if _, werr := p.w.Write(buf[:n]); werr != nil {
				p.tokens = ev.events
				lease.Release()
				p.log.Debug("client went away; the worker's request is cancelled", zap.String("worker_id", wk.ID))
				return statusClientGone
			}
			if sse {
				_ = rc.Flush() // each event the moment it arrives; a whole answer goes out at the end
			}
		}
		if err == io.EOF {
			p.tokens = ev.events
			lease.Release()
			return resp.StatusCode
		}
		if err != nil {
			p.tokens = ev.events
			if p.ctx.Err() != nil {
				lease.Release()
				p.log.Debug("client went away; the worker's request is cancelled", zap.String("worker_id", wk.ID))
				return statusClientGone
			}
			lease.Fail(err)
			narrate.Warn(p.ctx, "queen", "router_worker_failed", fmt.Sprintf("Worker %s broke off its response", wk.ID),
				zap.String("worker_id", wk.ID), zap.Error(err))
			if !sse {
				p.abort = true
				return http.StatusBadGateway
			}
			_, _ = p.w.Write(errorEvent(fmt.Sprintf("worker %s failed in the middle of the response: %v", wk.ID, err)))
			_ = rc.Flush()
			return http.StatusBadGateway
		}
	}
}

func errorEvent(msg string) []byte {
	b, _ := json.Marshal(map[string]any{"error": map[string]any{
		"message": msg, "type": "server_error", "param": nil, "code": "worker_failed",
	}})
	return append(append([]byte("data: "), b...), '\n', '\n')
}

// eventCounter counts server-sent "data:" lines other than "data: [DONE]" across chunk
// boundaries: with OpenAI-style streams, one per token (or per few tokens).
type eventCounter struct {
	events  int
	col     int  // bytes of the current line seen, up to len("data: [DONE]")
	isData  bool // the current line starts with "data:"
	maybeDN bool // ... and may still be "data: [DONE]"
}

const donePrefix = "data: [DONE]"

func (c *eventCounter) feed(b []byte) {
	for _, x := range b {
		if x == '\n' {
			if c.isData && !(c.maybeDN && c.col >= len(donePrefix)) {
				c.events++
			}
			c.col, c.isData, c.maybeDN = 0, false, false
			continue
		}
		if c.col < len(donePrefix) {
			match := x == donePrefix[c.col]
			switch {
			case c.col < 5:
				if !match {
					c.col = len(donePrefix) + 1 // not a data line: ignore the rest of it
					continue
				}
				if c.col == 4 {
					c.isData, c.maybeDN = true, true
				}
			case !match:
				c.maybeDN = false
			}
		}
		if c.col <= len(donePrefix) {
			c.col++
		}
	}
}
