// The Llama forward pass (Llama, Llama-3, Mistral, Vicuna, SmolLM2 ...) over a Backend.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
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
  // A model of shape `config` with random weights made on `backend` (Backend::RandomWeight), for
  // benchmarks of large shapes and tests: each matrix uniform with the variance of 1 / fan-in
  // (activations keep their scale through the layers), the embedding uniform in [-1, 1), norm
  // scales near 1. The same seed gives the same weights on every backend.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> CreateRandom(const ModelConfig& config,
                                                                  Backend* backend,
                                                                  const MoaPlan* plan,
                                                                  uint64_t seed);
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
  // Forward, then the backend picks a token from each returned position's logits (in input order)
  // under rows[i] (Backend::Sample), so that a device backend copies back only `tokens`. With
  // `logits` non-null the logits also come back (replacing its contents), for log-probabilities.
  absl::Status ForwardAndSample(absl::Span<const ForwardInput> batch, const KvCacheManager& kv,
                                KvPool& pool, absl::Span<const SampleRow> rows,
                                std::vector<int32_t>* tokens, std::vector<float>* logits);

 private:
  LlamaModel() = default;
  // The weight of canonical name `name` (model_file.h), [rows, cols]; `norm`: a norm scale.
  using WeightSource = std::function<absl::StatusOr<std::unique_ptr<Tensor>>(
      const std::string& name, int64_t rows, int64_t cols, bool norm)>;
  // What Create and CreateRandom share: checks, the plan, RoPE and every weight from `weight`.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Build(const ModelConfig& c, Backend* backend,
                                                           const MoaPlan* plan,
                                                           const WeightSource& weight);
  absl::Status CheckKvLayout(const KvLayout& layout) const;
  // What Forward and ForwardAndSample share: the step, ending with the logits on the backend.
  absl::StatusOr<std::unique_ptr<Tensor>> ForwardToLogits(absl::Span<const ForwardInput> batch,
                                                          const KvCacheManager& kv, KvPool& pool);
  struct Impl;
  ModelConfig config_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moa
