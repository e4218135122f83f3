// MoA plans: one elastic span rule per (layer, KV head), read from the project's versioned plan
// format or from the reference pipeline's {"alphas": ..., "betas": ...} JSON.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/model/model_config.h"
#include "kernels/attention_span.h"

namespace moa {

class MoaPlan {
 public:
  static absl::StatusOr<MoaPlan> FromJson(absl::string_view json_text);
  static absl::StatusOr<MoaPlan> FromFile(const std::string& path);
  // Every head dense: the same as no plan.
  static MoaPlan Dense(const ModelConfig& c, SpanParams params);

  std::string ToJson() const;
  // An error naming the mismatch if the plan was not made for this model's shape.
  absl::Status CheckFits(const ModelConfig& c) const;
  // The plan with one rule per KV head of `c`. Reference plans give a rule per query head (the
  // reference expands GQA models to MHA); the heads of a GQA group must then share one rule.
  absl::StatusOr<MoaPlan> ForModel(const ModelConfig& c) const;

  const SpanParams& params() const { return params_; }
  int n_layers() const { return static_cast<int>(rules_.size()); }
  const std::vector<SpanRule>& layer_rules(int layer) const { return rules_[layer]; }
  // Fraction of the dense KV entries kept at sequence length n, averaged over heads.
  double Density(int64_t n) const;

 private:
  SpanParams params_;
  std::vector<std::vector<SpanRule>> rules_;  // [layer][kv head]
  std::string model_name_;                    // informative
  int n_heads_hint_ = 0;     // query heads of the model it was made for (0: unknown)
  int n_kv_heads_hint_ = 0;  // KV heads of the model it was made for (0: unknown)
};

}  // namespace moa
