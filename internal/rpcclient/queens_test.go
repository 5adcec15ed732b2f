package rpcclient

import (
	"context"
	"net"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeQueen answers GetStatus with its own id, and reports QueenService healthy or not.
type fakeQueen struct {
	rbeev1.UnimplementedQueenServiceServer
	id     string
	health *health.Server
	addr   string
}

func (q *fakeQueen) GetStatus(context.Context, *rbeev1.GetStatusRequest) (*rbeev1.GetStatusResponse, error) {
	return &rbeev1.GetStatusResponse{QueenId: q.id}, nil
}

func startFakeQueen(t *testing.T, id string, serving bool) *fakeQueen {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	q := &fakeQueen{id: id, health: health.NewServer(), addr: lis.Addr().String()}
	srv := grpc.NewServer()
	rbeev1.RegisterQueenServiceServer(srv, q)
	healthpb.RegisterHealthServer(srv, q.health)
	q.set(serving)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return q
}

func (q *fakeQueen) set(serving bool) {
	s := healthpb.HealthCheckResponse_NOT_SERVING
	if serving {
		s = healthpb.HealthCheckResponse_SERVING
	}
	q.health.SetServingStatus(QueenService, s)
}

// Given several queens, calls go to the one whose health says SERVING, follow it when another
// takes over, and wait (within the caller's deadline) while none does.
func TestQueenTargetFollowsTheServingQueen(t *testing.T) {
	a, b := startFakeQueen(t, "a", true), startFakeQueen(t, "b", false)
	target, opts, err := QueenTarget([]string{a.addr, b.addr}, QueenService)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(target, append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := rbeev1.NewQueenServiceClient(conn)
	who := func(d time.Duration) (string, error) {
		ctx, cancel := context.WithTimeout(t.Context(), d)
		defer cancel()
		r, err := c.GetStatus(ctx, &rbeev1.GetStatusRequest{})
		return r.GetQueenId(), err
	}
	for range 5 {
		if id, err := who(5 * time.Second); err != nil || id != "a" {
			t.Fatalf("with a leading: answered by %q, %v", id, err)
		}
	}
	a.set(false)
	// The client hears of it on the health watch stream: await that (the queen itself refuses
	// calls that race it), then a call must wait for a leader.
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	for s := conn.GetState(); s == connectivity.Ready; s = conn.GetState() {
		if !conn.WaitForStateChange(ctx, s) {
			t.Fatal("the client still sees a leader 5s after the last one stepped down")
		}
	}
	if id, err := who(300 * time.Millisecond); err == nil {
		t.Fatalf("with no queen leading, answered by %q; want the call to wait and time out", id)
	}
	// A call waiting for a leader goes through once one appears.
	got := make(chan string, 1)
	go func() { id, _ := who(5 * time.Second); got <- id }()
	b.set(true)
	if id := <-got; id != "b" {
		t.Fatalf("after b took over, answered by %q", id)
	}
	for range 5 {
		if id, err := who(5 * time.Second); err != nil || id != "b" {
			t.Fatalf("with b leading: answered by %q, %v", id, err)
		}
	}
}

// One address dials exactly as before: no resolver, no health-based balancing.
func TestQueenTargetOneAddressIsUnchanged(t *testing.T) {
	target, opts, err := QueenTarget([]string{"127.0.0.1:7833"}, QueenService)
	if err != nil || target != "127.0.0.1:7833" || len(opts) != 0 {
		t.Fatalf("QueenTarget(one) = %q, %d options, %v", target, len(opts), err)
	}
	if _, _, err := QueenTarget(nil, QueenService); err == nil {
		t.Fatal("QueenTarget(none) = nil error")
	}
}
