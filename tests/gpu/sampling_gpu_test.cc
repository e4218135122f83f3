// The CUDA backend's Sample against SampleWithUniform (kernels/sampling.h) on the host: random
// logits of awkward and real vocabulary sizes, batches mixing greedy, top-k, top-p, min-p,
// penalties over random histories and temperatures 0.3 to 1.5. The tokens must be the same except
// where the host's own cumulative probability at the boundary between the two picks lies within
// 1e-5 of u (the device sums in another order); those are counted and reported. Also times a
// batch of 64 x 128256. Runs on the GPU machine only (moa_gpu_tests).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/sampling.h"

namespace moa {
namespace {

// One batch: logits [rows, vocab] and each row's parameters, penalty lists and u.
struct Batch {
  int64_t rows = 0;
  int64_t vocab = 0;
  std::vector<float> logits;
  std::vector<TokenCounts> counts;
  std::vector<SampleRow> sample_rows;
};

// Row kinds, cycled through the batch.
enum Kind { kGreedy, kGreedyPenalties, kTopK, kTopP, kMinP, kPenaltiesTopP, kAll, kFull, kKinds };

Batch MakeBatch(int64_t rows, int64_t vocab, unsigned seed) {
  std::mt19937 rng(seed);
  auto uniform = [&](double a, double b) {
    return std::uniform_real_distribution<double>(a, b)(rng);
  };
  Batch b;
  b.rows = rows;
  b.vocab = vocab;
  b.logits.resize(rows * vocab);
  b.counts.resize(rows);
  b.sample_rows.resize(rows);
  for (int64_t r = 0; r < rows; ++r) {
    // Flat and peaked rows; every fifth row on a grid of 0.25 so that many logits tie.
    const float sd = std::vector<float>{1.0f, 3.0f, 6.0f}[r % 3];
    std::normal_distribution<float> dist(0.0f, sd);
    for (int64_t i = 0; i < vocab; ++i) {
      float x = dist(rng);
      if (r % 5 == 4) x = std::round(x * 4.0f) / 4.0f;
      b.logits[r * vocab + i] = x;
    }
    SampleRow& s = b.sample_rows[r];
    SamplingParams& p = s.params;
    const int kind = static_cast<int>((r + seed) % kKinds);
    const bool sampled = kind != kGreedy && kind != kGreedyPenalties;
    if (sampled) p.temperature = static_cast<float>(uniform(0.3, 1.5));
    if (kind == kTopK) p.top_k = std::vector<int>{1, 5, 50, 1000, 40000}[r % 5];
    if (kind == kTopP || kind == kPenaltiesTopP) p.top_p = static_cast<float>(uniform(0.5, 0.97));
    if (kind == kMinP) p.min_p = static_cast<float>(uniform(0.02, 0.3));
    if (kind == kAll) {
      p.top_k = 200;
      p.top_p = 0.8f;
      p.min_p = 0.05f;
    }
    if (kind == kGreedyPenalties || kind == kPenaltiesTopP || kind == kAll) {
      p.repetition_penalty = static_cast<float>(uniform(0.8, 1.6));
      p.presence_penalty = static_cast<float>(uniform(-0.5, 1.0));
      p.frequency_penalty = static_cast<float>(uniform(-0.3, 0.5));
      // A history with repeats, biased to the likely tokens so that the penalties matter.
      std::vector<int32_t> history;
      const int n = static_cast<int>(uniform(1, 400));
      std::vector<int32_t> order(vocab);
      std::iota(order.begin(), order.end(), 0);
      const float* row = &b.logits[r * vocab];
      const int64_t top = std::min<int64_t>(64, vocab);
      std::partial_sort(order.begin(), order.begin() + top, order.end(),
                        [&](int32_t x, int32_t y) { return row[x] > row[y]; });
      for (int i = 0; i < n; ++i) {
        history.push_back(i % 2 == 0 ? order[static_cast<int>(uniform(0, top))]
                                     : static_cast<int32_t>(uniform(0, vocab)));
      }
      b.counts[r] = CountTokens(history, static_cast<int32_t>(vocab));
      s.penalty_ids = b.counts[r].ids;
      s.penalty_counts = b.counts[r].counts;
    }
    s.u = uniform(0.0, 1.0);
  }
  return b;
}

// The host's sorted candidates of a row after penalties, and the cumulative probability (over
// what SampleWithUniform keeps, normalised by their total) at the end of each: the boundaries
// the pick compares u with.
struct HostCdf {
  std::vector<int32_t> ids;  // kept candidates, best first
  std::vector<double> cum;   // cum[i]: share of ids[0..i] in the kept total
};

HostCdf Cdf(std::vector<float> l, const SampleRow& row) {
  const SamplingParams& p = row.params;
  for (size_t j = 0; j < row.penalty_ids.size(); ++j) {
    float& x = l[row.penalty_ids[j]];
    x = x > 0 ? x / p.repetition_penalty : x * p.repetition_penalty;
    x -= std::fma(p.frequency_penalty, static_cast<float>(row.penalty_counts[j]),
                  p.presence_penalty);
  }
  const int32_t n = static_cast<int32_t>(l.size());
  std::vector<int32_t> ids(n);
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return l[a] > l[b]; });
  ids.resize(p.top_k > 0 ? std::min(p.top_k, n) : n);
  std::vector<double> prob(ids.size());
  double z = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    z += prob[i] = std::exp((l[ids[i]] - static_cast<double>(l[ids[0]])) / p.temperature);
  }
  size_t keep = ids.size();
  while (p.min_p > 0 && keep > 1 && prob[keep - 1] / z < p.min_p * (1.0 / z)) --keep;
  double cum = 0;
  for (size_t i = 0; i < keep && p.top_p < 1.0f; ++i) {
    if ((cum += prob[i] / z) >= p.top_p) {
      keep = i + 1;
      break;
    }
  }
  HostCdf c;
  c.ids.assign(ids.begin(), ids.begin() + keep);
  double total = 0;
  for (size_t i = 0; i < keep; ++i) total += prob[i];
  cum = 0;
  for (size_t i = 0; i < keep; ++i) c.cum.push_back((cum += prob[i]) / total);
  return c;
}

class SamplingGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Backend>> gpu = NewCudaBackend(0);
    ASSERT_TRUE(gpu.ok()) << "no CUDA backend: " << gpu.status();
    gpu_ = *std::move(gpu);
  }

  std::unique_ptr<Tensor> Upload(const Batch& b) {
    std::unique_ptr<Tensor> t = gpu_->NewActivation(b.rows, b.vocab).value();
    EXPECT_TRUE(gpu_->CopyFromHost(b.logits, *t).ok());
    return t;
  }

  // Device picks vs host picks for one batch; returns the number of differences explained by a
  // boundary within 1e-5 of u and fails on any other.
  int Compare(const Batch& b, const std::string& what) {
    std::unique_ptr<Tensor> t = Upload(b);
    std::vector<int32_t> got(b.rows, -1);  // poison
    const absl::Status s = gpu_->Sample(*t, b.sample_rows, absl::MakeSpan(got));
    EXPECT_TRUE(s.ok()) << what << ": " << s;
    if (!s.ok()) return 0;
    std::vector<float> after(b.rows * b.vocab);
    EXPECT_TRUE(gpu_->CopyToHost(*t, absl::MakeSpan(after)).ok());
    EXPECT_TRUE(after == b.logits) << what << ": Sample changed the logits";
    int near = 0;
    for (int64_t r = 0; r < b.rows; ++r) {
      std::vector<float> l(b.logits.begin() + r * b.vocab, b.logits.begin() + (r + 1) * b.vocab);
      const int32_t want = SampleWithUniform(absl::MakeSpan(l), b.sample_rows[r]);
      if (got[r] == want) continue;
      const SampleRow& row = b.sample_rows[r];
      std::string detail =
          absl::StrCat(what, " row ", r, ": gpu ", got[r], ", cpu ", want, ", temperature ",
                       row.params.temperature, " top_k ", row.params.top_k, " top_p ",
                       row.params.top_p, " min_p ", row.params.min_p, " u ", row.u);
      if (row.params.temperature == 0.0f) {
        ADD_FAILURE() << detail << " (greedy)";
        continue;
      }
      const HostCdf c = Cdf(
          std::vector<float>(b.logits.begin() + r * b.vocab, b.logits.begin() + (r + 1) * b.vocab),
          row);
      const auto at = [&](int32_t id) {
        return std::find(c.ids.begin(), c.ids.end(), id) - c.ids.begin();
      };
      const int64_t i = at(want), j = at(got[r]);
      const bool adjacent = i < static_cast<int64_t>(c.ids.size()) &&
                            j < static_cast<int64_t>(c.ids.size()) && std::abs(i - j) == 1;
      const double gap = adjacent ? std::abs(row.u - c.cum[std::min(i, j)]) : INFINITY;
      if (gap <= 1e-5) {
        ++near;
        std::printf("  boundary case: %s, |u - boundary| = %.3g\n", detail.c_str(), gap);
      } else {
        ADD_FAILURE() << detail << ": candidates " << i << " and " << j << " of " << c.ids.size()
                      << " kept, |u - boundary| " << gap;
      }
    }
    return near;
  }

  std::unique_ptr<Backend> gpu_;
};

TEST_F(SamplingGpuTest, MixedBatchesMatchTheHost) {
  int near = 0, rows = 0;
  const std::pair<int64_t, int64_t> shapes[] = {{1, 7},      {9, 1001},    {37, 49152},
                                                {16, 32000}, {23, 128256}, {64, 128256},
                                                {3, 151936}, {130, 4099}};
  unsigned seed = 1;
  for (const auto& [batch, vocab] : shapes) {
    for (int rep = 0; rep < 2; ++rep, ++seed) {
      near += Compare(MakeBatch(batch, vocab, seed), absl::StrCat(batch, "x", vocab, " #", rep));
      rows += static_cast<int>(batch);
    }
  }
  std::printf("sampling: %d rows compared, %d differ at a boundary within 1e-5 of u\n", rows, near);
  EXPECT_LE(near, rows / 1000 + 1);
}

TEST_F(SamplingGpuTest, UOnTheHostsBoundariesDiffersOnlyToANeighbour) {
  // u set to the host's cumulative probability at the end of a kept candidate: the device's sums
  // may land either side, so the pick is that candidate or the next one, nothing else.
  Batch b = MakeBatch(48, 49152, 77);
  int sampled = 0;
  for (int64_t r = 0; r < b.rows; ++r) {
    SampleRow& row = b.sample_rows[r];
    if (row.params.temperature == 0.0f) continue;
    const HostCdf c = Cdf(
        std::vector<float>(b.logits.begin() + r * b.vocab, b.logits.begin() + (r + 1) * b.vocab),
        row);
    if (c.ids.size() < 2) continue;
    row.u = std::min(c.cum[r % (c.ids.size() - 1)], std::nextafter(1.0, 0.0));
    ++sampled;
  }
  const int near = Compare(b, "u on boundaries");
  std::printf("sampling: u on a boundary in %d rows, %d picked the neighbour\n", sampled, near);
}

TEST_F(SamplingGpuTest, RefusesWhatTheHostRefuses) {
  Batch b = MakeBatch(4, 1000, 5);
  std::unique_ptr<Tensor> t = Upload(b);
  std::vector<int32_t> tokens(4);
  b.sample_rows[2].u = 1.0;
  const absl::Status bad_u = gpu_->Sample(*t, b.sample_rows, absl::MakeSpan(tokens));
  EXPECT_EQ(bad_u.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_u.message().find("row 2"), absl::string_view::npos) << bad_u;
  b.sample_rows[2].u = 0.5;
  std::vector<int32_t> few(3);
  EXPECT_FALSE(gpu_->Sample(*t, b.sample_rows, absl::MakeSpan(few)).ok());
  const std::vector<int32_t> ids = {1000}, counts = {1};
  b.sample_rows[1].penalty_ids = ids;
  b.sample_rows[1].penalty_counts = counts;
  EXPECT_FALSE(gpu_->Sample(*t, b.sample_rows, absl::MakeSpan(tokens)).ok());
}

double MedianMs(const std::function<void()>& f, int reps) {
  for (int i = 0; i < 3; ++i) f();
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

TEST_F(SamplingGpuTest, TimingBatch64Vocab128256) {
  // Wall time of a whole Sample call (metadata upload, kernels, the tokens back): the call
  // returns only once the tokens are on the host. Median of 20 after 3 warm-ups.
  Batch b = MakeBatch(64, 128256, 99);
  std::unique_ptr<Tensor> t = Upload(b);
  std::vector<int32_t> tokens(64);
  auto run = [&](const std::vector<SampleRow>& rows) {
    return [&, rows] { ASSERT_TRUE(gpu_->Sample(*t, rows, absl::MakeSpan(tokens)).ok()); };
  };
  std::vector<SampleRow> greedy(64), top_p(64), mixed = b.sample_rows;
  for (int i = 0; i < 64; ++i) {
    top_p[i].params.temperature = 1.0f;
    top_p[i].params.top_p = 0.9f;
    top_p[i].u = (i + 0.5) / 64;
  }
  const double g = MedianMs(run(greedy), 20);
  const double p = MedianMs(run(top_p), 20);
  const double m = MedianMs(run(mixed), 20);
  std::vector<float> host(64 * 128256);
  const double copy =
      MedianMs([&] { ASSERT_TRUE(gpu_->CopyToHost(*t, absl::MakeSpan(host)).ok()); }, 20);
  std::printf(
      "sampling 64 x 128256 on the GPU (median ms per call): greedy %.3f, top-p 0.9 %.3f, "
      "mixed batch %.3f; copying the logits to the host instead: %.3f\n",
      g, p, m, copy);
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < 64; ++r) {
    std::vector<float> l(host.begin() + r * 128256, host.begin() + (r + 1) * 128256);
    SampleWithUniform(absl::MakeSpan(l), top_p[r]);
  }
  std::printf(
      "sampling 64 x 128256 on the host (one thread, top-p 0.9): %.3f ms\n",
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
}

}  // namespace
}  // namespace moa
