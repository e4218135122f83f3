#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/dequantize.h"

namespace moa::cuda {
namespace {

// One thread decodes one quantization block; layouts as in kernels/quant.cc (ggml-common.h).
// Blocks are read byte by byte: GGUF tensor data is only byte-aligned in general.

__device__ float LoadHalf(const uint8_t* p) {
  __half_raw r;
  r.x = static_cast<unsigned short>(p[0] | (p[1] << 8));
  return __half2float(__half(r));
}

__device__ void ScaleMinK4(int j, const uint8_t* q, int* scale, int* min) {
  if (j < 4) {
    *scale = q[j] & 63;
    *min = q[j + 4] & 63;
  } else {
    *scale = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
    *min = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

template <DType T>
__device__ void DecodeBlock(const uint8_t* b, __half* y);

template <>
__device__ void DecodeBlock<DType::kF32>(const uint8_t* b, __half* y) {
  float v;
  memcpy(&v, b, sizeof(v));
  y[0] = __float2half_rn(v);
}
template <>
__device__ void DecodeBlock<DType::kF16>(const uint8_t* b, __half* y) {
  y[0] = __float2half_rn(LoadHalf(b));
}
template <>
__device__ void DecodeBlock<DType::kBF16>(const uint8_t* b, __half* y) {
  const uint32_t bits = static_cast<uint32_t>(b[0] | (b[1] << 8)) << 16;
  y[0] = __float2half_rn(__uint_as_float(bits));
}
template <>
__device__ void DecodeBlock<DType::kQ8_0>(const uint8_t* b, __half* y) {
  const float d = LoadHalf(b);
  for (int j = 0; j < 32; ++j) y[j] = __float2half_rn(d * static_cast<int8_t>(b[2 + j]));
}
template <>
__device__ void DecodeBlock<DType::kQ4_0>(const uint8_t* b, __half* y) {
  const float d = LoadHalf(b);
  for (int j = 0; j < 16; ++j) {
    y[j] = __float2half_rn(static_cast<float>((b[2 + j] & 0x0F) - 8) * d);
    y[j + 16] = __float2half_rn(static_cast<float>((b[2 + j] >> 4) - 8) * d);
  }
}
template <>
__device__ void DecodeBlock<DType::kQ4_1>(const uint8_t* b, __half* y) {
  const float d = LoadHalf(b), m = LoadHalf(b + 2);
  for (int j = 0; j < 16; ++j) {
    y[j] = __float2half_rn(__fadd_rn(__fmul_rn(static_cast<float>(b[4 + j] & 0x0F), d), m));
    y[j + 16] = __float2half_rn(__fadd_rn(__fmul_rn(static_cast<float>(b[4 + j] >> 4), d), m));
  }
}
template <>
__device__ void DecodeBlock<DType::kQ4_K>(const uint8_t* b, __half* y) {
  const float d = LoadHalf(b), dmin = LoadHalf(b + 2);
  const uint8_t* qs = b + 16;
  for (int sub = 0; sub < 8; ++sub) {
    int sc, m;
    ScaleMinK4(sub, b + 4, &sc, &m);
    const float ds = __fmul_rn(d, sc), ms = __fmul_rn(dmin, m);
    const uint8_t* q = qs + (sub / 2) * 32;
    for (int l = 0; l < 32; ++l) {
      const int v = (sub & 1) ? (q[l] >> 4) : (q[l] & 0x0F);
      y[sub * 32 + l] = __float2half_rn(__fsub_rn(__fmul_rn(ds, v), ms));
    }
  }
}
template <>
__device__ void DecodeBlock<DType::kQ5_K>(const uint8_t* b, __half* y) {
  const float d = LoadHalf(b), dmin = LoadHalf(b + 2);
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + 48;
  for (int sub = 0; sub < 8; ++sub) {
    int sc, m;
    ScaleMinK4(sub, b + 4, &sc, &m);
    const float ds = __fmul_rn(d, sc), ms = __fmul_rn(dmin, m);
    const uint8_t* q = qs + (sub / 2) * 32;
    for (int l = 0; l < 32; ++l) {
      const int v = ((sub & 1) ? (q[l] >> 4) : (q[l] & 0x0F)) | (((qh[l] >> sub) & 1) << 4);
      y[sub * 32 + l] = __float2half_rn(__fsub_rn(__fmul_rn(ds, v), ms));
    }
  }
}
template <>
__device__ void DecodeBlock<DType::kQ6_K>(const uint8_t* b, __half* y) {
  const float d = LoadHalf(b + 208);
  for (int half = 0; half < 2; ++half) {
    const uint8_t* ql = b + 64 * half;
    const uint8_t* qh = b + 128 + 32 * half;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192 + 8 * half);
    __half* out = y + 128 * half;
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q[4] = {((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32,
                        ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32,
                        ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32,
                        ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32};
      for (int k = 0; k < 4; ++k) {
        out[l + 32 * k] = __float2half_rn(__fmul_rn(__fmul_rn(d, sc[is + 2 * k]), q[k]));
      }
    }
  }
}

template <DType T>
__global__ void DequantizeKernel(const uint8_t* src, int64_t blocks, int64_t block_bytes,
                                 int64_t block_elems, __half* dst) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < blocks) DecodeBlock<T>(src + i * block_bytes, dst + i * block_elems);
}

template <DType T>
cudaError_t Launch(const void* src, int64_t blocks, __half* dst, cudaStream_t stream) {
  const DTypeInfo& info = GetDTypeInfo(T);
  constexpr int kThreads = 256;
  const int64_t grid = (blocks + kThreads - 1) / kThreads;
  DequantizeKernel<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      static_cast<const uint8_t*>(src), blocks, info.block_bytes, info.block_elems, dst);
  return cudaGetLastError();
}

}  // namespace

absl::Status DequantizeToHalf(DType t, const void* src, int64_t n, void* dst, cudaStream_t stream) {
  const DTypeInfo& info = GetDTypeInfo(t);
  if (n < 0 || n % info.block_elems != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(n, " elements is not a whole number of ", info.name, " blocks"));
  }
  const int64_t blocks = n / info.block_elems;
  if (blocks == 0) return absl::OkStatus();
  if (blocks > (int64_t{1} << 40)) return absl::InvalidArgumentError("tensor too large");
  __half* out = static_cast<__half*>(dst);
  cudaError_t err = cudaSuccess;
  switch (t) {
    case DType::kF32:
      err = Launch<DType::kF32>(src, blocks, out, stream);
      break;
    case DType::kF16:
      err = Launch<DType::kF16>(src, blocks, out, stream);
      break;
    case DType::kBF16:
      err = Launch<DType::kBF16>(src, blocks, out, stream);
      break;
    case DType::kQ8_0:
      err = Launch<DType::kQ8_0>(src, blocks, out, stream);
      break;
    case DType::kQ4_0:
      err = Launch<DType::kQ4_0>(src, blocks, out, stream);
      break;
    case DType::kQ4_1:
      err = Launch<DType::kQ4_1>(src, blocks, out, stream);
      break;
    case DType::kQ4_K:
      err = Launch<DType::kQ4_K>(src, blocks, out, stream);
      break;
    case DType::kQ5_K:
      err = Launch<DType::kQ5_K>(src, blocks, out, stream);
      break;
    case DType::kQ6_K:
      err = Launch<DType::kQ6_K>(src, blocks, out, stream);
      break;
  }
  if (err != cudaSuccess) {
    return absl::InternalError(
        absl::StrCat("dequantize ", info.name, ": ", cudaGetErrorString(err)));
  }
  return absl::OkStatus();
}

}  // namespace moa::cuda
