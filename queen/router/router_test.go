package router

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fleet is a fake registry, spawner and deleter: a watch fed by the test, hives' offers, and
// spawns that turn into workers the way the queen's would (STARTING at once, READY after load).
type fleet struct {
	t      *testing.T
	events chan Event
	load   time.Duration // a spawned worker is READY after this; <0: it dies while loading

	mu       sync.Mutex
	offers   []Offer
	spawns   []string
	deletes  []string
	loads    map[string][2]int // id -> in flight, full
	n        int
	conc     int
	ttl      time.Duration
	spawnErr error
	// staleFirst: a worker dying while loading is first seen STALE (its stream broke before its
	// hive reported the exit), as happens on a busy machine.
	staleFirst bool
}

func newFleet(t *testing.T) *fleet {
	return &fleet{t: t, events: make(chan Event, 1024), loads: map[string][2]int{}}
}

func (f *fleet) Watch(ctx context.Context) <-chan Event {
	out := make(chan Event)
	go func() {
		defer close(out)
		for {
			select {
			case <-ctx.Done():
				return
			case ev := <-f.events:
				select {
				case out <- ev:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return out
}

func (f *fleet) Offers() []Offer {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Offer(nil), f.offers...)
}

func (f *fleet) SetLoad(id string, inFlight int, full bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	b := 0
	if full {
		b = 1
	}
	f.loads[id] = [2]int{inFlight, b}
}

func (f *fleet) Spawn(_ context.Context, model string) (string, error) {
	f.mu.Lock()
	if f.spawnErr != nil {
		f.mu.Unlock()
		return "", f.spawnErr
	}
	f.n++
	id := fmt.Sprintf("w%d", f.n)
	f.spawns = append(f.spawns, id)
	w := Worker{ID: id, Model: model, State: StateStarting, URL: "http://" + id, Concurrency: f.conc, TTL: f.ttl}
	load, staleFirst := f.load, f.staleFirst
	f.mu.Unlock()
	f.events <- Event{Type: EventAdded, Worker: w}
	go func() {
		time.Sleep(max(load, -load))
		if load < 0 {
			if staleFirst {
				w.State = StateStale
				f.events <- Event{Type: EventUpdated, Worker: w}
			}
			f.events <- Event{Type: EventRemoved, Worker: w, Reason: "exit status 1: CUDA out of memory"}
			return
		}
		w.State = StateReady
		f.events <- Event{Type: EventUpdated, Worker: w}
	}()
	return id, nil
}

func (f *fleet) Delete(_ context.Context, id string, _ time.Duration) error {
	f.mu.Lock()
	f.deletes = append(f.deletes, id)
	f.mu.Unlock()
	f.events <- Event{Type: EventRemoved, Worker: Worker{ID: id}, Reason: "deleted"}
	return nil
}

func (f *fleet) counts() (spawns, deletes int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.spawns), len(f.deletes)
}

// run starts a router over f until the test ends and returns it once it has synced.
func run(t *testing.T, f *fleet, cfg Config) *Router {
	t.Helper()
	r := New(cfg, f, f, f)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	f.events <- Event{Type: EventSynced}
	<-r.Synced()
	return r
}

func ready(id, model string, conc int) Event {
	return Event{Type: EventAdded, Worker: Worker{ID: id, Model: model, State: StateReady, URL: "http://" + id, Concurrency: conc}}
}

func TestRoutesToLeastLoadedWithinConcurrency(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFleet(t)
		r := run(t, f, Config{QueueWait: time.Second})
		f.events <- ready("a", "m", 2)
		f.events <- ready("b", "m", 2)
		for _, s := range []State{StateStarting, StateStale, StateStopping, StateUnhealthy} {
			id := "x-" + s.String()
			f.events <- Event{Type: EventAdded, Worker: Worker{ID: id, Model: "m", State: s, URL: "http://" + id}}
		}
		synctest.Wait()

		var leases []*Lease
		per := map[string]int{}
		for range 4 {
			l, err := r.Acquire(t.Context(), "m", "")
			if err != nil {
				t.Fatal(err)
			}
			leases = append(leases, l)
			per[l.Worker().ID]++
		}
		if per["a"] != 2 || per["b"] != 2 {
			t.Fatalf("4 requests on two workers of concurrency 2 went %v, want 2 each and none elsewhere", per)
		}
		// Both full: the fifth waits in the queue and gets the first slot freed.
		got := make(chan *Lease)
		go func() {
			l, err := r.Acquire(t.Context(), "m", "")
			if err != nil {
				t.Error(err)
			}
			got <- l
		}()
		synctest.Wait()
		select {
		case <-got:
			t.Fatal("a request got a worker beyond its concurrency")
		default:
		}
		time.Sleep(100 * time.Millisecond) // let the coalesced load reach the registry
		f.mu.Lock()
		if f.loads["a"] != [2]int{2, 1} {
			t.Errorf("registry shows a at %v, want 2 in flight and full", f.loads["a"])
		}
		f.mu.Unlock()
		leases[3].Release()
		l := <-got
		if l.Worker().ID != leases[3].Worker().ID {
			t.Fatalf("queued request went to %s, want the freed %s", l.Worker().ID, leases[3].Worker().ID)
		}
		l.Release()
		for _, l := range leases[:3] {
			l.Release()
		}
		if s, _ := f.counts(); s != 0 {
			t.Fatalf("%d spawns for a model with serving workers and no offer", s)
		}
	})
}

func TestQueueFullAndQueueTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFleet(t)
		r := run(t, f, Config{QueueSize: 2, QueueWait: time.Second})
		f.events <- ready("a", "m", 1)
		synctest.Wait()
		l, err := r.Acquire(t.Context(), "m", "")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Release()
		errs := make(chan error, 2)
		for range 2 {
			go func() { _, err := r.Acquire(t.Context(), "m", ""); errs <- err }()
		}
		synctest.Wait()
		if _, err := r.Acquire(t.Context(), "m", ""); !errors.Is(err, ErrQueueFull) {
			t.Fatalf("third waiter: %v, want ErrQueueFull", err)
		}
		time.Sleep(time.Second)
		for range 2 {
			if err := <-errs; !errors.Is(err, ErrQueueTimeout) {
				t.Fatalf("queued past the wait: %v, want ErrQueueTimeout", err)
			}
		}
		if _, err := r.Acquire(t.Context(), "nope", ""); !errors.Is(err, ErrUnknownModel) {
			t.Fatalf("unknown model: %v, want ErrUnknownModel", err)
		}
	})
}

// A burst for a model with no worker starts exactly one, and every request is served by it.
func TestBurstOnDemandSpawnsOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFleet(t)
		f.offers = []Offer{{Model: "m", HiveID: "h"}}
		f.load = 3 * time.Second
		r := run(t, f, Config{QueueSize: 100, QueueWait: time.Second, ScaleUpAfter: time.Minute})
		var wg sync.WaitGroup
		errs := make(chan error, 100)
		for range 100 {
			wg.Go(func() {
				l, err := r.Acquire(t.Context(), "m", "")
				if err != nil {
					errs <- err
					return
				}
				l.Release()
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatalf("a request of the burst failed: %v", err)
		}
		if s, _ := f.counts(); s != 1 {
			t.Fatalf("%d spawns for one burst, want 1", s)
		}
		if _, err := r.Acquire(t.Context(), "m", ""); err != nil { // it stays
			t.Fatal(err)
		}
	})
}

func TestWorkerDyingWhileLoadingFailsTheQueueWithItsReason(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFleet(t)
		f.offers = []Offer{{Model: "m", HiveID: "h"}}
		f.load = -time.Second
		r := run(t, f, Config{})
		_, err := r.Acquire(t.Context(), "m", "")
		var se *StartError
		if !errors.As(err, &se) || !errors.Is(err, ErrStartFailed) || se.Reason != "exit status 1: CUDA out of memory" {
			t.Fatalf("Acquire = %v, want a StartError with the worker's reason", err)
		}
		f.mu.Lock()
		f.spawnErr = errors.New("no hive offers it")
		f.mu.Unlock()
		if _, err := r.Acquire(t.Context(), "m", ""); !errors.Is(err, ErrStartFailed) {
			t.Fatalf("Acquire with a failing spawn = %v, want ErrStartFailed", err)
		}
	})
}

// A worker that dies while loading is never replaced for the requests that waited for it, whatever
// state it was last seen in: that would be a crash loop (found in CI: a model failing its load was
// respawned forever once its stream broke, making it STALE, before its exit was reported).
func TestWorkerDyingWhileLoadingIsNotRespawned(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFleet(t)
		f.offers = []Offer{{Model: "m", HiveID: "h"}}
		f.load, f.staleFirst = -time.Second, true
		r := run(t, f, Config{})
		if _, err := r.Acquire(t.Context(), "m", ""); !errors.Is(err, ErrStartFailed) {
			t.Fatalf("Acquire = %v, want ErrStartFailed", err)
		}
		synctest.Wait()
		if spawns, _ := f.counts(); spawns != 1 {
			t.Fatalf("%d spawns for one request whose worker failed to load, want 1", spawns)
		}
	})
}

func TestQueueWaitingTooLongScalesUp(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFleet(t)
		f.offers = []Offer{{Model: "m", HiveID: "h"}}
		f.load, f.conc = time.Second, 1
		r := run(t, f, Config{QueueWait: time.Minute, ScaleUpAfter: 2 * time.Second, MaxWorkers: 2})
		first, err := r.Acquire(t.Context(), "m", "")
		if err != nil {
			t.Fatal(err)
		}
		got := make(chan *Lease, 2)
		for range 2 {
			go func() {
				l, err := r.Acquire(t.Context(), "m", "")
				if err != nil {
					t.Error(err)
				}
				got <- l
			}()
		}
		time.Sleep(5 * time.Second)
		l := <-got // served by the second worker, started because the queue waited 2s
		if l.Worker().ID == first.Worker().ID {
			t.Fatal("queued request served by the busy worker")
		}
		if s, _ := f.counts(); s != 2 {
			t.Fatalf("%d spawns, want 2 (on demand, then one scale-up; MaxWorkers caps it)", s)
		}
		first.Release()
		l.Release()
		(<-got).Release()
	})
}

// TTL: an idle worker is stopped, never one with a request in flight, and the idle clock counts
// from the end of the last request; a request arriving as the TTL expires is served.
func TestIdleStopAfterTTL(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFleet(t)
		f.offers = []Offer{{Model: "m", HiveID: "h"}}
		f.ttl = 10 * time.Second
		r := run(t, f, Config{Tick: 100 * time.Millisecond})
		l, err := r.Acquire(t.Context(), "m", "")
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(30 * time.Second) // a long request: no stop while it is in flight
		if _, d := f.counts(); d != 0 {
			t.Fatal("worker stopped with a request in flight")
		}
		l.Release()
		time.Sleep(9 * time.Second)
		if _, d := f.counts(); d != 0 {
			t.Fatal("worker stopped before its TTL counted from the request's end")
		}
		time.Sleep(1500 * time.Millisecond)
		synctest.Wait()
		if _, d := f.counts(); d != 1 {
			t.Fatalf("%d deletes after the TTL, want 1", d)
		}
		// The model has no worker now; the next request starts one and is served.
		l, err = r.Acquire(t.Context(), "m", "")
		if err != nil {
			t.Fatalf("request after an idle stop: %v", err)
		}
		l.Release()
		if s, _ := f.counts(); s != 2 {
			t.Fatalf("%d spawns, want 2", s)
		}
	})
}

func TestWarmFloorKeepsWorkers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFleet(t)
		run(t, f, Config{WarmFloor: 1, Tick: 100 * time.Millisecond})
		for _, id := range []string{"a", "b"} {
			ev := ready(id, "m", 0)
			ev.Worker.TTL = time.Second
			f.events <- ev
		}
		time.Sleep(10 * time.Second)
		if _, d := f.counts(); d != 1 {
			t.Fatalf("%d idle stops with a warm floor of 1 and two workers, want 1", d)
		}
	})
}

// A worker that failed a request gets no new one for a while; the retry goes to another.
func TestFailedWorkerIsAvoided(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFleet(t)
		r := run(t, f, Config{BrokenFor: time.Minute, QueueWait: time.Second})
		f.events <- ready("a", "m", 0)
		f.events <- ready("b", "m", 0)
		synctest.Wait()
		l, _ := r.Acquire(t.Context(), "m", "")
		bad := l.Worker().ID
		l.Fail(errors.New("connection refused"))
		for range 10 {
			l, err := r.Acquire(t.Context(), "m", "")
			if err != nil {
				t.Fatal(err)
			}
			if l.Worker().ID == bad {
				t.Fatal("a failed worker got a new request")
			}
			l.Release()
		}
	})
}

func TestCloseFailsQueued(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFleet(t)
		r := run(t, f, Config{})
		f.events <- ready("a", "m", 1)
		synctest.Wait()
		l, _ := r.Acquire(t.Context(), "m", "")
		errc := make(chan error)
		go func() { _, err := r.Acquire(t.Context(), "m", ""); errc <- err }()
		synctest.Wait()
		r.Close()
		if err := <-errc; !errors.Is(err, ErrClosed) {
			t.Fatalf("queued request at close: %v, want ErrClosed", err)
		}
		l.Release()
	})
}

// A drained worker (an operator's delete in progress) gets no new request while its request in
// flight finishes; new ones go to the other worker, or, with none, start one. Undone, it serves again.
func TestDrainedWorkerGetsNoNewRequests(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFleet(t)
		f.offers = []Offer{{Model: "m", HiveID: "h"}}
		r := run(t, f, Config{QueueWait: time.Minute})
		f.events <- ready("a", "m", 0)
		synctest.Wait()
		inFlight, err := r.Acquire(t.Context(), "m", "")
		if err != nil || inFlight.Worker().ID != "a" {
			t.Fatalf("first request: %v on %v", err, inFlight)
		}
		undo := r.Drain("a")
		// With no other worker, a new request starts one rather than going to a.
		l, err := r.Acquire(t.Context(), "m", "")
		if err != nil {
			t.Fatal(err)
		}
		if got := l.Worker().ID; got == "a" {
			t.Fatal("a request went to the draining worker")
		}
		if s, _ := f.counts(); s != 1 {
			t.Fatalf("%d spawns, want 1", s)
		}
		l.Release()
		for range 10 {
			l, err := r.Acquire(t.Context(), "m", "")
			if err != nil {
				t.Fatal(err)
			}
			if l.Worker().ID == "a" {
				t.Fatal("a request went to the draining worker")
			}
			l.Release()
		}
		inFlight.Release() // the request in flight finished on its own
		undo()             // the delete failed: a serves again
		seen := map[string]bool{}
		for range 40 {
			l, err := r.Acquire(t.Context(), "m", "")
			if err != nil {
				t.Fatal(err)
			}
			seen[l.Worker().ID] = true
			l.Release()
		}
		if !seen["a"] {
			t.Fatal("worker a got no request after its drain was undone")
		}
		if u := r.Drain("nobody"); u == nil {
			t.Fatal("Drain of an unknown worker returned nil")
		}
	})
}
