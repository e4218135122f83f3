// The reference dequantizers and quantizers against gguf-py (llama.cpp's numpy implementation of
// the formats; data from tests/tools/make_quant_cases.py), plus error bounds and the half-float
// conversions against the CPU's own F16C instructions.
#include "kernels/quant.h"

#include <bit>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#ifdef __F16C__
#include <immintrin.h>
#endif

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace moa {
namespace {

using ::testing::HasSubstr;

std::string CaseDir() { return moa::testing::GeneratedDataDir() + "/quant_cases/"; }

// Reads a generated file; fails the test (not skips) when the data was not generated.
std::vector<uint8_t> ReadCase(const std::string& file) {
  const std::string path = CaseDir() + file;
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "missing " << path
                         << "; generate it with: .venv/bin/python tests/tools/make_quant_cases.py";
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

std::vector<float> AsFloats(const std::vector<uint8_t>& bytes) {
  std::vector<float> out(bytes.size() / sizeof(float));
  std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
  return out;
}

struct TypeCase {
  DType type;
  const char* name;
};
void PrintTo(const TypeCase& c, std::ostream* os) { *os << c.name; }

class DequantizeVsGgufPy : public ::testing::TestWithParam<TypeCase> {};

TEST_P(DequantizeVsGgufPy, BitExact) {
  const TypeCase& c = GetParam();
  const std::vector<uint8_t> raw = ReadCase(std::string(c.name) + ".bin");
  const std::vector<float> want = AsFloats(ReadCase(std::string(c.name) + ".f32"));
  ASSERT_FALSE(want.empty());
  absl::StatusOr<int64_t> bytes = RowBytes(c.type, static_cast<int64_t>(want.size()));
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  ASSERT_EQ(*bytes, static_cast<int64_t>(raw.size()));

  std::vector<float> got(want.size());
  ASSERT_TRUE(DequantizeRow(c.type, raw.data(), static_cast<int64_t>(got.size()), got.data()).ok());
  int mismatches = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    // Bit patterns: NaNs (in the F16/BF16 cases) must match too, payload included.
    if (std::bit_cast<uint32_t>(got[i]) != std::bit_cast<uint32_t>(want[i]) && ++mismatches <= 5) {
      ADD_FAILURE() << c.name << " element " << i << " (block "
                    << i / GetDTypeInfo(c.type).block_elems << "): got " << got[i] << ", gguf-py "
                    << want[i];
    }
  }
  EXPECT_EQ(mismatches, 0);
}

INSTANTIATE_TEST_SUITE_P(
    AllTypes, DequantizeVsGgufPy,
    ::testing::Values(TypeCase{DType::kF32, "F32"}, TypeCase{DType::kF16, "F16"},
                      TypeCase{DType::kBF16, "BF16"}, TypeCase{DType::kQ8_0, "Q8_0"},
                      TypeCase{DType::kQ4_0, "Q4_0"}, TypeCase{DType::kQ4_1, "Q4_1"},
                      TypeCase{DType::kQ4_K, "Q4_K"}, TypeCase{DType::kQ5_K, "Q5_K"},
                      TypeCase{DType::kQ6_K, "Q6_K"}),
    [](const auto& info) { return std::string(info.param.name); });

class QuantizeVsGgufPy : public ::testing::TestWithParam<TypeCase> {};

TEST_P(QuantizeVsGgufPy, ByteExact) {
  const TypeCase& c = GetParam();
  const std::vector<float> in = AsFloats(ReadCase(std::string(c.name) + ".quant_in.f32"));
  const std::vector<uint8_t> want = ReadCase(std::string(c.name) + ".quant_out.bin");
  ASSERT_FALSE(in.empty());
  absl::StatusOr<int64_t> bytes = RowBytes(c.type, static_cast<int64_t>(in.size()));
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  ASSERT_EQ(*bytes, static_cast<int64_t>(want.size()));
  std::vector<uint8_t> got(want.size());
  ASSERT_TRUE(QuantizeRow(c.type, in.data(), static_cast<int64_t>(in.size()), got.data()).ok());
  const int64_t bb = GetDTypeInfo(c.type).block_bytes;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(got[i], want[i]) << c.name << " byte " << i % bb << " of block " << i / bb;
  }
}

INSTANTIATE_TEST_SUITE_P(RefQuantizers, QuantizeVsGgufPy,
                         ::testing::Values(TypeCase{DType::kQ8_0, "Q8_0"},
                                           TypeCase{DType::kQ4_0, "Q4_0"},
                                           TypeCase{DType::kQ4_1, "Q4_1"}),
                         [](const auto& info) { return std::string(info.param.name); });

// Quantizes random blocks of varied scale and checks every element against the worst-case error
// of the format: half a step of rounding (a whole step for Q4_0's clipped end), plus the error
// of storing the scale (and Q4_1's minimum) as fp16: 2^-11 relative, or half the subnormal
// spacing (2^-25) for tiny values.
class RoundTripBound : public ::testing::TestWithParam<DType> {};

TEST_P(RoundTripBound, WithinFormatError) {
  const DType t = GetParam();
  constexpr int kBlock = 32;
  constexpr int kBlocks = 200;
  auto fp16_err = [](double v) { return std::max(std::fabs(v) / 2048, std::exp2(-25.0)); };
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> log_scale(-12.0f, 12.0f);
  std::vector<float> x(kBlock * kBlocks);
  for (int b = 0; b < kBlocks; ++b) {
    const float scale = std::exp2(log_scale(rng));
    const float shift = b % 3 == 0 ? 4.0f * scale : 0.0f;  // some blocks far from zero
    for (int j = 0; j < kBlock; ++j) x[b * kBlock + j] = normal(rng) * scale + shift;
  }
  std::vector<uint8_t> q(*RowBytes(t, x.size()));
  ASSERT_TRUE(QuantizeRow(t, x.data(), x.size(), q.data()).ok());
  std::vector<float> y(x.size());
  ASSERT_TRUE(DequantizeRow(t, q.data(), y.size(), y.data()).ok());

  double sum_err2 = 0.0, sum_x2 = 0.0;
  for (int b = 0; b < kBlocks; ++b) {
    const float* xb = &x[b * kBlock];
    double lo = xb[0], hi = xb[0], amax = 0.0;
    for (int j = 0; j < kBlock; ++j) {
      lo = std::min<double>(lo, xb[j]);
      hi = std::max<double>(hi, xb[j]);
      amax = std::max<double>(amax, std::fabs(xb[j]));
    }
    double bound = 0.0;
    switch (t) {
      case DType::kQ8_0: {
        const double d = amax / 127;
        bound = d * 0.5 + 127 * fp16_err(d);
        break;
      }
      case DType::kQ4_0: {
        const double d = amax / 8;
        bound = d * 1.0 + 8 * fp16_err(d);
        break;
      }
      case DType::kQ4_1: {
        const double d = (hi - lo) / 15;
        bound = d * 0.5 + 15 * fp16_err(d) + fp16_err(lo);
        break;
      }
      default:
        FAIL() << "no bound for this type";
    }
    bound += 1e-6 * amax;  // float arithmetic
    for (int j = 0; j < kBlock; ++j) {
      const double err = std::fabs(static_cast<double>(y[b * kBlock + j]) - xb[j]);
      ASSERT_LE(err, bound) << GetDTypeInfo(t).name << " block " << b << " element " << j << ": "
                            << xb[j] << " -> " << y[b * kBlock + j];
      sum_err2 += err * err;
      sum_x2 += static_cast<double>(xb[j]) * xb[j];
    }
  }
  // And on average far better than the worst case (catches a systematic bias).
  const double rel_rms = std::sqrt(sum_err2 / sum_x2);
  EXPECT_LT(rel_rms, t == DType::kQ8_0 ? 0.01 : 0.12) << GetDTypeInfo(t).name;
}

INSTANTIATE_TEST_SUITE_P(RefQuantizers, RoundTripBound,
                         ::testing::Values(DType::kQ8_0, DType::kQ4_0, DType::kQ4_1),
                         [](const auto& info) {
                           return std::string(GetDTypeInfo(info.param).name);
                         });

TEST(QuantTest, ZeroBlockQuantizesToZero) {
  const std::vector<float> x(32, 0.0f);
  for (DType t : {DType::kQ8_0, DType::kQ4_0, DType::kQ4_1}) {
    std::vector<uint8_t> q(*RowBytes(t, 32));
    ASSERT_TRUE(QuantizeRow(t, x.data(), 32, q.data()).ok());
    std::vector<float> y(32, 1.0f);
    ASSERT_TRUE(DequantizeRow(t, q.data(), 32, y.data()).ok());
    for (float v : y) EXPECT_EQ(v, 0.0f) << GetDTypeInfo(t).name;
  }
}

TEST(QuantTest, CountsMustBeWholeBlocks) {
  std::vector<uint8_t> buf(1024);
  std::vector<float> out(1024);
  absl::Status s = DequantizeRow(DType::kQ4_K, buf.data(), 100, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("not a whole number of Q4_K blocks of 256"));
  EXPECT_FALSE(DequantizeRow(DType::kQ8_0, buf.data(), -32, out.data()).ok());
  EXPECT_FALSE(QuantizeRow(DType::kQ4_0, out.data(), 33, buf.data()).ok());
  s = QuantizeRow(DType::kQ6_K, out.data(), 256, buf.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(s.message(), HasSubstr("Q6_K"));
}

TEST(Fp16Test, SpecialValues) {
  EXPECT_EQ(F32ToFp16(0.0f), 0x0000);
  EXPECT_EQ(F32ToFp16(-0.0f), 0x8000);
  EXPECT_EQ(F32ToFp16(1.0f), 0x3C00);
  EXPECT_EQ(F32ToFp16(-2.0f), 0xC000);
  EXPECT_EQ(F32ToFp16(65504.0f), 0x7BFF);   // largest finite
  EXPECT_EQ(F32ToFp16(65519.99f), 0x7BFF);  // just below the rounding point
  EXPECT_EQ(F32ToFp16(65520.0f), 0x7C00);   // ties to even: overflows
  EXPECT_EQ(F32ToFp16(1e10f), 0x7C00);
  EXPECT_EQ(F32ToFp16(-std::numeric_limits<float>::infinity()), 0xFC00);
  EXPECT_EQ(F32ToFp16(std::exp2(-14.0f)), 0x0400);  // smallest normal
  EXPECT_EQ(F32ToFp16(std::exp2(-24.0f)), 0x0001);  // smallest subnormal
  EXPECT_EQ(F32ToFp16(std::exp2(-25.0f)), 0x0000);  // tie between 0 and 2^-24: even
  EXPECT_EQ(F32ToFp16(1.5f * std::exp2(-25.0f)), 0x0001);
  EXPECT_EQ(F32ToFp16(3.0f * std::exp2(-25.0f)), 0x0002);  // tie 1.5 ulp: even
  EXPECT_EQ(F32ToFp16(1.0f + std::exp2(-11.0f)), 0x3C00);  // tie: even
  EXPECT_EQ(F32ToFp16(1.0f + 3 * std::exp2(-11.0f)), 0x3C02);
  const uint16_t nan = F32ToFp16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(nan & 0x7C00, 0x7C00);
  EXPECT_NE(nan & 0x03FF, 0);
  // A NaN whose payload lives only in the low bits must not turn into infinity.
  EXPECT_NE(F32ToFp16(std::bit_cast<float>(0x7F800001u)) & 0x03FF, 0);

  EXPECT_EQ(Fp16ToF32(0x3C00), 1.0f);
  EXPECT_EQ(Fp16ToF32(0x0001), std::exp2(-24.0f));
  EXPECT_EQ(Fp16ToF32(0x83FF), -1023 * std::exp2(-24.0f));
  EXPECT_EQ(Fp16ToF32(0x7BFF), 65504.0f);
  EXPECT_EQ(Fp16ToF32(0xFC00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(Fp16ToF32(0x7E00)));
  EXPECT_TRUE(std::signbit(Fp16ToF32(0x8000)));
}

TEST(Fp16Test, EveryHalfRoundTrips) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = Fp16ToF32(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE((h & 0x7C00) == 0x7C00 && (h & 0x3FF) != 0) << std::hex << h;
      continue;
    }
    ASSERT_EQ(F32ToFp16(f), h) << std::hex << h;
  }
}

#ifdef __F16C__
// The hardware conversions (F16C) are an implementation independent of ours.
TEST(Fp16Test, MatchesF16C) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float want = _cvtsh_ss(static_cast<uint16_t>(h));
    const float got = Fp16ToF32(static_cast<uint16_t>(h));
    if (std::isnan(want)) {  // F16C quiets signalling NaNs; any NaN will do
      ASSERT_TRUE(std::isnan(got)) << std::hex << h;
      continue;
    }
    ASSERT_EQ(std::bit_cast<uint32_t>(got), std::bit_cast<uint32_t>(want)) << std::hex << h;
  }
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 2000000; ++i) {
    // Random bit patterns cover every binade; bias half of them into the fp16 range.
    uint32_t b = bits(rng);
    if (i % 2 == 0) b = (b & 0x807FFFFF) | ((100 + b % 45) << 23);
    const float f = std::bit_cast<float>(b);
    const uint16_t want = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
    const uint16_t got = F32ToFp16(f);
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(Fp16ToF32(got))) << std::hex << b;
    } else {
      ASSERT_EQ(got, want) << std::hex << b << " = " << f;
    }
  }
}
#else
TEST(Fp16Test, MatchesF16C) { GTEST_SKIP() << "built without F16C"; }
#endif

TEST(Bf16Test, Conversions) {
  EXPECT_EQ(F32ToBf16(1.0f), 0x3F80);
  EXPECT_EQ(Bf16ToF32(0x3F80), 1.0f);
  EXPECT_EQ(Bf16ToF32(0xC000), -2.0f);
  EXPECT_EQ(F32ToBf16(1.0f + std::exp2(-8.0f)), 0x3F80);                     // tie: even
  EXPECT_EQ(F32ToBf16(1.0f + std::exp2(-7.0f) + std::exp2(-8.0f)), 0x3F82);  // tie: even
  EXPECT_EQ(F32ToBf16(1.0f + std::exp2(-8.0f) + std::exp2(-20.0f)), 0x3F81);
  EXPECT_EQ(F32ToBf16(std::numeric_limits<float>::infinity()), 0x7F80);
  EXPECT_EQ(F32ToBf16(std::numeric_limits<float>::max()), 0x7F80);  // rounds up to infinity
  EXPECT_EQ(F32ToBf16(std::bit_cast<float>(0x00010000u)), 0x0001);  // subnormal
  EXPECT_EQ(F32ToBf16(-0.0f), 0x8000);
  // NaNs stay NaN even when their payload is only in the dropped low bits.
  EXPECT_TRUE(std::isnan(Bf16ToF32(F32ToBf16(std::bit_cast<float>(0x7F800001u)))));
  EXPECT_TRUE(std::isnan(Bf16ToF32(F32ToBf16(std::numeric_limits<float>::quiet_NaN()))));
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const float f = Bf16ToF32(static_cast<uint16_t>(b));
    EXPECT_EQ(std::bit_cast<uint32_t>(f), b << 16);
    if (!std::isnan(f)) {
      ASSERT_EQ(F32ToBf16(f), b) << std::hex << b;
    }
  }
}

}  // namespace
}  // namespace moa
