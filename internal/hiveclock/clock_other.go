//go:build !linux

package hiveclock

import "time"

// sinceBoot is the runtime's monotonic clock where CLOCK_BOOTTIME does not exist (the hive runs
// workers on Linux only; this keeps the package building elsewhere).
func sinceBoot() time.Duration { return monotonic() }
