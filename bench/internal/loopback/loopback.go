// Package loopback holds what the load tools need to run servers on this machine: a free loopback
// address, and waiting for a server's health to say SERVING.
package loopback

import (
	"context"
	"fmt"
	"net"
	"time"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// FreeAddr returns a loopback address whose port was free when asked.
func FreeAddr() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// AwaitServing waits (on the health Watch stream, at most 20s) until conn's server is SERVING.
func AwaitServing(conn *grpc.ClientConn) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	w, err := healthpb.NewHealthClient(conn).Watch(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
	if err != nil {
		return err
	}
	for {
		r, err := w.Recv()
		if err != nil {
			return fmt.Errorf("waiting for SERVING: %w", err)
		}
		if r.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return nil
		}
	}
}
