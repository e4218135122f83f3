#include "kernels/cpu/dot.h"

#include <immintrin.h>

#include <cmath>
#include <cstring>

namespace moa::cpu {
namespace {

inline float HorizontalSum(__m256 v) {
  const __m128 lo = _mm256_castps256_ps128(v);
  const __m128 hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int HorizontalSum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

inline float LoadHalf(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  return _cvtsh_ss(h);
}

// Sum of products of 32 signed bytes, as 8 int32 lanes. maddubs needs an unsigned first
// operand, so the sign of `w` moves onto `a` (neither side holds -128: weights and activations
// are quantized to [-127, 127], Q4_0 to [-8, 7]).
inline __m256i DotSigned(__m256i w, __m256i a) {
  const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
  return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

// Unpacks 16 bytes of nibbles into 32 bytes in ggml's order: low nibbles are elements 0..15,
// high nibbles 16..31.
inline __m256i UnpackNibbles(const uint8_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

inline __m256i LoadActQs(const ActBlock& a) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qs));
}

}  // namespace

void QuantizeActRow(const float* x, int64_t n, ActBlock* out) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < n / kActBlock; ++b) {
    const float* p = x + b * kActBlock;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(p + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_mask, v[j]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float max_abs = _mm_cvtss_f32(m);
    const float d = max_abs / 127.0f;
    const __m256 inv = _mm256_set1_ps(max_abs > 0.0f ? 127.0f / max_abs : 0.0f);
    __m256i q[4];
    for (int j = 0; j < 4; ++j) {
      q[j] = _mm256_cvtps_epi32(
          _mm256_round_ps(_mm256_mul_ps(v[j], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    const int sum =
        HorizontalSum(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
    // packs works within 128-bit lanes; the permutation restores element order.
    const __m256i q16a = _mm256_packs_epi32(q[0], q[1]);
    const __m256i q16b = _mm256_packs_epi32(q[2], q[3]);
    const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16a, q16b), order);
    out[b].d = d;
    out[b].sum = d * static_cast<float>(sum);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[b].qs), q8);
  }
}

// The block dot products below take two blocks per iteration: the fp16 scales of both are
// converted with one instruction, and the two halves of the sum form independent dependency
// chains (one chain per block was latency-bound).

namespace {

// Scales of two consecutive blocks: lane 0 = block 0, lane 1 = block 1.
inline __m128 TwoHalves(const uint8_t* p0, const uint8_t* p1) {
  uint16_t h0, h1;
  std::memcpy(&h0, p0, sizeof(h0));
  std::memcpy(&h1, p1, sizeof(h1));
  return _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(h0 | (uint32_t{h1} << 16))));
}

inline __m256 Lane0(__m128 v) { return _mm256_broadcastss_ps(v); }
inline __m256 Lane1(__m128 v) { return _mm256_broadcastss_ps(_mm_movehdup_ps(v)); }

// Sum over blocks of scale(w_b) * a_b.d * int_dot(b) for the symmetric formats; Ints(blk, a)
// gives the 8 int32 partial sums of a block.
template <int kBytes, int kQsOffset, typename Ints>
float DotSymmetric(const uint8_t* w, const ActBlock* a, int64_t n_blocks, Ints ints) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= n_blocks; b += 2) {
    const uint8_t* b0 = w + b * kBytes;
    const uint8_t* b1 = b0 + kBytes;
    const __m128 d = _mm_mul_ps(TwoHalves(b0, b1), _mm_setr_ps(a[b].d, a[b + 1].d, 0, 0));
    acc0 = _mm256_fmadd_ps(Lane0(d), _mm256_cvtepi32_ps(ints(b0 + kQsOffset, a[b])), acc0);
    acc1 = _mm256_fmadd_ps(Lane1(d), _mm256_cvtepi32_ps(ints(b1 + kQsOffset, a[b + 1])), acc1);
  }
  if (b < n_blocks) {
    const uint8_t* b0 = w + b * kBytes;
    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(LoadHalf(b0) * a[b].d),
                           _mm256_cvtepi32_ps(ints(b0 + kQsOffset, a[b])), acc0);
  }
  return HorizontalSum(_mm256_add_ps(acc0, acc1));
}

}  // namespace

float DotQ8_0(const uint8_t* w, const ActBlock* a, int64_t n_blocks) {
  // fp16 d, int8 qs[32]; value = d * q.
  return DotSymmetric<34, 2>(w, a, n_blocks, [](const uint8_t* qs, const ActBlock& ab) {
    return DotSigned(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs)), LoadActQs(ab));
  });
}

float DotQ4_0(const uint8_t* w, const ActBlock* a, int64_t n_blocks) {
  // fp16 d, qs[16] nibbles; value = d * (q - 8).
  return DotSymmetric<18, 2>(w, a, n_blocks, [](const uint8_t* qs, const ActBlock& ab) {
    return DotSigned(_mm256_sub_epi8(UnpackNibbles(qs), _mm256_set1_epi8(8)), LoadActQs(ab));
  });
}

float DotQ4_1(const uint8_t* w, const ActBlock* a, int64_t n_blocks) {
  // fp16 d, fp16 m, qs[16] nibbles; value = d * q + m. The offsets add m * sum(x) per block.
  constexpr int kBytes = 20;
  const __m256i ones = _mm256_set1_epi16(1);
  const auto ints = [&](const uint8_t* blk, const ActBlock& ab) {
    // Unsigned 0..15 nibbles: maddubs takes them directly.
    return _mm256_madd_epi16(_mm256_maddubs_epi16(UnpackNibbles(blk + 4), LoadActQs(ab)), ones);
  };
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m128 offsets = _mm_setzero_ps();  // lanes 1 and 3
  int64_t b = 0;
  for (; b + 2 <= n_blocks; b += 2) {
    const uint8_t* b0 = w + b * kBytes;
    const uint8_t* b1 = b0 + kBytes;
    uint32_t dm0, dm1;
    std::memcpy(&dm0, b0, sizeof(dm0));
    std::memcpy(&dm1, b1, sizeof(dm1));
    // d0 m0 d1 m1 times x.d0 x.sum0 x.d1 x.sum1.
    const __m128 prod =
        _mm_mul_ps(_mm_cvtph_ps(_mm_set_epi32(0, 0, static_cast<int>(dm1), static_cast<int>(dm0))),
                   _mm_setr_ps(a[b].d, a[b].sum, a[b + 1].d, a[b + 1].sum));
    offsets = _mm_add_ps(offsets, prod);
    acc0 = _mm256_fmadd_ps(Lane0(prod), _mm256_cvtepi32_ps(ints(b0, a[b])), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_broadcastss_ps(_mm_movehl_ps(prod, prod)),
                           _mm256_cvtepi32_ps(ints(b1, a[b + 1])), acc1);
  }
  float sum = _mm_cvtss_f32(_mm_shuffle_ps(offsets, offsets, 1)) +
              _mm_cvtss_f32(_mm_shuffle_ps(offsets, offsets, 3));
  if (b < n_blocks) {
    const uint8_t* b0 = w + b * kBytes;
    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(LoadHalf(b0) * a[b].d),
                           _mm256_cvtepi32_ps(ints(b0, a[b])), acc0);
    sum += LoadHalf(b0 + 2) * a[b].sum;
  }
  return HorizontalSum(_mm256_add_ps(acc0, acc1)) + sum;
}

namespace {

// Shared loop of the float dot products: Load(i) gives 8 weights as floats.
template <typename Load, typename Scalar>
float DotFloat(const float* x, int64_t n, Load load, Scalar scalar) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int j = 0; j < 4; ++j) {
      acc[j] = _mm256_fmadd_ps(load(i + 8 * j), _mm256_loadu_ps(x + i + 8 * j), acc[j]);
    }
  }
  for (; i + 8 <= n; i += 8) acc[0] = _mm256_fmadd_ps(load(i), _mm256_loadu_ps(x + i), acc[0]);
  float s =
      HorizontalSum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; i < n; ++i) s += scalar(i) * x[i];
  return s;
}

inline float Bf16ToFloat(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

}  // namespace

float DotF32(const float* w, const float* x, int64_t n) {
  return DotFloat(
      x, n, [w](int64_t i) { return _mm256_loadu_ps(w + i); }, [w](int64_t i) { return w[i]; });
}

float DotF16(const uint16_t* w, const float* x, int64_t n) {
  return DotFloat(
      x, n,
      [w](int64_t i) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i)));
      },
      [w](int64_t i) { return _cvtsh_ss(w[i]); });
}

float DotBF16(const uint16_t* w, const float* x, int64_t n) {
  return DotFloat(
      x, n,
      [w](int64_t i) {
        const __m256i h =
            _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
      },
      [w](int64_t i) { return Bf16ToFloat(w[i]); });
}

}  // namespace moa::cpu
