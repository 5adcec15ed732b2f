package server

import (
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/types/known/durationpb"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/rpcserver"
	"github.com/rbee-dev/rbee/queen/fleet"
	"github.com/rbee-dev/rbee/queen/registry"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeHive records the calls the queen makes and answers Spawn with made-up process data.
type fakeHive struct {
	rbeev1.HiveServiceClient // methods the queen's tests do not call
	mu                       sync.Mutex
	spawnErr                 error
	deletes                  []*rbeev1.DeleteRequest
	nextPID                  int32
}

func (f *fakeHive) Hive(string) (rbeev1.HiveServiceClient, error) { return f, nil }

func (f *fakeHive) Spawn(_ context.Context, in *rbeev1.SpawnRequest, _ ...grpc.CallOption) (*rbeev1.SpawnResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.spawnErr != nil {
		return nil, f.spawnErr
	}
	f.nextPID++
	return &rbeev1.SpawnResponse{Pid: 1000 + f.nextPID, Port: 9100 + uint32(f.nextPID), ProcessStartTime: 77}, nil
}

func (f *fakeHive) Delete(_ context.Context, in *rbeev1.DeleteRequest, _ ...grpc.CallOption) (*rbeev1.DeleteResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.deletes = append(f.deletes, in)
	return &rbeev1.DeleteResponse{Outcome: rbeev1.DeleteOutcome_DELETE_OUTCOME_EXITED}, nil
}

func (f *fakeHive) Logs(context.Context, *rbeev1.LogsRequest, ...grpc.CallOption) (grpc.ServerStreamingClient[rbeev1.LogsResponse], error) {
	return nil, status.Error(codes.Unimplemented, "fake hive keeps no logs")
}

func (f *fakeHive) deleted() []*rbeev1.DeleteRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]*rbeev1.DeleteRequest(nil), f.deletes...)
}

type env struct {
	q     *Queen
	reg   *registry.Registry
	hive  *fakeHive
	queen rbeev1.QueenServiceClient
	beats rbeev1.HeartbeatServiceClient
}

// newEnv runs a queen over bufconn with a registry (clock running) and one static hive "h1".
func newEnv(t *testing.T, cfg Config) *env {
	t.Helper()
	return newEnvStart(t, cfg, 10*time.Second)
}

// newEnvStart is newEnv with wait_ready bounded by startTimeout.
func newEnvStart(t *testing.T, cfg Config, startTimeout time.Duration) *env {
	t.Helper()
	reg := registry.New(registry.Config{Interval: time.Second, StartTimeout: time.Minute})
	if err := reg.AddStaticHive("h1", "127.0.0.1:1"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	regDone := make(chan struct{})
	go func() { defer close(regDone); reg.Run(ctx) }()
	fh := &fakeHive{}
	cfg.Registry, cfg.QueenID = reg, "queen-test"
	cfg.Fleet = fleet.New(fleet.Config{Registry: reg, Hives: fh, StartTimeout: startTimeout})
	if cfg.Interval == 0 {
		cfg.Interval = time.Second
	}
	q := New(cfg)
	srv := rpcserver.New(rpcserver.Options{Logger: zap.NewNop(), ShutdownTimeout: time.Second,
		ServerOptions: []grpc.ServerOption{ServerCodec()}, Unmetered: []string{"/rbee.v1.HeartbeatService/WorkerHeartbeat"}})
	rbeev1.RegisterQueenServiceServer(srv.GRPC, q)
	rbeev1.RegisterHeartbeatServiceServer(srv.GRPC, q)
	lis := bufconn.Listen(1 << 20)
	serveDone := make(chan struct{})
	go func() { defer close(serveDone); _ = srv.Serve(ctx, lis, q.Drain) }()
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		cancel()
		<-serveDone
		<-regDone
	})
	return &env{q: q, reg: reg, hive: fh, queen: rbeev1.NewQueenServiceClient(conn), beats: rbeev1.NewHeartbeatServiceClient(conn)}
}

func descriptor(id string, st rbeev1.WorkerState) *rbeev1.WorkerHeartbeatRequest {
	return &rbeev1.WorkerHeartbeatRequest{Worker: &rbeev1.Worker{
		WorkerId: id, HiveId: "h1", Model: "m", Device: "cpu", Pid: 4242, Port: 9100, State: st, ProcessStartTime: 5,
	}}
}

func TestHeartbeatAnswersEveryBeatAndRelearnsUnknownWorkers(t *testing.T) {
	e := newEnv(t, Config{})
	st, err := e.beats.WorkerHeartbeat(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	for i, s := range []rbeev1.WorkerState{rbeev1.WorkerState_WORKER_STATE_STARTING, rbeev1.WorkerState_WORKER_STATE_READY, rbeev1.WorkerState_WORKER_STATE_BUSY} {
		if err := st.Send(descriptor("relearned", s)); err != nil {
			t.Fatal(err)
		}
		resp, err := st.Recv()
		if err != nil {
			t.Fatalf("beat %d: %v", i, err)
		}
		if resp.GetQueenId() != "queen-test" || resp.GetInterval().AsDuration() != time.Second {
			t.Fatalf("beat %d answered %v", i, resp)
		}
		w, ok := e.reg.Get("relearned")
		if !ok || w.PID != 4242 || w.State.String() != strings.TrimPrefix(s.String(), "WORKER_STATE_") {
			t.Fatalf("after beat %d registry has %+v, %v", i, w, ok)
		}
	}
	if err := st.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err == nil {
		t.Fatal("stream still open after CloseSend")
	}
}

func TestHeartbeatRefusesBadDescriptors(t *testing.T) {
	e := newEnv(t, Config{})
	bad := map[string]*rbeev1.WorkerHeartbeatRequest{
		"no descriptor":  {},
		"no worker id":   descriptor("", rbeev1.WorkerState_WORKER_STATE_READY),
		"stale reported": descriptor("w", rbeev1.WorkerState_WORKER_STATE_STALE),
		"pid 1":          {Worker: &rbeev1.Worker{WorkerId: "w", HiveId: "h1", Model: "m", Device: "cpu", Pid: 1, Port: 9100, State: rbeev1.WorkerState_WORKER_STATE_READY}},
	}
	for name, req := range bad {
		t.Run(name, func(t *testing.T) {
			st, err := e.beats.WorkerHeartbeat(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			_ = st.Send(req)
			if _, err := st.Recv(); status.Code(err) != codes.InvalidArgument {
				t.Fatalf("got %v, want INVALID_ARGUMENT", err)
			}
		})
	}
	// A stream may not change identity half-way.
	st, err := e.beats.WorkerHeartbeat(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	_ = st.Send(descriptor("one", rbeev1.WorkerState_WORKER_STATE_READY))
	if _, err := st.Recv(); err != nil {
		t.Fatal(err)
	}
	_ = st.Send(descriptor("two", rbeev1.WorkerState_WORKER_STATE_READY))
	if _, err := st.Recv(); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("identity change: got %v, want INVALID_ARGUMENT", err)
	}
	if _, ok := e.reg.Get("two"); ok {
		t.Fatal("the refused beat reached the registry")
	}
}

func TestSecondStreamReplacesFirst(t *testing.T) {
	e := newEnv(t, Config{})
	first, _ := e.beats.WorkerHeartbeat(t.Context())
	_ = first.Send(descriptor("w", rbeev1.WorkerState_WORKER_STATE_READY))
	if _, err := first.Recv(); err != nil {
		t.Fatal(err)
	}
	second, _ := e.beats.WorkerHeartbeat(t.Context())
	_ = second.Send(descriptor("w", rbeev1.WorkerState_WORKER_STATE_READY))
	if _, err := second.Recv(); err != nil {
		t.Fatal(err)
	}
	_ = first.Send(descriptor("w", rbeev1.WorkerState_WORKER_STATE_READY))
	if _, err := first.Recv(); status.Code(err) != codes.Aborted {
		t.Fatalf("replaced stream got %v, want ABORTED", err)
	}
	// The replaced stream's end must not make the worker STALE: the new stream speaks for it.
	if w, _ := e.reg.Get("w"); w.State != registry.StateReady {
		t.Fatalf("worker is %v after its old stream ended, want READY", w.State)
	}
}

func TestHeartbeatFloodIsCut(t *testing.T) {
	e := newEnv(t, Config{MaxBeatsPerSecond: 5})
	st, _ := e.beats.WorkerHeartbeat(t.Context())
	var err error
	for i := 0; i < 50 && err == nil; i++ {
		if err = st.Send(descriptor("flood", rbeev1.WorkerState_WORKER_STATE_READY)); err == nil {
			_, err = st.Recv()
		}
	}
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("flooding stream got %v, want RESOURCE_EXHAUSTED", err)
	}
}

func TestWaitReadyTimeoutRemovesTheWorker(t *testing.T) {
	e := newEnvStart(t, Config{}, 200*time.Millisecond)
	_, err := e.queen.SpawnWorker(t.Context(), &rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: "slow", WaitReady: true})
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("got %v, want DEADLINE_EXCEEDED", err)
	}
	if _, ok := e.reg.Get("slow"); ok {
		t.Fatal("timed-out worker still in the registry")
	}
	d := e.hive.deleted()
	if len(d) != 1 || d[0].GetWorkerId() != "slow" || d[0].GetPid() != 1001 || d[0].GetProcessStartTime() != 77 {
		t.Fatalf("hive deletes = %v, want one for slow's PID 1001", d)
	}
}

func TestWorkerExitFailsWaitReadyWithItsOutput(t *testing.T) {
	e := newEnv(t, Config{})
	errc := make(chan error, 1)
	go func() {
		_, err := e.queen.SpawnWorker(t.Context(), &rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: "crashy", WaitReady: true})
		errc <- err
	}()
	// Wait (on the registry's change feed) until the hive has answered the spawn.
	watch := e.reg.Watch("")
	defer watch.Close()
	var w registry.Worker
	for ev := range watch.Events() {
		if ev.Worker.ID == "crashy" && ev.Worker.PID != 0 {
			w = ev.Worker
			break
		}
	}
	hb, _ := e.beats.HiveHeartbeat(t.Context())
	_ = hb.Send(&rbeev1.HiveHeartbeatRequest{
		Hive:  &rbeev1.Hive{HiveId: "h1", Address: "127.0.0.1:1"},
		Exits: []*rbeev1.WorkerExit{{WorkerId: "crashy", Pid: w.PID, ProcessStartTime: 77, ExitCode: 3, LogTail: "CUDA out of memory"}},
	})
	if _, err := hb.Recv(); err != nil {
		t.Fatal(err)
	}
	err := <-errc
	if status.Code(err) != codes.Aborted || !strings.Contains(err.Error(), "exit status 3") || !strings.Contains(err.Error(), "CUDA out of memory") {
		t.Fatalf("SpawnWorker = %v; want ABORTED with the exit status and output", err)
	}
	if _, ok := e.reg.Get("crashy"); ok {
		t.Fatal("exited worker still registered")
	}
}

func TestSpawnErrorsKeepTheirMeaning(t *testing.T) {
	e := newEnv(t, Config{})
	for _, tt := range []struct {
		hiveErr error
		want    codes.Code
	}{
		{status.Error(codes.Unavailable, "connection refused"), codes.Unavailable},
		{status.Error(codes.ResourceExhausted, "no free port in 9100-9100"), codes.ResourceExhausted},
		{status.Error(codes.FailedPrecondition, "worker binary /x: no such file"), codes.FailedPrecondition},
	} {
		e.hive.mu.Lock()
		e.hive.spawnErr = tt.hiveErr
		e.hive.mu.Unlock()
		_, err := e.queen.SpawnWorker(t.Context(), &rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: "x"})
		if status.Code(err) != tt.want {
			t.Errorf("hive said %v: queen answered %v, want %v", tt.hiveErr, err, tt.want)
		}
		if _, ok := e.reg.Get("x"); ok {
			t.Fatal("failed spawn left a worker in the registry")
		}
	}
}

func TestDrainEndsHeartbeatStreams(t *testing.T) {
	e := newEnv(t, Config{})
	st, _ := e.beats.WorkerHeartbeat(t.Context())
	_ = st.Send(descriptor("w", rbeev1.WorkerState_WORKER_STATE_READY))
	if _, err := st.Recv(); err != nil {
		t.Fatal(err)
	}
	e.q.Drain()
	_ = st.Send(descriptor("w", rbeev1.WorkerState_WORKER_STATE_READY))
	if _, err := st.Recv(); status.Code(err) != codes.Unavailable {
		t.Fatalf("after Drain got %v, want UNAVAILABLE", err)
	}
}

// A queen that leads again (Resume) serves new streams, while a stream of the drained term stays
// ended: it never carries beats into the next term.
func TestResumeServesNewStreamsOnly(t *testing.T) {
	e := newEnv(t, Config{})
	old, _ := e.beats.WorkerHeartbeat(t.Context())
	_ = old.Send(descriptor("old", rbeev1.WorkerState_WORKER_STATE_READY))
	if _, err := old.Recv(); err != nil {
		t.Fatal(err)
	}
	e.q.Drain()
	e.q.Resume()
	_ = old.Send(descriptor("old", rbeev1.WorkerState_WORKER_STATE_READY))
	if _, err := old.Recv(); status.Code(err) != codes.Unavailable {
		t.Fatalf("a stream of the drained term after Resume: %v, want UNAVAILABLE", err)
	}
	st, _ := e.beats.WorkerHeartbeat(t.Context())
	for range 2 {
		_ = st.Send(descriptor("new", rbeev1.WorkerState_WORKER_STATE_READY))
		if _, err := st.Recv(); err != nil {
			t.Fatalf("a stream opened after Resume: %v", err)
		}
	}
}

func TestDeleteForwardsPIDAndForgets(t *testing.T) {
	e := newEnv(t, Config{})
	if _, err := e.queen.SpawnWorker(t.Context(), &rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: "d"}); err != nil {
		t.Fatal(err)
	}
	resp, err := e.queen.DeleteWorker(t.Context(), &rbeev1.DeleteWorkerRequest{WorkerId: "d", GracePeriod: durationpb.New(3 * time.Second)})
	if err != nil || resp.GetOutcome() != rbeev1.DeleteOutcome_DELETE_OUTCOME_EXITED || resp.GetWorker().GetWorkerId() != "d" {
		t.Fatalf("DeleteWorker = %v, %v", resp, err)
	}
	d := e.hive.deleted()
	if len(d) != 1 || d[0].GetPid() != 1001 || d[0].GetGracePeriod().AsDuration() != 3*time.Second {
		t.Fatalf("hive got %v", d)
	}
	if _, ok := e.reg.Get("d"); ok {
		t.Fatal("deleted worker still registered")
	}
}

// A beat that was on its way when its worker was deleted, or when its hive reported it dead, must
// not bring the worker back as a READY worker with a dead PID; a new process under the same id
// (another PID) is welcome.
func TestBeatFromAGoneProcessDoesNotResurrectIt(t *testing.T) {
	for _, how := range []string{"deleted", "exit reported"} {
		t.Run(how, func(t *testing.T) {
			e := newEnv(t, Config{})
			st, err := e.beats.WorkerHeartbeat(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			beat := descriptor("g", rbeev1.WorkerState_WORKER_STATE_READY)
			if err := st.Send(beat); err != nil {
				t.Fatal(err)
			}
			if _, err := st.Recv(); err != nil {
				t.Fatal(err)
			}
			if how == "deleted" {
				if _, err := e.queen.DeleteWorker(t.Context(), &rbeev1.DeleteWorkerRequest{WorkerId: "g"}); err != nil {
					t.Fatal(err)
				}
			} else {
				hb, err := e.beats.HiveHeartbeat(t.Context())
				if err != nil {
					t.Fatal(err)
				}
				_ = hb.Send(&rbeev1.HiveHeartbeatRequest{
					Hive:  &rbeev1.Hive{HiveId: "h1", Address: "127.0.0.1:1"},
					Exits: []*rbeev1.WorkerExit{{WorkerId: "g", Pid: 4242, ProcessStartTime: 5, ExitCode: 1}},
				})
				if _, err := hb.Recv(); err != nil {
					t.Fatal(err)
				}
			}
			if _, ok := e.reg.Get("g"); ok {
				t.Fatal("worker still registered after it was gone")
			}
			// The beat the dead process sent before it died arrives now.
			_ = st.Send(beat)
			if _, err := st.Recv(); status.Code(err) != codes.FailedPrecondition {
				t.Errorf("late beat of the gone process answered %v, want FAILED_PRECONDITION", err)
			}
			if w, ok := e.reg.Get("g"); ok {
				t.Fatalf("late beat brought the gone worker back: %+v", w)
			}
			// A new process under the same id is a new worker.
			st2, err := e.beats.WorkerHeartbeat(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			fresh := descriptor("g", rbeev1.WorkerState_WORKER_STATE_READY)
			fresh.Worker.Pid, fresh.Worker.ProcessStartTime = 4343, 6
			if err := st2.Send(fresh); err != nil {
				t.Fatal(err)
			}
			if _, err := st2.Recv(); err != nil {
				t.Fatalf("a new process under the id was refused: %v", err)
			}
			if w, ok := e.reg.Get("g"); !ok || w.PID != 4343 {
				t.Fatalf("new process: Get = %+v, %v", w, ok)
			}
		})
	}
}

// A hive's heartbeat reading of its clock is what the queen bounds its calls to that hive in: the
// static hive h1, once it beats with a clock, gets Deletes carrying a not_after in that clock,
// past the reading; a reading that is not a duration of zero or more ends the stream.
func TestHiveClockReadingBoundsTheQueensCalls(t *testing.T) {
	e := newEnv(t, Config{})
	hb, err := e.beats.HiveHeartbeat(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	reading := &rbeev1.HiveClock{Instance: 99, Reading: durationpb.New(time.Hour)}
	if err := hb.Send(&rbeev1.HiveHeartbeatRequest{Hive: &rbeev1.Hive{HiveId: "h1", Address: "127.0.0.1:1", FreePorts: 10}, Clock: reading}); err != nil {
		t.Fatal(err)
	}
	if _, err := hb.Recv(); err != nil {
		t.Fatal(err)
	}
	if _, err := e.queen.SpawnWorker(t.Context(), &rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: "b1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.queen.DeleteWorker(t.Context(), &rbeev1.DeleteWorkerRequest{WorkerId: "b1"}); err != nil {
		t.Fatal(err)
	}
	d := e.hive.deleted()
	na := d[len(d)-1].GetNotAfter()
	if na.GetInstance() != 99 || na.GetReading().AsDuration() <= time.Hour || na.GetReading().AsDuration() > time.Hour+5*time.Second {
		t.Fatalf("Delete's bound %v; want instance 99, within 5 s past the reading of 1h", na)
	}

	bad, err := e.beats.HiveHeartbeat(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	_ = bad.Send(&rbeev1.HiveHeartbeatRequest{Hive: &rbeev1.Hive{HiveId: "h1", Address: "127.0.0.1:1"},
		Clock: &rbeev1.HiveClock{Instance: 99, Reading: durationpb.New(-time.Second)}})
	if _, err := bad.Recv(); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "clock.reading") {
		t.Fatalf("a negative clock reading: %v, want INVALID_ARGUMENT naming clock.reading", err)
	}
}

// A worker's usual beat repeats the last one byte for byte: the queen then only notes its time,
// which ListWorkers shows, and sends watchers nothing; a beat that changes anything is decoded,
// checked and sent to watchers as before, also between runs of repeated beats.
func TestRepeatedBeatsRefreshAndChangedBeatsAreSent(t *testing.T) {
	e := newEnv(t, Config{})
	watch, err := e.queen.WatchWorkers(t.Context(), &rbeev1.WatchWorkersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if ev, err := watch.Recv(); err != nil || ev.GetType() != rbeev1.WatchEventType_WATCH_EVENT_TYPE_SYNCED {
		t.Fatalf("watch start: %v, %v; want SYNCED", ev, err)
	}
	st, err := e.beats.WorkerHeartbeat(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	beat := func(req *rbeev1.WorkerHeartbeatRequest) {
		t.Helper()
		if err := st.Send(req); err != nil {
			t.Fatal(err)
		}
		if _, err := st.Recv(); err != nil {
			t.Fatal(err)
		}
	}
	listed := func() *rbeev1.Worker {
		t.Helper()
		resp, err := e.queen.ListWorkers(t.Context(), &rbeev1.ListWorkersRequest{})
		if err != nil || len(resp.GetWorkers()) != 1 {
			t.Fatalf("ListWorkers: %v, %v; want the one worker", resp, err)
		}
		return resp.GetWorkers()[0]
	}
	event := func(typ rbeev1.WatchEventType, state rbeev1.WorkerState, msg string) {
		t.Helper()
		ev, err := watch.Recv()
		if err != nil || ev.GetType() != typ || ev.GetWorker().GetState() != state || ev.GetWorker().GetStatusMessage() != msg {
			t.Fatalf("watch: %v, %v; want %v of a %v worker saying %q", ev, err, typ, state, msg)
		}
	}
	for i, step := range []struct {
		state rbeev1.WorkerState
		msg   string
		typ   rbeev1.WatchEventType
	}{
		{rbeev1.WorkerState_WORKER_STATE_READY, "", rbeev1.WatchEventType_WATCH_EVENT_TYPE_ADDED},
		{rbeev1.WorkerState_WORKER_STATE_BUSY, "serving", rbeev1.WatchEventType_WATCH_EVENT_TYPE_UPDATED},
		{rbeev1.WorkerState_WORKER_STATE_READY, "", rbeev1.WatchEventType_WATCH_EVENT_TYPE_UPDATED},
	} {
		req := descriptor("rep", step.state)
		req.Worker.StatusMessage = step.msg
		beat(req)
		event(step.typ, step.state, step.msg)
		last := listed().GetLastHeartbeatTime().AsTime()
		for j := range 3 {
			beat(req)
			w := listed()
			if w.GetState() != step.state || w.GetStatusMessage() != step.msg {
				t.Fatalf("step %d, repeat %d: listed %v", i, j, w)
			}
			if beatAt := w.GetLastHeartbeatTime().AsTime(); !beatAt.After(last) {
				t.Fatalf("step %d, repeat %d: last heartbeat %v, not after the previous beat's %v", i, j, beatAt, last)
			}
			last = w.GetLastHeartbeatTime().AsTime()
		}
	}
	if err := st.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err == nil {
		t.Fatal("stream still open after CloseSend")
	}
	// The stream's end is a change: the next event, with none from the repeated beats before it.
	event(rbeev1.WatchEventType_WATCH_EVENT_TYPE_UPDATED, rbeev1.WorkerState_WORKER_STATE_STALE, "")
}
