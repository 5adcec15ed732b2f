package contract

import (
	"flag"
	"io"
	"os"
	"slices"
	"strings"
	"testing"
)

// parse registers the contract's flags on a fresh flag set, parses args and checks them.
func parse(t *testing.T, r Rules, args ...string) (Args, error) {
	t.Helper()
	var a Args
	fs := flag.NewFlagSet("worker", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	a.Register(fs, "port")
	if err := fs.Parse(args); err != nil {
		return a, err
	}
	return a, a.Check(r)
}

// unsetMarker unsets $RBEE_WORKER_ID for the test (restored after it).
func unsetMarker(t *testing.T) {
	t.Setenv(EnvWorkerID, "")
	os.Unsetenv(EnvWorkerID)
}

// full is a command line as the hive writes it.
var full = []string{"--worker-id", "w-1", "--hive-id", "h1", "--model", "llama-3-8b", "--device", "cuda:0",
	"--port", "9100", "--queen", "10.0.0.1:7833"}

func with(args ...string) []string { return append(slices.Clone(full), args...) }

func without(flag string) []string {
	i := slices.Index(full, flag)
	return slices.Delete(slices.Clone(full), i, i+2)
}

// Every bad command line is refused with an error that names the flag and what is wrong.
func TestCheckRefuses(t *testing.T) {
	unsetMarker(t)
	for _, tc := range []struct {
		name  string
		rules Rules
		args  []string
		env   string // RBEE_WORKER_ID; "" unset
		want  string
	}{
		{"missing worker id", Rules{}, without("--worker-id"), "", "--worker-id is required"},
		{"missing hive id", Rules{}, without("--hive-id"), "", "--hive-id is required"},
		{"missing model", Rules{}, without("--model"), "", "--model is required"},
		{"bad worker id", Rules{}, with("--worker-id", "W_1"), "", "--worker-id"},
		{"bad hive id", Rules{}, with("--hive-id", "-h"), "", "--hive-id"},
		{"model with a newline", Rules{}, with("--model", "a\nb"), "", "--model"},
		{"bad device", Rules{}, with("--device", "gpu"), "", "--device"},
		{"empty device", Rules{}, with("--device", ""), "", "--device"},
		{"port not a number", Rules{}, with("--port", "http"), "", "-port"},
		{"port too large", Rules{AnyPort: true}, with("--port", "65536"), "", "--port 65536"},
		{"negative port", Rules{AnyPort: true}, with("--port", "-1"), "", "--port -1"},
		{"port needed", Rules{}, without("--port"), "", "--port is required"},
		{"zero port", Rules{}, with("--port", "0"), "", "--port is required"},
		{"queen without port", Rules{}, with("--queen", "10.0.0.1"), "", "--queen"},
		{"queen list with an empty entry", Rules{}, with("--queen", "10.0.0.1:7833,,10.0.0.2:7833"), "", "--queen[1]"},
		{"queen list with a bad entry", Rules{}, with("--queen", "10.0.0.1:7833,10.0.0.2"), "", "--queen[1]"},
		{"queen given twice", Rules{}, with("--queen", "10.0.0.1:7833,10.0.0.1:7833"), "", "given twice"},
		{"empty queen", Rules{}, with("--queen", ""), "", "--queen"},
		{"marker of another worker", Rules{}, full, "w-2", `$RBEE_WORKER_ID="w-2" does not match --worker-id "w-1"`},
		{"marker set, no id", Rules{}, without("--worker-id"), "w-1", "--worker-id is required"},
		{"anonymous: given id still checked", Rules{Anonymous: true}, []string{"--worker-id", "W!"}, "", "--worker-id"},
		{"anonymous: given model still checked", Rules{Anonymous: true}, []string{"--model", "a\tb"}, "", "--model"},
		{"anonymous: marker of another worker", Rules{Anonymous: true, AnyPort: true}, []string{"--worker-id", "w-1"}, "w-2", "does not match"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.env != "" {
				t.Setenv(EnvWorkerID, tc.env)
			}
			_, err := parse(t, tc.rules, tc.args...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("%q with %+v: error %v, want one containing %q", tc.args, tc.rules, err, tc.want)
			}
		})
	}
}

// What the hive writes parses back to the same arguments, with several queens too; the defaults
// are the ones SPEC and README give.
func TestArgsParse(t *testing.T) {
	want := Args{WorkerID: "w-1", HiveID: "h1", Model: "llama-3-8b", Device: "cuda:0", Port: 9100,
		Queen: "10.0.0.1:7833,10.0.0.2:7833,[::1]:7833"}
	t.Setenv(EnvWorkerID, want.WorkerID)
	got, err := parse(t, Rules{}, want.Argv("worker")[1:]...)
	if err != nil || got != want {
		t.Fatalf("parsing %q: %+v, %v; want %+v", want.Argv("worker"), got, err, want)
	}

	unsetMarker(t)
	got, err = parse(t, Rules{AnyPort: true}, "--worker-id", "w-1", "--hive-id", "h1", "--model", "m")
	if err != nil || got.Device != "cpu" || got.Queen != "127.0.0.1:7833" || got.Port != 0 {
		t.Fatalf("defaults: %+v, %v; want device cpu, queen 127.0.0.1:7833, port 0 (any)", got, err)
	}
	if got, err = parse(t, Rules{Anonymous: true, AnyPort: true}); err != nil || got.WorkerID != "" {
		t.Fatalf("an anonymous worker without arguments: %+v, %v; want accepted", got, err)
	}
}

func TestReportedAddress(t *testing.T) {
	for host, want := range map[string]string{"": "", "0.0.0.0": "", "::": "", "10.0.0.7": "10.0.0.7", "node-7.lan": "node-7.lan", "::1": "::1"} {
		if got := ReportedAddress(host); got != want {
			t.Errorf("ReportedAddress(%q) = %q, want %q", host, got, want)
		}
	}
}
