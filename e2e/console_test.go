package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/rbee-dev/rbee/internal/headless"
)

// The web console, driven in headless Chromium against a real queen (serving it on its HTTP
// listener), a real hive and real workers.

// consoleFleet starts a queen with its HTTP listener on an ephemeral port and one hive; it returns
// the queen's gRPC address, the console's URL and the hive id.
func consoleFleet(t *testing.T, queenArgs, hiveArgs []string) (queen, url, hive string) {
	t.Helper()
	rbeeBinary(t)
	q, queen := startQueen(t, append([]string{"--http-listen", "127.0.0.1:0"}, queenArgs...)...)
	url = q.awaitAction("http_start")["console"].(string)
	hive = uniqueID("con")
	cleanupWorkers(t, hive)
	startHive(t, queen, hive, hiveArgs...)
	return queen, url, hive
}

func waitLive(t *testing.T, b *headless.Browser) {
	t.Helper()
	b.Wait(t, "the console's stream to be live", 20*time.Second, `document.querySelector('#conn').dataset.state === 'live'`)
}

func rowState(id string) string {
	return fmt.Sprintf(`(document.querySelector('#wrows .row[data-id=%q]:not([hidden]) span:nth-child(5)') || {}).textContent`, id)
}

// TestConsoleLiveSpawnDelete: a worker spawned from the CLI shows in the page within a second and
// follows its states; deleting it from the page stops its process and removes its row; the page
// has no console errors. It also takes the README's screenshot (RBEE_CONSOLE_SCREENSHOT=path).
func TestConsoleLiveSpawnDelete(t *testing.T) {
	queen, url, hive := consoleFleet(t, nil, nil)
	b := headless.Start(t)
	b.Do(t, 60*time.Second, chromedp.Navigate(url))
	waitLive(t, b)
	b.Wait(t, "the hive in the hive table", 10*time.Second, fmt.Sprintf(`document.querySelector('#hives tbody').textContent.includes(%q)`, hive))

	id := uniqueID("w")
	spawned := decode[struct{ Worker jworker }](t, rbeeJSON(t, queen, "worker", "spawn", "--model", "llama-3-8b", "--hive", hive, "--id", id))
	returned := time.Now()
	b.Wait(t, "the CLI's worker in the table within a second", time.Second, rowState(id)+` !== undefined`)
	t.Logf("worker %s shown %v after the CLI's spawn returned", id, time.Since(returned).Round(time.Millisecond))
	b.Wait(t, "the worker READY in the table", 30*time.Second, rowState(id)+` === 'READY'`)
	if !alive(spawned.Worker.PID) {
		t.Fatalf("worker process %d not alive", spawned.Worker.PID)
	}
	for _, m := range []string{"tinyllama", "qwen-0.5b"} { // company for the screenshot
		rbeeOK(t, queen, "worker", "spawn", "--model", m, "--hive", hive, "--wait")
	}
	b.Wait(t, "three READY workers", 30*time.Second, `window.rbee.st.byState.get('READY') === 3`)

	b.Do(t, 10*time.Second, chromedp.Click(chromedp.CSS(fmt.Sprintf(`#wrows .row[data-id=%q]`, id))))
	b.Wait(t, "the worker's detail", 5*time.Second, fmt.Sprintf(`!document.querySelector('#detail').hidden && document.querySelector('#d-title').textContent === %q`, id))
	if path := os.Getenv("RBEE_CONSOLE_SCREENSHOT"); path != "" {
		png, err := chromedp.Run(b.Ctx, chromedp.FullScreenshot(100))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, png, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("screenshot in %s", path)
	}

	b.Do(t, 10*time.Second, chromedp.SetValue(chromedp.ID("d-grace"), "3s"), chromedp.Click(chromedp.ID("d-delete")))
	b.Wait(t, "the delete's outcome", 20*time.Second, `/deleted: (EXITED|KILLED|ALREADY_EXITED)/.test(document.querySelector('#d-outcome').textContent)`)
	b.Wait(t, "the row gone", 5*time.Second, rowState(id)+` === undefined && !window.rbee.st.workers.has(`+fmt.Sprintf("%q", id)+`)`)
	if alive(spawned.Worker.PID) {
		t.Errorf("worker process %d still alive after the page deleted it", spawned.Worker.PID)
	}
	if r := rbee(t, queen, "worker", "get", id); r.code == 0 {
		t.Errorf("the queen still knows the deleted worker: %v", r)
	}
	notices := headless.Eval[string](t, b, `document.querySelector('#notices').textContent`)
	if !strings.Contains(notices, id+" deleted") {
		t.Errorf("recent notices lack the delete: %q", notices)
	}
	if errs := b.Errors(); len(errs) > 0 {
		t.Errorf("the page reported errors: %q", errs)
	}
}

// TestConsoleLostConnection: when the queen goes away the page says so, and it comes back live
// by itself when a queen answers again at the same address.
func TestConsoleLostConnection(t *testing.T) {
	rbeeBinary(t)
	q, _ := startQueen(t, "--http-listen", "127.0.0.1:0")
	url := q.awaitAction("http_start")["console"].(string)
	httpAddr := strings.TrimSuffix(strings.TrimPrefix(url, "http://"), "/")
	b := headless.Start(t)
	b.Do(t, 60*time.Second, chromedp.Navigate(url))
	waitLive(t, b)

	q.stop(15, 20*time.Second) // SIGTERM: a graceful stop, which must not be held by the open page
	b.Wait(t, "the page to say the connection is lost", 10*time.Second, `document.querySelector('#conn').dataset.state === 'lost'`)

	q2 := start(t, "queen", "--listen", "127.0.0.1:0", "--http-listen", httpAddr)
	q2.awaitAction("http_start")
	b.Wait(t, "the page live again", 30*time.Second, `document.querySelector('#conn').dataset.state === 'live'`)
	for _, e := range b.Errors() {
		// While the queen is away the browser logs the refused connections; nothing else may appear.
		if !strings.Contains(e, "ERR_CONNECTION_REFUSED") && !strings.Contains(e, "/api/") {
			t.Errorf("page error: %s", e)
		}
	}
}

// TestConsoleToken: with a cluster token the console asks for it; a wrong one is refused, an API
// key opens a session that may watch but not spawn, and the cluster token one that spawns. No
// secret appears in the queen's log.
func TestConsoleToken(t *testing.T) {
	tf := tokenFile(t)
	const apiKey = "e2e-api-key-0123456789abcdef"
	kf := filepath.Join(t.TempDir(), "keys")
	if err := os.WriteFile(kf, []byte(apiKey+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	rbeeBinary(t)
	q, _ := startQueen(t, "--token-file", tf, "--http-listen", "127.0.0.1:0", "--api-keys-file", kf)
	url := q.awaitAction("http_start")["console"].(string)

	b := headless.Start(t)
	b.Do(t, 60*time.Second, chromedp.Navigate(url))
	b.Wait(t, "the login form", 10*time.Second, `!document.querySelector('#login').hidden && document.querySelector('#app').hidden`)

	login := func(secret string) {
		b.Do(t, 10*time.Second, chromedp.SetValue(chromedp.ID("secret"), secret), chromedp.Click(chromedp.CSS(`#login-form button`)))
	}
	login("not-the-token-0123456789")
	b.Wait(t, "the refusal", 10*time.Second, `document.querySelector('#login-error').textContent.includes('wrong token or API key')`)
	if hidden := headless.Eval[bool](t, b, `document.querySelector('#app').hidden`); !hidden {
		t.Fatal("a wrong token showed the fleet")
	}
	if code := headless.Eval[int](t, b, `fetch('/api/hives').then((r) => r.status)`); code != 401 {
		t.Errorf("the API after a refused login: %d, want 401", code)
	}

	login(apiKey)
	waitLive(t, b)
	if role := headless.Eval[string](t, b, `document.body.className`); !strings.Contains(role, "role-chat") {
		t.Errorf("an API key session: body class %q, want role-chat (no spawn or delete controls)", role)
	}
	if visible := headless.Eval[bool](t, b, `getComputedStyle(document.querySelector('#spawn')).display !== 'none'`); visible {
		t.Error("an API key session shows the spawn form")
	}
	code := headless.Eval[int](t, b, `fetch('/api/workers', {method: 'POST', headers: {'X-Rbee-Console': '1', 'Content-Type': 'application/json'}, body: '{"model":"m"}'}).then((r) => r.status)`)
	if code != 403 {
		t.Errorf("spawn from an API key session: %d, want 403", code)
	}
	if cookie := headless.Eval[string](t, b, `document.cookie`); cookie != "" {
		t.Errorf("the session cookie is readable by scripts: %q", cookie)
	}

	b.Do(t, 10*time.Second, chromedp.Click(chromedp.ID("logout")))
	b.Wait(t, "the login form again", 10*time.Second, `!document.querySelector('#login').hidden`)
	login(readFile(t, tf))
	waitLive(t, b)
	if visible := headless.Eval[bool](t, b, `getComputedStyle(document.querySelector('#spawn')).display !== 'none'`); !visible {
		t.Error("a cluster token session shows no spawn form")
	}
	for _, e := range b.Errors() {
		if !(strings.Contains(e, "401") || strings.Contains(e, "403")) {
			t.Errorf("page error: %s", e)
		}
	}
	q.mu.Lock()
	logText := q.raw.String()
	q.mu.Unlock()
	for _, secret := range []string{readFile(t, tf), apiKey} {
		if strings.Contains(logText, secret) {
			t.Error("a secret appears in the queen's log")
		}
	}
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// TestConsoleChat: a chat from the page goes through the queen's OpenAI API to a real
// worker-stub --openai server and its tokens show as they stream, with time to first token and
// tokens per second. The test heartbeats for the server, as a hive's supervisor would.
func TestConsoleChat(t *testing.T) {
	q, queen, _ := startQueenHTTP(t)
	url := q.awaitAction("http_start")["console"].(string)
	stub := startStub(t, "chat-model", "--tokens-per-second", "8", "--max-tokens", "12")
	beatFor(t, queen, uniqueID("w"), stub, "chat-model", 1)
	awaitReady(t, queen, 1)

	b := headless.Start(t)
	b.Do(t, 60*time.Second, chromedp.Navigate(url))
	waitLive(t, b)
	b.Wait(t, "the worker in the table", 10*time.Second, `window.rbee.st.byState.get('READY') === 1`)
	b.Do(t, 10*time.Second, chromedp.SetValue(chromedp.ID("chat-model"), "chat-model"),
		chromedp.SetValue(chromedp.ID("chat-prompt"), "hello there"), chromedp.Click(chromedp.ID("chat-send")))
	// At 8 tokens a second, 12 tokens take 1.5 s: the page must show some before the end.
	b.Wait(t, "part of the answer while it streams", 10*time.Second,
		`document.querySelector('#chat-out').textContent.length > 0 && !document.querySelector('#chat-status').textContent.endsWith('done')`)
	partial := headless.Eval[string](t, b, `document.querySelector('#chat-out').textContent`)
	b.Wait(t, "the whole answer", 20*time.Second, `document.querySelector('#chat-status').textContent.endsWith('done')`)
	full := headless.Eval[string](t, b, `document.querySelector('#chat-out').textContent`)
	status := headless.Eval[string](t, b, `document.querySelector('#chat-status').textContent`)
	t.Logf("partial %q, full %q, status %q", partial, full, status)
	if len(full) <= len(partial) || !strings.HasPrefix(full, partial) {
		t.Errorf("the answer did not grow from %q to %q", partial, full)
	}
	if !strings.Contains(status, "time to first token") || !strings.Contains(status, "12 tokens") || !strings.Contains(status, "tokens/s") {
		t.Errorf("chat status %q", status)
	}
	if errs := b.Errors(); len(errs) > 0 {
		t.Errorf("the page reported errors: %q", errs)
	}
}

// TestConsoleSpawnFailure: a worker spawned from the page that dies while loading is followed to
// its end: the page says it failed, how it exited and its last output.
func TestConsoleSpawnFailure(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "failing-worker")
	script := "#!/bin/sh\necho 'loading weights for' \"$@\"\necho 'CUDA error: out of memory' >&2\nexit 3\n"
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	_, url, hive := consoleFleet(t, nil, []string{"--worker-binary", bin, "--no-socket-handoff"})
	b := headless.Start(t)
	b.Do(t, 60*time.Second, chromedp.Navigate(url))
	waitLive(t, b)
	b.Wait(t, "the hive in the spawn form", 10*time.Second, fmt.Sprintf(`[...document.querySelectorAll('#sp-hive option')].some((o) => o.value === %q)`, hive))
	b.Do(t, 10*time.Second, chromedp.SetValue(chromedp.ID("sp-model"), "big-model"), chromedp.SetValue(chromedp.ID("sp-hive"), hive),
		chromedp.Click(chromedp.CSS(`#spawn button`)))
	b.Wait(t, "the spawn's failure with the reason", 30*time.Second, `/fail/.test(document.querySelector('#sp-status').textContent)`)
	status := headless.Eval[string](t, b, `document.querySelector('#sp-status').textContent`)
	t.Logf("spawn status: %q", status)
	for _, want := range []string{"exit", "3", "CUDA error: out of memory"} {
		if !strings.Contains(status, want) {
			t.Errorf("spawn status %q lacks %q", status, want)
		}
	}
	if errs := b.Errors(); len(errs) > 0 {
		t.Errorf("the page reported errors: %q", errs)
	}
}

// TestConsoleFollowsALog: a worker's log opens from the page and follows what the worker writes;
// once the worker is deleted its log ends and the page says so.
func TestConsoleFollowsALog(t *testing.T) {
	queen, url, hive := consoleFleet(t, nil, nil)
	id := uniqueID("w")
	rbeeOK(t, queen, "worker", "spawn", "--model", "llama-3-8b", "--hive", hive, "--id", id, "--wait")
	b := headless.Start(t)
	b.Do(t, 60*time.Second, chromedp.Navigate(url))
	waitLive(t, b)
	b.Wait(t, "the worker's row", 10*time.Second, rowState(id)+` === 'READY'`)
	b.Do(t, 10*time.Second, chromedp.Click(chromedp.CSS(fmt.Sprintf(`#wrows .row[data-id=%q]`, id))), chromedp.Click(chromedp.ID("d-logs")))
	// worker-stub logs its start with its id; the hive captured it.
	b.Wait(t, "the worker's start in its log", 10*time.Second, fmt.Sprintf(`document.querySelector('#d-log').textContent.includes(%q)`, id))
	rbeeOK(t, queen, "worker", "rm", id)
	// Its stop is written to the log it follows, then the log ends.
	b.Wait(t, "the end of the log", 20*time.Second, `document.querySelector('#d-log').textContent.includes('worker stopping') && document.querySelector('#d-log').textContent.trimEnd().endsWith('[the log ended]')`)
	if errs := b.Errors(); len(errs) > 0 {
		t.Errorf("the page reported errors: %q", errs)
	}
}
