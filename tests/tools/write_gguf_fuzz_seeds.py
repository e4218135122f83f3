#!/usr/bin/env python3
"""Seed GGUF files for tests/fuzz/gguf_fuzzer.cc, written with the `gguf` package (llama.cpp's
own Python writer). tests/gguf_test.cc also reads them, as files from an independent writer;
the values it checks are the ones set here. The outputs are committed (each well under 64 KiB);
rerun this only when changing them.

Writes, into tests/fuzz/corpus/gguf/:
  all_types.gguf     v3: one metadata key of every value type (nested arrays too), and a tensor
                     of every supported format
  tiny_llama.gguf    v3: a complete 1-layer Llama (d_model 32, 4/2 heads, vocab 40) with a gpt2
                     tokenizer and a chat template; loadable by LoadGgufModel
  align64_v2.gguf    all_types.gguf's content with general.alignment = 64, as version 2
  empty.gguf         v3 header with no metadata and no tensors

Run:  .venv/bin/python tests/tools/write_gguf_fuzz_seeds.py [--out DIR]
"""

import argparse
import os
import struct
import tempfile

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGML_QUANT_SIZES, GGUFValueType as V, GGUFWriter
from gguf.quants import quantize


def write(path, fill, alignment=None, version=None):
    w = GGUFWriter(path, arch=None)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    fill(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if version is not None:  # v2 and v3 share the little-endian layout; only the field differs
        with open(path, "r+b") as f:
            f.seek(4)
            f.write(struct.pack("<I", version))
    size = os.path.getsize(path)
    assert size < 64 * 1024, (path, size)
    print(f"{os.path.basename(path)}: {size} bytes")


def k_quant_blocks(rng, qtype, n_blocks):
    """Random K-quant blocks with finite fp16 scales at their fields."""
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    scale_offsets = {T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}[qtype]
    for off in scale_offsets:
        raw[:, off:off + 2] = (rng.uniform(-1, 1, n_blocks).astype(np.float16)
                               .view(np.uint8).reshape(n_blocks, 2))
    return raw


def fill_all_types(w):
    rng = np.random.default_rng(7)
    w.add_string("general.architecture", "test")
    w.add_key_value("t.u8", 200, V.UINT8)
    w.add_key_value("t.i8", -100, V.INT8)
    w.add_key_value("t.u16", 60000, V.UINT16)
    w.add_key_value("t.i16", -30000, V.INT16)
    w.add_key_value("t.u32", 4000000000, V.UINT32)
    w.add_key_value("t.i32", -2000000000, V.INT32)
    w.add_key_value("t.f32", 1.5, V.FLOAT32)
    w.add_key_value("t.bool", True, V.BOOL)
    w.add_key_value("t.str", "héllo", V.STRING)
    w.add_key_value("t.u64", 2**63 + 5, V.UINT64)
    w.add_key_value("t.i64", -(2**40), V.INT64)
    w.add_key_value("t.f64", 0.1, V.FLOAT64)
    w.add_key_value("t.arr_i16", [1, -2, 3], V.ARRAY, sub_type=V.INT16)
    w.add_key_value("t.arr_f32", [0.5, -0.25], V.ARRAY, sub_type=V.FLOAT32)
    w.add_key_value("t.arr_str", ["a", "", "ccc"], V.ARRAY, sub_type=V.STRING)
    w.add_key_value("t.arr_nested", [["x", "y"], ["z"]], V.ARRAY, sub_type=V.ARRAY)

    w.add_tensor("f32", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("f16", np.linspace(-1, 1, 32, dtype=np.float16))
    w.add_tensor("bf16", np.zeros((2, 16), dtype=np.uint8), raw_dtype=T.BF16)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    for qtype in (T.Q8_0, T.Q4_0, T.Q4_1):
        w.add_tensor(qtype.name.lower(), quantize(x, qtype), raw_dtype=qtype)
    for qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
        w.add_tensor(qtype.name.lower(), k_quant_blocks(rng, qtype, 2), raw_dtype=qtype)


def fill_tiny_llama(w):
    rng = np.random.default_rng(11)
    d, n_heads, n_kv, head_dim, ff, vocab = 32, 4, 2, 8, 64, 40
    w.add_string("general.architecture", "llama")
    w.add_string("general.name", "tiny test llama")
    w.add_uint32("llama.block_count", 1)
    w.add_uint32("llama.context_length", 256)
    w.add_uint32("llama.embedding_length", d)
    w.add_uint32("llama.feed_forward_length", ff)
    w.add_uint32("llama.attention.head_count", n_heads)
    w.add_uint32("llama.attention.head_count_kv", n_kv)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32("llama.rope.dimension_count", head_dim)
    w.add_uint32("llama.vocab_size", vocab)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "default")
    tokens = ["<s>", "</s>", "<unk>"] + [chr(ord("a") + i) for i in range(26)]
    tokens += ["ab", "cd", "ef", "Ġ", "Ġa", "gh", "ij", "kl", "mn", "op", "qr"]
    assert len(tokens) == vocab
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_token_merges(["a b", "c d", "e f", "Ġ a", "g h"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_unk_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")

    def weight(name, rows, cols, qtype):
        x = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
        if qtype == T.F32:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, quantize(x, qtype), raw_dtype=qtype)

    weight("token_embd.weight", vocab, d, T.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(d, dtype=np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(d, dtype=np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(d, dtype=np.float32))
    weight("blk.0.attn_q.weight", n_heads * head_dim, d, T.Q4_1)
    weight("blk.0.attn_k.weight", n_kv * head_dim, d, T.Q4_1)
    weight("blk.0.attn_v.weight", n_kv * head_dim, d, T.Q4_0)
    weight("blk.0.attn_output.weight", d, n_heads * head_dim, T.F32)
    weight("blk.0.ffn_gate.weight", ff, d, T.Q4_1)
    weight("blk.0.ffn_up.weight", ff, d, T.Q4_1)
    weight("blk.0.ffn_down.weight", d, ff, T.Q8_0)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(here, "..", "fuzz", "corpus", "gguf"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    write(os.path.join(args.out, "all_types.gguf"), fill_all_types)
    write(os.path.join(args.out, "tiny_llama.gguf"), fill_tiny_llama)
    write(os.path.join(args.out, "align64_v2.gguf"), fill_all_types, alignment=64, version=2)
    write(os.path.join(args.out, "empty.gguf"), lambda w: None)


if __name__ == "__main__":
    main()
