//go:build unix

package catalog

import "golang.org/x/sys/unix"

// executable asks the kernel whether this process may execute path (owner, group and ACLs).
func executable(path string) error { return unix.Access(path, unix.X_OK) }
