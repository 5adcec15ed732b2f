package cli

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

func (a *app) spawnCommand() *cobra.Command {
	var req rbeev1.SpawnWorkerRequest
	var wait bool
	c := &cobra.Command{
		Use:   "spawn --model MODEL",
		Short: "Start a worker on a hive",
		Long: `Start a worker for a model on a hive (--hive, else the queen picks the least-loaded live hive).

Without --wait, rbee prints the worker as the queen recorded it (STARTING) and returns. With --wait it
follows the worker's progress until it is READY, then prints its id, hive, PID and port; if the
worker exits first rbee fails (exit status 11); if it is not READY within --timeout, rbee removes it
so nothing is left running, and fails (exit status 8).`,
		Example: `  rbee worker spawn --model llama-3-8b
  rbee worker spawn --model llama-3-8b --hive gpu-node-1 --device cuda:0 --id chat-1 --wait
  rbee worker spawn --model llama-3-8b --wait --timeout 2m -o json | jq .worker.port`,
		Args: cobra.NoArgs,
	}
	f := c.Flags()
	f.StringVar(&req.Model, "model", "", "the model the worker serves (required)")
	f.StringVar(&req.HiveId, "hive", "", "the hive to start it on (default: the queen picks)")
	f.StringVar(&req.Device, "device", "", `the device, e.g. "cpu" or "cuda:0" (default: cpu)`)
	f.StringVar(&req.WorkerId, "id", "", "the worker id (default: a new w-XXXXXXXXXX)")
	f.BoolVar(&wait, "wait", false, "wait until the worker is READY, showing its progress")
	// Shadows the global --timeout: starting a worker takes longer than an ordinary call.
	f.Duration("timeout", 60*time.Second, "how long the spawn (with --wait: until READY) may take")
	_ = c.MarkFlagRequired("model")
	c.RunE = a.run(func(cmd *cobra.Command, _ []string) error {
		cl, err := a.connect()
		if err != nil {
			return err
		}
		defer cl.Close()
		ctx, cancel := callContext(cmd.Context(), timeout(cmd))
		defer cancel()
		var w *rbeev1.Worker
		if wait {
			w, err = a.spawnAndWait(ctx, cl, &req, timeout(cmd))
		} else {
			var resp *rbeev1.SpawnWorkerResponse
			resp, err = cl.SpawnWorker(ctx, &req)
			w = resp.GetWorker()
		}
		if err != nil {
			return err
		}
		switch {
		case a.json():
			return writeJSON(a.out, &rbeev1.SpawnWorkerResponse{Worker: w})
		case !wait:
			return writeWorker(a.out, w, time.Now())
		}
		return nil
	})
	return c
}

// spawnSlack is how much longer than --timeout the SpawnWorker call itself may take.
const spawnSlack = 30 * time.Second

// received is one result of a watch stream's Recv.
type received struct {
	ev  *rbeev1.WatchWorkersResponse
	err error
}

// spawnAndWait spawns a worker and follows it on the queen's watch until it is READY (or BUSY).
// The watch is opened, and its snapshot consumed, before the spawn, so no change of the new
// worker can be missed. If ctx ends first the worker is removed, so nothing leaks.
func (a *app) spawnAndWait(ctx context.Context, cl *client, req *rbeev1.SpawnWorkerRequest, limit time.Duration) (*rbeev1.Worker, error) {
	pw := a.out
	if a.json() {
		pw = a.errOut // stdout holds only the JSON document
	}
	p := newProgress(pw, req.GetModel())
	defer p.stop()

	// The watch carries no deadline of its own (a deadline would end it from the queen's side
	// too, racing the removal below); it ends when this function returns.
	wctx, stopWatch := context.WithCancel(context.WithoutCancel(ctx))
	defer stopWatch()
	stream, err := cl.WatchWorkers(wctx, &rbeev1.WatchWorkersRequest{HiveId: req.GetHiveId()})
	if err != nil {
		return nil, err
	}
	events := make(chan received, 16)
	go func() {
		for {
			ev, err := stream.Recv()
			select {
			case events <- received{ev, err}:
			case <-wctx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	}()
	if err := awaitSynced(ctx, events); err != nil {
		return nil, err
	}

	// The queen must answer at once: the watch, not the call, tells the progress. The call runs
	// to its end even when the wait's deadline passes or the operator presses Ctrl-C meanwhile:
	// a spawn cut short may still start a process, and only a finished one tells which to remove.
	sreq := proto.Clone(req).(*rbeev1.SpawnWorkerRequest)
	sreq.WaitReady = false
	if sreq.WorkerId == "" {
		sreq.WorkerId = newWorkerID()
	}
	id := sreq.GetWorkerId()
	sctx, cancelSpawn := context.WithTimeout(context.WithoutCancel(ctx), limit+spawnSlack)
	defer cancelSpawn()
	resp, err := cl.SpawnWorker(sctx, sreq)
	if err != nil {
		if sctx.Err() != nil {
			p.stop()
			_ = removeWorker(cl, id) // best effort: the queen may have started it after all
			return nil, status.Errorf(codes.DeadlineExceeded, "the queen did not spawn worker %s within %v", id, limit+spawnSlack)
		}
		return nil, err
	}
	w := resp.GetWorker()
	p.update(w)

	// giveUp removes the half-started worker when the wait ends without READY: at the deadline,
	// on Ctrl-C (cause nil) or when the watch breaks.
	giveUp := func(cause error) (*rbeev1.Worker, error) {
		p.stop()
		rmErr := removeWorker(cl, id)
		removed := "it was removed"
		if rmErr != nil {
			removed = fmt.Sprintf("removing it failed too (%v); check with 'rbee worker get %s'", status.Convert(rmErr).Message(), id)
		}
		switch {
		case cause != nil:
			st := status.Convert(cause)
			return nil, status.Errorf(st.Code(), "following worker %s: %s; %s", id, st.Message(), removed)
		case ctx.Err() == context.DeadlineExceeded:
			return nil, status.Errorf(codes.DeadlineExceeded, "worker %s was not READY within %v; %s", id, limit, removed)
		default:
			return nil, status.Errorf(codes.Canceled, "interrupted while worker %s was starting; %s", id, removed)
		}
	}
	gone := func(reason string) (*rbeev1.Worker, error) {
		if reason == "" {
			reason = "it exited or was removed; the hive's log for it says why"
		}
		return nil, status.Errorf(codes.Aborted, "worker %s went away before it was READY: %s", id, reason)
	}

	if ctx.Err() != nil && !ready(w) {
		return giveUp(nil)
	}
	resetting, seen := false, false
	for !ready(w) {
		var r received
		select {
		case r = <-events:
		case <-ctx.Done():
			return giveUp(nil)
		}
		if r.err != nil {
			return giveUp(r.err)
		}
		ev := r.ev
		switch ev.GetType() {
		case rbeev1.WatchEventType_WATCH_EVENT_TYPE_ADDED, rbeev1.WatchEventType_WATCH_EVENT_TYPE_UPDATED:
			if ev.GetWorker().GetWorkerId() == id {
				w, seen = ev.GetWorker(), true
				p.update(w)
			}
		case rbeev1.WatchEventType_WATCH_EVENT_TYPE_REMOVED:
			if ev.GetWorker().GetWorkerId() == id {
				p.stop()
				return gone(ev.GetReason())
			}
		case rbeev1.WatchEventType_WATCH_EVENT_TYPE_RESET:
			// The watch fell behind: a fresh snapshot follows; if it lacks the worker, it is gone.
			resetting, seen = true, false
		case rbeev1.WatchEventType_WATCH_EVENT_TYPE_SYNCED:
			if resetting && !seen {
				p.stop()
				return gone("")
			}
			resetting = false
		}
	}
	p.finish(w)
	return w, nil
}

// newWorkerID makes a worker id in the queen's own style ("w-" and ten hex digits).
func newWorkerID() string {
	var b [5]byte
	_, _ = rand.Read(b[:])
	return "w-" + hex.EncodeToString(b[:])
}

// awaitSynced consumes a watch's initial snapshot up to its SYNCED marker.
func awaitSynced(ctx context.Context, events <-chan received) error {
	for {
		select {
		case r := <-events:
			if r.err != nil {
				if ctx.Err() != nil {
					return status.FromContextError(ctx.Err()).Err()
				}
				return r.err
			}
			if r.ev.GetType() == rbeev1.WatchEventType_WATCH_EVENT_TYPE_SYNCED {
				return nil
			}
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		}
	}
}

// ready reports whether a worker serves.
func ready(w *rbeev1.Worker) bool {
	s := w.GetState()
	return s == rbeev1.WorkerState_WORKER_STATE_READY || s == rbeev1.WorkerState_WORKER_STATE_BUSY
}
