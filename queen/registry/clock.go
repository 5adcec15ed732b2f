package registry

import (
	"container/heap"
	"context"
	"sync"
	"time"
)

// The liveness clock keeps one deadline per worker and per non-static hive in a min-heap.
// A deadline is allowed to be early, never late: a beat that pushes a worker's real deadline
// later leaves its heap entry alone (O(1)), and when the entry pops before it is really due it
// is re-keyed to the real deadline (O(log n)). Only changes that move a deadline earlier (a first
// beat, leaving STALE) fix the heap at once. Run sleeps on one timer until the earliest entry.

// item is a heap entry; it lives inside its worker or hive entry, so there is at most one each.
type item struct {
	at     time.Time
	index  int // position in the heap, -1 when not queued
	worker *workerEntry
	hive   *hiveEntry
}

type deadlineHeap []*item

func (h deadlineHeap) Len() int           { return len(h) }
func (h deadlineHeap) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h deadlineHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].index, h[j].index = i, j
}
func (h *deadlineHeap) Push(x any) {
	it := x.(*item)
	it.index = len(*h)
	*h = append(*h, it)
}
func (h *deadlineHeap) Pop() any {
	old := *h
	it := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	it.index = -1
	return it
}

// scheduleLocked makes sure it is queued no later than at. Later deadlines are left to the
// lazy re-check in advance; that is what keeps an ordinary beat O(1).
func (r *Registry) scheduleLocked(it *item, at time.Time) {
	switch {
	case it.index < 0:
		it.at = at
		heap.Push(&r.deadlines, it)
	case at.Before(it.at):
		it.at = at
		heap.Fix(&r.deadlines, it.index)
	default:
		return
	}
	if it.index == 0 {
		// The earliest deadline moved earlier than Run may be sleeping for.
		select {
		case r.wake <- struct{}{}:
		default:
		}
	}
}

func (r *Registry) unscheduleLocked(it *item) {
	if it.index >= 0 {
		heap.Remove(&r.deadlines, it.index)
	}
}

// requeueLocked re-keys a popped-but-not-finished entry to its real deadline.
func (r *Registry) requeueLocked(it *item, at time.Time) {
	it.at = at
	heap.Fix(&r.deadlines, it.index)
}

// Run drives the liveness clock until ctx is done: it turns silent workers and hives STALE and
// removes expired ones and reserved workers that never beat. Call it once per registry.
//
// OnStartTimeout and OnExpire run on goroutines of their own, with no lock held, because the
// queen's callback makes a network call to a hive and the clock must not stall meanwhile. Run
// waits for them before it returns.
func (r *Registry) Run(ctx context.Context) {
	var callbacks sync.WaitGroup
	defer callbacks.Wait()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		next, ok, removed := r.advance(time.Now())
		for _, rm := range removed {
			callbacks.Go(func() { rm.call(rm.w) })
		}
		if ok {
			timer.Reset(time.Until(next) + r.cfg.ClockSlack)
		} else {
			timer.Stop()
		}
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		case <-r.wake:
		}
	}
}

// removal is a callback owed after a clock-driven removal.
type removal struct {
	call func(Worker)
	w    Worker
}

// advance applies every transition due at now and returns the next deadline, if any, and the
// callbacks to run once the lock is released.
func (r *Registry) advance(now time.Time) (next time.Time, ok bool, removed []removal) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.holdingLocked(now) && len(r.deadlines) > 0 {
		return r.holdUntil, true, nil
	}
	for len(r.deadlines) > 0 {
		it := r.deadlines[0]
		if it.at.After(now) {
			return it.at, true, removed
		}
		// Each branch below either removes the entry or re-keys it to a later time or a
		// later state, so the loop always makes progress.
		if e := it.worker; e != nil {
			if rm, ok := r.tickWorkerLocked(e, now); ok && rm.call != nil {
				removed = append(removed, rm)
			}
		} else {
			r.tickHiveLocked(it.hive, now)
		}
	}
	return time.Time{}, false, removed
}

// tickWorkerLocked handles e's deadline popping at now; ok reports a removal.
func (r *Registry) tickWorkerLocked(e *workerEntry, now time.Time) (rm removal, ok bool) {
	r.foldLocked(e)
	due := r.workerDue(e)
	if due.After(now) {
		r.requeueLocked(&e.deadline, due)
		return removal{}, false
	}
	// About to act: from here on beats go through the lock, and one that came without it since
	// foldLocked counts.
	r.closeFastLocked(e)
	if due = r.workerDue(e); due.After(now) {
		r.requeueLocked(&e.deadline, due)
		return removal{}, false
	}
	switch {
	case e.w.State == StateStale:
		r.removeLocked(e, ErrExpired)
		return removal{r.cfg.OnExpire, e.w}, true
	case e.w.LastHeartbeat.IsZero():
		r.removeLocked(e, ErrStartTimeout)
		return removal{r.cfg.OnStartTimeout, e.w}, true
	default:
		// Stale from the moment the deadline passed, not from when Run noticed, so expiry
		// timing does not depend on how promptly this goroutine was scheduled.
		// A hold moves that moment to its end: expiry counts from when the clock could act.
		old := e.w
		e.w.State, e.staleSince = StateStale, laterOf(due, r.holdUntil)
		r.changedLocked(e, old)
		r.requeueLocked(&e.deadline, r.workerDue(e))
		return removal{}, false
	}
}

func laterOf(a, b time.Time) time.Time {
	if a.Before(b) {
		return b
	}
	return a
}
