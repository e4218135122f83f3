#!/usr/bin/env bash
# The Python example client (examples/python_client.py, grpcio) against a live moa-server on the
# tiny test model: it must stream a generation and report an INVALID_ARGUMENT as such.
set -euo pipefail
bin=$1
root=$(cd "$(dirname "$0")/.." && pwd)
py=$root/.venv/bin/python
model=$root/tests/data/generated/tiny/model-f32.gguf
[[ -x $py && -f $model ]] || { echo "needs .venv and $model: run scripts/test.sh" >&2; exit 1; }
log=$(mktemp)
"$bin/moa-server" --model "$model" --host 127.0.0.1 --port 0 --metrics-port -1 --threads 1 \
  2>"$log" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 1 300); do grep -q serving "$log" && break; sleep 0.05; done
port=$(sed -n 's/.* on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$log" | head -1)
[[ -n $port ]] || { cat "$log" >&2; exit 1; }
out=$("$py" "$root/examples/python_client.py" --address "127.0.0.1:$port" --prompt "hello" \
  --max-tokens 5 2>&1)
echo "$out"
grep -q "finish: FINISH_REASON_" <<<"$out"
grep -q "generated" <<<"$out"
if err=$("$py" "$root/examples/python_client.py" --address "127.0.0.1:$port" --prompt "hello" \
  --max-tokens 100000 2>&1); then
  echo "an impossible max_tokens was accepted" >&2
  exit 1
fi
echo "$err"
grep -q "INVALID_ARGUMENT" <<<"$err"
echo "python client: ok"
