package e2e

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// unreadWatchBound is the most a queen may hold with 1,000 workers beating, one changing state 200
// times a second, and 1,000 WatchWorkers streams that are never read (clients with gRPC's fixed
// 64 KiB windows): about 300 KB per stalled watch, most of it gRPC's queue of small messages
// (64 KiB of payload, some 700 messages of 250 bytes each), until --watch-send-timeout ends it.
// Before the watch bounds an unread watch kept its whole snapshot and queue for as long as it
// stayed open (issue 14: 591 MB with 1,000 of them).
const unreadWatchBound = 400 << 20

// Watches that are never read cost the queen a bounded amount and end (RESOURCE_EXHAUSTED) once
// they have taken nothing for --watch-send-timeout.
func TestUnreadWatchesAreBounded(t *testing.T) {
	const workers, watches, sendTimeout = 1000, 1000, 3 * time.Second
	q, addr := startQueen(t, "--watch-send-timeout", sendTimeout.String(), "--max-beats-per-second", "0",
		"--max-watchers", strconv.Itoa(watches), "--max-watchers-per-conn", "100")
	pid := q.cmd.Process.Pid
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	dialN := func(n int) []*grpc.ClientConn {
		conns := make([]*grpc.ClientConn, n)
		for i := range conns {
			// Fixed windows: gRPC's default dynamic window lets an unread client take megabytes
			// off the queen, which hides the queen's side of it.
			cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
				grpc.WithInitialWindowSize(1<<16), grpc.WithInitialConnWindowSize(1<<20))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cc.Close() })
			conns[i] = cc
		}
		return conns
	}

	// 1,000 workers beating once a second, and one more that changes state 200 times a second,
	// so that there is always news the unread watches do not take.
	beatConns := dialN(4)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	for i := range workers {
		wg.Go(func() {
			st, err := rbeev1.NewHeartbeatServiceClient(beatConns[i%len(beatConns)]).WorkerHeartbeat(ctx)
			if err != nil {
				return
			}
			w := &rbeev1.Worker{WorkerId: fmt.Sprintf("u%04d", i), HiveId: "load", Model: "m", Device: "cpu",
				Pid: int32(100000 + i), Port: 9100, ProcessStartTime: uint64(i + 1), State: rbeev1.WorkerState_WORKER_STATE_READY}
			tick := time.NewTicker(time.Second) // the load's own schedule
			defer tick.Stop()
			for {
				if st.Send(&rbeev1.WorkerHeartbeatRequest{Worker: w}) != nil {
					return
				}
				if _, err := st.Recv(); err != nil {
					return
				}
				select {
				case <-ctx.Done():
					return
				case <-tick.C:
				}
			}
		})
	}
	wg.Go(func() {
		st, err := rbeev1.NewHeartbeatServiceClient(beatConns[0]).WorkerHeartbeat(ctx)
		if err != nil {
			return
		}
		w := &rbeev1.Worker{WorkerId: "churn", HiveId: "churn", Model: "m", Device: "cpu", Pid: 99999, Port: 9100, ProcessStartTime: 1}
		tick := time.NewTicker(5 * time.Millisecond) // the load's own schedule
		defer tick.Stop()
		for n := 0; ; n++ {
			w.State = []rbeev1.WorkerState{rbeev1.WorkerState_WORKER_STATE_READY, rbeev1.WorkerState_WORKER_STATE_BUSY}[n%2]
			if st.Send(&rbeev1.WorkerHeartbeatRequest{Worker: w}) != nil {
				return
			}
			if _, err := st.Recv(); err != nil {
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	})
	// Every worker known: follow a watch that is read until it has seen them all.
	seen := map[string]bool{}
	w, err := rbeev1.NewQueenServiceClient(beatConns[0]).WatchWorkers(ctx, &rbeev1.WatchWorkersRequest{HiveId: "load"})
	if err != nil {
		t.Fatal(err)
	}
	for len(seen) < workers {
		ev, err := w.Recv()
		if err != nil {
			t.Fatalf("reading watch: %v (%d workers seen)", err, len(seen))
		}
		if ev.GetType() == rbeev1.WatchEventType_WATCH_EVENT_TYPE_ADDED {
			seen[ev.GetWorker().GetWorkerId()] = true
		}
	}

	// 1,000 unread watches, 100 on each of 10 connections.
	watchConns := dialN(watches / 100)
	var unread []rbeev1.QueenService_WatchWorkersClient
	for i := range watches - 1 { // the watch read above is one of the queen's 1,000
		st, err := openWatch(ctx, watchConns[i/100])
		if err != nil {
			t.Fatalf("watch %d: %v", i, err)
		}
		unread = append(unread, st)
	}

	// The queen's memory while they sit unread, until their buffers are full, through their send
	// timeout and after it.
	peak := int64(0)
	for end := time.Now().Add(5 * sendTimeout); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		peak = max(peak, vmRSS(t, pid))
	}
	t.Logf("queen RSS with %d workers beating and %d unread watches: peak %.1f MB (bound %d MB)", workers, len(unread), float64(peak)/(1<<20), unreadWatchBound>>20)
	if peak > unreadWatchBound {
		t.Errorf("queen RSS peaked at %.1f MB, over the %d MB bound", float64(peak)/(1<<20), unreadWatchBound>>20)
	}
	// The queen ended every one of them (that is what frees what they held)...
	q.awaitCount("watch_stalled", len(unread))
	// ...and a client that reads at last is told why. Reading one means reading the whole backlog
	// gRPC queued for it before the status, so a sample stands for the rest (all 999 would be
	// 300 MB of messages to decode, minutes on a busy 2-core machine under -race).
	codesSeen := map[codes.Code]int{}
	var mu sync.Mutex
	var readers sync.WaitGroup
	rctx, rcancel := context.WithTimeout(ctx, 2*time.Minute)
	defer rcancel()
	sample := unread[:10]
	for _, st := range sample {
		readers.Go(func() {
			for rctx.Err() == nil {
				if _, err := st.Recv(); err != nil {
					mu.Lock()
					codesSeen[status.Code(err)]++
					mu.Unlock()
					return
				}
			}
		})
	}
	readers.Wait()
	if codesSeen[codes.ResourceExhausted] != len(sample) {
		t.Errorf("unread watches read at last ended with %v, want all %d RESOURCE_EXHAUSTED", codesSeen, len(sample))
	}
}

// openWatch opens a watch of all workers and returns once the queen has accepted or refused it.
func openWatch(ctx context.Context, cc *grpc.ClientConn) (rbeev1.QueenService_WatchWorkersClient, error) {
	st, err := rbeev1.NewQueenServiceClient(cc).WatchWorkers(ctx, &rbeev1.WatchWorkersRequest{})
	if err != nil {
		return nil, err
	}
	// An accepted watch sends an event at once (the snapshot, or SYNCED); a refused one ends.
	_, err = st.Recv()
	return st, err
}

// Watches are limited per connection and in all: beyond, RESOURCE_EXHAUSTED naming the flag; a
// closed watch frees its place.
func TestWatchLimits(t *testing.T) {
	_, addr := startQueen(t, "--max-watchers", "3", "--max-watchers-per-conn", "2")
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var conns [3]*grpc.ClientConn
	for i := range conns {
		cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		conns[i] = cc
	}
	wctx, wcancel := context.WithCancel(ctx)
	if _, err := openWatch(wctx, conns[0]); err != nil {
		t.Fatal(err)
	}
	if _, err := openWatch(ctx, conns[0]); err != nil {
		t.Fatal(err)
	}
	if _, err := openWatch(ctx, conns[0]); status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "--max-watchers-per-conn") {
		t.Fatalf("a third watch on one connection: %v, want RESOURCE_EXHAUSTED naming --max-watchers-per-conn", err)
	}
	if _, err := openWatch(ctx, conns[1]); err != nil {
		t.Fatalf("a watch on another connection: %v", err)
	}
	if _, err := openWatch(ctx, conns[2]); status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "--max-watchers)") {
		t.Fatalf("a fourth watch: %v, want RESOURCE_EXHAUSTED naming --max-watchers", err)
	}
	wcancel() // the first watch ends; its place is free again
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := openWatch(ctx, conns[2])
		if err == nil {
			break
		}
		if status.Code(err) != codes.ResourceExhausted || time.Now().After(deadline) {
			t.Fatalf("after one watch ended: %v", err)
		}
		time.Sleep(20 * time.Millisecond) // the queen learns of the cancel asynchronously; poll its answer
	}
}

// vmRSS reads a process's resident set size in bytes.
func vmRSS(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.Fields(v)[0], 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmRSS in /proc/PID/status")
	return 0
}
