// KV block bookkeeping: a seeded property test that plays a small scheduler (random plans,
// prompts, chunked prefill, decodes, finishes, cancels, preemptions, pool exhaustion) against
// KvCacheManager and audits it after every step, plus the "freed blocks never come back" check.
#include "kvcache/kv_cache_manager.h"

#include <algorithm>
#include <cstdint>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/attention_span.h"

namespace moa {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

const SpanRule& RuleOf(const KvLayout& l, int layer, int h) {
  static const SpanRule kDense;
  return l.rules.empty() ? kDense : l.rules[layer][h];
}

// A random plan: dense heads, local heads (beta 0), growing heads; sinks of 0, smaller and
// larger than a block.
KvLayout RandomLayout(std::mt19937& rng) {
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  KvLayout l;
  l.n_layers = pick(1, 3);
  l.n_kv_heads = pick(1, 3);
  l.head_dim = 4;
  const int32_t sizes[] = {1, 2, 3, 4, 8, 16};
  l.block_size = sizes[pick(0, 5)];
  l.span.block = pick(1, 8);
  const int sink_kind = pick(0, 2);
  l.span.sink = sink_kind == 0   ? 0
                : sink_kind == 1 ? pick(1, l.block_size)
                                 : pick(l.block_size, 40);
  if (pick(0, 5) == 0) return l;  // no plan: every head dense
  l.rules.assign(l.n_layers, std::vector<SpanRule>(l.n_kv_heads));
  for (auto& layer : l.rules) {
    for (SpanRule& r : layer) {
      switch (pick(0, 3)) {
        case 0:
          break;  // dense
        case 1:
          r = SpanRule{false, pick(0, 40), 0.0};
          break;
        case 2:
          r = SpanRule{false, pick(0, 20), std::uniform_real_distribution<double>(0, 1)(rng)};
          break;
        default:
          r = SpanRule{false, pick(0, 8), pick(0, 1) ? 1.0 : 0.25};
          break;
      }
    }
  }
  return l;
}

// Every key a query at position q (< length) can see has its block backed.
void ExpectVisibleKeysBacked(const KvCacheManager& kv, SeqId seq, int64_t q,
                             const std::string& where) {
  const KvLayout& l = kv.layout();
  for (int layer = 0; layer < l.n_layers; ++layer) {
    for (int h = 0; h < l.n_kv_heads; ++h) {
      const std::vector<int32_t>& t = kv.table(seq, layer, h).blocks;
      for (int64_t k = 0; k <= q; ++k) {
        if (!IsVisible(RuleOf(l, layer, h), l.span, q, k)) continue;
        const int64_t b = k / l.block_size;
        ASSERT_TRUE(b < static_cast<int64_t>(t.size()) && t[b] >= 0)
            << where << ": layer " << layer << " head " << h << " query " << q << " key " << k;
      }
    }
  }
}

// Held blocks of every head: counted in the table, equal to the formula (between steps).
void ExpectHeldEqualsFormula(const KvCacheManager& kv, SeqId seq, int64_t past,
                             const std::string& where) {
  const KvLayout& l = kv.layout();
  const int64_t n = kv.length(seq);
  int64_t sum = 0;
  for (int layer = 0; layer < l.n_layers; ++layer) {
    for (int h = 0; h < l.n_kv_heads; ++h) {
      const std::vector<int32_t>& t = kv.table(seq, layer, h).blocks;
      const int64_t held = std::count_if(t.begin(), t.end(), [](int32_t b) { return b >= 0; });
      const int64_t want = BlocksHeldDuringStep(RuleOf(l, layer, h), l.span, l.block_size, past, n);
      ASSERT_EQ(held, want) << where << ": layer " << layer << " head " << h << " past " << past
                            << " length " << n;
      if (past == n) {
        // Between steps, independently of the formula: the blocks holding a key that the next
        // query (position n) sees, its own slot n included (if its block is already held: the
        // next step writes there), and no others.
        for (int64_t b = 0; b < static_cast<int64_t>(t.size()); ++b) {
          bool seen = false;
          for (int64_t k = b * l.block_size; k < std::min(n + 1, (b + 1) * l.block_size); ++k) {
            seen |= IsVisible(RuleOf(l, layer, h), l.span, n, k);
          }
          ASSERT_EQ(t[b] >= 0, seen)
              << where << ": layer " << layer << " head " << h << " block " << b << " length " << n;
        }
      }
      sum += held;
    }
  }
  ASSERT_EQ(kv.blocks_held(seq), sum) << where;
}

struct Request {
  int64_t prompt;  // tokens to prefill (grows when the request is preempted)
  int64_t to_generate;
};

struct Running {
  SeqId seq;
  Request req;
  int64_t generated = 0;
};

TEST(KvCacheManagerProperty, RandomSchedulesKeepEveryInvariant) {
  std::mt19937 rng(20240611);
  auto pick = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  int64_t steps = 0, exhausted = 0, preemptions = 0, cancels = 0, finishes = 0;
  for (int scenario = 0; scenario < 200; ++scenario) {
    const KvLayout layout = RandomLayout(rng);
    const int64_t heads = int64_t{layout.n_layers} * layout.n_kv_heads;
    // From "fits one short request" to roomy.
    const int32_t num_blocks = static_cast<int32_t>(
        heads * pick(CeilDiv(24, layout.block_size), CeilDiv(200, layout.block_size)));
    KvCacheManager kv(layout, num_blocks);
    const std::string where = absl::StrCat("scenario ", scenario);
    std::vector<Request> waiting;
    std::vector<Running> running;  // oldest first
    const int64_t chunk = pick(1, 24);
    for (int step = 0; step < 60; ++step, ++steps) {
      const std::string at = absl::StrCat(where, " step ", step);
      if (pick(0, 2) == 0) waiting.push_back({pick(1, 60), pick(1, 40)});
      // Admit the oldest waiting request when there is room for its first chunk.
      if (!waiting.empty() && running.size() < 4 &&
          kv.BlocksForNew(std::min(chunk, waiting.front().prompt)) <= kv.free_blocks()) {
        running.push_back({kv.AddSequence(), waiting.front()});
        waiting.erase(waiting.begin());
      }
      // One step for every running sequence: a prefill chunk or one decoded token.
      for (size_t i = 0; i < running.size();) {
        Running& r = running[i];
        const int64_t past = kv.length(r.seq);
        const bool prefill = past < r.req.prompt;
        const int64_t new_len = prefill ? std::min(r.req.prompt, past + chunk) : past + 1;
        const int32_t free_before = kv.free_blocks();
        const int64_t held_before = kv.blocks_held(r.seq);
        const int64_t need = kv.BlocksToGrow(r.seq, new_len);
        const absl::Status grown = kv.Grow(r.seq, new_len);
        if (!grown.ok()) {
          // All or nothing: the failed Grow changed nothing; preempt the newest sequence.
          ASSERT_EQ(grown.code(), absl::StatusCode::kResourceExhausted) << at << grown;
          ASSERT_GT(need, free_before) << at;
          ASSERT_EQ(kv.free_blocks(), free_before) << at;
          ASSERT_EQ(kv.length(r.seq), past) << at;
          ASSERT_EQ(kv.blocks_held(r.seq), held_before) << at;
          ++exhausted;
          Running victim = running.back();
          running.pop_back();
          ASSERT_TRUE(kv.Release(victim.seq).ok()) << at;
          ++preemptions;
          // Recomputed later: what it generated so far becomes part of its prompt.
          waiting.insert(waiting.begin(), {victim.req.prompt + victim.generated,
                                           victim.req.to_generate - victim.generated});
          if (victim.seq == r.seq) continue;  // it was this one: nothing to run
          ASSERT_TRUE(kv.CheckInvariants().ok()) << at << kv.CheckInvariants();
          continue;  // retry this sequence with the freed blocks
        }
        ASSERT_EQ(free_before - kv.free_blocks(), need) << at;
        ASSERT_TRUE(kv.CheckInvariants().ok()) << at << ": " << kv.CheckInvariants();
        ASSERT_NO_FATAL_FAILURE(ExpectHeldEqualsFormula(kv, r.seq, past, at + " (grown)"));
        // Every row of this step finds all the keys it sees.
        for (int64_t q = past; q < new_len; ++q) {
          ASSERT_NO_FATAL_FAILURE(ExpectVisibleKeysBacked(kv, r.seq, q, at));
        }
        // A cancel may come mid-step (between Grow and Trim), e.g. in the middle of a prefill.
        if (pick(0, 40) == 0) {
          ASSERT_TRUE(kv.Release(r.seq).ok()) << at;
          ++cancels;
          running.erase(running.begin() + static_cast<std::ptrdiff_t>(i));
          ASSERT_TRUE(kv.CheckInvariants().ok()) << at << ": " << kv.CheckInvariants();
          continue;
        }
        kv.Trim(r.seq);
        ASSERT_NO_FATAL_FAILURE(ExpectHeldEqualsFormula(kv, r.seq, new_len, at + " (trimmed)"));
        if (!prefill || new_len == r.req.prompt) ++r.generated;
        if (r.generated >= r.req.to_generate) {
          ASSERT_TRUE(kv.Release(r.seq).ok()) << at;
          ++finishes;
          running.erase(running.begin() + static_cast<std::ptrdiff_t>(i));
        } else {
          ++i;
        }
        ASSERT_TRUE(kv.CheckInvariants().ok()) << at << ": " << kv.CheckInvariants();
      }
      ASSERT_TRUE(kv.CheckInvariants().ok()) << at << ": " << kv.CheckInvariants();
      ASSERT_EQ(kv.used_blocks() + kv.free_blocks(), kv.total_blocks()) << at;
      ASSERT_EQ(kv.num_sequences(), static_cast<int64_t>(running.size())) << at;
    }
    for (const Running& r : running) ASSERT_TRUE(kv.Release(r.seq).ok()) << where;
    ASSERT_TRUE(kv.CheckInvariants().ok()) << where << ": " << kv.CheckInvariants();
    ASSERT_EQ(kv.free_blocks(), kv.total_blocks()) << where;
    ASSERT_EQ(kv.num_sequences(), 0) << where;
  }
  std::cout << steps << " steps, " << exhausted << " exhausted pools, " << preemptions
            << " preemptions, " << cancels << " cancels, " << finishes << " finishes\n";
  // The schedule must have exercised every path.
  EXPECT_GT(steps, 3000);
  EXPECT_GT(exhausted, 10);
  EXPECT_GT(preemptions, 10);
  EXPECT_GT(cancels, 10);
  EXPECT_GT(finishes, 100);
}

// One sequence decoded token by token, trimmed after every step: every key any later query sees
// is still backed, so a freed window block is never needed again; and window heads hold O(span).
TEST(KvCacheManager, FreedWindowBlocksAreNeverNeededAgain) {
  for (int32_t block_size : {1, 4, 16}) {
    KvLayout l;
    l.n_layers = 1;
    l.n_kv_heads = 4;
    l.head_dim = 4;
    l.block_size = block_size;
    l.span = {5, 4};
    l.rules = {
        {SpanRule{}, SpanRule{false, 12, 0.0}, SpanRule{false, 4, 0.5}, SpanRule{false, 0, 1.0}}};
    KvCacheManager kv(l, 4 * 200);
    const SeqId seq = kv.AddSequence();
    for (int64_t n = 1; n <= 150; ++n) {
      ASSERT_TRUE(kv.Grow(seq, n).ok());
      kv.Trim(seq);
      ASSERT_TRUE(kv.CheckInvariants().ok()) << kv.CheckInvariants();
      // The next query (position n) and every earlier-written key it may see.
      for (int h = 0; h < 4; ++h) {
        const std::vector<int32_t>& t = kv.table(seq, 0, h).blocks;
        for (int64_t k = 0; k < n; ++k) {
          if (IsVisible(l.rules[0][h], l.span, n, k)) {
            ASSERT_GE(t[k / block_size], 0)
                << "block " << block_size << " head " << h << " n " << n << " key " << k;
          }
        }
      }
    }
    // The local head (span 12 + 5 sink tokens at most) keeps a bounded number of blocks.
    const std::vector<int32_t>& local = kv.table(seq, 0, 1).blocks;
    const int64_t held =
        std::count_if(local.begin(), local.end(), [](int32_t b) { return b >= 0; });
    EXPECT_LE(held, CeilDiv(5, block_size) + CeilDiv(12, block_size) + 1);
    EXPECT_EQ(std::count_if(kv.table(seq, 0, 0).blocks.begin(), kv.table(seq, 0, 0).blocks.end(),
                            [](int32_t b) { return b >= 0; }),
              CeilDiv(150, block_size));
  }
}

TEST(KvCacheManager, GrowIsAllOrNothingAndReleaseGivesEverythingBack) {
  KvLayout l;
  l.n_layers = 2;
  l.n_kv_heads = 2;
  l.head_dim = 4;
  l.block_size = 4;
  KvCacheManager kv(l, 10);
  const SeqId a = kv.AddSequence();
  EXPECT_EQ(kv.BlocksForNew(5), 8);
  ASSERT_TRUE(kv.Grow(a, 5).ok());  // 2 blocks x 4 heads
  EXPECT_EQ(kv.free_blocks(), 2);
  EXPECT_EQ(kv.BlocksToGrow(a, 9), 4);
  const absl::Status s = kv.Grow(a, 9);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_EQ(kv.free_blocks(), 2);
  EXPECT_EQ(kv.length(a), 5);
  EXPECT_EQ(kv.BlocksToGrow(a, 8), 0);  // fits in the blocks held
  ASSERT_TRUE(kv.Grow(a, 8).ok());
  EXPECT_EQ(kv.Grow(a, 7).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(kv.Grow(12345, 1).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(kv.Release(12345).code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(kv.table(12345, 0, 0).blocks.empty());
  EXPECT_TRUE(kv.table(a, 2, 0).blocks.empty());
  EXPECT_TRUE(kv.CheckInvariants().ok());  // untrimmed (mid-step) sequences are fine too
  ASSERT_TRUE(kv.Release(a).ok());
  EXPECT_EQ(kv.free_blocks(), 10);
  EXPECT_EQ(kv.Release(a).code(), absl::StatusCode::kNotFound);  // never freed twice
  EXPECT_TRUE(kv.CheckInvariants().ok());
}

TEST(KvCacheManager, CreateRejectsBadLayouts) {
  KvLayout ok;
  ok.n_layers = 1;
  ok.n_kv_heads = 2;
  ok.head_dim = 4;
  EXPECT_TRUE(KvCacheManager::Create(ok, 4).ok());
  EXPECT_FALSE(KvCacheManager::Create(ok, -1).ok());
  KvLayout bad = ok;
  bad.block_size = 0;
  EXPECT_FALSE(KvCacheManager::Create(bad, 4).ok());
  bad = ok;
  bad.rules = {{SpanRule{}}};  // one rule for two heads
  EXPECT_FALSE(KvCacheManager::Create(bad, 4).ok());
  bad = ok;
  bad.rules = {{SpanRule{}, SpanRule{false, 4, 1.5}}};  // the window would move left
  EXPECT_FALSE(KvCacheManager::Create(bad, 4).ok());
  bad = ok;
  bad.span.block = 0;
  EXPECT_FALSE(KvCacheManager::Create(bad, 4).ok());
}

TEST(KvCacheManager, PeakBlocksIsTheMostASequenceHolds) {
  KvLayout l;
  l.n_layers = 2;
  l.n_kv_heads = 2;
  l.head_dim = 4;
  l.block_size = 4;
  l.span = {4, 4};
  l.rules = {{SpanRule{}, SpanRule{false, 8, 0.0}}, {SpanRule{false, 4, 0.5}, SpanRule{}}};
  const int64_t prompt = 37, chunk = 10, total = 90;
  KvCacheManager kv(l, 1000);
  const SeqId seq = kv.AddSequence();
  int64_t peak = 0;
  for (int64_t past = 0; past < total;) {
    const int64_t next = past < prompt ? std::min(prompt, past + chunk) : past + 1;
    ASSERT_TRUE(kv.Grow(seq, next).ok());
    peak = std::max<int64_t>(peak, kv.used_blocks());
    kv.Trim(seq);
    past = next;
  }
  EXPECT_EQ(PeakBlocks(l, prompt, chunk, total), peak);
  // Dense would need every block of every head.
  EXPECT_LT(peak, kv.BlocksForNew(total));
}

}  // namespace
}  // namespace moa
