package cli

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// Output formats for -o.
const (
	formatTable = "table"
	formatJSON  = "json"
)

// marshal renders m as the queen sent it, in protojson (the field names grpcurl shows), with
// whitespace normalised: protojson deliberately varies its spacing, scripts should not see that.
func marshal(m proto.Message, indent bool) ([]byte, error) {
	b, err := protojson.MarshalOptions{EmitUnpopulated: false}.Marshal(m)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	if indent {
		err = json.Indent(&buf, b, "", "  ")
	} else {
		err = json.Compact(&buf, b)
	}
	if err != nil {
		return nil, err
	}
	buf.WriteByte('\n')
	return buf.Bytes(), nil
}

// writeJSON writes m as one indented JSON document.
func writeJSON(w io.Writer, m proto.Message) error {
	b, err := marshal(m, true)
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

// writeJSONLine writes m as one JSON object on one line (for streams).
func writeJSONLine(w io.Writer, m proto.Message) error {
	b, err := marshal(m, false)
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

// stateName is a worker state without its WORKER_STATE_ prefix, e.g. "READY".
func stateName(s rbeev1.WorkerState) string {
	return strings.TrimPrefix(s.String(), "WORKER_STATE_")
}

func hiveStateName(s rbeev1.HiveState) string {
	return strings.TrimPrefix(s.String(), "HIVE_STATE_")
}

// ago says how long before now t was, e.g. "3s ago"; "-" when t is unset.
func ago(t *timestamppb.Timestamp, now time.Time) string {
	if t == nil || !t.IsValid() || t.AsTime().IsZero() {
		return "-"
	}
	d := now.Sub(t.AsTime())
	if d < 0 {
		d = 0
	}
	return short(d) + " ago"
}

// short renders d coarsely, the way a person reads an age: "850ms", "12s", "4m5s", "3h2m", "2d3h".
func short(d time.Duration) string {
	switch {
	case d < time.Second:
		return d.Round(time.Millisecond).String()
	case d < time.Minute:
		return strconv.Itoa(int(d/time.Second)) + "s"
	case d < time.Hour:
		return fmt.Sprintf("%dm%ds", int(d/time.Minute), int(d%time.Minute/time.Second))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%dm", int(d/time.Hour), int(d%time.Hour/time.Minute))
	default:
		return fmt.Sprintf("%dd%dh", int(d/(24*time.Hour)), int(d%(24*time.Hour)/time.Hour))
	}
}

// orDash shows zero values as "-".
func orDash[T comparable](v T) string {
	var zero T
	if v == zero {
		return "-"
	}
	return fmt.Sprint(v)
}

func newTable(w io.Writer) *tabwriter.Writer { return tabwriter.NewWriter(w, 0, 0, 2, ' ', 0) }

// writeWorkers prints workers as an aligned table.
func writeWorkers(w io.Writer, ws []*rbeev1.Worker, now time.Time) error {
	tw := newTable(w)
	fmt.Fprintln(tw, "ID\tHIVE\tMODEL\tDEVICE\tSTATE\tIN-FLIGHT\tPID\tPORT\tLAST BEAT")
	for _, wk := range ws {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", wk.GetWorkerId(), wk.GetHiveId(), wk.GetModel(), wk.GetDevice(),
			stateName(wk.GetState()), inFlight(wk), orDash(wk.GetPid()), orDash(wk.GetPort()), ago(wk.GetLastHeartbeatTime(), now))
	}
	return tw.Flush()
}

// inFlight is the requests the queen's router has on a worker, out of its concurrency when that
// is limited ("2/4").
func inFlight(wk *rbeev1.Worker) string {
	if c := wk.GetConcurrency(); c > 0 {
		return fmt.Sprintf("%d/%d", wk.GetInFlight(), c)
	}
	return fmt.Sprint(wk.GetInFlight())
}

// writeWorker prints one worker as aligned "FIELD  value" lines.
func writeWorker(w io.Writer, wk *rbeev1.Worker, now time.Time) error {
	tw := newTable(w)
	created := "-"
	if wk.GetCreateTime() != nil {
		created = wk.GetCreateTime().AsTime().Local().Format(time.RFC3339) + " (" + ago(wk.GetCreateTime(), now) + ")"
	}
	for _, row := range [][2]string{
		{"ID", wk.GetWorkerId()},
		{"HIVE", wk.GetHiveId()},
		{"MODEL", wk.GetModel()},
		{"DEVICE", wk.GetDevice()},
		{"STATE", stateName(wk.GetState())},
		{"STATUS", orDash(wk.GetStatusMessage())}, // why, e.g. the failed health check of an UNHEALTHY worker
		{"CONCURRENCY", orDash(wk.GetConcurrency())},
		{"IN-FLIGHT", inFlight(wk)},
		{"PID", orDash(wk.GetPid())},
		{"PORT", orDash(wk.GetPort())},
		{"ADDRESS", orDash(wk.GetAddress())},
		{"PROCESS START", orDash(wk.GetProcessStartTime())},
		{"CREATED", created},
		{"LAST BEAT", ago(wk.GetLastHeartbeatTime(), now)},
	} {
		fmt.Fprintf(tw, "%s\t%s\n", row[0], row[1])
	}
	return tw.Flush()
}

// writeHives prints hives as an aligned table.
func writeHives(w io.Writer, hs []*rbeev1.Hive, now time.Time) error {
	tw := newTable(w)
	fmt.Fprintln(tw, "ID\tADDRESS\tSTATE\tWORKERS\tLAST BEAT\tSTATIC\tMODELS\tDEVICES")
	for _, h := range hs {
		static := "no"
		if h.GetStatic() {
			static = "yes"
		}
		// A hive without a catalog (no --models) serves any model with its worker binary.
		models := "any"
		if len(h.GetModels()) > 0 {
			names := make([]string, len(h.GetModels()))
			for i, m := range h.GetModels() {
				names[i] = m.GetName()
			}
			models = strings.Join(names, ",")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n", h.GetHiveId(), h.GetAddress(), hiveStateName(h.GetState()),
			h.GetWorkerCount(), ago(h.GetLastHeartbeatTime(), now), static, models, deviceList(h))
	}
	return tw.Flush()
}

// deviceList is a hive's devices on one line: each name, with its memory used/total where the
// hive knows it ("cuda:0 1.2/80.0GiB"); the descriptions are in -o json.
func deviceList(h *rbeev1.Hive) string {
	if len(h.GetDeviceInfo()) == 0 {
		if len(h.GetDevices()) == 0 {
			return "-"
		}
		return strings.Join(h.GetDevices(), ", ")
	}
	parts := make([]string, len(h.GetDeviceInfo()))
	for i, d := range h.GetDeviceInfo() {
		parts[i] = d.GetName()
		if t := d.GetMemoryTotalBytes(); t > 0 {
			parts[i] += fmt.Sprintf(" %.1f/%.1fGiB", float64(d.GetMemoryUsedBytes())/(1<<30), float64(t)/(1<<30))
		}
	}
	return strings.Join(parts, ", ")
}
