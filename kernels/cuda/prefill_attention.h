// Prefill attention over the paged KV pool, flash-attention style: several new tokens per
// sequence (a prompt, or a chunk of one on top of an existing cache), online softmax in tiles,
// nothing of size N x N in memory. Every (sequence, KV head) has its own span rule (sink + a
// window that follows S(N) = alpha + beta * N, kernels/attention_span.h), and tiles of keys that
// no query of a query tile can see are skipped, not masked. The keys and values of the new
// tokens are already in the pool (LaunchKvWrite runs first), so every key is read through the
// block tables. Built as C++17 (.cu) like cuda_kernels.h; the caller checks shapes and tables.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/cuda_kernels.h"

namespace moa::cuda {

// One pair's span rule, as kernels/attention_span.h computes it: for a query at position p
// (n = p + 1 tokens), span = max(alpha_tokens + floor(beta * n), min_span); span >= n means
// every key; else the visible keys are [0, min(sink, n)) and [n - (span - sink), p].
struct DeviceSpanRule {
  int32_t dense;         // 1: every earlier key, the rest unused
  int32_t alpha_tokens;  // block * floor(alpha / block)
  double beta;
  int32_t min_span;  // sink + block
};

struct PrefillAttentionArgs {
  const float* q;  // [rows, n_heads * head_dim]
  float* out;      // [rows, n_heads * head_dim]; only the rows of the listed sequences written
  int n_heads;
  int n_kv_heads;
  int head_dim;
  float scale;
  int32_t sink;  // SpanParams::sink
  int n_seqs;    // sequences in this launch
  // Per sequence s: its new tokens are rows q_row[s] .. q_row[s] + n_new[s] - 1 of q, at
  // positions past[s] .. past[s] + n_new[s] - 1.
  const int32_t* q_row;
  const int32_t* n_new;
  const int32_t* past;
  int32_t max_n_new;  // max over n_new, for the grid
  // Per pair t = s * n_kv_heads + h: the block table table_data[table_begin[t] ..
  // table_begin[t] + table_len[t]) (entry b backs positions [b * block_size, (b+1) * block_size))
  // and the span rule.
  const int64_t* table_begin;
  const int32_t* table_len;
  const int32_t* table_data;
  const DeviceSpanRule* rules;
};

// True if the kernel handles this head_dim and GQA group (n_heads / n_kv_heads): head_dim a
// multiple of 8 in [8, 256] (64 and 128 are the tuned instances; others run padded to the next
// of 64, 128, 256), group in [1, 64].
bool PrefillAttentionSupports(int head_dim, int group);

// Enqueues the prefill attention of every listed sequence on `stream`. q, out and pool.data must
// be 16-byte aligned; cudaErrorInvalidValue for an unsupported or inconsistent shape.
cudaError_t LaunchPrefillAttention(const PrefillAttentionArgs& a, const DevicePool& pool,
                                   cudaStream_t stream);

}  // namespace moa::cuda
