// Command lifecycle measures the worker lifecycle on this machine with the real binaries: the
// hive's Spawn and Delete over gRPC (graceful and grace 0), and the queen's SpawnWorker with
// wait_ready and DeleteWorker. It starts its own hive and queen on loopback, runs a bounded number
// of cycles, prints percentiles, and stops everything it started.
//
//	go run ./bench/lifecycle -bin bin -n 200
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/rbee-dev/rbee/bench/internal/loopback"
	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

func main() {
	bin := flag.String("bin", "bin", "directory with the queen, hive and worker-stub binaries")
	n := flag.Int("n", 200, "cycles per measurement (at most 5000)")
	queenN := flag.Int("queen-n", 20, "cycles of SpawnWorker(wait_ready)+DeleteWorker through the queen (at most 1000)")
	supervisor := flag.Bool("supervisord", true, "also measure supervisord starting and stopping the same program, when supervisord is on PATH (bench/install-supervisor.sh)")
	flag.DurationVar(&pause, "pause", 0, "idle time before each measured Spawn/start and Delete/stop, here and in supervisord (0: back to back); a hive spawns and deletes seconds apart in production, and an idle machine takes slower paths (sleeping CPUs and threads, cold caches, the kernel's deferred work), which back-to-back cycles never show")
	flag.StringVar(&hiveWorker, "hive-worker", "sleep", "worker for the hive figures: sleep (a process that exits at once on SIGTERM, as the targets assume) or stub (worker-stub, which shuts down gracefully)")
	flag.Parse()
	if hiveWorker != "sleep" && hiveWorker != "stub" {
		fmt.Fprintln(os.Stderr, "lifecycle: -hive-worker is sleep or stub")
		os.Exit(2)
	}
	if *n < 1 || *n > 5000 || *queenN < 0 || *queenN > 1000 || pause < 0 || pause > time.Second {
		fmt.Fprintln(os.Stderr, "lifecycle: -n must be 1..5000, -queen-n 0..1000 and -pause 0..1s")
		os.Exit(2)
	}
	if err := run(*bin, *n, *queenN, *supervisor); err != nil {
		fmt.Fprintln(os.Stderr, "lifecycle:", err)
		os.Exit(1)
	}
}

var (
	hiveWorker string
	pause      time.Duration
)

func run(bin string, n, queenN int, supervisor bool) error {
	dir, err := os.MkdirTemp("", "rbee-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	// The hive-level figures measure the hive alone: workers that never call a queen.
	quiet := filepath.Join(dir, "quiet-worker")
	script := "#!/bin/sh\nexec " + abs(filepath.Join(bin, "worker-stub")) + " --no-heartbeat \"$@\"\n"
	if hiveWorker == "sleep" {
		script = "#!/bin/sh\nexec sleep 600\n"
	}
	if err := os.WriteFile(quiet, []byte(script), 0o755); err != nil {
		return err
	}
	hiveAddr := loopback.FreeAddr()
	hive, err := loopback.Start(filepath.Join(bin, "hive"), "--listen", hiveAddr, "--hive-id", "bench", "--register=false",
		"--worker-binary", quiet, "--log-dir", filepath.Join(dir, "logs"), "--log-level", "warn")
	if err != nil {
		return err
	}
	defer loopback.Stop(hive)
	conn, err := grpc.NewClient(hiveAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := loopback.AwaitServing(conn); err != nil {
		return fmt.Errorf("hive: %w", err)
	}
	hc := rbeev1.NewHiveServiceClient(conn)
	ctx := context.Background()

	var spawn, graceful, force []time.Duration
	for i := 0; i < n; i++ {
		for _, grace := range []time.Duration{time.Second, 0} {
			id := fmt.Sprintf("b%d-%d", i, grace/time.Second)
			idle()
			t0 := time.Now()
			sp, err := hc.Spawn(ctx, &rbeev1.SpawnRequest{WorkerId: id, Model: "bench", Device: "cpu", QueenAddress: "127.0.0.1:1"})
			if err != nil {
				return fmt.Errorf("spawn: %w", err)
			}
			spawn = append(spawn, time.Since(t0))
			// Delete a worker that is up (exec'd, its SIGTERM handler installed), as in production.
			if err := awaitUp(sp.GetPid(), sp.GetPort()); err != nil {
				return err
			}
			idle()
			t0 = time.Now()
			d, err := hc.Delete(ctx, &rbeev1.DeleteRequest{WorkerId: id, Pid: sp.GetPid(), ProcessStartTime: sp.GetProcessStartTime(), GracePeriod: durationpb.New(grace)})
			took := time.Since(t0)
			if err != nil {
				return fmt.Errorf("delete: %w", err)
			}
			if grace > 0 {
				if d.GetOutcome() != rbeev1.DeleteOutcome_DELETE_OUTCOME_EXITED {
					return fmt.Errorf("graceful delete: outcome %v", d.GetOutcome())
				}
				graceful = append(graceful, took)
			} else {
				if d.GetOutcome() != rbeev1.DeleteOutcome_DELETE_OUTCOME_KILLED {
					return fmt.Errorf("grace-0 delete: outcome %v", d.GetOutcome())
				}
				force = append(force, took)
			}
		}
	}
	fmt.Printf("hive over gRPC, %d cycles each, worker %s, pause %v (machine: %d CPUs)\n", n, hiveWorker, pause, numCPU())
	report("Spawn (RPC in, PID out)", spawn)
	report("Delete graceful (exits at once on SIGTERM)", graceful)
	report("Delete grace 0 (SIGKILL)", force)
	if _, err := exec.LookPath("supervisord"); supervisor && err == nil {
		if err := benchSupervisord(dir, quiet, n); err != nil {
			return fmt.Errorf("supervisord: %w", err)
		}
	}
	if queenN == 0 {
		return nil
	}
	return benchQueen(bin, dir, queenN)
}

func benchQueen(bin, dir string, n int) error {
	queenAddr, hiveAddr := loopback.FreeAddr(), loopback.FreeAddr()
	queen, err := loopback.Start(filepath.Join(bin, "queen"), "--listen", queenAddr, "--hive", "bq="+hiveAddr, "--log-level", "warn")
	if err != nil {
		return err
	}
	defer loopback.Stop(queen)
	hive, err := loopback.Start(filepath.Join(bin, "hive"), "--listen", hiveAddr, "--hive-id", "bq", "--queen", queenAddr,
		"--log-dir", filepath.Join(dir, "qlogs"), "--log-level", "warn")
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
	hconn, err := grpc.NewClient(hiveAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer hconn.Close()
	if err := loopback.AwaitServing(hconn); err != nil {
		return fmt.Errorf("hive: %w", err)
	}
	q := rbeev1.NewQueenServiceClient(conn)
	ctx := context.Background()
	var spawn, del []time.Duration
	for i := 0; i < n; i++ {
		id := "q" + strconv.Itoa(i)
		t0 := time.Now()
		if _, err := q.SpawnWorker(ctx, &rbeev1.SpawnWorkerRequest{WorkerId: id, Model: "bench", WaitReady: true}); err != nil {
			return fmt.Errorf("SpawnWorker: %w", err)
		}
		spawn = append(spawn, time.Since(t0))
		t0 = time.Now()
		d, err := q.DeleteWorker(ctx, &rbeev1.DeleteWorkerRequest{WorkerId: id})
		if err != nil {
			return fmt.Errorf("DeleteWorker: %w", err)
		}
		if d.GetOutcome() != rbeev1.DeleteOutcome_DELETE_OUTCOME_EXITED {
			return fmt.Errorf("DeleteWorker: outcome %v", d.GetOutcome())
		}
		del = append(del, time.Since(t0))
	}
	fmt.Printf("queen end to end, %d cycles\n", n)
	report("SpawnWorker wait_ready (spawn to first READY beat)", spawn)
	report("DeleteWorker graceful", del)
	return nil
}

func report(name string, ds []time.Duration) {
	slices.Sort(ds)
	pct := func(p float64) time.Duration { return ds[min(len(ds)-1, int(p*float64(len(ds))))] }
	fmt.Printf("  %-52s p50 %8.3fms  p99 %8.3fms  min %8.3fms  max %8.3fms\n", name,
		ms(pct(0.50)), ms(pct(0.99)), ms(ds[0]), ms(ds[len(ds)-1]))
}

// idle waits -pause before a measured call.
func idle() {
	if pause > 0 {
		time.Sleep(pause)
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// awaitUp waits until the worker is running: for worker-stub, until it serves; for sleep, until it
// has exec'd (its command line says sleep). Polling /proc here is the harness's set-up, outside
// the measured calls.
func awaitUp(pid int32, port uint32) error {
	if hiveWorker == "stub" {
		return awaitWorker(port)
	}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if b, err := os.ReadFile("/proc/" + strconv.Itoa(int(pid)) + "/cmdline"); err == nil && strings.HasPrefix(string(b), "sleep\x00") {
			return nil
		}
		time.Sleep(100 * time.Microsecond)
	}
	return fmt.Errorf("worker %d did not start", pid)
}

// awaitWorker waits until the worker's health service says SERVING, via the health Watch stream.
func awaitWorker(port uint32) error {
	conn, err := grpc.NewClient(net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	return loopback.AwaitServing(conn)
}

func abs(p string) string {
	a, err := filepath.Abs(p)
	if err != nil {
		return p
	}
	return a
}

func numCPU() int { return runtime.NumCPU() }
