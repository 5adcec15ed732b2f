package router

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the router's Prometheus metrics, per model.
type Metrics struct {
	inFlight, queued  *prometheus.GaugeVec
	spawns, idleStops *prometheus.CounterVec
}

// NewMetrics registers the router's metrics with reg (nil: kept unexported).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		inFlight: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "rbee_router_in_flight",
			Help: "Inference requests on workers now, by model."}, []string{"model"}),
		queued: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "rbee_router_queued",
			Help: "Inference requests waiting for a worker with room, by model."}, []string{"model"}),
		spawns: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "rbee_router_spawns_total",
			Help: "Workers the router started, by model and reason (on_demand, scale_up) or error."}, []string{"model", "reason"}),
		idleStops: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "rbee_router_idle_stops_total",
			Help: "Workers the router stopped after their idle TTL, by model."}, []string{"model"}),
	}
	if reg != nil {
		reg.MustRegister(m.inFlight, m.queued, m.spawns, m.idleStops)
	}
	return m
}
