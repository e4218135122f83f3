// The CUDA backend's kernels. Written for correctness first and checked against the CPU backend
// (tests/gpu/cuda_backend_gpu_test.cc); the arithmetic follows kernels/cpu/cpu_backend.cc.
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/grid.h"
#include "kernels/cuda/prefill_attention.h"
#include "kernels/cuda/span_rule.cuh"

namespace moa::cuda {
namespace {

// The kernels of a decode step are launched with LaunchDependent and so begin with
// WaitForPriorGrid (kernels/cuda/dependent_launch.cuh).

__device__ int64_t GlobalIndex() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ int64_t GlobalStride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

__global__ void FloatToHalfKernel(const float* src, int64_t n, __half* dst) {
  WaitForPriorGrid();
  for (int64_t i = GlobalIndex(); i < n; i += GlobalStride()) dst[i] = __float2half_rn(src[i]);
}

__global__ void EmbedKernel(const __half* table, int64_t cols, const int32_t* tokens, int64_t n,
                            float* out) {
  for (int64_t i = GlobalIndex(); i < n; i += GlobalStride()) {
    const int64_t r = i / cols, c = i % cols;
    out[i] = __half2float(table[static_cast<int64_t>(tokens[r]) * cols + c]);
  }
}

// RMSNorm, one block of kNormThreads per row. The sum of squares is reduced by warp shuffles, then
// across the warps in shared memory (two barriers, where a tree over the threads had eight).
constexpr int kNormThreads = 256;
// Rows of up to 4 x kNormThreads x kNormMaxVec floats (8192), a multiple of 4, are read once into
// registers as float4s (all loads of a thread in flight at once): a decode batch has few rows, so
// each block's chain of memory round trips is what the norm costs.
constexpr int kNormMaxVec = 8;

// Four floats as four fp16 values (8 bytes), each rounded to nearest.
__device__ uint2 HalfBits4(float4 v) {
  const __half2 lo = __floats2half2_rn(v.x, v.y), hi = __floats2half2_rn(v.z, v.w);
  return make_uint2(*reinterpret_cast<const uint32_t*>(&lo),
                    *reinterpret_cast<const uint32_t*>(&hi));
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

__device__ float NormBlockSum(float v) {
  __shared__ float warp_sums[kNormThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  float s = 0.0f;
#pragma unroll
  for (int w = 0; w < kNormThreads / 32; ++w) s += warp_sums[w];
  return s;
}

template <int V>
__global__ void __launch_bounds__(kNormThreads)
    RmsNormVecKernel(const float* x, const float* y, float* x_sum, const float* w, int64_t cols,
                     float eps, float* out, __half* out_half) {
  WaitForPriorGrid();
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cols;
  const int n4 = static_cast<int>(cols / 4);
  const float4* x4 = reinterpret_cast<const float4*>(x + base);
  float4 v[V];
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int i = static_cast<int>(threadIdx.x) + j * kNormThreads;
    v[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (i < n4) {
      v[j] = x4[i];
      if (y != nullptr) {
        const float4 b = reinterpret_cast<const float4*>(y + base)[i];
        v[j] = make_float4(v[j].x + b.x, v[j].y + b.y, v[j].z + b.z, v[j].w + b.w);
        reinterpret_cast<float4*>(x_sum + base)[i] = v[j];
      }
    }
    ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
  }
  // The weights before the block's reduction: their loads are then no round trip of their own.
  float4 g[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int i = static_cast<int>(threadIdx.x) + j * kNormThreads;
    if (i < n4) g[j] = reinterpret_cast<const float4*>(w)[i];
  }
  const float inv = rsqrtf(NormBlockSum(ss) / static_cast<float>(cols) + eps);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int i = static_cast<int>(threadIdx.x) + j * kNormThreads;
    if (i >= n4) break;
    const float4 o = make_float4(v[j].x * inv * g[j].x, v[j].y * inv * g[j].y,
                                 v[j].z * inv * g[j].z, v[j].w * inv * g[j].w);
    reinterpret_cast<float4*>(out + base)[i] = o;
    if (out_half != nullptr) reinterpret_cast<uint2*>(out_half + base)[i] = HalfBits4(o);
  }
}

// Any other row length: two passes over the row (the second reads what this thread wrote).
__global__ void __launch_bounds__(kNormThreads)
    RmsNormKernel(const float* x, const float* y, float* x_sum, const float* w, int64_t cols,
                  float eps, float* out, __half* out_half) {
  WaitForPriorGrid();
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cols;
  const float* in = y != nullptr ? x_sum + base : x + base;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < cols; i += kNormThreads) {
    float s = x[base + i];
    if (y != nullptr) {
      s += y[base + i];
      x_sum[base + i] = s;
    }
    ss += s * s;
  }
  const float inv = rsqrtf(NormBlockSum(ss) / static_cast<float>(cols) + eps);
  for (int64_t i = threadIdx.x; i < cols; i += kNormThreads) {
    const float o = in[i] * inv * w[i];
    out[base + i] = o;
    if (out_half != nullptr) out_half[base + i] = __float2half_rn(o);
  }
}

// x's pairs first, then y's (y may be null, y_heads 0).
__global__ void RopeKernel(float* x, int x_heads, float* y, int y_heads, int64_t rows, int head_dim,
                           const float* inv_freq, const int32_t* positions, int step, int partner) {
  WaitForPriorGrid();
  const int half = head_dim / 2;
  const int64_t nx = rows * x_heads * half;
  const int64_t n = nx + rows * y_heads * half;
  for (int64_t t = GlobalIndex(); t < n; t += GlobalStride()) {
    const bool in_x = t < nx;
    const int64_t u = in_x ? t : t - nx;
    const int n_heads = in_x ? x_heads : y_heads;
    const int i = static_cast<int>(u % half);
    const int64_t rh = u / half;  // row * n_heads + head
    // The angle in float, rounded once, as the CPU computes it (no fused multiply).
    const float angle = __fmul_rn(static_cast<float>(positions[rh / n_heads]), inv_freq[i]);
    float sn, cs;
    sincosf(angle, &sn, &cs);
    float* head = (in_x ? x : y) + rh * head_dim;
    const float a0 = head[i * step], b0 = head[i * step + partner];
    head[i * step] = a0 * cs - b0 * sn;
    head[i * step + partner] = a0 * sn + b0 * cs;
  }
}

__device__ float Silu(float g) { return g / (1.0f + expf(-g)); }

// Four elements a thread, as float4s (n a multiple of 4, all pointers 16-byte aligned).
__global__ void SwiGluVecKernel(const float4* gate, const float4* up, int64_t n4, float4* out,
                                uint2* out_half) {
  WaitForPriorGrid();
  for (int64_t i = GlobalIndex(); i < n4; i += GlobalStride()) {
    const float4 g = gate[i], u = up[i];
    const float4 o =
        make_float4(Silu(g.x) * u.x, Silu(g.y) * u.y, Silu(g.z) * u.z, Silu(g.w) * u.w);
    out[i] = o;
    if (out_half != nullptr) out_half[i] = HalfBits4(o);
  }
}

__global__ void SwiGluKernel(const float* gate, const float* up, int64_t n, float* out,
                             __half* out_half) {
  WaitForPriorGrid();
  for (int64_t i = GlobalIndex(); i < n; i += GlobalStride()) {
    const float o = Silu(gate[i]) * up[i];
    out[i] = o;
    if (out_half != nullptr) out_half[i] = __float2half_rn(o);
  }
}

__global__ void AddKernel(float* x, const float* y, int64_t n) {
  WaitForPriorGrid();
  for (int64_t i = GlobalIndex(); i < n; i += GlobalStride()) x[i] += y[i];
}

__global__ void TableUpdatesKernel(int32_t* table_data, const uint2* updates, int64_t n) {
  for (int64_t i = GlobalIndex(); i < n; i += GlobalStride()) {
    const uint2 u = updates[i];
    table_data[u.x] = static_cast<int32_t>(u.y);
  }
}

// The pool block of position `pos` in table t, or -1 (the host checked every block it uses; this
// only keeps a bad table from reading or writing outside the pool).
template <typename Args>
__device__ int32_t BlockOf(const Args& a, const DevicePool& p, int64_t t, int64_t pos) {
  const int64_t b = pos / p.block_size;
  if (b >= a.table_len[t]) return -1;
  const int32_t id = a.table_data[a.table_begin[t] + b];
  return id >= 0 && id < p.num_blocks ? id : -1;
}

__global__ void KvWriteKernel(DeviceAttention a, DevicePool p) {
  WaitForPriorGrid();
  const int hd = p.head_dim;
  const int64_t n = a.rows * a.n_kv_heads * hd;
  const int64_t value_offset = static_cast<int64_t>(p.num_blocks) * p.block_size * hd;
  for (int64_t i = GlobalIndex(); i < n; i += GlobalStride()) {
    const int d = static_cast<int>(i % hd);
    const int64_t rh = i / hd;
    const int64_t r = rh / a.n_kv_heads;
    const int h = static_cast<int>(rh % a.n_kv_heads);
    const int64_t pos = a.row_pos[r];
    const int32_t id = BlockOf(a, p, static_cast<int64_t>(a.row_seq[r]) * a.n_kv_heads + h, pos);
    if (id < 0) continue;
    __half* key = p.data + (static_cast<int64_t>(id) * p.block_size + pos % p.block_size) * hd + d;
    key[0] = __float2half_rn(a.k[i]);
    key[value_offset] = __float2half_rn(a.v[i]);
  }
}

constexpr int kWarps = 4;
// Key and value elements per lane held in registers: head_dim <= 32 * kMaxPerLane.
constexpr int kMaxPerLane = 8;

__device__ float WarpSum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block (pair, new row): blockIdx.x is the pair s * n_kv_heads + h, rows blockIdx.y, + gridDim.y,
// ... of sequence s. Each warp runs an online softmax over every kWarps-th visible key for all
// query heads of the group; the warps' partial results are merged at the end.
__global__ void AttentionKernel(PrefillAttentionArgs a, DevicePool p) {
  extern __shared__ float smem[];
  const int hd = p.head_dim;
  const int group = a.n_heads / a.n_kv_heads;
  const int64_t t = blockIdx.x;
  const int seq = static_cast<int>(t / a.n_kv_heads);
  const int h = static_cast<int>(t % a.n_kv_heads);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  float* q_s = smem;                       // [group][hd]
  float* acc = q_s + group * hd;           // [kWarps][group][hd]
  float* m_s = acc + kWarps * group * hd;  // [kWarps][group]
  float* l_s = m_s + kWarps * group;       // [kWarps][group]
  const int64_t q_cols = static_cast<int64_t>(a.n_heads) * hd;
  const int64_t value_offset = static_cast<int64_t>(p.num_blocks) * p.block_size * hd;
  const DeviceSpanRule rule = a.rules[t];

  for (int i_new = blockIdx.y; i_new < a.n_new[seq]; i_new += gridDim.y) {
    const int64_t r = static_cast<int64_t>(a.q_row[seq]) + i_new;
    const float* qrow = a.q + r * q_cols + static_cast<int64_t>(h) * group * hd;
    for (int i = threadIdx.x; i < group * hd; i += blockDim.x) {
      q_s[i] = qrow[i];
      for (int w = 0; w < kWarps; ++w) acc[w * group * hd + i] = 0.0f;
    }
    for (int i = threadIdx.x; i < kWarps * group; i += blockDim.x) {
      m_s[i] = -INFINITY;
      l_s[i] = 0.0f;
    }
    __syncthreads();

    const int64_t pos = static_cast<int64_t>(a.past[seq]) + i_new;
    int64_t sink_end = 0, win_begin = 0;
    VisibleKeys(rule, a.sink, pos, &sink_end, &win_begin);
    const int64_t n_keys = sink_end + (pos + 1 - win_begin);
    float* my_acc = acc + warp * group * hd;
    for (int64_t i = warp; i < n_keys; i += kWarps) {
      const int64_t kp = i < sink_end ? i : win_begin + (i - sink_end);
      const int32_t id = BlockOf(a, p, t, kp);
      if (id < 0) continue;
      const __half* key =
          p.data + (static_cast<int64_t>(id) * p.block_size + kp % p.block_size) * hd;
      float kr[kMaxPerLane], vr[kMaxPerLane];
#pragma unroll
      for (int j = 0; j < kMaxPerLane; ++j) {
        const int d = lane + 32 * j;
        kr[j] = d < hd ? __half2float(key[d]) : 0.0f;
        vr[j] = d < hd ? __half2float(key[value_offset + d]) : 0.0f;
      }
      for (int g = 0; g < group; ++g) {
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < kMaxPerLane; ++j) {
          const int d = lane + 32 * j;
          if (d < hd) dot += q_s[g * hd + d] * kr[j];
        }
        const float s = WarpSum(dot) * a.scale;
        const float m_old = m_s[warp * group + g];
        const float m_new = fmaxf(m_old, s);
        const float corr = expf(m_old - m_new);
        const float e = expf(s - m_new);
#pragma unroll
        for (int j = 0; j < kMaxPerLane; ++j) {
          const int d = lane + 32 * j;
          if (d < hd) my_acc[g * hd + d] = my_acc[g * hd + d] * corr + e * vr[j];
        }
        __syncwarp();
        if (lane == 0) {
          m_s[warp * group + g] = m_new;
          l_s[warp * group + g] = l_s[warp * group + g] * corr + e;
        }
        __syncwarp();
      }
    }
    __syncthreads();

    float* orow = a.out + r * q_cols + static_cast<int64_t>(h) * group * hd;
    for (int i = threadIdx.x; i < group * hd; i += blockDim.x) {
      const int g = i / hd;
      float m = -INFINITY;
      for (int w = 0; w < kWarps; ++w) m = fmaxf(m, m_s[w * group + g]);
      float l = 0.0f, o = 0.0f;
      for (int w = 0; w < kWarps; ++w) {
        const float f = m_s[w * group + g] == -INFINITY ? 0.0f : expf(m_s[w * group + g] - m);
        l += l_s[w * group + g] * f;
        o += acc[w * group * hd + i] * f;
      }
      orow[i] = o / l;
    }
    __syncthreads();  // q_s, acc, m_s and l_s are reset for the next row
  }
}

}  // namespace

cudaError_t LaunchFloatToHalf(const float* src, int64_t n, void* dst, cudaStream_t stream) {
  return LaunchDependent(FloatToHalfKernel, GridFor(n), kThreads, 0, stream, src, n,
                         static_cast<__half*>(dst));
}

cudaError_t LaunchEmbed(const void* table, int64_t cols, const int32_t* tokens, int64_t rows,
                        float* out, cudaStream_t stream) {
  const int64_t n = rows * cols;
  EmbedKernel<<<GridFor(n), kThreads, 0, stream>>>(static_cast<const __half*>(table), cols, tokens,
                                                   n, out);
  return cudaGetLastError();
}

cudaError_t LaunchRmsNorm(const float* x, const float* y, float* x_sum, const float* weight,
                          int64_t rows, int64_t cols, float eps, float* out, void* out_half,
                          cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const auto grid = static_cast<unsigned>(rows);
  __half* h = static_cast<__half*>(out_half);
  const int64_t vecs = (cols / 4 + kNormThreads - 1) / kNormThreads;  // float4s per thread
  const bool vec = cols % 4 == 0 && vecs <= kNormMaxVec && Aligned16(x) && Aligned16(y) &&
                   Aligned16(x_sum) && Aligned16(weight) && Aligned16(out) && Aligned16(out_half);
  const auto kernel = !vec        ? RmsNormKernel
                      : vecs <= 1 ? RmsNormVecKernel<1>
                      : vecs <= 2 ? RmsNormVecKernel<2>
                      : vecs <= 4 ? RmsNormVecKernel<4>
                                  : RmsNormVecKernel<8>;
  return LaunchDependent(kernel, grid, kNormThreads, 0, stream, x, y, x_sum, weight, cols, eps, out,
                         h);
}

cudaError_t LaunchRope(float* x, int x_heads, float* y, int y_heads, int64_t rows, int head_dim,
                       const float* inv_freq, const int32_t* positions, int step, int partner,
                       cudaStream_t stream) {
  const int64_t n = rows * (int64_t{x_heads} + y_heads) * (head_dim / 2);
  return LaunchDependent(RopeKernel, GridFor(n), kThreads, 0, stream, x, x_heads, y, y_heads, rows,
                         head_dim, inv_freq, positions, step, partner);
}

cudaError_t LaunchSwiGlu(const float* gate, const float* up, int64_t n, float* out, void* out_half,
                         cudaStream_t stream) {
  if (n % 4 == 0 && Aligned16(gate) && Aligned16(up) && Aligned16(out) && Aligned16(out_half)) {
    return LaunchDependent(SwiGluVecKernel, GridFor(n / 4), kThreads, 0, stream,
                           reinterpret_cast<const float4*>(gate),
                           reinterpret_cast<const float4*>(up), n / 4,
                           reinterpret_cast<float4*>(out), static_cast<uint2*>(out_half));
  }
  return LaunchDependent(SwiGluKernel, GridFor(n), kThreads, 0, stream, gate, up, n, out,
                         static_cast<__half*>(out_half));
}

cudaError_t LaunchAdd(float* x, const float* y, int64_t n, cudaStream_t stream) {
  return LaunchDependent(AddKernel, GridFor(n), kThreads, 0, stream, x, y, n);
}

cudaError_t LaunchKvWrite(const DeviceAttention& a, const DevicePool& pool, cudaStream_t stream) {
  const int64_t n = a.rows * a.n_kv_heads * pool.head_dim;
  return LaunchDependent(KvWriteKernel, GridFor(n), kThreads, 0, stream, a, pool);
}

cudaError_t LaunchTableUpdates(int32_t* table_data, const uint2* updates, int64_t n,
                               cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  TableUpdatesKernel<<<GridFor(n), kThreads, 0, stream>>>(table_data, updates, n);
  return cudaGetLastError();
}

int64_t AttentionSharedBytes(int group, int head_dim) {
  return static_cast<int64_t>(sizeof(float)) *
         ((1 + kWarps) * static_cast<int64_t>(group) * head_dim + 2 * kWarps * group);
}

cudaError_t LaunchAttention(const PrefillAttentionArgs& a, const DevicePool& pool,
                            cudaStream_t stream) {
  if (pool.head_dim > 32 * kMaxPerLane || a.n_kv_heads <= 0 || a.n_heads % a.n_kv_heads != 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t pairs = static_cast<int64_t>(a.n_seqs) * a.n_kv_heads;
  if (pairs == 0 || a.max_n_new <= 0) return cudaSuccess;
  if (pairs > 0x7fffffff) return cudaErrorInvalidConfiguration;
  // Rows past 65535 of a sequence loop in the kernel (gridDim.y's limit).
  const dim3 grid(static_cast<unsigned>(pairs),
                  static_cast<unsigned>(std::min(a.max_n_new, 65535)));
  const int64_t bytes = AttentionSharedBytes(a.n_heads / a.n_kv_heads, pool.head_dim);
  if (bytes > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(
        AttentionKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (e != cudaSuccess) return e;
  }
  AttentionKernel<<<grid, 32 * kWarps, bytes, stream>>>(a, pool);
  return cudaGetLastError();
}

}  // namespace moa::cuda
