package server

import (
	"context"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// Watch limits: a watch holds a few goroutines and up to about 100 KB while its client lags
// (gRPC's send window and one message, a registry page, a queue of event pointers); these keep
// the worst case near 100 MB.
const (
	DefaultMaxWatchers        = 1000
	DefaultMaxWatchersPerConn = 100
	DefaultWatchSendTimeout   = 10 * time.Second
)

// watchCount counts open watches, in all and per client connection.
type watchCount struct {
	mu      sync.Mutex
	total   int
	perConn map[string]int
}

// admit counts one more watch on ctx's connection, or says RESOURCE_EXHAUSTED when that would
// pass a limit. release undoes it.
func (c *watchCount) admit(ctx context.Context, maxTotal, maxPerConn int) (release func(), err error) {
	conn := "unknown"
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		// A TCP connection is its two addresses.
		conn = p.Addr.String()
		if p.LocalAddr != nil {
			conn += " " + p.LocalAddr.String()
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.total >= maxTotal:
		return nil, status.Errorf(codes.ResourceExhausted, "the queen serves %d watches already, its maximum (queen --max-watchers)", c.total)
	case c.perConn[conn] >= maxPerConn:
		return nil, status.Errorf(codes.ResourceExhausted, "this connection holds %d watches already, the maximum (queen --max-watchers-per-conn)", c.perConn[conn])
	}
	if c.perConn == nil {
		c.perConn = map[string]int{}
	}
	c.total++
	c.perConn[conn]++
	var once sync.Once
	return func() {
		once.Do(func() {
			c.mu.Lock()
			defer c.mu.Unlock()
			c.total--
			if c.perConn[conn]--; c.perConn[conn] == 0 {
				delete(c.perConn, conn)
			}
		})
	}, nil
}
