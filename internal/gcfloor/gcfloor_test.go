package gcfloor

import (
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"testing"
	"time"
)

func TestPercent(t *testing.T) {
	const mb = 1 << 20
	for _, c := range []struct {
		percent      int
		floor, basis uint64
		want         int
	}{
		{50, 32 * mb, 130 * mb, 50}, // 10,000 workers: GOGC=50 already leaves 65 MB
		{50, 32 * mb, 64 * mb, 50},  // exactly the floor
		{50, 32 * mb, 12 * mb, 267}, // 1,000 workers: 32 MB of room instead of 6
		{50, 32 * mb, 0, 800},       // nothing measured yet: the runtime's minimum heap is then the floor
		{50, 32 * mb, 1 * mb, 825},  // likewise: 4 MB * 825% = 33 MB, the basis and the floor
		{200, 1, 1 * mb, 200},       // never below the percent asked for
	} {
		if got := Percent(c.percent, c.floor, c.basis); got != c.want {
			t.Errorf("Percent(%d, %d, %d) = %d, want %d", c.percent, c.floor, c.basis, got, c.want)
		}
		p := uint64(Percent(c.percent, c.floor, c.basis))
		room := c.basis * p / 100
		if hm := heapMinimum * p / 100; hm > c.basis+room {
			room = hm - c.basis // the runtime's minimum heap is the goal
		}
		if room < c.floor {
			t.Errorf("basis %d: room %d under the floor %d", c.basis, room, c.floor)
		}
		if p > uint64(c.percent) && heapMinimum*p/100 > c.basis+c.floor {
			t.Errorf("basis %d: percent %d puts the runtime's minimum heap at %d, over the basis and the floor", c.basis, p, heapMinimum*p/100)
		}
	}
}

// collect runs a collection and returns what the floor's clean-up reported after it. The
// sentinel in place before runtime.GC is unreachable by then, so its clean-up is queued.
func collect(t *testing.T, adjusted chan int) int {
	t.Helper()
	runtime.GC()
	select {
	case p := <-adjusted:
		return p
	case <-time.After(10 * time.Second):
		t.Fatal("no clean-up ran within 10 s of a collection")
		return 0
	}
}

// After a collection the heap goal leaves at least the floor of room above the live heap; Stop
// puts GOGC back and ends the adjustments.
func TestFloorRaisesTheGoalAfterACollection(t *testing.T) {
	prev := debug.SetGCPercent(100)
	defer debug.SetGCPercent(prev)
	const floor = 256 << 20 // far above this test binary's basis
	adjusted := make(chan int, 16)
	f := start(50, floor, adjusted)
	if got := debug.SetGCPercent(50); got != 50 {
		t.Fatalf("Start: GOGC %d, want 50", got)
	}
	for i := range 2 { // and it re-arms itself for the next collection
		p := collect(t, adjusted)
		if p <= 50 {
			t.Fatalf("collection %d: percent %d, want it raised for a %d MB floor", i, p, floor>>20)
		}
		s := []metrics.Sample{{Name: "/gc/heap/goal:bytes"}, {Name: "/gc/heap/live:bytes"}, {Name: "/gc/gogc:percent"}}
		metrics.Read(s)
		if goal, live := s[0].Value.Uint64(), s[1].Value.Uint64(); goal < live+floor {
			t.Fatalf("collection %d: goal %d MB over a live heap of %d MB: less than %d MB of room", i, goal>>20, live>>20, floor>>20)
		}
		if got := s[2].Value.Uint64(); got != uint64(p) {
			t.Fatalf("collection %d: GOGC %d, the floor chose %d", i, got, p)
		}
	}
	f.Stop()
	if got := debug.SetGCPercent(50); got != 50 {
		t.Fatalf("after Stop: GOGC %d, want 50 back", got)
	}
	if p := collect(t, adjusted); p != -1 {
		t.Fatalf("after Stop the clean-up chose %d", p)
	}
	if got := debug.SetGCPercent(50); got != 50 {
		t.Fatalf("after Stop and a collection: GOGC %d, want 50", got)
	}
}

func TestFloorBelowThePercentKeepsIt(t *testing.T) {
	prev := debug.SetGCPercent(100)
	defer debug.SetGCPercent(prev)
	adjusted := make(chan int, 16)
	f := start(50, 1, adjusted)
	defer f.Stop()
	if p := collect(t, adjusted); p != 50 {
		t.Fatalf("percent %d with a 1-byte floor, want 50", p)
	}
}
