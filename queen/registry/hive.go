package registry

import (
	"fmt"
	"net"
	"slices"
	"strings"
	"time"
)

// HiveState is a hive's liveness. The values match rbee.v1.HiveState.
type HiveState uint8

const (
	HiveUnspecified HiveState = iota
	HiveReady
	HiveStale
)

func (s HiveState) String() string {
	switch s {
	case HiveReady:
		return "READY"
	case HiveStale:
		return "STALE"
	}
	return "UNSPECIFIED"
}

// Hive is one hive as the queen knows it. Values are copies, Devices included.
type Hive struct {
	ID, Address string
	State       HiveState
	// Static hives come from --hive flags: always READY, never expire.
	Static        bool
	LastHeartbeat time.Time
	Version, OS   string
	Devices       []string
	// DeviceInfo is what the hive reports of each device (memory figures change at its refresh).
	DeviceInfo []Device
	FreePorts  uint32
	// Models is the hive's catalog (hive --models); empty: it serves any model.
	Models []ModelOffer
	// Workers is computed: the registry's workers whose HiveID is this hive.
	Workers int
	// Clock is the newest reading of the hive's own clock from its heartbeats; zero until a beat
	// carried one (a hive that never beats, --register=false, or one older than the field).
	Clock HiveClock
}

// HiveClock is a reading of a hive's clock and when this queen received it (by the queen's
// monotonic clock). The beat was sent before it was received, so at Received the hive's clock read
// at least Reading: a lower bound that holds whatever the network's delay, from which the fleet
// bounds its calls to the hive in the hive's own clock.
type HiveClock struct {
	Instance uint64 // the hive process whose clock it is; 0: none
	Reading  time.Duration
	Received time.Time
}

// ModelOffer is one model of a hive's catalog.
type ModelOffer struct {
	Name        string
	Devices     []string // empty: any device of the hive
	Concurrency uint32
	LoadTimeout time.Duration
	TTL         time.Duration
	Grace       time.Duration
}

func (m ModelOffer) equal(o ModelOffer) bool {
	return m.Name == o.Name && slices.Equal(m.Devices, o.Devices) && m.Concurrency == o.Concurrency &&
		m.LoadTimeout == o.LoadTimeout && m.TTL == o.TTL && m.Grace == o.Grace
}

// Offer returns the hive's catalog entry for model; ok is false when the hive has a catalog
// without it. A hive without a catalog offers every model (and returns a zero ModelOffer).
func (h Hive) Offer(model string) (ModelOffer, bool) {
	if len(h.Models) == 0 {
		return ModelOffer{Name: model}, true
	}
	for _, m := range h.Models {
		if m.Name == model {
			return m, true
		}
	}
	return ModelOffer{}, false
}

// AllowsDevice says whether the offer lets the model run on device ("": any).
func (m ModelOffer) AllowsDevice(device string) bool {
	return device == "" || len(m.Devices) == 0 || slices.Contains(m.Devices, device)
}

// ModelNames returns the names of the hive's catalog, in its order.
func (h Hive) ModelNames() []string {
	out := make([]string, len(h.Models))
	for i, m := range h.Models {
		out[i] = m.Name
	}
	return out
}

// Device is one device of a hive, as it reports it.
type Device struct {
	Name, Description       string
	MemoryTotal, MemoryUsed uint64 // bytes; 0: unknown
}

type hiveEntry struct {
	h          Hive // Workers is filled in on the way out
	staleSince time.Time
	deadline   item
	// placedSinceBeat counts workers reserved on the hive since its last beat, which its
	// FreePorts does not know of yet.
	placedSinceBeat int
}

// AddStaticHive records a hive given on the command line. A self-registered hive with the same
// id becomes static; a second static one is ErrExists.
func (r *Registry) AddStaticHive(id, address string) error {
	if id == "" || address == "" {
		return fmt.Errorf("%w: static hive needs an id and an address", ErrInvalid)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.hives[id]
	if e == nil {
		e = r.newHiveLocked(id)
	} else if e.h.Static {
		return fmt.Errorf("hive %q: %w", id, ErrExists)
	}
	e.h.Static, e.h.State, e.h.Address = true, HiveReady, address
	r.unscheduleLocked(&e.deadline)
	r.rev++
	return nil
}

// HiveBeat applies a hive's registration or heartbeat: an unknown hive is added, a STALE one is
// READY again. A static hive keeps the address the operator gave and only takes the details.
func (r *Registry) HiveBeat(in Hive) (Hive, error) {
	if in.ID == "" {
		return Hive{}, fmt.Errorf("%w: empty hive id", ErrInvalid)
	}
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.hives[in.ID]
	if e == nil {
		e = r.newHiveLocked(in.ID)
	}
	old := e.h
	h := &e.h
	if !h.Static && in.Address != "" {
		h.Address = in.Address
	}
	h.State, h.LastHeartbeat = HiveReady, now
	h.Version, h.OS, h.FreePorts = in.Version, in.OS, in.FreePorts
	if in.Clock.Instance != 0 {
		// Received is taken here, after the beat arrived: later only makes the bound stricter.
		h.Clock = HiveClock{Instance: in.Clock.Instance, Reading: in.Clock.Reading, Received: now}
	}
	e.placedSinceBeat = 0
	if !slices.Equal(h.Devices, in.Devices) {
		h.Devices = slices.Clone(in.Devices)
	}
	if !slices.Equal(h.DeviceInfo, in.DeviceInfo) {
		h.DeviceInfo = slices.Clone(in.DeviceInfo)
	}
	if !slices.EqualFunc(h.Models, in.Models, ModelOffer.equal) {
		h.Models = cloneOffers(in.Models)
	}
	if !sameHiveButBeat(old, *h) {
		r.rev++
	}
	if !h.Static {
		r.scheduleLocked(&e.deadline, r.hiveDue(e))
	}
	return r.hiveLocked(e), nil
}

// HiveStreamClosed is called when a hive's heartbeat stream ends: the hive turns STALE and
// expires unless it comes back. Static hives stay READY.
func (r *Registry) HiveStreamClosed(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.hives[id]
	if e == nil || e.h.Static || e.h.State == HiveStale || r.holdingLocked(time.Now()) {
		return
	}
	e.h.State, e.staleSince = HiveStale, time.Now()
	r.rev++
	// The expiry is later than the pending stale deadline; advance re-keys it lazily.
	r.scheduleLocked(&e.deadline, r.hiveDue(e))
}

// GetHive returns the hive with the given id.
func (r *Registry) GetHive(id string) (Hive, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if e := r.hives[id]; e != nil {
		return r.hiveLocked(e), true
	}
	return Hive{}, false
}

// ListHives returns all hives sorted by ID.
func (r *Registry) ListHives() []Hive {
	r.mu.Lock()
	out := make([]Hive, 0, len(r.hives))
	for _, e := range r.hives {
		out = append(out, r.hiveLocked(e))
	}
	r.mu.Unlock()
	slices.SortFunc(out, func(a, b Hive) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// Need is what a spawn asks of the hive it is placed on; the zero Need takes any READY hive with
// room for one more worker.
type Need struct {
	// Fits, when set, is asked last about each READY hive with room and says why a hive does not
	// fit (the model catalog plugs in here: does the hive offer the model, on that device).
	Fits func(Hive) (ok bool, why string)
}

// NoFitError says why no READY hive could take a worker: each hive passed over, with the reason.
// It wraps ErrNoHive.
type NoFitError struct {
	Reasons []string // "hive a: no free worker slot ...", sorted by hive id
}

func (e *NoFitError) Error() string {
	return "no live hive can take the worker: " + strings.Join(e.Reasons, "; ")
}
func (e *NoFitError) Unwrap() error { return ErrNoHive }

// room is how many more workers the hive can take as far as the queen knows: what it reported
// free at its last beat (free ports, capped by --max-workers), less the workers placed on it
// since. A hive that never reported (a static hive not heard from) has unknown room, taken as some.
func (r *Registry) roomLocked(e *hiveEntry) (int, bool) {
	if e.h.LastHeartbeat.IsZero() {
		return 1, false
	}
	return int(e.h.FreePorts) - e.placedSinceBeat, true
}

// PickHive returns the READY hive with room for one more worker that meets need and has the
// fewest workers, ties broken by the smaller id. With no READY hive at all it is ErrNoHive; with
// READY hives that cannot take the worker, a *NoFitError saying why for each. Hives number in the
// hundreds at most, so a scan is the simple right answer.
func (r *Registry) PickHive(need Need) (Hive, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var best *hiveEntry
	var reasons []string
	for _, e := range r.hives {
		if e.h.State != HiveReady {
			continue
		}
		if room, _ := r.roomLocked(e); room <= 0 {
			reasons = append(reasons, fmt.Sprintf("hive %s: no free worker slot (its port range or --max-workers is used up)", e.h.ID))
			continue
		}
		if need.Fits != nil {
			if ok, why := need.Fits(r.hiveLocked(e)); !ok {
				reasons = append(reasons, fmt.Sprintf("hive %s: %s", e.h.ID, why))
				continue
			}
		}
		if best == nil {
			best = e
			continue
		}
		n, bn := r.perHive[e.h.ID], r.perHive[best.h.ID]
		if n < bn || n == bn && e.h.ID < best.h.ID {
			best = e
		}
	}
	if best == nil {
		if len(reasons) == 0 {
			return Hive{}, ErrNoHive
		}
		slices.Sort(reasons)
		return Hive{}, &NoFitError{Reasons: reasons}
	}
	return r.hiveLocked(best), nil
}

// maxFormerHives bounds the addresses remembered of expired hives.
const maxFormerHives = 4096

// rememberFormerLocked keeps the last address of a hive that expired: its workers may still run
// there, and a hive now at that address can act for them.
func (r *Registry) rememberFormerLocked(id, address string) {
	if address == "" {
		return
	}
	if r.formerHives == nil {
		r.formerHives = map[string]string{}
	}
	if _, ok := r.formerHives[id]; !ok && len(r.formerHives) >= maxFormerHives {
		for k := range r.formerHives { // any one: this is a hint, not a record
			delete(r.formerHives, k)
			break
		}
	}
	r.formerHives[id] = address
}

// FormerHiveAddress returns the last address of hive id if it expired from the registry
// (stopped beating for --expire-after) since the queen started.
func (r *Registry) FormerHiveAddress(id string) (string, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a, ok := r.formerHives[id]
	return a, ok
}

// HiveAt returns the READY hive at address, if any (the one with the smallest id if several
// claim it).
func (r *Registry) HiveAt(address string) (Hive, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var best *hiveEntry
	for _, e := range r.hives {
		if e.h.State == HiveReady && e.h.Address == address && (best == nil || e.h.ID < best.h.ID) {
			best = e
		}
	}
	if best == nil {
		return Hive{}, false
	}
	return r.hiveLocked(best), true
}

// HivesOnHost returns the READY hives whose address has host as its host, sorted by id.
func (r *Registry) HivesOnHost(host string) []Hive {
	r.mu.Lock()
	var out []Hive
	for _, e := range r.hives {
		if h, _, err := net.SplitHostPort(e.h.Address); err == nil && h == host && e.h.State == HiveReady {
			out = append(out, r.hiveLocked(e))
		}
	}
	r.mu.Unlock()
	slices.SortFunc(out, func(a, b Hive) int { return strings.Compare(a.ID, b.ID) })
	return out
}

func (r *Registry) newHiveLocked(id string) *hiveEntry {
	e := &hiveEntry{h: Hive{ID: id, State: HiveReady}}
	e.deadline = item{index: -1, hive: e}
	r.hives[id] = e
	return e
}

// hiveLocked returns a copy of e safe to hand out.
func (r *Registry) hiveLocked(e *hiveEntry) Hive {
	h := e.h
	h.Devices = slices.Clone(h.Devices)
	h.DeviceInfo = slices.Clone(h.DeviceInfo)
	h.Models = cloneOffers(h.Models)
	h.Workers = r.perHive[h.ID]
	return h
}

func cloneOffers(ms []ModelOffer) []ModelOffer {
	if ms == nil {
		return nil
	}
	out := make([]ModelOffer, len(ms))
	for i, m := range ms {
		m.Devices = slices.Clone(m.Devices)
		out[i] = m
	}
	return out
}

func sameHiveButBeat(a, b Hive) bool {
	return a.ID == b.ID && a.Address == b.Address && a.State == b.State && a.Static == b.Static &&
		a.Version == b.Version && a.OS == b.OS && a.FreePorts == b.FreePorts &&
		slices.Equal(a.Devices, b.Devices) && slices.Equal(a.DeviceInfo, b.DeviceInfo) &&
		slices.EqualFunc(a.Models, b.Models, ModelOffer.equal)
}

func (r *Registry) hiveDue(e *hiveEntry) time.Time {
	if e.h.State == HiveStale {
		return e.staleSince.Add(r.cfg.ExpireAfter)
	}
	return e.h.LastHeartbeat.Add(r.cfg.StaleAfter)
}

// tickHiveLocked handles e's deadline popping at now. Static hives are never queued.
func (r *Registry) tickHiveLocked(e *hiveEntry, now time.Time) {
	due := r.hiveDue(e)
	switch {
	case due.After(now):
		r.requeueLocked(&e.deadline, due)
	case e.h.State == HiveStale:
		// Its workers stay: they report to the queen directly and outlive their hive's silence.
		r.unscheduleLocked(&e.deadline)
		delete(r.hives, e.h.ID)
		r.rememberFormerLocked(e.h.ID, e.h.Address)
		r.rev++
	default:
		e.h.State, e.staleSince = HiveStale, laterOf(due, r.holdUntil)
		r.rev++
		r.requeueLocked(&e.deadline, r.hiveDue(e))
	}
}
