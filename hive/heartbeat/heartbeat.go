// Package heartbeat keeps the hive registered with the queen: one HiveHeartbeat stream carrying
// the hive's descriptor every interval, and at once the exits of workers that died on their own,
// reconnecting about once per interval, jittered, when the queen goes away.
package heartbeat

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/hive/process"
	"github.com/rbee-dev/rbee/internal/rpcclient"
)

// Config configures a Beater.
type Config struct {
	// Target is the queen's dial target (rpcclient.QueenTarget), and DialOptions go to
	// grpc.NewClient after rpcclient.HeartbeatOptions (credentials, the queens' resolver). Every
	// stream gets a connection of its own, dialled with the interval known then, so that its
	// connect resends SYNs at that interval (as a worker's does).
	Target      string
	DialOptions []grpc.DialOption
	// Describe returns the hive's current descriptor.
	Describe func() *rbeev1.Hive
	// Clock, when set, is read as each beat is sent (HiveHeartbeatRequest.clock): the queen bounds
	// its Spawns and Deletes in this clock.
	Clock  func() *rbeev1.HiveClock
	Logger *zap.Logger
}

// maxPending bounds the exits kept while the queen is unreachable; older ones are dropped (the
// registry's liveness clock still notices those workers stopped beating).
const maxPending = 1024

// The queen accepts messages up to rpcserver.MaxMessageBytes (1 MiB). A burst of exits re-sent
// after the queen was away must never make one beat exceed it, or every retry fails the same way
// and the hive falls out of the registry: each exit carries at most maxLogTailBytes of output (its
// end, where the reason usually is), and one beat carries exits up to maxBatchBytes; the rest go
// in the beats that follow at once.
const (
	maxLogTailBytes = 4 << 10
	maxBatchBytes   = 512 << 10
)

// defaultInterval paces beats and reconnection until the queen names its interval.
const defaultInterval = time.Second

// Beater is the hive's heartbeat client.
type Beater struct {
	cfg      Config
	mu       sync.Mutex
	pending  []*rbeev1.WorkerExit
	wake     chan struct{}
	interval time.Duration // the queen's latest; only Run's goroutine touches it
}

// New returns a Beater; call Run.
func New(cfg Config) *Beater {
	return &Beater{cfg: cfg, wake: make(chan struct{}, 1), interval: defaultInterval}
}

// ReportExit queues a worker's exit for the queen and wakes the stream to send it now.
func (b *Beater) ReportExit(e process.Exit) {
	b.mu.Lock()
	if len(b.pending) >= maxPending {
		b.pending = b.pending[1:]
	}
	b.pending = append(b.pending, &rbeev1.WorkerExit{
		WorkerId: e.WorkerID, Pid: int32(e.PID), ProcessStartTime: e.StartTime,
		ExitCode: int32(e.ExitCode), Signal: e.Signal, LogTail: truncateTail(e.LogTail, maxLogTailBytes), ExitTime: timestamppb.New(e.Time),
	})
	b.mu.Unlock()
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// truncatedMark starts a log tail that was cut.
const truncatedMark = "[...]\n"

// truncateTail keeps the end of s within max bytes, starting after a line break where one falls in
// the kept part and never inside a UTF-8 sequence.
func truncateTail(s string, max int) string {
	if len(s) <= max {
		return s
	}
	keep := s[len(s)-(max-len(truncatedMark)):]
	if i := strings.IndexByte(keep, '\n'); i >= 0 && i < len(keep)-1 {
		keep = keep[i+1:]
	}
	for len(keep) > 0 && !utf8.RuneStart(keep[0]) {
		keep = keep[1:]
	}
	return truncatedMark + keep
}

// takePending takes the oldest pending exits that fit in budget bytes (at least one, which
// truncation keeps far below any budget) and reports whether more are left.
func (b *Beater) takePending(budget int) (exits []*rbeev1.WorkerExit, more bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	n, size := 0, 0
	for ; n < len(b.pending); n++ {
		// Each repeated field costs its bytes plus a tag and a length of at most 4 bytes here.
		sz := proto.Size(b.pending[n]) + 5
		if n > 0 && size+sz > budget {
			break
		}
		size += sz
	}
	exits = b.pending[:n:n]
	b.pending = b.pending[n:]
	if len(b.pending) == 0 {
		b.pending = nil
	}
	return exits, len(b.pending) > 0
}

// putBack returns exits that may not have reached the queen to the front of the queue.
func (b *Beater) putBack(exits []*rbeev1.WorkerExit) {
	if len(exits) == 0 {
		return
	}
	b.mu.Lock()
	b.pending = append(exits, b.pending...)
	if n := len(b.pending); n > maxPending {
		b.pending = b.pending[n-maxPending:]
	}
	b.mu.Unlock()
}

// Run keeps a heartbeat stream open until ctx is done.
func (b *Beater) Run(ctx context.Context) {
	attempt := 0
	for ctx.Err() == nil {
		start := time.Now()
		beat, err := b.session(ctx)
		if ctx.Err() != nil {
			return
		}
		if beat {
			// The stream worked until now: the next attempt counts from the break.
			attempt, start = 0, time.Now()
		}
		// About once per interval, jittered, counted from the attempt's start: a fleet of hives
		// reconnecting to a restarted queen spreads out, and a hive whose link returns is back
		// within one and a half intervals.
		d := max(0, rpcclient.ReconnectDelay(attempt, b.interval)-time.Since(start))
		attempt++
		b.cfg.Logger.Info("heartbeat stream to the queen broke; reconnecting", zap.Error(err), zap.Duration("backoff", d),
			zap.String("actor", "hive"), zap.String("action", "hive_heartbeat_reconnect"))
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// session dials the queen and runs one heartbeat stream on that connection.
func (b *Beater) session(ctx context.Context) (answered bool, err error) {
	conn, err := grpc.NewClient(b.cfg.Target, append(rpcclient.HeartbeatOptions(b.interval), b.cfg.DialOptions...)...)
	if err != nil {
		return false, fmt.Errorf("dial queen %s: %w", b.cfg.Target, err)
	}
	defer conn.Close()
	return b.stream(ctx, rbeev1.NewHeartbeatServiceClient(conn))
}

// stream runs one heartbeat stream; it reports whether the queen answered at least once.
func (b *Beater) stream(ctx context.Context, client rbeev1.HeartbeatServiceClient) (answered bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := client.HiveHeartbeat(ctx)
	if err != nil {
		return false, err
	}
	queenID := ""
	for {
		hive := b.cfg.Describe()
		exits, more := b.takePending(maxBatchBytes - proto.Size(hive))
		req := &rbeev1.HiveHeartbeatRequest{Hive: hive, Exits: exits}
		if b.cfg.Clock != nil {
			// Read last: the queen takes it as a lower bound of the hive's clock when the beat arrives.
			req.Clock = b.cfg.Clock()
		}
		if err := st.Send(req); err != nil {
			b.putBack(exits)
			return answered, err
		}
		// A queen that does not answer within three intervals is gone: cut the stream.
		watchdog := time.AfterFunc(3*b.interval, cancel)
		resp, err := st.Recv()
		watchdog.Stop()
		if err != nil {
			b.putBack(exits)
			return answered, err
		}
		answered = true
		if resp.GetQueenId() != queenID {
			queenID = resp.GetQueenId()
			b.cfg.Logger.Info("registered with the queen", zap.String("queen_id", queenID),
				zap.String("actor", "hive"), zap.String("action", "hive_registered"))
		}
		if d := resp.GetInterval().AsDuration(); d > 0 {
			b.interval = max(d, 10*time.Millisecond)
		}
		if more {
			continue // the rest of a burst of exits, in the next beat at once
		}
		t := time.NewTimer(b.interval)
		select {
		case <-ctx.Done():
			t.Stop()
			return answered, ctx.Err()
		case <-b.wake:
		case <-t.C:
		}
		t.Stop()
	}
}
