package registry

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Figures on the 2-core AMD EPYC dev VM (shared with other builds, so ±15%), medians of
//
//	go test -run '^$' -bench 'Beat|List|Fanout' -count=5 ./queen/registry/
//	go test -run '^$' -bench FleetLoad -benchtime=5x -count=3 ./queen/registry/
//
//	BenchmarkBeat            ~220 ns/op     0 B/op   0 allocs/op
//	BenchmarkBeatParallel    ~240 ns/op     0 B/op   0 allocs/op
//	BenchmarkRebeatParallel  ~190 ns/op     0 B/op   0 allocs/op (BeatParallel ~450 ns in the same runs, load 5-6)
//	BenchmarkList10k         1.5-2.9 ms/op  1.37 MB/op  1 allocs/op (one copy of 10,000 workers)
//	BenchmarkWatchFanout     ~4 µs/op       ~120 B/op  0 allocs/op (one change, 10 watchers, delivered)
//	BenchmarkFleetLoad       ~24 cpu-ms/s, 0 events/s (10,000 workers at 1 Hz: 2.4% of one core)

const fleet = 10_000

// newFleet returns a registry of fleet READY workers on 100 hives with its clock running, and
// their descriptors as a heartbeat would send them.
func newFleet(b *testing.B, cfg Config) (*Registry, []Worker) {
	b.Helper()
	r := New(cfg)
	ws := make([]Worker, fleet)
	for i := range ws {
		ws[i] = Worker{ID: fmt.Sprintf("worker-%05d", i), HiveID: fmt.Sprintf("hive-%02d", i%100),
			Model: "llama-3-8b", Device: "cuda:0", PID: int32(1000 + i), Port: uint32(9100 + i%900),
			ProcessStartTime: uint64(i), State: StateReady}
		if _, err := r.Beat(ws[i]); err != nil {
			b.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Run(ctx); close(done) }()
	b.Cleanup(func() { cancel(); <-done })
	return r, ws
}

// BenchmarkBeat applies a steady-state heartbeat (nothing but the time changes) to one of
// 10,000 workers.
func BenchmarkBeat(b *testing.B) {
	r, ws := newFleet(b, Config{})
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if _, err := r.Beat(ws[i]); err != nil {
			b.Fatal(err)
		}
		if i++; i == len(ws) {
			i = 0
		}
	}
}

// BenchmarkBeatParallel is BenchmarkBeat from GOMAXPROCS goroutines, as many heartbeat
// streams would.
func BenchmarkBeatParallel(b *testing.B) {
	r, ws := newFleet(b, Config{})
	var seed atomic.Int64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := int(seed.Add(7919)) % len(ws)
		for pb.Next() {
			if _, err := r.Beat(ws[i]); err != nil {
				b.Error(err)
				return
			}
			if i++; i == len(ws) {
				i = 0
			}
		}
	})
}

// BenchmarkRebeatParallel is BenchmarkBeatParallel for the beats that repeat the last one, as
// the queen applies them: without the lock (Rebeat), each stream holding its worker's ticket.
func BenchmarkRebeatParallel(b *testing.B) {
	r, ws := newFleet(b, Config{})
	tickets := make([]Ticket, len(ws))
	for i, w := range ws {
		t, err := r.BeatTicketAt(w, time.Now())
		if err != nil {
			b.Fatal(err)
		}
		tickets[i] = t
	}
	var seed atomic.Int64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := int(seed.Add(7919)) % len(ws)
		for pb.Next() {
			if !r.Rebeat(tickets[i], time.Now()) {
				b.Error("Rebeat refused a repeated beat")
				return
			}
			if i++; i == len(ws) {
				i = 0
			}
		}
	})
}

func BenchmarkList10k(b *testing.B) {
	r, _ := newFleet(b, Config{})
	b.ReportAllocs()
	for b.Loop() {
		if ws := r.List(""); len(ws) != fleet {
			b.Fatal(len(ws))
		}
	}
}

// BenchmarkWatchFanout measures a real change (a state flip) delivered to 10 watchers: the
// time includes every watcher receiving it.
func BenchmarkWatchFanout(b *testing.B) {
	const watchers = 10
	r, ws := newFleet(b, Config{WatchBuffer: 1 << 16})
	var seen [watchers]atomic.Uint64 // highest revision each reader has received
	var wg sync.WaitGroup
	wts := make([]*Watcher, watchers)
	b.Cleanup(func() {
		for _, wt := range wts {
			wt.Close()
		}
		wg.Wait()
	})
	for k := range wts {
		wt := r.Watch("")
		wts[k] = wt
		wg.Add(1)
		go func() {
			defer wg.Done()
			for e := range wt.Events() {
				seen[k].Store(e.Revision)
			}
		}()
	}
	states := [2]State{StateBusy, StateReady}
	b.ReportAllocs()
	n := 0
	for b.Loop() {
		w := ws[n%len(ws)]
		w.State = states[(n/len(ws))%2]
		if _, err := r.Beat(w); err != nil {
			b.Fatal(err)
		}
		n++
	}
	// Delivery is part of the cost: wait for every reader to catch up.
	last := r.Revision()
	for k := range watchers {
		for seen[k].Load() < last {
			runtime.Gosched()
		}
	}
}

// BenchmarkFleetLoad is the whole liveness load in real time: 10,000 workers beating at 1 Hz
// (spread evenly, as real streams are), the clock running, one watcher attached. One op is one
// second of wall time; cpu-ms/s is the process CPU (user+sys) that second cost, registry and
// driver together. Run it with -benchtime=5x.
func BenchmarkFleetLoad(b *testing.B) {
	r, ws := newFleet(b, Config{})
	wt := r.Watch("")
	for e := range wt.Events() {
		if e.Type == EventSynced {
			break
		}
	}
	var events atomic.Int64 // changes after the snapshot: none, while every worker is on time
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		for range wt.Events() {
			events.Add(1)
		}
	}()
	defer func() { wt.Close(); <-drained }()

	const ticks = 100 // per second: 100 beats every 10ms
	tick := time.NewTicker(time.Second / ticks)
	defer tick.Stop()
	start, startCPU := time.Now(), cpuTime()
	startEvents := events.Load()
	i := 0
	for b.Loop() {
		for range ticks {
			<-tick.C
			for range len(ws) / ticks {
				if _, err := r.Beat(ws[i]); err != nil {
					b.Fatal(err)
				}
				if i++; i == len(ws) {
					i = 0
				}
			}
		}
	}
	secs := time.Since(start).Seconds()
	b.ReportMetric(float64(cpuTime()-startCPU)/1e6/secs, "cpu-ms/s")
	b.ReportMetric(float64(events.Load()-startEvents)/secs, "events/s")
	if n := r.List(""); len(n) != fleet {
		b.Fatalf("fleet shrank to %d", len(n))
	}
	for _, w := range r.List("") {
		if w.State != StateReady {
			b.Fatalf("%s went %v while beating at 1 Hz", w.ID, w.State)
		}
	}
}

// cpuTime returns the process's user+system CPU time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
