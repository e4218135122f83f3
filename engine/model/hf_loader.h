// Llama-family models from Hugging Face checkpoint directories: config.json + safetensors
// (model.safetensors, or shards listed in model.safetensors.index.json) + tokenizer files.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "engine/model/model_file.h"

namespace moa {

absl::StatusOr<ModelFile> LoadHfModel(const std::string& dir);

}  // namespace moa
