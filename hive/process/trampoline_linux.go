package process

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"

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
// spawns workers) does. In a normal run it returns at once. Workers are started through the native
// trampoline (below) where there is one; elsewhere, in the hidden trampoline mode the hive starts
// itself in, it sets LISTEN_PID to its own PID and execs the worker binary in place: the
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
	// Also without a socket: LISTEN_PID naming itself is the worker mark that tells the worker from
	// what it forked (cgroupRoot.orphaned, markedWorkers); without LISTEN_FDS it hands over nothing.
	env = append(env, envListenPID+"="+strconv.Itoa(os.Getpid()))
	err := unix.Exec(bin, os.Args, env)
	// stderr is the worker's log file: the reason lands where the operator looks.
	fmt.Fprintf(os.Stderr, "rbee hive trampoline: exec worker %s: %v\n", bin, err)
	os.Exit(127)
}

// listenPIDSlot is the environment entry the native trampoline overwrites with its own PID.
const listenPIDSlot = envListenPID + "=0000000000"

// native is the native trampoline (trampoline/trampoline.c), loaded once per process.
var native struct {
	once sync.Once
	path string // "/proc/self/fd/N" of a sealed memfd holding it; "" when unavailable
	err  error
}

// nativeTrampoline returns the path the native trampoline is exec'd from, or an error saying why
// workers must go through the hive's own binary instead. The executable lives in a sealed memfd,
// so no file has to be installed, nothing can modify it, and a noexec /tmp does not matter. It is
// run once with no arguments to prove that this kernel lets it run (vm.memfd_noexec, LSMs).
func nativeTrampoline() (string, error) {
	native.once.Do(func() { native.path, native.err = loadNative() })
	return native.path, native.err
}

func loadNative() (string, error) {
	if len(trampolineELF) == 0 {
		return "", errors.New("no native trampoline for this architecture")
	}
	const mfdExec = 0x10 // MFD_EXEC (Linux 6.3): executable even under vm.memfd_noexec=1
	flags := unix.MFD_CLOEXEC | unix.MFD_ALLOW_SEALING
	fd, err := unix.MemfdCreate("rbee-trampoline", flags|mfdExec)
	if err == unix.EINVAL { // before 6.3
		fd, err = unix.MemfdCreate("rbee-trampoline", flags)
	}
	if err != nil {
		return "", fmt.Errorf("memfd_create: %w", err)
	}
	if _, err := unix.Write(fd, trampolineELF); err != nil {
		unix.Close(fd)
		return "", fmt.Errorf("write memfd: %w", err)
	}
	seals := unix.F_SEAL_SEAL | unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_WRITE
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, seals); err != nil {
		unix.Close(fd)
		return "", fmt.Errorf("seal memfd: %w", err)
	}
	// Far above the descriptors a child is given (0-3), which its fork would overwrite before the
	// exec looks the path up.
	high, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 64)
	unix.Close(fd)
	if err != nil {
		return "", fmt.Errorf("dup memfd: %w", err)
	}
	path := "/proc/self/fd/" + strconv.Itoa(high)
	p, err := os.StartProcess(path, []string{"rbee-trampoline"}, &os.ProcAttr{})
	if err != nil {
		unix.Close(high)
		return "", fmt.Errorf("run it: %w", err)
	}
	st, err := p.Wait()
	if err != nil || !st.Success() {
		unix.Close(high)
		return "", fmt.Errorf("probe run: %v %v", st, err)
	}
	return path, nil
}
