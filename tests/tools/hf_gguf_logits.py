#!/usr/bin/env python3
"""Reference logits of a GGUF model from Hugging Face transformers, for the GPU test
HfTransformersLogits (tests/gpu/hf_logits_gpu_test.cc). Runs on the GPU machine, where torch and
transformers are installed; transformers reads GGUF through the pure-Python `gguf` package, which
must be importable (scripts/gpu-check.sh installs the carried wheel).

The model is dequantized to fp32 and run in fp32 with eager attention: the reference is as exact
as transformers gets. Prompts are tokenized by transformers' own GGUF tokenizer, so the ids are
independent of ours too.

Output (little-endian): int32 count; then per prompt int32 n, int32 vocab, n int32 ids,
n * vocab float32 logits.
"""
import argparse
import os
import struct
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a village at the edge of a great forest, there lived",
    # A long prompt (over 1,000 tokens) for positions far from the start.
    " ".join(f"Item {i}: the {['red', 'green', 'blue', 'amber'][i % 4]} box holds "
             f"{i * 7 % 13} stones." for i in range(110)) + " Which box holds the most stones?",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("out")
    args = ap.parse_args()
    folder, name = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager").to("cuda").eval()
    with open(args.out, "wb") as f:
        f.write(struct.pack("<i", len(PROMPTS)))
        for text in PROMPTS:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([ids], device="cuda")).logits[0].float().cpu().numpy()
            f.write(struct.pack("<ii", len(ids), logits.shape[1]))
            f.write(np.asarray(ids, dtype="<i4").tobytes())
            f.write(np.ascontiguousarray(logits, dtype="<f4").tobytes())
            print(f"hf_gguf_logits: {len(ids)} tokens, top-1 at the end "
                  f"{int(logits[-1].argmax())}", file=sys.stderr)


if __name__ == "__main__":
    main()
