package registry

import (
	"testing"
	"time"
)

// A hive's catalog is kept as it reports it, answers Offer (a hive without one offers anything),
// and is handed out as a copy.
func TestHiveCatalog(t *testing.T) {
	r := New(Config{})
	if _, err := r.HiveBeat(Hive{ID: "gpu1", Address: "a:1", Models: []ModelOffer{
		{Name: "llama-8b", Concurrency: 4, LoadTimeout: time.Minute, Devices: []string{"cuda:0"}}, {Name: "embed"}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.HiveBeat(Hive{ID: "any", Address: "b:1"}); err != nil {
		t.Fatal(err)
	}
	h, _ := r.GetHive("gpu1")
	o, ok := h.Offer("llama-8b")
	if !ok || o.Concurrency != 4 || o.LoadTimeout != time.Minute || !o.AllowsDevice("cuda:0") || o.AllowsDevice("cpu") {
		t.Fatalf("gpu1 offer = %+v, %v", o, ok)
	}
	if _, ok := h.Offer("qwen"); ok {
		t.Fatal("gpu1 offers a model its catalog lacks")
	}
	if o, _ := h.Offer("embed"); !o.AllowsDevice("cpu") {
		t.Fatal("an offer without devices must allow any")
	}
	if any, _ := r.GetHive("any"); !func() bool { _, ok := any.Offer("qwen"); return ok }() {
		t.Fatal("a hive without a catalog must offer every model")
	}
	h.Models[0].Name, h.Models[0].Devices[0] = "changed", "cuda:9"
	if again, _ := r.GetHive("gpu1"); again.Models[0].Name != "llama-8b" || again.Models[0].Devices[0] != "cuda:0" {
		t.Fatal("a hive's catalog handed out is the registry's own")
	}
	rev := r.Revision()
	if _, err := r.HiveBeat(Hive{ID: "gpu1", Address: "a:1", Models: []ModelOffer{{Name: "embed"}}}); err != nil {
		t.Fatal(err)
	}
	if r.Revision() == rev {
		t.Fatal("a changed catalog is not a change")
	}
}

// A supervisor reports UNHEALTHY with a reason, and READY again; every beat's descriptor fields
// replace the last.
func TestUnhealthyBeat(t *testing.T) {
	r := New(Config{})
	w, err := r.Beat(Worker{ID: "w", HiveID: "h", State: StateReady, Concurrency: 4})
	if err != nil || w.State != StateReady || w.Concurrency != 4 {
		t.Fatalf("Beat = %+v, %v", w, err)
	}
	w, _ = r.Beat(Worker{ID: "w", State: StateUnhealthy, Concurrency: 4, StatusMessage: "health check: 503 Service Unavailable"})
	if w.State != StateUnhealthy || w.StatusMessage != "health check: 503 Service Unavailable" || StateUnhealthy.String() != "UNHEALTHY" {
		t.Fatalf("after an unhealthy beat: %+v", w)
	}
	w, _ = r.Beat(Worker{ID: "w", State: StateReady, Concurrency: 4})
	if w.State != StateReady || w.StatusMessage != "" {
		t.Fatalf("after a healthy beat: %+v", w)
	}
}
