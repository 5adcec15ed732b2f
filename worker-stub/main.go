// Command worker-stub is a stand-in inference worker that honours the rbee worker contract: it
// serves gRPC health on its port (inherited from the hive by socket activation, or its own), keeps
// a WorkerHeartbeat stream to the queen with its full descriptor, reports STARTING, READY and
// STOPPING, and stops cleanly on SIGTERM. Its test knobs make it misbehave on purpose (ignore
// SIGTERM, fork children, exit early, stay silent) so that the hive and queen can be tested
// against real processes.
package main

import "os"

func main() {
	if len(os.Args) > 1 && os.Args[1] == childMode {
		sleepForever()
	}
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}
