// Command inference is the load tool of the inference path: it drives an OpenAI-compatible
// endpoint (one worker, or the queen's router at `queen --http-listen`) with chat completions,
// open loop at -rate or closed loop at -concurrency, bounded by -n and -duration, and prints the
// requests by status, req/s, latency and time-to-first-byte percentiles, and SSE events per
// second. It can start its own `worker-stub --openai` servers (-workers N -bin bin). With
// -compare it loads the workers straight (the ones it started, -direct URLs, or the READY
// workers of -model the queen at -queen lists) and then -url, in one run, and prints what the
// hop through -url adds. -baseline URL adds a phase through another hop to the same workers (a
// generic reverse proxy, bench/revproxy), between the two, as a yardstick.
//
//	go run ./bench/inference -bin bin -workers 1 -n 20000                                  # one stub, closed loop
//	go run ./bench/inference -bin bin -workers 1 -stream -max-tokens 200 -concurrency 200 -n 1000
//	go run ./bench/inference -url http://127.0.0.1:7834 -model tiny -rate 1000 -duration 20s
//	go run ./bench/inference -url http://127.0.0.1:7834 -queen 127.0.0.1:7833 -model tiny -compare -rate 1000
//
// Traffic stays where the URLs point; every process it starts is stopped before it exits.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/rbee-dev/rbee/bench/internal/loopback"
	"github.com/rbee-dev/rbee/bench/internal/measure"
	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/auth"
)

// Bounds that keep a run finite and the machine usable.
const (
	maxN           = 10_000_000
	maxDuration    = 10 * time.Minute
	maxConcurrency = 10_000
	maxWorkers     = 64
	maxMaxTokens   = 100_000
)

type config struct {
	url, path, model, apiKey string
	bin, direct, queen       string
	rate                     float64
	concurrency, n           int
	duration, warmup         time.Duration
	timeout                  time.Duration
	stream                   bool
	maxTokens                int
	workers                  int
	workerTPS                float64
	compare                  bool
	watchPID                 int
	baseline                 string
	baselinePID              int
}

func main() {
	var c config
	flag.StringVar(&c.url, "url", "", "base URL of the OpenAI-compatible endpoint (http://host:port); with -compare, the hop to measure")
	flag.StringVar(&c.path, "path", "/v1/chat/completions", "endpoint path: /v1/chat/completions or /v1/completions")
	flag.StringVar(&c.model, "model", "stub", "model named in every request (and served by the workers this tool starts)")
	flag.StringVar(&c.apiKey, "api-key", "", "sent as Authorization: Bearer (default $RBEE_API_KEY)")
	flag.Float64Var(&c.rate, "rate", 0, "requests per second, open loop; 0: closed loop (-concurrency clients, each sends again on its answer)")
	flag.IntVar(&c.concurrency, "concurrency", 1, "closed loop: clients; open loop: requests in flight at most (more are counted as dropped)")
	flag.IntVar(&c.n, "n", 0, "requests per measured phase (0: until -duration)")
	flag.DurationVar(&c.duration, "duration", 10*time.Second, "longest measured phase")
	flag.DurationVar(&c.warmup, "warmup", time.Second, "load before each phase that is not measured (connections, caches)")
	flag.DurationVar(&c.timeout, "timeout", time.Minute, "one request's bound")
	flag.BoolVar(&c.stream, "stream", false, `ask for "stream": true and read the server-sent events`)
	flag.IntVar(&c.maxTokens, "max-tokens", 16, "max_tokens of every request")
	flag.IntVar(&c.workers, "workers", 0, "start N `worker-stub --openai` servers from -bin on loopback and load them straight (round robin)")
	flag.StringVar(&c.bin, "bin", "bin", "directory with worker-stub, for -workers")
	flag.Float64Var(&c.workerTPS, "worker-tps", 0, "--tokens-per-second of the workers this tool starts (0: no delay)")
	flag.StringVar(&c.direct, "direct", "", "comma-separated base URLs of workers to load straight (instead of -workers)")
	flag.StringVar(&c.queen, "queen", "", "queen gRPC address: load straight the READY workers of -model it lists (token from $RBEE_TOKEN)")
	flag.BoolVar(&c.compare, "compare", false, "measure straight to the workers, then through -url, and print the difference")
	flag.IntVar(&c.watchPID, "watch-pid", 0, "a local process (the queen) whose CPU and peak RSS to report per phase")
	flag.StringVar(&c.baseline, "baseline", "", "with -compare: base URL of another hop to the same workers (a generic reverse proxy), measured between straight and -url")
	flag.IntVar(&c.baselinePID, "baseline-pid", 0, "the -baseline process, whose CPU and peak RSS to report in its phase")
	flag.Parse()
	if c.apiKey == "" {
		c.apiKey = os.Getenv("RBEE_API_KEY")
	}
	if err := c.check(); err != nil {
		fmt.Fprintln(os.Stderr, "inference:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if _, err := run(ctx, c, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "inference:", err)
		os.Exit(1)
	}
}

func (c *config) check() error {
	directs := 0
	for _, on := range []bool{c.workers > 0, c.direct != "", c.queen != ""} {
		if on {
			directs++
		}
	}
	switch {
	case flag.NArg() > 0:
		return fmt.Errorf("unexpected arguments %q", flag.Args())
	case c.n < 0 || c.n > maxN:
		return fmt.Errorf("-n must be in 0..%d", maxN)
	case c.duration <= 0 || c.duration > maxDuration:
		return fmt.Errorf("-duration must be in (0, %s]", maxDuration)
	case c.warmup < 0 || c.warmup > maxDuration:
		return fmt.Errorf("-warmup must be in [0, %s]", maxDuration)
	case c.timeout <= 0:
		return fmt.Errorf("-timeout must be positive")
	case c.rate < 0 || c.rate > 1e6:
		return fmt.Errorf("-rate must be in 0..1000000")
	case c.concurrency < 1 || c.concurrency > maxConcurrency:
		return fmt.Errorf("-concurrency must be in 1..%d", maxConcurrency)
	case c.maxTokens < 0 || c.maxTokens > maxMaxTokens:
		return fmt.Errorf("-max-tokens must be in 0..%d", maxMaxTokens)
	case c.workers < 0 || c.workers > maxWorkers:
		return fmt.Errorf("-workers must be in 0..%d", maxWorkers)
	case c.workerTPS < 0:
		return fmt.Errorf("-worker-tps must not be negative")
	case c.path != "/v1/chat/completions" && c.path != "/v1/completions":
		return fmt.Errorf("-path must be /v1/chat/completions or /v1/completions")
	case directs > 1:
		return fmt.Errorf("give one of -workers, -direct and -queen")
	case c.compare && (c.url == "" || directs == 0):
		return fmt.Errorf("-compare needs -url and the workers to compare with (-workers, -direct or -queen)")
	case !c.compare && c.url != "" && directs > 0:
		return fmt.Errorf("-url and workers to load straight: give -compare to measure both")
	case c.url == "" && directs == 0:
		return fmt.Errorf("give -url, or workers to load straight (-workers, -direct or -queen)")
	case c.baseline != "" && !c.compare:
		return fmt.Errorf("-baseline needs -compare")
	}
	for _, u := range append(splitList(c.direct), c.url, c.baseline) {
		if u == "" {
			continue
		}
		if p, err := url.Parse(u); err != nil || (p.Scheme != "http" && p.Scheme != "https") || p.Host == "" {
			return fmt.Errorf("%q is not an http(s) base URL", u)
		}
	}
	return nil
}

func splitList(s string) []string {
	var out []string
	for f := range strings.SplitSeq(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, strings.TrimSuffix(f, "/"))
		}
	}
	return out
}

// phase is one measured load against a set of targets.
type phase struct {
	name    string
	targets []string
	pids    []int // local server processes behind the targets, for their CPU
	watch   int   // a local process to watch during the phase (the hop's), 0: none

	lat, ttfb measure.Histogram
	ok        atomic.Int64
	events    atomic.Int64
	dropped   atomic.Int64
	mu        sync.Mutex
	failed    map[string]int64 // by status code or error kind
	firstErr  string
	elapsed   time.Duration

	serverCPU float64 // share of one core used by pids during the phase
	watched   *watch
}

func (p *phase) fail(kind, detail string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.failed == nil {
		p.failed = map[string]int64{}
	}
	p.failed[kind]++
	if p.firstErr == "" {
		p.firstErr = detail
	}
}

func (p *phase) failedTotal() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	var n int64
	for _, v := range p.failed {
		n += v
	}
	return n
}

// loader sends the requests.
type loader struct {
	c      config
	client *http.Client
	body   []byte
}

func newLoader(c config) *loader {
	body := map[string]any{"model": c.model, "max_tokens": c.maxTokens, "stream": c.stream}
	if c.path == "/v1/completions" {
		body["prompt"] = "Say hello to the hive"
	} else {
		body["messages"] = []map[string]string{{"role": "user", "content": "Say hello to the hive"}}
	}
	b, _ := json.Marshal(body)
	tr := &http.Transport{
		Proxy:               nil, // loopback benchmarks must not detour through $HTTP_PROXY
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        2 * c.concurrency,
		MaxIdleConnsPerHost: c.concurrency,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
	}
	return &loader{c: c, client: &http.Client{Transport: tr}, body: b}
}

// one sends one request to target and records it in p.
func (l *loader) one(ctx context.Context, target string, p *phase) {
	ctx, cancel := context.WithTimeout(ctx, l.c.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, target+l.c.path, bytes.NewReader(l.body))
	if err != nil {
		p.fail("error", err.Error())
		return
	}
	req.Header.Set("Content-Type", "application/json")
	if l.c.apiKey != "" {
		req.Header.Set("Authorization", "Bearer "+l.c.apiKey)
	}
	t0 := time.Now()
	resp, err := l.client.Do(req)
	if err != nil {
		p.fail("error", err.Error())
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		p.fail(strconv.Itoa(resp.StatusCode), fmt.Sprintf("%d %s", resp.StatusCode, bytes.TrimSpace(b)))
		return
	}
	br := bufio.NewReaderSize(resp.Body, 8192)
	if _, err := br.Peek(1); err != nil {
		p.fail("error", "empty body: "+err.Error())
		return
	}
	ttfb := time.Since(t0)
	if !l.c.stream {
		if _, err := io.Copy(io.Discard, br); err != nil {
			p.fail("error", "reading the body: "+err.Error())
			return
		}
	} else {
		events, done, err := readEvents(br)
		p.events.Add(events)
		switch {
		case err != nil:
			p.fail("stream cut", fmt.Sprintf("stream cut after %d events: %v", events, err))
			return
		case !done:
			p.fail("stream cut", fmt.Sprintf("stream ended after %d events without data: [DONE]", events))
			return
		}
	}
	p.lat.Add(time.Since(t0))
	p.ttfb.Add(ttfb)
	p.ok.Add(1)
}

// readEvents reads server-sent events to the end and counts the data events before [DONE].
func readEvents(br *bufio.Reader) (events int64, done bool, err error) {
	atLineStart := true
	for {
		line, err := br.ReadSlice('\n')
		if atLineStart && bytes.HasPrefix(line, []byte("data:")) {
			if d := bytes.TrimSpace(line[5:]); bytes.Equal(d, []byte("[DONE]")) {
				done = true
			} else {
				events++
			}
		}
		switch {
		case errors.Is(err, bufio.ErrBufferFull):
			atLineStart = false // the rest of a long line
			continue
		case errors.Is(err, io.EOF):
			return events, done, nil
		case err != nil:
			return events, done, err
		}
		atLineStart = true
	}
}

// load runs one phase: until n requests were sent or d has passed, then waits for those in flight.
func (l *loader) load(ctx context.Context, p *phase, n int, d time.Duration) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	var next atomic.Int64
	target := func(i int64) string { return p.targets[int(i%int64(len(p.targets)))] }
	start := time.Now()
	deadline := start.Add(d)
	if l.c.rate == 0 {
		for range l.c.concurrency {
			wg.Go(func() {
				for ctx.Err() == nil && time.Now().Before(deadline) {
					i := next.Add(1) - 1
					if n > 0 && i >= int64(n) {
						return
					}
					l.one(ctx, target(i), p)
				}
			})
		}
	} else {
		slots := make(chan struct{}, l.c.concurrency)
		for i := int64(0); n == 0 || i < int64(n); i++ {
			due := start.Add(time.Duration(float64(i) / l.c.rate * float64(time.Second)))
			if due.After(deadline) || ctx.Err() != nil {
				break
			}
			if w := time.Until(due); w > 0 {
				t := time.NewTimer(w) // the open loop's own schedule
				select {
				case <-t.C:
				case <-ctx.Done():
					t.Stop()
				}
				if ctx.Err() != nil {
					break
				}
			}
			select {
			case slots <- struct{}{}:
				wg.Go(func() {
					defer func() { <-slots }()
					l.one(ctx, target(i), p)
				})
			default:
				p.dropped.Add(1)
			}
		}
	}
	wg.Wait()
	p.elapsed = time.Since(start)
}

// measured runs a warm-up, then the measured phase, with the CPU of the servers and the watched
// process read around it.
func (l *loader) measured(ctx context.Context, p *phase) {
	if l.c.warmup > 0 {
		warm := &phase{targets: p.targets}
		l.load(ctx, warm, 0, l.c.warmup)
	}
	cpu0 := cpuOf(p.pids)
	p.watched = startWatch(p.watch)
	l.load(ctx, p, l.c.n, l.c.duration)
	p.watched.stop()
	if len(p.pids) > 0 && p.elapsed > 0 {
		p.serverCPU = float64(cpuOf(p.pids)-cpu0) / measure.ClockTicks / p.elapsed.Seconds()
	}
}

func cpuOf(pids []int) uint64 {
	var sum uint64
	for _, pid := range pids {
		t, _ := measure.CPUTicks(pid)
		sum += t
	}
	return sum
}

// watch samples a process's CPU and RSS during a phase.
type watch struct {
	pid              int
	cpu0, cpu1       uint64
	t0               time.Time
	took             time.Duration
	baseKB, peakKB   atomic.Int64
	stopped, stopAck chan struct{}
}

func startWatch(pid int) *watch {
	if pid <= 0 {
		return nil
	}
	w := &watch{pid: pid, t0: time.Now(), stopped: make(chan struct{}), stopAck: make(chan struct{})}
	w.cpu0, _ = measure.CPUTicks(pid)
	rss, _ := measure.RSSKB(pid)
	w.baseKB.Store(rss)
	w.peakKB.Store(rss)
	go func() {
		defer close(w.stopAck)
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-w.stopped:
				return
			case <-t.C:
				if rss, err := measure.RSSKB(pid); err == nil && rss > w.peakKB.Load() {
					w.peakKB.Store(rss)
				}
			}
		}
	}()
	return w
}

func (w *watch) stop() {
	if w == nil {
		return
	}
	close(w.stopped)
	<-w.stopAck
	w.cpu1, _ = measure.CPUTicks(w.pid)
	w.took = time.Since(w.t0)
}

// workerProc is a worker-stub this tool started.
type workerProc struct {
	cmd *exec.Cmd
	url string
}

// startWorkers starts n worker-stub --openai servers on loopback and waits until each is healthy.
func startWorkers(c config) ([]workerProc, error) {
	var ws []workerProc
	for range c.workers {
		addr := loopback.FreeAddr()
		_, port, _ := net.SplitHostPort(addr)
		cmd, err := loopback.Start(filepath.Join(c.bin, "worker-stub"), "--openai", "--host", "127.0.0.1", "--port", port,
			"--model", c.model, "--tokens-per-second", strconv.FormatFloat(c.workerTPS, 'g', -1, 64), "--log-level", "warn")
		if err != nil {
			stopWorkers(ws)
			return nil, fmt.Errorf("starting worker-stub: %w", err)
		}
		ws = append(ws, workerProc{cmd: cmd, url: "http://" + addr})
		if err := loopback.AwaitHTTP("http://" + addr + "/health"); err != nil {
			stopWorkers(ws)
			return nil, fmt.Errorf("worker-stub on %s: %w", addr, err)
		}
	}
	return ws, nil
}

func stopWorkers(ws []workerProc) {
	for _, w := range ws {
		loopback.Stop(w.cmd)
	}
}

// queenWorkers lists the base URLs of the READY workers of model the queen knows.
func queenWorkers(ctx context.Context, addr, model string) ([]string, error) {
	opts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if tok := os.Getenv(auth.EnvToken); tok != "" {
		opts = append(opts, auth.Bearer(tok)...)
	}
	conn, err := grpc.NewClient(addr, opts...)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	q := rbeev1.NewQueenServiceClient(conn)
	var urls []string
	req := &rbeev1.ListWorkersRequest{Model: model, State: rbeev1.WorkerState_WORKER_STATE_READY, PageSize: 1000}
	for {
		resp, err := q.ListWorkers(ctx, req)
		if err != nil {
			return nil, fmt.Errorf("ListWorkers at %s: %w", addr, err)
		}
		for _, w := range resp.GetWorkers() {
			host := w.GetAddress()
			if host == "" {
				host = "127.0.0.1"
			}
			urls = append(urls, "http://"+net.JoinHostPort(host, strconv.Itoa(int(w.GetPort()))))
		}
		if resp.GetNextPageToken() == "" {
			break
		}
		req.PageToken = resp.GetNextPageToken()
	}
	if len(urls) == 0 {
		return nil, fmt.Errorf("the queen at %s lists no READY worker of model %q", addr, model)
	}
	return urls, nil
}

// run loads the targets the flags name and prints the report to out; it returns the phases.
func run(ctx context.Context, c config, out io.Writer) ([]*phase, error) {
	var direct *phase
	switch {
	case c.workers > 0:
		ws, err := startWorkers(c)
		if err != nil {
			return nil, err
		}
		defer stopWorkers(ws)
		direct = &phase{name: fmt.Sprintf("straight to %d worker-stub", len(ws))}
		for _, w := range ws {
			direct.targets = append(direct.targets, w.url)
			direct.pids = append(direct.pids, w.cmd.Process.Pid)
		}
	case c.direct != "":
		direct = &phase{name: "straight to -direct", targets: splitList(c.direct)}
	case c.queen != "":
		urls, err := queenWorkers(ctx, c.queen, c.model)
		if err != nil {
			return nil, err
		}
		direct = &phase{name: fmt.Sprintf("straight to the queen's %d workers", len(urls)), targets: urls}
	}
	var phases []*phase
	if direct != nil && (c.compare || c.url == "") {
		phases = append(phases, direct)
	}
	if c.baseline != "" {
		phases = append(phases, &phase{name: "through the baseline " + c.baseline, targets: []string{strings.TrimSuffix(c.baseline, "/")},
			watch: c.baselinePID})
	}
	if c.url != "" {
		phases = append(phases, &phase{name: "through " + c.url, targets: []string{strings.TrimSuffix(c.url, "/")}, watch: c.watchPID})
	}
	if len(phases) > 0 && phases[0] == direct && c.watchPID > 0 {
		direct.watch = c.watchPID // the queen idles while the workers are loaded straight: its baseline
	}

	l := newLoader(c)
	defer l.client.CloseIdleConnections()
	mode := fmt.Sprintf("closed loop, %d clients", c.concurrency)
	if c.rate > 0 {
		mode = fmt.Sprintf("open loop at %g req/s, at most %d in flight", c.rate, c.concurrency)
	}
	kind := "whole answers"
	if c.stream {
		kind = "streamed"
	}
	bound := fmt.Sprintf("for %s", c.duration)
	if c.n > 0 {
		bound = fmt.Sprintf("%d requests, at most %s", c.n, c.duration)
	}
	fmt.Fprintf(out, "%s %s, model %q, max_tokens %d; %s, %s; warm-up %s (machine: %d CPUs)\n",
		c.path, kind, c.model, c.maxTokens, mode, bound, c.warmup, runtime.NumCPU())
	for _, p := range phases {
		l.measured(ctx, p)
		if ctx.Err() != nil {
			return phases, ctx.Err()
		}
		report(out, c, p)
	}
	if len(phases) >= 2 {
		for _, p := range phases[1:] {
			compare(out, phases[0], p)
		}
	}
	return phases, nil
}

func ms(d time.Duration) string { return fmt.Sprintf("%.3fms", float64(d)/float64(time.Millisecond)) }

func report(out io.Writer, c config, p *phase) {
	secs := p.elapsed.Seconds()
	fmt.Fprintf(out, "%s (%d target(s)), %s:\n", p.name, len(p.targets), p.elapsed.Round(time.Millisecond))
	fmt.Fprintf(out, "  requests  ok %d, failed %d", p.ok.Load(), p.failedTotal())
	p.mu.Lock()
	for _, k := range slices.Sorted(maps.Keys(p.failed)) {
		fmt.Fprintf(out, " [%s: %d]", k, p.failed[k])
	}
	first := p.firstErr
	p.mu.Unlock()
	if d := p.dropped.Load(); d > 0 {
		fmt.Fprintf(out, ", not sent (already %d in flight) %d", c.concurrency, d)
	}
	fmt.Fprintln(out)
	if first != "" {
		fmt.Fprintf(out, "  first failure: %.200s\n", first)
	}
	fmt.Fprintf(out, "  req/s     %.0f\n", float64(p.ok.Load())/secs)
	fmt.Fprintf(out, "  latency   p50 %s  p99 %s  max %s\n", ms(p.lat.Quantile(0.5)), ms(p.lat.Quantile(0.99)), ms(p.lat.Max()))
	fmt.Fprintf(out, "  1st byte  p50 %s  p99 %s\n", ms(p.ttfb.Quantile(0.5)), ms(p.ttfb.Quantile(0.99)))
	if c.stream {
		fmt.Fprintf(out, "  SSE events/s %.0f (%d events)\n", float64(p.events.Load())/secs, p.events.Load())
	}
	if len(p.pids) > 0 {
		fmt.Fprintf(out, "  workers' CPU %.0f%% of one core\n", 100*p.serverCPU)
	}
	if w := p.watched; w != nil {
		fmt.Fprintf(out, "  pid %d: CPU %.0f%% of one core; RSS %.1f MB before, %.1f MB at peak (%+.1f KB per request in flight at %d)\n",
			w.pid, 100*float64(w.cpu1-w.cpu0)/measure.ClockTicks/w.took.Seconds(), float64(w.baseKB.Load())/1024,
			float64(w.peakKB.Load())/1024, float64(w.peakKB.Load()-w.baseKB.Load())/float64(c.concurrency), c.concurrency)
	}
}

// compare prints what the hop through the second phase's target adds to the first's figures.
func compare(out io.Writer, direct, through *phase) {
	d := func(q float64, a, b *measure.Histogram) string {
		return fmt.Sprintf("%+.3fms", float64(b.Quantile(q)-a.Quantile(q))/float64(time.Millisecond))
	}
	rate := func(p *phase, v int64) float64 { return float64(v) / p.elapsed.Seconds() }
	fmt.Fprintf(out, "added by the hop %s (its phase - straight): latency p50 %s p99 %s; 1st byte p50 %s p99 %s; req/s ratio %.2f",
		through.name, d(0.5, &direct.lat, &through.lat), d(0.99, &direct.lat, &through.lat),
		d(0.5, &direct.ttfb, &through.ttfb), d(0.99, &direct.ttfb, &through.ttfb),
		rate(through, through.ok.Load())/rate(direct, direct.ok.Load()))
	if direct.events.Load() > 0 {
		fmt.Fprintf(out, "; events/s ratio %.2f", rate(through, through.events.Load())/rate(direct, direct.events.Load()))
	}
	fmt.Fprintln(out)
}
