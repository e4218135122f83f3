#include "engine/engine.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <numeric>
#include <thread>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "engine/stop_matcher.h"
#include "engine/tokenizer/utf8.h"
#include "kvcache/kv_cache_manager.h"

namespace moa {

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kDeadline:
      return "deadline";
    case FinishReason::kError:
      return "error";
  }
  return "unknown";
}

namespace {

absl::Status ValidateOptions(const EngineOptions& o) {
  auto bad = [](auto... parts) { return absl::InvalidArgumentError(absl::StrCat(parts...)); };
  if (o.max_running < 1) return bad("max_running must be >= 1, got ", o.max_running);
  if (o.max_queue < 1) return bad("max_queue must be >= 1, got ", o.max_queue);
  if (o.step_token_budget < o.max_running) {
    return bad("step_token_budget (", o.step_token_budget, ") must be >= max_running (",
               o.max_running, ") so that every running sequence can decode in each step");
  }
  if (o.kv_block_size < 1 || o.kv_block_size > 4096) {
    return bad("kv_block_size must be in [1, 4096], got ", o.kv_block_size);
  }
  if (o.kv_cache_bytes < 1) return bad("kv_cache_bytes must be > 0, got ", o.kv_cache_bytes);
  return absl::OkStatus();
}

bool IsValidUtf8(std::string_view s) {
  size_t pos = 0;
  uint32_t cp = 0;
  while (pos < s.size()) {
    if (!utf8::NextCodePoint(s, &pos, &cp)) return false;
  }
  return true;
}

// log-softmax of `raw` at `token`, and the n most likely tokens (ties: lower id first).
TokenLogprob LogProbs(absl::Span<const float> raw, int32_t token, int n) {
  const float mx = *std::max_element(raw.begin(), raw.end());
  double sum = 0;
  for (float x : raw) sum += std::exp(static_cast<double>(x) - mx);
  const double lse = mx + std::log(sum);
  TokenLogprob lp;
  lp.token = token;
  lp.logprob = static_cast<float>(raw[token] - lse);
  n = std::min<int>(n, static_cast<int>(raw.size()));
  std::vector<int32_t> ids(raw.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::partial_sort(ids.begin(), ids.begin() + n, ids.end(), [&](int32_t a, int32_t b) {
    return raw[a] > raw[b] || (raw[a] == raw[b] && a < b);
  });
  for (int i = 0; i < n; ++i) {
    lp.top.emplace_back(ids[i], static_cast<float>(raw[ids[i]] - lse));
  }
  return lp;
}

class EngineImpl final : public Engine {
 public:
  EngineImpl(LlamaModel* model, const Tokenizer* tokenizer, const EngineOptions& options,
             EngineObserver* observer, std::unique_ptr<KvCacheManager> kv,
             std::unique_ptr<KvPool> pool)
      : model_(model),
        tokenizer_(tokenizer),
        options_(options),
        observer_(observer),
        kv_(std::move(kv)),
        pool_(std::move(pool)) {}
  ~EngineImpl() override { Shutdown(); }

  void Start() {
    thread_ = std::thread([this] { Loop(); });
  }

  absl::StatusOr<int64_t> Submit(GenerationRequest request, ChunkCallback on_chunk) override;
  void Cancel(int64_t request_id) override;
  void StopAccepting() override;
  void Shutdown() override;

  int running() const override {
    absl::MutexLock l(&mu_);
    return static_cast<int>(running_.size());
  }
  int waiting() const override {
    absl::MutexLock l(&mu_);
    return static_cast<int>(waiting_.size());
  }
  int64_t kv_blocks_used() const override {
    absl::MutexLock l(&mu_);
    return kv_->used_blocks();
  }
  int64_t kv_blocks_total() const override { return kv_->total_blocks(); }
  absl::Status CheckIdle() const override;

 private:
  struct Request {
    Request(const SamplingParams& p, const Tokenizer* tok, std::vector<std::string> stops)
        : sampler(p), decoder(tok), stop(std::move(stops)) {}
    int64_t id = 0;
    GenerationRequest req;
    ChunkCallback on_chunk;
    absl::Time submitted;
    // Everything below is only touched by the engine thread, except `cancel` (under mu_).
    std::vector<int32_t> tokens;  // the prompt, then every generated token
    int64_t prompt_len = 0;
    int64_t computed = 0;         // tokens of `tokens` in the KV cache
    int64_t prompt_reported = 0;  // prompt tokens reported to the observer
    SeqId seq = 0;                // 0: holds no KV blocks
    bool ever_scheduled = false;
    absl::Time first_scheduled;
    bool has_token = false;
    absl::Time first_token, last_token;
    Sampler sampler;
    TokenCounts seen;  // the penalties' counts of tokens[0, counted)
    int64_t counted = 0;
    IncrementalDecoder decoder;
    StopMatcher stop;
    bool cancel = false;

    int64_t generated() const { return static_cast<int64_t>(tokens.size()) - prompt_len; }
    int64_t pending() const { return static_cast<int64_t>(tokens.size()) - computed; }
  };
  using RequestPtr = std::shared_ptr<Request>;

  // What a step hands out once the lock is released: observer events first, then chunks, so
  // that a client that has its last chunk also finds it in the metrics.
  struct Outbox {
    std::vector<std::function<void()>> events;
    std::vector<std::pair<RequestPtr, GenerationChunk>> chunks;
  };
  struct Scheduled {
    RequestPtr r;
    int64_t n = 0;  // tokens fed this step
  };

  void Loop();
  void Deliver(Outbox& out);
  // Finishes cancelled requests, those past their deadline, and (when shutting down) all.
  void SweepLocked(absl::Time now, Outbox* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<Scheduled> ScheduleLocked(absl::Time now, Outbox* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void PreemptLocked(const RequestPtr& r, Outbox* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Largest n in [1, max_n] whose growth fits in the free blocks, 0 if none.
  int64_t LargestFitLocked(const Request& r, int64_t max_n) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RunStep(std::vector<Scheduled> batch, absl::Time step_start);
  // Takes `token`, the next token of `r` (`raw`: its logits row when r wants logprobs); returns
  // the token's chunk, with a finish reason if the token ends the generation.
  GenerationChunk ProcessToken(Request& r, int32_t token, absl::Span<const float> raw,
                               absl::Time now, std::vector<std::function<void()>>* events);
  // Removes `r` from the engine, frees its blocks and queues its last chunk (`last` carries
  // the finishing token, if any). Text still held back is flushed unless the reason is kStop or
  // kError.
  void FinishLocked(const RequestPtr& r, FinishReason reason, GenerationChunk last, absl::Time now,
                    Outbox* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SnapshotLocked(Outbox* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  LlamaModel* const model_;
  const Tokenizer* const tokenizer_;
  const EngineOptions options_;
  EngineObserver* const observer_;
  // Mutated (Grow, Trim, Release) only by the engine thread under mu_; Forward reads it without
  // the lock, which is safe because other threads only read it.
  const std::unique_ptr<KvCacheManager> kv_;
  const std::unique_ptr<KvPool> pool_;

  mutable absl::Mutex mu_;
  absl::CondVar cv_;
  bool accepting_ ABSL_GUARDED_BY(mu_) = true;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  int64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  absl::flat_hash_map<int64_t, RequestPtr> requests_ ABSL_GUARDED_BY(mu_);
  std::deque<RequestPtr> waiting_ ABSL_GUARDED_BY(mu_);
  std::vector<RequestPtr> running_ ABSL_GUARDED_BY(mu_);  // oldest admission first

  absl::Mutex join_mu_;
  std::thread thread_;
};

absl::StatusOr<int64_t> EngineImpl::Submit(GenerationRequest request, ChunkCallback on_chunk) {
  auto bad = [](auto... parts) { return absl::InvalidArgumentError(absl::StrCat(parts...)); };
  const ModelConfig& c = model_->config();
  const int64_t prompt_len = static_cast<int64_t>(request.prompt.size());
  if (!on_chunk) return bad("no chunk callback");
  if (prompt_len == 0) return bad("prompt: empty");
  for (size_t i = 0; i < request.prompt.size(); ++i) {
    const int32_t t = request.prompt[i];
    if (t < 0 || t >= c.vocab_size) {
      return bad("prompt: token ", i, " has id ", t, ", outside the vocabulary [0, ", c.vocab_size,
                 ")");
    }
  }
  if (request.max_tokens < 1) return bad("max_tokens must be >= 1, got ", request.max_tokens);
  if (prompt_len + request.max_tokens > c.max_context) {
    return bad("prompt (", prompt_len, " tokens) + max_tokens (", request.max_tokens,
               ") exceed the model's context of ", c.max_context, " tokens");
  }
  if (absl::Status s = ValidateSamplingParams(request.sampling); !s.ok()) {
    return bad("sampling: ", s.message());
  }
  if (request.top_logprobs < 0 || request.top_logprobs > kMaxTopLogprobs) {
    return bad("top_logprobs must be in [0, ", kMaxTopLogprobs, "], got ", request.top_logprobs);
  }
  if (static_cast<int64_t>(request.stop_strings.size()) > kMaxStopStrings) {
    return bad("stop_strings: ", request.stop_strings.size(), " given, at most ", kMaxStopStrings);
  }
  for (size_t i = 0; i < request.stop_strings.size(); ++i) {
    const std::string& s = request.stop_strings[i];
    if (s.empty() || static_cast<int64_t>(s.size()) > kMaxStopStringBytes) {
      return bad("stop_strings[", i, "]: ", s.size(), " bytes, must be 1 to ", kMaxStopStringBytes);
    }
    if (!IsValidUtf8(s)) return bad("stop_strings[", i, "]: not valid UTF-8");
  }
  if (static_cast<int64_t>(request.stop_token_ids.size()) > kMaxStopTokenIds) {
    return bad("stop_token_ids: ", request.stop_token_ids.size(), " given, at most ",
               kMaxStopTokenIds);
  }
  for (size_t i = 0; i < request.stop_token_ids.size(); ++i) {
    const int32_t t = request.stop_token_ids[i];
    if (t < 0 || t >= c.vocab_size) {
      return bad("stop_token_ids[", i, "]: id ", t, " outside the vocabulary [0, ", c.vocab_size,
                 ")");
    }
  }
  // The most blocks this request holds when it runs alone (prefill in chunks of the step
  // budget, then decode; the last token is never fed). If the pool holds that, a request that
  // has the pool to itself always completes, so the scheduler can always make progress.
  const int64_t peak = PeakBlocks(kv_->layout(), prompt_len, options_.step_token_budget,
                                  prompt_len + request.max_tokens - 1);
  if (peak > kv_->total_blocks()) {
    return bad("prompt (", prompt_len, " tokens) + max_tokens (", request.max_tokens, ") need ",
               peak, " KV blocks; the pool has ", kv_->total_blocks());
  }

  auto r = std::make_shared<Request>(request.sampling, tokenizer_, request.stop_strings);
  r->tokens = request.prompt;
  r->prompt_len = prompt_len;
  r->req = std::move(request);
  r->on_chunk = std::move(on_chunk);
  r->submitted = absl::Now();
  absl::MutexLock l(&mu_);
  if (!accepting_) return absl::UnavailableError("the engine is not accepting requests");
  if (static_cast<int64_t>(waiting_.size()) >= options_.max_queue) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the queue is full (", waiting_.size(), " requests waiting)"));
  }
  r->id = next_id_++;
  requests_[r->id] = r;
  waiting_.push_back(r);
  cv_.Signal();
  return r->id;
}

void EngineImpl::Cancel(int64_t request_id) {
  absl::MutexLock l(&mu_);
  auto it = requests_.find(request_id);
  if (it == requests_.end()) return;
  it->second->cancel = true;
  cv_.Signal();
}

void EngineImpl::StopAccepting() {
  absl::MutexLock l(&mu_);
  accepting_ = false;
}

void EngineImpl::Shutdown() {
  {
    absl::MutexLock l(&mu_);
    accepting_ = false;
    shutdown_ = true;
    cv_.Signal();
  }
  absl::MutexLock l(&join_mu_);
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

absl::Status EngineImpl::CheckIdle() const {
  absl::MutexLock l(&mu_);
  if (!requests_.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("engine not idle: ", requests_.size(),
                                                      " requests (", running_.size(), " running, ",
                                                      waiting_.size(), " waiting)"));
  }
  if (kv_->num_sequences() != 0) {
    return absl::InternalError(
        absl::StrCat("engine idle but the KV cache has ", kv_->num_sequences(), " sequences"));
  }
  if (kv_->free_blocks() != kv_->total_blocks()) {
    return absl::InternalError(absl::StrCat("engine idle but ", kv_->used_blocks(), " of ",
                                            kv_->total_blocks(), " KV blocks are in use"));
  }
  return kv_->CheckInvariants();
}

void EngineImpl::Deliver(Outbox& out) {
  for (auto& e : out.events) e();
  for (auto& [r, chunk] : out.chunks) r->on_chunk(chunk);
  out.events.clear();
  out.chunks.clear();
}

void EngineImpl::SnapshotLocked(Outbox* out) {
  if (observer_ == nullptr) return;
  int64_t dense = 0;
  for (const RequestPtr& r : running_) dense += kv_->dense_blocks(r->seq);
  const int running = static_cast<int>(running_.size());
  const int waiting = static_cast<int>(waiting_.size());
  const int64_t used = kv_->used_blocks(), total = kv_->total_blocks();
  out->events.push_back([this, running, waiting, used, total, dense] {
    observer_->OnQueueChange(running, waiting);
    observer_->OnKvBlocks(used, total, dense);
  });
}

void EngineImpl::FinishLocked(const RequestPtr& r, FinishReason reason, GenerationChunk last,
                              absl::Time now, Outbox* out) {
  if (r->seq != 0) {
    // Release only fails for an unknown sequence, which would be a bookkeeping bug that
    // CheckIdle reports through CheckInvariants.
    kv_->Release(r->seq).IgnoreError();
    r->seq = 0;
  }
  if (auto it = std::find(running_.begin(), running_.end(), r); it != running_.end()) {
    running_.erase(it);
  } else if (auto w = std::find(waiting_.begin(), waiting_.end(), r); w != waiting_.end()) {
    waiting_.erase(w);
  }
  requests_.erase(r->id);

  if (reason != FinishReason::kStop && reason != FinishReason::kError) {
    // The decoder's incomplete tail (as U+FFFD) may still complete a stop string.
    StopMatcher::Result m = r->stop.Add(r->decoder.Flush());
    last.text += m.text;
    if (m.matched >= 0) {
      reason = FinishReason::kStop;
      last.stop_matched = r->req.stop_strings[m.matched];
    } else {
      last.text += r->stop.Flush();
    }
  }
  last.finish = reason;
  last.prompt_tokens = r->prompt_len;
  last.generated_tokens = r->generated();
  const absl::Time scheduled = r->ever_scheduled ? r->first_scheduled : now;
  last.queued_seconds = absl::ToDoubleSeconds(scheduled - r->submitted);
  last.ttft_seconds = r->has_token ? absl::ToDoubleSeconds(r->first_token - r->submitted) : 0.0;
  last.total_seconds = absl::ToDoubleSeconds(now - r->submitted);
  if (observer_ != nullptr) {
    const double e2e = last.total_seconds;
    out->events.push_back([this, reason, e2e] { observer_->OnFinish(reason, e2e); });
  }
  out->chunks.emplace_back(r, std::move(last));
}

void EngineImpl::SweepLocked(absl::Time now, Outbox* out) {
  std::vector<std::pair<RequestPtr, FinishReason>> done;
  for (const auto& [id, r] : requests_) {
    if (shutdown_ || r->cancel) {
      done.emplace_back(r, FinishReason::kCancelled);
    } else if (now >= r->req.deadline) {
      done.emplace_back(r, FinishReason::kDeadline);
    }
  }
  // In submission order, so that chunks of one sweep arrive in a predictable order.
  std::sort(done.begin(), done.end(),
            [](const auto& a, const auto& b) { return a.first->id < b.first->id; });
  for (auto& [r, reason] : done) FinishLocked(r, reason, GenerationChunk{}, now, out);
}

int64_t EngineImpl::LargestFitLocked(const Request& r, int64_t max_n) const {
  const int64_t free = kv_->free_blocks();
  int64_t lo = 0, hi = max_n;  // lo fits (0 trivially), find the largest
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (kv_->BlocksToGrow(r.seq, r.computed + mid) <= free) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

void EngineImpl::PreemptLocked(const RequestPtr& r, Outbox* out) {
  kv_->Release(r->seq).IgnoreError();
  r->seq = 0;
  // Recomputed later from the prompt and the tokens generated so far; its sampler, decoder and
  // stop matcher keep their state, so it continues exactly where it stopped.
  r->computed = 0;
  running_.erase(std::find(running_.begin(), running_.end(), r));
  waiting_.push_front(r);
  if (observer_ != nullptr) out->events.push_back([this] { observer_->OnPreemption(); });
}

std::vector<EngineImpl::Scheduled> EngineImpl::ScheduleLocked(absl::Time now, Outbox* out) {
  std::vector<Scheduled> batch;
  int64_t decodes = 0;
  for (const RequestPtr& r : running_) decodes += r->pending() == 1;
  // Decodes first: each running decode gets its token; prefill chunks share what is left.
  int64_t prefill_left = options_.step_token_budget - decodes;
  bool preempted = false;
  for (int64_t i = 0; i < static_cast<int64_t>(running_.size()); ++i) {
    const RequestPtr r = running_[i];
    const bool decode = r->pending() == 1;
    int64_t n = decode ? 1 : std::min(r->pending(), prefill_left);
    if (n <= 0) continue;
    bool runs = true;
    while (kv_->BlocksToGrow(r->seq, r->computed + n) > kv_->free_blocks()) {
      if (!decode) {
        // A smaller chunk rather than a preemption.
        if (const int64_t fit = LargestFitLocked(*r, n); fit > 0) {
          n = fit;
          break;
        }
      }
      if (running_.back() != r) {  // the newest sequence gives its blocks back
        PreemptLocked(running_.back(), out);
        preempted = true;
        continue;
      }
      runs = false;
      if (i > 0) {  // r is the newest: it waits until older ones free blocks
        PreemptLocked(r, out);
        preempted = true;
      } else {
        // Alone and no room for one more token: Submit's peak check rules this out, so the
        // pool accounting is broken; fail the request rather than loop.
        GenerationChunk last;
        last.error = absl::StrCat("internal: the KV cache cannot hold ", r->computed + n,
                                  " tokens of a sequence that has it to itself");
        FinishLocked(r, FinishReason::kError, std::move(last), now, out);
      }
      break;
    }
    if (!runs) break;  // r was the last of running_
    if (absl::Status s = kv_->Grow(r->seq, r->computed + n); !s.ok()) {
      GenerationChunk last;
      last.error = absl::StrCat("internal: ", s.message());
      FinishLocked(r, FinishReason::kError, std::move(last), now, out);
      --i;
      continue;
    }
    if (!decode) prefill_left -= n;
    batch.push_back({r, n});
  }
  // FCFS admission; none in a step that had to preempt, which would only thrash. A newcomer
  // leaves room for every running sequence to enter a new block on all its heads once, so that
  // admitting it does not force a preemption at the very next step.
  const KvLayout& layout = kv_->layout();
  const int64_t blocks_per_position = int64_t{layout.n_layers} * layout.n_kv_heads;
  while (!preempted && !waiting_.empty() &&
         static_cast<int64_t>(running_.size()) < options_.max_running && prefill_left > 0) {
    const RequestPtr r = waiting_.front();
    int64_t n = std::min(r->pending(), prefill_left);
    if (running_.empty()) {
      // Alone it must run, if need be in smaller chunks: a recomputed sequence (prompt and
      // generated tokens) may not fit in one chunk where its prompt did.
      const int64_t fit = kv_->free_blocks() / blocks_per_position * layout.block_size;
      n = std::min(n, fit);
      if (n < 1) break;  // unreachable: Submit's peak check guarantees a block per head
    } else {
      const int64_t reserve = static_cast<int64_t>(running_.size()) * blocks_per_position;
      if (kv_->BlocksForNew(n) + reserve > kv_->free_blocks()) break;
    }
    waiting_.pop_front();
    r->seq = kv_->AddSequence();
    running_.push_back(r);
    if (absl::Status s = kv_->Grow(r->seq, n); !s.ok()) {
      GenerationChunk last;
      last.error = absl::StrCat("internal: ", s.message());
      FinishLocked(r, FinishReason::kError, std::move(last), now, out);
      continue;
    }
    if (!r->ever_scheduled) {
      r->ever_scheduled = true;
      r->first_scheduled = now;
    }
    prefill_left -= n;
    batch.push_back({r, n});
  }
  return batch;
}

GenerationChunk EngineImpl::ProcessToken(Request& r, int32_t token, absl::Span<const float> raw,
                                         absl::Time now,
                                         std::vector<std::function<void()>>* events) {
  GenerationChunk c;
  r.tokens.push_back(token);
  c.tokens.push_back(token);
  if (r.req.top_logprobs > 0) c.logprobs.push_back(LogProbs(raw, token, r.req.top_logprobs));
  if (observer_ != nullptr) {
    if (!r.has_token) {
      const double ttft = absl::ToDoubleSeconds(now - r.submitted);
      const double queued = absl::ToDoubleSeconds(r.first_scheduled - r.submitted);
      events->push_back([this, ttft, queued] { observer_->OnFirstToken(ttft, queued); });
    } else {
      const double gap = absl::ToDoubleSeconds(now - r.last_token);
      events->push_back([this, gap] { observer_->OnInterToken(gap); });
    }
  }
  if (!r.has_token) r.first_token = now;
  r.has_token = true;
  r.last_token = now;

  const auto& stop_ids = r.req.stop_token_ids;
  if (std::find(stop_ids.begin(), stop_ids.end(), token) != stop_ids.end()) {
    c.finish = FinishReason::kStop;
    c.stop_matched = absl::StrCat("token:", token);
    return c;
  }
  if (!r.req.ignore_eos && tokenizer_->IsEndOfGeneration(token)) {
    c.finish = FinishReason::kEos;
    return c;
  }
  absl::StatusOr<std::string> text = r.decoder.Add(token);
  if (!text.ok()) {
    c.finish = FinishReason::kError;
    c.error = absl::StrCat("detokenizing token ", token, ": ", text.status().message());
    return c;
  }
  StopMatcher::Result m = r.stop.Add(*text);
  c.text = std::move(m.text);
  if (m.matched >= 0) {
    c.finish = FinishReason::kStop;
    c.stop_matched = r.req.stop_strings[m.matched];
    return c;
  }
  if (r.generated() >= r.req.max_tokens) c.finish = FinishReason::kLength;
  return c;
}

void EngineImpl::RunStep(std::vector<Scheduled> batch, absl::Time step_start) {
  const int vocab = model_->config().vocab_size;
  std::vector<ForwardInput> inputs;
  int64_t batch_tokens = 0;
  for (const Scheduled& s : batch) {
    ForwardInput in;
    in.seq = s.r->seq;
    in.past = s.r->computed;
    in.tokens = absl::MakeConstSpan(s.r->tokens).subspan(s.r->computed, s.n);
    inputs.push_back(in);
    batch_tokens += s.n;
  }
  // The backend picks every row's token (a device backend copies back only the tokens). A row
  // that ends its prompt or decodes takes its request's parameters, penalties over the tokens so
  // far and the request's next draw (one per sampled token, as when the host sampled, so seeds
  // give the same streams); other rows (prefill chunks before the prompt's last) are picked
  // greedily and dropped. The logits come back only when some row wants logprobs.
  std::vector<SampleRow> rows(batch.size());
  bool want_logits = false;
  for (size_t i = 0; i < batch.size(); ++i) {
    Request& r = *batch[i].r;
    if (r.computed + batch[i].n != static_cast<int64_t>(r.tokens.size())) continue;
    rows[i].params = r.sampler.params();
    if (HasPenalties(rows[i].params)) {
      AddTokenCounts(absl::MakeConstSpan(r.tokens).subspan(r.counted), vocab, &r.seen);
      r.counted = static_cast<int64_t>(r.tokens.size());
      rows[i].penalty_ids = r.seen.ids;
      rows[i].penalty_counts = r.seen.counts;
    }
    rows[i].u = r.sampler.NextUniform();
    want_logits |= r.req.top_logprobs > 0;
  }
  std::vector<int32_t> sampled;
  std::vector<float> logits;
  const absl::Status fwd = model_->ForwardAndSample(inputs, *kv_, *pool_, rows, &sampled,
                                                    want_logits ? &logits : nullptr);

  Outbox out;
  if (!fwd.ok()) {
    absl::MutexLock l(&mu_);
    const absl::Time now = absl::Now();
    for (const Scheduled& s : batch) {
      GenerationChunk last;
      last.error = absl::StrCat("forward pass: ", fwd.ToString());
      FinishLocked(s.r, FinishReason::kError, std::move(last), now, &out);
    }
    SnapshotLocked(&out);
  } else {
    int64_t prompt_tokens = 0;
    {
      absl::MutexLock l(&mu_);
      for (const Scheduled& s : batch) {
        // New prompt positions, counted once even if a preemption makes us compute them again.
        const int64_t prompt_end = std::min(s.r->computed + s.n, s.r->prompt_len);
        prompt_tokens += std::max<int64_t>(0, prompt_end - s.r->prompt_reported);
        s.r->prompt_reported = std::max(s.r->prompt_reported, prompt_end);
        s.r->computed += s.n;
        kv_->Trim(s.r->seq);
      }
    }
    // Sampling and detokenization touch only engine-thread state: no lock.
    const absl::Time now = absl::Now();
    std::vector<std::pair<RequestPtr, GenerationChunk>> produced;
    for (size_t i = 0; i < batch.size(); ++i) {
      Request& r = *batch[i].r;
      if (r.pending() != 0) continue;  // a prefill chunk that is not the prompt's last
      absl::Span<const float> raw;
      if (r.req.top_logprobs > 0) raw = absl::MakeConstSpan(logits).subspan(i * vocab, vocab);
      produced.emplace_back(batch[i].r, ProcessToken(r, sampled[i], raw, now, &out.events));
    }
    absl::MutexLock l(&mu_);
    for (auto& [r, chunk] : produced) {
      if (chunk.finish == FinishReason::kNone) {
        out.chunks.emplace_back(r, std::move(chunk));
      } else {
        const FinishReason reason = chunk.finish;
        FinishLocked(r, reason, std::move(chunk), now, &out);
      }
    }
    if (observer_ != nullptr) {
      const int64_t generated = static_cast<int64_t>(produced.size());
      const double seconds = absl::ToDoubleSeconds(absl::Now() - step_start);
      const int seqs = static_cast<int>(batch.size());
      out.events.push_back([this, prompt_tokens, generated, seconds, seqs, batch_tokens] {
        observer_->OnTokens(prompt_tokens, generated);
        observer_->OnStep(seconds, seqs, static_cast<int>(batch_tokens));
      });
    }
    SnapshotLocked(&out);
  }
  batch.clear();  // drop references before the callbacks run
  Deliver(out);
}

void EngineImpl::Loop() {
  for (;;) {
    Outbox out;
    std::vector<Scheduled> batch;
    bool exit = false;
    absl::Time start;
    {
      absl::MutexLock l(&mu_);
      while (!shutdown_ && requests_.empty()) cv_.Wait(&mu_);
      const absl::Time now = start = absl::Now();
      SweepLocked(now, &out);
      if (shutdown_) {
        exit = true;
      } else {
        batch = ScheduleLocked(now, &out);
        // Nothing runnable although requests remain (all just preempted or finished): wait a
        // little for a cancel or a deadline rather than spin.
        if (batch.empty() && !requests_.empty()) cv_.WaitWithTimeout(&mu_, absl::Milliseconds(1));
      }
      SnapshotLocked(&out);
    }
    Deliver(out);
    if (exit) return;
    if (!batch.empty()) RunStep(std::move(batch), start);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(LlamaModel* model,
                                                       const Tokenizer* tokenizer,
                                                       const EngineOptions& options,
                                                       EngineObserver* observer) {
  if (model == nullptr || tokenizer == nullptr) {
    return absl::InvalidArgumentError("Engine: a model and a tokenizer are required");
  }
  if (absl::Status s = ValidateOptions(options); !s.ok()) return s;
  const int64_t block_bytes = model->BytesPerKvBlock(options.kv_block_size);
  if (block_bytes <= 0) {
    return absl::InternalError(absl::StrCat("Engine: KV block of ", block_bytes, " bytes"));
  }
  const int64_t blocks =
      std::min<int64_t>(options.kv_cache_bytes / block_bytes, std::numeric_limits<int32_t>::max());
  if (blocks < 1) {
    return absl::InvalidArgumentError(absl::StrCat("kv_cache_bytes (", options.kv_cache_bytes,
                                                   ") is smaller than one KV block (", block_bytes,
                                                   " bytes)"));
  }
  absl::StatusOr<std::unique_ptr<KvCacheManager>> kv =
      KvCacheManager::Create(model->kv_layout(options.kv_block_size), static_cast<int32_t>(blocks));
  if (!kv.ok()) return kv.status();
  absl::StatusOr<std::unique_ptr<KvPool>> pool =
      model->NewKvPool(static_cast<int32_t>(blocks), options.kv_block_size);
  if (!pool.ok()) return pool.status();
  auto engine = std::make_unique<EngineImpl>(model, tokenizer, options, observer, *std::move(kv),
                                             *std::move(pool));
  engine->Start();
  return engine;
}

}  // namespace moa
