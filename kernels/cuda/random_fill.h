// Launchers of the random-weight fill (kernels/cuda/random_fill.cu): the CUDA side of
// Backend::RandomWeight, computing kernels/random_fill.h's values on the device.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace moa::cuda {

// dst[i] = half(RandomUniform(RandomKey(seed), i, scale, offset)) for i < n (fp16 storage).
cudaError_t LaunchRandomFillHalf(uint64_t seed, float scale, float offset, int64_t n, void* dst,
                                 cudaStream_t stream);
// The same values, each rounded to fp16 and stored as float (one-row weights are kept in fp32).
cudaError_t LaunchRandomFillHalfAsFloat(uint64_t seed, float scale, float offset, int64_t n,
                                        float* dst, cudaStream_t stream);

}  // namespace moa::cuda
