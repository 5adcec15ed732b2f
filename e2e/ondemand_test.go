package e2e

import (
	"strings"
	"sync"
	"testing"
	"time"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// Models on demand through a real hive and its catalog: a burst for a model with no worker starts
// exactly one and every request is answered; the worker idle for its ttl is stopped; the next
// request starts another; a model whose server dies loading answers 503 with the server's reason.
func TestOnDemandBurstIdleStopAndFailedLoad(t *testing.T) {
	hid := uniqueID("ondemand")
	q, addr, api := startQueenHTTP(t, "--scale-up-after", "0", "--queue-size", "200")
	models := catalogFile(t, `models:
  demo:
    cmd: ["${SERVER}", "--port", "${PORT}", "--load-time", "300ms"]
    ttl: 2s
  broken:
    cmd: ["${SERVER}", "--port", "${PORT}", "--load-time", "100ms", "--fail-load", "ggml_cuda_init: CUDA out of memory", "--exit-code", "3"]
`)
	startHive(t, addr, hid, "--models", models)
	c, _ := dial(t, addr)
	url := api + "/v1/chat/completions"
	body := `{"model":"demo","messages":[{"role":"user","content":"hi"}],"max_tokens":4}`

	var wg sync.WaitGroup
	codes := make(chan int, 100)
	for range 100 {
		wg.Go(func() {
			resp, _ := postJSON(t, ctxT(t, 60*time.Second), url, body)
			codes <- resp.StatusCode
		})
	}
	wg.Wait()
	close(codes)
	for code := range codes {
		if code != 200 {
			t.Fatalf("a request of the burst ended %d", code)
		}
	}
	ws, err := c.ListWorkers(ctxT(t, 5*time.Second), &rbeev1.ListWorkersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(ws.GetWorkers()) != 1 {
		t.Fatalf("%d workers after a burst of 100, want exactly 1", len(ws.GetWorkers()))
	}
	id := ws.GetWorkers()[0].GetWorkerId()
	cleanupMarked(t, id)
	spawns := 0
	q.mu.Lock()
	for _, l := range q.lines {
		if l["action"] == "router_spawn" {
			spawns++
		}
	}
	q.mu.Unlock()
	if spawns != 1 {
		t.Fatalf("%d on-demand spawns logged, want 1", spawns)
	}

	// Idle for its ttl (2s): stopped, its processes gone.
	q.awaitAction("router_idle_stop")
	for deadline := time.Now().Add(15 * time.Second); ; {
		ws, err := c.ListWorkers(ctxT(t, 5*time.Second), &rbeev1.ListWorkersRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if len(ws.GetWorkers()) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("idle worker still listed 15s after its ttl: %v", ws.GetWorkers())
		}
		time.Sleep(50 * time.Millisecond)
	}
	// The registry forgets the worker when its supervisor closes its stream, a moment before the
	// supervisor itself has exited: wait for its processes, bounded, then check none is left.
	for _, pid := range markedProcs(id) {
		awaitExit(t, pid, 10*time.Second)
	}
	nothingLeft(t, id)

	// The next request starts another and is served.
	if resp, b := postJSON(t, ctxT(t, 60*time.Second), url, body); resp.StatusCode != 200 {
		t.Fatalf("request after the idle stop: %d %s", resp.StatusCode, b)
	}

	resp, b := postJSON(t, ctxT(t, 60*time.Second), url, strings.Replace(body, `"demo"`, `"broken"`, 1))
	if resp.StatusCode != 503 || !strings.Contains(b, "CUDA out of memory") || !strings.Contains(b, "worker_start_failed") {
		t.Fatalf("a model that fails to load: %d %s, want 503 worker_start_failed with the server's words", resp.StatusCode, b)
	}

	// The worker started after the idle stop outlives this queen by design: delete it, and check
	// that nothing of any worker is left.
	ws, err = c.ListWorkers(ctxT(t, 5*time.Second), &rbeev1.ListWorkersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range ws.GetWorkers() {
		if _, err := c.DeleteWorker(ctxT(t, 30*time.Second), &rbeev1.DeleteWorkerRequest{WorkerId: w.GetWorkerId()}); err != nil {
			t.Fatalf("deleting %s: %v", w.GetWorkerId(), err)
		}
		for _, pid := range markedProcs(w.GetWorkerId()) {
			awaitExit(t, pid, 10*time.Second)
		}
		nothingLeft(t, w.GetWorkerId())
	}
	if left := workersOf(hid); len(left) > 0 {
		t.Errorf("worker processes of hive %s left: %v", hid, left)
	}
}
