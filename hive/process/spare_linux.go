package process

import (
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/rbee-dev/rbee/internal/procstat"
)

// A spare is the native trampoline started before a Spawn needs it, waiting on a socket for its
// instructions (trampoline/trampoline.c). Spawn then answers without waiting for a fork: on a
// busy machine the new process of a fork waits for a CPU before its exec lets the hive go on, and
// that wait was most of Spawn's time. Spawn moves the spare into the worker's fresh cgroup before
// sending it anything, so the worker still runs none of its own code outside that cgroup; the
// worker keeps the spare's PID and start time through the exec. One spare is kept ready; Spawns
// that find none start their trampoline by fork as before.

// envSpare marks a spare's environment until the worker's replaces it at the exec.
const envSpare = "RBEE_TRAMPOLINE_SPARE"

// maxSpareMsg is the trampoline's buffer for its instructions.
const maxSpareMsg = 1 << 17

type spare struct {
	pid  int
	ctrl int // the hive's end of the spare's socket
	c    *child
}

// refillSpares starts a spare in the background unless one is ready or being made.
func (m *Manager) refillSpares() {
	if m.native == "" || m.cfg.noSpares {
		return
	}
	m.mu.Lock()
	if m.closed || m.spare != nil || m.makingSpare {
		m.mu.Unlock()
		return
	}
	m.makingSpare = true
	m.mu.Unlock()
	m.bg.Add(1)
	go func() {
		defer m.bg.Done()
		sp, err := m.startSpare()
		m.mu.Lock()
		m.makingSpare = false
		if err == nil && !m.closed && m.spare == nil {
			m.spare, sp = sp, nil
			select {
			case m.spareReady <- struct{}{}:
			default:
			}
		}
		m.mu.Unlock()
		if err != nil {
			m.log.Warn("start a spare trampoline", zap.Error(err))
		}
		if sp != nil {
			unix.Close(sp.ctrl) // not wanted after all: it reads end of file and exits
		}
	}()
}

// startSpare forks a spare in the hive's own cgroup and session-less of any worker.
func (m *Manager) startSpare() (*spare, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	theirs := os.NewFile(uintptr(fds[1]), "spare-socket")
	cmd := &exec.Cmd{
		Path: m.native, Args: []string{"rbee-trampoline", "-spare"}, Env: []string{envSpare + "=1"},
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
		m.log.Warn("read start time of spare", zap.Int("pid", pid), zap.Error(err))
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		pidfd = -1
	}
	c := &child{startTime: startTime, pidfd: pidfd, reaped: make(chan struct{}), logReady: make(chan struct{}), spare: true}
	m.mu.Lock()
	m.children[pid] = c
	m.mu.Unlock()
	m.reapers.Add(1)
	go m.reap(cmd, pid, c, nil)
	return &spare{pid: pid, ctrl: fds[0], c: c}, nil
}

// takeSpare hands the ready spare to a Spawn, if there is one, and starts the next.
func (m *Manager) takeSpare() *spare {
	if m.direct {
		return nil
	}
	m.mu.Lock()
	sp := m.spare
	m.spare = nil
	m.mu.Unlock()
	m.refillSpares()
	return sp
}

// closeSpare lets the ready spare exit (Close).
func (m *Manager) closeSpare() {
	m.mu.Lock()
	sp := m.spare
	m.spare = nil
	m.mu.Unlock()
	if sp != nil {
		unix.Close(sp.ctrl)
	}
}

// spareMsg encodes a spare's instructions; ok is false when they do not fit its buffer.
func spareMsg(logPath, bin string, args, env []string) ([]byte, bool) {
	n := 8 + len(logPath) + 1 + len(bin) + 1
	for _, s := range args {
		n += len(s) + 1
	}
	for _, s := range env {
		n += len(s) + 1
	}
	if n > maxSpareMsg || len(args)+len(env)+4 > 4096 {
		return nil, false
	}
	b := make([]byte, 8, n)
	binary.LittleEndian.PutUint32(b, uint32(len(args)))
	binary.LittleEndian.PutUint32(b[4:], uint32(len(env)))
	for _, s := range append(append([]string{logPath, bin}, args...), env...) {
		b = append(append(b, s...), 0)
	}
	return b, true
}

// useSpare makes sp worker s: into the worker's cgroup first, then its instructions. It reports
// false, having let the spare go, when that fails (the Spawn then forks its trampoline).
func (m *Manager) useSpare(sp *spare, msg []byte, errR, errW, lis *os.File, cgDir string, c child) bool {
	defer unix.Close(sp.ctrl)
	if cgDir != "" {
		err := os.WriteFile(filepath.Join(cgDir, "cgroup.procs"), []byte(strconv.Itoa(sp.pid)), 0)
		if err != nil {
			m.log.Warn("move a spare trampoline into the worker's cgroup", zap.Int("pid", sp.pid), zap.Error(err))
			return false
		}
	}
	fds := []int{int(errW.Fd())} // its stderr until it has the log
	if lis != nil {
		fds = append(fds, int(lis.Fd()))
	}
	rights := unix.UnixRights(fds...)
	// Under the lock, so that its reaper, should the spare have died, learns it was never a worker.
	m.mu.Lock()
	if err := unix.Sendmsg(sp.ctrl, msg, rights, nil, 0); err != nil {
		m.mu.Unlock()
		m.log.Warn("instruct a spare trampoline", zap.Int("pid", sp.pid), zap.Error(err))
		if sp.c.pidfd >= 0 {
			unix.PidfdSendSignal(sp.c.pidfd, unix.SIGKILL, nil, 0) // out of the worker's cgroup
		}
		return false
	}
	sp.c.workerID, sp.c.logPath, sp.c.cgroup = c.workerID, c.logPath, c.cgroup
	m.mu.Unlock()
	m.track(c.logPath, false)
	m.reapers.Add(1)
	go func() {
		defer m.reapers.Done()
		m.readTrampolineErr(sp.c, errR)
	}()
	return true
}
