package server

import (
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/metadata"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/queen/registry"
)

// BenchmarkListWorkers10k measures the queen's side of ListWorkers with 10,000 workers: the
// registry copy, the conversion to protobuf and the encoding that goes on the wire (through the
// queen's codec, as gRPC does), in one page.
func BenchmarkListWorkers10k(b *testing.B) {
	reg := registry.New(registry.Config{Interval: time.Second})
	for i := range 10000 {
		if _, err := reg.Beat(registry.Worker{ID: fmt.Sprintf("w-%05d", i), HiveID: "h1", Model: "llama-3-8b", Device: "cpu",
			PID: int32(1000 + i), Port: uint32(9100 + i%900), ProcessStartTime: 12345, State: registry.StateReady, Reported: registry.StateReady}); err != nil {
			b.Fatal(err)
		}
	}
	q := New(Config{Registry: reg, QueenID: "q", Interval: time.Second})
	c := codec{encoding.GetCodecV2("proto")}
	// As gRPC's server calls the handler, so that the wire's path is measured.
	ctx := grpc.NewContextWithServerTransportStream(b.Context(), methodStream(rbeev1.QueenService_ListWorkers_FullMethodName))
	b.ReportAllocs()
	for b.Loop() {
		resp, err := q.ListWorkers(ctx, &rbeev1.ListWorkersRequest{PageSize: MaxPageSize})
		if err != nil {
			b.Fatal(err)
		}
		data, err := c.Marshal(resp)
		if err != nil {
			b.Fatal(err)
		}
		data.Free() // as gRPC does once the message is written
	}
}

// methodStream is the grpc.ServerTransportStream of a unary call to a method, minus the transport.
type methodStream string

func (m methodStream) Method() string             { return string(m) }
func (methodStream) SetHeader(metadata.MD) error  { return nil }
func (methodStream) SendHeader(metadata.MD) error { return nil }
func (methodStream) SetTrailer(metadata.MD) error { return nil }
