#!/usr/bin/env bash
# Runs three queens elected on one etcd and two hives on loopback in the foreground (what
# `make run-ha` does). Kill the leader (its PID is printed) to watch a standby take over.
# Ctrl-C deletes the workers spawned meanwhile, then stops the hives, the queens and etcd.
set -uo pipefail
BIN=${BIN:-bin}
STATE=${STATE:-.state-ha}
Q1=127.0.0.1:7833 Q2=127.0.0.1:7843 Q3=127.0.0.1:7853
QUEENS=$Q1,$Q2,$Q3
ETCD_CLIENT=http://127.0.0.1:23790 ETCD_PEER=http://127.0.0.1:23800
etcd_bin=$(scripts/install-etcd.sh) || { echo "run-ha needs etcd (scripts/install-etcd.sh failed)" >&2; exit 1; }
mkdir -p "$STATE/logs-a" "$STATE/logs-b"

setsid "$etcd_bin" --name run-ha --data-dir "$STATE/etcd" --log-level warn --logger zap \
  --listen-client-urls "$ETCD_CLIENT" --advertise-client-urls "$ETCD_CLIENT" \
  --listen-peer-urls "$ETCD_PEER" --initial-advertise-peer-urls "$ETCD_PEER" \
  --initial-cluster "run-ha=$ETCD_PEER" &
etcd=$!
pids=()
for q in $Q1 $Q2 $Q3; do
  setsid "$BIN/queen" --listen "$q" --etcd "$ETCD_CLIENT" &
  pids+=($!)
done
setsid "$BIN/hive" --hive-id a --listen 127.0.0.1:7835 --queen "$QUEENS" --log-dir "$STATE/logs-a" &
hives=($!)
setsid "$BIN/hive" --hive-id b --listen 127.0.0.1:7836 --queen "$QUEENS" --log-dir "$STATE/logs-b" &
hives+=($!)

stop() {
  local code=${1:-0}
  trap - INT TERM
  echo "stopping: deleting workers, then the hives, the queens and etcd" >&2
  ids=$(timeout 20 "$BIN/rbee" --queen "$QUEENS" worker ls -o json 2>/dev/null |
    grep -o '"workerId": *"[^"]*"' | sed 's/.*"\([^"]*\)"$/\1/')
  for id in $ids; do
    "$BIN/rbee" --queen "$QUEENS" worker rm "$id" >&2 || echo "could not delete worker $id" >&2
  done
  kill -TERM "${hives[@]}" 2>/dev/null
  wait "${hives[@]}" 2>/dev/null
  kill -TERM "${pids[@]}" 2>/dev/null
  wait "${pids[@]}" 2>/dev/null
  kill -TERM "$etcd" 2>/dev/null
  wait "$etcd"
  exit "$code"
}
trap stop INT TERM

cat >&2 <<MSG
etcd on $ETCD_CLIENT; queens on $QUEENS (PIDs ${pids[*]}); hives a and b on 127.0.0.1:7835-7836.
Try:   export RBEE_QUEEN=$QUEENS; $BIN/rbee worker spawn --model m --wait; $BIN/rbee worker ls
Then:  kill -9 the pid of the line "this queen leads", and run rbee worker ls again.
Ctrl-C stops everything.
MSG
# If etcd or a hive dies on its own, stop the rest (a queen may be killed on purpose).
wait -n "$etcd" "${hives[@]}"
echo "etcd or a hive exited on its own (see its log above); stopping" >&2
stop 1
