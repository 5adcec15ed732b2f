// Package election makes one of several queens the leader, on etcd (client/v3 and its
// concurrency package): each queen campaigns under one key prefix with a lease of its own, the
// oldest live candidate leads, and a leader whose lease may have run out stops at once.
//
// etcd's Election does not notice by itself that its session was lost: Campaign keeps waiting
// (and may even return nil) after the lease behind its key expired, and Observe's channel stays
// open (etcd-io/etcd#12334, mailgun/holster#36 and #38, cagriekin/charts#326). So this package
// keeps the lease alive itself and knows, on its own clock, the latest moment etcd could still
// hold the key: the send time of the last answered keep-alive plus the TTL, less a margin. A term
// ends the earliest of that moment passing unrenewed, the session ending, the leader key being
// deleted or changed, and the caller stopping; and Term.Check fails from the deadline on even
// before the goroutine that ends the term runs. Another queen can only win once etcd deletes the
// key, which is no earlier than that deadline plus the margin.
package election

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"

	"github.com/rbee-dev/rbee/internal/rpcclient"
)

// Config configures an Elector.
type Config struct {
	// Endpoints are etcd's client URLs.
	Endpoints []string
	// Name is what this candidate publishes while it leads: the address clients reach it at.
	Name string
	// Prefix is the election's key prefix (DefaultPrefix when empty; see CheckPrefix): queens
	// under one prefix elect one leader, and elections under different prefixes share an etcd
	// without seeing each other.
	Prefix string
	// TTL is the lease's time to live: how long etcd keeps a silent leader's key (DefaultTTL
	// when zero; whole seconds, at least 2).
	TTL time.Duration
	// TLS, if set, is used to reach etcd (a client certificate in it is etcd's client-cert auth).
	TLS *tls.Config
	// Username and Password, if set, authenticate to etcd (etcd's user auth).
	Username, Password string
	Logger             *zap.Logger
}

// Defaults.
const (
	DefaultPrefix = "/rbee/queen/leader/"
	DefaultTTL    = 5 * time.Second
)

// Elector campaigns for one candidate.
type Elector struct {
	cfg    Config
	cli    *clientv3.Client
	log    *zap.Logger
	leader atomic.Pointer[string] // the leader's Name as last observed
}

// New connects to etcd: lazily (an unreachable etcd shows in Run, not here), except with a
// username, which etcd's client authenticates at once (a wrong password or an unreachable etcd is
// an error here, within the larger of 3 s and the TTL).
func New(cfg Config) (*Elector, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("election: no etcd endpoint")
	}
	if cfg.Name == "" {
		return nil, errors.New("election: no candidate name")
	}
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultPrefix
	}
	var err error
	if cfg.Prefix, err = CheckPrefix(cfg.Prefix); err != nil {
		return nil, fmt.Errorf("election: %w", err)
	}
	if (cfg.Username == "") != (cfg.Password == "") {
		return nil, errors.New("election: an etcd username needs a password and a password a username")
	}
	if cfg.TTL == 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.TTL < 2*time.Second || cfg.TTL%time.Second != 0 {
		return nil, fmt.Errorf("election: TTL %v: want whole seconds, at least 2s (etcd leases count in seconds)", cfg.TTL)
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints: cfg.Endpoints,
		// With a username the client authenticates here, at once (a bcrypt check and a raft
		// round on etcd's side): an etcd that cannot answer within this bound stops the start.
		DialTimeout: max(3*time.Second, cfg.TTL),
		// A dead etcd connection is noticed well within a TTL; the lease deadline covers the rest.
		DialKeepAliveTime:    cfg.TTL / 3,
		DialKeepAliveTimeout: cfg.TTL / 3,
		TLS:                  cfg.TLS,
		Username:             cfg.Username,
		Password:             cfg.Password,
		// etcd's client warns at every retry; the elector logs what matters itself.
		Logger: cfg.Logger.Named("etcd").WithOptions(zap.IncreaseLevel(zap.ErrorLevel)),
	})
	if err != nil {
		return nil, fmt.Errorf("etcd %v: %w", cfg.Endpoints, err)
	}
	return &Elector{cfg: cfg, cli: cli, log: cfg.Logger}, nil
}

// CheckPrefix checks an election key prefix and returns it ending in "/". It must start with "/"
// and hold no empty segment ("//"): etcd's election keys are the prefix, "/" and a lease ID, and
// a candidate waits for every older key under its keys' prefix, so two elections must never have
// one's key prefix start the other's. With a trailing "/" and no "//" that cannot happen: "/a/"
// and "/a/b/" make keys under "/a//" and "/a/b//".
func CheckPrefix(p string) (string, error) {
	switch {
	case !strings.HasPrefix(p, "/"):
		return "", fmt.Errorf("key prefix %q: want an absolute etcd key path such as %s", p, DefaultPrefix)
	case strings.Contains(p, "//"):
		return "", fmt.Errorf("key prefix %q: an empty segment (//) would let this election's keys fall under another's", p)
	case strings.IndexFunc(p, func(r rune) bool { return unicode.IsSpace(r) || !unicode.IsPrint(r) }) >= 0:
		return "", fmt.Errorf("key prefix %q: spaces and control characters are not allowed", p)
	}
	if !strings.HasSuffix(p, "/") {
		p += "/"
	}
	return p, nil
}

// keyPrefix is the prefix of this election's keys, as concurrency.Election makes them.
func (e *Elector) keyPrefix() string { return e.cfg.Prefix + "/" }

// Close closes the etcd client; call it after Run has returned.
func (e *Elector) Close() error { return e.cli.Close() }

// TTL is the lease TTL in use.
func (e *Elector) TTL() time.Duration { return e.cfg.TTL }

// Leader returns the current leader's name as last observed ("" when none is known), for
// standbys to tell callers where to go.
func (e *Elector) Leader() string {
	if p := e.leader.Load(); p != nil {
		return *p
	}
	return ""
}

// Term is one stretch of leadership.
type Term struct {
	// Revision is the etcd revision at which this candidate's key was created: it grows from one
	// leader to the next, so hives take it as the fencing token.
	Revision uint64
	ctx      context.Context
	deadline *atomic.Int64 // unix nanos; past it the lease may be gone
}

// Check returns nil while this candidate surely still leads, and why not otherwise. Callers ask
// it right before every action only the leader may take.
func (t *Term) Check() error {
	if err := context.Cause(t.ctx); err != nil {
		return fmt.Errorf("not the leader any more: %w", err)
	}
	if time.Now().UnixNano() >= t.deadline.Load() {
		return errors.New("not the leader any more: the etcd lease may have expired")
	}
	return nil
}

// Errors that end a term (context.Cause of its context).
var (
	ErrLeaseLost   = errors.New("etcd lease not renewed in time (etcd unreachable or the lease expired)")
	ErrKeyLost     = errors.New("leader key deleted or replaced in etcd")
	ErrSessionDone = errors.New("etcd session ended")
)

// Run campaigns until ctx ends. Each time this candidate wins it calls lead, which must return
// soon after its ctx ends (that is, when leadership is or may be lost); then Run resigns, so a
// standby takes over at once, and campaigns again. Run returns nil once ctx ends.
func (e *Elector) Run(ctx context.Context, lead func(ctx context.Context, t *Term)) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { e.observe(ctx) })
	for attempt := 0; ctx.Err() == nil; attempt++ {
		led, err := e.once(ctx, lead)
		if ctx.Err() != nil {
			break
		}
		if led {
			attempt = 0
		}
		delay := rpcclient.Backoff(attempt, 100*time.Millisecond, e.cfg.TTL)
		e.log.Warn("election round ended; campaigning again", zap.Error(err), zap.Duration("delay", delay),
			zap.String("actor", "queen"), zap.String("action", "election_retry"))
		select {
		case <-ctx.Done():
		case <-time.After(delay):
		}
	}
	return nil
}

// margin is how much earlier than etcd could this candidate gives up its lease: clock rates and
// scheduling delays never line up exactly.
func (e *Elector) margin() time.Duration { return max(e.cfg.TTL/10, 500*time.Millisecond) }

// once runs one lease: grant, campaign, lead while it lasts, resign. led reports whether lead ran.
func (e *Elector) once(ctx context.Context, lead func(context.Context, *Term)) (led bool, err error) {
	ttl := int64(e.cfg.TTL / time.Second)
	t0 := time.Now()
	gctx, cancel := context.WithTimeout(ctx, e.cfg.TTL)
	grant, err := e.cli.Grant(gctx, ttl)
	cancel()
	if err != nil {
		return false, fmt.Errorf("etcd lease grant: %w", err)
	}
	var deadline atomic.Int64
	deadline.Store(t0.Add(time.Duration(grant.TTL)*time.Second - e.margin()).UnixNano())

	lctx, lost := context.WithCancelCause(ctx)
	var wg sync.WaitGroup
	// Last on the way out: end the lease's goroutines, then wait for them (the session is closed
	// and the lease revoked before, by the defer below).
	defer func() { lost(nil); wg.Wait() }()
	wg.Go(func() { e.keepAlive(lctx, lost, grant.ID, &deadline) })

	// The session rides on the lease kept above (its own keep-alive is harmless); closing it
	// revokes the lease, which deletes the key at once on a clean stop.
	sess, err := concurrency.NewSession(e.cli, concurrency.WithLease(grant.ID), concurrency.WithContext(lctx))
	if err != nil {
		return false, fmt.Errorf("etcd session: %w", err)
	}
	defer func() {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer cancel()
		if _, rerr := e.cli.Revoke(rctx, grant.ID); rerr != nil && !errors.Is(rerr, rpctypes.ErrLeaseNotFound) {
			e.log.Debug("revoking the election lease failed; it expires by itself", zap.Error(rerr))
		}
		_ = sess.Close()
	}()
	wg.Go(func() {
		select {
		case <-sess.Done():
			lost(ErrSessionDone)
		case <-lctx.Done():
		}
	})

	el := concurrency.NewElection(sess, e.cfg.Prefix)
	if err := el.Campaign(lctx, e.cfg.Name); err != nil {
		if c := context.Cause(lctx); c != nil && ctx.Err() == nil {
			return false, fmt.Errorf("campaign: %w", c)
		}
		return false, fmt.Errorf("campaign: %w", err)
	}
	// Campaign returns nil once the keys before ours are gone, even when our own lease has
	// expired meanwhile: lead only if our key is still there, on our lease, and first in line.
	vctx, cancel := context.WithTimeout(lctx, e.cfg.TTL/3)
	first, err := e.cli.Get(vctx, e.keyPrefix(), clientv3.WithFirstCreate()...)
	cancel()
	if err != nil {
		return false, fmt.Errorf("checking the campaign's result: %w", err)
	}
	if len(first.Kvs) == 0 || string(first.Kvs[0].Key) != el.Key() || first.Kvs[0].Lease != int64(grant.ID) ||
		first.Kvs[0].CreateRevision != el.Rev() {
		return false, errors.New("campaign returned but this candidate's key is not the leader's (lease lost meanwhile)")
	}
	if err := context.Cause(lctx); err != nil {
		return false, err
	}

	tctx, end := context.WithCancelCause(lctx)
	defer end(nil)
	wg.Go(func() { e.watchKey(tctx, end, el.Key(), el.Rev()) })
	term := &Term{Revision: uint64(el.Rev()), ctx: tctx, deadline: &deadline}
	e.log.Info("this queen leads", zap.Int64("election_revision", el.Rev()), zap.Duration("ttl", e.cfg.TTL),
		zap.String("address", e.cfg.Name), zap.Int("pid", os.Getpid()),
		zap.String("actor", "queen"), zap.String("action", "leader_elected"))
	lead(tctx, term)
	cause := context.Cause(tctx)
	if ctx.Err() != nil {
		cause = ctx.Err()
	}
	e.log.Info("this queen stopped leading", zap.NamedError("cause", cause),
		zap.String("actor", "queen"), zap.String("action", "leader_stepped_down"))
	if ctx.Err() == nil && errors.Is(cause, context.Canceled) {
		return true, errors.New("the leader's work ended on its own")
	}
	return true, cause
}

// keepAlive renews the lease every third of its TTL and moves the deadline to the send time of
// each answered renewal plus the TTL, less the margin. It ends the lease (lost) when the deadline
// passes unrenewed or etcd says the lease is gone.
func (e *Elector) keepAlive(ctx context.Context, lost context.CancelCauseFunc, id clientv3.LeaseID, deadline *atomic.Int64) {
	every := e.cfg.TTL / 3
	timer := time.NewTimer(every)
	defer timer.Stop()
	for {
		dl := time.Unix(0, deadline.Load())
		// Wake for the next renewal, or at the deadline, whichever comes first.
		timer.Reset(min(every, time.Until(dl)))
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		if !time.Now().Before(time.Unix(0, deadline.Load())) {
			lost(ErrLeaseLost)
			return
		}
		sent := time.Now()
		rctx, cancel := context.WithDeadline(ctx, time.Unix(0, deadline.Load()))
		resp, err := e.cli.KeepAliveOnce(rctx, id)
		cancel()
		switch {
		case err == nil && resp.TTL > 0:
			deadline.Store(sent.Add(time.Duration(resp.TTL)*time.Second - e.margin()).UnixNano())
			every = e.cfg.TTL / 3
		case errors.Is(err, rpctypes.ErrLeaseNotFound) || err == nil:
			lost(ErrLeaseLost)
			return
		default:
			// Retry soon; the deadline decides when to give up.
			every = min(e.cfg.TTL/10, 500*time.Millisecond)
		}
	}
}

// watchKey ends the term when the leader key is deleted or rewritten behind this candidate's back
// (an operator, or a compaction that cut the watch: both are reasons to stop and campaign anew).
func (e *Elector) watchKey(ctx context.Context, end context.CancelCauseFunc, key string, rev int64) {
	wch := e.cli.Watch(clientv3.WithRequireLeader(ctx), key, clientv3.WithRev(rev+1))
	for resp := range wch {
		if err := resp.Err(); err != nil {
			end(fmt.Errorf("%w: watch failed: %v", ErrKeyLost, err))
			return
		}
		for _, ev := range resp.Events {
			if ev.Type == clientv3.EventTypeDelete || ev.Kv.CreateRevision != rev {
				end(ErrKeyLost)
				return
			}
		}
	}
	if ctx.Err() == nil {
		end(fmt.Errorf("%w: watch closed (etcd lost its leader or this client its connection)", ErrKeyLost))
	}
}

// observe keeps Leader current: the first key under the prefix is the leader's.
func (e *Elector) observe(ctx context.Context) {
	for attempt := 0; ctx.Err() == nil; attempt++ {
		gctx, cancel := context.WithTimeout(ctx, e.cfg.TTL)
		resp, err := e.cli.Get(gctx, e.keyPrefix(), clientv3.WithFirstCreate()...)
		cancel()
		if err == nil {
			attempt = 0
			name := ""
			if len(resp.Kvs) > 0 {
				name = string(resp.Kvs[0].Value)
			}
			if old := e.leader.Swap(&name); old == nil || *old != name {
				e.log.Info("leader observed", zap.String("leader", name),
					zap.String("actor", "queen"), zap.String("action", "leader_observed"))
			}
			wctx, cancel := context.WithCancel(ctx)
			wch := e.cli.Watch(clientv3.WithRequireLeader(wctx), e.keyPrefix(), clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
			_, ok := <-wch // any change may change the leader: look again
			cancel()
			if ok {
				continue
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(rpcclient.Backoff(attempt, 100*time.Millisecond, e.cfg.TTL)):
		}
	}
}
