package main

import (
	"flag"
	"fmt"
	"math"
	"time"

	"github.com/rbee-dev/rbee/worker/contract"
)

// Bounds on the OpenAI mode's numbers: a stand-in for tests and benchmarks, not a server to abuse.
const (
	maxTokensLimit     = 1_000_000
	maxTokensPerSecond = 1_000_000
)

// openaiConfig holds the flags of the OpenAI mode (--openai), in which worker-stub imitates an
// OpenAI-compatible inference server such as llama.cpp's llama-server or vLLM.
type openaiConfig struct {
	enabled         bool
	loadTime        time.Duration
	tokensPerSecond float64
	maxTokens       int
	concurrency     int
	drainTimeout    time.Duration

	failLoad          string
	hang              bool
	hangAfter         time.Duration
	unhealthyAfter    int
	dieMidStreamAfter int
	shutdownDelay     time.Duration
}

// openaiFlags lists the flags that only mean something with --openai.
var openaiFlags = []string{"load-time", "tokens-per-second", "max-tokens", "concurrency", "drain-timeout",
	"fail-load", "hang", "hang-after", "unhealthy-after", "die-mid-stream-after", "shutdown-delay"}

// register adds the OpenAI mode's flags to fs.
func (o *openaiConfig) register(fs *flag.FlagSet) {
	fs.BoolVar(&o.enabled, "openai", false, "imitate an OpenAI-compatible inference server (llama-server, vLLM): bind --port on $"+contract.EnvWorkerHost+" (default 127.0.0.1), serve /health, /v1/*, /metrics; no heartbeat, --worker-id optional")
	fs.DurationVar(&o.loadTime, "load-time", 0, "OpenAI mode: /health answers 503 \"Loading model\" this long, then 200")
	fs.Float64Var(&o.tokensPerSecond, "tokens-per-second", 0, "OpenAI mode: generation speed per request (0: no delay)")
	fs.IntVar(&o.maxTokens, "max-tokens", 16, "OpenAI mode: tokens generated when a request names no max_tokens")
	fs.IntVar(&o.concurrency, "concurrency", 0, "OpenAI mode: requests generated at once; more wait (0: no limit)")
	fs.DurationVar(&o.drainTimeout, "drain-timeout", 5*time.Second, "OpenAI mode: on SIGTERM, how long requests in flight may finish before they are cut")
	fs.StringVar(&o.failLoad, "fail-load", "", "OpenAI mode test knob: at the end of --load-time print this message on stderr and exit with --exit-code")
	fs.BoolVar(&o.hang, "hang", false, "OpenAI mode test knob: accept connections and never answer")
	fs.DurationVar(&o.hangAfter, "hang-after", 0, "OpenAI mode test knob: this long after the load, stop answering: requests (health too) are read and never answered (0: never)")
	fs.IntVar(&o.unhealthyAfter, "unhealthy-after", 0, "OpenAI mode test knob: /health answers 503 once this many inference requests have finished (0: never)")
	fs.IntVar(&o.dieMidStreamAfter, "die-mid-stream-after", 0, "OpenAI mode test knob: exit with --exit-code after generating this many tokens of a request (0: never)")
	fs.DurationVar(&o.shutdownDelay, "shutdown-delay", 0, "OpenAI mode test knob: after SIGTERM and the drain, wait this long before exiting")
}

// check validates the OpenAI mode's flags once fs is parsed, and picks the host to bind.
func (o *openaiConfig) check(fs *flag.FlagSet, c *config) error {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if !o.enabled {
		for _, name := range openaiFlags {
			if set[name] {
				return fmt.Errorf("--%s needs --openai", name)
			}
		}
		return nil
	}
	switch {
	case math.IsNaN(o.tokensPerSecond) || o.tokensPerSecond < 0 || o.tokensPerSecond > maxTokensPerSecond:
		return fmt.Errorf("--tokens-per-second must be in 0..%d", maxTokensPerSecond)
	case o.maxTokens < 0 || o.maxTokens > maxTokensLimit:
		return fmt.Errorf("--max-tokens must be in 0..%d", maxTokensLimit)
	case o.concurrency < 0:
		return fmt.Errorf("--concurrency must not be negative")
	case o.unhealthyAfter < 0 || o.dieMidStreamAfter < 0:
		return fmt.Errorf("--unhealthy-after and --die-mid-stream-after must not be negative")
	case o.loadTime < 0 || o.drainTimeout < 0 || o.shutdownDelay < 0 || o.hangAfter < 0:
		return fmt.Errorf("--load-time, --drain-timeout, --shutdown-delay and --hang-after must not be negative")
	case set["ready-after"] || set["queen"] || set["no-heartbeat"]:
		return fmt.Errorf("--ready-after, --queen and --no-heartbeat are for the heartbeat mode; with --openai use --load-time (it never heartbeats)")
	}
	// A real server started from a catalog binds the host the hive hands it; --host on the
	// command line still wins.
	if h := contract.Host(); h != "" && !set["host"] {
		c.host = h
	}
	return nil
}
