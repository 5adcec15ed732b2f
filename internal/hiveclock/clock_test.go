package hiveclock

import (
	"testing"
	"time"
)

// Each process's clock has an instance of its own, starts near zero and runs at least as fast as
// the runtime's monotonic clock (the queen's bound relies on it never running slow).
func TestClockRunsFromItsOwnOrigin(t *testing.T) {
	a, b := New(), New()
	if a.Instance() == 0 || a.Instance() == b.Instance() {
		t.Fatalf("instances %x and %x: want two distinct, non-zero", a.Instance(), b.Instance())
	}
	t0, r0 := time.Now(), a.Now()
	if r0 < 0 || r0 > time.Second {
		t.Fatalf("a new clock reads %v, want near 0", r0)
	}
	time.Sleep(20 * time.Millisecond) // the span to measure; nothing to await
	elapsed, advanced := time.Since(t0), a.Now()-r0
	if advanced < elapsed-time.Millisecond {
		t.Fatalf("the clock advanced %v while %v passed", advanced, elapsed)
	}
	if r := a.Reading(); r.GetInstance() != a.Instance() || r.GetReading().AsDuration() < advanced {
		t.Fatalf("Reading %v, want instance %x at %v or more", r, a.Instance(), advanced)
	}
}
