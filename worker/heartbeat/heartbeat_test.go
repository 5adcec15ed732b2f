package heartbeat

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/types/known/durationpb"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// waitFor bounds every wait for an event; reaching it is a failure.
const waitFor = 10 * time.Second

// queen is an in-process fake queen over bufconn that answers every beat unless silent.
type queen struct {
	rbeev1.UnimplementedHeartbeatServiceServer
	interval time.Duration
	silent   bool
	breaks   atomic.Int32 // this many streams fail right after their first beat

	beats  chan *rbeev1.Worker
	opened chan struct{}
	ended  chan error // nil for a clean CloseSend
}

// startQueen serves q until the test ends and returns the dial options that reach it.
func startQueen(t *testing.T, q *queen) []grpc.DialOption {
	t.Helper()
	q.beats = make(chan *rbeev1.Worker, 1024)
	q.opened = make(chan struct{}, 64)
	q.ended = make(chan error, 64)
	lis := bufconn.Listen(1 << 16)
	srv := grpc.NewServer()
	rbeev1.RegisterHeartbeatServiceServer(srv, q)
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(lis)
	}()
	t.Cleanup(func() {
		srv.Stop()
		<-done
	})
	return []grpc.DialOption{
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
	}
}

func (q *queen) WorkerHeartbeat(stream rbeev1.HeartbeatService_WorkerHeartbeatServer) error {
	q.opened <- struct{}{}
	for {
		req, err := stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = nil
			}
			q.ended <- err
			return err
		}
		select {
		case q.beats <- req.GetWorker():
		default:
		}
		if q.breaks.Add(-1) >= 0 {
			err := errors.New("injected stream failure")
			q.ended <- err
			return err
		}
		if q.silent {
			continue
		}
		resp := &rbeev1.WorkerHeartbeatResponse{QueenId: "q", Interval: durationpb.New(q.interval)}
		if err := stream.Send(resp); err != nil {
			return err
		}
	}
}

func (q *queen) nextBeat(t *testing.T) *rbeev1.Worker {
	t.Helper()
	select {
	case w := <-q.beats:
		return w
	case <-time.After(waitFor):
		t.Fatal("no heartbeat")
		return nil
	}
}

// runClient starts c.Run and stops it when the test ends.
func runClient(t *testing.T, c *Client) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
}

// TestFollowsQueenInterval: the client beats at the interval the queen names, however long its own
// starting interval is.
func TestFollowsQueenInterval(t *testing.T) {
	q := &queen{interval: 10 * time.Millisecond}
	opts := startQueen(t, q)
	c := New(Config{Queen: "passthrough:///queen", DialOptions: opts, Interval: time.Hour,
		Descriptor: func() *rbeev1.Worker { return &rbeev1.Worker{WorkerId: "w"} }})
	runClient(t, c)
	for range 5 {
		q.nextBeat(t)
	}
	if c.QueenID() != "q" {
		t.Errorf("QueenID = %q; want q", c.QueenID())
	}
}

// TestFlushAndClose: Flush returns once the queen answered a beat carrying the state set before
// it; Close ends the stream cleanly and Run returns.
func TestFlushAndClose(t *testing.T) {
	q := &queen{interval: time.Hour} // only the first beat and flushes reach the queen
	opts := startQueen(t, q)
	var state atomic.Int32
	state.Store(int32(rbeev1.WorkerState_WORKER_STATE_READY))
	c := New(Config{Queen: "passthrough:///queen", DialOptions: opts,
		Descriptor: func() *rbeev1.Worker { return &rbeev1.Worker{WorkerId: "w", State: rbeev1.WorkerState(state.Load())} }})
	runClient(t, c)
	q.nextBeat(t)

	state.Store(int32(rbeev1.WorkerState_WORKER_STATE_STOPPING))
	ctx, cancel := context.WithTimeout(t.Context(), waitFor)
	defer cancel()
	if err := c.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	if w := q.nextBeat(t); w.GetState() != rbeev1.WorkerState_WORKER_STATE_STOPPING {
		t.Fatalf("flushed beat in state %v; want STOPPING", w.GetState())
	}
	if err := c.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	select {
	case err := <-q.ended:
		if err != nil {
			t.Fatalf("stream ended with %v; want a clean close", err)
		}
	case <-time.After(waitFor):
		t.Fatal("stream not closed")
	}
}

// TestSilentQueenReconnects: beats unanswered for SilentBeats intervals end the stream, and the
// client opens a new one with its full descriptor first.
func TestSilentQueenReconnects(t *testing.T) {
	q := &queen{silent: true}
	opts := startQueen(t, q)
	c := New(Config{Queen: "passthrough:///queen", DialOptions: opts, Interval: 20 * time.Millisecond,
		Descriptor: func() *rbeev1.Worker { return &rbeev1.Worker{WorkerId: "w", Pid: 42} }})
	runClient(t, c)
	for i := range 3 {
		select {
		case <-q.opened:
		case <-time.After(waitFor):
			t.Fatalf("stream %d not opened", i+1)
		}
	}
	select {
	case err := <-q.ended:
		if err == nil {
			t.Fatal("a silent queen's stream closed cleanly; want it torn down")
		}
	case <-time.After(waitFor):
		t.Fatal("no stream ended")
	}
}

// TestFlushAcrossReconnect: a Flush issued while the stream is broken is answered by the new
// stream, whose first beat carries the full descriptor.
func TestFlushAcrossReconnect(t *testing.T) {
	// The client reconnects within about an interval, so the queen names a short one.
	q := &queen{interval: 50 * time.Millisecond}
	q.breaks.Store(1)
	opts := startQueen(t, q)
	c := New(Config{Queen: "passthrough:///queen", DialOptions: opts,
		Descriptor: func() *rbeev1.Worker { return &rbeev1.Worker{WorkerId: "w", Pid: 42, ProcessStartTime: 7} }})
	runClient(t, c)
	q.nextBeat(t)
	select {
	case <-q.ended: // the first stream is gone; the client is backing off or reconnecting
	case <-time.After(waitFor):
		t.Fatal("first stream did not end")
	}
	ctx, cancel := context.WithTimeout(t.Context(), waitFor)
	defer cancel()
	if err := c.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	if w := q.nextBeat(t); w.GetPid() != 42 || w.GetProcessStartTime() != 7 {
		t.Fatalf("first beat of the new stream = %v; want the full descriptor", w)
	}
}

// TestReconnectPacedByInterval: while the queen is down, the client tries about once per interval
// the queen named (never a burst, never a gap long enough to delay healing), however long the
// outage; when the queen is back, its first beat arrives within one and a half intervals.
func TestReconnectPacedByInterval(t *testing.T) {
	const iv = 300 * time.Millisecond
	var (
		mu       sync.Mutex
		attempts []time.Time
		lis      = bufconn.Listen(1 << 16)
	)
	dial := grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
		mu.Lock()
		attempts = append(attempts, time.Now())
		l := lis
		mu.Unlock()
		return l.DialContext(ctx)
	})
	serve := func(q *queen, l *bufconn.Listener) func() {
		q.beats = make(chan *rbeev1.Worker, 1024)
		q.opened = make(chan struct{}, 64)
		q.ended = make(chan error, 64)
		srv := grpc.NewServer()
		rbeev1.RegisterHeartbeatServiceServer(srv, q)
		done := make(chan struct{})
		go func() { defer close(done); _ = srv.Serve(l) }()
		return func() { srv.Stop(); <-done }
	}
	q1 := &queen{interval: iv}
	stop := serve(q1, lis)
	c := New(Config{Queen: "passthrough:///queen", DialOptions: []grpc.DialOption{dial, grpc.WithTransportCredentials(insecure.NewCredentials())},
		Descriptor: func() *rbeev1.Worker { return &rbeev1.Worker{WorkerId: "w"} }})
	runClient(t, c)
	q1.nextBeat(t)
	q1.nextBeat(t) // answered: the client knows the interval

	stop() // the queen is gone; every connect is refused at once
	down := time.Now()
	mu.Lock()
	attempts = nil
	mu.Unlock()
	const outage = 10 * iv
	time.Sleep(outage) // the outage's own length, observed by counting attempts
	mu.Lock()
	seen := append([]time.Time(nil), attempts...)
	mu.Unlock()

	// Attempt 0 follows the break by a quarter to three quarters of an interval, later ones
	// follow each other by half to one and a half.
	if len(seen) == 0 || seen[0].Sub(down) > iv {
		t.Fatalf("first reconnect %v after the break (%d attempts); want within an interval", seen, len(seen))
	}
	for i := 1; i < len(seen); i++ {
		gap := seen[i].Sub(seen[i-1])
		if gap < 2*iv/5 || gap > 3*iv/2+100*time.Millisecond {
			t.Errorf("attempts %d and %d %v apart; want half to one and a half intervals (%v)", i-1, i, gap, iv)
		}
	}
	// About one a interval: 10 expected; fewer than 7 means the backoff grows past the interval.
	if n := len(seen); n < 7 || n > 13 {
		t.Errorf("%d connect attempts in %v of outage at interval %v; want about one an interval", n, outage, iv)
	}

	q2 := &queen{interval: iv}
	l2 := bufconn.Listen(1 << 16)
	mu.Lock()
	lis = l2
	mu.Unlock()
	back := time.Now()
	defer serve(q2, l2)()
	q2.nextBeat(t)
	if d := time.Since(back); d > 3*iv/2+100*time.Millisecond {
		t.Errorf("first beat %v after the queen returned; want within one and a half intervals (%v)", d, iv)
	}
}
