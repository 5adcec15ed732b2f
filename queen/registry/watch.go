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
//
// What one watcher holds is bounded whatever its consumer does: the queue holds pointers to
// events shared by every watcher (at most Config.WatchBuffer of them), and the snapshot is read
// from the registry a page at a time as the consumer takes it, never copied whole. While the
// snapshot is in progress, changes to workers it has not reached yet are not queued: it reaches
// them later and shows them as they are then.
type Watcher struct {
	r      *Registry
	hive   string
	events chan Event
	signal chan struct{} // cap 1: the queue or the reset flag changed
	done   chan struct{} // closed by Close
	exited chan struct{} // closed when the pump has returned
	once   sync.Once

	// Guarded by r.mu: while snapshotting, the snapshot has delivered the workers up to cursor.
	snapshotting bool
	cursor       string

	mu       sync.Mutex
	buf      []*Event // ring, grown on demand up to max
	head, n  int
	max      int
	reset    bool
	resetRev uint64
}

// snapshotPage is how many workers a watcher's snapshot reads from the registry at a time.
const snapshotPage = 64

// Watch starts a watcher of hive hiveID's workers, or of all workers if hiveID is empty. It
// delivers the current workers as EventAdded in ID order, then EventSynced, and every change in
// order. Changes to workers the snapshot has delivered already may come before EventSynced;
// revisions never go backwards. The caller must Close it.
func (r *Registry) Watch(hiveID string) *Watcher {
	wt := &Watcher{
		r:            r,
		hive:         hiveID,
		events:       make(chan Event),
		signal:       make(chan struct{}, 1),
		done:         make(chan struct{}),
		exited:       make(chan struct{}),
		max:          r.cfg.WatchBuffer,
		snapshotting: true,
	}
	r.mu.Lock()
	r.watchers = append(r.watchers, wt)
	r.mu.Unlock()
	go wt.pump()
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
// filtered stream as Removed and enters the other as Added. Watchers that see the change as it
// is share one Event.
func (r *Registry) emitLocked(t EventType, old, w Worker, reason string) {
	var shared *Event
	for _, wt := range r.watchers {
		if wt.snapshotting && w.ID > wt.cursor {
			continue // the snapshot has yet to reach this worker
		}
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
		if typ != t {
			wt.push(&Event{Type: typ, Worker: w, Revision: r.rev, Reason: reason})
			continue
		}
		if shared == nil {
			shared = &Event{Type: t, Worker: w, Revision: r.rev, Reason: reason}
		}
		wt.push(shared)
	}
}

// push queues e without ever blocking: on overflow the queue is dropped and a reset is due.
func (wt *Watcher) push(e *Event) {
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
	buf := make([]*Event, size)
	for i := range wt.n {
		buf[i] = wt.buf[(wt.head+i)%len(wt.buf)]
	}
	wt.buf, wt.head = buf, 0
}

// takeLocked empties the queue into a slice; wt.mu is held.
func (wt *Watcher) takeLocked() []*Event {
	out := make([]*Event, wt.n)
	for i := range wt.n {
		j := (wt.head + i) % len(wt.buf)
		out[i], wt.buf[j] = wt.buf[j], nil
	}
	wt.head, wt.n = 0, 0
	return out
}

// pump delivers the snapshot and then the queue to Events until Close, starting over with
// EventReset and a fresh snapshot whenever the queue overflowed.
func (wt *Watcher) pump() {
	defer close(wt.exited)
	defer close(wt.events)
	for {
		from, ok := wt.snapshot()
		if !ok {
			return
		}
		if from == 0 {
			from, ok = wt.changes()
			if !ok {
				return
			}
		}
		if !wt.send(Event{Type: EventReset, Revision: from}) {
			return
		}
		wt.r.restartSnapshot(wt)
	}
}

// snapshot delivers the snapshot page by page, each page after the changes queued before it was
// read, and then EventSynced. It returns early with the first dropped revision when the queue
// overflowed meanwhile; ok is false when the watcher was closed.
func (wt *Watcher) snapshot() (resetFrom uint64, ok bool) {
	for {
		queued, page, rev, last, resetFrom := wt.r.snapshotPage(wt)
		if resetFrom != 0 {
			return resetFrom, true
		}
		for _, e := range queued {
			if !wt.send(*e) {
				return 0, false
			}
		}
		for _, w := range page {
			if !wt.send(Event{Type: EventAdded, Worker: w, Revision: rev}) {
				return 0, false
			}
		}
		if last {
			return 0, wt.send(Event{Type: EventSynced, Revision: rev})
		}
	}
}

// changes delivers the queue until it overflows (returning the first dropped revision) or the
// watcher is closed (ok false).
func (wt *Watcher) changes() (resetFrom uint64, ok bool) {
	for {
		wt.mu.Lock()
		switch {
		case wt.reset:
			from := wt.resetRev
			wt.mu.Unlock()
			return from, true
		case wt.n > 0:
			e := wt.buf[wt.head]
			wt.buf[wt.head] = nil
			wt.head = (wt.head + 1) % len(wt.buf)
			wt.n--
			wt.mu.Unlock()
			if !wt.send(*e) {
				return 0, false
			}
		default:
			wt.mu.Unlock()
			select {
			case <-wt.signal:
			case <-wt.done:
				return 0, false
			}
		}
	}
}

// snapshotPage reads wt's next snapshot page and, in the same critical section, takes the changes
// queued since the last one, so that they are delivered first and revisions never go backwards.
// resetFrom is not 0 when the queue overflowed: the snapshot must start over.
func (r *Registry) snapshotPage(wt *Watcher) (queued []*Event, page []Worker, rev uint64, last bool, resetFrom uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	wt.mu.Lock()
	if wt.reset {
		from := wt.resetRev
		wt.mu.Unlock()
		return nil, nil, 0, false, from
	}
	queued = wt.takeLocked()
	wt.mu.Unlock()
	page, more := r.pageLocked(Filter{HiveID: wt.hive}, wt.cursor, snapshotPage)
	if len(page) > 0 {
		wt.cursor = page[len(page)-1].ID
	}
	if !more {
		wt.snapshotting, wt.cursor = false, ""
	}
	return queued, page, r.rev, !more, 0
}

// restartSnapshot re-arms wt after a reset: an empty queue and a snapshot from the first worker.
func (r *Registry) restartSnapshot(wt *Watcher) {
	r.mu.Lock()
	defer r.mu.Unlock()
	wt.mu.Lock()
	clear(wt.buf)
	wt.buf, wt.head, wt.n, wt.reset = nil, 0, 0, false
	wt.mu.Unlock()
	wt.snapshotting, wt.cursor = true, ""
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
			r.closeFastLocked(e) // every beat wakes a waiter: none may go around the lock
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
