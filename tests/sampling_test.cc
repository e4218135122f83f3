// SampleWithUniform (kernels/sampling.h), the reference every backend's Sample follows: each step
// of its documented order, the distribution it draws from, the argument checks, and that the
// request sampler built on it draws the same tokens for a seed as the sampler before the split.
#include "kernels/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "engine/sampler.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"

namespace moa {
namespace {

SampleRow Row(float temperature, double u) {
  SampleRow r;
  r.params.temperature = temperature;
  r.u = u;
  return r;
}

int32_t Pick(std::vector<float> logits, const SampleRow& row) {
  return SampleWithUniform(absl::MakeSpan(logits), row);
}

std::vector<float> RandomLogits(int n, unsigned seed, float sd = 2.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, sd);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Softmax of logits / t in double.
std::vector<double> Softmax(const std::vector<float>& l, double t) {
  const double mx = *std::max_element(l.begin(), l.end());
  std::vector<double> p(l.size());
  double z = 0;
  for (size_t i = 0; i < l.size(); ++i) z += p[i] = std::exp((l[i] - mx) / t);
  for (double& q : p) q /= z;
  return p;
}

TEST(SampleWithUniform, GreedyIsTheArgmaxLowestIdOnTies) {
  EXPECT_EQ(Pick({1, 3, 2, 0.5f, 3}, Row(0, 0)), 1);
  EXPECT_EQ(Pick({-0.0f, 0.0f}, Row(0, 0)), 0);  // -0 equals +0
  EXPECT_EQ(Pick({-INFINITY, -INFINITY}, Row(0, 0)), 0);
  const std::vector<float> l = RandomLogits(1001, 3);
  EXPECT_EQ(Pick(l, Row(0, 0.7)), std::max_element(l.begin(), l.end()) - l.begin());
}

TEST(SampleWithUniform, TopKOneAndTinyTopPAreGreedy) {
  for (unsigned seed = 0; seed < 20; ++seed) {
    const std::vector<float> l = RandomLogits(257, seed);
    const int32_t greedy = Pick(l, Row(0, 0));
    for (double u : {0.0, 0.3, 0.999999}) {
      SampleRow k = Row(1.3f, u);
      k.params.top_k = 1;
      EXPECT_EQ(Pick(l, k), greedy) << seed << " " << u;
      SampleRow p = Row(0.7f, u);
      p.params.top_p = 1e-6f;
      EXPECT_EQ(Pick(l, p), greedy) << seed << " " << u;
    }
  }
}

TEST(SampleWithUniform, TiesAmongCandidatesGoToTheLowerIdFirst) {
  // Four equal logits, probability 1/4 each in id order 1, 3, 4, 6 (the others are -inf).
  const std::vector<float> l = {-INFINITY, 2, -INFINITY, 2, 2, -INFINITY, 2};
  const int32_t want[] = {1, 3, 4, 6};
  for (int q = 0; q < 4; ++q) EXPECT_EQ(Pick(l, Row(1, q * 0.25 + 0.125)), want[q]) << q;
}

TEST(SampleWithUniform, UNearZeroTakesTheTopAndNearOneTheLastKept) {
  const std::vector<float> l = {0.5f, 2.0f, 1.0f, -1.0f};
  EXPECT_EQ(Pick(l, Row(1, 0.0)), 1);
  EXPECT_EQ(Pick(l, Row(1, 1e-9)), 1);
  EXPECT_EQ(Pick(l, Row(1, 1 - 1e-12)), 3);  // the lowest candidate
  SampleRow k = Row(1, 1 - 1e-12);
  k.params.top_k = 3;
  EXPECT_EQ(Pick(l, k), 0);  // the third of 1, 2, 0
}

TEST(SampleWithUniform, MinPAndTopPCutTheTail) {
  // Probabilities 0.3, 0.6, 0.1 (temperature 1).
  const std::vector<float> l = {std::log(0.3f), std::log(0.6f), std::log(0.1f)};
  SampleRow minp = Row(1, 0);
  minp.params.min_p = 0.4f;  // keeps p >= 0.24: ids 1 and 0, renormalised to 2/3 and 1/3
  minp.u = 0.66;
  EXPECT_EQ(Pick(l, minp), 1);
  minp.u = 0.67;
  EXPECT_EQ(Pick(l, minp), 0);
  minp.u = 0.999999;
  EXPECT_EQ(Pick(l, minp), 0);  // id 2 is gone
  SampleRow topp = Row(1, 0.999999);
  topp.params.top_p = 0.5f;  // 0.6 >= 0.5: only id 1
  EXPECT_EQ(Pick(l, topp), 1);
  topp.params.top_p = 0.85f;  // 0.6, 0.9: ids 1 and 0
  EXPECT_EQ(Pick(l, topp), 0);
  topp.u = 0.6 / 0.9 - 1e-6;
  EXPECT_EQ(Pick(l, topp), 1);
  topp.u = 0.6 / 0.9 + 1e-6;
  EXPECT_EQ(Pick(l, topp), 0);
}

TEST(SampleWithUniform, PenaltiesFollowTheDocumentedArithmetic) {
  const std::vector<int32_t> ids = {0, 1, 3};
  const std::vector<int32_t> counts = {1, 2, 3};
  SampleRow r = Row(0, 0);
  r.penalty_ids = ids;
  r.penalty_counts = counts;
  r.params.repetition_penalty = 2.0f;
  std::vector<float> l = {4.0f, -1.0f, 3.5f, 0.0f, 1.0f};
  // Positive logits halve, others double; id 2 is unseen and wins.
  EXPECT_EQ(SampleWithUniform(absl::MakeSpan(l), r), 2);
  EXPECT_EQ(l, (std::vector<float>{2.0f, -2.0f, 3.5f, 0.0f, 1.0f}));
  r.params.repetition_penalty = 1.0f;
  r.params.presence_penalty = 0.5f;
  l = {4.0f, -1.0f, 3.5f, 0.0f, 1.0f};
  EXPECT_EQ(SampleWithUniform(absl::MakeSpan(l), r), 0);  // 4 - 0.5 ties id 2: the lower id
  EXPECT_EQ(l, (std::vector<float>{3.5f, -1.5f, 3.5f, -0.5f, 1.0f}));
  r.params.presence_penalty = 0.0f;
  r.params.frequency_penalty = -1.0f;  // negative: seen tokens are favoured, per occurrence
  l = {4.0f, -1.0f, 3.5f, 0.0f, 1.0f};
  EXPECT_EQ(SampleWithUniform(absl::MakeSpan(l), r), 0);
  EXPECT_EQ(l, (std::vector<float>{5.0f, 1.0f, 3.5f, 3.0f, 1.0f}));
}

TEST(SampleWithUniform, EvenlySpreadUFollowsTheSoftmax) {
  // u = (j + 0.5) / n for j < n hits every candidate a number of times within one of n * p:
  // the pick is the inverse CDF.
  for (float t : {0.5f, 1.0f, 1.5f}) {
    const std::vector<float> l = RandomLogits(50, 11);
    const std::vector<double> p = Softmax(l, t);
    const int n = 100000;
    std::vector<int> hits(l.size());
    for (int j = 0; j < n; ++j) ++hits[Pick(l, Row(t, (j + 0.5) / n))];
    for (size_t i = 0; i < l.size(); ++i) {
      EXPECT_NEAR(hits[i], n * p[i], 1.01) << "t " << t << " id " << i;
    }
  }
}

TEST(SampleWithUniform, TopKRenormalisesOverTheKBest) {
  const std::vector<float> l = RandomLogits(40, 5);
  SampleRow r = Row(0.8f, 0);
  r.params.top_k = 5;
  std::vector<int32_t> order(l.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return l[a] > l[b]; });
  std::vector<float> best;
  for (int i = 0; i < 5; ++i) best.push_back(l[order[i]]);
  const std::vector<double> p = Softmax(best, 0.8);
  const int n = 20000;
  std::vector<int> hits(l.size());
  for (int j = 0; j < n; ++j) {
    r.u = (j + 0.5) / n;
    ++hits[Pick(l, r)];
  }
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(hits[order[i]], n * p[i], 1.01) << i;
  int others = 0;
  for (size_t i = 5; i < l.size(); ++i) others += hits[order[i]];
  EXPECT_EQ(others, 0);
}

// The sampler as it was before the random draw moved out of the pick: the same seeds must give
// the same tokens.
int32_t OldSample(const SamplingParams& p, std::mt19937_64& rng, std::vector<float> logits) {
  const int32_t n = static_cast<int32_t>(logits.size());
  if (p.temperature == 0.0f) {
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  std::vector<int32_t> ids(n);
  std::iota(ids.begin(), ids.end(), 0);
  const int32_t k = p.top_k > 0 ? std::min(p.top_k, n) : n;
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  std::vector<double> probs(k);
  const double top = logits[ids[0]];
  double sum = 0;
  for (int32_t i = 0; i < k; ++i)
    sum += probs[i] = std::exp((logits[ids[i]] - top) / p.temperature);
  for (double& q : probs) q /= sum;
  int32_t keep = k;
  if (p.min_p > 0.0f) {
    while (keep > 1 && probs[keep - 1] < p.min_p * probs[0]) --keep;
  }
  if (p.top_p < 1.0f) {
    double cum = 0;
    for (int32_t i = 0; i < keep; ++i) {
      if ((cum += probs[i]) >= p.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  const double total = std::accumulate(probs.begin(), probs.begin() + keep, 0.0);
  const double r = std::uniform_real_distribution<double>(0.0, total)(rng);
  double cum = 0;
  for (int32_t i = 0; i < keep; ++i) {
    if (r < (cum += probs[i])) return ids[i];
  }
  return ids[keep - 1];
}

TEST(Sampler, SeedsGiveTheTokensOfTheSamplerBeforeTheSplit) {
  SamplingParams p;
  p.seed = 1234;
  const float temps[] = {0.0f, 0.7f, 1.0f, 1.4f};
  const int32_t ks[] = {0, 1, 7, 0};
  const float top_ps[] = {1.0f, 0.9f, 1.0f, 0.5f};
  const float min_ps[] = {0.0f, 0.0f, 0.05f, 0.1f};
  for (int v = 0; v < 4; ++v) {
    p.temperature = temps[v];
    p.top_k = ks[v];
    p.top_p = top_ps[v];
    p.min_p = min_ps[v];
    Sampler s(p);
    std::mt19937_64 rng(p.seed);
    for (int step = 0; step < 300; ++step) {
      std::vector<float> l = RandomLogits(97, 100 * v + step, 1.5f);
      const int32_t want = OldSample(p, rng, l);
      EXPECT_EQ(s.Sample(absl::MakeSpan(l), {}), want) << "variant " << v << " step " << step;
    }
  }
}

TEST(Sampler, NextUniformDrawsOnlyForSampledTokens) {
  SamplingParams p;
  p.seed = 9;
  Sampler greedy(p);
  EXPECT_EQ(greedy.NextUniform(), 0.0);
  p.temperature = 1.0f;
  Sampler a(p), b(p);
  std::mt19937_64 rng(9);
  for (int i = 0; i < 10; ++i) {
    const double u = a.NextUniform();
    EXPECT_GE(u, 0.0);
    EXPECT_LT(u, 1.0);
    EXPECT_EQ(u, std::uniform_real_distribution<double>(0.0, 1.0)(rng));
  }
  // Sample draws through the same stream.
  std::vector<float> l = {0.0f, 0.0f};
  b.Sample(absl::MakeSpan(l), {});
  a = Sampler(p);
  a.NextUniform();
  EXPECT_EQ(a.NextUniform(), b.NextUniform());
}

TEST(CountTokens, SortedDistinctWithCountsDroppingOutOfRange) {
  const std::vector<int32_t> h = {5, 2, 5, -1, 9, 2, 5, 10};
  const TokenCounts c = CountTokens(h, 10);
  EXPECT_EQ(c.ids, (std::vector<int32_t>{2, 5, 9}));
  EXPECT_EQ(c.counts, (std::vector<int32_t>{2, 3, 1}));
  EXPECT_TRUE(CountTokens({}, 10).ids.empty());
}

TEST(CountTokens, AddingTokenByTokenEqualsRecounting) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> tok(-2, 40);
  std::vector<int32_t> history;
  TokenCounts running;
  for (int step = 0; step < 300; ++step) {
    const size_t before = history.size();
    for (int k = step % 3; k >= 0; --k) history.push_back(tok(rng));
    AddTokenCounts(absl::MakeConstSpan(history).subspan(before), 37, &running);
    const TokenCounts whole = CountTokens(history, 37);
    ASSERT_EQ(running.ids, whole.ids) << "step " << step;
    ASSERT_EQ(running.counts, whole.counts) << "step " << step;
  }
}

TEST(CheckSampleArgs, NamesRowAndProblem) {
  const std::vector<int32_t> ids = {1, 4}, counts = {1, 2}, one = {1};
  std::vector<SampleRow> rows(2, Row(1, 0.5));
  EXPECT_TRUE(CheckSampleArgs(2, 5, rows, 2).ok());
  EXPECT_FALSE(CheckSampleArgs(3, 5, rows, 3).ok());
  EXPECT_FALSE(CheckSampleArgs(2, 5, rows, 1).ok());
  auto message = [&](int64_t vocab) {
    return std::string(CheckSampleArgs(2, vocab, rows, 2).message());
  };
  rows[1].u = 1.0;
  EXPECT_NE(message(5).find("row 1: u = 1"), std::string::npos) << message(5);
  rows[1].u = 0.5;
  rows[1].params.top_p = 0;
  EXPECT_NE(message(5).find("row 1: top_p"), std::string::npos) << message(5);
  rows[1].params.top_p = 1;
  rows[0].penalty_ids = ids;
  rows[0].penalty_counts = one;
  EXPECT_NE(message(5).find("row 0: 2 penalty ids but 1 counts"), std::string::npos);
  rows[0].penalty_counts = counts;
  EXPECT_TRUE(CheckSampleArgs(2, 5, rows, 2).ok());
  EXPECT_NE(message(4).find("penalty id 4 outside [0, 4)"), std::string::npos) << message(4);
  const std::vector<int32_t> zero = {1, 0};
  rows[0].penalty_counts = zero;
  EXPECT_NE(message(5).find("count 0"), std::string::npos) << message(5);
  const std::vector<int32_t> descending = {4, 1};
  rows[0].penalty_ids = descending;
  rows[0].penalty_counts = counts;
  EXPECT_NE(message(5).find("ascending"), std::string::npos) << message(5);
}

TEST(BackendSample, TheCpuBackendPicksEachRowAndLeavesTheLogits) {
  std::unique_ptr<Backend> be = NewCpuBackend(2);
  const int rows = 5, vocab = 301;
  std::vector<float> host;
  for (int r = 0; r < rows; ++r) {
    const std::vector<float> l = RandomLogits(vocab, 40 + r);
    host.insert(host.end(), l.begin(), l.end());
  }
  std::unique_ptr<Tensor> t = be->NewActivation(rows, vocab).value();
  ASSERT_TRUE(be->CopyFromHost(host, *t).ok());
  const std::vector<int32_t> ids = {3, 17}, counts = {2, 1};
  std::vector<SampleRow> sr = {Row(0, 0), Row(0.8f, 0.3), Row(1.2f, 0.9), Row(0, 0), Row(1, 0.5)};
  sr[1].params.top_k = 10;
  sr[2].params.top_p = 0.8f;
  sr[3].penalty_ids = ids;
  sr[3].penalty_counts = counts;
  sr[3].params.repetition_penalty = 1.3f;
  sr[4].params.min_p = 0.05f;
  std::vector<int32_t> tokens(rows, -1);
  ASSERT_TRUE(be->Sample(*t, sr, absl::MakeSpan(tokens)).ok());
  for (int r = 0; r < rows; ++r) {
    std::vector<float> l(host.begin() + r * vocab, host.begin() + (r + 1) * vocab);
    EXPECT_EQ(tokens[r], SampleWithUniform(absl::MakeSpan(l), sr[r])) << r;
  }
  std::vector<float> after(rows * vocab);
  ASSERT_TRUE(be->CopyToHost(*t, absl::MakeSpan(after)).ok());
  EXPECT_EQ(after, host);
  sr.pop_back();
  EXPECT_FALSE(be->Sample(*t, sr, absl::MakeSpan(tokens)).ok());
}

}  // namespace
}  // namespace moa
