package devices

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
)

// Device is one thing a worker can run on.
type Device struct {
	Name        string // "cpu", "cuda:0", "rocm:1", "vulkan:0"
	Description string // e.g. "NVIDIA A100-SXM4-80GB"
	// Memory in bytes; 0 when unknown (device nodes say nothing about it, and "cpu" reports none).
	MemoryTotal, MemoryUsed uint64
}

// Config says where to look. Zero values take the defaults beside them.
type Config struct {
	// NvidiaSMI is the nvidia-smi to run; "" looks "nvidia-smi" up on PATH at each discovery.
	NvidiaSMI string
	// Root is prefixed to /dev and /sys ("" is the real machine); tests point it at a fake tree.
	Root string
	// Timeout bounds one nvidia-smi run (5s): a wedged driver must not hold the hive up.
	Timeout time.Duration
	// Every is how often Run refreshes the list (30s): memory use changes, the set rarely does.
	Every  time.Duration
	Logger *zap.Logger
}

func (c Config) withDefaults() Config {
	if c.Timeout <= 0 {
		c.Timeout = 5 * time.Second
	}
	if c.Every <= 0 {
		c.Every = 30 * time.Second
	}
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
	return c
}

// nvidiaQuery is what the hive asks nvidia-smi: one CSV line per GPU, memory in MiB.
var nvidiaQuery = []string{"--query-gpu=index,name,memory.total,memory.used", "--format=csv,noheader,nounits"}

// Discover lists the machine's devices: "cpu" first, then NVIDIA GPUs from nvidia-smi when it is
// on PATH (else from /dev/nvidiaN), AMD GPUs from /dev/kfd and the AMD render nodes, and a
// vulkan:N per render node. The error, when not nil, says why nvidia-smi's answer was not used;
// the list is still the best the device nodes give.
func Discover(ctx context.Context, cfg Config) ([]Device, error) {
	cfg = cfg.withDefaults()
	out := []Device{{Name: "cpu", Description: "the host's CPUs"}}
	gpus, err := nvidiaSMI(ctx, cfg)
	if gpus == nil {
		gpus = nvidiaNodes(cfg.Root)
	}
	out = append(out, gpus...)
	out = append(out, renderNodes(cfg.Root)...)
	return out, err
}

// errNoSMI: nvidia-smi is not installed, the normal case on machines without NVIDIA GPUs.
var errNoSMI = errors.New("nvidia-smi not on PATH")

func nvidiaSMI(ctx context.Context, cfg Config) ([]Device, error) {
	bin := cfg.NvidiaSMI
	if bin == "" {
		p, err := exec.LookPath("nvidia-smi")
		if err != nil {
			return nil, errNoSMI
		}
		bin = p
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, nvidiaQuery...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.WaitDelay = time.Second // a child holding the pipes open must not hold Discover
	out, err := cmd.Output()
	if ctx.Err() == context.DeadlineExceeded {
		return nil, fmt.Errorf("%s did not answer within %v", bin, cfg.Timeout)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %s", bin, err, strings.TrimSpace(stderr.String()))
	}
	return ParseNvidiaSMI(out)
}

// ParseNvidiaSMI reads the output of
// nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv,noheader,nounits:
// lines "0, NVIDIA A100-SXM4-80GB, 81920, 1024" (memory in MiB; "[N/A]" where unknown, as on
// MIG or integrated devices). An empty output is no GPUs; a malformed line is an error naming it.
func ParseNvidiaSMI(out []byte) ([]Device, error) {
	var devs []Device
	seen := map[string]bool{}
	for n, line := range strings.Split(string(out), "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		f := strings.Split(line, ",")
		if len(f) < 4 {
			return nil, fmt.Errorf("nvidia-smi line %d %q: want index, name, memory.total, memory.used", n+1, line)
		}
		for i := range f {
			f[i] = strings.TrimSpace(f[i])
		}
		idx, err := strconv.Atoi(f[0])
		if err != nil || idx < 0 || idx > 1023 {
			return nil, fmt.Errorf("nvidia-smi line %d %q: index %q is not a number 0-1023", n+1, line, f[0])
		}
		total, err := mib(f[len(f)-2])
		if err != nil {
			return nil, fmt.Errorf("nvidia-smi line %d %q: memory.total: %w", n+1, line, err)
		}
		used, err := mib(f[len(f)-1])
		if err != nil {
			return nil, fmt.Errorf("nvidia-smi line %d %q: memory.used: %w", n+1, line, err)
		}
		name := "cuda:" + strconv.Itoa(idx)
		if seen[name] {
			return nil, fmt.Errorf("nvidia-smi line %d %q: index %d twice", n+1, line, idx)
		}
		seen[name] = true
		// A name with a comma in it was split above; the middle fields are all name.
		devs = append(devs, Device{Name: name, Description: strings.Join(f[1:len(f)-2], ","), MemoryTotal: total, MemoryUsed: used})
	}
	slices.SortFunc(devs, func(a, b Device) int { return cmpIndex(a.Name, b.Name) })
	return devs, nil
}

func mib(s string) (uint64, error) {
	if strings.HasPrefix(s, "[") { // [N/A], [Not Supported]
		return 0, nil
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%q is not a number of MiB", s)
	}
	return v << 20, nil
}

func cmpIndex(a, b string) int {
	ia, _ := strconv.Atoi(Index(a))
	ib, _ := strconv.Atoi(Index(b))
	return ia - ib
}

// nvidiaNodes names a cuda:N per /dev/nvidiaN (N is the device minor, which is nvidia-smi's
// index on ordinary machines).
func nvidiaNodes(root string) []Device {
	nodes, _ := filepath.Glob(filepath.Join(root, "/dev/nvidia[0-9]*"))
	var out []Device
	for _, n := range nodes {
		i, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(n), "nvidia"))
		if err != nil || i > 1023 {
			continue
		}
		out = append(out, Device{Name: "cuda:" + strconv.Itoa(i), Description: "NVIDIA GPU (/dev/nvidia" + strconv.Itoa(i) + ")"})
	}
	slices.SortFunc(out, func(a, b Device) int { return cmpIndex(a.Name, b.Name) })
	return out
}

// renderNodes names, per GPU render node (/dev/dri/renderD*), in node order: a rocm:N for AMD's
// (vendor 0x1002, and only with /dev/kfd, the ROCm compute interface), with the VRAM amdgpu
// reports; and a vulkan:N for every one. Vulkan numbers its devices itself; on machines with a
// software renderer or several vendors its order may differ from the nodes', so vulkan:N is the
// best guess the nodes allow.
func renderNodes(root string) []Device {
	nodes, _ := filepath.Glob(filepath.Join(root, "/dev/dri/renderD*"))
	slices.SortFunc(nodes, func(a, b string) int {
		na, _ := strconv.Atoi(strings.TrimPrefix(filepath.Base(a), "renderD"))
		nb, _ := strconv.Atoi(strings.TrimPrefix(filepath.Base(b), "renderD"))
		return na - nb
	})
	_, err := os.Stat(filepath.Join(root, "/dev/kfd"))
	kfd := err == nil
	var rocm, vulkan []Device
	for _, n := range nodes {
		base := filepath.Base(n)
		sys := filepath.Join(root, "/sys/class/drm", base, "device")
		vendor := readTrim(filepath.Join(sys, "vendor"))
		if kfd && vendor == "0x1002" {
			d := Device{Name: "rocm:" + strconv.Itoa(len(rocm)), Description: "AMD GPU (/dev/dri/" + base + ")"}
			d.MemoryTotal, _ = strconv.ParseUint(readTrim(filepath.Join(sys, "mem_info_vram_total")), 10, 64)
			d.MemoryUsed, _ = strconv.ParseUint(readTrim(filepath.Join(sys, "mem_info_vram_used")), 10, 64)
			rocm = append(rocm, d)
		}
		vulkan = append(vulkan, Device{Name: "vulkan:" + strconv.Itoa(len(vulkan)), Description: "GPU render node /dev/dri/" + base})
	}
	return append(rocm, vulkan...)
}

func readTrim(path string) string {
	b, _ := os.ReadFile(path)
	return strings.TrimSpace(string(b))
}

// Inventory is the hive's current list of devices: read once at start, then refreshed every
// Config.Every by Run, so that a heartbeat or a spawn never waits for nvidia-smi.
type Inventory struct {
	cfg  Config
	mu   sync.RWMutex
	devs []Device
}

// NewInventory discovers the devices once (bounded by cfg.Timeout).
func NewInventory(ctx context.Context, cfg Config) *Inventory {
	inv := &Inventory{cfg: cfg.withDefaults()}
	devs, err := Discover(ctx, inv.cfg)
	if err != nil && !errors.Is(err, errNoSMI) {
		inv.cfg.Logger.Warn("nvidia-smi gave no device list; using device nodes", zap.Error(err))
	}
	inv.devs = devs
	inv.cfg.Logger.Info("devices found", zap.Strings("devices", names(devs)))
	return inv
}

// Run refreshes the list every Config.Every until ctx ends. When nvidia-smi fails after it has
// worked, the last list it gave is kept (its memory figures age) rather than GPUs vanishing.
func (inv *Inventory) Run(ctx context.Context) {
	t := time.NewTicker(inv.cfg.Every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		devs, err := Discover(ctx, inv.cfg)
		if err != nil && !errors.Is(err, errNoSMI) {
			if ctx.Err() != nil {
				return
			}
			inv.cfg.Logger.Warn("refreshing devices: nvidia-smi failed; keeping the last list", zap.Error(err))
			continue
		}
		inv.mu.Lock()
		changed := !slices.Equal(names(inv.devs), names(devs))
		inv.devs = devs
		inv.mu.Unlock()
		if changed {
			inv.cfg.Logger.Info("devices changed", zap.Strings("devices", names(devs)))
		}
	}
}

// List returns a copy of the current devices.
func (inv *Inventory) List() []Device {
	inv.mu.RLock()
	defer inv.mu.RUnlock()
	return slices.Clone(inv.devs)
}

// Names returns the current device names, "cpu" first.
func (inv *Inventory) Names() []string {
	inv.mu.RLock()
	defer inv.mu.RUnlock()
	return names(inv.devs)
}

// Has says whether the hive has the named device.
func (inv *Inventory) Has(name string) bool {
	inv.mu.RLock()
	defer inv.mu.RUnlock()
	return slices.ContainsFunc(inv.devs, func(d Device) bool { return d.Name == name })
}

func names(devs []Device) []string {
	out := make([]string, len(devs))
	for i, d := range devs {
		out[i] = d.Name
	}
	return out
}
