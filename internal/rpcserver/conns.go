package rpcserver

import (
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// conns tracks every connection the server accepted, so that shutdown can close those gRPC
// cannot: grpc-go's Stop and GracefulStop both wait for connections still in their handshake,
// which a client that sends half a preface and holds can keep there for the whole connection
// timeout.
//
// It learns that a connection finished its handshake from the connection itself: grpc-go bounds
// the handshake (TLS, the HTTP/2 preface and the first SETTINGS frame) with a deadline on the
// accepted connection, and clears it with SetDeadline(time.Time{}) once the handshake is over.
// A gRPC stats handler would tell the same, but any stats handler makes grpc-go build stats
// objects for every message (a third of what the queen allocated per heartbeat).
type conns struct {
	mu      sync.Mutex
	open    map[*conn]struct{}
	closing bool
}

type conn struct {
	net.Conn
	c           *conns
	established atomic.Bool
	once        sync.Once
}

// SetDeadline marks the connection established when the deadline is cleared: grpc-go does that
// once the handshake is over (server.go, handleRawConn), and on no other occasion.
func (c *conn) SetDeadline(t time.Time) error {
	if t.IsZero() {
		c.established.Store(true)
	}
	return c.Conn.SetDeadline(t)
}

func (c *conn) Close() error {
	c.once.Do(func() {
		c.c.mu.Lock()
		delete(c.c.open, c)
		c.c.mu.Unlock()
	})
	return c.Conn.Close()
}

type listener struct {
	net.Listener
	c *conns
}

func (l *listener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	c := &conn{Conn: nc, c: l.c}
	l.c.mu.Lock()
	closing := l.c.closing
	if !closing {
		l.c.open[c] = struct{}{}
	}
	l.c.mu.Unlock()
	if closing {
		// Accepted in the moment before the listener closed: nothing will be served on it.
		_ = nc.Close()
	}
	return c, nil
}

// closeHandshaking closes every connection that has not finished its handshake, and any accepted
// from now on: no call has started on those, and grpc-go's stop would wait for them.
func (cs *conns) closeHandshaking() {
	cs.mu.Lock()
	cs.closing = true
	var cut []*conn
	for c := range cs.open {
		if !c.established.Load() {
			cut = append(cut, c)
		}
	}
	cs.mu.Unlock()
	for _, c := range cut {
		_ = c.Close()
	}
}

// closeAll closes every connection still open, cutting whatever is on it.
func (cs *conns) closeAll() {
	cs.mu.Lock()
	cs.closing = true
	cut := make([]*conn, 0, len(cs.open))
	for c := range cs.open {
		cut = append(cut, c)
	}
	cs.mu.Unlock()
	for _, c := range cut {
		_ = c.Close()
	}
}
