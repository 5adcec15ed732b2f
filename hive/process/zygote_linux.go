package process

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/rbee-dev/rbee/internal/procstat"
)

// The zygote is the native trampoline started once, in the hive's cgroup and a session of its own,
// serving Spawns on a socket (trampoline/trampoline.c). For each Spawn it clones a child straight
// into the worker's fresh cgroup (CLONE_INTO_CGROUP) as the hive's own child (CLONE_PARENT) and
// answers with its PID; the child starts its own session, opens the log, writes its PID into
// LISTEN_PID and execs the worker, which keeps that PID and start time.
//
// Why not the alternatives, measured on this 2-core VM:
//   - forking a trampoline from the hive makes Spawn wait until the new process is scheduled and
//     execs (Go's fork waits for the exec): 1.3-2.6 ms p50 on a busy machine;
//   - a spare trampoline forked ahead and moved into the worker's cgroup by a write to
//     cgroup.procs answered in ~0.1 ms when Spawns came back to back, but that write takes a lock
//     that waits for an RCU grace period when no other move happened in the last few milliseconds
//     (CONFIG_CGROUP_FAVOR_DYNMODS off, the default): an isolated Spawn took 12.7 ms p50; and the
//     next spare's fork competed for the CPUs with the answer of the Spawn that took the last one.
//
// Spawns take turns on the zygote's socket. The clone shares the zygote's memory (CLONE_VM) rather
// than copying it, which costs 18-28 µs here against 58-76 µs for a fork: each child runs on a
// region (stack, request, argv and envp) of its own that the zygote reuses only once the kernel has
// cleared the region's word (CLONE_CHILD_CLEARTID: when the child's execve has left the zygote's
// memory, or the child exited); with more than 32 children not yet exec'd it forks as before
// (trampoline/trampoline.c). Where there is no zygote (not started yet, it died, no native
// trampoline), Spawn forks the trampoline as before.

// envSpare marks the zygote's environment, and so its children's until they exec the worker.
const envSpare = "RBEE_TRAMPOLINE_SPARE"

// maxZygoteMsg is the zygote's buffer for a request.
const maxZygoteMsg = 1 << 17

// zygoteWait bounds how long a Spawn waits for the zygote's answer before it gives up on it (an
// answer takes microseconds; this is for a zygote that was stopped).
const zygoteWait = 10 * time.Second

type zygote struct {
	pid int
	c   *child

	mu    sync.Mutex  // one request at a time; held by close too
	ctrl  int         // the hive's end of its socket
	pidfd int         // its own (the reaper closes c.pidfd); -1 once closed
	gone  atomic.Bool // ctrl is closed (set under mu)
}

// errZygoteRefused is the zygote's answer that it started nothing (a malformed request, or the
// clone failed, for example EMFILE or a cgroup's pids.max): the Spawn forks its trampoline instead.
var errZygoteRefused = errors.New("the zygote refused the request")

// startZygote starts the zygote in the background unless it runs or is being started.
func (m *Manager) startZygote() {
	if m.native == "" || m.cfg.noZygote {
		return
	}
	m.mu.Lock()
	if m.closed || m.zyg != nil || m.makingZygote {
		m.mu.Unlock()
		return
	}
	m.makingZygote = true
	m.mu.Unlock()
	m.bg.Add(1)
	go func() {
		defer m.bg.Done()
		z, err := m.forkZygote()
		m.mu.Lock()
		m.makingZygote = false
		if err == nil && !m.closed && m.zyg == nil {
			m.zyg, z = z, nil
			select {
			case m.zygoteReady <- struct{}{}:
			default:
			}
		}
		m.mu.Unlock()
		if err != nil {
			m.log.Warn("start the zygote trampoline; Spawns fork their trampoline meanwhile", zap.Error(err))
		}
		if z != nil {
			z.close() // not wanted after all: it reads end of file and exits
		}
	}()
}

// forkZygote forks the zygote in the hive's own cgroup, in a session of its own.
func (m *Manager) forkZygote() (*zygote, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	theirs := os.NewFile(uintptr(fds[1]), "zygote-socket")
	cmd := &exec.Cmd{
		Path: m.native, Args: []string{"rbee-trampoline", "-zygote"}, Env: []string{envSpare + "=1"},
		Stdin: m.devnull, Stdout: m.devnull, Stderr: m.devnull, ExtraFiles: []*os.File{theirs},
		SysProcAttr: &syscall.SysProcAttr{Setsid: true},
	}
	err = cmd.Start()
	theirs.Close()
	if err != nil {
		unix.Close(fds[0])
		return nil, err
	}
	pid := cmd.Process.Pid
	startTime, err := procstat.StartTime(pid)
	if err != nil {
		m.log.Warn("read start time of the zygote", zap.Int("pid", pid), zap.Error(err))
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		pidfd = -1
	}
	c := &child{startTime: startTime, pidfd: pidfd, reaped: make(chan struct{}), logReady: make(chan struct{}), zygote: true}
	own, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		own = -1
	}
	m.mu.Lock()
	m.children[pid] = c
	m.mu.Unlock()
	m.reapers.Add(1)
	go m.reap(cmdWait(cmd), pid, c, nil)
	return &zygote{pid: pid, ctrl: fds[0], pidfd: own, c: c}, nil
}

// readyZygote returns the running zygote, or nil (and starts one) when there is none.
func (m *Manager) readyZygote() *zygote {
	if m.direct {
		return nil
	}
	m.mu.Lock()
	z := m.zyg
	var dead *zygote
	if z != nil && z.dead() {
		m.zyg, z, dead = nil, nil, z
	}
	m.mu.Unlock()
	if dead != nil {
		dead.close()
	}
	if z == nil {
		m.startZygote()
	}
	return z
}

// dead says whether the zygote has exited or its socket is unusable.
func (z *zygote) dead() bool {
	select {
	case <-z.c.reaped:
		return true
	default:
	}
	return z.gone.Load()
}

// close lets the zygote exit (it reads end of file) and closes the hive's descriptors of it.
func (z *zygote) close() {
	z.mu.Lock()
	defer z.mu.Unlock()
	z.closeLocked()
}

func (z *zygote) closeLocked() {
	if !z.gone.Load() {
		z.gone.Store(true)
		unix.Close(z.ctrl)
	}
	if z.pidfd >= 0 {
		unix.Close(z.pidfd)
		z.pidfd = -1
	}
}

// closeZygote lets the zygote exit (Close).
func (m *Manager) closeZygote() {
	m.mu.Lock()
	z := m.zyg
	m.zyg = nil
	m.mu.Unlock()
	if z != nil {
		z.close()
	}
}

// zygoteMsg encodes a request; ok is false when it does not fit the zygote's buffer.
func zygoteMsg(logPath, bin string, args, env []string, cgroup, socket bool) ([]byte, bool) {
	n := 12 + len(logPath) + 1 + len(bin) + 1
	for _, s := range args {
		n += len(s) + 1
	}
	for _, s := range env {
		n += len(s) + 1
	}
	if n > maxZygoteMsg || len(args)+len(env)+4 > 4096 {
		return nil, false
	}
	var flags uint32
	if cgroup {
		flags |= 1
	}
	if socket {
		flags |= 2
	}
	b := make([]byte, 12, n)
	binary.LittleEndian.PutUint32(b, uint32(len(args)))
	binary.LittleEndian.PutUint32(b[4:], uint32(len(env)))
	binary.LittleEndian.PutUint32(b[8:], flags)
	for _, s := range append(append([]string{logPath, bin}, args...), env...) {
		b = append(append(b, s...), 0)
	}
	return b, true
}

// spawn has the zygote start a worker: msg (zygoteMsg) with the pipe for the trampoline's errors,
// the cgroup's directory (cgFD, -1 for none) and the listening socket (-1 for none). It returns
// the new child's PID; errZygoteRefused when the zygote started nothing; another error when the
// zygote is gone or did not answer, and may have started a child before that.
func (z *zygote) spawn(msg []byte, errFD, cgFD, lisFD int) (int, error) {
	fds := []int{errFD}
	if cgFD >= 0 {
		fds = append(fds, cgFD)
	}
	if lisFD >= 0 {
		fds = append(fds, lisFD)
	}
	z.mu.Lock()
	defer z.mu.Unlock()
	if z.gone.Load() {
		return 0, errors.New("the zygote is closed")
	}
	fail := func(err error) (int, error) {
		z.gone.Store(true) // abandonZygote kills it and closes the rest
		unix.Close(z.ctrl)
		return 0, err
	}
	if err := unix.Sendmsg(z.ctrl, msg, unix.UnixRights(fds...), nil, unix.MSG_NOSIGNAL); err != nil {
		return fail(fmt.Errorf("send to the zygote: %w", err)) // nothing sent: nothing started
	}
	deadline := time.Now().Add(zygoteWait)
	for {
		pfd := []unix.PollFd{{Fd: int32(z.ctrl), Events: unix.POLLIN}}
		n, err := unix.Poll(pfd, ceilMillis(time.Until(deadline)))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fail(fmt.Errorf("wait for the zygote: %w", err))
		}
		if n == 0 {
			return fail(fmt.Errorf("the zygote did not answer within %v", zygoteWait))
		}
		break
	}
	var buf [8]byte
	n, err := unix.Read(z.ctrl, buf[:])
	if err != nil || n != len(buf) {
		return fail(fmt.Errorf("the zygote's answer: %d bytes, %v (it exited)", n, err))
	}
	pid := int64(binary.LittleEndian.Uint64(buf[:]))
	if pid <= 0 {
		return 0, fmt.Errorf("%w: %w", errZygoteRefused, syscall.Errno(-pid))
	}
	return int(pid), nil
}

// abandonZygote gives up on a zygote that failed a request: it is killed, a new one is started, and
// once the old one is gone whatever it may have started in cgDir (a child cloned before it died) is
// killed and reaped; the Spawn then forks its trampoline into a fresh cgroup. Without a cgroup such a child
// cannot be told from the hive's other children and is left to run (a zygote killed by hand
// in the microseconds of a clone).
func (m *Manager) abandonZygote(z *zygote, cgDir string, why error) {
	m.log.Warn("the zygote trampoline failed; this Spawn forks its trampoline and a new zygote starts",
		zap.Int("zygote_pid", z.pid), zap.Error(why))
	m.mu.Lock()
	if m.zyg == z {
		m.zyg = nil
	}
	m.mu.Unlock()
	z.mu.Lock()
	if z.pidfd >= 0 {
		unix.PidfdSendSignal(z.pidfd, unix.SIGKILL, nil, 0)
		waitExit(z.pidfd, killWait) // from then on it clones nothing
	}
	z.closeLocked()
	z.mu.Unlock()
	m.startZygote()
	if cgDir == "" {
		return
	}
	b, _ := os.ReadFile(cgDir + "/cgroup.procs")
	if err := cgroupKill(cgDir); err != nil && !cgroupGone(err) {
		m.log.Warn("cgroup.kill", zap.String("cgroup", cgDir), zap.Error(err))
	}
	waitCgroupEmpty(cgDir, killWait)
	for _, f := range strings.Fields(string(b)) {
		// The zygote's children are the hive's (CLONE_PARENT) and unreaped, so their PIDs are
		// still theirs; for any other PID wait4 fails with ECHILD.
		if pid, err := strconv.Atoi(f); err == nil && !m.isKnownChild(pid) {
			unix.Wait4(pid, nil, 0, nil)
		}
	}
}

// isKnownChild says whether pid is in m.children.
func (m *Manager) isKnownChild(pid int) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.children[pid] != nil
}

// cmdWait waits for a child started with os/exec.
func cmdWait(cmd *exec.Cmd) func() *os.ProcessState {
	return func() *os.ProcessState {
		_ = cmd.Wait() // the status is in ProcessState; a non-zero exit is not an error here
		return cmd.ProcessState
	}
}

// pidWait waits for a child the zygote cloned: the hive's own child, not started by os/exec.
func pidWait(pid int) func() *os.ProcessState {
	return func() *os.ProcessState {
		p, err := os.FindProcess(pid)
		if err != nil {
			return nil
		}
		st, _ := p.Wait()
		return st
	}
}
