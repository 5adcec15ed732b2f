package registry

import (
	"context"
	"fmt"
	"slices"
	"sync"
)

// EventType says what an Event reports.
type EventType uint8

const (
	// EventAdded: a worker appeared (or, in a snapshot, exists).
	EventAdded EventType = iota + 1
	// EventUpdated: a worker changed in a field other than LastHeartbeat. Beats that only
	// refresh LastHeartbeat are not events: at 10,000 workers a second they would drown every
	// watcher while telling it nothing; read Get or List for fresh heartbeat times.
	EventUpdated
	// EventRemoved: a worker is gone; Worker is its last known value.
	EventRemoved
	// EventSynced: the snapshot is complete; what follows are changes.
	EventSynced
	// EventReset: the watcher fell too far behind and changes were dropped. Forget what was
	// seen; a fresh snapshot and EventSynced follow. Revision is the first one dropped.
	EventReset
)

func (t EventType) String() string {
	switch t {
	case EventAdded:
		return "ADDED"
	case EventUpdated:
		return "UPDATED"
	case EventRemoved:
		return "REMOVED"
	case EventSynced:
		return "SYNCED"
	case EventReset:
		return "RESET"
	}
	return fmt.Sprintf("EventType(%d)", uint8(t))
}

// Event is one item of a watch stream. Revision is the registry revision after the change (for
// snapshot items and Synced, the revision the snapshot was taken at).
type Event struct {
	Type     EventType
	Worker   Worker
	Revision uint64
	// Reason says why a worker was removed (its exit status and last output, expiry, a delete),
	// so a watcher waiting for it learns what happened; empty for other events.
	Reason string
}

// Watcher streams the workers of one hive, or of all hives, as a snapshot followed by changes.
//
// The registry appends changes to the watcher's own bounded queue (never blocking) and a pump
// goroutine per watcher hands them to Events. When the queue would overflow, the registry
// drops it and flags a reset instead, so a consumer that stalls costs the registry nothing and
// still never misses a removal without knowing: it gets EventReset and a fresh snapshot.
type Watcher struct {
	r      *Registry
	hive   string
	events chan Event
	signal chan struct{} // cap 1: the queue or the reset flag changed
	done   chan struct{} // closed by Close
	exited chan struct{} // closed when the pump has returned
	once   sync.Once

	mu       sync.Mutex
	buf      []Event // ring, grown on demand up to max
	head, n  int
	max      int
	reset    bool
	resetRev uint64
}

// Watch starts a watcher of hive hiveID's workers, or of all workers if hiveID is empty. It
// first delivers the current workers as EventAdded in ID order, then EventSynced, then every
// change in order. The caller must Close it.
func (r *Registry) Watch(hiveID string) *Watcher {
	wt := &Watcher{
		r:      r,
		hive:   hiveID,
		events: make(chan Event),
		signal: make(chan struct{}, 1),
		done:   make(chan struct{}),
		exited: make(chan struct{}),
		max:    r.cfg.WatchBuffer,
	}
	r.mu.Lock()
	snap, rev := r.listLocked(hiveID), r.rev
	r.watchers = append(r.watchers, wt) // in the same critical section: no change falls between
	r.mu.Unlock()
	go wt.pump(snap, rev)
	return wt
}

// Events returns the stream. It is closed after Close.
func (wt *Watcher) Events() <-chan Event { return wt.events }

// Close stops the watcher and releases everything it holds. It is safe to call more than once
// and from any goroutine; it returns once the pump goroutine has exited.
func (wt *Watcher) Close() {
	wt.once.Do(func() {
		wt.r.unwatch(wt)
		close(wt.done)
	})
	<-wt.exited
}

func (r *Registry) unwatch(wt *Watcher) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if i := slices.Index(r.watchers, wt); i >= 0 {
		r.watchers = slices.Delete(r.watchers, i, i+1)
	}
}

// emitLocked fans a change out to the watchers it concerns. old is the worker before an update
// (for Added and Removed, the worker itself): a worker that moves between hives leaves one
// filtered stream as Removed and enters the other as Added.
func (r *Registry) emitLocked(t EventType, old, w Worker, reason string) {
	for _, wt := range r.watchers {
		typ := t
		if wt.hive != "" {
			was, is := old.HiveID == wt.hive, w.HiveID == wt.hive
			switch {
			case was && is:
			case is:
				typ = EventAdded
			case was:
				typ = EventRemoved
			default:
				continue
			}
		}
		wt.push(Event{Type: typ, Worker: w, Revision: r.rev, Reason: reason})
	}
}

// push queues e without ever blocking: on overflow the queue is dropped and a reset is due.
func (wt *Watcher) push(e Event) {
	wt.mu.Lock()
	switch {
	case wt.reset:
		// Everything up to the coming snapshot is superseded by it.
	case wt.n == wt.max:
		clear(wt.buf)
		wt.buf, wt.head, wt.n = nil, 0, 0
		wt.reset, wt.resetRev = true, e.Revision
	default:
		if wt.n == len(wt.buf) {
			wt.grow()
		}
		wt.buf[(wt.head+wt.n)%len(wt.buf)] = e
		wt.n++
	}
	wt.mu.Unlock()
	select {
	case wt.signal <- struct{}{}:
	default:
	}
}

func (wt *Watcher) grow() {
	size := min(max(2*len(wt.buf), 16), wt.max)
	buf := make([]Event, size)
	for i := range wt.n {
		buf[i] = wt.buf[(wt.head+i)%len(wt.buf)]
	}
	wt.buf, wt.head = buf, 0
}

// pump delivers the snapshot and then the queue to Events until Close.
func (wt *Watcher) pump(snap []Worker, rev uint64) {
	defer close(wt.exited)
	defer close(wt.events)
	if !wt.sendSnapshot(snap, rev) {
		return
	}
	for {
		wt.mu.Lock()
		switch {
		case wt.reset:
			from := wt.resetRev
			wt.mu.Unlock()
			if !wt.send(Event{Type: EventReset, Revision: from}) {
				return
			}
			// The snapshot is taken only now that the consumer is reading again, so it is as
			// fresh as can be; the reset flag is cleared in the same critical section.
			snap, rev := wt.r.resync(wt)
			if !wt.sendSnapshot(snap, rev) {
				return
			}
		case wt.n > 0:
			e := wt.buf[wt.head]
			wt.buf[wt.head] = Event{}
			wt.head = (wt.head + 1) % len(wt.buf)
			wt.n--
			wt.mu.Unlock()
			if !wt.send(e) {
				return
			}
		default:
			wt.mu.Unlock()
			select {
			case <-wt.signal:
			case <-wt.done:
				return
			}
		}
	}
}

// resync takes a fresh snapshot for wt and re-arms its queue, atomically with respect to
// changes.
func (r *Registry) resync(wt *Watcher) ([]Worker, uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	wt.mu.Lock()
	wt.reset = false
	wt.mu.Unlock()
	return r.listLocked(wt.hive), r.rev
}

func (wt *Watcher) sendSnapshot(snap []Worker, rev uint64) bool {
	for _, w := range snap {
		if !wt.send(Event{Type: EventAdded, Worker: w, Revision: rev}) {
			return false
		}
	}
	return wt.send(Event{Type: EventSynced, Revision: rev})
}

func (wt *Watcher) send(e Event) bool {
	select {
	case wt.events <- e:
		return true
	case <-wt.done:
		return false
	}
}

// waiter is an Await call parked on one worker.
type waiter struct {
	ch    chan struct{} // cap 1
	gone  bool          // set under the registry lock when the worker is removed
	last  Worker
	cause error
}

func (wt *waiter) wake() {
	select {
	case wt.ch <- struct{}{}:
	default:
	}
}

// Await returns once cond holds for worker id, checking at once and after every change
// (heartbeats included). If the worker is removed first it returns the last known worker and an
// error wrapping ErrNotFound and the removal cause; if ctx ends first, ctx's error. cond runs
// without the registry lock held.
func (r *Registry) Await(ctx context.Context, id string, cond func(Worker) bool) (Worker, error) {
	wt := &waiter{ch: make(chan struct{}, 1)}
	var e *workerEntry
	defer func() {
		if e == nil {
			return
		}
		r.mu.Lock()
		if i := slices.Index(e.waiters, wt); i >= 0 {
			e.waiters = slices.Delete(e.waiters, i, i+1)
		}
		r.mu.Unlock()
	}()
	for {
		r.mu.Lock()
		if e == nil {
			// Waiters hang on the entry, not the id, so a worker removed and re-added under the
			// same id still ends this wait with the removal.
			if e = r.workers[id]; e == nil {
				w, err := r.notFoundLocked(id)
				r.mu.Unlock()
				return w, err
			}
			e.waiters = append(e.waiters, wt)
		}
		if wt.gone {
			r.mu.Unlock()
			return wt.last, removedError(id, wt.cause)
		}
		w := e.w
		r.mu.Unlock()
		if cond(w) {
			return w, nil
		}
		select {
		case <-ctx.Done():
			return w, ctx.Err()
		case <-wt.ch:
		}
	}
}

func removedError(id string, cause error) error {
	if cause == nil {
		return fmt.Errorf("worker %q removed: %w", id, ErrNotFound)
	}
	return fmt.Errorf("worker %q removed: %w: %w", id, ErrNotFound, cause)
}
