package rpcclient

import (
	"context"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// blackHole returns a loopback address whose SYNs go unanswered, as in a cut: a socket that
// listens with a backlog of 0 and never accepts. Once its accept queue holds one connection, the
// kernel drops every further SYN.
func blackHole(t *testing.T) string {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := (&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: sa.(*unix.SockaddrInet4).Port}).String()
	// Fill the queue: connections stay open (never accepted) until a connect hangs.
	for range 4 {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil {
			return addr
		}
		t.Cleanup(func() { c.Close() })
	}
	t.Skip("cannot make a black-holed loopback address here (SYNs to a full accept queue are answered)")
	return ""
}

// A heartbeat client's connect into a cut (its SYN lost) gives up after about an interval, not
// after the kernel's SYN retransmissions or the 3 s handshake timeout, so that the next attempt,
// which may find the link back, is not held up.
func TestHeartbeatConnectBounded(t *testing.T) {
	addr := blackHole(t)
	const iv = 400 * time.Millisecond
	conn, err := grpc.NewClient(addr, append(HeartbeatOptions(iv), grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	t0 := time.Now()
	_, err = rbeev1.NewHeartbeatServiceClient(conn).WorkerHeartbeat(ctx)
	took := time.Since(t0)
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("opening a stream to a black hole: %v; want UNAVAILABLE", err)
	}
	if took < iv*3/4 || took > iv+300*time.Millisecond {
		t.Errorf("the connect gave up after %v; want about one interval (%v)", took, iv)
	}
}
