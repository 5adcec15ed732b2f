// Package hiveclock is the hive's own clock for the queen's not-after bounds: a reading that runs at
// the rate of real time, suspend included, from an origin of this process, named by a random
// instance. The hive sends a reading with every heartbeat; the queen bounds each Spawn and Delete in
// this clock (SpawnRequest.not_after, DeleteRequest.not_after), and the hive refuses a request it
// receives once its clock has passed that bound: a request the network held up past the point
// where the queen may already have told its caller it failed is never carried out.
package hiveclock

import (
	"crypto/rand"
	"encoding/binary"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

// Clock is one hive process's clock.
type Clock struct {
	instance uint64
	origin   time.Duration // now() at New
	now      func() time.Duration
}

// New starts the process's clock with a fresh random instance (never 0).
func New() *Clock {
	var b [8]byte
	for {
		_, _ = rand.Read(b[:])
		if id := binary.LittleEndian.Uint64(b[:]); id != 0 {
			c := &Clock{instance: id, now: sinceBoot}
			c.origin = c.now()
			return c
		}
	}
}

// NewFrom is a clock with a given instance over now (tests, simulations).
func NewFrom(instance uint64, now func() time.Duration) *Clock {
	return &Clock{instance: instance, origin: now(), now: now}
}

// Instance names this clock's origin.
func (c *Clock) Instance() uint64 { return c.instance }

// Now is the time since the origin.
func (c *Clock) Now() time.Duration { return c.now() - c.origin }

// Reading is Now as sent in a heartbeat.
func (c *Clock) Reading() *rbeev1.HiveClock {
	return &rbeev1.HiveClock{Instance: c.instance, Reading: durationpb.New(c.Now())}
}
