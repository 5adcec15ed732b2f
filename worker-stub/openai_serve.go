package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/rbee-dev/rbee/internal/narrate"
	"github.com/rbee-dev/rbee/internal/version"
	"go.uber.org/zap"
)

// serveOpenAI runs the OpenAI mode until SIGTERM/SIGINT and returns the exit status. Like the real
// servers it binds its port itself and never talks to a queen: readiness is its /health.
func serveOpenAI(cfg config, log *zap.Logger, stderr io.Writer) int {
	o := cfg.openai
	ctx := narrate.WithLogger(context.Background(), log)
	// Subscribe before anything else so that an early SIGTERM is a clean stop, not a crash.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)

	lis, err := net.Listen("tcp", net.JoinHostPort(cfg.host, strconv.Itoa(cfg.Port)))
	if err != nil {
		log.Error("listen failed", zap.Error(err))
		fmt.Fprintf(stderr, "worker-stub: listen: %v\n", err)
		return 1
	}
	addr := lis.Addr().String()
	narrate.Event(ctx, actor, "worker_start", "OpenAI-compatible server starting; loading the model",
		zap.Int("pid", os.Getpid()), zap.String("addr", addr), zap.String("model", cfg.Model),
		zap.Duration("load_time", o.loadTime), zap.Float64("tokens_per_second", o.tokensPerSecond),
		zap.Int("concurrency", o.concurrency), zap.String("version", version.Version()))

	if cfg.spawnChildren > 0 {
		pids, err := spawnChildren(cfg.spawnChildren, cfg.WorkerID)
		if err != nil {
			lis.Close()
			log.Error("spawning children failed", zap.Error(err))
			return 1
		}
		narrate.Event(ctx, actor, "worker_children_spawned", "spawned sleeping children", zap.Ints("child_pids", pids))
	}

	// crash is every injected failure's end: a last word on stderr, no clean close.
	crash := func(action, why string) {
		narrate.Warn(ctx, actor, action, why, zap.Int("exit_code", cfg.exitCode))
		log.Sync() //nolint:errcheck
		fmt.Fprintf(stderr, "worker-stub: %s\n", why)
		os.Exit(cfg.exitCode)
	}
	// Requests derive their context from cutCtx: cancelling it stops every generation at once.
	cutCtx, cut := context.WithCancel(context.Background())
	defer cut()
	api := newStubServer(cutCtx, o, cfg.Model, log, func(tokens int) {
		crash("worker_exit_injected", fmt.Sprintf("injected failure: dying after %d tokens of a request (--die-mid-stream-after), exit status %d", tokens, cfg.exitCode))
	})

	serveErr := make(chan error, 1)
	var srv *http.Server
	var hung *hangListener
	if o.hang {
		hung = &hangListener{lis: lis}
		go func() { serveErr <- hung.serve() }()
		narrate.Warn(ctx, actor, "worker_hang", "hanging on purpose (--hang): connections are accepted and never answered")
	} else {
		srv = &http.Server{
			Handler:           api,
			BaseContext:       func(net.Listener) context.Context { return cutCtx },
			ReadHeaderTimeout: 30 * time.Second,
			IdleTimeout:       2 * time.Minute,
			ErrorLog:          zap.NewStdLog(log.Named("http")),
		}
		go func() { serveErr <- srv.Serve(lis) }()
	}

	load := time.NewTimer(o.loadTime)
	defer load.Stop()
	var exit <-chan time.Time
	if cfg.exitAfter > 0 {
		t := time.NewTimer(cfg.exitAfter)
		defer t.Stop()
		exit = t.C
	}
	var hangAfter <-chan time.Time
	for {
		select {
		case <-hangAfter:
			hangAfter = nil
			api.hung.Store(true)
			narrate.Warn(ctx, actor, "worker_hang", "hanging now (--hang-after): requests are read and never answered",
				zap.Duration("hang_after", o.hangAfter))
		case <-load.C:
			if o.failLoad != "" {
				crash("worker_load_failed", "failed to load model: "+o.failLoad)
			}
			api.loaded.Store(true)
			narrate.Event(ctx, actor, "worker_ready", "model loaded; /health answers 200", zap.String("addr", addr))
			if o.hangAfter > 0 {
				t := time.NewTimer(o.hangAfter)
				defer t.Stop()
				hangAfter = t.C
			}
		case <-exit:
			crash("worker_exit_injected", fmt.Sprintf("injected failure: exiting with status %d after %s", cfg.exitCode, cfg.exitAfter))
		case err := <-serveErr:
			log.Error("serving failed", zap.Error(err))
			return 1
		case sig := <-sigs:
			if sig == syscall.SIGTERM && cfg.ignoreSIGTERM {
				narrate.Warn(ctx, actor, "worker_sigterm_ignored", "ignoring SIGTERM (--ignore-sigterm)")
				continue
			}
			stopOpenAI(ctx, o, api, srv, hung, cut, serveErr, sig)
			return 0
		}
	}
}

// stopOpenAI is the SIGTERM path: stop accepting, let requests in flight finish for at most
// --drain-timeout and cut the rest, then linger --shutdown-delay (a slow model teardown).
func stopOpenAI(ctx context.Context, o openaiConfig, api *stubServer, srv *http.Server, hung *hangListener,
	cut context.CancelFunc, serveErr <-chan error, sig os.Signal) {
	narrate.Event(ctx, actor, "worker_stopping", "stopping: no new connections, draining requests in flight",
		zap.String("signal", sig.String()), zap.Int64("in_flight", api.running.Load()+api.waiting.Load()),
		zap.Duration("drain_timeout", o.drainTimeout))
	if hung != nil {
		hung.close()
	} else {
		dctx, cancel := context.WithTimeout(context.Background(), o.drainTimeout)
		err := srv.Shutdown(dctx)
		cancel()
		if err != nil {
			inFlight := api.running.Load() + api.waiting.Load()
			cut()
			srv.Close()
			narrate.Warn(ctx, actor, "worker_requests_cut", "drain timeout: requests in flight cut",
				zap.Int64("in_flight", inFlight), zap.Duration("drain_timeout", o.drainTimeout))
			// The cut handlers return at once (their context is done); let them say so.
			done := make(chan struct{})
			go func() { api.handlers.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(cutWaitTimeout):
				narrate.Warn(ctx, actor, "worker_requests_cut_slow", "cut requests did not end in time", zap.Duration("waited", cutWaitTimeout))
			}
		}
	}
	<-serveErr // Serve has returned (ErrServerClosed, or the closed listener's error)
	if o.shutdownDelay > 0 {
		narrate.Event(ctx, actor, "worker_shutdown_delay", "taking long to shut down (--shutdown-delay)",
			zap.Duration("shutdown_delay", o.shutdownDelay))
		time.Sleep(o.shutdownDelay) // the knob itself: a teardown that takes this long
	}
	narrate.Event(ctx, actor, "worker_stopped", "worker stopped")
}

// cutWaitTimeout bounds the wait for cut requests to end.
const cutWaitTimeout = time.Second

// maxHungConns bounds the connections a hanging server holds; past it the oldest is closed, so
// a client probing in a loop cannot exhaust the descriptors.
const maxHungConns = 512

// hangListener accepts connections and never reads from or writes to them (--hang).
type hangListener struct {
	lis    net.Listener
	mu     sync.Mutex
	conns  []net.Conn
	closed bool
}

func (h *hangListener) serve() error {
	for {
		c, err := h.lis.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return http.ErrServerClosed
			}
			return err
		}
		h.mu.Lock()
		if h.closed {
			c.Close()
		} else {
			if len(h.conns) == maxHungConns {
				h.conns[0].Close()
				h.conns = h.conns[1:]
			}
			h.conns = append(h.conns, c)
		}
		h.mu.Unlock()
	}
}

func (h *hangListener) close() {
	h.lis.Close()
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	for _, c := range h.conns {
		c.Close()
	}
	h.conns = nil
}
