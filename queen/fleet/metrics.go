package fleet

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the fleet operations' Prometheus metrics.
type metrics struct {
	spawnToReady *prometheus.HistogramVec
	deletes      *prometheus.HistogramVec
}

var durationBuckets = []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		spawnToReady: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "rbee_queen_spawn_to_ready_seconds", Help: "Time from SpawnWorker to READY (or to failure), by outcome (ready, returned, timeout, canceled, exited, error).",
			Buckets: durationBuckets,
		}, []string{"outcome"}),
		deletes: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "rbee_queen_delete_duration_seconds", Help: "DeleteWorker duration, by outcome (exited, killed, already_exited, error).",
			Buckets: durationBuckets,
		}, []string{"outcome"}),
	}
	if reg != nil {
		reg.MustRegister(m.spawnToReady, m.deletes)
	}
	return m
}

func (m *metrics) spawned(outcome string, since time.Time) {
	m.spawnToReady.WithLabelValues(outcome).Observe(time.Since(since).Seconds())
}

func (m *metrics) deleted(outcome string, since time.Time) {
	m.deletes.WithLabelValues(outcome).Observe(time.Since(since).Seconds())
}
