#!/usr/bin/env bash
# On-demand start: the time from a request for a model with no worker to its first streamed token,
# through a queen and a hive whose catalog serves the model with worker-stub --openai loading for
# LOAD (default 1s); compare with LOAD, the server's own load time. Runs RUNS times (default 3),
# each with a fresh queen and hive; every process it starts is stopped by PID.
set -euo pipefail
BIN=${BIN:-bin}
LOAD=${LOAD:-1s}
RUNS=${RUNS:-3}
dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT
cat >"$dir/models.yaml" <<YAML
models:
  demo:
    cmd: ["$(realpath "$BIN")/worker-stub", "--openai", "--model", "\${MODEL}", "--port", "\${PORT}", "--load-time", "$LOAD"]
YAML
for ((r = 1; r <= RUNS; r++)); do
  "$BIN/queen" --listen 127.0.0.1:17843 --http-listen 127.0.0.1:17844 --log-level warn 2>"$dir/queen.log" &
  q=$!
  "$BIN/hive" --listen 127.0.0.1:17845 --queen 127.0.0.1:17843 --hive-id bench --models "$dir/models.yaml" \
    --log-dir "$dir/logs" --log-level warn 2>"$dir/hive.log" &
  h=$!
  pids=("$q" "$h")
  until curl -fs http://127.0.0.1:17844/v1/models 2>/dev/null | grep -q '"demo"'; do sleep 0.05; done
  curl -sN -o /dev/null -w "run $r: first byte %{time_starttransfer}s, whole answer %{time_total}s (load time $LOAD)\n" \
    http://127.0.0.1:17844/v1/chat/completions \
    -d '{"model":"demo","stream":true,"max_tokens":4,"messages":[{"role":"user","content":"hi"}]}'
  "$BIN/rbee" --queen 127.0.0.1:17843 worker ls -o json | grep -o '"workerId": *"[^"]*"' | cut -d'"' -f4 |
    while read -r id; do "$BIN/rbee" --queen 127.0.0.1:17843 worker rm "$id" >/dev/null; done
  kill "$h" "$q"; wait "$h" "$q" 2>/dev/null || true
  pids=()
done
