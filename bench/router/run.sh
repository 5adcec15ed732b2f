#!/usr/bin/env bash
# Measures what the queen's router adds to an inference request. It starts a queen with the HTTP
# API on, WORKERS worker-stub --openai servers, and heartbeats each one's descriptor to the queen as
# READY (what worker-shim does for a catalog server, done here by grpcurl so that the figures need
# no hive), then runs bench/inference -compare: straight to the workers, then through the queen, in
# one run. Extra arguments go to bench/inference. Every process it starts is stopped by PID.
# REVPROXY=ADDR also starts bench/revproxy (Go's httputil.ReverseProxy, round robin over the same
# workers) on ADDR and measures it between the two, as the yardstick of a generic HTTP hop.
#
#   bench/router/run.sh -rate 1000 -concurrency 100 -duration 10s            # added latency
#   WORKERS=4 bench/router/run.sh -concurrency 64 -n 100000                  # throughput
#   bench/router/run.sh -stream -max-tokens 200 -concurrency 200 -n 10000     # streams
set -euo pipefail
BIN=${BIN:-bin}
WORKERS=${WORKERS:-1}
QUEEN=${QUEEN:-127.0.0.1:17833}
HTTP=${HTTP:-127.0.0.1:17834}
METRICS=${METRICS:-} # e.g. 127.0.0.1:17836 for /metrics and /debug/pprof
REVPROXY=${REVPROXY:-} # e.g. 127.0.0.1:17835: also measure a generic reverse proxy
PORT0=${PORT0:-17900}
MODEL=stub
dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT
for b in queen worker-stub grpcurl; do
  [[ -x $BIN/$b ]] || { echo "run.sh: $BIN/$b missing: run make build and make bin/grpcurl" >&2; exit 2; }
done
# A long interval: the heartbeat is sent once and the stream held open; no beat goes stale in a run.
"$BIN/queen" --listen "$QUEEN" --http-listen "$HTTP" --heartbeat-interval 5m --log-level warn \
  ${METRICS:+--metrics-listen "$METRICS"} 2>"$dir/queen.log" &
queen=$!
pids+=("$queen")
for ((i = 0; i < WORKERS; i++)); do
  port=$((PORT0 + i))
  "$BIN/worker-stub" --openai --model "$MODEL" --port "$port" --log-level warn 2>"$dir/stub$i.log" &
  stub=$!
  pids+=("$stub")
  mkfifo "$dir/beat$i"
  { printf '{"worker":{"workerId":"bench-%d","hiveId":"bench","model":"%s","device":"cpu","pid":%d,"port":%d,"address":"127.0.0.1","state":"WORKER_STATE_READY"}}\n' \
      "$i" "$MODEL" "$stub" "$port"; exec sleep 3600; } >"$dir/beat$i" &
  pids+=("$!")
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.05; done
  for _ in $(seq 100); do curl -fs "http://$HTTP/v1/models" >/dev/null 2>&1 && break; sleep 0.05; done
  "$BIN/grpcurl" -plaintext -d @ "$QUEEN" rbee.v1.HeartbeatService/WorkerHeartbeat <"$dir/beat$i" >/dev/null 2>&1 &
  pids+=("$!")
done
for _ in $(seq 200); do
  n=$(curl -fs "http://$HTTP/v1/models" | grep -c '"id":"stub"' || true)
  ready=$("$BIN/grpcurl" -plaintext -d '{"model":"stub","state":"WORKER_STATE_READY"}' "$QUEEN" rbee.v1.QueenService/ListWorkers 2>/dev/null | grep -c '"workerId"' || true)
  [[ $n -ge 1 && $ready -ge $WORKERS ]] && break
  sleep 0.05
done
baseline=()
if [[ -n $REVPROXY ]]; then
  go build -o "$dir/revproxy" ./bench/revproxy
  urls=$(for ((i = 0; i < WORKERS; i++)); do printf 'http://127.0.0.1:%d,' $((PORT0 + i)); done)
  "$dir/revproxy" -listen "$REVPROXY" -to "${urls%,}" &
  pids+=("$!")
  baseline=(-baseline "http://$REVPROXY" -baseline-pid "$!")
  for _ in $(seq 100); do curl -fs "http://$REVPROXY/health" >/dev/null 2>&1 && break; sleep 0.05; done
fi
go run ./bench/inference "${baseline[@]}" -url "http://$HTTP" -queen "$QUEEN" -model "$MODEL" -compare -watch-pid "$queen" "$@"
