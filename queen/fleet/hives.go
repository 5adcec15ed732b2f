package fleet

import (
	"fmt"
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
	return &HivePool{opts: append(append(base, rpcclient.Options()...), opts...), conns: map[string]*grpc.ClientConn{}}
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
