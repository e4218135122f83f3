// Split-KV decode attention over the paged KV pool: one new token per sequence, every
// (sequence, KV head) with its own length and sink + window. Built as C++17 (.cu) like
// cuda_kernels.h; the caller (the CUDA backend, tests, the benchmark) checks shapes.
//
// Why split-KV: one thread block per (sequence, head) leaves most SMs idle at small batch and
// lets one long head hold up the step while short ones are long done. Here the visible keys of
// every (sequence, KV head) pair are cut into chunks of one size chosen on the device from the
// total visible length (so the plan needs no host round trip and a fixed grid can be replayed
// from a CUDA graph), each chunk is one warp's work item, all query heads of the GQA group share
// each key and value read, and a merge kernel combines the chunks of a pair by log-sum-exp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/cuda_kernels.h"

namespace moa::cuda {

struct DecodeAttentionArgs {
  const float* q;  // [n_seqs, n_heads * head_dim], the new token of each sequence
  float* out;      // [n_seqs, n_heads * head_dim]
  int n_seqs;
  int n_heads;
  int n_kv_heads;
  float scale;
  // Per (sequence s, KV head h) pair, index s * n_kv_heads + h: the block table is
  // table_data[table_begin[t] .. table_begin[t] + table_len[t]); entry b backs positions
  // [b * block_size, (b + 1) * block_size).
  const int64_t* table_begin;
  const int32_t* table_len;
  const int32_t* table_data;
  // Per pair: the visible keys are [0, sink_end) and [win_begin, seq_len[s]) (the query is at
  // position seq_len[s] - 1); win_begin < sink_end is read as win_begin = sink_end.
  const int32_t* sink_end;
  const int32_t* win_begin;
  const int32_t* seq_len;  // [n_seqs]
};

// Fixed per (device, head_dim, group, maximum number of pairs): compute once, reuse every step.
struct DecodeAttentionConfig {
  int head_dim = 0;
  int group = 0;
  int max_pairs = 0;
  int grid = 0;          // thread blocks of the persistent split kernel
  int target_items = 0;  // chunks the plan aims for across all pairs
  int64_t workspace_bytes = 0;
};

// True if the kernel has an instance for this head_dim and GQA group (n_heads / n_kv_heads).
bool DecodeAttentionSupports(int head_dim, int group);

// Fills `cfg` for the current device; cudaErrorInvalidValue if unsupported.
cudaError_t GetDecodeAttentionConfig(int head_dim, int group, int max_pairs,
                                     DecodeAttentionConfig* cfg);

// Enqueues plan, split and merge kernels on `stream`. `workspace` is device memory of at least
// cfg.workspace_bytes, 16-byte aligned. n_seqs * n_kv_heads must not exceed cfg.max_pairs.
cudaError_t LaunchDecodeAttention(const DecodeAttentionArgs& a, const DevicePool& pool,
                                  const DecodeAttentionConfig& cfg, void* workspace,
                                  cudaStream_t stream);

}  // namespace moa::cuda
