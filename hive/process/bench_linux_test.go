package process

import (
	"os"
	"slices"
	"strconv"
	"testing"
	"time"
)

// Run: go test -run '^$' -bench . -benchtime 200x ./hive/process/
// Each benchmark reports p50 and p99 of the measured step in microseconds besides ns/op.

func reportPercentiles(b *testing.B, d []time.Duration) {
	if len(d) == 0 {
		return
	}
	slices.Sort(d)
	at := func(q float64) float64 { return float64(d[int(q*float64(len(d)-1))]) / float64(time.Microsecond) }
	b.ReportMetric(at(0.50), "p50-µs")
	b.ReportMetric(at(0.99), "p99-µs")
}

func benchModes(b *testing.B, f func(b *testing.B, mode CgroupMode)) {
	b.Run("cgroup", func(b *testing.B) {
		if _, ok := findCgroup2(); !ok {
			b.Skip("no writable cgroup v2")
		}
		f(b, CgroupAuto)
	})
	b.Run("pgroup", func(b *testing.B) { f(b, CgroupOff) })
}

func benchHarness(b *testing.B, mode CgroupMode, tm ...trampolineMode) (*Manager, *fifo) {
	self, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	cfg := Config{Binary: self, PortLow: 21000, PortHigh: 21999, LogDir: b.TempDir(), Cgroups: mode,
		HiveID: "bench" + strconv.Itoa(os.Getpid())}
	if len(tm) > 0 {
		tm[0].edit(&cfg)
	}
	m, err := New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		m.Close()
		m.reapers.Wait()
	})
	return m, newFIFO(b)
}

// BenchmarkSpawn measures Spawn: from the call to the answer (the trampoline runs). Each way of
// starting a worker: cloned by the zygote (the default), by forking the native trampoline, and by
// forking the hive's own binary (the fallback, and the only way before).
func BenchmarkSpawn(b *testing.B) {
	benchModes(b, func(b *testing.B, mode CgroupMode) {
		for _, tm := range []trampolineMode{viaZygote, viaFork, viaHiveBinary} {
			b.Run([]string{"zygote", "fork", "hive-binary"}[tm], func(b *testing.B) {
				m, q := benchHarness(b, mode, tm)
				if tm == viaZygote {
					awaitZygote(b, m)
				}
				var d []time.Duration
				for i := 0; b.Loop(); i++ {
					id := "b" + strconv.Itoa(i)
					start := time.Now()
					s, err := m.Spawn(b.Context(), SpawnSpec{WorkerID: id, Env: []string{envFake + "=worker", "FAKE_REPORT=" + q.path}})
					d = append(d, time.Since(start))
					if err != nil {
						b.Fatal(err)
					}
					b.StopTimer()
					q.next(b)
					if _, err := m.Delete(b.Context(), Target{WorkerID: id, PID: s.PID}, 0); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
				}
				reportPercentiles(b, d)
			})
		}
	})
}

// BenchmarkSpawnToReady measures Spawn until the worker binary runs its own code: through the
// native trampoline (from the zygote), through the hive's own binary, and exec'd directly (no
// LISTEN_PID), to show what each trampoline costs the worker's start.
func BenchmarkSpawnToReady(b *testing.B) {
	for _, name := range []string{"native", "hive-binary", "direct"} {
		b.Run(name, func(b *testing.B) {
			tm := map[string]trampolineMode{"native": viaZygote, "hive-binary": viaHiveBinary, "direct": viaFork}[name]
			m, q := benchHarness(b, CgroupAuto, tm)
			if tm == viaZygote {
				awaitZygote(b, m)
			}
			m.direct = name == "direct"
			var d []time.Duration
			for i := 0; b.Loop(); i++ {
				id := "r" + strconv.Itoa(i)
				start := time.Now()
				s, err := m.Spawn(b.Context(), SpawnSpec{WorkerID: id, Env: []string{envFake + "=worker", "FAKE_REPORT=" + q.path}})
				if err != nil {
					b.Fatal(err)
				}
				q.next(b)
				d = append(d, time.Since(start))
				b.StopTimer()
				if _, err := m.Delete(b.Context(), Target{WorkerID: id, PID: s.PID}, 0); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
			reportPercentiles(b, d)
		})
	}
}

func benchDelete(b *testing.B, grace time.Duration, want Outcome) {
	benchModes(b, func(b *testing.B, mode CgroupMode) {
		m, q := benchHarness(b, mode)
		var d []time.Duration
		for i := 0; b.Loop(); i++ {
			b.StopTimer()
			id := "d" + strconv.Itoa(i)
			s, err := m.Spawn(b.Context(), SpawnSpec{WorkerID: id, Env: []string{envFake + "=worker", "FAKE_REPORT=" + q.path}})
			if err != nil {
				b.Fatal(err)
			}
			q.next(b) // the worker runs and exits at once on SIGTERM
			b.StartTimer()
			start := time.Now()
			out, err := m.Delete(b.Context(), Target{WorkerID: id, PID: s.PID, StartTime: s.StartTime}, grace)
			d = append(d, time.Since(start))
			if err != nil || out != want {
				b.Fatalf("Delete = %v, %v; want %v", out, err, want)
			}
		}
		reportPercentiles(b, d)
	})
}

// BenchmarkDeleteGraceful measures Delete of a worker that exits at once on SIGTERM.
func BenchmarkDeleteGraceful(b *testing.B) { benchDelete(b, 5*time.Second, Exited) }

// BenchmarkDeleteForce measures Delete with grace 0 (SIGKILL at once).
func BenchmarkDeleteForce(b *testing.B) { benchDelete(b, 0, Killed) }
