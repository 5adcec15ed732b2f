// Package activation implements the receiving side of systemd-style socket activation: a parent
// (the hive, or systemd) binds a listening socket, passes it to the child as file descriptor 3 and
// names it with LISTEN_PID and LISTEN_FDS. The hive uses the constants to set the variables; a
// worker uses Listeners to pick its socket up.
package activation

import (
	"errors"
	"fmt"
	"strconv"
)

// Environment variable names and the first inherited descriptor, as systemd defines them
// (sd_listen_fds(3)).
const (
	// EnvListenPID names the PID the descriptors are meant for; a process whose PID differs
	// inherited the variables by accident (e.g. from its parent) and must ignore them.
	EnvListenPID = "LISTEN_PID"
	// EnvListenFDs is the number of inherited descriptors, starting at ListenFDsStart.
	EnvListenFDs = "LISTEN_FDS"
	// EnvListenFDNames optionally names the descriptors, colon separated. rbee does not need it,
	// but Listeners clears it together with the others.
	EnvListenFDNames = "LISTEN_FDNAMES"
	// ListenFDsStart is the first inherited descriptor (SD_LISTEN_FDS_START).
	ListenFDsStart = 3
	// MaxFDs bounds LISTEN_FDS so that a malformed environment cannot make us walk the
	// descriptor table.
	MaxFDs = 64
)

// ErrInvalid is wrapped by every error Parse returns.
var ErrInvalid = errors.New("invalid socket activation environment")

// Parse validates the values of LISTEN_PID and LISTEN_FDS for the process pid and returns the
// number of descriptors passed to it. Both values empty (the variables are absent) or a LISTEN_PID
// naming another process mean no descriptors and no error: the variables were not meant for us.
// A malformed or out-of-range value is an error naming the variable.
func Parse(listenPID, listenFDs string, pid int) (int, error) {
	// As sd_listen_fds: no LISTEN_FDS means nothing was passed, whatever LISTEN_PID says (a hive
	// that lets workers bind their own port still sets LISTEN_PID, to mark the worker itself).
	if listenFDs == "" {
		return 0, nil
	}
	p, err := strconv.Atoi(listenPID)
	if err != nil || p <= 0 {
		return 0, fmt.Errorf("%w: %s=%q is not a positive PID", ErrInvalid, EnvListenPID, listenPID)
	}
	n, err := strconv.Atoi(listenFDs)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%w: %s=%q is not a non-negative count", ErrInvalid, EnvListenFDs, listenFDs)
	}
	if n > MaxFDs {
		return 0, fmt.Errorf("%w: %s=%d exceeds %d", ErrInvalid, EnvListenFDs, n, MaxFDs)
	}
	if p != pid {
		return 0, nil
	}
	return n, nil
}
