// Package rpcclient holds the dial settings every rbee client shares (workers, hives and the queen
// calling hives): keepalive within what the servers permit, and reconnection quick enough that a
// restarted queen relearns its fleet within a few heartbeat intervals.
package rpcclient

import (
	"math/rand/v2"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/keepalive"
)

// PingInterval is how often a client pings an idle connection; servers permit pings every 10s,
// so idle heartbeat streams live for days without too_many_pings disconnects, and a dead peer is
// noticed within a minute.
const PingInterval = 30 * time.Second

// Options returns the shared dial options. gRPC's default reconnect backoff starts at 1s and grows
// to 2 minutes; a fleet waiting that long after a queen restart would look dead, so reconnection
// starts at 100ms (with jitter, so thousands of workers do not arrive at once) and is capped at 5s.
func Options() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: PingInterval, PermitWithoutStream: true}),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 5 * time.Second},
			MinConnectTimeout: 3 * time.Second,
		}),
	}
}

// Reconnect backoff of heartbeat streams (workers, hives): the same envelope as the connection's.
const (
	BackoffBase = 100 * time.Millisecond
	BackoffCap  = 5 * time.Second
)

// Backoff returns the delay before reconnect attempt n (0-based): full jitter over an exponential
// envelope from base, capped at limit, so that a fleet reconnecting to a restarted queen spreads
// out instead of arriving in lockstep.
func Backoff(n int, base, limit time.Duration) time.Duration {
	envelope := limit
	if n < 32 {
		if e := base << n; e > 0 && e < envelope {
			envelope = e
		}
	}
	return rand.N(envelope + 1)
}
