package fleet

import (
	"context"
	"fmt"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/hiveclock"
	"github.com/rbee-dev/rbee/internal/jobid"
	"github.com/rbee-dev/rbee/internal/rpcclient"
	"github.com/rbee-dev/rbee/queen/registry"
)

// HiveDialer gives a client for the hive at an address.
type HiveDialer interface {
	Hive(address string) (rbeev1.HiveServiceClient, error)
}

// HivePool keeps one client connection per hive address; gRPC reconnects by itself, so a
// connection is made once and reused for every call.
type HivePool struct {
	opts  []grpc.DialOption
	mu    sync.Mutex
	conns map[string]*grpc.ClientConn
}

// NewHivePool returns a pool dialling with opts (transport credentials and token among them);
// without a transport credentials option it dials in plaintext.
func NewHivePool(opts ...grpc.DialOption) *HivePool {
	base := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithChainUnaryInterceptor(jobid.UnaryClientInterceptor()),
	}
	base = append(base, grpc.WithContextDialer(dialAbortable))
	return &HivePool{opts: append(append(base, rpcclient.Options()...), opts...), conns: map[string]*grpc.ClientConn{}}
}

// dialAbortable dials a hive with SO_LINGER 0, so that closing the connection (Drop) resets it and
// discards what the kernel still holds unsent. Without that, a call the queen has given up on
// while the network was cut (a Delete the operator was told failed) would stay queued in the
// socket and reach the hive when the link returns, and be carried out with a fresh deadline.
func dialAbortable(ctx context.Context, address string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, "tcp", address)
	if err != nil {
		return nil, err
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	return c, nil
}

// hiveDropper is a HiveDialer that can abandon its connection to an address (HivePool).
type hiveDropper interface {
	Drop(address string)
}

// Drop closes the connection to address, resetting it (see dialAbortable), so that no request
// sent on it and still held up in the network is delivered later; calls in flight on it fail.
// The next Hive call for the address dials afresh.
func (p *HivePool) Drop(address string) {
	p.mu.Lock()
	c, ok := p.conns[address]
	delete(p.conns, address)
	p.mu.Unlock()
	if ok {
		_ = c.Close()
	}
}

// Hive returns the client for address.
func (p *HivePool) Hive(address string) (rbeev1.HiveServiceClient, error) {
	c, err := p.conn(address)
	if err != nil {
		return nil, err
	}
	return rbeev1.NewHiveServiceClient(c), nil
}

func (p *HivePool) conn(address string) (*grpc.ClientConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c, ok := p.conns[address]; ok {
		return c, nil
	}
	c, err := grpc.NewClient(address, p.opts...)
	if err != nil {
		return nil, fmt.Errorf("hive address %q: %w", address, err)
	}
	p.conns[address] = c
	return c, nil
}

// hiveClockReader is a HiveDialer that can read a hive's clock itself (HivePool), for a hive whose
// heartbeats carry no reading because it sends none to this queen.
type hiveClockReader interface {
	ReadClock(ctx context.Context, address string) (registry.HiveClock, error)
}

// ReadClock asks the hive at address for a reading of its clock: a health check, whose answer
// carries it in a header (hiveclock.Header). Instance 0: the hive reports none (it predates it).
func (p *HivePool) ReadClock(ctx context.Context, address string) (registry.HiveClock, error) {
	c, err := p.conn(address)
	if err != nil {
		return registry.HiveClock{}, err
	}
	var md metadata.MD
	if _, err := healthpb.NewHealthClient(c).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.Header(&md)); err != nil {
		return registry.HiveClock{}, fmt.Errorf("reading the clock of hive %s: %w", address, err)
	}
	received := time.Now() // after the answer arrived: the hive's clock read at least this much then
	instance, reading, ok, err := hiveclock.ParseHeader(md)
	if err != nil || !ok {
		return registry.HiveClock{}, err
	}
	return registry.HiveClock{Instance: instance, Reading: reading, Received: received}, nil
}

// Close closes every connection.
func (p *HivePool) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	for a, c := range p.conns {
		_ = c.Close()
		delete(p.conns, a)
	}
	return nil
}
