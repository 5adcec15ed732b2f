//go:build unix

package activation

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"syscall"
)

// Listeners returns the listening sockets passed to this process, in descriptor order, or none
// when the environment does not name this process. With unsetEnv the variables are removed so
// that children started later do not mistake them for their own. Every inherited descriptor is
// marked close-on-exec, as sd_listen_fds does.
func Listeners(unsetEnv bool) ([]net.Listener, error) {
	n, err := Parse(os.Getenv(EnvListenPID), os.Getenv(EnvListenFDs), os.Getpid())
	if unsetEnv {
		os.Unsetenv(EnvListenPID)
		os.Unsetenv(EnvListenFDs)
		os.Unsetenv(EnvListenFDNames)
	}
	if err != nil || n == 0 {
		return nil, err
	}
	ls := make([]net.Listener, 0, n)
	for fd := ListenFDsStart; fd < ListenFDsStart+n; fd++ {
		syscall.CloseOnExec(fd)
		f := os.NewFile(uintptr(fd), "listen-fd-"+strconv.Itoa(fd))
		// FileListener dups the descriptor, so the original is closed either way.
		l, err := net.FileListener(f)
		f.Close()
		if err != nil {
			for _, l := range ls {
				l.Close()
			}
			return nil, fmt.Errorf("inherited descriptor %d: %w", fd, err)
		}
		ls = append(ls, l)
	}
	return ls, nil
}
