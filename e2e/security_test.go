package e2e

import (
	"context"
	"crypto/x509"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/auth"
	"github.com/rbee-dev/rbee/internal/testpki"
)

const testToken = "e2e-cluster-token-0123456789abcdef"

// tokenFile writes the cluster token where the programs read it (never on a command line).
func tokenFile(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(p, []byte(testToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func withToken(t *testing.T, tok string) context.Context {
	return metadata.AppendToOutgoingContext(ctxT(t, 30*time.Second), "authorization", "Bearer "+tok)
}

// sleeper starts an unrelated process (not a worker) and returns its PID; it is killed at cleanup.
func sleeper(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("sleep", "300")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	return cmd.Process.Pid
}

// TestImpersonationIsRefused: a process that is not a worker tries to speak for a real worker, and
// to get an unrelated process killed. It is refused, the registry is unchanged and no process is
// signalled.
func TestImpersonationIsRefused(t *testing.T) {
	tf := tokenFile(t)
	qp, addr := startQueen(t, "--token-file", tf)
	hid := uniqueID("hi")
	cleanupWorkers(t, hid)
	hp, _ := startHive(t, addr, hid, "--token-file", tf)
	q, conn := dial(t, addr)
	if _, err := q.ListWorkers(ctxT(t, 5*time.Second), &rbeev1.ListWorkersRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("ListWorkers without a token: %v, want UNAUTHENTICATED", err)
	}
	victim, err := q.SpawnWorker(withToken(t, testToken), &rbeev1.SpawnWorkerRequest{Model: "m", WorkerId: "victim", WaitReady: true})
	if err != nil {
		t.Fatalf("spawn with the cluster token (the worker must beat with its own token): %v", err)
	}
	innocent := sleeper(t)
	beats := rbeev1.NewHeartbeatServiceClient(conn)
	claim := func(ctx context.Context, id string) error {
		st, err := beats.WorkerHeartbeat(ctx)
		if err != nil {
			return err
		}
		_ = st.Send(&rbeev1.WorkerHeartbeatRequest{Worker: &rbeev1.Worker{
			WorkerId: id, HiveId: hid, Model: "m", Device: "cpu", Pid: int32(innocent), Port: 1, State: rbeev1.WorkerState_WORKER_STATE_READY,
		}})
		_, err = st.Recv()
		return err
	}
	// No token, a guessed one, and a real worker's token used for another worker's id.
	if err := claim(ctxT(t, 10*time.Second), "victim"); status.Code(err) != codes.Unauthenticated {
		t.Errorf("heartbeat without a token: %v, want UNAUTHENTICATED", err)
	}
	if err := claim(withToken(t, "rbw1.victim.forged"), "victim"); status.Code(err) != codes.Unauthenticated {
		t.Errorf("forged worker token: %v, want UNAUTHENTICATED", err)
	}
	if err := claim(withToken(t, auth.WorkerToken(testToken, "attacker")), "victim"); status.Code(err) != codes.PermissionDenied {
		t.Errorf("another worker's id: %v, want PERMISSION_DENIED", err)
	}
	// A worker token opens nothing else.
	if _, err := q.DeleteWorker(withToken(t, auth.WorkerToken(testToken, "victim")), &rbeev1.DeleteWorkerRequest{WorkerId: "victim"}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("DeleteWorker with a worker token: %v, want PERMISSION_DENIED", err)
	}
	got, err := q.GetWorker(withToken(t, testToken), &rbeev1.GetWorkerRequest{WorkerId: "victim"})
	if err != nil || got.GetWorker().GetPid() != victim.GetWorker().GetPid() {
		t.Fatalf("victim after the attempts: %v, %v; want PID %d unchanged", got, err, victim.GetWorker().GetPid())
	}
	// A compromised worker may register its own id with any PID it likes: deleting it must still
	// not signal that process, because the hive proves identity first.
	if err := claim(withToken(t, auth.WorkerToken(testToken, "attacker")), "attacker"); err != nil {
		t.Fatalf("a worker beating under its own id: %v", err)
	}
	if _, err := q.DeleteWorker(withToken(t, testToken), &rbeev1.DeleteWorkerRequest{WorkerId: "attacker", GracePeriod: durationpbNew(0)}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("deleting a worker whose PID is an unrelated process: %v, want FAILED_PRECONDITION", err)
	}
	if !alive(innocent) {
		t.Fatal("the unrelated process was killed")
	}
	if err := unix.Kill(innocent, 0); err != nil {
		t.Fatalf("unrelated process: %v", err)
	}
	if _, err := q.DeleteWorker(withToken(t, testToken), &rbeev1.DeleteWorkerRequest{WorkerId: "victim"}); err != nil {
		t.Fatal(err)
	}
	noWorkersLeft(t, hid)
	// No log line carries a credential.
	for _, p := range []*proc{qp, hp} {
		p.mu.Lock()
		logs := p.raw.String()
		p.mu.Unlock()
		for _, secret := range []string{testToken, auth.WorkerToken(testToken, "victim"), mac(auth.WorkerToken(testToken, "attacker"))} {
			if strings.Contains(logs, secret) {
				t.Errorf("%s logged a credential", p.name)
			}
		}
	}
}

// mac is the secret part of a worker token (the worker id in it is not secret).
func mac(tok string) string { return tok[strings.LastIndexByte(tok, '.')+1:] }

// TestOpenListenNeedsToken: off loopback without a token the programs refuse to start.
func TestOpenListenNeedsToken(t *testing.T) {
	for _, bin := range []string{"queen", "hive"} {
		p := start(t, bin, "--listen", "0.0.0.0:0")
		if code := p.exitCode(10 * time.Second); code != 2 {
			t.Errorf("%s --listen 0.0.0.0:0 without a token exited %d, want 2", bin, code)
		}
	}
}

// testPKI makes a CA and one certificate for 127.0.0.1 usable as server and client, as PEM files.
func testPKI(t *testing.T) (ca, cert, key string) {
	pki := testpki.New(t)
	cert, key = pki.Issue(t, "node", []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		"127.0.0.1", "localhost")
	return pki.Path, cert, key
}

// TestMutualTLSEverywhere runs queen, hive and worker with mutual TLS and a token: the worker
// reaches READY over TLS, the CLI works with the CA and a client certificate, and a plaintext or
// certificate-less client is turned away.
func TestMutualTLSEverywhere(t *testing.T) {
	ca, cert, key := testPKI(t)
	tf := tokenFile(t)
	tlsArgs := []string{"--tls-ca", ca, "--tls-cert", cert, "--tls-key", key, "--token-file", tf}
	_, addr := startQueen(t, tlsArgs...)
	hid := uniqueID("ht")
	cleanupWorkers(t, hid)
	startHive(t, addr, hid, tlsArgs...)

	rbee := rbeeBinary(t)
	run := func(args ...string) (string, error) {
		cmd := exec.Command(rbee, append([]string{"--queen", addr, "--tls-ca", ca, "--tls-cert", cert, "--tls-key", key, "--token-file", tf}, args...)...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := run("worker", "spawn", "--model", "m", "--id", "tls1", "--wait"); err != nil || !strings.Contains(out, "READY") {
		t.Fatalf("spawn over mutual TLS: %v\n%s", err, out)
	}
	// Plaintext against a TLS queen, and TLS without a client certificate, both fail.
	plain, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if _, err := rbeev1.NewQueenServiceClient(plain).ListWorkers(withToken(t, testToken), &rbeev1.ListWorkersRequest{}); err == nil {
		t.Error("plaintext client accepted by a TLS queen")
	}
	noCert := exec.Command(rbee, "--queen", addr, "--tls-ca", ca, "--token-file", tf, "worker", "ls")
	if out, err := noCert.CombinedOutput(); err == nil {
		t.Errorf("client without a certificate accepted under mutual TLS:\n%s", out)
	}
	if out, err := run("worker", "rm", "tls1"); err != nil || !strings.Contains(out, "exited") {
		t.Fatalf("rm over mutual TLS: %v\n%s", err, out)
	}
	noWorkersLeft(t, hid)
}
