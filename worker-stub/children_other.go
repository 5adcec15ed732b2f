//go:build !linux

package main

import (
	"errors"
	"time"
)

const childMode = "__worker-stub-child"

func sleepForever() {
	for {
		time.Sleep(time.Hour)
	}
}

// spawnChildren is a Linux test knob: the children's setsid and the hive's cleanup of them are
// Linux process control.
func spawnChildren(n int, _ string) ([]int, error) {
	return nil, errors.New("--spawn-children is supported on Linux only")
}
