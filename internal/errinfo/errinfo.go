// Package errinfo names the machine-readable details the queen attaches to some of its errors
// (google.rpc.ErrorInfo), so that clients tell what went wrong by those, never by the message.
package errinfo

import (
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/status"
)

// Domain is ErrorInfo.domain on every detail rbee attaches.
const Domain = "rbee.dev"

// ReasonHiveUnreachable: the queen is up and answered, but the hive the call needed did not.
// Metadata: hive_id, address.
const ReasonHiveUnreachable = "HIVE_UNREACHABLE"

// WithHiveUnreachable returns st with the detail saying which hive could not be reached.
func WithHiveUnreachable(st *status.Status, hiveID, address string) *status.Status {
	d, err := st.WithDetails(&errdetails.ErrorInfo{Domain: Domain, Reason: ReasonHiveUnreachable,
		Metadata: map[string]string{"hive_id": hiveID, "address": address}})
	if err != nil {
		return st
	}
	return d
}

// UnreachableHive returns the hive id and address of a HIVE_UNREACHABLE detail in st, if any.
func UnreachableHive(st *status.Status) (hiveID, address string, ok bool) {
	for _, d := range st.Details() {
		if info, is := d.(*errdetails.ErrorInfo); is && info.GetDomain() == Domain && info.GetReason() == ReasonHiveUnreachable {
			return info.GetMetadata()["hive_id"], info.GetMetadata()["address"], true
		}
	}
	return "", "", false
}
