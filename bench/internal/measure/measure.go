// Package measure holds what the load tools measure with: a lock-free latency histogram, and a
// local process's CPU time and resident memory read from /proc.
package measure

import (
	"bufio"
	"errors"
	"math"
	"math/bits"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// Histogram is a lock-free log-linear latency histogram: 32 sub-buckets per power of two of
// microseconds, so quantiles are within about 3%. Its zero value is empty and ready.
type Histogram struct {
	b   [64 * 32]atomic.Uint64
	top atomic.Int64
}

func bucketOf(us int64) int {
	if us < 32 {
		return int(max(us, 0))
	}
	e := 63 - bits.LeadingZeros64(uint64(us)) // us in [2^e, 2^(e+1))
	sub := int((us >> (e - 5)) & 31)
	return (e-4)*32 + sub
}

func bucketLow(b int) int64 {
	if b < 32 {
		return int64(b)
	}
	e := b/32 + 4
	sub := int64(b % 32)
	return (1 << e) + sub<<(e-5)
}

// Add records one duration.
func (h *Histogram) Add(d time.Duration) {
	us := d.Microseconds()
	h.b[min(bucketOf(us), len(h.b)-1)].Add(1)
	for {
		t := h.top.Load()
		if us <= t || h.top.CompareAndSwap(t, us) {
			return
		}
	}
}

// Reset empties the histogram.
func (h *Histogram) Reset() {
	for i := range h.b {
		h.b[i].Store(0)
	}
	h.top.Store(0)
}

// Count is the number of durations recorded.
func (h *Histogram) Count() uint64 {
	var n uint64
	for i := range h.b {
		n += h.b[i].Load()
	}
	return n
}

// Quantile returns the lower bound of the bucket holding quantile q (0..1); 0 when empty.
func (h *Histogram) Quantile(q float64) time.Duration {
	n := h.Count()
	if n == 0 {
		return 0
	}
	rank := max(uint64(math.Ceil(q*float64(n))), 1)
	var seen uint64
	for i := range h.b {
		seen += h.b[i].Load()
		if seen >= rank {
			return time.Duration(bucketLow(i)) * time.Microsecond
		}
	}
	return h.Max()
}

// Max is the largest duration recorded, to the microsecond.
func (h *Histogram) Max() time.Duration { return time.Duration(h.top.Load()) * time.Microsecond }

// ClockTicks is USER_HZ, the unit of /proc/PID/stat times; 100 on every Linux this runs on.
const ClockTicks = 100

// CPUTicks returns the user plus system time pid has used, in ClockTicks.
func CPUTicks(pid int) (uint64, error) {
	if pid <= 0 {
		return 0, errors.New("no pid")
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	ut, _ := strconv.ParseUint(f[11], 10, 64) // field 14
	stt, _ := strconv.ParseUint(f[12], 10, 64)
	return ut + stt, nil
}

// RSSKB returns pid's resident memory in KiB.
func RSSKB(pid int) (int64, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			return strconv.ParseInt(strings.Fields(v)[0], 10, 64)
		}
	}
	return 0, errors.New("no VmRSS")
}
