// Launchers of the CUDA backend's kernels (kernels/cuda/cuda_kernels.cu). Plain functions over
// device pointers: the .cu files build as C++17 (nvcc under CMake 3.25), the backend that calls
// them (cuda_backend.cc) as C++20. Each launcher only enqueues work on `stream` and returns the
// launch error; shapes were checked by the caller.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace moa::cuda {

// dst[i] = half(src[i]) for n floats.
cudaError_t LaunchFloatToHalf(const float* src, int64_t n, void* dst, cudaStream_t stream);

// out[i, :] = float(table[tokens[i], :]); table is fp16 [*, cols].
cudaError_t LaunchEmbed(const void* table, int64_t cols, const int32_t* tokens, int64_t rows,
                        float* out, cudaStream_t stream);

// out = s / rms(s) * weight row by row, where s = x, or s = x + y written to x_sum (the residual
// add before a norm; x_sum may be x) where y is set; x, y, x_sum, out [rows, cols], weight fp32
// [cols]. Where out_half is set, half(out) goes there too (fp16 [rows, cols]: the next MatMuls'
// input, which then needs no conversion of its own).
cudaError_t LaunchRmsNorm(const float* x, const float* y, float* x_sum, const float* weight,
                          int64_t rows, int64_t cols, float eps, float* out, void* out_half,
                          cudaStream_t stream);

// Rotates the pairs of every head of x [rows, x_heads * head_dim] and, where y_heads > 0, of y
// [rows, y_heads * head_dim] in place (q and k in one launch). Pair i of a head is (i * step,
// i * step + partner); row r is at positions[r]; inv_freq has head_dim / 2 entries.
cudaError_t LaunchRope(float* x, int x_heads, float* y, int y_heads, int64_t rows, int head_dim,
                       const float* inv_freq, const int32_t* positions, int step, int partner,
                       cudaStream_t stream);

// out = silu(gate) * up over n floats; half(out) to out_half too where set.
cudaError_t LaunchSwiGlu(const float* gate, const float* up, int64_t n, float* out, void* out_half,
                         cudaStream_t stream);

// x += y over n floats.
cudaError_t LaunchAdd(float* x, const float* y, int64_t n, cudaStream_t stream);

// The KV pool in fp16 (half the bytes decode attention streams, at ~3 significant digits per
// key and value): all key blocks [num_blocks, block_size, head_dim], then all value blocks.
struct DevicePool {
  __half* data;
  int32_t num_blocks;
  int32_t block_size;
  int head_dim;
};

// What LaunchKvWrite needs, in device memory. A "table" is one (sequence, KV head) block table:
// entries table_data[table_begin[t] .. table_begin[t] + table_len[t]), t = seq * n_kv_heads + h.
struct DeviceAttention {
  const float* k;  // [rows, n_kv_heads * head_dim]
  const float* v;
  int64_t rows;
  int n_kv_heads;
  const int32_t* row_pos;  // [rows] position of each row
  const int32_t* row_seq;  // [rows] sequence index of each row
  const int64_t* table_begin;
  const int32_t* table_len;
  const int32_t* table_data;
};

// table_data[updates[i].x] = updates[i].y for n (index, value) pairs, in no particular order:
// the backend's block-table cache (kernels/block_table_cache.h) queues one per entry.
cudaError_t LaunchTableUpdates(int32_t* table_data, const uint2* updates, int64_t n,
                               cudaStream_t stream);

// Copies each row's keys and values, rounded to fp16, into the pool blocks of its position.
cudaError_t LaunchKvWrite(const DeviceAttention& a, const DevicePool& pool, cudaStream_t stream);

struct PrefillAttentionArgs;  // kernels/cuda/prefill_attention.h

// The general attention kernel, for any head_dim up to 256 and any GQA group: one thread block
// per (new row, KV head), all query heads of the group together, online softmax over the
// visible keys that the pair's span rule gives. Takes the prefill kernel's arguments, so that a
// caller can send any sequence, prefill or decode, to either. Dynamic shared memory must fit
// (see AttentionSharedBytes).
cudaError_t LaunchAttention(const PrefillAttentionArgs& a, const DevicePool& pool,
                            cudaStream_t stream);

// Shared memory the attention kernel needs for a group of `group` query heads of head_dim.
int64_t AttentionSharedBytes(int group, int head_dim);

}  // namespace moa::cuda
