package e2e

import (
	"net/http"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// scrape fetches /metrics and returns the metric families.
func scrape(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return fams
}

// value returns the value of the series of family name whose labels include want (a counter,
// gauge, or a histogram's count), and whether there is one.
func value(fams map[string]*dto.MetricFamily, name string, want map[string]string) (float64, bool) {
	f := fams[name]
	if f == nil {
		return 0, false
	}
next:
	for _, m := range f.GetMetric() {
		got := map[string]string{}
		for _, l := range m.GetLabel() {
			got[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if got[k] != v {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount()), true
		}
	}
	return 0, false
}

// TestMetricsCountWhatHappened spawns and deletes workers and checks that the queen's and the
// hive's metrics moved by exactly that.
func TestMetricsCountWhatHappened(t *testing.T) {
	qp, addr := startQueen(t, "--metrics-listen", "127.0.0.1:0")
	qm := qp.awaitAction("metrics_start")["metrics_listen"].(string)
	hid := uniqueID("hm")
	cleanupWorkers(t, hid)
	hp, hiveAddr := startHive(t, addr, hid, "--metrics-listen", "127.0.0.1:0", "--worker-binary", stubbornWorker(t))
	hm := hp.awaitAction("metrics_start")["metrics_listen"].(string)
	q, _ := dial(t, addr)
	for _, id := range []string{"m1", "m2"} {
		if _, err := q.SpawnWorker(ctxT(t, 30*time.Second), &rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: id, WaitReady: true}); err != nil {
			t.Fatal(err)
		}
	}
	// The stubborn worker ignores SIGTERM: grace 0 kills it at once.
	if _, err := q.DeleteWorker(ctxT(t, 30*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: "m1", GracePeriod: durationpbNew(0)}); err != nil {
		t.Fatal(err)
	}
	// A delete the hive must refuse: PID 1 is never a worker.
	hc := hiveClient(t, hiveAddr)
	if _, err := hc.Delete(ctxT(t, 10*time.Second), &rbeev1.DeleteRequest{WorkerId: "m2", Pid: 1}); err == nil {
		t.Fatal("hive accepted PID 1")
	}

	qf := scrape(t, qm)
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"rbee_queen_spawn_to_ready_seconds", map[string]string{"outcome": "ready"}, 2},
		{"rbee_queen_delete_duration_seconds", map[string]string{"outcome": "killed"}, 1},
		{"rbee_queen_workers", map[string]string{"state": "ready", "hive": hid}, 1},
		{"rbee_queen_hives", map[string]string{"state": "ready"}, 1},
		{"grpc_server_handled_total", map[string]string{"grpc_method": "SpawnWorker", "grpc_code": "OK"}, 2},
		{"grpc_server_handled_total", map[string]string{"grpc_method": "DeleteWorker", "grpc_code": "OK"}, 1},
	} {
		if got, ok := value(qf, c.name, c.labels); !ok || got != c.want {
			t.Errorf("queen %s%v = %v (present %v), want %v", c.name, c.labels, got, ok, c.want)
		}
	}
	if got, _ := value(qf, "rbee_queen_heartbeats_received_total", map[string]string{"kind": "worker"}); got < 2 {
		t.Errorf("queen counted %v worker heartbeats, want at least one per worker", got)
	}
	hf := scrape(t, hm)
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"rbee_hive_spawns_total", map[string]string{"result": "ok"}, 2},
		{"rbee_hive_deletes_total", map[string]string{"outcome": "killed"}, 1},
		{"rbee_hive_deletes_total", map[string]string{"outcome": "exited"}, 0},
		{"rbee_hive_delete_refusals_total", map[string]string{"reason": "not_worker"}, 1},
		{"rbee_hive_worker_processes", nil, 1},
		{"grpc_server_handled_total", map[string]string{"grpc_method": "Delete", "grpc_code": "FailedPrecondition"}, 1},
	} {
		if got, ok := value(hf, c.name, c.labels); !ok || got != c.want {
			t.Errorf("hive %s%v = %v (present %v), want %v", c.name, c.labels, got, ok, c.want)
		}
	}
	if _, err := q.DeleteWorker(ctxT(t, 30*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: "m2", GracePeriod: durationpbNew(0)}); err != nil {
		t.Fatal(err)
	}
	noWorkersLeft(t, hid)
}
