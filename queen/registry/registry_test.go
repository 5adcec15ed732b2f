package registry

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// Test timings: the defaults, spelled out so the arithmetic in tests is visible.
const (
	interval     = time.Second
	staleAfter   = 3 * interval
	expireAfter  = 5 * time.Minute
	startTimeout = 30 * time.Second
)

// calls records callback invocations; the clock calls them from its own goroutine.
type calls struct {
	mu sync.Mutex
	ws []Worker
}

func (c *calls) add(w Worker) { c.mu.Lock(); c.ws = append(c.ws, w); c.mu.Unlock() }
func (c *calls) get() []Worker {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Worker(nil), c.ws...)
}

type fixture struct {
	*Registry
	startTimeouts, expiries *calls
}

// start returns a registry whose clock runs until the test ends. Inside a synctest bubble the
// clock is fake, so tests sleep through minutes at no cost.
func start(t *testing.T, cfg Config) fixture {
	t.Helper()
	f := fixture{startTimeouts: &calls{}, expiries: &calls{}}
	cfg.Interval, cfg.StaleAfter, cfg.ExpireAfter, cfg.StartTimeout = interval, staleAfter, expireAfter, startTimeout
	cfg.OnStartTimeout, cfg.OnExpire = f.startTimeouts.add, f.expiries.add
	f.Registry = New(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { f.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return f
}

// sleep advances fake time by d and lets the clock catch up.
func sleep(d time.Duration) {
	time.Sleep(d)
	synctest.Wait()
}

func mustBeat(t *testing.T, r *Registry, id string, s State) Worker {
	t.Helper()
	w, err := r.Beat(Worker{ID: id, HiveID: "h1", Model: "m", Device: "cpu", PID: 42, Port: 9100, State: s})
	if err != nil {
		t.Fatalf("Beat(%s, %v): %v", id, s, err)
	}
	return w
}

func wantState(t *testing.T, r *Registry, id string, want State) Worker {
	t.Helper()
	w, ok := r.Get(id)
	if !ok {
		t.Fatalf("worker %s is gone, want %v", id, want)
	}
	if w.State != want {
		t.Fatalf("worker %s is %v, want %v", id, w.State, want)
	}
	return w
}

func wantGone(t *testing.T, r *Registry, id string) {
	t.Helper()
	if w, ok := r.Get(id); ok {
		t.Fatalf("worker %s still there (%v), want removed", id, w.State)
	}
}

func TestSpawnedWorkerIsStartingUntilFirstBeat(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{})
		if err := r.Reserve(Worker{ID: "w1", HiveID: "h1", Model: "m"}); err != nil {
			t.Fatal(err)
		}
		w := wantState(t, r.Registry, "w1", StateStarting)
		if !w.LastHeartbeat.IsZero() || w.PID != 0 {
			t.Fatalf("reserved worker has beat or pid: %+v", w)
		}
		sleep(5 * time.Second)
		mustBeat(t, r.Registry, "w1", StateReady)
		w = wantState(t, r.Registry, "w1", StateReady)
		if !w.LastHeartbeat.Equal(time.Now()) || w.Reported != StateReady || w.PID != 42 {
			t.Fatalf("after first beat: %+v", w)
		}
	})
}

func TestStaleAndBack(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{})
		mustBeat(t, r.Registry, "w1", StateReady)
		sleep(staleAfter - time.Millisecond)
		wantState(t, r.Registry, "w1", StateReady)
		sleep(time.Millisecond)
		if w := wantState(t, r.Registry, "w1", StateStale); w.Reported != StateReady {
			t.Fatalf("stale worker forgot its reported state: %v", w.Reported)
		}
		sleep(time.Minute)
		mustBeat(t, r.Registry, "w1", StateBusy)
		wantState(t, r.Registry, "w1", StateBusy)
		// Back to normal liveness: stale again only after a full StaleAfter of silence.
		sleep(staleAfter - time.Millisecond)
		wantState(t, r.Registry, "w1", StateBusy)
		sleep(time.Millisecond)
		wantState(t, r.Registry, "w1", StateStale)
	})
}

func TestStaleWorkerExpires(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{})
		mustBeat(t, r.Registry, "w1", StateReady)
		sleep(staleAfter)
		wantState(t, r.Registry, "w1", StateStale)
		sleep(expireAfter - time.Millisecond)
		wantState(t, r.Registry, "w1", StateStale)
		sleep(time.Millisecond)
		wantGone(t, r.Registry, "w1")
		if got := r.expiries.get(); len(got) != 1 || got[0].ID != "w1" || got[0].State != StateStale {
			t.Fatalf("OnExpire calls = %+v, want w1 once", got)
		}
		if n := len(r.startTimeouts.get()); n != 0 {
			t.Fatalf("OnStartTimeout called %d times", n)
		}
	})
}

// Only a process proven gone (Exited) is refused: a worker the operator did not delete that beats
// again after expiring, or after a stream closed on STOPPING, is taken back, as after a queen restart.
func TestBeatsOfGoneProcessesAreRefused(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{})
		w := mustBeat(t, r.Registry, "w1", StateReady)
		p := Process{WorkerID: "w1", PID: w.PID, StartTime: w.ProcessStartTime}
		if _, ok := r.Exited("other-hive", p, errors.New("deleted")); ok {
			t.Fatal("Exited removed a worker of another hive")
		}
		if _, ok := r.Exited("h1", p, errors.New("deleted")); !ok {
			t.Fatal("Exited did not remove the worker")
		}
		if _, err := r.Beat(w); !errors.Is(err, ErrGone) {
			t.Fatalf("beat of the gone process: %v, want ErrGone", err)
		}
		wantGone(t, r.Registry, "w1")
		// A new spawn under the id: the old process's beats must not take over the new entry.
		if err := r.Reserve(Worker{ID: "w1", HiveID: "h1"}); err != nil {
			t.Fatal(err)
		}
		if _, err := r.Beat(w); !errors.Is(err, ErrGone) {
			t.Fatalf("beat of the gone process on a new entry: %v, want ErrGone", err)
		}
		if got := wantState(t, r.Registry, "w1", StateStarting); got.PID != 0 {
			t.Fatalf("the new entry took the dead PID %d", got.PID)
		}
		fresh := w
		fresh.PID = w.PID + 1
		if _, err := r.Beat(fresh); err != nil {
			t.Fatalf("beat of the new process: %v", err)
		}
		wantState(t, r.Registry, "w1", StateReady)

		// Expiry is not proof of death: the same process beating again is re-registered.
		mustBeat(t, r.Registry, "w2", StateReady)
		sleep(staleAfter + expireAfter)
		wantGone(t, r.Registry, "w2")
		mustBeat(t, r.Registry, "w2", StateReady)
		wantState(t, r.Registry, "w2", StateReady)
		// Nor is a removal by the caller without proof.
		r.Remove("w2", nil)
		mustBeat(t, r.Registry, "w2", StateReady)
		wantState(t, r.Registry, "w2", StateReady)
	})
}

func TestStreamClosed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{})
		mustBeat(t, r.Registry, "busy", StateBusy)
		mustBeat(t, r.Registry, "stopping", StateStopping)
		sleep(interval)

		// Not STOPPING: maybe only partitioned, so STALE at once but kept until expiry.
		r.StreamClosed("busy")
		wantState(t, r.Registry, "busy", StateStale)
		sleep(expireAfter - time.Millisecond)
		wantState(t, r.Registry, "busy", StateStale)
		sleep(time.Millisecond)
		wantGone(t, r.Registry, "busy")

		// STOPPING said goodbye: removed at once (it was long stale by now, which changes nothing).
		mustBeat(t, r.Registry, "stopping", StateStopping)
		ctx := t.Context()
		res := make(chan error, 1)
		go func() {
			_, err := r.Await(ctx, "stopping", func(Worker) bool { return false })
			res <- err
		}()
		synctest.Wait()
		r.StreamClosed("stopping")
		wantGone(t, r.Registry, "stopping")
		if err := <-res; !errors.Is(err, ErrNotFound) || !errors.Is(err, ErrStopped) {
			t.Fatalf("Await after stop = %v, want ErrNotFound and ErrStopped", err)
		}
		r.StreamClosed("unknown") // no panic, no effect
		if r.Len() != 0 {
			t.Fatalf("Len = %d", r.Len())
		}
	})
}

func TestStartTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{})
		if err := r.Reserve(Worker{ID: "never", HiveID: "h1"}); err != nil {
			t.Fatal(err)
		}
		if _, err := r.Started("never", 77, 9101, 1234, ""); err != nil {
			t.Fatal(err)
		}
		sleep(startTimeout - time.Millisecond)
		wantState(t, r.Registry, "never", StateStarting)
		if n := len(r.startTimeouts.get()); n != 0 {
			t.Fatalf("OnStartTimeout called early (%d)", n)
		}
		sleep(time.Millisecond)
		wantGone(t, r.Registry, "never")
		sleep(time.Hour)
		got := r.startTimeouts.get()
		if len(got) != 1 || got[0].ID != "never" || got[0].PID != 77 || got[0].ProcessStartTime != 1234 {
			t.Fatalf("OnStartTimeout calls = %+v, want one with the process data", got)
		}
		if n := len(r.expiries.get()); n != 0 {
			t.Fatalf("OnExpire called %d times", n)
		}
	})
}

func TestNoStartTimeoutAfterBeat(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{})
		if err := r.Reserve(Worker{ID: "w1", HiveID: "h1"}); err != nil {
			t.Fatal(err)
		}
		sleep(startTimeout - time.Second)
		mustBeat(t, r.Registry, "w1", StateStarting) // alive, still loading the model
		for range 60 {
			sleep(interval)
			mustBeat(t, r.Registry, "w1", StateReady)
		}
		wantState(t, r.Registry, "w1", StateReady)
		if n := len(r.startTimeouts.get()); n != 0 {
			t.Fatalf("OnStartTimeout called %d times for a worker that beat in time", n)
		}
	})
}

func TestBeatingAtIntervalNeverStale(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{})
		ids := []string{"a", "b", "c"}
		for _, id := range ids {
			mustBeat(t, r.Registry, id, StateReady)
		}
		rev := r.Revision()
		for i := range 6 * 3600 { // six simulated hours
			sleep(interval)
			for _, id := range ids {
				if w := mustBeat(t, r.Registry, id, StateReady); w.State != StateReady {
					t.Fatalf("beat %d: %s is %v", i, id, w.State)
				}
			}
		}
		// Any excursion to STALE and back would have been a published change.
		if got := r.Revision(); got != rev {
			t.Fatalf("revision moved from %d to %d while every worker beat on time", rev, got)
		}
	})
}

func TestHiveLiveness(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{})
		if _, err := r.HiveBeat(Hive{ID: "h1", Address: "10.0.0.1:7835", Version: "v1", Devices: []string{"cpu"}}); err != nil {
			t.Fatal(err)
		}
		wantHive := func(want HiveState) {
			t.Helper()
			h, ok := r.GetHive("h1")
			if !ok || h.State != want {
				t.Fatalf("hive h1 = %+v (found %v), want %v", h, ok, want)
			}
		}
		sleep(staleAfter - time.Millisecond)
		wantHive(HiveReady)
		sleep(time.Millisecond)
		wantHive(HiveStale)
		if _, err := r.HiveBeat(Hive{ID: "h1"}); err != nil {
			t.Fatal(err)
		}
		wantHive(HiveReady)
		if h, _ := r.GetHive("h1"); h.Address != "10.0.0.1:7835" {
			t.Fatalf("a beat without address lost it: %q", h.Address)
		}
		r.HiveStreamClosed("h1")
		wantHive(HiveStale)
		sleep(expireAfter - time.Millisecond)
		wantHive(HiveStale)
		sleep(time.Millisecond)
		if _, ok := r.GetHive("h1"); ok {
			t.Fatal("stale hive not removed after ExpireAfter")
		}
	})
}

func TestStaticHiveNeverExpires(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{})
		if err := r.AddStaticHive("s1", "10.0.0.9:7835"); err != nil {
			t.Fatal(err)
		}
		if err := r.AddStaticHive("s1", "elsewhere:1"); !errors.Is(err, ErrExists) {
			t.Fatalf("second AddStaticHive = %v, want ErrExists", err)
		}
		sleep(time.Hour)
		h, err := r.HiveBeat(Hive{ID: "s1", Address: "advertised:1", Version: "v2", OS: "linux", Devices: []string{"cuda:0"}, FreePorts: 900})
		if err != nil {
			t.Fatal(err)
		}
		if !h.Static || h.State != HiveReady || h.Address != "10.0.0.9:7835" || h.Version != "v2" || h.FreePorts != 900 {
			t.Fatalf("static hive after beat = %+v", h)
		}
		r.HiveStreamClosed("s1")
		sleep(24 * time.Hour)
		if h, ok := r.GetHive("s1"); !ok || h.State != HiveReady {
			t.Fatalf("static hive = %+v (found %v), want READY forever", h, ok)
		}
	})
}

func TestAwait(t *testing.T) {
	ready := func(w Worker) bool { return w.State == StateReady }
	t.Run("ready", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			r := start(t, Config{})
			if err := r.Reserve(Worker{ID: "w1"}); err != nil {
				t.Fatal(err)
			}
			go func() {
				time.Sleep(2 * time.Second)
				mustBeat(t, r.Registry, "w1", StateStarting)
				time.Sleep(2 * time.Second)
				mustBeat(t, r.Registry, "w1", StateReady)
			}()
			startAt := time.Now()
			w, err := r.Await(t.Context(), "w1", ready)
			if err != nil || w.State != StateReady || time.Since(startAt) != 4*time.Second {
				t.Fatalf("Await = %+v, %v after %v", w, err, time.Since(startAt))
			}
			// Already true: returns at once.
			if _, err := r.Await(t.Context(), "w1", ready); err != nil {
				t.Fatal(err)
			}
		})
	})
	t.Run("removed", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			r := start(t, Config{})
			if err := r.Reserve(Worker{ID: "w1", Model: "m"}); err != nil {
				t.Fatal(err)
			}
			cause := errors.New("deleted by operator")
			go func() {
				time.Sleep(time.Second)
				r.Remove("w1", cause)
				// Same id again: must not confuse the waiter.
				_ = r.Reserve(Worker{ID: "w1"})
			}()
			w, err := r.Await(t.Context(), "w1", ready)
			if !errors.Is(err, ErrNotFound) || !errors.Is(err, cause) || w.ID != "w1" || w.Model != "m" {
				t.Fatalf("Await = %+v, %v; want last known worker and cause", w, err)
			}
		})
	})
	t.Run("start timeout", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			r := start(t, Config{})
			if err := r.Reserve(Worker{ID: "w1"}); err != nil {
				t.Fatal(err)
			}
			_, err := r.Await(t.Context(), "w1", ready)
			if !errors.Is(err, ErrNotFound) || !errors.Is(err, ErrStartTimeout) {
				t.Fatalf("Await = %v, want ErrStartTimeout", err)
			}
		})
	})
	t.Run("context", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			r := start(t, Config{})
			mustBeat(t, r.Registry, "w1", StateStarting)
			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
			defer cancel()
			w, err := r.Await(ctx, "w1", ready)
			if !errors.Is(err, context.DeadlineExceeded) || w.ID != "w1" {
				t.Fatalf("Await = %+v, %v; want deadline exceeded", w, err)
			}
			if _, err := r.Await(ctx, "nobody", ready); !errors.Is(err, ErrNotFound) {
				t.Fatalf("Await unknown = %v, want ErrNotFound", err)
			}
		})
	})
}

func TestReserveStartedBeat(t *testing.T) {
	r := New(Config{})
	if err := r.Reserve(Worker{ID: "w1", HiveID: "h1"}); err != nil {
		t.Fatal(err)
	}
	if err := r.Reserve(Worker{ID: "w1", HiveID: "h1"}); !errors.Is(err, ErrExists) {
		t.Fatalf("duplicate Reserve = %v, want ErrExists", err)
	}
	if err := r.Reserve(Worker{}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Reserve without id = %v, want ErrInvalid", err)
	}
	// The worker beat before the hive answered Spawn: Started must not undo READY.
	mustBeat(t, r, "w1", StateReady)
	w, err := r.Started("w1", 4242, 9200, 777, "10.0.0.7")
	if err != nil || w.State != StateReady || w.PID != 4242 || w.Port != 9200 || w.ProcessStartTime != 777 || w.Address != "10.0.0.7" {
		t.Fatalf("Started = %+v, %v", w, err)
	}
	if _, ok := r.Remove("w1", nil); !ok {
		t.Fatal("Remove found nothing")
	}
	if _, err := r.Started("w1", 1, 1, 1, ""); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Started after Remove = %v, want ErrNotFound", err)
	}
	if _, ok := r.Remove("w1", nil); ok {
		t.Fatal("second Remove found the worker")
	}

	// A restarted queen relearns workers from their beats, once each.
	for range 3 {
		for _, id := range []string{"b", "a", "c"} {
			mustBeat(t, r, id, StateBusy)
		}
	}
	ws := r.List("")
	if len(ws) != 3 || r.Len() != 3 || ws[0].ID != "a" || ws[1].ID != "b" || ws[2].ID != "c" {
		t.Fatalf("List = %+v", ws)
	}
	if err := r.Reserve(Worker{ID: "a"}); !errors.Is(err, ErrExists) {
		t.Fatalf("Reserve of a relearned id = %v, want ErrExists", err)
	}
	// A worker may not report STALE or nothing: the last reported state stands.
	if w, _ := r.Beat(Worker{ID: "a"}); w.State != StateBusy || w.HiveID != "h1" || w.Model != "m" {
		t.Fatalf("Beat with empty descriptor = %+v", w)
	}
	if w, _ := r.Beat(Worker{ID: "fresh", State: StateStale}); w.State != StateStarting {
		t.Fatalf("new worker reporting STALE = %v, want STARTING", w.State)
	}
}

func TestListFiltersByHive(t *testing.T) {
	r := New(Config{})
	for _, w := range []Worker{{ID: "3", HiveID: "b"}, {ID: "1", HiveID: "a"}, {ID: "2", HiveID: "a"}} {
		if err := r.Reserve(w); err != nil {
			t.Fatal(err)
		}
	}
	if got := r.List("a"); len(got) != 2 || got[0].ID != "1" || got[1].ID != "2" {
		t.Fatalf("List(a) = %+v", got)
	}
	if got := r.List("nope"); len(got) != 0 {
		t.Fatalf("List(nope) = %+v", got)
	}
}

func TestPageFiltersAndWalks(t *testing.T) {
	r := New(Config{})
	for i := range 30 {
		w := Worker{ID: fmt.Sprintf("w%02d", i), HiveID: []string{"a", "b"}[i%2], Model: []string{"m1", "m2", "m3"}[i%3],
			PID: int32(100 + i), State: StateReady}
		if i%5 == 0 {
			w.State = StateBusy
		}
		if _, err := r.Beat(w); err != nil {
			t.Fatal(err)
		}
	}
	walk := func(f Filter, size int) (ids []string, pages int) {
		after := ""
		for {
			ws, more := r.Page(f, after, size)
			pages++
			for _, w := range ws {
				if !f.match(&w) {
					t.Fatalf("Page(%+v) returned %+v", f, w)
				}
				ids = append(ids, w.ID)
			}
			if !more {
				return ids, pages
			}
			if len(ws) == 0 {
				t.Fatalf("Page(%+v, %q) is empty but says more follow", f, after)
			}
			after = ws[len(ws)-1].ID
		}
	}
	for _, tt := range []struct {
		f          Filter
		size, want int
	}{
		{Filter{}, 7, 30},
		{Filter{}, 30, 30},
		{Filter{}, 100, 30},
		{Filter{HiveID: "a"}, 4, 15},
		{Filter{Model: "m2"}, 3, 10},
		{Filter{HiveID: "a", Model: "m1"}, 2, 5},
		{Filter{State: StateBusy}, 2, 6},
		{Filter{HiveID: "a", State: StateBusy}, 1, 3},
		{Filter{HiveID: "none"}, 10, 0},
		{Filter{State: StateStale}, 10, 0},
	} {
		ids, pages := walk(tt.f, tt.size)
		if len(ids) != tt.want || !slices.IsSorted(ids) || len(slices.Compact(slices.Clone(ids))) != len(ids) {
			t.Errorf("walk %+v by %d: %d workers %v, want %d sorted, distinct", tt.f, tt.size, len(ids), ids, tt.want)
		}
		if wantPages := max(1, (tt.want+tt.size-1)/tt.size); pages != wantPages {
			t.Errorf("walk %+v by %d took %d pages, want %d (no empty last page)", tt.f, tt.size, pages, wantPages)
		}
	}
	// Changes between pages: workers there all along are each seen once; removed ones behind
	// the cursor and added ones ahead of it change nothing for the others.
	first, more := r.Page(Filter{}, "", 10)
	if !more || len(first) != 10 {
		t.Fatalf("first page: %d workers, more %v", len(first), more)
	}
	r.Remove("w05", nil)
	r.Remove("w09", nil) // the cursor itself
	r.Remove("w20", nil)
	if _, err := r.Beat(Worker{ID: "w15a", HiveID: "a", PID: 99}); err != nil {
		t.Fatal(err)
	}
	rest, _ := r.Page(Filter{}, first[len(first)-1].ID, 100)
	var ids []string
	for _, w := range append(first, rest...) {
		ids = append(ids, w.ID)
	}
	if len(ids) != 30 || ids[10] != "w10" || !slices.Contains(ids, "w15a") || slices.Contains(ids[10:], "w20") {
		t.Fatalf("walk across changes: %v", ids)
	}
}

func TestPickHive(t *testing.T) {
	r := New(Config{})
	if _, err := r.PickHive(Need{}); !errors.Is(err, ErrNoHive) {
		t.Fatalf("PickHive on empty = %v, want ErrNoHive", err)
	}
	for _, id := range []string{"c", "a", "b", "d"} {
		if _, err := r.HiveBeat(Hive{ID: id, Address: id + ":1", FreePorts: 100}); err != nil {
			t.Fatal(err)
		}
	}
	r.HiveStreamClosed("d") // stale hives get no work, however idle
	for i, hive := range []string{"a", "a", "b", "c"} {
		if err := r.Reserve(Worker{ID: string(rune('0' + i)), HiveID: hive}); err != nil {
			t.Fatal(err)
		}
	}
	h, err := r.PickHive(Need{})
	if err != nil || h.ID != "b" || h.Workers != 1 {
		t.Fatalf("PickHive = %+v, %v; want b (1 worker, ties by id)", h, err)
	}
	hs := r.ListHives()
	if len(hs) != 4 || hs[0].ID != "a" || hs[0].Workers != 2 || hs[3].State != HiveStale {
		t.Fatalf("ListHives = %+v", hs)
	}
}

// TestPickHiveByRoom: placement skips hives with no room (free slots as reported at the last beat,
// less the workers placed since) and those Need.Fits refuses, says why for each when none is left,
// and takes a hive never heard from (static, unknown room).
func TestPickHiveByRoom(t *testing.T) {
	r := New(Config{})
	beat := func(id string, free uint32) {
		t.Helper()
		if _, err := r.HiveBeat(Hive{ID: id, Address: id + ":1", FreePorts: free}); err != nil {
			t.Fatal(err)
		}
	}
	beat("full", 0)
	beat("roomy", 2)
	for _, id := range []string{"r0", "r1"} { // the full hive has fewer workers, and still gets none
		if err := r.Reserve(Worker{ID: id, HiveID: "roomy"}); err != nil {
			t.Fatal(err)
		}
	}
	// Two placed on roomy since its beat said 2 free: it is full too until it beats again.
	_, err := r.PickHive(Need{})
	var nf *NoFitError
	if !errors.As(err, &nf) || !errors.Is(err, ErrNoHive) || len(nf.Reasons) != 2 ||
		!strings.Contains(nf.Reasons[0], "hive full: no free worker slot") || !strings.Contains(nf.Reasons[1], "hive roomy") {
		t.Fatalf("PickHive with every hive full = %v; want a NoFitError naming both", err)
	}
	beat("roomy", 1) // its beat now counts the two
	if h, err := r.PickHive(Need{}); err != nil || h.ID != "roomy" {
		t.Fatalf("PickHive = %+v, %v; want roomy (one slot)", h, err)
	}
	no := func(Hive) (bool, string) { return false, `does not offer model "m"` }
	if _, err := r.PickHive(Need{Fits: no}); !errors.As(err, &nf) || !strings.Contains(err.Error(), `hive roomy: does not offer model "m"`) {
		t.Fatalf("PickHive with Fits refusing = %v", err)
	}
	if err := r.AddStaticHive("static", "s:1"); err != nil {
		t.Fatal(err)
	}
	beat("roomy", 0)
	if h, err := r.PickHive(Need{}); err != nil || h.ID != "static" {
		t.Fatalf("PickHive = %+v, %v; want the static hive (room unknown)", h, err)
	}
}

func TestValuesAreCopies(t *testing.T) {
	r := New(Config{})
	devs := []string{"cuda:0"}
	h, _ := r.HiveBeat(Hive{ID: "h", Devices: devs})
	devs[0], h.Devices[0] = "changed", "changed"
	if got, _ := r.GetHive("h"); got.Devices[0] != "cuda:0" {
		t.Fatalf("registry hive shares memory with callers: %v", got.Devices)
	}
}

// The clock sleeps until its earliest deadline; a deadline earlier than that must wake it.
func TestClockWakesForEarlierDeadline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{})
		if err := r.Reserve(Worker{ID: "slow"}); err != nil { // the clock now sleeps 30s
			t.Fatal(err)
		}
		sleep(time.Second)
		mustBeat(t, r.Registry, "fast", StateReady) // due in 3s, long before 30s
		sleep(staleAfter)
		wantState(t, r.Registry, "fast", StateStale)
		wantState(t, r.Registry, "slow", StateStarting)
	})
}

func TestHiveExpiryKeepsWorkers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{})
		if _, err := r.HiveBeat(Hive{ID: "h1", Address: "x:1"}); err != nil {
			t.Fatal(err)
		}
		for range expireAfter / interval * 2 {
			mustBeat(t, r.Registry, "w1", StateReady) // mustBeat reports hive h1
			sleep(interval)
		}
		if _, ok := r.GetHive("h1"); ok {
			t.Fatal("silent hive still registered")
		}
		// Workers report to the queen directly; a silent hive says nothing about them.
		wantState(t, r.Registry, "w1", StateReady)
		// The hive comes back and finds its worker counted.
		if h, _ := r.HiveBeat(Hive{ID: "h1", Address: "x:1"}); h.Workers != 1 || h.State != HiveReady {
			t.Fatalf("returning hive = %+v", h)
		}
	})
}

func TestConfigDefaults(t *testing.T) {
	c := New(Config{Interval: 2 * time.Second}).Config()
	if c.StaleAfter != 6*time.Second || c.ExpireAfter != 5*time.Minute || c.StartTimeout != 30*time.Second || c.WatchBuffer != 1024 {
		t.Fatalf("defaults = %+v", c)
	}
	if c := New(Config{}).Config(); c.Interval != time.Second || c.StaleAfter != 3*time.Second {
		t.Fatalf("defaults = %+v", c)
	}
}

func TestNames(t *testing.T) {
	for _, tc := range []struct{ got, want string }{
		{StateStarting.String(), "STARTING"},
		{StateStale.String(), "STALE"},
		{State(99).String(), "State(99)"},
		{HiveReady.String(), "READY"},
		{HiveStale.String(), "STALE"},
		{EventReset.String(), "RESET"},
		{EventSynced.String(), "SYNCED"},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
}

// A smoke test for the race detector: every entry point at once, on the real clock.
// TestConcurrentUse runs every operation at once (under -race) and then checks what users rely on
// after such a storm: List is sorted without duplicates and agrees with Get, Len and the hives'
// worker counts; a watcher that followed it all (resets included) ends with exactly the
// registry's workers, its revisions never going backwards; a wait for BUSY only ever returns a
// BUSY worker; and the clock stops when asked.
func TestConcurrentUse(t *testing.T) {
	r := New(Config{Interval: time.Millisecond, ExpireAfter: 20 * time.Millisecond, StartTimeout: 10 * time.Millisecond, WatchBuffer: 8})
	ctx, cancel := context.WithCancel(t.Context())
	runDone := make(chan struct{})
	go func() { defer close(runDone); r.Run(ctx) }()
	ids := []string{"a", "b", "c", "d", "e", "f"}
	hives := []string{"h", "h2"}

	// Watchers of all hives and of one hive follow everything from the start.
	all, onlyH := r.Watch(""), r.Watch("h")
	views := []*watchView{newWatchView(all), newWatchView(onlyH)}
	var storm, others sync.WaitGroup
	quiet := make(chan struct{}) // closed once the storm is over
	for g := range 4 {
		storm.Go(func() {
			for i := range 2000 {
				id, hive := ids[(i+g)%len(ids)], hives[(i/7+g)%len(hives)]
				switch i % 7 {
				case 0:
					_ = r.Reserve(Worker{ID: id, HiveID: hive})
				case 1:
					_, _ = r.Started(id, 1, 2, 3, "")
				case 2:
					r.StreamClosed(id)
				case 3:
					r.Remove(id, nil)
				case 4:
					_, _ = r.HiveBeat(Hive{ID: hive, Devices: []string{"cpu"}})
					_, _ = r.PickHive(Need{})
				default:
					_, _ = r.Beat(Worker{ID: id, HiveID: hive, State: State(1 + i%4)})
					_ = r.List(hive)
				}
			}
		})
	}
	// Short-lived watchers come and go meanwhile.
	others.Go(func() {
		for range 20 {
			wt := r.Watch("")
			for range 50 {
				select {
				case <-wt.Events():
				case <-quiet:
				}
			}
			wt.Close()
		}
	})
	others.Go(func() {
		for range 200 {
			actx, acancel := context.WithTimeout(ctx, time.Millisecond)
			w, err := r.Await(actx, "a", func(w Worker) bool { return w.State == StateBusy })
			acancel()
			if err == nil && w.State != StateBusy {
				t.Errorf("Await returned %v without error, want BUSY", w.State)
			}
		}
	})
	storm.Wait()
	close(quiet)
	others.Wait()
	cancel()
	select {
	case <-runDone:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after its context ended")
	}

	// The registry is quiet now: check it against itself and against the watchers.
	list := r.List("")
	if len(list) != r.Len() {
		t.Errorf("List has %d workers, Len says %d", len(list), r.Len())
	}
	perHive := map[string]int{}
	for i, w := range list {
		if i > 0 && list[i-1].ID >= w.ID {
			t.Errorf("List not sorted or duplicated at %d: %q then %q", i, list[i-1].ID, w.ID)
		}
		if g, ok := r.Get(w.ID); !ok || g != w {
			t.Errorf("Get(%q) = %+v, %v; List has %+v", w.ID, g, ok, w)
		}
		perHive[w.HiveID]++
	}
	for _, h := range r.ListHives() {
		if h.Workers != perHive[h.ID] || len(r.List(h.ID)) != perHive[h.ID] {
			t.Errorf("hive %s counts %d workers, List(%q) has %d, want %d", h.ID, h.Workers, h.ID, len(r.List(h.ID)), perHive[h.ID])
		}
	}
	rev := r.Revision()
	for i, v := range views {
		hive := []string{"", "h"}[i]
		got := v.until(t, rev)
		want := map[string]Worker{}
		for _, w := range r.List(hive) {
			want[w.ID] = w
		}
		if len(got) != len(want) {
			t.Errorf("watcher of %q ends with %d workers, the registry has %d", hive, len(got), len(want))
		}
		for id, w := range want {
			// Beats that only move LastHeartbeat are not events, by design.
			if g, ok := got[id]; !ok || !sameButBeat(g, w) {
				t.Errorf("watcher of %q has %s = %+v (%v), the registry %+v", hive, id, g, ok, w)
			}
		}
	}
	all.Close()
	onlyH.Close()
}

// watchView applies a watcher's events to a map of workers, as a client of WatchWorkers does.
type watchView struct {
	wt      *Watcher
	workers map[string]Worker
	rev     uint64
	synced  bool
}

func newWatchView(wt *Watcher) *watchView {
	return &watchView{wt: wt, workers: map[string]Worker{}}
}

// until applies events until the view is synced at revision rev or later; it fails the test on a
// revision going backwards, and if rev is not reached within 10 s.
func (v *watchView) until(t *testing.T, rev uint64) map[string]Worker {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for !v.synced || v.rev < rev {
		var e Event
		select {
		case e = <-v.wt.Events():
		case <-timeout:
			t.Fatalf("watcher at revision %d (synced %v), registry at %d after 10s", v.rev, v.synced, rev)
		}
		if e.Type != EventReset && e.Revision < v.rev {
			t.Fatalf("%v event at revision %d after revision %d", e.Type, e.Revision, v.rev)
		}
		switch e.Type {
		case EventAdded, EventUpdated:
			v.workers[e.Worker.ID] = e.Worker
		case EventRemoved:
			delete(v.workers, e.Worker.ID)
		case EventSynced:
			v.synced = true
		case EventReset:
			clear(v.workers)
			v.synced = false
			continue
		}
		v.rev = e.Revision
	}
	return v.workers
}

// TestGetOrLast: a removed worker's last state (its hive, for its log) stays findable until it
// falls out of the recent removals or its id is used again.
func TestGetOrLast(t *testing.T) {
	r := New(Config{})
	if err := r.Reserve(Worker{ID: "gone", HiveID: "h1", Model: "m"}); err != nil {
		t.Fatal(err)
	}
	if w, removed, ok := r.GetOrLast("gone"); !ok || removed || w.HiveID != "h1" {
		t.Fatalf("live: %+v %v %v", w, removed, ok)
	}
	r.Remove("gone", nil)
	if w, removed, ok := r.GetOrLast("gone"); !ok || !removed || w.HiveID != "h1" {
		t.Fatalf("removed: %+v %v %v", w, removed, ok)
	}
	if err := r.Reserve(Worker{ID: "gone", HiveID: "h2", Model: "m"}); err != nil {
		t.Fatal(err)
	}
	if w, removed, ok := r.GetOrLast("gone"); !ok || removed || w.HiveID != "h2" {
		t.Fatalf("reused id: %+v %v %v", w, removed, ok)
	}
	for i := range RecentRemovals + 1 {
		id := fmt.Sprintf("x%d", i)
		r.Reserve(Worker{ID: id, HiveID: "h1", Model: "m"})
		r.Remove(id, nil)
	}
	if _, _, ok := r.GetOrLast("x0"); ok {
		t.Error("the oldest removal is still remembered beyond RecentRemovals")
	}
	if _, _, ok := r.GetOrLast("never"); ok {
		t.Error("an unknown id was found")
	}
}
