package auth_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/auth"
	"github.com/rbee-dev/rbee/internal/rpcserver"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const cluster = "0123456789abcdef-cluster-secret"

// serveAll runs every rbee service (unimplemented: a call that passes authentication answers
// UNIMPLEMENTED) behind the real server setup with the cluster token.
func serveAll(t *testing.T) *grpc.ClientConn {
	t.Helper()
	s := rpcserver.New(rpcserver.Options{Logger: zap.NewNop(), Auth: auth.NewVerifier(cluster)})
	rbeev1.RegisterQueenServiceServer(s.GRPC, rbeev1.UnimplementedQueenServiceServer{})
	rbeev1.RegisterHeartbeatServiceServer(s.GRPC, rbeev1.UnimplementedHeartbeatServiceServer{})
	rbeev1.RegisterHiveServiceServer(s.GRPC, rbeev1.UnimplementedHiveServiceServer{})
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

// call invokes a method by name with an empty request and returns its status code. Streams are
// opened and their first answer read.
func call(ctx context.Context, conn *grpc.ClientConn, method string, stream bool) codes.Code {
	if !stream {
		return status.Code(conn.Invoke(ctx, method, &rbeev1.GetWorkerRequest{}, &rbeev1.GetWorkerResponse{}))
	}
	cs, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, method)
	if err != nil {
		return status.Code(err)
	}
	_ = cs.SendMsg(&rbeev1.GetWorkerRequest{})
	_ = cs.CloseSend()
	return status.Code(cs.RecvMsg(&rbeev1.GetWorkerResponse{}))
}

// TestEveryMethodNeedsTheRightCredential calls every method of every service with no
// credentials, a wrong token, a worker's token and the cluster token.
func TestEveryMethodNeedsTheRightCredential(t *testing.T) {
	conn := serveAll(t)
	workerTok := auth.WorkerToken(cluster, "w-1")
	creds := []struct {
		name  string
		token string
	}{
		{"none", ""},
		{"wrong", "not-the-cluster-token-at-all"},
		{"forged worker", auth.WorkerToken("another-cluster-secret!!", "w-1")},
		{"worker", workerTok},
		{"cluster", cluster},
	}
	var methods []struct {
		name   string
		stream bool
	}
	for _, sd := range []grpc.ServiceDesc{rbeev1.QueenService_ServiceDesc, rbeev1.HeartbeatService_ServiceDesc, rbeev1.HiveService_ServiceDesc} {
		for _, m := range sd.Methods {
			methods = append(methods, struct {
				name   string
				stream bool
			}{"/" + sd.ServiceName + "/" + m.MethodName, false})
		}
		for _, m := range sd.Streams {
			methods = append(methods, struct {
				name   string
				stream bool
			}{"/" + sd.ServiceName + "/" + m.StreamName, true})
		}
	}
	if len(methods) != 13 {
		t.Fatalf("found %d methods; the table below assumes 13", len(methods))
	}
	for _, m := range methods {
		for _, c := range creds {
			t.Run(strings.TrimPrefix(m.name, "/rbee.v1.")+"/"+c.name, func(t *testing.T) {
				ctx := t.Context()
				if c.token != "" {
					ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.token)
				}
				got := call(ctx, conn, m.name, m.stream)
				want := codes.Unauthenticated
				switch c.name {
				case "cluster":
					want = codes.Unimplemented // through authentication, to the (empty) handler
				case "worker":
					want = codes.PermissionDenied
					if m.name == auth.WorkerHeartbeatMethod {
						want = codes.Unimplemented
					}
				}
				if got != want {
					t.Fatalf("got %v, want %v", got, want)
				}
			})
		}
	}
	// Health stays open; reflection does not.
	if _, err := healthpb.NewHealthClient(conn).Check(t.Context(), &healthpb.HealthCheckRequest{}); err != nil {
		t.Errorf("health without credentials: %v", err)
	}
	rs, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(t.Context())
	if err == nil {
		_ = rs.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}})
		_, err = rs.Recv()
	}
	if status.Code(err) != codes.Unauthenticated {
		t.Errorf("reflection without credentials: %v, want UNAUTHENTICATED", err)
	}
}

func TestWorkerTokenNamesItsWorker(t *testing.T) {
	a, b := auth.WorkerToken(cluster, "a"), auth.WorkerToken(cluster, "b")
	if a == b || !strings.Contains(a, ".a.") || strings.Contains(a, cluster) {
		t.Fatalf("tokens %q %q: want distinct, naming the worker, not containing the secret", a, b)
	}
	if auth.WorkerToken(cluster, "a") != a {
		t.Fatal("derivation is not stable (a restarted queen could not check it)")
	}
}

func TestLoadToken(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	t.Setenv(auth.EnvToken, "")
	if tok, err := auth.LoadToken(""); tok != "" || err != nil {
		t.Fatalf("no token: %q %v", tok, err)
	}
	if tok, err := auth.LoadToken(write("ok", cluster+"\n")); tok != cluster || err != nil {
		t.Fatalf("file token: %q %v", tok, err)
	}
	for name, content := range map[string]string{"short": "abc", "empty": "\n", "spaces": "0123456789 abcdef 0123"} {
		if _, err := auth.LoadToken(write(name, content)); err == nil || strings.Contains(err.Error(), content) && content != "\n" {
			t.Errorf("%s token file: %v (want an error that does not echo the token)", name, err)
		}
	}
	if _, err := auth.LoadToken(filepath.Join(dir, "missing")); err == nil {
		t.Error("missing token file accepted")
	}
	t.Setenv(auth.EnvToken, cluster)
	if tok, _ := auth.LoadToken(""); tok != cluster {
		t.Fatalf("env token: %q", tok)
	}
}

func TestCheckExposure(t *testing.T) {
	for _, tt := range []struct {
		listen, token string
		insecure, ok  bool
	}{
		{"127.0.0.1:7833", "", false, true},
		{"[::1]:7833", "", false, true},
		{"localhost:7833", "", false, true},
		{"0.0.0.0:7833", "", false, false},
		{":7833", "", false, false},
		{"10.1.2.3:7833", "", false, false},
		{"0.0.0.0:7833", cluster, false, true},
		{"0.0.0.0:7833", "", true, true},
	} {
		err := auth.CheckExposure("--listen", tt.listen, tt.token, tt.insecure)
		if (err == nil) != tt.ok {
			t.Errorf("CheckExposure(%q, token=%v, insecure=%v) = %v", tt.listen, tt.token != "", tt.insecure, err)
		}
	}
}

func TestTokenInClear(t *testing.T) {
	for _, tc := range []struct {
		addr  string
		token string
		tls   bool
		want  bool
	}{
		{"127.0.0.1:7833", "tok", false, false},
		{"127.0.0.2:7833", "tok", false, false},
		{"[::1]:7833", "tok", false, false},
		{"localhost:7833", "tok", false, false},
		{"0.0.0.0:7833", "tok", false, true},
		{"10.0.0.5:7833", "tok", false, true},
		{"queen.example:7833", "tok", false, true},
		{"10.0.0.5:7833", "tok", true, false},
		{"10.0.0.5:7833", "", false, false},
	} {
		if got := auth.TokenInClear(tc.addr, tc.token, tc.tls); got != tc.want {
			t.Errorf("TokenInClear(%q, token %t, tls %t) = %t, want %t", tc.addr, tc.token != "", tc.tls, got, tc.want)
		}
	}
}
