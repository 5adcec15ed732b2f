package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/rbee-dev/rbee/internal/auth"
	"github.com/rbee-dev/rbee/internal/validate"
	"github.com/rbee-dev/rbee/queen/console"
	"github.com/rbee-dev/rbee/queen/fleet"
	"github.com/rbee-dev/rbee/queen/openai"
	"github.com/rbee-dev/rbee/queen/registry"
	"github.com/rbee-dev/rbee/queen/router"
)

// httpOptions are the flags of the OpenAI HTTP API and its router.
type httpOptions struct {
	listen, keysFile                                          string
	maxBody                                                   int64
	headerTimeout, idleTimeout, bodyTimeout, drain, firstByte time.Duration
	queueWait, scaleUpAfter                                   time.Duration
	maxConcurrent, queueSize, warmFloor, maxWorkers           int
	keys                                                      *openai.Keys
	startTimeout                                              time.Duration
}

func (h *httpOptions) register(fs *flag.FlagSet) {
	fs.StringVar(&h.listen, "http-listen", "127.0.0.1:7834", `address of the OpenAI-compatible HTTP API ("" or "off": none)`)
	fs.StringVar(&h.keysFile, "api-keys-file", "", "file of API keys (one a line) HTTP clients must send as Authorization: Bearer; reloaded on SIGHUP; required with a cluster token")
	fs.Int64Var(&h.maxBody, "http-max-body", 16<<20, "largest request body in bytes")
	fs.DurationVar(&h.headerTimeout, "http-header-timeout", 10*time.Second, "time a client has to send its request headers")
	fs.DurationVar(&h.bodyTimeout, "http-body-timeout", 30*time.Second, "time a client has to send its request body")
	fs.DurationVar(&h.idleTimeout, "http-idle-timeout", 2*time.Minute, "an idle keep-alive connection is closed after this")
	fs.IntVar(&h.maxConcurrent, "http-max-concurrent", 1024, "requests handled at once, queued ones included; beyond: 429")
	fs.DurationVar(&h.drain, "http-drain-timeout", 30*time.Second, "at shutdown, how long requests in flight may finish before they are cut")
	fs.DurationVar(&h.firstByte, "first-byte-timeout", 5*time.Minute, "how long a worker may take to start its response before the request is retried elsewhere (or 504)")
	fs.IntVar(&h.queueSize, "queue-size", 100, "requests that may wait per model when every worker is at its concurrency; beyond: 429")
	fs.DurationVar(&h.queueWait, "queue-wait", 30*time.Second, "how long a request waits for a worker with room before 503")
	fs.IntVar(&h.warmFloor, "warm-floor", 0, "READY workers per model that idle stops (a model's ttl) leave running")
	fs.DurationVar(&h.scaleUpAfter, "scale-up-after", 5*time.Second, "start another worker of a model when its oldest queued request has waited this long (0: never)")
	fs.IntVar(&h.maxWorkers, "max-workers-per-model", 4, "the most workers scale-up starts for one model")
}

func (h *httpOptions) enabled() bool { return h.listen != "" && h.listen != "off" }

func (h *httpOptions) check(token string, insecure bool) error {
	if !h.enabled() {
		return nil
	}
	if err := validate.ListenAddress("--http-listen", h.listen); err != nil {
		return err
	}
	if h.maxBody < 1 || h.maxConcurrent < 1 || h.queueSize < 1 || h.maxWorkers < 1 || h.warmFloor < 0 {
		return errors.New("--http-max-body, --http-max-concurrent, --queue-size and --max-workers-per-model must be at least 1, --warm-floor at least 0")
	}
	for name, d := range map[string]time.Duration{"--http-header-timeout": h.headerTimeout, "--http-body-timeout": h.bodyTimeout,
		"--http-idle-timeout": h.idleTimeout, "--http-drain-timeout": h.drain, "--first-byte-timeout": h.firstByte, "--queue-wait": h.queueWait} {
		if d <= 0 {
			return fmt.Errorf("%s %v: want a positive duration", name, d)
		}
	}
	if h.scaleUpAfter < 0 {
		return fmt.Errorf("--scale-up-after %v: want 0 (never) or more", h.scaleUpAfter)
	}
	if h.keysFile == "" {
		if token != "" {
			return errors.New("--http-listen with a cluster token needs --api-keys-file: inference clients must not hold the cluster token, which can start and kill processes (or --http-listen off)")
		}
		return auth.CheckExposure("--http-listen", h.listen, "", insecure)
	}
	var err error
	h.keys, err = openai.LoadKeys(h.keysFile)
	return err
}

// serveHTTP starts the router and the HTTP API. At ctx's end it refuses new requests, fails
// queued ones and lets those in flight finish within --http-drain-timeout, then cuts them; the
// returned func waits for all of that.
//
// refuse, when not nil, is asked before each request to the API (and the console's chat): its
// error (this queen is a standby) is answered 503 with Retry-After and nothing is routed.
func serveHTTP(ctx context.Context, h httpOptions, reg *registry.Registry, fl queenFleet, refuse func() error, con console.Config, mreg prometheus.Registerer, log *zap.Logger) (func(), error) {
	if !h.enabled() {
		return func() {}, nil
	}
	lis, err := net.Listen("tcp", h.listen)
	if err != nil {
		return nil, fmt.Errorf("--http-listen %s: %w", h.listen, err)
	}
	rlog := log.Named("router")
	rt := router.New(router.Config{
		QueueSize: h.queueSize, QueueWait: h.queueWait, StartTimeout: h.startTimeout, ScaleUpAfter: h.scaleUpAfter,
		MaxWorkers: h.maxWorkers, WarmFloor: h.warmFloor, Metrics: router.NewMetrics(mreg), Logger: rlog,
	}, router.Local{Reg: reg}, fl, fl)
	// An operator's DeleteWorker (and the router's own idle stops) drain the worker first: no new
	// request goes to it while the hive's grace period lets those in flight finish.
	fl.fl.BeforeDelete(rt.Drain)
	// One pool of connections to the workers for the API and the console's chat.
	upstream := openai.NewUpstream()
	acfg := openai.Config{
		Keys: h.keys, MaxBody: h.maxBody, BodyTimeout: h.bodyTimeout, MaxConcurrent: h.maxConcurrent,
		FirstByteTimeout: h.firstByte, Refuse: refuse, Upstream: upstream, Metrics: openai.NewMetrics(mreg), Logger: rlog,
	}
	api := openai.New(acfg, rt)
	// The web console at /, beside the API under /v1/. Its chat goes through the same edge and
	// router minus the key check: the console has authenticated its caller (and hands on the key
	// of a session opened with one).
	acfg.Keys = nil
	con.Chat = openai.New(acfg, rt)
	if h.keys != nil {
		con.Keys = h.keys
	}
	con.Logger = log.Named("console")
	web := console.New(con)
	mux := http.NewServeMux()
	mux.Handle("/v1/", api)
	mux.Handle("/", web)
	hs := &http.Server{
		Handler: mux, ReadHeaderTimeout: h.headerTimeout, IdleTimeout: h.idleTimeout, MaxHeaderBytes: 64 << 10,
		ErrorLog: zap.NewStdLog(log.Named("http").WithOptions(zap.IncreaseLevel(zap.WarnLevel))),
	}
	hs.RegisterOnShutdown(web.Close) // the pages' event streams must not hold the graceful stop
	rctx, stopRouter := context.WithCancel(context.Background())
	routerDone := make(chan struct{})
	go func() { defer close(routerDone); rt.Run(rctx) }()
	<-rt.Synced()

	hup := make(chan os.Signal, 1)
	if h.keys != nil {
		signal.Notify(hup, syscall.SIGHUP)
	}
	serveDone := make(chan struct{})
	go func() {
		defer close(serveDone)
		if err := hs.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("HTTP API stopped", zap.Error(err))
		}
	}()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-hup:
				if n, err := h.keys.Reload(); err != nil {
					log.Warn("API keys not reloaded; the old keys stay in force", zap.Error(err))
				} else {
					log.Info("API keys reloaded", zap.Int("keys", n))
				}
				continue
			case <-ctx.Done():
			}
			break
		}
		signal.Stop(hup)
		rt.Close()
		dctx, cancel := context.WithTimeout(context.Background(), h.drain)
		defer cancel()
		if err := hs.Shutdown(dctx); err != nil {
			log.Warn("HTTP requests still in flight after the drain timeout; cutting them", zap.Duration("drain_timeout", h.drain))
			_ = hs.Close()
		}
		<-serveDone
		upstream.CloseIdle()
		fl.fl.BeforeDelete(nil)
		stopRouter()
		<-routerDone
		log.Info("HTTP API stopped", zap.String("actor", "queen"), zap.String("action", "http_stop"))
	}()
	log.Info("HTTP API serving", zap.String("http_listen", lis.Addr().String()), zap.Bool("api_keys", h.keys != nil),
		zap.String("console", "http://"+lis.Addr().String()+"/"),
		zap.String("actor", "queen"), zap.String("action", "http_start"))
	return func() { <-done }, nil
}

// queenFleet starts and stops workers for the router through the queen's own fleet operations,
// the ones SpawnWorker and DeleteWorker serve.
type queenFleet struct {
	fl  *fleet.Fleet
	reg *registry.Registry
}

// Spawn starts a worker of model on the least-loaded live hive whose catalog offers it, on the
// first device the catalog names for it (none: the fleet's default).
func (f queenFleet) Spawn(ctx context.Context, model string) (string, error) {
	spec := fleet.SpawnSpec{Model: model}
	best := -1
	for _, h := range f.reg.ListHives() {
		o, ok := h.Offer(model)
		if !ok || len(h.Models) == 0 || h.State != registry.HiveReady || (best >= 0 && h.Workers >= best) {
			continue
		}
		best, spec.HiveID, spec.Device = h.Workers, h.ID, ""
		if len(o.Devices) > 0 {
			spec.Device = o.Devices[0]
		}
	}
	w, err := f.fl.Spawn(ctx, spec)
	if err != nil {
		return "", err
	}
	return w.ID, nil
}

func (f queenFleet) Delete(ctx context.Context, id string, grace time.Duration) error {
	if grace <= 0 {
		grace = -1 // the hive's default
	}
	_, err := f.fl.Delete(ctx, id, grace)
	return err
}
