#include "tests/test_util.h"

#include <sys/stat.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <mutex>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"

namespace moa::testing {

std::string SourceDir() {
  if (const char* s = std::getenv("MOA_SOURCE_DIR"); s != nullptr && *s != '\0') return s;
  return MOA_SOURCE_DIR;
}

std::string DefaultModelPath() {
  if (const char* s = std::getenv("MOA_MODEL"); s != nullptr && *s != '\0') return s;
  return SourceDir() + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

std::string GeneratedDataDir() { return SourceDir() + "/tests/data/generated"; }

namespace {
std::vector<std::string>& TempDirs() {
  static auto* dirs = new std::vector<std::string>();
  return *dirs;
}
void RemoveTempDirs() {
  for (const auto& d : TempDirs()) {
    std::error_code ec;
    std::filesystem::remove_all(d, ec);
  }
}
}  // namespace

std::string MakeTempDir() {
  static std::once_flag once;
  std::call_once(once, [] { std::atexit(RemoveTempDirs); });
  std::string tmpl = (std::filesystem::temp_directory_path() / "moa-test-XXXXXX").string();
  char* made = mkdtemp(tmpl.data());
  if (made == nullptr) std::abort();
  TempDirs().push_back(made);
  return made;
}

bool FileExists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

ModelConfig TinyConfig() {
  ModelConfig c;
  c.name = "tiny";
  c.n_layers = 2;
  c.d_model = 64;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.d_ff = 80;
  c.vocab_size = 97;
  c.max_context = 512;
  c.rms_eps = 1e-5f;
  c.rope_theta = 10000.0;
  return c;
}

ModelFile TinyModel(const ModelConfig& c, unsigned seed, float output_scale) {
  std::mt19937 rng(seed);
  ModelFile m;
  m.config = c;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, float mean, float stddev) {
    HostTensor t;
    t.name = name;
    t.dtype = DType::kF32;
    t.shape = shape;
    auto buf = std::make_shared<std::vector<float>>(t.NumElements());
    std::normal_distribution<float> dist(mean, stddev);
    for (float& x : *buf) x = dist(rng);
    t.data = reinterpret_cast<const uint8_t*>(buf->data());
    t.nbytes = static_cast<int64_t>(buf->size() * sizeof(float));
    t.owner = buf;
    m.tensors[name] = std::move(t);
  };
  const int64_t d = c.d_model, q = int64_t{c.n_heads} * c.head_dim,
                kv = int64_t{c.n_kv_heads} * c.head_dim;
  const float sd = 1.0f / std::sqrt(static_cast<float>(d));
  add("token_embd.weight", {c.vocab_size, d}, 0.0f, 1.0f);
  add("output_norm.weight", {d}, 1.0f, 0.1f);
  if (!c.tied_embeddings) add("output.weight", {c.vocab_size, d}, 0.0f, output_scale * sd);
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = absl::StrCat("blk.", l, ".");
    add(p + "attn_norm.weight", {d}, 1.0f, 0.1f);
    add(p + "attn_q.weight", {q, d}, 0.0f, 2 * sd);  // sharper attention than uniform
    add(p + "attn_k.weight", {kv, d}, 0.0f, 2 * sd);
    add(p + "attn_v.weight", {kv, d}, 0.0f, sd);
    add(p + "attn_output.weight", {d, q}, 0.0f, 1.0f / std::sqrt(static_cast<float>(q)));
    add(p + "ffn_norm.weight", {d}, 1.0f, 0.1f);
    add(p + "ffn_gate.weight", {c.d_ff, d}, 0.0f, sd);
    add(p + "ffn_up.weight", {c.d_ff, d}, 0.0f, sd);
    add(p + "ffn_down.weight", {d, c.d_ff}, 0.0f, 1.0f / std::sqrt(static_cast<float>(c.d_ff)));
  }
  return m;
}

std::vector<int32_t> RandomTokens(int64_t n, int vocab, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> dist(0, vocab - 1);
  std::vector<int32_t> t(n);
  for (int32_t& x : t) x = dist(rng);
  return t;
}

}  // namespace moa::testing
