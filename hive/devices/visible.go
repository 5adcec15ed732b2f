// Package devices knows the accelerators of the hive's machine and how a server is pointed at one:
// it discovers them (nvidia-smi, else device nodes; always "cpu"), keeps that list fresh for the
// hive's heartbeat and its spawn check, and maps a device name to the environment that makes a
// worker see only that device.
package devices

import "strings"

// VisibleEnv returns the environment that makes device the only one a worker sees:
// cuda:N -> CUDA_VISIBLE_DEVICES=N; rocm:N -> HIP_VISIBLE_DEVICES=N and ROCR_VISIBLE_DEVICES=N;
// vulkan:N -> GGML_VK_VISIBLE_DEVICES=N.
//
// cpu -> CUDA_VISIBLE_DEVICES= (empty), which hides every NVIDIA GPU: a CUDA build of llama.cpp
// offloads layers to GPU 0 by default and vLLM or PyTorch allocate on it, so a worker placed on
// the CPU would otherwise take memory from the GPU workers the queen placed there. Empty is the
// CUDA runtime's documented "no devices". ROCm has no such documented value, so nothing is set
// for it. metal:N gets nothing (one GPU per Mac; the hive cannot spawn on macOS anyway).
func VisibleEnv(device string) []string {
	if device == "cpu" {
		return []string{"CUDA_VISIBLE_DEVICES="}
	}
	kind, idx, ok := strings.Cut(device, ":")
	if !ok || idx == "" {
		return nil
	}
	switch kind {
	case "cuda":
		return []string{"CUDA_VISIBLE_DEVICES=" + idx}
	case "rocm":
		return []string{"HIP_VISIBLE_DEVICES=" + idx, "ROCR_VISIBLE_DEVICES=" + idx}
	case "vulkan":
		return []string{"GGML_VK_VISIBLE_DEVICES=" + idx}
	}
	return nil
}

// Index returns the device's number (cuda:1 -> "1"), "" for cpu.
func Index(device string) string {
	_, idx, _ := strings.Cut(device, ":")
	return idx
}
