package console

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/rbee-dev/rbee/internal/validate"
	"github.com/rbee-dev/rbee/queen/fleet"
	"github.com/rbee-dev/rbee/queen/registry"
)

// workerJSON is a worker as the page shows it. Times are Unix milliseconds, 0 when unknown.
type workerJSON struct {
	ID      string `json:"id"`
	Hive    string `json:"hive"`
	Model   string `json:"model"`
	Device  string `json:"device"`
	State   string `json:"state"`
	PID     int32  `json:"pid,omitempty"`
	Port    uint32 `json:"port,omitempty"`
	Address string `json:"address,omitempty"` // "": the hive's host
	// InFlight is the requests the queen's router has on the worker; Concurrency what it takes at
	// once (0: not limited).
	InFlight    uint32 `json:"in_flight"`
	Concurrency uint32 `json:"concurrency,omitempty"`
	// Status says why a worker is UNHEALTHY (its health check's answer).
	Status  string `json:"status_message,omitempty"`
	Beat    int64  `json:"beat,omitempty"`
	Created int64  `json:"created,omitempty"`
}

func toWorker(w registry.Worker) workerJSON {
	return workerJSON{
		ID: w.ID, Hive: w.HiveID, Model: w.Model, Device: w.Device, State: w.State.String(),
		PID: w.PID, Port: w.Port, Address: w.Address, InFlight: w.InFlight, Concurrency: w.Concurrency, Status: w.StatusMessage, Beat: unixMilli(w.LastHeartbeat), Created: unixMilli(w.Created),
	}
}

// deviceJSON is a hive's device; memory in bytes, 0 when the hive does not know it.
type deviceJSON struct {
	Name        string `json:"name"`
	Description string `json:"description,omitempty"`
	MemoryTotal uint64 `json:"memory_total,omitempty"`
	MemoryUsed  uint64 `json:"memory_used,omitempty"`
}

// modelJSON is one model of a hive's catalog.
type modelJSON struct {
	Name        string   `json:"name"`
	Devices     []string `json:"devices,omitempty"`
	Concurrency uint32   `json:"concurrency,omitempty"`
	LoadTimeout string   `json:"load_timeout,omitempty"`
	TTL         string   `json:"ttl,omitempty"`
	Grace       string   `json:"grace,omitempty"`
}

func durationText(d time.Duration) string {
	if d == 0 {
		return ""
	}
	return d.String()
}

type hiveJSON struct {
	ID      string       `json:"id"`
	Address string       `json:"address"`
	State   string       `json:"state"`
	Static  bool         `json:"static,omitempty"`
	Version string       `json:"version,omitempty"`
	OS      string       `json:"os,omitempty"`
	Devices []deviceJSON `json:"devices"`
	// Models is the hive's catalog; null: it serves any model with its --worker-binary.
	Models    []modelJSON `json:"models"`
	FreePorts uint32      `json:"free_ports"`
	Workers   int         `json:"workers"`
	Beat      int64       `json:"beat,omitempty"`
}

func toHive(h registry.Hive) hiveJSON {
	out := hiveJSON{
		ID: h.ID, Address: h.Address, State: h.State.String(), Static: h.Static, Version: h.Version, OS: h.OS,
		Devices: []deviceJSON{}, FreePorts: h.FreePorts, Workers: h.Workers, Beat: unixMilli(h.LastHeartbeat),
	}
	for _, d := range h.DeviceInfo {
		out.Devices = append(out.Devices, deviceJSON{Name: d.Name, Description: d.Description, MemoryTotal: d.MemoryTotal, MemoryUsed: d.MemoryUsed})
	}
	if len(h.DeviceInfo) == 0 { // a hive that reports only its devices' names
		for _, d := range h.Devices {
			out.Devices = append(out.Devices, deviceJSON{Name: d})
		}
	}
	for _, m := range h.Models {
		out.Models = append(out.Models, modelJSON{Name: m.Name, Devices: m.Devices, Concurrency: m.Concurrency,
			LoadTimeout: durationText(m.LoadTimeout), TTL: durationText(m.TTL), Grace: durationText(m.Grace)})
	}
	return out
}

func (c *Console) hiveList() []hiveJSON {
	hs := c.cfg.Registry.ListHives()
	out := make([]hiveJSON, len(hs))
	for i, h := range hs {
		out[i] = toHive(h)
	}
	return out
}

func unixMilli(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixMilli()
}

func (c *Console) hives(w http.ResponseWriter, _ *http.Request, _ session) {
	writeJSON(w, http.StatusOK, c.hiveList())
}

// maxBeatIDs bounds one beats query: the page asks only for the rows on screen.
const maxBeatIDs = 500

// beats returns the last heartbeat time of the given workers. The watch leaves beats out (at
// 10,000 workers they would be 10,000 events a second that change nothing else), so the page
// asks for the few rows it shows.
func (c *Console) beats(w http.ResponseWriter, r *http.Request, _ session) {
	ids := strings.Split(r.URL.Query().Get("ids"), ",")
	if len(ids) > maxBeatIDs {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("ids: %d given, at most %d", len(ids), maxBeatIDs))
		return
	}
	out := make(map[string]int64, len(ids))
	for _, id := range ids {
		if wk, ok := c.cfg.Registry.Get(id); ok {
			out[id] = unixMilli(wk.LastHeartbeat)
		}
	}
	writeJSON(w, http.StatusOK, out)
}

type spawnRequest struct {
	Model  string `json:"model"`
	Hive   string `json:"hive"`
	Device string `json:"device"`
}

// spawn starts a worker and answers at once with it STARTING; the page follows it to READY, or
// to its removal and the reason, on its event stream.
func (c *Console) spawn(w http.ResponseWriter, r *http.Request, _ session) {
	var in spawnRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 8192))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&in); err != nil {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("want a JSON body {\"model\", \"hive\", \"device\"}: %v", err))
		return
	}
	wk, err := c.cfg.Fleet.Spawn(r.Context(), fleet.SpawnSpec{Model: in.Model, HiveID: in.Hive, Device: in.Device})
	if err != nil {
		writeError(w, fleetStatus(err), err.Error())
		return
	}
	writeJSON(w, http.StatusCreated, toWorker(wk))
}

type deleteResponse struct {
	Outcome string     `json:"outcome"`
	Worker  workerJSON `json:"worker"`
}

// deleteWorker stops a worker through its hive; ?grace=10s sets the grace period (absent: the
// hive's default).
func (c *Console) deleteWorker(w http.ResponseWriter, r *http.Request, _ session) {
	grace := time.Duration(-1)
	if g := r.URL.Query().Get("grace"); g != "" {
		d, err := time.ParseDuration(g)
		if err != nil || d < 0 || d > validate.MaxGrace {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("grace %q: want a duration from 0s to %v, like 10s", g, validate.MaxGrace))
			return
		}
		grace = d
	}
	d, err := c.cfg.Fleet.Delete(r.Context(), r.PathValue("id"), grace)
	if err != nil {
		writeError(w, fleetStatus(err), err.Error())
		return
	}
	writeJSON(w, http.StatusOK, deleteResponse{
		Outcome: strings.TrimPrefix(d.Outcome.String(), "DELETE_OUTCOME_"), Worker: toWorker(d.Worker),
	})
}

func fleetStatus(err error) int {
	switch fleet.KindOf(err) {
	case fleet.KindInvalid:
		return http.StatusBadRequest
	case fleet.KindNotFound:
		return http.StatusNotFound
	case fleet.KindExists, fleet.KindAborted:
		return http.StatusConflict
	case fleet.KindFailedPrecondition:
		return http.StatusPreconditionFailed
	case fleet.KindUnavailable:
		return http.StatusServiceUnavailable
	case fleet.KindResourceExhausted:
		return http.StatusTooManyRequests
	case fleet.KindDeadline:
		return http.StatusGatewayTimeout
	case fleet.KindCanceled:
		return 499
	case fleet.KindUnimplemented:
		return http.StatusNotImplemented
	case fleet.KindUnauthenticated:
		return http.StatusUnauthorized
	case fleet.KindPermissionDenied:
		return http.StatusForbidden
	}
	return http.StatusInternalServerError
}

// maxChatBody bounds a chat request the console forwards.
const maxChatBody = 1 << 20

// chat hands the page's chat request to the queen's OpenAI API as POST /v1/chat/completions,
// with the session's API key when it has one and without the console's cookie.
func (c *Console) chat(w http.ResponseWriter, r *http.Request, s session) {
	if c.cfg.Chat == nil {
		writeError(w, http.StatusServiceUnavailable, "this queen serves no OpenAI API (--http-listen off)")
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxChatBody))
	if err != nil {
		writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("chat request: %v", err))
		return
	}
	out := r.Clone(r.Context())
	out.URL.Path, out.URL.RawPath, out.RequestURI = "/v1/chat/completions", "", ""
	out.Body, out.ContentLength = io.NopCloser(bytes.NewReader(body)), int64(len(body))
	out.Header = http.Header{"Content-Type": {"application/json"}, "Accept": r.Header.Values("Accept")}
	if s.key != "" {
		out.Header.Set("Authorization", "Bearer "+s.key)
	}
	c.cfg.Chat.ServeHTTP(w, out)
}

// maxTail bounds the lines a log view asks for.
const maxTail = 10000

// logs streams a worker's log as server-sent events: "data" events carry text (JSON strings),
// one "end" event says why the stream ended.
func (c *Console) logs(w http.ResponseWriter, r *http.Request, _ session) {
	if c.cfg.Logs == nil {
		writeError(w, http.StatusNotImplemented, "this queen cannot relay worker logs yet")
		return
	}
	id := r.PathValue("id")
	if err := validate.ID("worker id", id); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	tail := uint64(0)
	if t := r.URL.Query().Get("tail"); t != "" {
		if _, err := fmt.Sscan(t, &tail); err != nil || tail > maxTail {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("tail %q: want 0 to %d lines", t, maxTail))
			return
		}
	}
	follow := r.URL.Query().Get("follow") == "1"
	ctx, cancel := c.streamContext(r)
	defer cancel()
	sse := startSSE(w)
	err := c.cfg.Logs.Logs(ctx, id, uint32(tail), follow, func(b []byte) error {
		return sse.send("", string(b))
	})
	switch {
	case err == nil:
		_ = sse.send("end", "the log ended")
	case r.Context().Err() != nil: // the page went away: nobody to tell
	case ctx.Err() != nil:
		_ = sse.send("end", "the queen is shutting down")
	default:
		_ = sse.send("end", err.Error())
	}
}

// sseWriter writes server-sent events and flushes each.
type sseWriter struct {
	w  http.ResponseWriter
	rc *http.ResponseController
}

func startSSE(w http.ResponseWriter) *sseWriter {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	_ = rc.SetWriteDeadline(time.Time{}) // a stream outlives any server write timeout
	_ = rc.Flush()
	return &sseWriter{w: w, rc: rc}
}

// send writes one event of type typ ("" for the default) with v as JSON data.
func (s *sseWriter) send(typ string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return s.raw(typ, b)
}

func (s *sseWriter) raw(typ string, data []byte) error {
	var buf bytes.Buffer
	if typ != "" {
		buf.WriteString("event: " + typ + "\n")
	}
	buf.WriteString("data: ")
	buf.Write(data) // JSON has no raw newlines
	buf.WriteString("\n\n")
	if _, err := s.w.Write(buf.Bytes()); err != nil {
		return err
	}
	return s.rc.Flush()
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, map[string]string{"error": msg})
}
