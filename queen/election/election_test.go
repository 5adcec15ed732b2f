package election

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// etcd's client keeps a resolver goroutine per process once used.
		goleak.IgnoreAnyFunction("google.golang.org/grpc/internal/grpcsync.(*CallbackSerializer).run"),
	)
}

const ttl = 2 * time.Second

// etcdServer runs a one-member etcd on loopback for one test (Debian's etcd-server, installed by
// the project's script); it is skipped where etcd cannot be installed, except in CI.
type etcdServer struct {
	cmd  *exec.Cmd
	url  string
	done chan struct{}
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func startEtcd(t *testing.T) *etcdServer {
	t.Helper()
	return startEtcdWith(t, "http", nil)
}

// startEtcdWith starts etcd serving clients on scheme (http or https) with the extra flags
// given, and waits until a client with tlsCfg can read.
func startEtcdWith(t *testing.T, scheme string, tlsCfg *tls.Config, extra ...string) *etcdServer {
	t.Helper()
	out, err := exec.Command("../../scripts/install-etcd.sh").Output()
	if err != nil {
		msg := fmt.Sprintf("etcd is not available and could not be installed (scripts/install-etcd.sh: %v)", err)
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	client := fmt.Sprintf("%s://127.0.0.1:%d", scheme, freePort(t))
	peer := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	e := &etcdServer{url: client, done: make(chan struct{})}
	e.cmd = exec.Command(strings.TrimSpace(string(out)), "--name", "t", "--data-dir", filepath.Join(t.TempDir(), "etcd"),
		"--listen-client-urls", client, "--advertise-client-urls", client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", "t="+peer)
	e.cmd.Args = append(e.cmd.Args, extra...)
	if err := e.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = e.cmd.Wait(); close(e.done) }()
	t.Cleanup(func() {
		_ = e.cmd.Process.Signal(syscall.SIGCONT)
		_ = e.cmd.Process.Signal(syscall.SIGTERM)
		<-e.done
	})
	// Ready once a read succeeds; the client retries until then within the bound.
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{client}, DialTimeout: 10 * time.Second, TLS: tlsCfg})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	if _, err := cli.Get(ctx, "probe"); err != nil {
		t.Fatalf("etcd did not serve: %v", err)
	}
	return e
}

// candidate runs one Elector and reports its terms.
type candidate struct {
	e      *Elector
	terms  chan *Term     // each term as it starts
	ended  chan error     // each term's end cause
	cancel func()         // stops Run
	wg     sync.WaitGroup // Run
}

func runCandidate(t *testing.T, url, name string) *candidate {
	t.Helper()
	return runCandidateWith(t, Config{Endpoints: []string{url}, Name: name, TTL: ttl})
}

func runCandidateWith(t *testing.T, cfg Config) *candidate {
	t.Helper()
	e, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &candidate{e: e, terms: make(chan *Term, 8), ended: make(chan error, 8), cancel: cancel}
	c.wg.Go(func() {
		_ = e.Run(ctx, func(ctx context.Context, term *Term) {
			c.terms <- term
			<-ctx.Done()
			c.ended <- context.Cause(ctx)
		})
	})
	t.Cleanup(c.stop)
	return c
}

func (c *candidate) stop() {
	c.cancel()
	c.wg.Wait()
	_ = c.e.Close()
}

func within[T any](t *testing.T, ch <-chan T, d time.Duration, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(d):
		t.Fatalf("no %s within %v", what, d)
		panic("unreachable")
	}
}

// One of two candidates leads; when it stops cleanly it resigns, so the other leads at once (not
// a TTL later), with a higher fencing token, and learns who leads.
func TestOneLeaderAndAPromptHandoff(t *testing.T) {
	e := startEtcd(t)
	a := runCandidate(t, e.url, "a:1")
	ta := within(t, a.terms, 10*time.Second, "term for a")
	b := runCandidate(t, e.url, "b:1")
	select {
	case <-b.terms:
		t.Fatal("b leads while a does")
	case <-time.After(ttl): // the span over which nothing may happen
	}
	if b.e.Leader() != "a:1" {
		t.Errorf("b sees leader %q, want a:1", b.e.Leader())
	}
	if err := ta.Check(); err != nil {
		t.Fatalf("a's term fails its check while it leads: %v", err)
	}
	stopped := time.Now()
	a.stop()
	if err := ta.Check(); err == nil {
		t.Fatal("a's term still checks out after a stopped")
	}
	tb := within(t, b.terms, 10*time.Second, "term for b")
	t.Logf("handoff on a clean stop: b led %v after a stopped", time.Since(stopped).Round(time.Millisecond))
	if d := time.Since(stopped); d > ttl/2 {
		t.Errorf("b led %v after a stopped cleanly; a resignation should hand over at once", d)
	}
	if tb.Revision <= ta.Revision {
		t.Errorf("fencing tokens: b %d after a %d, want increasing", tb.Revision, ta.Revision)
	}
}

// A leader whose etcd goes silent stops by its own clock before etcd could have let its lease go:
// Check fails and the term ends within the TTL, without any word from etcd.
func TestSilentEtcdEndsTheTermWithinTheTTL(t *testing.T) {
	e := startEtcd(t)
	a := runCandidate(t, e.url, "a:1")
	ta := within(t, a.terms, 10*time.Second, "term")
	if err := e.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	silent := time.Now()
	cause := within(t, a.ended, 2*ttl, "end of the term")
	t.Logf("etcd silent: the term ended %v later (TTL %v): %v", time.Since(silent).Round(time.Millisecond), ttl, cause)
	if d := time.Since(silent); d >= ttl {
		t.Errorf("the term ended %v after etcd went silent, not before the TTL %v", d, ttl)
	}
	if !errors.Is(cause, ErrLeaseLost) && !errors.Is(cause, ErrKeyLost) && !errors.Is(cause, ErrSessionDone) {
		t.Errorf("term ended with %v, want a lost lease", cause)
	}
	if ta.Check() == nil {
		t.Error("Check passes after the term ended")
	}
	_ = e.cmd.Process.Signal(syscall.SIGCONT)
	within(t, a.terms, 20*time.Second, "a new term once etcd is back")
}

// The leader key deleted behind the leader's back (an operator, a bug) ends the term: the leader
// does not go on acting on an election that no longer names it.
func TestDeletedKeyEndsTheTerm(t *testing.T) {
	e := startEtcd(t)
	a := runCandidate(t, e.url, "a:1")
	within(t, a.terms, 10*time.Second, "term")
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{e.url}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if _, err := cli.Delete(ctx, DefaultPrefix, clientv3.WithPrefix()); err != nil {
		t.Fatal(err)
	}
	if cause := within(t, a.ended, 5*time.Second, "end of the term"); !errors.Is(cause, ErrKeyLost) {
		t.Errorf("term ended with %v, want %v", cause, ErrKeyLost)
	}
	within(t, a.terms, 10*time.Second, "a new term after campaigning again")
}
