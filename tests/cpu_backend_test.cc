// The CPU backend against plain reference implementations written here (double precision,
// explicit loops, explicit masks).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "absl/types/span.h"
#include "gtest/gtest.h"
#include "kernels/attention_span.h"
#include "kernels/backend.h"
#include "kernels/dtype.h"
#include "kernels/quant.h"
#include "kvcache/kv_cache_manager.h"

namespace moa {
namespace {

std::vector<float> RandomFloats(std::mt19937& rng, int64_t n, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// A weight [rows, cols] of `dtype` with random contents, owning its bytes.
HostTensor RandomWeight(std::mt19937& rng, DType dtype, int64_t rows, int64_t cols) {
  HostTensor t;
  t.name = "w";
  t.dtype = dtype;
  t.shape = {rows, cols};
  const int64_t row_bytes = RowBytes(dtype, cols).value();
  auto buf = std::make_shared<std::vector<uint8_t>>(rows * row_bytes);
  const bool k_quant = dtype == DType::kQ4_K || dtype == DType::kQ5_K || dtype == DType::kQ6_K;
  if (k_quant) {
    // No reference quantizer for K-quants: random bits with sane fp16 scales.
    std::uniform_int_distribution<int> byte(0, 255);
    for (uint8_t& b : *buf) b = static_cast<uint8_t>(byte(rng));
    const int64_t block_bytes = GetDTypeInfo(dtype).block_bytes;
    std::uniform_real_distribution<float> scale(0.001f, 0.01f);
    for (int64_t off = 0; off < static_cast<int64_t>(buf->size()); off += block_bytes) {
      const uint16_t d = F32ToFp16(scale(rng));
      const uint16_t dmin = F32ToFp16(scale(rng));
      if (dtype == DType::kQ6_K) {
        std::memcpy(buf->data() + off + 208, &d, 2);
      } else {
        std::memcpy(buf->data() + off, &d, 2);
        std::memcpy(buf->data() + off + 2, &dmin, 2);
      }
    }
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      const std::vector<float> v = RandomFloats(rng, cols);
      EXPECT_TRUE(QuantizeRow(dtype, v.data(), cols, buf->data() + r * row_bytes).ok());
    }
  }
  t.data = buf->data();
  t.nbytes = static_cast<int64_t>(buf->size());
  t.owner = buf;
  return t;
}

std::vector<float> Dequantized(const HostTensor& t) {
  const int64_t rows = t.shape[0], cols = t.shape[1];
  const int64_t row_bytes = RowBytes(t.dtype, cols).value();
  std::vector<float> out(rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    EXPECT_TRUE(DequantizeRow(t.dtype, t.data + r * row_bytes, cols, out.data() + r * cols).ok());
  }
  return out;
}

std::unique_ptr<Tensor> Upload(Backend& be, const std::vector<float>& v, int64_t rows,
                               int64_t cols) {
  auto t = be.NewActivation(rows, cols).value();
  EXPECT_TRUE(be.CopyFromHost(v, *t).ok());
  return t;
}

std::vector<float> Download(Backend& be, const Tensor& t) {
  std::vector<float> v(t.rows() * t.cols());
  EXPECT_TRUE(be.CopyToHost(t, absl::MakeSpan(v)).ok());
  return v;
}

struct MatMulCase {
  DType dtype;
  int64_t k;
};
void PrintTo(const MatMulCase& c, std::ostream* os) {
  *os << GetDTypeInfo(c.dtype).name << " k=" << c.k;
}

class MatMulTest : public ::testing::TestWithParam<MatMulCase> {};

// Reference: DequantizeRow, then a double-precision dot. The backend's error comes from float
// accumulation and, for Q8_0/Q4_0/Q4_1, from quantizing the activations to 8 bits per block of
// 32 (rounding to nearest: at most max|x| / 254 per element of the block), so the bound is
//   sum over blocks of (max|x_b| / 254) * sum|w_b|  +  1e-5 * sum|w||x|.
TEST_P(MatMulTest, MatchesDequantizedReference) {
  const auto [dtype, k] = GetParam();
  const bool int8_act = dtype == DType::kQ8_0 || dtype == DType::kQ4_0 || dtype == DType::kQ4_1;
  std::mt19937 rng(static_cast<unsigned>(k) * 31 + static_cast<unsigned>(dtype));
  const int64_t n = 37;
  HostTensor wt = RandomWeight(rng, dtype, n, k);
  const std::vector<float> wf = Dequantized(wt);
  auto be = NewCpuBackend(2);
  auto w = be->LoadWeight(wt).value();
  for (int64_t t_rows : {1, 7, 45}) {  // 45 > the backend's 32-row tile
    const std::vector<float> x = RandomFloats(rng, t_rows * k);
    auto xt = Upload(*be, x, t_rows, k);
    auto out = be->NewActivation(t_rows, n).value();
    ASSERT_TRUE(be->MatMul(*xt, *w, *out).ok());
    const std::vector<float> y = Download(*be, *out);
    for (int64_t t = 0; t < t_rows; ++t) {
      for (int64_t j = 0; j < n; ++j) {
        double ref = 0.0, mag = 0.0, act_err = 0.0;
        for (int64_t b = 0; b < k; b += 32) {
          double amax = 0.0, wsum = 0.0;
          for (int64_t i = b; i < std::min(k, b + 32); ++i) {
            const double xi = x[t * k + i], wi = wf[j * k + i];
            ref += xi * wi;
            mag += std::fabs(xi * wi);
            amax = std::max(amax, std::fabs(xi));
            wsum += std::fabs(wi);
          }
          act_err += amax / 254.0 * wsum;
        }
        const double tol = (int8_act ? act_err * 1.001 : 0.0) + 1e-5 * mag + 1e-6;
        ASSERT_NEAR(y[t * n + j], ref, tol)
            << GetDTypeInfo(dtype).name << " t=" << t << " j=" << j << " T=" << t_rows;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllTypes, MatMulTest,
    ::testing::Values(MatMulCase{DType::kF32, 100}, MatMulCase{DType::kF16, 100},
                      MatMulCase{DType::kBF16, 100}, MatMulCase{DType::kQ8_0, 160},
                      MatMulCase{DType::kQ4_0, 160}, MatMulCase{DType::kQ4_1, 160},
                      MatMulCase{DType::kQ8_0, 576}, MatMulCase{DType::kQ4_1, 1536},
                      MatMulCase{DType::kQ4_K, 768}, MatMulCase{DType::kQ5_K, 768},
                      MatMulCase{DType::kQ6_K, 768}),
    [](const auto& info) {
      return std::string(GetDTypeInfo(info.param.dtype).name) + "_K" + std::to_string(info.param.k);
    });

TEST(CpuBackend, MatMulIsBitwiseIndependentOfThreadCount) {
  std::mt19937 rng(7);
  const int64_t k = 224, n = 101, t_rows = 40;
  const std::vector<float> x = RandomFloats(rng, t_rows * k);
  for (DType dt : {DType::kQ4_1, DType::kQ8_0, DType::kF16, DType::kQ6_K}) {
    const int64_t kk = dt == DType::kQ6_K ? 512 : k;
    const std::vector<float> xx = RandomFloats(rng, t_rows * kk);
    HostTensor wt = RandomWeight(rng, dt, n, kk);
    std::vector<std::vector<float>> results;
    for (int threads : {1, 2, 3}) {
      auto be = NewCpuBackend(threads);
      auto w = be->LoadWeight(wt).value();
      auto xt = Upload(*be, xx, t_rows, kk);
      auto out = be->NewActivation(t_rows, n).value();
      ASSERT_TRUE(be->MatMul(*xt, *w, *out).ok());
      results.push_back(Download(*be, *out));
    }
    EXPECT_EQ(results[0], results[1]) << GetDTypeInfo(dt).name;
    EXPECT_EQ(results[0], results[2]) << GetDTypeInfo(dt).name;
  }
}

TEST(CpuBackend, MatMulRejectsMismatchedShapes) {
  std::mt19937 rng(1);
  auto be = NewCpuBackend(1);
  auto w = be->LoadWeight(RandomWeight(rng, DType::kQ8_0, 8, 64)).value();
  auto x = be->NewActivation(2, 96).value();
  auto out = be->NewActivation(2, 8).value();
  EXPECT_FALSE(be->MatMul(*x, *w, *out).ok());
  auto x2 = be->NewActivation(2, 64).value();
  auto out2 = be->NewActivation(3, 8).value();
  EXPECT_FALSE(be->MatMul(*x2, *w, *out2).ok());
}

TEST(CpuBackend, LoadWeightRejectsShortData) {
  std::mt19937 rng(2);
  HostTensor t = RandomWeight(rng, DType::kQ4_1, 4, 64);
  t.nbytes -= 1;
  EXPECT_FALSE(NewCpuBackend(1)->LoadWeight(t).ok());
  HostTensor u = RandomWeight(rng, DType::kQ4_1, 4, 64);
  u.shape = {4, 48};  // not a whole number of blocks
  EXPECT_FALSE(NewCpuBackend(1)->LoadWeight(u).ok());
}

TEST(CpuBackend, EmbedCopiesDequantizedRows) {
  std::mt19937 rng(3);
  auto be = NewCpuBackend(2);
  for (DType dt : {DType::kQ8_0, DType::kF32, DType::kQ4_K}) {
    const int64_t d = dt == DType::kQ4_K ? 256 : 96;
    HostTensor table = RandomWeight(rng, dt, 11, d);
    const std::vector<float> ref = Dequantized(table);
    auto tab = be->LoadWeight(table).value();
    const std::vector<int32_t> tokens = {3, 0, 10, 3};
    auto out = be->NewActivation(4, d).value();
    ASSERT_TRUE(be->Embed(*tab, tokens, *out).ok());
    const std::vector<float> y = Download(*be, *out);
    for (size_t i = 0; i < tokens.size(); ++i) {
      for (int64_t j = 0; j < d; ++j) ASSERT_EQ(y[i * d + j], ref[tokens[i] * d + j]);
    }
    const std::vector<int32_t> bad = {11};
    auto out1 = be->NewActivation(1, d).value();
    EXPECT_FALSE(be->Embed(*tab, bad, *out1).ok());
  }
}

TEST(CpuBackend, RmsNormSwiGluAdd) {
  std::mt19937 rng(4);
  auto be = NewCpuBackend(2);
  const int64_t rows = 5, d = 72;
  const std::vector<float> x = RandomFloats(rng, rows * d, 3.0f);
  const std::vector<float> wv = RandomFloats(rng, d);
  HostTensor wt;
  wt.name = "norm";
  wt.shape = {d};
  auto wbuf = std::make_shared<std::vector<float>>(wv);
  wt.data = reinterpret_cast<const uint8_t*>(wbuf->data());
  wt.nbytes = d * 4;
  wt.owner = wbuf;
  auto w = be->LoadWeight(wt).value();
  auto xt = Upload(*be, x, rows, d);
  auto out = be->NewActivation(rows, d).value();
  const float eps = 1e-5f;
  ASSERT_TRUE(be->RmsNorm(*xt, *w, eps, *out).ok());
  std::vector<float> y = Download(*be, *out);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += double{x[r * d + i]} * x[r * d + i];
    const double inv = 1.0 / std::sqrt(ss / d + eps);
    for (int64_t i = 0; i < d; ++i) {
      ASSERT_NEAR(y[r * d + i], x[r * d + i] * inv * wv[i], 1e-5 * (1 + std::fabs(wv[i])));
    }
  }

  const std::vector<float> g = RandomFloats(rng, rows * d, 4.0f);
  const std::vector<float> u = RandomFloats(rng, rows * d);
  auto gt = Upload(*be, g, rows, d);
  auto ut = Upload(*be, u, rows, d);
  ASSERT_TRUE(be->SwiGlu(*gt, *ut, *out).ok());
  y = Download(*be, *out);
  for (int64_t i = 0; i < rows * d; ++i) {
    const double ref = g[i] / (1.0 + std::exp(-double{g[i]})) * u[i];
    ASSERT_NEAR(y[i], ref, 1e-5 * (1 + std::fabs(ref)));
  }

  ASSERT_TRUE(be->Add(*gt, *ut).ok());
  y = Download(*be, *gt);
  for (int64_t i = 0; i < rows * d; ++i) ASSERT_EQ(y[i], g[i] + u[i]);
}

TEST(CpuBackend, RopeBothLayouts) {
  std::mt19937 rng(5);
  auto be = NewCpuBackend(2);
  const int n_heads = 3, hd = 12, rows = 4;
  const std::vector<int32_t> pos = {0, 1, 17, 300};
  std::vector<float> inv(hd / 2);
  for (int i = 0; i < hd / 2; ++i) inv[i] = static_cast<float>(std::pow(10000.0, -2.0 * i / hd));
  const std::vector<float> x = RandomFloats(rng, rows * n_heads * hd);
  for (RopeLayout layout : {RopeLayout::kHalfSplit, RopeLayout::kInterleaved}) {
    auto xt = Upload(*be, x, rows, n_heads * hd);
    ASSERT_TRUE(be->Rope(*xt, n_heads, hd, inv, pos, layout).ok());
    const std::vector<float> y = Download(*be, *xt);
    for (int r = 0; r < rows; ++r) {
      for (int h = 0; h < n_heads; ++h) {
        const int64_t base = (int64_t{r} * n_heads + h) * hd;
        for (int i = 0; i < hd / 2; ++i) {
          const int a = layout == RopeLayout::kHalfSplit ? i : 2 * i;
          const int b = layout == RopeLayout::kHalfSplit ? i + hd / 2 : 2 * i + 1;
          const double angle = static_cast<double>(pos[r]) * inv[i];
          const double ra = x[base + a] * std::cos(angle) - x[base + b] * std::sin(angle);
          const double rb = x[base + a] * std::sin(angle) + x[base + b] * std::cos(angle);
          ASSERT_NEAR(y[base + a], ra, 1e-4);
          ASSERT_NEAR(y[base + b], rb, 1e-4);
        }
      }
    }
  }
  auto xt = Upload(*be, x, rows, n_heads * hd);
  EXPECT_FALSE(
      be->Rope(*xt, n_heads, hd, inv, absl::MakeConstSpan(pos).subspan(1), RopeLayout::kHalfSplit)
          .ok());
}

// One sequence's worth of attention inputs and the reference that sees the same keys.
struct AttnSetup {
  int n_heads, n_kv, hd;
  int64_t len;
  std::vector<float> q, k, v;  // [len, heads * hd]
};

AttnSetup MakeAttn(std::mt19937& rng, int n_heads, int n_kv, int hd, int64_t len) {
  AttnSetup s{n_heads, n_kv, hd, len, {}, {}, {}};
  s.q = RandomFloats(rng, len * n_heads * hd);
  s.k = RandomFloats(rng, len * n_kv * hd);
  s.v = RandomFloats(rng, len * n_kv * hd);
  return s;
}

// Dense softmax over an explicit mask built with IsVisible().
std::vector<double> ReferenceAttention(const AttnSetup& s, const SpanParams& sp,
                                       const std::vector<SpanRule>& rules, float scale) {
  const int hd = s.hd, group = s.n_heads / s.n_kv;
  std::vector<double> out(s.len * s.n_heads * hd, 0.0);
  for (int64_t qp = 0; qp < s.len; ++qp) {
    for (int h = 0; h < s.n_heads; ++h) {
      const int kvh = h / group;
      const SpanRule rule = rules.empty() ? SpanRule{} : rules[kvh];
      std::vector<double> logit(s.len, -INFINITY);
      double mx = -INFINITY;
      for (int64_t kp = 0; kp < s.len; ++kp) {
        if (!IsVisible(rule, sp, qp, kp)) continue;
        double dot = 0;
        for (int i = 0; i < hd; ++i) {
          dot += double{s.q[(qp * s.n_heads + h) * hd + i]} * s.k[(kp * s.n_kv + kvh) * hd + i];
        }
        logit[kp] = dot * scale;
        mx = std::max(mx, logit[kp]);
      }
      double sum = 0;
      for (int64_t kp = 0; kp < s.len; ++kp) sum += std::exp(logit[kp] - mx);
      for (int64_t kp = 0; kp < s.len; ++kp) {
        const double p = std::exp(logit[kp] - mx) / sum;
        for (int i = 0; i < hd; ++i) {
          out[(qp * s.n_heads + h) * hd + i] += p * s.v[(kp * s.n_kv + kvh) * hd + i];
        }
      }
    }
  }
  return out;
}

// A one-layer KV cache for the attention tests: a manager and its pool.
struct PagedKv {
  std::unique_ptr<KvCacheManager> kv;
  std::unique_ptr<KvPool> pool;
};

PagedKv MakePagedKv(Backend& be, int n_kv, int hd, const SpanParams& sp,
                    const std::vector<SpanRule>& rules, int32_t blocks) {
  KvLayout layout;
  layout.n_layers = 1;
  layout.n_kv_heads = n_kv;
  layout.head_dim = hd;
  layout.block_size = 4;  // lengths here are mostly not multiples of it
  layout.span = sp;
  if (!rules.empty()) layout.rules = {rules};
  return {KvCacheManager::Create(layout, blocks).value(),
          be.NewKvPool(blocks, layout.block_size, hd).value()};
}

// The block tables of a sequence, as SequenceSlice takes them.
std::vector<absl::Span<const int32_t>> Tables(const KvCacheManager& kv, SeqId seq) {
  std::vector<absl::Span<const int32_t>> t;
  for (int h = 0; h < kv.layout().n_kv_heads; ++h) t.push_back(kv.table(seq, 0, h).blocks);
  return t;
}

// Runs the whole sequence through Attention in chunks of the given sizes, trimming the cache
// between steps; returns the output rows of every position.
std::vector<float> RunChunks(Backend& be, const AttnSetup& s, const SpanParams& sp,
                             const std::vector<SpanRule>& rules, float scale,
                             const std::vector<int64_t>& chunks) {
  PagedKv paged =
      MakePagedKv(be, s.n_kv, s.hd, sp, rules, static_cast<int32_t>(s.n_kv * ((s.len + 3) / 4)));
  KvCacheManager& kv = *paged.kv;
  const SeqId id = kv.AddSequence();
  const int64_t qc = int64_t{s.n_heads} * s.hd, kc = int64_t{s.n_kv} * s.hd;
  std::vector<float> all;
  int64_t past = 0;
  for (int64_t n : chunks) {
    auto slice = [&](const std::vector<float>& src, int64_t cols) {
      return std::vector<float>(src.begin() + past * cols, src.begin() + (past + n) * cols);
    };
    auto q = Upload(be, slice(s.q, qc), n, qc);
    auto k = Upload(be, slice(s.k, kc), n, kc);
    auto v = Upload(be, slice(s.v, kc), n, kc);
    auto out = be.NewActivation(n, qc).value();
    AttentionParams p{0, s.n_heads, s.n_kv, s.hd, scale, sp, rules};
    EXPECT_TRUE(kv.Grow(id, past + n).ok());
    const std::vector<absl::Span<const int32_t>> tables = Tables(kv, id);
    const SequenceSlice seq{past, n, tables, {}};
    EXPECT_TRUE(be.Attention(*q, *k, *v, {&seq, 1}, p, *paged.pool, *out).ok());
    kv.Trim(id);
    const std::vector<float> y = Download(be, *out);
    all.insert(all.end(), y.begin(), y.end());
    past += n;
  }
  return all;
}

struct AttnCase {
  std::string name;
  int n_heads, n_kv;
  SpanParams span;
  std::vector<SpanRule> rules;  // per kv head; empty = dense
};

// Keeps gtest (and ctest's test names) from printing the struct's bytes.
void PrintTo(const AttnCase& c, std::ostream* os) { *os << c.name; }

class AttentionTest : public ::testing::TestWithParam<AttnCase> {};

SpanRule Window(int64_t alpha, double beta) { return SpanRule{false, alpha, beta}; }

// The acceptance item: attention with span rules equals dense attention under the same mask,
// and chunked prefill / one prefill / token-by-token decode give the same result.
TEST_P(AttentionTest, EqualsDenseUnderMaskInAnyChunking) {
  const AttnCase& c = GetParam();
  std::mt19937 rng(11);
  const int hd = 16;
  const int64_t len = 37;
  const AttnSetup s = MakeAttn(rng, c.n_heads, c.n_kv, hd, len);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const std::vector<double> ref = ReferenceAttention(s, c.span, c.rules, scale);
  auto be = NewCpuBackend(2);
  const std::vector<float> one = RunChunks(*be, s, c.span, c.rules, scale, {len});
  ASSERT_EQ(one.size(), ref.size());
  for (size_t i = 0; i < ref.size(); ++i) ASSERT_NEAR(one[i], ref[i], 2e-5) << "element " << i;

  const std::vector<float> chunked = RunChunks(*be, s, c.span, c.rules, scale, {5, 19, 13});
  EXPECT_EQ(chunked, one);
  const std::vector<float> decode =
      RunChunks(*be, s, c.span, c.rules, scale, std::vector<int64_t>(len, 1));
  EXPECT_EQ(decode, one);
  auto single = NewCpuBackend(1);
  EXPECT_EQ(RunChunks(*single, s, c.span, c.rules, scale, {len}), one);

  // Masked runs must actually differ from dense ones when some window is shorter.
  bool any_short = false;
  for (const SpanRule& r : c.rules) any_short |= SpanTokens(r, c.span, len) < len;
  if (any_short) {
    const std::vector<double> dense = ReferenceAttention(s, c.span, {}, scale);
    double diff = 0;
    for (size_t i = 0; i < dense.size(); ++i) diff = std::max(diff, std::fabs(dense[i] - one[i]));
    EXPECT_GT(diff, 1e-3);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Rules, AttentionTest,
    ::testing::Values(
        AttnCase{"DenseMha", 4, 4, {4, 4}, {}},
        AttnCase{"DenseGqa3", 6, 2, {4, 4}, {SpanRule{}, SpanRule{}}},
        AttnCase{"ShortWindowsGqa4", 8, 2, {3, 4}, {Window(8, 0.0), Window(4, 0.25)}},
        AttnCase{"MixedGqa3", 9, 3, {4, 4}, {SpanRule{}, Window(12, 0.0), Window(0, 0.5)}},
        AttnCase{"WindowLongerThanSequence",
                 4,
                 4,
                 {4, 8},
                 {Window(64, 0.0), Window(8, 1.0), Window(16, 0.0), SpanRule{}}},
        AttnCase{"SinkLargerThanSequence", 6, 2, {50, 4}, {Window(4, 0.0), Window(0, 0.0)}},
        AttnCase{"NoSink", 4, 1, {0, 4}, {Window(8, 0.0)}}),
    [](const auto& info) { return info.param.name; });

TEST(CpuBackend, AttentionBatchOfSequencesEqualsEachAlone) {
  std::mt19937 rng(13);
  const int nh = 6, nkv = 2, hd = 8;
  const SpanParams sp{2, 4};
  const std::vector<SpanRule> rules = {Window(8, 0.0), SpanRule{}};
  const float scale = 0.3f;
  const std::vector<int64_t> lens = {9, 1, 20};
  std::vector<AttnSetup> seqs;
  for (int64_t len : lens) seqs.push_back(MakeAttn(rng, nh, nkv, hd, len));
  auto be = NewCpuBackend(3);
  // Each alone: the first len-3 (at least 0) tokens as a prefill, then the rest.
  std::vector<std::vector<float>> alone;
  for (const AttnSetup& s : seqs) alone.push_back(RunChunks(*be, s, sp, rules, scale, {s.len}));
  // Together: one batched call with all tokens, the sequences' blocks in one pool.
  PagedKv paged = MakePagedKv(*be, nkv, hd, sp, rules, 64);
  std::vector<std::vector<absl::Span<const int32_t>>> tables;
  std::vector<SequenceSlice> slices;
  std::vector<float> q, k, v;
  for (const AttnSetup& s : seqs) {
    const SeqId id = paged.kv->AddSequence();
    ASSERT_TRUE(paged.kv->Grow(id, s.len).ok());
    tables.push_back(Tables(*paged.kv, id));
    slices.push_back({0, s.len, tables.back(), {}});
    q.insert(q.end(), s.q.begin(), s.q.end());
    k.insert(k.end(), s.k.begin(), s.k.end());
    v.insert(v.end(), s.v.begin(), s.v.end());
  }
  const int64_t rows = 30;
  auto qt = Upload(*be, q, rows, nh * hd);
  auto kt = Upload(*be, k, rows, nkv * hd);
  auto vt = Upload(*be, v, rows, nkv * hd);
  auto out = be->NewActivation(rows, nh * hd).value();
  AttentionParams p{0, nh, nkv, hd, scale, sp, rules};
  ASSERT_TRUE(be->Attention(*qt, *kt, *vt, slices, p, *paged.pool, *out).ok());
  const std::vector<float> y = Download(*be, *out);
  std::vector<float> expected;
  for (const auto& a : alone) expected.insert(expected.end(), a.begin(), a.end());
  EXPECT_EQ(y, expected);
}

TEST(CpuBackend, AttentionRejectsBadInput) {
  auto be = NewCpuBackend(1);
  const int nh = 2, nkv = 1, hd = 4;
  PagedKv paged = MakePagedKv(*be, nkv, hd, {}, {}, 4);
  const SeqId id = paged.kv->AddSequence();
  ASSERT_TRUE(paged.kv->Grow(id, 3).ok());
  const std::vector<absl::Span<const int32_t>> tables = Tables(*paged.kv, id);
  auto q = be->NewActivation(2, nh * hd).value();
  auto k = be->NewActivation(2, nkv * hd).value();
  auto v = be->NewActivation(2, nkv * hd).value();
  auto out = be->NewActivation(2, nh * hd).value();
  ASSERT_TRUE(be->CopyFromHost(std::vector<float>(16, 0.5f), *q).ok());
  ASSERT_TRUE(be->CopyFromHost(std::vector<float>(8, 0.5f), *k).ok());
  ASSERT_TRUE(be->CopyFromHost(std::vector<float>(8, 0.5f), *v).ok());
  AttentionParams p{0, nh, nkv, hd, 0.5f, {}, {}};
  KvPool& pool = *paged.pool;
  SequenceSlice past_blocks{3, 2, tables, {}};  // position 4 is in a block the table lacks
  EXPECT_EQ(be->Attention(*q, *k, *v, {&past_blocks, 1}, p, pool, *out).code(),
            absl::StatusCode::kInternal);
  SequenceSlice fits{1, 2, tables, {}};
  EXPECT_TRUE(be->Attention(*q, *k, *v, {&fits, 1}, p, pool, *out).ok());
  SequenceSlice too_few{0, 1, tables, {}};  // rows of q not covered
  EXPECT_FALSE(be->Attention(*q, *k, *v, {&too_few, 1}, p, pool, *out).ok());
  SequenceSlice negative{-1, 2, tables, {}};
  EXPECT_EQ(be->Attention(*q, *k, *v, {&negative, 1}, p, pool, *out).code(),
            absl::StatusCode::kOutOfRange);
  const SpanRule two[2] = {};
  AttentionParams wrong_rules = p;
  wrong_rules.rules = two;
  EXPECT_FALSE(be->Attention(*q, *k, *v, {&fits, 1}, wrong_rules, pool, *out).ok());
  AttentionParams wrong_heads = p;
  wrong_heads.n_heads = 3;
  EXPECT_FALSE(be->Attention(*q, *k, *v, {&fits, 1}, wrong_heads, pool, *out).ok());
}

}  // namespace
}  // namespace moa
