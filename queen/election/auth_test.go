package election

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/rbee-dev/rbee/internal/testpki"
)

// pki is a CA with a server certificate for 127.0.0.1 and a client certificate, as PEM files.
type pki struct {
	ca, serverCert, serverKey, clientCert, clientKey string
	pool                                             *x509.CertPool
}

func newPKI(t *testing.T) *pki {
	t.Helper()
	ca := testpki.New(t)
	p := &pki{ca: ca.Path, pool: ca.Pool}
	p.serverCert, p.serverKey = ca.Issue(t, "etcd", []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, "127.0.0.1")
	p.clientCert, p.clientKey = ca.Issue(t, "queen", []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth})
	return p
}

// clientTLS is what a queen given --etcd-tls-cert, --etcd-tls-key and --etcd-tls-ca uses.
func (p *pki) clientTLS(t *testing.T, withCert bool) *tls.Config {
	t.Helper()
	c := &tls.Config{RootCAs: p.pool, MinVersion: tls.VersionTLS12}
	if withCert {
		pair, err := tls.LoadX509KeyPair(p.clientCert, p.clientKey)
		if err != nil {
			t.Fatal(err)
		}
		c.Certificates = []tls.Certificate{pair}
	}
	return c
}

// An etcd that serves TLS only and admits only clients with a certificate from its CA: queens with
// one elect their leaders through it, and two elections under different prefixes on the one etcd
// each elect their own leader at the same time, even with one prefix inside the other, while a
// second candidate under a prefix stays a standby that sees the first as leader.
func TestTLSClientCertAndElectionsByPrefix(t *testing.T) {
	p := newPKI(t)
	e := startEtcdWith(t, "https", p.clientTLS(t, true), "--cert-file", p.serverCert, "--key-file", p.serverKey,
		"--client-cert-auth", "--trusted-ca-file", p.ca)

	// The server really requires the client certificate.
	bare, err := clientv3.New(clientv3.Config{Endpoints: []string{e.url}, DialTimeout: 2 * time.Second, TLS: p.clientTLS(t, false),
		Logger: zap.NewNop()})
	if err == nil {
		ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
		_, err = bare.Get(ctx, "probe")
		cancel()
		bare.Close()
	}
	if err == nil {
		t.Fatal("etcd answered a client without a certificate; the test's etcd does not enforce client-cert auth")
	}

	cand := func(name, prefix string) *candidate {
		return runCandidateWith(t, Config{Endpoints: []string{e.url}, Name: name, TTL: ttl, Prefix: prefix, TLS: p.clientTLS(t, true)})
	}
	// b's keys lie under a's prefix as a string, and are older: a must still find its own.
	b1 := cand("b1:1", "/rbee/fleet/b")
	within(t, b1.terms, 10*time.Second, "term for b1 (prefix /rbee/fleet/b)")
	a1 := cand("a1:1", "/rbee/fleet")
	within(t, a1.terms, 10*time.Second, "term for a1 (prefix /rbee/fleet) while b1 leads /rbee/fleet/b")
	a2 := cand("a2:1", "/rbee/fleet/")
	select {
	case <-a2.terms:
		t.Fatal("a2 leads /rbee/fleet while a1 does")
	case <-time.After(ttl): // the span over which nothing may happen
	}
	for c, want := range map[*candidate]string{a1: "a1:1", a2: "a1:1", b1: "b1:1"} {
		if got := c.e.Leader(); got != want {
			t.Errorf("%s sees leader %q, want %q", c.e.cfg.Name, got, want)
		}
	}
	// A leader's key is where the election's prefix says.
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{e.url}, DialTimeout: 5 * time.Second, TLS: p.clientTLS(t, true)})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	for prefix, n := range map[string]int64{"/rbee/fleet//": 2, "/rbee/fleet/b//": 1} {
		r, err := cli.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			t.Fatal(err)
		}
		if r.Count != n {
			t.Errorf("%d candidates' keys under %s, want %d", r.Count, prefix, n)
		}
	}
}

// etcd's user auth: a queen with the user's password leads; one with a wrong password never does.
func TestPasswordAuth(t *testing.T) {
	e := startEtcd(t)
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{e.url}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	for _, step := range []func() error{
		func() error { _, err := cli.RoleAdd(ctx, "root"); return err },
		func() error { _, err := cli.UserAdd(ctx, "root", "s3cret-pw"); return err },
		func() error { _, err := cli.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := cli.AuthEnable(ctx); return err },
	} {
		if err := step(); err != nil {
			t.Fatalf("enabling etcd auth: %v", err)
		}
	}
	cli.Close()

	good := runCandidateWith(t, Config{Endpoints: []string{e.url}, Name: "good:1", TTL: ttl, Username: "root", Password: "s3cret-pw"})
	within(t, good.terms, 10*time.Second, "term for the candidate with the password")
	good.stop()

	bad, err := New(Config{Endpoints: []string{e.url}, Name: "bad:1", TTL: ttl, Username: "root", Password: "wrong"})
	if err != nil {
		t.Logf("a wrong password fails at once: %v", err)
		return
	}
	defer bad.Close()
	rctx, stop := context.WithTimeout(t.Context(), 2*ttl)
	defer stop()
	_ = bad.Run(rctx, func(context.Context, *Term) { t.Error("a candidate with a wrong password leads") })
}

func TestCheckPrefix(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{DefaultPrefix, DefaultPrefix},
		{"/rbee/prod", "/rbee/prod/"},
		{"/", "/"},
		{"rbee/prod", ""},
		{"", ""},
		{"/rbee//prod/", ""},
		{"/rbee/pr od/", ""},
		{"/rbee/\x00/", ""},
	} {
		got, err := CheckPrefix(tc.in)
		if got != tc.want || (err == nil) != (tc.want != "") {
			t.Errorf("CheckPrefix(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
}
