// Command queen is rbee's orchestrator and single source of truth: it keeps the registry of
// workers and hives fed by heartbeats, and serves operators' spawn, list, get, watch and delete
// calls, forwarding process control to the hives.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/rbee-dev/rbee/internal/auth"
	"github.com/rbee-dev/rbee/internal/cmdline"
	"github.com/rbee-dev/rbee/internal/gcfloor"
	"github.com/rbee-dev/rbee/internal/logging"
	"github.com/rbee-dev/rbee/internal/metrics"
	"github.com/rbee-dev/rbee/internal/validate"
	"github.com/rbee-dev/rbee/queen/server"
)

func main() {
	setGCPercent(os.LookupEnv)
	os.Exit(run(os.Args[1:]))
}

// defaultGCPercent is the queen's GOGC unless the environment sets GOGC. Most of a queen's memory
// is goroutine stacks, one per heartbeat stream (8 KB each), and Go's collector lets the heap grow
// by GOGC percent of the live heap and the stacks together before it collects: at Go's default of
// 100, 10,000 workers leave room for about 120 MB of garbage, more than the live heap and stacks
// hold. At 50 the queen needs about 40 MB less at 10,000 workers, for a few more collections (the
// beats allocate little).
const defaultGCPercent = 50

// gcRoomFloor is the least room for garbage the queen's collector keeps (see gcfloor) when GOGC
// is not set. At 50 percent a small fleet leaves only a few MB: 1,000 workers beating as fast as
// they can (gRPC's transport allocates about 200 bytes a beat) made the queen collect five times a
// second, a fifth of its CPU per beat, mostly scanning every stream's stack. 32 MB is what 50
// percent already gives at about 5,000 workers, so from there on, 10,000 workers included, the
// floor changes nothing.
const gcRoomFloor = 32 << 20

// setGCPercent applies defaultGCPercent and gcRoomFloor when GOGC is not in the environment
// (lookup is os.LookupEnv): an operator's GOGC, off included, wins. It returns the floor it
// started, or nil.
func setGCPercent(lookup func(string) (string, bool)) *gcfloor.Floor {
	if _, set := lookup("GOGC"); set {
		return nil
	}
	return gcfloor.Start(defaultGCPercent, gcRoomFloor)
}

// hiveFlags collects repeatable --hive ID=HOST:PORT flags.
type hiveFlags []staticHive

type staticHive struct{ id, address string }

func (h *hiveFlags) String() string {
	parts := make([]string, len(*h))
	for i, s := range *h {
		parts[i] = s.id + "=" + s.address
	}
	return strings.Join(parts, ",")
}

func (h *hiveFlags) Set(v string) error {
	id, addr, ok := strings.Cut(v, "=")
	if !ok {
		return fmt.Errorf("%q: want ID=HOST:PORT", v)
	}
	if err := validate.ID("hive id", id); err != nil {
		return fmt.Errorf("%q: %v", v, err)
	}
	if err := validate.Address("hive address", addr); err != nil {
		return fmt.Errorf("%q: %v", v, err)
	}
	for _, s := range *h {
		if s.id == id {
			return fmt.Errorf("%q: hive %s given twice", v, id)
		}
	}
	*h = append(*h, staticHive{id, addr})
	return nil
}

type options struct {
	listen, advertise, logLevel, metricsListen      string
	http                                            httpOptions
	hives                                           hiveFlags
	interval, staleAfter, expireAfter, startTimeout time.Duration
	maxBeats, watchBuffer                           int
	maxWatchers, maxWatchersPerConn                 int
	watchSendTimeout                                time.Duration
	authFlags                                       auth.Flags
	creds                                           *auth.Material
	// Several queens (app.go): --etcd endpoints, how to reach etcd (etcd.go), the election lease
	// TTL, the takeover grace.
	etcdFlag                   string
	etcd                       []string
	etcdOpts                   etcdFlags
	etcdClient                 etcdClient
	electionTTL, takeoverGrace time.Duration
}

func run(args []string) int {
	fs := flag.NewFlagSet("queen", flag.ContinueOnError)
	var o options
	fs.StringVar(&o.listen, "listen", "127.0.0.1:7833", "address to serve on")
	fs.Var(&o.hives, "hive", "a static hive, ID=HOST:PORT (repeatable; hives may also register themselves)")
	fs.DurationVar(&o.interval, "heartbeat-interval", time.Second, "interval workers and hives beat at")
	fs.DurationVar(&o.staleAfter, "stale-after", 0, "no beat this long makes a worker STALE (default: 3 heartbeat intervals)")
	fs.DurationVar(&o.expireAfter, "expire-after", 5*time.Minute, "a worker STALE this long is forgotten")
	fs.DurationVar(&o.startTimeout, "start-timeout", 30*time.Second, "a spawned worker that never beats in this time is stopped and forgotten; also wait_ready's bound")
	fs.IntVar(&o.maxBeats, "max-beats-per-second", 20, "end a heartbeat stream that beats faster (0: no limit)")
	fs.IntVar(&o.watchBuffer, "watch-buffer", 1024, "changes buffered per watcher; a watcher that falls further behind is sent RESET and a fresh snapshot")
	fs.IntVar(&o.maxWatchers, "max-watchers", server.DefaultMaxWatchers, "WatchWorkers streams open at once; more are RESOURCE_EXHAUSTED")
	fs.IntVar(&o.maxWatchersPerConn, "max-watchers-per-conn", server.DefaultMaxWatchersPerConn, "WatchWorkers streams open at once on one client connection")
	fs.DurationVar(&o.watchSendTimeout, "watch-send-timeout", server.DefaultWatchSendTimeout, "end a watch whose client takes no message for this long (RESOURCE_EXHAUSTED)")
	fs.StringVar(&o.advertise, "advertise", "", "HOST:PORT workers should report to (default: the listen address; each hive's --queen when that is 0.0.0.0 or [::])")
	fs.StringVar(&o.metricsListen, "metrics-listen", "", "[HOST]:PORT to serve Prometheus /metrics and /debug/pprof on (off by default; loopback when no host)")
	fs.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	registerHAFlags(fs, &o)
	o.authFlags.Register(fs)
	o.http.register(fs)
	if code, done := cmdline.Parse(fs, "queen", "Runs the rbee queen: the registry of workers and hives, and the API operators use.", args); done {
		return code
	}
	if err := o.check(); err != nil {
		fmt.Fprintf(os.Stderr, "queen: %v\n", err)
		return 2
	}
	log, err := logging.New("queen", o.logLevel)
	if err != nil {
		fmt.Fprintf(os.Stderr, "queen: %v\n", err)
		return 2
	}
	defer func() { _ = log.Sync() }()
	if err := serve(o, log); err != nil {
		log.Error("queen stopped with an error", zap.Error(err))
		return 1
	}
	return 0
}

func (o *options) check() error {
	if err := validate.ListenAddress("--listen", o.listen); err != nil {
		return err
	}
	if o.interval < 10*time.Millisecond {
		return fmt.Errorf("--heartbeat-interval %v: want at least 10ms", o.interval)
	}
	if o.staleAfter == 0 {
		o.staleAfter = 3 * o.interval
	}
	if o.staleAfter < o.interval {
		return fmt.Errorf("--stale-after %v is shorter than --heartbeat-interval %v: healthy workers would flap", o.staleAfter, o.interval)
	}
	if o.expireAfter <= 0 || o.startTimeout <= 0 {
		return errors.New("--expire-after and --start-timeout must be positive")
	}
	if o.metricsListen != "" {
		if _, err := metrics.ListenAddress(o.metricsListen); err != nil {
			return err
		}
	}
	var err error
	if o.creds, err = o.authFlags.Load(); err != nil {
		return err
	}
	if err := auth.CheckExposure("--listen", o.listen, o.creds.Token, o.authFlags.Insecure); err != nil {
		return err
	}
	if o.watchBuffer < 1 {
		return fmt.Errorf("--watch-buffer %d: want at least 1", o.watchBuffer)
	}
	if o.maxWatchers < 1 || o.maxWatchersPerConn < 1 {
		return fmt.Errorf("--max-watchers %d, --max-watchers-per-conn %d: want at least 1", o.maxWatchers, o.maxWatchersPerConn)
	}
	if o.watchSendTimeout <= 0 {
		return fmt.Errorf("--watch-send-timeout %v: want a positive duration", o.watchSendTimeout)
	}
	if o.maxBeats < 0 {
		return fmt.Errorf("--max-beats-per-second %d: want 0 (no limit) or more", o.maxBeats)
	}
	if o.advertise != "" {
		if err := validate.Address("--advertise", o.advertise); err != nil {
			return err
		}
	}
	if err := o.checkHA(); err != nil {
		return err
	}
	o.http.startTimeout = o.startTimeout
	return o.http.check(o.creds.Token, o.authFlags.Insecure)
}

func serve(o options, log *zap.Logger) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	a, err := newApp(o, log)
	if err != nil {
		return err
	}
	return a.Run(ctx)
}
