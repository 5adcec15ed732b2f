package server

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	rbeev1 "github.com/rbee-dev/rbee/gen/rbee/v1"
	"github.com/rbee-dev/rbee/hive/catalog"
)

// A catalog model is started as worker-shim with the catalog's timeouts and the server's command
// line, its placeholders filled in once the port is known, and the device's visibility variable.
func TestSpawnCatalogModel(t *testing.T) {
	server := filepath.Join(t.TempDir(), "llama-server")
	if err := os.WriteFile(server, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	c, err := catalog.Parse("models.yaml", []byte(`models:
  llama:
    cmd: ["`+server+`", "--host", "${HOST}", "--port", "${PORT}", "--gpu", "${DEVICE_INDEX}"]
    env: {TAG: "${WORKER_ID}"}
    load_timeout: 2m
    concurrency: 4
    devices: ["cuda:0", "cuda:1"]
`))
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeProcs{}
	h := New(Config{HiveID: "h", Queen: "127.0.0.1:7833", Grace: 2 * time.Second, Catalog: c, Shim: "/opt/rbee/worker-shim",
		WorkerHost: "10.0.0.5"}, f)
	if _, err := h.Spawn(t.Context(), &rbeev1.SpawnRequest{WorkerId: "w1", Model: "llama", Device: "cuda:1"}); err != nil {
		t.Fatal(err)
	}
	s := f.spawned[0]
	if s.Binary != "/opt/rbee/worker-shim" || !s.OwnPort || s.Extra == nil {
		t.Fatalf("spec %+v: want worker-shim, binding its own port", s)
	}
	args, env := s.Extra(9123)
	want := []string{"--health", "/health", "--load-timeout", "2m0s", "--unhealthy-timeout", "30s", "--grace", "2s",
		"--concurrency", "4", "--", server, "--host", "10.0.0.5", "--port", "9123", "--gpu", "1"}
	if !slices.Equal(args, want) {
		t.Fatalf("args %q\nwant %q", args, want)
	}
	// The device's variable comes with every worker's environment, the catalog's env after it.
	if !slices.Contains(s.Env, "CUDA_VISIBLE_DEVICES=1") || !slices.Equal(env, []string{"TAG=w1"}) {
		t.Errorf("worker env %q and catalog env %q: want CUDA_VISIBLE_DEVICES=1, then TAG=w1", s.Env, env)
	}

	for _, tc := range []struct{ model, device, want string }{
		{"other", "cpu", `model "other" is not in hive h's catalog (models.yaml offers: llama)`},
		{"llama", "cpu", `model "llama" may not run on cpu on hive h (catalog devices: cuda:0, cuda:1)`},
	} {
		_, err := h.Spawn(t.Context(), &rbeev1.SpawnRequest{WorkerId: "w2", Model: tc.model, Device: tc.device})
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Spawn(%s on %s) = %v, want FAILED_PRECONDITION %q", tc.model, tc.device, err, tc.want)
		}
	}
	if len(f.spawned) != 1 {
		t.Fatalf("refused spawns reached the process core: %d", len(f.spawned))
	}
}
