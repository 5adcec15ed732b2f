// Package server is the queen's gRPC edge: it turns QueenService and HeartbeatService calls into
// registry operations and hive calls, and registry and hive errors into status codes. Business
// rules (liveness, watch, hive choice) live in the registry.
package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/errinfo"
	"github.com/rbee-dev/rbee/internal/narrate"
	"github.com/rbee-dev/rbee/internal/validate"
	"github.com/rbee-dev/rbee/internal/version"
	"github.com/rbee-dev/rbee/queen/fleet"
	"github.com/rbee-dev/rbee/queen/registry"
)

// Config configures the queen's services.
type Config struct {
	Registry *registry.Registry
	// Fleet runs spawns and deletes; the gRPC edge only checks requests and maps its errors.
	Fleet *fleet.Fleet
	// QueenID names this run of the queen; workers see it change when the queen restarts.
	QueenID string
	// Interval is the heartbeat interval workers and hives are told to beat at.
	Interval time.Duration
	// MaxBeatsPerSecond ends a heartbeat stream that sends faster (0: no limit).
	MaxBeatsPerSecond int
	// MaxWatchers and MaxWatchersPerConn bound the WatchWorkers streams open at once, in all and
	// on one connection (0: DefaultMaxWatchers, DefaultMaxWatchersPerConn).
	MaxWatchers, MaxWatchersPerConn int
	// WatchSendTimeout ends a watch whose client takes no message for this long
	// (0: DefaultWatchSendTimeout).
	WatchSendTimeout time.Duration
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
	fleet   *fleet.Fleet
	started time.Time
	metrics *metrics
	// listCache holds workers' encodings for ListWorkers.
	listCache encodingCache
	watchers  watchCount
	beats
}

// New returns the queen's services.
func New(cfg Config) *Queen {
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.MaxWatchers <= 0 {
		cfg.MaxWatchers = DefaultMaxWatchers
	}
	if cfg.MaxWatchersPerConn <= 0 {
		cfg.MaxWatchersPerConn = DefaultMaxWatchersPerConn
	}
	if cfg.WatchSendTimeout <= 0 {
		cfg.WatchSendTimeout = DefaultWatchSendTimeout
	}
	q := &Queen{cfg: cfg, reg: cfg.Registry, fleet: cfg.Fleet, started: time.Now(), metrics: newMetrics(cfg.Registerer, cfg.Registry)}
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

// status turns a fleet error into the gRPC answer; the one place fleet kinds become codes.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	st := status.New(fleet.CodeOf(fleet.KindOf(err)), err.Error())
	var fe *fleet.Error
	if errors.As(err, &fe) && fe.Unreachable != nil {
		// Clients tell "the queen answered: a hive is down" from "the queen is down" by this.
		st = errinfo.WithHiveUnreachable(st, fe.Unreachable.ID, fe.Unreachable.Address)
	}
	return st.Err()
}

// SpawnWorker starts a worker through the fleet operations (pick a hive, reserve the id, ask the
// hive and, with wait_ready, wait until the worker reports READY).
func (q *Queen) SpawnWorker(ctx context.Context, req *rbeev1.SpawnWorkerRequest) (*rbeev1.SpawnWorkerResponse, error) {
	w, err := q.fleet.Spawn(ctx, fleet.SpawnSpec{
		HiveID: req.GetHiveId(), Model: req.GetModel(), Device: req.GetDevice(), WorkerID: req.GetWorkerId(),
		WaitReady: req.GetWaitReady(),
	})
	if err != nil {
		return nil, toStatus(err)
	}
	return &rbeev1.SpawnWorkerResponse{Worker: workerToProto(w)}, nil
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

// DeleteWorker stops a worker through its hive (Delete-with-PID) and forgets it once its process
// is gone.
func (q *Queen) DeleteWorker(ctx context.Context, req *rbeev1.DeleteWorkerRequest) (*rbeev1.DeleteWorkerResponse, error) {
	if err := validate.ID("worker_id", req.GetWorkerId()); err != nil {
		return nil, invalid(err)
	}
	grace, graceSet, err := validate.Grace("grace_period", req.GetGracePeriod())
	if err != nil {
		return nil, invalid(err)
	}
	if !graceSet {
		grace = -1
	}
	d, err := q.fleet.Delete(ctx, req.GetWorkerId(), grace)
	if err != nil {
		return nil, toStatus(err)
	}
	return &rbeev1.DeleteWorkerResponse{Outcome: d.Outcome, Worker: workerToProto(d.Worker)}, nil
}

// WorkerLogs relays a worker's captured output from its hive (HiveService.Logs), for live workers
// and for those removed lately.
func (q *Queen) WorkerLogs(req *rbeev1.WorkerLogsRequest, stream rbeev1.QueenService_WorkerLogsServer) error {
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	go func() {
		select { // a follow must not hold the queen's shutdown
		case <-q.stopping:
			cancel()
		case <-ctx.Done():
		}
	}()
	err := q.fleet.Logs(ctx, req.GetWorkerId(), req.GetTailLines(), req.GetFollow(), func(b []byte) error {
		return stream.Send(&rbeev1.WorkerLogsResponse{Data: b})
	})
	select {
	case <-q.stopping:
		return status.Error(codes.Unavailable, "queen shutting down")
	default:
	}
	var fe *fleet.Error
	if err != nil && !errors.As(err, &fe) {
		return err // the caller's stream failed: nothing to tell it
	}
	return toStatus(err)
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
//
// Watchers are bounded in number (per connection and in all, RESOURCE_EXHAUSTED beyond), and so
// is what one holds: the registry's part is bounded by design; the stream's own part is bounded
// because a watch whose client has not taken a message for WatchSendTimeout is ended
// (RESOURCE_EXHAUSTED) rather than left to hold its buffers.
func (q *Queen) WatchWorkers(req *rbeev1.WatchWorkersRequest, stream rbeev1.QueenService_WatchWorkersServer) error {
	if h := req.GetHiveId(); h != "" {
		if err := validate.ID("hive_id", h); err != nil {
			return invalid(err)
		}
	}
	ctx := stream.Context()
	release, err := q.watchers.admit(ctx, q.cfg.MaxWatchers, q.cfg.MaxWatchersPerConn)
	if err != nil {
		return err
	}
	defer release()
	stop := q.draining()
	w := q.reg.Watch(req.GetHiveId())
	defer w.Close()

	// Sends happen on a goroutine of their own, handed one message at a time, so that a send the
	// client's flow control holds up cannot hold this handler: when it is stuck for too long,
	// the handler returns, gRPC ends the stream, and the stuck send returns with it.
	out := make(chan *rbeev1.WatchWorkersResponse)
	sendErr := make(chan error, 1)
	go func() {
		for resp := range out {
			if err := stream.Send(resp); err != nil {
				sendErr <- err
				return
			}
		}
	}()
	defer close(out)
	stalled := time.NewTimer(time.Hour)
	stalled.Stop()
	defer stalled.Stop()
	for {
		var ev registry.Event
		select {
		case <-ctx.Done():
			return nil
		case <-stop:
			return status.Error(codes.Unavailable, "queen shutting down")
		case err := <-sendErr:
			return err
		case e, ok := <-w.Events():
			if !ok {
				return status.Error(codes.Unavailable, "watch closed by the queen")
			}
			ev = e
		}
		resp := &rbeev1.WatchWorkersResponse{Type: eventToProto[ev.Type], Revision: ev.Revision, Reason: ev.Reason}
		if ev.Type == registry.EventAdded || ev.Type == registry.EventUpdated || ev.Type == registry.EventRemoved {
			resp.Worker = workerToProto(ev.Worker)
		}
		stalled.Reset(q.cfg.WatchSendTimeout)
		select {
		case out <- resp:
		case <-stalled.C:
			narrate.Warn(ctx, "queen", "watch_stalled", "A watch's client stopped reading; ended it",
				zap.Duration("watch_send_timeout", q.cfg.WatchSendTimeout))
			return status.Errorf(codes.ResourceExhausted, "this watch's client has not read for %v; the watch was ended (watch again to resume)", q.cfg.WatchSendTimeout)
		case err := <-sendErr:
			return err
		case <-ctx.Done():
			return nil
		case <-stop:
			return status.Error(codes.Unavailable, "queen shutting down")
		}
		stalled.Stop()
	}
}

var eventToProto = map[registry.EventType]rbeev1.WatchEventType{
	registry.EventAdded:   rbeev1.WatchEventType_WATCH_EVENT_TYPE_ADDED,
	registry.EventUpdated: rbeev1.WatchEventType_WATCH_EVENT_TYPE_UPDATED,
	registry.EventRemoved: rbeev1.WatchEventType_WATCH_EVENT_TYPE_REMOVED,
	registry.EventSynced:  rbeev1.WatchEventType_WATCH_EVENT_TYPE_SYNCED,
	registry.EventReset:   rbeev1.WatchEventType_WATCH_EVENT_TYPE_RESET,
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
