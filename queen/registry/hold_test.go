package registry

import (
	"errors"
	"testing"
	"testing/synctest"
	"time"
)

// A queen taking over holds its clock: through the hold nothing turns STALE, nothing expires and
// no start timeout fires, however silent the fleet; after it the ordinary rules apply again.
func TestHoldDefersEveryLivenessDecision(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{})
		hold := 2 * startTimeout
		r.Hold(time.Now().Add(hold))
		if !r.Holding(time.Now()) {
			t.Fatal("Holding = false right after Hold")
		}
		mustBeat(t, r.Registry, "beat-once", StateReady)
		mustBeat(t, r.Registry, "closed", StateReady)
		if err := r.Reserve(Worker{ID: "never-beats", HiveID: "h1", Model: "m"}); err != nil {
			t.Fatal(err)
		}
		if _, err := r.HiveBeat(Hive{ID: "h1", Address: "127.0.0.1:1"}); err != nil {
			t.Fatal(err)
		}
		r.StreamClosed("closed")
		r.HiveStreamClosed("h1")

		sleep(hold - time.Second)
		for _, w := range r.List("") {
			if w.State == StateStale {
				t.Errorf("worker %s STALE during the hold", w.ID)
			}
		}
		if r.Len() != 3 || len(r.startTimeouts.get()) != 0 {
			t.Fatalf("during the hold: %d workers, %d start timeouts; want 3 and none", r.Len(), len(r.startTimeouts.get()))
		}
		if h, _ := r.GetHive("h1"); h.State != HiveReady {
			t.Fatalf("hive %v during the hold, want READY", h.State)
		}

		sleep(2 * time.Second) // past the hold: the silence now counts
		if r.Holding(time.Now()) {
			t.Fatal("still holding after the hold's end")
		}
		for _, id := range []string{"beat-once", "closed"} {
			if w, ok := r.Get(id); !ok || w.State != StateStale {
				t.Errorf("%s after the hold: %v %v, want STALE", id, w.State, ok)
			}
		}
		if _, ok := r.Get("never-beats"); ok || len(r.startTimeouts.get()) != 1 {
			t.Errorf("never-beats not removed by its start timeout after the hold")
		}
		if h, _ := r.GetHive("h1"); h.State != HiveStale {
			t.Errorf("hive %v after the hold, want STALE", h.State)
		}
		// Expiry counts from the hold's end, not from the long-past deadline.
		sleep(expireAfter - 2*time.Second)
		if _, ok := r.Get("beat-once"); !ok {
			t.Error("expired less than --expire-after after it turned STALE")
		}
		sleep(3 * time.Second)
		if _, ok := r.Get("beat-once"); ok {
			t.Error("not expired --expire-after after it turned STALE")
		}
	})
}

// Forget empties the registry of everything learnt from beats and spawns, tells waiters why,
// and keeps the hives the operator configured.
func TestForgetKeepsOnlyStaticHives(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := start(t, Config{})
		mustBeat(t, r.Registry, "a", StateReady)
		if err := r.Reserve(Worker{ID: "b", HiveID: "s", Model: "m"}); err != nil {
			t.Fatal(err)
		}
		if err := r.AddStaticHive("s", "127.0.0.1:2"); err != nil {
			t.Fatal(err)
		}
		if _, err := r.HiveBeat(Hive{ID: "h1", Address: "127.0.0.1:1"}); err != nil {
			t.Fatal(err)
		}
		waitErr := make(chan error, 1)
		go func() {
			_, err := r.Await(t.Context(), "b", func(w Worker) bool { return w.State == StateReady })
			waitErr <- err
		}()
		synctest.Wait()
		cause := errors.New("no longer the leader")
		r.Forget(cause)
		if err := <-waitErr; !errors.Is(err, ErrNotFound) || !errors.Is(err, cause) {
			t.Fatalf("Await after Forget: %v, want not found because %v", err, cause)
		}
		if r.Len() != 0 {
			t.Fatalf("%d workers after Forget", r.Len())
		}
		hs := r.ListHives()
		if len(hs) != 1 || hs[0].ID != "s" {
			t.Fatalf("hives after Forget: %+v, want only the static one", hs)
		}
		sleep(time.Hour) // nothing left on the clock that could misfire
		if len(r.startTimeouts.get())+len(r.expiries.get()) != 0 {
			t.Fatal("callbacks fired for forgotten workers")
		}
	})
}
