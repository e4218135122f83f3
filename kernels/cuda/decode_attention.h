// Split-KV decode attention over the paged fp16 KV pool: one new token per sequence, every
// (sequence, KV head) pair with its own length and sink + window. Built as C++17 (.cu) like
// cuda_kernels.h; the caller (the CUDA backend, tests, the benchmark) checks shapes and tables.
//
// Why split-KV: one thread block per (sequence, head) leaves most SMs idle at small batch and
// lets one long head hold up the step while short ones are long done. Here the visible keys of
// all pairs, laid end to end, are cut into one equal range per thread block of a fixed
// persistent grid ("stream-K": every block reads the same number of keys, however uneven the
// pairs are). Each block plans on the device from the pairs' lengths (no host round trip, and a
// grid that does not depend on the lengths can be replayed from a CUDA graph), streams its keys
// and values once for all query heads of the GQA group, and writes one partial result per pair
// it touches; the last block to finish a pair merges its partials by log-sum-exp. One kernel
// launch per step.
//
// Two ways to compute a block's share (DecodeAttentionVariant): on CUDA cores (16-byte loads
// straight into registers, warp-shuffle dot products), or on tensor cores, where each warp
// takes tiles of 16 keys through a cp.async pipeline in shared memory and computes the group's
// scores and weighted values with mma.sync (fp16 in, fp32 out; the query and the softmax weights
// are split into two fp16 halves in the padding rows of the group, so precision stays at fp32
// level). With GQA the CUDA-core loop is bound by instruction issue (per key and head: a dot
// product, shuffles, conversions, exp2); the tensor cores take that work off it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/prefill_attention.h"

namespace moa::cuda {

struct DecodeAttentionArgs {
  const float* q;  // rows of [*, n_heads * head_dim]: the new token of each sequence
  float* out;      // rows of [*, n_heads * head_dim]; only the sequences' rows are written
  int n_seqs;
  int n_heads;
  int n_kv_heads;
  float scale;
  // [n_seqs]: the row of q and out of sequence s; nullptr means row s (mixed batches list the
  // decode rows among the prefill rows).
  const int32_t* row;
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
  // Or, where not null, one span rule per KV head (of pair s * n_kv_heads + h: rules[h]) with
  // SpanParams::sink `sink`: the kernel finds each pair's visible keys itself (sink_end and
  // win_begin unused), so that the host sends no per-pair windows every step.
  const DeviceSpanRule* rules;
  int32_t sink;
  // Where not null: out's fp16 rounding too, same layout (the output projection's input).
  __half* out_half = nullptr;
};

enum class DecodeAttentionVariant {
  kDefault,      // the faster of the two for the group, as measured on an H100
  kCudaCores,    // per-lane dot products and shuffles (the first kernel)
  kTensorCores,  // mma.sync tiles of 16 keys
};

// Fixed per (device, head_dim, group, maximum number of pairs): compute once, reuse every step.
struct DecodeAttentionConfig {
  int head_dim = 0;
  int group = 0;
  int max_pairs = 0;
  bool tensor_cores = false;
  int stages = 0;  // tensor cores: cp.async pipeline depth in tiles of 16 keys per warp
  int grid = 0;    // thread blocks of the persistent kernel (all resident at once)
  // No block takes a smaller share than this many keys (pair starts counted as below): below it,
  // per-block setup and partial results cost more than the keys (blocks beyond
  // total / min_keys_per_block stay idle).
  int min_keys_per_block = 0;
  // Each pair with visible keys counts as this many keys more when the keys are split among the
  // blocks: a block that starts a pair pays for it (the pair's first table entries and tiles,
  // fetched while every other block keeps the memory busy) and is likelier to merge it at the end.
  int pair_start_keys = 0;
  int64_t shared_bytes = 0;  // dynamic shared memory per block
  int64_t workspace_bytes = 0;
};

// True if the kernel has an instance for this head_dim and GQA group (n_heads / n_kv_heads).
bool DecodeAttentionSupports(int head_dim, int group);

// Fills `cfg` for the current device; cudaErrorInvalidValue if unsupported. `stages` 0 means the
// default; the benchmark and the tests pick variants and depths to compare them.
cudaError_t GetDecodeAttentionConfig(
    int head_dim, int group, int max_pairs, DecodeAttentionConfig* cfg,
    DecodeAttentionVariant variant = DecodeAttentionVariant::kDefault, int stages = 0);

// Zero-fills a new workspace (its per-pair arrival counters) on `stream`; needed once after
// allocation: every launch leaves the counters at zero again.
cudaError_t InitDecodeAttentionWorkspace(const DecodeAttentionConfig& cfg, void* workspace,
                                         cudaStream_t stream);

// Enqueues the decode attention on `stream`. `workspace` is device memory of at least
// cfg.workspace_bytes, 16-byte aligned, initialised once (InitDecodeAttentionWorkspace) and used
// by one stream at a time. n_seqs * n_kv_heads must not exceed cfg.max_pairs.
cudaError_t LaunchDecodeAttention(const DecodeAttentionArgs& a, const DevicePool& pool,
                                  const DecodeAttentionConfig& cfg, void* workspace,
                                  cudaStream_t stream);

}  // namespace moa::cuda
