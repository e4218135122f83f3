// Checks of client requests before they reach the tokenizer or the engine. Every failure is an
// INVALID_ARGUMENT whose message names the field and says what is wrong; nothing here needs a
// model, so the checks are tested table-driven without one.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/engine.h"
#include "engine/sampler.h"
#include "moa/v1/moa.pb.h"

namespace moa {

struct ValidationLimits {
  int32_t vocab_size = 0;
  int64_t context_length = 0;
  int32_t default_max_tokens = 256;
  int32_t max_stop_strings = 16;
  int32_t max_stop_string_bytes = 256;
  int32_t max_stop_token_ids = 64;
  int32_t max_top_logprobs = 20;
  int32_t max_messages = 256;
  // Text in one request (prompt text or all chat contents together); the gRPC receive limit is
  // a little larger so that oversized text gets this precise message instead of a transport
  // error.
  int64_t max_text_bytes = 1 << 20;
};

bool IsValidUtf8(std::string_view s);

// Everything that can be checked before tokenization: input present and well-formed, sampling
// parameters, limits on stops and logprobs, token ids in range.
absl::Status ValidateGenerateRequest(const v1::GenerateRequest& r, const ValidationLimits& l);

// Sampling parameters with the API's defaults filled in (unset top_p and repetition penalty
// are 1); INVALID_ARGUMENT for values the sampler refuses.
absl::StatusOr<SamplingParams> ToSamplingParams(const v1::SamplingParams& p);

// The engine request for a validated request whose input became `prompt`: checks the prompt
// against the context and resolves max_tokens (unset: the default, capped by the room left).
absl::StatusOr<GenerationRequest> MakeGenerationRequest(const v1::GenerateRequest& r,
                                                        std::vector<int32_t> prompt,
                                                        const ValidationLimits& l);

// Checks for Tokenize and Detokenize.
absl::Status ValidateTokenizeRequest(const v1::TokenizeRequest& r, const ValidationLimits& l);
absl::Status ValidateDetokenizeRequest(const v1::DetokenizeRequest& r, const ValidationLimits& l);

}  // namespace moa
