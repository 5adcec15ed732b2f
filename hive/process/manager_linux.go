package process

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/rbee-dev/rbee/internal/narrate"
	"github.com/rbee-dev/rbee/internal/procstat"
	"github.com/rbee-dev/rbee/worker/contract"
)

// Environment variables of the worker contract and of the trampoline.
const (
	envWorkerID      = contract.EnvWorkerID
	envHiveID        = "RBEE_HIVE_ID"
	envWorkerHost    = contract.EnvWorkerHost // the host the worker's port is bound on and reported at
	envJobID         = "RBEE_JOB_ID"
	envTrampoline    = "RBEE_TRAMPOLINE_EXEC" // set: this process is a trampoline; value: the worker binary
	envTrampolineLog = "RBEE_TRAMPOLINE_LOG"  // the log file the trampoline opens for the worker
	envListenFDs     = "LISTEN_FDS"
	envListenPID     = "LISTEN_PID"
	envListenName    = "LISTEN_FDNAMES"
)

// Manager spawns and deletes worker processes. Its only memory is of the children it is still
// reaping (so that none becomes a zombie and OnExit can report them) and of Deletes in flight;
// everything about a worker that Delete needs is proven from the kernel.
type Manager struct {
	cfg      Config
	log      *zap.Logger
	self     string     // the hive's own executable, the trampoline where there is no native one
	native   string     // the native trampoline's path, "" to use self
	devnull  *os.File   // stdin of every worker (stdout and stderr are its log)
	cg2mount string     // cgroup2 mount point, "" when there is none
	cg       cgroupRoot // where worker cgroups go, when useCg
	useCg    bool
	direct   bool // benchmarks only: exec the worker without the trampoline, to measure its cost
	sa       func(port int) unix.Sockaddr
	family   int

	nextPort atomic.Uint32 // rotating start of the port search
	// given holds, with NoHandoff only, the ports recently chosen for workers that bind them
	// themselves, so that a second spawn does not pick a port before its worker has bound it.
	givenMu sync.Mutex
	given   map[int]time.Time
	pending atomic.Int64 // Spawns between the max-workers check and a countable process
	baseEnv []string     // hiveEnv, read once
	// tickMatches counts Spawns whose start time read from /proc matched the one startTimeOf
	// derived from the clock; -1 once one did not (then /proc is always read).
	tickMatches atomic.Int32

	mu           sync.Mutex
	zyg          *zygote // the trampoline that clones workers (zygote_linux.go)
	makingZygote bool
	zygoteReady  chan struct{}      // a token each time a zygote becomes ready (for tests)
	zygoteSpawns atomic.Int64       // workers the zygote started (for tests)
	children     map[int]*child     // by PID, until reaped
	flights      map[target]*flight // Deletes in progress
	closed       bool
	parents      sync.Map // rbee-<hive-id> cgroup directories used by Spawn

	logs logs // the log files of live workers, for the cap and for followers

	stop    chan struct{}
	bg      sync.WaitGroup // the log housekeeping goroutine
	reapers sync.WaitGroup
	tidying sync.WaitGroup // Deletes' clean-up after their answer
}

// child is a worker this Manager started and still has to reap.
type child struct {
	workerID  string
	startTime uint64
	logPath   string
	cgroup    string
	cgroupIno uint64 // the cgroup directory's inode number, which is the kernel's cgroup id
	pidfd     int
	// reaping is set, under Manager.mu, once the reaper has seen the child exit and is about to
	// collect it: until then wait(2) has not freed its PID (see proveOwnChild).
	reaping  bool
	deleting bool          // a Delete owns its end: no OnExit
	exited   bool          // a Delete saw it exit; Live no longer counts it
	reaped   chan struct{} // closed once wait(2) has collected it
	// logReady is closed once the trampoline has opened and locked the log (or failed to: then
	// logErr says why, in the trampoline's words).
	logReady chan struct{}
	zygote   bool // the zygote itself (zygote_linux.go), never a worker
	logErr   string
}

type target struct {
	pid       int
	startTime uint64
	workerID  string
}

// flight is one Delete that concurrent Deletes of the same target join.
type flight struct {
	done chan struct{}
	out  Outcome
	err  error
}

// New checks cfg and starts the log-capping goroutine. It does not look at the worker binary:
// a binary installed after the hive started is fine, so Spawn checks it each time.
func New(cfg Config) (*Manager, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	// The trampoline is this very binary, run through /proc/self/exe: that keeps working after the
	// hive's file is replaced or deleted by an upgrade, when its old path may be another program.
	self := "/proc/self/exe"
	if _, err := os.Stat(self); err != nil {
		return nil, errf(KindInternal, err, "find the hive's own executable for the trampoline")
	}
	m := &Manager{
		cfg:         cfg,
		log:         cfg.Logger,
		self:        self,
		children:    make(map[int]*child),
		flights:     make(map[target]*flight),
		stop:        make(chan struct{}),
		zygoteReady: make(chan struct{}, 1),
		baseEnv:     hiveEnv(),
	}
	if err := m.setListenHost(cfg.ListenHost); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.LogDir, 0o755); err != nil {
		return nil, errf(KindInternal, err, "create log dir")
	}
	if err := unix.Access(cfg.LogDir, unix.W_OK|unix.X_OK); err != nil {
		return nil, errf(KindInternal, err, "log dir %s not writable", cfg.LogDir)
	}
	if m.devnull, err = os.OpenFile(os.DevNull, os.O_RDWR, 0); err != nil {
		return nil, errf(KindInternal, err, "open %s", os.DevNull)
	}
	if m.native, err = nativeTrampoline(); err != nil {
		m.log.Info("workers start through the hive's own binary", zap.String("reason", err.Error()))
	}
	if cfg.hiveTrampoline {
		m.native = ""
	}
	m.cg2mount, _ = cgroup2Mount()
	if cfg.Cgroups == CgroupAuto {
		m.cg, m.useCg = findCgroup2()
	}
	m.nextPort.Store(rand.Uint32())
	m.log.Info("process manager ready", zap.Bool("cgroups", m.useCg), zap.Bool("native_trampoline", m.native != ""),
		zap.String("cgroup_root", filepath.Join(m.cg.mount, m.cg.own)), zap.String("log_dir", cfg.LogDir))
	m.startLogs()
	m.startZygote()
	return m, nil
}

func (m *Manager) setListenHost(host string) error {
	ip := net.ParseIP(host)
	if ip == nil {
		ips, err := net.LookupIP(host)
		if err != nil || len(ips) == 0 {
			return errf(KindInvalid, err, "listen host %q does not resolve", host)
		}
		ip = ips[0]
	}
	if ip4 := ip.To4(); ip4 != nil {
		m.family = unix.AF_INET
		m.sa = func(port int) unix.Sockaddr {
			sa := &unix.SockaddrInet4{Port: port}
			copy(sa.Addr[:], ip4)
			return sa
		}
		return nil
	}
	m.family = unix.AF_INET6
	m.sa = func(port int) unix.Sockaddr {
		sa := &unix.SockaddrInet6{Port: port}
		copy(sa.Addr[:], ip.To16())
		return sa
	}
	return nil
}

// Close stops the background goroutines. It never signals a worker: workers outlive the hive. The
// goroutines reaping children that are still running end when those children do.
func (m *Manager) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	m.mu.Unlock()
	close(m.stop)
	m.closeZygote()
	m.bg.Wait()
	m.tidying.Wait()
	m.devnull.Close()
	// Tidy the rbee-<hive-id> cgroups this Manager used; rmdir fails, harmlessly, on those that
	// still hold workers, which the next hive will find there.
	m.parents.Range(func(dir, _ any) bool {
		if d, ok := dir.(string); ok {
			unix.Rmdir(d)
		}
		return true
	})
	return nil
}

// Live returns how many worker processes of this hive are alive now, its children or not: the
// populated worker cgroups, or without cgroups the processes that carry the worker marker.
func (m *Manager) Live() int {
	if m.useCg {
		return m.cg.liveCgroups(m.cfg.HiveID)
	}
	m.mu.Lock()
	own := make(map[int]bool, len(m.children))
	for pid, c := range m.children {
		if !c.exited && c.workerID != "" { // not the zygote
			own[pid] = true
		}
	}
	m.mu.Unlock()
	// The children cover the microseconds of an exec, when a worker's environment reads empty.
	for _, pid := range markedWorkers(m.cfg.HiveID) {
		own[pid] = true
	}
	return len(own)
}

// checkBinary fails with KindBinary, naming the path, unless path is an executable regular file;
// checking before the fork keeps a typo from becoming a worker that dies at once.
func checkBinary(path string) error {
	if path == "" {
		return errf(KindBinary, nil, "no worker binary configured")
	}
	fi, err := os.Stat(path)
	if err != nil {
		return errf(KindBinary, err, "worker binary %s", path)
	}
	if !fi.Mode().IsRegular() {
		return errf(KindBinary, nil, "worker binary %s is not a regular file", path)
	}
	if err := unix.Access(path, unix.X_OK); err != nil {
		return errf(KindBinary, err, "worker binary %s is not executable", path)
	}
	return nil
}

// Spawn starts a worker and returns as soon as its process exists. The worker gets a listening
// socket on fd 3 (systemd socket activation), its log file as stdout and stderr, its own session,
// and its own cgroup where available. No lock is held across fork/exec, so Spawns run in parallel.
func (m *Manager) Spawn(ctx context.Context, s SpawnSpec) (Spawned, error) {
	if err := checkID("worker id", s.WorkerID); err != nil {
		return Spawned{}, err
	}
	hiveID := cmp.Or(s.HiveID, m.cfg.HiveID, "hive")
	if err := checkID("hive id", hiveID); err != nil {
		return Spawned{}, err
	}
	if err := checkNUL(s); err != nil {
		return Spawned{}, err
	}
	binary := cmp.Or(s.Binary, m.cfg.Binary)
	if err := checkBinary(binary); err != nil {
		return Spawned{}, err
	}
	noHandoff := m.cfg.NoHandoff || s.OwnPort
	if m.cfg.MaxWorkers > 0 {
		n := m.pending.Add(1)
		defer m.pending.Add(-1)
		if live := m.Live(); live+int(n)-1 >= m.cfg.MaxWorkers {
			return Spawned{}, errf(KindExhausted, nil, "max workers %d reached (%d live)", m.cfg.MaxWorkers, live)
		}
	}
	if narrate.On(ctx) {
		narrate.Event(ctx, "hive", "worker_spawn_start", fmt.Sprintf("Spawning worker %s for model %q on %s", s.WorkerID, s.Model, s.Device),
			zap.String("worker_id", s.WorkerID), zap.String("model", s.Model), zap.String("device", s.Device))
	}

	lis, port, err := m.listen(noHandoff)
	if err != nil {
		return Spawned{}, err
	}
	defer lis.Close() // the worker has its own copy once started
	var inherit []*os.File
	if noHandoff {
		lis.Close() // free for the worker to bind; m.given keeps other spawns off it meanwhile
	} else {
		inherit = []*os.File{lis}
	}

	// The trampoline, not the hive, opens the log (O_APPEND) and makes it the worker's stdout and
	// stderr: creating a file costs a few hundred microseconds on ext4, as much as fork and exec
	// together, and in the child it overlaps with the hive's next request instead of delaying
	// this one. Each life gets its own file (see logName). Until the trampoline has the log, its
	// stderr is a pipe to the hive, so a failure to open it is reported with its reason.
	logPath := filepath.Join(m.cfg.LogDir, logName(s.WorkerID, time.Now()))
	var errR, errW *os.File
	if !m.direct {
		// A blocking pipe, read by the reaper on a thread of its own: a read end in the runtime's
		// poller (os.Pipe) delayed the worker's start by ~10 ms p50 (BenchmarkSpawnToReady).
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			return Spawned{}, errf(KindInternal, err, "pipe for the trampoline's errors")
		}
		errR, errW = os.NewFile(uintptr(p[0]), "trampoline-errors"), os.NewFile(uintptr(p[1]), "trampoline-stderr")
		defer errW.Close() // the child has its own copy once started
	}

	// The last point where the spawn can still be given up with nothing to undo.
	if err := CheckStart(ctx); err != nil {
		if errR != nil {
			errR.Close()
		}
		return Spawned{}, err
	}
	attr := &syscall.SysProcAttr{Setsid: true} // own session and group; no Pdeathsig: workers outlive the hive
	cgDir, cgFD, cgIno := "", -1, uint64(0)
	newCgroup := func() error {
		nonce := strconv.FormatUint(uint64(time.Now().UnixNano()), 36) + strconv.FormatUint(uint64(rand.Uint32()), 36)
		dir, fd, err := m.cg.create(hiveID, s.WorkerID, nonce)
		if err != nil {
			return errf(KindInternal, err, "create worker cgroup")
		}
		m.parents.Store(filepath.Dir(dir), true)
		var st unix.Stat_t
		if unix.Fstat(fd, &st) == nil {
			cgIno = st.Ino
		}
		cgDir, cgFD = dir, fd
		attr.UseCgroupFD, attr.CgroupFD = true, fd
		return nil
	}
	if m.useCg {
		if err := newCgroup(); err != nil {
			if errR != nil {
				errR.Close()
			}
			return Spawned{}, err
		}
		defer func() { unix.Close(cgFD) }()
	}

	args := contract.Args{WorkerID: s.WorkerID, HiveID: hiveID, Model: s.Model, Device: s.Device, Port: port,
		Queen: s.QueenAddress}.Argv(binary)
	if s.Extra != nil {
		more, env := s.Extra(port)
		args = append(args, more...)
		s.Env = append(slices.Clip(s.Env), env...)
		// A NUL would cut an argument short, and split the zygote's request into other strings.
		if i := slices.IndexFunc(append(slices.Clip(more), env...), func(v string) bool { return strings.IndexByte(v, 0) >= 0 }); i >= 0 {
			if cgDir != "" {
				removeCgroup(cgDir)
			}
			if errR != nil {
				errR.Close()
			}
			return Spawned{}, errf(KindInvalid, nil, "the model's command line or environment contains a NUL byte (entry %d)", i)
		}
	}
	env := workerEnv(m.baseEnv, s, hiveID, m.cfg.ListenHost, !noHandoff)
	cmd := &exec.Cmd{Stdin: m.devnull, Stdout: m.devnull, Stderr: m.devnull, ExtraFiles: inherit, SysProcAttr: attr}
	if errW != nil {
		cmd.Stderr = errW // until the trampoline has the log
	}
	switch {
	case m.direct:
		cmd.Path, cmd.Args, cmd.Env = binary, args, env
	case m.native != "":
		// The native trampoline: opens the log, writes its PID into the LISTEN_PID slot, execs.
		cmd.Path = m.native
		cmd.Args = append([]string{"rbee-trampoline", logPath, binary}, args...)
		// The slot is there without a socket too: LISTEN_PID naming itself is the worker mark.
		cmd.Env = append(env, listenPIDSlot)
	default:
		// The hive's own binary in trampoline mode, which does the same.
		cmd.Path, cmd.Args = m.self, args
		cmd.Env = append(env, envTrampoline+"="+binary, envTrampolineLog+"="+logPath)
	}
	var pid int
	var before, after int64 // CLOCK_BOOTTIME around the clone (see startTimeOf)
	wait := cmdWait(cmd)
	if z := m.readyZygote(); z != nil && errW != nil {
		// The zygote exists only with the native trampoline, whose arguments and environment
		// (with the LISTEN_PID slot) cmd holds.
		if msg, fits := zygoteMsg(logPath, binary, args, cmd.Env, cgFD >= 0, !noHandoff); fits {
			lisFD := -1
			if !noHandoff {
				lisFD = int(lis.Fd())
			}
			before = bootNanos()
			p, err := z.spawn(msg, int(errW.Fd()), cgFD, lisFD)
			after = bootNanos()
			switch {
			case err == nil:
				pid, wait = p, pidWait(p)
				m.zygoteSpawns.Add(1)
			case errors.Is(err, errZygoteRefused):
				m.log.Warn("the zygote trampoline started no worker; forking the trampoline", zap.String("worker_id", s.WorkerID), zap.Error(err))
			default:
				m.abandonZygote(z, cgDir, err)
				if cgDir != "" {
					// A cgroup that had cgroup.kill written kills what is later cloned into it
					// (its kill_seq moved on): the fork needs a fresh one.
					unix.Close(cgFD)
					removeCgroup(cgDir)
					if err := newCgroup(); err != nil {
						if errR != nil {
							errR.Close()
						}
						return Spawned{}, err
					}
				}
			}
		}
	}
	if pid == 0 {
		before = bootNanos()
		err := cmd.Start()
		after = bootNanos()
		if err != nil {
			if cgDir != "" {
				removeCgroup(cgDir)
			}
			if errR != nil {
				errR.Close()
			}
			return Spawned{}, errf(KindInternal, err, "start worker")
		}
		pid = cmd.Process.Pid
	}
	if errW != nil {
		errW.Close() // now only the trampoline holds the write end: EOF once it has the log
	}
	// The child is not reaped before the reaper below runs, so its PID is still its own here.
	startTime, err := m.startTimeOf(pid, before, after)
	if err != nil {
		m.log.Warn("read start time of new worker", zap.Int("pid", pid), zap.Error(err))
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		pidfd = -1
	}
	c := &child{workerID: s.WorkerID, startTime: startTime, logPath: logPath, cgroup: cgDir, cgroupIno: cgIno, pidfd: pidfd,
		reaped: make(chan struct{}), logReady: make(chan struct{})}
	m.track(logPath, false)
	m.mu.Lock()
	m.children[pid] = c
	m.mu.Unlock()
	m.reapers.Add(1)
	go m.reap(wait, pid, c, errR)

	if narrate.On(ctx) {
		narrate.Event(ctx, "hive", "worker_spawned", fmt.Sprintf("Worker %s spawned (PID %d, port %d)", s.WorkerID, pid, port),
			zap.String("worker_id", s.WorkerID), zap.Int("pid", pid), zap.Int("port", port),
			zap.Uint64("start_time", startTime), zap.String("cgroup", cgDir))
	}
	return Spawned{PID: pid, Port: port, StartTime: startTime, Cgroup: cgDir}, nil
}

// userHZ is the unit of the start times in /proc/PID/stat: clock ticks of 1/100 s (USER_HZ, 100
// on every architecture Linux runs rbee on; startTimeOf checks it against /proc).
const userHZ = 100

// trustTicks is how many Spawns must find startTimeOf's derived start time equal to /proc's before
// /proc is no longer read.
const trustTicks = 3

// bootNanos reads CLOCK_BOOTTIME (0 if it cannot).
func bootNanos() int64 {
	var ts unix.Timespec
	if unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts) != nil {
		return 0
	}
	return ts.Nano()
}

// startTimeOf returns the start time of child pid, just cloned between the CLOCK_BOOTTIME readings
// before and after, as /proc/PID/stat gives it. The kernel stamps a new process with CLOCK_BOOTTIME
// inside clone, and /proc shows that stamp in whole clock ticks: when both readings fall in the
// same tick, that tick is the start time, known without reading /proc (which costs tens of
// microseconds here, as much as a tenth of a Spawn). About one Spawn in a hundred straddles a tick
// and reads /proc. So does every Spawn until trustTicks of them found the two equal, and every
// Spawn for good once one did not (a kernel that counts otherwise).
func (m *Manager) startTimeOf(pid int, before, after int64) (uint64, error) {
	const tick = int64(time.Second) / userHZ
	if before <= 0 || before/tick != after/tick {
		return procstat.StartTime(pid)
	}
	derived := uint64(before / tick)
	n := m.tickMatches.Load()
	if n >= trustTicks {
		return derived, nil
	}
	st, err := procstat.StartTime(pid)
	if err != nil || n < 0 {
		return st, err
	}
	if st != derived {
		m.tickMatches.Store(-1)
		m.log.Info("this kernel's process start times are not CLOCK_BOOTTIME in 1/100 s ticks; reading them from /proc",
			zap.Uint64("proc", st), zap.Uint64("derived", derived))
		return st, nil
	}
	m.tickMatches.CompareAndSwap(n, n+1)
	return st, nil
}

// reservedEnv says whether kv sets a variable of the worker contract or the trampoline, which only
// the hive sets.
func reservedEnv(kv string) bool {
	k, _, _ := strings.Cut(kv, "=")
	switch k {
	case envWorkerID, envHiveID, envWorkerHost, envTrampoline, envTrampolineLog, envSpare, envListenFDs, envListenPID, envListenName:
		return true
	}
	return false
}

// hiveEnv is what workers inherit of the hive's own environment, read once by New: its
// credentials stay with the hive (a worker gets only what the spec hands it, its own token, never
// the cluster token the hive may have been started with), and the contract's variables are the
// hive's to set.
func hiveEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		secret := strings.HasPrefix(kv, "RBEE_TOKEN=") || strings.HasPrefix(kv, "RBEE_WORKER_TOKEN=") || strings.HasPrefix(kv, "RBEE_TLS_")
		if !secret && !reservedEnv(kv) {
			env = append(env, kv)
		}
	}
	return mergeEnv(nil, env)
}

// workerEnv is base (hiveEnv) plus the spec's extras plus the contract variables, which always
// win: a caller cannot hand a worker another worker's identity marker.
func workerEnv(base []string, s SpawnSpec, hiveID, host string, handoff bool) []string {
	extra := make([]string, 0, len(s.Env)+6)
	for _, kv := range s.Env {
		if !reservedEnv(kv) {
			extra = append(extra, kv)
		}
	}
	extra = append(extra, envWorkerID+"="+s.WorkerID, envHiveID+"="+hiveID, envWorkerHost+"="+host)
	if handoff {
		extra = append(extra, envListenFDs+"=1", envListenName+"=rbee")
	}
	if s.JobID != "" {
		extra = append(extra, envJobID+"="+s.JobID)
	}
	return mergeEnv(base, extra)
}

// mergeEnv returns base without the variables extra sets, then extra, keeping only the last entry
// of each variable, as os/exec does before an exec: the zygote passes the list on as it is, and a
// program reading the first of two entries would see the hive's value instead of the spec's. base
// has one entry per variable; extra is short (a spec's environment), so this compares keys
// instead of building a map for every Spawn.
func mergeEnv(base, extra []string) []string {
	keys := make([]string, len(extra))
	for i, kv := range extra {
		keys[i], _, _ = strings.Cut(kv, "=")
	}
	out := make([]string, 0, len(base)+len(extra))
	for _, kv := range base {
		if k, _, _ := strings.Cut(kv, "="); !slices.Contains(keys, k) {
			out = append(out, kv)
		}
	}
	for i, kv := range extra {
		if !slices.Contains(keys[i+1:], keys[i]) {
			out = append(out, kv)
		}
	}
	return out
}

// givenHold is how long a port chosen for a worker that binds it itself stays off limits: ample for
// the worker to start and bind.
const givenHold = 30 * time.Second

// give reserves port for a NoHandoff spawn unless it was given out within givenHold.
func (m *Manager) give(port int) bool {
	now := time.Now()
	m.givenMu.Lock()
	defer m.givenMu.Unlock()
	if m.given == nil {
		m.given = map[int]time.Time{}
	}
	if t, ok := m.given[port]; ok && now.Sub(t) < givenHold {
		return false
	}
	for p, t := range m.given {
		if now.Sub(t) >= givenHold {
			delete(m.given, p)
		}
	}
	m.given[port] = now
	return true
}

// listen binds and listens on the first free port of the range, starting from a rotating offset so
// that consecutive Spawns do not all probe the same busy ports. The socket is close-on-exec, so
// only the worker it is meant for inherits it, and a port is in use exactly as long as some
// process holds its socket: no bookkeeping, nothing to leak.
func (m *Manager) listen(noHandoff bool) (*os.File, int, error) {
	fd, err := unix.Socket(m.family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, 0, errf(KindInternal, err, "socket")
	}
	// Lets a port be reused while connections of its dead worker sit in TIME_WAIT; two listeners
	// on one port are still impossible without SO_REUSEPORT.
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		unix.Close(fd)
		return nil, 0, errf(KindInternal, err, "setsockopt SO_REUSEADDR")
	}
	n := m.cfg.PortHigh - m.cfg.PortLow + 1
	start := int(m.nextPort.Add(1) % uint32(n))
	for i := 0; i < n; i++ {
		port := m.cfg.PortLow + (start+i)%n
		if noHandoff && !m.give(port) {
			continue
		}
		if err := unix.Bind(fd, m.sa(port)); err != nil {
			if err == unix.EADDRINUSE || err == unix.EACCES {
				continue
			}
			unix.Close(fd)
			return nil, 0, errf(KindInternal, err, "bind %s:%d", m.cfg.ListenHost, port)
		}
		if err := unix.Listen(fd, unix.SOMAXCONN); err != nil {
			unix.Close(fd)
			if err == unix.EADDRINUSE { // lost a race for the port; a fresh socket tries on
				return m.listen(noHandoff)
			}
			return nil, 0, errf(KindInternal, err, "listen %s:%d", m.cfg.ListenHost, port)
		}
		return os.NewFile(uintptr(fd), "rbee-listener:"+strconv.Itoa(port)), port, nil
	}
	unix.Close(fd)
	return nil, 0, errf(KindExhausted, nil, "no free port in %d-%d on %s", m.cfg.PortLow, m.cfg.PortHigh, m.cfg.ListenHost)
}

// reap waits for one child so that it never lingers as a zombie, cleans up what it left behind
// and, unless a Delete is ending it, reports its exit.
// readTrampolineErr reads what the trampoline says on its stderr until it has the worker's log (or
// exits) into c.logErr, and then closes c.logReady.
func (m *Manager) readTrampolineErr(c *child, trampolineErr *os.File) {
	if trampolineErr != nil {
		// EOF comes within milliseconds: when the trampoline puts the log over its stderr, or exits.
		msg, _ := io.ReadAll(io.LimitReader(trampolineErr, 4<<10))
		trampolineErr.Close()
		c.logErr = strings.TrimSpace(string(msg))
	}
	close(c.logReady)
}

func (m *Manager) reap(wait func() *os.ProcessState, pid int, c *child, trampolineErr *os.File) {
	defer m.reapers.Done()
	if !c.zygote {
		m.readTrampolineErr(c, trampolineErr)
	}
	if c.pidfd >= 0 {
		awaitExit(c.pidfd)
	}
	m.mu.Lock()
	c.reaping = true // from here on the PID may be freed: proveOwnChild no longer vouches for it
	m.mu.Unlock()
	st := wait()
	at := time.Now()
	m.mu.Lock()
	delete(m.children, pid)
	deleting, closed := c.deleting || c.zygote, m.closed
	m.mu.Unlock()
	close(c.reaped)
	if deleting {
		if c.pidfd >= 0 {
			unix.Close(c.pidfd)
		}
		m.untrack(c.logPath) // whatever the worker forked, Delete kills; the sweep checks the lock
		return               // Delete cleans up and reports
	}
	// It ended on its own: whatever it forked must not outlive it.
	if c.cgroup != "" {
		if p, _ := cgroupPopulated(c.cgroup); p {
			cgroupKill(c.cgroup)
			waitCgroupEmpty(c.cgroup, killWait)
		}
		removeCgroup(c.cgroup)
	} else if c.pidfd >= 0 {
		// Its group, through the pidfd only: the PID is free for reuse now, so no kill(-pgid)
		// fallback. Children that started their own session are beyond reach without a cgroup.
		unix.PidfdSendSignal(c.pidfd, unix.SIGKILL, nil, pidfdSignalProcessGroup)
	}
	if c.pidfd >= 0 {
		unix.Close(c.pidfd)
	}
	m.untrack(c.logPath) // nothing writes the log any more
	ex := Exit{WorkerID: c.workerID, PID: pid, StartTime: c.startTime, ExitCode: -1, Time: at, LogTail: logTail(c.logPath, 20)}
	if c.logErr != "" {
		// The trampoline could not give the worker its log: that is the reason, and there is
		// no log to show.
		ex.LogTail = strings.TrimSpace(c.logErr + "\n" + ex.LogTail)
	}
	if st == nil {
		m.log.Warn("wait for worker", zap.Int("pid", pid)) // its exit status is unknown
	} else if ws, ok := st.Sys().(syscall.WaitStatus); ok {
		switch {
		case ws.Exited():
			ex.ExitCode = ws.ExitStatus()
		case ws.Signaled():
			ex.Signal = unix.SignalName(ws.Signal())
		}
	}
	m.log.Info("worker exited on its own", zap.String("worker_id", c.workerID), zap.Int("pid", pid),
		zap.Int("exit_code", ex.ExitCode), zap.String("signal", ex.Signal), zap.String("actor", "hive"),
		zap.String("action", "worker_exit"))
	if !closed && m.cfg.OnExit != nil {
		m.cfg.OnExit(ex)
	}
}

// Delete stops the worker t names: after proving the PID is that worker (see prove), SIGTERM and
// SIGCONT, up to grace to leave, then SIGKILL to the worker's whole cgroup or process group. It
// returns once the worker and everything it forked are gone (and, for a child, reaped). Concurrent
// Deletes of the same target share one run and its outcome. Once signals are sent the Delete runs
// to its end even if ctx is cancelled, so that no worker is left half-stopped; the wait is bounded
// by grace plus twice the SIGKILL bound.
func (m *Manager) Delete(ctx context.Context, t Target, grace time.Duration) (Outcome, error) {
	if err := checkGrace(grace); err != nil {
		return OutcomeUnknown, err
	}
	if t.PID > 1 && t.PID != os.Getpid() && t.PID != os.Getppid() {
		if err := checkID("worker id", t.WorkerID); err != nil {
			return OutcomeUnknown, err
		}
	}
	key := target{t.PID, t.StartTime, t.WorkerID}
	m.mu.Lock()
	if f := m.flights[key]; f != nil {
		m.mu.Unlock()
		select {
		case <-f.done:
			return f.out, f.err
		case <-ctx.Done():
			return OutcomeUnknown, errf(KindInternal, ctx.Err(), "waiting for a concurrent delete of pid %d", t.PID)
		}
	}
	f := &flight{done: make(chan struct{})}
	m.flights[key] = f
	m.mu.Unlock()

	f.out, f.err = m.delete(ctx, t, grace)

	m.mu.Lock()
	delete(m.flights, key)
	m.mu.Unlock()
	close(f.done)
	return f.out, f.err
}

func (m *Manager) delete(ctx context.Context, t Target, grace time.Duration) (Outcome, error) {
	fields := []zap.Field{zap.String("worker_id", t.WorkerID), zap.Int("pid", t.PID)}
	p, gone, err := m.prove(t)
	if err != nil {
		narrate.Warn(ctx, "hive", "worker_delete_refused", "refusing to signal process", append(fields, zap.Error(err))...)
		return OutcomeUnknown, err
	}
	if err := CheckStart(ctx); err != nil {
		if !gone {
			unix.Close(p.pidfd)
		}
		return OutcomeUnknown, err
	}
	if gone {
		// Exited on its own (its reaper, if it is this Manager's child, reports it and kills its
		// cgroup) or deleted. A worker that died with no hive to reap it may have left what it
		// forked in its cgroup: that goes before the answer says the worker is gone.
		if m.useCg && !m.isChild(t.PID, t.StartTime) {
			m.killOrphaned(ctx, t.WorkerID)
		}
		narrate.Event(ctx, "hive", "worker_delete_already_exited", "worker already gone", fields...)
		return AlreadyExited, nil
	}
	c := m.claimChild(t.PID, p.startTime)

	// Without a cgroup, children that started their own session are found only through the
	// process tree, and only while the worker is alive to be their parent.
	var strays []proven
	if p.cgroup == "" {
		strays = descendants(p.pid)
	}
	// What the caller need not wait for (closing descriptors, removing the empty cgroup) happens
	// after the answer, on every path, tracked so that Close waits for it.
	finished := false
	defer func() { m.tidy(p, strays, finished) }()

	// The cgroup's events file, for killLeftovers, is opened once the first signal is on its way:
	// the open (tens of microseconds here) overlaps with the worker's exit instead of following it.
	events := -1
	openEventsOnce := func() {
		if p.cgroup != "" && events < 0 {
			events, _ = openEvents(p.cgroup) // on failure killLeftovers opens it by path
		}
	}
	defer func() {
		if events >= 0 {
			unix.Close(events)
		}
	}()
	out := Killed
	if grace > 0 {
		narrate.Event(ctx, "hive", "worker_delete_sigterm", "Sending SIGTERM", append(fields, zap.Duration("grace", grace))...)
		if err := sendSignal(p.pidfd, unix.SIGTERM); err != nil {
			return OutcomeUnknown, errf(KindInternal, err, "SIGTERM pid %d", p.pid)
		}
		sendSignal(p.pidfd, unix.SIGCONT) // a stopped worker cannot act on SIGTERM until continued
		openEventsOnce()
		if waitExit(p.pidfd, grace) {
			out = Exited
		}
	}
	if out == Killed {
		narrate.Event(ctx, "hive", "worker_delete_sigkill", "Sending SIGKILL", fields...)
		m.killAll(p, strays)
		openEventsOnce()
		if !waitExit(p.pidfd, killWait) {
			return OutcomeUnknown, errf(KindStuck, nil, "pid %d still alive %v after SIGKILL", p.pid, killWait)
		}
	}
	// The worker is gone; anything it forked goes too, before the answer says so.
	if err := m.killLeftovers(p, strays, events); err != nil {
		return OutcomeUnknown, err
	}
	finished = true
	if c != nil {
		m.mu.Lock()
		c.exited = true // no longer counted by Live, though its reaper may not have run yet
		m.mu.Unlock()
	}
	if out == Exited {
		narrate.Event(ctx, "hive", "worker_delete_graceful", "Worker left on SIGTERM within the grace period", append(fields, zap.Stringer("outcome", out))...)
	} else {
		narrate.Event(ctx, "hive", "worker_delete_forced", "Worker killed with SIGKILL", append(fields, zap.Stringer("outcome", out))...)
	}
	return out, nil
}

// killOrphaned kills and removes what a worker that died unreaped left in its cgroups (see
// cgroupRoot.orphaned): a Delete of a gone worker then still leaves nothing behind.
func (m *Manager) killOrphaned(ctx context.Context, workerID string) {
	for _, dir := range m.cg.orphaned(cmp.Or(m.cfg.HiveID, "hive"), workerID) {
		if m.ownsCgroup(dir) {
			continue // a worker this hive spawned and has not reaped, its reaper's to clean
		}
		narrate.Warn(ctx, "hive", "worker_delete_orphans", "the worker is gone but left processes in its cgroup; killing them",
			zap.String("worker_id", workerID), zap.String("cgroup", dir))
		if err := cgroupKill(dir); err != nil {
			m.log.Warn("cgroup.kill", zap.String("cgroup", dir), zap.Error(err))
			continue
		}
		if err := waitCgroupEmpty(dir, killWait); err != nil {
			m.log.Warn("orphaned worker cgroup not emptied", zap.String("cgroup", dir), zap.Error(err))
			continue
		}
		removeCgroup(dir)
	}
}

// tidy closes a Delete's descriptors and, once the worker is gone (finished), removes its empty
// cgroup, in the background: the Delete has answered by then. Close waits for it.
func (m *Manager) tidy(p proven, strays []proven, finished bool) {
	m.tidying.Add(1)
	go func() {
		defer m.tidying.Done()
		unix.Close(p.pidfd)
		for _, s := range strays {
			unix.Close(s.pidfd)
		}
		if finished && p.cgroup != "" {
			if err := removeCgroup(p.cgroup); err != nil {
				m.log.Warn("remove worker cgroup", zap.Error(err))
			}
		}
	}()
}

// claimChild returns this Manager's record of child pid, if it has one with that start time, and
// marks it as being deleted so that its exit is not reported through OnExit.
func (m *Manager) claimChild(pid int, startTime uint64) *child {
	m.mu.Lock()
	defer m.mu.Unlock()
	c := m.children[pid]
	if c == nil || (startTime != 0 && c.startTime != 0 && c.startTime != startTime) {
		return nil
	}
	c.deleting = true
	return c
}

// ownsCgroup says whether dir is the cgroup of one of this Manager's children not yet reaped: its
// reaper kills and removes it once the child has exited.
func (m *Manager) ownsCgroup(dir string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, c := range m.children {
		if c.cgroup == dir {
			return true
		}
	}
	return false
}

// isChild says whether pid is this Manager's child, not yet reaped, with that start time (0: any).
// Its reaper kills and removes its cgroup once it has exited.
func (m *Manager) isChild(pid int, startTime uint64) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	c := m.children[pid]
	return c != nil && c.workerID != "" && (startTime == 0 || c.startTime == 0 || c.startTime == startTime)
}

// child returns what prove needs of this Manager's record of child pid when it is the process
// with that start time: until it is reaped, a child's PID cannot name another process.
func (m *Manager) child(pid int, startTime uint64) (workerID, cgroup string, ok bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	c := m.children[pid]
	if c == nil || c.startTime == 0 || c.startTime != startTime {
		return "", "", false
	}
	return c.workerID, c.cgroup, true
}

// killAll SIGKILLs the worker and everything it forked: cgroup.kill reaches even processes that
// left its session; otherwise its process group plus the strays found in its process tree.
func (m *Manager) killAll(p proven, strays []proven) {
	if p.cgroup != "" {
		if err := cgroupKill(p.cgroup); err != nil && !cgroupGone(err) {
			m.log.Warn("cgroup.kill", zap.String("cgroup", p.cgroup), zap.Error(err))
		}
	} else {
		signalGroup(p.pidfd, p.pid, unix.SIGKILL)
		for _, s := range strays {
			sendSignal(s.pidfd, unix.SIGKILL)
		}
	}
	sendSignal(p.pidfd, unix.SIGKILL) // in case the cgroup write failed
}

// killLeftovers removes what survives the worker's main process and waits, bounded, until it is
// gone (tidy removes the empty cgroup afterwards). events is the cgroup's open cgroup.events, or
// -1 to open it here.
func (m *Manager) killLeftovers(p proven, strays []proven, events int) error {
	if p.cgroup != "" {
		if events < 0 {
			fd, err := openEvents(p.cgroup)
			if err != nil {
				if cgroupGone(err) {
					return nil
				}
				return errf(KindInternal, err, "read cgroup.events")
			}
			defer unix.Close(fd)
			events = fd
		}
		// A cgroup that is gone was empty: rmdir succeeds only on an empty cgroup (another hive
		// reaping the worker may have removed it; its files then read ENODEV).
		populated, err := eventsPopulated(events)
		if err != nil {
			if cgroupGone(err) {
				return nil
			}
			return errf(KindInternal, err, "read cgroup.events")
		}
		if populated {
			if err := cgroupKill(p.cgroup); err != nil {
				if cgroupGone(err) {
					return nil
				}
				return errf(KindInternal, err, "cgroup.kill %s", p.cgroup)
			}
			if err := waitEventsEmpty(events, p.cgroup, killWait); err != nil {
				return err
			}
		}
		return nil
	}
	signalGroup(p.pidfd, p.pid, unix.SIGKILL)
	for _, s := range strays {
		sendSignal(s.pidfd, unix.SIGKILL)
	}
	for _, s := range strays {
		if !waitExit(s.pidfd, killWait) {
			return errf(KindStuck, nil, "pid %d (forked by worker pid %d) still alive %v after SIGKILL", s.pid, p.pid, killWait)
		}
	}
	return nil
}

// descendants returns pidfds for the live processes below pid in the process tree and those in
// pid's session, each verified after opening to be the process seen in the scan. (This kernel
// may lack /proc/PID/task/TID/children, so the whole of /proc is read, with one buffer.)
func descendants(pid int) []proven {
	d, err := os.Open("/proc")
	if err != nil {
		return nil
	}
	names, _ := d.Readdirnames(-1)
	d.Close()
	kids := make(map[int][]int)
	seen := make(map[int]procstat.Stat)
	buf := make([]byte, 1024)
	for _, name := range names {
		n, err := strconv.Atoi(name)
		if err != nil || n == pid {
			continue
		}
		st, err := readStat(n, buf)
		if err != nil {
			continue
		}
		seen[n] = st
		kids[st.PPID] = append(kids[st.PPID], n)
	}
	want := make(map[int]bool)
	queue := []int{pid}
	for len(queue) > 0 {
		q := queue[0]
		queue = queue[1:]
		for _, k := range kids[q] {
			if !want[k] {
				want[k] = true
				queue = append(queue, k)
			}
		}
	}
	for n, st := range seen {
		if st.SID == pid {
			want[n] = true
		}
	}
	var out []proven
	for n := range want {
		fd, err := unix.PidfdOpen(n, 0)
		if err != nil {
			continue
		}
		st, err := readStat(n, buf)
		if err != nil || st.StartTime != seen[n].StartTime || exited(fd) {
			unix.Close(fd)
			continue
		}
		out = append(out, proven{pid: n, pidfd: fd, startTime: st.StartTime})
	}
	return out
}

// readStat is procstat.Read without allocating a buffer per process.
func readStat(pid int, buf []byte) (procstat.Stat, error) {
	fd, err := unix.Open("/proc/"+strconv.Itoa(pid)+"/stat", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return procstat.Stat{}, err
	}
	n, err := unix.Read(fd, buf)
	unix.Close(fd)
	if err != nil {
		return procstat.Stat{}, err
	}
	return procstat.Parse(buf[:n])
}

// markedWorkers lists the processes whose environment says they are a worker started by a hive
// (of hive hiveID, unless empty) and that lead their own session, as the hive starts every worker:
// a worker's children inherit the worker id marker but not the session leadership.
func markedWorkers(hiveID string) []int {
	d, err := os.Open("/proc")
	if err != nil {
		return nil
	}
	names, _ := d.Readdirnames(-1)
	d.Close()
	var pids []int
	buf := make([]byte, 1024)
	for _, name := range names {
		pid, err := strconv.Atoi(name)
		if err != nil {
			continue
		}
		env, err := readWhole("/proc/" + name + "/environ")
		if err != nil || !hasEnvKey(env, envWorkerID) {
			continue
		}
		if hiveID != "" && !hasEnv(env, envHiveID+"="+hiveID) {
			continue
		}
		if st, err := readStat(pid, buf); err != nil || st.SID != pid {
			continue
		}
		if !workerMarked(env, name) {
			continue // a helper of a worker that started a session of its own
		}
		pids = append(pids, pid)
	}
	return pids
}

// hasEnvKey says whether the NUL-separated environ block sets key.
func hasEnvKey(environ []byte, key string) bool {
	return bytes.HasPrefix(environ, []byte(key+"=")) || bytes.Contains(environ, []byte("\x00"+key+"="))
}
