#include "engine/generator.h"

#include <algorithm>
#include <limits>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace moa {
namespace {

// Positions per KV block: small, so that window heads give back memory at a fine grain.
constexpr int32_t kKvBlockSize = 16;

}  // namespace

absl::StatusOr<GenerateResult> Generate(LlamaModel& model, const Tokenizer& tokenizer,
                                        absl::Span<const int32_t> prompt,
                                        const GenerateOptions& options,
                                        const std::function<void(std::string_view)>& on_text) {
  const ModelConfig& c = model.config();
  if (prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");
  if (options.max_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens must be at least 1, got ", options.max_tokens));
  }
  if (options.prefill_chunk < 1) return absl::InvalidArgumentError("prefill_chunk must be >= 1");
  if (absl::Status s = ValidateSamplingParams(options.sampling); !s.ok()) return s;
  const int64_t prompt_len = static_cast<int64_t>(prompt.size());
  if (prompt_len >= c.max_context) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the prompt has ", prompt_len, " tokens; the model's context is ", c.max_context));
  }
  // Never generate past the context: the cache holds exactly what can be used.
  const int64_t budget = std::min<int64_t>(options.max_tokens, c.max_context - prompt_len);
  // One sequence: the pool holds exactly the most blocks it ever needs under the plan (windows
  // free their passed blocks after each step, so a long generation with a plan needs less).
  const KvLayout layout = model.kv_layout(kKvBlockSize);
  const int64_t peak = PeakBlocks(layout, prompt_len, options.prefill_chunk, prompt_len + budget);
  if (peak > std::numeric_limits<int32_t>::max()) {
    return absl::ResourceExhaustedError(absl::StrCat("the KV cache needs ", peak, " blocks"));
  }
  absl::StatusOr<std::unique_ptr<KvCacheManager>> kv =
      KvCacheManager::Create(layout, static_cast<int32_t>(peak));
  if (!kv.ok()) return kv.status();
  absl::StatusOr<std::unique_ptr<KvPool>> pool =
      model.NewKvPool(static_cast<int32_t>(peak), kKvBlockSize);
  if (!pool.ok()) return pool.status();
  const SeqId seq = (*kv)->AddSequence();
  std::vector<float> logits;
  // One step: grow the cache to hold the new tokens, run them, free what the windows passed.
  auto step = [&](int64_t past, absl::Span<const int32_t> tokens) -> absl::Status {
    if (absl::Status s = (*kv)->Grow(seq, past + static_cast<int64_t>(tokens.size())); !s.ok()) {
      return s;
    }
    ForwardInput in{seq, past, tokens, false};
    absl::Status s = model.Forward({&in, 1}, **kv, **pool, &logits);
    (*kv)->Trim(seq);
    return s;
  };

  GenerateResult result;
  result.prompt_tokens = prompt_len;
  std::vector<int32_t> history(prompt.begin(), prompt.end());
  const absl::Time t0 = absl::Now();
  for (int64_t start = 0; start < prompt_len; start += options.prefill_chunk) {
    const int64_t n = std::min<int64_t>(options.prefill_chunk, prompt_len - start);
    logits.clear();
    if (absl::Status s = step(start, prompt.subspan(start, n)); !s.ok()) return s;
  }
  const absl::Time t1 = absl::Now();
  result.prefill_seconds = absl::ToDoubleSeconds(t1 - t0);

  Sampler sampler(options.sampling);
  IncrementalDecoder decoder(&tokenizer);
  result.finish_reason = "length";
  for (int64_t i = 0; i < budget; ++i) {
    const int32_t next = sampler.Sample(absl::MakeSpan(logits), history);
    result.tokens.push_back(next);
    history.push_back(next);
    if (options.stop_at_end_of_generation && tokenizer.IsEndOfGeneration(next)) {
      result.finish_reason = "eos";
      break;
    }
    absl::StatusOr<std::string> text = decoder.Add(next);
    if (!text.ok()) return text.status();
    if (!text->empty()) on_text(*text);
    if (i + 1 == budget) break;
    logits.clear();
    const int32_t tok = next;
    if (absl::Status s = step(static_cast<int64_t>(history.size()) - 1, {&tok, 1}); !s.ok()) {
      return s;
    }
  }
  if (std::string rest = decoder.Flush(); !rest.empty()) on_text(rest);
  result.decode_seconds = absl::ToDoubleSeconds(absl::Now() - t1);
  return result;
}

}  // namespace moa
