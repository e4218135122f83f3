#!/usr/bin/env python3
"""Writes a tiny random Llama into tests/data/generated/tiny/ in the formats the loaders read.

  hf/            Hugging Face checkpoint, one F32 model.safetensors (+ an unused rotary_emb
                 tensor, which the loader must ignore), tokenizer.json, tokenizer_config.json,
                 generation_config.json
  hf_sharded/    the same weights in two shards + model.safetensors.index.json
  hf_f16/        the same weights in F16
  hf_bf16/       the same weights in BF16
  hf_tied/       tie_word_embeddings: no lm_head.weight, logits use the embedding
  hf_llama3/     the hf/ weights with rope_scaling {"rope_type": "llama3"}
  hf_linear/     the hf/ weights with rope_scaling {"type": "linear"}
  model-f32.gguf the hf/ weights converted the way llama.cpp's convert_hf_to_gguf.py does for
                 llama (Q and K rows permuted for interleaved RoPE), with a gpt2 tokenizer
  expected_logits.json
                 logits for every position of a fixed token sequence, computed here by an
                 independent float64 numpy Llama forward pass on the HF weights (for hf_f16 and
                 hf_bf16: on the weights rounded to that type)

Run: .venv/bin/python tests/tools/make_tiny_model.py   (needs numpy, tokenizers, safetensors, gguf)
"""

import json
import math
import pathlib
import shutil

import gguf
import numpy as np
import safetensors.numpy
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "generated" / "tiny"

N_LAYERS = 2
D_MODEL = 64
N_HEADS = 4
N_KV_HEADS = 2
HEAD_DIM = 16
D_FF = 96
VOCAB = 300
ROPE_THETA = 10000.0
RMS_EPS = 1e-5
MAX_POS = 128
TOKENS = [0, 72, 101, 108, 108, 111, 44, 299, 32, 119, 111, 114, 108, 100, 33, 257]

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
LINEAR_SCALING = {"type": "linear", "factor": 2.0}

CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
                 "</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer() -> Tokenizer:
    """A byte-level BPE with 2 special tokens, 256 byte tokens and 42 merges (300 in all)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    text = ["the quick brown fox jumps over the lazy dog. hello world, hello there!"] * 20
    tok.train_from_iterator(text, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    return tok


def make_weights(rng: np.random.Generator) -> dict:
    """HF-named float32 weights with unit-scale activations, so logits are O(1)."""
    def linear(out_f, in_f):
        return (rng.standard_normal((out_f, in_f)) / math.sqrt(in_f)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, D_MODEL)).astype(np.float32)}
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(D_MODEL)
        w[p + "self_attn.q_proj.weight"] = linear(N_HEADS * HEAD_DIM, D_MODEL)
        w[p + "self_attn.k_proj.weight"] = linear(N_KV_HEADS * HEAD_DIM, D_MODEL)
        w[p + "self_attn.v_proj.weight"] = linear(N_KV_HEADS * HEAD_DIM, D_MODEL)
        w[p + "self_attn.o_proj.weight"] = linear(D_MODEL, N_HEADS * HEAD_DIM)
        w[p + "post_attention_layernorm.weight"] = norm(D_MODEL)
        w[p + "mlp.gate_proj.weight"] = linear(D_FF, D_MODEL)
        w[p + "mlp.up_proj.weight"] = linear(D_FF, D_MODEL)
        w[p + "mlp.down_proj.weight"] = linear(D_MODEL, D_FF)
    w["model.norm.weight"] = norm(D_MODEL)
    w["lm_head.weight"] = linear(VOCAB, D_MODEL)
    return w


def hf_config(tied=False, rope_scaling=None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": D_MODEL, "intermediate_size": D_FF, "num_hidden_layers": N_LAYERS,
        "num_attention_heads": N_HEADS, "num_key_value_heads": N_KV_HEADS,
        "head_dim": HEAD_DIM, "rms_norm_eps": RMS_EPS, "rope_theta": ROPE_THETA,
        "max_position_embeddings": MAX_POS, "vocab_size": VOCAB, "tie_word_embeddings": tied,
        "rope_scaling": rope_scaling, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32",
    }


# --- numpy reference -------------------------------------------------------------------------

def inv_freq(rope_scaling):
    f = 1.0 / (ROPE_THETA ** (np.arange(0, HEAD_DIM, 2, dtype=np.float64) / HEAD_DIM))
    if rope_scaling is None:
        return f
    if rope_scaling.get("rope_type", rope_scaling.get("type")) == "linear":
        return f / rope_scaling["factor"]
    # transformers' _compute_llama3_parameters
    factor = rope_scaling["factor"]
    low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
    old_ctx = rope_scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / f
    scaled = np.where(wavelen > low_wavelen, f / factor, f)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def rms_norm(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + RMS_EPS) * w


def rope_half_split(x, positions, freqs):
    """x: [T, heads, head_dim]; HF rotate_half: dimension i rotates with i + head_dim/2."""
    ang = positions[:, None].astype(np.float64) * freqs[None, :]          # [T, hd/2]
    cos = np.concatenate([np.cos(ang), np.cos(ang)], axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(ang), np.sin(ang)], axis=-1)[:, None, :]
    half = HEAD_DIM // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def rope_interleaved(x, positions, freqs):
    """llama.cpp's normal RoPE: dimension 2i rotates with 2i+1."""
    ang = positions[:, None].astype(np.float64) * freqs[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def forward(w, tokens, tied=False, rope_scaling=None, rope=rope_half_split):
    w = {k: v.astype(np.float64) for k, v in w.items()}
    t = len(tokens)
    pos = np.arange(t)
    freqs = inv_freq(rope_scaling)
    x = w["model.embed_tokens.weight"][tokens]
    mask = np.triu(np.full((t, t), -np.inf), k=1)
    group = N_HEADS // N_KV_HEADS
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(t, N_HEADS, HEAD_DIM)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(t, N_KV_HEADS, HEAD_DIM)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(t, N_KV_HEADS, HEAD_DIM)
        q, k = rope(q, pos, freqs), rope(k, pos, freqs)
        out = np.empty((t, N_HEADS, HEAD_DIM))
        for hd in range(N_HEADS):
            g = hd // group
            s = q[:, hd, :] @ k[:, g, :].T / math.sqrt(HEAD_DIM) + mask
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            s /= s.sum(axis=-1, keepdims=True)
            out[:, hd, :] = s @ v[:, g, :]
        x = x + out.reshape(t, -1) @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"])
    out_w = w["model.embed_tokens.weight"] if tied else w["lm_head.weight"]
    return x @ out_w.T


# --- writers ---------------------------------------------------------------------------------

def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even."""
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def write_bf16_safetensors(path, tensors):
    """numpy has no bfloat16, so the safetensors package cannot write it: lay the file out by hand
    the way the package does (sorted names, contiguous data, header padded to 8 bytes)."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        data = to_bf16_bits(tensors[name]).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for b in blobs:
            f.write(b)


def write_hf_dir(d: pathlib.Path, config, tokenizer_files, weights=None, shards=None, bf16=None):
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config, indent=2))
    for name, text in tokenizer_files.items():
        (d / name).write_text(text)
    if bf16 is not None:
        write_bf16_safetensors(d / "model.safetensors", bf16)
    elif shards is None:
        safetensors.numpy.save_file(weights, str(d / "model.safetensors"),
                                    metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            safetensors.numpy.save_file(shard, str(d / fname), metadata={"format": "pt"})
            for name, t in shard.items():
                weight_map[name] = fname
                total += t.nbytes
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def llamacpp_permute(weights: np.ndarray, n_head: int, n_head_kv) -> np.ndarray:
    """LlamaModel.permute from llama.cpp's convert_hf_to_gguf.py."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


GGUF_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def write_gguf(path: pathlib.Path, weights, tok: Tokenizer):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(MAX_POS)
    w.add_embedding_length(D_MODEL)
    w.add_block_count(N_LAYERS)
    w.add_feed_forward_length(D_FF)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV_HEADS)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(VOCAB)
    w.add_rope_dimension_count(HEAD_DIM)

    tj = json.loads(tok.to_str())
    vocab = tj["model"]["vocab"]
    tokens = [None] * VOCAB
    for text, i in vocab.items():
        tokens[i] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in ("<s>", "</s>") else gguf.TokenType.NORMAL
                       for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)

    w.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in range(N_LAYERS):
        for suffix, name in GGUF_NAMES.items():
            t = weights[f"model.layers.{i}.{suffix}"]
            if suffix == "self_attn.q_proj.weight":
                t = llamacpp_permute(t, N_HEADS, N_HEADS)
            elif suffix == "self_attn.k_proj.weight":
                t = llamacpp_permute(t, N_HEADS, N_KV_HEADS)
            w.add_tensor(f"blk.{i}.{name}", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", weights["model.norm.weight"])
    w.add_tensor("output.weight", weights["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240607)
    weights = make_weights(rng)
    tok = make_tokenizer()
    tokenizer_files = {
        "tokenizer.json": tok.to_str(),
        "tokenizer_config.json": json.dumps({
            "bos_token": "<s>", "eos_token": {"content": "</s>", "special": True},
            "add_bos_token": True, "chat_template": CHAT_TEMPLATE,
            "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2),
        "generation_config.json": json.dumps({"bos_token_id": 0, "eos_token_id": [1]}),
    }
    tied_weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    # A buffer some checkpoints carry; the loader must skip it.
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": inv_freq(None).astype(np.float32)}

    write_hf_dir(OUT / "hf", hf_config(), tokenizer_files, weights={**weights, **extra})
    first = {k: v for k, v in weights.items() if k.startswith(("model.embed", "model.layers.0."))}
    rest = {k: v for k, v in weights.items() if k not in first}
    write_hf_dir(OUT / "hf_sharded", hf_config(), tokenizer_files, shards=[first, rest])
    f16 = {k: v.astype(np.float16) for k, v in weights.items()}
    write_hf_dir(OUT / "hf_f16", {**hf_config(), "torch_dtype": "float16"}, tokenizer_files,
                 weights=f16)
    write_hf_dir(OUT / "hf_bf16", {**hf_config(), "torch_dtype": "bfloat16"}, tokenizer_files,
                 bf16=weights)
    write_hf_dir(OUT / "hf_tied", hf_config(tied=True), tokenizer_files, weights=tied_weights)
    write_hf_dir(OUT / "hf_llama3", hf_config(rope_scaling=LLAMA3_SCALING), tokenizer_files,
                 weights=weights)
    write_hf_dir(OUT / "hf_linear", hf_config(rope_scaling=LINEAR_SCALING), tokenizer_files,
                 weights=weights)
    write_gguf(OUT / "model-f32.gguf", weights, tok)

    f16_back = {k: v.astype(np.float32) for k, v in f16.items()}
    bf16_back = {k: from_bf16_bits(to_bf16_bits(v)) for k, v in weights.items()}
    logits = {
        "hf": forward(weights, TOKENS),
        "hf_f16": forward(f16_back, TOKENS),
        "hf_bf16": forward(bf16_back, TOKENS),
        "hf_tied": forward(tied_weights, TOKENS, tied=True),
        "hf_llama3": forward(weights, TOKENS, rope_scaling=LLAMA3_SCALING),
        "hf_linear": forward(weights, TOKENS, rope_scaling=LINEAR_SCALING),
    }
    # Self-check of the GGUF conversion: interleaved RoPE on the permuted weights is the same
    # model as half-split RoPE on the originals.
    permuted = dict(weights)
    for i in range(N_LAYERS):
        q = f"model.layers.{i}.self_attn.q_proj.weight"
        k = f"model.layers.{i}.self_attn.k_proj.weight"
        permuted[q] = llamacpp_permute(weights[q], N_HEADS, N_HEADS)
        permuted[k] = llamacpp_permute(weights[k], N_HEADS, N_KV_HEADS)
    assert np.abs(forward(permuted, TOKENS, rope=rope_interleaved) - logits["hf"]).max() < 1e-9
    assert np.abs(forward(permuted, TOKENS) - logits["hf"]).max() > 1e-2
    # The scaled variants must differ from the plain one, or their tests prove nothing.
    assert np.abs(logits["hf_llama3"] - logits["hf"]).max() > 1e-2
    assert np.abs(logits["hf_linear"] - logits["hf"]).max() > 1e-2
    expected = {"tokens": TOKENS, "vocab_size": VOCAB,
                "logits": {k: v.tolist() for k, v in logits.items()}}
    (OUT / "expected_logits.json").write_text(json.dumps(expected))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
