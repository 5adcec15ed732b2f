package cli

import (
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/queen/registry"
	"github.com/rbee-dev/rbee/queen/server"
)

// rbee worker ls shows every worker, however many pages the queen's answer takes, against the
// queen's real ListWorkers.
func TestWorkerLsPagesThroughAll(t *testing.T) {
	reg := registry.New(registry.Config{Interval: time.Second})
	const n = 2*server.DefaultPageSize + 345
	for i := range n {
		w := registry.Worker{ID: fmt.Sprintf("w%05d", i), HiveID: "h1", Model: "m", Device: "cpu", PID: int32(100 + i), Port: 9100, State: registry.StateReady}
		if i%2 == 1 {
			w.HiveID, w.State = "h2", registry.StateBusy
		}
		if _, err := reg.Beat(w); err != nil {
			t.Fatal(err)
		}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	rbeev1.RegisterQueenServiceServer(s, server.New(server.Config{Registry: reg, QueenID: "q"}))
	go func() { _ = s.Serve(l) }()
	t.Cleanup(s.Stop)
	addr := l.Addr().String()

	out, errOut, code := runCLI("--queen", addr, "worker", "ls", "-o", "json")
	if code != ExitOK {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	var resp struct {
		Workers []struct{ WorkerID string }
		Next    string `json:"nextPageToken"`
	}
	if err := json.Unmarshal([]byte(out), &resp); err != nil {
		t.Fatal(err)
	}
	if len(resp.Workers) != n || resp.Next != "" {
		t.Fatalf("worker ls -o json: %d workers (token %q), want %d", len(resp.Workers), resp.Next, n)
	}
	for i, w := range resp.Workers {
		if want := fmt.Sprintf("w%05d", i); w.WorkerID != want {
			t.Fatalf("worker %d is %q, want %q", i, w.WorkerID, want)
		}
	}
	out, errOut, code = runCLI("--queen", addr, "worker", "ls")
	if lines := strings.Count(out, "\n"); code != ExitOK || lines != n+1 {
		t.Fatalf("worker ls: exit %d, %d lines, want %d; %s", code, lines, n+1, errOut)
	}
	out, _, code = runCLI("--queen", addr, "worker", "ls", "--hive", "h2", "--state", "busy", "--model", "m")
	if lines := strings.Count(out, "\n"); code != ExitOK || lines != n/2+1 || strings.Contains(out, "READY") {
		t.Fatalf("worker ls with filters: exit %d, %d lines, want %d", code, lines, n/2+1)
	}
	if _, errOut, code := runCLI("--queen", addr, "worker", "ls", "--state", "sleepy"); code != ExitUsage {
		t.Fatalf("--state sleepy: exit %d, want %d (%s)", code, ExitUsage, errOut)
	}
}

// Before SYNCED a watch may carry changes to workers it has sent already; the table folds them in.
func TestApplyEventFoldsChangesBeforeSynced(t *testing.T) {
	ev := func(typ rbeev1.WatchEventType, id string, st rbeev1.WorkerState) *rbeev1.WatchWorkersResponse {
		return &rbeev1.WatchWorkersResponse{Type: typ, Worker: &rbeev1.Worker{WorkerId: id, State: st}}
	}
	const (
		added   = rbeev1.WatchEventType_WATCH_EVENT_TYPE_ADDED
		updated = rbeev1.WatchEventType_WATCH_EVENT_TYPE_UPDATED
		removed = rbeev1.WatchEventType_WATCH_EVENT_TYPE_REMOVED
		ready   = rbeev1.WorkerState_WORKER_STATE_READY
		busy    = rbeev1.WorkerState_WORKER_STATE_BUSY
	)
	var ws []*rbeev1.Worker
	for _, e := range []*rbeev1.WatchWorkersResponse{
		ev(added, "a", ready), ev(added, "c", ready), ev(updated, "a", busy), ev(removed, "c", ready),
		ev(added, "d", ready), ev(added, "b", ready), ev(removed, "zz", ready),
	} {
		ws = applyEvent(ws, e)
	}
	var got []string
	for _, w := range ws {
		got = append(got, w.GetWorkerId()+"="+strings.TrimPrefix(w.GetState().String(), "WORKER_STATE_"))
	}
	if strings.Join(got, " ") != "a=BUSY b=READY d=READY" {
		t.Fatalf("table = %v", got)
	}
	if ws = applyEvent(ws, &rbeev1.WatchWorkersResponse{Type: rbeev1.WatchEventType_WATCH_EVENT_TYPE_RESET}); len(ws) != 0 {
		t.Fatalf("after RESET: %v", ws)
	}
}
