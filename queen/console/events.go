package console

import (
	"bytes"
	"encoding/json"
	"net/http"
	"time"

	"github.com/rbee-dev/rbee/queen/registry"
)

// op is one change in a "workers" event: t is "a" (added), "u" (updated), "r" (removed, with
// why), "s" (synced: the snapshot before it is complete) or "x" (reset: forget what was seen, a
// fresh snapshot and "s" follow).
type op struct {
	T      string      `json:"t"`
	W      *workerJSON `json:"w,omitempty"`
	Reason string      `json:"reason,omitempty"`
	Rev    uint64      `json:"rev,omitempty"`
}

// Batching of the worker stream: changes are gathered for at most batchDelay (or batchMax of
// them) and sent as one event, so 10,000 changes a second are a few dozen writes, not 10,000. The
// cap keeps each event a short task for the page (one big JSON parse would hold up a frame).
const (
	batchDelay = 20 * time.Millisecond
	batchMax   = 500
	keepalive  = 15 * time.Second
)

// events streams the fleet to a page: "workers" events carry batches of ops from the registry's
// watch (a snapshot, "s", then changes; "x" and a new snapshot when the page fell behind), and
// "hives" events the whole hive list whenever it changes. A page that reconnects gets a fresh
// snapshot and swaps it in at "s", so it never shows an empty table in between.
func (c *Console) events(w http.ResponseWriter, r *http.Request, _ session) {
	ctx, cancel := c.streamContext(r)
	defer cancel()
	wt := c.cfg.Registry.Watch("")
	defer wt.Close()
	sse := startSSE(w)
	if _, err := w.Write([]byte("retry: 1000\n\n")); err != nil {
		return
	}

	var lastHives []byte
	sendHives := func() error {
		b, err := json.Marshal(c.hiveList())
		if err != nil || bytes.Equal(b, lastHives) {
			return err
		}
		lastHives = b
		return sse.raw("hives", b)
	}
	if sendHives() != nil {
		return
	}

	var batch []op
	flush := func() error {
		if len(batch) == 0 {
			return nil
		}
		b, err := json.Marshal(batch)
		clear(batch)
		batch = batch[:0]
		if err != nil {
			return err
		}
		return sse.raw("workers", b)
	}
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	armed := false
	hiveTick := time.NewTicker(c.cfg.HivePoll)
	defer hiveTick.Stop()
	ping := time.NewTicker(keepalive)
	defer ping.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-wt.Events():
			if !ok {
				return
			}
			batch = append(batch, toOp(e))
			switch {
			case e.Type == registry.EventSynced || e.Type == registry.EventReset || len(batch) >= batchMax:
				// A snapshot's end and a reset go out at once: they change what the page shows.
				if armed {
					timer.Stop()
					armed = false
				}
				if flush() != nil {
					return
				}
			case !armed:
				timer.Reset(batchDelay)
				armed = true
			}
		case <-timer.C:
			armed = false
			if flush() != nil {
				return
			}
		case <-hiveTick.C:
			if sendHives() != nil {
				return
			}
		case <-ping.C:
			if _, err := w.Write([]byte(": ping\n\n")); err != nil || sse.rc.Flush() != nil {
				return
			}
		}
	}
}

func toOp(e registry.Event) op {
	switch e.Type {
	case registry.EventSynced:
		return op{T: "s", Rev: e.Revision}
	case registry.EventReset:
		return op{T: "x", Rev: e.Revision}
	}
	w := toWorker(e.Worker)
	t := "u"
	switch e.Type {
	case registry.EventAdded:
		t = "a"
	case registry.EventRemoved:
		t = "r"
	}
	return op{T: t, W: &w, Reason: e.Reason, Rev: e.Revision}
}
