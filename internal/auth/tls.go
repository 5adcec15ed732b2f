package auth

import (
	"cmp"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
)

// Environment variables through which the hive hands its TLS files to the workers it starts.
const (
	EnvTLSCA   = "RBEE_TLS_CA"
	EnvTLSCert = "RBEE_TLS_CERT"
	EnvTLSKey  = "RBEE_TLS_KEY"
)

// TLSFiles names the PEM files of --tls-cert, --tls-key and --tls-ca.
type TLSFiles struct {
	Cert, Key, CA string
	// Flag is what errors call the flags: their common prefix, "--tls" when empty
	// ("--etcd-tls" names --etcd-tls-cert, --etcd-tls-key and --etcd-tls-ca).
	Flag string
}

func (f TLSFiles) flag() string { return cmp.Or(f.Flag, "--tls") }

// Enabled reports whether any TLS file is given.
func (f TLSFiles) Enabled() bool { return f.Cert != "" || f.Key != "" || f.CA != "" }

func (f TLSFiles) pool() (*x509.CertPool, error) {
	b, err := os.ReadFile(f.CA)
	if err != nil {
		return nil, fmt.Errorf("%s-ca: %w", f.flag(), err)
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("%s-ca %s: no PEM certificate in it", f.flag(), f.CA)
	}
	return p, nil
}

func (f TLSFiles) pair() ([]tls.Certificate, error) {
	if f.Cert == "" && f.Key == "" {
		return nil, nil
	}
	if f.Cert == "" || f.Key == "" {
		return nil, fmt.Errorf("%[1]s-cert and %[1]s-key go together", f.flag())
	}
	c, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return nil, fmt.Errorf("%[1]s-cert %[2]s, %[1]s-key %[3]s: %[4]w", f.flag(), f.Cert, f.Key, err)
	}
	return []tls.Certificate{c}, nil
}

// ServerOption returns the server's transport credentials: TLS with the certificate, and mutual TLS
// (client certificates signed by the CA required) when a CA is given. None without TLS files.
func (f TLSFiles) ServerOption() (grpc.ServerOption, error) {
	if !f.Enabled() {
		return nil, nil
	}
	certs, err := f.pair()
	if err != nil {
		return nil, err
	}
	if certs == nil {
		return nil, errors.New("a server needs --tls-cert and --tls-key for TLS")
	}
	cfg := &tls.Config{Certificates: certs, MinVersion: tls.VersionTLS12}
	if f.CA != "" {
		if cfg.ClientCAs, err = f.pool(); err != nil {
			return nil, err
		}
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return grpc.Creds(credentials.NewTLS(cfg)), nil
}

// DialOption returns a client's transport credentials: TLS verifying the server against the CA
// (the system roots without one), presenting the certificate when given; plaintext without TLS
// files.
func (f TLSFiles) DialOption() (grpc.DialOption, error) {
	if !f.Enabled() {
		return grpc.WithTransportCredentials(insecure.NewCredentials()), nil
	}
	cfg, err := f.ClientConfig()
	if err != nil {
		return nil, err
	}
	return grpc.WithTransportCredentials(credentials.NewTLS(cfg)), nil
}

// ClientConfig is a client's TLS configuration: the server verified against the CA (the system
// roots without one), the certificate presented when given.
func (f TLSFiles) ClientConfig() (*tls.Config, error) {
	certs, err := f.pair()
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{Certificates: certs, MinVersion: tls.VersionTLS12}
	if f.CA != "" {
		if cfg.RootCAs, err = f.pool(); err != nil {
			return nil, err
		}
	}
	return cfg, nil
}

// Env returns the TLS files as the environment a worker reads them from.
func (f TLSFiles) Env() []string {
	var env []string
	for k, v := range map[string]string{EnvTLSCA: f.CA, EnvTLSCert: f.Cert, EnvTLSKey: f.Key} {
		if v != "" {
			env = append(env, k+"="+v)
		}
	}
	return env
}

// TLSFromEnv reads the files a hive handed a worker.
func TLSFromEnv() TLSFiles {
	return TLSFiles{CA: os.Getenv(EnvTLSCA), Cert: os.Getenv(EnvTLSCert), Key: os.Getenv(EnvTLSKey)}
}
