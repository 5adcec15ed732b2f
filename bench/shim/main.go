// Command shim measures worker-shim, the supervisor of catalog models, with the real binaries:
// readiness latency (the server's /health turns 200 -> the queen's watch shows READY), spawn to
// READY through the queen against starting the same server directly and polling it, and the
// shim's resident memory and idle CPU. It starts its own queen and hive on loopback with a
// one-model catalog served by worker-stub --openai, and stops everything it started.
//
//	make build && go run ./bench/shim -bin bin -n 50
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/rbee-dev/rbee/bench/internal/loopback"
	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

func main() {
	bin := flag.String("bin", "bin", "directory with the queen, hive and worker-shim binaries")
	n := flag.Int("n", 50, "spawns to measure (at most 1000)")
	load := flag.Duration("load", 300*time.Millisecond, "how long the fake server loads before /health answers 200")
	idle := flag.Int("idle", 10, "workers kept READY and idle for the memory and CPU figures")
	idleFor := flag.Duration("idle-for", 10*time.Second, "how long the idle CPU is sampled")
	flag.Parse()
	if *n < 1 || *n > 1000 || *idle < 1 || *idle > 100 {
		fmt.Fprintln(os.Stderr, "shim: -n must be 1..1000, -idle 1..100")
		os.Exit(2)
	}
	if err := run(*bin, *n, *load, *idle, *idleFor); err != nil {
		fmt.Fprintln(os.Stderr, "shim:", err)
		os.Exit(1)
	}
}

func run(bin string, n int, load time.Duration, idle int, idleFor time.Duration) error {
	dir, err := os.MkdirTemp("", "rbee-bench-shim-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	stub := abs(filepath.Join(bin, "worker-stub"))
	catalog := filepath.Join(dir, "models.yaml")
	text := fmt.Sprintf("models:\n  bench:\n    cmd: [%q, \"--openai\", \"--model\", \"${MODEL}\", \"--port\", \"${PORT}\", \"--load-time\", %q]\n",
		stub, load.String())
	if err := os.WriteFile(catalog, []byte(text), 0o644); err != nil {
		return err
	}
	queenAddr := loopback.FreeAddr()
	queen, err := loopback.Start(filepath.Join(bin, "queen"), "--listen", queenAddr, "--http-listen", "off", "--log-level", "warn")
	if err != nil {
		return err
	}
	defer loopback.Stop(queen)
	hive, err := loopback.Start(filepath.Join(bin, "hive"), "--listen", loopback.FreeAddr(), "--hive-id", "bench", "--queen", queenAddr,
		"--models", catalog, "--log-dir", filepath.Join(dir, "logs"), "--log-level", "warn")
	if err != nil {
		return err
	}
	defer loopback.Stop(hive)
	conn, err := grpc.NewClient(queenAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := loopback.AwaitServing(conn); err != nil {
		return fmt.Errorf("queen: %w", err)
	}
	q := rbeev1.NewQueenServiceClient(conn)
	ctx := context.Background()
	if err := awaitHive(ctx, q); err != nil {
		return err
	}

	// Readiness latency and spawn-to-READY, one worker at a time.
	var flipToReady, spawnToReady, spawnRPC, toExec []time.Duration
	for i := 0; i < n; i++ {
		id := fmt.Sprintf("b%d", i)
		wctx, cancel := context.WithTimeout(ctx, time.Minute)
		w, err := q.WatchWorkers(wctx, &rbeev1.WatchWorkersRequest{HiveId: "bench"})
		if err != nil {
			cancel()
			return err
		}
		t0 := time.Now()
		sp, err := q.SpawnWorker(ctx, &rbeev1.SpawnWorkerRequest{Model: "bench", WorkerId: id})
		if err != nil {
			cancel()
			return fmt.Errorf("spawn: %w", err)
		}
		spawnRPC = append(spawnRPC, time.Since(t0))
		// The moment health turns 200, seen by polling it every millisecond beside the shim.
		flipped := make(chan time.Time, 1)
		go func() { flipped <- firstOK(wctx, sp.GetWorker().GetPort(), time.Millisecond) }()
		var ready time.Time
		for ready.IsZero() {
			ev, err := w.Recv()
			if err != nil {
				cancel()
				return fmt.Errorf("watch: %w", err)
			}
			if ev.GetWorker().GetWorkerId() == id && ev.GetWorker().GetState() == rbeev1.WorkerState_WORKER_STATE_READY {
				ready = time.Now()
			}
		}
		flip := <-flipped
		cancel()
		if flip.IsZero() {
			return fmt.Errorf("worker %s READY but its health never answered 200 to the bench", id)
		}
		flipToReady = append(flipToReady, ready.Sub(flip))
		spawnToReady = append(spawnToReady, ready.Sub(t0))
		logs, _ := filepath.Glob(filepath.Join(dir, "logs", "rbee-worker-"+id+".*.log"))
		if len(logs) != 1 {
			return fmt.Errorf("worker %s: log files %q, want one", id, logs)
		}
		started, err := serverStarted(logs[0])
		if err != nil {
			return err
		}
		toExec = append(toExec, started.Sub(t0))
		if _, err := q.DeleteWorker(ctx, &rbeev1.DeleteWorkerRequest{WorkerId: id}); err != nil {
			return fmt.Errorf("delete: %w", err)
		}
	}

	// The same server started directly and polled every millisecond: the floor rbee is compared to.
	var direct []time.Duration
	for i := 0; i < n; i++ {
		d, err := directStart(stub, load)
		if err != nil {
			return err
		}
		direct = append(direct, d)
	}

	fmt.Printf("worker-shim, %d spawns, server load %v (machine: %d CPUs)\n", n, load, runtime.NumCPU())
	report("health 200 -> READY in the queen's watch", flipToReady)
	report("SpawnWorker -> READY in the watch (rbee)", spawnToReady)
	report("exec -> first 200 polling every 1ms (direct)", direct)
	report("  of rbee's: SpawnWorker answered (shim forked)", spawnRPC)
	report("  of rbee's: SpawnWorker -> shim starts the server", toExec)
	fmt.Printf("  overhead of rbee over direct, p50: %.1f ms\n", ms(pct(spawnToReady, 50)-pct(direct, 50)))

	// Memory and idle CPU of the shims of idle READY workers.
	var pids []int
	for i := 0; i < idle; i++ {
		r, err := q.SpawnWorker(ctx, &rbeev1.SpawnWorkerRequest{Model: "bench", WorkerId: fmt.Sprintf("idle%d", i), WaitReady: true})
		if err != nil {
			return fmt.Errorf("spawn idle worker: %w", err)
		}
		pids = append(pids, int(r.GetWorker().GetPid()))
	}
	med := func(v []float64) float64 { slices.Sort(v); return v[len(v)/2] }
	// The memory just after READY, and again at the end of the idle window: a Go process's heap
	// grows with its garbage until the garbage collector's goal, so the second is the one that lasts.
	mem := func(when string) error {
		var rss, anon, pss []float64
		for _, p := range pids {
			m, err := memory(p)
			if err != nil {
				return err
			}
			rss, anon, pss = append(rss, m["Rss:"]), append(anon, m["Anonymous:"]), append(pss, m["Pss:"])
		}
		fmt.Printf("  shim memory %s, median of %d idle READY workers: RSS %.1f MB, of which private (anonymous) %.1f MB; PSS %.1f MB\n",
			when, len(rss), med(rss), med(anon), med(pss))
		return nil
	}
	if err := mem("when READY"); err != nil {
		return err
	}
	ticks0 := 0
	for _, p := range pids {
		t, _ := cpuTicks(p)
		ticks0 += t
	}
	time.Sleep(idleFor) // the measurement window itself, not a synchronisation
	ticks1 := 0
	for _, p := range pids {
		t, _ := cpuTicks(p)
		ticks1 += t
	}
	const hz = 100 // USER_HZ on Linux
	cpu := float64(ticks1-ticks0) / hz / idleFor.Seconds() / float64(len(pids)) * 100
	if err := mem(fmt.Sprintf("after %v idle", idleFor)); err != nil {
		return err
	}
	fmt.Printf("  shim CPU while idle (health check every 1s, heartbeat every 1s): %.3f%% of one core each, over %v\n", cpu, idleFor)
	for i := range pids {
		if _, err := q.DeleteWorker(ctx, &rbeev1.DeleteWorkerRequest{WorkerId: fmt.Sprintf("idle%d", i)}); err != nil {
			return fmt.Errorf("delete idle worker: %w", err)
		}
	}
	return nil
}

func awaitHive(ctx context.Context, q rbeev1.QueenServiceClient) error {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		hs, err := q.ListHives(ctx, &rbeev1.ListHivesRequest{})
		if err == nil && len(hs.GetHives()) == 1 {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return errors.New("the hive did not register within 10s")
}

// directStart starts the server itself and polls its health every millisecond until 200.
func directStart(stub string, load time.Duration) (time.Duration, error) {
	port := strings.TrimPrefix(loopback.FreeAddr(), "127.0.0.1:")
	t0 := time.Now()
	cmd := exec.Command(stub, "--openai", "--model", "bench", "--port", port, "--load-time", load.String())
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	defer func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() }()
	p, _ := strconv.Atoi(port)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ok := firstOK(ctx, uint32(p), time.Millisecond)
	if ok.IsZero() {
		return 0, errors.New("direct server never became healthy")
	}
	return ok.Sub(t0), nil
}

// firstOK polls http://127.0.0.1:port/health every interval and returns when it first answered
// 200 (zero if ctx ends first).
func firstOK(ctx context.Context, port uint32, interval time.Duration) time.Time {
	url := "http://127.0.0.1:" + strconv.Itoa(int(port)) + "/health"
	client := &http.Client{Timeout: time.Second, Transport: &http.Transport{Proxy: nil}}
	defer client.CloseIdleConnections()
	for ctx.Err() == nil {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if resp, err := client.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return time.Now()
			}
		}
		time.Sleep(interval)
	}
	return time.Time{}
}

// serverStarted is when worker-shim started the server, from its log line in the worker's log.
func serverStarted(path string) (time.Time, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return time.Time{}, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		var m struct {
			Time   time.Time `json:"time"`
			Action string    `json:"action"`
		}
		if json.Unmarshal([]byte(line), &m) == nil && m.Action == "worker_server_started" {
			return m.Time, nil
		}
	}
	return time.Time{}, fmt.Errorf("%s: no worker_server_started line", path)
}

// memory reads /proc/PID/smaps_rollup in MB: Rss, Pss (file-backed pages shared between the
// shims counted once overall) and Anonymous (the shim's own).
func memory(pid int) (map[string]float64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/smaps_rollup")
	if err != nil {
		return nil, err
	}
	out := map[string]float64{}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 {
			if kb, err := strconv.Atoi(f[1]); err == nil {
				out[f[0]] = float64(kb) / 1024
			}
		}
	}
	return out, nil
}

// cpuTicks is utime+stime of pid (fields 14 and 15 of /proc/PID/stat).
func cpuTicks(pid int) (int, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	u, _ := strconv.Atoi(f[11])
	st, _ := strconv.Atoi(f[12])
	return u + st, nil
}

func pct(ds []time.Duration, p int) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, len(s)*p/100)]
}

func report(name string, ds []time.Duration) {
	fmt.Printf("  %-48s p50 %7.2f ms  p99 %7.2f ms  max %7.2f ms\n", name, ms(pct(ds, 50)), ms(pct(ds, 99)), ms(pct(ds, 100)))
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func abs(p string) string {
	a, err := filepath.Abs(p)
	if err != nil {
		return p
	}
	return a
}
