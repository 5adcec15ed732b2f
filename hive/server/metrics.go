package server

import (
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rbee-dev/rbee/hive/process"
)

// metrics are the hive's own Prometheus metrics; the gRPC server metrics come from rpcserver.
type metrics struct {
	spawns   *prometheus.CounterVec
	deletes  *prometheus.CounterVec
	refusals *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer, live func() int) *metrics {
	m := &metrics{
		spawns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rbee_hive_spawns_total", Help: "Spawn calls, by result (ok, or the error kind).",
		}, []string{"result"}),
		deletes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rbee_hive_deletes_total", Help: "Deletes that completed, by outcome (exited, killed, already_exited).",
		}, []string{"outcome"}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rbee_hive_delete_refusals_total", Help: "Deletes refused or failed, by reason (not_worker, invalid, late, stuck, ...); no signal was sent for not_worker, invalid and late.",
		}, []string{"reason"}),
	}
	m.spawns.WithLabelValues("ok")
	for _, o := range []string{"exited", "killed", "already_exited"} {
		m.deletes.WithLabelValues(o)
	}
	m.refusals.WithLabelValues("not_worker")
	if reg != nil {
		reg.MustRegister(m.spawns, m.deletes, m.refusals)
		if live != nil {
			reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "rbee_hive_worker_processes", Help: "Worker processes of this hive alive now.",
			}, func() float64 { return float64(live()) }))
		}
	}
	return m
}

// reason names an error for metric labels: the process core's kind, in snake case.
func reason(err error) string {
	switch process.KindOf(err) {
	case process.KindInvalid:
		return "invalid"
	case process.KindNotWorker:
		return "not_worker"
	case process.KindExhausted:
		return "exhausted"
	case process.KindBinary:
		return "binary"
	case process.KindStuck:
		return "stuck"
	case process.KindUnsupported:
		return "unsupported"
	case process.KindLate:
		return "late"
	}
	return "internal"
}

func outcomeLabel(o process.Outcome) string {
	return strings.ToLower(strings.TrimPrefix(outcomeToProto(o).String(), "DELETE_OUTCOME_"))
}
