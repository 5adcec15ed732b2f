package fleet

import (
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Kind classifies a fleet error so that each edge (gRPC, HTTP) maps it to its own answer in one
// place.
type Kind uint8

// The kinds; their meanings follow the gRPC codes of the same names.
const (
	KindInternal Kind = iota
	KindInvalid
	KindNotFound
	KindExists
	KindUnavailable
	KindFailedPrecondition
	KindResourceExhausted
	KindDeadline
	KindAborted
	KindCanceled
	KindUnimplemented
	KindUnauthenticated
	KindPermissionDenied
)

// Error is a fleet operation's failure: a kind and a sentence for the caller.
type Error struct {
	Kind Kind
	Msg  string
	Err  error // the cause, if any
	// Unreachable names the hive when the failure is that hive not answering (KindUnavailable),
	// so that an edge can tell its callers which one, apart from the queen itself.
	Unreachable *HiveRef
}

// HiveRef names a hive.
type HiveRef struct{ ID, Address string }

func (e *Error) Error() string { return e.Msg }
func (e *Error) Unwrap() error { return e.Err }

func errorf(k Kind, format string, args ...any) *Error {
	return &Error{Kind: k, Msg: fmt.Sprintf(format, args...)}
}

// KindOf returns the kind of err; errors that are not fleet errors are internal.
func KindOf(err error) Kind {
	var e *Error
	if errors.As(err, &e) {
		return e.Kind
	}
	return KindInternal
}

var kindOfCode = map[codes.Code]Kind{
	codes.InvalidArgument:    KindInvalid,
	codes.NotFound:           KindNotFound,
	codes.AlreadyExists:      KindExists,
	codes.Unavailable:        KindUnavailable,
	codes.FailedPrecondition: KindFailedPrecondition,
	codes.ResourceExhausted:  KindResourceExhausted,
	codes.DeadlineExceeded:   KindDeadline,
	codes.Aborted:            KindAborted,
	codes.Canceled:           KindCanceled,
	codes.Unimplemented:      KindUnimplemented,
	codes.Unauthenticated:    KindUnauthenticated,
	codes.PermissionDenied:   KindPermissionDenied,
}

// CodeOf is the gRPC code for a kind.
func CodeOf(k Kind) codes.Code {
	for c, kk := range kindOfCode {
		if kk == k {
			return c
		}
	}
	return codes.Internal
}

// hiveError turns a hive call's error into the fleet's: unreachable hives are unavailable, the
// hive's own verdicts keep their kind.
func hiveError(hiveID, address, op string, err error) *Error {
	st, _ := status.FromError(err)
	switch st.Code() {
	case codes.Canceled:
		return &Error{Kind: KindCanceled, Msg: fmt.Sprintf("%s on hive %s cancelled", op, hiveID), Err: err}
	case codes.Unavailable, codes.DeadlineExceeded:
		return &Error{Kind: KindUnavailable, Msg: fmt.Sprintf("hive %s at %s is unreachable (%s): %s", hiveID, address, op, st.Message()), Err: err,
			Unreachable: &HiveRef{hiveID, address}}
	}
	k, ok := kindOfCode[st.Code()]
	if !ok {
		k = KindInternal
	}
	return &Error{Kind: k, Msg: fmt.Sprintf("hive %s: %s", hiveID, st.Message()), Err: err}
}
