package rpcclient

import (
	"context"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// blackHole returns a loopback listener whose SYNs go unanswered, as in a cut, until serve is
// called: a socket that listens with a backlog of 0 and does not accept. Once its accept queue
// holds a connection, the kernel drops every further SYN; serve accepts (gRPC on it), which
// empties the queue, and SYNs are answered again.
func blackHole(t *testing.T) (addr string, serve func()) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "blackhole")
	lis, err := net.FileListener(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	addr = lis.Addr().String()
	srv := grpc.NewServer()
	rbeev1.RegisterHeartbeatServiceServer(srv, &rbeev1.UnimplementedHeartbeatServiceServer{})
	done := make(chan struct{})
	started := false
	t.Cleanup(func() {
		if started {
			srv.Stop()
			<-done
		} else {
			lis.Close()
		}
	})
	// Fill the queue: connections stay open (not accepted) until a connect hangs.
	for range 4 {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil {
			return addr, func() {
				started = true
				go func() { defer close(done); _ = srv.Serve(lis) }()
			}
		}
		t.Cleanup(func() { c.Close() })
	}
	t.Skip("cannot make a black-holed loopback address here (SYNs to a full accept queue are answered)")
	return "", nil
}

// A heartbeat client whose connect went into a cut (its SYN lost) reaches the queen within about
// an interval of the link returning: it sends a fresh SYN every interval, instead of waiting for
// the kernel to retransmit the first after 1 s, then 3 s.
func TestHeartbeatConnectResendsSYN(t *testing.T) {
	addr, serve := blackHole(t)
	const iv = 200 * time.Millisecond
	conn, err := grpc.NewClient(addr, append(HeartbeatOptions(iv), grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	t0 := time.Now()
	conn.Connect()
	time.AfterFunc(iv+iv/4, serve) // the link returns between two SYNs
	for s := conn.GetState(); s != connectivity.Ready; s = conn.GetState() {
		if !conn.WaitForStateChange(ctx, s) {
			t.Fatalf("not connected after 10s (state %v)", conn.GetState())
		}
	}
	// The SYN sent 2 intervals in is answered; the kernel would resend the first only at 1 s.
	if took := time.Since(t0); took > 900*time.Millisecond {
		t.Errorf("connected %v after the first SYN, the link back after %v; want within about an interval of that", took, iv+iv/4)
	}
}
