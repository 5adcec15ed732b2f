package process

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
	"unsafe"

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
	return &Error{Kind: KindNotWorker, Msg: "pid " + strconv.Itoa(pid) + " is not the worker: " + fmt.Sprintf(format, args...)}
}

// prove opens a pidfd on t.PID and checks that it is the worker t names. It returns gone=true (and
// no pidfd) when the process has already exited; a live process that fails a check yields a
// KindNotWorker error naming the check. No signal other than the null signal is sent.
//
// The proof must hold at every instant of a worker's life, including the execs between the hive
// and the worker's final program (trampoline, #! scripts, wrappers), during which its environment
// cannot be read: between the new memory map and the new stack it reads empty, and while a
// multithreaded program execs from a thread other than the leader it cannot be opened at all. So
// the environment is the proof of last resort, and exec changes none of the others:
//
//  1. A child of this Manager that is not yet reaped holds its PID (no reuse before the reap);
//     with the start time read at Spawn it is that very process, whatever it has exec'd since. Its
//     worker id is the one it was spawned with.
//  2. Any process in a worker cgroup (.../rbee-<hive>/w-<id>@<nonce>) must be in one of this
//     worker id's; only the worker and what it forked are placed there. Such a process whose
//     environment cannot be read (an exec in progress), or that is still the zygote's child the
//     worker is about to be (zygote_linux.go), is proven by the cgroup; one whose
//     environment can be read must carry the worker id marker.
//  3. Otherwise (no cgroups) the marker RBEE_WORKER_ID=<id> in its environment, re-read while an
//     exec hides it (bounded by execWindow).
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
	if p, gone, ok := m.proveOwnChild(t); ok {
		return p, gone, nil
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
	if st.Flags&procstat.PFKThread != 0 {
		return fail(notWorker(pid, "it is a kernel thread (%s)", st.Comm))
	}
	// A zombie leader is not proof of death: while a multithreaded process execs from another
	// thread (a Go wrapper, say), its leader reads 'Z' until the exec completes. Only the pidfd,
	// readable once the whole process has exited, tells the two apart.
	if (st.State == 'Z' || st.State == 'X') && exited(fd) {
		return proven{}, true, nil
	}
	p.startTime = st.StartTime

	// A missing v2 line (pure v1 host) or a vanished process leaves cg empty; the liveness check
	// below sorts out the latter.
	cg, _ := ownCgroup(pid)
	inWorkerCg := cg != "" && isRbeeCgroup(cg)

	if workerID, cgroup, found := m.child(pid, st.StartTime); found && workerID != "" {
		// Proof 1: the hive's own child, by PID and start time. (The zygote has no worker id,
		// and is no worker.)
		if workerID != t.WorkerID {
			return fail(notWorker(pid, "it is worker %s's process, spawned by this hive", workerID))
		}
		if cgroup != "" && cg != "" && m.cg2mount+cg != cgroup {
			return fail(notWorker(pid, "its cgroup %s is not the one it was spawned into (%s)", cg, cgroup))
		}
		p.cgroup = cgroup
	} else {
		if want := workerCgroupName(t.WorkerID); inWorkerCg && !strings.HasPrefix(filepathBase(cg), want) {
			return fail(notWorker(pid, "its cgroup %s is another worker's (want leaf %s*)", cg, want))
		}
		env, err := readEnviron(fd, pid, !inWorkerCg)
		switch {
		case hasEnv(env, envWorkerID+"="+t.WorkerID):
			// Proof 2 or 3: the marker (and, in a worker cgroup, the cgroup).
		case inWorkerCg && (len(env) == 0 || errors.Is(err, unix.ESRCH) || hasEnv(env, envSpare+"=1")):
			// Proof 2: in this worker id's cgroup and inside an exec, or the zygote's child that
			// was cloned there and has not yet exec'd the worker.
		case errors.Is(err, errExecWindow):
			return fail(notWorker(pid, "its environment, which must hold %s=%s, is %v", envWorkerID, t.WorkerID, err))
		case err != nil && !errors.Is(err, unix.ESRCH):
			return fail(errf(KindInternal, err, "read /proc/%d/environ", pid))
		default:
			return fail(notWorker(pid, "its environment lacks %s=%s (%d entries, %d bytes)",
				envWorkerID, t.WorkerID, bytes.Count(env, []byte{0}), len(env)))
		}
		if inWorkerCg && m.cg2mount != "" {
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

// proveOwnChild is proof 1 without reading /proc: t names a child of this Manager, by worker id,
// PID and start time (or none), that its reaper has not yet seen exit. Until the reaper has (it
// sets reaping under m.mu before wait(2) collects the child), the PID cannot have been freed and
// reused, so a pidfd opened under the lock is that child's. Its cgroup is still checked to be the
// one it was spawned into. ok is false when any of this does not hold: prove's general path then
// decides, with the refusals it gives.
func (m *Manager) proveOwnChild(t Target) (p proven, gone, ok bool) {
	m.mu.Lock()
	c := m.children[t.PID]
	if c == nil || c.reaping || c.workerID == "" || c.workerID != t.WorkerID || c.startTime == 0 ||
		(t.StartTime != 0 && t.StartTime != c.startTime) {
		m.mu.Unlock()
		return p, false, false
	}
	fd, err := unix.PidfdOpen(t.PID, 0)
	m.mu.Unlock()
	if err != nil {
		return p, false, false
	}
	if exited(fd) {
		unix.Close(fd) // a zombie, to be collected by its reaper: gone
		return p, true, true
	}
	if c.cgroup != "" && !m.inCgroup(fd, t.PID, c) {
		unix.Close(fd)
		return p, false, false
	}
	return proven{pid: t.PID, pidfd: fd, startTime: c.startTime, cgroup: c.cgroup}, false, true
}

// inCgroup says whether child c, whose pidfd is fd, is still in the cgroup it was spawned into:
// by the cgroup id PIDFD_GET_INFO gives (Linux 6.13), else by /proc/PID/cgroup.
func (m *Manager) inCgroup(fd, pid int, c *child) bool {
	if c.cgroupIno != 0 {
		info := unix.PidfdInfo{Mask: unix.PIDFD_INFO_CGROUPID}
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.PIDFD_GET_INFO, uintptr(unsafe.Pointer(&info)))
		if errno == 0 && info.Mask&unix.PIDFD_INFO_CGROUPID != 0 {
			return info.Cgroupid == c.cgroupIno
		}
	}
	cg, err := ownCgroup(pid)
	return err == nil && m.cg2mount+cg == c.cgroup
}

// awaitExit blocks until child pidfd has exited, without collecting it (waitid WNOWAIT). It returns
// at once if the kernel cannot wait on a pidfd (before Linux 5.4).
func awaitExit(pidfd int) {
	var info unix.Siginfo
	for {
		if err := unix.Waitid(unix.P_PIDFD, pidfd, &info, unix.WEXITED|unix.WNOWAIT, nil); err != unix.EINTR {
			return
		}
	}
}

// execWindow bounds how long readEnviron waits out an exec in progress. An exec takes
// microseconds, but on a loaded machine the process inside it may wait long for a CPU.
const execWindow = 2 * time.Second

// readEnviron reads /proc/PID/environ. While a process is inside execve its environment reads
// empty: the new memory map is installed before its arguments and environment are, and the
// environment's end is set only once all of it is in place (the command line, set before it,
// may already read); while a multithreaded process execs from a non-leader thread, the leader
// has left its memory map and opening environ fails with ESRCH until the exec completes. The
// kernel announces the end of an exec with no event, so with wait set such a read of a live
// process is retried, for at most execWindow; a process that has an empty environment for good
// is refused only then.
func readEnviron(pidfd, pid int, wait bool) ([]byte, error) {
	path := "/proc/" + strconv.Itoa(pid) + "/environ"
	deadline := time.Now().Add(execWindow)
	for pause := 20 * time.Microsecond; ; pause *= 2 {
		env, err := readWhole(path)
		inExec := errors.Is(err, unix.ESRCH) || (err == nil && len(env) == 0)
		if !inExec || !wait || exited(pidfd) {
			return env, err
		}
		if time.Now().After(deadline) {
			return env, errExecWindow
		}
		time.Sleep(min(pause, 5*time.Millisecond))
	}
}

// readWhole reads a /proc file in one read(2). os.ReadFile reads /proc/PID/environ 512 bytes at
// a time, and an exec between two reads ends the file early: the descriptor holds the old memory
// map, which reads as empty once the exec has dropped it. A truncated environment lacks the
// marker at its end (2 refusals in 10,000 Deletes during execs). One read copies from one map.
func readWhole(path string) ([]byte, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd)
	for size := 64 << 10; ; size *= 2 {
		buf := make([]byte, size)
		n, err := unix.Pread(fd, buf, 0)
		if err != nil {
			return nil, &os.PathError{Op: "read", Path: path, Err: err}
		}
		if n < size || size >= 8<<20 {
			return buf[:n], nil
		}
	}
}

// errExecWindow is readEnviron's answer for a process that seemed inside an exec for all of
// execWindow.
var errExecWindow = errors.New("empty or unreadable for " + execWindow.String() + " (not a worker, or an exec that does not finish)")

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
