// The CUDA dequantization kernels against the CPU reference (kernels/quant.h), on fresh random
// blocks of every type, with odd block counts. Runs on the GPU machine only (moa_gpu_tests).
#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/dequantize.h"
#include "kernels/quant.h"
#include "tests/gpu/cuda_test_util.h"

namespace moa {
namespace {

// Random bytes with every fp16 scale field replaced by a finite, moderate value.
std::vector<uint8_t> RandomBlocks(DType t, int64_t blocks, std::mt19937& rng) {
  const DTypeInfo& info = GetDTypeInfo(t);
  std::vector<uint8_t> bytes(blocks * info.block_bytes);
  for (auto& b : bytes) b = static_cast<uint8_t>(rng());
  std::uniform_real_distribution<float> scale(-0.05f, 0.05f), value(-4.0f, 4.0f);
  auto put = [&](uint8_t* p, float v) {
    const uint16_t h = F32ToFp16(v);
    std::memcpy(p, &h, 2);
  };
  for (int64_t i = 0; i < blocks; ++i) {
    uint8_t* b = bytes.data() + i * info.block_bytes;
    switch (t) {
      case DType::kF32: {
        const float v = value(rng);
        std::memcpy(b, &v, 4);
        break;
      }
      case DType::kF16:
        put(b, value(rng));
        break;
      case DType::kBF16: {
        const uint16_t h = F32ToBf16(value(rng));
        std::memcpy(b, &h, 2);
        break;
      }
      case DType::kQ8_0:
      case DType::kQ4_0:
        put(b, scale(rng));
        break;
      case DType::kQ4_1:
      case DType::kQ4_K:
      case DType::kQ5_K:
        put(b, scale(rng));
        put(b + 2, scale(rng));
        break;
      case DType::kQ6_K:
        put(b + 208, scale(rng));
        break;
    }
  }
  return bytes;
}

class DequantizeGpu : public ::testing::TestWithParam<DType> {};

TEST_P(DequantizeGpu, MatchesCpuReference) {
  const DType t = GetParam();
  const DTypeInfo& info = GetDTypeInfo(t);
  std::mt19937 rng(1234 + static_cast<int>(t));
  for (int64_t blocks : {1, 7, 333, 4099}) {
    const std::vector<uint8_t> src = RandomBlocks(t, blocks, rng);
    const int64_t n = blocks * info.block_elems;
    std::vector<float> want(n);
    ASSERT_TRUE(DequantizeRow(t, src.data(), n, want.data()).ok());

    void* d_src = nullptr;
    void* d_dst = nullptr;
    CUDA_OK(cudaMalloc(&d_src, src.size()));
    CUDA_OK(cudaMalloc(&d_dst, n * 2));
    CUDA_OK(cudaMemcpy(d_src, src.data(), src.size(), cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemset(d_dst, 0xFF, n * 2));  // poison: NaNs wherever nothing was written
    ASSERT_TRUE(cuda::DequantizeToHalf(t, d_src, n, d_dst, nullptr).ok());
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<uint16_t> got(n);
    CUDA_OK(cudaMemcpy(got.data(), d_dst, n * 2, cudaMemcpyDeviceToHost));
    cudaFree(d_src);
    cudaFree(d_dst);

    for (int64_t i = 0; i < n; ++i) {
      const float g = Fp16ToF32(got[i]);
      const float w = Fp16ToF32(F32ToFp16(want[i]));
      // One fp16 ulp: the GPU may fuse the multiply-add that the CPU rounds twice.
      const float ulp = std::max(std::ldexp(1.0f, -24), std::fabs(w) * std::ldexp(1.0f, -10));
      ASSERT_LE(std::fabs(g - w), ulp)
          << info.name << " block " << i / info.block_elems << " element " << i % info.block_elems;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllTypes, DequantizeGpu,
                         ::testing::Values(DType::kF32, DType::kF16, DType::kBF16, DType::kQ8_0,
                                           DType::kQ4_0, DType::kQ4_1, DType::kQ4_K, DType::kQ5_K,
                                           DType::kQ6_K),
                         [](const auto& info) {
                           return std::string(GetDTypeInfo(info.param).name);
                         });

TEST(DequantizeGpuErrors, RejectsPartialBlocks) {
  EXPECT_FALSE(cuda::DequantizeToHalf(DType::kQ4_1, nullptr, 33, nullptr, nullptr).ok());
}

}  // namespace
}  // namespace moa
