// Picks the next token from logits: greedy, or temperature sampling filtered by top-k, top-p and
// min-p, after repetition / presence / frequency penalties on the tokens seen so far.
#pragma once

#include <cstdint>
#include <random>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace moa {

struct SamplingParams {
  float temperature = 0.0f;         // 0 = greedy
  int32_t top_k = 0;                // 0 = off
  float top_p = 1.0f;               // in (0, 1]
  float min_p = 0.0f;               // in [0, 1)
  float repetition_penalty = 1.0f;  // > 0; 1 = off (divides positive logits, as in HF/llama.cpp)
  float presence_penalty = 0.0f;    // subtracted once from every token already seen
  float frequency_penalty = 0.0f;   // subtracted per occurrence
  uint64_t seed = 0;
};

// INVALID_ARGUMENT naming the first bad field.
absl::Status ValidateSamplingParams(const SamplingParams& p);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) {}

  // `logits` is modified (penalties, temperature); `history` is every token of the sequence so
  // far (prompt included) for the penalties.
  int32_t Sample(absl::Span<float> logits, absl::Span<const int32_t> history);

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;  // fixed algorithm: the same seed gives the same tokens everywhere
};

}  // namespace moa
