package router

import (
	"fmt"
	"slices"
	"time"
)

// apply folds one watch event into the router's view.
func (r *Router) apply(ev Event) {
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	switch ev.Type {
	case EventSynced:
		for id, w := range r.workers {
			if w.gen != r.gen { // not in the snapshot after a reset: gone
				r.removeLocked(w, "not in the registry's snapshot after a reset")
				delete(r.workers, id)
			}
		}
		r.syncOnce.Do(func() { close(r.synced) })
	case EventReset:
		r.gen++
	case EventAdded, EventUpdated:
		r.upsertLocked(ev.Worker, now)
	case EventRemoved:
		if w := r.workers[ev.Worker.ID]; w != nil {
			delete(r.workers, w.ID)
			r.removeLocked(w, ev.Reason)
		}
	}
}

func (r *Router) upsertLocked(in Worker, now time.Time) {
	w := r.workers[in.ID]
	if w != nil && w.Model != in.Model { // cannot happen for a real worker; treat as a new one
		delete(r.workers, w.ID)
		r.removeLocked(w, "model changed")
		w = nil
	}
	if w == nil {
		m := r.modelLocked(in.Model)
		w = &worker{m: m}
		r.workers[in.ID] = w
		m.workers = append(m.workers, w)
		delete(m.expect, in.ID)
	}
	wasServing := w.State == StateReady || w.State == StateBusy
	if in.State != w.State {
		w.brokenUntil = time.Time{} // the registry has news of it: judge it afresh
	}
	w.Worker, w.gen = in, r.gen
	serving := w.State == StateReady || w.State == StateBusy
	if serving && !wasServing && w.inFlight == 0 {
		w.idleSince = now // a fresh worker's TTL counts from when it could first serve
	}
	w.served = w.served || serving
	r.dispatchLocked(w.m, now)
}

// removeLocked drops w; leases on it finish on their own. When the model is left with nothing
// serving or starting, its queued requests learn why at once instead of timing out.
func (r *Router) removeLocked(w *worker, reason string) {
	w.gone = true
	m := w.m
	if i := slices.Index(m.workers, w); i >= 0 {
		m.workers = slices.Delete(m.workers, i, i+1)
	}
	delete(m.expect, w.ID)
	delete(r.dirty, w.ID)
	if len(m.queue) == 0 || m.anyAlive() || m.starting() > 0 {
		return
	}
	_, offered := r.offer(m.name)
	switch {
	case offered && w.served && !r.closed:
		// It served and is gone (crashed, deleted): the queue needs a new one. One that died
		// while loading is not retried, whatever state it was last seen in (its stream may have
		// broken, making it STALE, before its hive reported the exit): the next would most
		// likely fail the same way, and retrying it would be a crash loop.
		r.spawnLocked(m.queue[0].ctx, m, "replace")
	case offered:
		r.failQueueLocked(m, &StartError{Model: m.name, WorkerID: w.ID, Reason: reason})
	default:
		r.failQueueLocked(m, fmt.Errorf("model %q: worker %s went away (%s): %w", m.name, w.ID, reason, ErrNoWorker))
	}
}

// StartError says that the worker a queued request waited for went away before it served.
type StartError struct {
	Model, WorkerID, Reason string
}

func (e *StartError) Error() string {
	return "model " + e.Model + ": worker " + e.WorkerID + " went away before serving: " + e.Reason
}

func (e *StartError) Unwrap() error { return ErrStartFailed }
