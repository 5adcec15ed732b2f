// Package loopback holds what the load tools need to run servers on this machine: a free loopback
// address, starting and stopping a server process, and waiting for its health to say SERVING
// (gRPC) or 200 (HTTP).
package loopback

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"syscall"
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

// AwaitHTTP waits (at most 20s) until GET url answers 200, asking every 10ms: a server that is
// loading has no stream to watch.
func AwaitHTTP(url string) error {
	client := &http.Client{Timeout: time.Second}
	defer client.CloseIdleConnections()
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := client.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("status %d", resp.StatusCode)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("waiting for 200 from %s: %w", url, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Start starts a server process with its stderr on ours.
func Start(path string, args ...string) (*exec.Cmd, error) {
	cmd := exec.Command(path, args...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return cmd, nil
}

// Stop sends SIGTERM to a process Start started, by its PID, and waits for it; after 10s it is
// killed.
func Stop(cmd *exec.Cmd) {
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}
