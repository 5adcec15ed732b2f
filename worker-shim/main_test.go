package main

import (
	"io"
	"strings"
	"testing"

	"github.com/rbee-dev/rbee/worker/contract"
)

// Every bad command line is refused with the flag named, before anything is started.
func TestParseFlagsRefuses(t *testing.T) {
	t.Setenv(contract.EnvWorkerID, "w1")
	ok := []string{"--worker-id", "w1", "--hive-id", "h1", "--model", "m", "--port", "9100", "--queen", "127.0.0.1:7833"}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no command", ok, "no server command"},
		{"bad port", append(append([]string{}, ok...), "--port", "0", "--", "/bin/true"), "--port is required"},
		{"bad health", append(append([]string{}, ok...), "--health", "health", "--", "/bin/true"), "--health"},
		{"no hive", []string{"--worker-id", "w1", "--model", "m", "--port", "1", "--", "/bin/true"}, "--hive-id"},
		{"bad queen list", append(append([]string{}, ok...), "--queen", "127.0.0.1:7833,q2", "--", "/bin/true"), "--queen[1]"},
		{"marker mismatch", append([]string{"--worker-id", "w2", "--hive-id", "h1", "--model", "m", "--port", "1"}, "--", "/bin/true"), "does not match"},
		{"zero load timeout", append(append([]string{}, ok...), "--load-timeout", "0s", "--", "/bin/true"), "--load-timeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseFlags(tc.args, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("parseFlags(%q) = %v, want an error with %q", tc.args, err, tc.want)
			}
		})
	}
	c, err := parseFlags(append(append([]string{}, ok...), "--concurrency", "4", "--", "/usr/bin/llama-server", "--port", "9100"), io.Discard)
	if err != nil || len(c.cmd) != 3 || c.cmd[0] != "/usr/bin/llama-server" || c.concurrency != 4 {
		t.Fatalf("parseFlags = %+v, %v", c, err)
	}
	// The hive hands every worker all its queens (hive --queen A,B,C).
	c, err = parseFlags(append(append([]string{}, ok...), "--queen", "10.0.0.1:7833,10.0.0.2:7833", "--", "/bin/true"), io.Discard)
	if err != nil || c.Queen != "10.0.0.1:7833,10.0.0.2:7833" {
		t.Fatalf("several queens: %+v, %v", c, err)
	}
}
