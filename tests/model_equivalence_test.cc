// The same tiny random Llama (tests/tools/make_tiny_model.py) loaded from a Hugging Face
// checkpoint and from a GGUF converted the way llama.cpp converts it, run through LlamaModel on
// the CPU backend, against each other and against an independent float64 numpy forward pass.
//
// HF F32 == GGUF F32 shows that half-split RoPE on the HF weights and interleaved RoPE on the
// llama.cpp-permuted Q/K rows are the same model, i.e. that both loaders and both RoPE layouts
// are wired right.
#include <algorithm>
#include <cmath>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "engine/llama_model.h"
#include "engine/model/model_file.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace moa {
namespace {

std::string TinyPath(const std::string& name) {
  return testing::GeneratedDataDir() + "/tiny/" + name;
}

constexpr char kRegenerate[] = "run .venv/bin/python tests/tools/make_tiny_model.py";

struct Expected {
  std::vector<int32_t> tokens;
  int vocab = 0;
  nlohmann::json logits;  // variant -> [position][vocab]
};

// The logits of the generated models are O(1) (|logit| < 5), so absolute tolerances are used.

// Logits of every position of `tokens`, [tokens.size() * vocab].
absl::StatusOr<std::vector<float>> RunModel(const std::string& path,
                                            const std::vector<int32_t>& tokens) {
  absl::StatusOr<ModelFile> file = LoadModel(path);
  if (!file.ok()) return file.status();
  std::unique_ptr<Backend> backend = NewCpuBackend(2);
  absl::StatusOr<std::unique_ptr<LlamaModel>> model =
      LlamaModel::Create(*file, backend.get(), /*plan=*/nullptr);
  if (!model.ok()) return model.status();
  // One sequence in one step: a block per (layer, KV head) holds the whole of it.
  const int32_t block_size = static_cast<int32_t>(tokens.size());
  const int32_t blocks = file->config.n_layers * file->config.n_kv_heads;
  absl::StatusOr<std::unique_ptr<KvCacheManager>> kv =
      KvCacheManager::Create((*model)->kv_layout(block_size), blocks);
  if (!kv.ok()) return kv.status();
  absl::StatusOr<std::unique_ptr<KvPool>> pool = (*model)->NewKvPool(blocks, block_size);
  if (!pool.ok()) return pool.status();
  ForwardInput in;
  in.seq = (*kv)->AddSequence();
  in.past = 0;
  in.tokens = tokens;
  in.all_logits = true;
  if (absl::Status s = (*kv)->Grow(in.seq, static_cast<int64_t>(tokens.size())); !s.ok()) {
    return s;
  }
  std::vector<float> logits;
  if (absl::Status s = (*model)->Forward({in}, **kv, **pool, &logits); !s.ok()) return s;
  return logits;
}

class ModelEquivalenceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string path = TinyPath("expected_logits.json");
    std::ifstream in(path);
    ASSERT_TRUE(in.good()) << path << " is missing: " << kRegenerate;
    std::stringstream text;
    text << in.rdbuf();
    const nlohmann::json j = nlohmann::json::parse(text.str(), nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << path;
    expected_.tokens = j.at("tokens").get<std::vector<int32_t>>();
    expected_.vocab = j.at("vocab_size").get<int>();
    expected_.logits = j.at("logits");
  }

  std::vector<float> Run(const std::string& name) {
    absl::StatusOr<std::vector<float>> logits = RunModel(TinyPath(name), expected_.tokens);
    EXPECT_TRUE(logits.ok()) << name << ": " << logits.status();
    if (!logits.ok()) return {};
    EXPECT_EQ(logits->size(), expected_.tokens.size() * expected_.vocab) << name;
    return *std::move(logits);
  }

  std::vector<float> Reference(const std::string& variant) {
    std::vector<float> out;
    for (const auto& row : expected_.logits.at(variant)) {
      for (const auto& v : row) out.push_back(v.get<float>());
    }
    return out;
  }

  static double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
    if (a.size() != b.size() || a.empty()) return INFINITY;
    double diff = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      diff = std::max(diff, std::fabs(static_cast<double>(a[i]) - b[i]));
    }
    return diff;
  }

  Expected expected_;
};

TEST_F(ModelEquivalenceTest, LoadersReportTheirRopeLayouts) {
  absl::StatusOr<ModelFile> hf = LoadModel(TinyPath("hf"));
  ASSERT_TRUE(hf.ok()) << hf.status();
  absl::StatusOr<ModelFile> gguf = LoadModel(TinyPath("model-f32.gguf"));
  ASSERT_TRUE(gguf.ok()) << gguf.status();
  EXPECT_EQ(hf->config.rope_layout, RopeLayout::kHalfSplit);
  EXPECT_EQ(gguf->config.rope_layout, RopeLayout::kInterleaved);
  EXPECT_EQ(hf->tokenizer.bos_id, gguf->tokenizer.bos_id);
  EXPECT_EQ(hf->tokenizer.eos_id, gguf->tokenizer.eos_id);
  EXPECT_EQ(hf->chat_template, gguf->chat_template);
}

TEST_F(ModelEquivalenceTest, HfF32MatchesGgufF32) {
  const std::vector<float> hf = Run("hf");
  const std::vector<float> gguf = Run("model-f32.gguf");
  EXPECT_LT(MaxAbsDiff(hf, gguf), 1e-5);
}

TEST_F(ModelEquivalenceTest, HfF32MatchesNumpyReference) {
  EXPECT_LT(MaxAbsDiff(Run("hf"), Reference("hf")), 1e-4);
}

TEST_F(ModelEquivalenceTest, ShardedEqualsSingleFile) {
  const std::vector<float> single = Run("hf");
  const std::vector<float> sharded = Run("hf_sharded");
  EXPECT_EQ(MaxAbsDiff(single, sharded), 0.0);
}

TEST_F(ModelEquivalenceTest, HalfPrecisionCheckpoints) {
  // Against the float64 reference on the same rounded weights, what remains is the engine's
  // float32 arithmetic; against the F32 model, the rounding of the weights itself (bf16 keeps 8
  // bits of mantissa, f16 11), which moves the numpy logits by 0.0024 (f16) and 0.0195 (bf16).
  const std::vector<float> f16 = Run("hf_f16");
  const std::vector<float> bf16 = Run("hf_bf16");
  EXPECT_LT(MaxAbsDiff(f16, Reference("hf_f16")), 1e-4);
  EXPECT_LT(MaxAbsDiff(bf16, Reference("hf_bf16")), 1e-4);
  EXPECT_LT(MaxAbsDiff(f16, Reference("hf")), 5e-3);
  EXPECT_LT(MaxAbsDiff(bf16, Reference("hf")), 4e-2);
}

TEST_F(ModelEquivalenceTest, TiedEmbeddings) {
  // The unit-variance embedding as output matrix makes these logits ~10x larger (up to ~55).
  EXPECT_LT(MaxAbsDiff(Run("hf_tied"), Reference("hf_tied")), 1e-3);
}

TEST_F(ModelEquivalenceTest, RopeScaling) {
  EXPECT_LT(MaxAbsDiff(Run("hf_llama3"), Reference("hf_llama3")), 1e-4);
  EXPECT_LT(MaxAbsDiff(Run("hf_linear"), Reference("hf_linear")), 1e-4);
}

}  // namespace
}  // namespace moa
