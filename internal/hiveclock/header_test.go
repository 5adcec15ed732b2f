package hiveclock

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/metadata"
)

// The header round-trips a reading; a malformed one is an error naming it, an absent one no reading.
func TestHeaderRoundTrip(t *testing.T) {
	c := NewFrom(0xbeef, func() time.Duration { return 1500 * time.Millisecond })
	inst, r, ok, err := ParseHeader(metadata.Pairs(Header, c.headerValue()))
	if err != nil || !ok || inst != 0xbeef || r != 0 {
		t.Fatalf("ParseHeader = %x, %v, %v, %v; want beef, 0 (a reading since the clock's origin)", inst, r, ok, err)
	}
	for _, bad := range []string{"beef", "0/5", "zz/5", "beef/-1", "beef/x"} {
		if _, _, _, err := ParseHeader(metadata.Pairs(Header, bad)); err == nil || !strings.Contains(err.Error(), Header) {
			t.Errorf("ParseHeader(%q) = %v, want an error naming %s", bad, err, Header)
		}
	}
	if _, _, ok, err := ParseHeader(metadata.MD{}); ok || err != nil {
		t.Errorf("no header: ok %v, err %v; want neither", ok, err)
	}
}
