package cli

import (
	"bytes"
	"strings"
	"testing"
	"time"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
)

func TestHiveDevices(t *testing.T) {
	for _, tc := range []struct {
		hive *rbeev1.Hive
		want string
	}{
		{&rbeev1.Hive{}, "-"},
		{&rbeev1.Hive{Devices: []string{"cpu", "cuda:0"}}, "cpu, cuda:0"},
		{&rbeev1.Hive{Devices: []string{"cpu", "cuda:0"}, DeviceInfo: []*rbeev1.Device{
			{Name: "cpu"}, {Name: "cuda:0", Description: "Tesla T4", MemoryTotalBytes: 15 << 30, MemoryUsedBytes: 3 << 29}}},
			"cpu, cuda:0 1.5/15.0GiB"},
	} {
		if got := deviceList(tc.hive); got != tc.want {
			t.Errorf("deviceList(%v) = %q, want %q", tc.hive, got, tc.want)
		}
	}
	var b bytes.Buffer
	writeHives(&b, []*rbeev1.Hive{{HiveId: "h1", Devices: []string{"cpu"}}}, time.Now())
	if lines := strings.Split(b.String(), "\n"); !strings.HasSuffix(lines[0], "DEVICES") || !strings.HasSuffix(lines[1], "cpu") {
		t.Errorf("hive ls table:\n%s", b.String())
	}
}

func TestHiveModels(t *testing.T) {
	var b bytes.Buffer
	writeHives(&b, []*rbeev1.Hive{{HiveId: "h1", Devices: []string{"cpu"}},
		{HiveId: "h2", Devices: []string{"cpu"}, Models: []*rbeev1.ModelOffer{{Name: "llama-8b"}, {Name: "qwen-7b"}}}}, time.Now())
	lines := strings.Split(b.String(), "\n")
	if !strings.Contains(lines[0], "MODELS") || !strings.Contains(lines[1], " any ") || !strings.Contains(lines[2], " llama-8b,qwen-7b ") {
		t.Errorf("hive ls table:\n%s", b.String())
	}
}
