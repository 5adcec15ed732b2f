package server

import (
	"context"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// Watch limits. A watch whose client stops reading holds up to about 300 KB until
// WatchSendTimeout ends it: gRPC queues 64 KiB of payload per stream, some 700 small messages of
// 250 bytes each with their frames, besides a registry page of 64 workers, a queue of event
// pointers and three goroutines. The defaults keep that worst case near 150 MB.
const (
	DefaultMaxWatchers        = 512
	DefaultMaxWatchersPerConn = 64
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
