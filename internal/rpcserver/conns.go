package rpcserver

import (
	"context"
	"net"
	"sync"

	"google.golang.org/grpc/stats"
)

// conns tracks every connection the server accepted, so that shutdown can close those gRPC
// cannot: grpc-go's Stop and GracefulStop both wait for connections still in their handshake,
// which a client that sends half a preface and holds can keep there for the whole connection
// timeout. It learns that a connection finished its handshake from the stats handler's TagConn.
type conns struct {
	mu      sync.Mutex
	open    map[string]*conn // local|remote address -> connection
	closing bool
}

type conn struct {
	net.Conn
	c           *conns
	key         string
	established bool
	once        sync.Once
}

func (c *conn) Close() error {
	c.once.Do(func() {
		c.c.mu.Lock()
		if c.c.open[c.key] == c {
			delete(c.c.open, c.key)
		}
		c.c.mu.Unlock()
	})
	return c.Conn.Close()
}

func connKey(local, remote net.Addr) string { return local.String() + "|" + remote.String() }

type listener struct {
	net.Listener
	c *conns
}

func (l *listener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	c := &conn{Conn: nc, c: l.c, key: connKey(nc.LocalAddr(), nc.RemoteAddr())}
	l.c.mu.Lock()
	closing := l.c.closing
	if !closing {
		l.c.open[c.key] = c
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
	for _, c := range cs.open {
		if !c.established {
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
	for _, c := range cs.open {
		cut = append(cut, c)
	}
	cs.mu.Unlock()
	for _, c := range cut {
		_ = c.Close()
	}
}

// handshakes is a stats.Handler that marks a connection established once gRPC has set up its
// transport (TagConn runs then, with the connection's addresses).
type handshakes struct{ c *conns }

func (h handshakes) TagConn(ctx context.Context, info *stats.ConnTagInfo) context.Context {
	if info.LocalAddr != nil && info.RemoteAddr != nil {
		h.c.mu.Lock()
		if c := h.c.open[connKey(info.LocalAddr, info.RemoteAddr)]; c != nil {
			c.established = true
		}
		h.c.mu.Unlock()
	}
	return ctx
}
func (handshakes) HandleConn(context.Context, stats.ConnStats)                     {}
func (handshakes) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }
func (handshakes) HandleRPC(context.Context, stats.RPCStats)                       {}
