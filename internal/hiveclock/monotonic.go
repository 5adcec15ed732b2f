package hiveclock

import "time"

var start = time.Now()

// monotonic is the runtime's monotonic clock since the package was loaded.
func monotonic() time.Duration { return time.Since(start) }
