// RoPE frequencies with the context-extension scalings of Llama-family configs.
#pragma once

#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/model_config.h"

namespace moa {

// inv_freq[i] = theta^(-2i / head_dim) for i in [0, head_dim / 2), then scaled:
//  linear: divided by factor (the same as dividing positions by factor);
//  llama3: Hugging Face's _compute_llama3_parameters — wavelengths longer than
//          original_max_position / low_freq_factor are divided by factor, those shorter than
//          original_max_position / high_freq_factor are kept, and those between are blended.
absl::StatusOr<std::vector<float>> RopeInvFreq(int head_dim, double theta,
                                               const RopeScaling& scaling);

}  // namespace moa
