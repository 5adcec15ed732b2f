package cli

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/rbee-dev/rbee/internal/errinfo"
)

// Exit statuses. Scripts rely on them, so they never change meaning; they are listed in
// `rbee --help` (exitHelp) and the README.
const (
	ExitOK                 = 0
	ExitError              = 1
	ExitUsage              = 2
	ExitNotFound           = 3
	ExitUnavailable        = 4
	ExitUnauthenticated    = 5
	ExitInvalidArgument    = 6
	ExitFailedPrecondition = 7
	ExitDeadlineExceeded   = 8
	ExitResourceExhausted  = 9
	ExitAlreadyExists      = 10
	ExitAborted            = 11
	ExitUnimplemented      = 12
)

// exitHelp is the exit status table shown by `rbee --help`.
const exitHelp = `Exit status:
  0   success
  1   any other error
  2   usage error (unknown command or flag, missing argument, --timeout not positive)
  3   not found (unknown worker or hive id)
  4   unavailable (the queen cannot be reached, or it cannot reach the hive; the message says which)
  5   unauthenticated or permission denied (missing or wrong token)
  6   invalid argument (a field the queen refused; the message names it)
  7   failed precondition (e.g. the PID is not that worker's process)
  8   deadline exceeded (e.g. spawn --wait timed out; the worker was removed)
  9   resource exhausted (e.g. the hive's port range is used up)
  10  already exists (a worker with that id)
  11  aborted (e.g. the worker exited while it was starting)
  12  unimplemented (process control not available on the hive's platform)`

// codeExits maps gRPC codes to exit statuses; codes not listed exit with ExitError.
var codeExits = map[codes.Code]int{
	codes.OK:                 ExitOK,
	codes.NotFound:           ExitNotFound,
	codes.Unavailable:        ExitUnavailable,
	codes.Unauthenticated:    ExitUnauthenticated,
	codes.PermissionDenied:   ExitUnauthenticated,
	codes.InvalidArgument:    ExitInvalidArgument,
	codes.FailedPrecondition: ExitFailedPrecondition,
	codes.DeadlineExceeded:   ExitDeadlineExceeded,
	codes.ResourceExhausted:  ExitResourceExhausted,
	codes.AlreadyExists:      ExitAlreadyExists,
	codes.Aborted:            ExitAborted,
	codes.Unimplemented:      ExitUnimplemented,
}

// ExitCode returns the exit status for code.
func ExitCode(code codes.Code) int {
	if e, ok := codeExits[code]; ok {
		return e
	}
	return ExitError
}

// usageError is a mistake in the command line itself (exit status 2).
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

// runError marks an error returned by a command's own work, as opposed to cobra's parsing of the
// command line; see Main.
type runError struct{ err error }

func (e runError) Error() string { return e.err.Error() }
func (e runError) Unwrap() error { return e.err }

// describe turns err into one human sentence and an exit status. gRPC errors lose their
// "rpc error: code = ..." prefix; a queen that cannot be reached is said so, with the address.
func describe(err error, queen string) (string, int) {
	var ue usageError
	if errors.As(err, &ue) {
		return ue.Error(), ExitUsage
	}
	if errors.Is(err, context.Canceled) {
		return "interrupted", ExitError
	}
	var he httpError
	if errors.As(err, &he) {
		if code, ok := httpExits[he.status]; ok {
			return he.msg, code
		}
		return he.msg, ExitError
	}
	// errors.As, not status.FromError: a wrapped status must yield the queen's own message.
	var se interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &se) {
		if errors.Is(err, context.DeadlineExceeded) {
			return err.Error(), ExitDeadlineExceeded
		}
		return err.Error(), ExitError
	}
	st := se.GRPCStatus()
	msg := st.Message()
	var un unanswered
	fromQueen := !errors.As(err, &un)
	switch {
	case st.Code() == codes.Unavailable && !fromQueen:
		msg = fmt.Sprintf("cannot reach the queen at %s: %s", queen, lastCause(msg))
	case st.Code() == codes.Unavailable && hiveDown(st) != "":
		// The queen is up; one of its hives is not. Say which, without grpc-go's layers.
		msg = fmt.Sprintf("the queen is up but cannot reach %s: %s", hiveDown(st), lastCause(msg))
	case st.Code() == codes.DeadlineExceeded && (!fromQueen || msg == context.DeadlineExceeded.Error()):
		msg = fmt.Sprintf("the queen at %s did not answer in time (see --timeout)", queen)
	case st.Code() == codes.Canceled && msg == context.Canceled.Error():
		msg = "interrupted"
	}
	// Keep our own context (e.g. "spawning worker w-1: ") that wraps a status error.
	if prefix, _, found := strings.Cut(err.Error(), "rpc error: code = "); found && prefix != "" {
		msg = prefix + msg
	}
	return msg, ExitCode(st.Code())
}

// hiveDown names the hive the queen could not reach ("hive h1 at 10.0.0.1:7835"), from the
// details the queen attaches to such an answer, or is "".
func hiveDown(st *status.Status) string {
	id, addr, ok := errinfo.UnreachableHive(st)
	if !ok {
		return ""
	}
	return fmt.Sprintf("hive %s at %s", id, addr)
}

// lastCause trims grpc-go's layered dial message to its root, e.g. "connection refused".
func lastCause(msg string) string {
	msg = strings.TrimRight(msg, `"`)
	if i := strings.LastIndex(msg, ": "); i >= 0 {
		msg = msg[i+2:]
	}
	return strings.Trim(msg, `" `)
}
