// A request's sampler: its seeded random stream, and the host pick of kernels/sampling.h.
#pragma once

#include <cstdint>
#include <random>

#include "absl/types/span.h"
#include "kernels/sampling.h"

namespace moa {

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) {}

  const SamplingParams& params() const { return p_; }

  // The uniform u in [0, 1) for the next token: one draw for a sampled token, none (0) for a
  // greedy one, so that a seed gives the same stream whether the host or a device picks.
  double NextUniform();

  // Picks on the host: SampleWithUniform with NextUniform(). `logits` is modified (penalties);
  // `history` is every token of the sequence so far (prompt included) for the penalties.
  int32_t Sample(absl::Span<float> logits, absl::Span<const int32_t> history);

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;  // fixed algorithm: the same seed gives the same tokens everywhere
};

}  // namespace moa
