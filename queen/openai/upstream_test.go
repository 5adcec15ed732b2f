package openai

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/queen/router"
)

// connWatcher counts a worker's connections and reports each one closed.
type connWatcher struct {
	mu     sync.Mutex
	opened int
	closed chan struct{}
}

func watchedWorker(t *testing.T, h http.Handler) (*httptest.Server, *connWatcher) {
	cw := &connWatcher{closed: make(chan struct{}, 100)}
	ws := httptest.NewUnstartedServer(h)
	ws.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		switch st {
		case http.StateNew:
			cw.mu.Lock()
			cw.opened++
			cw.mu.Unlock()
		case http.StateClosed, http.StateHijacked:
			cw.closed <- struct{}{}
		}
	}
	ws.Start()
	t.Cleanup(ws.Close)
	return ws, cw
}

func (cw *connWatcher) count() int {
	cw.mu.Lock()
	defer cw.mu.Unlock()
	return cw.opened
}

// Requests one after another share one connection to the worker, whether its answers carry a
// length or are chunked, until the worker says Connection: close.
func TestWorkerConnectionsAreReused(t *testing.T) {
	worker := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		if strings.Contains(r.URL.RawQuery, "close") {
			w.Header().Set("Connection", "close")
		}
		if strings.Contains(r.URL.RawQuery, "chunked") {
			fmt.Fprint(w, `{"part":1,`)
			w.(http.Flusher).Flush() // no Content-Length: chunked
			fmt.Fprint(w, `"part2":2}`)
			return
		}
		fmt.Fprint(w, `{"whole":true}`)
	})
	ws, cw := watchedWorker(t, worker)
	f := startOver(t, Config{}, router.Config{}, 0, ws)
	for i := range 20 {
		path := "/v1/chat/completions"
		want := `{"whole":true}`
		if i%2 == 1 {
			path += "?chunked=1"
			want = `{"part":1,"part2":2}`
		}
		if i == 9 {
			path += "&close=1" // the worker's last answer on this connection
		}
		resp, err := http.Post(f.url+path, "application/json", strings.NewReader(`{"model":"m"}`))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(b) != want {
			t.Fatalf("request %d: %d %q, want %q", i, resp.StatusCode, b, want)
		}
	}
	if n := cw.count(); n != 2 {
		t.Fatalf("the worker saw %d connections for 20 requests in a row, want 2 (a new one after its Connection: close)", n)
	}
}

// A kept connection the worker closed while it was idle (its keep-alive timeout, or a restart
// on the same port) is not a failed worker: the request goes out again on a new connection, is
// answered, and the worker stays in routing.
func TestWorkerClosingIdleConnectionIsNotAFailure(t *testing.T) {
	ws, cw := watchedWorker(t, completion(1))
	f := startOver(t, Config{}, router.Config{QueueWait: 100 * time.Millisecond}, 0, ws)
	for i := range 3 {
		if resp, _, raw := post(t, f.url, `{"model":"m"}`); resp.StatusCode != 200 {
			t.Fatalf("request %d: %d %s", i, resp.StatusCode, raw)
		}
		ws.CloseClientConnections() // the worker drops its idle connections
		<-cw.closed
	}
	if n := cw.count(); n != 3 {
		t.Fatalf("the worker saw %d connections, want 3 (one new after each close)", n)
	}
}

// What reaches the worker: the client's headers except the hop-by-hop ones, those its
// Connection header names, its API key and Expect; the job id; the body with its length. What
// comes back: the worker's headers except the hop-by-hop ones, after any interim answer.
func TestHeadersToAndFromTheWorker(t *testing.T) {
	got := make(chan http.Header, 1)
	worker := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		h := r.Header.Clone()
		h.Set("X-Seen-Length", fmt.Sprint(r.ContentLength, " ", len(b)))
		got <- h
		w.Header().Set("Link", "</style.css>; rel=preload")
		w.WriteHeader(http.StatusEarlyHints)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Worker", "w0")
		w.Header().Set("Keep-Alive", "timeout=5")
		fmt.Fprint(w, `{"ok":true}`)
	})
	f := start(t, Config{}, router.Config{}, 0, worker)
	body := `{"model":"m","messages":[]}`
	conn, err := net.Dial("tcp", strings.TrimPrefix(f.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// Written by hand: net/http's client would not send some of these.
	fmt.Fprintf(conn, "POST /v1/chat/completions HTTP/1.1\r\nHost: queen\r\nContent-Type: application/json\r\n"+
		"Authorization: Bearer sk-client\r\nX-Job-Id: job-test-1\r\nX-Custom: a\r\nX-Custom: b\r\n"+
		"Connection: keep-alive, X-Secret-Hop\r\nX-Secret-Hop: 1\r\nKeep-Alive: 300\r\nTe: trailers\r\n"+
		"Proxy-Authorization: Basic eDp5\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n", len(body))
	br := bufio.NewReader(conn)
	cont, err := http.ReadResponse(br, nil) // the queen's own server answers the Expect
	if err != nil || cont.StatusCode != http.StatusContinue {
		t.Fatalf("want 100 Continue first: %v %v", cont, err)
	}
	fmt.Fprint(conn, body)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(b) != `{"ok":true}` {
		t.Fatalf("response %d %q, want the worker's 200 after its 103", resp.StatusCode, b)
	}
	if resp.Header.Get("X-Worker") != "w0" || resp.Header.Get("Content-Type") != "application/json" ||
		resp.Header.Get("Keep-Alive") != "" || resp.Header.Get("X-Job-Id") != "job-test-1" {
		t.Fatalf("response headers %v", resp.Header)
	}
	h := <-got
	for name, want := range map[string]string{
		"Content-Type": "application/json", "X-Job-Id": "job-test-1", "X-Seen-Length": fmt.Sprint(len(body), " ", len(body)),
		"Authorization": "", "X-Secret-Hop": "", "Keep-Alive": "", "Te": "", "Proxy-Authorization": "", "Expect": "",
	} {
		if v := h.Get(name); v != want {
			t.Errorf("the worker saw %s %q, want %q", name, v, want)
		}
	}
	if v := h.Values("X-Custom"); len(v) != 2 || v[0] != "a" || v[1] != "b" {
		t.Errorf("the worker saw X-Custom %q, want both values in order", v)
	}
}

// Idle connections are closed after the idle timeout, and at CloseIdle.
func TestIdleWorkerConnectionsAreClosed(t *testing.T) {
	for _, timeout := range []time.Duration{50 * time.Millisecond, time.Hour} {
		ws, cw := watchedWorker(t, completion(1))
		up := NewUpstream()
		up.IdleTimeout = timeout
		f := startOver(t, Config{Upstream: up}, router.Config{}, 0, ws)
		if resp, _, raw := post(t, f.url, `{"model":"m"}`); resp.StatusCode != 200 {
			t.Fatalf("%d %s", resp.StatusCode, raw)
		}
		if timeout == time.Hour {
			up.CloseIdle()
		}
		select {
		case <-cw.closed:
		case <-time.After(5 * time.Second):
			t.Fatalf("idle timeout %v: the idle connection to the worker was left open", timeout)
		}
	}
}
