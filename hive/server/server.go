// Package server is the hive's gRPC edge: it checks HiveService requests, calls the process core,
// and turns its error kinds into status codes. It keeps no list of workers.
package server

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/hive/catalog"
	"github.com/rbee-dev/rbee/hive/devices"
	"github.com/rbee-dev/rbee/hive/process"
	"github.com/rbee-dev/rbee/internal/auth"
	"github.com/rbee-dev/rbee/internal/hiveclock"
	"github.com/rbee-dev/rbee/internal/jobid"
	"github.com/rbee-dev/rbee/internal/narrate"
	"github.com/rbee-dev/rbee/internal/validate"
)

// Processes is what the hive's edge needs of the process core.
type Processes interface {
	Spawn(ctx context.Context, s process.SpawnSpec) (process.Spawned, error)
	Delete(ctx context.Context, t process.Target, grace time.Duration) (process.Outcome, error)
	Logs(ctx context.Context, workerID string, tailLines int, follow bool, send func([]byte) error) error
}

// Config configures the hive's service.
type Config struct {
	HiveID string
	// Queen is the address workers report to when a Spawn names none.
	Queen string
	// Grace is the default grace period of Delete.
	Grace time.Duration
	// WorkerEnv is added to every worker's environment (credentials, TLS settings).
	WorkerEnv []string
	// WorkerAddress is the host other machines reach workers' ports at (the hive's --worker-host),
	// returned in every SpawnResponse; "" for the hive's own host.
	WorkerAddress string
	// Registerer receives the hive's metrics, and Live counts its worker processes for them;
	// nil keeps them unexported.
	Registerer prometheus.Registerer
	Live       func() int
	// Devices, when set, is what the hive has: a Spawn on any other device is refused.
	Devices DeviceSet

	// Catalog, when set, is the only models this hive serves, each started through Shim
	// (worker-shim) with the server's command line from the catalog; nil: any model, with the
	// process core's worker binary.
	Catalog *catalog.Catalog
	Shim    string
	// WorkerHost is the host servers bind (${HOST}, the hive's --worker-host); "" means 127.0.0.1.
	WorkerHost string
	// Clock is the clock the hive's heartbeats report, in which the queen bounds each Spawn and
	// Delete (not_after); nil takes no bound into account.
	Clock *hiveclock.Clock
}

// DeviceSet is what the edge needs of the hive's device inventory.
type DeviceSet interface {
	Has(name string) bool
	Names() []string
}

// Hive implements HiveService.
type Hive struct {
	rbeev1.UnimplementedHiveServiceServer
	cfg     Config
	procs   Processes
	metrics *metrics
	// draining ends with Drain: log follows stop, so that shutdown does not wait for them.
	draining      context.Context
	stopFollowing context.CancelFunc
	// fence is the highest fencing token (the leading queen's election revision) seen on a Spawn
	// or Delete. Kept in memory only: a restarted hive starts at 0 and takes the next leader's
	// token as its floor, so for that moment a deposed leader's late call could still pass; its
	// Delete still names a proven PID, so at worst it stops the worker it was asked to.
	fence atomic.Uint64
}

// New returns the hive's service over procs.
func New(cfg Config, procs Processes) *Hive {
	h := &Hive{cfg: cfg, procs: procs, metrics: newMetrics(cfg.Registerer, cfg.Live)}
	h.draining, h.stopFollowing = context.WithCancel(context.Background())
	return h
}

// Drain ends the Logs streams in progress (with UNAVAILABLE) so that a graceful stop is not held
// up by operators following logs; the server calls it when shutting down.
func (h *Hive) Drain() { h.stopFollowing() }

func invalid(err error) error { return status.Error(codes.InvalidArgument, err.Error()) }

// fenced refuses a call from a queen that is no longer the leader: its token is lower than one
// this hive has already seen from a newer leader. Token 0 (a queen without election) is never
// fenced. A higher token raises the floor.
func (h *Hive) fenced(ctx context.Context, op string, token uint64) error {
	if token == 0 {
		return nil
	}
	for {
		seen := h.fence.Load()
		if token < seen {
			narrate.Warn(ctx, "hive", "queen_fenced", fmt.Sprintf("Refused a %s from a deposed queen (fencing token %d, a newer leader sent %d)", op, token, seen),
				zap.Uint64("fencing_token", token), zap.Uint64("highest_fencing_token", seen))
			if op == "spawn" {
				h.metrics.spawns.WithLabelValues("fenced").Inc()
			} else {
				h.metrics.refusals.WithLabelValues("fenced").Inc()
			}
			return status.Errorf(codes.FailedPrecondition, "fenced: this %s carries fencing token %d, but a newer leading queen sent %d; the sender is no longer the leader", op, token, seen)
		}
		if token == seen || h.fence.CompareAndSwap(seen, token) {
			return nil
		}
	}
}

// inTime refuses a request that reaches the hive once its clock has passed the queen's bound for
// it (not_after): a request the network held up (in a router, or in the queen's own neighbour
// table while the hive's address did not resolve) may arrive after the queen told its caller it
// failed, and with a fresh gRPC deadline, since gRPC sends deadlines as durations. The returned
// context carries the same check for the process core, which makes it again right before it forks
// or signals. A request without a bound (a queen that never had a heartbeat from this hive) passes.
func (h *Hive) inTime(ctx context.Context, op, workerID string, na *rbeev1.HiveClock) (context.Context, error) {
	if na == nil || h.cfg.Clock == nil {
		return ctx, nil
	}
	refused := func(reason string, err error) {
		narrate.Warn(ctx, "hive", "worker_"+op+"_late", fmt.Sprintf("Refused a %s of worker %s: %v; nothing was done", op, workerID, err),
			zap.String("worker_id", workerID), zap.String("reason", reason))
		if op == "spawn" {
			h.metrics.spawns.WithLabelValues(reason).Inc()
		} else {
			h.metrics.refusals.WithLabelValues(reason).Inc()
		}
	}
	if na.GetInstance() != h.cfg.Clock.Instance() {
		err := fmt.Errorf("it is bounded in the clock of another process of this hive (instance %x; this one is %x): the hive restarted since the queen last heard from it",
			na.GetInstance(), h.cfg.Clock.Instance())
		refused("other_clock", err)
		return ctx, status.Errorf(codes.FailedPrecondition, "%s of worker %s refused: %v; nothing was done: retry once the hive has sent a heartbeat", op, workerID, err)
	}
	bound := na.GetReading().AsDuration()
	late := func() error {
		if now := h.cfg.Clock.Now(); now >= bound {
			return fmt.Errorf("it came %v after the queen's bound for starting it", (now - bound).Round(time.Millisecond))
		}
		return nil
	}
	if err := late(); err != nil {
		refused("late", err)
		return ctx, status.Errorf(codes.Aborted, "%s of worker %s refused: %v (held up in the network; the queen may have told its caller it failed); nothing was done", op, workerID, err)
	}
	return process.WithStartCheck(ctx, late), nil
}

// Spawn starts a worker process and answers its PID, port and start time.
func (h *Hive) Spawn(ctx context.Context, req *rbeev1.SpawnRequest) (*rbeev1.SpawnResponse, error) {
	ctx, err := h.inTime(ctx, "spawn", req.GetWorkerId(), req.GetNotAfter())
	if err != nil {
		return nil, err
	}
	if err := h.fenced(ctx, "spawn", req.GetFencingToken()); err != nil {
		return nil, err
	}
	if err := validate.ID("worker_id", req.GetWorkerId()); err != nil {
		return nil, invalid(err)
	}
	if err := validate.Model("model", req.GetModel()); err != nil {
		return nil, invalid(err)
	}
	device, err := validate.DeviceOrCPU("device", req.GetDevice())
	if err != nil {
		return nil, invalid(err)
	}
	queen := req.GetQueenAddress()
	if queen == "" {
		queen = h.cfg.Queen
	} else if err := validate.Address("queen_address", queen); err != nil {
		return nil, invalid(err)
	}
	if err := checkToken("worker_token", req.GetWorkerToken()); err != nil {
		return nil, invalid(err)
	}
	if h.cfg.Devices != nil && !h.cfg.Devices.Has(device) {
		return nil, status.Errorf(codes.FailedPrecondition, "hive %s has no device %s (it has: %s)",
			h.cfg.HiveID, device, strings.Join(h.cfg.Devices.Names(), ", "))
	}
	// Every worker sees only its own device (and a cpu worker no GPU): see devices.VisibleEnv.
	env := append(slices.Clip(h.cfg.WorkerEnv), devices.VisibleEnv(device)...)
	if tok := req.GetWorkerToken(); tok != "" {
		env = append(env, auth.EnvWorkerToken+"="+tok)
	}
	// The process core names the worker (worker_id, pid) in each of its own lines; putting it on
	// the context's logger too would repeat the keys in every JSON line.
	spec := process.SpawnSpec{
		WorkerID: req.GetWorkerId(), HiveID: h.cfg.HiveID, Model: req.GetModel(), Device: device,
		QueenAddress: queen, Env: env, JobID: jobid.FromContext(ctx),
	}
	if h.cfg.Catalog != nil {
		m, ok := h.cfg.Catalog.Lookup(req.GetModel())
		if !ok {
			return nil, status.Errorf(codes.FailedPrecondition, "model %q is not in hive %s's catalog (%s offers: %s)",
				req.GetModel(), h.cfg.HiveID, h.cfg.Catalog.Path, strings.Join(h.cfg.Catalog.Names(), ", "))
		}
		if !m.AllowsDevice(device) {
			return nil, status.Errorf(codes.FailedPrecondition, "model %q may not run on %s on hive %s (catalog devices: %s)",
				req.GetModel(), device, h.cfg.HiveID, strings.Join(m.Devices, ", "))
		}
		spec.Binary, spec.OwnPort = h.cfg.Shim, true
		spec.Extra = h.shimArgs(m, req.GetWorkerId(), device)
	}
	sp, err := h.procs.Spawn(ctx, spec)
	if err != nil {
		h.metrics.spawns.WithLabelValues(reason(err)).Inc()
		narrate.Warn(ctx, "hive", "worker_spawn_failed", "Could not spawn the worker", zap.String("worker_id", req.GetWorkerId()), zap.Error(err))
		return nil, toStatus(err)
	}
	h.metrics.spawns.WithLabelValues("ok").Inc()
	return &rbeev1.SpawnResponse{Pid: int32(sp.PID), Port: uint32(sp.Port), ProcessStartTime: sp.StartTime, Address: h.cfg.WorkerAddress}, nil
}

// shimArgs returns what worker-shim needs beyond the worker contract for catalog model m, and the
// server's environment, once the process core has chosen the port.
func (h *Hive) shimArgs(m *catalog.Model, workerID, device string) func(port int) ([]string, []string) {
	return func(port int) ([]string, []string) {
		v := catalog.Vars{Port: port, Model: m.Name, WorkerID: workerID, Device: device,
			DeviceIndex: devices.Index(device), Host: h.cfg.WorkerHost}
		grace := m.Grace
		if grace == 0 {
			grace = h.cfg.Grace
		}
		args := []string{"--health", m.Health, "--load-timeout", m.LoadTimeout.String(),
			"--unhealthy-timeout", m.UnhealthyTimeout.String(), "--grace", grace.String(),
			"--concurrency", strconv.FormatUint(uint64(m.Concurrency), 10), "--"}
		// The device's visibility variable is in every worker's environment already; the
		// catalog's env comes after it, so it can override it.
		return append(args, m.Command(v)...), m.Environ(v)
	}
}

// Delete stops the named worker's process after proving the PID is that worker.
func (h *Hive) Delete(ctx context.Context, req *rbeev1.DeleteRequest) (*rbeev1.DeleteResponse, error) {
	ctx, err := h.inTime(ctx, "delete", req.GetWorkerId(), req.GetNotAfter())
	if err != nil {
		return nil, err
	}
	if err := h.fenced(ctx, "delete", req.GetFencingToken()); err != nil {
		return nil, err
	}
	if err := validate.ID("worker_id", req.GetWorkerId()); err != nil {
		return nil, invalid(err)
	}
	grace, set, err := validate.Grace("grace_period", req.GetGracePeriod())
	if err != nil {
		return nil, invalid(err)
	}
	if !set {
		grace = h.cfg.Grace
	}
	pid := req.GetPid()
	named := []zap.Field{zap.String("worker_id", req.GetWorkerId()), zap.Int32("pid", pid)} // for the edge's own lines only, as in Spawn
	narrate.Event(ctx, "hive", "worker_delete_start", fmt.Sprintf("Deleting worker %s (PID %d, grace %v)", req.GetWorkerId(), pid, grace), append(named, zap.Duration("grace", grace))...)
	out, err := h.procs.Delete(ctx, process.Target{WorkerID: req.GetWorkerId(), PID: int(pid), StartTime: req.GetProcessStartTime()}, grace)
	if err != nil {
		h.metrics.refusals.WithLabelValues(reason(err)).Inc()
		narrate.Warn(ctx, "hive", "worker_delete_refused", "Delete failed", append(named, zap.Error(err))...)
		return nil, toStatus(err)
	}
	h.metrics.deletes.WithLabelValues(outcomeLabel(out)).Inc()
	o := outcomeToProto(out)
	narrate.Event(ctx, "hive", "worker_delete_complete", fmt.Sprintf("Worker %s deleted: %s", req.GetWorkerId(), o), append(named, zap.Stringer("outcome", o))...)
	return &rbeev1.DeleteResponse{Outcome: o}, nil
}

// Logs streams a worker's captured output: its last tail_lines lines, then with follow what it
// writes next, until the caller cancels or the worker's processes are gone and the log is drained.
func (h *Hive) Logs(req *rbeev1.LogsRequest, stream rbeev1.HiveService_LogsServer) error {
	if err := validate.ID("worker_id", req.GetWorkerId()); err != nil {
		return invalid(err)
	}
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	defer context.AfterFunc(h.draining, cancel)()
	err := h.procs.Logs(ctx, req.GetWorkerId(), int(req.GetTailLines()), req.GetFollow(), func(b []byte) error {
		return stream.Send(&rbeev1.LogsResponse{Data: b})
	})
	if h.draining.Err() != nil {
		return status.Error(codes.Unavailable, "hive shutting down")
	}
	if err != nil {
		if ctx.Err() != nil {
			return status.FromContextError(ctx.Err()).Err()
		}
		if _, ok := status.FromError(err); ok && process.KindOf(err) == process.KindInternal {
			return err // the stream's own error (the caller went away)
		}
		return toStatus(err)
	}
	return nil
}

// maxTokenLen bounds worker_token; the queen's tokens are far shorter.
const maxTokenLen = 1024

// checkToken accepts an empty token or one that can travel where the worker puts it: in its
// environment (no NUL) and in an HTTP/2 authorization header (visible ASCII only).
func checkToken(field, tok string) error {
	if len(tok) > maxTokenLen {
		return &validate.Error{Field: field, Rule: fmt.Sprintf("%d bytes is over the %d maximum", len(tok), maxTokenLen)}
	}
	for i := 0; i < len(tok); i++ {
		if c := tok[i]; c < 0x21 || c > 0x7e {
			return &validate.Error{Field: field, Rule: fmt.Sprintf("byte %d is %#02x; want visible ASCII only", i, c)}
		}
	}
	return nil
}

func outcomeToProto(o process.Outcome) rbeev1.DeleteOutcome {
	switch o {
	case process.Exited:
		return rbeev1.DeleteOutcome_DELETE_OUTCOME_EXITED
	case process.Killed:
		return rbeev1.DeleteOutcome_DELETE_OUTCOME_KILLED
	case process.AlreadyExited:
		return rbeev1.DeleteOutcome_DELETE_OUTCOME_ALREADY_EXITED
	}
	return rbeev1.DeleteOutcome_DELETE_OUTCOME_UNSPECIFIED
}

// toStatus maps the process core's error kinds to gRPC codes, in this one place.
func toStatus(err error) error {
	var code codes.Code
	switch process.KindOf(err) {
	case process.KindInvalid:
		code = codes.InvalidArgument
	case process.KindNotWorker, process.KindBinary:
		code = codes.FailedPrecondition
	case process.KindExhausted:
		code = codes.ResourceExhausted
	case process.KindUnsupported:
		code = codes.Unimplemented
	case process.KindNotFound:
		code = codes.NotFound
	case process.KindLate:
		code = codes.Aborted
	default:
		code = codes.Internal
		if errors.Is(err, context.DeadlineExceeded) {
			code = codes.DeadlineExceeded
		} else if errors.Is(err, context.Canceled) {
			code = codes.Canceled
		}
	}
	return status.Error(code, err.Error())
}
