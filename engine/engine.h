// The serving engine: a queue of generation requests, a continuous-batching scheduler over
// paged KV blocks, and a loop thread that runs one model step at a time. Thread-safe; the gRPC
// server (server/) is one client of it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/llama_model.h"
#include "engine/sampler.h"
#include "engine/tokenizer/tokenizer.h"

namespace moa {

struct EngineOptions {
  int32_t max_running = 16;              // sequences decoded together
  int32_t max_queue = 64;                // waiting requests; more are refused at once
  int32_t step_token_budget = 512;       // tokens per step (decodes + prefill chunks);
                                         // at least max_running so every decode fits
  int64_t kv_cache_bytes = 256LL << 20;  // memory of the KV block pool
  int32_t kv_block_size = 16;            // positions per KV block
};

// Limits on a request that Submit enforces (the server checks the same ones first).
inline constexpr int kMaxStopStrings = 16;
inline constexpr int kMaxStopStringBytes = 256;
inline constexpr int kMaxStopTokenIds = 64;
inline constexpr int kMaxTopLogprobs = 20;

struct GenerationRequest {
  // Token ids: non-empty, each in [0, vocab); prompt + max_tokens must fit the context.
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int32_t max_tokens = 256;  // >= 1
  std::vector<std::string> stop_strings;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  int32_t top_logprobs = 0;  // 0 = none
  absl::Time deadline = absl::InfiniteFuture();
};

enum class FinishReason { kNone, kEos, kLength, kStop, kCancelled, kDeadline, kError };
const char* FinishReasonName(FinishReason r);

struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top;  // top_logprobs alternatives, best first
};

// One streamed chunk. Every sampled token is sent in a chunk of its own; its text delta may be
// empty while an incomplete UTF-8 character or the possible start of a stop string is held back.
// The last chunk of a request has finish != kNone and the counts and timings; when a token ends
// the generation (eos, a stop, length) that token travels in the last chunk, with the text still
// held back flushed into it, except that for kStop no text at or after the stop string is ever
// sent (the token that ended it is listed, its text is not). kCancelled, kDeadline and kError
// chunks carry no token.
struct GenerationChunk {
  std::vector<int32_t> tokens;
  std::string text;
  std::vector<TokenLogprob> logprobs;  // one per token when asked for
  FinishReason finish = FinishReason::kNone;
  std::string stop_matched;  // the stop string or "token:<id>" that ended it
  std::string error;         // for kError
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;
  double queued_seconds = 0;  // from Submit to the first scheduled step
  double ttft_seconds = 0;    // from Submit to the first token
  double total_seconds = 0;
};

// Observes the engine for metrics; called from the engine thread, never under an engine lock,
// and always before the chunks of the same step are delivered (so a client that has seen its
// last chunk also sees the metrics counting it). Must not block.
class EngineObserver {
 public:
  virtual ~EngineObserver() = default;
  // After each forward step: its duration (scheduling, forward, sampling) and batch size.
  virtual void OnStep(double seconds, int batch_sequences, int batch_tokens) {}
  // Whenever the engine has changed its queues (at least once per step).
  virtual void OnQueueChange(int running, int waiting) {}
  // KV blocks in use, the pool size, and what the same sequences would hold with dense heads.
  virtual void OnKvBlocks(int64_t used, int64_t total, int64_t dense_equivalent_used) {}
  virtual void OnPreemption() {}
  // Prompt tokens prefilled for the first time (recomputation after a preemption is not
  // counted again) and tokens generated, per step.
  virtual void OnTokens(int64_t prompt_tokens, int64_t generated_tokens) {}
  virtual void OnFirstToken(double ttft_seconds, double queued_seconds) {}
  virtual void OnInterToken(double seconds) {}
  // Once per request, with the time from Submit to its last chunk.
  virtual void OnFinish(FinishReason reason, double e2e_seconds) {}
};

class Engine {
 public:
  using ChunkCallback = std::function<void(const GenerationChunk&)>;

  // The model and tokenizer must outlive the engine. Starts the loop thread.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(LlamaModel* model,
                                                        const Tokenizer* tokenizer,
                                                        const EngineOptions& options,
                                                        EngineObserver* observer);
  virtual ~Engine() = default;

  // Queues a request; on_chunk is called from the engine thread (never under an engine lock, so
  // it may call Cancel or Submit) for every chunk, the last with a finish reason, exactly once.
  // By the time the last chunk arrives the request's KV blocks are free. INVALID_ARGUMENT
  // naming the field for a bad request (empty prompt, token id out of range, max_tokens < 1,
  // prompt + max_tokens past the context, sampling parameters, stops, logprobs) or one the KV
  // pool can never hold; UNAVAILABLE while draining; RESOURCE_EXHAUSTED at once when the queue
  // is full. Returns the request id.
  virtual absl::StatusOr<int64_t> Submit(GenerationRequest request, ChunkCallback on_chunk) = 0;
  // Finishes the request with kCancelled at the next step and frees its blocks; unknown or
  // finished ids are ignored.
  virtual void Cancel(int64_t request_id) = 0;
  // Stops accepting requests (UNAVAILABLE); running ones go on.
  virtual void StopAccepting() = 0;
  // Cancels everything (each request gets its kCancelled chunk) and joins the loop thread.
  // Idempotent; the destructor calls it. Must not be called from a chunk callback.
  virtual void Shutdown() = 0;

  virtual int running() const = 0;
  virtual int waiting() const = 0;
  virtual int64_t kv_blocks_used() const = 0;
  virtual int64_t kv_blocks_total() const = 0;
  // Engine idle: no request anywhere and every KV block free (the idle invariant).
  virtual absl::Status CheckIdle() const = 0;
};

}  // namespace moa
