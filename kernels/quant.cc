#include "kernels/quant.h"

#include <algorithm>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"

// ggml's reference results are defined without fused multiply-adds; clang would otherwise fuse
// a * b + c here (GCC does not in ISO C++ mode).
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

namespace moa {
namespace {

// Block sizes from ggml-common.h.
constexpr int kQK = 32;  // QK8_0 = QK4_0 = QK4_1

uint16_t LoadU16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

float LoadFp16(const uint8_t* p) { return Fp16ToF32(LoadU16(p)); }

void StoreU16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, sizeof(v)); }

// block_q8_0: fp16 d; int8 qs[32].  x[j] = d * qs[j].
void DequantizeQ8_0(const uint8_t* b, float* y) {
  const float d = LoadFp16(b);
  const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
  for (int j = 0; j < kQK; ++j) y[j] = d * static_cast<float>(qs[j]);
}

// block_q4_0: fp16 d; uint8 qs[16]. Low nibbles hold elements 0..15, high nibbles 16..31; both
// are offset by 8.
void DequantizeQ4_0(const uint8_t* b, float* y) {
  const float d = LoadFp16(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < kQK / 2; ++j) {
    y[j] = static_cast<float>((qs[j] & 0x0F) - 8) * d;
    y[j + kQK / 2] = static_cast<float>((qs[j] >> 4) - 8) * d;
  }
}

// block_q4_1: fp16 d; fp16 m; uint8 qs[16]. Nibbles as in Q4_0, unsigned: x = q * d + m.
void DequantizeQ4_1(const uint8_t* b, float* y) {
  const float d = LoadFp16(b);
  const float m = LoadFp16(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < kQK / 2; ++j) {
    y[j] = static_cast<float>(qs[j] & 0x0F) * d + m;
    y[j + kQK / 2] = static_cast<float>(qs[j] >> 4) * d + m;
  }
}

// The 12 scale bytes of Q4_K/Q5_K pack eight 6-bit scales and eight 6-bit mins (ggml's
// get_scale_min_k4): sub-blocks 0..3 use the low 6 bits of bytes 0..3 (scales) and 4..7 (mins);
// sub-blocks 4..7 take their low 4 bits from bytes 8..11 and their top 2 bits from the spare
// top bits of bytes 0..7.
void ScaleMinK4(int j, const uint8_t* q, uint8_t* scale, uint8_t* min) {
  if (j < 4) {
    *scale = q[j] & 63;
    *min = q[j + 4] & 63;
  } else {
    *scale = static_cast<uint8_t>((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4));
    *min = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// block_q4_K: fp16 d; fp16 dmin; uint8 scales[12]; uint8 qs[128]. Eight sub-blocks of 32;
// each 32 bytes of qs hold two sub-blocks (low nibbles, then high nibbles).
// x = d * scale * q - dmin * min.
void DequantizeQ4_K(const uint8_t* b, float* y) {
  const float d = LoadFp16(b);
  const float dmin = LoadFp16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qs = b + 16;
  for (int sub = 0; sub < 8; sub += 2) {
    uint8_t sc0, m0, sc1, m1;
    ScaleMinK4(sub, scales, &sc0, &m0);
    ScaleMinK4(sub + 1, scales, &sc1, &m1);
    const float d0 = d * sc0, min0 = dmin * m0;
    const float d1 = d * sc1, min1 = dmin * m1;
    for (int l = 0; l < 32; ++l) y[l] = d0 * static_cast<float>(qs[l] & 0x0F) - min0;
    for (int l = 0; l < 32; ++l) y[32 + l] = d1 * static_cast<float>(qs[l] >> 4) - min1;
    qs += 32;
    y += 64;
  }
}

// block_q5_K: fp16 d; fp16 dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]. As Q4_K with a
// fifth bit per element: bit `sub` of qh[l] belongs to element l of sub-block `sub`.
void DequantizeQ5_K(const uint8_t* b, float* y) {
  const float d = LoadFp16(b);
  const float dmin = LoadFp16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + 48;
  for (int sub = 0; sub < 8; sub += 2) {
    uint8_t sc0, m0, sc1, m1;
    ScaleMinK4(sub, scales, &sc0, &m0);
    ScaleMinK4(sub + 1, scales, &sc1, &m1);
    const float d0 = d * sc0, min0 = dmin * m0;
    const float d1 = d * sc1, min1 = dmin * m1;
    for (int l = 0; l < 32; ++l) {
      const int q = (qs[l] & 0x0F) | (((qh[l] >> sub) & 1) << 4);
      y[l] = d0 * static_cast<float>(q) - min0;
    }
    for (int l = 0; l < 32; ++l) {
      const int q = (qs[l] >> 4) | (((qh[l] >> (sub + 1)) & 1) << 4);
      y[32 + l] = d1 * static_cast<float>(q) - min1;
    }
    qs += 32;
    y += 64;
  }
}

// block_q6_K: uint8 ql[128]; uint8 qh[64]; int8 scales[16]; fp16 d. Two halves of 128 elements;
// in each, element l + 32*k (k = 0..3) takes its low 4 bits from ql (bytes l or l+32, low or
// high nibble) and its top 2 bits from bits 2k..2k+1 of qh[l]; 16 elements share a scale.
// x = d * scale * (q - 32).
void DequantizeQ6_K(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = LoadFp16(b + 208);
  for (int half = 0; half < 2; ++half) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q0 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q1 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q2 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q3 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * static_cast<float>(sc[is + 0]) * static_cast<float>(q0);
      y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q1);
      y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q2);
      y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q3);
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

// quantize_row_q8_0_ref: symmetric, d = max|x| / 127, q = round(x / d).
void QuantizeQ8_0(const float* x, uint8_t* b) {
  float amax = 0.0f;
  for (int j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  StoreU16(b, F32ToFp16(d));
  int8_t* qs = reinterpret_cast<int8_t*>(b + 2);
  for (int j = 0; j < kQK; ++j) qs[j] = static_cast<int8_t>(std::roundf(x[j] * id));
}

// quantize_row_q4_0_ref: the value of largest magnitude maps to -8 exactly, so d = max / -8
// (sign included) and the other end of the range gets the extra code.
void QuantizeQ4_0(const float* x, uint8_t* b) {
  float amax = 0.0f;
  float max = 0.0f;
  for (int j = 0; j < kQK; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  const float d = max / -8.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  StoreU16(b, F32ToFp16(d));
  uint8_t* qs = b + 2;
  for (int j = 0; j < kQK / 2; ++j) {
    // Truncation after +8.5 is round-half-up of x/d + 8, as in ggml.
    const int q0 = std::min(15, static_cast<int>(static_cast<int8_t>(x[j] * id + 8.5f)));
    const int q1 = std::min(15, static_cast<int>(static_cast<int8_t>(x[j + kQK / 2] * id + 8.5f)));
    qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
  }
}

// quantize_row_q4_1_ref: affine, m = min, d = (max - min) / 15.
void QuantizeQ4_1(const float* x, uint8_t* b) {
  float min = FLT_MAX;
  float max = -FLT_MAX;
  for (int j = 0; j < kQK; ++j) {
    min = std::min(min, x[j]);
    max = std::max(max, x[j]);
  }
  const float d = (max - min) / 15.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  StoreU16(b, F32ToFp16(d));
  StoreU16(b + 2, F32ToFp16(min));
  uint8_t* qs = b + 4;
  for (int j = 0; j < kQK / 2; ++j) {
    const int q0 = std::min(15, static_cast<int>(static_cast<int8_t>((x[j] - min) * id + 0.5f)));
    const int q1 =
        std::min(15, static_cast<int>(static_cast<int8_t>((x[j + kQK / 2] - min) * id + 0.5f)));
    qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
  }
}

absl::Status CheckCount(DType t, int64_t n) {
  const DTypeInfo& info = GetDTypeInfo(t);
  if (n < 0 || n % info.block_elems != 0) {
    return absl::InvalidArgumentError(absl::StrCat(n, " elements is not a whole number of ",
                                                   info.name, " blocks of ", info.block_elems));
  }
  return absl::OkStatus();
}

}  // namespace

float Fp16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F;
  const uint32_t mant = h & 0x3FF;
  if (exp == 0x1F) return std::bit_cast<float>(sign | 0x7F800000u | (mant << 13));  // inf, NaN
  if (exp != 0) return std::bit_cast<float>(sign | ((exp + 127 - 15) << 23) | (mant << 13));
  // Zero or subnormal: mant * 2^-24, exact in binary32.
  const float v = std::ldexp(static_cast<float>(mant), -24);
  return sign != 0 ? -v : v;
}

uint16_t F32ToFp16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t a = x & 0x7FFFFFFF;
  if (a > 0x7F800000) {  // NaN: keep the top payload bits and make sure it stays a NaN.
    return static_cast<uint16_t>(sign | 0x7E00 | ((a >> 13) & 0x3FF));
  }
  if (a >= 0x477FF000) return static_cast<uint16_t>(sign | 0x7C00);  // >= 65520 rounds to infinity
  uint32_t h;
  uint32_t rem, half;
  if (a >= 0x38800000) {  // normal in binary16 (>= 2^-14): rebias the exponent, drop 13 bits
    h = (a - ((127 - 15) << 23)) >> 13;
    rem = a & 0x1FFF;
    half = 0x1000;
  } else if (a >= 0x33000000) {  // subnormal in binary16: units of 2^-24
    const uint32_t m = (a & 0x7FFFFF) | 0x800000;
    const int shift = 126 - static_cast<int>(a >> 23);  // 14..24
    h = m >> shift;
    rem = m & ((1u << shift) - 1);
    half = 1u << (shift - 1);
  } else {  // below half the smallest subnormal (ties to even: 2^-25 itself -> 0)
    return sign;
  }
  // Round to nearest even; a carry out of the mantissa correctly bumps the exponent.
  if (rem > half || (rem == half && (h & 1) != 0)) ++h;
  return static_cast<uint16_t>(sign | h);
}

float Bf16ToF32(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }

uint16_t F32ToBf16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7FFFFFFF) > 0x7F800000) return static_cast<uint16_t>((x >> 16) | 0x40);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7FFF + ((x >> 16) & 1)) >> 16);
}

absl::Status DequantizeRow(DType t, const uint8_t* src, int64_t n, float* dst) {
  if (absl::Status s = CheckCount(t, n); !s.ok()) return s;
  const DTypeInfo& info = GetDTypeInfo(t);
  const int64_t blocks = n / info.block_elems;
  for (int64_t i = 0; i < blocks; ++i) {
    const uint8_t* b = src + i * info.block_bytes;
    float* y = dst + i * info.block_elems;
    switch (t) {
      case DType::kF32:
        std::memcpy(y, b, sizeof(float));
        break;
      case DType::kF16:
        *y = LoadFp16(b);
        break;
      case DType::kBF16:
        *y = Bf16ToF32(LoadU16(b));
        break;
      case DType::kQ8_0:
        DequantizeQ8_0(b, y);
        break;
      case DType::kQ4_0:
        DequantizeQ4_0(b, y);
        break;
      case DType::kQ4_1:
        DequantizeQ4_1(b, y);
        break;
      case DType::kQ4_K:
        DequantizeQ4_K(b, y);
        break;
      case DType::kQ5_K:
        DequantizeQ5_K(b, y);
        break;
      case DType::kQ6_K:
        DequantizeQ6_K(b, y);
        break;
    }
  }
  return absl::OkStatus();
}

absl::Status QuantizeRow(DType t, const float* src, int64_t n, uint8_t* dst) {
  const DTypeInfo& info = GetDTypeInfo(t);
  if (t == DType::kQ4_K || t == DType::kQ5_K || t == DType::kQ6_K) {
    return absl::UnimplementedError(absl::StrCat("quantizing to ", info.name, " is not supported"));
  }
  if (absl::Status s = CheckCount(t, n); !s.ok()) return s;
  const int64_t blocks = n / info.block_elems;
  for (int64_t i = 0; i < blocks; ++i) {
    const float* x = src + i * info.block_elems;
    uint8_t* b = dst + i * info.block_bytes;
    switch (t) {
      case DType::kF32:
        std::memcpy(b, x, sizeof(float));
        break;
      case DType::kF16:
        StoreU16(b, F32ToFp16(*x));
        break;
      case DType::kBF16:
        StoreU16(b, F32ToBf16(*x));
        break;
      case DType::kQ8_0:
        QuantizeQ8_0(x, b);
        break;
      case DType::kQ4_0:
        QuantizeQ4_0(x, b);
        break;
      case DType::kQ4_1:
        QuantizeQ4_1(x, b);
        break;
      case DType::kQ4_K:
      case DType::kQ5_K:
      case DType::kQ6_K:
        break;  // rejected above
    }
  }
  return absl::OkStatus();
}

}  // namespace moa
