// Decode steps replayed from CUDA graphs give the same logits as the same steps launched one
// kernel at a time: the tiny model, a batch whose sequences' block tables grow and lose blocks
// every few steps (the device copy of the tables takes only the changes), batch sizes that change
// between steps (one graph each), a plan with short windows (tables with holes), and a prefill
// chunk in between (run without a graph); also with a device block-table cache too small to hold
// the tables, so that it is emptied and grown while steps replay.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/llama_model.h"
#include "engine/moa_plan.h"
#include "engine/model/model_file.h"
#include "gtest/gtest.h"
#include "kernels/cuda/cuda_backend.h"
#include "kvcache/kv_cache_manager.h"
#include "tests/gpu/cuda_test_util.h"

namespace moa {
namespace {

std::string TinyModelPath() {
  return gpu_test::SourceDir() + "/tests/data/generated/tiny/model-f32.gguf";
}

// One engine-like run: `n_seqs` sequences with prompts of different lengths, then `steps` decode
// steps in which sequence i takes part only on steps where (step + i) % 5 != 0 (so the batch size
// changes), feeding back token (step * 7 + i) % vocab. Returns every logit produced.
std::vector<float> RunDecodeSteps(Backend& be, const ModelFile& file, const MoaPlan* plan,
                                  int n_seqs, int steps) {
  auto model = LlamaModel::Create(file, &be, plan);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return {};
  constexpr int32_t kBlock = 4;  // small blocks: tables grow every few steps
  const KvLayout layout = (*model)->kv_layout(kBlock);
  const int32_t blocks = 4096;
  auto kv = KvCacheManager::Create(layout, blocks).value();
  auto pool = (*model)->NewKvPool(blocks, kBlock).value();
  const int64_t vocab = file.config.vocab_size;
  std::vector<SeqId> seqs;
  std::vector<int64_t> len;
  std::vector<float> logits;
  std::mt19937 rng(3);
  for (int i = 0; i < n_seqs; ++i) {
    seqs.push_back(kv->AddSequence());
    std::vector<int32_t> prompt(3 + 5 * i);
    for (int32_t& t : prompt) t = static_cast<int32_t>(rng() % vocab);
    EXPECT_TRUE(kv->Grow(seqs[i], prompt.size()).ok());
    ForwardInput in{seqs[i], 0, prompt, false};
    EXPECT_TRUE((*model)->Forward({&in, 1}, *kv, *pool, &logits).ok());
    kv->Trim(seqs[i]);
    len.push_back(static_cast<int64_t>(prompt.size()));
  }
  for (int step = 0; step < steps; ++step) {
    std::vector<ForwardInput> batch;
    std::vector<std::vector<int32_t>> tokens(n_seqs);
    for (int i = 0; i < n_seqs; ++i) {
      if ((step + i) % 5 == 0) continue;
      tokens[i] = {static_cast<int32_t>((step * 7 + i) % vocab)};
      EXPECT_TRUE(kv->Grow(seqs[i], len[i] + 1).ok());
      batch.push_back({seqs[i], len[i], tokens[i], false});
    }
    const absl::Status s = (*model)->Forward(batch, *kv, *pool, &logits);
    EXPECT_TRUE(s.ok()) << "step " << step << ": " << s;
    for (const ForwardInput& in : batch) {
      kv->Trim(in.seq);
      ++len[std::find(seqs.begin(), seqs.end(), in.seq) - seqs.begin()];
    }
  }
  return logits;
}

TEST(CudaGraphs, ReplayedDecodeStepsMatchDirectLaunches) {
  const std::string path = TinyModelPath();
  if (!gpu_test::FileExists(path)) {
    GTEST_SKIP() << path << " is absent: set MOA_SOURCE_DIR to the repository root and carry "
                 << "tests/data/generated/tiny";
  }
  const ModelFile file = LoadModel(path).value();
  // Short windows on every head: blocks leave the tables while the graphs replay.
  std::string rules;
  for (int layer = 0; layer < file.config.n_layers; ++layer) {
    absl::StrAppend(&rules, layer ? "," : "", "[");
    for (int h = 0; h < file.config.n_kv_heads; ++h) {
      absl::StrAppend(&rules, h ? "," : "", R"({"alpha": 12, "beta": 0.1})");
    }
    absl::StrAppend(&rules, "]");
  }
  const MoaPlan plan =
      MoaPlan::FromJson(absl::StrCat(R"({"format": "moa-plan", "version": 1, "sink": 4,
                                         "block_size": 4, "rules": [)",
                                     rules, "]}"))
          .value();
  for (const MoaPlan* p : {static_cast<const MoaPlan*>(nullptr), &plan}) {
    SCOPED_TRACE(p == nullptr ? "dense" : "plan");
    auto direct = NewCudaBackend(0, CudaBackendOptions{.graphs = false}).value();
    const std::vector<float> want = RunDecodeSteps(*direct, file, p, 6, 100);
    ASSERT_FALSE(want.empty());
    EXPECT_EQ(GetCudaGraphStats(*direct).captures, 0);
    // Graphs, and a device block-table cache of 64 entries, which fills up again and again (it
    // is emptied, or grown, between calls or, inside a replayable step, before the step's retry).
    for (const CudaBackendOptions& o :
         {CudaBackendOptions{.graphs = true},
          CudaBackendOptions{.graphs = true, .block_table_entries = 64},
          CudaBackendOptions{.graphs = false, .block_table_entries = 64}}) {
      SCOPED_TRACE(absl::StrCat("graphs ", o.graphs, ", cache of ", o.block_table_entries));
      auto be = NewCudaBackend(0, o).value();
      const std::vector<float> got = RunDecodeSteps(*be, file, p, 6, 100);
      ASSERT_EQ(want.size(), got.size());
      for (size_t i = 0; i < want.size(); ++i) {
        // The same kernels on the same inputs: equal up to cuBLAS choosing another algorithm.
        ASSERT_NEAR(got[i], want[i], 1e-4f) << "logit " << i;
      }
      const CudaGraphStats stats = GetCudaGraphStats(*be);
      std::printf("[ graphs   ] %lld graphs captured, %lld steps replayed\n",
                  static_cast<long long>(stats.captures), static_cast<long long>(stats.replays));
      if (o.graphs) {
        // Batches of 4 and 5 sequences: two graphs at least.
        EXPECT_GE(stats.replays, 80) << "decode steps were not replayed";
        EXPECT_GE(stats.captures, 2);
      }
    }
  }
}

}  // namespace
}  // namespace moa
