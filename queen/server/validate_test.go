package server

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// TestEveryRequestFieldIsChecked sends each QueenService request field a bad value: each is
// INVALID_ARGUMENT naming the field, and nothing reaches the hive or the registry.
func TestEveryRequestFieldIsChecked(t *testing.T) {
	e := newEnv(t, Config{})
	long := strings.Repeat("x", 257)
	spawn := func(r *rbeev1.SpawnWorkerRequest) func() error {
		return func() error { _, err := e.queen.SpawnWorker(t.Context(), r); return err }
	}
	tests := []struct {
		name, field string
		call        func() error
	}{
		{"model missing", "model", spawn(&rbeev1.SpawnWorkerRequest{})},
		{"model too long", "model", spawn(&rbeev1.SpawnWorkerRequest{Model: long})},
		{"model control character", "model", spawn(&rbeev1.SpawnWorkerRequest{Model: "llama\n--evil"})},
		{"device unknown", "device", spawn(&rbeev1.SpawnWorkerRequest{Model: "m", Device: "tpu:0"})},
		{"device without index", "device", spawn(&rbeev1.SpawnWorkerRequest{Model: "m", Device: "cuda"})},
		{"device shell", "device", spawn(&rbeev1.SpawnWorkerRequest{Model: "m", Device: "cpu; rm -rf /"})},
		{"worker id upper case", "worker_id", spawn(&rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: "Worker"})},
		{"worker id path", "worker_id", spawn(&rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: "../etc"})},
		{"worker id too long", "worker_id", spawn(&rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: strings.Repeat("a", 64)})},
		{"hive id malformed", "hive_id", spawn(&rbeev1.SpawnWorkerRequest{Model: "m", HiveId: "h_1"})},
		{"list hive id", "hive_id", func() error {
			_, err := e.queen.ListWorkers(t.Context(), &rbeev1.ListWorkersRequest{HiveId: "H"})
			return err
		}},
		{"get worker id", "worker_id", func() error {
			_, err := e.queen.GetWorker(t.Context(), &rbeev1.GetWorkerRequest{WorkerId: ""})
			return err
		}},
		{"delete worker id", "worker_id", func() error {
			_, err := e.queen.DeleteWorker(t.Context(), &rbeev1.DeleteWorkerRequest{WorkerId: "-x"})
			return err
		}},
		{"delete grace negative", "grace_period", func() error {
			_, err := e.queen.DeleteWorker(t.Context(), &rbeev1.DeleteWorkerRequest{WorkerId: "x", GracePeriod: durationpb.New(-time.Second)})
			return err
		}},
		{"delete grace too long", "grace_period", func() error {
			_, err := e.queen.DeleteWorker(t.Context(), &rbeev1.DeleteWorkerRequest{WorkerId: "x", GracePeriod: durationpb.New(time.Hour)})
			return err
		}},
		{"delete grace malformed", "grace_period", func() error {
			_, err := e.queen.DeleteWorker(t.Context(), &rbeev1.DeleteWorkerRequest{WorkerId: "x", GracePeriod: &durationpb.Duration{Seconds: 1, Nanos: -5}})
			return err
		}},
		{"watch hive id", "hive_id", func() error {
			w, err := e.queen.WatchWorkers(t.Context(), &rbeev1.WatchWorkersRequest{HiveId: "a b"})
			if err == nil {
				_, err = w.Recv()
			}
			return err
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()
			if status.Code(err) != codes.InvalidArgument || !strings.HasPrefix(status.Convert(err).Message(), tt.field+": ") {
				t.Fatalf("got %v; want INVALID_ARGUMENT naming %s", err, tt.field)
			}
		})
	}
	if n := len(e.reg.List("")); n != 0 {
		t.Fatalf("registry has %d workers after only bad requests", n)
	}
	e.hive.mu.Lock()
	defer e.hive.mu.Unlock()
	if e.hive.nextPID != 0 || len(e.hive.deletes) != 0 {
		t.Fatal("a bad request reached the hive")
	}
}

// TestHeartbeatAddress: a worker's address is a host (IP or name) without a port; anything else
// is refused naming the field, and a good one reaches the registry's descriptor.
func TestHeartbeatAddress(t *testing.T) {
	base := func(a string) *rbeev1.Worker {
		return &rbeev1.Worker{WorkerId: "w1", HiveId: "h1", Model: "m", Device: "cpu", Pid: 42, Port: 9100,
			State: rbeev1.WorkerState_WORKER_STATE_READY, Address: a}
	}
	for _, a := range []string{"", "10.0.0.7", "gpu-1.example", "fd00::7"} {
		w, err := workerFromProto(base(a))
		if err != nil || w.Address != a {
			t.Errorf("address %q: %+v, %v", a, w, err)
		}
	}
	for _, a := range []string{"10.0.0.7:9100", "a b", "http://x", "[::1]"} {
		if _, err := workerFromProto(base(a)); err == nil || !strings.Contains(err.Error(), "worker.address") {
			t.Errorf("address %q: %v, want an error naming worker.address", a, err)
		}
	}
}
