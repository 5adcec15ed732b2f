package process

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// RunTrampolineIfRequested must be the first thing the hive's main (and any test binary that
// spawns workers) does. In a normal run it returns at once. In the hidden trampoline mode the hive
// starts itself in, it sets LISTEN_PID to its own PID and execs the worker binary in place: the
// worker keeps this PID and start time, which is how systemd socket activation's LISTEN_PID can
// name a PID that Go's fork+exec does not reveal before the child runs. It also opens the
// worker's log file as its stdout and stderr, which takes file creation off the Spawn path.
func RunTrampolineIfRequested() {
	bin, ok := os.LookupEnv(envTrampoline)
	if !ok {
		return
	}
	if path := os.Getenv(envTrampolineLog); path != "" {
		fd, err := unix.Open(path, unix.O_WRONLY|unix.O_CREAT|unix.O_APPEND|unix.O_CLOEXEC, 0o644)
		if err != nil {
			os.Exit(126) // nowhere to say why: the hive reports the exit code through OnExit
		}
		// dup3 clears close-on-exec on the copies, so the worker inherits them as 1 and 2.
		if unix.Dup3(fd, 1, 0) != nil || unix.Dup3(fd, 2, 0) != nil {
			os.Exit(126)
		}
		unix.Close(fd)
	}
	env := make([]string, 0, len(os.Environ())+1)
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, envTrampoline+"=") || strings.HasPrefix(kv, envTrampolineLog+"=") ||
			strings.HasPrefix(kv, envListenPID+"=") {
			continue
		}
		env = append(env, kv)
	}
	env = append(env, envListenPID+"="+strconv.Itoa(os.Getpid()))
	err := unix.Exec(bin, os.Args, env)
	// stderr is the worker's log file: the reason lands where the operator looks.
	fmt.Fprintf(os.Stderr, "rbee hive trampoline: exec worker %s: %v\n", bin, err)
	os.Exit(127)
}
