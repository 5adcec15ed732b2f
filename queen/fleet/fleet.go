// Package fleet is the queen's fleet operations: starting a worker (check the request, pick a
// hive, reserve the id, ask the hive, wait for READY, clean up what is not kept) and stopping one
// through its hive with its proven PID. The gRPC edge (queen/server) and the inference router call
// the same operations; each maps the fleet's error kinds to its own answers.
package fleet

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/peer"
	"google.golang.org/protobuf/types/known/durationpb"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/auth"
	"github.com/rbee-dev/rbee/internal/narrate"
	"github.com/rbee-dev/rbee/internal/validate"
	"github.com/rbee-dev/rbee/queen/registry"
)

// Config configures the fleet operations.
type Config struct {
	Registry *registry.Registry
	Hives    HiveDialer
	// Advertise is the address workers should report to, passed to hives on Spawn; "" lets each
	// hive use its own --queen.
	Advertise string
	// StartTimeout bounds a spawn's wait for READY when the spec gives no bound of its own.
	StartTimeout time.Duration
	// Token is the cluster token; workers' own tokens are derived from it. "" runs without.
	Token string
	// Fence, when set (several queens on etcd), is asked right before every hive call: it gives
	// the leader's fencing token (its election revision), which the hive checks against the
	// highest it has seen, or an error when this queen does not lead (then no call is made).
	// nil: a queen alone, token 0.
	Fence func() (uint64, error)
	// Registerer receives the fleet's metrics; nil keeps them unexported.
	Registerer prometheus.Registerer
	Logger     *zap.Logger
}

// Fleet runs spawn and delete against the hives, keeping the registry in step.
type Fleet struct {
	cfg     Config
	reg     *registry.Registry
	metrics *metrics
	// beforeDelete, set by whoever routes requests to workers, drains a worker before Delete
	// signals it; the func it returns undoes that when the delete fails.
	beforeDelete atomic.Pointer[func(workerID string) (undo func())]
}

// BeforeDelete registers fn, called by Delete before it asks the hive to stop a worker, so that
// whoever sends the worker requests (the inference router) stops sending new ones and the grace
// period is left to those in flight. fn's result is called if the delete then fails (the worker
// keeps serving). nil unregisters. The fleet knows nothing of routing beyond this call.
func (f *Fleet) BeforeDelete(fn func(workerID string) (undo func())) {
	if fn == nil {
		f.beforeDelete.Store(nil)
		return
	}
	f.beforeDelete.Store(&fn)
}

// New returns the fleet operations over cfg.Registry and cfg.Hives.
func New(cfg Config) *Fleet {
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	return &Fleet{cfg: cfg, reg: cfg.Registry, metrics: newMetrics(cfg.Registerer)}
}

// hiveSpawnTimeout bounds a hive's Spawn, which only forks and execs.
const hiveSpawnTimeout = 30 * time.Second

// hiveDeleteSlack is how much longer than the grace period the queen waits for a hive's Delete.
const hiveDeleteSlack = 15 * time.Second

// hiveStartWindow is how long after the queen sends a Spawn or Delete the hive may still start it.
// The request carries that bound in the hive's own clock (not_after), and the hive refuses what
// reaches it later: a request held up in the network, or in a queue of either host, must not start
// a process or signal one once the caller may have been told the call failed. A call that fails
// while its request may still be on its way answers only once this window is over (see
// abandonUnanswered).
const hiveStartWindow = 5 * time.Second

// clockRateSlack is how far apart the rates of the queen's and a hive's clocks may be (monotonic
// clocks, each slewed by NTP by at most 500 ppm, plus crystal error); the bound is shortened by it.
const clockRateSlack = 0.002

// loadTimeoutSlack is how much longer than a catalog model's load_timeout and grace a spawn waits
// for READY, so that the supervisor's own verdict (with its reason) arrives first.
const loadTimeoutSlack = 10 * time.Second

// SpawnSpec is what a caller asks of a spawn; empty fields take their defaults.
type SpawnSpec struct {
	HiveID   string // "": the queen picks a hive
	Model    string // required
	Device   string // "": cpu
	WorkerID string // "": the queen makes one
	// WaitReady returns only once the worker is READY (or BUSY); if it is not within
	// ReadyTimeout (0: the fleet's StartTimeout) it is stopped and removed.
	WaitReady    bool
	ReadyTimeout time.Duration
}

// Spawn starts a worker and returns it as the registry knows it: STARTING, or READY with
// WaitReady. On any failure nothing is left behind: no registry entry, no process.
func (f *Fleet) Spawn(ctx context.Context, spec SpawnSpec) (registry.Worker, error) {
	t0 := time.Now()
	if err := validate.Model("model", spec.Model); err != nil {
		return registry.Worker{}, &Error{Kind: KindInvalid, Msg: err.Error(), Err: err}
	}
	device, err := validate.DeviceOrCPU("device", spec.Device)
	if err != nil {
		return registry.Worker{}, &Error{Kind: KindInvalid, Msg: err.Error(), Err: err}
	}
	id := spec.WorkerID
	if id == "" {
		id = newWorkerID()
	} else if err := validate.ID("worker_id", id); err != nil {
		return registry.Worker{}, &Error{Kind: KindInvalid, Msg: err.Error(), Err: err}
	}
	spec.Device = device // placement by catalog asks about the device the worker will get
	hive, err := f.pickHive(ctx, spec)
	if err != nil {
		return registry.Worker{}, err
	}
	ctx = narrate.WithLogger(ctx, narrate.Logger(ctx).With(zap.String("worker_id", id), zap.String("hive_id", hive.ID)))
	narrate.Event(ctx, "queen", "worker_spawn_start", fmt.Sprintf("Spawning worker %s for model %q on %s, hive %s", id, spec.Model, device, hive.ID),
		zap.String("model", spec.Model), zap.String("device", device))

	if err := f.reg.Reserve(registry.Worker{ID: id, HiveID: hive.ID, Model: spec.Model, Device: device}); err != nil {
		if errors.Is(err, registry.ErrExists) {
			return registry.Worker{}, errorf(KindExists, "worker %q already exists", id)
		}
		return registry.Worker{}, &Error{Kind: KindInternal, Msg: fmt.Sprintf("reserving worker %q: %v", id, err), Err: err}
	}
	hc, err := f.cfg.Hives.Hive(hive.Address)
	if err != nil {
		f.reg.Remove(id, err)
		return registry.Worker{}, &Error{Kind: KindUnavailable, Msg: fmt.Sprintf("hive %s at %s: %v", hive.ID, hive.Address, err), Err: err,
			Unreachable: &HiveRef{hive.ID, hive.Address}}
	}
	token, err := f.fence()
	if err != nil {
		f.reg.Remove(id, err)
		return registry.Worker{}, err
	}
	// The hive call is not cut short when the caller goes away: a spawn either returns a
	// registered worker or leaves nothing behind, never a process the queen half knows.
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), hiveSpawnTimeout)
	defer cancel()
	b, err := f.startBound(sctx, hive)
	if err != nil {
		f.reg.Remove(id, err)
		return registry.Worker{}, err
	}
	sreq := &rbeev1.SpawnRequest{WorkerId: id, Model: spec.Model, Device: device, QueenAddress: f.cfg.Advertise, FencingToken: token, NotAfter: b.notAfter}
	if f.cfg.Token != "" {
		sreq.WorkerToken = auth.WorkerToken(f.cfg.Token, id)
	}
	var sent peer.Peer
	resp, err := hc.Spawn(sctx, sreq, grpc.Peer(&sent))
	if err != nil {
		f.metrics.spawned("error", t0)
		herr := f.abandonUnanswered(hive, hiveError(hive.ID, hive.Address, "spawn", err), b, sent.Addr != nil)
		f.reg.Remove(id, err)
		narrate.Warn(ctx, "queen", "worker_spawn_failed", "Hive could not spawn the worker", zap.Error(err))
		return registry.Worker{}, herr
	}
	w, err := f.reg.Started(id, resp.GetPid(), resp.GetPort(), resp.GetProcessStartTime(), resp.GetAddress())
	if err != nil {
		// Removed while the hive was starting it (deleted, or reported dead): do not leave the
		// process behind.
		f.cleanup(ctx, hive, id, resp.GetPid(), resp.GetProcessStartTime())
		f.metrics.spawned("error", t0)
		return registry.Worker{}, &Error{Kind: KindAborted, Msg: fmt.Sprintf("worker %s went away while it was being spawned: %v", id, err), Err: err}
	}
	narrate.Event(ctx, "queen", "worker_spawned", fmt.Sprintf("Worker %s spawned on hive %s (PID %d, port %d)", id, hive.ID, w.PID, w.Port),
		zap.Int32("pid", w.PID), zap.Uint32("port", w.Port))
	if !spec.WaitReady {
		f.metrics.spawned("returned", t0)
		return w, nil
	}

	timeout := spec.ReadyTimeout
	if timeout <= 0 {
		timeout = f.cfg.StartTimeout
		// A catalog model may load for longer: its supervisor stops it past load_timeout and
		// that exit answers the spawn with the reason, so the wait outlasts it.
		if o, _ := hive.Offer(spec.Model); o.LoadTimeout > 0 {
			timeout = max(timeout, o.LoadTimeout+o.Grace+loadTimeoutSlack)
		}
	}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	w, err = f.reg.Await(wctx, id, func(w registry.Worker) bool {
		return w.State == registry.StateReady || w.State == registry.StateBusy
	})
	if err == nil {
		f.metrics.spawned("ready", t0)
		narrate.Event(ctx, "queen", "worker_ready", fmt.Sprintf("Worker %s is READY", id))
		return w, nil
	}
	if errors.Is(err, registry.ErrNotFound) {
		f.metrics.spawned("exited", t0)
		narrate.Warn(ctx, "queen", "worker_spawn_failed", "Worker went away before it was READY", zap.Error(err))
		return registry.Worker{}, &Error{Kind: KindAborted, Msg: fmt.Sprintf("worker %s did not become READY: %v", id, err), Err: err}
	}
	// Not ready in time (or the caller gave up): remove the half-started worker so nothing leaks.
	f.reg.Remove(id, err)
	f.cleanup(ctx, hive, id, w.PID, w.ProcessStartTime)
	if errors.Is(ctx.Err(), context.Canceled) {
		f.metrics.spawned("canceled", t0)
		narrate.Warn(ctx, "queen", "worker_spawn_canceled", "Caller gave up before the worker was READY; removed it")
		return registry.Worker{}, errorf(KindCanceled, "spawn of worker %s cancelled by the caller; it was stopped and removed", id)
	}
	f.metrics.spawned("timeout", t0)
	narrate.Warn(ctx, "queen", "worker_spawn_timeout", "Worker not READY in time; removed it", zap.Duration("start_timeout", timeout))
	return registry.Worker{}, errorf(KindDeadline, "worker %s was not READY within %v; it was stopped and removed", id, timeout)
}

// awaitHold waits a little while the registry is held after a takeover, when a hive that is not
// known yet is only not back yet; false once the hold is over (or ctx ends), the answer then final.
func (f *Fleet) awaitHold(ctx context.Context) bool {
	if !f.reg.Holding(time.Now()) {
		return false
	}
	select {
	case <-ctx.Done():
		return false
	case <-time.After(50 * time.Millisecond):
		return true
	}
}

// pickHive is the spec's hive (which answers for its own room), or the least-loaded live one that
// has room for the worker.
func (f *Fleet) pickHive(ctx context.Context, spec SpawnSpec) (registry.Hive, error) {
	if hid := spec.HiveID; hid != "" {
		if err := validate.ID("hive_id", hid); err != nil {
			return registry.Hive{}, &Error{Kind: KindInvalid, Msg: err.Error(), Err: err}
		}
		h, ok := f.reg.GetHive(hid)
		for !ok && f.awaitHold(ctx) {
			h, ok = f.reg.GetHive(hid)
		}
		if !ok {
			return registry.Hive{}, errorf(KindNotFound, "hive %q is not known to this queen (see ListHives)", hid)
		}
		if _, ok := h.Offer(spec.Model); !ok {
			return registry.Hive{}, errorf(KindFailedPrecondition, "hive %s does not offer model %q (its catalog: %s)",
				hid, spec.Model, strings.Join(h.ModelNames(), ", "))
		}
		return h, nil
	}
	h, err := f.reg.PickHive(f.need(spec))
	var nf *registry.NoFitError
	for err != nil && !errors.As(err, &nf) && f.awaitHold(ctx) {
		h, err = f.reg.PickHive(f.need(spec))
	}
	if errors.As(err, &nf) {
		if e := f.notOffered(spec); e != nil {
			return registry.Hive{}, e
		}
	}
	switch {
	case errors.As(err, &nf):
		return registry.Hive{}, &Error{Kind: KindResourceExhausted, Msg: nf.Error() + ": wait for workers to go, delete some, or start another hive", Err: err}
	case err != nil:
		return registry.Hive{}, &Error{Kind: KindUnavailable, Msg: "no live hive to spawn on: start a hive, or give the queen --hive ID=HOST:PORT", Err: err}
	}
	return h, nil
}

// need is what spec asks of the hive the queen picks. Room for one more worker is always asked;
// what the model and device require of a hive (the model catalog) goes in Need.Fits.
func (f *Fleet) need(spec SpawnSpec) registry.Need {
	return registry.Need{Fits: func(h registry.Hive) (bool, string) {
		o, ok := h.Offer(spec.Model)
		switch {
		case !ok:
			return false, fmt.Sprintf("its catalog does not offer model %q (offers %s)", spec.Model, strings.Join(h.ModelNames(), ", "))
		case !o.AllowsDevice(spec.Device):
			return false, fmt.Sprintf("its catalog offers %s on %s only", spec.Model, strings.Join(o.Devices, ", "))
		}
		return true, ""
	}}
}

// notOffered is the FAILED_PRECONDITION for a model (on a device) that no live hive's catalog
// offers, room or not, naming each hive considered and what it offers; nil when some live hive
// offers it (the spawn then failed for room alone).
func (f *Fleet) notOffered(spec SpawnSpec) *Error {
	var considered []string
	for _, h := range f.reg.ListHives() {
		if h.State != registry.HiveReady {
			considered = append(considered, h.ID+" ("+strings.ToLower(h.State.String())+")")
			continue
		}
		o, ok := h.Offer(spec.Model)
		switch {
		case !ok:
			considered = append(considered, h.ID+" (offers "+strings.Join(h.ModelNames(), ", ")+")")
		case !o.AllowsDevice(spec.Device):
			considered = append(considered, h.ID+" (offers "+spec.Model+" on "+strings.Join(o.Devices, ", ")+" only)")
		default:
			return nil
		}
	}
	what := fmt.Sprintf("model %q", spec.Model)
	if spec.Device != "" {
		what += " on " + spec.Device
	}
	return errorf(KindFailedPrecondition, "no live hive offers %s (hives considered: %s)", what, strings.Join(considered, "; "))
}

// cleanup kills a worker the caller will not keep, on a context of its own: the call that wanted
// the worker may already be cancelled, but the process must not outlive it.
func (f *Fleet) cleanup(ctx context.Context, hive registry.Hive, id string, pid int32, start uint64) {
	if pid <= 1 {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), hiveDeleteSlack)
	defer cancel()
	hc, err := f.cfg.Hives.Hive(hive.Address)
	var token uint64
	if err == nil {
		token, err = f.fence()
	}
	if err == nil {
		var b bound
		if b, err = f.startBound(ctx, hive); err == nil {
			_, err = hc.Delete(ctx, &rbeev1.DeleteRequest{WorkerId: id, Pid: pid, ProcessStartTime: start, GracePeriod: durationpb.New(0), FencingToken: token,
				NotAfter: b.notAfter})
		}
	}
	if err != nil {
		narrate.Warn(ctx, "queen", "worker_cleanup_failed", "Could not stop a worker that was not kept", zap.Error(err))
	}
}

// fence returns the token for a hive call, or the refusal to make one: a queen that does not lead
// must not touch a process.
func (f *Fleet) fence() (uint64, error) {
	if f.cfg.Fence == nil {
		return 0, nil
	}
	token, err := f.cfg.Fence()
	if err != nil {
		return 0, &Error{Kind: KindUnavailable, Msg: fmt.Sprintf("no hive call made: %v", err), Err: err}
	}
	return token, nil
}

func newWorkerID() string {
	var b [5]byte
	_, _ = rand.Read(b[:])
	return "w-" + hex.EncodeToString(b[:])
}

// Deleted is how a worker left.
type Deleted struct {
	Outcome rbeev1.DeleteOutcome
	// Worker is the worker as it was last known.
	Worker registry.Worker
}

// Delete stops a worker through its hive, which proves the PID before any signal, and forgets it
// once its process is gone. grace < 0 leaves the grace period to the hive's default.
func (f *Fleet) Delete(ctx context.Context, id string, grace time.Duration) (_ Deleted, err error) {
	if err := validate.ID("worker_id", id); err != nil {
		return Deleted{}, &Error{Kind: KindInvalid, Msg: err.Error(), Err: err}
	}
	w, ok := f.reg.Get(id)
	if !ok {
		return Deleted{}, errorf(KindNotFound, "worker %q is not known", id)
	}
	if w.PID <= 1 {
		return Deleted{}, errorf(KindFailedPrecondition, "worker %s has no process yet (its spawn is in progress); retry", id)
	}
	hive, err := f.hiveActingFor(w)
	if err != nil {
		return Deleted{}, err
	}
	if hive.State == registry.HiveStale {
		// Cut off or down: a call would hang until its deadline. Say so now; nothing was sent, so
		// a retry once the hive beats again stops the worker exactly once.
		return Deleted{}, &Error{Kind: KindUnavailable, Unreachable: &HiveRef{hive.ID, hive.Address},
			Msg: fmt.Sprintf("hive %s of worker %s sends no heartbeat (STALE; its last one was %v ago): it is down or cut off from this queen; nothing was sent, retry once it is back",
				hive.ID, id, time.Since(hive.LastHeartbeat).Round(time.Second))}
	}
	ctx = narrate.WithLogger(ctx, narrate.Logger(ctx).With(zap.String("worker_id", id), zap.String("hive_id", hive.ID)))
	if hive.ID != w.HiveID {
		narrate.Event(ctx, "queen", "worker_delete_other_hive", fmt.Sprintf("Hive %s of worker %s is gone; hive %s on the same machine acts for it", w.HiveID, id, hive.ID),
			zap.String("worker_hive_id", w.HiveID), zap.String("address", hive.Address))
	}
	narrate.Event(ctx, "queen", "worker_delete_start", fmt.Sprintf("Deleting worker %s (PID %d) on hive %s", id, w.PID, hive.ID), zap.Int32("pid", w.PID))
	hc, err := f.cfg.Hives.Hive(hive.Address)
	if err != nil {
		return Deleted{}, &Error{Kind: KindUnavailable, Msg: fmt.Sprintf("hive %s at %s: %v", hive.ID, hive.Address, err), Err: err,
			Unreachable: &HiveRef{hive.ID, hive.Address}}
	}
	token, err := f.fence()
	if err != nil {
		return Deleted{}, err
	}
	if fn := f.beforeDelete.Load(); fn != nil {
		// Drained first: the hive's SIGTERM then finds no new request on the way, and the grace
		// period belongs to the requests in flight.
		undo := (*fn)(id)
		defer func() {
			if err != nil { // not stopped: it serves again
				undo()
			}
		}()
	}
	dreq := &rbeev1.DeleteRequest{WorkerId: id, Pid: w.PID, ProcessStartTime: w.ProcessStartTime, FencingToken: token}
	timeout := validate.MaxGrace + hiveDeleteSlack
	if o, ok := hive.Offer(w.Model); grace < 0 && ok && o.Grace > 0 {
		grace = o.Grace // the catalog's grace for this model, as the hive reported it
	}
	if grace >= 0 {
		dreq.GracePeriod = durationpb.New(grace)
		timeout = grace + hiveDeleteSlack
	}
	dctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	b, err := f.startBound(dctx, hive)
	if err != nil {
		return Deleted{}, err
	}
	dreq.NotAfter = b.notAfter
	t0 := time.Now()
	var sent peer.Peer
	resp, err := hc.Delete(dctx, dreq, grpc.Peer(&sent))
	if err != nil {
		f.metrics.deleted("error", t0)
		herr := f.abandonUnanswered(hive, hiveError(hive.ID, hive.Address, "delete", err), b, sent.Addr != nil)
		narrate.Warn(ctx, "queen", "worker_delete_failed", "Hive did not delete the worker", zap.Error(err))
		return Deleted{}, herr
	}
	f.metrics.deleted(strings.ToLower(strings.TrimPrefix(resp.GetOutcome().String(), "DELETE_OUTCOME_")), t0)
	// The hive proved this process gone: forget it, and refuse a beat it sent before it died.
	if last, ok := f.reg.Exited(w.HiveID, registry.Process{WorkerID: id, PID: w.PID, StartTime: w.ProcessStartTime}, errors.New("deleted")); ok {
		w = last
	}
	narrate.Event(ctx, "queen", "worker_delete_complete", fmt.Sprintf("Worker %s deleted: %s", id, resp.GetOutcome()),
		zap.Stringer("outcome", resp.GetOutcome()))
	return Deleted{Outcome: resp.GetOutcome(), Worker: w}, nil
}

// hiveActingFor is the hive that can stop w's process: its own, or, when that one is no longer
// known (it stopped beating and expired, or came back under another id after a rename or a new
// --hive-id), a live hive on the same machine, which proves the PID as its own would: the hive now
// at the address the old one had, else the only hive on the host the worker reports as its
// address. Failing both, the error says what the operator can do.
func (f *Fleet) hiveActingFor(w registry.Worker) (registry.Hive, error) {
	if h, ok := f.reg.GetHive(w.HiveID); ok {
		return h, nil
	}
	former, known := f.reg.FormerHiveAddress(w.HiveID)
	if known {
		if h, ok := f.reg.HiveAt(former); ok {
			return h, nil
		}
	}
	if w.Address != "" {
		if hs := f.reg.HivesOnHost(w.Address); len(hs) == 1 {
			return hs[0], nil
		}
	}
	where := "on the machine it runs on"
	if known {
		where = "at " + former + " (its hive's last address)"
	} else if w.Address != "" {
		where = "on " + w.Address + " (the worker's address)"
	}
	return registry.Hive{}, errorf(KindFailedPrecondition,
		"hive %q of worker %s is not known to this queen any more, and no live hive is known %s; the worker's process (PID %d) may still run there: "+
			"start a hive %s (any --hive-id; the queen finds it by its address) and retry, or stop PID %d on that machine yourself",
		w.HiveID, w.ID, where, w.PID, where, w.PID)
}

// StartTimedOut stops a worker that never sent a heartbeat within the start timeout; the registry
// has already forgotten it. It returns once the hive has answered (or the call failed).
func (f *Fleet) StartTimedOut(w registry.Worker) {
	ctx := narrate.WithLogger(context.Background(), f.cfg.Logger.With(zap.String("worker_id", w.ID), zap.String("hive_id", w.HiveID)))
	narrate.Warn(ctx, "queen", "worker_start_timeout", fmt.Sprintf("Worker %s sent no heartbeat within the start timeout; stopping it", w.ID))
	if h, ok := f.reg.GetHive(w.HiveID); ok {
		f.cleanup(ctx, h, w.ID, w.PID, w.ProcessStartTime)
	}
}

// abandonUnanswered handles a hive call that went unanswered (UNAVAILABLE, deadline, cancelled):
// the request may still be on its way, held up by the network, and must never arrive and act
// (start a process, signal one) once the caller has been told it failed. The connection is reset,
// which discards what the queen's socket still holds. That is not enough: a segment already handed
// to the network stays there (a neighbour table waiting for the hive's address to resolve keeps the
// packets it queued after the socket is gone, and delivers them when the link returns), so the
// request carries its bound b in the hive's clock, past which the hive refuses it; when the call
// failed before that bound and its request may have left (sent: it had a connection), the answer
// waits until the bound is over, after which the hive can no longer start it.
func (f *Fleet) abandonUnanswered(hive registry.Hive, herr *Error, b bound, sent bool) *Error {
	if herr.Kind != KindUnavailable && herr.Kind != KindCanceled {
		return herr // the hive's own answer: it decided
	}
	if d, ok := f.cfg.Hives.(hiveDropper); ok {
		d.Drop(hive.Address)
	}
	if sent && !b.until.IsZero() {
		if d := time.Until(b.until); d > 0 {
			time.Sleep(d)
		}
	}
	return herr
}

// bound is a hive call's bound for the hive to start it: notAfter in the hive's clock, as sent;
// until by the queen's clock, from when on the hive can no longer start it. Both zero when the
// queen has no reading of the hive's clock (it never had a heartbeat from it with one).
type bound struct {
	notAfter *rbeev1.HiveClock
	until    time.Time
}

// hiveClockReadTimeout bounds reading the clock of a hive that sends no heartbeat with one.
const hiveClockReadTimeout = 5 * time.Second

// startBound bounds a call to hive made now under ctx: the hive may start it within
// hiveStartWindow, and never after ctx's deadline, when the caller is told it failed. The bound in
// the hive's clock comes from its newest heartbeat (or, for a hive that sends this queen none, a
// reading asked of it now): at Received its clock read at least Reading (the reading was taken
// before it arrived), so by until it reads at least Reading + (until - Received), less the rate
// slack. However long the network held the reading or holds the request, the hive's clock passes
// notAfter no later than the queen's passes until. The error, when a hive without a heartbeat
// reading does not answer, is UNAVAILABLE with nothing sent.
func (f *Fleet) startBound(ctx context.Context, hive registry.Hive) (bound, error) {
	c := hive.Clock
	if r, ok := f.cfg.Hives.(hiveClockReader); ok && c.Instance == 0 {
		rctx, cancel := context.WithTimeout(ctx, hiveClockReadTimeout)
		var err error
		c, err = r.ReadClock(rctx, hive.Address)
		cancel()
		if err != nil {
			return bound{}, &Error{Kind: KindUnavailable, Err: err, Unreachable: &HiveRef{hive.ID, hive.Address},
				Msg: fmt.Sprintf("hive %s at %s did not answer (%v); nothing was sent, retry once it is back", hive.ID, hive.Address, err)}
		}
	}
	if c.Instance == 0 {
		return bound{}, nil // a hive that reports no clock (older than it): unbounded, as before
	}
	until := time.Now().Add(hiveStartWindow)
	if dl, ok := ctx.Deadline(); ok && dl.Before(until) {
		until = dl
	}
	span := until.Sub(c.Received)
	span -= time.Duration(float64(span) * clockRateSlack)
	return bound{notAfter: &rbeev1.HiveClock{Instance: c.Instance, Reading: durationpb.New(c.Reading + span)}, until: until}, nil
}
