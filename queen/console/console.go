// Package console is the queen's web console: a page embedded in the binary (no CDN, works
// offline) and the JSON and server-sent-event API it needs, served over the queen's own registry
// and fleet operations (no gRPC call back into the queen). The queen mounts it at "/" on its HTTP
// listener, beside the OpenAI API under /v1/.
package console

import (
	"context"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"io/fs"
	"net/http"
	"path"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/rbee-dev/rbee/queen/fleet"
	"github.com/rbee-dev/rbee/queen/registry"
)

//go:embed assets
var assetFS embed.FS

// Registry is what the console reads of the queen's registry.
type Registry interface {
	Watch(hiveID string) *registry.Watcher
	Get(id string) (registry.Worker, bool)
	ListHives() []registry.Hive
}

// Fleet starts and stops workers (queen/fleet).
type Fleet interface {
	Spawn(ctx context.Context, spec fleet.SpawnSpec) (registry.Worker, error)
	Delete(ctx context.Context, id string, grace time.Duration) (fleet.Deleted, error)
}

// Logs reads a worker's captured output from its hive (queen/fleet's Logs): the last tailLines
// lines (0: the hive's default), then, with follow, what the worker writes next until ctx ends or
// the log closes. Each chunk is handed to send; an error from send ends the call with it.
type Logs interface {
	Logs(ctx context.Context, workerID string, tailLines uint32, follow bool, send func([]byte) error) error
}

// The queen's fleet is what serves both.
var (
	_ Fleet = (*fleet.Fleet)(nil)
	_ Logs  = (*fleet.Fleet)(nil)
)

// KeyChecker checks an API key presented as an Authorization header value ("Bearer KEY").
type KeyChecker interface {
	Check(authorization string) bool
}

// Config configures the console. Registry and Fleet are required.
type Config struct {
	Registry Registry
	Fleet    Fleet
	// Logs serves a worker's log; nil: the console says logs are not available from this queen.
	Logs Logs
	// Chat serves POST /v1/chat/completions (the queen's OpenAI API) for requests the console has
	// already authenticated: it must not ask for an API key itself. nil: no chat.
	Chat http.Handler
	// Token is the cluster token. "" leaves the console open, as the rest of the queen is then.
	Token string
	// Keys are the inference API keys: a session opened with one may chat but not act on the
	// fleet. nil: only the cluster token opens a session.
	Keys KeyChecker
	// SessionTTL is how long a session lasts without use (12h).
	SessionTTL time.Duration
	// HivePoll is how often a page's stream looks for hive changes (1s); the registry has no hive
	// watch, and hives number in the hundreds at most.
	HivePoll time.Duration
	Logger   *zap.Logger
}

// Console is the http.Handler.
type Console struct {
	cfg      Config
	mux      *http.ServeMux
	sessions *sessions
	assets   map[string]asset
	closing  chan struct{} // closed by Close: streams end
	once     sync.Once
}

type asset struct {
	body  []byte
	etag  string
	ctype string
}

// New returns the console over cfg.
func New(cfg Config) *Console {
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.SessionTTL <= 0 {
		cfg.SessionTTL = 12 * time.Hour
	}
	if cfg.HivePoll <= 0 {
		cfg.HivePoll = time.Second
	}
	c := &Console{cfg: cfg, mux: http.NewServeMux(), sessions: newSessions(cfg.SessionTTL), assets: loadAssets(), closing: make(chan struct{})}
	c.mux.HandleFunc("GET /{$}", c.serveAsset)
	c.mux.HandleFunc("GET /assets/{file}", c.serveAsset)
	c.mux.HandleFunc("GET /api/session", c.session)
	c.mux.HandleFunc("POST /api/login", c.login)
	c.mux.HandleFunc("POST /api/logout", c.logout)
	c.mux.HandleFunc("GET /api/events", c.need(roleChat, c.events))
	c.mux.HandleFunc("GET /api/hives", c.need(roleChat, c.hives))
	c.mux.HandleFunc("GET /api/beats", c.need(roleChat, c.beats))
	c.mux.HandleFunc("POST /api/workers", c.need(roleAdmin, c.spawn))
	c.mux.HandleFunc("DELETE /api/workers/{id}", c.need(roleAdmin, c.deleteWorker))
	c.mux.HandleFunc("GET /api/workers/{id}/logs", c.need(roleAdmin, c.logs))
	c.mux.HandleFunc("POST /api/chat", c.need(roleChat, c.chat))
	c.mux.HandleFunc("/api/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, r.Method+" "+r.URL.Path+" is not part of the console's API")
	})
	return c
}

// Close ends every open stream (the pages' event streams, log follows) so that a graceful stop of
// the HTTP server is not held up by them; a page reconnects to the next queen by itself. Requests
// that are not streams are left to finish.
func (c *Console) Close() { c.once.Do(func() { close(c.closing) }) }

// streamContext is r's context, also ended by Close.
func (c *Console) streamContext(r *http.Request) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(r.Context())
	go func() {
		select {
		case <-c.closing:
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx, cancel
}

// ServeHTTP checks where the request comes from, then serves it.
func (c *Console) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("X-Frame-Options", "DENY")
	// Everything comes from the queen itself: a page that tried to load a script or font from
	// elsewhere would be refused by the browser, and the e2e test would see the console error.
	h.Set("Content-Security-Policy", "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
	if msg := c.checkOrigin(r); msg != "" {
		writeError(w, http.StatusForbidden, msg)
		return
	}
	c.mux.ServeHTTP(w, r)
}

func loadAssets() map[string]asset {
	out := map[string]asset{}
	_ = fs.WalkDir(assetFS, "assets", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := assetFS.ReadFile(p)
		if err != nil {
			return err
		}
		sum := sha256.Sum256(b)
		out[path.Base(p)] = asset{body: b, etag: `"` + hex.EncodeToString(sum[:8]) + `"`, ctype: contentType(p)}
		return nil
	})
	return out
}

func contentType(p string) string {
	switch path.Ext(p) {
	case ".html":
		return "text/html; charset=utf-8"
	case ".js":
		return "text/javascript; charset=utf-8"
	case ".css":
		return "text/css; charset=utf-8"
	case ".svg":
		return "image/svg+xml"
	}
	return "application/octet-stream"
}

func (c *Console) serveAsset(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("file")
	if name == "" {
		name = "index.html"
	}
	a, ok := c.assets[name]
	if !ok || strings.HasPrefix(name, ".") {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Content-Type", a.ctype)
	w.Header().Set("ETag", a.etag)
	// Revalidated on every load (cheap: 304 by ETag), so a new queen's page is never mixed with
	// an old script.
	w.Header().Set("Cache-Control", "no-cache")
	http.ServeContent(w, r, "", time.Time{}, strings.NewReader(string(a.body)))
}
