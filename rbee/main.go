// Command rbee is the operators' command line: it spawns, lists, inspects, watches and removes
// workers, and shows hives and the queen's status, talking to the queen only.
package main

import (
	"os"

	"github.com/rbee-dev/rbee/rbee/cli"
)

func main() { os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr)) }
