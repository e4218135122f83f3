// Llama-family models from GGUF files (llama.cpp's format).
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "engine/model/model_file.h"

namespace moa {

absl::StatusOr<ModelFile> LoadGgufModel(const std::string& path);

}  // namespace moa
