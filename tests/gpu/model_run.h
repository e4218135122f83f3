// Whole models through LlamaModel on any backend, for the GPU tests that compare them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/llama_model.h"
#include "engine/model/model_file.h"
#include "kernels/backend.h"
#include "kvcache/kv_cache_manager.h"

namespace moa::gpu_test {

struct ModelRun {
  std::vector<float> logits;  // [positions, vocab]
};

// One sequence through `model`: prefill in chunks of `chunk` up to `prefill`, then one token per
// step; logits at every position.
inline absl::StatusOr<ModelRun> RunSequence(LlamaModel& model, const std::vector<int32_t>& tokens,
                                            int64_t prefill, int64_t chunk) {
  constexpr int32_t kBlock = 16;
  const KvLayout layout = model.kv_layout(kBlock);
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int32_t blocks = static_cast<int32_t>(int64_t{layout.n_layers} * layout.n_kv_heads *
                                              ((n + kBlock - 1) / kBlock));
  absl::StatusOr<std::unique_ptr<KvCacheManager>> kv = KvCacheManager::Create(layout, blocks);
  if (!kv.ok()) return kv.status();
  absl::StatusOr<std::unique_ptr<KvPool>> pool = model.NewKvPool(blocks, kBlock);
  if (!pool.ok()) return pool.status();
  const SeqId seq = (*kv)->AddSequence();
  ModelRun run;
  for (int64_t past = 0; past < n;) {
    const int64_t step = past < prefill ? std::min(chunk, prefill - past) : 1;
    if (absl::Status s = (*kv)->Grow(seq, past + step); !s.ok()) return s;
    ForwardInput in{seq, past, absl::MakeConstSpan(tokens).subspan(past, step), true};
    absl::Status s = model.Forward({&in, 1}, **kv, **pool, &run.logits);
    (*kv)->Trim(seq);
    if (!s.ok()) return s;
    past += step;
  }
  return run;
}

// The same with a model of `file` (dense) built on `be`.
inline absl::StatusOr<ModelRun> RunModel(const ModelFile& file, Backend& be,
                                         const std::vector<int32_t>& tokens, int64_t prefill,
                                         int64_t chunk) {
  absl::StatusOr<std::unique_ptr<LlamaModel>> model = LlamaModel::Create(file, &be, nullptr);
  if (!model.ok()) return model.status();
  return RunSequence(**model, tokens, prefill, chunk);
}

}  // namespace moa::gpu_test
