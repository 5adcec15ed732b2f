// Package contract is the worker contract as a worker sees it: the arguments the hive starts every
// worker with (--worker-id --hive-id --model --device --port --queen) and the environment it hands
// over (RBEE_WORKER_ID, RBEE_WORKER_HOST), defined and checked once for the hive that writes them
// and for worker-stub, worker-shim and any other worker written in Go that reads them.
package contract

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"strconv"

	"github.com/rbee-dev/rbee/internal/validate"
)

// Environment variables of the contract.
const (
	// EnvWorkerID is the hive's identity marker for a worker process; when set, a worker refuses
	// to start under another --worker-id.
	EnvWorkerID = "RBEE_WORKER_ID"
	// EnvWorkerHost is the host the worker's port is bound on (the hive's --worker-host); unset or
	// empty means loopback.
	EnvWorkerHost = "RBEE_WORKER_HOST"
)

// Defaults of the flags a worker may be started without.
const (
	DefaultQueen  = "127.0.0.1:7833"
	DefaultDevice = "cpu"
)

// Args are the contract's arguments.
type Args struct {
	WorkerID, HiveID, Model, Device string
	// Port is the port the worker serves on; 0 where Rules.AnyPort allows it.
	Port int
	// Queen is one queen's address (HOST:PORT) or several, comma separated (A,B,C), as
	// heartbeat.Config.Queen takes it.
	Queen string
}

// Register defines the contract's flags on fs, with their defaults, to be parsed into a.
// portHelp says what --port means to this worker.
func (a *Args) Register(fs *flag.FlagSet, portHelp string) {
	fs.StringVar(&a.WorkerID, "worker-id", "", "worker id (required; must equal $"+EnvWorkerID+" when that is set)")
	fs.StringVar(&a.HiveID, "hive-id", "", "id of the hive that started this worker (required)")
	fs.StringVar(&a.Model, "model", "", "model the worker serves (required)")
	fs.StringVar(&a.Device, "device", DefaultDevice, "device the worker runs on: cpu, or cuda:N, rocm:N, metal:N, vulkan:N")
	fs.IntVar(&a.Port, "port", 0, portHelp)
	fs.StringVar(&a.Queen, "queen", DefaultQueen, "queen address (HOST:PORT) to send heartbeats to; several queens: A,B,C")
}

// Rules say what a worker requires of the arguments beyond their form.
type Rules struct {
	// AnyPort accepts --port 0: the worker takes the socket the hive hands over, else any free
	// port. Without it --port must name a port the worker's server binds.
	AnyPort bool
	// Anonymous lets --worker-id, --hive-id and --model be left out, for a worker that never
	// heartbeats (worker-stub --openai, a stand-in for a server that knows nothing of rbee). A
	// given value is checked all the same.
	Anonymous bool
}

// Check checks parsed arguments: the ids and the model are given (unless r.Anonymous) and well
// formed, the device is one the queen accepts, the port is in range, the queen list is HOST:PORT
// entries, and $RBEE_WORKER_ID, when set, names the same worker. Each error names the flag.
func (a *Args) Check(r Rules) error {
	if !r.Anonymous {
		for _, f := range []struct{ name, v string }{{"--worker-id", a.WorkerID}, {"--hive-id", a.HiveID}, {"--model", a.Model}} {
			if f.v == "" {
				return fmt.Errorf("%s is required", f.name)
			}
		}
	}
	if a.WorkerID != "" {
		if err := validate.ID("--worker-id", a.WorkerID); err != nil {
			return err
		}
	}
	if a.HiveID != "" {
		if err := validate.ID("--hive-id", a.HiveID); err != nil {
			return err
		}
	}
	if a.Model != "" {
		if err := validate.Model("--model", a.Model); err != nil {
			return err
		}
	}
	if err := validate.Device("--device", a.Device); err != nil {
		return err
	}
	switch {
	case a.Port == 0 && !r.AnyPort:
		return errors.New("--port is required: the port the server binds (1-65535)")
	case a.Port < 0 || a.Port > 65535:
		return fmt.Errorf("--port %d: want 1 to 65535", a.Port)
	}
	if _, err := validate.Addresses("--queen", a.Queen); err != nil {
		return err
	}
	if env, ok := os.LookupEnv(EnvWorkerID); ok && env != a.WorkerID && (a.WorkerID != "" || !r.Anonymous) {
		return fmt.Errorf("$%s=%q does not match --worker-id %q", EnvWorkerID, env, a.WorkerID)
	}
	return nil
}

// Argv is the command line the hive starts a worker binary with: binary, then the contract's
// flags.
func (a Args) Argv(binary string) []string {
	return []string{binary, "--worker-id", a.WorkerID, "--hive-id", a.HiveID, "--model", a.Model, "--device", a.Device,
		"--port", strconv.Itoa(a.Port), "--queen", a.Queen}
}

// Host returns the host the hive bound, or wants bound, the worker's port on ($RBEE_WORKER_HOST),
// "" when it named none (loopback).
func Host() string { return os.Getenv(EnvWorkerHost) }

// ReportedAddress is what a worker serving on host reports as Worker.address: host itself, or ""
// for none or an unspecified address (0.0.0.0, ::), which tells other machines nothing (the queen
// then takes the hive's own host).
func ReportedAddress(host string) string {
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		return ""
	}
	return host
}
