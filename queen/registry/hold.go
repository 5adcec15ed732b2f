package registry

import "time"

// A queen that has just taken over from another (several queens on etcd) starts with an empty
// registry and relearns the fleet from the beats that now reach it. Until every worker has had
// time to reconnect, silence means "not yet back", not "gone": Hold keeps the liveness clock from
// acting on it.

// Hold keeps the liveness clock from acting before until: nothing turns STALE, nothing expires,
// no start timeout fires, and a closed heartbeat stream does not make its worker or hive STALE.
// At until the ordinary rules resume, each from the worker's own last beat. Beats, spawns and
// deletes go on as usual meanwhile.
func (r *Registry) Hold(until time.Time) {
	r.mu.Lock()
	r.holdUntil = until
	r.mu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Holding reports whether the clock is held at now; other liveness decisions (a router's idle
// stop) should wait out the hold too.
func (r *Registry) Holding(now time.Time) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.holdingLocked(now)
}

func (r *Registry) holdingLocked(now time.Time) bool { return now.Before(r.holdUntil) }

// Forget removes every worker (their waiters and watchers learn cause) and every hive that
// registered itself; static hives stay. A queen that stops leading forgets what it knew, so that
// if it leads again it relearns the fleet as it is then, not as it was.
func (r *Registry) Forget(cause error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for len(r.order) > 0 {
		r.removeLocked(r.order[len(r.order)-1], cause)
	}
	for id, e := range r.hives {
		if e.h.Static {
			continue
		}
		r.unscheduleLocked(&e.deadline)
		delete(r.hives, id)
		r.rev++
	}
}
