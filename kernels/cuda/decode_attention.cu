// Split-KV decode attention (see decode_attention.h). Three kernels on one stream:
//   plan:  one block sums the visible keys of every pair, picks one chunk size so that the work
//          comes in about cfg.target_items equal chunks, and lays the chunks out pair by pair;
//   split: a persistent grid whose warps take chunks in turn; a warp streams its keys and values
//          once with 16-byte loads for all query heads of the group (online softmax in base 2);
//   merge: for pairs cut into several chunks, combines the chunks' (max, sum, output).
// A pair with a single chunk is finished by the split kernel itself.
#include <algorithm>
#include <cmath>

#include "kernels/cuda/decode_attention.h"

namespace moa::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kPlanThreads = 1024;
constexpr int kMergeThreads = 256;
// Fewer keys than this per chunk would spend more on partial results than on keys.
constexpr int kMinChunk = 32;
// Chunks per resident warp the plan aims for: enough that uneven tails even out.
constexpr int kItemsPerWarp = 4;
constexpr float kLog2e = 1.4426950408889634f;

struct Workspace {
  int32_t* meta;        // [0] chunk size in keys, [1] number of chunks
  int32_t* item_start;  // [max_pairs + 1] first chunk of each pair
  float* o_part;        // [max_items, group, head_dim] unnormalised outputs
  float* m_part;        // [max_items, group] running max (base-2 scores)
  float* l_part;        // [max_items, group] sum of exponentials
};

int64_t AlignUp(int64_t n) { return (n + 15) / 16 * 16; }

int64_t MaxItems(const DecodeAttentionConfig& c) {
  return static_cast<int64_t>(c.target_items) + c.max_pairs;
}

Workspace Carve(void* base, const DecodeAttentionConfig& c, int64_t* bytes) {
  char* p = static_cast<char*>(base);
  Workspace w{};
  int64_t off = 0;
  const auto take = [&](int64_t n) {
    char* at = p == nullptr ? nullptr : p + off;
    off += AlignUp(n);
    return at;
  };
  const int64_t items = MaxItems(c);
  w.meta = reinterpret_cast<int32_t*>(take(4 * sizeof(int32_t)));
  w.item_start = reinterpret_cast<int32_t*>(take((c.max_pairs + 1) * sizeof(int32_t)));
  w.o_part = reinterpret_cast<float*>(take(items * c.group * c.head_dim * sizeof(float)));
  w.m_part = reinterpret_cast<float*>(take(items * c.group * sizeof(float)));
  w.l_part = reinterpret_cast<float*>(take(items * c.group * sizeof(float)));
  *bytes = off;
  return w;
}

struct Range {
  int32_t sink_end;   // keys [0, sink_end)
  int32_t win_begin;  // then keys [win_begin, len)
  int32_t n_keys;
};

__device__ Range VisibleRange(const DecodeAttentionArgs& a, int p) {
  const int32_t len = max(a.seq_len[p / a.n_kv_heads], 0);
  const int32_t se = min(max(a.sink_end[p], 0), len);
  const int32_t wb = min(max(a.win_begin[p], se), len);
  return {se, wb, se + (len - wb)};
}

__global__ void PlanKernel(DecodeAttentionArgs a, int target_items, int32_t* meta,
                           int32_t* item_start) {
  __shared__ long long scan[kPlanThreads];
  const int n_pairs = a.n_seqs * a.n_kv_heads;
  const int per = (n_pairs + kPlanThreads - 1) / kPlanThreads;
  const int lo = min(static_cast<int>(threadIdx.x) * per, n_pairs), hi = min(lo + per, n_pairs);

  long long keys = 0;
  for (int p = lo; p < hi; ++p) keys += VisibleRange(a, p).n_keys;
  scan[threadIdx.x] = keys;
  __syncthreads();
  for (int s = kPlanThreads / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.x) < s) scan[threadIdx.x] += scan[threadIdx.x + s];
    __syncthreads();
  }
  const long long total = scan[0];
  __syncthreads();
  const long long want = (total + target_items - 1) / target_items;
  const int chunk = static_cast<int>(max(static_cast<long long>(kMinChunk), want));

  // Chunks per pair (at least one, so that every output is written), then an exclusive scan.
  long long count = 0;
  for (int p = lo; p < hi; ++p) count += max(1, (VisibleRange(a, p).n_keys + chunk - 1) / chunk);
  scan[threadIdx.x] = count;
  __syncthreads();
  for (int s = 1; s < kPlanThreads; s *= 2) {
    const long long add = static_cast<int>(threadIdx.x) >= s ? scan[threadIdx.x - s] : 0;
    __syncthreads();
    scan[threadIdx.x] += add;
    __syncthreads();
  }
  // Bounded by target_items + n_pairs (see MaxItems): fits the workspace and int32.
  long long start = scan[threadIdx.x] - count;
  for (int p = lo; p < hi; ++p) {
    item_start[p] = static_cast<int32_t>(start);
    start += max(1, (VisibleRange(a, p).n_keys + chunk - 1) / chunk);
  }
  if (threadIdx.x == kPlanThreads - 1) {
    item_start[n_pairs] = static_cast<int32_t>(scan[threadIdx.x]);
    meta[0] = chunk;
    meta[1] = static_cast<int32_t>(scan[threadIdx.x]);
  }
}

__device__ float4 Scale(float4 v, float f) {
  return make_float4(v.x * f, v.y * f, v.z * f, v.w * f);
}
__device__ float Dot(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }
__device__ float4 Fma(float f, float4 v, float4 acc) {
  return make_float4(fmaf(f, v.x, acc.x), fmaf(f, v.y, acc.y), fmaf(f, v.z, acc.z),
                     fmaf(f, v.w, acc.w));
}
__device__ float4 ShflXor(float4 v, int o) {
  return make_float4(__shfl_xor_sync(0xffffffffu, v.x, o), __shfl_xor_sync(0xffffffffu, v.y, o),
                     __shfl_xor_sync(0xffffffffu, v.z, o), __shfl_xor_sync(0xffffffffu, v.w, o));
}

// HD / 4 lanes hold one key (or value) row as one float4 each; a warp holds 32 / (HD / 4) rows at
// once and loads U such row sets before using any, so that several loads are in flight.
template <int HD, int G>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    SplitKernel(DecodeAttentionArgs a, DevicePool pool, Workspace w) {
  constexpr int kLanesPerKey = HD / 4;
  constexpr int kKeysPerPass = 32 / kLanesPerKey;
  constexpr int U = G > 4 ? 2 : 4;
  static_assert(kLanesPerKey <= 32 && 32 % kLanesPerKey == 0, "head_dim must be 64 or 128");

  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int sub = lane / kLanesPerKey;      // which row of a pass
  const int col = lane % kLanesPerKey * 4;  // first element of this lane's float4
  const int n_pairs = a.n_seqs * a.n_kv_heads;
  const int chunk = w.meta[0], n_items = w.meta[1];
  const int64_t value_offset = static_cast<int64_t>(pool.num_blocks) * pool.block_size * HD;
  const int64_t q_cols = static_cast<int64_t>(a.n_heads) * HD;
  const int warps = gridDim.x * kWarpsPerBlock;

  for (int item = blockIdx.x * kWarpsPerBlock + static_cast<int>(threadIdx.x) / 32; item < n_items;
       item += warps) {
    int lo = 0, hi = n_pairs - 1;  // last pair whose first chunk is <= item
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (w.item_start[mid] <= item) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const int p = lo;
    const int first = w.item_start[p], n_chunks = w.item_start[p + 1] - first;
    const Range r = VisibleRange(a, p);
    const int k0 = (item - first) * chunk, k1 = min(r.n_keys, k0 + chunk);
    const int s = p / a.n_kv_heads, h = p % a.n_kv_heads;
    const int64_t t_begin = a.table_begin[p];
    const int32_t t_len = a.table_len[p];

    const float* qrow = a.q + s * q_cols + static_cast<int64_t>(h) * G * HD + col;
    float4 qv[G], acc[G];
    float m[G], l[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      qv[g] = Scale(__ldg(reinterpret_cast<const float4*>(qrow + g * HD)), a.scale * kLog2e);
      acc[g] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      m[g] = -INFINITY;
      l[g] = 0.0f;
    }

    for (int base = k0; base < k1; base += U * kKeysPerPass) {
      float4 kr[U], vr[U];
      bool ok[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + u * kKeysPerPass + sub;
        const int kp = i < r.sink_end ? i : r.win_begin + (i - r.sink_end);
        const int b = kp / pool.block_size;
        const int32_t id = i < k1 && b < t_len ? a.table_data[t_begin + b] : -1;
        ok[u] = id >= 0 && id < pool.num_blocks;
        kr[u] = vr[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (ok[u]) {
          const float* key =
              pool.data + (static_cast<int64_t>(id) * pool.block_size + kp % pool.block_size) * HD +
              col;
          kr[u] = __ldg(reinterpret_cast<const float4*>(key));
          vr[u] = __ldg(reinterpret_cast<const float4*>(key + value_offset));
        }
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float sc[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          float d = Dot(qv[g], kr[u]);
#pragma unroll
          for (int o = kLanesPerKey / 2; o > 0; o /= 2) d += __shfl_xor_sync(0xffffffffu, d, o);
          sc[u] = ok[u] ? d : -INFINITY;
        }
        float mx = m[g];
#pragma unroll
        for (int u = 0; u < U; ++u) mx = fmaxf(mx, sc[u]);
        if (mx == -INFINITY) continue;  // no visible key yet in this row set
        const float corr = exp2f(m[g] - mx);
        l[g] *= corr;
        acc[g] = Scale(acc[g], corr);
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const float e = exp2f(sc[u] - mx);
          l[g] += e;
          acc[g] = Fma(e, vr[u], acc[g]);
        }
        m[g] = mx;
      }
    }

    // Rows of one pass ran separate softmaxes: fold them into the lanes of row 0.
#pragma unroll
    for (int o = kLanesPerKey; o < 32; o *= 2) {
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m[g], o);
        const float l2 = __shfl_xor_sync(0xffffffffu, l[g], o);
        const float4 a2 = ShflXor(acc[g], o);
        const float mx = fmaxf(m[g], m2);
        if (mx == -INFINITY) continue;
        const float f1 = exp2f(m[g] - mx), f2 = exp2f(m2 - mx);
        l[g] = l[g] * f1 + l2 * f2;
        acc[g] = Fma(f2, a2, Scale(acc[g], f1));
        m[g] = mx;
      }
    }
    if (sub != 0) continue;

#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (n_chunks == 1) {
        const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
        *reinterpret_cast<float4*>(a.out + s * q_cols + (static_cast<int64_t>(h) * G + g) * HD +
                                   col) = Scale(acc[g], inv);
      } else {
        const int64_t at = static_cast<int64_t>(item) * G + g;
        *reinterpret_cast<float4*>(w.o_part + at * HD + col) = acc[g];
        if (col == 0) {
          w.m_part[at] = m[g];
          w.l_part[at] = l[g];
        }
      }
    }
  }
}

__global__ void MergeKernel(DecodeAttentionArgs a, int head_dim, Workspace w) {
  const int p = blockIdx.x;
  const int first = w.item_start[p], n = w.item_start[p + 1] - first;
  if (n <= 1) return;
  const int group = a.n_heads / a.n_kv_heads;
  const int s = p / a.n_kv_heads, h = p % a.n_kv_heads;
  float* orow = a.out + static_cast<int64_t>(s) * a.n_heads * head_dim +
                static_cast<int64_t>(h) * group * head_dim;
  for (int i = threadIdx.x; i < group * head_dim; i += blockDim.x) {
    const int g = i / head_dim, d = i % head_dim;
    float mx = -INFINITY;
    for (int c = 0; c < n; ++c)
      mx = fmaxf(mx, w.m_part[(static_cast<int64_t>(first) + c) * group + g]);
    float l = 0.0f, o = 0.0f;
    if (mx != -INFINITY) {
      for (int c = 0; c < n; ++c) {
        const int64_t at = (static_cast<int64_t>(first) + c) * group + g;
        const float f = exp2f(w.m_part[at] - mx);
        l += w.l_part[at] * f;
        o += w.o_part[at * head_dim + d] * f;
      }
    }
    orow[i] = l > 0.0f ? o / l : 0.0f;
  }
}

using SplitFn = void (*)(DecodeAttentionArgs, DevicePool, Workspace);

template <int HD>
SplitFn SplitFor(int group) {
  switch (group) {
    case 1:
      return SplitKernel<HD, 1>;
    case 2:
      return SplitKernel<HD, 2>;
    case 3:
      return SplitKernel<HD, 3>;
    case 4:
      return SplitKernel<HD, 4>;
    case 6:
      return SplitKernel<HD, 6>;
    case 8:
      return SplitKernel<HD, 8>;
    default:
      return nullptr;
  }
}

SplitFn SplitFor(int head_dim, int group) {
  if (head_dim == 64) return SplitFor<64>(group);
  if (head_dim == 128) return SplitFor<128>(group);
  return nullptr;
}

}  // namespace

bool DecodeAttentionSupports(int head_dim, int group) {
  return SplitFor(head_dim, group) != nullptr;
}

cudaError_t GetDecodeAttentionConfig(int head_dim, int group, int max_pairs,
                                     DecodeAttentionConfig* cfg) {
  const SplitFn fn = SplitFor(head_dim, group);
  if (fn == nullptr || max_pairs <= 0) return cudaErrorInvalidValue;
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e == cudaSuccess) {
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, 32 * kWarpsPerBlock, 0);
  }
  if (e != cudaSuccess) return e;
  DecodeAttentionConfig c;
  c.head_dim = head_dim;
  c.group = group;
  c.max_pairs = max_pairs;
  c.grid = std::max(1, sms * std::max(per_sm, 1));
  c.target_items = c.grid * kWarpsPerBlock * kItemsPerWarp;
  Carve(nullptr, c, &c.workspace_bytes);
  *cfg = c;
  return cudaSuccess;
}

cudaError_t LaunchDecodeAttention(const DecodeAttentionArgs& a, const DevicePool& pool,
                                  const DecodeAttentionConfig& cfg, void* workspace,
                                  cudaStream_t stream) {
  if (a.n_kv_heads <= 0 || a.n_heads % a.n_kv_heads != 0 || pool.head_dim != cfg.head_dim ||
      a.n_heads / a.n_kv_heads != cfg.group || pool.block_size <= 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t n_pairs = static_cast<int64_t>(a.n_seqs) * a.n_kv_heads;
  if (n_pairs == 0) return cudaSuccess;
  if (n_pairs > cfg.max_pairs) return cudaErrorInvalidValue;
  int64_t bytes = 0;
  const Workspace w = Carve(workspace, cfg, &bytes);
  PlanKernel<<<1, kPlanThreads, 0, stream>>>(a, cfg.target_items, w.meta, w.item_start);
  SplitFor(cfg.head_dim, cfg.group)<<<cfg.grid, 32 * kWarpsPerBlock, 0, stream>>>(a, pool, w);
  MergeKernel<<<static_cast<unsigned>(n_pairs), kMergeThreads, 0, stream>>>(a, cfg.head_dim, w);
  return cudaGetLastError();
}

}  // namespace moa::cuda
