package registry

import (
	"context"
	"errors"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

func ticketBeat(t *testing.T, r *Registry, id string, s State) Ticket {
	t.Helper()
	tk, err := r.BeatTicketAt(Worker{ID: id, HiveID: "h1", Model: "m", Device: "cpu", PID: 42, Port: 9100, State: s}, time.Now())
	if err != nil {
		t.Fatalf("BeatTicketAt(%s, %v): %v", id, s, err)
	}
	return tk
}

// readers are the ways to read a worker: each returns the last beat of worker id (the only one).
var readers = map[string]func(r *Registry, id string) time.Time{
	"Get":        func(r *Registry, id string) time.Time { w, _ := r.Get(id); return w.LastHeartbeat },
	"GetOrLast":  func(r *Registry, id string) time.Time { w, _, _ := r.GetOrLast(id); return w.LastHeartbeat },
	"List":       func(r *Registry, id string) time.Time { return r.List("")[0].LastHeartbeat },
	"List(hive)": func(r *Registry, id string) time.Time { return r.List("h1")[0].LastHeartbeat },
	"Page":       func(r *Registry, id string) time.Time { p, _ := r.Page(Filter{}, "", 10); return p[0].LastHeartbeat },
	"Watch": func(r *Registry, id string) time.Time {
		wt := r.Watch("")
		defer wt.Close()
		return (<-wt.Events()).Worker.LastHeartbeat
	},
	"Await": func(r *Registry, id string) time.Time {
		w, _ := r.Await(context.Background(), id, func(Worker) bool { return true })
		return w.LastHeartbeat
	},
}

// A repeated beat without the lock moves the worker's last beat, as every reader sees it, and
// nothing else: no event, no revision, and the clock counts it like any beat.
func TestRebeatMovesOnlyTheBeat(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{})
		tk := ticketBeat(t, r.Registry, "w1", StateReady)
		rev := r.Revision()
		for range 3600 { // an hour of beats, none through the lock
			sleep(interval)
			if !r.Rebeat(tk, time.Now()) {
				t.Fatal("Rebeat refused a repeated beat of a worker nothing else touched")
			}
		}
		for name, read := range readers {
			sleep(time.Millisecond)
			if !r.Rebeat(tk, time.Now()) {
				t.Fatal("Rebeat refused after a read")
			}
			if got := read(r.Registry, "w1"); !got.Equal(time.Now()) {
				t.Fatalf("%s: last beat at %v, want %v", name, got, time.Now())
			}
			if name == "Await" { // a waiter closed the way around the lock (see TestRebeatWakesWaiters)
				tk = ticketBeat(t, r.Registry, "w1", StateReady)
			}
		}
		last := time.Now()
		if got := r.Revision(); got != rev {
			t.Fatalf("revision moved from %d to %d on repeated beats", rev, got)
		}
		// Silent from here: STALE exactly StaleAfter after the last beat, as with Beat.
		sleep(staleAfter - time.Millisecond)
		wantState(t, r.Registry, "w1", StateReady)
		sleep(time.Millisecond)
		if w := wantState(t, r.Registry, "w1", StateStale); !w.LastHeartbeat.Equal(last) {
			t.Fatalf("stale worker's last beat %v, want %v", w.LastHeartbeat, last)
		}
		// A STALE worker's next beat is news: it goes through the lock and brings it back.
		if r.Rebeat(tk, time.Now()) {
			t.Fatal("Rebeat recorded a beat of a STALE worker without bringing it back")
		}
		wt := r.Watch("")
		defer wt.Close()
		<-wt.Events() // the snapshot's w1
		<-wt.Events() // synced
		tk = ticketBeat(t, r.Registry, "w1", StateReady)
		if e := <-wt.Events(); e.Type != EventUpdated || e.Worker.State != StateReady {
			t.Fatalf("back from STALE: %v of %+v, want UPDATED to READY", e.Type, e.Worker)
		}
		// And expiry still counts from when it turned STALE.
		sleep(staleAfter)
		wantState(t, r.Registry, "w1", StateStale)
		if r.Rebeat(tk, time.Now().Add(-time.Second)) {
			t.Fatal("Rebeat went around the clock's STALE")
		}
		sleep(expireAfter)
		wantGone(t, r.Registry, "w1")
	})
}

// Whatever else touches a worker sends its next beat through the lock, where it is checked and
// applied in full, so that a beat without the lock can never undo or skip it.
func TestRebeatRefusedAfterOtherChanges(t *testing.T) {
	for _, c := range []struct {
		name  string
		touch func(r *Registry) (undo func())
		after func(t *testing.T, r *Registry)
	}{
		{"load", func(r *Registry) func() { _ = r.SetLoad("w1", 1, true); return nil }, func(t *testing.T, r *Registry) {
			ticketBeat(t, r, "w1", StateReady)
			wantState(t, r, "w1", StateBusy) // full: the router's overlay holds
		}},
		{"started", func(r *Registry) func() { _, _ = r.Started("w1", 43, 9101, 7, ""); return nil }, func(t *testing.T, r *Registry) {
			ticketBeat(t, r, "w1", StateReady)
			if w, _ := r.Get("w1"); w.PID != 42 || w.Port != 9100 || w.ProcessStartTime != 7 {
				t.Fatalf("after a beat: %+v, want the beat's pid and port over Started's, its start time kept", w)
			}
		}},
		{"stream closed", func(r *Registry) func() { r.StreamClosed("w1"); return nil }, func(t *testing.T, r *Registry) {
			wantState(t, r, "w1", StateStale)
			ticketBeat(t, r, "w1", StateReady)
			wantState(t, r, "w1", StateReady)
		}},
		{"beat through the lock", func(r *Registry) func() {
			_, _ = r.Beat(Worker{ID: "w1", State: StateBusy})
			return nil
		}, func(t *testing.T, r *Registry) { wantState(t, r, "w1", StateBusy) }},
		{"another ticket", func(r *Registry) func() {
			_, _ = r.BeatTicketAt(Worker{ID: "w1", State: StateBusy}, time.Now())
			return nil
		}, func(t *testing.T, r *Registry) { wantState(t, r, "w1", StateBusy) }},
		{"removed", func(r *Registry) func() { r.Remove("w1", nil); return nil }, nil},
		{"exited", func(r *Registry) func() {
			_, _ = r.Exited("h1", Process{WorkerID: "w1", PID: 42}, errors.New("killed"))
			return nil
		}, func(t *testing.T, r *Registry) {
			if _, err := r.BeatTicketAt(Worker{ID: "w1", HiveID: "h1", PID: 42, State: StateReady}, time.Now()); !errors.Is(err, ErrGone) {
				t.Fatalf("the gone process's beat through the lock: %v, want ErrGone", err)
			}
			wantGone(t, r, "w1")
		}},
		{"waiter", func(r *Registry) func() {
			ctx, cancel := context.WithCancel(context.Background())
			waiting := make(chan struct{})
			done := make(chan struct{})
			go func() {
				defer close(done)
				first := true
				_, _ = r.Await(ctx, "w1", func(Worker) bool {
					if first {
						first = false
						close(waiting)
					}
					return false
				})
			}()
			<-waiting
			return func() { cancel(); <-done }
		}, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				r := start(t, Config{})
				tk := ticketBeat(t, r.Registry, "w1", StateReady)
				sleep(interval)
				if !r.Rebeat(tk, time.Now()) {
					t.Fatal("Rebeat refused before anything else happened")
				}
				undo := c.touch(r.Registry)
				sleep(interval)
				if r.Rebeat(tk, time.Now()) {
					t.Fatal("Rebeat went around the lock after another change")
				}
				if c.after != nil {
					c.after(t, r.Registry)
				}
				if undo != nil {
					undo()
				}
			})
		})
	}
}

// A waiter is woken by every beat, so while one waits beats go through the lock, and once it is
// gone the next beat through the lock lets the repeated ones skip it again.
func TestRebeatWakesWaiters(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{})
		tk := ticketBeat(t, r.Registry, "w1", StateReady)
		since := time.Now()
		sleep(interval)
		woke := make(chan Worker)
		go func() {
			w, _ := r.Await(context.Background(), "w1", func(w Worker) bool { return w.LastHeartbeat.After(since) })
			woke <- w
		}()
		synctest.Wait()
		if r.Rebeat(tk, time.Now()) {
			t.Fatal("Rebeat went around a waiter")
		}
		tk = ticketBeat(t, r.Registry, "w1", StateReady)
		if w := <-woke; !w.LastHeartbeat.Equal(time.Now()) {
			t.Fatalf("waiter woke with a beat at %v, want %v", w.LastHeartbeat, time.Now())
		}
		sleep(interval)
		if r.Rebeat(tk, time.Now()) {
			t.Fatal("the ticket of a beat made while a waiter waited lets beats skip the lock")
		}
		tk = ticketBeat(t, r.Registry, "w1", StateReady)
		sleep(interval)
		if !r.Rebeat(tk, time.Now()) {
			t.Fatal("Rebeat still refused after the waiter left")
		}
	})
}

// Beats without the lock racing the clock, readers and other changes (run with -race): whichever
// side wins each race, the registry ends with the worker READY and its last beat the last one sent.
func TestRebeatRacesTheClock(t *testing.T) {
	const stale = 20 * time.Millisecond
	r := New(Config{Interval: stale / 3, StaleAfter: stale, ExpireAfter: time.Minute})
	ctx, cancel := context.WithCancel(t.Context())
	runDone := make(chan struct{})
	go func() { defer close(runDone); r.Run(ctx) }()
	defer func() { cancel(); <-runDone }()
	var wg sync.WaitGroup
	stop := make(chan struct{})
	beat := Worker{ID: "w1", HiveID: "h1", PID: 42, State: StateReady}
	tk, err := r.BeatTicketAt(beat, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	var last time.Time
	var fast, locked int
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
			last = time.Now()
			if r.Rebeat(tk, last) {
				fast++
				continue
			}
			locked++
			if tk, err = r.BeatTicketAt(beat, last); err != nil {
				t.Error(err)
				return
			}
		}
	})
	wg.Go(func() {
		loaded := time.Now()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			_ = r.List("")
			_, _ = r.Get("w1")
			if time.Since(loaded) > 5*time.Millisecond {
				_ = r.SetLoad("w1", uint32(i%2), false)
				loaded = time.Now()
			}
		}
	})
	time.Sleep(25 * stale)
	close(stop)
	wg.Wait()
	w := wantState(t, r, "w1", StateReady)
	if !w.LastHeartbeat.Equal(last) {
		t.Fatalf("last beat %v, want the last one sent, %v", w.LastHeartbeat, last)
	}
	if fast == 0 || locked < 2 {
		t.Fatalf("%d beats without the lock, %d through it: the race did not happen", fast, locked)
	}
}
