// End-to-end decode throughput on the CUDA backend (issue 4, item 7b/7c):
//
//   moa_bench_gpu [--shapes llama2-7b,llama3-8b] [--config config.json] [--prompts 4096,8192,16384]
//                 [--attention dense,uniform,mixed] [--steps 32] [--max-batch 64]
//                 [--fill prefill|random] [--out results.json]   (--max_batch works as well)
//
// For each model shape, prompt length and attention (dense; a uniform sink + window at 50%
// density; a mixed-span plan, heads of very different spans, at 50% density on average) it builds
// a random-weight fp16 model directly on the GPU (LlamaModel::CreateRandom), takes the largest
// batch whose KV cache fits the free GPU memory, fills the cache (--fill random, the default: the
// keys and values of random activations written through the backend's own attention with a
// narrow window, skipping the prefill's compute; or --fill prefill: a real chunked prefill
// through LlamaModel::Forward, whose time is reported), then times decode steps of the batch. Each
// row also gives the memory roofline: the weights plus the KV entries a step must read, over the
// device-to-device copy bandwidth measured in the same run (bytes read + written). Progress goes to
// stderr, the table to stdout.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "engine/llama_model.h"
#include "engine/moa_plan.h"
#include "engine/model/hf_loader.h"
#include "kernels/attention_span.h"
#include "kernels/backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/random_fill.h"
#include "kernels/status_macros.h"
#include "kvcache/kv_cache_manager.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, shapes, "llama2-7b,llama3-8b",
          "model shapes: llama2-7b, llama3-8b (comma-separated; may be empty with --config)");
ABSL_FLAG(std::string, config, "", "a Hugging Face config.json: one more model shape");
ABSL_FLAG(std::string, prompts, "4096,8192,16384", "prompt lengths in tokens");
ABSL_FLAG(std::string, attention, "dense,uniform,mixed", "attention variants to run");
ABSL_FLAG(double, density, 0.5, "KV density of the uniform and mixed plans at the prompt length");
ABSL_FLAG(int, steps, 32, "timed decode steps");
ABSL_FLAG(int, warmup, 6, "decode steps before timing");
ABSL_FLAG(int, max_batch, 64, "largest batch tried");
ABSL_FLAG(int, chunk, 2048, "prefill chunk in tokens per sequence");
ABSL_FLAG(std::string, fill, "random",
          "how the prompt's KV is made: random (random keys and values written through the "
          "backend, no prefill compute: the default while prefill would take most of the run) "
          "or prefill (a real chunked prefill through LlamaModel::Forward)");
ABSL_FLAG(double, headroom_gib, 2.0,
          "GPU memory kept free beyond the activations' estimate (cuBLAS workspace, allocator)");
ABSL_FLAG(std::string, out, "", "write the rows here as JSON");
ABSL_FLAG(uint64_t, seed, 1, "seed of the random weights and tokens");
ABSL_FLAG(int, device, 0, "CUDA device");
ABSL_FLAG(bool, graphs, true, "replay decode steps from CUDA graphs (false: launch every kernel)");

namespace moa {
namespace {

using Clock = std::chrono::steady_clock;
using Json = nlohmann::json;

// Positions per KV block (what the engine uses).
constexpr int32_t kKvBlock = 16;
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

absl::Status CudaCheck(cudaError_t e, const std::string& what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("CUDA: ", what, ": ", cudaGetErrorString(e)));
}

struct Shape {
  std::string name;
  ModelConfig config;
};

ModelConfig LlamaShape(const std::string& name, int n_kv_heads, int d_ff, int vocab, double theta) {
  ModelConfig c;
  c.name = name;
  c.n_layers = 32;
  c.d_model = 4096;
  c.n_heads = 32;
  c.n_kv_heads = n_kv_heads;
  c.head_dim = 128;
  c.d_ff = d_ff;
  c.vocab_size = vocab;
  c.max_context = 131072;  // the benchmark's prompts, whatever the original models were trained on
  c.rms_eps = 1e-5f;
  c.rope_theta = theta;
  return c;
}

absl::StatusOr<std::vector<Shape>> Shapes(const std::string& list, const std::string& config) {
  std::vector<Shape> out;
  for (absl::string_view s : absl::StrSplit(list, ',', absl::SkipEmpty())) {
    if (s == "llama2-7b") {
      out.push_back({"llama2-7b", LlamaShape("llama2-7b", 32, 11008, 32000, 10000.0)});
    } else if (s == "llama3-8b") {
      out.push_back({"llama3-8b", LlamaShape("llama3-8b", 8, 14336, 128256, 500000.0)});
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown shape \"", s, "\" (llama2-7b, llama3-8b, or --config)"));
    }
  }
  if (!config.empty()) {
    std::ifstream in(config, std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", config));
    std::stringstream text;
    text << in.rdbuf();
    ASSIGN_OR_RETURN(ModelConfig c, ParseHfConfig(text.str()));
    out.push_back({c.name.empty() ? config : c.name, c});
  }
  if (out.empty()) return absl::InvalidArgumentError("no model shape (--shapes, --config)");
  return out;
}

absl::StatusOr<std::vector<int64_t>> Ints(const std::string& list, const char* flag) {
  std::vector<int64_t> out;
  for (absl::string_view s : absl::StrSplit(list, ',', absl::SkipEmpty())) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(s, &v) || v < 1 || v > (int64_t{1} << 24)) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, ": bad value \"", s, "\""));
    }
    out.push_back(v);
  }
  if (out.empty()) return absl::InvalidArgumentError(absl::StrCat("--", flag, " is empty"));
  return out;
}

// A plan in the project's format, one rule per (layer, KV head); the reference's sink and block
// (64, 64).
absl::StatusOr<MoaPlan> PlanOf(const ModelConfig& c, const std::vector<std::vector<Json>>& rules) {
  Json j = {{"format", "moa-plan"},
            {"version", 1},
            {"sink", 64},
            {"block_size", 64},
            {"model", {{"name", c.name}, {"n_heads", c.n_heads}, {"n_kv_heads", c.n_kv_heads}}},
            {"rules", rules}};
  return MoaPlan::FromJson(j.dump());
}

int64_t RoundDown(int64_t v, int64_t to) { return v / to * to; }

// Every head the same static sink + window: `density` of the prompt's n tokens.
absl::StatusOr<MoaPlan> UniformPlan(const ModelConfig& c, int64_t n, double density) {
  const int64_t span = std::max<int64_t>(128, RoundDown(std::llround(density * n), 64));
  std::vector<std::vector<Json>> rules(
      c.n_layers, std::vector<Json>(c.n_kv_heads, {{"alpha", span}, {"beta", 0}}));
  return PlanOf(c, rules);
}

// Heads of four kinds, rotating across heads and layers: near-dense (95% of the sequence, growing
// with it), elastic half (n/4 + n/4, growing), short (a fixed 256 tokens) and a fixed window that
// brings the average to `density` at n tokens.
absl::StatusOr<MoaPlan> MixedPlan(const ModelConfig& c, int64_t n, double density) {
  const double kinds = 4.0;
  const double near_dense = 0.95, half = 0.5, short_tokens = 256.0;
  const double rest = kinds * density - near_dense - half - short_tokens / static_cast<double>(n);
  const int64_t filler = std::max<int64_t>(128, RoundDown(std::llround(rest * n), 64));
  const Json rule_of[4] = {{{"alpha", 0}, {"beta", near_dense}},
                           {{"alpha", RoundDown(n / 4, 64)}, {"beta", 0.25}},
                           {{"alpha", static_cast<int64_t>(short_tokens)}, {"beta", 0}},
                           {{"alpha", filler}, {"beta", 0}}};
  std::vector<std::vector<Json>> rules(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    for (int h = 0; h < c.n_kv_heads; ++h) rules[l].push_back(rule_of[(l + h) % 4]);
  }
  return PlanOf(c, rules);
}

// Device-to-device copy bandwidth, bytes read + written per second (median of 9 copies of 1 GiB).
absl::StatusOr<double> CopyBandwidth() {
  const size_t bytes = size_t{1} << 30;
  void* a = nullptr;
  void* b = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  auto cleanup = [&] {
    if (a != nullptr) cudaFree(a);
    if (b != nullptr) cudaFree(b);
    if (start != nullptr) cudaEventDestroy(start);
    if (stop != nullptr) cudaEventDestroy(stop);
  };
  std::vector<float> ms;
  absl::Status s = [&]() -> absl::Status {
    RETURN_IF_ERROR(CudaCheck(cudaMalloc(&a, bytes), "bandwidth buffer"));
    RETURN_IF_ERROR(CudaCheck(cudaMalloc(&b, bytes), "bandwidth buffer"));
    RETURN_IF_ERROR(CudaCheck(cudaMemset(a, 1, bytes), "memset"));
    RETURN_IF_ERROR(CudaCheck(cudaEventCreate(&start), "event"));
    RETURN_IF_ERROR(CudaCheck(cudaEventCreate(&stop), "event"));
    for (int i = 0; i < 12; ++i) {
      RETURN_IF_ERROR(CudaCheck(cudaEventRecord(start), "event"));
      RETURN_IF_ERROR(CudaCheck(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice), "copy"));
      RETURN_IF_ERROR(CudaCheck(cudaEventRecord(stop), "event"));
      RETURN_IF_ERROR(CudaCheck(cudaEventSynchronize(stop), "event"));
      float t = 0.0f;
      RETURN_IF_ERROR(CudaCheck(cudaEventElapsedTime(&t, start, stop), "event"));
      if (i >= 3) ms.push_back(t);  // 3 warm-up copies
    }
    return absl::OkStatus();
  }();
  cleanup();
  RETURN_IF_ERROR(s);
  std::sort(ms.begin(), ms.end());
  return 2.0 * static_cast<double>(bytes) / (ms[ms.size() / 2] * 1e-3);
}

// Bytes of the weights one decode step reads: every matrix once (fp16), the norms (fp32), and
// the embedding rows of the batch's tokens.
double WeightBytesPerStep(const ModelConfig& c, int batch) {
  const double d = c.d_model, q = static_cast<double>(c.n_heads) * c.head_dim,
               kv = static_cast<double>(c.n_kv_heads) * c.head_dim;
  const double per_layer = 2.0 * (d * q + 2.0 * d * kv + q * d + 3.0 * d * c.d_ff) + 2.0 * 4.0 * d;
  return c.n_layers * per_layer + 2.0 * c.vocab_size * d + 4.0 * d + 2.0 * batch * d;
}

// Keys a head's query at position `pos` reads (its sink and window).
int64_t VisibleCount(const SpanRule& r, const SpanParams& p, int64_t pos) {
  const VisibleKeys v = VisibleKeysAt(r, p, pos);
  if (v.sink_end == 0 && v.window_begin == 0) return pos + 1;
  return v.sink_end + (pos + 1 - std::max(v.window_begin, v.sink_end));
}

// Keys (positions x KV heads x layers) one sequence's decode query at `pos` reads.
int64_t KeysReadAt(const KvLayout& l, int64_t pos) {
  const SpanRule dense;
  int64_t keys = 0;
  for (int layer = 0; layer < l.n_layers; ++layer) {
    for (int h = 0; h < l.n_kv_heads; ++h) {
      keys += VisibleCount(l.rules.empty() ? dense : l.rules[layer][h], l.span, pos);
    }
  }
  return keys;
}

struct Row {
  std::string shape, attention, fill, error;
  int64_t prompt = 0;
  int batch = 0;
  double plan_density = 1.0;      // MoaPlan::Density(prompt)
  double measured_density = 1.0;  // KV blocks held / dense blocks, after the prompt
  double kv_bytes_per_seq = 0.0;
  double dense_kv_bytes_per_seq = 0.0;
  double kv_bytes = 0.0;  // held by the whole batch after the prompt
  double build_s = 0.0, fill_s = 0.0, decode_s = 0.0;
  double step_ms = 0.0;                            // median decode step
  double tok_s = 0.0;                              // batch / median step
  double weight_bytes = 0.0, kv_read_bytes = 0.0;  // per step (KV: mean over the timed steps)
  double roofline_tok_s = 0.0;
  double fraction = 0.0;
};

Json ToJson(const Row& r) {
  Json j = {{"shape", r.shape},
            {"prompt", r.prompt},
            {"attention", r.attention},
            {"fill", r.fill},
            {"batch", r.batch},
            {"plan_density", r.plan_density},
            {"measured_density", r.measured_density},
            {"kv_bytes_per_seq", r.kv_bytes_per_seq},
            {"dense_kv_bytes_per_seq", r.dense_kv_bytes_per_seq},
            {"kv_bytes", r.kv_bytes},
            {"build_s", r.build_s},
            {"fill_s", r.fill_s},
            {"decode_s", r.decode_s},
            {"step_ms", r.step_ms},
            {"tok_s", r.tok_s},
            {"weight_bytes_per_step", r.weight_bytes},
            {"kv_read_bytes_per_step", r.kv_read_bytes},
            {"roofline_tok_s", r.roofline_tok_s},
            {"fraction", r.fraction}};
  if (!r.error.empty()) j["error"] = r.error;
  return j;
}

// Writes the prompt's keys and values without computing the prefill: chunk by chunk, for a few
// sequences at once, random q/k/v activations go through Backend::Attention with every head
// narrowed to the last 16 keys (no sink), so the KV write is the backend's own and the attention
// reads one or two blocks per query. Those keys are inside every window the model's heads keep
// (a window is at least one 64-token plan block), so the manager's tables hold them.
// Sequences RandomFill fills at once, for prompt chunks of `chunk` tokens.
int64_t RandomFillGroup(int64_t chunk) {
  constexpr int64_t kRowsPerCall = 8192;
  return std::max<int64_t>(1, kRowsPerCall / std::max<int64_t>(chunk, 1));
}

absl::Status RandomFill(Backend& be, const ModelConfig& c, KvCacheManager& kv, KvPool& pool,
                        const std::vector<SeqId>& seqs, int64_t prompt, int64_t chunk,
                        uint64_t seed) {
  const int64_t q_cols = int64_t{c.n_heads} * c.head_dim;
  const int64_t kv_cols = int64_t{c.n_kv_heads} * c.head_dim;
  const size_t group = static_cast<size_t>(RandomFillGroup(chunk));
  std::unique_ptr<Tensor> q, k, v, out;
  int64_t rows = -1;
  const std::vector<SpanRule> narrow(c.n_kv_heads, SpanRule{false, 0, 0.0});
  AttentionParams ap;
  ap.n_heads = c.n_heads;
  ap.n_kv_heads = c.n_kv_heads;
  ap.head_dim = c.head_dim;
  ap.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  ap.span = SpanParams{0, 16};
  ap.rules = narrow;
  std::vector<absl::Span<const int32_t>> tables(group * c.n_kv_heads);
  std::vector<TableVersion> versions(group * c.n_kv_heads);
  std::vector<const HeadBlockTable*> layer_tables(c.n_kv_heads);
  std::vector<SequenceSlice> slices;
  for (size_t g0 = 0; g0 < seqs.size(); g0 += group) {
    const size_t ns = std::min(group, seqs.size() - g0);
    for (int64_t past = 0; past < prompt; past += chunk) {
      const int64_t n = std::min(chunk, prompt - past);
      if (n * static_cast<int64_t>(ns) != rows) {
        rows = n * static_cast<int64_t>(ns);
        for (auto [t, cols] : {std::pair{&q, q_cols}, std::pair{&k, kv_cols},
                               std::pair{&v, kv_cols}, std::pair{&out, q_cols}}) {
          ASSIGN_OR_RETURN(*t, be.NewActivation(rows, cols));
          std::vector<float> host(rows * cols);
          const uint64_t key = RandomKey(seed++);
          for (size_t i = 0; i < host.size(); ++i) host[i] = RandomUniform(key, i, 1.0f, 0.0f);
          RETURN_IF_ERROR(be.CopyFromHost(host, **t));
        }
      }
      slices.clear();
      for (size_t i = 0; i < ns; ++i) {
        RETURN_IF_ERROR(kv.Grow(seqs[g0 + i], past + n));
        slices.push_back(SequenceSlice{
            past, n, absl::MakeConstSpan(tables).subspan(i * c.n_kv_heads, c.n_kv_heads),
            absl::MakeConstSpan(versions).subspan(i * c.n_kv_heads, c.n_kv_heads)});
      }
      for (int l = 0; l < c.n_layers; ++l) {
        for (size_t i = 0; i < ns; ++i) {
          if (!kv.LayerTables(seqs[g0 + i], l, absl::MakeSpan(layer_tables))) {
            return absl::InternalError("random fill: a sequence left the KV cache");
          }
          for (int h = 0; h < c.n_kv_heads; ++h) {
            tables[i * c.n_kv_heads + h] = layer_tables[h]->blocks;
            versions[i * c.n_kv_heads + h] = {layer_tables[h]->id, layer_tables[h]->version};
          }
        }
        ap.layer = l;
        RETURN_IF_ERROR(be.Attention(*q, *k, *v, slices, ap, pool, *out));
      }
      for (size_t i = 0; i < ns; ++i) kv.Trim(seqs[g0 + i]);
    }
  }
  // Wait for the queued writes (a copy to the host waits for the stream).
  std::vector<float> one(out->rows() * out->cols());
  return be.CopyToHost(*out, absl::MakeSpan(one));
}

absl::Status Prefill(LlamaModel& model, KvCacheManager& kv, KvPool& pool,
                     const std::vector<SeqId>& seqs, int64_t prompt, int64_t chunk,
                     std::mt19937& rng) {
  std::uniform_int_distribution<int32_t> tok(0, model.config().vocab_size - 1);
  std::vector<int32_t> tokens(prompt);
  std::vector<float> logits;
  for (SeqId seq : seqs) {
    for (int32_t& t : tokens) t = tok(rng);
    for (int64_t past = 0; past < prompt; past += chunk) {
      const int64_t n = std::min(chunk, prompt - past);
      RETURN_IF_ERROR(kv.Grow(seq, past + n));
      const ForwardInput in{seq, past, absl::MakeConstSpan(tokens).subspan(past, n), false};
      logits.clear();
      RETURN_IF_ERROR(model.Forward({&in, 1}, kv, pool, &logits));
      kv.Trim(seq);
    }
  }
  return absl::OkStatus();
}

// Free device memory, after handing the stream-ordered allocator's cached blocks back (the
// backend allocates activations from it; they would otherwise count as used).
absl::StatusOr<size_t> FreeMemory(int device) {
  cudaMemPool_t mem_pool = nullptr;
  RETURN_IF_ERROR(CudaCheck(cudaDeviceGetMemPool(&mem_pool, device), "cudaDeviceGetMemPool"));
  RETURN_IF_ERROR(CudaCheck(cudaDeviceSynchronize(), "cudaDeviceSynchronize"));
  RETURN_IF_ERROR(CudaCheck(cudaMemPoolTrimTo(mem_pool, 0), "cudaMemPoolTrimTo"));
  size_t free = 0, total = 0;
  RETURN_IF_ERROR(CudaCheck(cudaMemGetInfo(&free, &total), "cudaMemGetInfo"));
  return free;
}

// Device memory of the activations of one Forward over `rows` tokens (llama_model.cc's scratch,
// the fp16 copy of a MatMul input) plus the logits of `batch` rows, with room for a second copy
// of the largest as the allocator rounds and caches.
double ActivationBytes(const ModelConfig& c, int64_t rows, int64_t batch) {
  const double d = c.d_model, q = static_cast<double>(c.n_heads) * c.head_dim,
               kv = static_cast<double>(c.n_kv_heads) * c.head_dim, ff = c.d_ff;
  const double floats = 3 * d + 2 * q + 2 * kv + 3 * ff;
  return rows * (floats * 4 + std::max({d, q, ff}) * 2 + ff * 4) + 2.0 * c.vocab_size * 4 * batch;
}

absl::Status RunRow(Backend& be, const Shape& shape, int64_t prompt, const std::string& attention,
                    double bandwidth, Row& row) {
  const ModelConfig& c = shape.config;
  const double density = absl::GetFlag(FLAGS_density);
  const int steps = absl::GetFlag(FLAGS_steps);
  const int warmup = absl::GetFlag(FLAGS_warmup);
  const int64_t chunk = absl::GetFlag(FLAGS_chunk);
  const std::string fill = absl::GetFlag(FLAGS_fill);
  row.shape = shape.name;
  row.prompt = prompt;
  row.attention = attention;
  row.fill = fill;
  const std::string tag = absl::StrCat("[", shape.name, " ", prompt, " ", attention, "] ");

  std::optional<MoaPlan> plan;
  if (attention == "uniform") {
    ASSIGN_OR_RETURN(plan, UniformPlan(c, prompt, density));
  } else if (attention == "mixed") {
    ASSIGN_OR_RETURN(plan, MixedPlan(c, prompt, density));
  } else if (attention != "dense") {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown attention \"", attention, "\" (dense, uniform, mixed)"));
  }
  row.plan_density = plan ? plan->Density(prompt) : 1.0;

  Clock::time_point t0 = Clock::now();
  ASSIGN_OR_RETURN(
      std::unique_ptr<LlamaModel> model,
      LlamaModel::CreateRandom(c, &be, plan ? &*plan : nullptr, absl::GetFlag(FLAGS_seed)));
  ASSIGN_OR_RETURN(const size_t free, FreeMemory(absl::GetFlag(FLAGS_device)));
  row.build_s = Seconds(t0);

  const KvLayout layout = model->kv_layout(kKvBlock);
  const int64_t total_len = prompt + warmup + steps;
  // A sequence holds the most while a prompt chunk is written (`peak`: with a plan, a chunk still
  // sees the keys its first row sees) and far less afterwards, when it is trimmed to its spans
  // (`steady`: the most it holds grown one token at a time up to the end of the decode). The
  // sequences are filled a few at a time (`fill_group`), so the pool needs every sequence's
  // steady blocks plus the excess of one group; reserving every sequence's peak would hold the
  // plans to the dense batch size.
  const int64_t peak = PeakBlocks(layout, prompt, chunk, total_len);
  const int64_t steady = PeakBlocks(layout, prompt, 1, total_len);
  const int64_t fill_group = fill == "random" ? RandomFillGroup(chunk) : 1;
  const auto blocks_for = [&](int64_t batch) {
    return batch * steady + std::min(batch, fill_group) * (peak - steady);
  };
  const double block_bytes = static_cast<double>(model->BytesPerKvBlock(kKvBlock));
  const double headroom =
      absl::GetFlag(FLAGS_headroom_gib) * kGiB +
      ActivationBytes(c, std::max<int64_t>(chunk, 64), absl::GetFlag(FLAGS_max_batch));
  const double for_kv = static_cast<double>(free) - headroom;
  int64_t batch = absl::GetFlag(FLAGS_max_batch);
  while (batch > 0 && (static_cast<double>(blocks_for(batch)) * block_bytes > for_kv ||
                       blocks_for(batch) > std::numeric_limits<int32_t>::max())) {
    --batch;
  }
  std::fprintf(stderr,
               "%smodel built in %.2f s; %.1f GiB free, KV per sequence %.2f GiB at its peak, "
               "%.2f GiB after its prompt; plan density %.3f: batch %lld\n",
               tag.c_str(), row.build_s, free / kGiB, peak * block_bytes / kGiB,
               steady * block_bytes / kGiB, row.plan_density, static_cast<long long>(batch));
  if (batch < 1) {
    return absl::ResourceExhaustedError(
        absl::StrCat("not one sequence fits: ", peak * block_bytes / kGiB, " GiB of KV, ",
                     for_kv / kGiB, " GiB free beyond the headroom"));
  }
  row.batch = static_cast<int>(batch);

  const int32_t blocks = static_cast<int32_t>(blocks_for(batch));
  ASSIGN_OR_RETURN(std::unique_ptr<KvCacheManager> kv, KvCacheManager::Create(layout, blocks));
  ASSIGN_OR_RETURN(std::unique_ptr<KvPool> pool, model->NewKvPool(blocks, kKvBlock));
  std::vector<SeqId> seqs;
  for (int64_t i = 0; i < batch; ++i) seqs.push_back(kv->AddSequence());

  std::mt19937 rng(static_cast<uint32_t>(absl::GetFlag(FLAGS_seed)));
  t0 = Clock::now();
  if (fill == "prefill") {
    RETURN_IF_ERROR(Prefill(*model, *kv, *pool, seqs, prompt, chunk, rng));
  } else if (fill == "random") {
    RETURN_IF_ERROR(RandomFill(be, c, *kv, *pool, seqs, prompt, chunk, rng()));
  } else {
    return absl::InvalidArgumentError(absl::StrCat("--fill: \"", fill, "\" (prefill or random)"));
  }
  row.fill_s = Seconds(t0);
  int64_t dense_blocks = 0;
  for (SeqId s : seqs) dense_blocks += kv->dense_blocks(s);
  row.measured_density = static_cast<double>(kv->used_blocks()) / dense_blocks;
  row.kv_bytes = kv->used_blocks() * block_bytes;
  row.kv_bytes_per_seq = row.kv_bytes / batch;
  row.dense_kv_bytes_per_seq = dense_blocks * block_bytes / batch;
  std::fprintf(
      stderr, "%s%s of %lld x %lld tokens in %.1f s (%.0f tokens/s); KV %.2f GiB, %.3f of dense\n",
      tag.c_str(), fill.c_str(), static_cast<long long>(batch), static_cast<long long>(prompt),
      row.fill_s, batch * prompt / row.fill_s, row.kv_bytes / kGiB, row.measured_density);

  // Decode: one token per sequence per step, every sequence at the same length.
  std::uniform_int_distribution<int32_t> tok(0, c.vocab_size - 1);
  std::vector<int32_t> next(batch);
  std::vector<ForwardInput> inputs(batch);
  // Greedy picks on the GPU, only the tokens come back: what the server does every step (copying
  // the logits of a 128k vocabulary back would add milliseconds the server does not spend).
  const std::vector<SampleRow> greedy(batch);
  std::vector<int32_t> picked;
  std::vector<double> step_s;
  double keys_read = 0.0;
  CudaGraphStats graphs_before;
  t0 = Clock::now();
  for (int s = 0; s < warmup + steps; ++s) {
    if (s == warmup) graphs_before = GetCudaGraphStats(be);
    const int64_t past = prompt + s;
    for (int64_t i = 0; i < batch; ++i) {
      next[i] = tok(rng);
      RETURN_IF_ERROR(kv->Grow(seqs[i], past + 1));
      inputs[i] = ForwardInput{seqs[i], past, absl::MakeConstSpan(&next[i], 1), false};
    }
    picked.clear();
    const Clock::time_point start = Clock::now();
    // Returns after copying the picked tokens to the host, which waits for the whole step.
    RETURN_IF_ERROR(model->ForwardAndSample(inputs, *kv, *pool, greedy, &picked, nullptr));
    if (s >= warmup) {
      step_s.push_back(Seconds(start));
      keys_read += static_cast<double>(KeysReadAt(layout, past)) * batch;
    }
    for (SeqId seq : seqs) kv->Trim(seq);
  }
  row.decode_s = Seconds(t0);
  for (int32_t t : picked) {
    if (t < 0 || t >= c.vocab_size)
      return absl::InternalError("decode picked a token out of range");
  }
  std::sort(step_s.begin(), step_s.end());
  const double median = step_s[step_s.size() / 2];
  row.step_ms = median * 1e3;
  row.tok_s = batch / median;
  const double kv_elem_bytes = block_bytes / (2.0 * kKvBlock * c.head_dim);
  row.weight_bytes = WeightBytesPerStep(c, row.batch);
  row.kv_read_bytes = keys_read / steps * 2.0 * c.head_dim * kv_elem_bytes;
  row.roofline_tok_s = batch / ((row.weight_bytes + row.kv_read_bytes) / bandwidth);
  row.fraction = row.tok_s / row.roofline_tok_s;
  std::fprintf(stderr,
               "%sdecode: %d steps, median %.2f ms: %.1f tokens/s; roofline %.1f tokens/s "
               "(%.2f GB weights + %.2f GB KV per step): %.2f of it\n",
               tag.c_str(), steps, row.step_ms, row.tok_s, row.roofline_tok_s,
               row.weight_bytes / 1e9, row.kv_read_bytes / 1e9, row.fraction);
  // How the steps ran: replayed from a CUDA graph (the host stages the inputs, then the device
  // runs the graph) or launched directly (the device runs while the host launches). The backend
  // measures both ways now and then and keeps the faster (kernels/cuda/step_graph.h).
  const CudaGraphStats g = GetCudaGraphStats(be);
  const int64_t replays = g.replays - graphs_before.replays;
  const int64_t timed = g.device_timed_replays - graphs_before.device_timed_replays;
  const int64_t direct = g.direct_steps - graphs_before.direct_steps;
  std::fprintf(stderr, "%ssteps: %lld replayed from CUDA graphs", tag.c_str(),
               static_cast<long long>(replays));
  if (replays > 0 && timed > 0) {
    std::fprintf(stderr, " (per replay %.2f ms host preparation, %.2f ms on the device)",
                 (g.replay_host_seconds - graphs_before.replay_host_seconds) * 1e3 / replays,
                 (g.replay_device_seconds - graphs_before.replay_device_seconds) * 1e3 / timed);
  }
  std::fprintf(stderr, ", %lld launched directly", static_cast<long long>(direct));
  if (direct > 0) {
    std::fprintf(stderr, " (%.2f ms of host time each to launch, the device running meanwhile)",
                 (g.direct_host_seconds - graphs_before.direct_host_seconds) * 1e3 / direct);
  }
  std::fprintf(stderr, "\n");
  return absl::OkStatus();
}

void PrintTable(const std::vector<Row>& rows, double bandwidth) {
  std::printf("\nEnd-to-end decode, random-weight fp16 models; copy bandwidth %.0f GB/s\n",
              bandwidth / 1e9);
  std::printf("%-10s %6s %-8s %5s %10s %10s %6s %7s %7s %8s %7s\n", "shape", "prompt", "attn",
              "batch", "tok/s", "roofline", "frac", "KV GB", "density", "step ms", "fill s");
  for (const Row& r : rows) {
    if (!r.error.empty()) {
      std::printf("%-10s %6lld %-8s error: %s\n", r.shape.c_str(), static_cast<long long>(r.prompt),
                  r.attention.c_str(), r.error.c_str());
      continue;
    }
    std::printf("%-10s %6lld %-8s %5d %10.1f %10.1f %6.2f %7.2f %7.3f %8.2f %7.1f\n",
                r.shape.c_str(), static_cast<long long>(r.prompt), r.attention.c_str(), r.batch,
                r.tok_s, r.roofline_tok_s, r.fraction, r.kv_bytes / 1e9, r.measured_density,
                r.step_ms, r.fill_s);
  }
  // Item 7c: the 50% plans' KV memory per sequence against dense, at each shape's longest prompt.
  for (const Row& p : rows) {
    if (p.attention == "dense" || !p.error.empty()) continue;
    bool longest = true;
    for (const Row& o : rows) longest = longest && !(o.shape == p.shape && o.prompt > p.prompt);
    if (!longest) continue;
    const double ratio = p.kv_bytes_per_seq / p.dense_kv_bytes_per_seq;
    std::printf(
        "KV memory at %lld (%s, %s): %.0f bytes per sequence vs %.0f dense = %.3f (%s "
        "<= 0.55)\n",
        static_cast<long long>(p.prompt), p.shape.c_str(), p.attention.c_str(), p.kv_bytes_per_seq,
        p.dense_kv_bytes_per_seq, ratio, ratio <= 0.55 ? "meets" : "MISSES");
  }
}

absl::Status Main() {
  ASSIGN_OR_RETURN(const std::vector<Shape> shapes,
                   Shapes(absl::GetFlag(FLAGS_shapes), absl::GetFlag(FLAGS_config)));
  ASSIGN_OR_RETURN(const std::vector<int64_t> prompts,
                   Ints(absl::GetFlag(FLAGS_prompts), "prompts"));
  const std::vector<std::string> attentions =
      absl::StrSplit(absl::GetFlag(FLAGS_attention), ',', absl::SkipEmpty());
  if (attentions.empty()) return absl::InvalidArgumentError("--attention is empty");
  if (absl::GetFlag(FLAGS_steps) < 1 || absl::GetFlag(FLAGS_warmup) < 0 ||
      absl::GetFlag(FLAGS_max_batch) < 1 || absl::GetFlag(FLAGS_chunk) < 1) {
    return absl::InvalidArgumentError("--steps, --max-batch and --chunk must be positive");
  }
  const double density = absl::GetFlag(FLAGS_density);
  if (!(density > 0.0 && density <= 1.0)) {
    return absl::InvalidArgumentError("--density must lie in (0, 1]");
  }
  ASSIGN_OR_RETURN(
      std::unique_ptr<Backend> be,
      NewCudaBackend(absl::GetFlag(FLAGS_device), {.graphs = absl::GetFlag(FLAGS_graphs)}));
  ASSIGN_OR_RETURN(const double bandwidth, CopyBandwidth());
  std::fprintf(stderr, "device-to-device copy: %.0f GB/s (read + written)\n", bandwidth / 1e9);

  std::vector<Row> rows;
  const Clock::time_point start = Clock::now();
  for (const Shape& shape : shapes) {
    for (int64_t prompt : prompts) {
      for (const std::string& attention : attentions) {
        Row row;
        if (absl::Status s = RunRow(*be, shape, prompt, attention, bandwidth, row); !s.ok()) {
          std::fprintf(stderr, "[%s %lld %s] %s\n", shape.name.c_str(),
                       static_cast<long long>(prompt), attention.c_str(),
                       std::string(s.message()).c_str());
          if (s.code() == absl::StatusCode::kInvalidArgument) return s;
          row.error = std::string(s.message());
        }
        rows.push_back(row);
      }
    }
  }
  std::fprintf(stderr, "all rows in %.1f s\n", Seconds(start));
  PrintTable(rows, bandwidth);
  if (const std::string out = absl::GetFlag(FLAGS_out); !out.empty()) {
    Json j = {{"copy_bandwidth_bytes_per_s", bandwidth},
              {"steps", absl::GetFlag(FLAGS_steps)},
              {"density", density},
              {"rows", Json::array()}};
    for (const Row& r : rows) j["rows"].push_back(ToJson(r));
    std::ofstream f(out);
    f << j.dump(1) << "\n";
    if (!f) return absl::InternalError(absl::StrCat("cannot write ", out));
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace moa

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "End-to-end decode tokens/s of random-weight Llama shapes on the CUDA backend, dense and "
      "with MoA plans, against the memory roofline.");
  // Flags are spelled with dashes too (--max-batch): absl knows only the underscore names.
  std::vector<std::string> args(argv, argv + argc);
  std::vector<char*> spelled;
  for (std::string& a : args) {
    if (a.rfind("--", 0) == 0) {
      const size_t end = std::min(a.find('='), a.size());
      std::replace(a.begin() + 2, a.begin() + static_cast<std::ptrdiff_t>(end), '-', '_');
    }
    spelled.push_back(a.data());
  }
  absl::ParseCommandLine(static_cast<int>(spelled.size()), spelled.data());
  const absl::Status s = moa::Main();
  if (!s.ok()) {
    std::fprintf(stderr, "moa_bench_gpu: %s\n", std::string(s.ToString()).c_str());
    return 1;
  }
  return 0;
}
