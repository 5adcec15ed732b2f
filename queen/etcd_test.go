package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// selfSigned writes a self-signed certificate and its key as PEM files in dir.
func selfSigned(t *testing.T, dir string) (cert, key string) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "queen"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	cert, key = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(key, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	return cert, key
}

// The etcd flags load what they name, and every bad input is refused with a message naming the
// flag and what to give instead.
func TestEtcdFlags(t *testing.T) {
	dir := t.TempDir()
	cert, key := selfSigned(t, dir)
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	pw, pwEmpty, pwTwo, notPEM := write("pw", "s3cret\n"), write("pw-empty", "\n"), write("pw-two", "a\nb\n"), write("junk.pem", "not a certificate")
	missing := filepath.Join(dir, "missing.pem")
	https, http := []string{"https://10.0.0.9:2379", "https://10.0.0.10:2379"}, []string{"http://10.0.0.9:2379"}
	def := func() etcdFlags { return etcdFlags{prefix: "/rbee/queen/leader/"} }

	for _, tc := range []struct {
		name    string
		urls    []string
		set     func(*etcdFlags)
		wantErr string // "" for success
		check   func(*testing.T, etcdClient)
	}{
		{"defaults change nothing", http, func(*etcdFlags) {}, "", func(t *testing.T, c etcdClient) {
			if c.tls != nil || c.username != "" || c.prefix != "/rbee/queen/leader/" {
				t.Errorf("defaults gave %+v, want no TLS, no user, the old prefix", c)
			}
		}},
		{"client cert, key and CA", https, func(f *etcdFlags) { f.tlsCert, f.tlsKey, f.tlsCA = cert, key, cert }, "", func(t *testing.T, c etcdClient) {
			if c.tls == nil || len(c.tls.Certificates) != 1 || c.tls.RootCAs == nil {
				t.Errorf("TLS %+v: want the client certificate and the CA pool", c.tls)
			}
		}},
		{"CA only (server-verified TLS)", https, func(f *etcdFlags) { f.tlsCA = cert }, "", nil},
		{"user and password file", http, func(f *etcdFlags) { f.username, f.passwordFile = "queen", pw }, "", func(t *testing.T, c etcdClient) {
			if c.username != "queen" || c.password != "s3cret" {
				t.Errorf("user %q password %q, want queen and the file's line without its newline", c.username, c.password)
			}
		}},
		{"prefix gets its slash", http, func(f *etcdFlags) { f.prefix = "/rbee/prod" }, "", func(t *testing.T, c etcdClient) {
			if c.prefix != "/rbee/prod/" {
				t.Errorf("prefix %q, want /rbee/prod/", c.prefix)
			}
		}},
		{"cert without key", https, func(f *etcdFlags) { f.tlsCert = cert }, "--etcd-tls-cert and --etcd-tls-key go together", nil},
		{"key without cert", https, func(f *etcdFlags) { f.tlsKey = key }, "--etcd-tls-cert and --etcd-tls-key go together", nil},
		{"unreadable cert", https, func(f *etcdFlags) { f.tlsCert, f.tlsKey = missing, key }, "missing.pem: no such file", nil},
		{"key not matching", https, func(f *etcdFlags) { f.tlsCert, f.tlsKey = cert, notPEM }, "--etcd-tls-key", nil},
		{"unreadable CA", https, func(f *etcdFlags) { f.tlsCA = missing }, "--etcd-tls-ca: open", nil},
		{"CA not PEM", https, func(f *etcdFlags) { f.tlsCA = notPEM }, "no PEM certificate in it", nil},
		{"TLS with http URLs", http, func(f *etcdFlags) { f.tlsCA = cert }, "need https:// URLs", nil},
		{"user without password file", http, func(f *etcdFlags) { f.username = "queen" }, "--etcd-username needs --etcd-password-file", nil},
		{"password file without user", http, func(f *etcdFlags) { f.passwordFile = pw }, "--etcd-password-file needs --etcd-username", nil},
		{"unreadable password file", http, func(f *etcdFlags) { f.username, f.passwordFile = "queen", missing }, "--etcd-password-file: open", nil},
		{"empty password file", http, func(f *etcdFlags) { f.username, f.passwordFile = "queen", pwEmpty }, "want the password alone on one line", nil},
		{"two lines in the password file", http, func(f *etcdFlags) { f.username, f.passwordFile = "queen", pwTwo }, "want the password alone on one line", nil},
		{"relative prefix", http, func(f *etcdFlags) { f.prefix = "rbee/prod" }, "--etcd-prefix: key prefix \"rbee/prod\": want an absolute", nil},
		{"prefix with an empty segment", http, func(f *etcdFlags) { f.prefix = "/rbee//prod" }, "--etcd-prefix: key prefix \"/rbee//prod\": an empty segment", nil},
		{"etcd flags without --etcd", nil, func(f *etcdFlags) { f.tlsCA = cert }, "--etcd-tls-ca: only with --etcd", nil},
		{"prefix without --etcd", nil, func(f *etcdFlags) { f.prefix = "/x/" }, "--etcd-prefix: only with --etcd", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := def()
			tc.set(&f)
			c, err := f.check(tc.urls)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("check: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("check: %v; want an error containing %q", err, tc.wantErr)
			}
			if tc.check != nil {
				tc.check(t, c)
			}
			if err != nil && strings.Contains(err.Error(), "s3cret") {
				t.Errorf("the error shows the password: %v", err)
			}
		})
	}
}
