package server

import (
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/queen/registry"
)

var stateToProto = map[registry.State]rbeev1.WorkerState{
	registry.StateStarting:  rbeev1.WorkerState_WORKER_STATE_STARTING,
	registry.StateReady:     rbeev1.WorkerState_WORKER_STATE_READY,
	registry.StateBusy:      rbeev1.WorkerState_WORKER_STATE_BUSY,
	registry.StateStopping:  rbeev1.WorkerState_WORKER_STATE_STOPPING,
	registry.StateStale:     rbeev1.WorkerState_WORKER_STATE_STALE,
	registry.StateUnhealthy: rbeev1.WorkerState_WORKER_STATE_UNHEALTHY,
}

// reportable are the states a worker may report of itself; STALE is the queen's verdict.
var reportable = map[rbeev1.WorkerState]registry.State{
	rbeev1.WorkerState_WORKER_STATE_STARTING: registry.StateStarting,
	rbeev1.WorkerState_WORKER_STATE_READY:    registry.StateReady,
	rbeev1.WorkerState_WORKER_STATE_BUSY:     registry.StateBusy,
	rbeev1.WorkerState_WORKER_STATE_STOPPING: registry.StateStopping,
	// A supervisor (worker-shim) reports a served model's failing health check.
	rbeev1.WorkerState_WORKER_STATE_UNHEALTHY: registry.StateUnhealthy,
}

func workerToProto(w registry.Worker) *rbeev1.Worker {
	p := new(rbeev1.Worker)
	fillWorker(p, w, new(timestamppb.Timestamp), new(timestamppb.Timestamp))
	return p
}

// fillWorker writes w into p, using the two given timestamps (so a list can allocate them in bulk).
func fillWorker(p *rbeev1.Worker, w registry.Worker, beat, created *timestamppb.Timestamp) {
	p.WorkerId, p.HiveId, p.Model, p.Device = w.ID, w.HiveID, w.Model, w.Device
	p.Pid, p.Port, p.State, p.ProcessStartTime = w.PID, w.Port, stateToProto[w.State], w.ProcessStartTime
	p.Address, p.Concurrency, p.StatusMessage = w.Address, w.Concurrency, w.StatusMessage
	p.InFlight = w.InFlight
	if !w.LastHeartbeat.IsZero() {
		beat.Seconds, beat.Nanos = w.LastHeartbeat.Unix(), int32(w.LastHeartbeat.Nanosecond())
		p.LastHeartbeatTime = beat
	}
	if !w.Created.IsZero() {
		created.Seconds, created.Nanos = w.Created.Unix(), int32(w.Created.Nanosecond())
		p.CreateTime = created
	}
}

var hiveStateToProto = map[registry.HiveState]rbeev1.HiveState{
	registry.HiveReady: rbeev1.HiveState_HIVE_STATE_READY,
	registry.HiveStale: rbeev1.HiveState_HIVE_STATE_STALE,
}

func hiveToProto(h registry.Hive) *rbeev1.Hive {
	p := &rbeev1.Hive{
		HiveId:      h.ID,
		Address:     h.Address,
		State:       hiveStateToProto[h.State],
		WorkerCount: uint32(h.Workers),
		Version:     h.Version,
		Os:          h.OS,
		Devices:     h.Devices,
		FreePorts:   h.FreePorts,
		Static:      h.Static,
	}
	for _, d := range h.DeviceInfo {
		p.DeviceInfo = append(p.DeviceInfo, &rbeev1.Device{Name: d.Name, Description: d.Description,
			MemoryTotalBytes: d.MemoryTotal, MemoryUsedBytes: d.MemoryUsed})
	}
	for _, m := range h.Models {
		o := &rbeev1.ModelOffer{Name: m.Name, Devices: m.Devices, Concurrency: m.Concurrency}
		if m.LoadTimeout > 0 {
			o.LoadTimeout = durationpb.New(m.LoadTimeout)
		}
		if m.TTL > 0 {
			o.Ttl = durationpb.New(m.TTL)
		}
		if m.Grace > 0 {
			o.Grace = durationpb.New(m.Grace)
		}
		p.Models = append(p.Models, o)
	}
	if !h.LastHeartbeat.IsZero() {
		p.LastHeartbeatTime = timestamppb.New(h.LastHeartbeat)
	}
	return p
}
