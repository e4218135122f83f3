// Random weights from a counter-based hash: element i of the tensor with seed s is a pure function
// of (s, i). Every backend computes the same values (the CPU backend on the host, the CUDA backend
// in a kernel that includes this header), so a random-weight model built directly on the GPU can
// be checked against the same model on the CPU, and large benchmark models never travel.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MOA_HOST_DEVICE __host__ __device__
#else
#define MOA_HOST_DEVICE
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#endif

namespace moa {

// SplitMix64's finaliser: a bijection on 64 bits whose output bits each depend on all input bits.
MOA_HOST_DEVICE inline uint64_t Mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  return x;
}

// The per-tensor key, computed once per fill rather than once per element.
MOA_HOST_DEVICE inline uint64_t RandomKey(uint64_t seed) {
  return Mix64(seed + 0x9E3779B97F4A7C15ull);
}

// offset + scale * u with u uniform on the grid {k / 2^23 : -2^23 <= k < 2^23} in [-1, 1).
// u is exact in float and the result is one fused multiply-add, so host and device round it
// identically (a separate multiply and add could be contracted differently by the compilers).
MOA_HOST_DEVICE inline float RandomUniform(uint64_t key, uint64_t index, float scale,
                                           float offset) {
  const uint64_t h = Mix64(key ^ (index * 0xD6E8FEB86659FD93ull));
  const int32_t k = static_cast<int32_t>(h >> 40) - (int32_t{1} << 23);
  return fmaf(scale, static_cast<float>(k) * 0x1p-23f, offset);
}

#ifndef __CUDACC__
// Backend::RandomWeight's argument checks, shared by the backends so that they refuse the same
// requests with the same messages. `max_bytes` bounds one allocation of rows * cols fp16 values.
inline absl::Status CheckRandomWeight(int64_t rows, int64_t cols, float scale, float offset,
                                      int64_t max_bytes) {
  if (rows <= 0 || cols <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("RandomWeight: shape [", rows, ", ", cols, "]"));
  }
  if (rows > max_bytes / 2 / cols) {
    return absl::ResourceExhaustedError(
        absl::StrCat("RandomWeight: [", rows, ", ", cols, "] is too large"));
  }
  if (!std::isfinite(scale) || scale < 0.0f || !std::isfinite(offset)) {
    return absl::InvalidArgumentError(absl::StrCat("RandomWeight: scale ", scale, " and offset ",
                                                   offset, " must be finite, scale >= 0"));
  }
  return absl::OkStatus();
}
#endif

}  // namespace moa
