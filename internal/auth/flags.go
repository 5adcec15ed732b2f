package auth

import (
	"flag"
	"path/filepath"

	"google.golang.org/grpc"
)

// Flags are the credential flags shared by the queen and the hive.
type Flags struct {
	TokenFile string
	TLS       TLSFiles
	Insecure  bool
}

// Register adds --token-file, --tls-cert, --tls-key, --tls-ca and --insecure to fs.
func (f *Flags) Register(fs *flag.FlagSet) {
	fs.StringVar(&f.TokenFile, "token-file", "", "file holding the cluster token (else $"+EnvToken+"); every call but health checks must carry it")
	fs.StringVar(&f.TLS.Cert, "tls-cert", "", "PEM certificate for TLS (served, and presented to peers)")
	fs.StringVar(&f.TLS.Key, "tls-key", "", "PEM private key of --tls-cert")
	fs.StringVar(&f.TLS.CA, "tls-ca", "", "PEM CA that peers' certificates must chain to (mutual TLS)")
	fs.BoolVar(&f.Insecure, "insecure", false, "allow listening beyond loopback without a cluster token")
}

// Material is what the flags resolve to.
type Material struct {
	Token    string
	Verifier *Verifier
	// Server is the server's credentials option, nil for plaintext.
	Server grpc.ServerOption
	// Dial are the options for calling peers: transport credentials and the token.
	Dial []grpc.DialOption
	TLS  TLSFiles
}

// Load reads the token and the TLS files and checks that they go together.
func (f *Flags) Load() (*Material, error) {
	tok, err := LoadToken(f.TokenFile)
	if err != nil {
		return nil, err
	}
	tlsFiles := f.TLS
	for _, p := range []*string{&tlsFiles.Cert, &tlsFiles.Key, &tlsFiles.CA} {
		if *p != "" {
			if *p, err = filepath.Abs(*p); err != nil {
				return nil, err
			}
		}
	}
	srv, err := tlsFiles.ServerOption()
	if err != nil {
		return nil, err
	}
	dial, err := tlsFiles.DialOption()
	if err != nil {
		return nil, err
	}
	return &Material{Token: tok, Verifier: NewVerifier(tok), Server: srv, Dial: append([]grpc.DialOption{dial}, Bearer(tok)...), TLS: tlsFiles}, nil
}

// ServerOptions returns the server options for rpcserver (none for plaintext).
func (m *Material) ServerOptions() []grpc.ServerOption {
	if m.Server == nil {
		return nil
	}
	return []grpc.ServerOption{m.Server}
}
