#!/usr/bin/env bash
# Runs a queen and one hive on loopback in the foreground (what `make run` does). Ctrl-C deletes
# the workers spawned meanwhile, then stops the hive and the queen.
set -uo pipefail
BIN=${BIN:-bin}
QUEEN=${QUEEN:-127.0.0.1:7833}
HIVE=${HIVE:-127.0.0.1:7835}
STATE=${STATE:-.state}
mkdir -p "$STATE/logs"

setsid "$BIN/queen" --listen "$QUEEN" --hive "local=$HIVE" &
queen=$!
setsid "$BIN/hive" --hive-id local --listen "$HIVE" --queen "$QUEEN" --log-dir "$STATE/logs" &
hive=$!

stop() {
  local code=${1:-0}
  trap - INT TERM
  echo "stopping: deleting workers, then the hive and the queen" >&2
  # Workers outlive a hive by design; a development run should not leave any behind.
  ids=$("$BIN/rbee" --queen "$QUEEN" worker ls -o json 2>/dev/null |
    grep -o '"workerId": *"[^"]*"' | sed 's/.*"\([^"]*\)"$/\1/')
  for id in $ids; do
    "$BIN/rbee" --queen "$QUEEN" worker rm "$id" >&2 || echo "could not delete worker $id" >&2
  done
  kill -TERM "$hive" "$queen" 2>/dev/null
  wait "$hive" "$queen"
  exit "$code"
}
trap stop INT TERM

echo "queen on $QUEEN, hive 'local' on $HIVE; worker logs in $STATE/logs. Ctrl-C stops both." >&2
# If either dies on its own, stop the other too.
wait -n "$queen" "$hive"
echo "the queen or the hive exited on its own (see its log above); stopping" >&2
stop 1
