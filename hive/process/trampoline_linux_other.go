//go:build linux && !amd64

package process

// trampolineELF is empty where no native trampoline is built (trampoline/trampoline.c is x86-64):
// workers are then started through the hive's own binary (RunTrampolineIfRequested).
var trampolineELF []byte
