package procstat

import (
	"errors"
	"os"
	"runtime"
	"testing"
)

func TestParse(t *testing.T) {
	tail := " 1 100 100 0 -1 4194304 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10"
	tests := []struct {
		name string
		line string
		want Stat
	}{
		{"plain", "42 (worker-stub) S" + tail, Stat{PID: 42, Comm: "worker-stub", State: 'S', PPID: 1, PGID: 100, SID: 100, Flags: 4194304, StartTime: 987654}},
		{"spaces and parens", "7 (a) b (c)) R" + tail, Stat{PID: 7, Comm: "a) b (c)", State: 'R', PPID: 1, PGID: 100, SID: 100, Flags: 4194304, StartTime: 987654}},
		{"empty comm", "9 () Z" + tail, Stat{PID: 9, Comm: "", State: 'Z', PPID: 1, PGID: 100, SID: 100, Flags: 4194304, StartTime: 987654}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse([]byte(tt.line + "\n"))
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Fatalf("Parse = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestParseMalformed(t *testing.T) {
	for _, line := range []string{"", "42", "42 (x", "x (y) S 1 2 3", "42 (x) S 1 2 3 4 5", "-3 (x) S" + " 1 1 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 5",
		"42 (x) S 1 1 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 notanumber"} {
		if _, err := Parse([]byte(line)); !errors.Is(err, ErrMalformed) {
			t.Errorf("Parse(%q) err = %v, want ErrMalformed", line, err)
		}
	}
}

func TestReadSelf(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("needs /proc")
	}
	st, err := Read(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if st.PID != os.Getpid() || st.PPID != os.Getppid() || st.StartTime == 0 {
		t.Fatalf("Read(self) = %+v", st)
	}
	if st.Flags&PFKThread != 0 {
		t.Fatalf("Read(self) says a kernel thread: flags %#x", st.Flags)
	}
	// kthreadd, the parent of every kernel thread, is PID 2 wherever the kernel owns PID 1's
	// namespace; in a container's PID namespace PID 2 is an ordinary process, if any.
	if k, err := Read(2); err == nil && k.Comm == "kthreadd" && k.Flags&PFKThread == 0 {
		t.Fatalf("Read(2) = %+v: kthreadd without PF_KTHREAD", k)
	}
	if _, err := Read(1 << 30); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Read(no such pid) err = %v, want ErrNotExist", err)
	}
}

// FuzzParse checks that no input makes Parse panic and that every accepted line round-trips its
// start time and command name.
func FuzzParse(f *testing.F) {
	f.Add([]byte("42 (worker-stub) S 1 100 100 0 -1 4194304 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10"))
	f.Add([]byte("7 (a) b (c)) R 1 1 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 5"))
	f.Add([]byte("1 ((((() S 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 18446744073709551615"))
	f.Fuzz(func(t *testing.T, line []byte) {
		st, err := Parse(line)
		if err != nil {
			return
		}
		if st.PID < 0 {
			t.Fatalf("negative pid %d accepted", st.PID)
		}
	})
}
