package server

import (
	"bytes"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	protoenc "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// ServerCodec is the queen's gRPC codec: protobuf, like gRPC's own, except for a worker's
// heartbeats, which a stream receives into a *beatMsg: a beat is decoded into the message of the
// previous beat on the same stream instead of a new one, and a beat that is byte for byte the
// previous one is not decoded at all. A worker sends its whole descriptor every beat, and almost
// always the same one: decoding it again cost a quarter of the queen's CPU per beat and four
// strings of garbage. Give it to the server with grpc.ForceServerCodecV2.
func ServerCodec() grpc.ServerOption {
	return grpc.ForceServerCodecV2(codec{encoding.GetCodecV2(protoenc.Name)})
}

type codec struct{ encoding.CodecV2 }

// Marshal is the protobuf codec's, except for a ListWorkersResponse: the workers ListWorkers
// encoded (the message's unknown bytes, see ListWorkers) go on the wire as they are, without the
// copy proto.Marshal would make, and back to listBufs once written. The response must not be read
// after: it no longer holds its workers.
func (c codec) Marshal(v any) (mem.BufferSlice, error) {
	resp, ok := v.(*rbeev1.ListWorkersResponse)
	if !ok {
		return c.CodecV2.Marshal(v)
	}
	m := resp.ProtoReflect()
	raw := []byte(m.GetUnknown())
	if len(raw) == 0 {
		return c.CodecV2.Marshal(v)
	}
	m.SetUnknown(nil)
	head, err := proto.Marshal(resp) // the page token
	if err != nil {
		return nil, err
	}
	return mem.BufferSlice{mem.SliceBuffer(head), mem.NewBuffer(&raw, listBufs)}, nil
}

// beatMsg is what a worker's heartbeat stream receives each beat into.
type beatMsg struct {
	req *rbeev1.WorkerHeartbeatRequest
	// last is the encoding of the beat req holds (nil: none kept); same says whether the beat
	// just received was equal to it, and so was not decoded again.
	last []byte
	same bool
}

// maxKeptBeat bounds the encoding a stream keeps to compare the next beat with: a descriptor is a
// few hundred bytes; a larger beat is decoded every time rather than held.
const maxKeptBeat = 2048

func (c codec) Unmarshal(data mem.BufferSlice, v any) error {
	if m, ok := v.(*beatMsg); ok {
		return c.unmarshalBeat(data, m)
	}
	req, ok := v.(*rbeev1.WorkerHeartbeatRequest)
	if !ok || req.Worker == nil {
		return c.CodecV2.Unmarshal(data, v)
	}
	// Reset in place and merge into the kept descriptor: the same result as a fresh decode.
	w := req.Worker
	proto.Reset(req)
	proto.Reset(w)
	req.Worker = w
	buf := data.MaterializeToBuffer(mem.DefaultBufferPool())
	defer buf.Free()
	b := buf.ReadOnlyData()
	if err := (proto.UnmarshalOptions{Merge: true}).Unmarshal(b, req); err != nil {
		return err
	}
	if !hasField(b, 1) {
		req.Worker = nil // absent on the wire: nil, as a fresh decode leaves it
	}
	return nil
}

func (c codec) unmarshalBeat(data mem.BufferSlice, m *beatMsg) error {
	buf := data.MaterializeToBuffer(mem.DefaultBufferPool())
	defer buf.Free()
	b := buf.ReadOnlyData()
	if m.last != nil && bytes.Equal(b, m.last) {
		m.same = true
		return nil
	}
	m.same, m.last = false, m.last[:0]
	if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(b)}, m.req); err != nil {
		m.last = nil
		return err
	}
	if len(b) > maxKeptBeat {
		m.last = nil
		return nil
	}
	m.last = append(m.last, b...)
	return nil
}

// hasField reports whether the encoded message b (already known to be well formed) holds field num.
func hasField(b []byte, num protowire.Number) bool {
	for len(b) > 0 {
		n, typ, l := protowire.ConsumeTag(b)
		if l < 0 {
			return false
		}
		if n == num {
			return true
		}
		b = b[l:]
		if l = protowire.ConsumeFieldValue(n, typ, b); l < 0 {
			return false
		}
		b = b[l:]
	}
	return false
}
