package main

import (
	"fmt"
	"os"
	"os/exec"
	"syscall"

	"golang.org/x/sys/unix"
)

// childMode is the hidden first argument that makes worker-stub a sleeping child for
// --spawn-children. It is not a flag so that it cannot be mixed with the worker's own.
const childMode = "__worker-stub-child"

// sleepForever is the child's whole life: block until a signal kills it. No signal is caught, so
// SIGTERM and SIGKILL end it.
func sleepForever() {
	for {
		unix.Pause()
	}
}

// spawnChildren starts n sleeping children by re-executing this binary; the last one calls setsid
// and so leaves the worker's session and process group, as a daemonising helper would. The
// children are reaped when they die while the worker lives; otherwise they outlive it on purpose,
// for the hive's cleanup to find.
func spawnChildren(n int, workerID string) ([]int, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("spawn children: %w", err)
	}
	var pids []int
	for i := range n {
		cmd := exec.Command(exe, childMode, "--worker-id", workerID)
		// No stdio: a child holding the worker's output pipe open would keep whoever reads it
		// waiting long after the worker is gone.
		if i == n-1 {
			cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		}
		if err := cmd.Start(); err != nil {
			return pids, fmt.Errorf("spawn child %d: %w", i, err)
		}
		pids = append(pids, cmd.Process.Pid)
		go cmd.Wait() //nolint:errcheck // only reaping
	}
	return pids, nil
}
