// Command heartbeats is the queen's load tool: it opens N worker heartbeat streams over M
// connections against a queen (one it starts itself from -bin, or a running one at -queen), beats
// at a given rate per stream or closed-loop, and prints achieved heartbeats/s, heartbeat-to-
// acknowledgement latency percentiles, the queen's CPU and RSS (from /proc when it is local), how
// many workers the queen shows STALE, and ListWorkers latency. With -restart it kills the queen
// with SIGKILL mid-run, restarts it, and measures how long until every worker is known again.
//
//	go run ./bench/heartbeats -bin bin -workers 10000 -conns 16 -rate 1 -duration 60s
//	go run ./bench/heartbeats -bin bin -workers 2000 -rate 0 -duration 20s     # closed loop
//	go run ./bench/heartbeats -bin bin -workers 10000 -restart                 # self-healing
//
// Traffic stays on loopback; the run is bounded by -duration and -workers.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
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
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/rbee-dev/rbee/bench/internal/loopback"
	"github.com/rbee-dev/rbee/bench/internal/measure"
	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/rpcclient"
)

type config struct {
	bin, queen     string
	workers, conns int
	rate           float64
	duration, warm time.Duration
	restart        bool
	interval       time.Duration
	queenPID       int
	watchers       int
	flip           bool
	queenMetrics   string
}

func main() {
	var c config
	flag.StringVar(&c.bin, "bin", "", "directory with the queen binary: start a queen on loopback for the run")
	flag.StringVar(&c.queen, "queen", "", "address of a running queen (instead of -bin)")
	flag.IntVar(&c.workers, "workers", 1000, "heartbeat streams (1..50000)")
	flag.IntVar(&c.conns, "conns", 16, "client connections the streams are spread over")
	flag.Float64Var(&c.rate, "rate", 1, "beats per second per stream; 0: closed loop (each stream beats again on its answer)")
	flag.DurationVar(&c.duration, "duration", 30*time.Second, "measured time after warm-up (at most 10m)")
	flag.DurationVar(&c.warm, "warmup", 5*time.Second, "time to connect all streams and settle before measuring")
	flag.BoolVar(&c.restart, "restart", false, "with -bin: SIGKILL the queen after warm-up, restart it, and time the relearning")
	flag.DurationVar(&c.interval, "interval", time.Second, "with -bin: the queen's --heartbeat-interval")
	flag.IntVar(&c.queenPID, "queen-pid", 0, "with -queen: the queen's PID, to read its CPU and RSS")
	flag.IntVar(&c.watchers, "watchers", 0, "also open this many WatchWorkers streams (64 per connection) and never read them")
	flag.StringVar(&c.queenMetrics, "queen-metrics", "", "with -bin: the queen's --metrics-listen, to profile it at /debug/pprof during the run")
	flag.BoolVar(&c.flip, "flip", false, "workers alternate READY and BUSY, so every beat is a change watchers are sent")
	flag.Parse()
	if c.workers < 1 || c.workers > 50000 || c.conns < 1 || c.conns > c.workers || c.duration <= 0 || c.duration > 10*time.Minute ||
		c.rate < 0 || (c.bin == "") == (c.queen == "") || (c.restart && c.bin == "") {
		fmt.Fprintln(os.Stderr, "heartbeats: give -bin or -queen; -workers 1..50000, -conns 1..workers, -duration up to 10m; -restart needs -bin")
		os.Exit(2)
	}
	if err := run(c); err != nil {
		fmt.Fprintln(os.Stderr, "heartbeats:", err)
		os.Exit(1)
	}
}

// queenProc is a queen this tool started.
type queenProc struct {
	cmd  *exec.Cmd
	addr string
}

func startQueen(c config, addr string) (*queenProc, error) {
	args := []string{"--listen", addr, "--http-listen", "off", "--max-beats-per-second", "0",
		"--heartbeat-interval", c.interval.String(), "--log-level", "warn"}
	if c.queenMetrics != "" {
		args = append(args, "--metrics-listen", c.queenMetrics)
	}
	cmd := exec.Command(filepath.Join(c.bin, "queen"), args...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return &queenProc{cmd: cmd, addr: addr}, nil
}

func (q *queenProc) stop(sig syscall.Signal) {
	_ = q.cmd.Process.Signal(sig)
	done := make(chan struct{})
	go func() { _ = q.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		_ = q.cmd.Process.Kill()
		<-done
	}
}

func run(c config) error {
	addr := c.queen
	var qp *queenProc
	if c.bin != "" {
		addr = loopback.FreeAddr()
		var err error
		if qp, err = startQueen(c, addr); err != nil {
			return err
		}
		defer func() { qp.stop(syscall.SIGTERM) }()
		c.queenPID = qp.cmd.Process.Pid
	}
	conns := make([]*grpc.ClientConn, c.conns)
	for i := range conns {
		// The simulated workers dial like real ones (rpcclient), so reconnection after a queen
		// restart is measured as the fleet would see it.
		cc, err := grpc.NewClient(addr, append(rpcclient.HeartbeatOptions(c.interval), grpc.WithTransportCredentials(insecure.NewCredentials()))...)
		if err != nil {
			return err
		}
		defer cc.Close()
		conns[i] = cc
	}
	if err := loopback.AwaitServing(conns[0]); err != nil {
		return err
	}
	queen := rbeev1.NewQueenServiceClient(conns[0])

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var st stats
	var wg sync.WaitGroup
	for i := 0; i < c.workers; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); beat(ctx, c, conns[i%c.conns], i, &st) }()
	}
	defer func() { cancel(); wg.Wait() }()

	fmt.Printf("queen %s: %d streams over %d connections, rate %s, warm-up %v, measuring %v (%d CPUs here)\n",
		addr, c.workers, c.conns, rateName(c.rate), c.warm, c.duration, numCPU())
	watches := openWatches(ctx, addr, c.watchers)
	time.Sleep(c.warm) // the load's own schedule, not synchronisation
	if got := st.connected.Load(); got < int64(c.workers) {
		fmt.Printf("  warning: only %d of %d streams connected after warm-up\n", got, c.workers)
	}
	if c.restart {
		return restart(c, qp, queen, &st)
	}
	st.reset()
	cpu0, _ := measure.CPUTicks(c.queenPID)
	t0 := time.Now()
	time.Sleep(c.duration)
	elapsed := time.Since(t0)
	cpu1, _ := measure.CPUTicks(c.queenPID)
	n := st.lat.Count()
	fmt.Printf("  heartbeats/s      %.0f (%d in %v, %d stream errors)\n", float64(n)/elapsed.Seconds(), n, elapsed.Round(time.Millisecond), st.errors.Load())
	fmt.Printf("  beat->ack latency p50 %v  p99 %v  p99.9 %v  max %v\n", st.lat.Quantile(0.5), st.lat.Quantile(0.99), st.lat.Quantile(0.999), st.lat.Max())
	if c.queenPID > 0 {
		rss, _ := measure.RSSKB(c.queenPID)
		cpu := float64(cpu1-cpu0) / measure.ClockTicks
		perBeat := 0.0
		if n > 0 {
			perBeat = cpu / float64(n) * 1e6
		}
		fmt.Printf("  queen CPU         %.0f%% of one core, %.2f µs per beat (%.2f s / %d beats); RSS %.1f MB (%.1f KB per worker)\n",
			100*cpu/elapsed.Seconds(), perBeat, cpu, n, float64(rss)/1024, float64(rss)/float64(c.workers))
	}
	if c.watchers > 0 {
		watches.report(c.queenPID)
	}
	return listReport(addr, c.workers)
}

// unreadWatches are WatchWorkers streams the tool opens and never reads, as a stuck dashboard.
type unreadWatches struct {
	streams []rbeev1.QueenService_WatchWorkersClient
	refused map[string]int
	cancel  context.CancelFunc // ends the streams still open
}

func openWatches(ctx context.Context, addr string, n int) *unreadWatches {
	ctx, cancel := context.WithCancel(ctx)
	u := &unreadWatches{refused: map[string]int{}, cancel: cancel}
	var cc *grpc.ClientConn
	for i := range n {
		if i%64 == 0 { // the queen's default --max-watchers-per-conn
			var err error
			if cc, err = grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials())); err != nil {
				u.refused[err.Error()]++
				continue
			}
			go func() { <-ctx.Done(); cc.Close() }()
		}
		st, err := rbeev1.NewQueenServiceClient(cc).WatchWorkers(ctx, &rbeev1.WatchWorkersRequest{})
		if err == nil {
			// An accepted watch sends an event at once (the snapshot, or SYNCED); a refused one ends.
			if _, err = st.Recv(); err == nil {
				u.streams = append(u.streams, st)
				continue
			}
		}
		u.refused[status.Code(err).String()]++
	}
	return u
}

// report prints the queen's peak RSS and how the unread watches ended: drained now, each ends
// with the status the queen gave it (or is still open after 5 s).
func (u *unreadWatches) report(pid int) {
	if hwm, err := statusKB(pid, "VmHWM:"); err == nil {
		fmt.Printf("  unread watches    %d open, refused %v; queen peak RSS %.1f MB\n", len(u.streams), u.refused, float64(hwm)/1024)
	}
	ends := map[string]int{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	stop := time.AfterFunc(5*time.Second, u.cancel) // those the queen has not ended by then
	defer stop.Stop()
	for _, st := range u.streams {
		wg.Go(func() {
			var err error
			for err == nil {
				_, err = st.Recv()
			}
			code := status.Code(err).String()
			if code == codes.Canceled.String() {
				code = "still open"
			}
			mu.Lock()
			ends[code]++
			mu.Unlock()
		})
	}
	wg.Wait()
	fmt.Printf("  unread watches    read at last: %v\n", ends)
}

// listReport prints how many of the load's workers the queen shows, by state, and times
// ListWorkers two ways: one call with the maximum page size (10,000), and paging through all of
// them at the default page size, as `rbee worker ls` does. Like `rbee`, it calls on a connection of
// its own with rbee's client options, not on one the load's heartbeat streams share (which cost
// 2 to 4 ms more here: the list's frames wait behind the beats').
func listReport(addr string, want int) error {
	cc, err := grpc.NewClient(addr, append(rpcclient.Options(), grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		return err
	}
	defer cc.Close()
	queen := rbeev1.NewQueenServiceClient(cc)
	var ds, paged []time.Duration
	var last *rbeev1.ListWorkersResponse
	pages := 0
	for range 11 {
		t0 := time.Now()
		resp, err := queen.ListWorkers(context.Background(), &rbeev1.ListWorkersRequest{HiveId: "load", PageSize: 10000},
			grpc.MaxCallRecvMsgSize(64<<20))
		if err != nil {
			return fmt.Errorf("ListWorkers: %w", err)
		}
		ds = append(ds, time.Since(t0))
		last = resp
		t0 = time.Now()
		pages = 0
		for req := (&rbeev1.ListWorkersRequest{HiveId: "load"}); ; pages++ {
			resp, err := queen.ListWorkers(context.Background(), req, grpc.MaxCallRecvMsgSize(64<<20))
			if err != nil {
				return fmt.Errorf("ListWorkers: %w", err)
			}
			if resp.GetNextPageToken() == "" {
				pages++
				break
			}
			req.PageToken = resp.GetNextPageToken()
		}
		paged = append(paged, time.Since(t0))
	}
	slices.Sort(ds)
	slices.Sort(paged)
	states := map[string]int{}
	for _, w := range last.GetWorkers() {
		states[strings.TrimPrefix(w.GetState().String(), "WORKER_STATE_")]++
	}
	fmt.Printf("  queen shows       %d of %d workers: %v\n", len(last.GetWorkers()), want, states)
	fmt.Printf("  ListWorkers       median %v over 11 calls (page_size 10000: %d workers each); all %d pages of the default size: median %v\n",
		ds[len(ds)/2], len(last.GetWorkers()), pages, paged[len(paged)/2])
	return nil
}

// restart kills the queen with SIGKILL, starts a new one on the same address and measures how long
// until it knows every worker again, checking for duplicates.
func restart(c config, qp *queenProc, queen rbeev1.QueenServiceClient, st *stats) error {
	a0 := st.attempts.Load()
	qp.stop(syscall.SIGKILL)
	t0 := time.Now()
	nq, err := startQueen(c, qp.addr)
	if err != nil {
		return err
	}
	*qp = *nq
	deadline := t0.Add(60 * time.Second)
	for time.Now().Before(deadline) {
		ws, err := listAll(queen)
		if err == nil {
			ids := map[string]bool{}
			for _, w := range ws {
				ids[w.GetWorkerId()] = true
			}
			if len(ws) >= c.workers {
				took := time.Since(t0)
				fmt.Printf("  restart           all %d workers known again %v after SIGKILL (%.1f intervals); %d duplicates\n",
					c.workers, took.Round(time.Millisecond), took.Seconds()/c.interval.Seconds(), len(ws)-len(ids))
				n := st.attempts.Load() - a0
				fmt.Printf("  reconnects        %d stream attempts meanwhile: %.2f per worker per second (interval %v)\n",
					n, float64(n)/float64(c.workers)/took.Seconds(), c.interval)
				return listReport(qp.addr, c.workers)
			}
		}
		time.Sleep(20 * time.Millisecond) // polling the queen's view is the measurement itself
	}
	return errors.New("the restarted queen did not relearn every worker within 60s")
}

// listAll pages through the load's workers at the maximum page size, waiting for the queen to be up.
func listAll(queen rbeev1.QueenServiceClient) ([]*rbeev1.Worker, error) {
	var ws []*rbeev1.Worker
	req := &rbeev1.ListWorkersRequest{HiveId: "load", PageSize: 10000}
	for {
		resp, err := queen.ListWorkers(context.Background(), req, grpc.WaitForReady(true), grpc.MaxCallRecvMsgSize(64<<20))
		if err != nil {
			return nil, err
		}
		ws = append(ws, resp.GetWorkers()...)
		if resp.GetNextPageToken() == "" {
			return ws, nil
		}
		req.PageToken = resp.GetNextPageToken()
	}
}

// beat runs one simulated worker: a heartbeat stream that reconnects with capped, jittered backoff
// like a real worker.
func beat(ctx context.Context, c config, cc *grpc.ClientConn, i int, st *stats) {
	client := rbeev1.NewHeartbeatServiceClient(cc)
	req := &rbeev1.WorkerHeartbeatRequest{Worker: &rbeev1.Worker{
		WorkerId: "load-" + strconv.Itoa(i), HiveId: "load", Model: "load-model", Device: "cpu",
		Pid: int32(100000 + i), Port: uint32(10000 + i%50000), State: rbeev1.WorkerState_WORKER_STATE_READY, ProcessStartTime: uint64(i + 1),
	}}
	period := time.Duration(0)
	if c.rate > 0 {
		period = time.Duration(float64(time.Second) / c.rate)
	}
	first := true
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for attempt := 0; ctx.Err() == nil; attempt++ {
		start, answered := time.Now(), false
		st.attempts.Add(1)
		stream, err := client.WorkerHeartbeat(ctx)
		if err == nil {
			if first {
				st.connected.Add(1)
				first = false
			}
			// The request is the same every beat: encode it once per stream, and reuse one
			// response and one timer, so the tool spends its CPU on the wire, not on itself.
			var msgs [2]grpc.PreparedMsg
			if err = msgs[0].Encode(stream, req); err != nil {
				break
			}
			msgs[1] = msgs[0]
			if c.flip {
				busy := proto.Clone(req).(*rbeev1.WorkerHeartbeatRequest)
				busy.Worker.State = rbeev1.WorkerState_WORKER_STATE_BUSY
				if err = msgs[1].Encode(stream, busy); err != nil {
					break
				}
			}
			n := 0
			resp := new(rbeev1.WorkerHeartbeatResponse)
			var next time.Time
			if period > 0 {
				// Spread the fleet's beats over the period, as real workers started at different times.
				next = time.Now().Add(time.Duration(rand.Int64N(int64(period))))
			}
			for ctx.Err() == nil {
				if period > 0 {
					if d := time.Until(next); d > 0 {
						timer.Reset(d)
						select {
						case <-ctx.Done():
							return
						case <-timer.C:
						}
					}
					next = next.Add(period)
				}
				t0 := time.Now()
				n++
				if err = stream.SendMsg(&msgs[n%2]); err != nil {
					break
				}
				if err = stream.RecvMsg(resp); err != nil {
					break
				}
				st.lat.Add(time.Since(t0))
				attempt, answered = 0, true
			}
		}
		if answered {
			start = time.Now() // the next attempt counts from the break, as a real worker's
		}
		if ctx.Err() != nil {
			return
		}
		st.errors.Add(1)
		// The same reconnect pacing as a real worker's, at the interval the queen was given.
		select {
		case <-ctx.Done():
			return
		case <-time.After(rpcclient.ReconnectDelay(attempt, c.interval) - time.Since(start)):
		}
	}
}

type stats struct {
	lat       measure.Histogram
	errors    atomic.Int64
	connected atomic.Int64
	attempts  atomic.Int64 // streams opened or tried
}

func (s *stats) reset() { s.lat.Reset(); s.errors.Store(0) }

func rateName(r float64) string {
	if r == 0 {
		return "closed loop"
	}
	return fmt.Sprintf("%g/s per stream", r)
}

func numCPU() int { return runtime.NumCPU() }

// statusKB reads a kB field of /proc/PID/status, such as "VmHWM:".
func statusKB(pid int, field string) (int64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field); ok {
			return strconv.ParseInt(strings.Fields(v)[0], 10, 64)
		}
	}
	return 0, errors.New("no " + field + " in /proc/PID/status")
}
