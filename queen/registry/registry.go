// Package registry is the queen's in-memory source of truth: the workers and hives it knows,
// the liveness clock that turns silence into STALE and STALE into removal, and the change feed
// that watchers and waiters follow. It holds no gRPC types; queen/server adapts it to the wire.
//
// Everything is guarded by one mutex with short critical sections. The registry never blocks
// while holding it: callbacks run after it is released, and watchers are fed through their own
// bounded queues, so a slow consumer can neither stall heartbeats nor miss a removal silently.
// The one exception is a worker's beat that repeats its last one while nothing else touched the
// worker: Rebeat records its time with one atomic operation on the worker's entry.
package registry

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// State is a worker's lifecycle state. The values match rbee.v1.WorkerState so the gRPC
// adapter can convert by number.
type State uint8

const (
	StateUnspecified State = iota
	StateStarting
	StateReady
	StateBusy
	StateStopping
	// StateStale is never reported by a worker: the registry shows it when beats stopped.
	StateStale
	// StateUnhealthy: the worker was serving but its health check fails (StatusMessage says why).
	StateUnhealthy
)

var stateNames = [...]string{"UNSPECIFIED", "STARTING", "READY", "BUSY", "STOPPING", "STALE", "UNHEALTHY"}

func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("State(%d)", uint8(s))
}

// reportable says whether a worker may report s about itself.
func (s State) reportable() bool {
	return s >= StateStarting && s <= StateStopping || s == StateUnhealthy
}

// Worker is one worker as the queen knows it. Values are copies; changing one changes nothing
// in the registry.
type Worker struct {
	ID, HiveID, Model, Device string
	PID                       int32
	Port                      uint32
	ProcessStartTime          uint64
	// Address is the host other machines reach the worker's port at; "" for its hive's host.
	Address string
	// State is the effective state shown to users: StateStale overrides what was reported.
	State State
	// Reported is the last state the worker reported itself (StateStarting after Reserve).
	Reported State
	// LastHeartbeat is zero until the first beat.
	LastHeartbeat time.Time
	Created       time.Time
	// As the worker reports them in every beat: the requests it serves at once (0: not
	// limited) and why it is in its state (e.g. a supervisor's failed health check).
	Concurrency   uint32
	StatusMessage string
	// InFlight is the requests the queen's router has on the worker (SetLoad). Beats never set it.
	InFlight uint32
}

// sameButBeat reports whether a and b differ at most in LastHeartbeat, that is whether a beat
// changed nothing a watcher would care about.
func sameButBeat(a, b Worker) bool {
	if a.LastHeartbeat.IsZero() != b.LastHeartbeat.IsZero() {
		return false // the first beat is news: the worker is alive
	}
	a.LastHeartbeat = b.LastHeartbeat
	return a == b
}

// Config tunes the liveness clock. Zero fields take the defaults named beside them.
type Config struct {
	Interval     time.Duration // heartbeat interval workers are told to keep (1s)
	StaleAfter   time.Duration // no beat this long makes a worker or hive STALE (3*Interval)
	ExpireAfter  time.Duration // STALE this long removes it (5m)
	StartTimeout time.Duration // a reserved worker that never beats this long is removed (30s)
	// OnStartTimeout, if set, is called once after a start-timeout removal, without any lock
	// held and on a goroutine of its own, so the queen can delete the orphaned process through
	// its hive without stalling the clock.
	OnStartTimeout func(Worker)
	// OnExpire, if set, is called after an expiry removal, like OnStartTimeout.
	OnExpire func(Worker)
	// WatchBuffer bounds the changes queued for one watcher (1024); beyond it the watcher is
	// reset and resynchronised instead of slowing the registry down.
	WatchBuffer int
	// ClockSlack lets the clock act up to this much after a deadline so that it handles every
	// deadline of the window in one wake-up: 10,000 workers with spread-out beats otherwise wake
	// it thousands of times a second. 0 (the default) acts on time exactly.
	ClockSlack time.Duration
}

func (c Config) withDefaults() Config {
	if c.Interval <= 0 {
		c.Interval = time.Second
	}
	if c.StaleAfter <= 0 {
		c.StaleAfter = 3 * c.Interval
	}
	if c.ExpireAfter <= 0 {
		c.ExpireAfter = 5 * time.Minute
	}
	if c.StartTimeout <= 0 {
		c.StartTimeout = 30 * time.Second
	}
	if c.WatchBuffer <= 0 {
		c.WatchBuffer = 1024
	}
	return c
}

var (
	ErrNotFound = errors.New("registry: not found")
	ErrExists   = errors.New("registry: already exists")
	ErrNoHive   = errors.New("registry: no ready hive")
	ErrInvalid  = errors.New("registry: invalid argument")

	// Causes of removals the registry makes itself; Await wraps them beside ErrNotFound.
	ErrStartTimeout = errors.New("registry: worker never beat within the start timeout")
	ErrExpired      = errors.New("registry: worker stale for longer than the expiry time")
	ErrStopped      = errors.New("registry: worker stopped and closed its heartbeat stream")
	// ErrGone refuses a beat from a process the registry was told is gone (see Exited).
	ErrGone = errors.New("registry: that worker process is gone")
)

// Registry holds workers and hives. Its zero value is not usable; call New.
type Registry struct {
	cfg  Config
	wake chan struct{} // tells Run that the earliest deadline moved earlier
	// base is what workerEntry.fast counts from (New's time.Now, with its monotonic reading).
	base time.Time

	mu      sync.Mutex
	rev     uint64
	workers map[string]*workerEntry
	order   []*workerEntry // sorted by ID, so List and snapshots never sort
	perHive map[string]int // worker count by hive id, for Hive.Workers and PickHive
	hives   map[string]*hiveEntry
	// formerHives maps hives that expired to their last address (see FormerHiveAddress).
	formerHives map[string]string
	deadlines   deadlineHeap
	watchers    []*Watcher
	// graves remembers the last state and removal cause of recently removed workers (at most
	// maxGraves, oldest first out), so that a wait that starts just after a worker died still
	// learns why: a spawn returns before its worker's first beat, and a crash can beat the wait.
	graves     map[string]grave
	graveOrder []graveRef
	// holdUntil: the clock takes no action before it (Hold).
	holdUntil time.Time
	// tombs are processes proven gone (deleted through their hive, or seen exiting by it), at most
	// maxTombs, oldest first out: a beat such a process sent before it died is refused instead of
	// bringing it back as a live worker with a dead PID.
	tombs     map[Process]struct{}
	tombOrder []Process
}

// Process is one life of a worker: a new process under the same worker id is another Process.
type Process struct {
	WorkerID  string
	PID       int32
	StartTime uint64
}

const maxTombs = 4096

type grave struct {
	w     Worker
	cause error
	rev   uint64 // the removal's revision, to tell this grave from a later one of the same id
}

type graveRef struct {
	id  string
	rev uint64
}

const maxGraves = 1024

// RecentRemovals is how many removed workers the registry remembers (GetOrLast), for messages.
const RecentRemovals = maxGraves

// notFoundLocked is the answer for a worker id the registry does not hold: with the last state
// and the cause when it was removed lately (its process died before the caller got to it).
func (r *Registry) notFoundLocked(id string) (Worker, error) {
	if g, ok := r.graves[id]; ok {
		return g.w, removedError(id, g.cause)
	}
	return Worker{}, fmt.Errorf("worker %q: %w", id, ErrNotFound)
}

type workerEntry struct {
	w Worker
	// full is the router's verdict (SetLoad) that the worker is at its concurrency: a READY it
	// reports is shown as BUSY. Kept apart from the beat, so the next beat cannot overwrite it.
	full       bool
	staleSince time.Time
	deadline   item
	waiters    []*waiter
	// fast lets a repeated beat skip the lock (Rebeat). 0: closed; otherwise open, holding the
	// time of the worker's latest beat (see fastTime), which may be later than w.LastHeartbeat
	// (foldLocked brings it in). Only a beat under the lock opens it; any other
	// change, the clock acting on the worker, its removal and a waiter close it (closeFastLocked),
	// so that a beat without the lock never changes anything but the time of the last beat.
	fast atomic.Int64
	// fastGen counts the beats that opened fast: a Ticket from an earlier one no longer counts.
	fastGen atomic.Uint64
}

// fastTime encodes t for workerEntry.fast: 1 + nanoseconds since r.base, by the monotonic clock
// when both have its reading; 0 (cannot be told apart from closed) for a time before r.base.
func (r *Registry) fastTime(t time.Time) int64 {
	if d := t.Sub(r.base); d >= 0 && d < math.MaxInt64 {
		return int64(d) + 1
	}
	return 0
}

// foldLocked brings the time of the latest lock-free beat into e.w.
func (r *Registry) foldLocked(e *workerEntry) { r.foldFastLocked(e, e.fast.Load()) }

// closeFastLocked sends e's next beat through the lock, and brings in the time of its last.
func (r *Registry) closeFastLocked(e *workerEntry) { r.foldFastLocked(e, e.fast.Swap(0)) }

func (r *Registry) foldFastLocked(e *workerEntry, v int64) {
	if v <= 0 {
		return
	}
	// The wall reading is r.base's plus the monotonic time since: the same as time.Now's unless
	// the system's wall clock was set since r.base.
	if t := r.base.Add(time.Duration(v - 1)); t.After(e.w.LastHeartbeat) {
		e.w.LastHeartbeat = t
	}
}

// openFastLocked lets e's next beats, if they repeat this one, go without the lock, unless
// someone waits on e (Await is woken by every beat). It returns the ticket for Rebeat.
func (r *Registry) openFastLocked(e *workerEntry, now time.Time) Ticket {
	v := r.fastTime(now)
	if len(e.waiters) > 0 || e.w.State == StateStale || v == 0 {
		return Ticket{}
	}
	t := Ticket{e: e, gen: e.fastGen.Add(1)}
	e.fast.Store(v)
	return t
}

// Ticket is what a beat applied with BeatTicketAt gives for the same worker's next beats: while
// they repeat that beat field for field, Rebeat records them without the registry's lock.
type Ticket struct {
	e   *workerEntry
	gen uint64
}

// New returns an empty registry. Call Run to start its liveness clock.
func New(cfg Config) *Registry {
	return &Registry{
		cfg:     cfg.withDefaults(),
		wake:    make(chan struct{}, 1),
		base:    time.Now(),
		workers: make(map[string]*workerEntry),
		perHive: make(map[string]int),
		hives:   make(map[string]*hiveEntry),
	}
}

// Config returns the effective configuration, defaults filled in (the heartbeat adapter tells
// workers Interval).
func (r *Registry) Config() Config { return r.cfg }

// Revision counts the changes the registry has published. It only grows; watchers see it on
// every event. Beats that change nothing but LastHeartbeat do not count.
func (r *Registry) Revision() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.rev
}

// Len returns the number of workers.
func (r *Registry) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.workers)
}

// Reserve records a worker the queen is about to ask a hive to spawn, before the hive answers,
// so that its first heartbeat finds it and a spawn that never comes alive is cleaned up after
// StartTimeout. The worker is STARTING without process data.
func (r *Registry) Reserve(w Worker) error {
	if w.ID == "" {
		return fmt.Errorf("%w: empty worker id", ErrInvalid)
	}
	w.State, w.Reported = StateStarting, StateStarting
	w.LastHeartbeat, w.Created = time.Time{}, time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.workers[w.ID]; ok {
		return fmt.Errorf("worker %q: %w", w.ID, ErrExists)
	}
	r.addLocked(w)
	if h := r.hives[w.HiveID]; h != nil {
		h.placedSinceBeat++
	}
	return nil
}

// Started fills in what the hive answered to Spawn. A heartbeat may have arrived first; its
// state is kept. ErrNotFound means the worker was removed meanwhile (say by its start timeout).
func (r *Registry) Started(id string, pid int32, port uint32, startTime uint64, address string) (Worker, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.workers[id]
	if e == nil {
		return r.notFoundLocked(id)
	}
	r.closeFastLocked(e)
	old := e.w
	e.w.PID, e.w.Port, e.w.ProcessStartTime, e.w.Address = pid, port, startTime, address
	r.changedLocked(e, old)
	return e.w, nil
}

// Beat applies a heartbeat: in is the full descriptor the worker sent, its State what the worker
// reports. An unknown worker is added, which is how a restarted queen relearns its fleet. A STALE
// worker returns to its reported state. Empty or zero fields keep what was known, and a state a
// worker may not report (UNSPECIFIED, STALE) keeps the last reported one.
//
// A beat costs a map lookup and, only when the worker's deadline must move earlier (its first
// beat, or leaving STALE), an O(log n) heap fix. Watchers hear of it only when something other
// than LastHeartbeat changed. A beat that repeats the last one can skip the lock: see Rebeat.
func (r *Registry) Beat(in Worker) (Worker, error) { return r.BeatAt(in, time.Now()) }

// BeatAt is Beat for a beat received at now (the caller may have read the clock already).
func (r *Registry) BeatAt(in Worker, now time.Time) (Worker, error) {
	w, _, err := r.beat(in, now, false)
	return w, err
}

// BeatTicketAt is BeatAt returning, instead of the worker, a ticket for Rebeat.
func (r *Registry) BeatTicketAt(in Worker, now time.Time) (Ticket, error) {
	_, t, err := r.beat(in, now, true)
	return t, err
}

// beat is BeatAt, or with ticket BeatTicketAt.
func (r *Registry) beat(in Worker, now time.Time, ticket bool) (Worker, Ticket, error) {
	if in.ID == "" {
		return Worker{}, Ticket{}, fmt.Errorf("%w: empty worker id", ErrInvalid)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	e, err := r.beatLocked(in, now)
	switch {
	case err != nil:
		return Worker{}, Ticket{}, err
	case ticket:
		return Worker{}, r.openFastLocked(e, now), nil
	}
	return e.w, Ticket{}, nil
}

// Rebeat records, at now, a beat that repeats field for field the one that gave t (BeatTicketAt),
// and every beat since, if nothing but beats touched the worker since then: it only moves the
// worker's LastHeartbeat, as BeatAt would, without taking the registry's lock. It returns false
// when that is not enough (the worker changed otherwise, turned STALE, was removed, another beat
// went through the lock, or someone waits on it): apply the beat with BeatTicketAt then.
func (r *Registry) Rebeat(t Ticket, now time.Time) bool {
	e := t.e
	if e == nil {
		return false
	}
	d := r.fastTime(now)
	if d == 0 {
		return false
	}
	for {
		v := e.fast.Load()
		// Checked after loading fast: a beat through the lock closes fast before it counts a
		// generation and opens it after, so an open fast read here is of t's generation or later.
		if v <= 0 || e.fastGen.Load() != t.gen {
			return false
		}
		if d <= v || e.fast.CompareAndSwap(v, d) {
			return true // a later beat is recorded already, or this one is now
		}
	}
}

// beatLocked applies a beat (see Beat) and returns its entry.
func (r *Registry) beatLocked(in Worker, now time.Time) (*workerEntry, error) {
	e := r.workers[in.ID]
	if (e == nil || e.w.PID != in.PID || e.w.ProcessStartTime != in.ProcessStartTime) && len(r.tombs) > 0 {
		// Only beats that do not match the known process pay for this lookup.
		if _, dead := r.tombs[Process{in.ID, in.PID, in.ProcessStartTime}]; dead {
			return nil, fmt.Errorf("worker %q, pid %d: %w", in.ID, in.PID, ErrGone)
		}
	}
	if e == nil {
		w := in
		w.InFlight = 0
		w.Reported = StateStarting
		if in.State.reportable() {
			w.Reported = in.State
		}
		w.State, w.LastHeartbeat, w.Created = w.Reported, now, now
		return r.addLocked(w), nil
	}
	r.closeFastLocked(e)
	old := e.w
	w := &e.w
	if in.State.reportable() {
		w.Reported = in.State
	}
	w.State = e.effective()
	setString(&w.HiveID, in.HiveID)
	setString(&w.Model, in.Model)
	setString(&w.Device, in.Device)
	setString(&w.Address, in.Address)
	if in.PID != 0 {
		w.PID = in.PID
	}
	if in.Port != 0 {
		w.Port = in.Port
	}
	if in.ProcessStartTime != 0 {
		w.ProcessStartTime = in.ProcessStartTime
	}
	// Every beat carries the whole descriptor, so these are taken as they are, empty included.
	w.Concurrency, w.StatusMessage = in.Concurrency, in.StatusMessage
	w.LastHeartbeat = now
	r.changedLocked(e, old)
	return e, nil
}

// effective is the state to show for what the worker last reported, with the router's load overlay.
func (e *workerEntry) effective() State {
	if e.full && e.w.Reported == StateReady {
		return StateBusy
	}
	return e.w.Reported
}

// SetLoad records the router's load on a worker: inFlight requests, and whether that is all the
// worker takes at once (full). A full worker that reports READY is shown BUSY until it is not full;
// a STALE one stays STALE. Watchers hear of it as an UPDATED event when something shows a change.
// ErrNotFound means the worker is gone.
func (r *Registry) SetLoad(id string, inFlight uint32, full bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.workers[id]
	if e == nil {
		return fmt.Errorf("worker %q: %w", id, ErrNotFound)
	}
	if e.w.InFlight == inFlight && e.full == full {
		return nil
	}
	r.closeFastLocked(e)
	old := e.w
	e.full, e.w.InFlight = full, inFlight
	if e.w.State != StateStale {
		e.w.State = e.effective()
	}
	r.changedLocked(e, old)
	return nil
}

// setString keeps the string the registry holds when v is equal: each beat decodes fresh copies,
// and keeping the old ones lets the new ones die young.
func setString(dst *string, v string) {
	if v != "" && v != *dst {
		*dst = v
	}
}

// StreamClosed is called when a worker's heartbeat stream ends. A worker that last reported
// STOPPING said goodbye and is removed at once (cause ErrStopped); any other may only be
// partitioned from the queen, so it turns STALE and expires unless it beats again.
func (r *Registry) StreamClosed(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.workers[id]
	if e != nil {
		r.closeFastLocked(e)
	}
	switch {
	case e == nil:
	case e.w.Reported == StateStopping:
		r.removeLocked(e, ErrStopped)
	case r.holdingLocked(time.Now()):
		// Held: its last beat still counts, and the clock marks it STALE after the hold if no
		// beat follows.
	case e.w.State != StateStale:
		old := e.w
		e.w.State, e.staleSince = StateStale, time.Now()
		r.changedLocked(e, old)
	}
}

// Get returns the worker with the given id.
func (r *Registry) Get(id string) (Worker, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if e := r.workers[id]; e != nil {
		r.foldLocked(e)
		return e.w, true
	}
	return Worker{}, false
}

// GetOrLast returns the worker with the given id or, when it was removed lately (see graves: the
// last maxGraves removals since the queen started), its last known state with removed set. That
// is enough to find the hive that still keeps a deleted worker's log.
func (r *Registry) GetOrLast(id string) (w Worker, removed, ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if e := r.workers[id]; e != nil {
		r.foldLocked(e)
		return e.w, false, true
	}
	if g, found := r.graves[id]; found {
		return g.w, true, true
	}
	return Worker{}, false, false
}

// List returns the workers of hive hiveID, or all workers if hiveID is empty, sorted by ID.
func (r *Registry) List(hiveID string) []Worker {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.listLocked(hiveID)
}

func (r *Registry) listLocked(hiveID string) []Worker {
	if hiveID == "" {
		out := make([]Worker, len(r.order))
		for i, e := range r.order {
			r.foldLocked(e)
			out[i] = e.w
		}
		return out
	}
	out := make([]Worker, 0, r.perHive[hiveID])
	for _, e := range r.order {
		if e.w.HiveID == hiveID {
			r.foldLocked(e)
			out = append(out, e.w)
		}
	}
	return out
}

// Filter selects workers by hive, model and state; a zero field matches every worker.
type Filter struct {
	HiveID, Model string
	State         State
}

func (f Filter) match(w *Worker) bool {
	return (f.HiveID == "" || w.HiveID == f.HiveID) && (f.Model == "" || w.Model == f.Model) &&
		(f.State == StateUnspecified || w.State == f.State)
}

// Page returns, in ID order, at most limit workers that match f and whose IDs sort after after
// ("" starts at the first), and whether more such workers follow. Paging by the last ID seen
// stays correct while workers come and go: each worker present for the whole walk is returned
// exactly once, in order.
func (r *Registry) Page(f Filter, after string, limit int) (ws []Worker, more bool) {
	return r.AppendPage(nil, f, after, limit)
}

// AppendPage is Page appending to dst, so that a caller listing often can reuse one slice: a page
// of 10,000 workers is 2 MB.
func (r *Registry) AppendPage(dst []Worker, f Filter, after string, limit int) (ws []Worker, more bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.appendPageLocked(dst, f, after, limit)
}

func (r *Registry) pageLocked(f Filter, after string, limit int) (ws []Worker, more bool) {
	return r.appendPageLocked(nil, f, after, limit)
}

func (r *Registry) appendPageLocked(dst []Worker, f Filter, after string, limit int) (ws []Worker, more bool) {
	i := 0
	if after != "" {
		i, _ = slices.BinarySearchFunc(r.order, after, cmpEntryID)
		if i < len(r.order) && r.order[i].w.ID == after {
			i++
		}
	}
	n := len(r.order) - i
	if f.HiveID != "" {
		n = min(n, r.perHive[f.HiveID])
	}
	ws = slices.Grow(dst, max(0, min(limit, n)))
	start := len(ws)
	for _, e := range r.order[i:] {
		if !f.match(&e.w) {
			continue
		}
		if len(ws)-start == limit {
			return ws, true
		}
		r.foldLocked(e)
		ws = append(ws, e.w)
	}
	return ws, false
}

// Remove deletes a worker and returns it as last known. cause (may be nil) is what Await
// calls on this worker return, wrapped beside ErrNotFound.
func (r *Registry) Remove(id string, cause error) (Worker, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.workers[id]
	if e == nil {
		return Worker{}, false
	}
	r.removeLocked(e, cause)
	return e.w, true
}

// Exited is told that process p of worker p.WorkerID on hive hiveID is gone: deleted through its
// hive, or seen exiting by it. The worker is removed with cause if it is still that process (a
// worker whose PID or start time is not known yet counts as that process: its crash can beat the
// spawn's answer), and p's beats are refused from now on (ErrGone). It returns the removed worker.
func (r *Registry) Exited(hiveID string, p Process, cause error) (Worker, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.tombs[p]; !ok {
		if r.tombs == nil {
			r.tombs = map[Process]struct{}{}
		}
		if len(r.tombOrder) >= maxTombs {
			delete(r.tombs, r.tombOrder[0])
			r.tombOrder = r.tombOrder[1:]
		}
		r.tombs[p] = struct{}{}
		r.tombOrder = append(r.tombOrder, p)
	}
	e := r.workers[p.WorkerID]
	if e == nil || e.w.HiveID != hiveID || (e.w.PID != 0 && e.w.PID != p.PID) ||
		(e.w.ProcessStartTime != 0 && p.StartTime != 0 && e.w.ProcessStartTime != p.StartTime) {
		return Worker{}, false
	}
	r.removeLocked(e, cause)
	return e.w, true
}

// addLocked inserts a new worker and publishes it.
func (r *Registry) addLocked(w Worker) *workerEntry {
	delete(r.graves, w.ID) // a new worker under the id; its stale graveOrder entry matches nothing
	e := &workerEntry{w: w}
	e.deadline = item{index: -1, worker: e}
	r.workers[w.ID] = e
	i, _ := slices.BinarySearchFunc(r.order, w.ID, cmpEntryID)
	r.order = slices.Insert(r.order, i, e)
	r.perHive[w.HiveID]++
	r.rev++
	r.emitLocked(EventAdded, w, w, "")
	r.scheduleLocked(&e.deadline, r.workerDue(e))
	return e
}

// changedLocked publishes a mutation of e (old is the worker before it): watchers hear of real
// changes, waiters of any, and the liveness deadline follows.
func (r *Registry) changedLocked(e *workerEntry, old Worker) {
	if old.HiveID != e.w.HiveID {
		r.countHiveLocked(old.HiveID, -1)
		r.perHive[e.w.HiveID]++
	}
	if !sameButBeat(old, e.w) {
		r.rev++
		r.emitLocked(EventUpdated, old, e.w, "")
	}
	for _, wt := range e.waiters {
		wt.wake()
	}
	r.scheduleLocked(&e.deadline, r.workerDue(e))
}

// removeLocked deletes e, publishes the removal and releases its waiters with cause.
func (r *Registry) removeLocked(e *workerEntry, cause error) {
	r.closeFastLocked(e)
	delete(r.workers, e.w.ID)
	if i, ok := slices.BinarySearchFunc(r.order, e.w.ID, cmpEntryID); ok {
		r.order = slices.Delete(r.order, i, i+1)
	}
	r.countHiveLocked(e.w.HiveID, -1)
	r.unscheduleLocked(&e.deadline)
	r.rev++
	reason := ""
	if cause != nil {
		reason = cause.Error()
	}
	r.emitLocked(EventRemoved, e.w, e.w, reason)
	if r.graves == nil {
		r.graves = map[string]grave{}
	}
	if len(r.graveOrder) >= maxGraves {
		old := r.graveOrder[0]
		r.graveOrder = r.graveOrder[1:]
		if g, ok := r.graves[old.id]; ok && g.rev == old.rev {
			delete(r.graves, old.id)
		}
	}
	r.graves[e.w.ID] = grave{w: e.w, cause: cause, rev: r.rev}
	r.graveOrder = append(r.graveOrder, graveRef{e.w.ID, r.rev})
	for _, wt := range e.waiters {
		wt.gone, wt.last, wt.cause = true, e.w, cause
		wt.wake()
	}
	e.waiters = nil
}

func (r *Registry) countHiveLocked(hiveID string, d int) {
	if n := r.perHive[hiveID] + d; n > 0 {
		r.perHive[hiveID] = n
	} else {
		delete(r.perHive, hiveID) // keep the map from growing with every hive ever seen
	}
}

func cmpEntryID(e *workerEntry, id string) int { return strings.Compare(e.w.ID, id) }

// workerDue is when e's liveness must next be looked at.
func (r *Registry) workerDue(e *workerEntry) time.Time {
	switch {
	case e.w.State == StateStale:
		return e.staleSince.Add(r.cfg.ExpireAfter)
	case e.w.LastHeartbeat.IsZero():
		return e.w.Created.Add(r.cfg.StartTimeout)
	default:
		return e.w.LastHeartbeat.Add(r.cfg.StaleAfter)
	}
}
