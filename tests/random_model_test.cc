// LlamaModel::CreateRandom on the CPU backend: a model of any shape from its config alone, with
// finite logits of a sane scale, deterministic per seed, that runs dense and with a MoA plan.
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "engine/llama_model.h"
#include "engine/moa_plan.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kvcache/kv_cache_manager.h"
#include "tests/test_util.h"

namespace moa {
namespace {

using testing::RandomTokens;
using testing::TinyConfig;

// Sink 4, blocks of 4: windows of 8 to 12 tokens on three of the four heads.
constexpr char kPlan[] = R"({
  "format": "moa-plan", "version": 1, "sink": 4, "block_size": 4,
  "model": {"name": "tiny-random", "n_heads": 4, "n_kv_heads": 2},
  "rules": [[{"alpha": 8, "beta": 0}, {"dense": true}],
            [{"alpha": 4, "beta": 0.1}, {"alpha": 12, "beta": 0}]]
})";

// Logits of every token of `tokens`, prefilled in one step.
std::vector<float> AllLogits(LlamaModel& model, const std::vector<int32_t>& tokens) {
  constexpr int32_t kBlockSize = 4;
  auto kv = KvCacheManager::Create(model.kv_layout(kBlockSize), 256).value();
  auto pool = model.NewKvPool(256, kBlockSize).value();
  const SeqId seq = kv->AddSequence();
  EXPECT_TRUE(kv->Grow(seq, static_cast<int64_t>(tokens.size())).ok());
  const ForwardInput in{seq, 0, tokens, true};
  std::vector<float> logits;
  const absl::Status s = model.Forward({&in, 1}, *kv, *pool, &logits);
  EXPECT_TRUE(s.ok()) << s;
  return logits;
}

TEST(RandomModel, LogitsAreFiniteAndOfSaneScale) {
  auto be = NewCpuBackend(2);
  auto model = LlamaModel::CreateRandom(TinyConfig(), be.get(), nullptr, 1).value();
  EXPECT_EQ(model->config().vocab_size, 97);
  const std::vector<float> logits = AllLogits(*model, RandomTokens(24, 97, 3));
  ASSERT_EQ(logits.size(), 24u * 97);
  double sum = 0.0, sum2 = 0.0;
  for (float x : logits) {
    ASSERT_TRUE(std::isfinite(x));
    sum += x;
    sum2 += double{x} * x;
  }
  const double n = static_cast<double>(logits.size());
  const double sd = std::sqrt(sum2 / n - (sum / n) * (sum / n));
  // Weights scaled by fan-in keep the output projection of a unit-RMS input near unit scale.
  EXPECT_GT(sd, 0.2);
  EXPECT_LT(sd, 5.0);
}

TEST(RandomModel, DeterministicPerSeed) {
  auto be = NewCpuBackend(2);
  const std::vector<int32_t> tokens = RandomTokens(17, 97, 4);
  auto a = LlamaModel::CreateRandom(TinyConfig(), be.get(), nullptr, 42).value();
  auto b = LlamaModel::CreateRandom(TinyConfig(), be.get(), nullptr, 42).value();
  auto other = LlamaModel::CreateRandom(TinyConfig(), be.get(), nullptr, 43).value();
  const std::vector<float> la = AllLogits(*a, tokens);
  EXPECT_EQ(la, AllLogits(*b, tokens));
  const std::vector<float> lo = AllLogits(*other, tokens);
  ASSERT_EQ(la.size(), lo.size());
  int same = 0;
  for (size_t i = 0; i < la.size(); ++i) same += la[i] == lo[i];
  EXPECT_LT(same, static_cast<int>(la.size()) / 100);
}

TEST(RandomModel, RunsWithAPlan) {
  auto be = NewCpuBackend(2);
  const MoaPlan plan = MoaPlan::FromJson(kPlan).value();
  auto dense = LlamaModel::CreateRandom(TinyConfig(), be.get(), nullptr, 7).value();
  auto sparse = LlamaModel::CreateRandom(TinyConfig(), be.get(), &plan, 7).value();
  const std::vector<int32_t> tokens = RandomTokens(40, 97, 5);
  const std::vector<float> d = AllLogits(*dense, tokens);
  const std::vector<float> s = AllLogits(*sparse, tokens);
  ASSERT_EQ(d.size(), s.size());
  // Every head sees at least sink + one block = 8 tokens: the first 8 positions see everything,
  // as in the dense model; later ones lose keys and their logits move.
  for (size_t i = 0; i < 8 * 97; ++i) ASSERT_NEAR(s[i], d[i], 1e-5) << i;
  double moved = 0.0;
  for (size_t i = 30 * 97; i < s.size(); ++i) {
    ASSERT_TRUE(std::isfinite(s[i]));
    moved = std::max(moved, std::fabs(double{s[i]} - d[i]));
  }
  EXPECT_GT(moved, 1e-3);
}

TEST(RandomModel, RefusesBadInput) {
  auto be = NewCpuBackend(1);
  ModelConfig c = TinyConfig();
  EXPECT_EQ(LlamaModel::CreateRandom(c, nullptr, nullptr, 1).status().code(),
            absl::StatusCode::kInvalidArgument);
  c.n_kv_heads = 3;  // does not divide 4 query heads
  EXPECT_EQ(LlamaModel::CreateRandom(c, be.get(), nullptr, 1).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A plan for another shape.
  c = TinyConfig();
  c.n_layers = 3;
  const MoaPlan plan = MoaPlan::FromJson(kPlan).value();
  EXPECT_FALSE(LlamaModel::CreateRandom(c, be.get(), &plan, 1).ok());
}

}  // namespace
}  // namespace moa
