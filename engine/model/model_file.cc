#include "engine/model/model_file.h"

#include <sys/stat.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/model/gguf_loader.h"
#include "engine/model/hf_loader.h"

namespace moa {

absl::StatusOr<ModelFile> LoadModel(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) {
    return absl::NotFoundError(absl::StrCat(path, ": ", std::strerror(errno)));
  }
  if (S_ISDIR(st.st_mode)) return LoadHfModel(path);

  char magic[4] = {};
  size_t got = 0;
  if (FILE* f = std::fopen(path.c_str(), "rb"); f != nullptr) {
    got = std::fread(magic, 1, sizeof(magic), f);
    std::fclose(f);
  } else {
    return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  }
  if (got == sizeof(magic) && std::memcmp(magic, "GGUF", 4) == 0) return LoadGgufModel(path);
  return absl::InvalidArgumentError(absl::StrCat(
      path,
      ": unrecognised model format; supported are GGUF files and Hugging Face checkpoint "
      "directories (config.json + *.safetensors + tokenizer files)"));
}

namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::Status CheckTensor(const ModelFile& m, const std::string& name,
                         const std::vector<int64_t>& shape) {
  auto it = m.tensors.find(name);
  if (it == m.tensors.end()) {
    return absl::NotFoundError(absl::StrCat("missing tensor '", name, "'"));
  }
  const HostTensor& t = it->second;
  if (t.shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor '", name, "' has shape ", ShapeString(t.shape), ", expected ", ShapeString(shape)));
  }
  // Backends read nbytes from data: make sure they agree with the shape and the format.
  absl::StatusOr<int64_t> row_bytes = RowBytes(t.dtype, shape.back());
  if (!row_bytes.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "': ", row_bytes.status().message()));
  }
  const int64_t rows = t.NumElements() / shape.back();
  if (t.data == nullptr || t.nbytes != rows * *row_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' holds ", t.nbytes,
                                                   " bytes, expected ", rows * *row_bytes, " for ",
                                                   GetDTypeInfo(t.dtype).name, ShapeString(shape)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateTensors(const ModelFile& m) {
  const ModelConfig& c = m.config;
  const int64_t d = c.d_model, q = int64_t{c.n_heads} * c.head_dim,
                kv = int64_t{c.n_kv_heads} * c.head_dim, ff = c.d_ff, vocab = c.vocab_size;
  std::vector<std::pair<std::string, std::vector<int64_t>>> expected = {
      {"token_embd.weight", {vocab, d}},
      {"output_norm.weight", {d}},
  };
  if (!c.tied_embeddings) expected.push_back({"output.weight", {vocab, d}});
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = absl::StrCat("blk.", l, ".");
    expected.push_back({p + "attn_norm.weight", {d}});
    expected.push_back({p + "attn_q.weight", {q, d}});
    expected.push_back({p + "attn_k.weight", {kv, d}});
    expected.push_back({p + "attn_v.weight", {kv, d}});
    expected.push_back({p + "attn_output.weight", {d, q}});
    expected.push_back({p + "ffn_norm.weight", {d}});
    expected.push_back({p + "ffn_gate.weight", {ff, d}});
    expected.push_back({p + "ffn_up.weight", {ff, d}});
    expected.push_back({p + "ffn_down.weight", {d, ff}});
  }
  for (const auto& [name, shape] : expected) {
    if (absl::Status s = CheckTensor(m, name, shape); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status ValidateConfig(const ModelConfig& c) {
  auto bad = [](absl::string_view field, auto value, absl::string_view rule) {
    return absl::InvalidArgumentError(
        absl::StrCat("model config: ", field, " = ", value, " ", rule));
  };
  // Upper limits far above any real Llama-family model: they catch corrupt or hostile files
  // before sizes derived from them (caches, buffers) are computed.
  struct Limit {
    absl::string_view field;
    int64_t value;
    int64_t max;
  };
  const Limit limits[] = {
      {"n_layers", c.n_layers, 1024},        {"d_model", c.d_model, 65536},
      {"n_heads", c.n_heads, 1024},          {"n_kv_heads", c.n_kv_heads, 1024},
      {"head_dim", c.head_dim, 1024},        {"d_ff", c.d_ff, 1 << 20},
      {"vocab_size", c.vocab_size, 4 << 20}, {"max_context", c.max_context, 16 << 20},
  };
  for (const Limit& l : limits) {
    if (l.value <= 0 || l.value > l.max) {
      return bad(l.field, l.value, absl::StrCat("is outside 1..", l.max));
    }
  }
  if (c.n_heads % c.n_kv_heads != 0) {
    return bad("n_heads", c.n_heads,
               absl::StrCat("is not a multiple of n_kv_heads ", c.n_kv_heads));
  }
  if (c.head_dim % 2 != 0) return bad("head_dim", c.head_dim, "is odd (RoPE rotates pairs)");
  if (!std::isfinite(c.rms_eps) || c.rms_eps <= 0.0f || c.rms_eps >= 1.0f) {
    return bad("rms_eps", c.rms_eps, "is outside (0, 1)");
  }
  if (!std::isfinite(c.rope_theta) || c.rope_theta <= 1.0) {
    return bad("rope_theta", c.rope_theta, "is not a finite number above 1");
  }
  const RopeScaling& r = c.rope_scaling;
  if (r.type != RopeScaling::Type::kNone) {
    if (!std::isfinite(r.factor) || r.factor <= 0.0) {
      return bad("rope_scaling.factor", r.factor, "is not a positive finite number");
    }
  }
  if (r.type == RopeScaling::Type::kLlama3) {
    if (r.original_max_position <= 0) {
      return bad("rope_scaling.original_max_position", r.original_max_position, "is not positive");
    }
    if (!std::isfinite(r.low_freq_factor) || !std::isfinite(r.high_freq_factor) ||
        r.low_freq_factor <= 0.0 || r.high_freq_factor <= r.low_freq_factor) {
      return bad("rope_scaling.high_freq_factor", r.high_freq_factor,
                 absl::StrCat("must exceed low_freq_factor ", r.low_freq_factor, " > 0"));
    }
  }
  return absl::OkStatus();
}

}  // namespace moa
