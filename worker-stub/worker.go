package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/activation"
	"github.com/rbee-dev/rbee/internal/logging"
	"github.com/rbee-dev/rbee/internal/narrate"
	"github.com/rbee-dev/rbee/internal/procstat"
	"github.com/rbee-dev/rbee/internal/version"
	"github.com/rbee-dev/rbee/worker/heartbeat"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// Bounds on the shutdown steps, so that a silent queen or a client holding a health Watch stream
// cannot keep a stopping worker alive past the hive's grace period (2s by default): together
// they stay under 2s.
const (
	stoppingBeatTimeout = time.Second
	gracefulStopTimeout = 500 * time.Millisecond
	streamCloseTimeout  = 300 * time.Millisecond
)

const actor = "worker"

// run is the whole program; it returns the exit status.
func run(args []string, stdout, stderr io.Writer) int {
	cfg, err := parseFlags(args, stdout)
	switch {
	case errors.Is(err, flag.ErrHelp):
		return 0
	case err != nil:
		fmt.Fprintf(stderr, "worker-stub: %v\n", err)
		return 2
	case cfg.version:
		fmt.Fprintln(stdout, version.String("worker-stub"))
		return 0
	}
	base, err := logging.New("worker-stub", cfg.logLevel)
	if err != nil {
		fmt.Fprintf(stderr, "worker-stub: %v\n", err)
		return 2
	}
	// Every line names the worker, so that one grep follows it through hive and queen logs too.
	log := base.With(zap.String("worker_id", cfg.WorkerID))
	defer log.Sync() //nolint:errcheck // nothing to do about a failed flush of stdout
	if cfg.openai.enabled {
		return serveOpenAI(cfg, log, stderr)
	}
	if err := serve(cfg, log); err != nil {
		log.Error("worker failed", zap.Error(err))
		return 1
	}
	return 0
}

// descriptorSource builds the worker's full descriptor; only the state changes over its life.
type descriptorSource struct {
	base  *rbeev1.Worker // never mutated after construction
	state atomic.Int32   // rbeev1.WorkerState
}

func (d *descriptorSource) set(s rbeev1.WorkerState) { d.state.Store(int32(s)) }

func (d *descriptorSource) get() rbeev1.WorkerState { return rbeev1.WorkerState(d.state.Load()) }

// descriptor returns a fresh copy, since the heartbeat client may marshal it concurrently.
func (d *descriptorSource) descriptor() *rbeev1.Worker {
	w := &rbeev1.Worker{
		WorkerId:         d.base.WorkerId,
		HiveId:           d.base.HiveId,
		Model:            d.base.Model,
		Device:           d.base.Device,
		Pid:              d.base.Pid,
		Port:             d.base.Port,
		ProcessStartTime: d.base.ProcessStartTime,
		Address:          d.base.Address,
		State:            d.get(),
	}
	return w
}

// listen returns the socket inherited from the hive (LISTEN_FDS=1 on fd 3) or, without one, a new
// socket on host:port.
func listen(cfg config) (net.Listener, bool, error) {
	ls, err := activation.Listeners(true)
	if err != nil {
		return nil, false, err
	}
	switch len(ls) {
	case 0:
		l, err := net.Listen("tcp", net.JoinHostPort(cfg.host, strconv.Itoa(cfg.Port)))
		return l, false, err
	case 1:
		return ls[0], true, nil
	default:
		for _, l := range ls {
			l.Close()
		}
		return nil, false, fmt.Errorf("%d inherited sockets; a worker takes exactly one", len(ls))
	}
}

// serve runs the worker until SIGTERM/SIGINT (or --exit-after) and returns nil on a clean stop.
func serve(cfg config, log *zap.Logger) error {
	ctx, cancel := context.WithCancel(narrate.WithLogger(context.Background(), log))
	defer cancel()
	// Subscribe before anything else so that an early SIGTERM is a clean stop, not a crash.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)

	pid := os.Getpid()
	startTime, err := procstat.StartTime(pid)
	if err != nil {
		return fmt.Errorf("own start time: %w", err)
	}
	lis, inherited, err := listen(cfg)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	port := lis.Addr().(*net.TCPAddr).Port

	desc := &descriptorSource{base: &rbeev1.Worker{
		WorkerId: cfg.WorkerID, HiveId: cfg.HiveID, Model: cfg.Model, Device: cfg.Device,
		Pid: int32(pid), Port: uint32(port), ProcessStartTime: startTime, Address: cfg.address,
	}}
	desc.set(rbeev1.WorkerState_WORKER_STATE_STARTING)

	narrate.Event(ctx, actor, "worker_start", "worker starting",
		zap.Int("pid", pid), zap.Uint64("process_start_time", startTime), zap.String("addr", lis.Addr().String()),
		zap.Bool("inherited_socket", inherited), zap.String("queen", cfg.Queen), zap.String("model", cfg.Model),
		zap.String("hive_id", cfg.HiveID), zap.String("version", version.Version()))

	if cfg.spawnChildren > 0 {
		pids, err := spawnChildren(cfg.spawnChildren, cfg.WorkerID)
		if err != nil {
			lis.Close()
			return err
		}
		narrate.Event(ctx, actor, "worker_children_spawned", "spawned sleeping children", zap.Ints("child_pids", pids))
	}

	srv := grpc.NewServer()
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	healthpb.RegisterHealthServer(srv, hs)
	var wg sync.WaitGroup
	serveErr := make(chan error, 1)
	wg.Go(func() { serveErr <- srv.Serve(lis) })

	var hb *heartbeat.Client
	if !cfg.noHeartbeat {
		dial, err := heartbeat.DialOptionsFromEnv()
		if err != nil {
			srv.Stop()
			wg.Wait()
			return fmt.Errorf("credentials for the queen: %w", err)
		}
		hb = heartbeat.New(heartbeat.Config{
			Queen:       cfg.Queen,
			DialOptions: dial,
			Descriptor:  desc.descriptor,
			Logger:      log,
		})
		wg.Go(func() { hb.Run(ctx) })
	}
	// Whatever happens, nothing outlives serve.
	defer wg.Wait()
	defer cancel()
	defer srv.Stop()

	// The socket is bound and Serve runs, so the worker serves; --ready-after delays READY to
	// imitate a model load.
	ready := time.NewTimer(cfg.readyAfter)
	defer ready.Stop()
	var exit <-chan time.Time
	if cfg.exitAfter > 0 {
		t := time.NewTimer(cfg.exitAfter)
		defer t.Stop()
		exit = t.C
	}

	for {
		select {
		case <-ready.C:
			desc.set(rbeev1.WorkerState_WORKER_STATE_READY)
			hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
			if hb != nil {
				hb.Beat()
			}
			narrate.Event(ctx, actor, "worker_ready", "worker ready", zap.Int("port", port))
		case <-exit:
			// A crash on purpose: no STOPPING, no clean close, just a last word on stderr.
			narrate.Warn(ctx, actor, "worker_exit_injected", "exiting on --exit-after", zap.Int("exit_code", cfg.exitCode))
			log.Sync() //nolint:errcheck
			fmt.Fprintf(os.Stderr, "worker-stub: injected failure: exiting with status %d after %s\n", cfg.exitCode, cfg.exitAfter)
			os.Exit(cfg.exitCode)
		case err := <-serveErr:
			return fmt.Errorf("grpc serve: %w", err)
		case sig := <-sigs:
			if sig == syscall.SIGTERM && cfg.ignoreSIGTERM {
				narrate.Warn(ctx, actor, "worker_sigterm_ignored", "ignoring SIGTERM (--ignore-sigterm)")
				continue
			}
			stop(ctx, log, desc, srv, hs, hb, sig)
			return nil
		}
	}
}

// stop is the SIGTERM path: report STOPPING and make sure the queen heard it, finish the calls
// in flight, close the heartbeat stream cleanly. Every step is bounded.
func stop(ctx context.Context, log *zap.Logger, desc *descriptorSource, srv *grpc.Server, hs *health.Server,
	hb *heartbeat.Client, sig os.Signal) {
	desc.set(rbeev1.WorkerState_WORKER_STATE_STOPPING)
	hs.Shutdown() // health answers NOT_SERVING from now on
	narrate.Event(ctx, actor, "worker_stopping", "worker stopping", zap.String("signal", sig.String()))

	if hb != nil {
		fctx, cancel := context.WithTimeout(ctx, stoppingBeatTimeout)
		if err := hb.Flush(fctx); err != nil {
			log.Warn("queen did not acknowledge STOPPING", zap.Error(err))
		}
		cancel()
	}

	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(gracefulStopTimeout):
		srv.Stop()
		<-stopped
	}

	if hb != nil {
		cctx, cancel := context.WithTimeout(ctx, streamCloseTimeout)
		if err := hb.Close(cctx); err != nil {
			log.Warn("queen did not end the heartbeat stream in time", zap.Error(err))
		}
		cancel()
	}
	narrate.Event(ctx, actor, "worker_stopped", "worker stopped")
}
