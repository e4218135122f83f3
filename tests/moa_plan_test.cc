#include "engine/moa_plan.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moa {
namespace {

using ::testing::HasSubstr;

ModelConfig SmallGqa() {
  ModelConfig c;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  return c;
}

TEST(SpanRule, FollowsTheElasticRule) {
  const SpanParams p{64, 64};
  const SpanRule r{false, 1000, 0.25};
  // floor(1000/64)=15 blocks + floor(0.25*4097) tokens.
  EXPECT_EQ(SpanTokens(r, p, 4097), 64 * 15 + 1024);
  EXPECT_EQ(SpanTokens(r, p, 100), 64 * 15 + 25);
  // Never less than the sink plus one block.
  EXPECT_EQ(SpanTokens(SpanRule{false, -2048, 0.0}, p, 4096), 128);
  EXPECT_EQ(SpanTokens(SpanRule{}, p, 777), 777);
}

TEST(SpanRule, VisibleKeysAreSinkPlusWindow) {
  const SpanParams p{4, 8};
  const SpanRule r{false, 16, 0.0};  // span 16: 4 sink + 12 window
  EXPECT_TRUE(IsVisible(r, p, 100, 0));
  EXPECT_TRUE(IsVisible(r, p, 100, 3));
  EXPECT_FALSE(IsVisible(r, p, 100, 4));
  EXPECT_FALSE(IsVisible(r, p, 100, 88));
  EXPECT_TRUE(IsVisible(r, p, 100, 89));
  EXPECT_TRUE(IsVisible(r, p, 100, 100));
  EXPECT_FALSE(IsVisible(r, p, 100, 101));
  // Short sequences see everything.
  for (int k = 0; k <= 10; ++k) EXPECT_TRUE(IsVisible(r, p, 10, k));
}

TEST(SpanRule, WindowNeverMovesLeftForBetaInUnitInterval) {
  const SpanParams p{64, 64};
  for (double beta : {0.0, 0.125, 0.5, 0.875, 1.0}) {
    for (int64_t alpha : {-2048, 0, 1024, 4096}) {
      const SpanRule r{false, alpha, beta};
      int64_t left = 0;
      for (int64_t pos = 0; pos < 20000; ++pos) {
        const VisibleKeys v = VisibleKeysAt(r, p, pos);
        ASSERT_GE(v.window_begin, left) << "alpha " << alpha << " beta " << beta << " pos " << pos;
        left = v.window_begin;
      }
    }
  }
}

TEST(MoaPlan, ReadsReferenceFormatAndCollapsesGqaGroups) {
  const std::string json = R"({"alphas": [[1024, 1024, 0, 0], [2048, 2048, 512, 512]],
                               "betas": [[0.5, 0.5, 0, 0], [0.25, 0.25, 1, 1]]})";
  absl::StatusOr<MoaPlan> plan = MoaPlan::FromJson(json);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_THAT(std::string(plan->CheckFits(SmallGqa()).message()), HasSubstr("4 rules per layer"));
  absl::StatusOr<MoaPlan> fitted = plan->ForModel(SmallGqa());
  ASSERT_TRUE(fitted.ok()) << fitted.status();
  ASSERT_EQ(fitted->layer_rules(1).size(), 2u);
  EXPECT_EQ(fitted->layer_rules(1)[0].alpha, 2048);
  EXPECT_EQ(fitted->layer_rules(1)[1].beta, 1.0);
  EXPECT_EQ(fitted->params().sink, 64);
}

TEST(MoaPlan, RejectsDifferentRulesInsideAGqaGroup) {
  const std::string json = R"({"alphas": [[1024, 0, 0, 0], [0, 0, 0, 0]],
                               "betas": [[0, 0, 0, 0], [0, 0, 0, 0]]})";
  absl::StatusOr<MoaPlan> plan = MoaPlan::FromJson(json);
  ASSERT_TRUE(plan.ok());
  absl::StatusOr<MoaPlan> fitted = plan->ForModel(SmallGqa());
  ASSERT_FALSE(fitted.ok());
  EXPECT_THAT(std::string(fitted.status().message()), HasSubstr("layer 0"));
}

TEST(MoaPlan, OwnFormatRoundTrips) {
  ModelConfig c = SmallGqa();
  c.name = "tiny";
  MoaPlan dense = MoaPlan::Dense(c, SpanParams{32, 16});
  absl::StatusOr<MoaPlan> back = MoaPlan::FromJson(dense.ToJson());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(back->CheckFits(c).ok());
  EXPECT_EQ(back->params().sink, 32);
  EXPECT_EQ(back->params().block, 16);
  EXPECT_DOUBLE_EQ(back->Density(5000), 1.0);

  const std::string json = R"({"format": "moa-plan", "version": 1, "sink": 64, "block_size": 64,
      "model": {"name": "tiny", "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
      "rules": [[{"alpha": 1024, "beta": 0}, {"dense": true}],
                [{"alpha": 0, "beta": 0.5}, {"alpha": 2048, "beta": 0.125}]]})";
  absl::StatusOr<MoaPlan> plan = MoaPlan::FromJson(json);
  ASSERT_TRUE(plan.ok()) << plan.status();
  absl::StatusOr<MoaPlan> again = MoaPlan::FromJson(plan->ToJson());
  ASSERT_TRUE(again.ok()) << again.status();
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 2; ++h) {
      EXPECT_EQ(again->layer_rules(l)[h].dense, plan->layer_rules(l)[h].dense);
      EXPECT_EQ(again->layer_rules(l)[h].alpha, plan->layer_rules(l)[h].alpha);
      EXPECT_EQ(again->layer_rules(l)[h].beta, plan->layer_rules(l)[h].beta);
    }
  }
  // At 8192 tokens: 1024/8192, 1, 4096/8192, (2048+1024)/8192.
  EXPECT_NEAR(plan->Density(8192), (0.125 + 1 + 0.5 + 0.375) / 4, 1e-12);
}

TEST(MoaPlan, BadPlansGiveClearErrors) {
  struct Case {
    std::string json;
    std::string error;
  };
  const Case cases[] = {
      {"not json", "not valid JSON"},
      {"[1, 2]", "JSON object"},
      {R"({"format": "other"})", "unknown plan format"},
      {R"({"format": "moa-plan", "version": 2, "sink": 64, "block_size": 64, "rules": [[{}]]})",
       "version 2"},
      {R"({"format": "moa-plan", "version": 1, "sink": -1, "block_size": 64, "rules": []})",
       "sink"},
      {R"({"format": "moa-plan", "version": 1, "sink": 64, "block_size": 0, "rules": []})",
       "block_size"},
      {R"({"format": "moa-plan", "version": 1, "sink": 64, "block_size": 64, "rules": []})",
       "\"rules\""},
      {R"({"format": "moa-plan", "version": 1, "sink": 64, "block_size": 64,
           "rules": [[{"alpha": 1}]]})",
       "needs \"alpha\" and \"beta\""},
      {R"({"format": "moa-plan", "version": 1, "sink": 64, "block_size": 64,
           "rules": [[{"alpha": 1, "beta": 1.5}]]})",
       "beta 1.5 must lie in [0, 1]"},
      {R"({"format": "moa-plan", "version": 1, "sink": 64, "block_size": 64,
           "rules": [[{"dense": true}], [{"dense": true}, {"dense": true}]]})",
       "layer 1 has 2 rules"},
      {R"({"alphas": [[1]], "betas": [[0], [0]]})", "one entry per layer"},
      {R"({"alphas": [[1]]})", "one entry per layer"},
      {R"({"alphas": [["x"]], "betas": [[0]]})", "must be numbers"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<MoaPlan> plan = MoaPlan::FromJson(c.json);
    ASSERT_FALSE(plan.ok()) << c.json;
    EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(plan.status().message()), HasSubstr(c.error)) << c.json;
  }
}

TEST(MoaPlan, MismatchedModelIsRejected) {
  ModelConfig c = SmallGqa();
  MoaPlan plan = MoaPlan::Dense(c, SpanParams{});
  ModelConfig other = c;
  other.n_layers = 3;
  EXPECT_THAT(std::string(plan.CheckFits(other).message()), HasSubstr("2 layers"));
  other = c;
  other.n_kv_heads = 4;
  EXPECT_THAT(std::string(plan.ForModel(other).status().message()), HasSubstr("KV heads"));
  EXPECT_FALSE(MoaPlan::FromFile("/nonexistent/plan.json").ok());
}

}  // namespace
}  // namespace moa
