//go:build !linux

package main

import (
	"fmt"
	"io"

	"go.uber.org/zap"
)

// supervise needs Linux: the server dies with the shim through Pdeathsig, and orphans are
// adopted through PR_SET_CHILD_SUBREAPER.
func supervise(_ config, _ *zap.Logger, stderr io.Writer) int {
	fmt.Fprintln(stderr, "worker-shim: supervising a server needs Linux")
	return 1
}
