#!/usr/bin/env bash
# Runs a queen and one hive on loopback in the foreground (what `make run` does). Ctrl-C, closing
# the terminal (SIGHUP) or SIGTERM deletes the workers spawned meanwhile, then stops the hive and
# the queen: a development run never outlives its terminal.
set -uo pipefail
BIN=${BIN:-bin}
QUEEN=${QUEEN:-127.0.0.1:7833}
HTTP=${HTTP:-127.0.0.1:7834} # the OpenAI API and the web console
HIVE=${HIVE:-127.0.0.1:7835}
HIVE_ID=${HIVE_ID:-local}
STATE=${STATE:-.state}
mkdir -p "$STATE/logs"

# The hive's demo catalog: one stand-in model, served by worker-stub in its OpenAI mode under the
# per-worker supervisor, so that the first curl after `make run` gets tokens. A real catalog names
# llama-server or vLLM here instead (README: "Real inference servers").
# CATALOG=path/to/models.yaml runs the hive with that catalog instead.
if [ -z "${CATALOG:-}" ]; then
  CATALOG=$STATE/models.yaml
  stub=$(cd "$(dirname "$BIN/worker-stub")" && pwd)/worker-stub
  cat >"$STATE/models.yaml" <<YAML
# Written by scripts/run.sh at every make run.
models:
  demo-chat:
    cmd: ["$stub", "--openai", "--model", "\${MODEL}", "--port", "\${PORT}",
          "--load-time", "500ms", "--tokens-per-second", "40", "--max-tokens", "24"]
    health: /health
    load_timeout: 30s
    grace: 5s
    concurrency: 4
    ttl: 10m
YAML
fi

# A reader that goes away (`make run 2>&1 | tee run.log` and Ctrl-C, which kills tee too) must not
# kill this script half way through its clean-up, nor the queen it needs for it: the script ignores
# SIGPIPE, and when stderr is not a terminal the queen's and the hive's logs go through a relay that
# ignores it (and INT, HUP and TERM: `timeout make run` signals the whole process group, and a dead
# relay would kill the queen at its next log line, before it deletes the workers) and, once its
# reader is gone, drains them to nowhere; it ends when the queen and the hive close their end. (On a
# terminal they write to it directly, in colour; a closed terminal gives them write errors, not
# signals.)
trap '' PIPE
exec 3>&2
if [ ! -t 2 ]; then
  exec 3> >(trap '' INT HUP PIPE TERM; cat >&2; exec cat >/dev/null)
fi

# Their own session keeps the terminal's Ctrl-C and hang-up away from them, so that the queen is
# still up to delete the workers when this script stops; their parent's death signal (setpriv
# --pdeathsig) stops them even if this script is killed with SIGKILL.
pdeath=()
if command -v setpriv >/dev/null 2>&1; then
  pdeath=(setpriv --pdeathsig TERM --)
fi
setsid "${pdeath[@]}" "$BIN/queen" --listen "$QUEEN" --http-listen "$HTTP" --hive "$HIVE_ID=$HIVE" 2>&3 &
queen=$!
setsid "${pdeath[@]}" "$BIN/hive" --hive-id "$HIVE_ID" --listen "$HIVE" --queen "$QUEEN" --log-dir "$STATE/logs" --models "$CATALOG" 2>&3 &
hive=$!

stop() {
  local code=${1:-0}
  # A second Ctrl-C or SIGTERM ends the script at once (the queen and the hive get their death
  # signal); a hang-up, which a closing terminal may send more than once, must not cut the clean-up.
  trap - INT TERM
  trap '' HUP
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
trap stop INT TERM HUP

echo "queen on $QUEEN, hive '$HIVE_ID' on $HIVE serving the models in $CATALOG; worker logs in $STATE/logs. Ctrl-C stops both." >&2
echo "web console: http://$HTTP/ (the OpenAI API beside it under /v1/)" >&2
# If either dies on its own, stop the other too.
wait -n "$queen" "$hive"
echo "the queen or the hive exited on its own (see its log above); stopping" >&2
stop 1
