// GGUF weights to fp16 on the GPU: the CUDA backend stores weights in half precision and
// dequantizes them on the device at load time (the CPU reference is kernels/quant.h).
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/dtype.h"

typedef struct CUstream_st* cudaStream_t;

namespace moa::cuda {

// Decodes n elements of type t from device memory `src` into fp16 `dst` (device memory, n
// halves) on `stream`. n must be a whole number of blocks of t.
absl::Status DequantizeToHalf(DType t, const void* src, int64_t n, void* dst, cudaStream_t stream);

}  // namespace moa::cuda
