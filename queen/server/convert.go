package server

import (
	"google.golang.org/protobuf/types/known/timestamppb"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/queen/registry"
)

var stateToProto = map[registry.State]rbeev1.WorkerState{
	registry.StateStarting: rbeev1.WorkerState_WORKER_STATE_STARTING,
	registry.StateReady:    rbeev1.WorkerState_WORKER_STATE_READY,
	registry.StateBusy:     rbeev1.WorkerState_WORKER_STATE_BUSY,
	registry.StateStopping: rbeev1.WorkerState_WORKER_STATE_STOPPING,
	registry.StateStale:    rbeev1.WorkerState_WORKER_STATE_STALE,
}

// reportable are the states a worker may report of itself; STALE is the queen's verdict.
var reportable = map[rbeev1.WorkerState]registry.State{
	rbeev1.WorkerState_WORKER_STATE_STARTING: registry.StateStarting,
	rbeev1.WorkerState_WORKER_STATE_READY:    registry.StateReady,
	rbeev1.WorkerState_WORKER_STATE_BUSY:     registry.StateBusy,
	rbeev1.WorkerState_WORKER_STATE_STOPPING: registry.StateStopping,
}

func workerToProto(w registry.Worker) *rbeev1.Worker {
	p := &rbeev1.Worker{
		WorkerId:         w.ID,
		HiveId:           w.HiveID,
		Model:            w.Model,
		Device:           w.Device,
		Pid:              w.PID,
		Port:             w.Port,
		State:            stateToProto[w.State],
		ProcessStartTime: w.ProcessStartTime,
	}
	if !w.LastHeartbeat.IsZero() {
		p.LastHeartbeatTime = timestamppb.New(w.LastHeartbeat)
	}
	if !w.Created.IsZero() {
		p.CreateTime = timestamppb.New(w.Created)
	}
	return p
}

func workersToProto(ws []registry.Worker) []*rbeev1.Worker {
	out := make([]*rbeev1.Worker, len(ws))
	for i, w := range ws {
		out[i] = workerToProto(w)
	}
	return out
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
	if !h.LastHeartbeat.IsZero() {
		p.LastHeartbeatTime = timestamppb.New(h.LastHeartbeat)
	}
	return p
}
