package cli

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

func (a *app) hiveCommand() *cobra.Command {
	c := &cobra.Command{
		Use:     "hive",
		Short:   "Show the hives the queen knows",
		Example: "  rbee hive ls",
	}
	ls := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List the hives: address, liveness, worker count, last heartbeat",
		Example: "  rbee hive ls\n  rbee hive ls -o json | jq -r '.hives[].hiveId'",
		Args:    cobra.NoArgs,
	}
	ls.RunE = a.run(func(cmd *cobra.Command, _ []string) error {
		return unary(a, cmd, func(ctx context.Context, cl *client) (*rbeev1.ListHivesResponse, error) {
			return cl.ListHives(ctx, &rbeev1.ListHivesRequest{})
		}, func(resp *rbeev1.ListHivesResponse) error {
			return writeHives(a.out, resp.GetHives(), time.Now())
		})
	})
	c.AddCommand(ls)
	return c
}

func (a *app) statusCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "status",
		Short: "Show whether the queen is reachable, its id, version, uptime and counts",
		Example: `  rbee status
  rbee status -o json | jq '.workersByState'`,
		Args: cobra.NoArgs,
	}
	c.RunE = a.run(func(cmd *cobra.Command, _ []string) error {
		return unary(a, cmd, func(ctx context.Context, cl *client) (*rbeev1.GetStatusResponse, error) {
			return cl.GetStatus(ctx, &rbeev1.GetStatusRequest{})
		}, a.writeStatus)
	})
	return c
}

// writeStatus prints the queen's summary for people.
func (a *app) writeStatus(resp *rbeev1.GetStatusResponse) error {
	uptime := "-"
	if resp.GetStartTime() != nil {
		uptime = time.Since(resp.GetStartTime().AsTime()).Round(time.Second).String()
	}
	tw := newTable(a.out)
	fmt.Fprintf(tw, "QUEEN\t%s (reachable)\n", a.g.queen)
	fmt.Fprintf(tw, "ID\t%s\n", resp.GetQueenId())
	fmt.Fprintf(tw, "VERSION\t%s\n", resp.GetVersion())
	fmt.Fprintf(tw, "UPTIME\t%s\n", uptime)
	fmt.Fprintf(tw, "WORKERS\t%d%s\n", resp.GetWorkerCount(), counts(resp.GetWorkersByState(), "WORKER_STATE_"))
	fmt.Fprintf(tw, "HIVES\t%d%s\n", resp.GetHiveCount(), counts(resp.GetHivesByState(), "HIVE_STATE_"))
	return tw.Flush()
}

// counts renders per-state counts as " (READY 2, STARTING 1)", states in a stable order.
func counts(m map[string]uint32, prefix string) string {
	if len(m) == 0 {
		return ""
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s %d", strings.TrimPrefix(k, prefix), m[k])
	}
	return " (" + strings.Join(parts, ", ") + ")"
}
