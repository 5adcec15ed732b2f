package router

import (
	"context"
	"net"
	"strconv"
	"time"

	"github.com/rbee-dev/rbee/queen/registry"
)

// Local is the router's view of a registry in the same process: the registry's own watch (the
// one WatchWorkers serves), its hives' catalogs, and its SetLoad.
type Local struct {
	Reg *registry.Registry
	// Resolve is how often workers whose address is not known yet are looked at again (1s).
	Resolve time.Duration
}

var _ Registry = Local{}

// Watch follows every worker until ctx ends. A worker that serves on its hive's host, beating
// before its hive has registered (a restarted queen hears workers first), cannot be routed to
// yet; it is looked at again every Resolve interval and sent as UPDATED once its hive is known.
func (l Local) Watch(ctx context.Context) <-chan Event {
	out := make(chan Event, 64)
	wt := l.Reg.Watch("")
	every := l.Resolve
	if every <= 0 {
		every = time.Second
	}
	go func() {
		defer close(out)
		defer wt.Close()
		t := time.NewTicker(every)
		defer t.Stop()
		unresolved := map[string]bool{}
		send := func(ev Event) bool {
			select {
			case out <- ev:
				return true
			case <-ctx.Done():
				return false
			}
		}
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				for id := range unresolved {
					w, ok := l.Reg.Get(id)
					if !ok {
						delete(unresolved, id)
						continue
					}
					if ev := l.event(registry.Event{Type: registry.EventUpdated, Worker: w}); ev.Worker.URL != "" {
						delete(unresolved, id)
						if !send(ev) {
							return
						}
					}
				}
			case ev, ok := <-wt.Events():
				if !ok {
					return
				}
				rev := l.event(ev)
				switch {
				case ev.Type == registry.EventRemoved || ev.Type == registry.EventReset:
					if ev.Type == registry.EventReset {
						clear(unresolved)
					}
					delete(unresolved, ev.Worker.ID)
				case ev.Type != registry.EventSynced && rev.Worker.URL == "":
					unresolved[ev.Worker.ID] = true
				case ev.Type != registry.EventSynced:
					delete(unresolved, ev.Worker.ID)
				}
				if !send(rev) {
					return
				}
			}
		}
	}()
	return out
}

var eventTypes = map[registry.EventType]EventType{
	registry.EventAdded: EventAdded, registry.EventUpdated: EventUpdated, registry.EventRemoved: EventRemoved,
	registry.EventSynced: EventSynced, registry.EventReset: EventReset,
}

var states = map[registry.State]State{
	registry.StateStarting: StateStarting, registry.StateReady: StateReady, registry.StateBusy: StateBusy,
	registry.StateStopping: StateStopping, registry.StateStale: StateStale, registry.StateUnhealthy: StateUnhealthy,
}

func (l Local) event(ev registry.Event) Event {
	out := Event{Type: eventTypes[ev.Type], Reason: ev.Reason}
	if ev.Type == registry.EventSynced || ev.Type == registry.EventReset {
		return out
	}
	w := ev.Worker
	out.Worker = Worker{ID: w.ID, HiveID: w.HiveID, Model: w.Model, State: states[w.State], Concurrency: int(w.Concurrency)}
	host := w.Address
	if h, ok := l.Reg.GetHive(w.HiveID); ok {
		if host == "" {
			host, _, _ = net.SplitHostPort(h.Address)
		}
		if o, ok := h.Offer(w.Model); ok && len(h.Models) > 0 {
			if out.Worker.Concurrency == 0 {
				out.Worker.Concurrency = int(o.Concurrency)
			}
			out.Worker.TTL, out.Worker.Grace = o.TTL, o.Grace
		}
	}
	if host != "" && w.Port != 0 {
		out.Worker.URL = "http://" + net.JoinHostPort(host, strconv.Itoa(int(w.Port)))
	} else if out.Worker.State == StateReady || out.Worker.State == StateBusy {
		out.Worker.State = StateOther // serving, but the router cannot tell where: never route to it
	}
	return out
}

// Offers lists the models READY hives' catalogs offer.
func (l Local) Offers() []Offer {
	var out []Offer
	for _, h := range l.Reg.ListHives() {
		if h.State != registry.HiveReady {
			continue
		}
		for _, m := range h.Models {
			out = append(out, Offer{Model: m.Name, HiveID: h.ID, LoadTimeout: m.LoadTimeout})
		}
	}
	return out
}

// SetLoad shows the router's load in the registry; a worker gone meanwhile needs nothing.
func (l Local) SetLoad(id string, inFlight int, full bool) {
	_ = l.Reg.SetLoad(id, uint32(inFlight), full)
}
