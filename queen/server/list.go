package server

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/internal/validate"
	"github.com/rbee-dev/rbee/queen/registry"
)

// ListWorkers page sizes (AIP-158): page_size 0 means the default, larger than the maximum means
// the maximum, negative is refused.
const (
	DefaultPageSize = 1000
	MaxPageSize     = 10000
)

// ListWorkers lists the registry's workers in ID order, filtered by hive, model and state, one
// page at a time.
//
// A worker's encoding is cached and reused while the worker is unchanged but for its heartbeat
// time, which is appended by hand: at 10,000 workers the conversion to protobuf and its encoding
// were most of the call. On the wire the page goes into the response as its encoded field 1, which
// is what proto.Marshal would have written; the gRPC client decodes it into workers as usual. An
// in-process caller (no gRPC call of this method in ctx) gets Workers filled instead: it would
// otherwise see an empty list.
func (q *Queen) ListWorkers(ctx context.Context, req *rbeev1.ListWorkersRequest) (*rbeev1.ListWorkersResponse, error) {
	f, err := listFilter(req)
	if err != nil {
		return nil, invalid(err)
	}
	size := int(req.GetPageSize())
	switch {
	case size < 0:
		return nil, invalid(&validate.Error{Field: "page_size", Rule: fmt.Sprintf("%d: want 0 (the default, %d) or more", size, DefaultPageSize)})
	case size == 0:
		size = DefaultPageSize
	case size > MaxPageSize:
		size = MaxPageSize
	}
	after := ""
	if tok := req.GetPageToken(); tok != "" {
		if after, err = parsePageToken(tok, f); err != nil {
			return nil, invalid(&validate.Error{Field: "page_token", Rule: err.Error()})
		}
	}
	page, _ := pages.Get().(*[]registry.Worker)
	if page == nil {
		page = new([]registry.Worker)
	}
	ws, more := q.reg.AppendPage((*page)[:0], f, after, size)
	resp := &rbeev1.ListWorkersResponse{}
	if more {
		resp.NextPageToken = pageToken(ws[len(ws)-1].ID, f)
	}
	if m, ok := grpc.Method(ctx); ok && m == rbeev1.QueenService_ListWorkers_FullMethodName {
		// gRPC marshals this very response: ServerCodec (or any protobuf codec) writes the
		// unknown field as it stands.
		resp.ProtoReflect().SetUnknown(q.listCache.encode(ws, q.reg.Len()))
	} else {
		resp.Workers = make([]*rbeev1.Worker, len(ws))
		for i, w := range ws {
			resp.Workers[i] = workerToProto(w)
		}
	}
	clear(ws) // hold no worker's strings until the next call
	*page = ws[:0]
	pages.Put(page)
	return resp, nil
}

// pages and listBufs keep ListWorkers' page of workers and its encoding from one call to the next
// (ServerCodec gives the encoding back once it is on the wire): a page of 10,000 workers is 2 MB of
// workers and 750 KB of encoding, and at 10,000 connected workers every collection that garbage
// brings on scans 10,000 goroutine stacks.
var (
	pages    sync.Pool // *[]registry.Worker
	listBufs = &bufPool{}
)

// bufPool is a mem.BufferPool of byte slices of any size.
type bufPool struct{ p sync.Pool }

func (bp *bufPool) Get(n int) *[]byte {
	if b, _ := bp.p.Get().(*[]byte); b != nil && cap(*b) >= n {
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n)
	return &b
}

func (bp *bufPool) Put(b *[]byte) { bp.p.Put(b) }

func listFilter(req *rbeev1.ListWorkersRequest) (registry.Filter, error) {
	var f registry.Filter
	if h := req.GetHiveId(); h != "" {
		if err := validate.ID("hive_id", h); err != nil {
			return f, err
		}
		f.HiveID = h
	}
	if m := req.GetModel(); m != "" {
		if err := validate.Model("model", m); err != nil {
			return f, err
		}
		f.Model = m
	}
	if s := req.GetState(); s != rbeev1.WorkerState_WORKER_STATE_UNSPECIFIED {
		st, ok := stateFromProto[s]
		if !ok {
			return f, &validate.Error{Field: "state", Rule: fmt.Sprintf("%v is not a worker state", s)}
		}
		f.State = st
	}
	return f, nil
}

var stateFromProto = func() map[rbeev1.WorkerState]registry.State {
	m := map[rbeev1.WorkerState]registry.State{}
	for s, p := range stateToProto {
		m[p] = s
	}
	return m
}()

// A page token is opaque to clients: base64url of a version byte, a hash of the filter it was
// made for (so it cannot continue a different listing) and the last worker id returned. Paging by
// id keeps tokens valid however the fleet changes between calls.
const pageTokenVersion = 1

func filterHash(f registry.Filter) uint64 {
	h := fnv.New64a()
	_, _ = fmt.Fprintf(h, "%s\x00%s\x00%d", f.HiveID, f.Model, f.State)
	return h.Sum64()
}

func pageToken(lastID string, f registry.Filter) string {
	b := make([]byte, 0, 9+len(lastID))
	b = append(b, pageTokenVersion)
	b = binary.BigEndian.AppendUint64(b, filterHash(f))
	b = append(b, lastID...)
	return base64.RawURLEncoding.EncodeToString(b)
}

var errBadToken = errors.New("not a page token of this queen's ListWorkers; start again without one")

func parsePageToken(tok string, f registry.Filter) (string, error) {
	b, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil || len(b) < 10 || b[0] != pageTokenVersion {
		return "", errBadToken
	}
	if binary.BigEndian.Uint64(b[1:9]) != filterHash(f) {
		return "", errors.New("made for other hive_id, model or state filters: send the same filters as the call that returned it")
	}
	id := string(b[9:])
	if validate.ID("", id) != nil {
		return "", errBadToken
	}
	return id, nil
}

// encodingCache keeps each worker's encoded descriptor without its heartbeat time, keyed by worker
// id and checked against the whole Worker value, so any change but a beat re-encodes it.
type encodingCache struct {
	mu      sync.Mutex
	entries map[string]*encodedWorker
}

type encodedWorker struct {
	w registry.Worker // LastHeartbeat zeroed
	b []byte
}

// lastHeartbeatField is rbee.v1.Worker.last_heartbeat_time.
const lastHeartbeatField = 9

// encode returns ws as the wire bytes of repeated field 1 (ListWorkersResponse.workers). fleet is
// the number of workers in the registry, which bounds the cache.
func (c *encodingCache) encode(ws []registry.Worker, fleet int) protoreflect.RawFields {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.entries == nil || len(c.entries) > 2*fleet+1024 {
		// Forget workers long gone.
		c.entries = make(map[string]*encodedWorker, len(ws))
	}
	var out []byte
	for _, w := range ws {
		key := w
		key.LastHeartbeat = time.Time{}
		e := c.entries[w.ID]
		if e == nil || e.w != key {
			b, err := proto.Marshal(workerToProto(key))
			if err != nil {
				panic(fmt.Sprintf("encoding worker %s: %v", w.ID, err)) // a generated message of valid UTF-8 strings
			}
			e = &encodedWorker{w: key, b: b}
			c.entries[w.ID] = e
		}
		n := len(e.b)
		if !w.LastHeartbeat.IsZero() {
			n += sizeTimestamp(lastHeartbeatField, w.LastHeartbeat)
		}
		if out == nil {
			// Workers encode to similar sizes: size the buffer once from the first.
			out = (*listBufs.Get(len(ws) * (n + 8)))[:0]
		}
		out = protowire.AppendTag(out, 1, protowire.BytesType)
		out = protowire.AppendVarint(out, uint64(n))
		out = append(out, e.b...)
		if !w.LastHeartbeat.IsZero() {
			out = appendTimestamp(out, lastHeartbeatField, w.LastHeartbeat)
		}
	}
	return out
}

func timestampBody(t time.Time) (secs int64, nanos int32, n int) {
	secs, nanos = t.Unix(), int32(t.Nanosecond())
	if secs != 0 {
		n += 1 + protowire.SizeVarint(uint64(secs))
	}
	if nanos != 0 {
		n += 1 + protowire.SizeVarint(uint64(nanos))
	}
	return secs, nanos, n
}

// sizeTimestamp is the size of field num holding t as a google.protobuf.Timestamp.
func sizeTimestamp(num protowire.Number, t time.Time) int {
	_, _, n := timestampBody(t)
	return protowire.SizeTag(num) + protowire.SizeBytes(n)
}

// appendTimestamp appends field num as a google.protobuf.Timestamp, as proto.Marshal would.
func appendTimestamp(b []byte, num protowire.Number, t time.Time) []byte {
	secs, nanos, n := timestampBody(t)
	b = protowire.AppendTag(b, num, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(n))
	if secs != 0 {
		b = protowire.AppendTag(b, 1, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(secs))
	}
	if nanos != 0 {
		b = protowire.AppendTag(b, 2, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(nanos))
	}
	return b
}
