#include "engine/sampler.h"

namespace moa {

double Sampler::NextUniform() {
  if (p_.temperature == 0.0f) return 0.0;
  return std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
}

int32_t Sampler::Sample(absl::Span<float> logits, absl::Span<const int32_t> history) {
  TokenCounts counts;
  if (HasPenalties(p_)) counts = CountTokens(history, static_cast<int32_t>(logits.size()));
  SampleRow row;
  row.params = p_;
  row.penalty_ids = counts.ids;
  row.penalty_counts = counts.counts;
  row.u = NextUniform();
  return SampleWithUniform(logits, row);
}

}  // namespace moa
