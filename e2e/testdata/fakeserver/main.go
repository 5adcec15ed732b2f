// Command fakeserver imitates an inference server that knows nothing of rbee (llama-server, vLLM)
// for the catalog and worker-shim tests: it binds --port itself, answers GET /health with 503
// while "loading" and 200 after, and misbehaves on request.
package main

import (
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "child" {
		signal.Ignore(syscall.SIGTERM)
		select {}
	}
	port := flag.Int("port", 0, "port to bind")
	host := flag.String("host", "127.0.0.1", "host to bind")
	loadTime := flag.Duration("load-time", 0, "answer /health with 503 this long, then 200")
	bindLate := flag.Bool("bind-late", false, "do not listen until loaded (like vLLM: connection refused while loading)")
	neverReady := flag.Bool("never-ready", false, "answer /health with 503 forever")
	failLoad := flag.String("fail-load", "", "after --load-time, print this to stderr and exit with --exit-code")
	exitCode := flag.Int("exit-code", 1, "exit status for --fail-load")
	unhealthyAfter := flag.Duration("unhealthy-after", 0, "once ready, answer /health with 503 after this long (0: never)")
	ignoreTerm := flag.Bool("ignore-sigterm", false, "survive SIGTERM")
	fork := flag.Int("fork", 0, "fork this many children that ignore SIGTERM and sleep, the last in a new session")
	flipFile := flag.String("flip-file", "", "write the time /health turned 200 here (unix nanoseconds)")
	flag.Parse()

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	for i := 0; i < *fork; i++ {
		c := exec.Command("/proc/self/exe", "child")
		c.SysProcAttr = &syscall.SysProcAttr{Setsid: i == *fork-1}
		if err := c.Start(); err != nil {
			fmt.Fprintln(os.Stderr, "fakeserver: fork:", err)
			os.Exit(1)
		}
	}
	fmt.Printf("fakeserver: loading model on %s:%d\n", *host, *port)

	var readyAt atomic.Int64 // unix nanos once healthy
	var unhealthy atomic.Bool
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) {
		if readyAt.Load() == 0 || unhealthy.Load() {
			http.Error(w, `{"error":{"message":"Loading model"}}`, http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte(`{"status":"ok"}`))
	})
	listen := func() {
		l, err := net.Listen("tcp", net.JoinHostPort(*host, strconv.Itoa(*port)))
		if err != nil {
			fmt.Fprintln(os.Stderr, "fakeserver:", err)
			os.Exit(1)
		}
		go http.Serve(l, mux)
	}
	if !*bindLate {
		listen()
	}
	loaded := time.After(*loadTime)
	if *neverReady {
		loaded = nil
	}
	var sick <-chan time.Time
	for {
		select {
		case <-loaded:
			if *failLoad != "" {
				fmt.Fprintln(os.Stderr, *failLoad)
				os.Exit(*exitCode)
			}
			if *bindLate {
				listen()
			}
			now := time.Now().UnixNano()
			readyAt.Store(now)
			if *flipFile != "" {
				os.WriteFile(*flipFile, []byte(strconv.FormatInt(now, 10)), 0o644)
			}
			fmt.Println("fakeserver: model loaded, serving")
			if *unhealthyAfter > 0 {
				sick = time.After(*unhealthyAfter)
			}
		case <-sick:
			unhealthy.Store(true)
			fmt.Println("fakeserver: turning unhealthy")
		case s := <-sigs:
			if *ignoreTerm && s == syscall.SIGTERM {
				fmt.Println("fakeserver: ignoring SIGTERM")
				continue
			}
			fmt.Println("fakeserver: stopping on", s)
			os.Exit(0)
		}
	}
}
