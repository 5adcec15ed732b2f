package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// readmeBlock returns the command lines between <!-- NAME:begin --> and <!-- NAME:end --> in the
// README, so the tests run exactly what a newcomer reads.
func readmeBlock(t *testing.T, name string) []string {
	t.Helper()
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	begin, end := "<!-- "+name+":begin -->", "<!-- "+name+":end -->"
	i, j := strings.Index(s, begin), strings.Index(s, end)
	if i < 0 || j < i {
		t.Fatalf("README.md has no %s block", name)
	}
	var cmds []string
	for _, line := range strings.Split(s[i+len(begin):j], "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "```") || strings.HasPrefix(line, "#") {
			continue
		}
		cmds = append(cmds, line)
	}
	return cmds
}

// TestREADMEWalkthrough runs the README's grpcurl walkthrough verbatim against a fresh queen and
// hive; only the queen's address (an ephemeral port here) differs from what the README shows.
func TestREADMEWalkthrough(t *testing.T) {
	_, addr := startQueen(t)
	hid := uniqueID("walk")
	cleanupWorkers(t, hid)
	startHive(t, addr, hid)
	cmds := readmeBlock(t, "walkthrough")
	if len(cmds) < 5 {
		t.Fatalf("walkthrough has %d commands", len(cmds))
	}
	// What each step must show a reader.
	want := map[string]string{
		"list":                      "rbee.v1.QueenService",
		"QueenService/SpawnWorker":  "WORKER_STATE_READY",
		"QueenService/ListWorkers":  `"workerId": "demo"`,
		"QueenService/GetWorker":    `"pid"`,
		"QueenService/ListHives":    hid,
		"QueenService/DeleteWorker": "DELETE_OUTCOME_EXITED",
	}
	for _, c := range cmds {
		c = strings.ReplaceAll(c, "127.0.0.1:7833", addr)
		cmd := exec.Command("bash", "-c", c)
		cmd.Env = append(os.Environ(), "PATH="+binDir+string(filepath.ListSeparator)+os.Getenv("PATH"))
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v\n%s", c, err, out)
		}
		for k, v := range want {
			if strings.HasSuffix(c, k) && !strings.Contains(string(out), v) {
				t.Errorf("%s: output lacks %q:\n%s", c, v, out)
			}
		}
	}
	noWorkersLeft(t, hid)
}
