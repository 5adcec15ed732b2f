package cli

import (
	"context"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/auth"
	"github.com/rbee-dev/rbee/internal/rpcclient"
	"github.com/rbee-dev/rbee/internal/validate"
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
	conn  *grpc.ClientConn
	token string // the cluster token sent, "" for none; never printed
}

func (c *client) Close() error { return c.conn.Close() }

// dial connects to the queen with the transport and credentials the flags ask for, read the same
// way as the queen and the hive read theirs (internal/auth). grpc.NewClient is lazy: an
// unreachable queen shows up as UNAVAILABLE on the first call.
func (g *globals) dial() (*client, error) {
	if (g.tlsCert == "") != (g.tlsKey == "") {
		return nil, usagef("--tls-cert and --tls-key go together")
	}
	creds, err := auth.TLSFiles{Cert: g.tlsCert, Key: g.tlsKey, CA: g.tlsCA}.DialOption()
	if err != nil {
		return nil, err
	}
	// --token-file, else $RBEE_TOKEN; never printed. A weak token is the queen's to refuse.
	token, _, err := auth.ReadToken(g.tokenFile)
	if err != nil {
		return nil, err
	}
	opts := append(append(rpcclient.Options(), creds,
		grpc.WithChainUnaryInterceptor(markUnanswered), grpc.WithChainStreamInterceptor(markUnansweredStream)),
		auth.Bearer(token)...)
	// Several queens (--queen A,B,C): calls go to whichever leads, and wait for one through a
	// failover (bounded by --timeout).
	addrs := []string{g.queen}
	if strings.Contains(g.queen, ",") {
		if addrs, err = validate.Addresses("--queen", g.queen); err != nil {
			return nil, usagef("%v", err)
		}
	}
	target, qopts, err := rpcclient.QueenTarget(addrs, rpcclient.QueenService)
	if err != nil {
		return nil, usagef("--queen %q: %v", g.queen, err)
	}
	conn, err := grpc.NewClient(target, append(opts, qopts...)...)
	if err != nil {
		return nil, usagef("--queen %q: %v", g.queen, err)
	}
	return &client{QueenServiceClient: rbeev1.NewQueenServiceClient(conn), conn: conn, token: token}, nil
}

// callContext bounds one call by d (a command's --timeout); d <= 0 means no bound.
func callContext(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if d <= 0 {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, d)
}

// unary makes one call to the queen within the command's --timeout and prints the answer: as JSON
// with -o json, else through table.
func unary[R proto.Message](a *app, cmd *cobra.Command, call func(context.Context, *client) (R, error), table func(R) error) error {
	cl, err := a.connect()
	if err != nil {
		return err
	}
	defer cl.Close()
	ctx, cancel := callContext(cmd.Context(), timeout(cmd))
	defer cancel()
	resp, err := call(ctx, cl)
	if err != nil {
		return err
	}
	if a.json() {
		return writeJSON(a.out, resp)
	}
	return table(resp)
}

// unanswered marks a call's error as not coming from the queen: the call got no response header,
// which the queen sends with every answer (the job id), so the queen itself was not reached (or
// not any more). Its status is the call's own, unchanged.
type unanswered struct{ err error }

func (e unanswered) Error() string              { return e.err.Error() }
func (e unanswered) Unwrap() error              { return e.err }
func (e unanswered) GRPCStatus() *status.Status { return status.Convert(e.err) }

func markUnanswered(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	var hdr metadata.MD
	err := invoker(ctx, method, req, reply, cc, append(opts, grpc.Header(&hdr))...)
	if err != nil && len(hdr) == 0 {
		return unanswered{err}
	}
	return err
}

func markUnansweredStream(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	s, err := streamer(ctx, desc, cc, method, opts...)
	if err != nil {
		return nil, unanswered{err}
	}
	return markedStream{s}, nil
}

type markedStream struct{ grpc.ClientStream }

func (s markedStream) RecvMsg(m any) error {
	err := s.ClientStream.RecvMsg(m)
	if err != nil && err != io.EOF {
		if md, _ := s.Header(); len(md) == 0 {
			return unanswered{err}
		}
	}
	return err
}
