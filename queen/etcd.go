package main

import (
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/rbee-dev/rbee/internal/auth"
	"github.com/rbee-dev/rbee/queen/election"
)

// etcdFlags say how a queen reaches etcd and which election it joins: TLS (a client certificate
// is etcd's client-cert auth), etcd user auth, and the election's key prefix.
type etcdFlags struct {
	tlsCert, tlsKey, tlsCA string
	username, passwordFile string
	prefix                 string
}

func (f *etcdFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.tlsCert, "etcd-tls-cert", "", "with --etcd: client certificate (PEM) presented to etcd; needs --etcd-tls-key and https:// URLs")
	fs.StringVar(&f.tlsKey, "etcd-tls-key", "", "with --etcd: the client certificate's private key (PEM)")
	fs.StringVar(&f.tlsCA, "etcd-tls-ca", "", "with --etcd: CA certificates (PEM) etcd's server certificate is checked against (default: the system's)")
	fs.StringVar(&f.username, "etcd-username", "", "with --etcd: etcd user to authenticate as; needs --etcd-password-file")
	fs.StringVar(&f.passwordFile, "etcd-password-file", "", "with --etcd-username: file holding the etcd user's password (never a flag value, which ps would show)")
	fs.StringVar(&f.prefix, "etcd-prefix", election.DefaultPrefix, "with --etcd: the election's key prefix; queens under one prefix elect one leader, so several fleets can share an etcd")
}

// etcdClient is what the election needs of the flags.
type etcdClient struct {
	tls                *tls.Config
	username, password string
	prefix             string
}

// check checks the flags against the --etcd URLs (none: the flags must not be given) and loads
// the files they name.
func (f *etcdFlags) check(urls []string) (etcdClient, error) {
	given := f.given()
	if len(urls) == 0 {
		if len(given) > 0 {
			return etcdClient{}, fmt.Errorf("%s: only with --etcd", given[0])
		}
		return etcdClient{}, nil
	}
	var c etcdClient
	var err error
	if c.prefix, err = election.CheckPrefix(f.prefix); err != nil {
		return c, fmt.Errorf("--etcd-prefix: %w", err)
	}
	if (f.tlsCert == "") != (f.tlsKey == "") {
		return c, errors.New("--etcd-tls-cert and --etcd-tls-key go together: give both (a client certificate and its key) or neither")
	}
	if f.tlsCert != "" || f.tlsCA != "" {
		if !allHTTPS(urls) {
			return c, fmt.Errorf("--etcd %s: the etcd TLS flags need https:// URLs (etcd's client would send plaintext to an http:// one)", strings.Join(urls, ","))
		}
		files := auth.TLSFiles{Cert: f.tlsCert, Key: f.tlsKey, CA: f.tlsCA, Flag: "--etcd-tls"}
		if c.tls, err = files.ClientConfig(); err != nil {
			return c, err
		}
	}
	switch {
	case f.username == "" && f.passwordFile != "":
		return c, errors.New("--etcd-password-file needs --etcd-username")
	case f.username != "" && f.passwordFile == "":
		return c, errors.New("--etcd-username needs --etcd-password-file (a password is never given on the command line)")
	case f.username != "":
		b, err := os.ReadFile(f.passwordFile)
		if err != nil {
			return c, fmt.Errorf("--etcd-password-file: %w", err)
		}
		// One line; the newline an editor or echo leaves is not part of it.
		c.password = strings.TrimRight(string(b), "\r\n")
		if c.password == "" || strings.ContainsAny(c.password, "\r\n") {
			return c, fmt.Errorf("--etcd-password-file %s: want the password alone on one line", f.passwordFile)
		}
		c.username = f.username
	}
	return c, nil
}

// given lists the etcd flags set to other than their defaults.
func (f *etcdFlags) given() []string {
	var out []string
	for _, g := range []struct {
		name string
		set  bool
	}{
		{"--etcd-tls-cert", f.tlsCert != ""}, {"--etcd-tls-key", f.tlsKey != ""}, {"--etcd-tls-ca", f.tlsCA != ""},
		{"--etcd-username", f.username != ""}, {"--etcd-password-file", f.passwordFile != ""},
		{"--etcd-prefix", f.prefix != election.DefaultPrefix},
	} {
		if g.set {
			out = append(out, g.name)
		}
	}
	return out
}

// allHTTPS reports whether every etcd URL is https://.
func allHTTPS(urls []string) bool {
	for _, u := range urls {
		if !strings.HasPrefix(u, "https://") {
			return false
		}
	}
	return true
}
