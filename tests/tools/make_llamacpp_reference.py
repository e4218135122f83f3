#!/usr/bin/env python3
"""Reference logits, token ids and greedy continuations from llama.cpp (llama-cpp-python).

This is the independent whole-model check for tests/llamacpp_conformance_test.cc: llama.cpp runs
the default model on a fixed set of prompts and we record what it computes, so the C++ test can
feed the very same token ids to moa::LlamaModel and compare.

Writes, into tests/data/generated/:
  llamacpp_reference.json  metadata, the prompts (text and llama.cpp's token ids), the recorded
                           positions and where their logits are in the .bin, and the greedy
                           continuations (with llama.cpp's top-2 margin at each step).
  llamacpp_reference.bin   the logits, one row per recorded position, prompts in order. Each
                           row is compressed to stay small (~100 KB instead of 200 KB): float32
                           offset, float32 scale, then n_vocab uint16 q; logit = offset + q * scale
                           (all little-endian). The rounding error is at most scale / 2, about
                           0.0005 for SmolLM2's logit range of ~60, far below any tolerance.

Run:  .venv/bin/python tests/tools/make_llamacpp_reference.py [--model PATH] [--out DIR]
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

import llama_cpp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_OUT = os.path.join(ROOT, "tests", "data", "generated")

N_CTX = 2048
N_THREADS = 2
N_BATCH = 512
GREEDY_TOKENS = 32
# For prompts longer than this, only every LONG_STRIDE-th position and the last LONG_TAIL are
# recorded (keeps the data small; every position of a 1,000+ token prompt would be ~200 MB).
SHORT_LIMIT = 128
LONG_STRIDE = 16
LONG_TAIL = 32

# Varied text for the long prompt: prose on different subjects, a recipe, dialogue, a table of
# numbers, code and a list, so that the prompt exercises many different tokens and attention
# over a long range rather than a repeated sentence.
LONG_TEXT = """\
The history of the lighthouse is, in many ways, the history of coastal trade. Long before
electric lamps, keepers burned wood, then coal, then whale oil and finally kerosene, climbing
narrow spiral staircases several times a night to trim wicks and polish the great lenses. The
Fresnel lens, introduced in 1823, used concentric rings of glass prisms to bend light into a
single horizontal beam, so that a modest flame could be seen more than twenty miles out to sea.

Photosynthesis converts light energy into chemical energy. In the thylakoid membranes of the
chloroplast, photons excite electrons in chlorophyll; the electrons pass along a transport chain
that pumps protons and ultimately reduces NADP+ to NADPH, while water is split and oxygen is
released. The Calvin cycle then fixes carbon dioxide into three-carbon sugars, spending ATP and
NADPH. Roughly a third of the absorbed energy ends up stored in glucose under ideal conditions.

Recipe: lemon and thyme roast chicken (serves four).
1. Heat the oven to 220 C. Pat a 1.6 kg chicken dry with kitchen paper.
2. Mix 40 g soft butter with the zest of one lemon, four sprigs of thyme and a pinch of salt.
3. Push the butter under the skin of the breast; put the halved lemon inside the bird.
4. Roast for 20 minutes, lower the heat to 180 C and cook for another 50-60 minutes.
5. Rest for 15 minutes before carving. Serve with the pan juices and boiled potatoes.

"Are you sure this is the right platform?" asked Mira, squinting at the departure board.
"It says Platform 9 for the 07:42 to Edinburgh," said Tom, "but the screen above us says
Glasgow." The announcer mumbled something about a signalling fault near Preston, and a
hundred commuters sighed at once. Mira pulled out her phone, checked the app, and laughed:
"Platform 4. They changed it ten minutes ago. Run!"

Quarterly results (in millions of euros):
| Quarter | Revenue | Costs | Margin |
|---------|---------|-------|--------|
| Q1 2023 | 412.7   | 350.1 | 15.2%  |
| Q2 2023 | 438.9   | 361.4 | 17.7%  |
| Q3 2023 | 401.3   | 349.8 | 12.8%  |
| Q4 2023 | 476.5   | 384.0 | 19.4%  |

def merge_intervals(intervals):
    \"\"\"Merges overlapping [start, end] intervals; returns them sorted.\"\"\"
    result = []
    for start, end in sorted(intervals):
        if result and start <= result[-1][1]:
            result[-1][1] = max(result[-1][1], end)
        else:
            result.append([start, end])
    return result

Le marché du samedi matin est un petit théâtre : les maraîchers crient leurs prix, les enfants
goûtent les fraises, et le fromager coupe des tranches de comté pour qui veut bien s'arrêter.
Auf dem Markt in München gibt es im Herbst Kürbisse, Äpfel und frischen Federweißer.

Things to check before a long bicycle tour:
- tyre pressure and the condition of the tread;
- brake pads, cables and the chain (clean, then oil sparingly);
- a spare inner tube, tyre levers, a mini pump and a multi-tool;
- lights, a reflective vest, water bottles and something salty to eat.

In mathematics, a prime number is a natural number greater than 1 that has no positive
divisors other than 1 and itself. Euclid proved that there are infinitely many primes: given
any finite list p1, p2, ..., pn, the number p1*p2*...*pn + 1 is divisible by none of them. The
prime number theorem says that the number of primes below x is approximately x / ln(x); for
x = 1,000,000 this gives about 72,382, while the true count is 78,498.

Volcanoes form where magma reaches the surface. At mid-ocean ridges, plates pull apart and
basaltic lava wells up quietly; at subduction zones, water carried down with the sinking plate
lowers the melting point of the mantle above it, producing viscous, gas-rich magma and the
explosive eruptions of places like Mount St. Helens, Pinatubo and Krakatoa. Hawaii, far from
any plate boundary, sits above a hot spot that has built a chain of islands as the Pacific
plate drifts northwest at roughly seven centimetres a year.

The committee met on Tuesday to review the proposal. After a long discussion about budgets,
timelines and the risk of delays in the supply of components, it agreed to fund the first
phase, to ask for a revised estimate for the second, and to meet again in six weeks.
"""

PROMPTS = [
    ("english", "The quick brown fox jumps over the lazy dog. Then it ran into the forest"),
    (
        "chat",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    (
        "code",
        "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n"
        "print([fib(i) for i in range(",
    ),
    ("multilingual", "Bonjour, ça va? Grüße aus Köln! Привет, мир. 東京は日本の首都です。 🙂 naïve"),
    ("numbers", "Pi is 3.14159, 2^10 = 1024 and 1,234 + 89 = 1,323; 0x1F is"),
    ("long", LONG_TEXT),
]


def recorded_positions(n):
    if n <= SHORT_LIMIT:
        return list(range(n))
    keep = set(range(0, n, LONG_STRIDE)) | set(range(n - LONG_TAIL, n))
    return sorted(keep)


def encode_row(r):
    lo, hi = float(r.min()), float(r.max())
    scale = (hi - lo) / 65535.0 if hi > lo else 1.0
    q = np.clip(np.rint((r.astype(np.float64) - lo) / scale), 0, 65535).astype("<u2")
    return np.array([lo, scale], dtype="<f4").tobytes() + q.tobytes()


def last_logits(llm):
    return np.array(llm.scores[llm.n_tokens - 1, :], dtype=np.float32)


def greedy_continuation(llm):
    """GREEDY_TOKENS argmax steps after what llm has evaluated; also llama.cpp's top-2 margins."""
    greedy, margins = [], []
    cur = last_logits(llm)
    for _ in range(GREEDY_TOKENS):
        top2 = np.argsort(cur)[-2:]
        tok = int(top2[1])
        greedy.append(tok)
        margins.append(float(cur[top2[1]] - cur[top2[0]]))
        llm.eval([tok])
        cur = last_logits(llm)
    return greedy, margins


def compare(ref, alt, positions, greedy, alt_greedy):
    """How far `alt` (llama.cpp in another configuration) is from the reference, measured at the
    recorded positions exactly as the C++ test measures us."""
    a, b = ref[positions], alt[positions]
    diff = np.abs(b - a)
    top1_disagree, min_overlap = [], 5
    for k, pos in enumerate(positions):
        best_alt = int(np.argmax(b[k]))
        if best_alt != int(np.argmax(a[k])):
            top1_disagree.append({"position": pos, "lead": float(a[k].max() - a[k][best_alt])})
        overlap = len(set(np.argsort(a[k])[-5:].tolist()) & set(np.argsort(b[k])[-5:].tolist()))
        min_overlap = min(min_overlap, overlap)
    same = 0
    while same < len(greedy) and alt_greedy[same] == greedy[same]:
        same += 1
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_position_mean_abs_diff": float(diff.mean(axis=1).max()),
        "top1_disagreements": top1_disagree,
        "min_top5_overlap": min_overlap,
        "greedy_identical_prefix": same,
    }


def new_llama(model, **kwargs):
    return llama_cpp.Llama(
        model_path=model,
        n_ctx=N_CTX,
        logits_all=True,
        n_threads=N_THREADS,
        n_threads_batch=N_THREADS,
        n_batch=N_BATCH,
        verbose=False,
        **kwargs,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    if not os.path.exists(args.model):
        sys.exit(f"model not found: {args.model}")
    os.makedirs(args.out, exist_ok=True)

    # The reference: llama.cpp's defaults (F16 KV cache), the prompt in one batch.
    llm = new_llama(args.model)
    # llama.cpp's noise floor: how far llama.cpp is from itself in two other valid configurations.
    # With 8-bit activation quantization this model amplifies rounding differences (a value near
    # a rounding boundary moves by a whole quantization step), so any other correct
    # implementation is expected to differ by about as much; the C++ test's bounds are set from
    # these numbers.
    llm_f32kv = new_llama(args.model, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32)
    n_vocab = llm.n_vocab()
    t0 = time.time()

    bin_path = os.path.join(args.out, "llamacpp_reference.bin")
    out_prompts = []
    row = 0
    with open(bin_path + ".tmp", "wb") as fbin:
        for name, text in PROMPTS:
            # SmolLM2 does not add BOS (tokenizer.ggml.add_bos_token = false), so neither do we.
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if name == "long" and len(ids) <= 1000:
                sys.exit(f"long prompt has only {len(ids)} tokens; it must have more than 1000")
            llm.reset()
            llm.eval(ids)
            positions = recorded_positions(len(ids))
            batched = np.array(llm.scores[: len(ids), :], dtype=np.float32)  # a copy
            if not np.all(np.isfinite(batched[positions])):
                sys.exit(f"non-finite logits from llama.cpp for prompt {name}")
            for r in batched[positions]:
                fbin.write(encode_row(r))

            # Greedy continuation with our own argmax (no sampler): the next token is the argmax
            # of the last logits; llama.cpp evaluates it with the KV cache, one token per call.
            greedy, margins = greedy_continuation(llm)

            noise = {}
            llm_f32kv.reset()
            llm_f32kv.eval(ids)
            alt = np.array(llm_f32kv.scores[: len(ids), :], dtype=np.float32)
            noise["f32_kv_cache"] = compare(batched, alt, positions, greedy,
                                            greedy_continuation(llm_f32kv)[0])
            if len(ids) <= SHORT_LIMIT:  # one call per token: only affordable for short prompts
                llm.reset()
                for t in ids:
                    llm.eval([t])
                alt = np.array(llm.scores[: len(ids), :], dtype=np.float32)
                noise["one_token_per_call"] = compare(batched, alt, positions, greedy,
                                                      greedy_continuation(llm)[0])
            out_prompts.append(
                {
                    "name": name,
                    "text": text,
                    "token_ids": [int(t) for t in ids],
                    "positions": positions,
                    "logits_row": row,  # first row of this prompt in the .bin
                    "greedy_tokens": greedy,
                    "greedy_top2_margin": margins,
                    "llamacpp_noise_floor": noise,
                }
            )
            row += len(positions)
            summary = "; ".join(
                f"{k}: max |diff| {v['max_abs_diff']:.3f}, mean {v['mean_abs_diff']:.3f}, "
                f"{len(v['top1_disagreements'])} top-1 changes, greedy prefix "
                f"{v['greedy_identical_prefix']}"
                for k, v in noise.items()
            )
            print(f"{name}: {len(ids)} tokens, {len(positions)} positions; noise floor: {summary}",
                  file=sys.stderr)

    meta = {
        "generator": "tests/tools/make_llamacpp_reference.py",
        "llama_cpp_python_version": llama_cpp.__version__,
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace"),
        "model": os.path.basename(args.model),
        "model_bytes": os.path.getsize(args.model),
        "n_ctx": N_CTX,
        "n_threads": N_THREADS,
        "n_batch": N_BATCH,
        "kv_cache": "f16 (llama.cpp default)",
        "n_vocab": n_vocab,
        "add_bos": False,
        "parse_special": True,
        "greedy_tokens": GREEDY_TOKENS,
        "logits_file": "llamacpp_reference.bin",
        "logits_encoding": "row: f32 offset, f32 scale, u16[n_vocab] q; logit = offset + q*scale",
        "logits_rows": row,
        "machine": platform.processor() or platform.machine(),
        "prompts": out_prompts,
    }
    json_path = os.path.join(args.out, "llamacpp_reference.json")
    with open(json_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    # Rename last so that a half-written pair is never mistaken for reference data.
    os.replace(bin_path + ".tmp", bin_path)
    os.replace(json_path + ".tmp", json_path)
    size_mb = os.path.getsize(bin_path) / 1e6
    print(f"wrote {json_path} and {bin_path} ({row} rows, {size_mb:.1f} MB) "
          f"in {time.time() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
