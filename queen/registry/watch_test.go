package registry

import (
	"errors"
	"fmt"
	"slices"
	"testing"
	"testing/synctest"
)

// next receives one event, failing if none is ready once every goroutine has settled.
func next(t *testing.T, wt *Watcher) Event {
	t.Helper()
	synctest.Wait()
	select {
	case e, ok := <-wt.Events():
		if !ok {
			t.Fatal("watch stream closed")
		}
		return e
	default:
		t.Fatal("no event pending")
		return Event{}
	}
}

func wantNone(t *testing.T, wt *Watcher) {
	t.Helper()
	synctest.Wait()
	select {
	case e := <-wt.Events():
		t.Fatalf("unexpected event %v %s (%v)", e.Type, e.Worker.ID, e.Worker.State)
	default:
	}
}

func wantEvent(t *testing.T, wt *Watcher, typ EventType, id string, s State) Event {
	t.Helper()
	e := next(t, wt)
	if e.Type != typ || (id != "" && e.Worker.ID != id) || (s != StateUnspecified && e.Worker.State != s) {
		t.Fatalf("event = %v %q %v, want %v %q %v", e.Type, e.Worker.ID, e.Worker.State, typ, id, s)
	}
	return e
}

func TestWatchSnapshotThenChanges(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{})
		mustBeat(t, r.Registry, "b", StateReady)
		mustBeat(t, r.Registry, "a", StateBusy)
		wt := r.Watch("")
		defer wt.Close()

		wantEvent(t, wt, EventAdded, "a", StateBusy)
		wantEvent(t, wt, EventAdded, "b", StateReady)
		synced := wantEvent(t, wt, EventSynced, "", StateUnspecified)
		if synced.Revision != r.Revision() {
			t.Fatalf("Synced at revision %d, registry at %d", synced.Revision, r.Revision())
		}

		mustBeat(t, r.Registry, "a", StateBusy) // only LastHeartbeat changes: no event
		wantNone(t, wt)

		last := synced.Revision
		step := func(typ EventType, id string, s State) {
			t.Helper()
			e := wantEvent(t, wt, typ, id, s)
			if e.Revision <= last {
				t.Fatalf("revision %d after %d", e.Revision, last)
			}
			last = e.Revision
		}
		mustBeat(t, r.Registry, "a", StateReady)
		step(EventUpdated, "a", StateReady)
		if err := r.Reserve(Worker{ID: "c", HiveID: "h1"}); err != nil {
			t.Fatal(err)
		}
		step(EventAdded, "c", StateStarting)
		if _, err := r.Started("c", 9, 9101, 99, ""); err != nil {
			t.Fatal(err)
		}
		step(EventUpdated, "c", StateStarting)
		mustBeat(t, r.Registry, "c", StateStarting) // the first beat is news even if the state is not
		step(EventUpdated, "c", StateStarting)
		sleep(staleAfter)
		var stale []string // all three went silent at the same instant, in no defined order
		for range 3 {
			e := wantEvent(t, wt, EventUpdated, "", StateStale)
			stale = append(stale, e.Worker.ID)
			last = e.Revision
		}
		if slices.Sort(stale); !slices.Equal(stale, []string{"a", "b", "c"}) {
			t.Fatalf("stale updates for %v", stale)
		}
		r.Remove("b", nil)
		step(EventRemoved, "b", StateStale)
		wantNone(t, wt)
	})
}

func TestWatchFiltersByHive(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{})
		for _, w := range []Worker{{ID: "a1", HiveID: "a"}, {ID: "b1", HiveID: "b"}, {ID: "a2", HiveID: "a"}} {
			if err := r.Reserve(w); err != nil {
				t.Fatal(err)
			}
		}
		wt := r.Watch("a")
		defer wt.Close()
		wantEvent(t, wt, EventAdded, "a1", StateStarting)
		wantEvent(t, wt, EventAdded, "a2", StateStarting)
		wantEvent(t, wt, EventSynced, "", StateUnspecified)

		if _, err := r.Beat(Worker{ID: "b1", State: StateReady}); err != nil {
			t.Fatal(err)
		}
		r.Remove("b1", nil)
		wantNone(t, wt)

		// A worker reporting another hive leaves this stream and enters the other one.
		if _, err := r.Beat(Worker{ID: "a2", HiveID: "b", State: StateReady}); err != nil {
			t.Fatal(err)
		}
		wantEvent(t, wt, EventRemoved, "a2", StateReady)
		if _, err := r.Beat(Worker{ID: "a2", HiveID: "a", State: StateReady}); err != nil {
			t.Fatal(err)
		}
		wantEvent(t, wt, EventAdded, "a2", StateReady)
		wantNone(t, wt)
	})
}

// A watcher that stops reading must cost the registry and the other watchers nothing, and
// must learn that it missed changes rather than miss them silently.
func TestSlowWatcherIsResetNotBlocking(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{WatchBuffer: 4})
		for _, id := range []string{"w0", "w1", "w2"} {
			mustBeat(t, r.Registry, id, StateReady)
		}
		slow := r.Watch("")
		defer slow.Close()
		fast := r.Watch("")
		defer fast.Close()

		// The fast watcher is read all along.
		var got []Event
		done := make(chan struct{})
		go func() {
			defer close(done)
			for e := range fast.Events() {
				got = append(got, e)
			}
		}()

		synctest.Wait() // both have read their snapshot (a snapshot is read as it is delivered)

		// Far more changes than the slow watcher can buffer. Were any of these calls to block
		// on the slow watcher, synctest would report a deadlock. The fast watcher's reader
		// gets to run between changes (synctest.Wait), as a reader that keeps up would.
		states := []State{StateBusy, StateReady}
		for i := range 100 {
			mustBeat(t, r.Registry, "w1", states[i%2])
			synctest.Wait()
		}
		r.Remove("w0", errors.New("gone"))
		mustBeat(t, r.Registry, "w3", StateStarting)
		synctest.Wait()

		// The slow watcher now catches up: its first snapshot (taken before the flood), then
		// the news that it fell behind, then a snapshot equal to the registry's current state.
		var seen []Event
		for {
			e := next(t, slow)
			seen = append(seen, e)
			if e.Type == EventReset {
				break
			}
			if len(seen) > 10 {
				t.Fatalf("no reset in %v", seen)
			}
		}
		var snap []Worker
		for e := next(t, slow); e.Type != EventSynced; e = next(t, slow) {
			if e.Type != EventAdded {
				t.Fatalf("%v inside a snapshot", e.Type)
			}
			snap = append(snap, e.Worker)
		}
		if want := r.List(""); !slices.EqualFunc(snap, want, func(a, b Worker) bool { return a == b }) {
			t.Fatalf("snapshot after reset = %+v\nList = %+v", snap, want)
		}
		wantNone(t, slow)

		// The fast watcher saw everything, in order: 3 + Synced + 100 updates + 1 removal + 1 add.
		fast.Close()
		<-done
		if len(got) != 106 {
			t.Fatalf("fast watcher got %d events, want 106", len(got))
		}
		if e := got[104]; e.Type != EventRemoved || e.Worker.ID != "w0" {
			t.Fatalf("fast watcher event 104 = %v %s", e.Type, e.Worker.ID)
		}
		for i := 4; i < len(got); i++ {
			if got[i].Revision != got[i-1].Revision+1 {
				t.Fatalf("fast watcher revisions not consecutive at %d: %d then %d", i, got[i-1].Revision, got[i].Revision)
			}
		}

		// After the reset the slow watcher is an ordinary watcher again.
		r.Remove("w3", nil)
		wantEvent(t, slow, EventRemoved, "w3", StateStarting)
	})
}

func TestWatcherCloseEndsStream(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{})
		mustBeat(t, r.Registry, "w1", StateReady)
		wt := r.Watch("")
		wt.Close() // while the pump is blocked sending the snapshot
		wt.Close() // idempotent
		for range wt.Events() {
			// Whatever was in flight may still arrive; the channel must then close.
		}
		mustBeat(t, r.Registry, "w1", StateBusy) // no watcher left to feed
		r.mu.Lock()
		n := len(r.watchers)
		r.mu.Unlock()
		if n != 0 {
			t.Fatalf("%d watchers still registered after Close", n)
		}
	})
}

// A reader that lags but keeps within the buffer gets every change in order, however the
// queue wraps and grows underneath.
func TestLaggingWatcherWithinBuffer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{WatchBuffer: 64})
		mustBeat(t, r.Registry, "w1", StateReady)
		wt := r.Watch("")
		defer wt.Close()
		wantEvent(t, wt, EventAdded, "w1", StateReady)
		wantEvent(t, wt, EventSynced, "", StateUnspecified)
		last := r.Revision()
		flip := 0
		change := func(n int) {
			for range n {
				mustBeat(t, r.Registry, "w1", []State{StateBusy, StateReady}[flip%2])
				flip++
			}
		}
		read := func(n int) {
			t.Helper()
			for range n {
				e := wantEvent(t, wt, EventUpdated, "w1", StateUnspecified)
				if e.Revision != last+1 {
					t.Fatalf("revision %d after %d", e.Revision, last)
				}
				last = e.Revision
			}
		}
		change(5)
		read(3)
		change(40) // wraps the ring, then grows it
		read(42)
		wantNone(t, wt)
	})
}

// TestAwaitAfterRemovalKnowsWhy: a wait that starts only after its worker was removed (a crash can
// beat the spawn's wait) still gets the removal cause; a new worker under the id clears it.
func TestAwaitAfterRemovalKnowsWhy(t *testing.T) {
	r := New(Config{})
	if err := r.Reserve(Worker{ID: "w1", HiveID: "h"}); err != nil {
		t.Fatal(err)
	}
	crash := errors.New("exit status 3: CUDA out of memory")
	r.Remove("w1", crash)
	w, err := r.Await(t.Context(), "w1", func(Worker) bool { return true })
	if !errors.Is(err, ErrNotFound) || !errors.Is(err, crash) || w.ID != "w1" {
		t.Fatalf("Await after removal = %+v, %v; want the last worker and the cause", w, err)
	}
	// The hive's answer to the spawn can arrive after the crash report, too.
	if _, err := r.Started("w1", 4242, 9100, 7, ""); !errors.Is(err, ErrNotFound) || !errors.Is(err, crash) {
		t.Fatalf("Started after removal = %v; want ErrNotFound with the cause", err)
	}
	if err := r.Reserve(Worker{ID: "w1", HiveID: "h"}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Await(t.Context(), "w1", func(Worker) bool { return true }); err != nil {
		t.Fatalf("Await on the new w1 = %v", err)
	}
	// Graves are bounded.
	for i := range maxGraves + 10 {
		id := fmt.Sprintf("g%d", i)
		_ = r.Reserve(Worker{ID: id, HiveID: "h"})
		r.Remove(id, crash)
	}
	if len(r.graves) > maxGraves || len(r.graveOrder) > maxGraves {
		t.Fatalf("%d graves, %d in order; want at most %d", len(r.graves), len(r.graveOrder), maxGraves)
	}
}

// A snapshot larger than a page is read as it is delivered: changes to workers it has delivered
// come as events (before SYNCED), workers it has yet to reach are shown as they are when it gets
// there, and the watcher's view ends equal to the registry's, revisions never going backwards.
func TestSnapshotIsReadAsDelivered(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{})
		const n = 5 * snapshotPage
		for i := range n {
			if _, err := r.Beat(Worker{ID: fmt.Sprintf("w%04d", i), HiveID: "h1", PID: int32(100 + i), State: StateReady}); err != nil {
				t.Fatal(err)
			}
		}
		wt := r.Watch("")
		defer wt.Close()
		var got []Event
		for range 2 * snapshotPage {
			got = append(got, next(t, wt))
		}
		delivered, ahead := got[10].Worker.ID, fmt.Sprintf("w%04d", n-10)
		mustBeatAs := func(id string, s State) {
			if _, err := r.Beat(Worker{ID: id, HiveID: "h1", PID: 1, State: s}); err != nil {
				t.Fatal(err)
			}
		}
		mustBeatAs(delivered, StateBusy)
		mustBeatAs(ahead, StateBusy)
		r.Remove(fmt.Sprintf("w%04d", n-5), nil)
		mustBeatAs("w9999", StateStarting)
		var busyEvents, synced int
		for synced == 0 {
			e := next(t, wt)
			got = append(got, e)
			switch {
			case e.Type == EventSynced:
				synced = len(got)
			case e.Type == EventUpdated && e.Worker.ID == delivered:
				busyEvents++
			case e.Type == EventUpdated:
				t.Fatalf("an update for %s, which the snapshot had not reached", e.Worker.ID)
			}
		}
		if busyEvents != 1 {
			t.Fatalf("%d updates for the delivered worker, want 1", busyEvents)
		}
		wantNone(t, wt)
		view := map[string]Worker{}
		for i, e := range got {
			if i > 0 && e.Revision < got[i-1].Revision {
				t.Fatalf("revision went back at %d: %d after %d", i, e.Revision, got[i-1].Revision)
			}
			switch e.Type {
			case EventAdded, EventUpdated:
				view[e.Worker.ID] = e.Worker
			case EventRemoved:
				delete(view, e.Worker.ID)
			}
		}
		want := r.List("")
		if len(view) != len(want) {
			t.Fatalf("the watcher sees %d workers, the registry has %d", len(view), len(want))
		}
		for _, w := range want {
			if view[w.ID] != w {
				t.Fatalf("watcher has %+v, registry %+v", view[w.ID], w)
			}
		}
	})
}

// The router's load overlay is what users see between beats and across them: a full worker is
// BUSY although it keeps reporting READY, its in-flight count survives beats, and watchers hear
// each change once.
func TestSetLoadOverlaysBeats(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{})
		mustBeat(t, r.Registry, "a", StateReady)
		wt := r.Watch("")
		defer wt.Close()
		wantEvent(t, wt, EventAdded, "a", StateReady)
		wantEvent(t, wt, EventSynced, "", StateUnspecified)

		if err := r.SetLoad("a", 2, true); err != nil {
			t.Fatal(err)
		}
		if e := wantEvent(t, wt, EventUpdated, "a", StateBusy); e.Worker.InFlight != 2 {
			t.Fatalf("in flight = %d, want 2", e.Worker.InFlight)
		}
		mustBeat(t, r.Registry, "a", StateReady) // the worker's own view must not undo the overlay
		if w, _ := r.Get("a"); w.State != StateBusy || w.InFlight != 2 {
			t.Fatalf("after a READY beat: %v in flight %d, want BUSY 2", w.State, w.InFlight)
		}
		wantNone(t, wt)
		if err := r.SetLoad("a", 2, true); err != nil { // no change, no event
			t.Fatal(err)
		}
		wantNone(t, wt)

		if err := r.SetLoad("a", 1, false); err != nil {
			t.Fatal(err)
		}
		wantEvent(t, wt, EventUpdated, "a", StateReady)
		mustBeat(t, r.Registry, "a", StateStopping) // a worker's STOPPING is never hidden
		if err := r.SetLoad("a", 1, true); err != nil {
			t.Fatal(err)
		}
		if w, _ := r.Get("a"); w.State != StateStopping {
			t.Fatalf("full and STOPPING shows %v, want STOPPING", w.State)
		}
		if err := r.SetLoad("gone", 0, false); !errors.Is(err, ErrNotFound) {
			t.Fatalf("SetLoad of an unknown worker: %v, want ErrNotFound", err)
		}
	})
}
