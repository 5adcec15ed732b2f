package cli

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// globals are the flags every command shares.
type globals struct {
	queen     string
	output    string
	tokenFile string
	tlsCA     string
	tlsCert   string
	tlsKey    string
}

// client is an open connection to the queen.
type client struct {
	rbeev1.QueenServiceClient
	conn *grpc.ClientConn
}

func (c *client) Close() error { return c.conn.Close() }

// dial connects to the queen with the transport and credentials the flags ask for. grpc.NewClient
// is lazy: an unreachable queen shows up as UNAVAILABLE on the first call.
func (g *globals) dial() (*client, error) {
	creds, err := g.transport()
	if err != nil {
		return nil, err
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	token, err := g.token()
	if err != nil {
		return nil, err
	}
	if token != "" {
		opts = append(opts,
			grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, o ...grpc.CallOption) error {
				return invoker(withToken(ctx, token), method, req, reply, cc, o...)
			}),
			grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, o ...grpc.CallOption) (grpc.ClientStream, error) {
				return streamer(withToken(ctx, token), desc, cc, method, o...)
			}))
	}
	conn, err := grpc.NewClient(g.queen, opts...)
	if err != nil {
		return nil, usagef("--queen %q: %v", g.queen, err)
	}
	return &client{QueenServiceClient: rbeev1.NewQueenServiceClient(conn), conn: conn}, nil
}

// withToken attaches the cluster token the way the queen expects it.
func withToken(ctx context.Context, token string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
}

// token reads the cluster token from --token-file, else RBEE_TOKEN; "" means none. The token is
// never printed, not even in errors.
func (g *globals) token() (string, error) {
	if g.tokenFile == "" {
		return strings.TrimSpace(os.Getenv("RBEE_TOKEN")), nil
	}
	b, err := os.ReadFile(g.tokenFile)
	if err != nil {
		return "", fmt.Errorf("reading --token-file: %w", err)
	}
	t := strings.TrimSpace(string(b))
	if t == "" {
		return "", fmt.Errorf("--token-file %s is empty", g.tokenFile)
	}
	return t, nil
}

// transport is plaintext without TLS flags; with --tls-ca the queen's certificate is verified
// against that CA; with --tls-cert and --tls-key too the CLI presents its own (mutual TLS).
func (g *globals) transport() (credentials.TransportCredentials, error) {
	if (g.tlsCert == "") != (g.tlsKey == "") {
		return nil, usagef("--tls-cert and --tls-key go together")
	}
	if g.tlsCA == "" && g.tlsCert == "" {
		return insecure.NewCredentials(), nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if g.tlsCA != "" {
		pem, err := os.ReadFile(g.tlsCA)
		if err != nil {
			return nil, fmt.Errorf("reading --tls-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--tls-ca %s holds no PEM certificate", g.tlsCA)
		}
		cfg.RootCAs = pool
	}
	if g.tlsCert != "" {
		cert, err := tls.LoadX509KeyPair(g.tlsCert, g.tlsKey)
		if err != nil {
			return nil, fmt.Errorf("loading --tls-cert/--tls-key: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return credentials.NewTLS(cfg), nil
}

// callContext bounds one call by d (a command's --timeout); d <= 0 means no bound.
func callContext(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if d <= 0 {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, d)
}
