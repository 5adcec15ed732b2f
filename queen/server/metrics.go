package server

import (
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rbee-dev/rbee/queen/registry"
)

// metrics are the queen's own Prometheus metrics; the gRPC server metrics come from rpcserver.
type metrics struct {
	beats                  *prometheus.CounterVec
	workerBeats, hiveBeats prometheus.Counter // resolved once: the heartbeat path is hot
}

func newMetrics(reg prometheus.Registerer, r *registry.Registry) *metrics {
	m := &metrics{
		beats: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rbee_queen_heartbeats_received_total", Help: "Heartbeats applied to the registry, by sender (worker, hive).",
		}, []string{"kind"}),
	}
	m.workerBeats, m.hiveBeats = m.beats.WithLabelValues("worker"), m.beats.WithLabelValues("hive")
	if reg != nil {
		reg.MustRegister(m.beats, &registryCollector{r: r})
	}
	return m
}

// registryCollector reads worker and hive counts from the registry at scrape time, so the gauges
// are always exactly the registry's state and cost nothing between scrapes.
type registryCollector struct{ r *registry.Registry }

var (
	workersDesc = prometheus.NewDesc("rbee_queen_workers", "Workers the queen knows, by state and hive.", []string{"state", "hive"}, nil)
	hivesDesc   = prometheus.NewDesc("rbee_queen_hives", "Hives the queen knows, by state.", []string{"state"}, nil)
)

func (c *registryCollector) Describe(ch chan<- *prometheus.Desc) { ch <- workersDesc; ch <- hivesDesc }

func (c *registryCollector) Collect(ch chan<- prometheus.Metric) {
	type key struct{ state, hive string }
	workers := map[key]int{}
	for _, w := range c.r.List("") {
		workers[key{strings.ToLower(w.State.String()), w.HiveID}]++
	}
	for k, n := range workers {
		ch <- prometheus.MustNewConstMetric(workersDesc, prometheus.GaugeValue, float64(n), k.state, k.hive)
	}
	hives := map[string]int{"ready": 0, "stale": 0}
	for _, h := range c.r.ListHives() {
		hives[strings.ToLower(h.State.String())]++
	}
	for s, n := range hives {
		ch <- prometheus.MustNewConstMetric(hivesDesc, prometheus.GaugeValue, float64(n), s)
	}
}
