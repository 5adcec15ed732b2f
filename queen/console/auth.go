package console

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
)

// role is what a session may do.
type role uint8

const (
	roleNone role = iota
	// roleChat: opened with an API key; may watch the fleet and chat, not spawn, delete or read logs.
	roleChat
	// roleAdmin: opened with the cluster token, or no token is set.
	roleAdmin
)

func (r role) String() string {
	switch r {
	case roleChat:
		return "chat"
	case roleAdmin:
		return "admin"
	}
	return ""
}

// cookieName holds a random session id; the secret the user typed stays on the server, and only
// in memory.
const cookieName = "rbee_console"

// csrfHeader must be on every state-changing call: a cross-site form cannot set it, and a
// cross-site script cannot send it without a CORS preflight the console never grants.
const csrfHeader = "X-Rbee-Console"

type session struct {
	role    role
	key     string // the API key of a chat session, rechecked on each use so a revoked key ends it
	expires time.Time
}

// sessions maps the SHA-256 of a session id to its session, so that not even a memory dump of the
// map gives a usable cookie.
type sessions struct {
	ttl  time.Duration
	mu   sync.Mutex
	m    map[[32]byte]*session
	fail map[string][]time.Time // failed logins per client IP, for the login limit
}

func newSessions(ttl time.Duration) *sessions {
	return &sessions{ttl: ttl, m: map[[32]byte]*session{}, fail: map[string][]time.Time{}}
}

func (s *sessions) create(ro role, key string) string {
	var b [32]byte
	_, _ = rand.Read(b[:])
	id := hex.EncodeToString(b[:])
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, v := range s.m { // sessions are few; sweeping here bounds the map without a goroutine
		if now.After(v.expires) {
			delete(s.m, k)
		}
	}
	s.m[sha256.Sum256([]byte(id))] = &session{role: ro, key: key, expires: now.Add(s.ttl)}
	return id
}

func (s *sessions) get(id string) (session, bool) {
	k := sha256.Sum256([]byte(id))
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	v := s.m[k]
	if v == nil {
		return session{}, false
	}
	if now.After(v.expires) {
		delete(s.m, k)
		return session{}, false
	}
	v.expires = now.Add(s.ttl)
	return *v, true
}

func (s *sessions) drop(id string) {
	s.mu.Lock()
	delete(s.m, sha256.Sum256([]byte(id)))
	s.mu.Unlock()
}

// Login attempts are limited per client address: loginBurst failures within loginWindow, then
// refused until the oldest falls out of the window.
const (
	loginBurst  = 5
	loginWindow = 10 * time.Second
)

func (s *sessions) limited(ip string, now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	recent := s.fail[ip][:0]
	for _, t := range s.fail[ip] {
		if now.Sub(t) < loginWindow {
			recent = append(recent, t)
		}
	}
	if len(recent) == 0 {
		delete(s.fail, ip)
	} else {
		s.fail[ip] = recent
	}
	return len(recent) >= loginBurst
}

func (s *sessions) failed(ip string, now time.Time) {
	s.mu.Lock()
	s.fail[ip] = append(s.fail[ip], now)
	s.mu.Unlock()
}

// identify returns what the request's caller may do.
func (c *Console) identify(r *http.Request) (role, session) {
	if c.cfg.Token == "" {
		return roleAdmin, session{role: roleAdmin}
	}
	ck, err := r.Cookie(cookieName)
	if err != nil {
		return roleNone, session{}
	}
	s, ok := c.sessions.get(ck.Value)
	if !ok {
		return roleNone, session{}
	}
	if s.role == roleChat && (c.cfg.Keys == nil || !c.cfg.Keys.Check("Bearer "+s.key)) {
		c.sessions.drop(ck.Value) // the key was revoked (keys file reloaded)
		return roleNone, session{}
	}
	return s.role, s
}

// need wraps h so that only callers with at least role min reach it.
func (c *Console) need(min role, h func(http.ResponseWriter, *http.Request, session)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		ro, s := c.identify(r)
		switch {
		case ro == roleNone:
			writeError(w, http.StatusUnauthorized, "log in with the cluster token or an API key")
		case ro < min:
			writeError(w, http.StatusForbidden, "a session opened with an API key may watch and chat, not spawn, delete or read logs: log in with the cluster token")
		default:
			h(w, r, s)
		}
	}
}

// checkOrigin refuses requests another site made the browser send, and, on an open console,
// requests for a host name that is not loopback (a DNS-rebinding page would otherwise be "same
// origin" with it). It returns why a request is refused, or "".
func (c *Console) checkOrigin(r *http.Request) string {
	if c.cfg.Token == "" && isLoopback(hostOnly(r.RemoteAddr)) && !isLoopbackName(hostOnly(r.Host)) {
		return "this console is open without a token and answers only to loopback host names (127.0.0.1, localhost, [::1])"
	}
	site := r.Header.Get("Sec-Fetch-Site")
	if strings.HasPrefix(r.URL.Path, "/api/") && site == "cross-site" {
		return "cross-site request refused"
	}
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		return ""
	}
	if r.Header.Get(csrfHeader) != "1" {
		return "state-changing calls need the header " + csrfHeader + ": 1 (the console's page sends it)"
	}
	if site != "" && site != "same-origin" && site != "none" {
		return "cross-site request refused"
	}
	if o := r.Header.Get("Origin"); o != "" && o != "null" {
		if h := strings.TrimPrefix(strings.TrimPrefix(o, "http://"), "https://"); h != r.Host {
			return "request from another origin refused"
		}
	}
	return ""
}

func hostOnly(hostport string) string {
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		return h
	}
	return strings.Trim(hostport, "[]")
}

func isLoopback(host string) bool {
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func isLoopbackName(host string) bool {
	return isLoopback(host) || strings.EqualFold(host, "localhost")
}

type sessionInfo struct {
	// Open: no token is set; nobody logs in.
	Open bool   `json:"open"`
	Role string `json:"role"`
	Chat bool   `json:"chat"` // the queen serves the OpenAI API
	Logs bool   `json:"logs"` // the queen can relay worker logs
}

func (c *Console) session(w http.ResponseWriter, r *http.Request) {
	ro, _ := c.identify(r)
	writeJSON(w, http.StatusOK, sessionInfo{Open: c.cfg.Token == "", Role: ro.String(), Chat: c.cfg.Chat != nil, Logs: c.cfg.Logs != nil})
}

func (c *Console) login(w http.ResponseWriter, r *http.Request) {
	if c.cfg.Token == "" {
		writeError(w, http.StatusBadRequest, "this console is open: no token is set, there is nothing to log in to")
		return
	}
	var in struct {
		Secret string `json:"secret"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4096)).Decode(&in); err != nil {
		writeError(w, http.StatusBadRequest, "want a JSON body {\"secret\": \"...\"}")
		return
	}
	ip, now := hostOnly(r.RemoteAddr), time.Now()
	if c.sessions.limited(ip, now) {
		w.Header().Set("Retry-After", "10")
		writeError(w, http.StatusTooManyRequests, "too many failed logins from this address; wait 10 seconds")
		return
	}
	secret := strings.TrimSpace(in.Secret)
	var ro role
	switch {
	case secret == "":
	case subtle.ConstantTimeCompare([]byte(secret), []byte(c.cfg.Token)) == 1:
		ro = roleAdmin
	case c.cfg.Keys != nil && c.cfg.Keys.Check("Bearer "+secret):
		ro = roleChat
	}
	if ro == roleNone {
		c.sessions.failed(ip, now)
		c.cfg.Logger.Info("console login refused", zap.String("remote", r.RemoteAddr))
		writeError(w, http.StatusUnauthorized, "wrong token or API key")
		return
	}
	key := ""
	if ro == roleChat {
		key = secret
	}
	http.SetCookie(w, &http.Cookie{
		Name: cookieName, Value: c.sessions.create(ro, key), Path: "/",
		HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: r.TLS != nil,
	})
	c.cfg.Logger.Info("console login", zap.String("remote", r.RemoteAddr), zap.Stringer("role", ro))
	writeJSON(w, http.StatusOK, sessionInfo{Role: ro.String(), Chat: c.cfg.Chat != nil, Logs: c.cfg.Logs != nil})
}

func (c *Console) logout(w http.ResponseWriter, r *http.Request) {
	if ck, err := r.Cookie(cookieName); err == nil {
		c.sessions.drop(ck.Value)
	}
	http.SetCookie(w, &http.Cookie{Name: cookieName, Value: "", Path: "/", MaxAge: -1,
		HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: r.TLS != nil})
	w.WriteHeader(http.StatusNoContent)
}
