package heartbeat

import (
	"context"
	"net"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/types/known/durationpb"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/hive/process"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeQueen hands every hive beat to the test and answers it with an hour-long interval, so any
// beat after the first must have been woken by an exit.
type fakeQueen struct {
	rbeev1.UnimplementedHeartbeatServiceServer
	beats chan *rbeev1.HiveHeartbeatRequest
}

func (f *fakeQueen) HiveHeartbeat(st rbeev1.HeartbeatService_HiveHeartbeatServer) error {
	for {
		req, err := st.Recv()
		if err != nil {
			return nil
		}
		f.beats <- req
		if err := st.Send(&rbeev1.HiveHeartbeatResponse{QueenId: "q1", Interval: durationpb.New(time.Hour)}); err != nil {
			return err
		}
	}
}

func TestExitsAreSentAtOnce(t *testing.T) {
	fq := &fakeQueen{beats: make(chan *rbeev1.HiveHeartbeatRequest, 16)}
	srv := grpc.NewServer()
	rbeev1.RegisterHeartbeatServiceServer(srv, fq)
	lis := bufconn.Listen(1 << 16)
	go func() { _ = srv.Serve(lis) }()
	defer srv.Stop()
	conn, err := grpc.NewClient("passthrough:///buf",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	b := New(Config{Conn: conn, Logger: zap.NewNop(), Describe: func() *rbeev1.Hive {
		return &rbeev1.Hive{HiveId: "h1", Address: "127.0.0.1:7835"}
	}})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { defer close(done); b.Run(ctx) }()
	defer func() { cancel(); <-done }()

	first := <-fq.beats
	if first.GetHive().GetHiveId() != "h1" || len(first.GetExits()) != 0 {
		t.Fatalf("first beat %v: want the descriptor and no exits", first)
	}
	b.ReportExit(process.Exit{WorkerID: "w1", PID: 42, StartTime: 7, ExitCode: 3, LogTail: "boom", Time: time.Now()})
	select {
	case got := <-fq.beats:
		e := got.GetExits()
		if len(e) != 1 || e[0].GetWorkerId() != "w1" || e[0].GetExitCode() != 3 || e[0].GetLogTail() != "boom" || got.GetHive().GetHiveId() != "h1" {
			t.Fatalf("beat after the exit: %v", got)
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
	p := b.takePending()
	if len(p) != maxPending || p[0].GetPid() != 12 {
		t.Fatalf("kept %d exits starting at PID %d; want the newest %d", len(p), p[0].GetPid(), maxPending)
	}
	b.putBack(p)
	if got := b.takePending(); len(got) != maxPending {
		t.Fatalf("put back %d, got %d", maxPending, len(got))
	}
}
