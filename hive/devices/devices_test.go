package devices

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParseNvidiaSMI(t *testing.T) {
	for _, tc := range []struct {
		name, out string
		want      []Device
		err       string
	}{
		{name: "none", out: "", want: nil},
		{name: "two", out: "0, NVIDIA A100-SXM4-80GB, 81920, 1024\n1, NVIDIA A100-SXM4-80GB, 81920, 0\n", want: []Device{
			{Name: "cuda:0", Description: "NVIDIA A100-SXM4-80GB", MemoryTotal: 81920 << 20, MemoryUsed: 1024 << 20},
			{Name: "cuda:1", Description: "NVIDIA A100-SXM4-80GB", MemoryTotal: 81920 << 20},
		}},
		{name: "unsorted, blank lines, CRLF", out: "\r\n2, Tesla T4, 15360, 5\r\n0, Tesla T4, 15360, 6\r\n\n", want: []Device{
			{Name: "cuda:0", Description: "Tesla T4", MemoryTotal: 15360 << 20, MemoryUsed: 6 << 20},
			{Name: "cuda:2", Description: "Tesla T4", MemoryTotal: 15360 << 20, MemoryUsed: 5 << 20},
		}},
		{name: "N/A memory", out: "0, NVIDIA GH200, [N/A], [N/A]\n", want: []Device{{Name: "cuda:0", Description: "NVIDIA GH200"}}},
		{name: "comma in name", out: "0, Odd, Name, 100, 1\n", want: []Device{{Name: "cuda:0", Description: "Odd,Name", MemoryTotal: 100 << 20, MemoryUsed: 1 << 20}}},
		{name: "too few fields", out: "0, Tesla T4, 15360\n", err: `line 1 "0, Tesla T4, 15360"`},
		{name: "bad index", out: "x, Tesla T4, 1, 1\n", err: `index "x"`},
		{name: "index out of range", out: "1024, Tesla T4, 1, 1\n", err: "0-1023"},
		{name: "bad memory", out: "0, Tesla T4, lots, 1\n", err: "memory.total"},
		{name: "units left in", out: "0, Tesla T4, 15360 MiB, 1 MiB\n", err: "memory.total"},
		{name: "duplicate index", out: "0, a, 1, 1\n0, b, 1, 1\n", err: "index 0 twice"},
		{name: "error text", out: "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", err: "line 1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseNvidiaSMI([]byte(tc.out))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want one mentioning %q", err, tc.err)
				}
				return
			}
			if err != nil || !slices.Equal(got, tc.want) {
				t.Fatalf("ParseNvidiaSMI = %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

// fakeSMI puts an nvidia-smi on a fresh PATH that prints out (after sleeping for, if set) and
// records its arguments.
func fakeSMI(t *testing.T, out string, sleep string) (argsFile string) {
	t.Helper()
	dir := t.TempDir()
	argsFile = filepath.Join(dir, "args")
	script := "#!/bin/sh\necho \"$@\" > " + argsFile + "\n"
	if sleep != "" {
		script += "exec sleep " + sleep + "\n"
	}
	script += "cat <<'EOF'\n" + out + "EOF\n"
	if err := os.WriteFile(filepath.Join(dir, "nvidia-smi"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+string(filepath.ListSeparator)+os.Getenv("PATH"))
	return argsFile
}

func fakeTree(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for p, content := range files {
		full := filepath.Join(root, p)
		os.MkdirAll(filepath.Dir(full), 0o755)
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestDiscover(t *testing.T) {
	nodes := map[string]string{"/dev/nvidia0": "", "/dev/nvidia1": "", "/dev/nvidiactl": ""}
	t.Run("nvidia-smi on PATH", func(t *testing.T) {
		args := fakeSMI(t, "0, Tesla T4, 15360, 300\n", "")
		got, err := Discover(t.Context(), Config{Root: fakeTree(t, nodes)})
		if err != nil || !slices.Equal(names(got), []string{"cpu", "cuda:0"}) || got[1].MemoryUsed != 300<<20 {
			t.Fatalf("Discover = %+v, %v; want cpu and the one GPU nvidia-smi reports (not the two nodes)", got, err)
		}
		b, _ := os.ReadFile(args)
		if want := "--query-gpu=index,name,memory.total,memory.used --format=csv,noheader,nounits\n"; string(b) != want {
			t.Errorf("nvidia-smi ran with %q, want %q", b, want)
		}
	})
	t.Run("no nvidia-smi: device nodes", func(t *testing.T) {
		t.Setenv("PATH", t.TempDir())
		got, err := Discover(t.Context(), Config{Root: fakeTree(t, nodes)})
		if err != errNoSMI || !slices.Equal(names(got), []string{"cpu", "cuda:0", "cuda:1"}) {
			t.Fatalf("Discover = %+v, %v", got, err)
		}
	})
	t.Run("nvidia-smi fails: device nodes, and why", func(t *testing.T) {
		fakeSMI(t, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", "")
		got, err := Discover(t.Context(), Config{Root: fakeTree(t, nodes)})
		if err == nil || !slices.Equal(names(got), []string{"cpu", "cuda:0", "cuda:1"}) {
			t.Fatalf("Discover = %+v, %v", got, err)
		}
	})
	t.Run("nvidia-smi hangs: bounded", func(t *testing.T) {
		fakeSMI(t, "0, Tesla T4, 1, 1\n", "60")
		t0 := time.Now()
		got, err := Discover(t.Context(), Config{Root: fakeTree(t, nodes), Timeout: 200 * time.Millisecond})
		if err == nil || !strings.Contains(err.Error(), "did not answer within") || len(got) != 3 {
			t.Fatalf("Discover = %+v, %v", got, err)
		}
		if took := time.Since(t0); took > 5*time.Second {
			t.Errorf("a hung nvidia-smi held discovery for %v", took)
		}
	})
	t.Run("AMD and render nodes", func(t *testing.T) {
		t.Setenv("PATH", t.TempDir())
		root := fakeTree(t, map[string]string{
			"/dev/kfd": "", "/dev/dri/renderD128": "", "/dev/dri/renderD129": "", "/dev/dri/renderD130": "",
			"/sys/class/drm/renderD128/device/vendor":              "0x8086\n", // an Intel iGPU
			"/sys/class/drm/renderD129/device/vendor":              "0x1002\n",
			"/sys/class/drm/renderD129/device/mem_info_vram_total": "17163091968\n",
			"/sys/class/drm/renderD129/device/mem_info_vram_used":  "1048576\n",
			"/sys/class/drm/renderD130/device/vendor":              "0x1002\n",
		})
		got, _ := Discover(t.Context(), Config{Root: root})
		want := []string{"cpu", "rocm:0", "rocm:1", "vulkan:0", "vulkan:1", "vulkan:2"}
		if !slices.Equal(names(got), want) || got[1].MemoryTotal != 17163091968 || got[1].MemoryUsed != 1048576 ||
			!strings.Contains(got[1].Description, "renderD129") {
			t.Fatalf("Discover = %+v; want %v with renderD129's VRAM on rocm:0", got, want)
		}
	})
	t.Run("render nodes without kfd are not ROCm", func(t *testing.T) {
		t.Setenv("PATH", t.TempDir())
		root := fakeTree(t, map[string]string{"/dev/dri/renderD128": "", "/sys/class/drm/renderD128/device/vendor": "0x1002\n"})
		got, _ := Discover(t.Context(), Config{Root: root})
		if !slices.Equal(names(got), []string{"cpu", "vulkan:0"}) {
			t.Fatalf("Discover = %+v", got)
		}
	})
}

// TestInventoryRefresh: Run picks up changes; a failing nvidia-smi keeps the last good list.
func TestInventoryRefresh(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("PATH", dir)
	smi := filepath.Join(dir, "nvidia-smi")
	write := func(body string) {
		// Written beside and renamed, so a run never sees a half-written script.
		tmp := smi + ".new"
		os.WriteFile(tmp, []byte("#!/bin/sh\n"+body), 0o755)
		os.Rename(tmp, smi)
	}
	write("echo '0, Tesla T4, 15360, 1'\n")
	inv := NewInventory(t.Context(), Config{Root: t.TempDir(), Every: 20 * time.Millisecond})
	if !inv.Has("cuda:0") || inv.Has("cuda:1") || !inv.Has("cpu") {
		t.Fatalf("first list %v", inv.Names())
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { inv.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	write("echo '0, Tesla T4, 15360, 1'; echo '1, Tesla T4, 15360, 2'\n")
	waitFor(t, func() bool { return inv.Has("cuda:1") })
	write("echo broken >&2; exit 9\n")
	// Let a few failing refreshes pass: the list must stay.
	marker := filepath.Join(dir, "ran")
	write(": > " + marker + "; echo broken >&2; exit 9\n")
	waitFor(t, func() bool { _, err := os.Stat(marker); return err == nil })
	os.Remove(marker)
	waitFor(t, func() bool { _, err := os.Stat(marker); return err == nil })
	if !slices.Equal(inv.Names(), []string{"cpu", "cuda:0", "cuda:1"}) {
		t.Fatalf("after nvidia-smi failed: %v; want the last good list", inv.Names())
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
