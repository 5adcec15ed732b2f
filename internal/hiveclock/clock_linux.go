package hiveclock

import (
	"time"

	"golang.org/x/sys/unix"
)

// sinceBoot reads CLOCK_BOOTTIME: monotonic, and unlike CLOCK_MONOTONIC (Go's own) it keeps running
// while the machine is suspended, so that a request held up across a suspend is still seen as late.
func sinceBoot() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return monotonic()
	}
	return time.Duration(ts.Nano())
}
