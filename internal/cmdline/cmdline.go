// Package cmdline parses the flags of rbee's daemons the same way: --help (exit 0), --version,
// usage errors and stray arguments (exit 2 with a message).
package cmdline

import (
	"errors"
	"flag"
	"fmt"
	"os"

	"github.com/rbee-dev/rbee/internal/version"
)

// Parse adds --version to fs and parses args. When the program must stop here (help, version, a
// usage error) it returns done and the exit code.
func Parse(fs *flag.FlagSet, program, summary string, args []string) (code int, done bool) {
	showVersion := fs.Bool("version", false, "print the version and exit")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: %s [flags]\n\n%s\n\nFlags:\n", program, summary)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0, true
		}
		return 2, true
	}
	if *showVersion {
		fmt.Println(version.String(program))
		return 0, true
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "%s: unexpected argument %q\n", program, fs.Arg(0))
		return 2, true
	}
	return 0, false
}
