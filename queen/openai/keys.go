package openai

import (
	"bufio"
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
)

// Keys holds the API keys inference clients present, loaded from a file (one key per line; blank
// lines and lines starting with # are skipped) and reloadable. Only their SHA-256 digests are
// kept, compared in constant time, and never logged.
type Keys struct {
	path    string
	digests atomic.Pointer[[][sha256.Size]byte]
}

// LoadKeys reads the keys file; a file with no key is an error, since it would lock every client out.
func LoadKeys(path string) (*Keys, error) {
	k := &Keys{path: path}
	if _, err := k.Reload(); err != nil {
		return nil, err
	}
	return k, nil
}

// Reload reads the file again and, if it is valid, replaces the keys; on error the old keys stay.
// It returns how many keys are now in force.
func (k *Keys) Reload() (int, error) {
	f, err := os.Open(k.path)
	if err != nil {
		return 0, fmt.Errorf("--api-keys-file: %w", err)
	}
	defer f.Close()
	var ds [][sha256.Size]byte
	sc := bufio.NewScanner(f)
	for line := 1; sc.Scan(); line++ {
		key := strings.TrimSpace(sc.Text())
		if key == "" || strings.HasPrefix(key, "#") {
			continue
		}
		if len(key) < 16 || strings.ContainsAny(key, " \t") {
			return 0, fmt.Errorf("--api-keys-file %s line %d: a key must be at least 16 characters without spaces", k.path, line)
		}
		ds = append(ds, sha256.Sum256([]byte(key)))
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("--api-keys-file %s: %w", k.path, err)
	}
	if len(ds) == 0 {
		return 0, fmt.Errorf("--api-keys-file %s holds no key", k.path)
	}
	k.digests.Store(&ds)
	return len(ds), nil
}

// Check reports whether an Authorization header value carries a valid key. Every key is compared,
// each in constant time, so the time taken tells nothing of which key came close.
func (k *Keys) Check(authorization string) bool {
	tok, ok := strings.CutPrefix(authorization, "Bearer ")
	if !ok {
		return false
	}
	d := sha256.Sum256([]byte(strings.TrimSpace(tok)))
	match := 0
	for _, want := range *k.digests.Load() {
		match |= subtle.ConstantTimeCompare(d[:], want[:])
	}
	return match == 1
}
