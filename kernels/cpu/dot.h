// Vectorised dot products of one weight row with one activation row (AVX2, FMA, F16C), the inner
// loops of the CPU backend's MatMul.
//
// Block-quantized weights (Q8_0, Q4_0, Q4_1) are multiplied with activations quantized to 8-bit
// blocks of 32 (ActBlock, like ggml's Q8_1) using integer multiply-adds: the weights are never
// expanded to float. The error this adds is bounded by the activation rounding: at most half a
// quantization step, amax(block) / 254, per activation element.
#pragma once

#include <cstdint>

namespace moa::cpu {

inline constexpr int kActBlock = 32;

struct ActBlock {
  float d;    // scale: x ≈ d * qs
  float sum;  // d * sum(qs), for the offset term of Q4_1
  int8_t qs[kActBlock];
};

// Quantizes n floats (a multiple of kActBlock) to n / kActBlock blocks.
void QuantizeActRow(const float* x, int64_t n, ActBlock* out);

// Dot products over n_blocks blocks of 32: `w` points at a row of raw ggml blocks.
float DotQ8_0(const uint8_t* w, const ActBlock* a, int64_t n_blocks);
float DotQ4_0(const uint8_t* w, const ActBlock* a, int64_t n_blocks);
float DotQ4_1(const uint8_t* w, const ActBlock* a, int64_t n_blocks);

// Dot products over n elements with a float activation row.
float DotF32(const float* w, const float* x, int64_t n);
float DotF16(const uint16_t* w, const float* x, int64_t n);
float DotBF16(const uint16_t* w, const float* x, int64_t n);

}  // namespace moa::cpu
