#include "engine/model/gguf_loader.h"

#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "engine/model/gguf.h"

namespace moa {
namespace {

// Errors found here name the file as the GgufFile accessors do.
absl::Status Invalid(const GgufFile& f, absl::string_view msg) {
  return absl::InvalidArgumentError(absl::StrCat(f.name(), ": ", msg));
}
absl::Status Unsupported(const GgufFile& f, absl::string_view msg) {
  return absl::UnimplementedError(absl::StrCat(f.name(), ": ", msg));
}

// An integer hyper-parameter; ValidateConfig judges the value, ToInt refuses what
// does not fit an int. Absent keys give `fallback`, or an error when there is none.
absl::StatusOr<int64_t> GetInt(const GgufFile& f, const std::string& key,
                               std::optional<int64_t> fallback = std::nullopt) {
  if (!f.Has(key) && fallback.has_value()) return *fallback;
  return f.GetI64(key);
}

absl::Status ToInt(const GgufFile& f, const std::string& key, int64_t v, int* out) {
  if (!std::in_range<int>(v)) {
    return Invalid(f, absl::StrCat("GGUF metadata '", key, "' = ", v, " is out of range"));
  }
  *out = static_cast<int>(v);
  return absl::OkStatus();
}

absl::Status ReadConfig(const GgufFile& f, ModelConfig& c) {
  absl::StatusOr<std::string> arch = f.GetString("general.architecture");
  if (!arch.ok()) return arch.status();
  if (*arch != "llama" && *arch != "mistral") {
    return Invalid(f, absl::StrCat("architecture '", *arch, "' is not supported (llama, mistral)"));
  }
  c.architecture = *arch;
  if (f.Has("general.name")) {
    absl::StatusOr<std::string> name = f.GetString("general.name");
    if (!name.ok()) return name.status();
    c.name = *name;
  }
  const std::string p = *arch + ".";

  struct IntField {
    std::string key;
    int* out;
  };
  for (const IntField& field :
       {IntField{p + "block_count", &c.n_layers}, IntField{p + "embedding_length", &c.d_model},
        IntField{p + "feed_forward_length", &c.d_ff},
        IntField{p + "attention.head_count", &c.n_heads}}) {
    absl::StatusOr<int64_t> v = GetInt(f, field.key);
    if (!v.ok()) return v.status();
    if (absl::Status s = ToInt(f, field.key, *v, field.out); !s.ok()) return s;
  }
  absl::StatusOr<int64_t> kv_heads = GetInt(f, p + "attention.head_count_kv", c.n_heads);
  if (!kv_heads.ok()) return kv_heads.status();
  if (absl::Status s = ToInt(f, p + "attention.head_count_kv", *kv_heads, &c.n_kv_heads); !s.ok()) {
    return s;
  }

  // head_dim: attention.key_length when given, else the RoPE dimension count, else d_model /
  // n_heads. Llama rotates the whole head, so a RoPE dimension count that differs is refused.
  const int64_t default_head_dim = c.n_heads > 0 ? c.d_model / c.n_heads : 0;
  absl::StatusOr<int64_t> rope_dims = GetInt(f, p + "rope.dimension_count", default_head_dim);
  if (!rope_dims.ok()) return rope_dims.status();
  absl::StatusOr<int64_t> head_dim = GetInt(f, p + "attention.key_length", *rope_dims);
  if (!head_dim.ok()) return head_dim.status();
  if (absl::Status s = ToInt(f, p + "attention.key_length", *head_dim, &c.head_dim); !s.ok()) {
    return s;
  }
  if (*rope_dims != c.head_dim) {
    return Unsupported(
        f, absl::StrCat(p, "rope.dimension_count = ", *rope_dims, " differs from the head size ",
                        c.head_dim, ": partial RoPE is not supported"));
  }
  absl::StatusOr<int64_t> v_dim = GetInt(f, p + "attention.value_length", c.head_dim);
  if (!v_dim.ok()) return v_dim.status();
  if (*v_dim != c.head_dim) {
    return Invalid(f, absl::StrCat(p, "attention.value_length = ", *v_dim,
                                   " differs from the key length ", c.head_dim));
  }

  absl::StatusOr<int64_t> ctx = GetInt(f, p + "context_length");
  if (!ctx.ok()) return ctx.status();
  c.max_context = *ctx;

  absl::StatusOr<float> eps = f.GetF32(p + "attention.layer_norm_rms_epsilon");
  if (!eps.ok()) return eps.status();
  c.rms_eps = *eps;
  if (f.Has(p + "rope.freq_base")) {
    absl::StatusOr<double> theta = f.GetF64(p + "rope.freq_base");
    if (!theta.ok()) return theta.status();
    c.rope_theta = *theta;
  } else {
    c.rope_theta = 10000.0;
  }

  // RoPE scaling: rope.scaling.{type,factor,original_context_length}, or the older
  // rope.scale_linear. YaRN and per-dimension frequency tensors are not implemented.
  std::string scaling = "none";
  if (f.Has(p + "rope.scaling.type")) {
    absl::StatusOr<std::string> t = f.GetString(p + "rope.scaling.type");
    if (!t.ok()) return t.status();
    scaling = *t;
  } else if (f.Has(p + "rope.scale_linear")) {
    scaling = "linear";
  }
  if (scaling == "linear") {
    c.rope_scaling.type = RopeScaling::Type::kLinear;
    const std::string key =
        f.Has(p + "rope.scaling.factor") ? p + "rope.scaling.factor" : p + "rope.scale_linear";
    absl::StatusOr<double> factor = f.GetF64(key);
    if (!factor.ok()) return factor.status();
    c.rope_scaling.factor = *factor;
    if (f.Has(p + "rope.scaling.original_context_length")) {
      absl::StatusOr<int64_t> orig = f.GetI64(p + "rope.scaling.original_context_length");
      if (!orig.ok()) return orig.status();
      c.rope_scaling.original_max_position = *orig;
    }
  } else if (scaling != "none") {
    return Unsupported(
        f, absl::StrCat(p, "rope.scaling.type '", scaling, "' is not supported (none, linear)"));
  }
  if (f.FindTensor("rope_freqs.weight") != nullptr) {
    return Unsupported(
        f,
        "per-dimension RoPE frequency factors (rope_freqs.weight, e.g. Llama 3.1 scaling) are "
        "not supported");
  }

  // llama.cpp's converter permutes the rows of Q and K so that RoPE on adjacent pairs of the
  // GGUF weights equals Hugging Face's half-split RoPE on the original weights.
  c.rope_layout = RopeLayout::kInterleaved;
  c.tied_embeddings = f.FindTensor("output.weight") == nullptr;
  return absl::OkStatus();
}

template <typename T>
absl::Status Optional(const GgufFile& f, const std::string& key,
                      absl::StatusOr<T> (GgufFile::*get)(absl::string_view) const, T* out) {
  if (!f.Has(key)) return absl::OkStatus();
  absl::StatusOr<T> v = (f.*get)(key);
  if (!v.ok()) return v.status();
  *out = *std::move(v);
  return absl::OkStatus();
}

absl::Status ReadTokenizer(const GgufFile& f, GgufTokenizerData& t) {
  const std::string p = "tokenizer.ggml.";
  absl::StatusOr<std::string> model = f.GetString(p + "model");
  if (!model.ok()) return model.status();
  t.model = *model;
  absl::StatusOr<std::vector<std::string>> tokens = f.GetStringArray(p + "tokens");
  if (!tokens.ok()) return tokens.status();
  t.tokens = *std::move(tokens);
  if (t.tokens.empty()) return Invalid(f, "tokenizer.ggml.tokens is empty");
  // llama.cpp's defaults when the flags are absent: SentencePiece-style vocabularies add BOS and
  // a leading space, byte-level BPE ones neither.
  t.add_bos = t.model == "llama";
  t.add_space_prefix = t.model == "llama";
  t.add_eos = false;

  std::vector<absl::Status> results = {
      Optional(f, p + "pre", &GgufFile::GetString, &t.pre),
      Optional(f, p + "scores", &GgufFile::GetF32Array, &t.scores),
      Optional(f, p + "token_type", &GgufFile::GetI32Array, &t.token_types),
      Optional(f, p + "merges", &GgufFile::GetStringArray, &t.merges),
      Optional(f, p + "bos_token_id", &GgufFile::GetI32, &t.bos_id),
      Optional(f, p + "eos_token_id", &GgufFile::GetI32, &t.eos_id),
      Optional(f, p + "unknown_token_id", &GgufFile::GetI32, &t.unk_id),
      Optional(f, p + "padding_token_id", &GgufFile::GetI32, &t.pad_id),
      Optional(f, p + "add_bos_token", &GgufFile::GetBool, &t.add_bos),
      Optional(f, p + "add_eos_token", &GgufFile::GetBool, &t.add_eos),
      Optional(f, p + "add_space_prefix", &GgufFile::GetBool, &t.add_space_prefix),
  };
  for (const absl::Status& s : results) {
    if (!s.ok()) return s;
  }
  const size_t n = t.tokens.size();
  if (!t.scores.empty() && t.scores.size() != n) {
    return Invalid(f, absl::StrCat("tokenizer.ggml.scores has ", t.scores.size(), " entries for ",
                                   n, " tokens"));
  }
  if (!t.token_types.empty() && t.token_types.size() != n) {
    return Invalid(f, absl::StrCat("tokenizer.ggml.token_type has ", t.token_types.size(),
                                   " entries for ", n, " tokens"));
  }
  const std::pair<absl::string_view, int32_t> ids[] = {{"bos_token_id", t.bos_id},
                                                       {"eos_token_id", t.eos_id},
                                                       {"unknown_token_id", t.unk_id},
                                                       {"padding_token_id", t.pad_id}};
  for (const auto& [key, id] : ids) {
    if (id < -1 || id >= static_cast<int64_t>(n)) {
      return Invalid(f, absl::StrCat(p, key, " = ", id, " is not a token id (", n, " tokens)"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelFile> LoadGgufModel(const std::string& path) {
  absl::StatusOr<GgufFile> f = GgufFile::Open(path);
  if (!f.ok()) return f.status();  // already names the file
  ModelFile m;
  if (absl::Status s = ReadConfig(*f, m.config); !s.ok()) return s;
  m.tokenizer.has_gguf = true;
  if (absl::Status s = ReadTokenizer(*f, m.tokenizer.gguf); !s.ok()) return s;
  m.tokenizer.bos_id = m.tokenizer.gguf.bos_id;
  m.tokenizer.eos_id = m.tokenizer.gguf.eos_id;
  m.tokenizer.add_bos = m.tokenizer.gguf.add_bos;

  const std::string vocab_key = m.config.architecture + ".vocab_size";
  absl::StatusOr<int64_t> vocab =
      f->Has(vocab_key)
          ? f->GetI64(vocab_key)
          : absl::StatusOr<int64_t>(static_cast<int64_t>(m.tokenizer.gguf.tokens.size()));
  if (!vocab.ok()) return vocab.status();
  if (absl::Status s = ToInt(*f, vocab_key, *vocab, &m.config.vocab_size); !s.ok()) return s;

  if (f->Has("tokenizer.chat_template")) {
    absl::StatusOr<std::string> tmpl = f->GetString("tokenizer.chat_template");
    if (!tmpl.ok()) return tmpl.status();
    m.chat_template = *std::move(tmpl);
  }

  if (absl::Status s = ValidateConfig(m.config); !s.ok()) return Invalid(*f, s.message());
  for (const GgufTensorInfo& t : f->tensors()) {
    m.tensors.emplace(std::string(t.name), f->TensorView(t));
  }
  if (absl::Status s = ValidateTensors(m); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
  }
  return m;
}

}  // namespace moa
