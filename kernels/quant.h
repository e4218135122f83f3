// Scalar reference implementations of the stored element types: half-precision conversions and
// ggml's block-quantized formats (block layouts as in ggml-common.h). Readable rather than fast:
// the CPU backend uses them where speed does not matter, and the tests check faster kernels
// against them.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/dtype.h"

namespace moa {

// IEEE 754 binary16 <-> binary32. F32ToFp16 rounds to nearest even, overflows to infinity and
// keeps NaNs NaN; subnormals are handled exactly.
float Fp16ToF32(uint16_t h);
uint16_t F32ToFp16(float f);

// bfloat16 (the top half of a binary32) <-> binary32; F32ToBf16 rounds to nearest even and keeps
// NaNs NaN.
float Bf16ToF32(uint16_t b);
uint16_t F32ToBf16(float f);

// Decodes `n` consecutive elements of type `t` starting at `src` (which may be unaligned) into
// `dst`. `n` must be a whole number of blocks of `t`.
absl::Status DequantizeRow(DType t, const uint8_t* src, int64_t n, float* dst);

// Encodes `n` floats as type `t` into `dst` (RowBytes(t, n) bytes), rounding to nearest as
// ggml's quantize_row_*_ref do. Supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1.
absl::Status QuantizeRow(DType t, const float* src, int64_t n, uint8_t* dst);

}  // namespace moa
