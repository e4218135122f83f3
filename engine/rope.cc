#include "engine/rope.h"

#include <cmath>
#include <numbers>

#include "absl/strings/str_cat.h"

namespace moa {

absl::StatusOr<std::vector<float>> RopeInvFreq(int head_dim, double theta,
                                               const RopeScaling& scaling) {
  if (head_dim <= 0 || head_dim % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("RoPE: head_dim ", head_dim, " is not even"));
  }
  if (!(theta > 1.0) || !std::isfinite(theta)) {
    return absl::InvalidArgumentError(absl::StrCat("RoPE: theta ", theta));
  }
  if (scaling.type != RopeScaling::Type::kNone &&
      (!(scaling.factor > 0.0) || !std::isfinite(scaling.factor))) {
    return absl::InvalidArgumentError(absl::StrCat("RoPE scaling factor ", scaling.factor));
  }
  const double low = scaling.low_freq_factor;
  const double high = scaling.high_freq_factor;
  const double original = static_cast<double>(scaling.original_max_position);
  if (scaling.type == RopeScaling::Type::kLlama3 &&
      (!(low > 0.0) || !(high > low) || !std::isfinite(high) || !(original > 0.0))) {
    return absl::InvalidArgumentError(
        absl::StrCat("RoPE llama3 scaling: low_freq_factor ", low, ", high_freq_factor ", high,
                     ", original_max_position ", scaling.original_max_position));
  }
  std::vector<float> inv(head_dim / 2);
  for (int i = 0; i < head_dim / 2; ++i) {
    double f = std::pow(theta, -2.0 * i / head_dim);
    switch (scaling.type) {
      case RopeScaling::Type::kNone:
        break;
      case RopeScaling::Type::kLinear:
        f /= scaling.factor;
        break;
      case RopeScaling::Type::kLlama3: {
        const double wavelen = 2.0 * std::numbers::pi / f;
        if (wavelen > original / low) {
          f /= scaling.factor;
        } else if (wavelen >= original / high) {
          const double smooth = (original / wavelen - low) / (high - low);
          f = (1.0 - smooth) * f / scaling.factor + smooth * f;
        }
        break;
      }
    }
    inv[i] = static_cast<float>(f);
  }
  return inv;
}

}  // namespace moa
