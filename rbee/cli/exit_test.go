package cli

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/rbee-dev/rbee/internal/errinfo"
)

// TestExitCode pins the documented exit statuses: scripts branch on them.
func TestExitCode(t *testing.T) {
	for _, tc := range []struct {
		code codes.Code
		want int
	}{
		{codes.OK, 0},
		{codes.Unknown, 1},
		{codes.Internal, 1},
		{codes.Canceled, 1},
		{codes.NotFound, 3},
		{codes.Unavailable, 4},
		{codes.Unauthenticated, 5},
		{codes.PermissionDenied, 5},
		{codes.InvalidArgument, 6},
		{codes.FailedPrecondition, 7},
		{codes.DeadlineExceeded, 8},
		{codes.ResourceExhausted, 9},
		{codes.AlreadyExists, 10},
		{codes.Aborted, 11},
		{codes.Unimplemented, 12},
	} {
		if got := ExitCode(tc.code); got != tc.want {
			t.Errorf("ExitCode(%v) = %d, want %d", tc.code, got, tc.want)
		}
	}
}

// TestExitHelpListsEveryStatus keeps `rbee --help` in step with the mapping.
func TestExitHelpListsEveryStatus(t *testing.T) {
	for _, e := range codeExits {
		if !strings.Contains(exitHelp, fmt.Sprintf("\n  %-3d ", e)) {
			t.Errorf("exit status %d is not in the help's table", e)
		}
	}
}

func TestDescribe(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		msg  string
		code int
	}{
		{"queen verdict", status.Error(codes.NotFound, `worker "x" is not known`), `worker "x" is not known`, 3},
		{"unauthenticated", status.Error(codes.Unauthenticated, "missing token"), "missing token", 5},
		{"queen unreachable (no answer at all)",
			unanswered{status.Error(codes.Unavailable, `connection error: desc = "transport: Error while dialing: dial tcp 127.0.0.1:1: connect: connection refused"`)},
			"cannot reach the queen at q:1: connection refused", 4},
		{"queen did not answer in time", unanswered{status.Error(codes.DeadlineExceeded, "context deadline exceeded")},
			"the queen at q:1 did not answer in time (see --timeout)", 8},
		{"hive unreachable, said by the queen in words only", status.Error(codes.Unavailable, "hive h1 at 10.0.0.1:7835 is unreachable (spawn): connection error: boom"),
			"hive h1 at 10.0.0.1:7835 is unreachable (spawn): connection error: boom", 4},
		{"hive unreachable, with the queen's details",
			errinfo.WithHiveUnreachable(status.New(codes.Unavailable, `hive h1 at 10.0.0.1:7835 is unreachable (delete): connection error: desc = "transport: Error while dialing: dial tcp 10.0.0.1:7835: connect: connection refused"`), "h1", "10.0.0.1:7835").Err(),
			"the queen is up but cannot reach hive h1 at 10.0.0.1:7835: connection refused", 4},
		{"a spawn that ran out of time, said by the queen", status.Error(codes.DeadlineExceeded, "worker w was not READY within 1s; it was stopped and removed"),
			"worker w was not READY within 1s; it was stopped and removed", 8},
		{"wrapped status", fmt.Errorf("following worker w-1: %w", status.Error(codes.Unavailable, "queen shutting down")),
			"following worker w-1: queen shutting down", 4},
		{"interrupted", status.Error(codes.Canceled, context.Canceled.Error()), "interrupted", 1},
		{"interrupted, with what was done", status.Error(codes.Canceled, "interrupted while worker w-1 was starting; it was removed"),
			"interrupted while worker w-1 was starting; it was removed", 1},
		{"usage", usagef("--grace -1s: must not be negative"), "--grace -1s: must not be negative", 2},
		{"plain", errors.New("reading --token-file: no such file"), "reading --token-file: no such file", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			msg, code := describe(tc.err, "q:1")
			if msg != tc.msg || code != tc.code {
				t.Errorf("describe = %q, %d; want %q, %d", msg, code, tc.msg, tc.code)
			}
			if strings.Contains(msg, "rpc error") {
				t.Errorf("message keeps gRPC's prefix: %q", msg)
			}
		})
	}
}

func TestAgo(t *testing.T) {
	now := time.Date(2026, 11, 28, 1, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		t    *timestamppb.Timestamp
		want string
	}{
		{nil, "-"},
		{timestamppb.New(now.Add(-3 * time.Second)), "3s ago"},
		{timestamppb.New(now.Add(-250 * time.Millisecond)), "250ms ago"},
		{timestamppb.New(now.Add(-(4*time.Minute + 5*time.Second))), "4m5s ago"},
		{timestamppb.New(now.Add(-(3*time.Hour + 2*time.Minute))), "3h2m ago"},
		{timestamppb.New(now.Add(time.Second)), "0s ago"},
	} {
		if got := ago(tc.t, now); got != tc.want {
			t.Errorf("ago(%v) = %q, want %q", tc.t, got, tc.want)
		}
	}
}
