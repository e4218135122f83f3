// Backend::RandomWeight on the CUDA backend against the CPU backend: the same fp16 values, bit for
// bit, for odd shapes, one-row (norm) weights and a tensor larger than one pass of the fill
// kernel's grid; and a whole random-weight model (LlamaModel::CreateRandom) built on each backend
// giving the same logits up to the GPU's fp16 rounding of activations and KV.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <memory>
#include <random>
#include <tuple>
#include <vector>

#include "engine/llama_model.h"
#include "engine/moa_plan.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "kvcache/kv_cache_manager.h"

namespace moa {
namespace {

std::vector<float> Read(Backend& be, const Tensor& t) {
  std::vector<float> v(t.rows() * t.cols(), std::numeric_limits<float>::quiet_NaN());
  const absl::Status s = be.CopyToHost(t, absl::MakeSpan(v));
  EXPECT_TRUE(s.ok()) << be.name() << ": " << s;
  return v;
}

class RandomWeightGpu : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Backend>> gpu = NewCudaBackend(0);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    gpu_ = *std::move(gpu);
    cpu_ = NewCpuBackend(0);
  }
  std::unique_ptr<Backend> cpu_;
  std::unique_ptr<Backend> gpu_;
};

TEST_F(RandomWeightGpu, SameValuesAsCpu) {
  struct Case {
    int64_t rows, cols;
    uint64_t seed;
    float scale, offset;
  };
  // 4099 x 4097 is more elements than one pass of the fill's capped grid (2^16 blocks x 256).
  const Case cases[] = {
      {1, 1, 0, 1.0f, 0.0f},        {1, 4097, 3, 0.125f, 1.0f},   {3, 5, ~uint64_t{0}, 2.0f, 0.0f},
      {129, 77, 17, 0.02f, -0.01f}, {4099, 4097, 5, 0.03f, 0.0f}, {257, 1000, 6, 1e-6f, 0.0f},
      {64, 65, 7, 70000.0f, 0.0f}};  // fp16 overflow and subnormals round alike
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "[" << c.rows << ", " << c.cols << "] seed " << c.seed
                                      << " scale " << c.scale << " offset " << c.offset);
    auto g = gpu_->RandomWeight(c.rows, c.cols, c.seed, c.scale, c.offset);
    auto h = cpu_->RandomWeight(c.rows, c.cols, c.seed, c.scale, c.offset);
    ASSERT_TRUE(g.ok()) << g.status();
    ASSERT_TRUE(h.ok()) << h.status();
    const std::vector<float> got = Read(*gpu_, **g);
    const std::vector<float> want = Read(*cpu_, **h);
    ASSERT_EQ(got.size(), want.size());
    int64_t differ = 0, first = -1;
    for (size_t i = 0; i < want.size(); ++i) {
      // Identical (infinities included); a NaN, e.g. an unwritten element, counts as different.
      if (!(got[i] == want[i])) {
        if (first < 0) first = static_cast<int64_t>(i);
        ++differ;
      }
    }
    EXPECT_EQ(differ, 0) << "first at " << first << ": gpu " << got[first] << ", cpu "
                         << want[first];
  }
}

TEST_F(RandomWeightGpu, SameErrorsAsCpu) {
  for (const auto& [rows, cols, scale] :
       {std::tuple{int64_t{0}, int64_t{4}, 1.0f}, std::tuple{int64_t{4}, int64_t{4}, -1.0f},
        std::tuple{int64_t{1} << 40, int64_t{1} << 20, 1.0f}}) {
    auto g = gpu_->RandomWeight(rows, cols, 1, scale, 0.0f);
    auto h = cpu_->RandomWeight(rows, cols, 1, scale, 0.0f);
    ASSERT_FALSE(g.ok());
    ASSERT_FALSE(h.ok());
    EXPECT_EQ(g.status(), h.status());
  }
}

// All logits of a prompt prefilled in chunks of `chunk`, then decoded token by token.
std::vector<float> RunRandomModel(Backend& be, const ModelConfig& c, const MoaPlan* plan,
                                  const std::vector<int32_t>& tokens, int64_t prefill,
                                  int64_t chunk) {
  constexpr int32_t kBlock = 16;
  auto model = LlamaModel::CreateRandom(c, &be, plan, 11);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return {};
  auto kv = KvCacheManager::Create((*model)->kv_layout(kBlock), 4096).value();
  auto pool = (*model)->NewKvPool(4096, kBlock).value();
  const SeqId seq = kv->AddSequence();
  std::vector<float> logits;
  const int64_t n = static_cast<int64_t>(tokens.size());
  for (int64_t past = 0; past < n;) {
    const int64_t step = past < prefill ? std::min(chunk, prefill - past) : 1;
    EXPECT_TRUE(kv->Grow(seq, past + step).ok());
    const ForwardInput in{seq, past, absl::MakeConstSpan(tokens).subspan(past, step), true};
    const absl::Status s = (*model)->Forward({&in, 1}, *kv, *pool, &logits);
    EXPECT_TRUE(s.ok()) << be.name() << ": " << s;
    if (!s.ok()) return {};
    kv->Trim(seq);
    past += step;
  }
  return logits;
}

TEST_F(RandomWeightGpu, RandomModelMatchesCpu) {
  ModelConfig c;
  c.name = "random-gqa4";
  c.n_layers = 3;
  c.d_model = 256;
  c.n_heads = 8;
  c.n_kv_heads = 2;  // GQA ratio 4
  c.head_dim = 32;
  c.d_ff = 688;
  c.vocab_size = 1001;
  c.max_context = 4096;
  c.rope_theta = 500000.0;
  // Sink 16, blocks of 16; windows shorter and longer than the 150-token sequence.
  const MoaPlan plan = MoaPlan::FromJson(R"({"format": "moa-plan", "version": 1, "sink": 16,
      "block_size": 16, "model": {"n_heads": 8, "n_kv_heads": 2},
      "rules": [[{"alpha": 32, "beta": 0}, {"dense": true}],
                [{"alpha": 0, "beta": 0.5}, {"alpha": 48, "beta": 0.1}],
                [{"alpha": 512, "beta": 0}, {"alpha": 16, "beta": 0}]]})")
                           .value();
  std::mt19937 rng(2024);
  std::uniform_int_distribution<int32_t> tok(0, c.vocab_size - 1);
  std::vector<int32_t> tokens(150);
  for (int32_t& t : tokens) t = tok(rng);
  for (const MoaPlan* p : {static_cast<const MoaPlan*>(nullptr), &plan}) {
    SCOPED_TRACE(p == nullptr ? "dense" : "plan");
    const std::vector<float> want = RunRandomModel(*cpu_, c, p, tokens, 120, 37);
    const std::vector<float> got = RunRandomModel(*gpu_, c, p, tokens, 120, 37);
    ASSERT_EQ(want.size(), tokens.size() * c.vocab_size);
    ASSERT_EQ(got.size(), want.size());
    double worst = 0.0, sum = 0.0, scale = 0.0;
    int top_differs = 0;
    for (size_t i = 0; i < tokens.size(); ++i) {
      const float* w = want.data() + i * c.vocab_size;
      const float* g = got.data() + i * c.vocab_size;
      for (int j = 0; j < c.vocab_size; ++j) {
        const double e = std::fabs(double{g[j]} - double{w[j]});
        worst = std::isnan(e) ? INFINITY : std::max(worst, e);
        sum += e;
        scale = std::max(scale, std::fabs(double{w[j]}));
      }
      top_differs += (std::max_element(w, w + c.vocab_size) - w) !=
                     (std::max_element(g, g + c.vocab_size) - g);
    }
    const double mean = sum / static_cast<double>(want.size());
    std::printf(
        "[ random   ] %s: max |logit diff| %.4f (max |logit| %.2f), mean %.5f, top-1 "
        "differs at %d of %zu positions\n",
        p == nullptr ? "dense" : "plan", worst, scale, mean, top_differs, tokens.size());
    // Same weights on both sides: only fp16 activations into the GEMMs and fp16 KV differ.
    EXPECT_LE(worst, 0.05 * scale);
    EXPECT_LE(mean, 0.005 * scale);
    EXPECT_LE(top_differs, 3);
  }
}

}  // namespace
}  // namespace moa
