// Package catalog reads the hive's model catalog (hive --models): which models this machine serves
// and how each is started — an argument list (no shell), extra environment, its health path and
// its time bounds. It checks the whole file up front, naming the line and the field of every
// mistake, and expands the placeholders a spawn fills in. No gRPC types live here.
package catalog

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/rbee-dev/rbee/internal/validate"
)

// Defaults for keys a model leaves out.
const (
	DefaultHealth           = "/health"
	DefaultLoadTimeout      = 10 * time.Minute
	DefaultUnhealthyTimeout = 30 * time.Second
)

// Bounds on the durations a catalog may give.
const (
	maxLoadTimeout = 24 * time.Hour
	maxTTL         = 365 * 24 * time.Hour
)

// Placeholders a spawn fills in, in cmd and in env values.
const (
	PlaceholderPort        = "PORT"
	PlaceholderModel       = "MODEL"
	PlaceholderWorkerID    = "WORKER_ID"
	PlaceholderDevice      = "DEVICE"
	PlaceholderDeviceIndex = "DEVICE_INDEX"
	PlaceholderHost        = "HOST"
)

var placeholders = []string{PlaceholderPort, PlaceholderModel, PlaceholderWorkerID, PlaceholderDevice, PlaceholderDeviceIndex, PlaceholderHost}

// Environment names that belong to the worker contract and the hive; a catalog cannot set them.
var reservedEnv = []string{"RBEE_WORKER_ID", "RBEE_HIVE_ID", "RBEE_JOB_ID", "RBEE_TOKEN", "RBEE_WORKER_TOKEN",
	"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"}

// Model is one catalog entry, checked, with its placeholders not yet filled in.
type Model struct {
	Name             string
	Cmd              []string          // cmd[0] is an absolute path to an executable
	Env              map[string]string // extra environment for the server
	Health           string            // GET path; 200 means ready
	LoadTimeout      time.Duration     // STARTING longer than this: stopped
	UnhealthyTimeout time.Duration     // READY but failing health longer than this: stopped
	Grace            time.Duration     // 0: the hive's --grace
	Concurrency      uint32            // 0: not limited
	TTL              time.Duration     // 0: never stopped for idleness
	Devices          []string          // empty: any device the hive has
	Line             int               // where the entry starts in the file
}

// Catalog is a checked model catalog.
type Catalog struct {
	Path   string
	models map[string]*Model
	names  []string // sorted
}

// Error is one mistake in a catalog file, with where it is.
type Error struct {
	Path  string
	Line  int
	Field string // e.g. models.llama.cmd[0]; "" for the file as a whole
	Msg   string
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.Path)
	if e.Line > 0 {
		b.WriteString(":" + strconv.Itoa(e.Line))
	}
	b.WriteString(": ")
	if e.Field != "" {
		b.WriteString(e.Field + ": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// Load reads and checks the catalog at path.
func Load(path string) (*Catalog, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("model catalog: %w", err)
	}
	return Parse(path, data)
}

// Parse checks a catalog's text; path only names it in errors.
func Parse(path string, data []byte) (*Catalog, error) {
	p := parser{path: path}
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, &Error{Path: path, Msg: "empty file: want a 'models:' mapping"}
		}
		return nil, &Error{Path: path, Line: yamlErrLine(err), Msg: "not valid YAML: " + yamlErrMsg(err)}
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err == nil {
		return nil, &Error{Path: path, Line: extra.Line, Msg: "more than one YAML document; a catalog is one"}
	}
	root := &doc
	if root.Kind == yaml.DocumentNode && len(root.Content) == 1 {
		root = root.Content[0]
	}
	c := &Catalog{Path: path, models: map[string]*Model{}}
	if err := p.file(root, c); err != nil {
		return nil, err
	}
	for n := range c.models {
		c.names = append(c.names, n)
	}
	slices.Sort(c.names)
	return c, nil
}

// Lookup returns the entry for a model name.
func (c *Catalog) Lookup(name string) (*Model, bool) {
	if c == nil {
		return nil, false
	}
	m, ok := c.models[name]
	return m, ok
}

// Names returns the model names, sorted.
func (c *Catalog) Names() []string {
	if c == nil {
		return nil
	}
	return slices.Clone(c.names)
}

// Models returns the entries, sorted by name.
func (c *Catalog) Models() []*Model {
	if c == nil {
		return nil
	}
	out := make([]*Model, 0, len(c.names))
	for _, n := range c.names {
		out = append(out, c.models[n])
	}
	return out
}

// Vars are what a spawn fills the placeholders with.
type Vars struct {
	Port                                 int
	Model, WorkerID, Device, DeviceIndex string
	Host                                 string // the host the server binds; "" means 127.0.0.1
}

func (v Vars) value(name string) string {
	switch name {
	case PlaceholderPort:
		return strconv.Itoa(v.Port)
	case PlaceholderModel:
		return v.Model
	case PlaceholderWorkerID:
		return v.WorkerID
	case PlaceholderDevice:
		return v.Device
	case PlaceholderDeviceIndex:
		return v.DeviceIndex
	case PlaceholderHost:
		if v.Host == "" {
			return "127.0.0.1"
		}
		return v.Host
	}
	panic("catalog: unchecked placeholder " + name) // Parse refused it
}

// Command returns the server's argument list with the placeholders filled in.
func (m *Model) Command(v Vars) []string {
	out := make([]string, len(m.Cmd))
	for i, a := range m.Cmd {
		out[i] = expand(a, v)
	}
	return out
}

// Environ returns the model's extra environment as sorted KEY=VALUE with the placeholders filled in.
func (m *Model) Environ(v Vars) []string {
	out := make([]string, 0, len(m.Env))
	for k, val := range m.Env {
		out = append(out, k+"="+expand(val, v))
	}
	slices.Sort(out)
	return out
}

// AllowsDevice says whether the model may run on device.
func (m *Model) AllowsDevice(device string) bool {
	return len(m.Devices) == 0 || slices.Contains(m.Devices, device)
}

// expand fills in ${NAME}; "$$" is a literal "$". Parse has checked every placeholder.
func expand(s string, v Vars) string {
	if !strings.Contains(s, "$") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch {
		case s[i] == '$' && i+1 < len(s) && s[i+1] == '$':
			b.WriteByte('$')
			i++
		case s[i] == '$' && i+1 < len(s) && s[i+1] == '{':
			end := strings.IndexByte(s[i:], '}')
			b.WriteString(v.value(s[i+2 : i+end]))
			i += end
		default:
			b.WriteByte(s[i])
		}
	}
	return b.String()
}

// checkPlaceholders refuses an unknown or unterminated ${...}.
func checkPlaceholders(s string) error {
	for i := 0; i < len(s); i++ {
		if s[i] != '$' || i+1 >= len(s) {
			continue
		}
		switch s[i+1] {
		case '$':
			i++
		case '{':
			end := strings.IndexByte(s[i:], '}')
			if end < 0 {
				return fmt.Errorf("unterminated placeholder in %q (write $$ for a literal $)", s)
			}
			name := s[i+2 : i+end]
			if !slices.Contains(placeholders, name) {
				return fmt.Errorf("unknown placeholder ${%s} in %q; known: ${%s}", name, s, strings.Join(placeholders, "}, ${"))
			}
			i += end
		}
	}
	return nil
}

type parser struct{ path string }

func (p *parser) fail(n *yaml.Node, field, format string, args ...any) error {
	line := 0
	if n != nil {
		line = n.Line
	}
	return &Error{Path: p.path, Line: line, Field: field, Msg: fmt.Sprintf(format, args...)}
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		if n.Tag == "!!null" {
			return "nothing"
		}
		return "the scalar " + strconv.Quote(n.Value)
	case yaml.AliasNode:
		return "an alias"
	}
	return "an empty document"
}

// pairs walks a mapping node, refusing duplicate keys and keys outside allowed (nil: any key).
func (p *parser) pairs(n *yaml.Node, field string, allowed []string, each func(key, val *yaml.Node) error) error {
	if n.Kind != yaml.MappingNode {
		return p.fail(n, field, "want a mapping, got %s", kindName(n))
	}
	seen := map[string]int{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if k.Kind != yaml.ScalarNode {
			return p.fail(k, field, "keys must be plain strings")
		}
		if first, dup := seen[k.Value]; dup {
			return p.fail(k, join(field, k.Value), "given twice (first on line %d)", first)
		}
		seen[k.Value] = k.Line
		if allowed != nil && !slices.Contains(allowed, k.Value) {
			return p.fail(k, join(field, k.Value), "unknown key; known keys: %s", strings.Join(allowed, ", "))
		}
		if err := each(k, v); err != nil {
			return err
		}
	}
	return nil
}

func join(field, key string) string {
	if field == "" {
		return key
	}
	return field + "." + key
}

var modelKeys = []string{"cmd", "env", "health", "load_timeout", "unhealthy_timeout", "grace", "concurrency", "ttl", "devices"}

func (p *parser) file(root *yaml.Node, c *Catalog) error {
	if root.Kind == 0 || (root.Kind == yaml.ScalarNode && root.Tag == "!!null") {
		return p.fail(root, "", "empty file: want a 'models:' mapping")
	}
	var models *yaml.Node
	if err := p.pairs(root, "", []string{"models"}, func(_, v *yaml.Node) error { models = v; return nil }); err != nil {
		return err
	}
	if models == nil {
		return p.fail(root, "models", "required: the mapping of model names to how each is served")
	}
	if models.Kind == yaml.MappingNode && len(models.Content) == 0 || models.Kind == yaml.ScalarNode && models.Tag == "!!null" {
		return p.fail(models, "models", "no models: a hive with a catalog offers only what it lists (leave --models out to serve any model with --worker-binary)")
	}
	return p.pairs(models, "models", nil, func(k, v *yaml.Node) error {
		field := "models." + k.Value
		if err := validate.ID("model name", k.Value); err != nil {
			return p.fail(k, field, "model name %q is not a valid id: %s", k.Value, err.(*validate.Error).Rule)
		}
		m, err := p.model(k.Value, field, v)
		if err != nil {
			return err
		}
		m.Line = k.Line
		c.models[m.Name] = m
		return nil
	})
}

func (p *parser) model(name, field string, n *yaml.Node) (*Model, error) {
	m := &Model{Name: name, Health: DefaultHealth, LoadTimeout: DefaultLoadTimeout, UnhealthyTimeout: DefaultUnhealthyTimeout}
	var cmdNode *yaml.Node
	err := p.pairs(n, field, modelKeys, func(k, v *yaml.Node) error {
		f := field + "." + k.Value
		var err error
		switch k.Value {
		case "cmd":
			cmdNode = v
			m.Cmd, err = p.cmd(f, v)
		case "env":
			m.Env, err = p.env(f, v)
		case "health":
			m.Health, err = p.health(f, v)
		case "load_timeout":
			m.LoadTimeout, err = p.duration(f, v, time.Millisecond, maxLoadTimeout, false)
		case "unhealthy_timeout":
			m.UnhealthyTimeout, err = p.duration(f, v, time.Millisecond, maxLoadTimeout, false)
		case "grace":
			m.Grace, err = p.duration(f, v, 0, validate.MaxGrace, true)
		case "ttl":
			m.TTL, err = p.duration(f, v, 0, maxTTL, true)
		case "concurrency":
			m.Concurrency, err = p.concurrency(f, v)
		case "devices":
			m.Devices, err = p.devices(f, v)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	if cmdNode == nil {
		return nil, p.fail(n, field+".cmd", "required: the server's command line as a list, e.g. [\"/usr/bin/llama-server\", \"--port\", \"${PORT}\"]")
	}
	return m, nil
}

func (p *parser) scalar(field string, n *yaml.Node) (string, error) {
	if n.Kind != yaml.ScalarNode || n.Tag == "!!null" {
		return "", p.fail(n, field, "want a value, got %s", kindName(n))
	}
	return n.Value, nil
}

func (p *parser) cmd(field string, n *yaml.Node) ([]string, error) {
	if n.Kind == yaml.ScalarNode && n.Tag != "!!null" {
		return nil, p.fail(n, field, "want a list of arguments (no shell is involved), got the string %q; write [\"/path/to/server\", \"--flag\", ...]", n.Value)
	}
	if n.Kind != yaml.SequenceNode {
		return nil, p.fail(n, field, "want a list of arguments, got %s", kindName(n))
	}
	if len(n.Content) == 0 {
		return nil, p.fail(n, field, "empty: want at least the server's executable")
	}
	out := make([]string, 0, len(n.Content))
	for i, a := range n.Content {
		f := field + "[" + strconv.Itoa(i) + "]"
		s, err := p.scalar(f, a)
		if err != nil {
			return nil, err
		}
		if strings.IndexByte(s, 0) >= 0 {
			return nil, p.fail(a, f, "contains a NUL byte")
		}
		if err := checkPlaceholders(s); err != nil {
			return nil, p.fail(a, f, "%v", err)
		}
		out = append(out, s)
	}
	if err := checkExecutable(out[0]); err != nil {
		return nil, p.fail(n.Content[0], field+"[0]", "%v", err)
	}
	return out, nil
}

// checkExecutable wants an absolute path to an executable regular file: the hive runs no shell and
// searches no PATH, so what the file names is what runs.
func checkExecutable(path string) error {
	if strings.Contains(path, "$") {
		return fmt.Errorf("%q: the executable cannot contain placeholders", path)
	}
	if !filepath.IsAbs(path) {
		return fmt.Errorf("%q is not an absolute path (no PATH search: name the executable in full)", path)
	}
	fi, err := os.Stat(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%s does not exist", path)
		}
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", path)
	}
	if err := executable(path); err != nil {
		return fmt.Errorf("%s is not executable: %w", path, err)
	}
	return nil
}

func (p *parser) env(field string, n *yaml.Node) (map[string]string, error) {
	out := map[string]string{}
	err := p.pairs(n, field, nil, func(k, v *yaml.Node) error {
		f := field + "." + k.Value
		if !envName(k.Value) {
			return p.fail(k, f, "%q is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)", k.Value)
		}
		if slices.Contains(reservedEnv, k.Value) || strings.HasPrefix(k.Value, "RBEE_TLS_") {
			return p.fail(k, f, "%s belongs to the worker contract and is set by the hive", k.Value)
		}
		s, err := p.scalar(f, v)
		if err != nil {
			return err
		}
		if strings.IndexByte(s, 0) >= 0 {
			return p.fail(v, f, "contains a NUL byte")
		}
		if err := checkPlaceholders(s); err != nil {
			return p.fail(v, f, "%v", err)
		}
		out[k.Value] = s
		return nil
	})
	return out, err
}

func envName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c == '_' || c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || i > 0 && c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

func (p *parser) health(field string, n *yaml.Node) (string, error) {
	s, err := p.scalar(field, n)
	if err != nil {
		return "", err
	}
	if !strings.HasPrefix(s, "/") || strings.ContainsAny(s, " \t\r\n#") {
		return "", p.fail(n, field, "%q: want an HTTP path such as /health", s)
	}
	return s, nil
}

func (p *parser) duration(field string, n *yaml.Node, lo, hi time.Duration, zeroOK bool) (time.Duration, error) {
	s, err := p.scalar(field, n)
	if err != nil {
		return 0, err
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		if _, nerr := strconv.Atoi(s); nerr == nil {
			return 0, p.fail(n, field, "%q has no unit: write e.g. %ss or %sm", s, s, s)
		}
		return 0, p.fail(n, field, "%q is not a duration (e.g. 30s, 10m)", s)
	}
	if d == 0 && zeroOK {
		return 0, nil
	}
	if d < lo || d > hi {
		return 0, p.fail(n, field, "%v out of range: want %v to %v", d, lo, hi)
	}
	return d, nil
}

func (p *parser) concurrency(field string, n *yaml.Node) (uint32, error) {
	s, err := p.scalar(field, n)
	if err != nil {
		return 0, err
	}
	v, err := strconv.ParseUint(s, 10, 32)
	if err != nil || v > 1<<16 {
		return 0, p.fail(n, field, "%q: want a whole number from 0 (not limited) to 65536", s)
	}
	return uint32(v), nil
}

func (p *parser) devices(field string, n *yaml.Node) ([]string, error) {
	if n.Kind != yaml.SequenceNode {
		return nil, p.fail(n, field, "want a list of devices such as [\"cuda:0\"], got %s", kindName(n))
	}
	var out []string
	for i, d := range n.Content {
		f := field + "[" + strconv.Itoa(i) + "]"
		s, err := p.scalar(f, d)
		if err != nil {
			return nil, err
		}
		if err := validate.Device(f, s); err != nil {
			return nil, p.fail(d, f, "%s", err.(*validate.Error).Rule)
		}
		if slices.Contains(out, s) {
			return nil, p.fail(d, f, "%s listed twice", s)
		}
		out = append(out, s)
	}
	return out, nil
}

// yamlErrLine digs the line out of a yaml.v3 syntax error ("yaml: line 3: ...").
func yamlErrLine(err error) int {
	s := err.Error()
	if i := strings.Index(s, "line "); i >= 0 {
		j := i + 5
		for j < len(s) && s[j] >= '0' && s[j] <= '9' {
			j++
		}
		n, _ := strconv.Atoi(s[i+5 : j])
		return n
	}
	return 0
}

func yamlErrMsg(err error) string {
	s := strings.TrimPrefix(err.Error(), "yaml: ")
	if i := strings.Index(s, "line "); i == 0 {
		if j := strings.Index(s, ": "); j >= 0 {
			return s[j+2:]
		}
	}
	return s
}
