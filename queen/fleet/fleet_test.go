package fleet

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/queen/registry"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeHive answers Spawn with made-up process data and records Deletes.
type fakeHive struct {
	mu      sync.Mutex
	spawns  []*rbeev1.SpawnRequest
	deletes []*rbeev1.DeleteRequest
	pid     int32
}

func (f *fakeHive) Hive(string) (rbeev1.HiveServiceClient, error) { return f, nil }

func (f *fakeHive) Spawn(_ context.Context, in *rbeev1.SpawnRequest, _ ...grpc.CallOption) (*rbeev1.SpawnResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.spawns = append(f.spawns, in)
	f.pid++
	return &rbeev1.SpawnResponse{Pid: 1000 + f.pid, Port: 9100, ProcessStartTime: 7}, nil
}

func (f *fakeHive) Delete(_ context.Context, in *rbeev1.DeleteRequest, _ ...grpc.CallOption) (*rbeev1.DeleteResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.deletes = append(f.deletes, in)
	return &rbeev1.DeleteResponse{Outcome: rbeev1.DeleteOutcome_DELETE_OUTCOME_EXITED}, nil
}

// Logs answers with one chunk naming the request, or NOT_FOUND for worker "nolog".
func (f *fakeHive) Logs(_ context.Context, in *rbeev1.LogsRequest, _ ...grpc.CallOption) (grpc.ServerStreamingClient[rbeev1.LogsResponse], error) {
	if in.GetWorkerId() == "nolog" {
		return nil, status.Error(codes.NotFound, "no log of worker \"nolog\" on this hive")
	}
	return &fakeLogs{chunks: []string{fmt.Sprintf("%s tail=%d follow=%v", in.GetWorkerId(), in.GetTailLines(), in.GetFollow())}}, nil
}

type fakeLogs struct {
	grpc.ClientStream
	chunks []string
}

func (l *fakeLogs) Recv() (*rbeev1.LogsResponse, error) {
	if len(l.chunks) == 0 {
		return nil, io.EOF
	}
	c := l.chunks[0]
	l.chunks = l.chunks[1:]
	return &rbeev1.LogsResponse{Data: []byte(c)}, nil
}

// spawnCount is how many Spawns the hive answered.
func (f *fakeHive) spawnCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.spawns)
}

func (f *fakeHive) deleted() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.deletes)
}

func newFleet(t *testing.T) (*Fleet, *fakeHive, *registry.Registry) {
	t.Helper()
	reg := registry.New(registry.Config{Interval: time.Second, StartTimeout: time.Minute})
	if err := reg.AddStaticHive("h1", "127.0.0.1:1"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); reg.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	fh := &fakeHive{}
	return New(Config{Registry: reg, Hives: fh, StartTimeout: time.Minute}), fh, reg
}

// A caller that gives up on wait_ready is told it cancelled, not that the worker timed out, and
// the half-started worker is removed either way.
func TestSpawnWaitReadyCancelledVersusTimedOut(t *testing.T) {
	for _, tc := range []struct {
		name string
		ctx  func() (context.Context, context.CancelFunc)
		spec SpawnSpec
		want Kind
	}{
		{"caller cancels", func() (context.Context, context.CancelFunc) {
			ctx, cancel := context.WithCancel(t.Context())
			time.AfterFunc(50*time.Millisecond, cancel)
			return ctx, cancel
		}, SpawnSpec{Model: "m", WorkerID: "c1", WaitReady: true}, KindCanceled},
		{"ready timeout", func() (context.Context, context.CancelFunc) { return context.WithCancel(t.Context()) },
			SpawnSpec{Model: "m", WorkerID: "t1", WaitReady: true, ReadyTimeout: 50 * time.Millisecond}, KindDeadline},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, fh, reg := newFleet(t)
			ctx, cancel := tc.ctx()
			defer cancel()
			_, err := f.Spawn(ctx, tc.spec)
			if got := KindOf(err); got != tc.want {
				t.Fatalf("Spawn error %v has kind %d, want %d", err, got, tc.want)
			}
			if _, ok := reg.Get(tc.spec.WorkerID); ok {
				t.Fatal("the half-started worker is still in the registry")
			}
			if fh.deleted() != 1 {
				t.Fatalf("hive got %d Deletes, want 1 (the half-started process must be stopped)", fh.deleted())
			}
		})
	}
}

func TestSpawnRefusesBadFields(t *testing.T) {
	f, _, _ := newFleet(t)
	for _, spec := range []SpawnSpec{{}, {Model: "m", Device: "gpu0"}, {Model: "m", WorkerID: "Bad_ID"}, {Model: "m", HiveID: "-x"}} {
		if _, err := f.Spawn(t.Context(), spec); KindOf(err) != KindInvalid {
			t.Errorf("Spawn(%+v) = %v, want an invalid-argument error", spec, err)
		}
	}
	if _, err := f.Spawn(t.Context(), SpawnSpec{Model: "m", HiveID: "nope"}); KindOf(err) != KindNotFound {
		t.Errorf("unknown hive: %v, want not found", err)
	}
	if _, err := f.Delete(t.Context(), "ghost", -1); KindOf(err) != KindNotFound {
		t.Errorf("unknown worker: %v, want not found", err)
	}
}

func TestHiveErrorsKeepTheHivesVerdict(t *testing.T) {
	for code, want := range map[codes.Code]Kind{
		codes.FailedPrecondition: KindFailedPrecondition,
		codes.ResourceExhausted:  KindResourceExhausted,
		codes.Unavailable:        KindUnavailable,
		codes.DeadlineExceeded:   KindUnavailable,
		codes.Canceled:           KindCanceled,
		codes.Unimplemented:      KindUnimplemented,
		codes.Internal:           KindInternal,
	} {
		err := hiveError("h1", "127.0.0.1:1", "spawn", status.Error(code, "x"))
		if err.Kind != want || !errors.Is(err, err.Err) {
			t.Errorf("%v -> kind %d, want %d", code, err.Kind, want)
		}
		if CodeOf(want) != code && code != codes.DeadlineExceeded {
			t.Errorf("CodeOf(%d) = %v, want %v", want, CodeOf(want), code)
		}
	}
}

// TestDeleteThroughTheHiveOnTheWorkersHost: a worker whose hive is not known (a queen restarted
// after that hive went away, so it never learned its address) is deleted through the only live
// hive on the host the worker reports as its address; with none, or two, the error says what to do.
func TestDeleteThroughTheHiveOnTheWorkersHost(t *testing.T) {
	f, fh, reg := newFleet(t)
	// Relearned from its beats: hive "gone" is not known.
	if _, err := reg.Beat(registry.Worker{ID: "w1", HiveID: "gone", Model: "m", Device: "cpu", PID: 4242, Port: 9100,
		Address: "10.0.0.7", State: registry.StateReady}); err != nil {
		t.Fatal(err)
	}
	_, err := f.Delete(t.Context(), "w1", 0)
	if KindOf(err) != KindFailedPrecondition || !strings.Contains(err.Error(), "start a hive on 10.0.0.7") || !strings.Contains(err.Error(), "4242") {
		t.Fatalf("Delete with no hive on the worker's host = %v", err)
	}
	if _, err := reg.HiveBeat(registry.Hive{ID: "new", Address: "10.0.0.7:7835", FreePorts: 10}); err != nil {
		t.Fatal(err)
	}
	d, err := f.Delete(t.Context(), "w1", 0)
	if err != nil || d.Outcome != rbeev1.DeleteOutcome_DELETE_OUTCOME_EXITED || fh.deleted() != 1 {
		t.Fatalf("Delete through hive new = %+v, %v (%d hive deletes)", d, err, fh.deleted())
	}
	if _, ok := reg.Get("w1"); ok {
		t.Fatal("worker still registered after its delete")
	}
}

// TestLogs: the log of a live worker and of one removed lately is asked of its hive; an unknown
// worker and a hive without the log are NOT_FOUND.
func TestLogs(t *testing.T) {
	f, _, reg := newFleet(t)
	read := func(id string) (string, error) {
		var got []byte
		err := f.Logs(t.Context(), id, 5, true, func(b []byte) error { got = append(got, b...); return nil })
		return string(got), err
	}
	w, err := f.Spawn(t.Context(), SpawnSpec{Model: "m", WorkerID: "live"})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := read(w.ID); err != nil || got != "live tail=5 follow=true" {
		t.Fatalf("Logs(live) = %q, %v", got, err)
	}
	if _, err := f.Delete(t.Context(), w.ID, 0); err != nil {
		t.Fatal(err)
	}
	if _, ok := reg.Get(w.ID); ok {
		t.Fatal("deleted worker still registered")
	}
	if got, err := read(w.ID); err != nil || got != "live tail=5 follow=true" {
		t.Fatalf("Logs of the deleted worker = %q, %v; want its hive asked", got, err)
	}
	if _, err := read("never"); KindOf(err) != KindNotFound {
		t.Errorf("Logs(never) = %v, want not found", err)
	}
	if _, err := f.Spawn(t.Context(), SpawnSpec{Model: "m", WorkerID: "nolog"}); err != nil {
		t.Fatal(err)
	}
	if _, err := read("nolog"); KindOf(err) != KindNotFound {
		t.Errorf("Logs(nolog) = %v, want the hive's NOT_FOUND", err)
	}
	if _, err := read("Bad/Id"); KindOf(err) != KindInvalid {
		t.Errorf("Logs(Bad/Id) = %v, want invalid", err)
	}
}

// Every hive call carries the leader's fencing token, and a queen that no longer leads makes no
// hive call at all: the spawn leaves nothing behind and both answers say UNAVAILABLE.
func TestFenceGatesEveryHiveCall(t *testing.T) {
	f, fh, reg := newFleet(t)
	var mu sync.Mutex
	leading, token := true, uint64(41)
	f.cfg.Fence = func() (uint64, error) {
		mu.Lock()
		defer mu.Unlock()
		if !leading {
			return 0, errors.New("this queen is not the leader")
		}
		return token, nil
	}
	w, err := f.Spawn(t.Context(), SpawnSpec{Model: "m", WorkerID: "a"})
	if err != nil {
		t.Fatal(err)
	}
	if got := fh.spawns[0].GetFencingToken(); got != token {
		t.Fatalf("spawn carried fencing token %d, want %d", got, token)
	}
	mu.Lock()
	leading = false
	mu.Unlock()
	if _, err := f.Delete(t.Context(), w.ID, 0); KindOf(err) != KindUnavailable {
		t.Fatalf("Delete by a deposed queen: %v, want unavailable", err)
	}
	if _, err := f.Spawn(t.Context(), SpawnSpec{Model: "m", WorkerID: "b"}); KindOf(err) != KindUnavailable {
		t.Fatalf("Spawn by a deposed queen: %v, want unavailable", err)
	}
	if len(fh.spawns) != 1 || fh.deleted() != 0 {
		t.Fatalf("a deposed queen called its hive: %d spawns, %d deletes", len(fh.spawns), fh.deleted())
	}
	if _, ok := reg.Get("b"); ok {
		t.Fatal("a refused spawn left its reservation behind")
	}
	mu.Lock()
	leading, token = true, 57
	mu.Unlock()
	if _, err := f.Delete(t.Context(), w.ID, 0); err != nil {
		t.Fatal(err)
	}
	if got := fh.deletes[0].GetFencingToken(); got != 57 {
		t.Fatalf("delete carried fencing token %d, want 57", got)
	}
}

// A model no live hive offers is refused before any hive is called, naming the model and the
// hives considered; a named hive that lacks it is refused too.
func TestSpawnUnofferedModel(t *testing.T) {
	f, fh, reg := newFleet(t)
	if _, err := reg.HiveBeat(registry.Hive{ID: "h1", FreePorts: 10, Models: []registry.ModelOffer{{Name: "llama-8b"}}}); err != nil {
		t.Fatal(err)
	}
	_, err := f.Spawn(t.Context(), SpawnSpec{Model: "qwen-7b"})
	if KindOf(err) != KindFailedPrecondition || !strings.Contains(err.Error(), `"qwen-7b"`) || !strings.Contains(err.Error(), "h1 (offers llama-8b)") {
		t.Fatalf("Spawn of an unoffered model = %v, want FAILED_PRECONDITION naming it and h1", err)
	}
	_, err = f.Spawn(t.Context(), SpawnSpec{Model: "qwen-7b", HiveID: "h1"})
	if KindOf(err) != KindFailedPrecondition || !strings.Contains(err.Error(), "h1 does not offer") {
		t.Fatalf("Spawn on a hive without the model = %v", err)
	}
	if _, err := f.Spawn(t.Context(), SpawnSpec{Model: "llama-8b"}); err != nil {
		t.Fatalf("Spawn of an offered model: %v", err)
	}
	// Devices: a cuda-only model is not placed on cpu; full hives that offer it are a matter of
	// room (RESOURCE_EXHAUSTED), not of the catalog.
	if _, err := reg.HiveBeat(registry.Hive{ID: "h2", FreePorts: 10, Models: []registry.ModelOffer{{Name: "big", Devices: []string{"cuda:0"}}}}); err != nil {
		t.Fatal(err)
	}
	_, err = f.Spawn(t.Context(), SpawnSpec{Model: "big"})
	if KindOf(err) != KindFailedPrecondition || !strings.Contains(err.Error(), `model "big" on cpu`) || !strings.Contains(err.Error(), "h2 (offers big on cuda:0 only)") {
		t.Fatalf("Spawn of a cuda-only model on cpu = %v", err)
	}
	if _, err := reg.HiveBeat(registry.Hive{ID: "h2", FreePorts: 0, Models: []registry.ModelOffer{{Name: "big"}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Spawn(t.Context(), SpawnSpec{Model: "big"}); KindOf(err) != KindResourceExhausted {
		t.Fatalf("Spawn of a model only a full hive offers = %v, want RESOURCE_EXHAUSTED", err)
	}
	if n := fh.spawnCount(); n != 1 {
		t.Fatalf("the hive was asked %d times, want once (for the offered model only)", n)
	}
}

// A Delete that names no grace period takes the catalog's grace for the worker's model, as its
// hive reported it; one that names a grace keeps it.
func TestDeleteTakesTheCatalogGrace(t *testing.T) {
	f, fh, reg := newFleet(t)
	if _, err := reg.HiveBeat(registry.Hive{ID: "h1", FreePorts: 10, Models: []registry.ModelOffer{{Name: "llama-8b", Grace: 9 * time.Second}}}); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"a", "b"} {
		if _, err := f.Spawn(t.Context(), SpawnSpec{Model: "llama-8b", WorkerID: id}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.Delete(t.Context(), "a", -1); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Delete(t.Context(), "b", time.Second); err != nil {
		t.Fatal(err)
	}
	fh.mu.Lock()
	defer fh.mu.Unlock()
	if g := fh.deletes[0].GetGracePeriod().AsDuration(); g != 9*time.Second {
		t.Errorf("Delete without a grace sent %v, want the catalog's 9s", g)
	}
	if g := fh.deletes[1].GetGracePeriod().AsDuration(); g != time.Second {
		t.Errorf("Delete with grace 1s sent %v", g)
	}
}

// unreachableHive fails every Delete as a hive cut off by the network does (deadline exceeded),
// and records the connections the fleet abandons.
type unreachableHive struct {
	fakeHive
	dropped []string
}

func (u *unreachableHive) Hive(string) (rbeev1.HiveServiceClient, error) { return u, nil }

func (u *unreachableHive) Delete(_ context.Context, in *rbeev1.DeleteRequest, _ ...grpc.CallOption) (*rbeev1.DeleteResponse, error) {
	u.fakeHive.mu.Lock()
	defer u.fakeHive.mu.Unlock()
	u.deletes = append(u.deletes, in)
	return nil, status.Error(codes.DeadlineExceeded, "context deadline exceeded")
}

func (u *unreachableHive) Spawn(context.Context, *rbeev1.SpawnRequest, ...grpc.CallOption) (*rbeev1.SpawnResponse, error) {
	return nil, status.Error(codes.DeadlineExceeded, "context deadline exceeded")
}

func (u *unreachableHive) Drop(address string) {
	u.fakeHive.mu.Lock()
	defer u.fakeHive.mu.Unlock()
	u.dropped = append(u.dropped, address)
}

// fleetWithHive returns a fleet over a registry (running in the caller's synctest bubble) that
// knows self-registered hive h2 and its READY worker w1.
func fleetWithHive(t *testing.T, hives HiveDialer) (*Fleet, *registry.Registry) {
	t.Helper()
	reg := registry.New(registry.Config{Interval: time.Second, StaleAfter: 3 * time.Second, ExpireAfter: time.Hour, StartTimeout: time.Minute})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); reg.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	if _, err := reg.HiveBeat(registry.Hive{ID: "h2", Address: "10.0.0.2:7835"}); err != nil {
		t.Fatal(err)
	}
	if _, err := reg.Beat(registry.Worker{ID: "w1", HiveID: "h2", Model: "m", Device: "cpu", PID: 42, Port: 9100, State: registry.StateReady}); err != nil {
		t.Fatal(err)
	}
	return New(Config{Registry: reg, Hives: hives, StartTimeout: time.Minute}), reg
}

// A Delete for a worker whose hive stopped beating is refused at once, UNAVAILABLE, and nothing is
// sent: a request sent into a partition could arrive, and act, after the operator was told it failed.
func TestDeleteRefusedWhileHiveStale(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fh := &fakeHive{}
		f, _ := fleetWithHive(t, fh)
		time.Sleep(4 * time.Second) // no beats: h2 and w1 turn STALE
		synctest.Wait()
		_, err := f.Delete(t.Context(), "w1", time.Second)
		var fe *Error
		if !errors.As(err, &fe) || fe.Kind != KindUnavailable || fe.Unreachable == nil || !strings.Contains(fe.Msg, "STALE") || !strings.Contains(fe.Msg, "nothing was sent") {
			t.Fatalf("Delete through a STALE hive = %v, want UNAVAILABLE saying the hive is STALE and nothing was signalled", err)
		}
		if n := fh.deleted(); n != 0 {
			t.Errorf("%d Delete calls reached the STALE hive", n)
		}
	})
}

// A Delete the hive never answered abandons the connection, so that the request, if it is held up
// in the network, is reset with it rather than delivered when the link returns.
func TestDeleteUnansweredDropsTheConnection(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		uh := &unreachableHive{}
		f, _ := fleetWithHive(t, uh)
		_, err := f.Delete(t.Context(), "w1", time.Second)
		var fe *Error
		if !errors.As(err, &fe) || fe.Kind != KindUnavailable {
			t.Fatalf("Delete through an unreachable hive = %v, want UNAVAILABLE", err)
		}
		if uh.deleted() != 1 || len(uh.dropped) != 1 || uh.dropped[0] != "10.0.0.2:7835" {
			t.Errorf("calls %d, dropped %v; want one call and the connection to 10.0.0.2:7835 dropped", uh.deleted(), uh.dropped)
		}
	})
}

// A Spawn the hive never answered abandons the connection too: held up by a partition, it would
// otherwise start a process after the caller was told the spawn failed and its id was released.
func TestSpawnUnansweredDropsTheConnection(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		uh := &unreachableHive{}
		f, reg := fleetWithHive(t, uh)
		_, err := f.Spawn(t.Context(), SpawnSpec{Model: "m", HiveID: "h2", WorkerID: "s1"})
		if KindOf(err) != KindUnavailable {
			t.Fatalf("Spawn through an unreachable hive = %v, want UNAVAILABLE", err)
		}
		if len(uh.dropped) != 1 || uh.dropped[0] != "10.0.0.2:7835" {
			t.Errorf("dropped %v; want the connection to 10.0.0.2:7835 dropped", uh.dropped)
		}
		if _, ok := reg.Get("s1"); ok {
			t.Error("the failed spawn's worker is still reserved")
		}
	})
}

// Delete drains the worker (BeforeDelete) before the hive is asked to signal it, and puts it back
// in service when the delete fails; a delete that succeeds is not undone.
func TestDeleteDrainsFirstAndUndoesOnFailure(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		uh := &unreachableHive{}
		f, _ := fleetWithHive(t, uh)
		var log []string
		f.BeforeDelete(func(id string) func() {
			log = append(log, fmt.Sprintf("drain %s (hive deletes so far %d)", id, uh.deleted()))
			return func() { log = append(log, "undo "+id) }
		})
		if _, err := f.Delete(t.Context(), "w1", time.Second); err == nil {
			t.Fatal("Delete through an unreachable hive succeeded")
		}
		want := []string{"drain w1 (hive deletes so far 0)", "undo w1"}
		if fmt.Sprint(log) != fmt.Sprint(want) {
			t.Fatalf("calls %q, want %q", log, want)
		}

		fh := &fakeHive{}
		f, _ = fleetWithHive(t, fh)
		log = nil
		f.BeforeDelete(func(id string) func() {
			log = append(log, fmt.Sprintf("drain %s (hive deletes so far %d)", id, fh.deleted()))
			return func() { log = append(log, "undo "+id) }
		})
		if _, err := f.Delete(t.Context(), "w1", time.Second); err != nil {
			t.Fatal(err)
		}
		want = []string{"drain w1 (hive deletes so far 0)"}
		if fmt.Sprint(log) != fmt.Sprint(want) || fh.deleted() != 1 {
			t.Fatalf("calls %q and %d hive deletes, want %q and 1", log, fh.deleted(), want)
		}
		f.BeforeDelete(nil)
		if _, err := f.Delete(t.Context(), "w1", time.Second); KindOf(err) != KindNotFound {
			t.Fatalf("second Delete: %v, want not found", err)
		}
	})
}

// refusingHive fails every call UNAVAILABLE after it had a connection (the peer is set), as a
// hive whose connection broke mid-call does: the request may have left.
type refusingHive struct{ fakeHive }

func (r *refusingHive) Hive(string) (rbeev1.HiveServiceClient, error) { return r, nil }

func (r *refusingHive) Delete(_ context.Context, in *rbeev1.DeleteRequest, opts ...grpc.CallOption) (*rbeev1.DeleteResponse, error) {
	r.mu.Lock()
	r.deletes = append(r.deletes, in)
	r.mu.Unlock()
	for _, o := range opts {
		if p, ok := o.(grpc.PeerCallOption); ok {
			p.PeerAddr.Addr = &net.TCPAddr{IP: net.IPv4(10, 0, 0, 2), Port: 7835}
		}
	}
	return nil, status.Error(codes.Unavailable, "connection reset by peer")
}

// Each Delete carries its bound in the hive's clock, from the newest heartbeat's reading: the
// reading plus the time from the beat's arrival to the end of the start window (5 s, or the
// caller's deadline if sooner), less the rate slack. A hive with no reading gets no bound.
func TestDeleteBoundInTheHivesClock(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fh := &fakeHive{}
		f, reg := fleetWithHive(t, fh)
		if _, err := f.Delete(t.Context(), "w1", time.Second); err != nil {
			t.Fatal(err)
		}
		if na := fh.deletes[0].GetNotAfter(); na != nil {
			t.Fatalf("a hive that never reported its clock got a bound %v", na)
		}

		if _, err := reg.HiveBeat(registry.Hive{ID: "h2", Address: "10.0.0.2:7835", Clock: registry.HiveClock{Instance: 5, Reading: 100 * time.Second}}); err != nil {
			t.Fatal(err)
		}
		if _, err := reg.Beat(registry.Worker{ID: "w2", HiveID: "h2", Model: "m", Device: "cpu", PID: 43, Port: 9101, State: registry.StateReady}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Second) // the beat is 2 s old when the Delete is sent
		if _, err := f.Delete(t.Context(), "w2", time.Second); err != nil {
			t.Fatal(err)
		}
		span := 7 * time.Second // from the beat's arrival to 5 s after sending
		want := 100*time.Second + span - time.Duration(float64(span)*clockRateSlack)
		if na := fh.deletes[1].GetNotAfter(); na.GetInstance() != 5 || na.GetReading().AsDuration() != want {
			t.Errorf("bound %v, want instance 5 at %v", na, want)
		}

		ctx, cancel := context.WithTimeout(t.Context(), time.Second) // the caller gives up sooner
		defer cancel()
		if _, err := reg.Beat(registry.Worker{ID: "w3", HiveID: "h2", Model: "m", Device: "cpu", PID: 44, Port: 9102, State: registry.StateReady}); err != nil {
			t.Fatal(err)
		}
		if _, err := f.Delete(ctx, "w3", time.Second); err != nil {
			t.Fatal(err)
		}
		span = 3 * time.Second
		want = 100*time.Second + span - time.Duration(float64(span)*clockRateSlack)
		if got := fh.deletes[2].GetNotAfter().GetReading().AsDuration(); got != want {
			t.Errorf("bound with a 1 s caller deadline %v, want %v", got, want)
		}
	})
}

// A Delete that fails while its request may still be on its way (the call had a connection)
// answers only once the hive can no longer start it: at the end of the start window, not before.
// One that never had a connection answers at once.
func TestDeleteFailedInFlightAnswersAfterTheBound(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		rh := &refusingHive{}
		f, reg := fleetWithHive(t, rh)
		if _, err := reg.HiveBeat(registry.Hive{ID: "h2", Address: "10.0.0.2:7835", Clock: registry.HiveClock{Instance: 5, Reading: time.Minute}}); err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		_, err := f.Delete(t.Context(), "w1", time.Second)
		if KindOf(err) != KindUnavailable {
			t.Fatalf("Delete over a broken connection = %v, want UNAVAILABLE", err)
		}
		if d := time.Since(t0); d != hiveStartWindow {
			t.Errorf("answered %v after sending, want at the end of the start window %v", d, hiveStartWindow)
		}

		uh := &unreachableHive{} // fails without a connection
		f, reg = fleetWithHive(t, uh)
		if _, err := reg.HiveBeat(registry.Hive{ID: "h2", Address: "10.0.0.2:7835", Clock: registry.HiveClock{Instance: 5, Reading: time.Minute}}); err != nil {
			t.Fatal(err)
		}
		t0 = time.Now()
		if _, err := f.Delete(t.Context(), "w1", time.Second); KindOf(err) != KindUnavailable || time.Since(t0) != 0 {
			t.Errorf("Delete that never left = %v after %v; want UNAVAILABLE at once", err, time.Since(t0))
		}
	})
}
