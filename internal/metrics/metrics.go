// Package metrics serves a program's Prometheus metrics and profiles on --metrics-listen, and
// provides the standard gRPC server metrics both the queen and the hive export.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
)

// Set is one program's metrics: its registry and the gRPC server metrics registered in it.
type Set struct {
	Registry *prometheus.Registry
	GRPC     *grpcprom.ServerMetrics
}

// New returns a registry holding Go runtime, process and gRPC server metrics.
func New() *Set {
	reg := prometheus.NewRegistry()
	g := grpcprom.NewServerMetrics(grpcprom.WithServerHandlingTimeHistogram(
		grpcprom.WithHistogramBuckets([]float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30})))
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), g)
	return &Set{Registry: reg, GRPC: g}
}

// ListenAddress fills in loopback for an address given without a host (":9090"), so metrics are
// never exposed beyond the machine by accident.
func ListenAddress(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("--metrics-listen %q: want [HOST]:PORT", addr)
	}
	if host == "" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port), nil
}

// Serve serves /metrics and /debug/pprof/ on lis until ctx is done.
func Serve(ctx context.Context, lis net.Listener, s *Set, log *zap.Logger) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(s.Registry, promhttp.HandlerOpts{Registry: s.Registry}))
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(lis) }()
	log.Info("metrics serving", zap.String("metrics_listen", lis.Addr().String()), zap.String("action", "metrics_start"))
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	err := srv.Shutdown(sctx)
	if e := <-errc; !errors.Is(e, http.ErrServerClosed) && e != nil {
		return e
	}
	return err
}

// Start serves s on addr (--metrics-listen; "" means off) until ctx is done; wait blocks until the
// server has stopped.
func Start(ctx context.Context, addr string, s *Set, log *zap.Logger) (wait func() error, err error) {
	if addr == "" {
		return func() error { return nil }, nil
	}
	addr, err = ListenAddress(addr)
	if err != nil {
		return nil, err
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics-listen %s: %w", addr, err)
	}
	errc := make(chan error, 1)
	go func() { errc <- Serve(ctx, lis, s, log) }()
	return func() error { return <-errc }, nil
}
