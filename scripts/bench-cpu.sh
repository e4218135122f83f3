#!/usr/bin/env bash
# CPU benchmark, our engine against llama.cpp on the same model, prompt and thread count:
#   scripts/bench-cpu.sh [extra bench/bench_cpu.py arguments, e.g. --prompt-tokens 1024]
# Environment: BUILD_DIR (default build), MODEL, THREADS (default nproc), P (512), G (128),
# REPEAT (3: the engines alternate REPEAT times and the best run of each is reported).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BUILD_DIR:-build}"
[[ "$build" = /* ]] || build="$root/$build"
model="${MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
threads="${THREADS:-$(nproc)}"

if [[ ! -f "$build/CMakeCache.txt" ]]; then
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release
fi
# Incremental: rebuilds only what changed.
cmake --build "$build" --target moa_bench_cpu -j "$(nproc)"

python="$root/.venv/bin/python"
[[ -x "$python" ]] || python=python3
exec "$python" "$root/bench/bench_cpu.py" --moa-bench "$build/bin/moa_bench_cpu" \
  --model "$model" --threads "$threads" --prompt-tokens "${P:-512}" --gen-tokens "${G:-128}" \
  --repeat "${REPEAT:-3}" "$@"
