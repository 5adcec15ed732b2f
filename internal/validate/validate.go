// Package validate holds the rules for every field a caller can send to the queen or the hive, so
// both edges refuse the same things with the same words. Each failure names the field and the rule.
package validate

import (
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"google.golang.org/protobuf/types/known/durationpb"
)

// Error is a field that breaks a rule.
type Error struct {
	Field string
	Rule  string
}

func (e *Error) Error() string { return e.Field + ": " + e.Rule }

func fail(field, format string, args ...any) error {
	return &Error{Field: field, Rule: fmt.Sprintf(format, args...)}
}

// MaxGrace is the longest grace period a delete may ask for.
const MaxGrace = 5 * time.Minute

// ID checks a worker or hive id: 1 to 63 characters of [a-z0-9-], starting and ending with a
// letter or digit (a DNS label, so ids are safe in file names, cgroup names and URLs).
func ID(field, v string) error {
	if v == "" {
		return fail(field, "required")
	}
	if len(v) > 63 {
		return fail(field, "%d characters, at most 63 allowed", len(v))
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		alnum := c >= 'a' && c <= 'z' || c >= '0' && c <= '9'
		if !alnum && (c != '-' || i == 0 || i == len(v)-1) {
			return fail(field, "%q must be lower-case letters, digits and inner '-' ([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)", v)
		}
	}
	return nil
}

// Model checks a model name: required, at most 256 printable characters.
func Model(field, v string) error {
	if v == "" {
		return fail(field, "required")
	}
	if !utf8.ValidString(v) {
		return fail(field, "not valid UTF-8")
	}
	if n := utf8.RuneCountInString(v); n > 256 {
		return fail(field, "%d characters, at most 256 allowed", n)
	}
	for _, r := range v {
		if !unicode.IsPrint(r) {
			return fail(field, "contains the non-printable character %U", r)
		}
	}
	return nil
}

// Device checks a device: "cpu", or cuda:N, rocm:N, metal:N, vulkan:N with N a number 0-1023.
func Device(field, v string) error {
	if v == "cpu" {
		return nil
	}
	kind, n, ok := strings.Cut(v, ":")
	switch kind {
	case "cuda", "rocm", "metal", "vulkan":
	default:
		ok = false
	}
	if ok {
		i, err := strconv.Atoi(n)
		ok = err == nil && i >= 0 && i < 1024 && strconv.Itoa(i) == n
	}
	if !ok {
		return fail(field, "%q must be cpu, cuda:N, rocm:N, metal:N or vulkan:N", v)
	}
	return nil
}

// Grace checks an optional grace period: unset means the default (set false), else 0 to 5 minutes.
func Grace(field string, d *durationpb.Duration) (grace time.Duration, set bool, err error) {
	if d == nil {
		return 0, false, nil
	}
	if err := d.CheckValid(); err != nil {
		return 0, false, fail(field, "%v", err)
	}
	g := d.AsDuration()
	if g < 0 {
		return 0, false, fail(field, "%v is negative; want 0 to %v", g, MaxGrace)
	}
	if g > MaxGrace {
		return 0, false, fail(field, "%v is over the %v maximum", g, MaxGrace)
	}
	return g, true, nil
}

// PID checks a process id: greater than 1 (0 is "no process", 1 is init).
func PID(field string, v int32) error {
	if v <= 1 {
		return fail(field, "%d is not a worker's process id (must be > 1)", v)
	}
	return nil
}

// Port checks a TCP port: 1 to 65535.
func Port(field string, v uint32) error {
	if v == 0 || v > 65535 {
		return fail(field, "%d is not a port (1-65535)", v)
	}
	return nil
}

// Address checks host:port with a non-empty host and a port 1-65535.
func Address(field, v string) error {
	host, port, err := net.SplitHostPort(v)
	if err != nil || host == "" {
		return fail(field, "%q must be HOST:PORT", v)
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 1 || p > 65535 {
		return fail(field, "%q has no port 1-65535", v)
	}
	return nil
}

// Host checks a host without a port: an IP address, or a DNS name (letters, digits, '-' and '_'
// in dot-separated labels of 1 to 63, at most 253 in all).
func Host(field, v string) error {
	if net.ParseIP(v) != nil {
		return nil
	}
	if v == "" || len(v) > 253 {
		return fail(field, "%q must be an IP address or a host name of 1 to 253 characters", v)
	}
	for _, label := range strings.Split(strings.TrimSuffix(v, "."), ".") {
		if label == "" || len(label) > 63 {
			return fail(field, "%q must be an IP address or a host name (a label is empty or longer than 63)", v)
		}
		for _, c := range label {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return fail(field, "%q must be an IP address or a host name, without a port", v)
			}
		}
	}
	return nil
}

// ListenAddress checks an address to listen on: [HOST]:PORT with a port 0-65535 (0: any free port).
func ListenAddress(field, v string) error {
	_, port, err := net.SplitHostPort(v)
	if err != nil {
		return fail(field, "%q must be HOST:PORT", v)
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 0 || p > 65535 {
		return fail(field, "%q has no port 0-65535", v)
	}
	return nil
}

// DeviceOrCPU checks an optional device and returns it, "cpu" when empty.
func DeviceOrCPU(field, v string) (string, error) {
	if v == "" {
		return "cpu", nil
	}
	return v, Device(field, v)
}

// Addresses checks a list of HOST:PORT addresses separated by commas (several queens: --queen
// A,B,C) and returns them; at least one, no empty entries, no duplicates.
func Addresses(field, v string) ([]string, error) {
	if strings.TrimSpace(v) == "" {
		return nil, fail(field, "is empty; want HOST:PORT or several, comma separated")
	}
	parts := strings.Split(v, ",")
	out := make([]string, 0, len(parts))
	for i, p := range parts {
		p = strings.TrimSpace(p)
		if err := Address(fmt.Sprintf("%s[%d]", field, i), p); err != nil {
			return nil, err
		}
		if slices.Contains(out, p) {
			return nil, fail(field, "%q given twice", p)
		}
		out = append(out, p)
	}
	return out, nil
}
