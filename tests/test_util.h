// Shared helpers for the tests: where the default model and generated test data live.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/model/model_file.h"

namespace moa::testing {

// The repository root (compiled in; MOA_SOURCE_DIR in the environment overrides it).
std::string SourceDir();

// models/SmolLM2-135M-Instruct.Q4_1.gguf under the repository (MOA_MODEL overrides). The tests
// that need it skip with a message saying how to fetch it when it is absent.
std::string DefaultModelPath();

// tests/data/generated/: files made by the test setup (tests/tools/*.py) with independent
// implementations (HF tokenizers, llama.cpp); see scripts/test.sh.
std::string GeneratedDataDir();

// A fresh, empty temporary directory, removed at exit.
std::string MakeTempDir();

bool FileExists(const std::string& path);

// A tiny Llama shape (2 layers, d_model 64, 4 query / 2 KV heads of 16, vocab 97) for tests that
// build their own random model.
ModelConfig TinyConfig();
// Random float32 weights for `c` (normal, variance about 1 / fan-in; norm scales near 1; queries
// and keys twice as large, for sharper attention than uniform), drawn from `seed` in a fixed
// order. The output projection's deviation is output_scale / sqrt(d_model) (larger: peaked
// logits); it is left out when c.tied_embeddings.
ModelFile TinyModel(const ModelConfig& c, unsigned seed, float output_scale = 1.0f);

// n token ids uniform in [0, vocab).
std::vector<int32_t> RandomTokens(int64_t n, int vocab, unsigned seed);

}  // namespace moa::testing
