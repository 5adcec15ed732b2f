package cli

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

func (a *app) workerCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "worker",
		Short: "Spawn, list, inspect, watch and remove workers, and read their logs",
		Example: `  rbee worker spawn --model llama-3-8b --id demo --wait
  rbee worker ls
  rbee worker rm demo`,
	}
	c.AddCommand(a.spawnCommand(), a.lsCommand(), a.getCommand(), a.rmCommand(), a.watchCommand(), a.logsCommand())
	return c
}

func (a *app) lsCommand() *cobra.Command {
	var hive, model, state string
	c := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List the workers the queen knows",
		Long: `List the workers the queen knows, sorted by id. The queen answers in pages (1000 workers each);
rbee asks for every page and prints them as one list (--timeout bounds each page's call).`,
		Example: `  rbee worker ls
  rbee worker ls --hive gpu-node-1
  rbee worker ls --model llama-3-8b --state ready
  rbee worker ls -o json | jq -r '.workers[].workerId'`,
		Args: cobra.NoArgs,
	}
	c.Flags().StringVar(&hive, "hive", "", "only the workers of this hive")
	c.Flags().StringVar(&model, "model", "", "only the workers of this model")
	c.Flags().StringVar(&state, "state", "", "only the workers in this state (starting, ready, busy, stopping, stale)")
	c.RunE = a.run(func(cmd *cobra.Command, _ []string) error {
		req := &rbeev1.ListWorkersRequest{HiveId: hive, Model: model}
		if state != "" {
			v, ok := rbeev1.WorkerState_value["WORKER_STATE_"+strings.ToUpper(state)]
			if !ok || v == 0 {
				return usagef("--state %q: want starting, ready, busy, stopping or stale", state)
			}
			req.State = rbeev1.WorkerState(v)
		}
		cl, err := a.connect()
		if err != nil {
			return err
		}
		defer cl.Close()
		all := &rbeev1.ListWorkersResponse{}
		for {
			ctx, cancel := callContext(cmd.Context(), timeout(cmd))
			resp, err := cl.ListWorkers(ctx, req)
			cancel()
			if err != nil {
				return err
			}
			all.Workers = append(all.Workers, resp.GetWorkers()...)
			if resp.GetNextPageToken() == "" {
				break
			}
			req.PageToken = resp.GetNextPageToken()
		}
		if a.json() {
			return writeJSON(a.out, all)
		}
		return writeWorkers(a.out, all.GetWorkers(), time.Now())
	})
	return c
}

func (a *app) getCommand() *cobra.Command {
	c := &cobra.Command{
		Use:     "get ID",
		Short:   "Show one worker",
		Example: "  rbee worker get demo\n  rbee worker get demo -o json | jq .worker.port",
		Args:    exactID("worker id"),
	}
	c.RunE = a.run(func(cmd *cobra.Command, args []string) error {
		return unary(a, cmd, func(ctx context.Context, cl *client) (*rbeev1.GetWorkerResponse, error) {
			return cl.GetWorker(ctx, &rbeev1.GetWorkerRequest{WorkerId: args[0]})
		}, func(resp *rbeev1.GetWorkerResponse) error {
			return writeWorker(a.out, resp.GetWorker(), time.Now())
		})
	})
	return c
}

func (a *app) rmCommand() *cobra.Command {
	var grace time.Duration
	c := &cobra.Command{
		Use:     "rm ID",
		Aliases: []string{"delete"},
		Short:   "Stop a worker (SIGTERM, then SIGKILL after the grace period) and forget it",
		Long: `Stop a worker: its hive proves the PID is that worker's process, sends SIGTERM, waits up to the
grace period and sends SIGKILL if it must. rbee prints how the worker left and how long it took.`,
		Example: "  rbee worker rm demo\n  rbee worker rm demo --grace 30s -o json",
		Args:    exactID("worker id"),
	}
	c.Flags().DurationVar(&grace, "grace", 0, "time between SIGTERM and SIGKILL (default: the hive's --grace)")
	c.RunE = a.run(func(cmd *cobra.Command, args []string) error {
		if grace < 0 {
			return usagef("--grace %v: must not be negative", grace)
		}
		req := &rbeev1.DeleteWorkerRequest{WorkerId: args[0]}
		if cmd.Flags().Changed("grace") {
			req.GracePeriod = durationpb.New(grace)
		}
		cl, err := a.connect()
		if err != nil {
			return err
		}
		defer cl.Close()
		// The call lasts as long as the grace period, so --timeout must not cut it short; unset,
		// the grace period is the hive's and unknown here.
		d := max(timeout(cmd), grace+15*time.Second)
		if req.GracePeriod == nil {
			d = max(timeout(cmd), time.Minute)
		}
		ctx, cancel := callContext(cmd.Context(), d)
		defer cancel()
		began := time.Now()
		resp, err := cl.DeleteWorker(ctx, req)
		if err != nil {
			return err
		}
		if a.json() {
			return writeJSON(a.out, resp)
		}
		took := short(time.Since(began))
		id := args[0]
		switch resp.GetOutcome() {
		case rbeev1.DeleteOutcome_DELETE_OUTCOME_EXITED:
			fmt.Fprintf(a.out, "worker %s exited (graceful) in %s\n", id, took)
		case rbeev1.DeleteOutcome_DELETE_OUTCOME_KILLED:
			period := "the grace period"
			if req.GracePeriod != nil {
				period = "the " + grace.String() + " grace period"
			}
			fmt.Fprintf(a.out, "worker %s was killed after %s (took %s)\n", id, period, took)
		case rbeev1.DeleteOutcome_DELETE_OUTCOME_ALREADY_EXITED:
			fmt.Fprintf(a.out, "worker %s was already gone (took %s)\n", id, took)
		default:
			fmt.Fprintf(a.out, "worker %s removed: %s (took %s)\n", id, resp.GetOutcome(), took)
		}
		return nil
	})
	return c
}

func (a *app) watchCommand() *cobra.Command {
	var hive string
	c := &cobra.Command{
		Use:   "watch",
		Short: "Show the workers, then every change, until Ctrl-C",
		Long: `Show the workers the queen knows, then one line per change (ADDED, UPDATED, REMOVED) until
Ctrl-C. With -o json every event is one JSON object on its own line: the snapshot as ADDED events,
one SYNCED, then the changes; RESET means the watch fell behind: forget every worker, a fresh
snapshot and SYNCED follow.`,
		Example: "  rbee worker watch\n  rbee worker watch --hive gpu-node-1 -o json | jq -c 'select(.type==\"WATCH_EVENT_TYPE_UPDATED\")'",
		Args:    cobra.NoArgs,
	}
	c.Flags().StringVar(&hive, "hive", "", "only the workers of this hive")
	c.RunE = a.run(func(cmd *cobra.Command, _ []string) error {
		cl, err := a.connect()
		if err != nil {
			return err
		}
		defer cl.Close()
		ctx := cmd.Context()
		stream, err := cl.WatchWorkers(ctx, &rbeev1.WatchWorkersRequest{HiveId: hive})
		if err != nil {
			return err
		}
		var snapshot []*rbeev1.Worker
		synced := false
		for {
			ev, err := stream.Recv()
			if err != nil {
				if ctx.Err() != nil {
					return nil // Ctrl-C: the way a watch ends.
				}
				return err
			}
			if a.json() {
				if err := writeJSONLine(a.out, ev); err != nil {
					return err
				}
				continue
			}
			switch {
			case !synced && ev.GetType() != rbeev1.WatchEventType_WATCH_EVENT_TYPE_SYNCED:
				// The queen reads its snapshot as it sends it, so changes to workers already sent
				// can come before SYNCED: fold them into the table.
				snapshot = applyEvent(snapshot, ev)
			case !synced:
				synced = true
				if err := writeWorkers(a.out, snapshot, time.Now()); err != nil {
					return err
				}
				fmt.Fprintln(a.errOut, "watching for changes (Ctrl-C to stop)")
			default:
				fmt.Fprintln(a.out, eventLine(ev, time.Now()))
			}
		}
	})
	return c
}

// eventLine is one change of a watch in words.
func eventLine(ev *rbeev1.WatchWorkersResponse, now time.Time) string {
	at := now.Format("15:04:05")
	switch ev.GetType() {
	case rbeev1.WatchEventType_WATCH_EVENT_TYPE_SYNCED:
		return at + " SYNCED"
	case rbeev1.WatchEventType_WATCH_EVENT_TYPE_RESET:
		return at + " RESET (the watch fell behind; a fresh snapshot follows)"
	}
	w := ev.GetWorker()
	typ := strings.TrimPrefix(ev.GetType().String(), "WATCH_EVENT_TYPE_")
	line := fmt.Sprintf("%s %-7s %s hive=%s model=%s state=%s pid=%s port=%s", at, typ, w.GetWorkerId(), w.GetHiveId(),
		w.GetModel(), stateName(w.GetState()), orDash(w.GetPid()), orDash(w.GetPort()))
	if r := ev.GetReason(); r != "" {
		// A reason may hold the worker's last lines; the first says enough for one line.
		first, _, _ := strings.Cut(r, "\n")
		line += " reason=" + strconv.Quote(first)
	}
	return line
}

// removeWorker deletes a worker the CLI will not keep (spawn --wait gave up), on a context of its
// own because the command's may already be cancelled. A worker whose spawn is still in progress
// cannot be deleted yet (FAILED_PRECONDITION), so that is retried for a while; one the queen
// does not know (any more) needs no removal.
func removeWorker(cl *client, id string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	backoff := 50 * time.Millisecond
	for {
		_, err := cl.DeleteWorker(ctx, &rbeev1.DeleteWorkerRequest{WorkerId: id, GracePeriod: durationpb.New(0)})
		switch status.Code(err) {
		case codes.OK, codes.NotFound:
			return nil
		case codes.FailedPrecondition:
		default:
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, time.Second)
	}
}

// applyEvent folds a watch event into a list of workers kept in id order.
func applyEvent(ws []*rbeev1.Worker, ev *rbeev1.WatchWorkersResponse) []*rbeev1.Worker {
	if ev.GetType() == rbeev1.WatchEventType_WATCH_EVENT_TYPE_RESET {
		return ws[:0]
	}
	id := ev.GetWorker().GetWorkerId()
	i, found := slices.BinarySearchFunc(ws, id, func(w *rbeev1.Worker, id string) int { return strings.Compare(w.GetWorkerId(), id) })
	switch ev.GetType() {
	case rbeev1.WatchEventType_WATCH_EVENT_TYPE_ADDED, rbeev1.WatchEventType_WATCH_EVENT_TYPE_UPDATED:
		if found {
			ws[i] = ev.GetWorker()
		} else {
			ws = slices.Insert(ws, i, ev.GetWorker())
		}
	case rbeev1.WatchEventType_WATCH_EVENT_TYPE_REMOVED:
		if found {
			ws = slices.Delete(ws, i, i+1)
		}
	}
	return ws
}
