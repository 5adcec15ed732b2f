package fleet

import (
	"context"
	"fmt"
	"net"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/jobid"
	"github.com/rbee-dev/rbee/internal/rpcclient"
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
	p.mu.Lock()
	defer p.mu.Unlock()
	if c, ok := p.conns[address]; ok {
		return rbeev1.NewHiveServiceClient(c), nil
	}
	c, err := grpc.NewClient(address, p.opts...)
	if err != nil {
		return nil, fmt.Errorf("hive address %q: %w", address, err)
	}
	p.conns[address] = c
	return rbeev1.NewHiveServiceClient(c), nil
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
