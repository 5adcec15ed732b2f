// Package gcfloor keeps a floor under the garbage collector's room for new garbage. Go's collector
// lets the heap grow by GOGC percent of its basis (the live heap, the goroutine stacks and the
// globals) before it collects again. A percent chosen for a large heap, where that room is tens of
// megabytes, leaves a small heap a few megabytes of room: a server allocating 25 MB a second then
// collects five times a second, and each collection scans every goroutine's stack. Floor keeps the
// percent where it was asked to be unless that room would fall below a floor in bytes, and raises
// it after each collection just enough to keep the floor.
package gcfloor

import (
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
)

// Percent is the GOGC percent that gives a heap with the given basis (live heap, stacks and
// globals, as the collector counts them) at least floor bytes of room, and never less than percent.
//
// The runtime also never collects a heap under a minimum of 4 MB times GOGC/100 (its
// defaultHeapMinimum, unchanged since Go 1.5); Percent stays low enough that this minimum is no
// more than the basis plus the floor, so a nearly empty heap gets the floor, not a huge percent's
// minimum.
func Percent(percent int, floor, basis uint64) int {
	if basis == 0 {
		basis = 1
	}
	need := (floor*100 + basis - 1) / basis // rounded up
	need = min(need, (basis+floor)*100/heapMinimum)
	return max(percent, int(need))
}

// heapMinimum is the runtime's defaultHeapMinimum: the heap goal at GOGC=100 never goes below it.
const heapMinimum = 4 << 20

// Floor adjusts GOGC after each collection. Stop it to put GOGC back.
type Floor struct {
	percent int
	floor   uint64

	mu      sync.Mutex
	stopped bool
	current int
	samples []metrics.Sample
	// adjusted, if set (tests), is sent the percent chosen after each collection, -1 once stopped.
	adjusted chan int
}

// Start sets GOGC to percent and keeps the collector's room at no less than floor bytes from the
// next collection on. GOMEMLIMIT, when set, still bounds the heap.
func Start(percent int, floor uint64) *Floor {
	return start(percent, floor, nil)
}

func start(percent int, floor uint64, adjusted chan int) *Floor {
	f := &Floor{percent: percent, floor: floor, current: percent, adjusted: adjusted, samples: []metrics.Sample{
		{Name: "/gc/heap/live:bytes"}, {Name: "/gc/scan/stack:bytes"}, {Name: "/gc/scan/globals:bytes"},
	}}
	debug.SetGCPercent(percent)
	f.arm()
	return f
}

// sentinel is an object nothing refers to: the collection that finds it unreachable runs its clean-up,
// which adjusts GOGC and allocates the next one. It holds a pointer so that it is never a tiny
// allocation (clean-ups on those may never run).
type sentinel struct {
	_ *int
	_ [2]uint64
}

func (f *Floor) arm() {
	runtime.AddCleanup(new(sentinel), (*Floor).collected, f)
}

// collected runs on the runtime's clean-up goroutine after each collection.
func (f *Floor) collected() {
	f.mu.Lock()
	if f.stopped {
		f.mu.Unlock()
		f.report(-1)
		return
	}
	metrics.Read(f.samples)
	var basis uint64
	for _, s := range f.samples {
		if s.Value.Kind() == metrics.KindUint64 {
			basis += s.Value.Uint64()
		}
	}
	p := Percent(f.percent, f.floor, basis)
	if p != f.current {
		debug.SetGCPercent(p)
		f.current = p
	}
	f.mu.Unlock()
	f.report(p)
	f.arm()
}

// report tells a test the percent chosen after a collection, -1 when stopped.
func (f *Floor) report(p int) {
	if f.adjusted != nil {
		select {
		case f.adjusted <- p:
		default:
		}
	}
}

// Stop ends the adjustments and puts GOGC back to the percent Start was given.
func (f *Floor) Stop() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.stopped = true
	debug.SetGCPercent(f.percent)
}
