// The whole default model on the CUDA backend against Hugging Face transformers, an independent
// implementation: tests/tools/hf_gguf_logits.py runs transformers (fp32, eager attention) on the
// GPU machine and writes its prompts' ids and logits; this test feeds the same ids through
// LlamaModel on the CUDA backend and compares every position. scripts/gpu-check.sh runs the two
// in order. The file is found at $MOA_HF_LOGITS, else tests/data/generated/hf_logits.bin under
// MOA_SOURCE_DIR.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "engine/llama_model.h"
#include "engine/model/model_file.h"
#include "gtest/gtest.h"
#include "kernels/cuda/cuda_backend.h"
#include "tests/gpu/cuda_test_util.h"
#include "tests/gpu/model_run.h"

namespace moa {
namespace {

using gpu_test::SourceDir;

struct Reference {
  std::vector<int32_t> ids;
  int32_t vocab = 0;
  std::vector<float> logits;  // [ids.size(), vocab]
};

// Reads hf_gguf_logits.py's output; an empty vector if the file is malformed.
std::vector<Reference> ReadReferences(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  int32_t count = 0;
  if (!in.read(reinterpret_cast<char*>(&count), 4) || count <= 0 || count > 100) return {};
  std::vector<Reference> refs(count);
  for (Reference& r : refs) {
    int32_t n = 0;
    if (!in.read(reinterpret_cast<char*>(&n), 4) ||
        !in.read(reinterpret_cast<char*>(&r.vocab), 4) || n <= 0 || n > 100000 || r.vocab <= 0 ||
        r.vocab > 1000000) {
      return {};
    }
    r.ids.resize(n);
    r.logits.resize(static_cast<size_t>(n) * r.vocab);
    if (!in.read(reinterpret_cast<char*>(r.ids.data()), 4 * n) ||
        !in.read(reinterpret_cast<char*>(r.logits.data()), 4 * r.logits.size())) {
      return {};
    }
  }
  return refs;
}

TEST(HfTransformers, DefaultModelLogitsMatch) {
  const std::string model_path = SourceDir() + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (!gpu_test::FileExists(model_path)) {
    GTEST_SKIP() << model_path << " is absent: set MOA_SOURCE_DIR to the repository root";
  }
  const char* env = std::getenv("MOA_HF_LOGITS");
  const std::string ref_path =
      env != nullptr && *env != '\0' ? env : SourceDir() + "/tests/data/generated/hf_logits.bin";
  const std::vector<Reference> refs = ReadReferences(ref_path);
  ASSERT_FALSE(refs.empty()) << ref_path << " is missing or malformed: run "
                             << "tests/tools/hf_gguf_logits.py first (scripts/gpu-check.sh does)";

  absl::StatusOr<ModelFile> file = LoadModel(model_path);
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<std::unique_ptr<Backend>> gpu = NewCudaBackend(0);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  absl::StatusOr<std::unique_ptr<LlamaModel>> model =
      LlamaModel::Create(*file, gpu->get(), nullptr);
  ASSERT_TRUE(model.ok()) << model.status();
  const int64_t vocab = file->config.vocab_size;
  constexpr int64_t kChunk = 200;  // prefill in chunks: exercises attention on top of a cache

  int long_prompts = 0;
  for (const Reference& r : refs) {
    ASSERT_EQ(r.vocab, vocab);
    const int64_t n = static_cast<int64_t>(r.ids.size());
    long_prompts += n > 1000;
    absl::StatusOr<gpu_test::ModelRun> run = gpu_test::RunSequence(**model, r.ids, n, kChunk);
    ASSERT_TRUE(run.ok()) << run.status();
    const std::vector<float>& logits = run->logits;
    ASSERT_EQ(logits.size(), r.logits.size());

    double worst = 0, sum = 0;
    int differ = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float* want = r.logits.data() + i * vocab;
      const float* got = logits.data() + i * vocab;
      for (int64_t j = 0; j < vocab; ++j) {
        const double e = std::fabs(double{got[j]} - double{want[j]});
        sum += e;
        worst = std::isnan(e) ? INFINITY : std::max(worst, e);
      }
      const int64_t top_want = std::max_element(want, want + vocab) - want;
      const int64_t top_got = std::max_element(got, got + vocab) - got;
      if (top_want != top_got) {
        ++differ;
        // Only where transformers itself nearly ties.
        EXPECT_LT(want[top_want] - want[top_got], 0.1f) << "position " << i;
      }
    }
    const double mean = sum / static_cast<double>(n * vocab);
    std::printf("[ hf       ] %lld tokens: max |logit diff| %.4f, mean %.5f, top-1 differs at %d\n",
                static_cast<long long>(n), worst, mean, differ);
    // fp16 weights and KV here against fp32 there.
    EXPECT_LE(worst, 0.5);
    EXPECT_LE(mean, 0.05);
    EXPECT_LE(differ, 2);
  }
  EXPECT_GE(long_prompts, 1) << "the reference needs a prompt of over 1,000 tokens";
}

}  // namespace
}  // namespace moa
