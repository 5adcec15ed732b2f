//go:build !linux

package cli

import "os"

// isTerminal is false off Linux: plain lines are the safe choice where a terminal cannot be told.
func isTerminal(*os.File) bool { return false }
