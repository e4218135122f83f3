#include "engine/sampler.h"

#include <cmath>
#include <map>
#include <vector>

#include "gtest/gtest.h"

namespace moa {
namespace {

std::vector<float> Logits() { return {1.0f, 3.0f, 2.0f, 0.5f, 3.0f}; }

TEST(Sampler, GreedyTakesTheFirstMaximum) {
  Sampler s(SamplingParams{});
  std::vector<float> l = Logits();
  EXPECT_EQ(s.Sample(absl::MakeSpan(l), {}), 1);
}

TEST(Sampler, TopKOneIsGreedy) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_k = 1;
  Sampler s(p);
  for (int i = 0; i < 20; ++i) {
    std::vector<float> l = Logits();
    EXPECT_EQ(s.Sample(absl::MakeSpan(l), {}), 1);
  }
}

TEST(Sampler, FrequenciesFollowTheSoftmax) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 7;
  Sampler s(p);
  std::map<int, int> counts;
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    std::vector<float> l = {0.0f, std::log(3.0f)};
    ++counts[s.Sample(absl::MakeSpan(l), {})];
  }
  EXPECT_NEAR(counts[1] / static_cast<double>(n), 0.75, 0.02);
}

TEST(Sampler, TopPAndMinPCutTheTail) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_p = 0.5f;  // probabilities 0.6, 0.3, 0.1: only the first survives
  Sampler s(p);
  for (int i = 0; i < 50; ++i) {
    std::vector<float> l = {std::log(0.3f), std::log(0.6f), std::log(0.1f)};
    EXPECT_EQ(s.Sample(absl::MakeSpan(l), {}), 1);
  }
  p.top_p = 1.0f;
  p.min_p = 0.4f;  // keeps tokens with p >= 0.24: ids 1 and 0
  Sampler m(p);
  for (int i = 0; i < 200; ++i) {
    std::vector<float> l = {std::log(0.3f), std::log(0.6f), std::log(0.1f)};
    EXPECT_NE(m.Sample(absl::MakeSpan(l), {}), 2);
  }
}

TEST(Sampler, SameSeedSameTokens) {
  SamplingParams p;
  p.temperature = 0.8f;
  p.seed = 42;
  Sampler a(p), b(p);
  for (int i = 0; i < 100; ++i) {
    std::vector<float> la = Logits(), lb = Logits();
    EXPECT_EQ(a.Sample(absl::MakeSpan(la), {}), b.Sample(absl::MakeSpan(lb), {}));
  }
}

TEST(Sampler, PenaltiesDemoteSeenTokens) {
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  Sampler s(p);
  std::vector<float> l = Logits();
  const std::vector<int32_t> history = {1, 4};
  // 3.0 / 2 = 1.5 for ids 1 and 4, so id 2 (2.0) wins.
  EXPECT_EQ(s.Sample(absl::MakeSpan(l), history), 2);
  p = SamplingParams{};
  p.frequency_penalty = 1.0f;
  Sampler f(p);
  l = Logits();
  const std::vector<int32_t> twice = {2, 1, 1};  // id 1: 3 - 2 = 1; id 2: 2 - 1 = 1; id 4: 3
  EXPECT_EQ(f.Sample(absl::MakeSpan(l), twice), 4);
}

TEST(Sampler, ValidationNamesTheField) {
  SamplingParams p;
  p.temperature = -1;
  EXPECT_NE(ValidateSamplingParams(p).message().find("temperature"), std::string::npos);
  p = SamplingParams{};
  p.top_p = 0;
  EXPECT_NE(ValidateSamplingParams(p).message().find("top_p"), std::string::npos);
  p.top_p = 1.5f;
  EXPECT_FALSE(ValidateSamplingParams(p).ok());
  p = SamplingParams{};
  p.min_p = 1;
  EXPECT_NE(ValidateSamplingParams(p).message().find("min_p"), std::string::npos);
  p = SamplingParams{};
  p.top_k = -3;
  EXPECT_NE(ValidateSamplingParams(p).message().find("top_k"), std::string::npos);
  EXPECT_TRUE(ValidateSamplingParams(SamplingParams{}).ok());
}

}  // namespace
}  // namespace moa
