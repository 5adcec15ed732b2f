package rpcclient

import (
	"fmt"
	"net"

	"google.golang.org/grpc"
	_ "google.golang.org/grpc/health" // client-side health checking, which follows the leading queen
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
)

// The services a leading queen reports SERVING and its standbys NOT_SERVING.
const (
	HeartbeatService = "rbee.v1.HeartbeatService"
	QueenService     = "rbee.v1.QueenService"
)

// QueenTarget returns the dial target and extra dial options for the queens at addrs, one or more
// (--queen A,B,C). One address dials exactly as before. Several make one connection that keeps a
// subchannel to every queen and sends calls only to the one whose health service reports service
// SERVING: the leader. A standby reports NOT_SERVING and a queen that is down has no connection,
// so calls follow the leader through a failover without the caller choosing anew; gRPC's health
// watch tells each client at once when a standby takes over.
//
// With several queens, calls wait for a leader (WaitForReady) instead of failing at once while no
// queen leads: a failover then costs the caller the election time, not a reconnect backoff. The
// caller's context bounds the wait.
func QueenTarget(addrs []string, service string) (string, []grpc.DialOption, error) {
	switch len(addrs) {
	case 0:
		return "", nil, fmt.Errorf("no queen address")
	case 1:
		return addrs[0], nil, nil
	}
	state := resolver.State{}
	for _, a := range addrs {
		host, _, err := net.SplitHostPort(a)
		if err != nil {
			return "", nil, fmt.Errorf("queen address %q: %w", a, err)
		}
		// ServerName: TLS verifies each queen by its own host, not by the target's authority.
		state.Addresses = append(state.Addresses, resolver.Address{Addr: a, ServerName: host})
	}
	r := manual.NewBuilderWithScheme("rbee-queens")
	r.InitialState(state)
	// A call that met a queen as it died (connection reset) is retried on the next leader: the
	// dead queen never acted on it, or, if it did and died at once, the new leader knows the
	// worker by its heartbeat and a retried spawn of the same id is refused as existing.
	cfg := fmt.Sprintf(`{"loadBalancingConfig":[{"round_robin":{}}],"healthCheckConfig":{"serviceName":%q},`+
		`"methodConfig":[{"name":[{"service":%q}],"retryPolicy":{"maxAttempts":5,"initialBackoff":"0.2s",`+
		`"maxBackoff":"2s","backoffMultiplier":2,"retryableStatusCodes":["UNAVAILABLE"]}}]}`, service, QueenService)
	return "rbee-queens:///queens", []grpc.DialOption{
		grpc.WithResolvers(r),
		grpc.WithDefaultServiceConfig(cfg),
		grpc.WithDefaultCallOptions(grpc.WaitForReady(true)),
	}, nil
}
