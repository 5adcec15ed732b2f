package cli

import (
	"errors"
	"io"

	"github.com/spf13/cobra"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

func (a *app) logsCommand() *cobra.Command {
	var (
		follow bool
		tail   int
	)
	c := &cobra.Command{
		Use:   "logs ID",
		Short: "Show a worker's captured output (stdout and stderr), from its hive",
		Long: `Show the last lines a worker wrote (its stdout and stderr, as its hive captured them), through the
queen. With --follow, keep printing what it writes until Ctrl-C, or until its processes are gone
and everything they wrote has been printed. The log of a deleted or failed worker stays readable
for a while: its hive keeps it (--log-keep-for, --log-keep-exited) and the queen remembers which
hive that was for its last 1024 removed workers. The output is the worker's own bytes; -o json
does not apply.`,
		Example: `  rbee worker logs demo
  rbee worker logs demo --tail 500
  rbee worker logs demo --follow`,
		Args: exactID("worker id"),
	}
	c.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing what the worker writes until Ctrl-C or until it is gone")
	c.Flags().IntVarP(&tail, "tail", "n", 100, "start with the last N lines")
	c.RunE = a.run(func(cmd *cobra.Command, args []string) error {
		if a.json() {
			return usagef("logs prints the worker's own output; -o json does not apply")
		}
		if tail < 1 {
			return usagef("--tail %d: want 1 or more lines", tail)
		}
		cl, err := a.connect()
		if err != nil {
			return err
		}
		defer cl.Close()
		// A follow lasts until Ctrl-C; only a plain read is bounded by --timeout.
		ctx, cancel := callContext(cmd.Context(), timeout(cmd))
		if follow {
			ctx, cancel = callContext(cmd.Context(), 0)
		}
		defer cancel()
		stream, err := cl.WorkerLogs(ctx, &rbeev1.WorkerLogsRequest{WorkerId: args[0], Follow: follow, TailLines: uint32(min(tail, 1<<31))})
		if err != nil {
			return err
		}
		for {
			resp, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				return nil
			}
			if err != nil {
				if follow && cmd.Context().Err() != nil {
					return nil // Ctrl-C: the way a follow ends
				}
				return err
			}
			if _, err := a.out.Write(resp.GetData()); err != nil {
				return err
			}
		}
	})
	return c
}
