package cli

import (
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// spinnerFrames animate the phase line on a terminal.
var spinnerFrames = []rune("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")

// progress shows a starting worker's phase: on a terminal one redrawn spinner line, elsewhere
// (pipes, files, CI logs) one plain line per state change and no escape codes.
type progress struct {
	w     io.Writer
	tty   bool
	model string
	began time.Time

	mu      sync.Mutex
	id      string
	state   rbeev1.WorkerState
	frame   int
	stopped bool
	quit    chan struct{}
	done    chan struct{}
}

func newProgress(w io.Writer, model string) *progress {
	p := &progress{w: w, model: model, began: time.Now(), quit: make(chan struct{}), done: make(chan struct{})}
	if f, ok := w.(*os.File); ok && isTerminal(f) {
		p.tty = true
		p.draw()
		go p.spin()
	} else {
		close(p.done)
	}
	return p
}

// spin redraws the spinner line until stop.
func (p *progress) spin() {
	defer close(p.done)
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-p.quit:
			return
		case <-t.C:
			p.draw()
		}
	}
}

// draw writes the spinner line; the caller must not hold mu.
func (p *progress) draw() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		return
	}
	what := fmt.Sprintf("spawning a worker for %s", p.model)
	if p.id != "" {
		what = fmt.Sprintf("worker %s %s", p.id, stateName(p.state))
	}
	fmt.Fprintf(p.w, "\r\x1b[K%c %s (%s)", spinnerFrames[p.frame%len(spinnerFrames)], what, short(time.Since(p.began)))
	p.frame++
}

// update records the worker's latest descriptor; a new state is shown at once.
func (p *progress) update(w *rbeev1.Worker) {
	p.mu.Lock()
	changed := p.id != w.GetWorkerId() || p.state != w.GetState()
	p.id, p.state = w.GetWorkerId(), w.GetState()
	p.mu.Unlock()
	if !changed {
		return
	}
	if p.tty {
		p.draw()
		return
	}
	fmt.Fprintf(p.w, "worker %s %s\n", w.GetWorkerId(), stateName(w.GetState()))
}

// stop ends the spinner and clears its line; safe to call more than once.
func (p *progress) stop() {
	p.mu.Lock()
	if p.stopped {
		p.mu.Unlock()
		return
	}
	p.stopped = true
	close(p.quit)
	p.mu.Unlock()
	<-p.done
	if p.tty {
		fmt.Fprint(p.w, "\r\x1b[K")
	}
}

// finish ends the progress with the serving worker's id, hive, PID and port.
func (p *progress) finish(w *rbeev1.Worker) {
	p.stop()
	fmt.Fprintf(p.w, "worker %s %s on hive %s, pid %d, port %d (took %s)\n", w.GetWorkerId(), stateName(w.GetState()),
		w.GetHiveId(), w.GetPid(), w.GetPort(), short(time.Since(p.began)))
}
