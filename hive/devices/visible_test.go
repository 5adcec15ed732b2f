package devices

import (
	"slices"
	"testing"
)

func TestVisibleEnv(t *testing.T) {
	for _, tc := range []struct {
		device string
		env    []string
		index  string
	}{
		{"cpu", []string{"CUDA_VISIBLE_DEVICES="}, ""},
		{"cuda:1", []string{"CUDA_VISIBLE_DEVICES=1"}, "1"},
		{"cuda:12", []string{"CUDA_VISIBLE_DEVICES=12"}, "12"},
		{"rocm:0", []string{"HIP_VISIBLE_DEVICES=0", "ROCR_VISIBLE_DEVICES=0"}, "0"},
		{"vulkan:2", []string{"GGML_VK_VISIBLE_DEVICES=2"}, "2"},
		{"metal:0", nil, "0"},
	} {
		if got := VisibleEnv(tc.device); !slices.Equal(got, tc.env) {
			t.Errorf("VisibleEnv(%q) = %q, want %q", tc.device, got, tc.env)
		}
		if got := Index(tc.device); got != tc.index {
			t.Errorf("Index(%q) = %q, want %q", tc.device, got, tc.index)
		}
	}
}
