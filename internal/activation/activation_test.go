package activation

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestParse(t *testing.T) {
	const pid = 4242
	tests := []struct {
		name    string
		lpid    string
		lfds    string
		want    int
		wantErr string // substring of the error; empty: no error
	}{
		{name: "absent", want: 0},
		{name: "ours one", lpid: "4242", lfds: "1", want: 1},
		{name: "ours zero", lpid: "4242", lfds: "0", want: 0},
		{name: "ours max", lpid: "4242", lfds: "64", want: 64},
		{name: "another process", lpid: "4243", lfds: "1", want: 0},
		{name: "pid missing", lfds: "1", wantErr: EnvListenPID},
		{name: "fds missing: nothing passed", lpid: "4242", want: 0},
		{name: "pid not a number", lpid: "abc", lfds: "1", wantErr: EnvListenPID},
		{name: "pid zero", lpid: "0", lfds: "1", wantErr: EnvListenPID},
		{name: "pid negative", lpid: "-1", lfds: "1", wantErr: EnvListenPID},
		{name: "fds negative", lpid: "4242", lfds: "-1", wantErr: EnvListenFDs},
		{name: "fds too many", lpid: "4242", lfds: "65", wantErr: EnvListenFDs},
		{name: "fds huge", lpid: "4242", lfds: "99999999999999999999", wantErr: EnvListenFDs},
		{name: "fds with space", lpid: "4242", lfds: " 1", wantErr: EnvListenFDs},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse(tt.lpid, tt.lfds, pid)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !errors.Is(err, ErrInvalid) {
					t.Fatalf("Parse(%q, %q) = %d, %v; want an ErrInvalid naming %s", tt.lpid, tt.lfds, got, err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("Parse(%q, %q) = %d, %v; want %d, nil", tt.lpid, tt.lfds, got, err, tt.want)
			}
		})
	}
}

func FuzzParse(f *testing.F) {
	f.Add("", "", 1)
	f.Add("1", "1", 1)
	f.Add("1", "64", 1)
	f.Add("2", "1", 1)
	f.Add("x", "1", 1)
	f.Add("1", "-3", 1)
	f.Add("1", "1e3", 1)
	f.Add("+1", "0x1", 1)
	f.Fuzz(func(t *testing.T, lpid, lfds string, pid int) {
		n, err := Parse(lpid, lfds, pid)
		if err != nil {
			if n != 0 || !errors.Is(err, ErrInvalid) {
				t.Fatalf("Parse(%q, %q, %d) = %d, %v", lpid, lfds, pid, n, err)
			}
			return
		}
		if n < 0 || n > MaxFDs {
			t.Fatalf("Parse(%q, %q, %d) = %d out of bounds", lpid, lfds, pid, n)
		}
		if n > 0 && lpid != strconv.Itoa(pid) && strings.TrimLeft(lpid, "+0") != strconv.Itoa(pid) {
			t.Fatalf("Parse(%q, %q, %d) = %d for another process", lpid, lfds, pid, n)
		}
	})
}

// TestListenersNotOurs checks that variables naming another process yield nothing and are
// cleared on request.
func TestListenersNotOurs(t *testing.T) {
	t.Setenv(EnvListenPID, strconv.Itoa(os.Getpid()+1))
	t.Setenv(EnvListenFDs, "1")
	ls, err := Listeners(true)
	if err != nil || len(ls) != 0 {
		t.Fatalf("Listeners = %v, %v; want none", ls, err)
	}
	if _, ok := os.LookupEnv(EnvListenFDs); ok {
		t.Fatalf("%s still set after Listeners(true)", EnvListenFDs)
	}
}

// TestListenersInherited runs this test binary as a child with a socket on fd 3, the way the
// hive starts a worker, and checks that the child accepts a connection on it.
func TestListenersInherited(t *testing.T) {
	if os.Getenv("ACTIVATION_TEST_CHILD") == "1" {
		ls, err := Listeners(true)
		if err != nil || len(ls) != 1 {
			t.Fatalf("child: Listeners = %v, %v", ls, err)
		}
		c, err := ls[0].Accept()
		if err != nil {
			t.Fatalf("child: accept: %v", err)
		}
		c.Write([]byte("ok"))
		c.Close()
		return
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	f, err := l.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// LISTEN_PID must be the child's own PID, which Go cannot know before the start, so a shell
	// sets it and execs: exec keeps the PID.
	cmd := exec.Command("/bin/sh", "-c", `LISTEN_PID=$$ exec "$0" "$@"`, os.Args[0], "-test.run=^TestListenersInherited$")
	cmd.Env = append(os.Environ(), "ACTIVATION_TEST_CHILD=1", EnvListenFDs+"=1")
	cmd.ExtraFiles = []*os.File{f}
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill() // by PID; a no-op once it has been waited for
		<-done
	})
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 2)
	if _, err := c.Read(buf); err != nil || string(buf) != "ok" {
		t.Fatalf("read %q, %v; want ok", buf, err)
	}
	if err := <-done; err != nil {
		t.Fatalf("child: %v\n%s", err, out.String())
	}
	done <- nil // for the cleanup
}
