// Command hive runs on every machine of the fleet: it spawns worker processes for the queen and
// stops them by PID after proving their identity. It keeps no list of workers, so it can be
// restarted (or killed) at any time without losing one.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/known/durationpb"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/hive/catalog"
	"github.com/rbee-dev/rbee/hive/devices"
	"github.com/rbee-dev/rbee/hive/heartbeat"
	"github.com/rbee-dev/rbee/hive/process"
	"github.com/rbee-dev/rbee/hive/server"
	"github.com/rbee-dev/rbee/internal/auth"
	"github.com/rbee-dev/rbee/internal/cmdline"
	"github.com/rbee-dev/rbee/internal/hiveclock"
	"github.com/rbee-dev/rbee/internal/logging"
	"github.com/rbee-dev/rbee/internal/metrics"
	"github.com/rbee-dev/rbee/internal/rpcclient"
	"github.com/rbee-dev/rbee/internal/rpcserver"
	"github.com/rbee-dev/rbee/internal/validate"
	"github.com/rbee-dev/rbee/internal/version"
)

func main() {
	// A worker is started through the hive's own binary so that LISTEN_PID can name the worker's
	// PID; that re-execution ends here, in the worker.
	process.RunTrampolineIfRequested()
	os.Exit(run(os.Args[1:]))
}

type options struct {
	listen, hiveID, queen, workerBinary, portRange, advertise, logDir, logLevel, metricsListen, workerHost string
	models, shim                                                                                           string
	catalog                                                                                                *catalog.Catalog
	grace, logKeepFor                                                                                      time.Duration
	maxWorkers, logKeepExited                                                                              int
	register, noCgroups, noHandoff                                                                         bool
	authFlags                                                                                              auth.Flags
	creds                                                                                                  *auth.Material
}

func run(args []string) int {
	fs := flag.NewFlagSet("hive", flag.ContinueOnError)
	var o options
	fs.StringVar(&o.listen, "listen", "127.0.0.1:7835", "address to serve HiveService on")
	fs.StringVar(&o.hiveID, "hive-id", defaultHiveID(), "this hive's id (default: the host name)")
	fs.StringVar(&o.queen, "queen", "127.0.0.1:7833", "address of the queen, which workers and this hive report to; several queens (on etcd): A,B,C")
	fs.StringVar(&o.workerBinary, "worker-binary", "", "worker executable (default: worker-stub beside the hive binary, else on PATH)")
	fs.StringVar(&o.models, "models", "", "YAML model catalog: the models this hive serves and the command line of each (default: any model, with --worker-binary)")
	fs.StringVar(&o.shim, "worker-shim", "", "the per-worker supervisor for catalog models (default: worker-shim beside the hive binary, else on PATH)")
	fs.StringVar(&o.portRange, "port-range", "9100-9999", "ports for workers, LOW-HIGH")
	fs.StringVar(&o.workerHost, "worker-host", "127.0.0.1", "host (IP or name) workers' ports are bound on and reported at (Worker.address), handed to workers as $RBEE_WORKER_HOST; an address other machines can reach for routing across machines, 0.0.0.0 for all (reported as the hive's own host)")
	fs.DurationVar(&o.grace, "grace", 2*time.Second, "default grace period between SIGTERM and SIGKILL for Delete")
	fs.StringVar(&o.advertise, "advertise", "", "HOST:PORT the queen should call (default: the listen address)")
	fs.StringVar(&o.logDir, "log-dir", "", "directory for one capped log file per worker (default: a state directory)")
	fs.DurationVar(&o.logKeepFor, "log-keep-for", 24*time.Hour, "remove an exited worker's log this long after its last write")
	fs.IntVar(&o.logKeepExited, "log-keep-exited", 100, "keep the logs of at most this many exited workers (oldest removed first)")
	fs.IntVar(&o.maxWorkers, "max-workers", 0, "most worker processes at once (0: no cap)")
	fs.BoolVar(&o.register, "register", true, "register with the queen by heartbeat (off: the queen must be given --hive)")
	fs.BoolVar(&o.noCgroups, "no-cgroups", false, "do not put workers in cgroups even where cgroup v2 is writable")
	fs.BoolVar(&o.noHandoff, "no-socket-handoff", false, "for worker binaries that bind --port themselves: do not hand over the bound socket as LISTEN_FDS (fd 3), only choose a free port")
	fs.StringVar(&o.metricsListen, "metrics-listen", "", "[HOST]:PORT to serve Prometheus /metrics and /debug/pprof on (off by default; loopback when no host)")
	fs.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	o.authFlags.Register(fs)
	if code, done := cmdline.Parse(fs, "hive", "Runs worker processes on this machine for the rbee queen.", args); done {
		return code
	}
	cfg, err := o.check()
	if err != nil {
		fmt.Fprintf(os.Stderr, "hive: %v\n", err)
		return 2
	}
	log, err := logging.New("hive", o.logLevel)
	if err != nil {
		fmt.Fprintf(os.Stderr, "hive: %v\n", err)
		return 2
	}
	defer func() { _ = log.Sync() }()
	log = log.With(zap.String("hive_id", o.hiveID))
	for _, a := range []struct{ flag, addr string }{{"--listen", o.listen}, {"--queen", o.queen}} {
		if auth.TokenInClear(a.addr, o.creds.Token, o.creds.TLS.Enabled()) {
			log.Warn(auth.TokenInClearWarning(a.flag, a.addr), zap.String("actor", "hive"), zap.String("action", "token_in_clear"))
		}
	}
	if err := serve(o, cfg, log); err != nil {
		log.Error("hive stopped with an error", zap.Error(err))
		return 1
	}
	return 0
}

// check validates the flags and fills in defaults that need a look at the machine.
func (o *options) check() (process.Config, error) {
	var cfg process.Config
	if err := validate.ID("--hive-id", o.hiveID); err != nil {
		return cfg, err
	}
	if _, err := validate.Addresses("--queen", o.queen); err != nil {
		return cfg, err
	}
	if err := validate.ListenAddress("--listen", o.listen); err != nil {
		return cfg, err
	}
	if o.metricsListen != "" {
		if _, err := metrics.ListenAddress(o.metricsListen); err != nil {
			return cfg, err
		}
	}
	var err error
	if o.creds, err = o.authFlags.Load(); err != nil {
		return cfg, err
	}
	if err := auth.CheckExposure("--listen", o.listen, o.creds.Token, o.authFlags.Insecure); err != nil {
		return cfg, err
	}
	if err := validate.Host("--worker-host", o.workerHost); err != nil {
		return cfg, err
	}
	lo, hi, err := parsePortRange(o.portRange)
	if err != nil {
		return cfg, err
	}
	if o.grace < 0 || o.grace > validate.MaxGrace {
		return cfg, fmt.Errorf("--grace %v: want 0 to %v", o.grace, validate.MaxGrace)
	}
	if o.logKeepFor <= 0 {
		return cfg, fmt.Errorf("--log-keep-for %v: want a positive duration", o.logKeepFor)
	}
	if o.logKeepExited < 1 {
		return cfg, fmt.Errorf("--log-keep-exited %d: want 1 or more", o.logKeepExited)
	}
	if o.maxWorkers < 0 {
		return cfg, fmt.Errorf("--max-workers %d: want 0 (no cap) or more", o.maxWorkers)
	}
	if o.advertise != "" {
		if err := validate.Address("--advertise", o.advertise); err != nil {
			return cfg, err
		}
	}
	bin, err := workerBinary(o.workerBinary)
	if err != nil && o.models == "" {
		return cfg, err
	}
	if o.models != "" {
		// A bad catalog stops the hive here, with the line and field named, not at the first spawn.
		if o.catalog, err = catalog.Load(o.models); err != nil {
			return cfg, fmt.Errorf("--models: %w", err)
		}
		if o.shim, err = besideOrOnPath("--worker-shim", o.shim, "worker-shim"); err != nil {
			return cfg, err
		}
	}
	if o.logDir == "" {
		o.logDir = filepath.Join(stateDir(), "hive-"+o.hiveID, "logs")
	}
	cgroups := process.CgroupAuto
	if o.noCgroups {
		cgroups = process.CgroupOff
	}
	return process.Config{Binary: bin, PortLow: lo, PortHigh: hi, LogDir: o.logDir, MaxWorkers: o.maxWorkers, Cgroups: cgroups, HiveID: o.hiveID, NoHandoff: o.noHandoff,
		ListenHost: o.workerHost, LogKeepFor: o.logKeepFor, LogKeepExited: o.logKeepExited}, nil
}

func serve(o options, pcfg process.Config, log *zap.Logger) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	lis, err := net.Listen("tcp", o.listen)
	if err != nil {
		return fmt.Errorf("--listen %s: %w", o.listen, err)
	}
	if o.advertise == "" {
		o.advertise = advertiseFor(lis.Addr().(*net.TCPAddr))
	}
	inv := devices.NewInventory(ctx, devices.Config{Logger: log})
	invDone := make(chan struct{})
	go func() { defer close(invDone); inv.Run(ctx) }()
	defer func() { stop(); <-invDone }()

	var m *process.Manager
	var beater *heartbeat.Beater
	clk := hiveclock.New()
	if o.register {
		queens, _ := validate.Addresses("--queen", o.queen) // checked above
		target, qopts, err := rpcclient.QueenTarget(queens, rpcclient.HeartbeatService)
		if err != nil {
			return fmt.Errorf("--queen %q: %w", o.queen, err)
		}
		ports := uint32(pcfg.PortHigh - pcfg.PortLow + 1)
		dial := append(append([]grpc.DialOption{}, o.creds.Dial...), qopts...)
		beater = heartbeat.New(heartbeat.Config{Target: target, DialOptions: dial, Logger: log, Clock: clk.Reading, Describe: func() *rbeev1.Hive {
			// Describe runs only once m is set (Run starts below).
			return &rbeev1.Hive{HiveId: o.hiveID, Address: o.advertise, Version: version.Version(), Os: runtime.GOOS,
				Devices: inv.Names(), DeviceInfo: deviceInfo(inv.List()), FreePorts: freeSlots(ports, o.maxWorkers, m.Live()),
				Models: offers(o.catalog, o.grace)}
		}})
		pcfg.OnExit = beater.ReportExit
	}
	pcfg.Logger = log
	m, err = process.New(pcfg)
	if err != nil {
		return err
	}
	defer m.Close() // never kills workers: they outlive the hive

	ms := metrics.New()
	metricsDone, err := metrics.Start(ctx, o.metricsListen, ms, log)
	if err != nil {
		return err
	}
	// Calls run on goroutines that are kept, whose stacks have grown to what a Spawn or a Delete
	// needs: on a new goroutine per call, growing the stack through the interceptors and the
	// process core (runtime.newstack) was 18% of the hive's CPU in bench/lifecycle. A stream that
	// finds every worker busy gets a goroutine of its own, as without workers.
	srvOpts := append(o.creds.ServerOptions(), grpc.NumStreamWorkers(uint32(max(runtime.GOMAXPROCS(0), 2))))
	// Every unary answer, health checks included, carries a reading of the hive's clock: how a
	// queen that has no heartbeat from this hive (--register=false) bounds its calls.
	srv := rpcserver.New(rpcserver.Options{Logger: log, Metrics: ms.GRPC, Auth: o.creds.Verifier, ServerOptions: srvOpts,
		Unary: []grpc.UnaryServerInterceptor{clk.UnaryInterceptor()}})
	hs := server.New(server.Config{
		HiveID: o.hiveID, Queen: o.queen, Grace: o.grace, Registerer: ms.Registry, Live: m.Live,
		WorkerEnv: o.creds.TLS.Env(), WorkerAddress: workerAddress(o.workerHost), Devices: inv,
		Catalog: o.catalog, Shim: o.shim, WorkerHost: o.workerHost, Clock: clk,
	}, m)
	rbeev1.RegisterHiveServiceServer(srv.GRPC, hs)
	srv.Health.SetServingStatus(rbeev1.HiveService_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if beater != nil {
			beater.Run(ctx)
		}
	}()
	log.Info("hive serving", zap.String("listen", lis.Addr().String()), zap.String("advertise", o.advertise),
		zap.String("queen", o.queen), zap.String("worker_binary", pcfg.Binary), zap.String("log_dir", pcfg.LogDir), zap.String("worker_host", pcfg.ListenHost),
		zap.String("models", o.models), zap.Strings("catalog", o.catalog.Names()), zap.String("worker_shim", o.shim),
		zap.String("clock_instance", strconv.FormatUint(clk.Instance(), 16)),
		zap.String("actor", "hive"), zap.String("action", "hive_start"))
	err = srv.Serve(ctx, lis, hs.Drain)
	<-done
	if merr := metricsDone(); err == nil {
		err = merr
	}
	log.Info("hive stopped; its workers keep running", zap.String("actor", "hive"), zap.String("action", "hive_stop"))
	return err
}

// freeSlots is how many more workers the hive can start: the free ports of its range, capped by
// what --max-workers leaves. The queen places workers only on hives with a free slot.
func freeSlots(ports uint32, maxWorkers, live int) uint32 {
	free := ports - min(ports, uint32(live))
	if maxWorkers > 0 {
		free = min(free, uint32(max(0, maxWorkers-live)))
	}
	return free
}

// workerAddress is what a worker bound on host reports as its address: host itself, except for an
// unspecified one (0.0.0.0, ::), where the queen's view of the hive's host is the better answer.
func workerAddress(host string) string {
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		return ""
	}
	return host
}

// advertiseFor is the address the queen should call when --advertise is not given: the bound
// address, with the host name in place of an unspecified (0.0.0.0 or ::) host.
func advertiseFor(a *net.TCPAddr) string {
	if a.IP.IsUnspecified() {
		h, _ := os.Hostname()
		return net.JoinHostPort(h, strconv.Itoa(a.Port))
	}
	return a.String()
}

func parsePortRange(s string) (lo, hi int, err error) {
	a, b, ok := strings.Cut(s, "-")
	if ok {
		lo, err = strconv.Atoi(a)
		if err == nil {
			hi, err = strconv.Atoi(b)
		}
	}
	if !ok || err != nil || lo < 1 || hi > 65535 || lo > hi {
		return 0, 0, fmt.Errorf("--port-range %q: want LOW-HIGH with 1 <= LOW <= HIGH <= 65535", s)
	}
	return lo, hi, nil
}

// workerBinary resolves --worker-binary: as given, else worker-stub beside this binary, else on PATH.
func workerBinary(flagValue string) (string, error) {
	return besideOrOnPath("--worker-binary", flagValue, "worker-stub")
}

// besideOrOnPath resolves a program flag: as given, else name beside this binary, else on PATH.
func besideOrOnPath(flagName, flagValue, name string) (string, error) {
	if flagValue != "" {
		p, err := filepath.Abs(flagValue)
		if err != nil {
			return "", fmt.Errorf("%s %q: %w", flagName, flagValue, err)
		}
		return p, nil
	}
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), name)
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p, nil
		}
	}
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("%s not given and no %s beside the hive binary or on PATH", flagName, name)
	}
	return filepath.Abs(p)
}

// offers is the catalog as the queen sees it in the hive's heartbeat; nil without a catalog.
func offers(c *catalog.Catalog, hiveGrace time.Duration) []*rbeev1.ModelOffer {
	var out []*rbeev1.ModelOffer
	for _, m := range c.Models() {
		grace := m.Grace
		if grace == 0 {
			grace = hiveGrace
		}
		o := &rbeev1.ModelOffer{Name: m.Name, Devices: m.Devices, Concurrency: m.Concurrency,
			LoadTimeout: durationpb.New(m.LoadTimeout), Grace: durationpb.New(grace)}
		if m.TTL > 0 {
			o.Ttl = durationpb.New(m.TTL)
		}
		out = append(out, o)
	}
	return out
}

// defaultHiveID turns the host name into a valid id (lower case, [a-z0-9-], at most 63).
func defaultHiveID() string {
	h, _ := os.Hostname()
	h, _, _ = strings.Cut(strings.ToLower(h), ".")
	b := []byte(h)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9') {
			b[i] = '-'
		}
	}
	id := strings.Trim(string(b), "-")
	if len(id) > 63 {
		id = strings.Trim(id[:63], "-")
	}
	if id == "" {
		id = "hive"
	}
	return id
}

// stateDir is where the hive keeps worker logs by default: /var/lib/rbee as root, else the
// user's state directory.
func stateDir() string {
	if os.Geteuid() == 0 {
		return "/var/lib/rbee"
	}
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "rbee")
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "state", "rbee")
	}
	return filepath.Join(os.TempDir(), "rbee")
}

// deviceInfo is the heartbeat's form of the inventory.
func deviceInfo(ds []devices.Device) []*rbeev1.Device {
	out := make([]*rbeev1.Device, len(ds))
	for i, d := range ds {
		out[i] = &rbeev1.Device{Name: d.Name, Description: d.Description, MemoryTotalBytes: d.MemoryTotal, MemoryUsedBytes: d.MemoryUsed}
	}
	return out
}
