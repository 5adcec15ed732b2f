//go:build !linux

package process

import (
	"context"
	"runtime"
	"time"
)

// Manager on systems other than Linux exists so that the hive builds everywhere; it cannot spawn
// or delete workers because the identity proof needs pidfds and /proc.
type Manager struct{ cfg Config }

// New validates cfg; the Manager it returns answers every Spawn and Delete with KindUnsupported.
func New(cfg Config) (*Manager, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	return &Manager{cfg: cfg}, nil
}

func unsupported() error {
	return errf(KindUnsupported, nil, "worker process control needs Linux (pidfd, /proc, cgroup v2); this hive runs on %s", runtime.GOOS)
}

// Spawn returns KindUnsupported.
func (m *Manager) Spawn(ctx context.Context, s SpawnSpec) (Spawned, error) {
	return Spawned{}, unsupported()
}

// Delete returns KindUnsupported.
func (m *Manager) Delete(ctx context.Context, t Target, grace time.Duration) (Outcome, error) {
	if err := checkGrace(grace); err != nil {
		return OutcomeUnknown, err
	}
	return OutcomeUnknown, unsupported()
}

// Live returns 0: this Manager never has workers.
func (m *Manager) Live() int { return 0 }

// Close does nothing.
func (m *Manager) Close() error { return nil }

// RunTrampolineIfRequested returns at once: there is no trampoline outside Linux.
func RunTrampolineIfRequested() {}

// Logs returns KindUnsupported.
func (m *Manager) Logs(ctx context.Context, workerID string, tailLines int, follow bool, send func([]byte) error) error {
	return unsupported()
}
