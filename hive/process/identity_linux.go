package process

import (
	"bytes"
	"errors"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rbee-dev/rbee/internal/procstat"
)

// pidfdSignalProcessGroup is PIDFD_SIGNAL_PROCESS_GROUP (Linux 6.9): signal the process group
// whose id is the pidfd's process, even after that leader has been reaped, without the PID-reuse
// race of kill(-pgid).
const pidfdSignalProcessGroup = 0x4

// proven is a process whose identity as a given worker has been established; every signal to it
// goes through pidfd.
type proven struct {
	pid       int
	pidfd     int
	startTime uint64
	cgroup    string // absolute path of its rbee cgroup, "" when it is not in one
}

// notWorker is the KindNotWorker error; msg says which check failed.
func notWorker(pid int, format string, args ...any) error {
	e := errf(KindNotWorker, nil, format, args...).(*Error)
	e.Msg = "pid " + strconv.Itoa(pid) + " is not the worker: " + e.Msg
	return e
}

// prove opens a pidfd on t.PID and checks that it is the worker t names. It returns gone=true (and
// no pidfd) when the process has already exited; a live process that fails a check yields a
// KindNotWorker error naming the check. No signal other than the null signal is sent.
func (m *Manager) prove(t Target) (p proven, gone bool, err error) {
	pid := t.PID
	switch {
	case pid <= 1:
		return p, false, errf(KindNotWorker, nil, "pid %d is not a worker: pids <= 1 are never workers", pid)
	case pid == os.Getpid():
		return p, false, errf(KindNotWorker, nil, "pid %d is not a worker: it is the hive itself", pid)
	case pid == os.Getppid():
		return p, false, errf(KindNotWorker, nil, "pid %d is not a worker: it is the hive's parent", pid)
	}
	fd, err := unix.PidfdOpen(pid, 0)
	switch {
	case err == unix.ESRCH:
		return p, true, nil
	case err == unix.EINVAL || err == unix.ENOENT:
		// A thread id that is not a thread-group leader has /proc/TID entries but no pidfd.
		return p, false, notWorker(pid, "pidfd_open refused it (%v): a thread id, not a process", err)
	case err != nil:
		return p, false, errf(KindInternal, err, "pidfd_open %d", pid)
	}
	p = proven{pid: pid, pidfd: fd}
	ok := false
	defer func() {
		if !ok {
			unix.Close(fd)
		}
	}()
	// From here every read of /proc/PID might belong to another process if the pidfd's process
	// has exited and been reaped and the PID reused; the final liveness check through the pidfd
	// rules that out, so a failing check first asks whether the process is simply gone.
	fail := func(e error) (proven, bool, error) {
		if exited(fd) {
			return proven{}, true, nil
		}
		return proven{}, false, e
	}

	st, err := procstat.Read(pid)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return proven{}, true, nil
		}
		return fail(errf(KindInternal, err, "read /proc/%d/stat", pid))
	}
	if t.StartTime != 0 && st.StartTime != t.StartTime {
		return fail(notWorker(pid, "start time %d differs from the worker's %d (PID reused)", st.StartTime, t.StartTime))
	}
	// A zombie leader is not proof of death: while a multithreaded process execs from another
	// thread (the trampoline is a Go program), its leader reads 'Z' until the exec completes. Only
	// the pidfd, readable once the whole process has exited, tells the two apart.
	if (st.State == 'Z' || st.State == 'X') && exited(fd) {
		return proven{}, true, nil
	}
	p.startTime = st.StartTime

	env, err := readEnviron(fd, pid)
	if errors.Is(err, unix.ESRCH) || errors.Is(err, os.ErrNotExist) {
		// No task behind the PID any more: the process the pidfd holds has exited and been
		// reaped (a reused PID would have answered). Seen when a SIGKILLed multithreaded worker
		// whose leader read 'Z' with threads still exiting is reaped by init in between.
		return proven{}, true, nil
	}
	if err != nil {
		return fail(errf(KindInternal, err, "read /proc/%d/environ", pid))
	}
	if !hasEnv(env, envWorkerID+"="+t.WorkerID) {
		return fail(notWorker(pid, "its environment lacks %s=%s", envWorkerID, t.WorkerID))
	}

	// A missing v2 line (pure v1 host) or a vanished process leaves cg empty; the liveness check
	// below sorts out the latter.
	cg, _ := ownCgroup(pid)
	if cg != "" && isRbeeCgroup(cg) {
		if want := workerCgroupName(t.WorkerID); !strings.HasPrefix(filepathBase(cg), want) {
			return fail(notWorker(pid, "its cgroup %s is another worker's (want leaf %s*)", cg, want))
		}
		if m.cg2mount != "" {
			p.cgroup = m.cg2mount + cg
		}
	}

	// Everything above was read from /proc/PID; the process behind the pidfd is still alive, so
	// it cannot have been reused in between and the reads were about it.
	if err := unix.PidfdSendSignal(fd, 0, nil, 0); err != nil {
		if err == unix.ESRCH {
			return proven{}, true, nil
		}
		return proven{}, false, errf(KindInternal, err, "pidfd_send_signal(0) to %d", pid)
	}
	if exited(fd) {
		return proven{}, true, nil // a zombie accepts the null signal
	}
	ok = true
	return p, false, nil
}

// execWindow bounds how long readEnviron waits out an exec in progress.
const execWindow = 100 * time.Millisecond

// readEnviron reads /proc/PID/environ. While a process is inside execve (a worker passing from
// the trampoline to the worker binary) the new memory map is installed before its environment
// bounds are, and environ reads empty for a few microseconds. The kernel announces the end of an
// exec with no event, so an empty read of a live process is retried for a bounded time; a
// process whose environment stays empty (a kernel thread) then fails the marker check.
func readEnviron(pidfd, pid int) ([]byte, error) {
	path := "/proc/" + strconv.Itoa(pid) + "/environ"
	deadline := time.Now().Add(execWindow)
	for pause := 20 * time.Microsecond; ; pause *= 2 {
		env, err := os.ReadFile(path)
		if err != nil || len(env) > 0 || exited(pidfd) || time.Now().After(deadline) {
			return env, err
		}
		time.Sleep(min(pause, 5*time.Millisecond))
	}
}

func filepathBase(p string) string {
	if i := bytes.LastIndexByte([]byte(p), '/'); i >= 0 {
		return p[i+1:]
	}
	return p
}

// hasEnv says whether the NUL-separated environ block holds exactly the entry kv.
func hasEnv(environ []byte, kv string) bool {
	for _, e := range bytes.Split(environ, []byte{0}) {
		if string(e) == kv {
			return true
		}
	}
	return false
}

// exited says, without blocking, whether the pidfd's process has exited (zombie or reaped).
func exited(pidfd int) bool {
	fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, 0)
	return err == nil && n > 0
}

// waitExit waits up to timeout for the pidfd's process to exit, sleeping in poll(2): the kernel
// wakes it at the exit, so the caller learns of it within microseconds.
func waitExit(pidfd int, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, ceilMillis(time.Until(deadline)))
		if err == nil && n > 0 {
			return true
		}
		if err != nil && err != unix.EINTR {
			return false
		}
		if err == nil && time.Until(deadline) <= 0 {
			return false
		}
	}
}

// sendSignal sends sig to the pidfd's process; ESRCH (gone) is not an error.
func sendSignal(pidfd int, sig unix.Signal) error {
	if err := unix.PidfdSendSignal(pidfd, sig, nil, 0); err != nil && err != unix.ESRCH {
		return err
	}
	return nil
}

// signalGroup sends sig to the process group led by the pidfd's process (workers are session
// and group leaders). The pidfd form works after the leader was reaped and cannot hit a reused
// PID; kernels before 6.9 fall back to kill(-pgid), which is still safe while the leader is
// unreaped or the group has members (a group id is not reused while the group exists).
func signalGroup(pidfd, pgid int, sig unix.Signal) error {
	err := unix.PidfdSendSignal(pidfd, sig, nil, pidfdSignalProcessGroup)
	if err == unix.EINVAL {
		err = unix.Kill(-pgid, sig)
	}
	if err != nil && err != unix.ESRCH {
		return err
	}
	return nil
}
