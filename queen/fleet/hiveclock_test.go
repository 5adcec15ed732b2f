package fleet

import (
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/hiveclock"
	"github.com/rbee-dev/rbee/queen/registry"
)

// recordingHive is a HiveService over the wire that records the Deletes it gets.
type recordingHive struct {
	rbeev1.UnimplementedHiveServiceServer
	mu      sync.Mutex
	deletes []*rbeev1.DeleteRequest
}

func (h *recordingHive) Delete(_ context.Context, in *rbeev1.DeleteRequest) (*rbeev1.DeleteResponse, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.deletes = append(h.deletes, in)
	return &rbeev1.DeleteResponse{Outcome: rbeev1.DeleteOutcome_DELETE_OUTCOME_EXITED}, nil
}

// A hive that sends this queen no heartbeat (a static --hive, the hive run with --register=false)
// still gets bounded calls: the pool reads its clock from the header of a health check first, over
// the real wire, and the Delete carries a bound in that clock. When the hive does not answer that
// check, nothing is sent and the caller is told so.
func TestStaticHiveCallsAreBoundedByAReadClock(t *testing.T) {
	clk := hiveclock.New()
	rh := &recordingHive{}
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(clk.UnaryInterceptor()))
	rbeev1.RegisterHiveServiceServer(srv, rh)
	healthpb.RegisterHealthServer(srv, health.NewServer())
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { defer close(served); _ = srv.Serve(lis) }()
	defer func() { srv.Stop(); <-served }()

	reg := registry.New(registry.Config{Interval: time.Second, StartTimeout: time.Minute})
	if err := reg.AddStaticHive("s1", lis.Addr().String()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	regDone := make(chan struct{})
	go func() { defer close(regDone); reg.Run(ctx) }()
	defer func() { cancel(); <-regDone }()
	pool := NewHivePool()
	defer pool.Close()
	f := New(Config{Registry: reg, Hives: pool, StartTimeout: time.Minute})
	if _, err := reg.Beat(registry.Worker{ID: "w1", HiveID: "s1", Model: "m", Device: "cpu", PID: 42, Port: 9100, State: registry.StateReady}); err != nil {
		t.Fatal(err)
	}

	before := clk.Now()
	if _, err := f.Delete(t.Context(), "w1", time.Second); err != nil {
		t.Fatal(err)
	}
	after := clk.Now()
	rh.mu.Lock()
	na := rh.deletes[0].GetNotAfter()
	rh.mu.Unlock()
	if na.GetInstance() != clk.Instance() {
		t.Fatalf("Delete bound %v, want one in the hive's clock (instance %x)", na, clk.Instance())
	}
	// The reading was taken between before and after; the bound lies within the start window past it.
	if r := na.GetReading().AsDuration(); r < before || r > after+hiveStartWindow {
		t.Errorf("bound at %v, want between %v and %v", r, before, after+hiveStartWindow)
	}

	srv.Stop()
	<-served
	if _, err := reg.Beat(registry.Worker{ID: "w2", HiveID: "s1", Model: "m", Device: "cpu", PID: 43, Port: 9101, State: registry.StateReady}); err != nil {
		t.Fatal(err)
	}
	_, err = f.Delete(t.Context(), "w2", time.Second)
	if KindOf(err) != KindUnavailable || !strings.Contains(err.Error(), "nothing was sent") {
		t.Fatalf("Delete through a hive whose clock cannot be read = %v; want UNAVAILABLE, nothing sent", err)
	}
}
