// Package auth decides who may call what: the cluster token (operators, queen <-> hive), per-worker
// tokens that open only that worker's own heartbeat stream, TLS and mutual TLS, the refusal to
// listen beyond loopback without a token, and the warning when a token would cross a network
// without TLS. It is wired into every server through rpcserver.
package auth

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"

	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors"
	grpcauth "github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/auth"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/selector"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// EnvToken is the environment variable holding the cluster token; EnvWorkerToken holds a
// worker's own token, set by the hive.
const (
	EnvToken       = "RBEE_TOKEN"
	EnvWorkerToken = "RBEE_WORKER_TOKEN"
)

// MinTokenLen is the shortest cluster token accepted: anything shorter is guessable.
const MinTokenLen = 16

// ReadToken reads a token from file (when given) or from $RBEE_TOKEN, trimmed; "" means none.
// Never take a token from a flag value: it would show in ps. Errors name the source, never the
// token.
func ReadToken(file string) (tok, src string, err error) {
	tok, src = os.Getenv(EnvToken), "$"+EnvToken
	if file != "" {
		b, err := os.ReadFile(file)
		if err != nil {
			return "", "", fmt.Errorf("--token-file: %w", err)
		}
		tok, src = string(b), "--token-file "+file
	}
	tok = strings.TrimSpace(tok)
	if tok == "" && file != "" {
		return "", "", fmt.Errorf("%s is empty", src)
	}
	return tok, src, nil
}

// LoadToken reads the cluster token a server runs with (ReadToken) and refuses a weak one: a
// short token is guessable, and one with white space is a copy-paste accident.
func LoadToken(file string) (string, error) {
	tok, src, err := ReadToken(file)
	if err != nil || tok == "" {
		return "", err
	}
	if len(tok) < MinTokenLen {
		return "", fmt.Errorf("the token in %s has %d characters; use at least %d (e.g. openssl rand -hex 32)", src, len(tok), MinTokenLen)
	}
	if strings.ContainsAny(tok, " \t\r\n") {
		return "", fmt.Errorf("the token in %s contains white space", src)
	}
	return tok, nil
}

// workerPrefix marks worker tokens: "rbw1.<worker id>.<mac>". The id travels in the token, so
// checking one needs only the cluster secret, no stored state, and survives a queen restart.
const workerPrefix = "rbw1."

// WorkerToken derives worker id's token from the cluster token.
func WorkerToken(cluster, workerID string) string {
	return workerPrefix + workerID + "." + mac(cluster, workerID)
}

func mac(cluster, workerID string) string {
	h := hmac.New(sha256.New, []byte(cluster))
	h.Write([]byte("rbee worker token v1\x00" + workerID))
	return base64.RawURLEncoding.EncodeToString(h.Sum(nil))
}

// Identity is who a call's credentials name.
type Identity struct {
	// Cluster is true for the cluster token (operators, queen, hives).
	Cluster bool
	// WorkerID is set for a worker's token.
	WorkerID string
}

type identityKey struct{}

// FromContext returns the caller's identity; ok is false when the server runs without a token
// (everyone may call everything).
func FromContext(ctx context.Context) (Identity, bool) {
	id, ok := ctx.Value(identityKey{}).(Identity)
	return id, ok
}

// WorkerHeartbeatMethod is the one method a worker's token opens.
const WorkerHeartbeatMethod = "/rbee.v1.HeartbeatService/WorkerHeartbeat"

// Verifier checks credentials against the cluster token.
type Verifier struct{ cluster string }

// NewVerifier returns a verifier for token; nil (no checks) when token is "".
func NewVerifier(token string) *Verifier {
	if token == "" {
		return nil
	}
	return &Verifier{cluster: token}
}

// errUnauthenticated never says which part was wrong: a prober learns nothing.
var errUnauthenticated = status.Error(codes.Unauthenticated, "missing or wrong credentials: send \"authorization: Bearer <token>\"")

func (v *Verifier) authenticate(ctx context.Context) (context.Context, error) {
	method, _ := grpc.Method(ctx)
	tok, err := grpcauth.AuthFromMD(ctx, "bearer")
	if err != nil {
		return nil, errUnauthenticated
	}
	if subtle.ConstantTimeCompare([]byte(tok), []byte(v.cluster)) == 1 {
		return context.WithValue(ctx, identityKey{}, Identity{Cluster: true}), nil
	}
	id, ok := v.workerID(tok)
	if !ok {
		return nil, errUnauthenticated
	}
	if method != WorkerHeartbeatMethod {
		return nil, status.Errorf(codes.PermissionDenied, "a worker's token opens only its own heartbeat stream, not %s", method)
	}
	return context.WithValue(ctx, identityKey{}, Identity{WorkerID: id}), nil
}

// workerID checks a worker token and returns the worker id it was made for.
func (v *Verifier) workerID(tok string) (string, bool) {
	rest, ok := strings.CutPrefix(tok, workerPrefix)
	if !ok {
		return "", false
	}
	i := strings.LastIndexByte(rest, '.')
	if i <= 0 {
		return "", false
	}
	id, got := rest[:i], rest[i+1:]
	if !hmac.Equal([]byte(got), []byte(mac(v.cluster, id))) {
		return "", false
	}
	return id, true
}

// needsAuth selects every call but health checks.
var needsAuth = selector.MatchFunc(func(_ context.Context, c interceptors.CallMeta) bool {
	return c.Service != healthpb.Health_ServiceDesc.ServiceName
})

// UnaryInterceptor and StreamInterceptor enforce the credentials on every call but health checks;
// a nil Verifier lets every call through (the cluster runs without a token, on loopback only
// unless --insecure).
func (v *Verifier) UnaryInterceptor() grpc.UnaryServerInterceptor {
	if v == nil {
		return passUnary
	}
	return selector.UnaryServerInterceptor(grpcauth.UnaryServerInterceptor(v.authenticate), needsAuth)
}

func (v *Verifier) StreamInterceptor() grpc.StreamServerInterceptor {
	if v == nil {
		return passStream
	}
	return selector.StreamServerInterceptor(grpcauth.StreamServerInterceptor(v.authenticate), needsAuth)
}

func passUnary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	return h(ctx, req)
}

func passStream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	return h(srv, ss)
}

// bearer sends a token on every call.
type bearer struct{ token string }

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

// RequireTransportSecurity is false so a token can be used without TLS: on loopback that is safe;
// off loopback the programs warn loudly at start (TokenInClear) but still run, for networks that
// are private or encrypted below rbee (a VPN, WireGuard). TLS is the answer everywhere else.
func (b bearer) RequireTransportSecurity() bool { return false }

// Bearer returns the dial option that sends token on every call; none when token is "".
func Bearer(token string) []grpc.DialOption {
	if token == "" {
		return nil
	}
	return []grpc.DialOption{grpc.WithPerRPCCredentials(bearer{token: token})}
}

// TokenInClear reports whether token would cross a network unencrypted when served on or sent to
// address: a token is set, TLS is not, and the host is not loopback.
func TokenInClear(address, token string, tls bool) bool {
	if token == "" || tls {
		return false
	}
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		host = address
	}
	return !isLoopback(host)
}

// TokenInClearWarning is the warning the programs give when TokenInClear holds.
func TokenInClearWarning(what, address string) string {
	return fmt.Sprintf("%s %s is not a loopback address and TLS is off: the cluster token, which can start and kill processes, crosses the network in clear text. Give --tls-cert/--tls-key/--tls-ca unless this network is private or encrypted below rbee", what, address)
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// CheckExposure refuses to serve beyond loopback without a token: the hive's Delete is a remote
// "kill this PID" and SpawnWorker starts processes, so an open port off the machine is an
// invitation. --insecure accepts the risk knowingly.
func CheckExposure(flagName, listen, token string, insecure bool) error {
	if token != "" || insecure {
		return nil
	}
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return err
	}
	if isLoopback(host) {
		return nil
	}
	return errors.New(flagName + " " + listen + " is not a loopback address and no cluster token is set: anyone who can reach it could start and kill processes. Give --token-file (or " + EnvToken + "), or --insecure to run open anyway")
}
