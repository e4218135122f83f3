#!/usr/bin/env bash
# The main job: set everything up, start moa-server on the default model, stream an answer
# through moa-client, show a few metrics, then stop the server the way an operator would
# (SIGTERM: drain, exit 0).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
bash "$ROOT/scripts/setup.sh"

PORT=${MOA_DEMO_PORT:-50051}
METRICS_PORT=${MOA_DEMO_METRICS_PORT:-9090}
QUESTION=${1:-"What is the capital of France? Answer in one sentence."}
LOG=$(mktemp)
"$ROOT/build/bin/moa-server" --model "$MODEL_FILE" --host 127.0.0.1 --port "$PORT" \
  --metrics-port "$METRICS_PORT" 2>"$LOG" &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -f "$LOG"' EXIT

# Ready once it says it is serving (or gone if it failed).
for _ in $(seq 1 300); do
  grep -q "serving" "$LOG" && break
  kill -0 $server 2>/dev/null || { cat "$LOG" >&2; exit 1; }
  sleep 0.1
done
cat "$LOG" >&2

log "moa-client --chat \"$QUESTION\""
"$ROOT/build/bin/moa-client" --address "127.0.0.1:$PORT" --chat "$QUESTION" --max-tokens 64
log "a few metrics from http://127.0.0.1:$METRICS_PORT/metrics"
curl -s "http://127.0.0.1:$METRICS_PORT/metrics" |
  grep -E '^moa_(requests_finished_total|generation_tokens_total|prompt_tokens_total|kv_blocks)' || true
log "stopping the server (SIGTERM drains in-flight requests)"
kill -TERM $server
wait $server
trap - EXIT
rm -f "$LOG"
