package openai

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the HTTP API's Prometheus metrics, per model.
type Metrics struct {
	requests       *prometheus.CounterVec
	ttfb, duration *prometheus.HistogramVec
	tokens         *prometheus.CounterVec
}

var latencyBuckets = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300}

// NewMetrics registers the HTTP API's metrics with reg (nil: kept unexported).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "rbee_http_requests_total",
			Help: "Inference API requests by model and HTTP status (499: the client went away first; model \"\" when refused before the model was read)."},
			[]string{"model", "code"}),
		ttfb: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "rbee_http_time_to_first_byte_seconds",
			Help: "From a request's arrival to the first byte of its worker's response relayed, by model.", Buckets: latencyBuckets},
			[]string{"model"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "rbee_http_request_duration_seconds",
			Help: "From a request's arrival to the end of its response, by model.", Buckets: latencyBuckets},
			[]string{"model"}),
		tokens: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "rbee_http_streamed_events_total",
			Help: "Server-sent data events relayed (about one per token), by model."}, []string{"model"}),
	}
	if reg != nil {
		reg.MustRegister(m.requests, m.ttfb, m.duration, m.tokens)
	}
	return m
}
