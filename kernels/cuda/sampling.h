// Token picking on the device: kernels/sampling.h's SampleWithUniform, step for step, for a batch
// of logit rows, so that a decode step copies back one token id per row instead of the logits.
//
// Per call: rows that need their logits changed (sampled rows, and greedy rows with penalties)
// are copied to scratch and penalized there (the logits stay as they are); greedy rows take a
// block-wide argmax; sampled rows are sorted by CUB's segmented radix sort (stable, descending,
// so equal logits keep ascending ids) and one thread block per row walks the sorted candidates
// with fp64 exponentials and block-wide prefix sums for min-p, top-p and the pick.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace moa::cuda {

// One row's parameters (kernels/sampling.h's SampleRow with its penalty lists flattened).
struct DeviceSampleRow {
  double u;
  float temperature;
  float top_p;
  float min_p;
  float repetition_penalty;
  float presence_penalty;
  float frequency_penalty;
  int32_t top_k;
  int32_t penalty_len;    // entries of this row in the penalty arrays
  int64_t penalty_begin;  // its first entry
};

// Device memory of the batched pick, kept between calls and grown as needed.
class SampleScratch {
 public:
  SampleScratch() = default;
  SampleScratch(const SampleScratch&) = delete;
  SampleScratch& operator=(const SampleScratch&) = delete;
  ~SampleScratch();

  // Makes slot `slot` hold at least `bytes`; an old buffer is freed only after `stream` drained.
  cudaError_t Grow(int slot, size_t bytes, cudaStream_t stream);
  void* get(int slot) const { return ptr_[slot]; }

  // What the slots hold: penalized logits and candidate ids twice over (the sort ping-pongs),
  // CUB's scratch, and the per-call metadata.
  enum Slot { kKeys0, kKeys1, kIds0, kIds1, kCub, kMeta, kSlots };

 private:
  void* ptr_[kSlots] = {};
  size_t bytes_[kSlots] = {};
};

// tokens[i] = the token SampleWithUniform picks from row i of `logits` (device, [rows, vocab],
// left unchanged) under rows[i]. `rows`, the penalty arrays (n_penalties entries, addressed by
// each row's penalty_begin / penalty_len) and `tokens` are host memory; the call returns once
// the tokens are there. The caller checked every argument; rows * vocab must fit in an int.
cudaError_t SampleRows(const float* logits, int64_t rows, int64_t vocab,
                       const DeviceSampleRow* host_rows, const int32_t* penalty_ids,
                       const int32_t* penalty_counts, int64_t n_penalties, int32_t* tokens,
                       SampleScratch* scratch, cudaStream_t stream);

}  // namespace moa::cuda
