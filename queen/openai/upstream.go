package openai

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Upstream is the edge's HTTP/1.1 client to the workers, with a pool of keep-alive connections
// per worker. It does what net/http's Transport would for a request whose body is already in
// memory, but in the calling goroutine: the Transport hands every request to a writer and a
// reader goroutine per connection and back, and on the queen's two shared cores those hand-offs
// and their wake-ups cost more than the request's own work (pprof under bench/router/run.sh).
//
// A response body read to its end returns its connection to the pool; one given up on (the
// client left, the worker broke off) closes it. A pooled connection the worker has closed
// meanwhile (its keep-alive timeout) fails before any byte of the answer: the request is sent
// again on a new connection, once.
type Upstream struct {
	// IdleTimeout closes a connection idle this long (30s).
	IdleTimeout time.Duration
	// MaxIdlePerHost bounds the idle connections kept per worker (1024); MaxIdle in all (4096).
	MaxIdlePerHost, MaxIdle int
	// DialTimeout bounds a connection's set-up (5s).
	DialTimeout time.Duration

	mu      sync.Mutex
	idle    map[string][]*upConn // by host:port, most recently used last
	nIdle   int
	janitor *time.Timer
	closed  bool
}

// NewUpstream returns an Upstream with the defaults.
func NewUpstream() *Upstream {
	return &Upstream{IdleTimeout: 30 * time.Second, MaxIdlePerHost: 1024, MaxIdle: 4096, DialTimeout: 5 * time.Second}
}

type upConn struct {
	nc     net.Conn
	br     *bufio.Reader
	host   string
	idleAt time.Time
}

// writers are the buffers requests are written through: a connection needs one only while it
// writes a request, not while it waits for the answer, streams it or sits idle.
var writers = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 4<<10) }}

// CloseIdle closes the idle connections and keeps no more (the edge is shutting down).
func (u *Upstream) CloseIdle() {
	u.mu.Lock()
	idle := u.idle
	u.idle, u.nIdle, u.closed = nil, 0, true
	if u.janitor != nil {
		u.janitor.Stop()
	}
	u.mu.Unlock()
	for _, cs := range idle {
		for _, c := range cs {
			_ = c.nc.Close()
		}
	}
}

// get returns an idle connection to host, or nil.
func (u *Upstream) get(host string, now time.Time) *upConn {
	u.mu.Lock()
	defer u.mu.Unlock()
	cs := u.idle[host]
	for len(cs) > 0 {
		c := cs[len(cs)-1]
		cs[len(cs)-1] = nil
		cs = cs[:len(cs)-1]
		u.nIdle--
		if now.Sub(c.idleAt) < u.IdleTimeout {
			u.idle[host] = cs
			return c
		}
		_ = c.nc.Close() // expired; those below it are older still
	}
	delete(u.idle, host)
	return nil
}

// put keeps c for the next request to its host.
func (u *Upstream) put(c *upConn) {
	c.idleAt = time.Now()
	u.mu.Lock()
	if u.closed || u.nIdle >= u.MaxIdle || len(u.idle[c.host]) >= u.MaxIdlePerHost {
		u.mu.Unlock()
		_ = c.nc.Close()
		return
	}
	if u.idle == nil {
		u.idle = map[string][]*upConn{}
	}
	u.idle[c.host] = append(u.idle[c.host], c)
	u.nIdle++
	if u.janitor == nil {
		u.janitor = time.AfterFunc(u.IdleTimeout, u.sweep)
	}
	u.mu.Unlock()
}

// sweep closes the connections idle longer than IdleTimeout, and comes back while any are left.
func (u *Upstream) sweep() {
	now := time.Now()
	var old []*upConn
	u.mu.Lock()
	for host, cs := range u.idle {
		n := 0
		for n < len(cs) && now.Sub(cs[n].idleAt) >= u.IdleTimeout {
			n++
		}
		old = append(old, cs[:n]...)
		if n == len(cs) {
			delete(u.idle, host)
		} else if n > 0 {
			u.idle[host] = append(cs[:0], cs[n:]...)
		}
		u.nIdle -= n
	}
	if u.nIdle > 0 && !u.closed {
		u.janitor.Reset(u.IdleTimeout)
	} else {
		u.janitor = nil
	}
	u.mu.Unlock()
	for _, c := range old {
		_ = c.nc.Close()
	}
}

func (u *Upstream) dial(ctx context.Context, host string) (*upConn, error) {
	d := net.Dialer{Timeout: u.DialTimeout, KeepAlive: 30 * time.Second}
	nc, err := d.DialContext(ctx, "tcp", host)
	if err != nil {
		return nil, err
	}
	return &upConn{nc: nc, br: bufio.NewReaderSize(nc, 4<<10), host: host}, nil
}

// upRequest is what the edge sends a worker.
type upRequest struct {
	host       string // host:port
	method     string
	requestURI string
	header     http.Header // the client's; hop-by-hop headers and skip are left out
	skip       []string    // canonical names of further headers not to forward
	extra      [][2]string // headers to add
	body       []byte
	// firstByte bounds connecting, sending and the wait for the response headers.
	firstByte time.Duration
}

// errFirstByteTimeout: the worker took longer than the first-byte timeout to start its answer.
var errFirstByteTimeout = errors.New("the worker accepted the request but sent no response headers in time")

// postRequest is what http.ReadResponse is told the request was: a POST (it decides whether a
// response has a body). ReadResponse only reads it.
var postRequest = &http.Request{Method: http.MethodPost}

// do sends req and returns the response once its headers are in. The response's Body must be
// closed. Ending ctx cuts the connection, at any point until the body is closed.
func (u *Upstream) do(ctx context.Context, req *upRequest) (*http.Response, error) {
	deadline := time.Now().Add(req.firstByte)
	for attempt := 0; ; attempt++ {
		var c *upConn
		if attempt == 0 {
			c = u.get(req.host, time.Now())
		}
		reused := c != nil
		if c == nil {
			dctx, cancel := context.WithDeadline(ctx, deadline)
			var err error
			c, err = u.dial(dctx, req.host)
			cancel()
			if err != nil {
				if ctx.Err() == nil && time.Now().After(deadline) {
					return nil, errFirstByteTimeout
				}
				return nil, err
			}
		}
		resp, err := u.exchange(ctx, c, req, deadline)
		if err == nil {
			return resp, nil
		}
		_ = c.nc.Close()
		if errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() == nil {
			return nil, errFirstByteTimeout
		}
		var stale staleError
		if !reused || attempt > 0 || ctx.Err() != nil || !errors.As(err, &stale) {
			return nil, err
		}
		// A kept connection the worker had closed: no byte of an answer came, so send it again.
	}
}

// staleError: the connection failed before any byte of the response arrived.
type staleError struct{ err error }

func (e staleError) Error() string { return e.err.Error() }
func (e staleError) Unwrap() error { return e.err }

// exchange writes req on c and reads the response headers, within deadline; ctx's end closes c.
func (u *Upstream) exchange(ctx context.Context, c *upConn, req *upRequest, deadline time.Time) (*http.Response, error) {
	_ = c.nc.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { _ = c.nc.Close() })
	bw := writers.Get().(*bufio.Writer)
	bw.Reset(c.nc)
	err := writeRequest(bw, req)
	bw.Reset(nil)
	writers.Put(bw)
	if err != nil {
		stop()
		return nil, staleError{err}
	}
	if _, err := c.br.Peek(1); err != nil {
		stop()
		return nil, staleError{err}
	}
	var resp *http.Response
	for {
		var err error
		resp, err = http.ReadResponse(c.br, postRequest)
		if err != nil {
			stop()
			return nil, err
		}
		// An interim answer (100 Continue, 103 Early Hints) precedes the real one.
		if resp.StatusCode >= 200 || resp.StatusCode == http.StatusSwitchingProtocols {
			break
		}
	}
	_ = c.nc.SetDeadline(time.Time{})
	resp.Body = &upBody{u: u, c: c, r: resp.Body, stop: stop, keep: !resp.Close}
	return resp, nil
}

// upBody is a response body: read to its end, it returns the connection to the pool.
type upBody struct {
	u      *Upstream
	c      *upConn
	r      io.Reader
	stop   func() bool
	eof    bool
	keep   bool
	closed bool
}

func (b *upBody) Read(p []byte) (int, error) {
	if b.closed {
		return 0, errors.New("read of a closed response body")
	}
	n, err := b.r.Read(p)
	if err == io.EOF {
		b.eof = true
	}
	return n, err
}

// Close puts the connection back when the body was read to its end and the request was not
// cancelled meanwhile; otherwise it closes it, which is also what tells the worker to stop.
func (b *upBody) Close() error {
	if b.closed {
		return nil
	}
	b.closed = true
	if b.stop() && b.eof && b.keep && b.c.br.Buffered() == 0 {
		b.u.put(b.c)
		return nil
	}
	return b.c.nc.Close()
}

// hopHeaders are connection-level headers a proxy must not forward (RFC 9110 §7.6.1).
var hopHeaders = []string{"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade"}

// ownHeaders are request headers the edge writes itself or must not pass on: the body is sent
// whole with its length, Expect was answered by the queen's own server.
var ownHeaders = []string{"Host", "Content-Length", "Expect"}

// writeRequest writes req as HTTP/1.1 and flushes it: one write for a small request.
func writeRequest(w *bufio.Writer, req *upRequest) error {
	w.WriteString(req.method)
	w.WriteByte(' ')
	w.WriteString(req.requestURI)
	w.WriteString(" HTTP/1.1\r\nHost: ")
	w.WriteString(req.host)
	w.WriteString("\r\n")
	conn := req.header["Connection"]
	for k, vs := range req.header {
		if skipHeader(k, req.skip, conn) {
			continue
		}
		for _, v := range vs {
			writeHeader(w, k, v)
		}
	}
	for _, kv := range req.extra {
		writeHeader(w, kv[0], kv[1])
	}
	w.WriteString("Content-Length: ")
	w.WriteString(strconv.Itoa(len(req.body)))
	w.WriteString("\r\n\r\n")
	w.Write(req.body)
	return w.Flush()
}

func skipHeader(k string, skip, conn []string) bool {
	for _, list := range [][]string{hopHeaders, ownHeaders, skip} {
		for _, h := range list {
			if k == h {
				return true
			}
		}
	}
	for _, c := range conn { // headers the client's Connection header names are its hop's only
		for f := range strings.SplitSeq(c, ",") {
			if http.CanonicalHeaderKey(strings.TrimSpace(f)) == k {
				return true
			}
		}
	}
	return false
}

// headerValueFixer makes a value one line, as net/http's own writer does; the queen's server
// has already refused values with CR or LF, so this is a second line of defence.
var headerValueFixer = strings.NewReplacer("\r", " ", "\n", " ")

func writeHeader(w *bufio.Writer, k, v string) {
	w.WriteString(k)
	w.WriteString(": ")
	if strings.ContainsAny(v, "\r\n") {
		v = headerValueFixer.Replace(v)
	}
	w.WriteString(strings.TrimSpace(v))
	w.WriteString("\r\n")
}

// workerHost returns the host:port of a worker's base URL, "http://host:port".
func workerHost(url string) (string, error) {
	host, ok := strings.CutPrefix(url, "http://")
	if !ok || host == "" || strings.ContainsAny(host, "/?#@") {
		return "", fmt.Errorf("worker URL %q: want http://host:port", url)
	}
	return host, nil
}
