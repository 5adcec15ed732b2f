// Command revproxy is the yardstick of the queen's router figures: Go's generic reverse proxy
// (net/http/httputil.ReverseProxy) spreading requests round robin over fixed worker URLs, with a
// keep-alive transport sized like the queen's. It reads no body, counts nothing and picks no
// worker by load, so the difference between it and the queen is what routing, accounting and
// the OpenAI edge cost; the difference between it and going straight is what any HTTP hop costs.
//
//	go run ./bench/revproxy -listen 127.0.0.1:17835 -to http://127.0.0.1:17900,http://127.0.0.1:17901
//
// bench/router/run.sh starts it when REVPROXY names an address.
package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:17835", "address to serve on")
	to := flag.String("to", "", "comma-separated base URLs of the workers (http://host:port)")
	flag.Parse()
	var targets []*url.URL
	for s := range strings.SplitSeq(*to, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		u, err := url.Parse(s)
		if err != nil || u.Scheme != "http" || u.Host == "" {
			fmt.Fprintf(os.Stderr, "revproxy: -to %q: want http://host:port\n", s)
			os.Exit(2)
		}
		targets = append(targets, u)
	}
	if len(targets) == 0 || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "revproxy: give -to with at least one worker URL, and no other arguments")
		os.Exit(2)
	}
	var next atomic.Uint64
	rp := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(targets[(next.Add(1)-1)%uint64(len(targets))])
		},
		Transport: &http.Transport{
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConns:        4096,
			MaxIdleConnsPerHost: 1024,
			IdleConnTimeout:     90 * time.Second,
			DisableCompression:  true,
		},
	}
	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "revproxy:", err)
		os.Exit(1)
	}
	srv := &http.Server{Handler: rp, ReadHeaderTimeout: 10 * time.Second}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() { <-sig; _ = srv.Close() }()
	if err := srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintln(os.Stderr, "revproxy:", err)
		os.Exit(1)
	}
}
