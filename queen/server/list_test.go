package server

import (
	"fmt"
	"reflect"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/queen/registry"
)

// fullWorker returns a worker with every field set to something not zero, found by reflection, so
// that a field added to registry.Worker later is covered too.
func fullWorker(t *testing.T, i int) registry.Worker {
	t.Helper()
	w := registry.Worker{}
	v := reflect.ValueOf(&w).Elem()
	for f := range v.NumField() {
		fv := v.Field(f)
		switch fv.Kind() {
		case reflect.String:
			fv.SetString(fmt.Sprintf("%s-%d", v.Type().Field(f).Name, i))
		case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
			fv.SetInt(int64(7 + i))
		case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
			fv.SetUint(uint64(2 + i%3)) // a valid State for the state fields
		case reflect.Bool:
			fv.SetBool(true)
		case reflect.Struct:
			if fv.Type() == reflect.TypeFor[time.Time]() {
				fv.Set(reflect.ValueOf(time.Date(2026, 11, 28, 1, 2, 3, 456789+i, time.UTC)))
				continue
			}
			fallthrough
		default:
			t.Fatalf("fullWorker does not know how to fill %s (%s)", v.Type().Field(f).Name, fv.Type())
		}
	}
	return w
}

// The cached encoding must decode to exactly what converting the worker gives, heartbeat time
// included, before and after the worker changes.
func TestListEncodingMatchesConversion(t *testing.T) {
	var c encodingCache
	check := func(ws []registry.Worker) {
		t.Helper()
		resp := &rbeev1.ListWorkersResponse{}
		resp.ProtoReflect().SetUnknown(c.encode(ws, len(ws)))
		b, err := proto.Marshal(resp)
		if err != nil {
			t.Fatal(err)
		}
		got := &rbeev1.ListWorkersResponse{}
		if err := proto.Unmarshal(b, got); err != nil {
			t.Fatal(err)
		}
		if len(got.GetWorkers()) != len(ws) {
			t.Fatalf("decoded %d workers, want %d", len(got.GetWorkers()), len(ws))
		}
		for i, w := range ws {
			if want := workerToProto(w); !proto.Equal(got.GetWorkers()[i], want) {
				t.Errorf("worker %d decodes to\n%v\nwant\n%v", i, got.GetWorkers()[i], want)
			}
		}
	}
	ws := []registry.Worker{fullWorker(t, 0), fullWorker(t, 1), fullWorker(t, 2)}
	ws[2].LastHeartbeat = time.Time{} // never beat
	check(ws)
	ws[0].LastHeartbeat = ws[0].LastHeartbeat.Add(time.Second) // a beat
	ws[1].Model = "changed"                                    // a change
	ws[1].State = registry.StateStale
	check(ws)
	check(ws) // from the cache
	ws[0].LastHeartbeat = time.Unix(0, 0)
	check(ws)
}

func listIDs(resp *rbeev1.ListWorkersResponse) []string {
	var ids []string
	for _, w := range resp.GetWorkers() {
		ids = append(ids, w.GetWorkerId())
	}
	return ids
}

func TestListWorkersPagesAndFilters(t *testing.T) {
	e := newEnv(t, Config{})
	for i := range 25 {
		w := registry.Worker{ID: fmt.Sprintf("w%02d", i), HiveID: []string{"h1", "h2"}[i%2], Model: []string{"a", "b"}[i%5/4],
			Device: "cpu", PID: int32(100 + i), Port: 9100, State: registry.StateReady}
		if i%3 == 0 {
			w.State = registry.StateBusy
		}
		if _, err := e.reg.Beat(w); err != nil {
			t.Fatal(err)
		}
	}
	walk := func(req *rbeev1.ListWorkersRequest) (ids []string, pages int) {
		t.Helper()
		for {
			resp, err := e.queen.ListWorkers(t.Context(), req)
			if err != nil {
				t.Fatalf("ListWorkers(%v): %v", req, err)
			}
			pages++
			ids = append(ids, listIDs(resp)...)
			if resp.GetNextPageToken() == "" {
				return ids, pages
			}
			req.PageToken = resp.GetNextPageToken()
		}
	}
	for _, tt := range []struct {
		req         *rbeev1.ListWorkersRequest
		want, pages int
	}{
		{&rbeev1.ListWorkersRequest{}, 25, 1},
		{&rbeev1.ListWorkersRequest{PageSize: 10}, 25, 3},
		{&rbeev1.ListWorkersRequest{PageSize: 25}, 25, 1},
		{&rbeev1.ListWorkersRequest{PageSize: 1, HiveId: "h2"}, 12, 12},
		{&rbeev1.ListWorkersRequest{PageSize: 2, Model: "b"}, 5, 3},
		{&rbeev1.ListWorkersRequest{PageSize: 3, State: rbeev1.WorkerState_WORKER_STATE_BUSY}, 9, 3},
		{&rbeev1.ListWorkersRequest{HiveId: "h1", Model: "a", State: rbeev1.WorkerState_WORKER_STATE_READY}, 6, 1},
		{&rbeev1.ListWorkersRequest{State: rbeev1.WorkerState_WORKER_STATE_STALE}, 0, 1},
		{&rbeev1.ListWorkersRequest{HiveId: "nope"}, 0, 1},
	} {
		desc := fmt.Sprint(tt.req)
		ids, pages := walk(tt.req)
		if len(ids) != tt.want || pages != tt.pages {
			t.Errorf("%s: %d workers in %d pages, want %d in %d: %v", desc, len(ids), pages, tt.want, tt.pages, ids)
		}
		for i := 1; i < len(ids); i++ {
			if ids[i-1] >= ids[i] {
				t.Errorf("%s: not sorted or repeated: %v", desc, ids)
			}
		}
	}

	first, err := e.queen.ListWorkers(t.Context(), &rbeev1.ListWorkersRequest{PageSize: 5, HiveId: "h1"})
	if err != nil || first.GetNextPageToken() == "" {
		t.Fatalf("first page: %v, %v", first, err)
	}
	for _, tt := range []struct {
		name string
		req  *rbeev1.ListWorkersRequest
	}{
		{"negative page_size", &rbeev1.ListWorkersRequest{PageSize: -1}},
		{"garbage token", &rbeev1.ListWorkersRequest{PageToken: "not a token!"}},
		{"token of another listing", &rbeev1.ListWorkersRequest{PageToken: first.GetNextPageToken(), HiveId: "h2"}},
		{"token with another model", &rbeev1.ListWorkersRequest{PageToken: first.GetNextPageToken(), HiveId: "h1", Model: "a"}},
		{"token from elsewhere", &rbeev1.ListWorkersRequest{PageToken: "AQAAAAAAAAAAAAAA"}},
		{"unknown state", &rbeev1.ListWorkersRequest{State: rbeev1.WorkerState(42)}},
		{"bad model", &rbeev1.ListWorkersRequest{Model: "a\nb"}},
		{"bad hive", &rbeev1.ListWorkersRequest{HiveId: "no way"}},
	} {
		_, err := e.queen.ListWorkers(t.Context(), tt.req)
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v, want INVALID_ARGUMENT", tt.name, err)
		}
	}
	// The token survives changes: the worker it points after is deleted, another is added.
	e.reg.Remove(listIDs(first)[4], nil)
	if _, err := e.reg.Beat(registry.Worker{ID: "w99", HiveID: "h1", PID: 999, State: registry.StateReady}); err != nil {
		t.Fatal(err)
	}
	rest, err := e.queen.ListWorkers(t.Context(), &rbeev1.ListWorkersRequest{PageToken: first.GetNextPageToken(), HiveId: "h1", PageSize: 100})
	if err != nil {
		t.Fatal(err)
	}
	if got := listIDs(rest); len(got) != 9 || got[0] != "w10" || got[8] != "w99" {
		t.Fatalf("after changes the next page is %v", got)
	}
}

func TestListWorkersPageSizeBounds(t *testing.T) {
	e := newEnv(t, Config{})
	for i := range MaxPageSize + 1 {
		if _, err := e.reg.Beat(registry.Worker{ID: fmt.Sprintf("w%05d", i), HiveID: "h1", PID: int32(100 + i)}); err != nil {
			t.Fatal(err)
		}
	}
	for _, tt := range []struct {
		size int32
		want int
	}{{0, DefaultPageSize}, {MaxPageSize, MaxPageSize}, {MaxPageSize + 1, MaxPageSize}, {1 << 30, MaxPageSize}} {
		resp, err := e.queen.ListWorkers(t.Context(), &rbeev1.ListWorkersRequest{PageSize: tt.size})
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.GetWorkers()) != tt.want || resp.GetNextPageToken() == "" {
			t.Errorf("page_size %d: %d workers, token %q; want %d and a token", tt.size, len(resp.GetWorkers()), resp.GetNextPageToken(), tt.want)
		}
	}
}

// A caller in the queen's own process (no gRPC call in between) gets the same workers as a gRPC
// client: the pre-encoded page is for the wire only, and an empty Workers would read as an empty
// fleet.
func TestListWorkersInProcessAndOverTheWireAgree(t *testing.T) {
	e := newEnv(t, Config{})
	for i := range 5 {
		w := fullWorker(t, i)
		w.HiveID, w.State, w.Reported = "h1", registry.StateReady, registry.StateReady
		if _, err := e.reg.Beat(w); err != nil {
			t.Fatal(err)
		}
	}
	for _, req := range []*rbeev1.ListWorkersRequest{{}, {PageSize: 2}, {HiveId: "h1", State: rbeev1.WorkerState_WORKER_STATE_READY}} {
		local, err := e.q.ListWorkers(t.Context(), req)
		if err != nil {
			t.Fatal(err)
		}
		wire, err := e.queen.ListWorkers(t.Context(), req)
		if err != nil {
			t.Fatal(err)
		}
		if len(local.GetWorkers()) == 0 || !proto.Equal(local, wire) {
			t.Fatalf("ListWorkers(%v) in process:\n%v\nover gRPC:\n%v\nwant the same, not empty", req, local, wire)
		}
	}
}
