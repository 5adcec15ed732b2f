// Package rpcserver sets up the gRPC servers of the queen and the hive the same way: job ids,
// call logging, panic recovery, keepalive policy, health and reflection, and a shutdown that
// drains before it stops.
package rpcserver

import (
	"context"
	"errors"
	"net"
	"runtime/debug"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/logging"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/recovery"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/selector"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"

	"github.com/rbee-dev/rbee/internal/auth"
	"github.com/rbee-dev/rbee/internal/jobid"
	"github.com/rbee-dev/rbee/internal/narrate"
)

// Options configures New.
type Options struct {
	Logger *zap.Logger
	// Unary and Stream run after job id, logging and recovery (auth goes here).
	Unary  []grpc.UnaryServerInterceptor
	Stream []grpc.StreamServerInterceptor
	// Extra server options (credentials, limits).
	ServerOptions []grpc.ServerOption
	// ShutdownTimeout bounds the graceful stop; past it open calls and connections are cut, so
	// Serve returns within it (plus a moment) of ctx being done, whatever clients hold open.
	// Default 5s.
	ShutdownTimeout time.Duration
	// Metrics, if set, counts and times every call (Prometheus), except the streams named in
	// Unmetered: per-message counters on a stream carrying 100,000 heartbeats a second cost the
	// queen 7% of its CPU, and the queen counts heartbeats itself. Unmetered streams also get the
	// light interceptor chain (see lightStream).
	Metrics   *grpcprom.ServerMetrics
	Unmetered []string
	// Auth checks every call's credentials but health checks; nil lets every call through.
	Auth *auth.Verifier
}

// Server is a gRPC server with health and reflection registered.
type Server struct {
	GRPC    *grpc.Server
	Health  *health.Server
	log     *zap.Logger
	timeout time.Duration
	metrics *grpcprom.ServerMetrics
	conns   *conns
	// draining is set when shutdown starts; from then on new calls are refused, also on
	// connections that are already open (grpc-go's GOAWAY only reaches them once every
	// connection has finished its handshake).
	draining atomic.Bool
	// handshakesCut, if set (tests), is called once shutdown has closed the connections still in
	// their handshake.
	handshakesCut func()
}

// minPingInterval is the most frequent keepalive ping the servers permit; clients ping every
// rpcclient.PingInterval, well within it, so idle streams are never cut for too_many_pings.
const minPingInterval = 10 * time.Second

// MaxMessageBytes bounds every message the servers accept; rbee's messages are a few hundred bytes.
const MaxMessageBytes = 1 << 20

// MaxStreamsPerConn bounds the streams one connection may hold open at once, so one client cannot
// pin unbounded server memory; a real worker or hive uses one.
const MaxStreamsPerConn = 1024

// HandshakeTimeout bounds a new connection's handshake (TLS and the HTTP/2 preface); gRPC's default
// of 120 s would let an idle client hold a connection, and the server's shutdown, that long.
const HandshakeTimeout = 10 * time.Second

// Per-connection buffer sizes; see New.
const (
	connReadBuffer  = 4 << 10
	connWriteBuffer = 16 << 10
)

// lightStream is the interceptor chain of the Unmetered streams (the heartbeats: one per worker,
// open for its whole life): job id (logged, not echoed), auth, panic recovery and one log line at
// the end, composed in one function. The middleware chain wraps every message (the logging middleware cost 8% of the
// queen's CPU) and its frames stay on each stream's stack while it waits for the next beat:
// 10,000 such stacks are most of the queen's memory.
type lightStream struct {
	log  *zap.Logger
	auth grpc.StreamServerInterceptor
}

func (l *lightStream) intercept(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
	// The job id is in the logs but not echoed in a response header: gRPC keeps a stream's header
	// for its whole life, about 600 bytes a stream, and no heartbeat client reads it.
	ss = jobid.ServerStream(ss, l.log, false)
	defer l.finish(ss.Context(), info.FullMethod, time.Now(), &err)
	return l.auth(srv, ss, info, handler)
}

// unaryCall is job id, panic recovery and the "finished call" line of every unary call, composed
// in one function as lightStream is for heartbeats. The logging middleware built all of its
// fields (peer address, formatted start time...) before each call whether or not its line would be
// written: 11 of the hive's ~30 microseconds of interceptors in front of each Spawn and Delete.
// Here the fields are built only for a line the logger's level lets through.
type unaryCall struct{ log *zap.Logger }

func (u *unaryCall) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (resp any, err error) {
	ctx = jobid.Unary(ctx, u.log)
	defer u.finish(ctx, info.FullMethod, time.Now(), &err)
	return h(ctx, req)
}

// finish recovers a panic (recover works only when called by the deferred function itself) and
// ends the call (endCall); health checks, which probes send every few seconds, are not logged.
func (u *unaryCall) finish(ctx context.Context, method string, t0 time.Time, err *error) {
	endCall(ctx, method, t0, err, recover(), !isHealth(method))
}

func (l *lightStream) finish(ctx context.Context, method string, t0 time.Time, err *error) {
	endCall(ctx, method, t0, err, recover(), true)
}

// endCall answers a panic p (INTERNAL "internal error" to the caller, the details in the log) and,
// with logEnd, logs the call's end the way the logging middleware does (level by code).
func endCall(ctx context.Context, method string, t0 time.Time, err *error, p any, logEnd bool) {
	if p != nil {
		narrate.Logger(ctx).Error("panic in handler", zap.Any("panic", p), zap.ByteString("stack", debug.Stack()))
		*err = status.Error(codes.Internal, "internal error")
	}
	if !logEnd {
		return
	}
	code := status.Code(*err)
	lvl := zapcore.InfoLevel
	switch logging.DefaultServerCodeToLevel(code) {
	case logging.LevelDebug:
		lvl = zapcore.DebugLevel
	case logging.LevelWarn:
		lvl = zapcore.WarnLevel
	case logging.LevelError:
		lvl = zapcore.ErrorLevel
	}
	if ce := narrate.Logger(ctx).Check(lvl, "finished call"); ce != nil {
		fields := []zap.Field{zap.String("grpc.method", method), zap.String("grpc.code", code.String()),
			zap.Float64("grpc.time_ms", float64(time.Since(t0).Microseconds())/1000)}
		if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
			fields = append(fields, zap.Stringer("peer.address", p.Addr))
		}
		if *err != nil {
			fields = append(fields, zap.Error(*err))
		}
		ce.Write(fields...)
	}
}

// chainStream composes interceptors into one, the first outermost, as grpc.ChainStreamInterceptor.
func chainStream(ints []grpc.StreamServerInterceptor) grpc.StreamServerInterceptor {
	if len(ints) == 1 {
		return ints[0]
	}
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		return ints[0](srv, ss, info, chainHandler(ints[1:], info, handler))
	}
}

func chainHandler(ints []grpc.StreamServerInterceptor, info *grpc.StreamServerInfo, final grpc.StreamHandler) grpc.StreamHandler {
	if len(ints) == 0 {
		return final
	}
	return func(srv any, ss grpc.ServerStream) error {
		return ints[0](srv, ss, info, chainHandler(ints[1:], info, final))
	}
}

// New builds the server. Register services on s.GRPC, then call Serve.
func New(o Options) *Server {
	log := o.Logger
	timeout := o.ShutdownTimeout
	if timeout == 0 {
		timeout = 5 * time.Second
	}
	logOpts := []logging.Option{
		logging.WithLogOnEvents(logging.FinishCall),
		logging.WithFieldsFromContext(func(ctx context.Context) logging.Fields {
			if id := jobid.FromContext(ctx); id != "" {
				return logging.Fields{"job_id", id}
			}
			return nil
		}),
	}
	// Health probes arrive every few seconds from load balancers and scripts; logging each one
	// would bury the calls that matter.
	notHealth := selector.MatchFunc(func(_ context.Context, c interceptors.CallMeta) bool {
		return c.Service != healthpb.Health_ServiceDesc.ServiceName
	})
	recoverOpt := recovery.WithRecoveryHandlerContext(func(ctx context.Context, p any) error {
		narrate.Logger(ctx).Error("panic in handler", zap.Any("panic", p), zap.ByteString("stack", debug.Stack()))
		return status.Error(codes.Internal, "internal error")
	})
	s := &Server{Health: health.NewServer(), log: log, timeout: timeout, metrics: o.Metrics, conns: &conns{open: map[*conn]struct{}{}}}
	unary := []grpc.UnaryServerInterceptor{s.refuseWhileDraining}
	stream := []grpc.StreamServerInterceptor{s.refuseStreamsWhileDraining}
	if o.Metrics != nil {
		metered := selector.MatchFunc(func(_ context.Context, c interceptors.CallMeta) bool {
			return !slices.Contains(o.Unmetered, c.FullMethod())
		})
		unary = append(unary, o.Metrics.UnaryServerInterceptor())
		stream = append(stream, selector.StreamServerInterceptor(o.Metrics.StreamServerInterceptor(), metered))
	}
	unary = append(append(unary,
		(&unaryCall{log: log}).intercept,
		o.Auth.UnaryInterceptor(),
	), o.Unary...)
	stream = append(append(stream,
		jobid.StreamServerInterceptor(log),
		selector.StreamServerInterceptor(logging.StreamServerInterceptor(interceptorLogger(log), logOpts...), notHealth),
		recovery.StreamServerInterceptor(recoverOpt),
		o.Auth.StreamInterceptor(),
	), o.Stream...)
	full := chainStream(stream)
	light := &lightStream{log: log, auth: chainStream(append([]grpc.StreamServerInterceptor{o.Auth.StreamInterceptor()}, o.Stream...))}
	unmetered := map[string]bool{}
	for _, m := range o.Unmetered {
		unmetered[m] = true
	}
	dispatch := func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if unmetered[info.FullMethod] {
			return light.intercept(srv, ss, info, handler)
		}
		return full(srv, ss, info, handler)
	}
	opts := append([]grpc.ServerOption{
		grpc.ChainUnaryInterceptor(unary...),
		grpc.StreamInterceptor(dispatch),
		grpc.MaxRecvMsgSize(MaxMessageBytes),
		grpc.MaxConcurrentStreams(MaxStreamsPerConn),
		// Every worker holds a connection to the queen that carries a few hundred bytes a second.
		// gRPC's defaults keep a 32 KiB read and a 32 KiB write buffer per connection for good;
		// smaller reads and a write buffer taken from a pool only while writing bring a
		// connection's fixed cost from about 70 KB to a few.
		grpc.ReadBufferSize(connReadBuffer),
		grpc.WriteBufferSize(connWriteBuffer),
		grpc.SharedWriteBuffer(true),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: minPingInterval, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: time.Minute, Timeout: 20 * time.Second}),
		grpc.ConnectionTimeout(HandshakeTimeout),
	}, o.ServerOptions...)
	s.GRPC = grpc.NewServer(opts...)
	healthpb.RegisterHealthServer(s.GRPC, s.Health)
	reflection.Register(s.GRPC)
	return s
}

// errDraining answers calls that arrive once shutdown has started.
var errDraining = status.Error(codes.Unavailable, "server shutting down; try again elsewhere or later")

func isHealth(method string) bool {
	return strings.HasPrefix(method, "/"+healthpb.Health_ServiceDesc.ServiceName+"/")
}

// Health checks go on during the drain: they answer NOT_SERVING, which is what a prober needs.
func (s *Server) refuseWhileDraining(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if s.draining.Load() && !isHealth(info.FullMethod) {
		return nil, errDraining
	}
	return h(ctx, req)
}

func (s *Server) refuseStreamsWhileDraining(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	if s.draining.Load() && !isHealth(info.FullMethod) {
		return errDraining
	}
	return h(srv, ss)
}

// Serve serves on lis until ctx is done, then refuses new calls, reports NOT_SERVING, calls
// drain (which ends long-lived streams), closes connections still in their handshake, stops
// gracefully and, past the shutdown timeout, cuts every connection left.
func (s *Server) Serve(ctx context.Context, lis net.Listener, drain func()) error {
	if s.metrics != nil {
		// Every method shows in the metrics from the start, at zero, not only once called.
		s.metrics.InitializeMetrics(s.GRPC)
	}
	errc := make(chan error, 1)
	go func() { errc <- s.GRPC.Serve(&listener{Listener: lis, c: s.conns}) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	s.draining.Store(true)
	s.log.Info("shutting down: refusing new calls, draining open ones", zap.Duration("timeout", s.timeout),
		zap.String("action", "server_draining"))
	s.Health.Shutdown()
	if drain != nil {
		drain()
	}
	stopped := make(chan struct{})
	go func() { s.GRPC.GracefulStop(); close(stopped) }()
	s.conns.closeHandshaking()
	if s.handshakesCut != nil {
		s.handshakesCut()
	}
	select {
	case <-stopped:
	case <-time.After(s.timeout):
		s.log.Warn("graceful stop timed out; closing remaining calls and connections", zap.Duration("timeout", s.timeout))
		s.conns.closeAll()
		s.GRPC.Stop()
		<-stopped
	}
	if err := <-errc; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return err
	}
	return nil
}

func interceptorLogger(l *zap.Logger) logging.Logger {
	return logging.LoggerFunc(func(_ context.Context, lvl logging.Level, msg string, fields ...any) {
		zf := make([]zap.Field, 0, len(fields)/2)
		for i := 0; i+1 < len(fields); i += 2 {
			k, _ := fields[i].(string)
			zf = append(zf, zap.Any(k, fields[i+1]))
		}
		var zl zapcore.Level
		switch lvl {
		case logging.LevelDebug:
			zl = zapcore.DebugLevel
		case logging.LevelInfo:
			zl = zapcore.InfoLevel
		case logging.LevelWarn:
			zl = zapcore.WarnLevel
		default:
			zl = zapcore.ErrorLevel
		}
		l.Log(zl, msg, zf...)
	})
}
