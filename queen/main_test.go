package main

import (
	"context"
	"runtime/debug"
	"testing"
	"testing/synctest"
	"time"

	"github.com/rbee-dev/rbee/queen/registry"
)

// A worker that never beat is stopped through its hive after the start timeout. The queen's
// shutdown waits for the registry's clock, and the clock must wait for that clean-up: cut short, it
// leaves the process running with nothing left that knows of it.
func TestShutdownWaitsForStartTimeoutCleanup(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		o := options{interval: time.Second, staleAfter: 3 * time.Second, expireAfter: time.Minute, startTimeout: 5 * time.Second, watchBuffer: 16}
		cleaning, release, cleaned := make(chan struct{}), make(chan struct{}), make(chan struct{})
		reg := registry.New(registryConfig(o, func(registry.Worker) {
			close(cleaning)
			<-release // the hive's Delete, in flight
			close(cleaned)
		}))
		if err := reg.Reserve(registry.Worker{ID: "w1", HiveID: "h1"}); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		runDone := make(chan struct{})
		go func() { defer close(runDone); reg.Run(ctx) }()
		<-cleaning
		cancel() // shutdown begins while the clean-up runs
		synctest.Wait()
		select {
		case <-runDone:
			t.Fatal("the registry's Run returned while a start-timeout clean-up was still running")
		default:
		}
		close(release)
		<-runDone
		select {
		case <-cleaned:
		default:
			t.Fatal("Run returned before the clean-up finished")
		}
	})
}

// The queen collects at GOGC=50 with a floor under the room for garbage unless the operator's
// environment sets GOGC.
func TestGCPercentDefaultAndOverride(t *testing.T) {
	prev := debug.SetGCPercent(100)
	defer debug.SetGCPercent(prev)
	f := setGCPercent(func(string) (string, bool) { return "", false })
	if f == nil {
		t.Fatal("without GOGC in the environment the queen starts no floor under the collector's room")
	}
	got := debug.SetGCPercent(100)
	f.Stop()
	if got != defaultGCPercent {
		t.Fatalf("without GOGC in the environment the queen runs at GOGC=%d, want %d", got, defaultGCPercent)
	}
	debug.SetGCPercent(100)
	if f := setGCPercent(func(k string) (string, bool) { return "100", k == "GOGC" }); f != nil {
		f.Stop()
		t.Fatal("with GOGC in the environment the queen still adjusts it")
	}
	if got := debug.SetGCPercent(100); got != 100 {
		t.Fatalf("with GOGC=100 in the environment the queen runs at GOGC=%d, want 100", got)
	}
}
