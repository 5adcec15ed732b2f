package server

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/hive/process"
	"github.com/rbee-dev/rbee/internal/hiveclock"
)

// fakeProcs records what reaches the process core and answers with a chosen error.
type fakeProcs struct {
	err     error
	spawned []process.SpawnSpec
	deleted []process.Target
	grace   []time.Duration
	ctx     context.Context // of the last call that reached the core
}

func (f *fakeProcs) Spawn(ctx context.Context, s process.SpawnSpec) (process.Spawned, error) {
	f.ctx = ctx
	f.spawned = append(f.spawned, s)
	if f.err != nil {
		return process.Spawned{}, f.err
	}
	return process.Spawned{PID: 1234, Port: 9100, StartTime: 99}, nil
}

func (f *fakeProcs) Delete(ctx context.Context, t process.Target, g time.Duration) (process.Outcome, error) {
	f.ctx = ctx
	f.deleted = append(f.deleted, t)
	f.grace = append(f.grace, g)
	if f.err != nil {
		return 0, f.err
	}
	return process.Killed, nil
}

func (f *fakeProcs) Logs(_ context.Context, id string, tail int, follow bool, send func([]byte) error) error {
	if f.err != nil {
		return f.err
	}
	return send([]byte(fmt.Sprintf("%s tail=%d follow=%v\n", id, tail, follow)))
}

type fakeDevices []string

func (d fakeDevices) Has(n string) bool { return slices.Contains(d, n) }
func (d fakeDevices) Names() []string   { return d }

// TestSpawnDevices: a device the hive lacks is refused before anything starts, naming what it
// has; every worker gets the environment that shows it only its own device.
func TestSpawnDevices(t *testing.T) {
	f := &fakeProcs{}
	h := New(Config{HiveID: "h", Queen: "127.0.0.1:7833", Devices: fakeDevices{"cpu", "cuda:0"}}, f)
	_, err := h.Spawn(t.Context(), &rbeev1.SpawnRequest{WorkerId: "w", Model: "m", Device: "cuda:7"})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "no device cuda:7") || !strings.Contains(err.Error(), "cpu, cuda:0") {
		t.Fatalf("Spawn on cuda:7 = %v; want FAILED_PRECONDITION naming the device and the hive's", err)
	}
	if len(f.spawned) != 0 {
		t.Fatal("the refused spawn reached the process core")
	}
	for dev, want := range map[string]string{"cuda:0": "CUDA_VISIBLE_DEVICES=0", "": "CUDA_VISIBLE_DEVICES="} {
		if _, err := h.Spawn(t.Context(), &rbeev1.SpawnRequest{WorkerId: "w", Model: "m", Device: dev, WorkerToken: "tok"}); err != nil {
			t.Fatal(err)
		}
		env := f.spawned[len(f.spawned)-1].Env
		if !slices.Contains(env, want) || !slices.Contains(env, "RBEE_WORKER_TOKEN=tok") {
			t.Errorf("device %q: env %q lacks %s", dev, env, want)
		}
	}
}

func TestLogsRequests(t *testing.T) {
	f := &fakeProcs{}
	h := New(Config{HiveID: "h"}, f)
	if err := h.Logs(&rbeev1.LogsRequest{WorkerId: "W/1"}, nil); status.Code(err) != codes.InvalidArgument {
		t.Errorf("bad worker id: %v", err)
	}
	f.err = &process.Error{Kind: process.KindNotFound, Msg: "no log of worker"}
	if err := h.Logs(&rbeev1.LogsRequest{WorkerId: "w"}, &fakeLogStream{ctx: t.Context()}); status.Code(err) != codes.NotFound {
		t.Errorf("no log: %v, want NOT_FOUND", err)
	}
	f.err = nil
	st := &fakeLogStream{ctx: t.Context()}
	if err := h.Logs(&rbeev1.LogsRequest{WorkerId: "w", TailLines: 7, Follow: true}, st); err != nil || len(st.sent) != 1 || string(st.sent[0]) != "w tail=7 follow=true\n" {
		t.Errorf("Logs = %v, sent %q", err, st.sent)
	}
}

type fakeLogStream struct {
	grpc.ServerStream
	ctx  context.Context
	sent [][]byte
}

func (s fakeLogStream) Context() context.Context { return s.ctx }
func (s *fakeLogStream) Send(r *rbeev1.LogsResponse) error {
	s.sent = append(s.sent, r.GetData())
	return nil
}

func TestSpawnRequests(t *testing.T) {
	f := &fakeProcs{}
	h := New(Config{HiveID: "h", Queen: "127.0.0.1:7833", Grace: 2 * time.Second}, f)
	resp, err := h.Spawn(t.Context(), &rbeev1.SpawnRequest{WorkerId: "w", Model: "m"})
	if err != nil || resp.GetPid() != 1234 || resp.GetPort() != 9100 || resp.GetProcessStartTime() != 99 {
		t.Fatalf("Spawn = %v, %v", resp, err)
	}
	if s := f.spawned[0]; s.Device != "cpu" || s.QueenAddress != "127.0.0.1:7833" || s.HiveID != "h" {
		t.Fatalf("spawn spec %+v: want device cpu and the hive's --queen", s)
	}
	for name, req := range map[string]*rbeev1.SpawnRequest{
		"no worker id":   {Model: "m"},
		"bad worker id":  {WorkerId: "W/1", Model: "m"},
		"no model":       {WorkerId: "w"},
		"bad device":     {WorkerId: "w", Model: "m", Device: "gpu"},
		"bad queen":      {WorkerId: "w", Model: "m", QueenAddress: "nowhere"},
		"NUL in token":   {WorkerId: "w", Model: "m", WorkerToken: "abc\x00def"},
		"space in token": {WorkerId: "w", Model: "m", WorkerToken: "abc def"},
		"huge token":     {WorkerId: "w", Model: "m", WorkerToken: strings.Repeat("a", 1025)},
	} {
		n := len(f.spawned)
		if _, err := h.Spawn(t.Context(), req); status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v, want INVALID_ARGUMENT", name, err)
		}
		if len(f.spawned) != n {
			t.Errorf("%s reached the process core", name)
		}
	}
}

func TestDeleteRequests(t *testing.T) {
	f := &fakeProcs{}
	h := New(Config{HiveID: "h", Grace: 2 * time.Second}, f)
	resp, err := h.Delete(t.Context(), &rbeev1.DeleteRequest{WorkerId: "w", Pid: 4321, ProcessStartTime: 7})
	if err != nil || resp.GetOutcome() != rbeev1.DeleteOutcome_DELETE_OUTCOME_KILLED {
		t.Fatalf("Delete = %v, %v", resp, err)
	}
	if f.grace[0] != 2*time.Second || f.deleted[0] != (process.Target{WorkerID: "w", PID: 4321, StartTime: 7}) {
		t.Fatalf("core got %+v grace %v: want the default grace", f.deleted[0], f.grace[0])
	}
	if _, err := h.Delete(t.Context(), &rbeev1.DeleteRequest{WorkerId: "w", Pid: 4321, GracePeriod: durationpb.New(0)}); err != nil || f.grace[1] != 0 {
		t.Fatalf("grace 0: %v, core grace %v", err, f.grace[1])
	}
	for name, tt := range map[string]struct {
		req  *rbeev1.DeleteRequest
		want codes.Code
	}{
		"negative grace": {&rbeev1.DeleteRequest{WorkerId: "w", Pid: 4321, GracePeriod: durationpb.New(-time.Second)}, codes.InvalidArgument},
		"grace too long": {&rbeev1.DeleteRequest{WorkerId: "w", Pid: 4321, GracePeriod: durationpb.New(time.Hour)}, codes.InvalidArgument},
		"bad worker id":  {&rbeev1.DeleteRequest{WorkerId: "", Pid: 4321}, codes.InvalidArgument},
	} {
		n := len(f.deleted)
		if _, err := h.Delete(t.Context(), tt.req); status.Code(err) != tt.want {
			t.Errorf("%s: %v, want %v", name, err, tt.want)
		}
		if len(f.deleted) != n {
			t.Errorf("%s reached the process core", name)
		}
	}
}

func TestErrorKindsMapToCodes(t *testing.T) {
	for kind, want := range map[process.Kind]codes.Code{
		process.KindInvalid:     codes.InvalidArgument,
		process.KindNotWorker:   codes.FailedPrecondition,
		process.KindBinary:      codes.FailedPrecondition,
		process.KindExhausted:   codes.ResourceExhausted,
		process.KindUnsupported: codes.Unimplemented,
		process.KindStuck:       codes.Internal,
	} {
		f := &fakeProcs{err: &process.Error{Kind: kind, Msg: "because"}}
		h := New(Config{HiveID: "h", Queen: "127.0.0.1:1"}, f)
		_, err := h.Spawn(t.Context(), &rbeev1.SpawnRequest{WorkerId: "w", Model: "m"})
		if status.Code(err) != want {
			t.Errorf("kind %v: spawn answered %v, want %v", kind, err, want)
		}
		_, err = h.Delete(t.Context(), &rbeev1.DeleteRequest{WorkerId: "w", Pid: 4321})
		if status.Code(err) != want {
			t.Errorf("kind %v: delete answered %v, want %v", kind, err, want)
		}
	}
}

// A deposed queen's late call carries a lower fencing token than the new leader's: the hive
// refuses it before any process is touched, while the leader's (and unfenced) calls go through.
func TestFencingRefusesDeposedQueens(t *testing.T) {
	f := &fakeProcs{}
	h := New(Config{HiveID: "h", Queen: "127.0.0.1:7833"}, f)
	steps := []struct {
		name  string
		call  func() error
		want  codes.Code
		calls int // process-core calls expected after the step
	}{
		{"old leader spawns", func() error {
			_, err := h.Spawn(t.Context(), &rbeev1.SpawnRequest{WorkerId: "w1", Model: "m", FencingToken: 7})
			return err
		}, codes.OK, 1},
		{"new leader deletes", func() error {
			_, err := h.Delete(t.Context(), &rbeev1.DeleteRequest{WorkerId: "w1", Pid: 42, FencingToken: 9})
			return err
		}, codes.OK, 2},
		{"old leader's late delete", func() error {
			_, err := h.Delete(t.Context(), &rbeev1.DeleteRequest{WorkerId: "w1", Pid: 42, FencingToken: 7})
			return err
		}, codes.FailedPrecondition, 2},
		{"old leader's late spawn", func() error {
			_, err := h.Spawn(t.Context(), &rbeev1.SpawnRequest{WorkerId: "w2", Model: "m", FencingToken: 8})
			return err
		}, codes.FailedPrecondition, 2},
		{"new leader again", func() error {
			_, err := h.Spawn(t.Context(), &rbeev1.SpawnRequest{WorkerId: "w3", Model: "m", FencingToken: 9})
			return err
		}, codes.OK, 3},
		{"queen without election", func() error {
			_, err := h.Spawn(t.Context(), &rbeev1.SpawnRequest{WorkerId: "w4", Model: "m"})
			return err
		}, codes.OK, 4},
	}
	for _, s := range steps {
		err := s.call()
		if status.Code(err) != s.want {
			t.Fatalf("%s: %v, want %v", s.name, err, s.want)
		}
		if s.want == codes.FailedPrecondition && !strings.Contains(status.Convert(err).Message(), "fenced") {
			t.Errorf("%s: message %q does not say fenced", s.name, status.Convert(err).Message())
		}
		if n := len(f.spawned) + len(f.deleted); n != s.calls {
			t.Fatalf("%s: %d calls reached the process core, want %d", s.name, n, s.calls)
		}
	}
}

// A Spawn or Delete that reaches the hive once its clock has passed the queen's bound (not_after)
// is refused, ABORTED, before anything is done: the network held it up and the queen may already
// have told its caller it failed. One bounded in another process's clock (the hive restarted) is
// refused too; one in time reaches the core with the same check for its last moment; one without a
// bound (a queen with no reading of this hive's clock) passes as before.
func TestRequestsPastTheQueensBoundAreRefused(t *testing.T) {
	now := 9 * time.Second
	f := &fakeProcs{}
	h := New(Config{HiveID: "h", Queen: "127.0.0.1:7833", Clock: hiveclock.NewFrom(7, func() time.Duration { return now })}, f)
	bound := func(instance uint64, at time.Duration) *rbeev1.HiveClock {
		return &rbeev1.HiveClock{Instance: instance, Reading: durationpb.New(at)}
	}
	del := func(na *rbeev1.HiveClock) error {
		_, err := h.Delete(t.Context(), &rbeev1.DeleteRequest{WorkerId: "w", Pid: 4321, NotAfter: na})
		return err
	}
	spawn := func(na *rbeev1.HiveClock) error {
		_, err := h.Spawn(t.Context(), &rbeev1.SpawnRequest{WorkerId: "w", Model: "m", NotAfter: na})
		return err
	}

	// The clock reads 0 at New: bounds are in time since then.
	if err := del(bound(7, 2*time.Second)); err != nil {
		t.Fatalf("Delete within its bound: %v", err)
	}
	if err := process.CheckStart(f.ctx); err != nil {
		t.Fatalf("the core's start check fails before the bound: %v", err)
	}
	now += 2 * time.Second // the bound passes while the core would still be on its way
	if err := process.CheckStart(f.ctx); process.KindOf(err) != process.KindLate {
		t.Fatalf("the core's start check once the bound passed = %v, want KindLate", err)
	}
	for _, tc := range []struct {
		name string
		call func() error
		want codes.Code
		text string
	}{
		{"late delete", func() error { return del(bound(7, time.Second)) }, codes.Aborted, "nothing was done"},
		{"late spawn", func() error { return spawn(bound(7, 2*time.Second)) }, codes.Aborted, "after the queen's bound"},
		{"delete timed in another process's clock", func() error { return del(bound(8, time.Hour)) }, codes.FailedPrecondition, "another process of this hive"},
	} {
		err := tc.call()
		if status.Code(err) != tc.want || !strings.Contains(err.Error(), tc.text) {
			t.Errorf("%s = %v; want %v mentioning %q", tc.name, err, tc.want, tc.text)
		}
	}
	if len(f.deleted) != 1 || len(f.spawned) != 0 {
		t.Fatalf("refused requests reached the core: %d deletes, %d spawns", len(f.deleted), len(f.spawned))
	}
	if err := del(nil); err != nil || len(f.deleted) != 2 {
		t.Fatalf("Delete without a bound = %v (core calls %d); want it carried out", err, len(f.deleted))
	}
}
