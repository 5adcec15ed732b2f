package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/auth"
	"github.com/rbee-dev/rbee/internal/metrics"
	"github.com/rbee-dev/rbee/internal/rpcserver"
	"github.com/rbee-dev/rbee/queen/console"
	"github.com/rbee-dev/rbee/queen/election"
	"github.com/rbee-dev/rbee/queen/fleet"
	"github.com/rbee-dev/rbee/queen/registry"
	"github.com/rbee-dev/rbee/queen/server"
)

// app is one queen process: the gRPC server and metrics live as long as the process, while
// leading (the registry's clock, heartbeat streams, hive calls) starts and stops with each term
// this queen wins. A queen without --etcd leads from start to stop, as a lone queen always did.
type app struct {
	o   options
	log *zap.Logger

	reg     *registry.Registry
	hives   *fleet.HivePool
	fl      *fleet.Fleet
	q       *server.Queen
	srv     *rpcserver.Server
	ms      *metrics.Set
	elector *election.Elector // nil: alone
	lis     net.Listener

	queenID string
	// leading is the current term, nil while this queen does not lead.
	leading atomic.Pointer[leadership]
}

// leadership is what the gate and the fleet need of a term.
type leadership struct {
	check func() error // nil while the term surely lasts
	token uint64       // the fencing token hive calls carry
}

// resignTimeout bounds how long a stopping queen waits for etcd to take its resignation.
const resignTimeout = 3 * time.Second

// errNotLeader is why a queen that stops leading forgets what it knew.
var errNotLeader = errors.New("this queen stopped leading; ask the leader")

// gatedServices are refused on a standby; health and reflection answer on every queen.
var gatedServices = []string{rbeev1.QueenService_ServiceDesc.ServiceName, rbeev1.HeartbeatService_ServiceDesc.ServiceName}

// registryConfig is the registry's configuration from the flags. startTimedOut stops the process
// of a worker that never beat; the registry runs it on a goroutine of its own and Run waits for
// it, so a shutdown never cuts such a clean-up short and leaves the process behind.
func registryConfig(o options, startTimedOut func(registry.Worker)) registry.Config {
	return registry.Config{
		Interval: o.interval, StaleAfter: o.staleAfter, ExpireAfter: o.expireAfter, StartTimeout: o.startTimeout,
		WatchBuffer: o.watchBuffer,
		// STALE may be declared up to a tenth of an interval late; in exchange the clock wakes
		// at most ten times an interval instead of once per worker.
		ClockSlack:     min(o.interval/10, 100*time.Millisecond),
		OnStartTimeout: startTimedOut,
	}
}

func newApp(o options, log *zap.Logger) (*app, error) {
	a := &app{o: o, log: log, hives: fleet.NewHivePool(o.creds.Dial...), ms: metrics.New(), queenID: server.NewQueenID()}
	var fl *fleet.Fleet
	// The callback runs on the registry's clock, which only runs once fl is set.
	a.reg = registry.New(registryConfig(o, func(w registry.Worker) { fl.StartTimedOut(w) }))
	for _, h := range o.hives {
		if err := a.reg.AddStaticHive(h.id, h.address); err != nil {
			return nil, fmt.Errorf("--hive %s=%s: %w", h.id, h.address, err)
		}
	}
	var err error
	if a.lis, err = net.Listen("tcp", o.listen); err != nil {
		return nil, fmt.Errorf("--listen %s: %w", o.listen, err)
	}
	if addr := a.lis.Addr().(*net.TCPAddr); o.advertise == "" && !addr.IP.IsUnspecified() {
		o.advertise = addr.String()
	}
	a.o = o
	advertise := o.advertise
	if len(o.etcd) > 0 {
		// Workers get every queen's address from their hive's --queen list, not this one's only.
		advertise = ""
		if a.elector, err = election.New(election.Config{
			Endpoints: o.etcd, Name: o.advertise, TTL: o.electionTTL, Logger: log, Prefix: o.etcdClient.prefix,
			TLS: o.etcdClient.tls, Username: o.etcdClient.username, Password: o.etcdClient.password,
		}); err != nil {
			_ = a.lis.Close()
			return nil, err
		}
	}
	fl = fleet.New(fleet.Config{
		Registry: a.reg, Hives: a.hives, Advertise: advertise, StartTimeout: o.startTimeout, Token: o.creds.Token,
		Registerer: a.ms.Registry, Logger: log, Fence: a.fence,
	})
	a.fl = fl
	a.q = server.New(server.Config{
		Registerer: a.ms.Registry, Registry: a.reg, Fleet: fl, Token: o.creds.Token, QueenID: a.queenID,
		Interval: o.interval, MaxBeatsPerSecond: o.maxBeats, Logger: log,
		MaxWatchers: o.maxWatchers, MaxWatchersPerConn: o.maxWatchersPerConn, WatchSendTimeout: o.watchSendTimeout,
	})
	// Heartbeat streams end at their next beat once draining starts, so the graceful stop needs
	// a little more than one interval.
	a.srv = rpcserver.New(rpcserver.Options{Logger: log, ShutdownTimeout: 2*o.interval + 3*time.Second, Metrics: a.ms.GRPC,
		Auth: o.creds.Verifier, ServerOptions: append(o.creds.ServerOptions(), server.ServerCodec()),
		Unary: []grpc.UnaryServerInterceptor{a.gateUnary}, Stream: []grpc.StreamServerInterceptor{a.gateStream},
		Unmetered: []string{auth.WorkerHeartbeatMethod}})
	rbeev1.RegisterQueenServiceServer(a.srv.GRPC, a.q)
	rbeev1.RegisterHeartbeatServiceServer(a.srv.GRPC, a.q)
	a.setHealth(healthpb.HealthCheckResponse_NOT_SERVING)
	return a, nil
}

// Run serves until ctx ends, leading whenever this queen is (or, alone, always) the leader, then
// stops cleanly: it steps down (resigning, so a standby takes over at once) and drains.
func (a *app) Run(ctx context.Context) error {
	defer a.hives.Close()
	lis := a.lis
	metricsDone, err := metrics.Start(ctx, a.o.metricsListen, a.ms, a.log)
	if err != nil {
		_ = lis.Close()
		return err
	}
	if a.elector == nil {
		a.begin(nil)
	}
	if auth.TokenInClear(a.o.listen, a.o.creds.Token, a.o.creds.TLS.Enabled()) {
		a.log.Warn(auth.TokenInClearWarning("--listen", a.o.listen), zap.String("actor", "queen"), zap.String("action", "token_in_clear"))
	}
	httpDone, err := serveHTTP(ctx, a.o.http, a.reg, queenFleet{a.fl, a.reg}, a.standby,
		console.Config{Registry: a.reg, Fleet: a.fl, Logs: a.fl, Token: a.o.creds.Token}, a.ms.Registry, a.log)
	if err != nil {
		_ = lis.Close()
		_ = metricsDone()
		return err
	}
	a.log.Info("queen serving", zap.String("listen", lis.Addr().String()), zap.String("queen_id", a.queenID),
		zap.Int("static_hives", len(a.o.hives)), zap.Duration("heartbeat_interval", a.o.interval),
		zap.Strings("etcd", a.o.etcd), zap.String("etcd_prefix", a.o.etcdClient.prefix), zap.Bool("etcd_tls", a.o.etcdClient.tls != nil),
		zap.String("etcd_username", a.o.etcdClient.username), zap.String("actor", "queen"), zap.String("action", "queen_start"))
	if a.o.etcdClient.username != "" && a.o.etcdClient.tls == nil && !allHTTPS(a.o.etcd) {
		a.log.Warn("--etcd-username over http:// etcd URLs: the etcd password crosses the network in clear text; give https:// URLs and --etcd-tls-ca",
			zap.String("actor", "queen"), zap.String("action", "etcd_password_in_clear"))
	}
	leadDone := make(chan error, 1)
	go func() {
		if a.elector == nil {
			a.lead(ctx, nil)
			leadDone <- nil
			return
		}
		leadDone <- a.elector.Run(ctx, a.lead)
	}()
	err = a.srv.Serve(ctx, lis, a.q.Drain)
	httpDone()
	var lerr error
	if a.elector == nil {
		lerr = <-leadDone
	} else {
		// The elector resigns on its way out, so a standby takes over at once; but an etcd that
		// does not answer must not hang the stop: past a bound, closing the client ends its calls.
		done := false
		select {
		case lerr = <-leadDone:
			done = true
		case <-time.After(resignTimeout):
			a.log.Warn("etcd did not answer the resignation in time; stopping without it (a standby leads once the lease expires)",
				zap.Duration("timeout", resignTimeout))
		}
		_ = a.elector.Close()
		if !done {
			lerr = <-leadDone
		}
	}
	if err == nil {
		err = lerr
	}
	if merr := metricsDone(); err == nil {
		err = merr
	}
	a.log.Info("queen stopped", zap.String("actor", "queen"), zap.String("action", "queen_stop"))
	return err
}

// lead runs one term until ctx ends: a fresh registry relearnt from beats, its clock held for the
// takeover grace, health SERVING. Stepping down closes the gate before anything else, so no call
// is served and no hive is called from then on, then ends the streams and forgets the fleet.
func (a *app) lead(ctx context.Context, t *election.Term) {
	if t != nil {
		a.begin(t)
	}
	a.reg.Run(ctx) // the liveness clock, until the term (or the process) ends
	if t == nil {
		return // alone: the server's own shutdown reports NOT_SERVING and drains
	}
	a.leading.Store(nil)
	a.setHealth(healthpb.HealthCheckResponse_NOT_SERVING)
	a.q.Drain()
	a.reg.Forget(errNotLeader)
}

// begin opens a term: calls are served and hives called from here on. A lone queen begins before
// it announces itself, so its first callers never meet a closed gate.
func (a *app) begin(t *election.Term) {
	l := &leadership{check: func() error { return nil }}
	if t != nil {
		l = &leadership{check: t.Check, token: t.Revision}
		a.reg.Hold(time.Now().Add(a.o.takeoverGrace))
	}
	a.q.Resume()
	a.leading.Store(l)
	a.setHealth(healthpb.HealthCheckResponse_SERVING)
}

// setHealth reports the queen's services, and the server as a whole (""), as s: a standby is
// alive but not ready, and load balancers probing "" should not send it work either.
func (a *app) setHealth(s healthpb.HealthCheckResponse_ServingStatus) {
	for _, name := range append([]string{""}, gatedServices...) {
		a.srv.Health.SetServingStatus(name, s)
	}
}

// fence is the fleet's question before each hive call: the term's fencing token, or why this
// queen must not call a hive.
func (a *app) fence() (uint64, error) {
	if a.elector == nil {
		return 0, nil
	}
	l := a.leading.Load()
	if l == nil {
		return 0, errors.New("this queen is not the leader")
	}
	if err := l.check(); err != nil {
		return 0, err
	}
	return l.token, nil
}

// notLeader is the refusal a standby gives: UNAVAILABLE, which every rbee client retries, naming
// the leader for people and tools that follow one address. Standbys refuse rather than forward:
// forwarding would put every heartbeat through two queens, hide which queen leads, and keep
// serving through a standby that may itself be cut off from the leader; clients given every
// queen's address already go to the leader by its health status.
func (a *app) notLeader() error {
	if a.elector == nil {
		return status.Error(codes.Unavailable, "queen starting or shutting down; retry")
	}
	if l := a.elector.Leader(); l != "" {
		return status.Errorf(codes.Unavailable, "not the leader; leader is at %s", l)
	}
	return status.Error(codes.Unavailable, "not the leader; no queen leads right now (election in progress)")
}

// standby is the HTTP API's gate: nil while this queen leads (alone, always), else why not, in
// words for an HTTP client; the API answers it 503 with Retry-After, as the gRPC gate answers
// UNAVAILABLE.
func (a *app) standby() error {
	if a.elector == nil {
		return nil
	}
	return standbyRefusal(a.leading.Load(), a.elector.Leader)
}

// standbyRefusal is nil when l is a term that still lasts, else the refusal naming the leader
// (leader() is "" when none is known).
func standbyRefusal(l *leadership, leader func() string) error {
	if l != nil && l.check() == nil {
		return nil
	}
	if name := leader(); name != "" {
		return fmt.Errorf("not the leader; the leader is at %s (its --advertise address; send requests to the HTTP API on that host)", name)
	}
	return errors.New("not the leader; no queen leads right now (election in progress); retry")
}

func (a *app) gate(method string) error {
	for _, s := range gatedServices {
		if strings.HasPrefix(method, "/"+s+"/") {
			if l := a.leading.Load(); l == nil || l.check() != nil {
				return a.notLeader()
			}
			return nil
		}
	}
	return nil
}

func (a *app) gateUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if err := a.gate(info.FullMethod); err != nil {
		return nil, err
	}
	return h(ctx, req)
}

func (a *app) gateStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	if err := a.gate(info.FullMethod); err != nil {
		return err
	}
	return h(srv, ss)
}

// registerHAFlags adds the flags of several queens on etcd.
func registerHAFlags(fs *flag.FlagSet, o *options) {
	fs.StringVar(&o.etcdFlag, "etcd", "", "etcd client URLs, comma separated: run as one of several queens, leading when elected (default: alone)")
	fs.DurationVar(&o.electionTTL, "election-ttl", election.DefaultTTL, "with --etcd: lease TTL; a leader that dies is replaced after about this long")
	o.etcdOpts.register(fs)
	fs.DurationVar(&o.takeoverGrace, "takeover-grace", 0, "with --etcd: after taking over, nothing turns STALE, expires or times out for this long (default: --stale-after + 5s)")
}

// takeoverMargin is what the default takeover grace adds to --stale-after: heartbeat clients
// reconnect within about an interval (rpcclient.ReconnectDelay), so this leaves room for a slow
// reconnect on a loaded host and a first beat without making a dead worker's STALE wait long.
const takeoverMargin = 5 * time.Second

// checkHA checks the HA flags and fills in their defaults.
func (o *options) checkHA() error {
	if o.etcdFlag != "" {
		for _, u := range strings.Split(o.etcdFlag, ",") {
			u = strings.TrimSpace(u)
			pu, err := url.Parse(u)
			if err != nil || (pu.Scheme != "http" && pu.Scheme != "https") || pu.Host == "" {
				return fmt.Errorf("--etcd %q: want URLs like http://127.0.0.1:2379, comma separated", u)
			}
			o.etcd = append(o.etcd, u)
		}
	}
	var err error
	if o.etcdClient, err = o.etcdOpts.check(o.etcd); err != nil || o.etcdFlag == "" {
		return err
	}
	if o.electionTTL < 2*time.Second || o.electionTTL%time.Second != 0 {
		return fmt.Errorf("--election-ttl %v: want whole seconds, at least 2s (etcd leases count in seconds)", o.electionTTL)
	}
	if o.takeoverGrace == 0 {
		o.takeoverGrace = o.staleAfter + takeoverMargin
	}
	if o.takeoverGrace < 0 {
		return fmt.Errorf("--takeover-grace %v: want 0 (the default) or more", o.takeoverGrace)
	}
	if host, _, _ := net.SplitHostPort(o.listen); o.advertise == "" && (host == "" || net.ParseIP(host).IsUnspecified()) {
		return fmt.Errorf("--etcd with --listen %s: give --advertise HOST:PORT, the address this queen's clients reach it at", o.listen)
	}
	return nil
}
