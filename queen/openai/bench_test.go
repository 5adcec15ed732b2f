package openai

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/rbee-dev/rbee/queen/router"
)

// BenchmarkHop measures one small non-streaming request sent one after another, straight to a
// worker and through the edge and router, in the same process: the difference is what the queen
// adds to a request, without the load tool's and other programs' share of the CPU.
//
//	go test -run '^$' -bench Hop -count 3 ./queen/openai/
func BenchmarkHop(b *testing.B) {
	worker := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"object":"chat.completion","choices":[{"message":{"role":"assistant","content":"hi"}}]}`)
	})
	f := start(b, Config{}, router.Config{}, 0, worker)
	body := `{"model":"m","messages":[{"role":"user","content":"hello"}],"max_tokens":16}`
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16, DisableCompression: true}}
	defer client.CloseIdleConnections()
	run := func(b *testing.B, url string) {
		for b.Loop() {
			resp, err := client.Post(url+"/v1/chat/completions", "application/json", strings.NewReader(body))
			if err != nil {
				b.Fatal(err)
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				b.Fatalf("status %d", resp.StatusCode)
			}
		}
	}
	b.Run("straight", func(b *testing.B) { run(b, f.workerURL) })
	b.Run("through-queen", func(b *testing.B) { run(b, f.url) })
}
