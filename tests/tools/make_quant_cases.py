#!/usr/bin/env python3
"""Reference cases for tests/quant_test.cc, computed by the `gguf` package (gguf-py, llama.cpp's
own Python implementation of the formats; numpy, independent of our C++).

Writes, into tests/data/generated/quant_cases/ (all little-endian, no headers; the element count
of a case is the size of its .f32 file / 4):
  <TYPE>.bin            random blocks of TYPE (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K,
                        Q6_K); every fp16 scale is a finite value, the rest is random bytes
  <TYPE>.f32            gguf.quants.dequantize of <TYPE>.bin, float32
  <TYPE>.quant_in.f32   float32 inputs for quantization (Q8_0, Q4_0, Q4_1 only), including
                        awkward blocks: all zero, constant, one outlier, ties
  <TYPE>.quant_out.bin  gguf.quants.quantize of those inputs (bit-exact with ggml's
                        quantize_row_*_ref)

Run:  .venv/bin/python tests/tools/make_quant_cases.py [--out DIR]
"""

import argparse
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

N_BLOCKS = 64

# Byte offsets of the fp16 scales in each block (ggml-common.h).
FP16_FIELDS = {
    T.Q8_0: [0],
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}


def random_fp16(rng, n):
    """Finite half floats across many binades, subnormals included, both signs."""
    mag = np.exp2(rng.uniform(-26.0, 8.0, size=n)).astype(np.float16)
    sign = np.where(rng.random(n) < 0.5, -1, 1).astype(np.float16)
    out = (mag * sign).astype(np.float16)
    assert np.all(np.isfinite(out))
    return out


def make_blocks(rng, qtype):
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(N_BLOCKS, block_bytes), dtype=np.uint8)
    if qtype == T.F16:
        # Every class of half: random finite values, then zeros, subnormals, inf and NaN.
        vals = random_fp16(rng, N_BLOCKS)
        vals[:6] = np.array([0.0, -0.0, 6e-8, -6.1e-5, np.inf, -np.inf], dtype=np.float16)
        raw = vals.view(np.uint8).reshape(N_BLOCKS, 2)
        raw[6] = np.array([0x01, 0x7E], dtype=np.uint8)  # quiet NaN with payload
    elif qtype == T.BF16:
        raw[0] = np.array([0x80, 0x7F], dtype=np.uint8)  # +inf
        raw[1] = np.array([0x01, 0x00], dtype=np.uint8)  # subnormal
    elif qtype == T.F32:
        vals = rng.standard_normal(N_BLOCKS).astype(np.float32)
        raw = vals.view(np.uint8).reshape(N_BLOCKS, 4)
    for off in FP16_FIELDS.get(qtype, []):
        raw[:, off:off + 2] = random_fp16(rng, N_BLOCKS).view(np.uint8).reshape(N_BLOCKS, 2)
    return np.ascontiguousarray(raw)


def make_quant_inputs(rng, block_elems):
    blocks = [
        rng.standard_normal(block_elems),
        rng.standard_normal(block_elems) * 1e-3 + 5.0,  # far from zero: exercises Q4_1's min
        np.zeros(block_elems),
        np.full(block_elems, -2.5),
        np.concatenate([[100.0], rng.standard_normal(block_elems - 1) * 0.01]),
        np.linspace(-8.0, 7.0, block_elems),  # lands on exact .5 ties for some codes
        rng.uniform(-1e4, 1e4, block_elems),
    ]
    blocks += [rng.standard_normal(block_elems) * s for s in np.exp2(rng.uniform(-10, 10, 25))]
    return np.concatenate(blocks).astype(np.float32)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(here, "..", "data", "generated", "quant_cases"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(20240611)

    for qtype in [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K]:
        raw = make_blocks(rng, qtype)
        with np.errstate(invalid="ignore", over="ignore"):
            ref = dequantize(raw.reshape(-1), qtype).astype(np.float32).reshape(-1)
        raw.tofile(os.path.join(args.out, f"{qtype.name}.bin"))
        ref.tofile(os.path.join(args.out, f"{qtype.name}.f32"))
        print(f"{qtype.name}: {ref.size} elements")

    for qtype in [T.Q8_0, T.Q4_0, T.Q4_1]:
        block_elems, _ = GGML_QUANT_SIZES[qtype]
        x = make_quant_inputs(rng, block_elems)
        q = quantize(x.reshape(-1, block_elems), qtype)
        x.tofile(os.path.join(args.out, f"{qtype.name}.quant_in.f32"))
        np.ascontiguousarray(q).tofile(os.path.join(args.out, f"{qtype.name}.quant_out.bin"))
        print(f"{qtype.name}: {x.size} elements quantized")


if __name__ == "__main__":
    main()
