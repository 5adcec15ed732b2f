//go:build !unix

package activation

import (
	"net"
	"os"
)

// Listeners returns no listeners where descriptors are not inherited the Unix way; it still
// clears the variables when asked.
func Listeners(unsetEnv bool) ([]net.Listener, error) {
	if unsetEnv {
		os.Unsetenv(EnvListenPID)
		os.Unsetenv(EnvListenFDs)
		os.Unsetenv(EnvListenFDNames)
	}
	return nil, nil
}
