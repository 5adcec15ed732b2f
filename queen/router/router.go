// Package router decides where each inference request goes: among the READY workers of the
// requested model, the one with the fewest requests in flight, within the worker's concurrency;
// a bounded FIFO per model when none has room; a worker started on demand when the model has
// none, another when the queue waits too long, and idle workers stopped after their TTL.
//
// It learns workers from the registry through the same watch any client can use (Registry, an
// interface it defines) and starts and stops them through the queen's own spawn and delete paths
// (Spawner, Deleter), so it could run as a replica in front of a queen unchanged. It knows
// nothing of HTTP; queen/openai is its edge.
package router

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/rbee-dev/rbee/internal/jobid"
	"github.com/rbee-dev/rbee/internal/narrate"
)

// State is a worker's state as the router needs it.
type State uint8

const (
	StateOther State = iota
	StateStarting
	StateReady
	StateBusy // READY but at its concurrency: still the router's to count
	StateStopping
	StateStale
	StateUnhealthy
)

var stateNames = [...]string{"OTHER", "STARTING", "READY", "BUSY", "STOPPING", "STALE", "UNHEALTHY"}

func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("State(%d)", uint8(s))
}

// Worker is one worker as the router sees it.
type Worker struct {
	ID, HiveID, Model string
	State             State
	// URL is where the worker serves, "http://host:port".
	URL string
	// Concurrency is the requests it serves at once (its own report, else its hive's catalog);
	// 0: not limited.
	Concurrency int
	// TTL is the idle time after which it is stopped (0: never); Grace the grace period for that.
	TTL, Grace time.Duration
}

// EventType says what an Event reports.
type EventType uint8

const (
	EventAdded EventType = iota + 1
	EventUpdated
	EventRemoved
	// EventSynced: the snapshot is complete.
	EventSynced
	// EventReset: forget every worker; a fresh snapshot follows.
	EventReset
)

// Event is one item of the registry's watch.
type Event struct {
	Type   EventType
	Worker Worker
	Reason string
}

// Offer is a model a live hive can start.
type Offer struct {
	Model, HiveID string
	// LoadTimeout bounds how long a request waits for a worker started for it (0: the router's).
	LoadTimeout time.Duration
}

// Registry is what the router needs of the queen's registry.
type Registry interface {
	// Watch streams the workers: a snapshot, EventSynced, then every change, until ctx ends.
	Watch(ctx context.Context) <-chan Event
	// Offers lists the models live hives can start.
	Offers() []Offer
	// SetLoad shows the router's load on a worker (in-flight requests, and whether it is full).
	SetLoad(id string, inFlight int, full bool)
}

// Spawner starts a worker for a model through the queen's spawn path and returns its id at once;
// the router learns when it is READY from the watch.
type Spawner interface {
	Spawn(ctx context.Context, model string) (workerID string, err error)
}

// Deleter stops a worker through the queen's delete path.
type Deleter interface {
	Delete(ctx context.Context, workerID string, grace time.Duration) error
}

// Errors of Acquire. The edge maps them to status codes.
var (
	ErrUnknownModel = errors.New("no worker serves this model and no live hive offers it")
	ErrQueueFull    = errors.New("every worker of this model is busy and its queue is full")
	ErrQueueTimeout = errors.New("no worker of this model had room within the queue wait")
	ErrStartFailed  = errors.New("the worker started for this model did not become READY")
	ErrNoWorker     = errors.New("no worker of this model is serving and no live hive offers it")
	ErrClosed       = errors.New("the router is shutting down")
)

// Config tunes the router. Zero fields take the defaults named beside them.
type Config struct {
	QueueSize int           // requests waiting per model (100)
	QueueWait time.Duration // how long one may wait for a worker with room (30s)
	// StartTimeout bounds the wait for a worker started on demand when its offer names no load
	// timeout (the queen's --start-timeout, 30s).
	StartTimeout time.Duration
	// ScaleUpAfter starts another worker when a model's oldest queued request has waited this
	// long (0: never), up to MaxWorkers per model (4).
	ScaleUpAfter time.Duration
	MaxWorkers   int
	// WarmFloor is how many READY workers per model idle stops leave running (0).
	WarmFloor int
	// Tick is how often idle workers, scale-up and cooled-down workers are looked at (250ms).
	Tick time.Duration
	// BrokenFor keeps a worker that failed a request out of routing this long (30s), unless the
	// registry reports it changed meanwhile.
	BrokenFor time.Duration
	// LoadEvery coalesces SetLoad calls to at most one per worker per this interval (50ms).
	LoadEvery time.Duration
	Metrics   *Metrics
	Logger    *zap.Logger
}

func (c Config) withDefaults() Config {
	if c.QueueSize <= 0 {
		c.QueueSize = 100
	}
	if c.QueueWait <= 0 {
		c.QueueWait = 30 * time.Second
	}
	if c.StartTimeout <= 0 {
		c.StartTimeout = 30 * time.Second
	}
	if c.MaxWorkers <= 0 {
		c.MaxWorkers = 4
	}
	if c.Tick <= 0 {
		c.Tick = 250 * time.Millisecond
	}
	if c.BrokenFor <= 0 {
		c.BrokenFor = 30 * time.Second
	}
	if c.LoadEvery <= 0 {
		c.LoadEvery = 50 * time.Millisecond
	}
	if c.Metrics == nil {
		c.Metrics = NewMetrics(nil)
	}
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
	return c
}

// Router routes requests to workers. Create it with New, then Run it.
type Router struct {
	cfg Config
	reg Registry
	sp  Spawner
	del Deleter

	synced    chan struct{} // closed at the first EventSynced
	syncOnce  sync.Once
	loadDirty chan struct{} // cap 1: some worker's load needs publishing

	mu      sync.Mutex
	closed  bool
	workers map[string]*worker
	models  map[string]*model
	dirty   map[string]*worker // load to publish
	rng     *rand.Rand
	gen     uint64 // bumped at EventReset; workers not seen again in the snapshot are dropped
}

type worker struct {
	Worker
	m           *model
	gen         uint64
	inFlight    int
	idleSince   time.Time // when inFlight last fell to 0 (or it became READY)
	brokenUntil time.Time
	stopping    bool // being stopped (idle, or drained before a delete): no new requests
	gone        bool
	served      bool // it was READY or BUSY at some point: a failed load is not worth repeating
}

func (w *worker) routable(now time.Time) bool {
	return (w.State == StateReady || w.State == StateBusy) && !w.stopping && !w.gone && !now.Before(w.brokenUntil)
}

func (w *worker) hasRoom() bool { return w.Concurrency == 0 || w.inFlight < w.Concurrency }

// alive: serving or about to, not on its way out.
func (w *worker) alive() bool {
	return (w.State == StateStarting || w.State == StateReady || w.State == StateBusy) && !w.stopping && !w.gone
}

type model struct {
	name string
	// The model's gauges, looked up once rather than by label on every request.
	inFlight, queued prometheus.Gauge

	workers []*worker
	queue   []*waiter
	// spawning counts spawns asked for whose worker the watch has not shown yet.
	spawning int
	expect   map[string]bool // ids a spawn returned, not yet seen in the watch
}

type waiter struct {
	ctx     context.Context
	exclude string
	since   time.Time
	ch      chan grant // cap 1
	done    bool       // granted or given up, under Router.mu
}

type grant struct {
	w    *worker
	snap Worker
	err  error
}

// New returns a router over reg that starts workers with sp and stops them with del.
func New(cfg Config, reg Registry, sp Spawner, del Deleter) *Router {
	return &Router{
		cfg: cfg.withDefaults(), reg: reg, sp: sp, del: del,
		synced: make(chan struct{}), loadDirty: make(chan struct{}, 1),
		workers: map[string]*worker{}, models: map[string]*model{}, dirty: map[string]*worker{},
		rng: rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64())),
	}
}

// Run follows the registry and keeps time (idle stops, scale-up) until ctx ends, then fails
// every queued request with ErrClosed. Call it once.
func (r *Router) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Go(func() { r.publishLoad(ctx) })
	wg.Go(func() { r.tick(ctx) })
	for ev := range r.reg.Watch(ctx) {
		r.apply(ev)
	}
	r.Close()
	wg.Wait()
}

// Synced is closed once the router has seen the registry's first snapshot.
func (r *Router) Synced() <-chan struct{} { return r.synced }

// Close fails every queued request with ErrClosed and refuses new ones; requests in flight
// finish (the edge bounds them).
func (r *Router) Close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	r.closed = true
	for _, m := range r.models {
		for _, w := range m.queue {
			w.done = true
			w.ch <- grant{err: ErrClosed}
		}
		m.queue = nil
		m.queued.Set(0)
	}
}

// Lease is one request's hold on a worker. Release it exactly once, or Fail it.
type Lease struct {
	r    *Router
	w    *worker
	snap Worker // w.Worker when leased: the watch may change w meanwhile, under the router's lock
	once sync.Once
}

// Worker is the worker to send the request to, as it was when leased.
func (l *Lease) Worker() Worker { return l.snap }

// Release ends the request: its slot goes to the next queued request of the model.
func (l *Lease) Release() { l.once.Do(func() { l.r.release(l.w, nil) }) }

// Fail ends the request and keeps the worker out of routing (BrokenFor), because it could not be
// reached, did not answer, or broke off a response.
func (l *Lease) Fail(cause error) { l.once.Do(func() { l.r.release(l.w, cause) }) }

// Acquire returns a lease on the best worker of model, waiting in the model's queue (and
// starting a worker) if none has room. exclude names a worker not to use (a retry's first
// choice). The context carries the request's job id and logger for narration.
func (r *Router) Acquire(ctx context.Context, model, exclude string) (*Lease, error) {
	now := time.Now()
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil, ErrClosed
	}
	m := r.models[model]
	if m != nil {
		if w := r.pickLocked(m, exclude, now); w != nil {
			r.takeLocked(w)
			l := &Lease{r: r, w: w, snap: w.Worker}
			r.mu.Unlock()
			return l, nil
		}
	}
	offer, offered := r.offer(model)
	if !offered && (m == nil || len(m.workers) == 0) {
		r.mu.Unlock()
		return nil, fmt.Errorf("model %q: %w", model, ErrUnknownModel)
	}
	if !offered && !m.anyAlive() {
		r.mu.Unlock()
		return nil, fmt.Errorf("model %q: %w", model, ErrNoWorker)
	}
	if m == nil {
		m = r.modelLocked(model)
	}
	if n := len(m.queue); n >= r.cfg.QueueSize {
		r.mu.Unlock()
		return nil, fmt.Errorf("model %q (%d waiting): %w", model, n, ErrQueueFull)
	}
	wt := &waiter{ctx: ctx, exclude: exclude, since: now, ch: make(chan grant, 1)}
	m.queue = append(m.queue, wt)
	m.queued.Set(float64(len(m.queue)))
	wait := r.cfg.QueueWait
	if !m.anyServing(now) {
		if offered && m.starting() == 0 {
			r.spawnLocked(ctx, m, "on_demand")
		}
		if m.starting() > 0 {
			// Waiting for a worker to load, not for a slot: the model's load time bounds it.
			load := offer.LoadTimeout
			if load <= 0 {
				load = r.cfg.StartTimeout
			}
			wait = max(wait, load)
		}
	}
	r.mu.Unlock()
	narrate.Logger(ctx).Debug("request queued", zap.String("model", model), zap.Duration("max_wait", wait))

	t := time.NewTimer(wait)
	defer t.Stop()
	var err error
	select {
	case g := <-wt.ch:
		return r.granted(g)
	case <-ctx.Done():
		err = ctx.Err()
	case <-t.C:
		err = fmt.Errorf("model %q after %v: %w", model, wait, ErrQueueTimeout)
	}
	r.mu.Lock()
	if wt.done { // a grant raced the give-up: take it, the caller decides
		r.mu.Unlock()
		return r.granted(<-wt.ch)
	}
	wt.done = true
	m.remove(wt)
	m.queued.Set(float64(len(m.queue)))
	r.mu.Unlock()
	return nil, err
}

func (r *Router) granted(g grant) (*Lease, error) {
	if g.err != nil {
		return nil, g.err
	}
	return &Lease{r: r, w: g.w, snap: g.snap}, nil
}

// offer says whether a live hive offers model. Called with r.mu held; the registry never calls
// back into the router, so the two locks cannot deadlock.
func (r *Router) offer(model string) (Offer, bool) {
	for _, o := range r.reg.Offers() {
		if o.Model == model {
			return o, true
		}
	}
	return Offer{}, false
}

// Models lists the models a request may name: those with a live worker and those a live hive offers.
func (r *Router) Models() []string {
	seen := map[string]bool{}
	var out []string
	r.mu.Lock()
	for name, m := range r.models {
		if m.anyAlive() {
			seen[name] = true
			out = append(out, name)
		}
	}
	r.mu.Unlock()
	for _, o := range r.reg.Offers() {
		if !seen[o.Model] {
			seen[o.Model] = true
			out = append(out, o.Model)
		}
	}
	return out
}

// Queued returns how many requests for model wait for a worker.
func (r *Router) Queued(model string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	if m := r.models[model]; m != nil {
		return len(m.queue)
	}
	return 0
}

func (r *Router) modelLocked(name string) *model {
	m := r.models[name]
	if m == nil {
		m = &model{name: name, expect: map[string]bool{},
			inFlight: r.cfg.Metrics.inFlight.WithLabelValues(name), queued: r.cfg.Metrics.queued.WithLabelValues(name)}
		r.models[name] = m
	}
	return m
}

// pickLocked returns the routable worker of m with room and the fewest requests in flight; among
// equals, a random one, so that equal workers share the load instead of the first taking all.
func (r *Router) pickLocked(m *model, exclude string, now time.Time) *worker {
	var best *worker
	ties := 0
	for _, w := range m.workers {
		if !w.routable(now) || !w.hasRoom() || w.ID == exclude {
			continue
		}
		switch {
		case best == nil || w.inFlight < best.inFlight:
			best, ties = w, 1
		case w.inFlight == best.inFlight:
			ties++
			if r.rng.IntN(ties) == 0 {
				best = w
			}
		}
	}
	return best
}

func (r *Router) takeLocked(w *worker) {
	w.inFlight++
	w.m.inFlight.Inc()
	r.loadChangedLocked(w)
}

func (r *Router) release(w *worker, cause error) {
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	w.inFlight--
	w.m.inFlight.Dec()
	if w.inFlight == 0 {
		w.idleSince = now
	}
	if cause != nil && !w.gone {
		w.brokenUntil = now.Add(r.cfg.BrokenFor)
		r.cfg.Logger.Warn("worker failed a request; no new requests go to it for a while",
			zap.String("worker_id", w.ID), zap.String("model", w.Model), zap.Duration("for", r.cfg.BrokenFor), zap.Error(cause))
	}
	if !w.gone {
		r.loadChangedLocked(w)
	}
	r.dispatchLocked(w.m, now)
}

// dispatchLocked hands free slots of m to its queued requests, oldest first.
func (r *Router) dispatchLocked(m *model, now time.Time) {
	if m == nil {
		return
	}
	for len(m.queue) > 0 {
		wt := m.queue[0]
		w := r.pickLocked(m, wt.exclude, now)
		if w == nil {
			return
		}
		m.queue = m.queue[1:]
		wt.done = true
		r.takeLocked(w)
		wt.ch <- grant{w: w, snap: w.Worker}
		m.queued.Set(float64(len(m.queue)))
	}
}

// failQueueLocked ends every queued request of m with err.
func (r *Router) failQueueLocked(m *model, err error) {
	for _, wt := range m.queue {
		wt.done = true
		wt.ch <- grant{err: err}
	}
	m.queue = nil
	m.queued.Set(0)
}

func (m *model) remove(wt *waiter) {
	for i, q := range m.queue {
		if q == wt {
			m.queue = append(m.queue[:i], m.queue[i+1:]...)
			return
		}
	}
}

func (m *model) anyAlive() bool {
	for _, w := range m.workers {
		if w.alive() {
			return true
		}
	}
	return false
}

// anyServing: some worker may take requests (it will free a slot); a broken one does not count.
func (m *model) anyServing(now time.Time) bool {
	for _, w := range m.workers {
		if w.routable(now) {
			return true
		}
	}
	return false
}

// starting counts workers of m on their way to READY, spawns not yet seen included.
func (m *model) starting() int {
	n := m.spawning + len(m.expect)
	for _, w := range m.workers {
		if w.State == StateStarting && !w.gone {
			n++
		}
	}
	return n
}

// live counts the workers of m that serve or will: what MaxWorkers bounds.
func (m *model) live() int {
	n := m.spawning + len(m.expect)
	for _, w := range m.workers {
		if w.alive() {
			n++
		}
	}
	return n
}

// spawnLocked asks the queen for one more worker of m; why is "on_demand" or "scale_up".
func (r *Router) spawnLocked(ctx context.Context, m *model, why string) {
	m.spawning++
	// The spawn outlives the request that asked for it: others queue behind the same worker.
	ctx = context.WithoutCancel(ctx)
	go func() {
		narrate.Event(ctx, "queen", "router_spawn", fmt.Sprintf("Starting a worker for model %q (%s)", m.name, why),
			zap.String("model", m.name), zap.String("reason", why))
		id, err := r.sp.Spawn(ctx, m.name)
		r.mu.Lock()
		defer r.mu.Unlock()
		m.spawning--
		if err != nil {
			r.cfg.Metrics.spawns.WithLabelValues(m.name, "error").Inc()
			narrate.Warn(ctx, "queen", "router_spawn_failed", fmt.Sprintf("Could not start a worker for model %q", m.name),
				zap.String("model", m.name), zap.Error(err))
			if !m.anyAlive() && m.starting() == 0 {
				r.failQueueLocked(m, fmt.Errorf("model %q: %w: %w", m.name, ErrStartFailed, err))
			}
			return
		}
		r.cfg.Metrics.spawns.WithLabelValues(m.name, why).Inc()
		narrate.Event(ctx, "queen", "router_spawned", fmt.Sprintf("Worker %s is starting for model %q", id, m.name),
			zap.String("model", m.name), zap.String("worker_id", id))
		if w := r.workers[id]; w == nil {
			m.expect[id] = true // the watch has not shown it yet; it counts as starting
		}
	}()
}

// tick runs the timed decisions: idle stops, scale-up, and handing slots of workers whose
// broken spell ended.
func (r *Router) tick(ctx context.Context) {
	t := time.NewTicker(r.cfg.Tick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		r.onTick(ctx, time.Now())
	}
}

func (r *Router) onTick(ctx context.Context, now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	for _, m := range r.models {
		r.dispatchLocked(m, now)
		if len(m.queue) > 0 && r.cfg.ScaleUpAfter > 0 && now.Sub(m.queue[0].since) >= r.cfg.ScaleUpAfter &&
			m.starting() == 0 && m.live() < r.cfg.MaxWorkers {
			if _, ok := r.offer(m.name); ok {
				r.spawnLocked(m.queue[0].ctx, m, "scale_up")
			}
		}
		if len(m.queue) > 0 {
			continue // a queued request wants every worker
		}
		warm := 0
		for _, w := range m.workers {
			if w.routable(now) {
				warm++
			}
		}
		for _, w := range m.workers {
			if warm <= r.cfg.WarmFloor {
				break
			}
			// The decision and the exclusion from routing happen under the same lock as routing
			// itself, so a request can never be sent to a worker that is about to be stopped (the
			// race llama-swap's TTL unload had); one that arrives a moment later starts another.
			if w.TTL <= 0 || w.inFlight > 0 || !w.routable(now) || w.idleSince.IsZero() || now.Sub(w.idleSince) < w.TTL {
				continue
			}
			w.stopping = true
			warm--
			r.stopIdle(ctx, w, now.Sub(w.idleSince))
		}
	}
}

func (r *Router) stopIdle(ctx context.Context, w *worker, idle time.Duration) {
	r.cfg.Metrics.idleStops.WithLabelValues(w.Model).Inc()
	ctx = jobid.With(context.WithoutCancel(ctx), r.cfg.Logger, jobid.New())
	id, model, grace, ttl := w.ID, w.Model, w.Grace, w.TTL
	go func() {
		narrate.Event(ctx, "queen", "router_idle_stop", fmt.Sprintf("Worker %s of model %q idle for %v (ttl %v); stopping it", id, model, idle.Round(time.Millisecond), ttl),
			zap.String("worker_id", id), zap.String("model", model))
		if err := r.del.Delete(ctx, id, grace); err != nil {
			narrate.Warn(ctx, "queen", "router_idle_stop_failed", fmt.Sprintf("Could not stop idle worker %s; it serves again", id),
				zap.String("worker_id", id), zap.Error(err))
			r.mu.Lock()
			w.stopping = false
			r.dispatchLocked(w.m, time.Now())
			r.mu.Unlock()
		}
	}()
}

// Drain takes a worker out of routing before it is stopped (an operator's delete): no new
// request goes to it, those in flight finish on their own (the worker's grace bounds them), and
// requests queued for its model go to other workers or start one. The returned func puts it back
// in routing when the stop did not happen. A worker the router does not know is left alone.
func (r *Router) Drain(id string) (undo func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	w := r.workers[id]
	if w == nil || w.stopping || w.gone {
		return func() {} // unknown, or already on its way out by someone else's decision
	}
	w.stopping = true
	r.cfg.Logger.Info(fmt.Sprintf("Worker %s drains before its delete: no new requests go to it, %d in flight finish", id, w.inFlight),
		zap.String("actor", "queen"), zap.String("action", "router_drain"),
		zap.String("worker_id", id), zap.String("model", w.Model), zap.Int("in_flight", w.inFlight))
	if m := w.m; len(m.queue) > 0 && !m.anyServing(time.Now()) && m.starting() == 0 && !r.closed {
		if _, ok := r.offer(m.name); ok {
			r.spawnLocked(m.queue[0].ctx, m, "replace")
		}
	}
	return func() {
		r.mu.Lock()
		defer r.mu.Unlock()
		if w.gone {
			return
		}
		w.stopping = false
		r.dispatchLocked(w.m, time.Now())
	}
}

// loadChangedLocked queues w's load for publishing to the registry.
func (r *Router) loadChangedLocked(w *worker) {
	r.dirty[w.ID] = w
	select {
	case r.loadDirty <- struct{}{}:
	default:
	}
}

// publishLoad shows the router's load in the registry, coalesced: at 5,000 requests a second a
// registry change per request start and end would flood every watcher for nothing.
func (r *Router) publishLoad(ctx context.Context) {
	type load struct {
		id       string
		inFlight int
		full     bool
	}
	var batch []load
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.loadDirty:
		}
		r.mu.Lock()
		batch = batch[:0]
		for id, w := range r.dirty {
			if !w.gone {
				batch = append(batch, load{id, w.inFlight, w.Concurrency > 0 && w.inFlight >= w.Concurrency})
			}
			delete(r.dirty, id)
		}
		r.mu.Unlock()
		for _, l := range batch {
			r.reg.SetLoad(l.id, l.inFlight, l.full)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(r.cfg.LoadEvery):
		}
	}
}
