// Split-KV decode attention (see decode_attention.h), one kernel per step:
//   plan:  every block sums the pairs' costs, their visible lengths plus pair_start_keys each (a
//          scan over its threads, cheaper than a separate launch), takes the range
//          [b * per_block, (b + 1) * per_block) of all pairs' costs laid end to end, and finds
//          the pair that holds its start;
//   split: for each pair its range touches, the block's warps stream the keys and values once for
//          all query heads of the GQA group, an online softmax in base 2, on CUDA cores
//          (ScalarSplit) or tensor cores (TensorSplit); the warps' states are combined in shared
//          memory;
//   merge: a pair inside one block's range is written out directly; otherwise each block writes
//          a partial (max, sum, output) and the last to finish (an arrival counter per pair)
//          merges the pair's partials with all its threads.
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cuda/atomic>

#include "kernels/cuda/decode_attention.h"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/span_rule.cuh"

namespace moa::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
// Measured on an H100 (docs/benchmarks-gpu-decode-attention.md): fewer keys per block leave
// too few bytes in flight per block and too many partials to merge.
constexpr int kMinKeysPerBlock = 128;
// What starting a pair costs a block, as bytes of keys and values it could have read instead
// (pair_start_keys is this over the bytes of one key and value). A timer per block (H100) showed
// the blocks that start a second pair mid-kernel finishing last, 10-15 us behind the median
// block: they fetch the new pair's first tiles behind everyone's queued reads, and as the pair's
// last block in they also merge it. Counted as 512 keys at head_dim 128, the launches of 34-134
// MB take 0.86-0.90x the time, larger ones 0.98-1.00x; 256 and 1024 keys gain less
// (docs/benchmarks-gpu-decode-attention.md).
constexpr int64_t kPairStartBytes = int64_t{512} * 4 * 128;
constexpr float kLog2e = 1.4426950408889634f;
// Tensor cores: a warp's tile is 16 consecutive key positions (the k of mma m16n8k16); each
// stage of its cp.async pipeline holds one tile's keys and values (4 KB + 4 KB at head_dim 128).
constexpr int kTile = 16;
// Measured on an H100 and an H200 (docs/benchmarks-gpu-decode-attention.md): at batch 8-64, 3
// stages (2 blocks per SM) are within 3% of 2 (3 blocks), and 4 stages (1 block) take up to
// 1.5x as long; at batch 1, 3 stages are 4-19% faster than 2.
constexpr int kDefaultStages = 3;
constexpr int kMaxStages = 4;
// From this group size on the tensor-core kernel is the default: 1.09-2.21x faster for group 4,
// and for MHA 1.00-1.16x faster at batch 8-64 (0.84-0.87x on three batch-1 rows with short
// windows, which are latency-bound either way): the batches that decide throughput win
// (docs/benchmarks-gpu-decode-attention.md).
constexpr int kTensorCoresFromGroup = 1;

struct Workspace {
  int32_t* count;  // [max_pairs] blocks done with each pair; zero between launches
  float* o_part;   // [slots, group, head_dim] unnormalised outputs
  float* m_part;   // [slots, group] running max (base-2 scores)
  float* l_part;   // [slots, group] sum of exponentials
};

__host__ __device__ constexpr int64_t AlignUp(int64_t n) { return (n + 15) / 16 * 16; }

// Partial slot of (block b, pair p) is b + p: along the keys laid end to end both grow, and at
// each step from one segment to the next at least one of them does, so slots are distinct.
int64_t Slots(const DecodeAttentionConfig& c) { return int64_t{c.grid} + c.max_pairs; }

Workspace Carve(void* base, const DecodeAttentionConfig& c, int64_t* bytes) {
  char* p = static_cast<char*>(base);
  Workspace w{};
  int64_t off = 0;
  const auto take = [&](int64_t n) {
    char* at = p == nullptr ? nullptr : p + off;
    off += AlignUp(n);
    return at;
  };
  const int64_t slots = Slots(c);
  w.count = reinterpret_cast<int32_t*>(take(c.max_pairs * sizeof(int32_t)));
  w.o_part = reinterpret_cast<float*>(take(slots * c.group * c.head_dim * sizeof(float)));
  w.m_part = reinterpret_cast<float*>(take(slots * c.group * sizeof(float)));
  w.l_part = reinterpret_cast<float*>(take(slots * c.group * sizeof(float)));
  *bytes = off;
  return w;
}

// Shared memory: [split area][warps' max: kWarps x group][warps' sum: kWarps x group], nothing
// per pair (so the blocks per SM do not depend on the batch). The split area holds the warps'
// outputs [kWarps][group][head_dim] (CUDA cores), or each warp's cp.async stages followed by all
// warps' key masks [kWarps][stages][32] (tensor cores; a warp's output then reuses its own stages).
// The kernel starts it on a kSharedAlign boundary: dynamic shared memory begins after the static
// variables (144 bytes for group 4, so only 16-byte aligned), and cp.async reads each 32-byte
// global sector from L2 once only if it lands in one aligned 32-byte piece of shared memory (else
// once per 16-byte half: measured with Nsight Compute on an H100, twice the L2 sectors).
constexpr int kSharedAlign = 128;
__host__ __device__ constexpr int64_t TensorStageBytes(int hd) { return int64_t{hd} * 4 * kTile; }

__host__ __device__ constexpr int64_t SplitAreaBytes(int hd, int group, bool tc, int stages) {
  return tc ? kWarps * stages * (TensorStageBytes(hd) + 32 * 4) : int64_t{4} * kWarps * group * hd;
}

__host__ __device__ constexpr int64_t StateBytes(int group) { return AlignUp(4 * kWarps * group); }

int64_t SharedBytes(int hd, int group, bool tc, int stages) {
  return kSharedAlign + SplitAreaBytes(hd, group, tc, stages) + 2 * StateBytes(group);
}

struct Range {
  int32_t sink_end;   // keys [0, sink_end)
  int32_t win_begin;  // then keys [win_begin, len)
  int32_t n_keys;
};

__device__ Range VisibleRange(const DecodeAttentionArgs& a, int p) {
  const int32_t len = max(a.seq_len[p / a.n_kv_heads], 0);
  int64_t sink_end = 0, win_begin = 0;
  if (a.rules != nullptr) {
    VisibleKeys(a.rules[p % a.n_kv_heads], a.sink, static_cast<int64_t>(len) - 1, &sink_end,
                &win_begin);
  } else {
    sink_end = a.sink_end[p];
    win_begin = a.win_begin[p];
  }
  const int32_t se = static_cast<int32_t>(min(max(sink_end, int64_t{0}), int64_t{len}));
  const int32_t wb = static_cast<int32_t>(min(max(win_begin, int64_t{se}), int64_t{len}));
  return {se, wb, se + (len - wb)};
}

// Exclusive prefix sum of `v` over the block; *total gets the sum of all.
__device__ long long BlockExclusiveScan(long long v, long long* warp_sums, long long* total) {
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  long long x = v;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const long long y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  long long before = 0, all = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += warp_sums[w];
    all += warp_sums[w];
  }
  __syncthreads();
  *total = all;
  return before + x - v;
}

__device__ float2 HalfPair(uint32_t bits) {
  return __half22float2(*reinterpret_cast<const __half2*>(&bits));
}

// One pair's part [k0, k1) of its visible keys, as a block's split step sees it.
struct PairPart {
  Range r;
  int k0, k1;
  int64_t t_begin;  // its block table
  int32_t t_len;
  const float* q;  // the group's query heads, [G][HD]
};

// What each warp leaves for the block's combine: its unnormalised output for the group at
// o + warp * o_stride ([G][HD]), its running max and sum at m[warp * G + g], l[warp * G + g].
struct WarpStates {
  float* o;
  int o_stride;
  float* m;
  float* l;
};

// --- CUDA cores: HD / 8 lanes hold one key (or value) row, 8 halves = 16 bytes each; a warp
// covers kKeysPerRow keys per "row" and loads U rows before using any, so that U KB are in
// flight.
template <int HD, int G>
__device__ void ScalarSplit(const DecodeAttentionArgs& a, const DevicePool& pool,
                            const PairPart& part, const WarpStates& st) {
  constexpr int kLanesPerKey = HD / 8;
  constexpr int kKeysPerRow = 32 / kLanesPerKey;
  constexpr int U = G <= 4 ? 8 : 4;
  static_assert(kLanesPerKey <= 32 && 32 % kLanesPerKey == 0, "head_dim must be 64 or 128");
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  const int sub = lane / kLanesPerKey;      // which key of a row
  const int col = lane % kLanesPerKey * 8;  // first element of this lane's 8
  const int64_t value_offset = static_cast<int64_t>(pool.num_blocks) * pool.block_size * HD;
  const Range& r = part.r;
  const int k0 = part.k0, k1 = part.k1;

  float qf[G][8], acc[G][8], m[G], l[G];
  const float* qrow = part.q + col;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const float4 x0 = __ldg(reinterpret_cast<const float4*>(qrow + g * HD));
    const float4 x1 = __ldg(reinterpret_cast<const float4*>(qrow + g * HD + 4));
    const float f = a.scale * kLog2e;
    const float xs[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      qf[g][j] = xs[j] * f;
      acc[g][j] = 0.0f;
    }
    m[g] = -INFINITY;
    l[g] = 0.0f;
  }

  const int n_rows = (k1 - k0 + kKeysPerRow - 1) / kKeysPerRow;
  for (int r0 = 0; r0 < n_rows; r0 += kWarps * U) {
    uint4 kr[U], vr[U];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = k0 + (r0 + u * kWarps + warp) * kKeysPerRow + sub;
      int32_t id = -1;
      int kp = 0;
      if (i < k1) {
        kp = i < r.sink_end ? i : r.win_begin + (i - r.sink_end);
        const int b = kp / pool.block_size;
        if (b < part.t_len) id = a.table_data[part.t_begin + b];
      }
      ok[u] = id >= 0 && id < pool.num_blocks;
      kr[u] = vr[u] = make_uint4(0u, 0u, 0u, 0u);
      if (ok[u]) {
        const __half* key =
            pool.data + (static_cast<int64_t>(id) * pool.block_size + kp % pool.block_size) * HD +
            col;
        kr[u] = __ldg(reinterpret_cast<const uint4*>(key));
        vr[u] = __ldg(reinterpret_cast<const uint4*>(key + value_offset));
      }
    }
    // Scores of every key for every head of the group; each key row converted once.
    float sc[G][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const float2 k01 = HalfPair(kr[u].x), k23 = HalfPair(kr[u].y), k45 = HalfPair(kr[u].z),
                   k67 = HalfPair(kr[u].w);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float d = qf[g][0] * k01.x;
        d = fmaf(qf[g][1], k01.y, d);
        d = fmaf(qf[g][2], k23.x, d);
        d = fmaf(qf[g][3], k23.y, d);
        d = fmaf(qf[g][4], k45.x, d);
        d = fmaf(qf[g][5], k45.y, d);
        d = fmaf(qf[g][6], k67.x, d);
        d = fmaf(qf[g][7], k67.y, d);
        sc[g][u] = d;
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int o = kLanesPerKey / 2; o > 0; o /= 2) {
          sc[g][u] += __shfl_xor_sync(0xffffffffu, sc[g][u], o);
        }
        if (!ok[u]) sc[g][u] = -INFINITY;
      }
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u) mx = fmaxf(mx, sc[g][u]);
      if (mx == -INFINITY) {  // no visible key yet for this row of the warp
#pragma unroll
        for (int u = 0; u < U; ++u) sc[g][u] = 0.0f;
        continue;
      }
      const float corr = exp2f(m[g] - mx);
      l[g] *= corr;
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[g][j] *= corr;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        sc[g][u] = exp2f(sc[g][u] - mx);  // now the weight of key u
        l[g] += sc[g][u];
      }
      m[g] = mx;
    }
    // Values, each converted once for all heads of the group.
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const float2 v01 = HalfPair(vr[u].x), v23 = HalfPair(vr[u].y), v45 = HalfPair(vr[u].z),
                   v67 = HalfPair(vr[u].w);
      const float vf[8] = {v01.x, v01.y, v23.x, v23.y, v45.x, v45.y, v67.x, v67.y};
#pragma unroll
      for (int g = 0; g < G; ++g) {
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[g][j] = fmaf(sc[g][u], vf[j], acc[g][j]);
      }
    }
  }

  // The keys of one row ran separate softmaxes: fold them into the lanes of key 0.
#pragma unroll
  for (int o = kLanesPerKey; o < 32; o *= 2) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m[g], o);
      const float l2 = __shfl_xor_sync(0xffffffffu, l[g], o);
      const float mx = fmaxf(m[g], m2);
      const float f1 = mx == -INFINITY ? 0.0f : exp2f(m[g] - mx);
      const float f2 = mx == -INFINITY ? 0.0f : exp2f(m2 - mx);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float a2 = __shfl_xor_sync(0xffffffffu, acc[g][j], o);
        acc[g][j] = acc[g][j] * f1 + a2 * f2;
      }
      l[g] = l[g] * f1 + l2 * f2;
      m[g] = mx;
    }
  }
  if (sub == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float* dst = st.o + warp * st.o_stride + g * HD + col;
      *reinterpret_cast<float4*>(dst) = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
      *reinterpret_cast<float4*>(dst + 4) = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
      if (col == 0) {
        st.m[warp * G + g] = m[g];
        st.l[warp * G + g] = l[g];
      }
    }
  }
}

// --- Tensor cores.
__device__ __forceinline__ uint32_t Bits(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }

// x0, x1 ~= hi + lo, both fp16 pairs: the hi and lo rows of an mma carry about 22 bits of x
// between them, so that fp16 inputs do not cost the fp32 precision of scores and weights.
__device__ __forceinline__ void SplitHalves(float x0, float x1, uint32_t* hi, uint32_t* lo) {
  const __half2 h = __floats2half2_rn(x0, x1);
  const float2 f = __half22float2(h);
  *hi = Bits(h);
  *lo = Bits(__floats2half2_rn(x0 - f.x, x1 - f.y));
}

// c += a * b for A 16 x 16 (row), B 16 x 8 (col), fp16 in, fp32 accumulate.
__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes global -> shared without registers; zeros (and no read) where !valid.
__device__ __forceinline__ void CpAsync16(void* dst, const void* src, bool valid) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void PrefetchL1(const void* p) {
  asm volatile("prefetch.global.L1 [%0];" ::"l"(p));
}

__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most `pending` (< kMaxStages) of this thread's newest groups are in flight.
__device__ __forceinline__ void CpAsyncWait(int pending) {
  switch (pending) {
    case 0:
      asm volatile("cp.async.wait_group 0;\n" ::: "memory");
      break;
    case 1:
      asm volatile("cp.async.wait_group 1;\n" ::: "memory");
      break;
    case 2:
      asm volatile("cp.async.wait_group 2;\n" ::: "memory");
      break;
    default:
      asm volatile("cp.async.wait_group 3;\n" ::: "memory");
      break;
  }
}

// Each warp takes every kWarps-th tile of 16 consecutive positions (aligned to 16, so that with
// blocks of a multiple of 16 positions a tile is one contiguous run of one pool block) and
// streams it through a `stages`-deep cp.async pipeline in shared memory. In each tile, with
// g = lane / 4 and t = lane % 4 (the mma fragment coordinates):
//   scores: S[16 x 8 keys] += Q[16 x 16 dims] K^T[16 dims x 8 keys], twice (keys 0-7, 8-15),
//     over head_dim / 16 steps; row g of Q is head g's query scaled by scale * log2(e) in fp16,
//     row g + 8 what fp16 lost of it (zero rows pad the group to 8), so head g's score of a key
//     is the sum of rows g and g + 8. The dims are permuted so that each lane's B fragment
//     (key g, 8 dims) is one 16-byte load: lane (g, t) holds dims 32c + 8t .. + 8 of step 2c, 2c+1.
//   weights: row g of P is head g's exp2(score - max), row g + 8 what fp16 lost of it; by the
//     mma layouts lane (g, t) holds head g's scores and weights of keys 2t, 2t + 1, 2t + 8,
//     2t + 9 (the same for the A fragment of P), so the softmax needs only two shuffles per tile.
//   outputs: O[16 x 8 dims] += P[16 x 16 keys] V[16 keys x 8 dims] for head_dim / 8 column
//     tiles; lane (g, t) loads 16 bytes (dims 8g + 64c ..) of each of its four keys and pairs
//     the keys' halves (byte_perm) into B fragments: column g of column tile 8c + d is dim
//     (g + 8c) * 8 + d.
// Each lane copies exactly the bytes it later reads, so the pipeline needs no barrier. Each copy
// instruction fills 512 contiguous bytes of a stage, lane (g, t)'s 16 bytes at 16 * (4g + t) for
// keys and at 16 * (8t + g) for values: either way the lanes that read one 32-byte (for values,
// 128-byte) run of the pool write one aligned run of shared memory, so that cp.async reads each
// sector from L2 once and writes shared memory in few wavefronts. (Values at 16 * (4g + t), by
// lane, cost twice the L2 sectors and six times the wavefronts of the ideal, per Nsight Compute.)
template <int HD, int G>
__device__ void TensorSplit(const DecodeAttentionArgs& a, const DevicePool& pool,
                            const PairPart& part, const WarpStates& st, int stages, uint4* stage,
                            int* masks) {
  static_assert(HD % 64 == 0 && G <= 8, "tensor-core tiles need head_dim 64k and group <= 8");
  constexpr int kKc = HD / 32;     // 16-byte K chunks per lane and key (2 keys)
  constexpr int kVc = HD / 64;     // 16-byte V chunks per lane and key (4 keys)
  constexpr int kSlots = 4 * kKc;  // 16-byte slots per lane and stage
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  const int g = lane / 4, t = lane % 4;
  const int bs = pool.block_size;
  const int64_t value_offset = static_cast<int64_t>(pool.num_blocks) * bs * HD;
  const Range& r = part.r;

  // Keys [k0, k1) as positions: [pa0, pb0) in the sink, [pa1, pb1) in the window.
  const int pa0 = part.k0, pb0 = min(part.k1, r.sink_end);
  const int pa1 = r.win_begin + max(part.k0 - r.sink_end, 0);
  const int pb1 = r.win_begin + (part.k1 - r.sink_end);
  const int n0 = pa0 < pb0 ? (pb0 - 1) / kTile - pa0 / kTile + 1 : 0;
  const int n1 = pa1 < pb1 ? (pb1 - 1) / kTile - pa1 / kTile + 1 : 0;
  const int n_mine = (n0 + n1 - warp + kWarps - 1) / kWarps;
  stage += warp * stages * kSlots * 32;
  const int k_at = lane, v_at = 8 * t + g;  // this lane's 16 bytes in a slot of 32
  masks += warp * stages * 32 + lane;

  // First position of this warp's i-th tile.
  const auto tile_pos = [&](int i) {
    const int tile = warp + i * kWarps;
    const bool sink = tile < n0;
    return ((sink ? pa0 : pa1) / kTile + (sink ? tile : tile - n0)) * kTile;
  };
  // The table entry of tile i's pool block where the tile lies in one block (else unused), read
  // one tile early: read where the tile's copies are issued, its latency (an L2 round trip, long
  // while the memory system is busy) held them back; read early, it takes 0-7% off the time (most
  // where few warps share an SM; docs/benchmarks-gpu-decode-attention.md).
  const auto block_id = [&](int i) -> int32_t {
    if (i >= n_mine) return -1;
    const int p0 = tile_pos(i), blk0 = p0 / bs;
    return p0 - blk0 * bs + kTile <= bs && blk0 < part.t_len ? a.table_data[part.t_begin + blk0]
                                                             : -1;
  };
  int32_t next_id = block_id(0);

  // Starts copying this warp's i-th tile into stage i % stages (one commit group either way).
  const auto issue = [&](int i) {
    if (i < n_mine) {
      const int tile = warp + i * kWarps;
      const bool sink = tile < n0;
      const int pa = sink ? pa0 : pa1, pb = sink ? pb0 : pb1;
      const int p0 = tile_pos(i);
      const int blk0 = p0 / bs, off0 = p0 - blk0 * bs;
      const bool one_block = off0 + kTile <= bs;
      int64_t base = -1;
      if (one_block && blk0 < part.t_len) {
        const int32_t id = next_id;
        if (id >= 0 && id < pool.num_blocks) base = static_cast<int64_t>(id) * bs + off0;
      }
      // Pool row of the tile's key j, or -1 if not visible (or its block is missing).
      const auto row_of = [&](int j) -> int64_t {
        const int pos = p0 + j;
        if (pos < pa || pos >= pb) return -1;
        if (one_block) return base < 0 ? -1 : base + j;
        const int b = pos / bs;
        if (b >= part.t_len) return -1;
        const int32_t id = a.table_data[part.t_begin + b];
        return id >= 0 && id < pool.num_blocks ? static_cast<int64_t>(id) * bs + (pos - b * bs)
                                               : -1;
      };
      uint4* dst = stage + (i % stages) * kSlots * 32;
#pragma unroll
      for (int n = 0; n < 2; ++n) {  // keys g, g + 8
        const int64_t row = row_of(g + 8 * n);
        const __half* src = pool.data + max(row, int64_t{0}) * HD + 8 * t;
#pragma unroll
        for (int c = 0; c < kKc; ++c) {
          CpAsync16(dst + (n * kKc + c) * 32 + k_at, src + 32 * c, row >= 0);
        }
      }
      int mask = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k) {  // keys 2t, 2t + 1, 2t + 8, 2t + 9
        const int64_t row = row_of(2 * t + (k & 1) + 8 * (k >> 1));
        mask |= (row >= 0 ? 1 : 0) << k;
        const __half* src = pool.data + value_offset + max(row, int64_t{0}) * HD + 8 * g;
#pragma unroll
        for (int c = 0; c < kVc; ++c) {
          CpAsync16(dst + (2 * kKc + k * kVc + c) * 32 + v_at, src + 64 * c, row >= 0);
        }
      }
      masks[(i % stages) * 32] = mask;
    }
    next_id = block_id(i + 1);
    CpAsyncCommit();
  };
  for (int i = 0; i < stages - 1; ++i) issue(i);

  uint32_t qa[HD / 16][4];  // A fragments of the query, step by step
  {
    const float f = a.scale * kLog2e;
#pragma unroll
    for (int c = 0; c < kKc; ++c) {
      float x[8] = {};
      if (g < G) {
        const float* q = part.q + g * HD + 32 * c + 8 * t;
        const float4 x0 = __ldg(reinterpret_cast<const float4*>(q));
        const float4 x1 = __ldg(reinterpret_cast<const float4*>(q + 4));
        const float xs[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
        for (int j = 0; j < 8; ++j) x[j] = xs[j];
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        SplitHalves(x[4 * h] * f, x[4 * h + 1] * f, &qa[2 * c + h][0], &qa[2 * c + h][1]);
        SplitHalves(x[4 * h + 2] * f, x[4 * h + 3] * f, &qa[2 * c + h][2], &qa[2 * c + h][3]);
      }
    }
  }

  float o[HD / 8][4] = {};  // rows g (head g) and g + 8 (its fp16 remainder) of each column tile
  float m = -INFINITY, l = 0.0f;  // head g's running max and (this lane's keys') sum
  for (int i = 0; i < n_mine; ++i) {
    issue(i + stages - 1);
    CpAsyncWait(stages - 1);
    const uint4* src = stage + (i % stages) * kSlots * 32;
    float s[2][4] = {};
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int c = 0; c < kKc; ++c) {
        const uint4 k = src[(n * kKc + c) * 32 + k_at];
        Mma(s[n], qa[2 * c], k.x, k.y);
        Mma(s[n], qa[2 * c + 1], k.z, k.w);
      }
    }
    const int mask = masks[(i % stages) * 32];
    float w[4];  // head g's scores, then weights, of keys 2t, 2t + 1, 2t + 8, 2t + 9
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      w[k] = (mask >> k) & 1 ? s[k >> 1][k & 1] + s[k >> 1][(k & 1) + 2] : -INFINITY;
    }
    float mx = fmaxf(fmaxf(w[0], w[1]), fmaxf(w[2], w[3]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m, mx);
    const float ref = m_new == -INFINITY ? 0.0f : m_new;  // no visible key yet: all weights 0
    const float corr = exp2f(m - ref);
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = exp2f(w[k] - ref);
    l = l * corr + ((w[0] + w[1]) + (w[2] + w[3]));
    m = m_new;
    // The max rarely grows after the first tiles: skip the rescale when no lane needs it.
    if (__any_sync(0xffffffffu, corr != 1.0f)) {
#pragma unroll
      for (int j = 0; j < HD / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o[j][e] *= corr;
      }
    }
    uint32_t pa[4];
    SplitHalves(w[0], w[1], &pa[0], &pa[1]);
    SplitHalves(w[2], w[3], &pa[2], &pa[3]);
#pragma unroll
    for (int c = 0; c < kVc; ++c) {
      uint32_t v[4][4];  // [key 2t, 2t + 1, 2t + 8, 2t + 9][pairs of dims]
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint4 x = src[(2 * kKc + k * kVc + c) * 32 + v_at];
        v[k][0] = x.x;
        v[k][1] = x.y;
        v[k][2] = x.z;
        v[k][3] = x.w;
      }
#pragma unroll
      for (int d = 0; d < 8; ++d) {
        const unsigned sel = d % 2 == 0 ? 0x5410u : 0x7632u;  // low or high halves of two keys
        Mma(o[8 * c + d], pa, __byte_perm(v[0][d / 2], v[1][d / 2], sel),
            __byte_perm(v[2][d / 2], v[3][d / 2], sel));
      }
    }
  }
  CpAsyncWait(0);

  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  __syncwarp();  // the warp's output reuses its stages, which other lanes may still be reading
  if (g < G) {
    float* out = st.o + warp * st.o_stride + g * HD;
#pragma unroll
    for (int c = 0; c < kVc; ++c) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {  // column 2t + e of each tile: dims (2t + e + 8c) * 8 + d
        float* dst = out + (2 * t + e + 8 * c) * 8;
        float y[8];
#pragma unroll
        for (int d = 0; d < 8; ++d) y[d] = o[8 * c + d][e] + o[8 * c + d][e + 2];
        *reinterpret_cast<float4*>(dst) = make_float4(y[0], y[1], y[2], y[3]);
        *reinterpret_cast<float4*>(dst + 4) = make_float4(y[4], y[5], y[6], y[7]);
      }
    }
    if (t == 0) {
      st.m[warp * G + g] = m;
      st.l[warp * G + g] = l;
    }
  }
}

// The block's result for pair p from the warps' states: written out (to orow, and its fp16
// rounding to hrow where set) if the block holds all of the pair, else published as partial
// `slot`; the last block in merges the pair's partials.
template <int HD, int G>
__device__ void FinishPair(const WarpStates& st, const Workspace& w, float* orow, __half* hrow,
                           int p, int slot, int first_block, int n_parts) {
  __shared__ int last;
  const int tid = static_cast<int>(threadIdx.x);
  for (int i = tid; i < G * HD; i += kThreads) {
    const int g = i / HD;
    float mx = -INFINITY;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) mx = fmaxf(mx, st.m[v * G + g]);
    float sum = 0.0f, o = 0.0f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int v = 0; v < kWarps; ++v) {
        const float f = exp2f(st.m[v * G + g] - mx);
        sum += st.l[v * G + g] * f;
        o += st.o[v * st.o_stride + i] * f;
      }
    }
    if (n_parts == 1) {
      orow[i] = sum > 0.0f ? o / sum : 0.0f;
      if (hrow != nullptr) hrow[i] = __float2half_rn(orow[i]);
    } else {
      w.o_part[static_cast<int64_t>(slot) * G * HD + i] = o;
      if (i % HD == 0) {
        w.m_part[static_cast<int64_t>(slot) * G + g] = mx;
        w.l_part[static_cast<int64_t>(slot) * G + g] = sum;
      }
    }
  }
  if (n_parts == 1) return;
  // Publish the partial, then count this block in; the last one in merges. The barrier orders the
  // block's writes before thread 0's arrival, whose release (at GPU scope, cumulative) publishes
  // them and whose acquire makes the other blocks' parts visible to the loads after the next
  // barrier: one round trip, where a fence in every thread and then the counter were two.
  __syncthreads();
  if (tid == 0) {
    last = ::cuda::atomic_ref<int32_t, ::cuda::thread_scope_device>(w.count[p])
               .fetch_add(1, ::cuda::memory_order_acq_rel) == n_parts - 1;
  }
  __syncthreads();
  if (!last) return;
  // One pass over the parts, each thread four outputs of one head, kMergeGroup parts' loads in
  // flight at a time and the sums rescaled once per group where the max grows: this is a chain
  // of L2 round trips at the end of the kernel. (Three passes, for the max, the sum and the
  // outputs, cost two more round trips and four barriers; rescaling at every part made each part
  // wait for the previous one's exp2, 1.05-1.17x the time where a GQA pair is split 32 ways; one
  // output and four parts at a time made it 36 round trips there: 12 us of a 49 us launch.)
  constexpr int kMergeGroup = 16;
  static_assert(HD % 4 == 0, "the merge reads four outputs at a time");
  const int64_t s0 = first_block + p;  // slots s0 .. s0 + n_parts - 1
  const float4* o_part = reinterpret_cast<const float4*>(w.o_part);
  for (int i4 = tid; i4 < G * HD / 4; i4 += kThreads) {
    const int g = 4 * i4 / HD;
    float mx = -INFINITY, l = 0.0f;
    float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int c0 = 0; c0 < n_parts; c0 += kMergeGroup) {
      float mc[kMergeGroup], lc[kMergeGroup];
      float4 v[kMergeGroup];
#pragma unroll
      for (int u = 0; u < kMergeGroup; ++u) {  // past the last part: nothing read, weight 0
        mc[u] = -INFINITY;
        lc[u] = 0.0f;
        v[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (c0 + u < n_parts) {
          const int64_t c = s0 + c0 + u;
          mc[u] = __ldcg(w.m_part + c * G + g);
          lc[u] = __ldcg(w.l_part + c * G + g);
          v[u] = __ldcg(o_part + c * (G * HD / 4) + i4);
        }
      }
      float mn = mx;
#pragma unroll
      for (int u = 0; u < kMergeGroup; ++u) mn = fmaxf(mn, mc[u]);
      if (mn == -INFINITY) continue;  // no visible key so far
      // Parts without visible keys (max -inf) hold zeros and get weight 0, as does the sum so far
      // while it has none.
      const float fo = exp2f(mx - mn);
      o = make_float4(o.x * fo, o.y * fo, o.z * fo, o.w * fo);
      l *= fo;
#pragma unroll
      for (int u = 0; u < kMergeGroup; ++u) {
        const float f = exp2f(mc[u] - mn);
        o = make_float4(fmaf(v[u].x, f, o.x), fmaf(v[u].y, f, o.y), fmaf(v[u].z, f, o.z),
                        fmaf(v[u].w, f, o.w));
        l = fmaf(lc[u], f, l);
      }
      mx = mn;
    }
    const auto norm = [l](float x) { return l > 0.0f ? x / l : 0.0f; };
    const float4 y = make_float4(norm(o.x), norm(o.y), norm(o.z), norm(o.w));
    orow[4 * i4] = y.x;
    orow[4 * i4 + 1] = y.y;
    orow[4 * i4 + 2] = y.z;
    orow[4 * i4 + 3] = y.w;
    if (hrow != nullptr) {
      hrow[4 * i4] = __float2half_rn(y.x);
      hrow[4 * i4 + 1] = __float2half_rn(y.y);
      hrow[4 * i4 + 2] = __float2half_rn(y.z);
      hrow[4 * i4 + 3] = __float2half_rn(y.w);
    }
  }
  if (tid == 0) w.count[p] = 0;  // ready for the next launch
}

template <int HD, int G, bool kTensor>
__global__ void __launch_bounds__(kThreads)
    DecodeKernel(DecodeAttentionArgs a, DevicePool pool, Workspace w, int min_keys, int stages,
                 int pair_keys) {
  WaitForPriorGrid();  // launched as a dependent (LaunchDecodeAttention)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem =  // see kSharedAlign
      smem_raw + (kSharedAlign - __cvta_generic_to_shared(smem_raw) % kSharedAlign) % kSharedAlign;
  const int64_t split_bytes = SplitAreaBytes(HD, G, kTensor, stages);
  WarpStates st;
  st.o = reinterpret_cast<float*>(smem);
  st.o_stride = kTensor ? static_cast<int>(stages * TensorStageBytes(HD) / 4) : G * HD;
  st.m = reinterpret_cast<float*>(smem + split_bytes);
  st.l = reinterpret_cast<float*>(smem + split_bytes + StateBytes(G));
  __shared__ long long warp_sums[kWarps];
  __shared__ long long plan_first_start;
  __shared__ int plan_first_pair;

  const int tid = static_cast<int>(threadIdx.x);
  const int n_pairs = a.n_seqs * a.n_kv_heads;
  // Offset of pair p's G x HD query (and output) values in a.q (a.out).
  const auto pair_offset = [&](int p) -> int64_t {
    const int s = p / a.n_kv_heads, h = p % a.n_kv_heads;
    const int64_t row = a.row != nullptr ? a.row[s] : s;
    return row * a.n_heads * HD + static_cast<int64_t>(h) * G * HD;
  };

  // Plan. Thread tid sums the costs of its slice of pairs (a pair with visible keys costs them
  // and pair_keys more, one without costs nothing); a scan of those sums gives the total (so the
  // block's range) and each slice's start, and the thread whose slice holds `begin` finds the
  // block's first pair. In that order, pair p costs [c, c + pair_keys) before its keys
  // [c + pair_keys, c + pair_keys + n) (p0, p1 below): a block whose range ends before a pair's
  // keys does not take the pair. Nothing per pair is kept: shared memory, and so the
  // blocks per SM, does not depend on the number of pairs.
  const auto cost = [pair_keys](int n_keys) -> long long {
    return n_keys > 0 ? n_keys + pair_keys : 0;
  };
  const int per = (n_pairs + kThreads - 1) / kThreads;
  const int lo = min(tid * per, n_pairs), hi = min(lo + per, n_pairs);
  long long mine = 0;
  // The block reads its first pair's table position right after the plan: fetched into L1 now,
  // with the lengths, that is no longer one more round trip before its first keys. (One per
  // slice: at the small batches, where that round trip counts, a slice is one pair.)
  if (lo < hi) {
    PrefetchL1(a.table_begin + lo);
    PrefetchL1(a.table_len + lo);
  }
  for (int p = lo; p < hi; ++p) {
    const int n = VisibleRange(a, p).n_keys;
    mine += cost(n);
    // A pair without visible keys (only from inconsistent arguments) still gets an output,
    // written by one block.
    if (n == 0 && p % static_cast<int>(gridDim.x) == static_cast<int>(blockIdx.x)) {
      const int64_t at = pair_offset(p);
      for (int i = 0; i < G * HD; ++i) {
        a.out[at + i] = 0.0f;
        if (a.out_half != nullptr) a.out_half[at + i] = __float2half_rn(0.0f);
      }
    }
  }
  long long total = 0;
  const long long start = BlockExclusiveScan(mine, warp_sums, &total);
  const long long per_block =
      max(static_cast<long long>(min_keys), (total + gridDim.x - 1) / gridDim.x);
  const long long begin = static_cast<long long>(blockIdx.x) * per_block;
  const long long end = min(total, begin + per_block);
  if (start <= begin && begin < start + mine) {
    long long p0 = start;
    for (int p = lo; p < hi; ++p) {
      const long long p1 = p0 + cost(VisibleRange(a, p).n_keys);
      if (begin < p1) {
        plan_first_pair = p;
        plan_first_start = p0;
        break;
      }
      p0 = p1;
    }
  }
  __syncthreads();
  if (begin >= end) return;

  long long p1 = plan_first_start;  // where the next pair's cost starts
  for (int p = plan_first_pair; p < n_pairs && p1 < end; ++p) {
    const Range r = VisibleRange(a, p);
    if (r.n_keys == 0) continue;
    const long long p0 = p1 + pair_keys;
    p1 = p0 + r.n_keys;
    if (p0 >= end) break;
    PairPart part;
    part.r = r;
    part.k0 = static_cast<int>(max(begin, p0) - p0);
    part.k1 = static_cast<int>(min(end, p1) - p0);
    part.t_begin = a.table_begin[p];
    part.t_len = a.table_len[p];
    part.q = a.q + pair_offset(p);
    if constexpr (kTensor) {
      TensorSplit<HD, G>(a, pool, part, st, stages, reinterpret_cast<uint4*>(smem),
                         reinterpret_cast<int*>(smem + kWarps * stages * TensorStageBytes(HD)));
    } else {
      ScalarSplit<HD, G>(a, pool, part, st);
    }
    __syncthreads();
    const int first_block = static_cast<int>(p0 / per_block);
    const int n_parts = static_cast<int>((p1 - 1) / per_block) - first_block + 1;
    FinishPair<HD, G>(st, w, a.out + pair_offset(p),
                      a.out_half != nullptr ? a.out_half + pair_offset(p) : nullptr, p,
                      static_cast<int>(blockIdx.x) + p, first_block, n_parts);
    __syncthreads();  // the split area, the states and FinishPair's shared are reused
  }
}

using KernelFn = void (*)(DecodeAttentionArgs, DevicePool, Workspace, int, int, int);

template <int HD, bool kTensor>
KernelFn KernelFor(int group) {
  switch (group) {
    case 1:
      return DecodeKernel<HD, 1, kTensor>;
    case 2:
      return DecodeKernel<HD, 2, kTensor>;
    case 3:
      return DecodeKernel<HD, 3, kTensor>;
    case 4:
      return DecodeKernel<HD, 4, kTensor>;
    case 6:
      return DecodeKernel<HD, 6, kTensor>;
    case 8:
      return DecodeKernel<HD, 8, kTensor>;
    default:
      return nullptr;
  }
}

KernelFn KernelFor(int head_dim, int group, bool tensor) {
  if (head_dim == 64) return tensor ? KernelFor<64, true>(group) : KernelFor<64, false>(group);
  if (head_dim == 128) return tensor ? KernelFor<128, true>(group) : KernelFor<128, false>(group);
  return nullptr;
}

}  // namespace

bool DecodeAttentionSupports(int head_dim, int group) {
  return KernelFor(head_dim, group, false) != nullptr;
}

cudaError_t GetDecodeAttentionConfig(int head_dim, int group, int max_pairs,
                                     DecodeAttentionConfig* cfg, DecodeAttentionVariant variant,
                                     int stages) {
  const bool tensor =
      variant == DecodeAttentionVariant::kTensorCores ||
      (variant == DecodeAttentionVariant::kDefault && group >= kTensorCoresFromGroup);
  if (stages == 0) stages = kDefaultStages;
  const KernelFn fn = KernelFor(head_dim, group, tensor);
  if (fn == nullptr || max_pairs <= 0 || stages < 2 || stages > kMaxStages) {
    return cudaErrorInvalidValue;
  }
  int device = 0, sms = 0, optin = 0, per_sm = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e == cudaSuccess) {
    e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  if (e != cudaSuccess) return e;
  const int64_t shared = SharedBytes(head_dim, group, tensor, stages);
  if (shared > optin) return cudaErrorInvalidValue;
  e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(shared));
  if (e == cudaSuccess) {
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, kThreads,
                                                      static_cast<size_t>(shared));
  }
  if (e != cudaSuccess) return e;
  DecodeAttentionConfig c;
  c.head_dim = head_dim;
  c.group = group;
  c.max_pairs = max_pairs;
  c.tensor_cores = tensor;
  c.stages = tensor ? stages : 0;
  c.grid = std::max(1, sms * std::max(per_sm, 1));
  c.min_keys_per_block = kMinKeysPerBlock;
  c.pair_start_keys = static_cast<int>(kPairStartBytes / (int64_t{4} * head_dim));
  c.shared_bytes = shared;
  Carve(nullptr, c, &c.workspace_bytes);
  *cfg = c;
  return cudaSuccess;
}

cudaError_t InitDecodeAttentionWorkspace(const DecodeAttentionConfig& cfg, void* workspace,
                                         cudaStream_t stream) {
  return cudaMemsetAsync(workspace, 0, static_cast<size_t>(cfg.workspace_bytes), stream);
}

cudaError_t LaunchDecodeAttention(const DecodeAttentionArgs& a, const DevicePool& pool,
                                  const DecodeAttentionConfig& cfg, void* workspace,
                                  cudaStream_t stream) {
  if (a.n_kv_heads <= 0 || a.n_heads % a.n_kv_heads != 0 || pool.head_dim != cfg.head_dim ||
      a.n_heads / a.n_kv_heads != cfg.group || pool.block_size <= 0 || a.n_seqs < 0 ||
      cfg.min_keys_per_block <= 0 || cfg.pair_start_keys < 0 ||
      (cfg.tensor_cores && (cfg.stages < 2 || cfg.stages > kMaxStages))) {
    return cudaErrorInvalidValue;
  }
  const int64_t n_pairs = static_cast<int64_t>(a.n_seqs) * a.n_kv_heads;
  if (n_pairs == 0) return cudaSuccess;
  if (n_pairs > cfg.max_pairs) return cudaErrorInvalidValue;
  const KernelFn fn = KernelFor(cfg.head_dim, cfg.group, cfg.tensor_cores);
  if (fn == nullptr) return cudaErrorInvalidValue;
  int64_t bytes = 0;
  const Workspace w = Carve(workspace, cfg, &bytes);
  return LaunchDependent(fn, cfg.grid, kThreads, static_cast<size_t>(cfg.shared_bytes), stream, a,
                         pool, w, cfg.min_keys_per_block, cfg.stages, cfg.pair_start_keys);
}

}  // namespace moa::cuda
