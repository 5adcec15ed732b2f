package cli

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// fakeQueen is a QueenService that records the credentials it is called with and plays a
// scripted watch after a spawn, so the CLI's edges can be tested without real processes.
type fakeQueen struct {
	rbeev1.UnimplementedQueenServiceServer
	wantToken  string // "" accepts any caller
	afterSpawn []*rbeev1.WatchWorkersResponse
	breakWith  error // ends the watch after afterSpawn

	mu      sync.Mutex
	auth    []string
	spawned chan string // the id of each spawn
	deleted chan string
}

func (f *fakeQueen) check(ctx context.Context) error {
	md, _ := metadata.FromIncomingContext(ctx)
	got := strings.Join(md.Get("authorization"), ",")
	f.mu.Lock()
	f.auth = append(f.auth, got)
	f.mu.Unlock()
	if f.wantToken != "" && got != "Bearer "+f.wantToken {
		return status.Error(codes.Unauthenticated, "missing or wrong cluster token")
	}
	return nil
}

func (f *fakeQueen) GetStatus(ctx context.Context, _ *rbeev1.GetStatusRequest) (*rbeev1.GetStatusResponse, error) {
	if err := f.check(ctx); err != nil {
		return nil, err
	}
	return &rbeev1.GetStatusResponse{QueenId: "queen-fake", Version: "v0.0.0-test"}, nil
}

func (f *fakeQueen) SpawnWorker(ctx context.Context, req *rbeev1.SpawnWorkerRequest) (*rbeev1.SpawnWorkerResponse, error) {
	if err := f.check(ctx); err != nil {
		return nil, err
	}
	if req.GetWaitReady() {
		return nil, status.Error(codes.InvalidArgument, "the CLI must follow the watch, not wait_ready")
	}
	f.spawned <- req.GetWorkerId()
	return &rbeev1.SpawnWorkerResponse{Worker: &rbeev1.Worker{WorkerId: req.GetWorkerId(), HiveId: "h1", Model: req.GetModel(),
		Pid: 4242, Port: 9100, State: rbeev1.WorkerState_WORKER_STATE_STARTING}}, nil
}

func (f *fakeQueen) DeleteWorker(_ context.Context, req *rbeev1.DeleteWorkerRequest) (*rbeev1.DeleteWorkerResponse, error) {
	f.deleted <- req.GetWorkerId()
	return &rbeev1.DeleteWorkerResponse{Outcome: rbeev1.DeleteOutcome_DELETE_OUTCOME_EXITED}, nil
}

func (f *fakeQueen) WatchWorkers(_ *rbeev1.WatchWorkersRequest, stream rbeev1.QueenService_WatchWorkersServer) error {
	if err := f.check(stream.Context()); err != nil {
		return err
	}
	if err := stream.Send(&rbeev1.WatchWorkersResponse{Type: rbeev1.WatchEventType_WATCH_EVENT_TYPE_SYNCED}); err != nil {
		return err
	}
	select {
	case id := <-f.spawned:
		f.spawned <- id // for the test to see
		for _, ev := range f.afterSpawn {
			if ev.Worker != nil && ev.Worker.WorkerId == "" {
				ev.Worker.WorkerId = id
			}
			if err := stream.Send(ev); err != nil {
				return err
			}
		}
		if f.breakWith != nil {
			return f.breakWith
		}
	case <-stream.Context().Done():
	}
	<-stream.Context().Done()
	return nil
}

// serve runs f on a loopback port (with TLS when creds is set) until the test ends.
func serve(t *testing.T, f *fakeQueen, creds credentials.TransportCredentials) string {
	t.Helper()
	if f.spawned == nil {
		f.spawned = make(chan string, 1)
	}
	if f.deleted == nil {
		f.deleted = make(chan string, 1)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var opts []grpc.ServerOption
	if creds != nil {
		opts = append(opts, grpc.Creds(creds))
	}
	s := grpc.NewServer(opts...)
	rbeev1.RegisterQueenServiceServer(s, f)
	go func() { _ = s.Serve(l) }()
	t.Cleanup(s.Stop)
	return l.Addr().String()
}

// runCLI runs Main in process and returns stdout, stderr and the exit status.
func runCLI(args ...string) (string, string, int) {
	var out, errOut bytes.Buffer
	code := Main(args, &out, &errOut)
	return out.String(), errOut.String(), code
}

func TestToken(t *testing.T) {
	const token = "s3cret-token"
	f := &fakeQueen{wantToken: token}
	addr := serve(t, f, nil)
	file := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(file, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	wrong := filepath.Join(t.TempDir(), "wrong")
	if err := os.WriteFile(wrong, []byte("nope"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		env  string
		args []string
		code int
	}{
		{"env", token, nil, ExitOK},
		{"file", "", []string{"--token-file", file}, ExitOK},
		{"file wins over env", "nope", []string{"--token-file", file}, ExitOK},
		{"none", "", nil, ExitUnauthenticated},
		{"wrong", "", []string{"--token-file", wrong}, ExitUnauthenticated},
		{"wrong, on a stream", "nope", []string{"worker", "watch"}, ExitUnauthenticated},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("RBEE_TOKEN", tc.env)
			args := append([]string{"--queen", addr}, tc.args...)
			if len(tc.args) == 0 || tc.args[0] != "worker" {
				args = append(args, "status")
			}
			out, errOut, code := runCLI(args...)
			if code != tc.code {
				t.Fatalf("exit %d, want %d; stderr: %s", code, tc.code, errOut)
			}
			if strings.Contains(out+errOut, token) {
				t.Errorf("the token was printed: %s%s", out, errOut)
			}
		})
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.auth[0] != "Bearer "+token {
		t.Errorf("authorization metadata %q", f.auth[0])
	}
}

func TestSpawnWaitFollowsTheWatch(t *testing.T) {
	ready := &rbeev1.Worker{HiveId: "h1", Pid: 4242, Port: 9100, State: rbeev1.WorkerState_WORKER_STATE_READY}
	starting := &rbeev1.Worker{HiveId: "h1", Pid: 4242, Port: 9100, State: rbeev1.WorkerState_WORKER_STATE_STARTING}
	other := &rbeev1.Worker{WorkerId: "someone-else", State: rbeev1.WorkerState_WORKER_STATE_READY}
	ev := func(typ rbeev1.WatchEventType, w *rbeev1.Worker) *rbeev1.WatchWorkersResponse {
		return &rbeev1.WatchWorkersResponse{Type: typ, Worker: w}
	}
	const (
		added   = rbeev1.WatchEventType_WATCH_EVENT_TYPE_ADDED
		updated = rbeev1.WatchEventType_WATCH_EVENT_TYPE_UPDATED
		removed = rbeev1.WatchEventType_WATCH_EVENT_TYPE_REMOVED
		synced  = rbeev1.WatchEventType_WATCH_EVENT_TYPE_SYNCED
		reset   = rbeev1.WatchEventType_WATCH_EVENT_TYPE_RESET
	)
	for _, tc := range []struct {
		name    string
		events  []*rbeev1.WatchWorkersResponse
		breaks  error
		code    int
		deleted bool
	}{
		{"ready", []*rbeev1.WatchWorkersResponse{ev(added, starting), ev(updated, other), ev(updated, ready)}, nil, ExitOK, false},
		{"removed while starting", []*rbeev1.WatchWorkersResponse{ev(added, starting), ev(removed, starting)}, nil, ExitAborted, false},
		{"reset, then ready in the fresh snapshot", []*rbeev1.WatchWorkersResponse{ev(reset, nil), ev(added, ready), ev(synced, nil)}, nil, ExitOK, false},
		{"reset, gone from the fresh snapshot", []*rbeev1.WatchWorkersResponse{ev(added, starting), ev(reset, nil), ev(added, other), ev(synced, nil)}, nil, ExitAborted, false},
		{"never ready", []*rbeev1.WatchWorkersResponse{ev(added, starting)}, nil, ExitDeadlineExceeded, true},
		{"watch breaks", []*rbeev1.WatchWorkersResponse{ev(added, starting)}, status.Error(codes.Unavailable, "queen shutting down"), ExitUnavailable, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeQueen{afterSpawn: cloneEvents(tc.events), breakWith: tc.breaks}
			addr := serve(t, f, nil)
			out, errOut, code := runCLI("--queen", addr, "worker", "spawn", "--model", "m", "--wait", "--timeout", "1s")
			if code != tc.code {
				t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, out, errOut)
			}
			id := <-f.spawned
			if !strings.HasPrefix(id, "w-") {
				t.Errorf("the CLI should name the worker before spawning it, got %q", id)
			}
			if code == ExitOK && !strings.Contains(out, "worker "+id+" READY on hive h1, pid 4242, port 9100") {
				t.Errorf("stdout: %s", out)
			}
			select {
			case d := <-f.deleted:
				if !tc.deleted || d != id {
					t.Errorf("deleted %q", d)
				}
			default:
				if tc.deleted {
					t.Error("the worker that never got READY was not removed")
				}
			}
		})
	}
}

func cloneEvents(evs []*rbeev1.WatchWorkersResponse) []*rbeev1.WatchWorkersResponse {
	out := make([]*rbeev1.WatchWorkersResponse, len(evs))
	for i, e := range evs {
		out[i] = proto.Clone(e).(*rbeev1.WatchWorkersResponse)
	}
	return out
}

func TestTLS(t *testing.T) {
	dir := t.TempDir()
	ca, caKey := newCert(t, dir, "ca", nil, nil)
	newCert(t, dir, "server", ca, caKey)
	newCert(t, dir, "client", ca, caKey)
	newCert(t, dir, "other-ca", nil, nil)
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	serverCert, err := tls.LoadX509KeyPair(filepath.Join(dir, "server.pem"), filepath.Join(dir, "server.key"))
	if err != nil {
		t.Fatal(err)
	}
	tlsAddr := serve(t, &fakeQueen{}, credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{serverCert}}))
	mtlsAddr := serve(t, &fakeQueen{}, credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{serverCert},
		ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert}))
	p := func(name string) string { return filepath.Join(dir, name) }
	for _, tc := range []struct {
		name string
		args []string
		ok   bool
	}{
		{"tls", []string{"--queen", tlsAddr, "--tls-ca", p("ca.pem")}, true},
		{"tls, wrong ca", []string{"--queen", tlsAddr, "--tls-ca", p("other-ca.pem")}, false},
		{"plaintext to a tls queen", []string{"--queen", tlsAddr}, false},
		{"mtls", []string{"--queen", mtlsAddr, "--tls-ca", p("ca.pem"), "--tls-cert", p("client.pem"), "--tls-key", p("client.key")}, true},
		{"mtls without a client certificate", []string{"--queen", mtlsAddr, "--tls-ca", p("ca.pem")}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, errOut, code := runCLI(append(tc.args, "status", "--timeout", "5s")...)
			if tc.ok != (code == ExitOK) {
				t.Errorf("exit %d; stderr: %s", code, errOut)
			}
		})
	}
	if _, _, code := runCLI("--tls-cert", p("client.pem"), "status"); code != ExitUsage {
		t.Errorf("--tls-cert without --tls-key: exit %d, want %d", code, ExitUsage)
	}
}

// newCert writes NAME.pem and NAME.key into dir: a CA when parent is nil, else a certificate for
// 127.0.0.1 signed by parent.
func newCert(t *testing.T, dir, name string, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
	}
	signer, signerKey := tmpl, key
	if parent == nil {
		tmpl.IsCA, tmpl.BasicConstraintsValid = true, true
	} else {
		signer, signerKey = parent, parentKey
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, &key.PublicKey, signerKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	write := func(file, typ string, b []byte) {
		if err := os.WriteFile(filepath.Join(dir, file), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: b}), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(name+".pem", "CERTIFICATE", der)
	write(name+".key", "EC PRIVATE KEY", keyDER)
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

func TestVersionAndCompletion(t *testing.T) {
	out, _, code := runCLI("--version")
	if code != ExitOK || !strings.HasPrefix(out, "rbee ") {
		t.Errorf("--version: exit %d, %q", code, out)
	}
	for _, sh := range []string{"bash", "zsh"} {
		out, _, code := runCLI("completion", sh)
		if code != ExitOK || !strings.Contains(out, "rbee") {
			t.Errorf("completion %s: exit %d", sh, code)
		}
	}
	out, _, code = runCLI("--help")
	if code != ExitOK || !strings.Contains(out, exitHelp) {
		t.Errorf("--help lacks the exit status table")
	}
}
