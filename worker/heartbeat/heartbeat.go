// Package heartbeat is the worker's side of the WorkerHeartbeat stream: it keeps one stream open to
// the queen, sends the worker's full descriptor at the interval the queen names, notices a silent
// queen, and reconnects about once per interval, jittered, when the stream breaks.
package heartbeat

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/auth"
	"github.com/rbee-dev/rbee/internal/narrate"
	"github.com/rbee-dev/rbee/internal/rpcclient"
	"github.com/rbee-dev/rbee/internal/validate"
	"go.uber.org/zap"
	"google.golang.org/grpc"
)

// Defaults for Config fields left zero.
const (
	DefaultInterval    = time.Second // until the queen names one
	DefaultSilentBeats = 3
)

// minInterval guards against a queen (or a bug) asking for a busy loop.
const minInterval = 10 * time.Millisecond

// Narration fields of the lines this package logs.
const (
	actorWorker         = "worker"
	actionReconnect     = "worker_heartbeat_reconnect"
	actionConnected     = "worker_heartbeat_connected"
	actionQueenRestart  = "worker_queen_changed"
	actionHeartbeatDone = "worker_heartbeat_closed"
)

// errQueenSilent ends a session whose beats went unanswered for too long.
var errQueenSilent = errors.New("queen answered no heartbeat for too long")

// errClosing ends the last session after Close.
var errClosing = errors.New("heartbeat closing")

// Config configures a Client.
type Config struct {
	// Queen is the queen's address (host:port), or several queens' (A,B,C): the stream then goes
	// to whichever leads and follows a failover (internal/rpcclient.QueenTarget).
	Queen string
	// DialOptions are passed to grpc.NewClient after rpcclient.HeartbeatOptions; the caller decides
	// transport security here.
	DialOptions []grpc.DialOption
	// Descriptor returns the worker's current full descriptor; it is called for every beat.
	Descriptor func() *rbeev1.Worker
	// Logger receives connection changes; nil means zap.NewNop.
	Logger *zap.Logger
	// Interval is used until the queen names one (DefaultInterval when zero). It paces the beats
	// and the reconnection (rpcclient.ReconnectDelay).
	Interval time.Duration
	// SilentBeats is how many intervals the oldest unanswered beat may wait before the queen is
	// taken for gone (DefaultSilentBeats when zero).
	SilentBeats int
}

// DialOptionsFromEnv returns Config.DialOptions for a worker started by a hive: the hive hands the
// worker its own token ($RBEE_WORKER_TOKEN) and the cluster's TLS files in the environment, never
// on the command line.
func DialOptionsFromEnv() ([]grpc.DialOption, error) {
	creds, err := auth.TLSFromEnv().DialOption()
	if err != nil {
		return nil, err
	}
	// The client adds its own connect and keepalive settings (rpcclient.HeartbeatOptions).
	return append([]grpc.DialOption{creds}, auth.Bearer(os.Getenv(auth.EnvWorkerToken))...), nil
}

// Client keeps the worker's heartbeat stream. Create it with New, start Run in a goroutine, and
// end it with Close.
type Client struct {
	cfg Config
	log *zap.Logger

	kick    chan struct{}      // an immediate beat is wanted (state change)
	flush   chan chan struct{} // beat now and close the channel once a response to it arrives
	closing chan struct{}      // closed by Close: end the stream cleanly, no reconnect
	done    chan struct{}      // closed when Run returns

	closeOnce sync.Once

	mu       sync.Mutex
	interval time.Duration // the queen's latest interval
	queenID  string        // the queen's latest id
}

// New returns a Client for cfg.
func New(cfg Config) *Client {
	if cfg.Interval <= 0 {
		cfg.Interval = DefaultInterval
	}
	if cfg.SilentBeats <= 0 {
		cfg.SilentBeats = DefaultSilentBeats
	}
	log := cfg.Logger
	if log == nil {
		log = zap.NewNop()
	}
	return &Client{
		cfg:      cfg,
		log:      log,
		kick:     make(chan struct{}, 1),
		flush:    make(chan chan struct{}),
		closing:  make(chan struct{}),
		done:     make(chan struct{}),
		interval: cfg.Interval,
	}
}

// QueenID returns the id from the queen's latest response, empty before the first.
func (c *Client) QueenID() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.queenID
}

func (c *Client) currentInterval() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.interval
}

// Beat asks for a beat right away, e.g. after a state change. It never blocks.
func (c *Client) Beat() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// Flush sends a beat right away and waits until the queen answers it (or a later beat), or until
// ctx ends. The worker uses it to make sure the queen heard STOPPING before it goes.
func (c *Client) Flush(ctx context.Context) error {
	ch := make(chan struct{})
	select {
	case c.flush <- ch:
	case <-c.done:
		return errClosing
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close half-closes the stream and waits for the queen to end it, so that the queen sees a clean
// close rather than a broken stream. It returns nil once Run has returned, or ctx's error when the
// queen did not end the stream in time; the caller then cancels Run's context to tear it down.
func (c *Client) Close(ctx context.Context) error {
	c.closeOnce.Do(func() { close(c.closing) })
	select {
	case <-c.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Run keeps the stream until ctx ends or Close is called. Call it once.
func (c *Client) Run(ctx context.Context) {
	defer close(c.done)
	var (
		attempt int
		waiters []chan struct{} // Flush callers not yet answered, carried across sessions
	)
	for {
		start := time.Now()
		answered, err := c.session(ctx, &waiters)
		if errors.Is(err, errClosing) || ctx.Err() != nil {
			return
		}
		if answered {
			// The stream worked until now: the next attempt counts from the break.
			attempt, start = 0, time.Now()
		}
		// Counted from the attempt's start: a connect that timed out in a cut has already spent
		// its share of the wait.
		delay := max(0, rpcclient.ReconnectDelay(attempt, c.currentInterval())-time.Since(start))
		attempt++
		narrate.Warn(narrate.WithLogger(ctx, c.log), actorWorker, actionReconnect, "heartbeat stream broke; reconnecting",
			zap.Error(err), zap.Duration("delay", delay), zap.Int("attempt", attempt))
		t := time.NewTimer(delay)
	wait:
		for {
			select {
			case <-t.C:
				break wait
			case w := <-c.flush:
				// Answered by the first beat of the next session.
				waiters = append(waiters, w)
			case <-c.closing:
				t.Stop()
				return
			case <-ctx.Done():
				t.Stop()
				return
			}
		}
	}
}

// pendingFlush is a Flush caller waiting for the response to beat number seq of the session.
type pendingFlush struct {
	seq int
	ch  chan struct{}
}

// session runs one stream: it returns whether the queen answered at least one beat, and why the
// stream ended.
func (c *Client) session(ctx context.Context, carried *[]chan struct{}) (answered bool, err error) {
	// A connection per session, dialled with the interval known now: a connect into a cut (a SYN
	// lost) fails within about an interval, and Run's pacing takes over.
	opts := append(rpcclient.HeartbeatOptions(c.currentInterval()), c.cfg.DialOptions...)
	target, qopts, err := queenTarget(c.cfg.Queen)
	if err != nil {
		return false, err
	}
	conn, err := grpc.NewClient(target, append(opts, qopts...)...)
	if err != nil {
		return false, fmt.Errorf("dial queen %s: %w", c.cfg.Queen, err)
	}
	defer conn.Close()

	sctx, cancel := context.WithCancel(ctx)
	var recvWG sync.WaitGroup
	// Run last: cancel the stream, then wait for the receiver so that nothing outlives the session.
	defer recvWG.Wait()
	defer cancel()

	stream, err := rbeev1.NewHeartbeatServiceClient(conn).WorkerHeartbeat(sctx)
	if err != nil {
		return false, fmt.Errorf("open heartbeat stream: %w", err)
	}

	resps := make(chan *rbeev1.WorkerHeartbeatResponse)
	recvErr := make(chan error, 1)
	recvWG.Go(func() {
		for {
			r, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case resps <- r:
			case <-sctx.Done():
				return
			}
		}
	})

	var (
		sent     []time.Time // send times of unanswered beats, oldest first
		lastSend time.Time   // when the latest beat went out
		seq      int         // beats sent in this session
		acked    int         // responses received in this session
		flushes  []pendingFlush
	)
	for _, w := range *carried {
		flushes = append(flushes, pendingFlush{seq: 1, ch: w})
	}
	*carried = nil
	defer func() {
		// Unanswered Flush callers move on to the next session.
		for _, f := range flushes {
			*carried = append(*carried, f.ch)
		}
	}()

	next := time.NewTimer(0) // the first beat goes at once
	defer next.Stop()
	silent := time.NewTimer(time.Hour)
	silent.Stop()
	defer silent.Stop()

	send := func() error {
		if err := stream.Send(&rbeev1.WorkerHeartbeatRequest{Worker: c.cfg.Descriptor()}); err != nil {
			// io.EOF means the stream is gone; the reason would come from Recv, but the session ends
			// either way.
			return fmt.Errorf("send heartbeat: %w", err)
		}
		seq++
		lastSend = time.Now()
		sent = append(sent, lastSend)
		iv := c.currentInterval()
		next.Reset(iv)
		if len(sent) == 1 {
			silent.Reset(time.Duration(c.cfg.SilentBeats) * iv)
		}
		return nil
	}

	for {
		select {
		case <-next.C:
			if err := send(); err != nil {
				return answered, err
			}
		case <-c.kick:
			if err := send(); err != nil {
				return answered, err
			}
		case w := <-c.flush:
			if err := send(); err != nil {
				*carried = append(*carried, w)
				return answered, err
			}
			flushes = append(flushes, pendingFlush{seq: seq, ch: w})
		case r := <-resps:
			if !answered {
				narrate.Event(narrate.WithLogger(ctx, c.log), actorWorker, actionConnected, "heartbeat stream answered by the queen",
					zap.String("queen_id", r.GetQueenId()))
			}
			answered = true
			acked++
			if len(sent) > 0 {
				sent = sent[1:]
			}
			if c.apply(ctx, r) {
				// A new interval applies from the latest beat on, not only after the next one.
				next.Reset(time.Until(lastSend.Add(c.currentInterval())))
			}
			if len(sent) > 0 {
				// The next oldest beat has SilentBeats intervals from its own send.
				silent.Reset(time.Until(sent[0].Add(time.Duration(c.cfg.SilentBeats) * c.currentInterval())))
			} else {
				silent.Stop()
			}
			kept := flushes[:0]
			for _, f := range flushes {
				if f.seq <= acked {
					close(f.ch)
				} else {
					kept = append(kept, f)
				}
			}
			flushes = kept
		case <-silent.C:
			return answered, errQueenSilent
		case err := <-recvErr:
			if errors.Is(err, io.EOF) {
				return answered, errors.New("queen ended the heartbeat stream")
			}
			return answered, fmt.Errorf("receive heartbeat response: %w", err)
		case <-c.closing:
			return answered, c.closeStream(sctx, stream, resps, recvErr)
		case <-ctx.Done():
			return answered, ctx.Err()
		}
	}
}

// closeStream half-closes the stream and waits for the queen to end it; it always returns
// errClosing so that Run stops. Responses still in flight are applied and dropped.
func (c *Client) closeStream(ctx context.Context, stream grpc.BidiStreamingClient[rbeev1.WorkerHeartbeatRequest, rbeev1.WorkerHeartbeatResponse],
	resps <-chan *rbeev1.WorkerHeartbeatResponse, recvErr <-chan error) error {
	lctx := narrate.WithLogger(ctx, c.log)
	if err := stream.CloseSend(); err != nil {
		narrate.Warn(lctx, actorWorker, actionHeartbeatDone, "heartbeat close-send failed", zap.Error(err))
		return errClosing
	}
	for {
		select {
		case <-resps:
		case err := <-recvErr:
			if errors.Is(err, io.EOF) {
				narrate.Event(lctx, actorWorker, actionHeartbeatDone, "heartbeat stream closed by the queen")
			} else {
				narrate.Warn(lctx, actorWorker, actionHeartbeatDone, "heartbeat stream ended with an error", zap.Error(err))
			}
			return errClosing
		case <-ctx.Done():
			// Run's context ended while waiting; the deferred cancel tears the stream down.
			return errClosing
		}
	}
}

// apply takes the interval and queen id from a response, logging a new queen. It reports whether
// the interval changed.
func (c *Client) apply(ctx context.Context, r *rbeev1.WorkerHeartbeatResponse) (intervalChanged bool) {
	c.mu.Lock()
	old := c.queenID
	c.queenID = r.GetQueenId()
	if iv := r.GetInterval().AsDuration(); iv > 0 && max(iv, minInterval) != c.interval {
		c.interval = max(iv, minInterval)
		intervalChanged = true
	}
	c.mu.Unlock()
	if old == "" || old == r.GetQueenId() {
		return intervalChanged
	}
	narrate.Event(narrate.WithLogger(ctx, c.log), actorWorker, actionQueenRestart, "queen id changed (queen restarted)",
		zap.String("old_queen_id", old), zap.String("queen_id", r.GetQueenId()))
	return intervalChanged
}

// queenTarget dials one queen as given, or several (A,B,C) as one connection that follows the
// leader.
func queenTarget(queen string) (string, []grpc.DialOption, error) {
	if !strings.Contains(queen, ",") {
		return queen, nil, nil
	}
	addrs, err := validate.Addresses("--queen", queen)
	if err != nil {
		return "", nil, err
	}
	return rpcclient.QueenTarget(addrs, rpcclient.HeartbeatService)
}
