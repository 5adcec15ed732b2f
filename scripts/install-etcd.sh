#!/usr/bin/env bash
# Makes an etcd server binary available for the HA tests and `make run-ha`, from Debian's
# etcd-server package (rbee itself links only the etcd client). Prints the binary's path.
# Already installed (or ETCD_BIN set): nothing to do. Needs root (CI runs as root) to install.
set -euo pipefail
if [[ -n "${ETCD_BIN:-}" && -x "$ETCD_BIN" ]]; then echo "$ETCD_BIN"; exit 0; fi
if command -v etcd >/dev/null 2>&1; then command -v etcd; exit 0; fi
for p in /usr/bin/etcd /usr/sbin/etcd; do
	if [[ -x $p ]]; then echo "$p"; exit 0; fi
done
if [[ $(id -u) -ne 0 ]]; then
	echo "install-etcd: etcd is not installed and this is not root; run: sudo apt-get install etcd-server" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
{
	apt-get install -y --no-install-recommends etcd-server || { apt-get update && apt-get install -y --no-install-recommends etcd-server; }
} >&2
# The package starts a system etcd on 2379 where an init system runs; the tests and make run-ha
# start their own on other ports, so that one is left alone.
command -v etcd
