package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/rbee-dev/rbee/queen/console"
	"github.com/rbee-dev/rbee/queen/fleet"
	"github.com/rbee-dev/rbee/queen/registry"
)

func TestStandbyRefusal(t *testing.T) {
	leader := func(name string) func() string { return func() string { return name } }
	lasting := &leadership{check: func() error { return nil }}
	lost := &leadership{check: func() error { return errors.New("lease expired") }}
	if err := standbyRefusal(lasting, leader("")); err != nil {
		t.Fatalf("leading: %v, want no refusal", err)
	}
	for _, tc := range []struct {
		l      *leadership
		leader string
		want   string
	}{
		{nil, "10.0.0.9:7833", "not the leader; the leader is at 10.0.0.9:7833"},
		{lost, "10.0.0.9:7833", "not the leader; the leader is at 10.0.0.9:7833"},
		{nil, "", "no queen leads right now"},
	} {
		if err := standbyRefusal(tc.l, leader(tc.leader)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("standbyRefusal(%v, %q) = %v, want %q", tc.l, tc.leader, err, tc.want)
		}
	}
}

// The queen's HTTP API on a standby answers 503 with OpenAI's error JSON naming the leader, and
// Retry-After; elected, the same API routes (here: a model nobody offers, 404).
func TestHTTPAPIRefusedOnStandby(t *testing.T) {
	var h httpOptions
	fs := flag.NewFlagSet("queen", flag.ContinueOnError)
	h.register(fs)
	if err := fs.Parse([]string{"--http-listen", "127.0.0.1:0"}); err != nil {
		t.Fatal(err)
	}
	if err := h.check("", false); err != nil {
		t.Fatal(err)
	}
	o := options{interval: time.Second, staleAfter: 3 * time.Second, expireAfter: time.Minute, startTimeout: 5 * time.Second, watchBuffer: 16}
	reg := registry.New(registryConfig(o, func(registry.Worker) {}))
	ctx, cancel := context.WithCancel(t.Context())
	regDone := make(chan struct{})
	go func() { defer close(regDone); reg.Run(ctx) }()
	pool := fleet.NewHivePool()
	defer pool.Close()
	fl := fleet.New(fleet.Config{Registry: reg, Hives: pool})
	var lead atomic.Pointer[leadership]
	refuse := func() error { return standbyRefusal(lead.Load(), func() string { return "10.0.0.9:7833" }) }
	core, logs := observer.New(zap.InfoLevel)
	done, err := serveHTTP(ctx, h, reg, queenFleet{fl, reg}, refuse, console.Config{Registry: reg, Fleet: fl, Logs: fl}, nil, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { cancel(); done(); <-regDone }()
	serving := logs.FilterMessage("HTTP API serving").All()
	if len(serving) != 1 {
		t.Fatal("serveHTTP did not log its address")
	}
	url := "http://" + serving[0].ContextMap()["http_listen"].(string) + "/v1/chat/completions"
	post := func() (*http.Response, map[string]map[string]any) {
		resp, err := http.Post(url, "application/json", strings.NewReader(`{"model":"demo","messages":[]}`))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		var e map[string]map[string]any
		if err := json.Unmarshal(b, &e); err != nil {
			t.Fatalf("body %q is not OpenAI's error JSON: %v", b, err)
		}
		return resp, e
	}
	resp, e := post()
	if resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" || e["error"]["code"] != "not_leader" ||
		!strings.Contains(e["error"]["message"].(string), "not the leader; the leader is at 10.0.0.9:7833") {
		t.Fatalf("standby: %d Retry-After %q %v; want 503 with Retry-After naming the leader", resp.StatusCode, resp.Header.Get("Retry-After"), e)
	}
	lead.Store(&leadership{check: func() error { return nil }})
	if resp, e := post(); resp.StatusCode != 404 || e["error"]["code"] != "model_not_found" {
		t.Fatalf("leading: %d %v, want the router's 404 for a model nobody offers", resp.StatusCode, e)
	}
}
