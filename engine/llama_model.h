// The Llama forward pass (Llama, Llama-3, Mistral, Vicuna, SmolLM2 ...) over a Backend.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/model/model_file.h"
#include "kernels/backend.h"
#include "kvcache/kv_cache_manager.h"

namespace moa {

class MoaPlan;

// One sequence's new tokens in a forward step.
struct ForwardInput {
  SeqId seq = 0;                     // a sequence of the KvCacheManager given to Forward
  int64_t past = 0;                  // tokens already in the cache
  absl::Span<const int32_t> tokens;  // new tokens, at positions past, past+1, ...
  bool all_logits = false;           // logits for every new token, or just the last
};

class LlamaModel {
 public:
  // Uploads the weights of `file` to `backend` (which must outlive the model). `plan` may be
  // null (dense attention); it must fit the model (MoaPlan::CheckFits).
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Create(const ModelFile& file, Backend* backend,
                                                            const MoaPlan* plan);
  ~LlamaModel();

  const ModelConfig& config() const { return config_; }

  // The layout of this model's KV blocks (its shape and its plan's span rules) for a
  // KvCacheManager whose tables Forward can use.
  KvLayout kv_layout(int32_t block_size) const;
  // Backend memory of one KV block: block_size positions of one (layer, KV head).
  int64_t BytesPerKvBlock(int32_t block_size) const;
  // Backend memory for num_blocks KV blocks of this model.
  absl::StatusOr<std::unique_ptr<KvPool>> NewKvPool(int32_t num_blocks, int32_t block_size);

  // Runs one step over a batch of sequences. The caller has grown each sequence in `kv` to
  // past + tokens.size() (KvCacheManager::Grow) and trims it afterwards; `kv` must have this
  // model's kv_layout and `pool` at least kv.total_blocks() blocks of its block size. Logits are
  // appended to `logits` in input order: vocab_size floats per returned position (each new
  // token if all_logits, else the last).
  absl::Status Forward(absl::Span<const ForwardInput> batch, const KvCacheManager& kv, KvPool& pool,
                       std::vector<float>* logits);

 private:
  LlamaModel() = default;
  absl::Status CheckKvLayout(const KvLayout& layout) const;
  struct Impl;
  ModelConfig config_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moa
