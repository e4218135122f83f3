// Flash-attention-style prefill over the paged fp16 KV pool (see prefill_attention.h).
//
// One thread block per (query tile, KV head, sequence): kRows = 64 query rows, each a (token,
// query head of the GQA group) pair, token-major, so one key/value tile in shared memory serves
// every head of the group. Four warps own 16 rows each; scores and outputs use the tensor cores
// (mma.sync m16n8k16, fp16 inputs, fp32 accumulation). The query tile is scaled by
// scale * log2(e), rounded to fp16 once and kept in registers; softmax runs in base 2.
//
// Key tiles of kCols keys are streamed with cp.async, two stages deep (the next tile's keys load
// while this tile's scores are computed, its values while this tile's values are used). Only the
// tiles that meet the union of the tile's visible ranges, [0, max sink_end) and
// [min win_begin, last position], are visited; inside them, the keys a row does not see are
// masked one by one, and only in tiles that are not visible to every row as a whole.
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/prefill_attention.h"

namespace moa::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 16 * kWarps;  // (token, head) rows of a query tile
constexpr float kLog2e = 1.4426950408889634f;

// Keys per tile: 64, or 32 at head_dim 256 so that the registers of the output still fit.
template <int kHd>
__host__ __device__ constexpr int TileCols() {
  return kHd > 128 ? 32 : 64;
}
// Shared-memory rows are padded by 16 bytes so the 8 rows an ldmatrix reads hit distinct banks.
template <int kHd>
__host__ __device__ constexpr int Stride() {
  return kHd + 8;
}
template <int kHd>
constexpr int SharedBytes() {
  return 4 * TileCols<kHd>() * Stride<kHd>() * static_cast<int>(sizeof(__half));
}

// The keys the query at `pos` sees, as attention_span.h computes them: [0, se) and [wb, pos].
// "Every key" comes out as se = 0, wb = 0.
__device__ void VisibleAt(const DeviceSpanRule& r, int32_t sink, int32_t pos, int32_t* se,
                          int32_t* wb) {
  const int64_t n = static_cast<int64_t>(pos) + 1;
  *se = 0;
  *wb = 0;
  if (r.dense) return;
  int64_t span = static_cast<int64_t>(r.alpha_tokens) +
                 static_cast<int64_t>(floor(r.beta * static_cast<double>(n)));
  if (span < r.min_span) span = r.min_span;
  if (span >= n) return;
  *se = static_cast<int32_t>(n < sink ? n : sink);
  *wb = static_cast<int32_t>(n - (span - sink));
}

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; src_bytes 0 writes zeros and reads nothing.
__device__ __forceinline__ void CopyAsync16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SharedAddress(dst)),
               "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void CommitAsync() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void WaitAsync() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// ldmatrix from a shared-memory byte address (32-bit, so that unrolled loads fold their
// constant offsets into the instruction instead of holding one address register each).
__device__ __forceinline__ void LoadMatrixX4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void LoadMatrixX4Trans(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a * b for one m16n8k16 tile (a row-major 16x16, b column-major 16x8, fp32 d).
__device__ __forceinline__ void Mma(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t PackHalf2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Three blocks per SM up to head_dim 128: ptxas then spills ~50 bytes at 128, yet on an H100
// this ran 15% faster than two blocks without spills (209 vs 181 TFLOP/s, 16k-token causal).
template <int kHd>
__global__ void __launch_bounds__(kThreads, kHd > 128 ? 1 : 3)
    PrefillKernel(PrefillAttentionArgs a, DevicePool pool) {
  constexpr int kCols = TileCols<kHd>();
  constexpr int kStride = Stride<kHd>();
  constexpr int kChunks = kHd / 8;                  // 16-byte chunks per padded row
  constexpr int kRowsPerPass = kThreads / kChunks;  // tile rows one pass of copies covers
  constexpr int kLoadRows = kCols / kRowsPerPass;   // tile rows each thread copies
  constexpr int kTile = kCols * kStride;            // halves per key or value tile
  static_assert(kThreads % kChunks == 0 && kCols % kRowsPerPass == 0, "copy layout");
  static_assert(2 * kCols >= kRows, "the query staging area is the second stage");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  __half* const smem = reinterpret_cast<__half*>(smem_raw);
  __shared__ int32_t red[4];  // min/max over the tile's rows of sink_end and win_begin

  const int s = blockIdx.z, kv = blockIdx.y;
  const int tile = gridDim.x - 1 - blockIdx.x;  // the last tiles see the most keys: start them
  const int group = a.n_heads / a.n_kv_heads;
  const int tokens_per_tile = kRows / group;
  const int32_t n_new = a.n_new[s];
  const int32_t t0 = tile * tokens_per_tile;
  if (t0 >= n_new) return;
  const int32_t n_tok = min(tokens_per_tile, n_new - t0);
  const int32_t past = a.past[s];
  const int32_t p0 = past + t0, p1 = past + t0 + n_tok - 1;
  const int pair = s * a.n_kv_heads + kv;
  const DeviceSpanRule rule = a.rules[pair];
  const int32_t* table = a.table_data + a.table_begin[pair];
  const int32_t table_len = a.table_len[pair];
  const int hd = a.head_dim;
  const int64_t q_stride = static_cast<int64_t>(a.n_heads) * hd;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (tid == 0) {
    red[0] = INT32_MAX;  // min sink_end
    red[1] = 0;          // max sink_end
    red[2] = INT32_MAX;  // min win_begin
    red[3] = 0;          // max win_begin
  }
  __syncthreads();
  if (tid < n_tok) {
    int32_t se, wb;
    VisibleAt(rule, a.sink, p0 + tid, &se, &wb);
    atomicMin(&red[0], se);
    atomicMax(&red[1], se);
    atomicMin(&red[2], wb);
    atomicMax(&red[3], wb);
  }
  // This thread's two rows (m16n8 accumulator layout: lane / 4 and lane / 4 + 8 of its warp).
  int32_t row_pos[2], row_se[2], row_wb[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int m = warp * 16 + lane / 4 + 8 * i;
    row_pos[i] = p0 + min(m / group, n_tok - 1);  // padding rows repeat the last token
    VisibleAt(rule, a.sink, row_pos[i], &row_se[i], &row_wb[i]);
  }
  __syncthreads();
  const int32_t min_se = red[0], max_se = red[1], min_wb = red[2], max_wb = red[3];

  // Tiles to visit: sink tiles [0, n_sink), then window tiles [w_first, w_last].
  const int n_sink = (max_se + kCols - 1) / kCols;
  const int w_first = max(n_sink, min_wb / kCols), w_last = p1 / kCols;
  const int n_tiles = n_sink + (w_last - w_first + 1);
  const auto tile_start = [&](int i) { return (i < n_sink ? i : w_first + i - n_sink) * kCols; };

  const __half* const keys = pool.data;
  const __half* const values =
      pool.data + static_cast<int64_t>(pool.num_blocks) * pool.block_size * hd;
  const int chunk = tid % kChunks;  // this thread's 16-byte column in every tile row it copies
  const int chunk_bytes = chunk * 8 < hd ? 16 : 0;

  // Pool rows of the keys this thread copies in the tile at k0 (-1: zeros). Keys outside the
  // union are never read: no row of the tile sees them and their blocks may be gone.
  int32_t src_row[kLoadRows];
  const auto locate = [&](int k0) {
#pragma unroll
    for (int j = 0; j < kLoadRows; ++j) {
      const int32_t k = k0 + tid / kChunks + j * kRowsPerPass;
      const int32_t b = k / pool.block_size;
      int32_t row = -1;
      if ((k < max_se || (k >= min_wb && k <= p1)) && b < table_len) {
        const int32_t blk = table[b];
        if (blk >= 0 && blk < pool.num_blocks) row = blk * pool.block_size + k % pool.block_size;
      }
      src_row[j] = row;
    }
  };
  const auto copy_tile = [&](const __half* src, __half* dst) {
#pragma unroll
    for (int j = 0; j < kLoadRows; ++j) {
      const int r = tid / kChunks + j * kRowsPerPass;
      const bool ok = src_row[j] >= 0 && chunk_bytes != 0;
      const __half* from = ok ? src + static_cast<int64_t>(src_row[j]) * hd + chunk * 8 : src;
      CopyAsync16(dst + r * kStride + chunk * 8, from, ok ? 16 : 0);
    }
  };
  const auto k_tile = [&](int stage) { return smem + stage * 2 * kTile; };
  const auto v_tile = [&](int stage) { return smem + stage * 2 * kTile + kTile; };

  locate(tile_start(0));
  copy_tile(keys, k_tile(0));
  CommitAsync();
  copy_tile(values, v_tile(0));
  CommitAsync();

  // Query tile -> fp16, scaled, staged in stage 1 (free until the loop starts) -> registers.
  {
    __half* const qs = k_tile(1);
    const float qscale = a.scale * kLog2e;
    for (int c = tid; c < kRows * kChunks; c += kThreads) {
      const int m = c / kChunks, d = (c % kChunks) * 8;
      uint4 packed = make_uint4(0, 0, 0, 0);
      if (d < hd) {
        const int t = min(m / group, n_tok - 1), h = kv * group + m % group;
        const float4* src = reinterpret_cast<const float4*>(a.q + (a.q_row[s] + t0 + t) * q_stride +
                                                            static_cast<int64_t>(h) * hd + d);
        const float4 x = src[0], y = src[1];
        packed = make_uint4(
            PackHalf2(x.x * qscale, x.y * qscale), PackHalf2(x.z * qscale, x.w * qscale),
            PackHalf2(y.x * qscale, y.y * qscale), PackHalf2(y.z * qscale, y.w * qscale));
      }
      *reinterpret_cast<uint4*>(qs + m * kStride + d) = packed;
    }
  }
  __syncthreads();
  uint32_t qf[kHd / 16][4];
  {
    const uint32_t q_addr =
        SharedAddress(k_tile(1) + (warp * 16 + lane % 16) * kStride + lane / 16 * 8);
#pragma unroll
    for (int kk = 0; kk < kHd / 16; ++kk) LoadMatrixX4(qf[kk], q_addr + kk * 32);
  }
  __syncthreads();

  // Byte offsets of this lane's ldmatrix rows in a key tile and in a value tile.
  const uint32_t smem_base = SharedAddress(smem);
  const uint32_t k_lane = ((lane % 8 + lane / 16 * 8) * kStride + (lane / 8) % 2 * 8) * 2;
  const uint32_t v_lane = ((lane % 8 + (lane / 8) % 2 * 8) * kStride + lane / 16 * 8) * 2;

  float o[kHd / 8][4];
#pragma unroll
  for (int n = 0; n < kHd / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};

  for (int i = 0; i < n_tiles; ++i) {
    const int cur = i & 1;
    const int k0 = tile_start(i);
    // Keys of the next tile, while this one is computed.
    if (i + 1 < n_tiles) {
      locate(tile_start(i + 1));
      copy_tile(keys, k_tile(cur ^ 1));
    }
    CommitAsync();
    WaitAsync<2>();  // this tile's keys (its values and the next keys may still fly)
    __syncthreads();

    float sc[kCols / 8][4];
#pragma unroll
    for (int n = 0; n < kCols / 8; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
    const uint32_t k_addr = smem_base + cur * 2 * kTile * 2 + k_lane;
#pragma unroll
    for (int kk = 0; kk < kHd / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < kCols / 16; ++np) {
        uint32_t b[4];
        LoadMatrixX4(b, k_addr + (np * 16 * kStride + kk * 16) * 2);
        Mma(sc[2 * np], qf[kk], b[0], b[1]);
        Mma(sc[2 * np + 1], qf[kk], b[2], b[3]);
      }
    }

    // Mask unless every row sees every key of the tile.
    const int k1 = k0 + kCols;
    if (!(k1 - 1 <= p0 && (k1 <= min_se || k0 >= max_wb))) {
#pragma unroll
      for (int n = 0; n < kCols / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e / 2;
          const int32_t k = k0 + n * 8 + lane % 4 * 2 + e % 2;
          if (!(k <= row_pos[r] && (k < row_se[r] || k >= row_wb[r]))) sc[n][e] = -INFINITY;
        }
      }
    }

    // Online softmax, base 2; a row with nothing visible yet keeps max -inf and weight 0.
    float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int n = 0; n < kCols / 8; ++n) {
      mx[0] = fmaxf(mx[0], fmaxf(sc[n][0], sc[n][1]));
      mx[1] = fmaxf(mx[1], fmaxf(sc[n][2], sc[n][3]));
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    }
    float base[2], corr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      base[r] = mx[r] == -INFINITY ? 0.0f : mx[r];
      corr[r] = Exp2(m_run[r] - base[r]);
      m_run[r] = mx[r];
      l_run[r] *= corr[r];
    }
#pragma unroll
    for (int n = 0; n < kCols / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sc[n][e] = Exp2(sc[n][e] - base[e / 2]);
        l_run[e / 2] += sc[n][e];
      }
    }
#pragma unroll
    for (int n = 0; n < kHd / 8; ++n) {
      o[n][0] *= corr[0];
      o[n][1] *= corr[0];
      o[n][2] *= corr[1];
      o[n][3] *= corr[1];
    }

    // Values of the next tile, while this one's are used.
    if (i + 1 < n_tiles) copy_tile(values, v_tile(cur ^ 1));
    CommitAsync();
    WaitAsync<2>();  // this tile's values
    __syncthreads();

    const uint32_t v_addr = smem_base + (cur * 2 + 1) * kTile * 2 + v_lane;
#pragma unroll
    for (int kk = 0; kk < kCols / 16; ++kk) {
      const uint32_t p[4] = {PackHalf2(sc[2 * kk][0], sc[2 * kk][1]),
                             PackHalf2(sc[2 * kk][2], sc[2 * kk][3]),
                             PackHalf2(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                             PackHalf2(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < kHd / 16; ++dp) {
        uint32_t b[4];
        LoadMatrixX4Trans(b, v_addr + (kk * 16 * kStride + dp * 16) * 2);
        Mma(o[2 * dp], p, b[0], b[1]);
        Mma(o[2 * dp + 1], p, b[2], b[3]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int m = warp * 16 + lane / 4 + 8 * r;
    const int t = m / group;
    if (t >= n_tok) continue;
    const float inv = 1.0f / l_run[r];
    float* const dst = a.out + (a.q_row[s] + t0 + t) * q_stride +
                       static_cast<int64_t>(kv * group + m % group) * hd + lane % 4 * 2;
#pragma unroll
    for (int n = 0; n < kHd / 8; ++n) {
      if (n * 8 + lane % 4 * 2 < hd) {
        *reinterpret_cast<float2*>(dst + n * 8) =
            make_float2(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
      }
    }
  }
}

template <int kHd>
cudaError_t Launch(const PrefillAttentionArgs& a, const DevicePool& pool, cudaStream_t stream) {
  const int group = a.n_heads / a.n_kv_heads;
  const int tokens_per_tile = kRows / group;
  const dim3 grid((a.max_n_new + tokens_per_tile - 1) / tokens_per_tile, a.n_kv_heads, a.n_seqs);
  if (grid.x > 0x7fffffffu || grid.z > 65535) return cudaErrorInvalidValue;
  cudaError_t err = cudaFuncSetAttribute(
      PrefillKernel<kHd>, cudaFuncAttributeMaxDynamicSharedMemorySize, SharedBytes<kHd>());
  if (err != cudaSuccess) return err;
  PrefillKernel<kHd><<<grid, kThreads, SharedBytes<kHd>(), stream>>>(a, pool);
  return cudaGetLastError();
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool PrefillAttentionSupports(int head_dim, int group) {
  return head_dim >= 8 && head_dim <= 256 && head_dim % 8 == 0 && group >= 1 && group <= kRows;
}

cudaError_t LaunchPrefillAttention(const PrefillAttentionArgs& a, const DevicePool& pool,
                                   cudaStream_t stream) {
  if (a.n_heads <= 0 || a.n_kv_heads <= 0 || a.n_heads % a.n_kv_heads != 0 ||
      !PrefillAttentionSupports(a.head_dim, a.n_heads / a.n_kv_heads) ||
      pool.head_dim != a.head_dim || pool.block_size <= 0 || pool.num_blocks < 0 || a.n_seqs < 0 ||
      a.max_n_new < 0 || a.n_kv_heads > 65535 ||
      // Pool rows are indexed in 32 bits.
      static_cast<int64_t>(pool.num_blocks) * pool.block_size > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  if (a.n_seqs == 0 || a.max_n_new == 0) return cudaSuccess;
  if (!Aligned16(a.q) || !Aligned16(a.out) || !Aligned16(pool.data)) return cudaErrorInvalidValue;
  if (a.head_dim <= 64) return Launch<64>(a, pool, stream);
  if (a.head_dim <= 128) return Launch<128>(a, pool, stream);
  return Launch<256>(a, pool, stream);
}

}  // namespace moa::cuda
