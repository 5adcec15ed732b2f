package heartbeat

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/hive/process"
	"github.com/rbee-dev/rbee/internal/rpcserver"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeQueen hands every hive beat to the test and answers it with an hour-long interval, so any
// beat after the first must have been woken by an exit.
type fakeQueen struct {
	rbeev1.UnimplementedHeartbeatServiceServer
	beats    chan *rbeev1.HiveHeartbeatRequest
	interval time.Duration // an hour when zero
}

func (f *fakeQueen) HiveHeartbeat(st rbeev1.HeartbeatService_HiveHeartbeatServer) error {
	for {
		req, err := st.Recv()
		if err != nil {
			return nil
		}
		f.beats <- req
		iv := f.interval
		if iv == 0 {
			iv = time.Hour
		}
		if err := st.Send(&rbeev1.HiveHeartbeatResponse{QueenId: "q1", Interval: durationpb.New(iv)}); err != nil {
			return err
		}
	}
}

// bufDial reaches the fake queen listening on lis.
func bufDial(lis *bufconn.Listener) []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
	}
}

func TestExitsAreSentAtOnce(t *testing.T) {
	fq := &fakeQueen{beats: make(chan *rbeev1.HiveHeartbeatRequest, 16)}
	srv := grpc.NewServer()
	rbeev1.RegisterHeartbeatServiceServer(srv, fq)
	lis := bufconn.Listen(1 << 16)
	go func() { _ = srv.Serve(lis) }()
	defer srv.Stop()
	var readings atomic.Int64 // the hive's clock: each beat reads it anew
	b := New(Config{Target: "passthrough:///buf", DialOptions: bufDial(lis), Logger: zap.NewNop(), Describe: func() *rbeev1.Hive {
		return &rbeev1.Hive{HiveId: "h1", Address: "127.0.0.1:7835"}
	}, Clock: func() *rbeev1.HiveClock {
		return &rbeev1.HiveClock{Instance: 3, Reading: durationpb.New(time.Duration(readings.Add(1)) * time.Second)}
	}})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { defer close(done); b.Run(ctx) }()
	defer func() { cancel(); <-done }()

	first := <-fq.beats
	if first.GetHive().GetHiveId() != "h1" || len(first.GetExits()) != 0 {
		t.Fatalf("first beat %v: want the descriptor and no exits", first)
	}
	if c := first.GetClock(); c.GetInstance() != 3 || c.GetReading().AsDuration() != time.Second {
		t.Fatalf("first beat's clock %v: want the hive's reading", c)
	}
	b.ReportExit(process.Exit{WorkerID: "w1", PID: 42, StartTime: 7, ExitCode: 3, LogTail: "boom", Time: time.Now()})
	select {
	case got := <-fq.beats:
		e := got.GetExits()
		if len(e) != 1 || e[0].GetWorkerId() != "w1" || e[0].GetExitCode() != 3 || e[0].GetLogTail() != "boom" || got.GetHive().GetHiveId() != "h1" {
			t.Fatalf("beat after the exit: %v", got)
		}
		if got.GetClock().GetReading().AsDuration() != 2*time.Second {
			t.Fatalf("beat after the exit carries clock %v: want a reading taken for it", got.GetClock())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the exit was not sent at once (the queen asked for hourly beats)")
	}
}

func TestPendingExitsAreBounded(t *testing.T) {
	b := New(Config{Logger: zap.NewNop()})
	for i := range maxPending + 10 {
		b.ReportExit(process.Exit{WorkerID: "w", PID: i + 2})
	}
	p, _ := b.takePending(1 << 30)
	if len(p) != maxPending || p[0].GetPid() != 12 {
		t.Fatalf("kept %d exits starting at PID %d; want the newest %d", len(p), p[0].GetPid(), maxPending)
	}
	b.putBack(p)
	if got, _ := b.takePending(1 << 30); len(got) != maxPending {
		t.Fatalf("put back %d, got %d", maxPending, len(got))
	}
}

// TestBurstOfExitsFitsTheQueensLimit: exits queued while the queen was away (80 workers whose last
// output is 20 lines of 1,000 characters) reach a queen that accepts at most 1 MiB a message, all
// of them, each with the end of its output.
func TestBurstOfExitsFitsTheQueensLimit(t *testing.T) {
	fq := &fakeQueen{beats: make(chan *rbeev1.HiveHeartbeatRequest, 256)}
	srv := grpc.NewServer(grpc.MaxRecvMsgSize(rpcserver.MaxMessageBytes))
	rbeev1.RegisterHeartbeatServiceServer(srv, fq)
	lis := bufconn.Listen(1 << 16)
	go func() { _ = srv.Serve(lis) }()
	defer srv.Stop()
	b := New(Config{Target: "passthrough:///buf", DialOptions: bufDial(lis), Logger: zap.NewNop(), Describe: func() *rbeev1.Hive {
		return &rbeev1.Hive{HiveId: "h1", Address: "127.0.0.1:7835"}
	}})
	const workers = 80
	for i := range workers {
		var tail strings.Builder
		for l := range 20 {
			if l > 0 {
				tail.WriteByte('\n')
			}
			tail.WriteString(strings.Repeat(string(rune('a'+l)), 999) + "é")
		}
		tail.WriteString("\nCUDA out of memory")
		b.ReportExit(process.Exit{WorkerID: fmt.Sprintf("w%d", i), PID: i + 2, ExitCode: 1, LogTail: tail.String(), Time: time.Now()})
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { defer close(done); b.Run(ctx) }()
	defer func() { cancel(); <-done }()

	seen := map[string]bool{}
	timeout := time.After(20 * time.Second)
	for len(seen) < workers {
		select {
		case beat := <-fq.beats:
			if n := proto.Size(beat); n > rpcserver.MaxMessageBytes/2 {
				t.Errorf("a beat of %d bytes: want at most half the queen's limit", n)
			}
			for _, e := range beat.GetExits() {
				if seen[e.GetWorkerId()] {
					t.Errorf("exit of %s sent twice", e.GetWorkerId())
				}
				seen[e.GetWorkerId()] = true
				tail := e.GetLogTail()
				if len(tail) > maxLogTailBytes || !strings.HasSuffix(tail, "é\nCUDA out of memory") ||
					!strings.HasPrefix(tail, truncatedMark) || !utf8.ValidString(tail) {
					t.Fatalf("exit of %s: tail of %d bytes %.40q...%q: want at most %d bytes, marked as cut, ending with the last output",
						e.GetWorkerId(), len(tail), tail, tail[max(0, len(tail)-30):], maxLogTailBytes)
				}
			}
		case <-timeout:
			t.Fatalf("the queen learned %d of %d exits within 20s", len(seen), workers)
		}
	}
}

func TestTruncateTail(t *testing.T) {
	for _, tc := range []struct {
		in   string
		max  int
		want string
	}{
		{"short", 64, "short"},
		{"line one\nline two\nline three", 24, truncatedMark + "line three"},
		{strings.Repeat("x", 40), 16, truncatedMark + strings.Repeat("x", 16-len(truncatedMark))},
		{"ééééééééé", 11, truncatedMark + "éé"},
	} {
		if got := truncateTail(tc.in, tc.max); got != tc.want || len(got) > tc.max {
			t.Errorf("truncateTail(%q, %d) = %q, want %q", tc.in, tc.max, got, tc.want)
		}
	}
}

// While the queen is down the hive tries about once per interval the queen named (no burst, no
// gap that would delay healing), and its first beat reaches the returned queen within one and a
// half intervals.
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
	serve := func(l *bufconn.Listener) (*fakeQueen, func()) {
		fq := &fakeQueen{beats: make(chan *rbeev1.HiveHeartbeatRequest, 64), interval: iv}
		srv := grpc.NewServer()
		rbeev1.RegisterHeartbeatServiceServer(srv, fq)
		done := make(chan struct{})
		go func() { defer close(done); _ = srv.Serve(l) }()
		return fq, func() { srv.Stop(); <-done }
	}
	next := func(fq *fakeQueen) {
		t.Helper()
		select {
		case <-fq.beats:
		case <-time.After(10 * time.Second):
			t.Fatal("no beat")
		}
	}
	fq, stop := serve(lis)
	b := New(Config{Target: "passthrough:///buf", DialOptions: []grpc.DialOption{dial, grpc.WithTransportCredentials(insecure.NewCredentials())},
		Logger: zap.NewNop(), Describe: func() *rbeev1.Hive { return &rbeev1.Hive{HiveId: "h1"} }})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { defer close(done); b.Run(ctx) }()
	defer func() { cancel(); <-done }()
	next(fq)
	next(fq) // answered: the hive knows the interval

	stop()
	down := time.Now()
	mu.Lock()
	attempts = nil
	mu.Unlock()
	const outage = 10 * iv
	time.Sleep(outage) // the outage's own length, observed by counting attempts
	mu.Lock()
	seen := append([]time.Time(nil), attempts...)
	mu.Unlock()
	// The hive notices the break at its next beat (up to an interval later), then waits a quarter
	// to three quarters of one.
	if len(seen) == 0 || seen[0].Sub(down) > 2*iv {
		t.Fatalf("first reconnect %v after the break (%d attempts); want within two intervals", seen, len(seen))
	}
	for i := 1; i < len(seen); i++ {
		if gap := seen[i].Sub(seen[i-1]); gap < 2*iv/5 || gap > 3*iv/2+100*time.Millisecond {
			t.Errorf("attempts %d and %d %v apart; want half to one and a half intervals (%v)", i-1, i, gap, iv)
		}
	}
	if n := len(seen); n < 6 || n > 13 {
		t.Errorf("%d connect attempts in %v of outage at interval %v; want about one an interval", n, outage, iv)
	}

	l2 := bufconn.Listen(1 << 16)
	mu.Lock()
	lis = l2
	mu.Unlock()
	back := time.Now()
	fq2, stop2 := serve(l2)
	defer stop2()
	next(fq2)
	if d := time.Since(back); d > 3*iv/2+100*time.Millisecond {
		t.Errorf("first beat %v after the queen returned; want within one and a half intervals (%v)", d, iv)
	}
}
