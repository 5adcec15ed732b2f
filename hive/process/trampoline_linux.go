package process

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// In trampoline mode the exec must come from the process's leader thread: a Go program execing
// from another thread makes the kernel swap the leader (de_thread), and meanwhile /proc/PID shows
// a zombie whose environ cannot be opened (ESRCH), which a Delete racing the spawn took for a dead
// or foreign process. Locking in init keeps the main goroutine on the main (leader) thread.
func init() {
	if _, ok := os.LookupEnv(envTrampoline); ok {
		runtime.LockOSThread()
	}
}

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
		// Until the dup3 below, stderr is a pipe the hive reads: a failure here reaches the
		// queen as the worker's exit reason.
		fd, err := openWorkerLog(path)
		if err != nil {
			fmt.Fprintf(os.Stderr, "rbee hive: cannot give the worker its log file: %v\n", err)
			os.Exit(126)
		}
		// dup3 clears close-on-exec on the copies, so the worker inherits them as 1 and 2; the
		// second closes the pipe to the hive.
		if err := unix.Dup3(fd, 1, 0); err != nil {
			fmt.Fprintf(os.Stderr, "rbee hive: dup3 of the worker's log file: %v\n", err)
			os.Exit(126)
		}
		if err := unix.Dup3(fd, 2, 0); err != nil {
			fmt.Fprintf(os.Stderr, "rbee hive: dup3 of the worker's log file: %v\n", err)
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
