// Package version tells which build of rbee is running: the module version and VCS revision.
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Revision may be set at link time (-ldflags "-X .../version.Revision=abc") where the build has no
// VCS stamp.
var Revision = ""

// Version returns the module version, "(devel)" for a build from a work tree.
func Version() string {
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		return bi.Main.Version
	}
	return "(devel)"
}

// String is the one line --version prints.
func String(program string) string {
	rev := Revision
	if bi, ok := debug.ReadBuildInfo(); ok && rev == "" {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				rev = s.Value
			}
		}
	}
	if rev == "" {
		rev = "unknown"
	}
	return fmt.Sprintf("%s %s (revision %s, %s %s/%s)", program, Version(), rev, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}
