package rpcclient

import (
	"testing"
	"time"
)

// A heartbeat client's reconnect delays stay within half to one and a half of their envelope
// (half an interval for the first attempt, one interval after), spread over all of it, and
// average one envelope: about one attempt per interval, whatever the length of the outage.
func TestReconnectDelay(t *testing.T) {
	const iv = time.Second
	for _, tc := range []struct {
		attempt  int
		envelope time.Duration
	}{{0, iv / 2}, {1, iv}, {2, iv}, {1000, iv}} {
		var sum, lo, hi time.Duration
		lo = time.Hour
		const draws = 4000
		for range draws {
			d := ReconnectDelay(tc.attempt, iv)
			if d < tc.envelope/2 || d > 3*tc.envelope/2 {
				t.Fatalf("ReconnectDelay(%d, %v) = %v; want within [%v, %v]", tc.attempt, iv, d, tc.envelope/2, 3*tc.envelope/2)
			}
			sum += d
			lo, hi = min(lo, d), max(hi, d)
		}
		if mean := sum / draws; mean < 9*tc.envelope/10 || mean > 11*tc.envelope/10 {
			t.Errorf("attempt %d: mean delay %v; want about %v", tc.attempt, mean, tc.envelope)
		}
		// Jitter spreads a fleet over the whole range, not around one value.
		if lo > 6*tc.envelope/10 || hi < 14*tc.envelope/10 {
			t.Errorf("attempt %d: delays span [%v, %v]; want near [%v, %v]", tc.attempt, lo, hi, tc.envelope/2, 3*tc.envelope/2)
		}
	}
}
