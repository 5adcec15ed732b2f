package hiveclock

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// Header is the response header in which a hive reports a reading of its clock on every unary
// call, health checks included: the queen reads it from a hive whose heartbeats carry none (a
// hive that never beats to it, with only a static --hive on the queen).
const Header = "rbee-hive-clock"

// UnaryInterceptor sets Header on every unary response, read as the call starts.
func (c *Clock) UnaryInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		_ = grpc.SetHeader(ctx, metadata.Pairs(Header, c.headerValue()))
		return handler(ctx, req)
	}
}

func (c *Clock) headerValue() string {
	return strconv.FormatUint(c.instance, 16) + "/" + strconv.FormatInt(int64(c.Now()), 10)
}

// ParseHeader reads Header from a response's header metadata; ok false when it is absent (a hive
// older than it).
func ParseHeader(md metadata.MD) (instance uint64, reading time.Duration, ok bool, err error) {
	v := md.Get(Header)
	if len(v) == 0 {
		return 0, 0, false, nil
	}
	inst, ns, found := strings.Cut(v[0], "/")
	if !found {
		return 0, 0, false, fmt.Errorf("%s %q: want INSTANCE/NANOSECONDS", Header, v[0])
	}
	instance, err = strconv.ParseUint(inst, 16, 64)
	if err != nil || instance == 0 {
		return 0, 0, false, fmt.Errorf("%s %q: bad instance", Header, v[0])
	}
	n, err := strconv.ParseInt(ns, 10, 64)
	if err != nil || n < 0 {
		return 0, 0, false, fmt.Errorf("%s %q: bad reading", Header, v[0])
	}
	return instance, time.Duration(n), true, nil
}
