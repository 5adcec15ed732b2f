//go:build !unix

package catalog

import (
	"errors"
	"os"
)

// executable checks the mode bits where access(2) is not available; the hive runs no workers
// there anyway.
func executable(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if fi.Mode()&0o111 == 0 {
		return errors.New("no execute permission")
	}
	return nil
}
