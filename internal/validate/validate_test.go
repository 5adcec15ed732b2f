package validate

import (
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
)

func TestID(t *testing.T) {
	ok := []string{"a", "w-1", "0", "worker-123", strings.Repeat("a", 63)}
	bad := []string{"", "-a", "a-", "A", "a_b", "a.b", "a b", strings.Repeat("a", 64), "ünï", "a\n"}
	for _, v := range ok {
		if err := ID("worker_id", v); err != nil {
			t.Errorf("ID(%q) = %v, want ok", v, err)
		}
	}
	for _, v := range bad {
		err := ID("worker_id", v)
		var ve *Error
		if !errors.As(err, &ve) || ve.Field != "worker_id" {
			t.Errorf("ID(%q) = %v, want an error naming worker_id", v, err)
		}
	}
}

func TestModel(t *testing.T) {
	for _, v := range []string{"llama-3-8b", "meta-llama/Llama-3-8B-Instruct", "モデル", strings.Repeat("m", 256)} {
		if err := Model("model", v); err != nil {
			t.Errorf("Model(%q) = %v", v, err)
		}
	}
	for _, v := range []string{"", strings.Repeat("m", 257), "a\x00b", "a\nb", "a\tb", "\x1b[31m", string([]byte{0xff})} {
		if err := Model("model", v); err == nil {
			t.Errorf("Model(%q) accepted", v)
		}
	}
}

func TestDevice(t *testing.T) {
	for _, v := range []string{"cpu", "cuda:0", "rocm:3", "metal:0", "vulkan:12"} {
		if err := Device("device", v); err != nil {
			t.Errorf("Device(%q) = %v", v, err)
		}
	}
	for _, v := range []string{"", "gpu", "cuda", "cuda:", "cuda:-1", "cuda:01", "cuda:x", "CPU", "cuda:1024", "tpu:0", "cuda:0:1"} {
		if err := Device("device", v); err == nil {
			t.Errorf("Device(%q) accepted", v)
		}
	}
}

func TestGrace(t *testing.T) {
	if _, set, err := Grace("grace_period", nil); set || err != nil {
		t.Fatalf("unset grace: set=%v err=%v", set, err)
	}
	for _, d := range []time.Duration{0, time.Millisecond, 5 * time.Minute} {
		if g, set, err := Grace("grace_period", durationpb.New(d)); err != nil || !set || g != d {
			t.Errorf("Grace(%v) = %v %v %v", d, g, set, err)
		}
	}
	for _, d := range []*durationpb.Duration{durationpb.New(-time.Nanosecond), durationpb.New(5*time.Minute + 1), {Seconds: 1, Nanos: -1}} {
		if _, _, err := Grace("grace_period", d); err == nil || !strings.HasPrefix(err.Error(), "grace_period: ") {
			t.Errorf("Grace(%v) = %v, want an error naming grace_period", d, err)
		}
	}
}

func TestPIDPortAddress(t *testing.T) {
	for _, p := range []int32{-1, 0, 1} {
		if PID("pid", p) == nil {
			t.Errorf("PID(%d) accepted", p)
		}
	}
	if PID("pid", 2) != nil {
		t.Error("PID(2) refused")
	}
	for _, p := range []uint32{0, 65536} {
		if Port("port", p) == nil {
			t.Errorf("Port(%d) accepted", p)
		}
	}
	for _, a := range []string{"127.0.0.1:7833", "[::1]:1", "queen.example:65535"} {
		if err := Address("addr", a); err != nil {
			t.Errorf("Address(%q) = %v", a, err)
		}
	}
	for _, a := range []string{"", "127.0.0.1", ":7833", "h:0", "h:65536", "h:x"} {
		if Address("addr", a) == nil {
			t.Errorf("Address(%q) accepted", a)
		}
	}
	for _, a := range []string{"127.0.0.1:0", ":7833"} {
		if err := ListenAddress("listen", a); err != nil {
			t.Errorf("ListenAddress(%q) = %v", a, err)
		}
	}
}

// FuzzRequestFields checks that no input panics a rule, that accepted ids are safe in file and
// cgroup names, and that accepted models hold no control characters.
func FuzzRequestFields(f *testing.F) {
	for _, s := range []string{"w-1", "", "-", "a\x00", "cuda:0", "cuda:99999999999999999999", "h:1", "[::1]:80", "llama/3 8b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if ID("id", s) == nil && (strings.ContainsAny(s, "/.\x00 ") || s == "" || len(s) > 63) {
			t.Fatalf("ID accepted %q", s)
		}
		if Model("model", s) == nil && strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
			t.Fatalf("Model accepted control characters in %q", s)
		}
		_ = Device("device", s)
		_ = Address("addr", s)
		_ = ListenAddress("listen", s)
	})
}

func TestHost(t *testing.T) {
	for _, ok := range []string{"127.0.0.2", "10.0.0.5", "::1", "fe80::1", "gpu-node-1", "gpu-node-1.example.com", "a_b.local."} {
		if err := Host("h", ok); err != nil {
			t.Errorf("Host(%q) = %v, want ok", ok, err)
		}
	}
	for _, bad := range []string{"", "10.0.0.5:9100", "[::1]", "a b", "host/x", "a..b", strings.Repeat("a", 64) + ".b", "-x;rm"} {
		if err := Host("h", bad); err == nil {
			t.Errorf("Host(%q) = nil, want an error", bad)
		}
	}
}

func TestAddresses(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
	}{
		{"127.0.0.1:7833", []string{"127.0.0.1:7833"}},
		{"a:1,b:2, c:3", []string{"a:1", "b:2", "c:3"}},
		{"", nil},
		{"a:1,,b:2", nil},
		{"a:1,a:1", nil},
		{"a:1,nowhere", nil},
		{"a:1,b:0", nil},
	} {
		got, err := Addresses("--queen", tc.in)
		if (err == nil) != (tc.want != nil) || !slices.Equal(got, tc.want) {
			t.Errorf("Addresses(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
		}
		if err != nil && !strings.Contains(err.Error(), "--queen") {
			t.Errorf("Addresses(%q): error %q does not name the flag", tc.in, err)
		}
	}
}
