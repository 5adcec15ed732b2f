// Command failover measures a queen failover under load: it starts an etcd (Debian's etcd-server,
// found or installed by scripts/install-etcd.sh) and three queens elected on it, opens N simulated
// worker heartbeat streams given every queen's address (as real workers are), then, round after
// round, kills the leader with SIGKILL and times how long until a standby leads and lists every
// worker again, checking that none is missing or duplicated. The killed queen is restarted as a
// standby for the next round. It also reports a standby's CPU and RSS while the fleet beats.
//
//	go build -o bin/ ./queen && go run ./bench/failover -bin bin -workers 1000 -rounds 5
//
// Traffic stays on loopback.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/rbee-dev/rbee/bench/internal/loopback"
	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/rpcclient"
)

type config struct {
	bin, etcdBin    string
	workers, conns  int
	rounds          int
	interval, ttl   time.Duration
	warm, standbyOn time.Duration
}

func main() {
	var c config
	flag.StringVar(&c.bin, "bin", "", "directory with the queen binary (required)")
	flag.StringVar(&c.etcdBin, "etcd", "", "etcd binary (default: found or installed by scripts/install-etcd.sh)")
	flag.IntVar(&c.workers, "workers", 1000, "simulated workers (heartbeat streams), 1..20000")
	flag.IntVar(&c.conns, "conns", 16, "client connections the streams are spread over (each reaches all three queens)")
	flag.IntVar(&c.rounds, "rounds", 5, "failovers to measure (1..20)")
	flag.DurationVar(&c.interval, "interval", time.Second, "the queens' --heartbeat-interval")
	flag.DurationVar(&c.ttl, "ttl", 5*time.Second, "the queens' --election-ttl")
	flag.DurationVar(&c.warm, "warmup", 5*time.Second, "time for every stream to connect before the first round")
	flag.DurationVar(&c.standbyOn, "standby-sample", 10*time.Second, "how long to sample a standby's CPU")
	flag.Parse()
	if c.bin == "" || c.workers < 1 || c.workers > 20000 || c.conns < 1 || c.conns > c.workers || c.rounds < 1 || c.rounds > 20 {
		fmt.Fprintln(os.Stderr, "failover: -bin is required; -workers 1..20000, -conns 1..workers, -rounds 1..20")
		os.Exit(2)
	}
	if err := run(c); err != nil {
		fmt.Fprintln(os.Stderr, "failover:", err)
		os.Exit(1)
	}
}

// proc is a process this tool started; every one is stopped by PID before it returns.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
}

func launch(name string, args ...string) (*proc, error) {
	cmd := exec.Command(name, args...)
	cmd.Stderr = nil // quiet: the figures are the output
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	return p, nil
}

func (p *proc) stop(sig syscall.Signal) {
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

func etcdBinary(c config) (string, error) {
	if c.etcdBin != "" {
		return c.etcdBin, nil
	}
	out, err := exec.Command("scripts/install-etcd.sh").Output()
	if err != nil {
		return "", fmt.Errorf("no etcd (run from the repository root; scripts/install-etcd.sh: %w)", err)
	}
	return strings.TrimSpace(string(out)), nil
}

func run(c config) error {
	etcdBin, err := etcdBinary(c)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "rbee-failover-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	client, peer := "http://"+loopback.FreeAddr(), "http://"+loopback.FreeAddr()
	etcd, err := launch(etcdBin, "--name", "bench", "--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client-urls", client, "--advertise-client-urls", client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", "bench="+peer)
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	defer etcd.stop(syscall.SIGTERM)

	addrs := []string{loopback.FreeAddr(), loopback.FreeAddr(), loopback.FreeAddr()}
	queens := make([]*proc, len(addrs))
	startQueen := func(i int) error {
		p, err := launch(filepath.Join(c.bin, "queen"), "--listen", addrs[i], "--etcd", client,
			"--election-ttl", c.ttl.String(), "--heartbeat-interval", c.interval.String(),
			"--max-beats-per-second", "0", "--log-level", "warn", "--http-listen", "off")
		queens[i] = p
		return err
	}
	for i := range addrs {
		if err := startQueen(i); err != nil {
			return err
		}
	}
	defer func() {
		for _, q := range queens {
			if q != nil {
				q.stop(syscall.SIGTERM)
			}
		}
	}()

	dial := func(service string) (*grpc.ClientConn, error) {
		target, opts, err := rpcclient.QueenTarget(addrs, service)
		if err != nil {
			return nil, err
		}
		base := rpcclient.Options()
		if service == rpcclient.HeartbeatService {
			base = rpcclient.HeartbeatOptions(c.interval) // as real workers dial
		}
		return grpc.NewClient(target, append(append(base, grpc.WithTransportCredentials(insecure.NewCredentials())), opts...)...)
	}
	qconn, err := dial(rpcclient.QueenService)
	if err != nil {
		return err
	}
	defer qconn.Close()
	queen := rbeev1.NewQueenServiceClient(qconn)

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	var reconnects atomic.Int64
	for i := 0; i < c.conns; i++ {
		cc, err := dial(rpcclient.HeartbeatService)
		if err != nil {
			return err
		}
		defer cc.Close()
		for w := i; w < c.workers; w += c.conns {
			wg.Go(func() { beat(ctx, c, cc, w, &reconnects) })
		}
	}
	fmt.Printf("3 queens on one etcd, %d workers over %d connections, interval %v, election TTL %v (%d rounds; machine shared)\n",
		c.workers, c.conns, c.interval, c.ttl, c.rounds)
	time.Sleep(c.warm) // the load's own schedule, not synchronisation
	if _, err := allKnown(queen, c.workers, time.Now().Add(60*time.Second)); err != nil {
		return fmt.Errorf("before the first round: %w", err)
	}

	if err := standbyCost(c, addrs, queens); err != nil {
		return err
	}
	var took []time.Duration
	for r := 1; r <= c.rounds; r++ {
		li, err := leaderIndex(addrs)
		if err != nil {
			return err
		}
		reconnects.Store(0)
		t0 := time.Now()
		queens[li].stop(syscall.SIGKILL)
		queens[li] = nil
		d, err := allKnown(queen, c.workers, t0.Add(60*time.Second))
		if err != nil {
			return fmt.Errorf("round %d: %w", r, err)
		}
		took = append(took, d)
		fmt.Printf("  round %d: leader %s killed; every worker known again after %v (%.1f intervals past the TTL); %d stream reconnects\n",
			r, addrs[li], d.Round(time.Millisecond), (d-c.ttl).Seconds()/c.interval.Seconds(), reconnects.Load())
		if err := startQueen(li); err != nil {
			return err
		}
		awaitHealth(addrs[li])
	}
	slices.Sort(took)
	fmt.Printf("  failover          median %v over %d rounds (min %v, max %v); bound TTL + 2 intervals = %v\n",
		took[len(took)/2].Round(time.Millisecond), len(took), took[0].Round(time.Millisecond), took[len(took)-1].Round(time.Millisecond), c.ttl+2*c.interval)
	return nil
}

// leaderIndex is the queen whose health says SERVING.
func leaderIndex(addrs []string) (int, error) {
	for i, a := range addrs {
		if healthOf(a) == healthpb.HealthCheckResponse_SERVING {
			return i, nil
		}
	}
	return 0, errors.New("no queen leads")
}

func healthOf(addr string) healthpb.HealthCheckResponse_ServingStatus {
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return healthpb.HealthCheckResponse_UNKNOWN
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	r, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{Service: rpcclient.QueenService}, grpc.WaitForReady(true))
	if err != nil {
		return healthpb.HealthCheckResponse_UNKNOWN
	}
	return r.GetStatus()
}

// awaitHealth waits until a restarted queen answers its health service (as a standby).
func awaitHealth(addr string) {
	for i := 0; i < 100 && healthOf(addr) == healthpb.HealthCheckResponse_UNKNOWN; i++ {
		time.Sleep(100 * time.Millisecond) // the restarted process is opening its port
	}
}

// allKnown polls the leader until it lists every worker READY exactly once, and returns how long
// that took from the call.
func allKnown(queen rbeev1.QueenServiceClient, want int, deadline time.Time) (time.Duration, error) {
	t0 := time.Now()
	last := 0
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		resp, err := queen.ListWorkers(ctx, &rbeev1.ListWorkersRequest{HiveId: "load"})
		cancel()
		if err == nil {
			ids, ready := map[string]bool{}, 0
			for _, w := range resp.GetWorkers() {
				ids[w.GetWorkerId()] = true
				if w.GetState() == rbeev1.WorkerState_WORKER_STATE_READY {
					ready++
				}
			}
			if len(ids) != len(resp.GetWorkers()) {
				return 0, fmt.Errorf("%d duplicate workers listed", len(resp.GetWorkers())-len(ids))
			}
			last = ready
			if ready == want {
				return time.Since(t0), nil
			}
		}
		time.Sleep(20 * time.Millisecond) // polling the leader's view is the measurement itself
	}
	return 0, fmt.Errorf("only %d of %d workers known READY by the deadline", last, want)
}

// standbyCost samples a standby's CPU and RSS while the fleet beats at the leader.
func standbyCost(c config, addrs []string, queens []*proc) error {
	li, err := leaderIndex(addrs)
	if err != nil {
		return err
	}
	si := (li + 1) % len(addrs)
	pids := []int{queens[li].cmd.Process.Pid, queens[si].cmd.Process.Pid}
	var t0 [2]uint64
	for i, pid := range pids {
		t0[i] = cpuTicks(pid)
	}
	time.Sleep(c.standbyOn) // the sampling window
	for i, role := range []string{"leader ", "standby"} {
		cpu := float64(cpuTicks(pids[i])-t0[i]) / 100 / c.standbyOn.Seconds()
		fmt.Printf("  %s           CPU %.1f%% of one core, RSS %.1f MB\n", role, 100*cpu, float64(rssKB(pids[i]))/1024)
	}
	return nil
}

func cpuTicks(pid int) uint64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	ut, _ := strconv.ParseUint(f[11], 10, 64)
	st, _ := strconv.ParseUint(f[12], 10, 64)
	return ut + st
}

func rssKB(pid int) int64 {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			n, _ := strconv.ParseInt(strings.Fields(v)[0], 10, 64)
			return n
		}
	}
	return 0
}

// beat runs one simulated worker: a heartbeat stream at the interval, reopened with a real
// worker's backoff when it breaks; with several queens the open waits for the leader.
func beat(ctx context.Context, c config, cc *grpc.ClientConn, i int, reconnects *atomic.Int64) {
	client := rbeev1.NewHeartbeatServiceClient(cc)
	req := &rbeev1.WorkerHeartbeatRequest{Worker: &rbeev1.Worker{
		WorkerId: "load-" + strconv.Itoa(i), HiveId: "load", Model: "load-model", Device: "cpu",
		Pid: int32(100000 + i), Port: uint32(10000 + i%50000), State: rbeev1.WorkerState_WORKER_STATE_READY, ProcessStartTime: uint64(i + 1),
	}}
	resp := new(rbeev1.WorkerHeartbeatResponse)
	for attempt := 0; ctx.Err() == nil; attempt++ {
		start, answered := time.Now(), false
		stream, err := client.WorkerHeartbeat(ctx)
		for err == nil && ctx.Err() == nil {
			if err = stream.Send(req); err != nil {
				break
			}
			if err = stream.RecvMsg(resp); err != nil {
				break
			}
			attempt, answered = 0, true
			select {
			case <-ctx.Done():
				return
			case <-time.After(c.interval):
			}
		}
		if answered {
			start = time.Now() // the next attempt counts from the break, as a real worker's
		}
		if ctx.Err() != nil {
			return
		}
		reconnects.Add(1)
		select {
		case <-ctx.Done():
			return
		case <-time.After(rpcclient.ReconnectDelay(attempt, c.interval) - time.Since(start)):
		}
	}
}
