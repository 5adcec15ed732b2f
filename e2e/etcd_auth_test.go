package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Queens reach an etcd that serves TLS only, admits only clients with a certificate from its CA,
// and has user auth on: given --etcd-tls-cert/-key/-ca and --etcd-username with
// --etcd-password-file, they elect through it; two fleets on the one etcd, told apart by
// --etcd-prefix, each elect their own leader; a queen with a wrong password says so and stops.
func TestQueensOnASecuredEtcd(t *testing.T) {
	bin := etcdBinary(t)
	ca, cert, key := testPKI(t)
	client := fmt.Sprintf("https://127.0.0.1:%d", freePort(t))
	peer := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	p := startCmd(t, "etcd", exec.Command(bin, "--name", "e2e", "--data-dir", filepath.Join(t.TempDir(), "etcd"), "--logger", "zap",
		"--listen-client-urls", client, "--advertise-client-urls", client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", "e2e="+peer,
		"--cert-file", cert, "--key-file", key, "--client-cert-auth", "--trusted-ca-file", ca))
	t.Cleanup(func() { _ = p.cmd.Process.Signal(syscall.SIGCONT) })
	p.await("etcd serving TLS", func(m map[string]any) bool {
		msg, _ := m["msg"].(string)
		return strings.Contains(msg, "serving client traffic securely")
	})

	// User auth on: a root user with a password, as an operator would set it up.
	pool := x509.NewCertPool()
	pem, err := os.ReadFile(ca)
	if err != nil || !pool.AppendCertsFromPEM(pem) {
		t.Fatalf("reading the test CA: %v", err)
	}
	pair, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		t.Fatal(err)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{client}, DialTimeout: 10 * time.Second, Logger: zap.NewNop(),
		TLS: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{pair}}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	if _, err := cli.RoleAdd(ctx, "root"); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.UserAdd(ctx, "root", "s3cret-pw"); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.UserGrantRole(ctx, "root", "root"); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.AuthEnable(ctx); err != nil {
		t.Fatal(err)
	}
	cli.Close()
	pw := filepath.Join(t.TempDir(), "etcd-password")
	if err := os.WriteFile(pw, []byte("s3cret-pw\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(t.TempDir(), "bad-password")
	if err := os.WriteFile(bad, []byte("n0t-the-pw-9731\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	// The default TTL: with a password, etcd's client authenticates again for every stream it
	// opens (a lease renewal among them), which on a loaded machine can take longer than the 1.5 s
	// a 2 s TTL leaves.
	secured := func(prefix, pwFile string) []string {
		return []string{"--election-ttl", "5s", "--etcd-tls-cert", cert, "--etcd-tls-key", key, "--etcd-tls-ca", ca,
			"--etcd-username", "root", "--etcd-password-file", pwFile, "--etcd-prefix", prefix}
	}
	a1 := startHAQueen(t, client, secured("/rbee/fleet-a", pw)...)
	a1.awaitAction("leader_elected")
	a2 := startHAQueen(t, client, secured("/rbee/fleet-a", pw)...)
	a2.await("a1 observed as fleet a's leader", func(m map[string]any) bool {
		return m["action"] == "leader_observed" && m["leader"] == a1.addr
	})
	b1 := startHAQueen(t, client, secured("/rbee/fleet-b", pw)...)
	b1.awaitAction("leader_elected")
	// One leader per fleet: a2 may lead only once a1 stopped (a loaded machine can make a1 miss
	// its lease renewals), never beside it.
	if a2.countAction("leader_elected") != 0 {
		up := logTime(t, a2.awaitAction("leader_elected"))
		if a1.countAction("leader_stepped_down") == 0 || !logTime(t, a1.awaitAction("leader_stepped_down")).Before(up) {
			t.Error("a2 leads fleet a beside a1")
		}
	}

	// It exits by itself; CombinedOutput keeps every line of its output.
	qctx, qcancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer qcancel()
	out, err := exec.CommandContext(qctx, filepath.Join(binDir, "queen"), append([]string{"--http-listen", "off",
		"--listen", fmt.Sprintf("127.0.0.1:%d", freePort(t)), "--etcd", client},
		secured("/rbee/fleet-a", bad)...)...).CombinedOutput()
	log := string(out)
	if err == nil {
		t.Error("a queen with a wrong etcd password exited 0")
	}
	if !strings.Contains(log, "authentication failed") {
		t.Errorf("a queen with a wrong etcd password did not say why it stopped (%v):\n%s", err, log)
	}
	if strings.Contains(log, "n0t-the-pw-9731") || strings.Contains(log, "s3cret-pw") {
		t.Error("the queen's log shows an etcd password")
	}
	t.Logf("a queen with a wrong etcd password: %s", strings.TrimSpace(log))
}
