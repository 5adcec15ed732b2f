// Package rpcclient holds the dial settings every rbee client shares (workers, hives and the queen
// calling hives): keepalive within what the servers permit, and reconnection quick enough that a
// restarted queen relearns its fleet within a few heartbeat intervals.
package rpcclient

import (
	"context"
	"math/rand/v2"
	"net"
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

// Heartbeat clients (workers, hives) pace their reconnection by the heartbeat interval the queen
// names, not by a fixed backoff: the queen counts a worker STALE after a few missed intervals and
// READY again at its first beat, so a client that comes back within about an interval of the link
// heals within the same span, whatever the length of the cut. A fixed cap of seconds (the 5 s of
// Options) made a 15 s partition heal 1.6 to 4.6 s after the link returned at a 500 ms interval.

// handshakeTimeout bounds one connect attempt of a heartbeat client: TCP, TLS and HTTP/2. It stays
// long: a queen restarted under 10,000 workers completes handshakes late, and cutting them short
// would throw that work away and repeat it (a storm); a link that flaps gets several chances per
// attempt. A SYN lost in a cut does not hold the attempt up meanwhile (resendingDialer).
const handshakeTimeout = 3 * time.Second

// minResend keeps a tiny interval (the queen accepts 10 ms) from flooding a cut link with SYNs.
const minResend = 100 * time.Millisecond

// HeartbeatOptions returns the dial options of a heartbeat client that beats every interval:
// keepalive as Options; a connect that sends a fresh SYN every interval while none is answered
// (resendingDialer); and gRPC's own reconnection, which a connection to several queens relies on
// while it waits for a leader, paced by the interval too (half an interval after the first failed
// attempt, then one, each ±20%). Put them before the caller's options (credentials, token), which
// should carry no connect parameters of their own.
//
// The connect dials TCP directly: HTTPS_PROXY and friends are not used for heartbeats, as for the
// queen's calls to hives.
func HeartbeatOptions(interval time.Duration) []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: PingInterval, PermitWithoutStream: true}),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: interval / 2, Multiplier: 2, Jitter: 0.2, MaxDelay: interval},
			MinConnectTimeout: handshakeTimeout,
		}),
		grpc.WithContextDialer(resendingDialer(max(interval, minResend))),
	}
}

// resendingDialer returns a TCP dialer that starts a fresh connect every `every` while none has
// succeeded, until one does (the others are closed), one is refused or unreachable (returned at
// once: the peer answered), or ctx ends. The kernel retransmits a lost SYN only after 1 s, then
// 3 s; a client whose first SYN went into a cut would wait that long after the link returned. With
// a SYN every interval it waits at most an interval, and sends no more than one SYN an interval.
func resendingDialer(every time.Duration) func(context.Context, string) (net.Conn, error) {
	return func(ctx context.Context, addr string) (net.Conn, error) {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		type result struct {
			c   net.Conn
			err error
		}
		results := make(chan result)
		pending := 0
		dial := func() {
			pending++
			go func() {
				c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
				results <- result{c, err}
			}()
		}
		// Whatever is still in flight when this returns is collected and closed.
		defer func() {
			go func(n int) {
				for range n {
					if r := <-results; r.c != nil {
						r.c.Close()
					}
				}
			}(pending)
		}()
		dial()
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case r := <-results:
				pending--
				return r.c, r.err
			case <-t.C:
				dial()
			}
		}
	}
}

// ReconnectDelay returns how long after the start of its last failed attempt a heartbeat client
// beating every interval makes reconnect attempt n (0-based; attempt 0 follows a stream that
// broke after the queen had answered it, and counts from the break). The first waits half an
// interval, later ones one interval, each drawn uniformly from half to one and a half times that:
// a fleet whose queen restarted spreads over an interval instead of arriving at once, each client
// tries about once per interval (never a storm, however long the queen is away), and a client
// whose link returns is back within one and a half intervals of it.
func ReconnectDelay(n int, interval time.Duration) time.Duration {
	envelope := interval
	if n == 0 {
		envelope = interval / 2
	}
	return envelope/2 + rand.N(envelope+1)
}
