// Package headless starts Debian's Chromium headless for the browser tests (the web console's
// unit and end-to-end tests), with the flags that keep it off the network and out of the user's
// profile, and skips a test with a clear message where no Chromium is installed.
package headless

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/log"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
)

// Path is where scripts/install-browser.sh puts Chromium (Debian's package); RBEE_CHROMIUM
// overrides it.
func Path() string {
	if p := os.Getenv("RBEE_CHROMIUM"); p != "" {
		return p
	}
	return "/usr/bin/chromium"
}

// Browser is one headless Chromium and a tab in it.
type Browser struct {
	Ctx context.Context // the tab: pass it to chromedp.Run

	mu     sync.Mutex
	errors []string // console errors and uncaught exceptions, as the page reported them
}

// Start launches Chromium with a fresh profile and opens a tab; it is closed when the test ends.
// Without Chromium the test is skipped, or fails when $CI is set (.ci/run installs it with
// scripts/install-browser.sh).
func Start(t testing.TB) *Browser {
	t.Helper()
	if _, err := exec.LookPath(Path()); err != nil {
		msg := fmt.Sprintf("no Chromium at %s (install it with scripts/install-browser.sh, or set RBEE_CHROMIUM): %v", Path(), err)
		if os.Getenv("CI") != "" {
			t.Fatal(msg + "; in CI the browser tests must run")
		}
		t.Skip(msg)
	}
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(Path()),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.Flag("headless", true),
		chromedp.Flag("no-sandbox", true),
		chromedp.Flag("disable-gpu", true),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("no-first-run", true),
		chromedp.Flag("no-default-browser-check", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-extensions", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.WindowSize(1400, 1000),
	}
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	b := &Browser{}
	ctx, cancelTab := chromedp.NewContext(actx, chromedp.WithListener(b.listen))
	b.Ctx = ctx
	// The browser and the tab start with the first call, and live as long as the context it is
	// given: the tab's own, not one with a timeout. The Log domain carries what the page's console
	// shows beside console.error: failed loads, CSP refusals.
	if _, err := chromedp.Call(ctx, log.Enable, cdp.Empty{}); err != nil {
		cancelTab()
		cancelAlloc()
		t.Fatalf("starting %s: %v", Path(), err)
	}
	t.Cleanup(func() {
		cancelTab()
		cancelAlloc() // kills the browser process and waits for it
	})
	return b
}

func (b *Browser) listen(ev any) {
	switch e := ev.(type) {
	case *runtime.EventConsoleAPICalled:
		if e.Type == runtime.ConsoleAPICalledTypeError || e.Type == runtime.ConsoleAPICalledTypeAssert {
			var parts []string
			for _, a := range e.Args {
				parts = append(parts, strings.Trim(string(a.Value), `"`)+a.Description)
			}
			b.add("console." + string(e.Type) + ": " + strings.Join(parts, " "))
		}
	case *runtime.EventExceptionThrown:
		d := e.ExceptionDetails
		msg := d.Text
		if d.Exception != nil {
			msg += " " + d.Exception.Description
		}
		b.add("uncaught: " + msg)
	case *log.EventEntryAdded:
		if e.Entry.Level == log.EntryLevelError {
			b.add("log: " + e.Entry.Text + " " + e.Entry.URL)
		}
	}
}

func (b *Browser) add(s string) {
	b.mu.Lock()
	b.errors = append(b.errors, s)
	b.mu.Unlock()
}

// Errors returns the console errors and uncaught exceptions seen so far.
func (b *Browser) Errors() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]string(nil), b.errors...)
}

// Do runs actions in the tab, failing the test on an error or when timeout passes first.
func (b *Browser) Do(t testing.TB, timeout time.Duration, actions ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.Ctx, timeout)
	defer cancel()
	if err := chromedp.Do(ctx, actions...); err != nil {
		t.Fatalf("browser: %v (page errors so far: %q)", err, b.Errors())
	}
}

// Eval evaluates a JavaScript expression in the page and decodes its value (a promise's, once it
// settles).
func Eval[T any](t testing.TB, b *Browser, expr string) T {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.Ctx, 30*time.Second)
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](expr, chromedp.EvalAwaitPromise))
	if err != nil {
		t.Fatalf("evaluating %s: %v", expr, err)
	}
	return v
}

// Wait waits until the JavaScript expression is truthy in the page, failing the test after timeout.
func (b *Browser) Wait(t testing.TB, what string, timeout time.Duration, expr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.Ctx, timeout+5*time.Second)
	defer cancel()
	if _, err := chromedp.Run(ctx, chromedp.Poll[chromedp.Void](expr, chromedp.WithPollingTimeout(timeout))); err != nil {
		t.Fatalf("waiting %v for %s (%s): %v (page errors so far: %q)", timeout, what, expr, err, b.Errors())
	}
}
