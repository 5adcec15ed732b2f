// Package cli is the rbee command line: cobra commands that turn an operator's words into
// QueenService calls, and the queen's answers into tables, JSON and exit statuses.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/rbee-dev/rbee/internal/auth"
	"github.com/rbee-dev/rbee/internal/version"
)

// defaultQueen is where `make run` serves the queen.
const defaultQueen = "127.0.0.1:7833"

// app is one run of the command line: its flags and where it writes.
type app struct {
	g           globals
	out, errOut io.Writer
}

// Main runs rbee with args and returns its exit status. SIGINT and SIGTERM cancel the command's
// context, so a watch or a wait ends cleanly; a second one kills rbee at once.
func Main(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() { <-ctx.Done(); stop() }()
	a := &app{out: stdout, errOut: stderr}
	root := a.rootCommand()
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return ExitOK
	}
	var re runError
	if !errors.As(err, &re) {
		// Anything cobra refused before the command ran is a mistake in the command line.
		fmt.Fprintf(stderr, "rbee: %v\nRun '%s --help' for usage.\n", err, cmd.CommandPath())
		return ExitUsage
	}
	msg, code := describe(re.err, a.g.queen)
	fmt.Fprintf(stderr, "rbee: %s\n", msg)
	if code == ExitUsage {
		fmt.Fprintf(stderr, "Run '%s --help' for usage.\n", cmd.CommandPath())
	}
	return code
}

// run adapts a command's work to cobra, marking its errors as the command's own (see Main).
func (a *app) run(fn func(cmd *cobra.Command, args []string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		if err := fn(cmd, args); err != nil {
			return runError{err}
		}
		return nil
	}
}

func (a *app) rootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:   "rbee",
		Short: "Operate an rbee fleet: spawn, list, watch and remove workers through the queen",
		Long: `rbee is the operators' command line for an rbee fleet. It talks to the queen only
(--queen, env RBEE_QUEEN); the queen asks the hives to start and stop worker processes.

Every command prints a table for people, or with -o json one JSON document (the queen's answer,
with the field names grpcurl shows) for scripts; "worker watch -o json" prints one JSON object per
line. Errors are one sentence on stderr and a distinct exit status.

` + exitHelp,
		Example: `  rbee worker spawn --model llama-3-8b --wait
  rbee worker ls
  rbee --queen 10.0.0.5:7833 --tls-ca ca.pem --token-file token status -o json`,
		Version:       version.String("rbee"),
		SilenceErrors: true,
		SilenceUsage:  true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			if a.g.output != formatTable && a.g.output != formatJSON {
				return fmt.Errorf("-o %q: want table or json", a.g.output)
			}
			// 0 or a negative bound would silently mean "no bound" to the calls.
			if f := cmd.Flags().Lookup("timeout"); f != nil && f.Changed {
				if d := timeout(cmd); d <= 0 {
					return fmt.Errorf("--timeout %v: want a positive duration, e.g. 30s", d)
				}
			}
			return nil
		},
	}
	root.SetVersionTemplate("{{.Version}}\n")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return err })

	queen := os.Getenv("RBEE_QUEEN")
	if queen == "" {
		queen = defaultQueen
	}
	pf := root.PersistentFlags()
	pf.StringVar(&a.g.queen, "queen", queen, "the queen's address HOST:PORT, or several queens' A,B,C (env RBEE_QUEEN)")
	pf.StringVarP(&a.g.output, "output", "o", formatTable, "output format: table or json")
	pf.StringVar(&a.g.tokenFile, "token-file", "", "file holding the cluster token (else env RBEE_TOKEN), sent as 'authorization: Bearer'")
	pf.StringVar(&a.g.tlsCA, "tls-ca", "", "CA certificate (PEM) to verify the queen with; turns TLS on")
	pf.StringVar(&a.g.tlsCert, "tls-cert", "", "client certificate (PEM) for mutual TLS, with --tls-key")
	pf.StringVar(&a.g.tlsKey, "tls-key", "", "client private key (PEM) for mutual TLS, with --tls-cert")
	pf.Duration("timeout", 10*time.Second, "bound on each call to the queen (not for watch)")

	root.AddGroup(&cobra.Group{ID: "fleet", Title: "Fleet commands:"})
	for _, c := range []*cobra.Command{a.workerCommand(), a.hiveCommand(), a.statusCommand()} {
		c.GroupID = "fleet"
		root.AddCommand(c)
	}
	root.AddGroup(&cobra.Group{ID: "inference", Title: "Inference:"})
	chat := a.chatCommand()
	chat.GroupID = "inference"
	root.AddCommand(chat)
	refuseUnknownSubcommands(root)
	return root
}

// timeout is the command's --timeout (spawn has its own default).
func timeout(cmd *cobra.Command) time.Duration {
	d, _ := cmd.Flags().GetDuration("timeout")
	return d
}

// connect dials the queen for a command; the caller closes the client.
func (a *app) connect() (*client, error) {
	cl, err := a.g.dial()
	if err == nil && auth.TokenInClear(a.g.queen, cl.token, a.g.tlsCA != "") {
		fmt.Fprintf(a.errOut, "rbee: warning: %s\n", auth.TokenInClearWarning("--queen", a.g.queen))
	}
	return cl, err
}

// json reports whether -o json was asked for.
func (a *app) json() bool { return a.g.output == formatJSON }

// refuseUnknownSubcommands makes every command that only groups others ("rbee worker") refuse a
// word it does not know as a usage error; cobra would print the help and succeed. Alone, such a
// command prints its help.
func refuseUnknownSubcommands(c *cobra.Command) {
	for _, sub := range c.Commands() {
		refuseUnknownSubcommands(sub)
	}
	if c.Runnable() || !c.HasSubCommands() || c.Parent() == nil {
		return
	}
	c.Args = func(cmd *cobra.Command, args []string) error {
		if len(args) == 0 {
			return nil
		}
		msg := fmt.Sprintf("unknown command %q for %q", args[0], cmd.CommandPath())
		if cmd.SuggestionsMinimumDistance <= 0 {
			cmd.SuggestionsMinimumDistance = 2
		}
		if s := cmd.SuggestionsFor(args[0]); len(s) > 0 {
			msg += fmt.Sprintf("; did you mean %q?", s[0])
		}
		return errors.New(msg)
	}
	c.RunE = func(cmd *cobra.Command, _ []string) error { return cmd.Help() }
}

// exactID is cobra.ExactArgs(1) with a message that names what is missing.
func exactID(what string) cobra.PositionalArgs {
	return func(_ *cobra.Command, args []string) error {
		switch {
		case len(args) == 0:
			return fmt.Errorf("missing the %s", what)
		case len(args) > 1:
			return fmt.Errorf("one %s only, got %s", what, strings.Join(args, " "))
		}
		return nil
	}
}
