// The continuous-batching engine: batch invariance, preemption, chunked prefill, the request life
// cycle (cancel, deadline, queue limits, shutdown), stops, logprobs and fault injection. Most
// tests run a tiny random model with a token-per-word test tokenizer; the default model, when
// present, checks batch invariance on real text.
#include "engine/engine.h"

#include <atomic>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "engine/moa_plan.h"
#include "engine/model/model_file.h"
#include "engine/stop_matcher.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "tests/engine_run_all.h"
#include "tests/test_util.h"

namespace moa {
namespace {

// ---------------------------------------------------------------------------------------------
// StopMatcher.

TEST(StopMatcher, HoldsBackAPossibleStartAndCutsAtTheStop) {
  StopMatcher m({"STOP", "xy"});
  StopMatcher::Result r = m.Add("abc ST");
  EXPECT_EQ(r.text, "abc ");  // "ST" may start "STOP"
  EXPECT_EQ(r.matched, -1);
  r = m.Add("O");
  EXPECT_EQ(r.text, "");
  r = m.Add("Pzz");
  EXPECT_EQ(r.text, "");
  EXPECT_EQ(r.matched, 0);
  EXPECT_EQ(m.Flush(), "");
}

TEST(StopMatcher, ReleasesTextThatTurnsOutNotToBeAStop) {
  StopMatcher m({"STOP"});
  EXPECT_EQ(m.Add("ab S").text, "ab ");
  EXPECT_EQ(m.Add("Tx").text, "STx");
  EXPECT_EQ(m.Add("S").text, "");
  EXPECT_EQ(m.Flush(), "S");
}

TEST(StopMatcher, EarliestOccurrenceWins) {
  StopMatcher m({"later", "b"});
  StopMatcher::Result r = m.Add("a later b");
  EXPECT_EQ(r.matched, 0);
  EXPECT_EQ(r.text, "a ");
  StopMatcher none({});
  EXPECT_EQ(none.Add("anything").text, "anything");
}

TEST(StopMatcher, OverlappingPrefixKeepsTheLongestTail) {
  StopMatcher m({"aab"});
  EXPECT_EQ(m.Add("xaa").text, "x");
  StopMatcher::Result r = m.Add("ab");  // "xaaab": the stop starts at the second 'a'
  EXPECT_EQ(r.matched, 0);
  EXPECT_EQ(r.text, "a");
}

// ---------------------------------------------------------------------------------------------
// The shared tiny random model (tests/test_util.h) and a tokenizer whose token i is "w<i> ".

using testing::RandomTokens;
using testing::TinyConfig;

// Peaked logits (output projection 4x): greedy text varies from prompt to prompt.
ModelFile TinyModel(const ModelConfig& c, unsigned seed) {
  return testing::TinyModel(c, seed, 4.0f);
}

class WordTokenizer : public Tokenizer {
 public:
  explicit WordTokenizer(int32_t vocab) : vocab_(vocab) {}
  static std::string Piece(int32_t id) { return absl::StrCat("w", id, " "); }

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool, bool) const override {
    std::vector<int32_t> ids;
    // (Abseil here has its own string_view.)
    for (absl::string_view w :
         absl::StrSplit(absl::string_view(text.data(), text.size()), ' ', absl::SkipEmpty())) {
      int32_t id = 0;
      if (w.size() < 2 || w[0] != 'w' || !absl::SimpleAtoi(w.substr(1), &id) || id < 0 ||
          id >= vocab_) {
        return absl::InvalidArgumentError(absl::StrCat("not a word token: ", w));
      }
      ids.push_back(id);
    }
    return ids;
  }
  absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids) const override {
    std::string out;
    for (int32_t id : ids) {
      if (id < 0 || id >= vocab_) return absl::InvalidArgumentError("id out of range");
      out += Piece(id);
    }
    return out;
  }
  int32_t vocab_size() const override { return vocab_; }
  int32_t bos_id() const override { return -1; }
  int32_t eos_id() const override { return eos_; }
  bool IsEndOfGeneration(int32_t id) const override { return id == eos_; }
  std::string SpecialTokenText(int32_t) const override { return ""; }

  int32_t eos_ = -1;  // none unless a test sets one

 private:
  int32_t vocab_;
};

// Passes everything to the CPU backend; MatMul fails while `fail` is set.
class FailingBackend : public Backend {
 public:
  FailingBackend() : inner_(NewCpuBackend(2)) {}
  std::atomic<bool> fail{false};

  std::string_view name() const override { return "failing-cpu"; }
  absl::StatusOr<std::unique_ptr<Tensor>> LoadWeight(const HostTensor& t) override {
    return inner_->LoadWeight(t);
  }
  absl::StatusOr<std::unique_ptr<Tensor>> RandomWeight(int64_t rows, int64_t cols, uint64_t seed,
                                                       float scale, float offset) override {
    return inner_->RandomWeight(rows, cols, seed, scale, offset);
  }
  absl::StatusOr<std::unique_ptr<Tensor>> NewActivation(int64_t rows, int64_t cols) override {
    return inner_->NewActivation(rows, cols);
  }
  absl::Status CopyToHost(const Tensor& t, absl::Span<float> out) override {
    return inner_->CopyToHost(t, out);
  }
  absl::Status CopyFromHost(absl::Span<const float> in, Tensor& t) override {
    return inner_->CopyFromHost(in, t);
  }
  absl::Status Embed(const Tensor& table, absl::Span<const int32_t> tokens, Tensor& out) override {
    return inner_->Embed(table, tokens, out);
  }
  absl::Status RmsNorm(const Tensor& x, const Tensor& w, float eps, Tensor& out) override {
    return inner_->RmsNorm(x, w, eps, out);
  }
  absl::Status MatMul(const Tensor& x, const Tensor& w, Tensor& out) override {
    if (fail) return absl::InternalError("injected MatMul failure");
    return inner_->MatMul(x, w, out);
  }
  absl::Status Rope(Tensor& x, int n_heads, int head_dim, absl::Span<const float> inv_freq,
                    absl::Span<const int32_t> positions, RopeLayout layout) override {
    return inner_->Rope(x, n_heads, head_dim, inv_freq, positions, layout);
  }
  absl::Status SwiGlu(const Tensor& gate, const Tensor& up, Tensor& out) override {
    return inner_->SwiGlu(gate, up, out);
  }
  absl::Status Add(Tensor& x, const Tensor& y) override { return inner_->Add(x, y); }
  absl::StatusOr<std::unique_ptr<KvPool>> NewKvPool(int32_t num_blocks, int32_t block_size,
                                                    int head_dim) override {
    return inner_->NewKvPool(num_blocks, block_size, head_dim);
  }
  int64_t KvBlockBytes(int32_t block_size, int head_dim) const override {
    return inner_->KvBlockBytes(block_size, head_dim);
  }
  absl::Status Attention(const Tensor& q, const Tensor& k, const Tensor& v,
                         absl::Span<const SequenceSlice> seqs, const AttentionParams& p,
                         KvPool& pool, Tensor& out) override {
    return inner_->Attention(q, k, v, seqs, p, pool, out);
  }
  absl::Status GatherRows(const Tensor& x, absl::Span<const int64_t> rows, Tensor& out) override {
    return inner_->GatherRows(x, rows, out);
  }

 private:
  std::unique_ptr<Backend> inner_;
};

// Sink 4, block 4: windows far shorter than the sequences of the tests.
constexpr char kTinyPlan[] = R"({
  "format": "moa-plan", "version": 1, "sink": 4, "block_size": 4,
  "model": {"name": "tiny", "n_heads": 4, "n_kv_heads": 2},
  "rules": [[{"alpha": 8, "beta": 0}, {"dense": true}],
            [{"alpha": 4, "beta": 0.25}, {"alpha": 12, "beta": 0}]]
})";

struct Tiny {
  explicit Tiny(bool with_plan = false) : file(TinyModel(TinyConfig(), 21)), tok(97) {
    const MoaPlan* p = nullptr;
    if (with_plan) {
      plan = std::make_unique<MoaPlan>(MoaPlan::FromJson(kTinyPlan).value());
      p = plan.get();
    }
    model = LlamaModel::Create(file, &backend, p).value();
  }
  ModelFile file;
  std::unique_ptr<MoaPlan> plan;
  FailingBackend backend;
  std::unique_ptr<LlamaModel> model;
  WordTokenizer tok;
};

// ---------------------------------------------------------------------------------------------
// Running requests and collecting their chunks.

struct Result {
  std::vector<int32_t> tokens;
  std::string text;
  std::vector<GenerationChunk> chunks;
  GenerationChunk last;
};

// The chunks of one request; Wait() returns once the last one arrived.
class Collector {
 public:
  Engine::ChunkCallback Callback() {
    return [this](const GenerationChunk& c) {
      absl::MutexLock l(&mu_);
      EXPECT_FALSE(done_) << "a chunk after the last one";
      r_.tokens.insert(r_.tokens.end(), c.tokens.begin(), c.tokens.end());
      r_.text += c.text;
      r_.chunks.push_back(c);
      if (c.finish != FinishReason::kNone) {
        r_.last = c;
        done_ = true;
      }
    };
  }
  Result Wait() {
    absl::MutexLock l(&mu_);
    mu_.Await(absl::Condition(&done_));
    return r_;
  }

 private:
  absl::Mutex mu_;
  bool done_ = false;
  Result r_;
};

Result RunOne(Engine& e, const GenerationRequest& req) {
  Collector c;
  absl::StatusOr<int64_t> id = e.Submit(req, c.Callback());
  EXPECT_TRUE(id.ok()) << id.status();
  if (!id.ok()) return {};
  return c.Wait();
}

std::vector<Result> RunAll(Engine& e, const std::vector<GenerationRequest>& reqs) {
  return testing::RunAll<Collector>(e, reqs);
}

GenerationRequest Req(std::vector<int32_t> prompt, int32_t max_tokens) {
  GenerationRequest r;
  r.prompt = std::move(prompt);
  r.max_tokens = max_tokens;
  return r;
}

std::unique_ptr<Engine> MakeEngine(LlamaModel* model, const Tokenizer* tok, EngineOptions o,
                                   EngineObserver* obs = nullptr) {
  absl::StatusOr<std::unique_ptr<Engine>> e = Engine::Create(model, tok, o, obs);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? *std::move(e) : nullptr;
}

// Counts what the observer saw; step numbers let tests say "within one step".
class CountingObserver : public EngineObserver {
 public:
  void OnStep(double, int seqs, int tokens) override {
    absl::MutexLock l(&mu);
    steps.push_back({seqs, tokens});
    if (on_step) on_step(static_cast<int>(steps.size()));
  }
  void OnPreemption() override { preemptions++; }
  void OnTokens(int64_t p, int64_t g) override {
    prompt_tokens += p;
    generated_tokens += g;
  }
  void OnFinish(FinishReason, double) override { finished++; }
  void OnKvBlocks(int64_t used, int64_t total, int64_t dense) override {
    max_used = std::max<int64_t>(max_used, used);
    if (used > total) over_total = true;
  }
  int step_count() {
    absl::MutexLock l(&mu);
    return static_cast<int>(steps.size());
  }

  absl::Mutex mu;
  std::vector<std::pair<int, int>> steps;
  std::function<void(int)> on_step;  // called with the step number, on the engine thread
  std::atomic<int> preemptions{0};
  std::atomic<int64_t> prompt_tokens{0}, generated_tokens{0}, max_used{0};
  std::atomic<int> finished{0};
  std::atomic<bool> over_total{false};
};

// Bytes for `blocks` KV blocks of `model`.
int64_t PoolBytes(const LlamaModel& model, int32_t block_size, int64_t blocks) {
  return blocks * model.BytesPerKvBlock(block_size);
}

// 16 requests of mixed prompt lengths, greedy, run alone and then all at once.
void ExpectBatchInvariance(LlamaModel* model, const Tokenizer* tok,
                           const std::vector<std::vector<int32_t>>& prompts, int32_t max_tokens,
                           EngineOptions o) {
  std::vector<GenerationRequest> reqs;
  for (const auto& p : prompts) reqs.push_back(Req(p, max_tokens));
  std::vector<Result> alone;
  {
    auto e = MakeEngine(model, tok, o);
    for (const GenerationRequest& r : reqs) alone.push_back(RunOne(*e, r));
    EXPECT_TRUE(e->CheckIdle().ok());
  }
  CountingObserver obs;
  auto e = MakeEngine(model, tok, o, &obs);
  const std::vector<Result> batched = RunAll(*e, reqs);
  int max_batch = 0;
  for (const auto& [seqs, tokens] : obs.steps) max_batch = std::max(max_batch, seqs);
  EXPECT_EQ(max_batch, static_cast<int>(prompts.size())) << "the requests never ran together";
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(batched[i].tokens, alone[i].tokens) << "request " << i;
    EXPECT_EQ(batched[i].text, alone[i].text) << "request " << i;
    EXPECT_EQ(batched[i].last.finish, alone[i].last.finish) << "request " << i;
    EXPECT_EQ(batched[i].last.generated_tokens, static_cast<int64_t>(alone[i].tokens.size()));
    // Streamed text equals the text of all the tokens.
    if (tok->IsEndOfGeneration(alone[i].tokens.back())) continue;
    EXPECT_EQ(batched[i].text, tok->Decode(batched[i].tokens).value()) << "request " << i;
  }
  EXPECT_TRUE(e->CheckIdle().ok()) << e->CheckIdle();
}

std::vector<std::vector<int32_t>> MixedPrompts(int n, int vocab, unsigned seed) {
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < n; ++i) prompts.push_back(RandomTokens(1 + (i * 37) % 90, vocab, seed + i));
  return prompts;
}

// ---------------------------------------------------------------------------------------------

TEST(Engine, BatchOf16EqualsEachAlone) {
  Tiny t;
  EngineOptions o;
  o.step_token_budget = 2048;
  ExpectBatchInvariance(t.model.get(), &t.tok, MixedPrompts(16, 97, 100), 24, o);
}

TEST(Engine, BatchOf16EqualsEachAloneWithShortWindowPlan) {
  Tiny t(/*with_plan=*/true);
  EngineOptions o;
  o.step_token_budget = 2048;
  o.kv_block_size = 4;  // windows of 8 to 16 tokens free blocks as they slide
  ExpectBatchInvariance(t.model.get(), &t.tok, MixedPrompts(16, 97, 200), 40, o);
}

// Eight requests (half of them sampled with a seed: the random stream must continue across
// preemptions) in a pool of 1.5 times what the largest needs alone.
void ExpectPreemptionKeepsEveryOutput(bool with_plan) {
  Tiny t(with_plan);
  EngineOptions o;
  o.kv_block_size = 4;
  o.max_running = 8;
  std::vector<GenerationRequest> reqs;
  int64_t peak = 0;
  for (int i = 0; i < 8; ++i) {
    GenerationRequest r = Req(RandomTokens(10 + 3 * i, 97, 300 + i), 30);
    if (i % 2 == 1) {
      r.sampling.temperature = 0.9f;
      r.sampling.seed = 1000 + i;
    }
    const int64_t n = static_cast<int64_t>(r.prompt.size());
    peak = std::max(peak, PeakBlocks(t.model->kv_layout(4), n, o.step_token_budget, n + 29));
    reqs.push_back(r);
  }
  std::vector<Result> alone;
  {
    auto e = MakeEngine(t.model.get(), &t.tok, o);
    for (const GenerationRequest& r : reqs) alone.push_back(RunOne(*e, r));
  }
  o.kv_cache_bytes = PoolBytes(*t.model, 4, peak * 3 / 2);
  CountingObserver obs;
  auto e = MakeEngine(t.model.get(), &t.tok, o, &obs);
  ASSERT_EQ(e->kv_blocks_total(), peak * 3 / 2);
  const std::vector<Result> got = RunAll(*e, reqs);
  EXPECT_GT(obs.preemptions.load(), 0);
  EXPECT_FALSE(obs.over_total.load());
  int64_t prompt_total = 0, generated_total = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(got[i].tokens, alone[i].tokens) << "request " << i;
    EXPECT_EQ(got[i].text, alone[i].text) << "request " << i;
    EXPECT_EQ(got[i].last.finish, FinishReason::kLength);
    // Nothing sent twice: one chunk per token.
    EXPECT_EQ(got[i].chunks.size(), got[i].tokens.size());
    prompt_total += static_cast<int64_t>(reqs[i].prompt.size());
    generated_total += static_cast<int64_t>(got[i].tokens.size());
  }
  // Recomputed prompts are not counted twice.
  EXPECT_EQ(obs.prompt_tokens.load(), prompt_total);
  EXPECT_EQ(obs.generated_tokens.load(), generated_total);
  EXPECT_EQ(obs.finished.load(), 8);
  EXPECT_TRUE(e->CheckIdle().ok()) << e->CheckIdle();
}

TEST(Engine, PreemptionRecomputesAndKeepsEveryOutput) { ExpectPreemptionKeepsEveryOutput(false); }

TEST(Engine, PreemptionWithShortWindowPlan) { ExpectPreemptionKeepsEveryOutput(true); }

TEST(Engine, ChunkedPrefillMatchesAndDecodesKeepFlowing) {
  Tiny t;
  const GenerationRequest a = Req(RandomTokens(5, 97, 400), 60);
  const GenerationRequest b = Req(RandomTokens(300, 97, 401), 10);
  EngineOptions big;
  big.step_token_budget = 4096;
  Result a_alone, b_alone;
  {
    auto e = MakeEngine(t.model.get(), &t.tok, big);
    a_alone = RunOne(*e, a);
    b_alone = RunOne(*e, b);
  }
  EngineOptions small;
  small.step_token_budget = 64;
  small.max_running = 4;
  CountingObserver obs;
  auto e = MakeEngine(t.model.get(), &t.tok, small, &obs);
  // A's chunks record the step they came from; B is submitted from A's second chunk.
  std::vector<int> a_steps;
  int b_first_step = -1, b_submit_step = -1;
  Collector ca, cb;
  auto a_cb = ca.Callback();
  auto b_cb = cb.Callback();
  Engine* engine = e.get();
  ASSERT_TRUE(engine
                  ->Submit(a,
                           [&](const GenerationChunk& c) {
                             a_steps.push_back(obs.step_count());
                             if (a_steps.size() == 2) {
                               b_submit_step = obs.step_count();
                               ASSERT_TRUE(engine
                                               ->Submit(b,
                                                        [&](const GenerationChunk& c) {
                                                          if (b_first_step < 0)
                                                            b_first_step = obs.step_count();
                                                          b_cb(c);
                                                        })
                                               .ok());
                             }
                             a_cb(c);
                           })
                  .ok());
  const Result ra = ca.Wait();
  const Result rb = cb.Wait();
  EXPECT_EQ(ra.tokens, a_alone.tokens);
  EXPECT_EQ(rb.tokens, b_alone.tokens);
  EXPECT_EQ(rb.text, b_alone.text);
  // B's 300 prompt tokens took at least 300 / 63 steps, and A got a token in every step.
  EXPECT_GE(b_first_step - b_submit_step, 5);
  ASSERT_GT(a_steps.back(), b_first_step) << "A finished before B's prefill did";
  for (size_t i = 1; i < a_steps.size(); ++i) {
    EXPECT_EQ(a_steps[i], a_steps[i - 1] + 1) << "A missed a step at token " << i;
  }
  int max_tokens_in_step = 0;
  for (const auto& [seqs, tokens] : obs.steps)
    max_tokens_in_step = std::max(max_tokens_in_step, tokens);
  EXPECT_LE(max_tokens_in_step, 64);
  EXPECT_TRUE(e->CheckIdle().ok()) << e->CheckIdle();
}

TEST(Engine, CancelWhileQueuedMidPrefillAndMidDecode) {
  Tiny t;
  EngineOptions o;
  o.step_token_budget = 16;
  o.max_running = 1;
  CountingObserver obs;
  auto e = MakeEngine(t.model.get(), &t.tok, o, &obs);
  Engine* engine = e.get();

  // Mid-prefill: a 200-token prompt takes 13 steps; cancel it from the observer after step 3.
  {
    std::atomic<int64_t> id{-1};
    int cancel_step = -1;
    // The engine waits at its first step until the test knows the id: on a loaded machine the
    // engine could otherwise run the whole prefill before Submit has returned here.
    absl::Notification id_known;
    {
      absl::MutexLock l(&obs.mu);
      obs.on_step = [&](int step) {
        id_known.WaitForNotification();
        if (cancel_step < 0 && step >= 3 && id >= 0) {
          cancel_step = step;
          engine->Cancel(id);
        }
      };
    }
    Collector c;
    int final_step = -1;
    int64_t blocks_at_end = -1;
    auto cb = c.Callback();
    absl::StatusOr<int64_t> got =
        engine->Submit(Req(RandomTokens(200, 97, 500), 5), [&](const GenerationChunk& ch) {
          if (ch.finish != FinishReason::kNone) {
            final_step = obs.step_count();
            blocks_at_end = engine->kv_blocks_used();
          }
          cb(ch);
        });
    ASSERT_TRUE(got.ok());
    id = *got;
    id_known.Notify();
    const Result r = c.Wait();
    {
      absl::MutexLock l(&obs.mu);
      obs.on_step = nullptr;
    }
    EXPECT_EQ(r.last.finish, FinishReason::kCancelled);
    EXPECT_TRUE(r.tokens.empty());
    EXPECT_EQ(r.last.generated_tokens, 0);
    EXPECT_LE(final_step - cancel_step, 1);
    EXPECT_EQ(blocks_at_end, 0);
  }
  // Mid-decode: cancelled from its own third chunk; the next step ends it.
  {
    Collector c;
    auto cb = c.Callback();
    std::atomic<int64_t> id{-1};
    int seen = 0;
    absl::Notification submitted;
    absl::StatusOr<int64_t> got =
        engine->Submit(Req(RandomTokens(4, 97, 501), 100), [&](const GenerationChunk& ch) {
          submitted.WaitForNotification();
          if (++seen == 3) engine->Cancel(id);
          cb(ch);
        });
    ASSERT_TRUE(got.ok());
    id = *got;
    submitted.Notify();
    const Result r = c.Wait();
    EXPECT_EQ(r.last.finish, FinishReason::kCancelled);
    EXPECT_EQ(r.tokens.size(), 3u);
    EXPECT_EQ(r.last.generated_tokens, 3);
  }
  // While queued: the only running slot is taken by a request blocked in its callback.
  {
    absl::Notification release;
    Collector ca, cb;
    auto a_cb = ca.Callback();
    ASSERT_TRUE(engine
                    ->Submit(Req(RandomTokens(4, 97, 502), 3),
                             [&](const GenerationChunk& ch) {
                               release.WaitForNotification();
                               a_cb(ch);
                             })
                    .ok());
    while (engine->running() != 1) absl::SleepFor(absl::Milliseconds(1));
    absl::StatusOr<int64_t> queued =
        engine->Submit(Req(RandomTokens(4, 97, 503), 3), cb.Callback());
    ASSERT_TRUE(queued.ok());
    EXPECT_EQ(engine->waiting(), 1);
    engine->Cancel(*queued);
    engine->Cancel(987654);  // unknown ids are ignored
    release.Notify();
    const Result rb = cb.Wait();
    EXPECT_EQ(rb.last.finish, FinishReason::kCancelled);
    EXPECT_TRUE(rb.tokens.empty());
    EXPECT_EQ(ca.Wait().last.finish, FinishReason::kLength);
  }
  EXPECT_TRUE(e->CheckIdle().ok()) << e->CheckIdle();
}

TEST(Engine, Deadlines) {
  Tiny t;
  auto e = MakeEngine(t.model.get(), &t.tok, EngineOptions{});
  // Already past: finished at the next step without a token.
  GenerationRequest late = Req(RandomTokens(6, 97, 600), 10);
  late.deadline = absl::Now() - absl::Seconds(1);
  const Result r1 = RunOne(*e, late);
  EXPECT_EQ(r1.last.finish, FinishReason::kDeadline);
  EXPECT_TRUE(r1.tokens.empty());
  // Runs out mid-generation: every token's callback takes 20 ms, the deadline is 300 ms away.
  GenerationRequest slow = Req(RandomTokens(6, 97, 601), 200);
  slow.deadline = absl::Now() + absl::Milliseconds(300);
  Collector c;
  auto cb = c.Callback();
  ASSERT_TRUE(e->Submit(slow, [&](const GenerationChunk& ch) {
                 absl::SleepFor(absl::Milliseconds(20));
                 cb(ch);
               }).ok());
  const Result r2 = c.Wait();
  EXPECT_EQ(r2.last.finish, FinishReason::kDeadline);
  EXPECT_GT(r2.tokens.size(), 0u);
  EXPECT_LT(r2.tokens.size(), 200u);
  EXPECT_GE(r2.last.total_seconds, 0.3);
  EXPECT_TRUE(e->CheckIdle().ok()) << e->CheckIdle();
}

TEST(Engine, FullQueueAndStopAccepting) {
  Tiny t;
  EngineOptions o;
  o.max_running = 1;
  o.max_queue = 2;
  auto e = MakeEngine(t.model.get(), &t.tok, o);
  absl::Notification release;
  Collector ca;
  auto a_cb = ca.Callback();
  // A holds the engine thread in its first callback, so B and C stay queued.
  ASSERT_TRUE(e->Submit(Req(RandomTokens(4, 97, 700), 4), [&](const GenerationChunk& ch) {
                 release.WaitForNotification();
                 a_cb(ch);
               }).ok());
  while (e->running() != 1) absl::SleepFor(absl::Milliseconds(1));
  Collector cb, cc;
  ASSERT_TRUE(e->Submit(Req(RandomTokens(4, 97, 701), 4), cb.Callback()).ok());
  ASSERT_TRUE(e->Submit(Req(RandomTokens(4, 97, 702), 4), cc.Callback()).ok());
  const absl::Time t0 = absl::Now();
  absl::StatusOr<int64_t> d = e->Submit(Req(RandomTokens(4, 97, 703), 4), [](const auto&) {
    ADD_FAILURE() << "a refused request got a chunk";
  });
  EXPECT_EQ(d.status().code(), absl::StatusCode::kResourceExhausted) << d.status();
  // At once: the engine thread is still held by A, so nothing else could have answered.
  EXPECT_LT(absl::Now() - t0, absl::Milliseconds(500));
  e->StopAccepting();
  EXPECT_EQ(e->Submit(Req({1}, 1), [](const auto&) {}).status().code(),
            absl::StatusCode::kUnavailable);
  release.Notify();
  // What was accepted runs to the end.
  EXPECT_EQ(ca.Wait().last.finish, FinishReason::kLength);
  EXPECT_EQ(cb.Wait().tokens.size(), 4u);
  EXPECT_EQ(cc.Wait().tokens.size(), 4u);
  EXPECT_TRUE(e->CheckIdle().ok()) << e->CheckIdle();
}

TEST(Engine, ShutdownCancelsEverything) {
  Tiny t;
  EngineOptions o;
  o.max_running = 2;
  auto e = MakeEngine(t.model.get(), &t.tok, o);
  std::vector<std::unique_ptr<Collector>> cs;
  for (int i = 0; i < 5; ++i) {
    cs.push_back(std::make_unique<Collector>());
    ASSERT_TRUE(e->Submit(Req(RandomTokens(8, 97, 800 + i), 400), cs.back()->Callback()).ok());
  }
  e->Shutdown();
  for (auto& c : cs) {
    const Result r = c->Wait();  // already there: Shutdown joined the thread
    EXPECT_EQ(r.last.finish, FinishReason::kCancelled);
  }
  EXPECT_EQ(e->Submit(Req({1}, 1), [](const auto&) {}).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_TRUE(e->CheckIdle().ok()) << e->CheckIdle();
  e->Shutdown();  // idempotent
}

// The greedy reference run of one prompt, for the stop tests.
Result Reference(Tiny& t, const std::vector<int32_t>& prompt, int32_t n) {
  auto e = MakeEngine(t.model.get(), &t.tok, EngineOptions{});
  return RunOne(*e, Req(prompt, n));
}

TEST(Engine, StopStringSplitAcrossTokens) {
  Tiny t;
  const std::vector<int32_t> prompt = RandomTokens(7, 97, 900);
  const Result ref = Reference(t, prompt, 30);
  ASSERT_EQ(ref.tokens.size(), 30u);
  // The end of token 10's word and the start of token 11's: "<digit> w<digit>".
  const std::string p10 = WordTokenizer::Piece(ref.tokens[10]);
  const std::string p11 = WordTokenizer::Piece(ref.tokens[11]);
  const std::string stop = p10.substr(p10.size() - 2) + p11.substr(0, 2);
  const size_t at = ref.text.find(stop);
  ASSERT_NE(at, std::string::npos);
  // The token whose text completes the first occurrence ends the generation.
  size_t end_token = 0;
  for (size_t len = 0; len < at + stop.size(); ++end_token) {
    len += WordTokenizer::Piece(ref.tokens[end_token]).size();
  }
  auto e = MakeEngine(t.model.get(), &t.tok, EngineOptions{});
  GenerationRequest req = Req(prompt, 30);
  req.stop_strings = {"never appears", stop};
  const Result r = RunOne(*e, req);
  EXPECT_EQ(r.last.finish, FinishReason::kStop);
  EXPECT_EQ(r.last.stop_matched, stop);
  EXPECT_EQ(r.text, ref.text.substr(0, at));
  EXPECT_EQ(r.tokens.size(), end_token);
  EXPECT_EQ(r.last.generated_tokens, static_cast<int64_t>(end_token));
  for (const GenerationChunk& c : r.chunks) EXPECT_EQ(c.text.find(stop), std::string::npos);
  EXPECT_TRUE(e->CheckIdle().ok());
}

TEST(Engine, StopTokenIdsEosIgnoreEosAndMaxTokens) {
  Tiny t;
  const std::vector<int32_t> prompt = RandomTokens(9, 97, 901);
  const Result ref = Reference(t, prompt, 25);
  ASSERT_EQ(ref.last.finish, FinishReason::kLength);
  ASSERT_EQ(ref.tokens.size(), 25u);
  EXPECT_EQ(ref.last.generated_tokens, 25);
  const int32_t target = ref.tokens[6];
  const size_t first = std::find(ref.tokens.begin(), ref.tokens.end(), target) - ref.tokens.begin();
  std::string text_before;
  for (size_t i = 0; i < first; ++i) text_before += WordTokenizer::Piece(ref.tokens[i]);

  auto e = MakeEngine(t.model.get(), &t.tok, EngineOptions{});
  GenerationRequest req = Req(prompt, 25);
  req.stop_token_ids = {target};
  Result r = RunOne(*e, req);
  EXPECT_EQ(r.last.finish, FinishReason::kStop);
  EXPECT_EQ(r.last.stop_matched, absl::StrCat("token:", target));
  EXPECT_EQ(r.tokens.size(), first + 1);  // the stop token is listed, its text is not sent
  EXPECT_EQ(r.text, text_before);

  t.tok.eos_ = target;
  r = RunOne(*e, Req(prompt, 25));
  EXPECT_EQ(r.last.finish, FinishReason::kEos);
  EXPECT_EQ(r.tokens.size(), first + 1);
  EXPECT_EQ(r.text, text_before);
  GenerationRequest ignore = Req(prompt, 25);
  ignore.ignore_eos = true;
  r = RunOne(*e, ignore);
  EXPECT_EQ(r.last.finish, FinishReason::kLength);
  EXPECT_EQ(r.tokens, ref.tokens);
  EXPECT_EQ(r.text, ref.text);
  t.tok.eos_ = -1;

  r = RunOne(*e, Req(prompt, 1));
  EXPECT_EQ(r.last.finish, FinishReason::kLength);
  ASSERT_EQ(r.tokens.size(), 1u);
  EXPECT_EQ(r.tokens[0], ref.tokens[0]);
  EXPECT_EQ(r.chunks.size(), 1u);  // the only token travels in the last chunk
  EXPECT_TRUE(e->CheckIdle().ok());
}

TEST(Engine, Logprobs) {
  Tiny t;
  auto e = MakeEngine(t.model.get(), &t.tok, EngineOptions{});
  for (float temperature : {0.0f, 1.0f}) {
    GenerationRequest req = Req(RandomTokens(5, 97, 902), 12);
    req.top_logprobs = 5;
    req.sampling.temperature = temperature;
    req.sampling.seed = 3;
    const Result r = RunOne(*e, req);
    ASSERT_EQ(r.tokens.size(), 12u);
    size_t n = 0;
    for (const GenerationChunk& c : r.chunks) {
      ASSERT_EQ(c.logprobs.size(), c.tokens.size());
      for (const TokenLogprob& lp : c.logprobs) {
        EXPECT_EQ(lp.token, r.tokens[n++]);
        ASSERT_EQ(lp.top.size(), 5u);
        EXPECT_LE(lp.logprob, 0.0f);
        double mass = 0;
        for (size_t i = 0; i < lp.top.size(); ++i) {
          mass += std::exp(lp.top[i].second);
          if (i > 0) {
            EXPECT_LE(lp.top[i].second, lp.top[i - 1].second);
          }
        }
        EXPECT_LE(mass, 1.0 + 1e-5);
        EXPECT_LE(lp.logprob, lp.top[0].second);
        if (temperature == 0.0f) {
          EXPECT_EQ(lp.top[0].first, lp.token);
          EXPECT_EQ(lp.top[0].second, lp.logprob);
        }
      }
    }
  }
  // Not asked: none.
  const Result plain = RunOne(*e, Req(RandomTokens(5, 97, 903), 3));
  for (const GenerationChunk& c : plain.chunks) EXPECT_TRUE(c.logprobs.empty());
}

TEST(Engine, FailingForwardErrorsTheBatchAndServesTheNext) {
  Tiny t;
  EngineOptions o;
  auto e = MakeEngine(t.model.get(), &t.tok, o);
  const GenerationRequest after = Req(RandomTokens(6, 97, 1000), 8);
  const Result expected = RunOne(*e, after);
  // Three requests decode together; A's third token switches the backend to failing.
  std::vector<std::unique_ptr<Collector>> cs;
  for (int i = 0; i < 3; ++i) cs.push_back(std::make_unique<Collector>());
  auto a_cb = cs[0]->Callback();
  int a_tokens = 0;
  absl::Notification all_submitted;  // so that B and C join before the failure
  ASSERT_TRUE(e->Submit(Req(RandomTokens(6, 97, 1001), 50), [&](const GenerationChunk& c) {
                 all_submitted.WaitForNotification();
                 if (++a_tokens == 3) t.backend.fail = true;
                 a_cb(c);
               }).ok());
  ASSERT_TRUE(e->Submit(Req(RandomTokens(30, 97, 1002), 50), cs[1]->Callback()).ok());
  ASSERT_TRUE(e->Submit(Req(RandomTokens(3, 97, 1003), 50), cs[2]->Callback()).ok());
  all_submitted.Notify();
  for (auto& c : cs) {
    const Result r = c->Wait();
    EXPECT_EQ(r.last.finish, FinishReason::kError);
    EXPECT_NE(r.last.error.find("injected MatMul failure"), std::string::npos) << r.last.error;
    EXPECT_LT(r.tokens.size(), 50u);
  }
  EXPECT_TRUE(e->CheckIdle().ok()) << e->CheckIdle();
  t.backend.fail = false;
  const Result again = RunOne(*e, after);
  EXPECT_EQ(again.tokens, expected.tokens);
  EXPECT_EQ(again.last.finish, FinishReason::kLength);
  EXPECT_TRUE(e->CheckIdle().ok()) << e->CheckIdle();
}

TEST(Engine, SubmitRejectsBadRequestsNamingTheField) {
  Tiny t;
  EngineOptions o;
  o.kv_block_size = 4;
  o.kv_cache_bytes = PoolBytes(*t.model, 4, 200);  // 200 positions of all 4 heads
  auto e = MakeEngine(t.model.get(), &t.tok, o);
  auto ok = Req({1, 2, 3}, 4);
  struct Case {
    std::string name;
    std::function<void(GenerationRequest&)> change;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"empty prompt", [](auto& r) { r.prompt.clear(); }, "prompt"},
      {"token too big", [](auto& r) { r.prompt[1] = 97; }, "prompt: token 1 has id 97"},
      {"negative token", [](auto& r) { r.prompt[0] = -1; }, "prompt: token 0"},
      {"max_tokens 0", [](auto& r) { r.max_tokens = 0; }, "max_tokens"},
      {"past the context", [](auto& r) { r.max_tokens = 510; }, "context"},
      {"temperature", [](auto& r) { r.sampling.temperature = -1; }, "temperature"},
      {"top_p", [](auto& r) { r.sampling.top_p = 0; }, "top_p"},
      {"top_logprobs", [](auto& r) { r.top_logprobs = 21; }, "top_logprobs"},
      {"too many stops", [](auto& r) { r.stop_strings.assign(kMaxStopStrings + 1, "x"); },
       "stop_strings"},
      {"empty stop",
       [](auto& r) {
         r.stop_strings = {"a", ""};
       },
       "stop_strings[1]"},
      {"invalid UTF-8 stop", [](auto& r) { r.stop_strings = {"\xC3"}; }, "UTF-8"},
      {"stop token id",
       [](auto& r) {
         r.stop_token_ids = {5, 1000};
       },
       "stop_token_ids[1]"},
      {"bigger than the pool", [](auto& r) { r.max_tokens = 300; }, "KV blocks"},
  };
  for (const Case& c : cases) {
    GenerationRequest r = ok;
    c.change(r);
    absl::StatusOr<int64_t> got = e->Submit(r, [](const auto&) {});
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument) << c.name;
    EXPECT_NE(got.status().message().find(c.message), std::string::npos)
        << c.name << ": " << got.status();
  }
  // And the next request is served.
  EXPECT_EQ(RunOne(*e, ok).tokens.size(), 4u);
  EXPECT_TRUE(e->CheckIdle().ok());
}

TEST(Engine, CreateRejectsBadOptions) {
  Tiny t;
  EngineOptions o;
  o.step_token_budget = 8;
  o.max_running = 16;
  EXPECT_EQ(Engine::Create(t.model.get(), &t.tok, o, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  o = EngineOptions{};
  o.kv_cache_bytes = 10;
  EXPECT_EQ(Engine::Create(t.model.get(), &t.tok, o, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(Engine::Create(nullptr, &t.tok, EngineOptions{}, nullptr).ok());
}

// ---------------------------------------------------------------------------------------------
// The default model on real text.

TEST(Engine, DefaultModelBatchInvarianceDenseAndWithPlan) {
  const std::string path = testing::DefaultModelPath();
  if (!testing::FileExists(path)) GTEST_SKIP() << "default model absent: " << path;
  absl::StatusOr<ModelFile> file = LoadModel(path);
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok = Tokenizer::Create(file->tokenizer);
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto backend = NewCpuBackend(2);
  const std::vector<std::string> texts = {
      "The capital of France is",
      "Once upon a time, in a small village by the sea, there lived an old fisherman who",
      "def fibonacci(n):",
      "List three colors:",
      "Water boils at a temperature of",
      "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy "
      "dog again, and then the dog",
      "In 1969, the first humans",
      "My favourite food is"};
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 16; ++i) {
    std::vector<int32_t> p = (*tok)->Encode(texts[i % texts.size()], true, false).value();
    // The second half repeats the texts behind a varying preamble: more mixed lengths.
    if (i >= 8) {
      std::vector<int32_t> pre =
          (*tok)->Encode(absl::StrCat("Note ", i, ": "), true, false).value();
      p.insert(p.begin(), pre.begin(), pre.end());
    }
    prompts.push_back(p);
  }
  EngineOptions o;
  o.kv_cache_bytes = 64LL << 20;
  o.step_token_budget = 64;  // the longer prompts are prefilled in chunks next to decodes
  {
    auto model = LlamaModel::Create(*file, backend.get(), nullptr).value();
    ExpectBatchInvariance(model.get(), tok->get(), prompts, 10, o);
  }
  // Short windows on two of every three KV heads: sink 16, windows of 32 or 48 tokens.
  std::string rules;
  for (int l = 0; l < 30; ++l) {
    absl::StrAppend(&rules, l ? "," : "",
                    R"([{"alpha": 32, "beta": 0}, {"dense": true}, {"alpha": 16, "beta": 0.5}])");
  }
  const MoaPlan plan = MoaPlan::FromJson(absl::StrCat(
                                             R"({"format": "moa-plan", "version": 1, "sink": 16,
       "block_size": 16, "model": {"name": "SmolLM2", "n_heads": 9, "n_kv_heads": 3},
       "rules": [)",
                                             rules, "]}"))
                           .value();
  auto model = LlamaModel::Create(*file, backend.get(), &plan).value();
  ExpectBatchInvariance(model.get(), tok->get(), prompts, 10, o);
}

}  // namespace
}  // namespace moa
