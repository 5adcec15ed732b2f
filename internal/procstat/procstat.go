// Package procstat reads a process's identity from /proc/PID/stat: its start time in clock ticks
// since boot, which together with the PID names one process for the lifetime of the machine.
package procstat

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
)

// Stat is the part of /proc/PID/stat that rbee uses.
type Stat struct {
	PID       int
	Comm      string // the command name, without the parentheses
	State     byte   // R, S, D, Z, T, ...
	PPID      int
	PGID      int
	SID       int
	Flags     uint64 // field 9: the kernel's PF_* flags (PF_KTHREAD marks a kernel thread)
	StartTime uint64 // field 22: clock ticks after boot
}

// PFKThread is the PF_KTHREAD bit of Stat.Flags: the task is a kernel thread, never a worker.
const PFKThread = 0x00200000

// ErrMalformed is returned for a stat line that does not have the expected shape.
var ErrMalformed = errors.New("malformed /proc stat line")

// Parse parses one /proc/PID/stat line. The command name may hold spaces and parentheses, so the
// fields after it are found from the last ')'.
func Parse(line []byte) (Stat, error) {
	open := bytes.IndexByte(line, '(')
	close := bytes.LastIndexByte(line, ')')
	if open < 1 || close < open {
		return Stat{}, ErrMalformed
	}
	pid, err := strconv.Atoi(string(bytes.TrimSpace(line[:open])))
	if err != nil || pid < 0 {
		return Stat{}, fmt.Errorf("%w: pid %q", ErrMalformed, line[:open])
	}
	// Fields from 3 (state) on, so rest[0] is field 3 and field N is rest[N-3].
	rest := bytes.Fields(line[close+1:])
	if len(rest) < 22-3+1 {
		return Stat{}, fmt.Errorf("%w: %d fields after the command name", ErrMalformed, len(rest))
	}
	if len(rest[0]) != 1 {
		return Stat{}, fmt.Errorf("%w: state %q", ErrMalformed, rest[0])
	}
	st := Stat{PID: pid, Comm: string(line[open+1 : close]), State: rest[0][0]}
	ints := []*int{&st.PPID, &st.PGID, &st.SID} // fields 4, 5, 6
	for i, p := range ints {
		v, err := strconv.Atoi(string(rest[1+i]))
		if err != nil {
			return Stat{}, fmt.Errorf("%w: field %d: %v", ErrMalformed, 4+i, err)
		}
		*p = v
	}
	st.Flags, err = strconv.ParseUint(string(rest[9-3]), 10, 64)
	if err != nil {
		return Stat{}, fmt.Errorf("%w: field 9: %v", ErrMalformed, err)
	}
	st.StartTime, err = strconv.ParseUint(string(rest[22-3]), 10, 64)
	if err != nil {
		return Stat{}, fmt.Errorf("%w: field 22: %v", ErrMalformed, err)
	}
	return st, nil
}

// Read reads /proc/PID/stat. A process that does not exist yields an error satisfying
// errors.Is(err, os.ErrNotExist).
func Read(pid int) (Stat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return Stat{}, err
	}
	return Parse(b)
}

// StartTime returns the start time of process pid in clock ticks since boot.
func StartTime(pid int) (uint64, error) {
	st, err := Read(pid)
	if err != nil {
		return 0, err
	}
	return st.StartTime, nil
}
