package server

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/queen/registry"
)

// Decoding beat after beat into the same message gives exactly what a fresh decode gives: no field
// of an earlier beat survives into a later one, whatever is present or absent.
func TestCodecReuseDecodesLikeAFreshMessage(t *testing.T) {
	full := &rbeev1.WorkerHeartbeatRequest{Worker: &rbeev1.Worker{
		WorkerId: "w1", HiveId: "h1", Model: "m", Device: "cuda:0", Pid: 42, Port: 9100, State: rbeev1.WorkerState_WORKER_STATE_BUSY,
		ProcessStartTime: 7, LastHeartbeatTime: timestamppb.Now(), CreateTime: timestamppb.Now(), Address: "10.0.0.1",
		InFlight: 3, Concurrency: 4, StatusMessage: "loading",
	}}
	sparse := &rbeev1.WorkerHeartbeatRequest{Worker: &rbeev1.Worker{WorkerId: "w1", State: rbeev1.WorkerState_WORKER_STATE_READY}}
	withUnknown, _ := proto.Marshal(sparse)
	withUnknown = protowire.AppendTag(withUnknown, 99, protowire.VarintType)
	withUnknown = protowire.AppendVarint(withUnknown, 5)
	var emptyWorker []byte
	emptyWorker = protowire.AppendTag(emptyWorker, 1, protowire.BytesType)
	emptyWorker = protowire.AppendBytes(emptyWorker, nil)
	enc := func(m proto.Message) []byte {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	seq := [][]byte{enc(full), enc(sparse), enc(full), withUnknown, enc(&rbeev1.WorkerHeartbeatRequest{}), enc(full), emptyWorker, enc(sparse)}
	c := codec{encoding.GetCodecV2("proto")}
	reused := new(rbeev1.WorkerHeartbeatRequest)
	for i, b := range seq {
		if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(b)}, reused); err != nil {
			t.Fatalf("beat %d: %v", i, err)
		}
		fresh := new(rbeev1.WorkerHeartbeatRequest)
		if err := proto.Unmarshal(b, fresh); err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(reused, fresh) || (reused.Worker == nil) != (fresh.Worker == nil) {
			t.Fatalf("beat %d decodes to %v, a fresh decode to %v", i, reused, fresh)
		}
	}
	// Bad input is refused as by the plain codec.
	if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer([]byte{0x0a, 0x05, 0x0a})}, reused); err == nil {
		t.Fatal("a truncated message was accepted")
	}
}

// A heartbeat stream's beatMsg holds what a fresh decode of each beat gives; a beat byte for byte
// equal to the one before is recognised as such (and not decoded again), any other is decoded, a
// bad one is refused and forgotten, and a beat too large to keep is decoded every time.
func TestCodecSkipsOnlyRepeatedBeats(t *testing.T) {
	enc := func(m proto.Message) []byte {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	ready := enc(&rbeev1.WorkerHeartbeatRequest{Worker: &rbeev1.Worker{WorkerId: "w1", HiveId: "h1", Model: "m", Device: "cpu", Pid: 4, State: rbeev1.WorkerState_WORKER_STATE_READY}})
	busy := enc(&rbeev1.WorkerHeartbeatRequest{Worker: &rbeev1.Worker{WorkerId: "w1", HiveId: "h1", Model: "m", Device: "cpu", Pid: 4, State: rbeev1.WorkerState_WORKER_STATE_BUSY}})
	huge := enc(&rbeev1.WorkerHeartbeatRequest{Worker: &rbeev1.Worker{WorkerId: "w1", StatusMessage: strings.Repeat("x", maxKeptBeat)}})
	bad := []byte{0x0a, 0x05, 0x0a}
	c := codec{encoding.GetCodecV2("proto")}
	m := &beatMsg{req: new(rbeev1.WorkerHeartbeatRequest)}
	for i, step := range []struct {
		b          []byte
		same, fail bool
	}{
		{b: ready}, {b: ready, same: true}, {b: ready, same: true}, {b: busy}, {b: busy, same: true}, {b: ready},
		{b: bad, fail: true}, {b: ready}, {b: ready, same: true}, {b: huge}, {b: huge}, {b: ready}, {b: ready, same: true},
	} {
		err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(append([]byte(nil), step.b...))}, m)
		if step.fail {
			if err == nil {
				t.Fatalf("step %d: a truncated beat was accepted", i)
			}
			continue
		}
		if err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		if m.same != step.same {
			t.Fatalf("step %d: same = %v, want %v", i, m.same, step.same)
		}
		fresh := new(rbeev1.WorkerHeartbeatRequest)
		if err := proto.Unmarshal(step.b, fresh); err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(m.req, fresh) {
			t.Fatalf("step %d: holds %v, a fresh decode gives %v", i, m.req, fresh)
		}
	}
}

// A ListWorkersResponse goes on the wire as proto.Marshal would write it, page token and workers,
// while its workers' bytes are not copied; one without workers is marshaled as usual.
func TestCodecMarshalsListResponsesAsProto(t *testing.T) {
	reg := registry.New(registry.Config{})
	for i := range 30 {
		if _, err := reg.Beat(fullWorker(t, i)); err != nil {
			t.Fatal(err)
		}
	}
	q := New(Config{Registry: reg, QueenID: "q", Interval: time.Second})
	c := codec{encoding.GetCodecV2("proto")}
	for _, req := range []*rbeev1.ListWorkersRequest{{PageSize: 7}, {PageSize: 100}, {HiveId: "no-such-hive"}} {
		for range 3 { // again, with buffers the previous calls gave back
			resp, err := q.ListWorkers(t.Context(), req)
			if err != nil {
				t.Fatal(err)
			}
			want, err := proto.Marshal(resp)
			if err != nil {
				t.Fatal(err)
			}
			got, err := c.Marshal(resp)
			if err != nil {
				t.Fatal(err)
			}
			if b := got.Materialize(); !bytes.Equal(b, want) {
				t.Fatalf("%v: the codec wrote %d bytes unlike proto.Marshal's %d", req, len(b), len(want))
			}
			got.Free()
		}
	}
}
