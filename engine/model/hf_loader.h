// Llama-family models from Hugging Face checkpoint directories: config.json + safetensors
// (model.safetensors, or shards listed in model.safetensors.index.json) + tokenizer files.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "engine/model/model_config.h"
#include "engine/model/model_file.h"

namespace moa {

absl::StatusOr<ModelFile> LoadHfModel(const std::string& dir);

// Parses the text of a config.json (LlamaForCausalLM / MistralForCausalLM) into a validated
// ModelConfig with rope_layout = kHalfSplit.
absl::StatusOr<ModelConfig> ParseHfConfig(std::string_view json);

}  // namespace moa
