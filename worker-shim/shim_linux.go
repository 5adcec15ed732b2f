package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/auth"
	"github.com/rbee-dev/rbee/internal/narrate"
	"github.com/rbee-dev/rbee/internal/procstat"
	"github.com/rbee-dev/rbee/worker/contract"
	"github.com/rbee-dev/rbee/worker/heartbeat"
)

const (
	actor = "worker"
	// Bounds on the last words to the queen, so that a silent queen cannot hold up an exit.
	stoppingBeatTimeout = time.Second
	streamCloseTimeout  = 300 * time.Millisecond
	// checkTimeout bounds one health request; a server that accepts and never answers is failing.
	checkTimeout = 2 * time.Second
)

// descriptor is the worker as the shim reports it; state and message change over its life.
type descriptor struct {
	base *rbeev1.Worker // never mutated after construction

	mu    sync.Mutex
	state rbeev1.WorkerState
	msg   string
}

func (d *descriptor) set(s rbeev1.WorkerState, msg string) {
	d.mu.Lock()
	d.state, d.msg = s, msg
	d.mu.Unlock()
}

func (d *descriptor) get() (rbeev1.WorkerState, string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.state, d.msg
}

// worker returns a fresh copy for the heartbeat client, which marshals it concurrently.
func (d *descriptor) worker() *rbeev1.Worker {
	st, msg := d.get()
	b := d.base
	return &rbeev1.Worker{WorkerId: b.WorkerId, HiveId: b.HiveId, Model: b.Model, Device: b.Device, Pid: b.Pid,
		Port: b.Port, ProcessStartTime: b.ProcessStartTime, Address: b.Address, Concurrency: b.Concurrency,
		State: st, StatusMessage: msg}
}

// check is one health probe's answer.
type check struct {
	ok  bool
	msg string // why it failed
}

// supervise runs the server until it exits and returns the shim's exit status: the server's.
func supervise(cfg config, log *zap.Logger, stderr io.Writer) int {
	ctx, cancel := context.WithCancel(narrate.WithLogger(context.Background(), log))
	defer cancel()
	// Subscribe before the server exists, so that neither an early SIGTERM nor its exit is missed.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	chld := make(chan os.Signal, 1)
	signal.Notify(chld, syscall.SIGCHLD)
	// Orphans of the server (a daemonising helper) become the shim's children rather than init's,
	// so they stay in the worker's process tree where the hive's Delete finds them.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		log.Warn("cannot become a child subreaper; orphans of the server go to init", zap.Error(err))
	}
	closeInheritedSockets()

	pid := os.Getpid()
	startTime, err := procstat.StartTime(pid)
	if err != nil {
		fmt.Fprintf(stderr, "worker-shim: own start time: %v\n", err)
		return 1
	}
	host := contract.Host() // the server binds it (hive --worker-host); other machines reach it there
	address := contract.ReportedAddress(host)
	desc := &descriptor{base: &rbeev1.Worker{
		WorkerId: cfg.WorkerID, HiveId: cfg.HiveID, Model: cfg.Model, Device: cfg.Device, Pid: int32(pid),
		Port: uint32(cfg.Port), ProcessStartTime: startTime, Address: address, Concurrency: uint32(cfg.concurrency),
	}, state: rbeev1.WorkerState_WORKER_STATE_STARTING}

	srv := exec.Command(cfg.cmd[0], cfg.cmd[1:]...)
	srv.Env = serverEnv(os.Environ())
	srv.Stdout, srv.Stderr = os.Stdout, os.Stderr // the worker's log file, shared without a copy
	// Same session, group and cgroup as the shim; SIGKILL when the shim's main thread (locked in
	// init) dies, so a SIGKILLed shim never leaves its server running unsupervised.
	srv.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := srv.Start(); err != nil {
		fmt.Fprintf(stderr, "worker-shim: cannot start the server %s: %v\n", cfg.cmd[0], err)
		return 127
	}
	serverPID := srv.Process.Pid
	narrate.Event(ctx, actor, "worker_server_started", fmt.Sprintf("server %s started (PID %d) for model %q", cfg.cmd[0], serverPID, cfg.Model),
		zap.Int("shim_pid", pid), zap.Int("server_pid", serverPID), zap.Strings("cmd", cfg.cmd), zap.Int("port", cfg.Port))

	exited := make(chan unix.WaitStatus, 1)
	go reap(chld, serverPID, exited)

	dial, err := heartbeat.DialOptionsFromEnv()
	if err != nil {
		fmt.Fprintf(stderr, "worker-shim: credentials for the queen: %v\n", err)
		srv.Process.Signal(syscall.SIGKILL)
		return exitStatus(<-exited)
	}
	hb := heartbeat.New(heartbeat.Config{Queen: cfg.Queen, DialOptions: dial, Descriptor: desc.worker, Logger: log})
	var wg sync.WaitGroup
	hbCtx, hbCancel := context.WithCancel(ctx)
	wg.Go(func() { hb.Run(hbCtx) })
	defer wg.Wait()
	defer hbCancel()

	var ready atomic.Bool
	checks := make(chan check)
	probeCtx, probeCancel := context.WithCancel(ctx)
	defer probeCancel()
	wg.Go(func() { probe(probeCtx, cfg, healthURL(host, cfg.Port, cfg.health), &ready, checks) })

	loadTimer := time.NewTimer(cfg.loadTimeout)
	defer loadTimer.Stop()
	var unhealthy, killTimer <-chan time.Time
	var lastCheck string
	stopping := false // the shim stopped the server or forwarded a signal: its exit is expected
	// signalled: the stop came from outside (the hive's Delete), so the queen is told goodbye
	// with a clean close; a stop of the shim's own (timeouts) ends the stream without one, and
	// the hive's exit report, with the reason in the log tail, is what the queen keeps.
	signalled := false

	// stop ends the server on the shim's own decision: SIGTERM, then SIGKILL after the grace.
	stop := func(reason string) {
		stopping = true
		probeCancel()
		// The state stays what it was (not STOPPING: the queen takes a STOPPING worker whose
		// stream ends for one that said goodbye, and would drop the reason); the hive's report
		// of the exit then removes it with the reason, which is also in the log tail.
		st, _ := desc.get()
		desc.set(st, "stopping: "+reason)
		hb.Beat()
		fmt.Fprintf(stderr, "worker-shim: stopping the server: %s\n", reason)
		narrate.Warn(ctx, actor, "worker_server_stop", "stopping the server", zap.String("reason", reason))
		srv.Process.Signal(syscall.SIGTERM)
		killTimer = time.After(cfg.grace)
	}

	for {
		select {
		case c := <-checks:
			st, _ := desc.get()
			switch {
			case stopping:
			case c.ok && st != rbeev1.WorkerState_WORKER_STATE_READY:
				was := st
				ready.Store(true)
				loadTimer.Stop()
				unhealthy = nil
				desc.set(rbeev1.WorkerState_WORKER_STATE_READY, "")
				hb.Beat()
				narrate.Event(ctx, actor, "worker_ready", fmt.Sprintf("server answers %s with 200: ready", cfg.health),
					zap.Stringer("was", was))
			case !c.ok && st == rbeev1.WorkerState_WORKER_STATE_STARTING:
				if c.msg != lastCheck {
					// Shown with the next regular beat (no extra one): why it is still STARTING.
					desc.set(st, "loading: "+c.msg)
					log.Debug("still loading", zap.String("health", c.msg))
				}
			case !c.ok && st == rbeev1.WorkerState_WORKER_STATE_READY:
				desc.set(rbeev1.WorkerState_WORKER_STATE_UNHEALTHY, c.msg)
				hb.Beat()
				unhealthy = time.After(cfg.unhealthyTimeout)
				narrate.Warn(ctx, actor, "worker_unhealthy", "health check failed; out of service until it passes",
					zap.String("status_message", c.msg), zap.Duration("unhealthy_timeout", cfg.unhealthyTimeout))
			case !c.ok && st == rbeev1.WorkerState_WORKER_STATE_UNHEALTHY && c.msg != lastCheck:
				desc.set(rbeev1.WorkerState_WORKER_STATE_UNHEALTHY, c.msg)
				hb.Beat()
			}
			if !c.ok {
				lastCheck = c.msg
			}
		case <-loadTimer.C:
			if !stopping {
				why := lastCheck
				if why == "" {
					why = "no answer yet"
				}
				stop(fmt.Sprintf("not ready within load_timeout %v (last %s)", cfg.loadTimeout, why))
			}
		case <-unhealthy:
			unhealthy = nil
			if !stopping {
				_, msg := desc.get()
				stop(fmt.Sprintf("unhealthy for longer than unhealthy_timeout %v (%s)", cfg.unhealthyTimeout, msg))
			}
		case <-killTimer:
			killTimer = nil
			fmt.Fprintf(stderr, "worker-shim: the server did not exit within %v of SIGTERM; sending SIGKILL\n", cfg.grace)
			srv.Process.Signal(syscall.SIGKILL)
		case sig := <-sigs:
			// The hive's Delete (or an operator): the server gets the same signal and the grace
			// period is the hive's to enforce, with SIGKILL to the whole group or cgroup.
			if !signalled {
				stopping, signalled = true, true
				probeCancel()
				desc.set(rbeev1.WorkerState_WORKER_STATE_STOPPING, "")
				wg.Go(func() {
					fctx, cancel := context.WithTimeout(ctx, stoppingBeatTimeout)
					defer cancel()
					if err := hb.Flush(fctx); err != nil {
						log.Warn("queen did not acknowledge STOPPING", zap.Error(err))
					}
				})
				narrate.Event(ctx, actor, "worker_stopping", "forwarding the signal to the server", zap.String("signal", sig.String()))
			}
			srv.Process.Signal(sig)
		case ws := <-exited:
			code := exitStatus(ws)
			st, _ := desc.get()
			switch {
			case stopping:
				narrate.Event(ctx, actor, "worker_server_exited", "server exited", zap.Int("exit_status", code))
			case st == rbeev1.WorkerState_WORKER_STATE_STARTING:
				fmt.Fprintf(stderr, "worker-shim: the server exited while loading (%s)\n", describe(ws))
			default:
				fmt.Fprintf(stderr, "worker-shim: the server exited on its own (%s)\n", describe(ws))
			}
			killOrphans(pid)
			probeCancel()
			if signalled {
				cctx, cancel := context.WithTimeout(ctx, streamCloseTimeout)
				hb.Close(cctx) //nolint:errcheck // a silent queen is torn down by hbCancel
				cancel()
			}
			return code
		}
	}
}

// probe checks the server's health, often while it loads and at a gentler pace once it is ready,
// and hands every answer to the supervisor.
func probe(ctx context.Context, cfg config, target string, ready *atomic.Bool, out chan<- check) {
	client := &http.Client{
		Timeout: checkTimeout,
		Transport: &http.Transport{
			Proxy:               nil, // never through $HTTP_PROXY: the server is on this machine
			DisableCompression:  true,
			MaxIdleConnsPerHost: 1,
			IdleConnTimeout:     time.Minute,
			DialContext:         (&net.Dialer{Timeout: checkTimeout}).DialContext,
		},
	}
	defer client.CloseIdleConnections()
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-ctx.Done():
			return
		}
		c := get(ctx, client, target)
		select {
		case out <- c:
		case <-ctx.Done():
			return
		}
		if ready.Load() {
			t.Reset(cfg.checkInterval)
		} else {
			t.Reset(cfg.pollInterval)
		}
	}
}

func get(ctx context.Context, client *http.Client, target string) check {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
	if err != nil {
		return check{msg: "health check: " + err.Error()}
	}
	resp, err := client.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return check{msg: "health check: " + err.Error()}
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10)) //nolint:errcheck // drained for reuse only
	resp.Body.Close()
	if resp.StatusCode == http.StatusOK {
		return check{ok: true}
	}
	return check{msg: "health check: " + resp.Status}
}

// healthURL is where the server answers health: its own host, loopback for a wildcard bind.
func healthURL(host string, port int, path string) string {
	switch host {
	case "", "0.0.0.0":
		host = "127.0.0.1"
	case "::", "[::]":
		host = "::1"
	}
	return "http://" + net.JoinHostPort(strings.Trim(host, "[]"), strconv.Itoa(port)) + path
}

// reap collects every child that exits (the server, and orphans the shim adopted as subreaper)
// and hands over the server's status.
func reap(chld <-chan os.Signal, server int, exited chan<- unix.WaitStatus) {
	for range chld {
		for {
			var ws unix.WaitStatus
			p, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
			if err == unix.EINTR {
				continue
			}
			if p <= 0 || err != nil {
				break
			}
			if p == server {
				exited <- ws
			}
		}
	}
}

// exitStatus is the shim's own exit status for the server's: its code, or 128+N for signal N.
func exitStatus(ws unix.WaitStatus) int {
	switch {
	case ws.Exited():
		return ws.ExitStatus()
	case ws.Signaled():
		return 128 + int(ws.Signal())
	}
	return 1
}

func describe(ws unix.WaitStatus) string {
	if ws.Signaled() {
		return "killed by " + unix.SignalName(ws.Signal())
	}
	return "exit status " + strconv.Itoa(ws.ExitStatus())
}

// serverEnv is the shim's environment without what belongs to the shim alone: the socket
// activation variables (they name the shim) and the credentials for the queen. The identity
// marker RBEE_WORKER_ID stays, so that the server is recognisably this worker's.
func serverEnv(env []string) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		switch {
		case k == "LISTEN_FDS", k == "LISTEN_PID", k == "LISTEN_FDNAMES",
			k == auth.EnvWorkerToken, k == "RBEE_TOKEN", strings.HasPrefix(k, "RBEE_TLS_"):
			continue
		}
		out = append(out, kv)
	}
	return out
}

// closeInheritedSockets closes sockets handed over by socket activation: the server binds its
// port itself, and must not inherit a listener on it.
func closeInheritedSockets() {
	n, err := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	if err != nil || os.Getenv("LISTEN_PID") != strconv.Itoa(os.Getpid()) {
		return
	}
	for fd := 3; fd < 3+n; fd++ {
		unix.Close(fd)
	}
}

// killOrphans SIGKILLs what the server left behind in the shim's session or adopted by the shim,
// so that a server that exits (or is stopped) takes its helpers with it even when no hive is
// there to kill the worker's group.
func killOrphans(self int) {
	d, err := os.Open("/proc")
	if err != nil {
		return
	}
	names, _ := d.Readdirnames(-1)
	d.Close()
	for _, name := range names {
		p, err := strconv.Atoi(name)
		if err != nil || p == self {
			continue
		}
		fd, err := unix.PidfdOpen(p, 0)
		if err != nil {
			continue
		}
		// Read after opening the pidfd: if the stat still shows one of ours, the pidfd is it.
		if st, err := procstat.Read(p); err == nil && (st.SID == self || st.PPID == self) {
			unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
		}
		unix.Close(fd)
	}
}
