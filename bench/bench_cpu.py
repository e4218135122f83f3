#!/usr/bin/env python3
"""CPU prefill and decode speed: llama.cpp (llama-cpp-python) against moa_bench_cpu.

Runs our bench/moa_bench_cpu first (it builds the prompt and reports its token ids), then
llama.cpp on the same model with the same prompt token ids and thread count, and prints both side
by side with the ratio ours / llama.cpp. With --repeat N the two alternate N times and the best
run of each engine is reported (on a shared machine the best run is the one least disturbed by
other work; the load average is printed for the record). Both engines are timed the same way: one call for the
whole prompt, then G greedy steps of one token each, every step timed on its own (for llama.cpp
one llm.eval([token]) call, which includes llama-cpp-python's small per-call Python overhead).

  .venv/bin/python bench/bench_cpu.py --moa-bench build/bin/moa_bench_cpu \\
      --model models/SmolLM2-135M-Instruct.Q4_1.gguf --threads 2 --prompt-tokens 512 \\
      --gen-tokens 128
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import llama_cpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The target: our decode no slower than 3x llama.cpp's.
TARGET_DECODE_RATIO = 0.33


def run_moa(args):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "moa.json")
        cmd = [
            args.moa_bench,
            "--model", args.model,
            "--threads", str(args.threads),
            "--prompt-tokens", str(args.prompt_tokens),
            "--gen-tokens", str(args.gen_tokens),
            "--json", out,
        ]
        if args.plan:
            cmd += ["--plan", args.plan]
        print("$ " + " ".join(cmd), file=sys.stderr)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sys.stderr.write(proc.stdout)
        if proc.returncode != 0:
            sys.exit(f"moa_bench_cpu failed with exit code {proc.returncode}")
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def run_llamacpp(args, prompt_ids):
    p, g = len(prompt_ids), args.gen_tokens
    n_batch = max(512, p)  # the whole prompt in one batch, like our single prefill call
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=p + g + 16,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=n_batch,
        n_ubatch=n_batch,
        logits_all=False,
        verbose=False,
    )
    n_vocab = llm.n_vocab()

    def last_logits():
        # With logits_all=False llama.cpp computes logits for the last token of a batch only.
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    # Warm-up, as in moa_bench_cpu: first touch of the weights and threads, not measured.
    llm.eval(prompt_ids[:8])
    llm.reset()

    t = time.perf_counter()
    llm.eval(prompt_ids)
    prefill_s = time.perf_counter() - t

    generated, step_s = [], []
    for _ in range(g):
        tok = int(np.argmax(last_logits()))
        generated.append(tok)
        t = time.perf_counter()
        llm.eval([tok])
        step_s.append(time.perf_counter() - t)
    decode_s = sum(step_s)
    return {
        "engine": "llama.cpp",
        "version": llama_cpp.__version__,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": p / prefill_s,
        "decode_s": decode_s,
        "decode_tokens_per_s": g / decode_s,
        "decode_median_ms": 1e3 * statistics.median(step_s),
        "generated_ids": generated,
    }


def best_of(runs):
    """Prefill from the run with the fastest prefill, decode from the one with the fastest decode."""
    best = dict(max(runs, key=lambda r: r["decode_tokens_per_s"]))
    best["prefill_tokens_per_s"] = max(r["prefill_tokens_per_s"] for r in runs)
    return best


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moa-bench", default=os.path.join(ROOT, "build", "bin", "moa_bench_cpu"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models",
                                                    "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--plan", default="", help="MoA plan for our engine (llama.cpp: dense)")
    ap.add_argument("--repeat", type=int, default=1, help="alternate the engines N times")
    ap.add_argument("--json", default="", help="also write both results here")
    args = ap.parse_args()
    if not os.path.exists(args.moa_bench):
        sys.exit(f"moa_bench_cpu not found at {args.moa_bench}; build it or pass --moa-bench")
    if not os.path.exists(args.model):
        sys.exit(f"model not found: {args.model}")

    load_before = os.getloadavg()
    ours_runs, theirs_runs = [], []
    for _ in range(max(1, args.repeat)):
        ours_runs.append(run_moa(args))
        prompt_ids = ours_runs[0]["prompt_ids"]
        if len(prompt_ids) != args.prompt_tokens:
            sys.exit(f"moa_bench_cpu returned {len(prompt_ids)} prompt ids, not "
                     f"{args.prompt_tokens}")
        theirs_runs.append(run_llamacpp(args, prompt_ids))
    load_after = os.getloadavg()
    ours, theirs = best_of(ours_runs), best_of(theirs_runs)
    for name, runs in (("moa", ours_runs), ("llama.cpp", theirs_runs)):
        print(f"{name} runs: decode tokens/s " +
              ", ".join(f"{r['decode_tokens_per_s']:.1f}" for r in runs) + "; prefill tokens/s " +
              ", ".join(f"{r['prefill_tokens_per_s']:.1f}" for r in runs), file=sys.stderr)

    rows = [
        ("prefill tokens/s", "prefill_tokens_per_s", "{:.1f}"),
        ("decode tokens/s", "decode_tokens_per_s", "{:.1f}"),
        ("decode median ms/token", "decode_median_ms", "{:.2f}"),
    ]
    print(f"model {os.path.basename(args.model)}, threads {args.threads}, "
          f"P={args.prompt_tokens}, G={args.gen_tokens}, plan {args.plan or 'dense'}, "
          f"llama-cpp-python {llama_cpp.__version__}, {platform.machine()}, best of "
          f"{max(1, args.repeat)}, load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after")
    print()
    print("| metric | llama.cpp | moa | moa / llama.cpp |")
    print("|---|---:|---:|---:|")
    for label, key, fmt in rows:
        a, b = theirs[key], ours[key]
        # For a time, lower is better: the ratio is inverted so that > 1 always means "faster".
        ratio = a / b if key.endswith("_ms") else b / a
        print(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio:.2f}x |")
    print()
    same = common_prefix(ours["generated_ids"], theirs["generated_ids"])
    print(f"greedy tokens identical to llama.cpp's: first {same} of {args.gen_tokens}")
    ratio = ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]
    verdict = "met" if ratio >= TARGET_DECODE_RATIO else "NOT met"
    print(f"decode ratio {ratio:.2f} (target >= {TARGET_DECODE_RATIO}): {verdict}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"moa": ours_runs, "llama.cpp": theirs_runs, "threads": args.threads}, f,
                      indent=1)


if __name__ == "__main__":
    main()
