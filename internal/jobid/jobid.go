// Package jobid gives every call a job id: taken from the caller's x-job-id metadata or made,
// returned in the x-job-id response header, carried in the context (with a logger that names it)
// and forwarded to the next service, so one grep follows an operation across queen, hive and worker.
package jobid

import (
	"context"
	"crypto/rand"
	"encoding/hex"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"github.com/rbee-dev/rbee/internal/narrate"
)

// MetadataKey is the request metadata and response header that carries the job id.
const MetadataKey = "x-job-id"

type key struct{}

// New makes a fresh job id.
func New() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return "job-" + hex.EncodeToString(b[:])
}

// FromContext returns the context's job id, "" when it has none.
func FromContext(ctx context.Context) string {
	id, _ := ctx.Value(key{}).(string)
	return id
}

// With returns ctx carrying job id id and a logger (from base) that names it, and fields.
func With(ctx context.Context, base *zap.Logger, id string, fields ...zap.Field) context.Context {
	ctx = context.WithValue(ctx, key{}, id)
	// WithLazy: most calls never log beyond their last line, and a heartbeat stream is open for
	// every worker; an eager With encodes the field into a pooled buffer each stream would pin.
	if len(fields) > 0 {
		return narrate.WithLogger(ctx, base.WithLazy(append([]zap.Field{zap.String("job_id", id)}, fields...)...))
	}
	return narrate.WithLogger(ctx, base.WithLazy(zap.String("job_id", id)))
}

// valid accepts caller-chosen ids that are safe to log and forward: 1 to 64 characters of
// [A-Za-z0-9._:-]. Anything else is replaced by a made one rather than refused, because a job
// id is a debugging aid and must never fail a call.
func valid(id string) bool {
	if len(id) == 0 || len(id) > 64 {
		return false
	}
	for _, c := range []byte(id) {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '_', c == ':', c == '-':
		default:
			return false
		}
	}
	return true
}

func incoming(ctx context.Context) string {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get(MetadataKey); len(v) > 0 && valid(v[0]) {
		return v[0]
	}
	return New()
}

// UnaryServerInterceptor puts the call's job id and logger into its context and answers it in the
// response header.
func UnaryServerInterceptor(base *zap.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		return handler(Unary(ctx, base), req)
	}
}

// Unary is UnaryServerInterceptor's work for an interceptor that composes it with others: it
// returns the unary call's context with its job id and logger, and answers the id in the
// response header.
func Unary(ctx context.Context, base *zap.Logger) context.Context {
	id := incoming(ctx)
	_ = grpc.SetHeader(ctx, metadata.Pairs(MetadataKey, id))
	return With(ctx, base, id)
}

// StreamServerInterceptor is UnaryServerInterceptor for streams.
func StreamServerInterceptor(base *zap.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		return handler(srv, ServerStream(ss, base, true))
	}
}

// ServerStream is what StreamServerInterceptor does to a stream, for interceptors that compose
// it themselves: ss with the caller's job id (or a new one) on its context and, if header, in its
// response header.
func ServerStream(ss grpc.ServerStream, base *zap.Logger, header bool) grpc.ServerStream {
	id := incoming(ss.Context())
	if header {
		_ = ss.SetHeader(metadata.Pairs(MetadataKey, id))
	}
	return &stream{ServerStream: ss, ctx: With(ss.Context(), base, id)}
}

type stream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *stream) Context() context.Context { return s.ctx }

// UnaryClientInterceptor forwards the context's job id to the called service.
func UnaryClientInterceptor() grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if id := FromContext(ctx); id != "" {
			ctx = metadata.AppendToOutgoingContext(ctx, MetadataKey, id)
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}
}
