#!/usr/bin/env bash
# The GPU benchmark of issue 4 item 7 in one command, on the GPU machine from a packed folder
# (see docs/benchmarks-gpu-e2e.md): builds nothing. From the repository root there:
#   source .device/env.sh && bash scripts/bench-gpu.sh LOGDIR [extra moa_bench_gpu flags]
# Steps: decode-attention bandwidth (moa_gpu_bench, item 7a, when packed); end-to-end decode of
# random-weight Llama-2-7B / Llama-3-8B shapes, dense and 50% plans (moa_bench_gpu, 7b and 7c);
# HF transformers SDPA on the same shapes and prompts (bench/hf_sdpa_decode.py). Full logs and
# JSON go to LOGDIR; the joint table (ours, roofline, HF, ours/HF) is printed last.
# Environment: SHAPES (llama2-7b,llama3-8b), PROMPTS (4096,8192,16384), STEPS (32),
# MAX_BATCH (256), FILL (moa_bench_gpu --fill: random, the default, or prefill), HF (1; 0 skips
# transformers), HF_TIMEOUT (seconds per shape for transformers; 0, the default, is no limit: the
# prompts finished by then are kept), ATTN_BENCH (1; 0 skips moa_gpu_bench).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOGDIR=${1:?usage: bench-gpu.sh LOGDIR [moa_bench_gpu flags]}
shift
mkdir -p "$LOGDIR"
SHAPES=${SHAPES:-llama2-7b,llama3-8b}
PROMPTS=${PROMPTS:-4096,8192,16384}
STEPS=${STEPS:-32}
MAX_BATCH=${MAX_BATCH:-256}
FILL=${FILL:-random}
if ! command -v moa_bench_gpu >/dev/null; then
  echo "bench-gpu: moa_bench_gpu is not on PATH (source the packed folder's env.sh)" >&2
  exit 2
fi
declare -a times
timed() {  # timed NAME COMMAND...: runs it, records its wall time
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name" >&2
  "$@"
  local rc=$?
  times+=("$name: $((SECONDS - t0)) s (exit $rc)")
  return $rc
}

if [[ ${ATTN_BENCH:-1} == 1 ]] && command -v moa_gpu_bench >/dev/null; then
  timed decode_attention moa_gpu_bench >"$LOGDIR/decode_attention.txt" \
    2>"$LOGDIR/decode_attention.stderr"
fi

timed moa_bench_gpu moa_bench_gpu --shapes "$SHAPES" --prompts "$PROMPTS" --steps "$STEPS" \
  --max-batch "$MAX_BATCH" --fill "$FILL" --out "$LOGDIR/moa.json" "$@" \
  >"$LOGDIR/moa.txt" 2> >(tee "$LOGDIR/moa.stderr" >&2)

: >"$LOGDIR/hf.jsonl"
if [[ ${HF:-1} == 1 ]]; then
  for shape in ${SHAPES//,/ }; do
    # Not PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: it made HF's 7B decode 1.6-2.1x slower
    # on an H200 (docs/benchmarks-gpu-e2e.md).
    timed "hf_$shape" env PYTHONUNBUFFERED=1 timeout "${HF_TIMEOUT:-0}" python3 "$ROOT/bench/hf_sdpa_decode.py" \
      --shape "$shape" --prompts "$PROMPTS" --steps "$STEPS" --max-batch "$MAX_BATCH" \
      >>"$LOGDIR/hf.jsonl" 2> >(tee -a "$LOGDIR/hf.stderr" >&2)
  done
fi

python3 - "$LOGDIR" "${times[@]}" <<'EOF' | tee "$LOGDIR/summary.txt"
import json, os, sys

logdir, times = sys.argv[1], sys.argv[2:]
def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
moa = load(os.path.join(logdir, "moa.json")) or {"rows": []}
hf = {}
try:
    with open(os.path.join(logdir, "hf.jsonl")) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                hf[(r["shape"], r["prompt"])] = r
except (OSError, ValueError):
    pass

att = os.path.join(logdir, "decode_attention.txt")
if os.path.exists(att):
    print("== decode attention (moa_gpu_bench), last lines of", att)
    with open(att) as f:
        print("".join(f.readlines()[-24:]).rstrip())
    print()
bw = moa.get("copy_bandwidth_bytes_per_s", 0) / 1e9
print(f"== end-to-end decode, random-weight fp16 models, {moa.get('steps', '?')} timed steps; "
      f"copy bandwidth {bw:.0f} GB/s (read + written)")
hdr = ("shape", "prompt", "attn", "batch", "tok/s", "roofline", "frac", "KV GB", "density",
       "HF batch", "HF tok/s", "ours/HF")
print("%-10s %6s %-8s %5s %9s %9s %5s %6s %7s %8s %8s %7s" % hdr)
rows = moa.get("rows", [])
dense = {}
for r in rows:
    if r.get("attention") == "dense" and "error" not in r:
        dense[(r["shape"], r["prompt"])] = r["tok_s"]
for r in rows:
    h = hf.get((r["shape"], r["prompt"]), {})
    hb = str(h.get("batch", "-"))
    ht = h.get("tok_s")
    if "error" in r:
        print("%-10s %6d %-8s error: %s" % (r["shape"], r["prompt"], r["attention"], r["error"]))
        continue
    print("%-10s %6d %-8s %5d %9.1f %9.1f %5.2f %6.1f %7.3f %8s %8s %7s" % (
        r["shape"], r["prompt"], r["attention"], r["batch"], r["tok_s"], r["roofline_tok_s"],
        r["fraction"], r["kv_bytes"] / 1e9, r["measured_density"], hb,
        "%.1f" % ht if ht else "-", "%.2f" % (r["tok_s"] / ht) if ht else "-"))
for key, h in sorted(hf.items()):
    if "error" in h:
        print(f"HF {key[0]} {key[1]}: {h['error']}")
    elif h.get("out_of_memory_at_batch"):
        print(f"HF {key[0]} {key[1]}: out of memory at batch "
              f"{', '.join(map(str, h['out_of_memory_at_batch']))}; ran at batch {h['batch']}")
print()
print("== targets (issue 4, item 7)")
for r in rows:
    if "error" in r:
        continue
    if r["attention"] == "dense":
        ok = r["fraction"] >= 0.70
        print(f"  {r['shape']} {r['prompt']} dense: {r['fraction']:.2f} of roofline "
              f"({'meets' if ok else 'MISSES'} >= 0.70)")
    else:
        want = {4096: 2000, 8192: 1000, 16384: 500}.get(r["prompt"])
        if r["shape"] == "llama2-7b" and want:
            ok = r["tok_s"] >= want
            print(f"  {r['shape']} {r['prompt']} {r['attention']}: {r['tok_s']:.0f} tokens/s "
                  f"({'meets' if ok else 'MISSES'} >= {want})")
        d = dense.get((r["shape"], r["prompt"]))
        if d and r["prompt"] >= 16384:
            ok = r["tok_s"] >= 1.8 * d
            print(f"  {r['shape']} {r['prompt']} {r['attention']}: {r['tok_s'] / d:.2f}x dense "
                  f"({'meets' if ok else 'MISSES'} >= 1.8x)")
        if r["prompt"] >= 16384:
            ratio = r["kv_bytes_per_seq"] / r["dense_kv_bytes_per_seq"]
            print(f"  {r['shape']} {r['prompt']} {r['attention']}: KV {r['kv_bytes_per_seq']:.0f} "
                  f"vs dense {r['dense_kv_bytes_per_seq']:.0f} bytes per sequence = {ratio:.3f} "
                  f"({'meets' if ratio <= 0.55 else 'MISSES'} <= 0.55)")
print()
print("== phases:", "; ".join(times))
print("logs:", logdir)
EOF
