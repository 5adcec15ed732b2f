package router

import (
	"context"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/queen/registry"
)

// A restarted queen hears its workers before their hives: a worker serving on its hive's host is
// routed to once the hive registers, with the URL and the catalog's concurrency and ttl.
func TestLocalResolvesWorkersWhoseHiveComesLater(t *testing.T) {
	reg := registry.New(registry.Config{})
	if _, err := reg.Beat(registry.Worker{ID: "w1", HiveID: "h1", Model: "m", Port: 9101, State: registry.StateReady}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	ch := Local{Reg: reg, Resolve: 10 * time.Millisecond}.Watch(ctx)
	next := func() Event {
		t.Helper()
		select {
		case ev := <-ch:
			return ev
		case <-time.After(5 * time.Second):
			t.Fatal("no event")
			return Event{}
		}
	}
	if ev := next(); ev.Type != EventAdded || ev.Worker.URL != "" || ev.Worker.State == StateReady {
		t.Fatalf("before its hive is known: %+v, want no URL and not READY", ev)
	}
	if ev := next(); ev.Type != EventSynced {
		t.Fatalf("%+v, want SYNCED", ev)
	}
	if _, err := reg.HiveBeat(registry.Hive{ID: "h1", Address: "10.1.2.3:7835",
		Models: []registry.ModelOffer{{Name: "m", Concurrency: 3, TTL: time.Minute}}}); err != nil {
		t.Fatal(err)
	}
	ev := next()
	if ev.Type != EventUpdated || ev.Worker.URL != "http://10.1.2.3:9101" || ev.Worker.State != StateReady ||
		ev.Worker.Concurrency != 3 || ev.Worker.TTL != time.Minute {
		t.Fatalf("once the hive is known: %+v", ev)
	}
	if offers := (Local{Reg: reg}).Offers(); len(offers) != 1 || offers[0].Model != "m" || offers[0].HiveID != "h1" {
		t.Fatalf("offers %+v", offers)
	}
}
