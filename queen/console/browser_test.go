package console

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/rbee-dev/rbee/internal/headless"
	"github.com/rbee-dev/rbee/queen/registry"
)

// These tests drive the page in headless Chromium against the console over a real registry (the
// queen's own package, in process), where the test controls every change. The end-to-end tests
// in e2e/ drive it against real queen, hive and worker processes.

func openPage(t *testing.T, e *env) *headless.Browser {
	t.Helper()
	b := headless.Start(t)
	b.Do(t, 60*time.Second, chromedp.Navigate(e.srv.URL+"/"))
	b.Wait(t, "the stream to be live", 20*time.Second, `document.querySelector('#conn').dataset.state === 'live'`)
	return b
}

func noPageErrors(t *testing.T, b *headless.Browser) {
	t.Helper()
	if errs := b.Errors(); len(errs) > 0 {
		t.Errorf("the page reported errors: %q", errs)
	}
}

func TestBrowserShowsChangesAndSurvivesResetWithoutGap(t *testing.T) {
	e := newEnv(t, "")
	const n = 200
	for i := range n {
		e.beat(t, fmt.Sprintf("w-%04d", i), "h1", "m1", registry.StateStarting)
	}
	b := openPage(t, e)
	b.Wait(t, "the snapshot's rows", 10*time.Second, fmt.Sprintf(`window.rbee.st.workers.size === %d && document.querySelectorAll('#wrows .row:not([hidden])').length > 5`, n))

	// State change -> shown: the page records when each change reached the DOM.
	headless.Eval[chromedp.Void](t, b, `window.rbee.trace = []`)
	var sent []time.Time
	for i := range 40 {
		sent = append(sent, time.Now())
		st := registry.StateReady
		if i%2 == 1 {
			st = registry.StateBusy
		}
		e.beat(t, "w-0000", "h1", "m1", st)
		b.Wait(t, "change shown", 5*time.Second, fmt.Sprintf(`window.rbee.trace.length >= %d`, i+1))
	}
	shown := headless.Eval[[][]any](t, b, `window.rbee.trace`)
	offset := clockOffset(t, b)
	var lat []time.Duration
	if len(shown) != len(sent) {
		t.Fatalf("the page recorded %d changes, %d were made: %v", len(shown), len(sent), shown)
	}
	for i, s := range shown {
		lat = append(lat, time.UnixMilli(int64(s[2].(float64))).Add(-offset).Sub(sent[i]))
	}
	slices.Sort(lat)
	t.Logf("state change in the registry -> row updated in the page: p50 %v, p90 %v, max %v (%d changes)",
		lat[len(lat)/2], lat[len(lat)*9/10], lat[len(lat)-1], len(lat))
	if p50 := lat[len(lat)/2]; p50 > time.Second {
		t.Errorf("p50 %v: changes must show within a second", p50)
	}
	if got := headless.Eval[string](t, b, `document.querySelector('#wrows .row[data-id="w-0000"] span:nth-child(5)').textContent`); got != "BUSY" {
		t.Errorf("row w-0000 shows %q, want BUSY", got)
	}

	// A burst far beyond a one-change watch buffer makes the registry reset the page's stream:
	// the page must keep its table (no empty frame) and end with every last value.
	e2 := newEnvBuffer(t, 1)
	for i := range n {
		e2.beat(t, fmt.Sprintf("w-%04d", i), "h1", "m1", registry.StateStarting)
	}
	b.Do(t, 30*time.Second, chromedp.Navigate(e2.srv.URL+"/"))
	b.Wait(t, "the stream to be live", 20*time.Second, fmt.Sprintf(`document.querySelector('#conn').dataset.state === 'live' && window.rbee.st.workers.size === %d`, n))
	headless.Eval[chromedp.Void](t, b, `window.rbee.minSize = Infinity`)
	for round := range 5 {
		for i := range n {
			st := registry.StateReady
			if (i+round)%2 == 0 {
				st = registry.StateBusy
			}
			e2.beat(t, fmt.Sprintf("w-%04d", i), "h1", "m1", st)
		}
	}
	b.Wait(t, "every worker's last state", 10*time.Second, `[...window.rbee.st.workers.values()].every((w) => w.state === (((+w.id.slice(2)) + 4) % 2 === 0 ? 'BUSY' : 'READY')) && window.rbee.st.staging === null`)
	resets := headless.Eval[int](t, b, `window.rbee.resets`)
	minSize := headless.Eval[int](t, b, `window.rbee.minSize`)
	t.Logf("%d resets during the burst; fewest workers shown in any frame: %d of %d", resets, minSize, n)
	if resets == 0 {
		t.Error("the burst caused no RESET: the test did not exercise what it is about")
	}
	if minSize != n {
		t.Errorf("a frame showed %d of %d workers during a reset: the table had a gap", minSize, n)
	}
	noPageErrors(t, b)
}

// clockOffset is how far the page's Date.now() is ahead of this process's clock (Chromium keeps
// its own base time), taken as the median of round trips, each bracketed by two local readings.
func clockOffset(t *testing.T, b *headless.Browser) time.Duration {
	var offs []time.Duration
	for range 9 {
		t0 := time.Now()
		ms := headless.Eval[float64](t, b, `Date.now()`)
		t1 := time.Now()
		mid := t0.Add(t1.Sub(t0) / 2)
		offs = append(offs, time.UnixMilli(int64(ms)).Sub(mid))
	}
	slices.Sort(offs)
	return offs[len(offs)/2]
}

func newEnvBuffer(t *testing.T, buf int) *env {
	t.Helper()
	e := newEnv(t, "")
	// The env's console is replaced by one over a registry with a tiny watch buffer.
	reg := registry.New(registry.Config{Interval: time.Second, StaleAfter: time.Hour, WatchBuffer: buf})
	e.reg = reg
	e.srv.Config.Handler = New(Config{Registry: reg, Fleet: &fakeFleet{reg: reg}, HivePoll: 50 * time.Millisecond})
	return e
}

// TestBrowserTenThousandWorkers measures the page while 10,000 workers change state every second:
// the longest animation frame (Long Animation Frames API), the longest gap between frames and the
// page's own work per frame. The figure goes into the README.
func TestBrowserTenThousandWorkers(t *testing.T) {
	if testing.Short() {
		t.Skip("a 10-second measurement")
	}
	e := newEnv(t, "")
	const n = 10000
	states := []registry.State{registry.StateReady, registry.StateBusy}
	for i := range n {
		e.beat(t, fmt.Sprintf("w-%05d", i), fmt.Sprintf("h%d", i%20), fmt.Sprintf("model-%d", i%7), registry.StateReady)
	}
	b := openPage(t, e)
	b.Wait(t, "10,000 workers", 30*time.Second, fmt.Sprintf(`window.rbee.st.workers.size === %d`, n))
	headless.Eval[chromedp.Void](t, b, `(() => {
		window.__loaf = [];
		new PerformanceObserver((l) => { for (const x of l.getEntries()) window.__loaf.push({ d: x.duration, block: x.blockingDuration, render: x.renderStart ? x.startTime + x.duration - x.renderStart : 0, scripts: x.scripts.map((s) => [s.invoker, Math.round(s.duration)]) }); }).observe({ type: 'long-animation-frame' });
		window.__gap = 0; let last = performance.now();
		const tick = (now) => { window.__gap = Math.max(window.__gap, now - last); last = now; requestAnimationFrame(tick); };
		requestAnimationFrame(tick);
		window.rbee.maxFrameWork = 0; window.rbee.frames = 0;
	})()`)

	// Every worker changes once a second, spread in 100 steps of 100 workers.
	const seconds = 8
	start := time.Now()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	changes := 0
	for step := 0; step < seconds*100; step++ {
		<-tick.C
		for j := range 100 {
			i := (step%100)*100 + j
			e.beat(t, fmt.Sprintf("w-%05d", i), fmt.Sprintf("h%d", i%20), fmt.Sprintf("model-%d", i%7), states[(step/100+1)%2])
			changes++
		}
	}
	elapsed := time.Since(start)
	b.Wait(t, "the last change shown", 10*time.Second, fmt.Sprintf(`[...window.rbee.st.workers.values()].every((w) => w.state === %q)`, states[seconds%2].String()))
	loaf := headless.Eval[[]struct {
		D, Block, Render float64
		Scripts          [][]any
	}](t, b, `window.__loaf`)
	gap := headless.Eval[float64](t, b, `window.__gap`)
	work := headless.Eval[float64](t, b, `window.rbee.maxFrameWork`)
	frames := headless.Eval[int](t, b, `window.rbee.frames`)
	longest := 0.0
	for _, f := range loaf {
		longest = max(longest, f.D)
		t.Logf("long animation frame: %.0f ms (blocking %.0f ms, rendering %.0f ms), scripts %v", f.D, f.Block, f.Render, f.Scripts)
	}
	t.Logf("10,000 workers, %d changes in %v (%.0f/s): %d page frames; longest frame work %.1f ms; %d long animation frames (>50 ms), longest %.1f ms; longest gap between frames %.1f ms",
		changes, elapsed.Round(time.Millisecond), float64(changes)/elapsed.Seconds(), frames, work, len(loaf), longest, gap)
	if work > 50 {
		t.Errorf("a frame's work took %.1f ms: over the 50 ms budget", work)
	}
	noPageErrors(t, b)
}
