#!/usr/bin/env python3
"""HF transformers baseline for bench/gpu/moa_bench_gpu.cc: decode tokens/s of a random-weight
LlamaForCausalLM, fp16, attention "sdpa", on the same shapes.

    python3 bench/hf_sdpa_decode.py --shape llama2-7b --prompts 4096,8192 --batch auto --steps 32

Builds the model on the GPU from a LlamaConfig (random init, no checkpoint), and per prompt
length prefills a batch of random prompts in chunks through a DynamicCache, then times decode
steps (one token per sequence, greedy on the logits) after warm-up, with torch.cuda.synchronize
around each step. --batch auto takes the largest batch whose fp16 KV cache fits the free memory
after the model is built, cut by a quarter until a run fits (HF's activations and the copies
DynamicCache makes as it grows are not in the estimate).
Prints one JSON line per prompt length on stdout; progress on stderr.
"""

import argparse
import gc
import json
import math
import statistics
import sys
import time

SHAPES = {
    # name: (layers, d_model, heads, kv_heads, d_ff, vocab, rope_theta)
    "llama2-7b": (32, 4096, 32, 32, 11008, 32000, 10000.0),
    "llama3-8b": (32, 4096, 32, 8, 14336, 128256, 500000.0),
}


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def make_config(args):
    from transformers import LlamaConfig

    if args.config:
        cfg = LlamaConfig.from_json_file(args.config)
        name = args.config
    else:
        layers, d, heads, kv, ff, vocab, theta = SHAPES[args.shape]
        cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=d, num_attention_heads=heads,
                          num_key_value_heads=kv, intermediate_size=ff, vocab_size=vocab,
                          rope_theta=theta, max_position_embeddings=131072, rms_norm_eps=1e-5,
                          tie_word_embeddings=False)
        name = args.shape
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, 131072)
    return name, cfg


def first_batch(cfg, name, prompt, args):
    """The batch to try first: --batch, or with auto the most sequences whose fp16 KV cache fits
    the free memory less --headroom-gib."""
    import torch

    if args.batch != "auto":
        return int(args.batch)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    total = prompt + args.warmup + args.steps
    kv_per_seq = 2 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * total
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    batch = int((free - args.headroom_gib * 2**30) // kv_per_seq)
    log(f"[hf {name} {prompt}] {free / 2**30:.1f} GiB free, {kv_per_seq / 2**30:.2f} GiB KV per "
        f"sequence: batch {batch}")
    return max(0, min(batch, args.max_batch))


def run_prompt(model, cfg, name, prompt, batch, args):
    """Prefill `batch` random prompts of `prompt` tokens, then time decode steps; returns a result
    dict."""
    import torch
    from transformers import DynamicCache

    result = {"engine": "hf-sdpa", "shape": name, "prompt": prompt, "batch": batch,
              "steps": args.steps, "torch": torch.__version__}
    if batch < 1:
        result["error"] = "not one sequence fits"
        return result
    # Prefill chunks of about --prefill-tokens rows in all, bounding the activations' memory.
    chunk = max(64, args.prefill_tokens // batch // 64 * 64)
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device="cuda", generator=gen)
    cache = DynamicCache()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for start in range(0, prompt, chunk):
            out = model(input_ids=ids[:, start:start + chunk], past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
        log(f"[hf {name} {prompt}] prefill of {batch} x {prompt} tokens in {prefill_s:.1f} s")
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for step in range(args.warmup + args.steps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - t)
        finite = bool(torch.isfinite(out.logits).all())
    del cache, out, ids
    median = statistics.median(times)
    result.update({"prefill_s": prefill_s, "step_ms": median * 1e3, "tok_s": batch / median,
                   "mean_tok_s": batch * len(times) / math.fsum(times),
                   "finite_logits": finite,
                   "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
    log(f"[hf {name} {prompt}] decode: median step {median * 1e3:.1f} ms: "
        f"{batch / median:.1f} tokens/s")
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    p.add_argument("--config", default="", help="a config.json instead of --shape")
    p.add_argument("--prompts", default="4096", help="prompt lengths, comma-separated")
    p.add_argument("--batch", default="auto", help="a number, or auto")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--prefill-tokens", type=int, default=16384,
                   help="tokens per prefill chunk, all sequences together")
    p.add_argument("--headroom-gib", type=float, default=6.0,
                   help="memory kept free for activations when --batch is auto")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    name, cfg = make_config(args)
    t0 = time.perf_counter()
    # Built on the GPU directly; _from_config skips loading a checkpoint and HF's CPU init.
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa",
                                              dtype=torch.float16)
    model.eval()
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    log(f"[hf {name}] model built on the GPU in {build_s:.1f} s")
    for prompt in [int(x) for x in args.prompts.split(",") if x]:
        # The KV estimate leaves out HF's activations and the copies DynamicCache makes as it
        # grows (Llama-3-8B at batch 230 ran out of memory on a 5 GiB allocation on an H200): on
        # running out of memory, try again with a quarter fewer sequences (each try costs a
        # prefill), and say so in the result.
        batch = first_batch(cfg, name, prompt, args)
        oom_batches = []
        while True:
            try:
                result = run_prompt(model, cfg, name, prompt, batch, args)
                break
            except torch.OutOfMemoryError as e:
                error = f"out of memory: {str(e).splitlines()[0]}"
            # Outside the except block, so that the failed step's tensors are free to go.
            gc.collect()
            torch.cuda.empty_cache()
            oom_batches.append(batch)
            log(f"[hf {name} {prompt}] batch {batch}: {error}")
            batch = batch * 3 // 4
            if batch < 1:
                result = {"engine": "hf-sdpa", "shape": name, "prompt": prompt, "error": error}
                break
            log(f"[hf {name} {prompt}] trying batch {batch}")
        if oom_batches:
            result["out_of_memory_at_batch"] = oom_batches
        result["build_s"] = build_s
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
