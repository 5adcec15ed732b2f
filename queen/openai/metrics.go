package openai

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the HTTP API's Prometheus metrics, per model.
type Metrics struct {
	requests       *prometheus.CounterVec
	ttfb, duration *prometheus.HistogramVec
	tokens         *prometheus.CounterVec

	// byModel holds each routed model's series (*modelMetrics), looked up once: a vector's
	// WithLabelValues hashes the labels and takes a lock on every call.
	byModel sync.Map
}

// modelMetrics are one model's series of the common case: a request answered 200.
type modelMetrics struct {
	ok             prometheus.Counter
	ttfb, duration prometheus.Observer
	tokens         prometheus.Counter
}

// model returns model's series. Only models the router placed a request for come here, so
// the map is bounded by the fleet's models, not by what clients write in "model".
func (m *Metrics) model(model string) *modelMetrics {
	if mm, ok := m.byModel.Load(model); ok {
		return mm.(*modelMetrics)
	}
	mm, _ := m.byModel.LoadOrStore(model, &modelMetrics{
		ok: m.requests.WithLabelValues(model, "200"), ttfb: m.ttfb.WithLabelValues(model),
		duration: m.duration.WithLabelValues(model), tokens: m.tokens.WithLabelValues(model),
	})
	return mm.(*modelMetrics)
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
