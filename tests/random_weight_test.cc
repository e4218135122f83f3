// Backend::RandomWeight on the CPU backend: the counter-based values of kernels/random_fill.h,
// deterministic per seed and independent of the thread count, inside their range, with the mean
// and variance of a uniform distribution, and refused for bad arguments. (The CUDA backend is
// checked against these same values in tests/gpu/random_weight_gpu_test.cc.)
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/quant.h"
#include "kernels/random_fill.h"

namespace moa {
namespace {

std::vector<float> Values(Backend& be, int64_t rows, int64_t cols, uint64_t seed, float scale,
                          float offset) {
  absl::StatusOr<std::unique_ptr<Tensor>> t = be.RandomWeight(rows, cols, seed, scale, offset);
  EXPECT_TRUE(t.ok()) << t.status();
  if (!t.ok()) return {};
  EXPECT_EQ((*t)->rows(), rows);
  EXPECT_EQ((*t)->cols(), cols);
  std::vector<float> v(rows * cols, std::numeric_limits<float>::quiet_NaN());
  EXPECT_TRUE(be.CopyToHost(**t, absl::MakeSpan(v)).ok());
  return v;
}

TEST(RandomUniform, OnTheGridInsideMinusOneToOne) {
  const uint64_t key = RandomKey(7);
  int below_zero = 0;
  for (uint64_t i = 0; i < 100000; ++i) {
    const float u = RandomUniform(key, i, 1.0f, 0.0f);
    ASSERT_GE(u, -1.0f);
    ASSERT_LT(u, 1.0f);
    // A multiple of 2^-23: the value is exact in float, so every backend rounds it the same way.
    const float k = u * 0x1p23f;
    ASSERT_EQ(k, std::floor(k)) << i;
    below_zero += u < 0.0f;
  }
  EXPECT_NEAR(below_zero, 50000, 5 * std::sqrt(25000.0));
}

TEST(RandomWeight, IsTheHashRoundedToFp16) {
  std::unique_ptr<Backend> be = NewCpuBackend(2);
  const std::vector<float> v = Values(*be, 37, 53, 99, 0.3f, 0.5f);
  const uint64_t key = RandomKey(99);
  for (size_t i = 0; i < v.size(); ++i) {
    ASSERT_EQ(v[i], Fp16ToF32(F32ToFp16(RandomUniform(key, i, 0.3f, 0.5f)))) << i;
  }
}

TEST(RandomWeight, DeterministicPerSeedWhateverTheThreads) {
  std::unique_ptr<Backend> one = NewCpuBackend(1);
  std::unique_ptr<Backend> four = NewCpuBackend(4);
  const std::vector<float> a = Values(*one, 129, 61, 5, 1.0f, 0.0f);
  const std::vector<float> b = Values(*four, 129, 61, 5, 1.0f, 0.0f);
  EXPECT_EQ(a, b);
  // Another seed: a different tensor, not merely a shifted copy of this one.
  const std::vector<float> c = Values(*one, 129, 61, 6, 1.0f, 0.0f);
  ASSERT_EQ(a.size(), c.size());
  int64_t same = 0;
  double cross = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    same += a[i] == c[i];
    cross += double{a[i]} * c[i];
  }
  EXPECT_LT(same, static_cast<int64_t>(a.size()) / 100);
  // Correlation of two independent uniforms on [-1, 1): mean 0, sd (1/3) / sqrt(n) per element.
  EXPECT_LT(std::fabs(cross / a.size()), 5.0 / 3.0 / std::sqrt(a.size()));
}

TEST(RandomWeight, RangeMeanAndVariance) {
  std::unique_ptr<Backend> be = NewCpuBackend(2);
  const float scale = 0.02f, offset = -0.25f;
  const int64_t rows = 301, cols = 333;  // odd sizes: no power-of-two structure to hide behind
  const std::vector<float> v = Values(*be, rows, cols, 12345, scale, offset);
  const double n = static_cast<double>(v.size());
  double sum = 0.0, sum2 = 0.0, lag = 0.0;
  float lo = INFINITY, hi = -INFINITY;
  for (size_t i = 0; i < v.size(); ++i) {
    ASSERT_TRUE(std::isfinite(v[i])) << i;
    lo = std::min(lo, v[i]);
    hi = std::max(hi, v[i]);
    sum += v[i];
    sum2 += (double{v[i]} - offset) * (double{v[i]} - offset);
    if (i > 0) lag += (double{v[i]} - offset) * (double{v[i - 1]} - offset);
  }
  // fp16 has 11 significant bits: the ends may round outward by half an ulp of 0.27.
  const double slack = 0.27 / 2048;
  EXPECT_GE(lo, offset - scale - slack);
  EXPECT_LE(hi, offset + scale + slack);
  // The whole range is used.
  EXPECT_LT(lo, offset - 0.99 * scale);
  EXPECT_GT(hi, offset + 0.99 * scale);
  const double var = double{scale} * scale / 3.0;  // of uniform [-scale, scale)
  EXPECT_NEAR(sum / n, offset, 5 * std::sqrt(var / n));
  // The variance of (x - offset)^2 is scale^4 * (1/5 - 1/9) for a uniform.
  const double var_sd = double{scale} * scale * std::sqrt(1.0 / 5 - 1.0 / 9) / std::sqrt(n);
  EXPECT_NEAR(sum2 / n, var, 5 * var_sd + var / 500);  // + fp16 rounding of the values
  // Neighbours are uncorrelated.
  EXPECT_LT(std::fabs(lag / n), 5 * var / std::sqrt(n));
}

TEST(RandomWeight, OneRowIsANormScale) {
  std::unique_ptr<Backend> be = NewCpuBackend(2);
  absl::StatusOr<std::unique_ptr<Tensor>> w = be->RandomWeight(1, 64, 3, 0.0f, 1.0f);
  ASSERT_TRUE(w.ok()) << w.status();
  // scale 0: exactly the offset, and usable where LoadWeight's norm weights are.
  absl::StatusOr<std::unique_ptr<Tensor>> x = be->NewActivation(2, 64);
  absl::StatusOr<std::unique_ptr<Tensor>> y = be->NewActivation(2, 64);
  ASSERT_TRUE(x.ok() && y.ok());
  std::vector<float> in(128);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i % 7) - 3.0f;
  ASSERT_TRUE(be->CopyFromHost(in, **x).ok());
  ASSERT_TRUE(be->RmsNorm(**x, **w, 1e-6f, **y).ok());
  std::vector<float> out(128);
  ASSERT_TRUE(be->CopyToHost(**y, absl::MakeSpan(out)).ok());
  double ss = 0.0;
  for (int i = 0; i < 64; ++i) ss += double{out[i]} * out[i];
  EXPECT_NEAR(ss / 64, 1.0, 1e-4);
}

TEST(RandomWeight, RefusesBadArguments) {
  std::unique_ptr<Backend> be = NewCpuBackend(1);
  EXPECT_EQ(be->RandomWeight(0, 4, 1, 1.0f, 0.0f).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(be->RandomWeight(4, -1, 1, 1.0f, 0.0f).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(be->RandomWeight(4, 4, 1, -1.0f, 0.0f).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(be->RandomWeight(4, 4, 1, NAN, 0.0f).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(be->RandomWeight(4, 4, 1, 1.0f, INFINITY).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(be->RandomWeight(int64_t{1} << 40, int64_t{1} << 20, 1, 1.0f, 0.0f).status().code(),
            absl::StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace moa
