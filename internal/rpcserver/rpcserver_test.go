package rpcserver

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/rbee-dev/rbee/internal/auth"
	"github.com/rbee-dev/rbee/internal/jobid"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// testService has one method whose behaviour the test chooses.
func testService(h func(ctx context.Context) (any, error)) *grpc.ServiceDesc {
	return &grpc.ServiceDesc{
		ServiceName: "test.Svc",
		HandlerType: (*any)(nil),
		Methods: []grpc.MethodDesc{{MethodName: "Call", Handler: func(_ any, ctx context.Context, dec func(any) error, ic grpc.UnaryServerInterceptor) (any, error) {
			in := new(emptypb.Empty)
			if err := dec(in); err != nil {
				return nil, err
			}
			handler := func(ctx context.Context, _ any) (any, error) { return h(ctx) }
			return ic(ctx, in, &grpc.UnaryServerInfo{FullMethod: "/test.Svc/Call"}, handler)
		}}},
	}
}

func serve(t *testing.T, log *zap.Logger, h func(ctx context.Context) (any, error)) *grpc.ClientConn {
	t.Helper()
	s := New(Options{Logger: log})
	s.GRPC.RegisterService(testService(h), struct{}{})
	lis := bufconn.Listen(1 << 16)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Serve(ctx, lis, nil) }()
	conn, err := grpc.NewClient("passthrough:///buf",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(); cancel(); <-done })
	return conn
}

func TestPanicIsInternalWithoutDetail(t *testing.T) {
	core, logs := observer.New(zap.DebugLevel)
	conn := serve(t, zap.New(core), func(context.Context) (any, error) {
		panic("boom: secret-token-123")
	})
	var hdr metadata.MD
	err := conn.Invoke(t.Context(), "/test.Svc/Call", &emptypb.Empty{}, &emptypb.Empty{}, grpc.Header(&hdr))
	st := status.Convert(err)
	if st.Code() != codes.Internal || st.Message() != "internal error" {
		t.Fatalf("panic answered %v, want INTERNAL \"internal error\"", err)
	}
	if len(hdr.Get(jobid.MetadataKey)) != 1 {
		t.Errorf("no job id header on a failed call: %v", hdr)
	}
	// The server keeps the whole story, stack included.
	found := false
	for _, e := range logs.FilterMessage("panic in handler").All() {
		ctx := e.ContextMap()
		if strings.Contains(ctx["stack"].(string), "goroutine") && ctx["job_id"] != nil {
			found = true
		}
	}
	if !found {
		t.Fatalf("no panic log line with stack and job id; logs: %v", logs.All())
	}
}

func TestJobIDTakenFromCallerAndReturned(t *testing.T) {
	seen := make(chan string, 1)
	conn := serve(t, zap.NewNop(), func(ctx context.Context) (any, error) {
		seen <- jobid.FromContext(ctx)
		return &emptypb.Empty{}, nil
	})
	for _, tt := range []struct{ sent, want string }{
		{"job-mine-1", "job-mine-1"},
		{"bad id with spaces", ""}, // replaced by a made one
	} {
		var hdr metadata.MD
		ctx := metadata.AppendToOutgoingContext(t.Context(), jobid.MetadataKey, tt.sent)
		if err := conn.Invoke(ctx, "/test.Svc/Call", &emptypb.Empty{}, &emptypb.Empty{}, grpc.Header(&hdr)); err != nil {
			t.Fatal(err)
		}
		got := <-seen
		if h := hdr.Get(jobid.MetadataKey); len(h) != 1 || h[0] != got {
			t.Fatalf("header %v, handler saw %q", h, got)
		}
		if tt.want != "" && got != tt.want {
			t.Errorf("sent %q, handler saw %q", tt.sent, got)
		}
		if tt.want == "" && (got == tt.sent || !strings.HasPrefix(got, "job-")) {
			t.Errorf("sent invalid %q, handler saw %q; want a made id", tt.sent, got)
		}
	}
}

func TestShutdownReportsNotServingDrainsAndStops(t *testing.T) {
	s := New(Options{Logger: zap.NewNop()})
	lis := bufconn.Listen(1 << 16)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	drained := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, lis, func() { close(drained) }) }()
	conn, err := grpc.NewClient("passthrough:///buf",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	wctx, stopWatch := context.WithCancel(t.Context())
	defer stopWatch()
	w, err := healthpb.NewHealthClient(conn).Watch(wctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := w.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health before shutdown = %v, %v", r, err)
	}
	cancel()
	if r, err := w.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("health during shutdown = %v, %v; want NOT_SERVING first", r, err)
	}
	stopWatch() // a prober that saw NOT_SERVING goes elsewhere; the graceful stop then needs no timeout
	select {
	case <-drained:
	case <-time.After(10 * time.Second):
		t.Fatal("drain was not called")
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return")
	}
}

// TestShutdownCutsHeldConnections: connections held in their handshake (half a preface) or past
// it without ever answering do not keep Serve from returning: those still in the handshake are
// closed at once, the rest at the shutdown timeout.
func TestShutdownCutsHeldConnections(t *testing.T) {
	for _, tc := range []struct {
		name, send string
		within     time.Duration
	}{
		{"half a preface", "PRI * HTTP/2.0\r\n", 2 * time.Second},
		// The whole preface and an empty SETTINGS frame: the handshake is done, then silence.
		{"preface and settings", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00", 500*time.Millisecond + 2*time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := New(Options{Logger: zap.NewNop(), ShutdownTimeout: 500 * time.Millisecond})
			lis, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := make(chan error, 1)
			go func() { done <- s.Serve(ctx, lis, nil) }()
			for range 20 {
				c, err := net.Dial("tcp", lis.Addr().String())
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				if _, err := c.Write([]byte(tc.send)); err != nil {
					t.Fatal(err)
				}
				// The server's SETTINGS frame says it has taken the connection in.
				_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
				if _, err := io.ReadFull(c, make([]byte, 9)); err != nil {
					t.Fatalf("no SETTINGS from the server: %v", err)
				}
			}
			begin := time.Now()
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("Serve = %v", err)
				}
			case <-time.After(15 * time.Second):
				t.Fatal("Serve did not return within 15s of shutdown with held connections")
			}
			if took := time.Since(begin); took > tc.within {
				t.Errorf("Serve returned %v after shutdown began, want within %v", took, tc.within)
			}
		})
	}
}

// The Unmetered streams (the heartbeats) skip the per-message middleware but keep what every call
// gets: credentials checked, a panic answered INTERNAL and logged with its job id, and a log line
// at the end with the code and the job id.
func TestUnmeteredStreamsKeepAuthRecoveryAndLogging(t *testing.T) {
	core, logs := observer.New(zap.DebugLevel)
	const token = "cluster-token-for-test"
	s := New(Options{Logger: zap.New(core), Auth: auth.NewVerifier(token), Unmetered: []string{"/test.Svc/Beat"}})
	var panicNext atomic.Bool
	s.GRPC.RegisterService(&grpc.ServiceDesc{
		ServiceName: "test.Svc",
		HandlerType: (*any)(nil),
		Streams: []grpc.StreamDesc{{StreamName: "Beat", ClientStreams: true, ServerStreams: true,
			Handler: func(_ any, ss grpc.ServerStream) error {
				if jobid.FromContext(ss.Context()) == "" {
					return status.Error(codes.FailedPrecondition, "no job id on the stream's context")
				}
				if panicNext.Load() {
					panic("boom")
				}
				in := new(emptypb.Empty)
				if err := ss.RecvMsg(in); err != nil {
					return err
				}
				return ss.SendMsg(in)
			}}},
	}, struct{}{})
	lis := bufconn.Listen(1 << 16)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Serve(ctx, lis, nil) }()
	conn, err := grpc.NewClient("passthrough:///buf",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(); cancel(); <-done })
	desc := &grpc.StreamDesc{ClientStreams: true, ServerStreams: true}
	call := func(ctx context.Context) error {
		st, err := conn.NewStream(ctx, desc, "/test.Svc/Beat")
		if err != nil {
			return err
		}
		if err := st.SendMsg(&emptypb.Empty{}); err != nil && !errors.Is(err, io.EOF) {
			return err
		}
		if err := st.RecvMsg(&emptypb.Empty{}); err != nil { // io.EOF from SendMsg: the status comes here
			return err
		}
		// The end of the stream: its status is written after the handler and the interceptor that
		// logs "finished call" have returned, so the line checked below is in by then.
		if err := st.RecvMsg(&emptypb.Empty{}); !errors.Is(err, io.EOF) {
			return fmt.Errorf("after the answer: %v, want the end of the stream", err)
		}
		return nil
	}
	if err := call(t.Context()); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("without the token: %v, want UNAUTHENTICATED", err)
	}
	authed := metadata.AppendToOutgoingContext(t.Context(), "authorization", "Bearer "+token)
	if err := call(authed); err != nil {
		t.Fatalf("with the token: %v", err)
	}
	panicNext.Store(true)
	if st := status.Convert(call(authed)); st.Code() != codes.Internal || st.Message() != "internal error" {
		t.Fatalf("a panic answered %v, want INTERNAL \"internal error\"", st)
	}
	if n := len(logs.FilterMessage("panic in handler").FilterFieldKey("job_id").All()); n != 1 {
		t.Errorf("%d panic log lines with a job id, want 1", n)
	}
	ends := logs.FilterMessage("finished call").FilterField(zap.String("grpc.method", "/test.Svc/Beat")).FilterFieldKey("job_id").All()
	codesSeen := map[string]bool{}
	for _, e := range ends {
		codesSeen[e.ContextMap()["grpc.code"].(string)] = true
	}
	if !codesSeen["Unauthenticated"] || !codesSeen["OK"] || !codesSeen["Internal"] {
		t.Errorf("finished-call lines with job ids for codes %v, want Unauthenticated, OK and Internal", codesSeen)
	}
}

// TestShutdownLetsCallsOnOpenConnectionsFinish: a connection past its handshake is not taken for
// one still in it: a call in progress when shutdown cuts the handshaking connections finishes and
// gets its answer, over plain TCP and over TLS (where the server cannot read the HTTP/2 preface on
// the connection it accepted).
func TestShutdownLetsCallsOnOpenConnectionsFinish(t *testing.T) {
	cert := selfSigned(t)
	for _, tc := range []struct {
		name   string
		server []grpc.ServerOption
		client grpc.DialOption
	}{
		{"plain", nil, grpc.WithTransportCredentials(insecure.NewCredentials())},
		{"tls", []grpc.ServerOption{grpc.Creds(credentials.NewServerTLSFromCert(&cert))},
			grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: certPool(t, cert), ServerName: "localhost"}))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := New(Options{Logger: zap.NewNop(), ShutdownTimeout: 20 * time.Second, ServerOptions: tc.server})
			cut := make(chan struct{})
			s.handshakesCut = func() { close(cut) }
			started := make(chan struct{})
			s.GRPC.RegisterService(testService(func(context.Context) (any, error) {
				close(started)
				<-cut // answer only once shutdown has cut the connections it found in their handshake
				return &emptypb.Empty{}, nil
			}), struct{}{})
			lis, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := make(chan error, 1)
			go func() { done <- s.Serve(ctx, lis, nil) }()
			conn, err := grpc.NewClient(lis.Addr().String(), tc.client)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			callErr := make(chan error, 1)
			go func() {
				callErr <- conn.Invoke(context.Background(), "/test.Svc/Call", &emptypb.Empty{}, &emptypb.Empty{})
			}()
			<-started
			cancel()
			select {
			case err := <-callErr:
				if err != nil {
					t.Fatalf("a call in progress at shutdown failed: %v; want its answer", err)
				}
			case <-time.After(15 * time.Second):
				t.Fatal("the call in progress got no answer")
			}
			if err := <-done; err != nil {
				t.Fatalf("Serve = %v", err)
			}
		})
	}
}

// selfSigned makes a certificate for localhost.
func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "localhost"},
		DNSNames: []string{"localhost"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func certPool(t *testing.T, c tls.Certificate) *x509.CertPool {
	t.Helper()
	leaf, err := x509.ParseCertificate(c.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	p := x509.NewCertPool()
	p.AddCert(leaf)
	return p
}

// TestUnaryCallsLogTheirEnd checks the "finished call" line of unary calls: its level follows the
// code (a logger at warn level gets the failures only), it carries the job id, and health checks
// write none.
func TestUnaryCallsLogTheirEnd(t *testing.T) {
	core, logs := observer.New(zap.WarnLevel)
	fail := false
	conn := serve(t, zap.New(core), func(context.Context) (any, error) {
		if fail {
			return nil, status.Error(codes.Internal, "broken")
		}
		return &emptypb.Empty{}, nil
	})
	if err := conn.Invoke(t.Context(), "/test.Svc/Call", &emptypb.Empty{}, &emptypb.Empty{}); err != nil {
		t.Fatal(err)
	}
	fail = true
	if err := conn.Invoke(t.Context(), "/test.Svc/Call", &emptypb.Empty{}, &emptypb.Empty{}); status.Code(err) != codes.Internal {
		t.Fatalf("failing call: %v", err)
	}
	if _, err := healthpb.NewHealthClient(conn).Check(t.Context(), &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	ends := logs.FilterMessage("finished call").All()
	if len(ends) != 1 {
		t.Fatalf("%d finished-call lines at warn level, want 1 (the INTERNAL call's): %v", len(ends), logs.All())
	}
	f := ends[0].ContextMap()
	if ends[0].Level != zap.ErrorLevel || f["grpc.method"] != "/test.Svc/Call" || f["grpc.code"] != "Internal" ||
		f["job_id"] == nil || f["peer.address"] == nil || f["error"] == nil {
		t.Fatalf("finished-call line %v %v", ends[0].Level, f)
	}

	// At info level every call but the health check has its line.
	core, logs = observer.New(zap.InfoLevel)
	fail = false
	conn = serve(t, zap.New(core), func(context.Context) (any, error) { return &emptypb.Empty{}, nil })
	for range 2 {
		if err := conn.Invoke(t.Context(), "/test.Svc/Call", &emptypb.Empty{}, &emptypb.Empty{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := healthpb.NewHealthClient(conn).Check(t.Context(), &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	if n := logs.FilterMessage("finished call").FilterField(zap.String("grpc.code", "OK")).Len(); n != 2 {
		t.Fatalf("%d finished-call lines for 2 calls and a health check, want 2: %v", n, logs.All())
	}
}
