// The Llama forward pass (Llama, Llama-3, Mistral, Vicuna, SmolLM2 ...) over a Backend.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/model/model_file.h"
#include "kernels/backend.h"

namespace moa {

class MoaPlan;

// One sequence's new tokens in a forward step.
struct ForwardInput {
  KvCache* cache = nullptr;            // from LlamaModel::NewKvCache
  int64_t past = 0;                    // tokens already in the cache
  absl::Span<const int32_t> tokens;    // new tokens, at positions past, past+1, ...
  bool all_logits = false;             // logits for every new token, or just the last
};

class LlamaModel {
 public:
  // Uploads the weights of `file` to `backend` (which must outlive the model). `plan` may be
  // null (dense attention); it must fit the model (MoaPlan::CheckFits).
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Create(const ModelFile& file,
                                                            Backend* backend,
                                                            const MoaPlan* plan);
  ~LlamaModel();

  const ModelConfig& config() const { return config_; }

  absl::StatusOr<std::unique_ptr<KvCache>> NewKvCache(int64_t capacity_tokens);

  // Runs one step over a batch of sequences. Logits are appended to `logits` in input order:
  // vocab_size floats per returned position (each new token if all_logits, else the last).
  absl::Status Forward(absl::Span<const ForwardInput> batch, std::vector<float>* logits);

 private:
  LlamaModel() = default;
  struct Impl;
  ModelConfig config_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moa
