package catalog

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// server is a real executable file for cmd[0]; notExec a file without the x bit.
func fixtures(t *testing.T) (server, notExec string) {
	dir := t.TempDir()
	server = filepath.Join(dir, "llama-server")
	if err := os.WriteFile(server, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	notExec = filepath.Join(dir, "plain")
	if err := os.WriteFile(notExec, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	return server, notExec
}

func TestParseGood(t *testing.T) {
	server, _ := fixtures(t)
	text := `# two models
models:
  llama-3-8b:
    cmd: ["` + server + `", "-m", "/models/x.gguf", "--port", "${PORT}", "--host", "${HOST}", "--price", "$$5"]
    env: {LLAMA_ARG_CTX_SIZE: "8192", CUDA_DEVICE_ORDER: "PCI_BUS_ID", TAG: "${MODEL}-${WORKER_ID}-${DEVICE}-${DEVICE_INDEX}"}
    health: /v1/health
    load_timeout: 90s
    unhealthy_timeout: 5s
    grace: 10s
    concurrency: 4
    ttl: 15m
    devices: ["cuda:0", "cuda:1"]
  small:
    cmd:
      - ` + server + `
`
	c, err := Parse("models.yaml", []byte(text))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Names(); !slices.Equal(got, []string{"llama-3-8b", "small"}) {
		t.Fatalf("Names = %q", got)
	}
	m, _ := c.Lookup("llama-3-8b")
	if m.Health != "/v1/health" || m.LoadTimeout != 90*time.Second || m.UnhealthyTimeout != 5*time.Second ||
		m.Grace != 10*time.Second || m.Concurrency != 4 || m.TTL != 15*time.Minute || m.Line != 3 {
		t.Fatalf("entry = %+v", m)
	}
	v := Vars{Port: 9123, Model: "llama-3-8b", WorkerID: "w-1", Device: "cuda:1", DeviceIndex: "1"}
	wantCmd := []string{server, "-m", "/models/x.gguf", "--port", "9123", "--host", "127.0.0.1", "--price", "$5"}
	if got := m.Command(v); !slices.Equal(got, wantCmd) {
		t.Fatalf("Command = %q, want %q", got, wantCmd)
	}
	wantEnv := []string{"CUDA_DEVICE_ORDER=PCI_BUS_ID", "LLAMA_ARG_CTX_SIZE=8192", "TAG=llama-3-8b-w-1-cuda:1-1"}
	if got := m.Environ(v); !slices.Equal(got, wantEnv) {
		t.Fatalf("Environ = %q, want %q", got, wantEnv)
	}
	if !m.AllowsDevice("cuda:1") || m.AllowsDevice("cuda:2") || m.AllowsDevice("cpu") {
		t.Fatal("AllowsDevice does not follow devices")
	}
	s, _ := c.Lookup("small")
	if s.Health != DefaultHealth || s.LoadTimeout != DefaultLoadTimeout || s.UnhealthyTimeout != DefaultUnhealthyTimeout ||
		s.Grace != 0 || s.Concurrency != 0 || s.TTL != 0 || !s.AllowsDevice("cpu") {
		t.Fatalf("defaults = %+v", s)
	}
	if _, ok := c.Lookup("other"); ok {
		t.Fatal("Lookup found a model the catalog lacks")
	}
}

// Every bad file is refused with the line and the field of the mistake.
func TestParseBad(t *testing.T) {
	server, notExec := fixtures(t)
	for _, tc := range []struct {
		name, text string
		want       string // the start of the error, after "models.yaml:"
		also       string // a phrase the message must hold
	}{
		{"empty file", "", "models.yaml: ", "empty file"},
		{"not yaml", "models:\n  a: [\n", "models.yaml:", "not valid YAML"},
		{"no models key", "model:\n  a: {}\n", "models.yaml:1: model: ", "unknown key"},
		{"no models", "models: {}\n", "models.yaml:1: models: ", "no models"},
		{"models a list", "models:\n  - a\n", "models.yaml:2: models: ", "want a mapping"},
		{"missing command", "models:\n  llama:\n    health: /health\n", "models.yaml:3: models.llama.cmd: ", "required"},
		{"command a string", "models:\n  llama:\n    cmd: " + server + " --port 1\n", "models.yaml:3: models.llama.cmd: ", "no shell"},
		{"empty command", "models:\n  llama:\n    cmd: []\n", "models.yaml:3: models.llama.cmd: ", "empty"},
		{"unknown placeholder", "models:\n  llama:\n    cmd: [" + server + ", --port, \"${PROT}\"]\n", "models.yaml:3: models.llama.cmd[2]: ", "unknown placeholder ${PROT}"},
		{"unknown placeholder in env", "models:\n  llama:\n    cmd: [" + server + "]\n    env:\n      X: \"${GPU}\"\n", "models.yaml:5: models.llama.env.X: ", "unknown placeholder ${GPU}"},
		{"unterminated placeholder", "models:\n  llama:\n    cmd: [" + server + ", \"${PORT\"]\n", "models.yaml:3: models.llama.cmd[1]: ", "unterminated"},
		{"relative binary", "models:\n  llama:\n    cmd: [llama-server, --port, \"${PORT}\"]\n", "models.yaml:3: models.llama.cmd[0]: ", "not an absolute path"},
		{"missing binary", "models:\n  llama:\n    cmd: [/nonexistent/llama-server]\n", "models.yaml:3: models.llama.cmd[0]: ", "does not exist"},
		{"binary not executable", "models:\n  llama:\n    cmd: [" + notExec + "]\n", "models.yaml:3: models.llama.cmd[0]: ", "not executable"},
		{"binary a directory", "models:\n  llama:\n    cmd: [/tmp]\n", "models.yaml:3: models.llama.cmd[0]: ", "not a regular file"},
		{"name not an id", "models:\n  Llama_3:\n    cmd: [" + server + "]\n", "models.yaml:2: models.Llama_3: ", "not a valid id"},
		{"duplicate model", "models:\n  llama:\n    cmd: [" + server + "]\n  llama:\n    cmd: [" + server + "]\n", "models.yaml:4: models.llama: ", "given twice (first on line 2)"},
		{"unknown key", "models:\n  llama:\n    cmd: [" + server + "]\n    helth: /h\n", "models.yaml:4: models.llama.helth: ", "unknown key"},
		{"bad duration", "models:\n  llama:\n    cmd: [" + server + "]\n    load_timeout: soon\n", "models.yaml:4: models.llama.load_timeout: ", "not a duration"},
		{"duration without unit", "models:\n  llama:\n    cmd: [" + server + "]\n    grace: 10\n", "models.yaml:4: models.llama.grace: ", "no unit"},
		{"grace too long", "models:\n  llama:\n    cmd: [" + server + "]\n    grace: 1h\n", "models.yaml:4: models.llama.grace: ", "out of range"},
		{"negative unhealthy", "models:\n  llama:\n    cmd: [" + server + "]\n    unhealthy_timeout: -1s\n", "models.yaml:4: models.llama.unhealthy_timeout: ", "out of range"},
		{"zero load timeout", "models:\n  llama:\n    cmd: [" + server + "]\n    load_timeout: 0s\n", "models.yaml:4: models.llama.load_timeout: ", "out of range"},
		{"bad concurrency", "models:\n  llama:\n    cmd: [" + server + "]\n    concurrency: -2\n", "models.yaml:4: models.llama.concurrency: ", "whole number"},
		{"bad health", "models:\n  llama:\n    cmd: [" + server + "]\n    health: health\n", "models.yaml:4: models.llama.health: ", "HTTP path"},
		{"bad device", "models:\n  llama:\n    cmd: [" + server + "]\n    devices: [gpu0]\n", "models.yaml:4: models.llama.devices[0]: ", "cuda:N"},
		{"devices a string", "models:\n  llama:\n    cmd: [" + server + "]\n    devices: cuda:0\n", "models.yaml:4: models.llama.devices: ", "want a list"},
		{"reserved env", "models:\n  llama:\n    cmd: [" + server + "]\n    env: {RBEE_WORKER_ID: x}\n", "models.yaml:4: models.llama.env.RBEE_WORKER_ID: ", "worker contract"},
		{"bad env name", "models:\n  llama:\n    cmd: [" + server + "]\n    env: {\"A-B\": x}\n", "models.yaml:4: models.llama.env.A-B: ", "not an environment variable name"},
		{"env value a list", "models:\n  llama:\n    cmd: [" + server + "]\n    env: {A: [1]}\n", "models.yaml:4: models.llama.env.A: ", "want a value"},
		{"two documents", "models:\n  llama:\n    cmd: [" + server + "]\n---\nmodels: {}\n", "models.yaml:4: ", "more than one YAML document"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("models.yaml", []byte(tc.text))
			if err == nil {
				t.Fatalf("accepted:\n%s", tc.text)
			}
			if !strings.HasPrefix(err.Error(), tc.want) || !strings.Contains(err.Error(), tc.also) {
				t.Fatalf("error %q\nwant it to start with %q and hold %q", err, tc.want, tc.also)
			}
		})
	}
}

func TestLoadMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "nope.yaml"))
	if err == nil || !strings.Contains(err.Error(), "nope.yaml") {
		t.Fatalf("Load of a missing file: %v", err)
	}
}
