// Command worker-shim supervises one inference server that does not speak rbee (llama.cpp's
// llama-server, vLLM, SGLang, TGI, ...), as containerd-shim and conmon supervise one container: the
// hive starts worker-shim as the worker's process, the shim starts the server as its child (same
// cgroup, same process group, killed with the shim), reads the server's readiness from its HTTP
// health endpoint, and keeps the worker's heartbeat stream to the queen with the full descriptor.
// SIGTERM is forwarded to the server; the shim exits with the server's exit status.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"time"

	"github.com/rbee-dev/rbee/internal/logging"
	"github.com/rbee-dev/rbee/internal/version"
	"github.com/rbee-dev/rbee/worker/contract"
	"go.uber.org/zap"
)

func init() {
	// The server is forked from the main thread, which lives as long as the process: its
	// Pdeathsig (SIGKILL when the parent thread dies) then fires exactly when the shim dies.
	runtime.LockOSThread()
}

func main() {
	sizeRuntime()
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// sizeRuntime gives the Go runtime one P: the shim does a health check and a heartbeat a second,
// one shim per worker on the machine, and on a many-core machine the default would give each as
// many per-P caches, and more threads. GOMAXPROCS in the environment wins; the server does not
// inherit the setting. (A soft memory limit was tried too: at 6 MiB it held the shim's private
// memory at 3.1 MB where it otherwise grows to about 5 MB before a collection, but the collector
// then ran without pause in one of two runs, 3.5% of a core; the runtime's own floor is too close.)
func sizeRuntime() {
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(1)
	}
}

// config is the parsed command line.
type config struct {
	contract.Args

	health           string
	loadTimeout      time.Duration
	unhealthyTimeout time.Duration
	grace            time.Duration
	concurrency      uint
	pollInterval     time.Duration // health checks while loading
	checkInterval    time.Duration // health checks once ready

	cmd      []string
	logLevel string
	version  bool
}

const usage = `Usage: worker-shim --worker-id ID --hive-id ID --model M --port P --queen ADDR [flags] -- SERVER [ARGS...]

Runs SERVER as a supervised rbee worker: reports STARTING until GET http://HOST:PORT<health>
answers 200, then READY; UNHEALTHY when health fails after that; stops the server when loading
takes longer than --load-timeout or health fails longer than --unhealthy-timeout. The hive starts
it for every model of its catalog (hive --models); HOST is $RBEE_WORKER_HOST, default 127.0.0.1.

Flags:
`

func parseFlags(args []string, stdout io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("worker-shim", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	c.Register(fs, "port the server binds (required)")
	fs.StringVar(&c.health, "health", "/health", "HTTP path whose 200 means the server is ready")
	fs.DurationVar(&c.loadTimeout, "load-timeout", 10*time.Minute, "longest the server may take to answer health with 200; then it is stopped")
	fs.DurationVar(&c.unhealthyTimeout, "unhealthy-timeout", 30*time.Second, "longest a ready server may fail health; then it is stopped")
	fs.DurationVar(&c.grace, "grace", 2*time.Second, "when the shim stops the server itself: time between SIGTERM and SIGKILL")
	fs.UintVar(&c.concurrency, "concurrency", 0, "requests the server serves at once, reported to the queen (0: not limited)")
	fs.DurationVar(&c.pollInterval, "poll-interval", 20*time.Millisecond, "health check interval while loading")
	fs.DurationVar(&c.checkInterval, "check-interval", time.Second, "health check interval once ready")
	fs.StringVar(&c.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.BoolVar(&c.version, "version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, usage)
			fs.SetOutput(stdout)
			fs.PrintDefaults()
			return c, err
		}
		return c, fmt.Errorf("%v (see --help)", err)
	}
	if c.version {
		return c, nil
	}
	c.cmd = fs.Args()
	switch {
	case len(c.cmd) == 0:
		return c, errors.New("no server command: give it after --, e.g. -- /usr/bin/llama-server --port 9100")
	case c.health == "" || c.health[0] != '/':
		return c, fmt.Errorf("--health %q: want an HTTP path such as /health", c.health)
	case c.loadTimeout <= 0 || c.unhealthyTimeout <= 0 || c.grace < 0:
		return c, errors.New("--load-timeout and --unhealthy-timeout must be positive, --grace not negative")
	case c.pollInterval < time.Millisecond || c.checkInterval < time.Millisecond:
		return c, errors.New("--poll-interval and --check-interval must be at least 1ms")
	case c.concurrency > 1<<16:
		return c, fmt.Errorf("--concurrency %d: at most 65536", c.concurrency)
	}
	// The server binds --port itself and the shim reports for it: every argument is required.
	return c, c.Check(contract.Rules{})
}

// run is the whole program; it returns the exit status (the server's, once it ran).
func run(args []string, stdout, stderr io.Writer) int {
	cfg, err := parseFlags(args, stdout)
	switch {
	case errors.Is(err, flag.ErrHelp):
		return 0
	case err != nil:
		fmt.Fprintf(stderr, "worker-shim: %v\n", err)
		return 2
	case cfg.version:
		fmt.Fprintln(stdout, version.String("worker-shim"))
		return 0
	}
	base, err := logging.New("worker-shim", cfg.logLevel)
	if err != nil {
		fmt.Fprintf(stderr, "worker-shim: %v\n", err)
		return 2
	}
	log := base.With(zap.String("worker_id", cfg.WorkerID))
	defer log.Sync() //nolint:errcheck // nothing to do about a failed flush
	return supervise(cfg, log, stderr)
}
