// Shared helpers for the tests: where the default model and generated test data live.
#pragma once

#include <string>

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

}  // namespace moa::testing
