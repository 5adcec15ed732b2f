package main

import (
	"strings"
	"testing"
)

func TestServerEnvDropsShimOnly(t *testing.T) {
	got := serverEnv([]string{"PATH=/bin", "LISTEN_FDS=1", "LISTEN_PID=7", "LISTEN_FDNAMES=rbee", "RBEE_WORKER_TOKEN=secret",
		"RBEE_TOKEN=x", "RBEE_TLS_CA=/ca", "RBEE_WORKER_ID=w1", "CUDA_VISIBLE_DEVICES=1"})
	if strings.Join(got, " ") != "PATH=/bin RBEE_WORKER_ID=w1 CUDA_VISIBLE_DEVICES=1" {
		t.Fatalf("serverEnv = %q", got)
	}
}

func TestHealthURL(t *testing.T) {
	for host, want := range map[string]string{"": "http://127.0.0.1:9100/health", "0.0.0.0": "http://127.0.0.1:9100/health",
		"::": "http://[::1]:9100/health", "10.0.0.2": "http://10.0.0.2:9100/health"} {
		if got := healthURL(host, 9100, "/health"); got != want {
			t.Errorf("healthURL(%q) = %s, want %s", host, got, want)
		}
	}
}
