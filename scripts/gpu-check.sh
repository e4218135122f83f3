#!/usr/bin/env bash
# Everything that checks the CUDA backend, run on the GPU machine from a packed folder (see
# docs/gpu.md): builds nothing. Usage, from the repository root there:
#   source .device/env.sh && bash scripts/gpu-check.sh LOGDIR
# Steps: transformers' reference logits of the default model (tests/tools/hf_gguf_logits.py),
# moa_gpu_tests (every kernel against the CPU backend, whole models against the CPU backend and
# transformers, batching), then moa-server --device cuda end to end with moa-client and /metrics.
# Full logs go to LOGDIR; a short summary is printed last. Exit status 0 only if all passed.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOGDIR=${1:?usage: gpu-check.sh LOGDIR}
mkdir -p "$LOGDIR"
MODEL=$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf
export MOA_SOURCE_DIR=$ROOT
declare -a summary
step() {  # step NAME COMMAND...: runs it, logs to LOGDIR/NAME.log, records pass/fail and time
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name" >&2
  if "$@" >"$LOGDIR/$name.log" 2>&1; then
    summary+=("PASS  $name ($((SECONDS - t0)) s)")
  else
    summary+=("FAIL  $name ($((SECONDS - t0)) s): see $name.log")
  fi
  tail -n 5 "$LOGDIR/$name.log" >&2
}

[[ -f $MODEL ]] || echo "gpu-check: $MODEL is absent: the default-model tests will skip" >&2

# transformers reads GGUF through the pure-Python gguf package (carried as a wheel).
hf_reference() {
  if ! python3 -c "import gguf" 2>/dev/null; then
    local wheel
    wheel=$(ls "$ROOT"/.devwheels/gguf-*.whl 2>/dev/null | head -1)
    [[ -n $wheel ]] || { echo "no gguf package and no carried wheel (.devwheels/)"; return 1; }
    python3 -m pip install --quiet --no-deps --no-index --target /tmp/moa-pylib "$wheel" || return 1
    export PYTHONPATH=/tmp/moa-pylib${PYTHONPATH:+:$PYTHONPATH}
  fi
  mkdir -p "$ROOT/tests/data/generated"
  python3 "$ROOT/tests/tools/hf_gguf_logits.py" "$MODEL" "$ROOT/tests/data/generated/hf_logits.bin"
}
if [[ -f $MODEL ]]; then
  step hf_reference hf_reference
  [[ -d /tmp/moa-pylib ]] && export PYTHONPATH=/tmp/moa-pylib${PYTHONPATH:+:$PYTHONPATH}
fi

step moa_gpu_tests moa_gpu_tests

# The server on the GPU, end to end: start, one streamed chat answer, /metrics, SIGTERM drain.
server_e2e() {
  local model=$MODEL
  [[ -f $model ]] || model=$ROOT/tests/data/generated/tiny/model-f32.gguf
  local log=$LOGDIR/moa-server.stderr
  moa-server --device cuda --model "$model" --host 127.0.0.1 --port 50151 --metrics-port 9190 \
    2>"$log" &
  local pid=$!
  for _ in $(seq 1 600); do
    grep -q "serving" "$log" && break
    kill -0 $pid 2>/dev/null || { cat "$log"; return 1; }
    sleep 0.1
  done
  cat "$log"
  moa-client --address 127.0.0.1:50151 --chat "What is the capital of France? Answer in one sentence." \
    --max-tokens 32 || { kill -TERM $pid; wait $pid; return 1; }
  python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9190/metrics').read().decode())" |
    grep -E '^moa_(requests_finished_total|generation_tokens_total|kv_blocks)' || { kill -TERM $pid; wait $pid; return 1; }
  kill -TERM $pid
  wait $pid
  echo "moa-server exit status $?"
}
if command -v moa-server >/dev/null; then step server_e2e server_e2e; fi

echo
echo "gpu-check summary (logs in $LOGDIR):"
printf '  %s\n' "${summary[@]}"
grep -h "^\[ \(model\|hf\) " "$LOGDIR/moa_gpu_tests.log" 2>/dev/null | sed 's/^/  /'
grep -h "tests ran\|PASSED\|FAILED" "$LOGDIR/moa_gpu_tests.log" 2>/dev/null | sed 's/^/  /'
! printf '%s\n' "${summary[@]}" | grep -q '^FAIL'
