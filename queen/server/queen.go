// Package server is the queen's gRPC edge: it turns QueenService and HeartbeatService calls into
// registry operations and hive calls, and registry and hive errors into status codes. Business
// rules (liveness, watch, hive choice) live in the registry.
package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/auth"
	"github.com/rbee-dev/rbee/internal/narrate"
	"github.com/rbee-dev/rbee/internal/validate"
	"github.com/rbee-dev/rbee/internal/version"
	"github.com/rbee-dev/rbee/queen/registry"
)

// Config configures the queen's services.
type Config struct {
	Registry *registry.Registry
	Hives    HiveDialer
	// QueenID names this run of the queen; workers see it change when the queen restarts.
	QueenID string
	// Interval is the heartbeat interval workers and hives are told to beat at.
	Interval time.Duration
	// Advertise is the address workers should report to, passed to hives on Spawn; "" lets each
	// hive use its own --queen.
	Advertise string
	// StartTimeout bounds SpawnWorker's wait_ready.
	StartTimeout time.Duration
	// MaxBeatsPerSecond ends a heartbeat stream that sends faster (0: no limit).
	MaxBeatsPerSecond int
	// Token is the cluster token; workers' own tokens are derived from it. "" runs without.
	Token string
	// Registerer receives the queen's metrics; nil keeps them unexported.
	Registerer prometheus.Registerer
	Logger     *zap.Logger
}

// Queen implements QueenService and HeartbeatService.
type Queen struct {
	rbeev1.UnimplementedQueenServiceServer
	rbeev1.UnimplementedHeartbeatServiceServer
	cfg     Config
	reg     *registry.Registry
	started time.Time
	metrics *metrics
	beats
}

// New returns the queen's services.
func New(cfg Config) *Queen {
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	q := &Queen{cfg: cfg, reg: cfg.Registry, started: time.Now(), metrics: newMetrics(cfg.Registerer, cfg.Registry)}
	q.beats.init()
	return q
}

// NewQueenID makes a fresh queen id.
func NewQueenID() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return "queen-" + hex.EncodeToString(b[:])
}

func invalid(err error) error { return status.Error(codes.InvalidArgument, err.Error()) }

// hiveSpawnTimeout bounds a hive's Spawn, which only forks and execs.
const hiveSpawnTimeout = 30 * time.Second

// hiveDeleteSlack is how much longer than the grace period the queen waits for a hive's Delete.
const hiveDeleteSlack = 15 * time.Second

// SpawnWorker picks a hive, reserves the worker id, asks the hive to start the process and, with
// wait_ready, waits until the worker reports READY.
func (q *Queen) SpawnWorker(ctx context.Context, req *rbeev1.SpawnWorkerRequest) (*rbeev1.SpawnWorkerResponse, error) {
	t0 := time.Now()
	if err := validate.Model("model", req.GetModel()); err != nil {
		return nil, invalid(err)
	}
	device, err := validate.DeviceOrCPU("device", req.GetDevice())
	if err != nil {
		return nil, invalid(err)
	}
	id := req.GetWorkerId()
	if id == "" {
		id = newWorkerID()
	} else if err := validate.ID("worker_id", id); err != nil {
		return nil, invalid(err)
	}
	var hive registry.Hive
	if hid := req.GetHiveId(); hid != "" {
		if err := validate.ID("hive_id", hid); err != nil {
			return nil, invalid(err)
		}
		h, ok := q.reg.GetHive(hid)
		if !ok {
			return nil, status.Errorf(codes.NotFound, "hive %q is not known to this queen (see ListHives)", hid)
		}
		hive = h
	} else {
		h, err := q.reg.PickHive()
		if err != nil {
			return nil, status.Error(codes.Unavailable, "no live hive to spawn on: start a hive, or give the queen --hive ID=HOST:PORT")
		}
		hive = h
	}
	ctx = narrate.WithLogger(ctx, narrate.Logger(ctx).With(zap.String("worker_id", id), zap.String("hive_id", hive.ID)))
	narrate.Event(ctx, "queen", "worker_spawn_start", fmt.Sprintf("Spawning worker %s for model %q on %s, hive %s", id, req.GetModel(), device, hive.ID),
		zap.String("model", req.GetModel()), zap.String("device", device))

	if err := q.reg.Reserve(registry.Worker{ID: id, HiveID: hive.ID, Model: req.GetModel(), Device: device}); err != nil {
		if errors.Is(err, registry.ErrExists) {
			return nil, status.Errorf(codes.AlreadyExists, "worker %q already exists", id)
		}
		return nil, status.Errorf(codes.Internal, "reserving worker %q: %v", id, err)
	}
	hc, err := q.cfg.Hives.Hive(hive.Address)
	if err != nil {
		q.reg.Remove(id, err)
		return nil, status.Errorf(codes.Unavailable, "hive %s at %s: %v", hive.ID, hive.Address, err)
	}
	// The hive call is not cut short when the caller goes away: a spawn either returns a
	// registered worker or leaves nothing behind, never a process the queen half knows.
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), hiveSpawnTimeout)
	defer cancel()
	sreq := &rbeev1.SpawnRequest{WorkerId: id, Model: req.GetModel(), Device: device, QueenAddress: q.cfg.Advertise}
	if q.cfg.Token != "" {
		sreq.WorkerToken = auth.WorkerToken(q.cfg.Token, id)
	}
	resp, err := hc.Spawn(sctx, sreq)
	if err != nil {
		q.metrics.spawned("error", t0)
		q.reg.Remove(id, err)
		narrate.Warn(ctx, "queen", "worker_spawn_failed", "Hive could not spawn the worker", zap.Error(err))
		return nil, hiveError(hive, "spawn", err)
	}
	w, err := q.reg.Started(id, resp.GetPid(), resp.GetPort(), resp.GetProcessStartTime())
	if err != nil {
		// Removed while the hive was starting it (deleted, or reported dead): do not leave the
		// process behind.
		q.cleanup(ctx, hive, id, resp.GetPid(), resp.GetProcessStartTime())
		q.metrics.spawned("error", t0)
		return nil, status.Errorf(codes.Aborted, "worker %s went away while it was being spawned: %v", id, err)
	}
	narrate.Event(ctx, "queen", "worker_spawned", fmt.Sprintf("Worker %s spawned on hive %s (PID %d, port %d)", id, hive.ID, w.PID, w.Port),
		zap.Int32("pid", w.PID), zap.Uint32("port", w.Port))
	if !req.GetWaitReady() {
		q.metrics.spawned("returned", t0)
		return &rbeev1.SpawnWorkerResponse{Worker: workerToProto(w)}, nil
	}

	wctx, cancel := context.WithTimeout(ctx, q.cfg.StartTimeout)
	defer cancel()
	w, err = q.reg.Await(wctx, id, func(w registry.Worker) bool {
		return w.State == registry.StateReady || w.State == registry.StateBusy
	})
	if err == nil {
		q.metrics.spawned("ready", t0)
		narrate.Event(ctx, "queen", "worker_ready", fmt.Sprintf("Worker %s is READY", id))
		return &rbeev1.SpawnWorkerResponse{Worker: workerToProto(w)}, nil
	}
	if errors.Is(err, registry.ErrNotFound) {
		q.metrics.spawned("exited", t0)
		narrate.Warn(ctx, "queen", "worker_spawn_failed", "Worker went away before it was READY", zap.Error(err))
		return nil, status.Errorf(codes.Aborted, "worker %s did not become READY: %v", id, err)
	}
	// Not ready in time (or the caller gave up): remove the half-started worker so nothing leaks.
	q.reg.Remove(id, err)
	q.cleanup(ctx, hive, id, w.PID, w.ProcessStartTime)
	q.metrics.spawned("timeout", t0)
	narrate.Warn(ctx, "queen", "worker_spawn_timeout", "Worker not READY in time; removed it", zap.Duration("start_timeout", q.cfg.StartTimeout))
	return nil, status.Errorf(codes.DeadlineExceeded, "worker %s was not READY within %v; it was stopped and removed", id, q.cfg.StartTimeout)
}

// cleanup kills a worker the caller will not keep, on a context of its own: the call that wanted
// the worker may already be cancelled, but the process must not outlive it.
func (q *Queen) cleanup(ctx context.Context, hive registry.Hive, id string, pid int32, start uint64) {
	if pid <= 1 {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), hiveDeleteSlack)
	defer cancel()
	hc, err := q.cfg.Hives.Hive(hive.Address)
	if err == nil {
		_, err = hc.Delete(ctx, &rbeev1.DeleteRequest{WorkerId: id, Pid: pid, ProcessStartTime: start, GracePeriod: durationpb.New(0)})
	}
	if err != nil {
		narrate.Warn(ctx, "queen", "worker_cleanup_failed", "Could not stop a worker that was not kept", zap.Error(err))
	}
}

// hiveError turns a hive call's error into the queen's answer: unreachable hives are UNAVAILABLE,
// the hive's own verdicts keep their code.
func hiveError(h registry.Hive, op string, err error) error {
	st, _ := status.FromError(err)
	switch st.Code() {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled:
		if st.Code() == codes.Canceled {
			return status.Errorf(codes.Canceled, "%s on hive %s cancelled", op, h.ID)
		}
		return status.Errorf(codes.Unavailable, "hive %s at %s is unreachable (%s): %s", h.ID, h.Address, op, st.Message())
	default:
		return status.Errorf(st.Code(), "hive %s: %s", h.ID, st.Message())
	}
}

func newWorkerID() string {
	var b [5]byte
	_, _ = rand.Read(b[:])
	return "w-" + hex.EncodeToString(b[:])
}

// ListWorkers lists the registry, optionally one hive's workers.
func (q *Queen) ListWorkers(_ context.Context, req *rbeev1.ListWorkersRequest) (*rbeev1.ListWorkersResponse, error) {
	if h := req.GetHiveId(); h != "" {
		if err := validate.ID("hive_id", h); err != nil {
			return nil, invalid(err)
		}
	}
	return &rbeev1.ListWorkersResponse{Workers: workersToProto(q.reg.List(req.GetHiveId()))}, nil
}

// GetWorker returns one worker.
func (q *Queen) GetWorker(_ context.Context, req *rbeev1.GetWorkerRequest) (*rbeev1.GetWorkerResponse, error) {
	if err := validate.ID("worker_id", req.GetWorkerId()); err != nil {
		return nil, invalid(err)
	}
	w, ok := q.reg.Get(req.GetWorkerId())
	if !ok {
		return nil, status.Errorf(codes.NotFound, "worker %q is not known", req.GetWorkerId())
	}
	return &rbeev1.GetWorkerResponse{Worker: workerToProto(w)}, nil
}

// DeleteWorker forwards Delete-with-PID to the worker's hive and forgets the worker once its
// process is gone.
func (q *Queen) DeleteWorker(ctx context.Context, req *rbeev1.DeleteWorkerRequest) (*rbeev1.DeleteWorkerResponse, error) {
	id := req.GetWorkerId()
	if err := validate.ID("worker_id", id); err != nil {
		return nil, invalid(err)
	}
	grace, graceSet, err := validate.Grace("grace_period", req.GetGracePeriod())
	if err != nil {
		return nil, invalid(err)
	}
	w, ok := q.reg.Get(id)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "worker %q is not known", id)
	}
	if w.PID <= 1 {
		return nil, status.Errorf(codes.FailedPrecondition, "worker %s has no process yet (its spawn is in progress); retry", id)
	}
	hive, ok := q.reg.GetHive(w.HiveID)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "hive %q of worker %s is not known to this queen", w.HiveID, id)
	}
	ctx = narrate.WithLogger(ctx, narrate.Logger(ctx).With(zap.String("worker_id", id), zap.String("hive_id", hive.ID)))
	narrate.Event(ctx, "queen", "worker_delete_start", fmt.Sprintf("Deleting worker %s (PID %d) on hive %s", id, w.PID, hive.ID), zap.Int32("pid", w.PID))
	hc, err := q.cfg.Hives.Hive(hive.Address)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "hive %s at %s: %v", hive.ID, hive.Address, err)
	}
	dreq := &rbeev1.DeleteRequest{WorkerId: id, Pid: w.PID, ProcessStartTime: w.ProcessStartTime}
	timeout := validate.MaxGrace + hiveDeleteSlack
	if graceSet {
		dreq.GracePeriod = durationpb.New(grace)
		timeout = grace + hiveDeleteSlack
	}
	dctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	t0 := time.Now()
	resp, err := hc.Delete(dctx, dreq)
	if err != nil {
		q.metrics.deleted("error", t0)
		narrate.Warn(ctx, "queen", "worker_delete_failed", "Hive did not delete the worker", zap.Error(err))
		return nil, hiveError(hive, "delete", err)
	}
	q.metrics.deleted(strings.ToLower(strings.TrimPrefix(resp.GetOutcome().String(), "DELETE_OUTCOME_")), t0)
	if last, ok := q.reg.Remove(id, errors.New("deleted")); ok {
		w = last
	}
	narrate.Event(ctx, "queen", "worker_delete_complete", fmt.Sprintf("Worker %s deleted: %s", id, resp.GetOutcome()),
		zap.Stringer("outcome", resp.GetOutcome()))
	return &rbeev1.DeleteWorkerResponse{Outcome: resp.GetOutcome(), Worker: workerToProto(w)}, nil
}

// ListHives lists the hives the queen knows.
func (q *Queen) ListHives(context.Context, *rbeev1.ListHivesRequest) (*rbeev1.ListHivesResponse, error) {
	hs := q.reg.ListHives()
	out := make([]*rbeev1.Hive, len(hs))
	for i, h := range hs {
		out[i] = hiveToProto(h)
	}
	return &rbeev1.ListHivesResponse{Hives: out}, nil
}

// WatchWorkers sends the current set, a SYNCED marker, then every change. A watcher that falls
// behind is sent RESET and a fresh snapshot by the registry, never a silent gap.
func (q *Queen) WatchWorkers(req *rbeev1.WatchWorkersRequest, stream rbeev1.QueenService_WatchWorkersServer) error {
	if h := req.GetHiveId(); h != "" {
		if err := validate.ID("hive_id", h); err != nil {
			return invalid(err)
		}
	}
	w := q.reg.Watch(req.GetHiveId())
	defer w.Close()
	ctx := stream.Context()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-q.stopping:
			return status.Error(codes.Unavailable, "queen shutting down")
		case ev, ok := <-w.Events():
			if !ok {
				return status.Error(codes.Unavailable, "watch closed by the queen")
			}
			resp := &rbeev1.WatchWorkersResponse{Type: eventToProto[ev.Type], Revision: ev.Revision, Reason: ev.Reason}
			if ev.Type == registry.EventAdded || ev.Type == registry.EventUpdated || ev.Type == registry.EventRemoved {
				resp.Worker = workerToProto(ev.Worker)
			}
			if err := stream.Send(resp); err != nil {
				return err
			}
		}
	}
}

var eventToProto = map[registry.EventType]rbeev1.WatchEventType{
	registry.EventAdded:   rbeev1.WatchEventType_WATCH_EVENT_TYPE_ADDED,
	registry.EventUpdated: rbeev1.WatchEventType_WATCH_EVENT_TYPE_UPDATED,
	registry.EventRemoved: rbeev1.WatchEventType_WATCH_EVENT_TYPE_REMOVED,
	registry.EventSynced:  rbeev1.WatchEventType_WATCH_EVENT_TYPE_SYNCED,
	registry.EventReset:   rbeev1.WatchEventType_WATCH_EVENT_TYPE_RESET,
}

// StartTimedOut stops a worker that never sent a heartbeat within the start timeout; the registry
// has already forgotten it.
func (q *Queen) StartTimedOut(w registry.Worker) {
	ctx := narrate.WithLogger(context.Background(), q.cfg.Logger.With(zap.String("worker_id", w.ID), zap.String("hive_id", w.HiveID)))
	narrate.Warn(ctx, "queen", "worker_start_timeout", fmt.Sprintf("Worker %s sent no heartbeat within the start timeout; stopping it", w.ID))
	if h, ok := q.reg.GetHive(w.HiveID); ok {
		q.cleanup(ctx, h, w.ID, w.PID, w.ProcessStartTime)
	}
}

// GetStatus summarises the queen and its registry.
func (q *Queen) GetStatus(context.Context, *rbeev1.GetStatusRequest) (*rbeev1.GetStatusResponse, error) {
	resp := &rbeev1.GetStatusResponse{
		QueenId: q.cfg.QueenID, Version: version.Version(), StartTime: timestamppb.New(q.started),
		WorkersByState: map[string]uint32{}, HivesByState: map[string]uint32{}, Revision: q.reg.Revision(),
	}
	for _, w := range q.reg.List("") {
		resp.WorkersByState[stateToProto[w.State].String()]++
		resp.WorkerCount++
	}
	for _, h := range q.reg.ListHives() {
		resp.HivesByState[hiveStateToProto[h.State].String()]++
		resp.HiveCount++
	}
	return resp, nil
}
