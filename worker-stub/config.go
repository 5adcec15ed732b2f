package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/rbee-dev/rbee/worker/contract"
)

// config holds the parsed command line.
type config struct {
	contract.Args
	host string
	// address is what the worker reports as Worker.address: the host it was told to bind
	// ($RBEE_WORKER_HOST or --host), "" for the default loopback or an unspecified host.
	address string

	ignoreSIGTERM bool
	spawnChildren int
	readyAfter    time.Duration
	exitAfter     time.Duration
	exitCode      int
	noHeartbeat   bool

	logLevel string
	version  bool

	openai openaiConfig // the OpenAI-compatible server mode (openai_config.go)
}

// maxChildren bounds --spawn-children: a test knob, not a fork bomb.
const maxChildren = 64

// parseFlags parses and checks args; help is written to stdout. It returns flag.ErrHelp for
// --help; any other error is a usage error (exit status 2).
func parseFlags(args []string, stdout io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("worker-stub", flag.ContinueOnError)
	// The flag package's own printing is silenced: help goes to stdout, errors to the caller.
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	c.Register(fs, "port to listen on when no socket is inherited (0: any free port)")
	fs.StringVar(&c.host, "host", "127.0.0.1", "host to listen on when no socket is inherited (LISTEN_FDS)")
	fs.BoolVar(&c.ignoreSIGTERM, "ignore-sigterm", false, "test knob: log SIGTERM and keep running")
	fs.IntVar(&c.spawnChildren, "spawn-children", 0, "test knob: fork N children that sleep until killed, one of them in a new session")
	fs.DurationVar(&c.readyAfter, "ready-after", 0, "test knob: stay STARTING this long after serving")
	fs.DurationVar(&c.exitAfter, "exit-after", 0, "test knob: exit by itself after this long (0: never), with --exit-code")
	fs.IntVar(&c.exitCode, "exit-code", 1, "test knob: exit status for --exit-after")
	fs.BoolVar(&c.noHeartbeat, "no-heartbeat", false, "test knob: never contact the queen")
	fs.StringVar(&c.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.BoolVar(&c.version, "version", false, "print the version and exit")
	c.openai.register(fs)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprintf(stdout, "Usage: worker-stub --worker-id ID [flags]\n       worker-stub --openai [flags]\n\n"+
				"A stand-in rbee worker: serves gRPC health, heartbeats to the queen, stops on SIGTERM.\n"+
				"With --openai, a stand-in OpenAI-compatible inference server instead.\n\nFlags:\n")
			fs.SetOutput(stdout)
			fs.PrintDefaults()
			return c, err
		}
		return c, fmt.Errorf("%v (see --help)", err)
	}
	if c.version {
		return c, nil
	}
	switch {
	case fs.NArg() > 0:
		return c, fmt.Errorf("unexpected arguments %q", fs.Args())
	case c.spawnChildren < 0 || c.spawnChildren > maxChildren:
		return c, fmt.Errorf("--spawn-children must be in 0..%d", maxChildren)
	case c.exitCode < 0 || c.exitCode > 255:
		return c, fmt.Errorf("--exit-code must be in 0..255")
	case c.readyAfter < 0 || c.exitAfter < 0:
		return c, fmt.Errorf("--ready-after and --exit-after must not be negative")
	}
	if err := c.openai.check(fs, &c); err != nil {
		return c, err
	}
	// A stand-in for a server that knows nothing of rbee (--openai) never heartbeats, so it
	// needs no identity; its supervisor (worker-shim) reports for it.
	if err := c.Check(contract.Rules{AnyPort: true, Anonymous: c.openai.enabled}); err != nil {
		return c, err
	}
	if !c.openai.enabled {
		hostSet := false
		fs.Visit(func(f *flag.Flag) { hostSet = hostSet || f.Name == "host" })
		// The hive hands the host the socket is bound on (its --worker-host); a worker reports it
		// so that other machines know where to reach its port.
		if h := contract.Host(); h != "" && !hostSet {
			c.host, hostSet = h, true
		}
		if hostSet {
			c.address = contract.ReportedAddress(c.host)
		}
	}
	return c, nil
}
