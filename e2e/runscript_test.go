package e2e

import (
	"bytes"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// freeAddr returns a loopback address with a port nothing listens on right now.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// openClosablePTY is openPTY with a master whose Close really closes it, which is what hangs up
// the terminal: Go's poller holds it (non-blocking), so a pending Read does not defer the close.
func openClosablePTY(t *testing.T) (master, slave *os.File) {
	t.Helper()
	fd, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals here: %v", err)
	}
	m := os.NewFile(uintptr(fd), "/dev/ptmx")
	t.Cleanup(func() { m.Close() })
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetInt(fd, unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	s, err := os.OpenFile("/dev/pts/"+strconv.Itoa(n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return m, s
}

// output collects what a program writes and lets a test wait for a piece of it.
type output struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	cond *sync.Cond
	eof  bool
}

func collect(r io.Reader) *output {
	o := &output{}
	o.cond = sync.NewCond(&o.mu)
	go func() {
		b := make([]byte, 32<<10)
		for {
			n, err := r.Read(b)
			o.mu.Lock()
			o.buf.Write(b[:n])
			if err != nil {
				o.eof = true
			}
			o.cond.Broadcast()
			o.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	return o
}

func (o *output) await(t *testing.T, s string, within time.Duration) {
	t.Helper()
	timer := time.AfterFunc(within, func() { o.mu.Lock(); o.eof = true; o.cond.Broadcast(); o.mu.Unlock() })
	defer timer.Stop()
	o.mu.Lock()
	defer o.mu.Unlock()
	for !strings.Contains(o.buf.String(), s) {
		if o.eof {
			t.Fatalf("no %q in the output within %v:\n%s", s, within, o.buf.String())
		}
		o.cond.Wait()
	}
}

func (o *output) String() string { o.mu.Lock(); defer o.mu.Unlock(); return o.buf.String() }

// pidsWithArg lists live processes of program (the binary's base name) whose command line holds arg.
func pidsWithArg(program, arg string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		argv0, _, _ := bytes.Cut(b, []byte{0})
		if err == nil && filepath.Base(string(argv0)) == program && bytes.Contains(b, []byte(arg)) && alive(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// TestRunScriptNeverOutlivesItsTerminal runs scripts/run.sh (what `make run` runs) the two ways
// that left the queen and the hive running: its terminal closed (a pseudo-terminal whose master is
// closed, so the kernel hangs up the session), and Ctrl-C with its output piped through tee
// (SIGINT to the whole foreground process group, tee included). Either way the worker it spawned,
// the hive and the queen are gone soon after, and their ports are free for the next run.
func TestRunScriptNeverOutlivesItsTerminal(t *testing.T) {
	rbee := rbeeBinary(t)
	script, err := filepath.Abs("../scripts/run.sh")
	if err != nil {
		t.Fatal(err)
	}
	for _, how := range []string{"terminal closed", "ctrl-c through tee", "script killed", "group terminated"} {
		t.Run(strings.ReplaceAll(how, " ", "_"), func(t *testing.T) {
			queen, hive, http, hid := freeAddr(t), freeAddr(t), freeAddr(t), uniqueID("run")
			cleanupWorkers(t, hid)
			// Its own HTTP port too: a make run (or any queen) on this machine holds the default.
			env := append(os.Environ(), "BIN="+binDir, "QUEEN="+queen, "HIVE="+hive, "HTTP="+http, "HIVE_ID="+hid, "STATE="+t.TempDir())
			var cmd *exec.Cmd
			var out *output
			var hangUp func()
			if how == "terminal closed" {
				master, slave := openClosablePTY(t)
				cmd = exec.Command("bash", script)
				cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
				cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
				out = collect(master)
				hangUp = func() { master.Close() }
			} else if how == "script killed" {
				// SIGKILL leaves the script no clean-up: the queen and the hive still stop (their
				// parent's death signal); the worker is what an operator then removes by hand.
				cmd = exec.Command("bash", script)
				cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
				r, w, err := os.Pipe()
				if err != nil {
					t.Fatal(err)
				}
				cmd.Stdout, cmd.Stderr = w, w
				out = collect(r)
				defer w.Close()
				hangUp = func() { _ = cmd.Process.Kill() }
			} else if how == "group terminated" {
				// `timeout make run > run.log`: SIGTERM to the whole process group, the log relay
				// included, with the output going to a file.
				cmd = exec.Command("bash", script)
				cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
				logf, err := os.Create(filepath.Join(t.TempDir(), "run.log"))
				if err != nil {
					t.Fatal(err)
				}
				defer logf.Close()
				cmd.Stdout, cmd.Stderr = logf, logf
				out = tail(t, logf.Name())
				hangUp = func() { _ = unix.Kill(-cmd.Process.Pid, unix.SIGTERM) }
			} else {
				cmd = exec.Command("bash", "-c", `"$0" 2>&1 | tee "$1"`, script, filepath.Join(t.TempDir(), "run.log"))
				cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
				r, w, err := os.Pipe()
				if err != nil {
					t.Fatal(err)
				}
				cmd.Stdout, cmd.Stderr = w, w
				out = collect(r)
				defer w.Close()
				hangUp = func() { _ = unix.Kill(-cmd.Process.Pid, unix.SIGINT) }
			}
			cmd.Env = env
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			waited := make(chan struct{})
			go func() { _ = cmd.Wait(); close(waited) }()
			t.Cleanup(func() {
				// Last resort only: whatever the script left is killed by PID.
				_ = unix.Kill(-cmd.Process.Pid, unix.SIGKILL)
				for _, pid := range append(pidsWithArg("hive", "--hive-id\x00"+hid), pidsWithArg("queen", hid+"="+hive)...) {
					_ = unix.Kill(pid, unix.SIGKILL)
				}
			})
			out.await(t, "hive_registered", 30*time.Second)

			if b, err := exec.Command(rbee, "--queen", queen, "worker", "spawn", "--model", "demo-chat", "--id", "dev1", "--wait").CombinedOutput(); err != nil {
				t.Fatalf("rbee worker spawn: %v\n%s", err, b)
			}
			workers := workersOf(hid)
			servers := append(pidsWithArg("hive", "--hive-id\x00"+hid), pidsWithArg("queen", hid+"="+hive)...)
			if len(workers) != 1 || len(servers) != 2 {
				t.Fatalf("found workers %v and queen+hive %v, want one and two", workers, servers)
			}

			hangUp()
			select {
			case <-waited:
			case <-time.After(30 * time.Second):
				ps, _ := exec.Command("ps", "-o", "pid,ppid,pgid,sid,stat,wchan:20,args", "-s", strconv.Itoa(cmd.Process.Pid)).CombinedOutput()
				t.Logf("ps:\n%s", ps)
				t.Fatalf("run.sh still running 30s after: %s\n%s", how, out)
			}
			if how == "script killed" {
				workers = nil
				for _, pid := range servers {
					awaitExit(t, pid, 15*time.Second)
				}
			}
			// The script waits for the hive and the queen, and deletes the worker before that.
			for _, pid := range append(workers, servers...) {
				if alive(pid) {
					t.Errorf("process %d (%s) outlived run.sh after: %s", pid, cmdline(pid), how)
				}
			}
			for _, a := range []string{queen, hive} {
				l, err := net.Listen("tcp", a)
				if err != nil {
					t.Errorf("port %s still in use after run.sh stopped: %v", a, err)
					continue
				}
				l.Close()
			}
			if t.Failed() {
				t.Logf("run.sh output:\n%s", out)
			}
		})
	}
}

// tail follows a file that another process writes, as collect follows a pipe.
func tail(t *testing.T, name string) *output {
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { close(done); f.Close() })
	pr, pw := io.Pipe()
	go func() {
		defer pw.Close()
		b := make([]byte, 32<<10)
		for {
			n, err := f.Read(b)
			if n > 0 {
				if _, werr := pw.Write(b[:n]); werr != nil {
					return
				}
			}
			if err == io.EOF {
				select {
				case <-done:
					return
				case <-time.After(20 * time.Millisecond): // a regular file has no readiness to wait on
				}
			} else if err != nil {
				return
			}
		}
	}()
	return collect(pr)
}

func cmdline(pid int) string {
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	return strings.ReplaceAll(string(bytes.TrimRight(b, "\x00")), "\x00", " ")
}

// awaitExit waits until pid (not a child of the test) has exited, through a pidfd.
func awaitExit(t *testing.T, pid int, within time.Duration) {
	t.Helper()
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return // already gone
	}
	defer unix.Close(fd)
	n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, int(within.Milliseconds()))
	if err != nil || n == 0 {
		t.Errorf("process %d (%s) still running %v later", pid, cmdline(pid), within)
	}
}
