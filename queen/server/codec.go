package server

import (
	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	protoenc "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// ServerCodec is the queen's gRPC codec: protobuf, like gRPC's own, except that a worker's
// heartbeat is decoded into the message of the previous beat on the same stream instead of a new
// one. A heartbeat stream receives a whole descriptor every beat; reusing the message spares the
// allocation (and the garbage collection) of two messages a beat. Give it to the server with
// grpc.ForceServerCodecV2.
func ServerCodec() grpc.ServerOption {
	return grpc.ForceServerCodecV2(codec{encoding.GetCodecV2(protoenc.Name)})
}

type codec struct{ encoding.CodecV2 }

func (c codec) Unmarshal(data mem.BufferSlice, v any) error {
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
