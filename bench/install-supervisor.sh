#!/bin/sh
# Installs supervisord (Debian package `supervisor`) for the comparison in bench/lifecycle, which
# measures supervisord's start and stop of the same trivial program in the same run when
# supervisord is on PATH. Only the benchmark uses it; rbee neither needs nor starts it. The
# package's own service is not started here (the benchmark runs its own supervisord on loopback).
set -eu
if command -v supervisord >/dev/null 2>&1; then
	echo "supervisord already installed: $(supervisord --version)"
	exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y --no-install-recommends supervisor
echo "installed supervisord $(supervisord --version)"
