// CPU prefill and decode speed of the Llama forward pass:
//
//   moa_bench_cpu --model PATH --threads N --prompt-tokens P --gen-tokens G [--plan PLAN]
//                 [--json OUT]
//
// Builds a prompt of P tokens from fixed varied text, times its prefill (one Forward call) and
// then G greedy decode steps (one token each), and prints a table. --json also writes the
// numbers and the prompt's token ids, so that bench/bench_cpu.py can run llama.cpp on exactly
// the same tokens.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "engine/llama_model.h"
#include "engine/moa_plan.h"
#include "engine/model/model_file.h"
#include "engine/tokenizer/tokenizer.h"
#include "kernels/backend.h"
#include "kvcache/kv_cache_manager.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, model, "models/SmolLM2-135M-Instruct.Q4_1.gguf", "GGUF file or HF dir");
ABSL_FLAG(int, threads, 0, "CPU threads (0: one per hardware thread)");
ABSL_FLAG(int, prompt_tokens, 512, "prompt length P");
ABSL_FLAG(int, gen_tokens, 128, "greedy decode steps G");
ABSL_FLAG(std::string, plan, "", "MoA plan JSON (default: dense attention)");
ABSL_FLAG(std::string, json, "", "also write the results and the prompt token ids here");

namespace moa {
namespace {

// Varied text (prose, dialogue, a list, numbers, code) so that the prompt is not one repeated
// sentence; it is repeated only when P is longer than the text.
constexpr char kPromptText[] = R"(The river town woke slowly. Bakers pulled the first trays of
bread from their ovens while fishermen argued about the weather on the quay, and a bus full of
schoolchildren rattled over the old stone bridge. By eight o'clock the market square was noisy
with traders setting up stalls of cheese, apples, second-hand books and copper pots.

"Do you think it will rain?" asked the woman at the flower stall.
"The radio says no," replied the baker, "but my knee says yes, and my knee is never wrong."

Memory hierarchy, from fastest to slowest: registers (under a nanosecond), L1 cache (about 1 ns),
L2 cache (3-4 ns), L3 cache (10-20 ns), main memory (60-100 ns), a solid-state disk (tens of
microseconds) and a spinning disk (several milliseconds). A program that streams through memory
in order lets the prefetcher hide much of this latency; one that jumps around at random cannot.

int binary_search(const int* a, int n, int key) {
  int lo = 0, hi = n - 1;
  while (lo <= hi) {
    int mid = lo + (hi - lo) / 2;
    if (a[mid] == key) return mid;
    if (a[mid] < key) lo = mid + 1; else hi = mid - 1;
  }
  return -1;
}

Packing list for a weekend in the mountains: a waterproof jacket, two warm layers, hiking boots,
a map and compass, a head torch with spare batteries, sunscreen, 2 litres of water per person,
and enough food for one extra day. Tell someone where you are going and when you will be back.

In 1969 the Apollo 11 lunar module landed in the Sea of Tranquility. Neil Armstrong and Buzz
Aldrin spent about 21 hours on the surface, collected 21.5 kg of samples and left behind a
seismometer, a laser reflector and a plaque, while Michael Collins orbited alone overhead.
)";

// Positions per KV block (what engine/generator.cc uses).
constexpr int32_t kKvBlockSize = 16;

// One sequence's KV cache: a pool of exactly the blocks it will ever hold, and a step that does
// what a serving step does around the forward pass (Grow, Forward, Trim), so it is timed too.
class Session {
 public:
  static absl::StatusOr<Session> Create(LlamaModel& model, int64_t prompt, int64_t total) {
    Session s;
    const KvLayout layout = model.kv_layout(kKvBlockSize);
    const int64_t blocks = PeakBlocks(layout, prompt, /*chunk=*/prompt, total);
    if (blocks > std::numeric_limits<int32_t>::max()) {
      return absl::ResourceExhaustedError(absl::StrCat("the KV cache needs ", blocks, " blocks"));
    }
    absl::StatusOr<std::unique_ptr<KvCacheManager>> kv =
        KvCacheManager::Create(layout, static_cast<int32_t>(blocks));
    if (!kv.ok()) return kv.status();
    absl::StatusOr<std::unique_ptr<KvPool>> pool =
        model.NewKvPool(static_cast<int32_t>(blocks), kKvBlockSize);
    if (!pool.ok()) return pool.status();
    s.kv_ = std::move(*kv);
    s.pool_ = std::move(*pool);
    s.seq_ = s.kv_->AddSequence();
    return s;
  }

  // Runs `tokens` at positions past.. and replaces *logits with the last position's logits.
  absl::Status Step(LlamaModel& model, int64_t past, absl::Span<const int32_t> tokens,
                    std::vector<float>* logits) {
    if (absl::Status s = kv_->Grow(seq_, past + static_cast<int64_t>(tokens.size())); !s.ok()) {
      return s;
    }
    logits->clear();
    ForwardInput in{.seq = seq_, .past = past, .tokens = tokens};
    absl::Status s = model.Forward({&in, 1}, *kv_, *pool_, logits);
    kv_->Trim(seq_);
    return s;
  }

 private:
  std::unique_ptr<KvCacheManager> kv_;
  std::unique_ptr<KvPool> pool_;
  SeqId seq_ = 0;
};

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int ArgMax(const std::vector<float>& v) {
  return static_cast<int>(std::max_element(v.begin(), v.end()) - v.begin());
}

absl::Status Run() {
  const std::string model_path = absl::GetFlag(FLAGS_model);
  const int threads = absl::GetFlag(FLAGS_threads);
  const int prompt_tokens = absl::GetFlag(FLAGS_prompt_tokens);
  const int gen_tokens = absl::GetFlag(FLAGS_gen_tokens);
  if (prompt_tokens < 1 || gen_tokens < 1) {
    return absl::InvalidArgumentError("--prompt-tokens and --gen-tokens must be at least 1");
  }

  const Clock::time_point load_start = Clock::now();
  absl::StatusOr<ModelFile> file = LoadModel(model_path);
  if (!file.ok()) return file.status();
  std::optional<MoaPlan> plan;
  if (const std::string plan_path = absl::GetFlag(FLAGS_plan); !plan_path.empty()) {
    absl::StatusOr<MoaPlan> p = MoaPlan::FromFile(plan_path);
    if (!p.ok()) return p.status();
    absl::StatusOr<MoaPlan> fitted = p->ForModel(file->config);
    if (!fitted.ok()) return fitted.status();
    plan = std::move(*fitted);
  }
  std::unique_ptr<Backend> backend = NewCpuBackend(threads);
  absl::StatusOr<std::unique_ptr<LlamaModel>> model =
      LlamaModel::Create(*file, backend.get(), plan ? &*plan : nullptr);
  if (!model.ok()) return model.status();
  const double load_s = Seconds(Clock::now() - load_start);
  const int64_t max_context = (*model)->config().max_context;
  if (max_context > 0 && prompt_tokens + gen_tokens > max_context) {
    return absl::InvalidArgumentError(absl::StrCat("P + G = ", prompt_tokens + gen_tokens,
                                                   " exceeds the model's context ", max_context));
  }

  absl::StatusOr<std::unique_ptr<Tokenizer>> tok = Tokenizer::Create(file->tokenizer);
  if (!tok.ok()) return tok.status();
  absl::StatusOr<std::vector<int32_t>> text_ids =
      (*tok)->Encode(kPromptText, /*add_bos=*/false, /*parse_special=*/false);
  if (!text_ids.ok()) return text_ids.status();
  if (text_ids->empty()) return absl::InternalError("the prompt text encodes to no tokens");
  std::vector<int32_t> prompt;
  if (file->tokenizer.add_bos && (*tok)->bos_id() >= 0) prompt.push_back((*tok)->bos_id());
  while (static_cast<int>(prompt.size()) < prompt_tokens) {
    prompt.push_back((*text_ids)[prompt.size() % text_ids->size()]);
  }

  // Warm-up: first touch of the weights and the thread pool, not part of either measurement.
  {
    const auto warm_tokens = absl::MakeConstSpan(prompt).first(std::min<size_t>(8, prompt.size()));
    absl::StatusOr<Session> warm = Session::Create(**model, warm_tokens.size(), warm_tokens.size());
    if (!warm.ok()) return warm.status();
    std::vector<float> logits;
    if (absl::Status s = warm->Step(**model, 0, warm_tokens, &logits); !s.ok()) return s;
  }

  absl::StatusOr<Session> session =
      Session::Create(**model, prompt_tokens, prompt_tokens + gen_tokens);
  if (!session.ok()) return session.status();
  std::vector<float> logits;
  const Clock::time_point prefill_start = Clock::now();
  if (absl::Status s = session->Step(**model, 0, prompt, &logits); !s.ok()) return s;
  const double prefill_s = Seconds(Clock::now() - prefill_start);

  std::vector<int32_t> generated;
  std::vector<double> step_s;
  for (int i = 0; i < gen_tokens; ++i) {
    generated.push_back(ArgMax(logits));
    const Clock::time_point t = Clock::now();
    if (absl::Status s = session->Step(**model, prompt_tokens + i,
                                       absl::MakeConstSpan(&generated.back(), 1), &logits);
        !s.ok()) {
      return s;
    }
    step_s.push_back(Seconds(Clock::now() - t));
  }
  double decode_s = 0;
  for (double s : step_s) decode_s += s;
  const double median_ms = 1e3 * Median(step_s);

  std::printf("model      %s (%s)\n", model_path.c_str(), (*model)->config().name.c_str());
  std::printf("backend    %s, threads %d, plan %s\n", std::string(backend->name()).c_str(), threads,
              plan ? absl::GetFlag(FLAGS_plan).c_str() : "dense");
  std::printf("load       %.2f s\n\n", load_s);
  std::printf("%-8s %8s %10s %12s %16s\n", "phase", "tokens", "time (s)", "tokens/s",
              "median ms/token");
  std::printf("%-8s %8d %10.3f %12.1f %16s\n", "prefill", prompt_tokens, prefill_s,
              prompt_tokens / prefill_s, "-");
  std::printf("%-8s %8d %10.3f %12.1f %16.2f\n", "decode", gen_tokens, decode_s,
              gen_tokens / decode_s, median_ms);

  if (const std::string json_path = absl::GetFlag(FLAGS_json); !json_path.empty()) {
    nlohmann::json j = {
        {"engine", "moa"},
        {"model", model_path},
        {"threads", threads},
        {"plan", absl::GetFlag(FLAGS_plan)},
        {"prompt_tokens", prompt_tokens},
        {"gen_tokens", gen_tokens},
        {"load_s", load_s},
        {"prefill_s", prefill_s},
        {"prefill_tokens_per_s", prompt_tokens / prefill_s},
        {"decode_s", decode_s},
        {"decode_tokens_per_s", gen_tokens / decode_s},
        {"decode_median_ms", median_ms},
        {"prompt_ids", prompt},
        {"generated_ids", generated},
    };
    std::ofstream out(json_path);
    out << j.dump(1) << "\n";
    if (!out) return absl::UnavailableError(absl::StrCat("cannot write ", json_path));
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace moa

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "moa_bench_cpu --model PATH --threads N --prompt-tokens P --gen-tokens G [--plan PLAN]");
  // Flags are spelled with dashes (--prompt-tokens) like the other tools; absl flag names are
  // identifiers, so the dashes of a flag's name (not of its value) become underscores.
  std::vector<std::string> args(argv, argv + argc);
  std::vector<char*> fixed_argv;
  for (std::string& a : args) {
    if (a.rfind("--", 0) == 0) {
      std::replace(a.begin() + 2, std::find(a.begin(), a.end(), '='), '-', '_');
    }
    fixed_argv.push_back(a.data());
  }
  absl::ParseCommandLine(static_cast<int>(fixed_argv.size()), fixed_argv.data());
  if (absl::Status s = moa::Run(); !s.ok()) {
    std::fprintf(stderr, "moa_bench_cpu: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
