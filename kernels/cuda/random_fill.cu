// The random-weight fill: one grid-stride pass writing each element once (memory-bound; a 7B
// model's 13 GB of fp16 weights take a few milliseconds).
#include <cuda_fp16.h>

#include <algorithm>

#include "kernels/cuda/grid.h"
#include "kernels/cuda/random_fill.h"
#include "kernels/random_fill.h"

namespace moa::cuda {
namespace {

template <typename T>
__global__ void RandomFillKernel(uint64_t key, float scale, float offset, int64_t n, T* dst) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const __half h = __float2half_rn(RandomUniform(key, static_cast<uint64_t>(i), scale, offset));
    if constexpr (sizeof(T) == sizeof(__half)) {
      dst[i] = h;
    } else {
      dst[i] = __half2float(h);
    }
  }
}

template <typename T>
cudaError_t Launch(uint64_t seed, float scale, float offset, int64_t n, T* dst,
                   cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  RandomFillKernel<T><<<GridFor(n), kThreads, 0, stream>>>(RandomKey(seed), scale, offset, n, dst);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchRandomFillHalf(uint64_t seed, float scale, float offset, int64_t n, void* dst,
                                 cudaStream_t stream) {
  return Launch(seed, scale, offset, n, static_cast<__half*>(dst), stream);
}

cudaError_t LaunchRandomFillHalfAsFloat(uint64_t seed, float scale, float offset, int64_t n,
                                        float* dst, cudaStream_t stream) {
  return Launch(seed, scale, offset, n, dst, stream);
}

}  // namespace moa::cuda
