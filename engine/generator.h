// Single-sequence generation: prefill the prompt in chunks, then sample token by token, streaming
// text as it completes. The CLI and the benchmarks use it; the server's scheduler batches many.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/llama_model.h"
#include "engine/sampler.h"
#include "engine/tokenizer/tokenizer.h"

namespace moa {

struct GenerateOptions {
  int32_t max_tokens = 256;
  SamplingParams sampling;
  int32_t prefill_chunk = 512;  // prompt tokens per forward step
  bool stop_at_end_of_generation = true;
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // generated tokens (the end-of-generation token included)
  int64_t prompt_tokens = 0;
  double prefill_seconds = 0;
  double decode_seconds = 0;  // from the first sampled token to the last
  std::string finish_reason;  // "eos" or "length"
};

// Calls on_text with each newly completed piece of text (never broken UTF-8).
absl::StatusOr<GenerateResult> Generate(LlamaModel& model, const Tokenizer& tokenizer,
                                        absl::Span<const int32_t> prompt,
                                        const GenerateOptions& options,
                                        const std::function<void(std::string_view)>& on_text);

}  // namespace moa
