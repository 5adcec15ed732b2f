// Package process is the hive's process-control core: it spawns worker processes (each in its own
// session and, where the machine allows, its own cgroup, with a pre-bound listening socket and a
// size-capped log file) and deletes them by PID after proving their identity. It keeps no list of
// workers: everything Delete needs is read back from the kernel, so a restarted hive can delete the
// workers its predecessor spawned. No gRPC types live here; the server maps Kind to status codes.
package process

import (
	"context"
	"errors"
	"fmt"
	"github.com/rbee-dev/rbee/internal/validate"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.uber.org/zap"
)

// CgroupMode says whether workers get a cgroup of their own.
type CgroupMode int

const (
	// CgroupAuto puts each worker in its own cgroup when a writable cgroup v2 hierarchy exists,
	// and falls back to the process group otherwise.
	CgroupAuto CgroupMode = iota
	// CgroupOff never uses cgroups: the worker's process group and session are what Delete kills.
	CgroupOff
)

// Config configures a Manager. Zero values take the documented defaults.
type Config struct {
	Binary            string     // worker executable; Spawn fails with KindBinary if missing or not executable
	ListenHost        string     // host the worker's socket binds, handed to it as RBEE_WORKER_HOST; default "127.0.0.1"
	PortLow, PortHigh int        // inclusive port range for worker sockets
	LogDir            string     // one log file per worker life: <LogDir>/rbee-worker-<id>.<start>.log; default <tmp>/rbee-hive-logs
	LogMaxBytes       int64      // cap per log file; default 8 MiB
	MaxWorkers        int        // 0: no cap; past it Spawn fails with KindExhausted
	Cgroups           CgroupMode // CgroupAuto (default) or CgroupOff
	OnExit            func(Exit) // called when a worker this Manager spawned exits on its own; may be nil
	Logger            *zap.Logger

	// NoHandoff is for worker binaries that bind --port themselves and do not take an inherited
	// socket (LISTEN_FDS): the hive then only chooses a port that is free at spawn time and does
	// not choose it again for a while, instead of handing over the bound socket. Handing over is
	// race-free and the default; this trades that for compatibility with any server.
	NoHandoff bool

	// HiveID scopes Live and MaxWorkers to this hive's workers when several hives share a machine
	// (and cgroup); it is also the hive id of a SpawnSpec that has none. Empty: count every rbee
	// worker below this hive's cgroup (or, without cgroups, on the machine).
	HiveID string

	// LogCheckEvery is how often the log files of live workers are checked against LogMaxBytes;
	// default 2s. Capping logs is housekeeping, so a coarse ticker is enough.
	LogCheckEvery time.Duration

	// The log of a worker whose processes are all gone stays readable (Logs) until it is
	// LogKeepFor old (by its last write; default 24h) or more than LogKeepExited newer logs of
	// exited workers exist in LogDir (default 100); then it is removed. Only files named by this
	// package's pattern are ever capped or removed.
	LogKeepFor    time.Duration
	LogKeepExited int

	// Tests: start workers through the hive's own binary (as where no native trampoline exists),
	// or through a freshly forked native trampoline (no zygote).
	hiveTrampoline, noZygote bool
}

const (
	defaultLogMaxBytes   = 8 << 20
	defaultLogKeepFor    = 24 * time.Hour
	defaultLogKeepExited = 100
	// MaxGrace is the longest grace period Delete accepts, the same as at the gRPC edge.
	MaxGrace = validate.MaxGrace
	// killWait bounds the wait after SIGKILL: a process still there afterwards is KindStuck.
	killWait = 5 * time.Second
)

// SpawnSpec describes one worker to start.
type SpawnSpec struct {
	WorkerID, HiveID, Model, Device, QueenAddress string
	Env                                           []string // extra KEY=VALUE for the worker only
	JobID                                         string

	// Binary, when set, runs instead of Config.Binary (a catalog model's supervisor, worker-shim).
	Binary string
	// OwnPort says the program binds its port itself: like Config.NoHandoff, for this spawn only.
	OwnPort bool
	// Extra, when set, is called once the port is chosen and returns arguments to append after the
	// worker contract's and environment to add to Env (a catalog's ${PORT} is known only then).
	Extra func(port int) (args, env []string)
}

// Spawned is what the hive reports back about a started worker.
type Spawned struct {
	PID       int
	Port      int
	StartTime uint64 // /proc/PID/stat field 22; with PID it names the process for good
	Cgroup    string // absolute path of the worker's cgroup directory, "" without cgroups
}

// Target names the process Delete is asked to stop.
type Target struct {
	WorkerID  string
	PID       int
	StartTime uint64 // 0: unknown, the start time is then not checked
}

// Outcome is how a Delete ended.
type Outcome int

const (
	// OutcomeUnknown is the zero value, returned together with an error.
	OutcomeUnknown Outcome = iota
	// Exited: the worker left within the grace period after SIGTERM.
	Exited
	// Killed: SIGKILL was needed.
	Killed
	// AlreadyExited: the worker was gone before any signal was sent.
	AlreadyExited
)

func (o Outcome) String() string {
	switch o {
	case Exited:
		return "exited"
	case Killed:
		return "killed"
	case AlreadyExited:
		return "already_exited"
	}
	return "unknown"
}

// Exit reports a worker that ended on its own.
type Exit struct {
	WorkerID  string
	PID       int
	StartTime uint64
	ExitCode  int    // -1 if signalled
	Signal    string // e.g. "SIGSEGV"; "" if it exited normally
	LogTail   string // the last ~20 lines of its log file
	Time      time.Time
}

// Kind classifies errors so that the server can map them to status codes in one place.
type Kind int

const (
	KindNone        Kind = iota // no error
	KindInternal                // anything unexpected
	KindInvalid                 // bad argument: grace out of range, malformed worker id
	KindNotWorker               // the PID is not provably the named worker; no signal was sent
	KindExhausted               // port range or max-workers exhausted
	KindBinary                  // worker binary missing or not executable
	KindStuck                   // the process did not die within a bounded wait after SIGKILL
	KindUnsupported             // not available on this operating system
	KindNotFound                // no such worker (log) on this hive
	KindLate                    // the caller's bound for starting it had passed (WithStartCheck); nothing was done
)

func (k Kind) String() string {
	switch k {
	case KindNone:
		return "none"
	case KindInvalid:
		return "invalid"
	case KindNotWorker:
		return "not_worker"
	case KindExhausted:
		return "exhausted"
	case KindBinary:
		return "binary"
	case KindStuck:
		return "stuck"
	case KindUnsupported:
		return "unsupported"
	case KindNotFound:
		return "not_found"
	case KindLate:
		return "late"
	}
	return "internal"
}

// Error is the error type of this package.
type Error struct {
	Kind Kind
	Msg  string
	Err  error // the underlying cause, if any
}

func (e *Error) Error() string {
	if e.Err != nil {
		return e.Msg + ": " + e.Err.Error()
	}
	return e.Msg
}

func (e *Error) Unwrap() error { return e.Err }

// KindOf returns the Kind of err: KindNone for nil, KindInternal for errors not from this package.
func KindOf(err error) Kind {
	if err == nil {
		return KindNone
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Kind
	}
	return KindInternal
}

type startCheckKey struct{}

// WithStartCheck returns ctx carrying check, which Spawn calls right before it creates the process
// and Delete right before its first signal: a non-nil result abandons the call there, as KindLate,
// with nothing done. The edge uses it for the queen's not-after bound, checked at the last moment
// an action can still be abandoned rather than only when the request arrives.
func WithStartCheck(ctx context.Context, check func() error) context.Context {
	return context.WithValue(ctx, startCheckKey{}, check)
}

// CheckStart runs ctx's start check (WithStartCheck), if any: nil, or a KindLate error.
func CheckStart(ctx context.Context) error {
	check, _ := ctx.Value(startCheckKey{}).(func() error)
	if check == nil {
		return nil
	}
	if err := check(); err != nil {
		return errf(KindLate, err, "not started")
	}
	return nil
}

func errf(k Kind, cause error, format string, args ...any) error {
	return &Error{Kind: k, Msg: fmt.Sprintf(format, args...), Err: cause}
}

// checkID accepts worker and hive ids by the project's one rule (validate.ID: DNS labels), which
// also keeps them safe in file and cgroup names: no '/', no leading '.', no '@'.
func checkID(what, id string) error {
	if err := validate.ID(what, id); err != nil {
		rule := err.Error()
		if ve, ok := errors.AsType[*validate.Error](err); ok {
			rule = ve.Rule
		}
		return errf(KindInvalid, err, "%s %q invalid: %s", what, id, rule)
	}
	return nil
}

// checkNUL refuses a spec whose arguments or environment hold a NUL byte, which execve cannot pass.
func checkNUL(s SpawnSpec) error {
	for name, v := range map[string]string{"model": s.Model, "device": s.Device, "queen address": s.QueenAddress, "job id": s.JobID} {
		if strings.IndexByte(v, 0) >= 0 {
			return errf(KindInvalid, nil, "%s contains a NUL byte", name)
		}
	}
	for _, kv := range s.Env {
		if strings.IndexByte(kv, 0) >= 0 {
			k, _, _ := strings.Cut(kv, "=")
			return errf(KindInvalid, nil, "environment variable %q contains a NUL byte", k)
		}
	}
	return nil
}

func checkGrace(grace time.Duration) error {
	if grace < 0 || grace > MaxGrace {
		return errf(KindInvalid, nil, "grace period %v out of range [0, %v]", grace, MaxGrace)
	}
	return nil
}

// withDefaults fills in the documented defaults and checks what can be checked without the OS.
func (c Config) withDefaults() (Config, error) {
	if c.ListenHost == "" {
		c.ListenHost = "127.0.0.1"
	}
	if c.LogMaxBytes <= 0 {
		c.LogMaxBytes = defaultLogMaxBytes
	}
	if c.LogCheckEvery <= 0 {
		c.LogCheckEvery = 2 * time.Second
	}
	if c.LogKeepFor <= 0 {
		c.LogKeepFor = defaultLogKeepFor
	}
	if c.LogKeepExited < 0 {
		return c, errf(KindInvalid, nil, "log keep count %d < 0", c.LogKeepExited)
	}
	if c.LogKeepExited == 0 {
		c.LogKeepExited = defaultLogKeepExited
	}
	if c.LogDir == "" {
		c.LogDir = filepath.Join(os.TempDir(), "rbee-hive-logs")
	}
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
	if c.PortLow <= 0 || c.PortHigh > 65535 || c.PortLow > c.PortHigh {
		return c, errf(KindInvalid, nil, "port range %d-%d invalid", c.PortLow, c.PortHigh)
	}
	if c.MaxWorkers < 0 {
		return c, errf(KindInvalid, nil, "max workers %d < 0", c.MaxWorkers)
	}
	return c, nil
}
