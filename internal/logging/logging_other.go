//go:build !linux

package logging

import "os"

// isTerminal is false off Linux: JSON logs are the safe choice where a terminal cannot be told.
func isTerminal(*os.File) bool { return false }
