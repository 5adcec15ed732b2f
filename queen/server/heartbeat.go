package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/auth"
	"github.com/rbee-dev/rbee/internal/narrate"
	"github.com/rbee-dev/rbee/internal/validate"
	"github.com/rbee-dev/rbee/queen/registry"
)

// beats tracks which stream currently speaks for each worker and hive, so that a second stream
// for the same id replaces the first, and it ends every stream when the queen shuts down.
type beats struct {
	mu     sync.Mutex
	owners map[string]*session // "w/<id>" or "h/<id>" -> current stream
	// stopping is closed by Drain; Resume puts an open one in its place. Each stream keeps the
	// one it started under, so a stream of a drained term never outlives it.
	stopping chan struct{}
}

type session struct {
	replaced atomic.Bool // read at every beat without taking beats.mu
}

func (b *beats) init() {
	b.owners = map[string]*session{}
	b.stopping = make(chan struct{})
}

// Drain makes every heartbeat and watch stream end: each heartbeat stream ends at its next beat
// (within one interval) with UNAVAILABLE, which tells the worker to reconnect, to a restarted queen
// or to the queen that leads now.
func (q *Queen) Drain() {
	q.beats.mu.Lock()
	defer q.beats.mu.Unlock()
	select {
	case <-q.stopping:
	default:
		close(q.stopping)
	}
}

// Resume lets new streams run again after Drain (a queen that leads again); streams drained
// before stay ended.
func (q *Queen) Resume() {
	q.beats.mu.Lock()
	defer q.beats.mu.Unlock()
	select {
	case <-q.stopping:
		q.stopping = make(chan struct{})
	default:
	}
}

// draining returns the channel Drain closes, as it is now.
func (b *beats) draining() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.stopping
}

func (b *beats) attach(key string) *session {
	s := &session{}
	b.mu.Lock()
	if old := b.owners[key]; old != nil {
		old.replaced.Store(true)
	}
	b.owners[key] = s
	b.mu.Unlock()
	return s
}

// detach reports whether s was still the current stream for key (and so its end means something).
func (b *beats) detach(key string, s *session) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.owners[key] != s {
		return false
	}
	delete(b.owners, key)
	return true
}

func (b *beats) isReplaced(s *session) bool { return s.replaced.Load() }

// endStatus says why a heartbeat stream is being ended by the queen, or nil to keep going.
func (q *Queen) endStatus(s *session, stop <-chan struct{}, what string) error {
	select {
	case <-stop:
		return status.Error(codes.Unavailable, "queen shutting down; reconnect")
	default:
	}
	if q.isReplaced(s) {
		return status.Errorf(codes.Aborted, "a newer heartbeat stream for %s replaced this one", what)
	}
	return nil
}

// limiter is a token bucket: rate tokens a second, bursts of up to rate.
type limiter struct {
	rate   float64
	tokens float64
	last   time.Time
}

func (l *limiter) allow(now time.Time) bool {
	if l.rate <= 0 {
		return true
	}
	if l.last.IsZero() {
		l.tokens = l.rate
	} else {
		l.tokens = min(l.rate, l.tokens+now.Sub(l.last).Seconds()*l.rate)
	}
	l.last = now
	if l.tokens < 1 {
		return false
	}
	l.tokens--
	return true
}

// workerFromProto checks a heartbeat descriptor and converts it.
func workerFromProto(p *rbeev1.Worker) (registry.Worker, error) { return workerFromProtoSince(p, nil) }

// workerFromProtoSince is workerFromProto for a beat after prev, the stream's last accepted
// descriptor, if any: a worker sends the same strings beat after beat, and those equal to prev's
// were checked already.
func workerFromProtoSince(p *rbeev1.Worker, prev *registry.Worker) (registry.Worker, error) {
	if p == nil {
		return registry.Worker{}, &validate.Error{Field: "worker", Rule: "required: every heartbeat carries the full descriptor"}
	}
	var pv registry.Worker
	if prev != nil {
		pv = *prev
	}
	checked := func(v, old string) bool { return prev != nil && v == old }
	if !checked(p.GetWorkerId(), pv.ID) {
		if err := validate.ID("worker.worker_id", p.GetWorkerId()); err != nil {
			return registry.Worker{}, err
		}
	}
	if !checked(p.GetHiveId(), pv.HiveID) {
		if err := validate.ID("worker.hive_id", p.GetHiveId()); err != nil {
			return registry.Worker{}, err
		}
	}
	if !checked(p.GetModel(), pv.Model) {
		if err := validate.Model("worker.model", p.GetModel()); err != nil {
			return registry.Worker{}, err
		}
	}
	if !checked(p.GetDevice(), pv.Device) {
		if err := validate.Device("worker.device", p.GetDevice()); err != nil {
			return registry.Worker{}, err
		}
	}
	if err := validate.PID("worker.pid", p.GetPid()); err != nil {
		return registry.Worker{}, err
	}
	if err := validate.Port("worker.port", p.GetPort()); err != nil {
		return registry.Worker{}, err
	}
	if a := p.GetAddress(); a != "" {
		if err := validate.Host("worker.address", a); err != nil {
			return registry.Worker{}, err
		}
	}
	st, ok := reportable[p.GetState()]
	if !ok {
		return registry.Worker{}, &validate.Error{Field: "worker.state", Rule: fmt.Sprintf("%s is not a state a worker reports (STARTING, READY, BUSY, STOPPING, UNHEALTHY)", p.GetState())}
	}
	if p.GetConcurrency() > maxConcurrency {
		return registry.Worker{}, &validate.Error{Field: "worker.concurrency", Rule: fmt.Sprintf("%d: at most %d", p.GetConcurrency(), maxConcurrency)}
	}
	if len(p.GetStatusMessage()) > maxStatusMessage {
		return registry.Worker{}, &validate.Error{Field: "worker.status_message", Rule: fmt.Sprintf("%d bytes: at most %d", len(p.GetStatusMessage()), maxStatusMessage)}
	}
	return registry.Worker{
		ID: p.GetWorkerId(), HiveID: p.GetHiveId(), Model: p.GetModel(), Device: p.GetDevice(),
		PID: p.GetPid(), Port: p.GetPort(), ProcessStartTime: p.GetProcessStartTime(), State: st, Reported: st,
		Address: p.GetAddress(), Concurrency: p.GetConcurrency(), StatusMessage: p.GetStatusMessage(),
	}, nil
}

// WorkerHeartbeat applies each beat to the registry and answers it with exactly one response.
func (q *Queen) WorkerHeartbeat(stream rbeev1.HeartbeatService_WorkerHeartbeatServer) error {
	ctx := stream.Context()
	// Each beat is decoded into the previous one's message, or not at all when it is the same
	// (see ServerCodec): hold no other reference to msg.req across beats.
	msg := &beatMsg{req: new(rbeev1.WorkerHeartbeatRequest)}
	if err := stream.RecvMsg(msg); err != nil {
		return q.recvEnd(ctx, err)
	}
	first := msg.req
	w, err := workerFromProto(first.GetWorker())
	if err != nil {
		return invalid(err)
	}
	id := w.ID
	if who, ok := auth.FromContext(ctx); ok && !who.Cluster && who.WorkerID != id {
		// A worker's token speaks for that worker only: no one may beat in another's name.
		narrate.Warn(ctx, "queen", "worker_heartbeat_impersonation", "Refused a heartbeat for another worker's id",
			zap.String("claimed_worker_id", id), zap.String("token_worker_id", who.WorkerID))
		return status.Errorf(codes.PermissionDenied, "this stream's token is for worker %q, not %q", who.WorkerID, id)
	}
	// No per-stream logger with the worker id: a stream is open for every worker, and its few log
	// lines name the worker themselves.
	// Every answer is the same: encode it once for the stream's life.
	var resp grpc.PreparedMsg
	if err := resp.Encode(stream, &rbeev1.WorkerHeartbeatResponse{QueenId: q.cfg.QueenID, Interval: durationpb.New(q.cfg.Interval)}); err != nil {
		return status.Errorf(codes.Internal, "encoding the heartbeat answer: %v", err)
	}
	recv := func() (*rbeev1.WorkerHeartbeatRequest, error) {
		if err := stream.RecvMsg(msg); err != nil {
			return nil, err
		}
		return msg.req, nil
	}
	var ticket registry.Ticket
	return serveBeats(q, ctx, "worker", id, first, recv, func() error { return stream.SendMsg(&resp) },
		func(req *rbeev1.WorkerHeartbeatRequest, isFirst bool, now time.Time) error {
			// A beat equal to the last one, byte for byte, was checked with it: w is still the
			// whole descriptor it carries, and unless something else touched the worker since,
			// the registry need only note its time (Rebeat, without its lock). Otherwise check
			// only what changed.
			if !isFirst && msg.same && q.reg.Rebeat(ticket, now) {
				q.metrics.workerBeats.Inc()
				return nil
			}
			if !isFirst && !msg.same {
				if w, err = workerFromProtoSince(req.GetWorker(), &w); err != nil {
					return invalid(err)
				}
				if w.ID != id {
					return invalid(&validate.Error{Field: "worker.worker_id", Rule: fmt.Sprintf("%q on a stream opened by worker %q", w.ID, id)})
				}
			}
			if ticket, err = q.reg.BeatTicketAt(w, now); err != nil {
				return status.Errorf(codes.FailedPrecondition, "heartbeat refused: %v", err)
			}
			q.metrics.workerBeats.Inc()
			return nil
		},
		func() { q.reg.StreamClosed(id) })
}

// HiveHeartbeat registers a hive, keeps it alive, and applies the worker exits it reports.
func (q *Queen) HiveHeartbeat(stream rbeev1.HeartbeatService_HiveHeartbeatServer) error {
	ctx := stream.Context()
	first, err := stream.Recv()
	if err != nil {
		return q.recvEnd(ctx, err)
	}
	h, err := hiveFromProto(first.GetHive())
	if err != nil {
		return invalid(err)
	}
	id := h.ID
	ctx = narrate.WithLogger(ctx, narrate.Logger(ctx).With(zap.String("hive_id", id)))
	narrate.Event(ctx, "queen", "hive_registered", fmt.Sprintf("Hive %s registered at %s", id, h.Address), zap.String("address", h.Address))
	resp := &rbeev1.HiveHeartbeatResponse{QueenId: q.cfg.QueenID, Interval: durationpb.New(q.cfg.Interval)}
	return serveBeats(q, ctx, "hive", id, first, stream.Recv, func() error { return stream.Send(resp) },
		func(req *rbeev1.HiveHeartbeatRequest, isFirst bool, _ time.Time) error {
			if !isFirst {
				if h, err = hiveFromProto(req.GetHive()); err != nil {
					return invalid(err)
				}
				if h.ID != id {
					return invalid(&validate.Error{Field: "hive.hive_id", Rule: fmt.Sprintf("%q on a stream opened by hive %q", h.ID, id)})
				}
			}
			h.Clock = registry.HiveClock{}
			if c := req.GetClock(); c != nil && c.GetInstance() != 0 {
				if err := c.GetReading().CheckValid(); err != nil || c.GetReading().AsDuration() < 0 {
					return invalid(&validate.Error{Field: "clock.reading", Rule: "a duration of zero or more"})
				}
				h.Clock = registry.HiveClock{Instance: c.GetInstance(), Reading: c.GetReading().AsDuration()}
			}
			if _, err := q.reg.HiveBeat(h); err != nil {
				return status.Errorf(codes.FailedPrecondition, "heartbeat refused: %v", err)
			}
			q.metrics.hiveBeats.Inc()
			for _, e := range req.GetExits() {
				q.workerExited(ctx, id, e)
			}
			return nil
		},
		func() { q.reg.HiveStreamClosed(id) })
}

// serveBeats is the loop both heartbeat streams share, from the (already checked) first request
// on: it makes the stream the one that speaks for kind id (replacing an older one), applies each
// request with beat and answers it with exactly one response, in order, and ends the stream when a
// newer one replaced it, the queen shuts down, or it floods. closed runs when the stream ends while
// it still spoke for id.
func serveBeats[Req any](q *Queen, ctx context.Context, kind, id string, first *Req,
	recv func() (*Req, error), answer func() error, beat func(req *Req, isFirst bool, now time.Time) error, closed func()) error {
	key, what := kind+"/"+id, kind+" "+id
	stop := q.draining()
	s := q.attach(key)
	defer func() {
		if q.detach(key, s) {
			closed()
		}
	}()
	lim := limiter{rate: float64(q.cfg.MaxBeatsPerSecond)}
	req, isFirst := first, true
	first = nil
	for {
		if err := q.endStatus(s, stop, what); err != nil {
			return err
		}
		now := time.Now()
		if !lim.allow(now) {
			narrate.Warn(ctx, "queen", kind+"_heartbeat_flood", "Heartbeat stream over its rate limit; ending it",
				zap.String(kind+"_id", id), zap.Int("max_beats_per_second", q.cfg.MaxBeatsPerSecond))
			return status.Errorf(codes.ResourceExhausted, "more than %d heartbeats a second on this stream", q.cfg.MaxBeatsPerSecond)
		}
		if err := beat(req, isFirst, now); err != nil {
			return err
		}
		if err := answer(); err != nil {
			return err
		}
		// Hold no request while waiting for the next: a stream waits for every worker.
		req, isFirst = nil, false
		var err error
		if req, err = recv(); err != nil {
			return q.recvEnd(ctx, err, zap.String(kind+"_id", id))
		}
	}
}

// recvEnd turns the end of a client stream into the handler's result: io.EOF is a clean close; a
// cancelled client, a dropped connection or the queen's own shutdown are routine (debug: a fleet
// reconnecting would otherwise write thousands of warnings, and the registry already marks the
// worker STALE); anything else is worth a warning.
func (q *Queen) recvEnd(ctx context.Context, err error, fields ...zap.Field) error {
	if errors.Is(err, io.EOF) {
		return nil
	}
	code := status.Code(err)
	select {
	case <-q.draining():
		code = codes.Canceled
	default:
	}
	if code == codes.Canceled || code == codes.Unavailable || ctx.Err() != nil {
		narrate.Logger(ctx).Debug("heartbeat stream ended by the peer or the connection", append(fields, zap.Error(err))...)
		return nil
	}
	narrate.Logger(ctx).Warn("heartbeat stream failed", append(fields, zap.Error(err))...)
	return err
}

func hiveFromProto(p *rbeev1.Hive) (registry.Hive, error) {
	if p == nil {
		return registry.Hive{}, &validate.Error{Field: "hive", Rule: "required: every heartbeat carries the hive's descriptor"}
	}
	if err := validate.ID("hive.hive_id", p.GetHiveId()); err != nil {
		return registry.Hive{}, err
	}
	if err := validate.Address("hive.address", p.GetAddress()); err != nil {
		return registry.Hive{}, err
	}
	for i, d := range p.GetDevices() {
		if err := validate.Device(fmt.Sprintf("hive.devices[%d]", i), d); err != nil {
			return registry.Hive{}, err
		}
	}
	var info []registry.Device
	for i, d := range p.GetDeviceInfo() {
		if err := validate.Device(fmt.Sprintf("hive.device_info[%d].name", i), d.GetName()); err != nil {
			return registry.Hive{}, err
		}
		if len(d.GetDescription()) > 256 {
			return registry.Hive{}, &validate.Error{Field: fmt.Sprintf("hive.device_info[%d].description", i), Rule: "at most 256 bytes"}
		}
		info = append(info, registry.Device{Name: d.GetName(), Description: d.GetDescription(),
			MemoryTotal: d.GetMemoryTotalBytes(), MemoryUsed: d.GetMemoryUsedBytes()})
	}
	models, err := offersFromProto(p.GetModels())
	if err != nil {
		return registry.Hive{}, err
	}
	return registry.Hive{
		ID: p.GetHiveId(), Address: p.GetAddress(), Version: p.GetVersion(), OS: p.GetOs(),
		Devices: p.GetDevices(), DeviceInfo: info, FreePorts: p.GetFreePorts(), Models: models,
	}, nil
}

// Bounds on what a heartbeat may carry, so that one hive or worker cannot bloat the registry.
const (
	maxConcurrency   = 1 << 16
	maxStatusMessage = 1024
	maxModelOffers   = 1024
)

// offersFromProto checks a hive's catalog as its heartbeat reports it.
func offersFromProto(ms []*rbeev1.ModelOffer) ([]registry.ModelOffer, error) {
	if len(ms) > maxModelOffers {
		return nil, &validate.Error{Field: "hive.models", Rule: fmt.Sprintf("%d models: at most %d", len(ms), maxModelOffers)}
	}
	var out []registry.ModelOffer
	for i, m := range ms {
		f := fmt.Sprintf("hive.models[%d]", i)
		if err := validate.ID(f+".name", m.GetName()); err != nil {
			return nil, err
		}
		for j, d := range m.GetDevices() {
			if err := validate.Device(fmt.Sprintf("%s.devices[%d]", f, j), d); err != nil {
				return nil, err
			}
		}
		if m.GetConcurrency() > maxConcurrency {
			return nil, &validate.Error{Field: f + ".concurrency", Rule: fmt.Sprintf("at most %d", maxConcurrency)}
		}
		o := registry.ModelOffer{Name: m.GetName(), Devices: m.GetDevices(), Concurrency: m.GetConcurrency(),
			LoadTimeout: m.GetLoadTimeout().AsDuration(), TTL: m.GetTtl().AsDuration(), Grace: m.GetGrace().AsDuration()}
		if o.LoadTimeout < 0 || o.TTL < 0 || o.Grace < 0 || o.Grace > validate.MaxGrace {
			return nil, &validate.Error{Field: f, Rule: fmt.Sprintf("durations must not be negative, grace at most %v", validate.MaxGrace)}
		}
		out = append(out, o)
	}
	return out, nil
}

// workerExited forgets a worker its hive saw die, if the report is about the process the registry
// knows (same hive, PID and start time), fails a pending wait_ready with the reason, and makes the
// registry refuse that process's late beats.
func (q *Queen) workerExited(ctx context.Context, hiveID string, e *rbeev1.WorkerExit) {
	how := fmt.Sprintf("exit status %d", e.GetExitCode())
	if e.GetSignal() != "" {
		how = "killed by " + e.GetSignal()
	}
	cause := fmt.Errorf("worker process %d exited (%s); last output:\n%s", e.GetPid(), how, e.GetLogTail())
	w, ok := q.reg.Exited(hiveID, registry.Process{WorkerID: e.GetWorkerId(), PID: e.GetPid(), StartTime: e.GetProcessStartTime()}, cause)
	if !ok {
		return
	}
	narrate.Warn(ctx, "queen", "worker_exited", fmt.Sprintf("Worker %s exited on its own (%s)", w.ID, how),
		zap.String("worker_id", w.ID), zap.Int32("pid", e.GetPid()), zap.String("log_tail", e.GetLogTail()))
}
