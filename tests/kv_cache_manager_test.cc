// KV block bookkeeping: a seeded property test that plays a small scheduler (random plans,
// prompts, chunked prefill, decodes, finishes, cancels, preemptions, pool exhaustion) against
// KvCacheManager and audits it after every step, running real CPU attention over the paged pool
// through the manager's tables against a dense masked reference over each sequence's whole
// history; plus the "freed blocks never come back" check.
#include "kvcache/kv_cache_manager.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "gtest/gtest.h"
#include "kernels/attention_span.h"
#include "kernels/backend.h"

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
  l.head_dim = 8;
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

// Every K/V row a sequence ever wrote, per layer ([position][n_kv_heads * head_dim]): what the
// dense reference attends over, and what a preempted sequence writes again when it recomputes.
struct History {
  std::vector<std::vector<float>> k, v;  // [layer], positions appended
  int64_t length = 0;
};

struct Request {
  int64_t prompt;  // tokens to prefill (grows when the request is preempted)
  int64_t to_generate;
  History history;  // kept across a preemption
};

// Runs attention for every layer of `seq` over the step's new positions [past, new_len): writes
// their K/V rows (from the history, random where the sequence never got that far) into the pool
// through the manager's tables, then compares the output with a dense softmax over the whole
// history masked with IsVisible(). Counts the rows checked.
void ExpectAttentionEqualsDense(Backend& be, KvPool& pool, const KvCacheManager& kv, SeqId seq,
                                int group, int64_t past, int64_t new_len, History& hist,
                                std::mt19937& rng, int64_t& rows_checked,
                                const std::string& where) {
  const KvLayout& l = kv.layout();
  const int n_kv = l.n_kv_heads, n_heads = n_kv * group, hd = l.head_dim;
  const int64_t kc = int64_t{n_kv} * hd, qc = int64_t{n_heads} * hd, n_new = new_len - past;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto random_rows = [&](int64_t n, int64_t cols) {
    std::vector<float> x(n * cols);
    for (float& f : x) f = normal(rng);
    return x;
  };
  if (hist.k.empty()) hist.k.resize(l.n_layers), hist.v.resize(l.n_layers);
  if (hist.length < new_len) {
    for (int layer = 0; layer < l.n_layers; ++layer) {
      for (auto* kv_rows : {&hist.k[layer], &hist.v[layer]}) {
        const std::vector<float> more = random_rows(new_len - hist.length, kc);
        kv_rows->insert(kv_rows->end(), more.begin(), more.end());
      }
    }
    hist.length = new_len;
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  for (int layer = 0; layer < l.n_layers; ++layer) {
    const std::vector<float>& hk = hist.k[layer];
    const std::vector<float>& hv = hist.v[layer];
    std::vector<SpanRule> rules;  // empty: every head dense
    if (!l.rules.empty()) rules = l.rules[layer];
    std::vector<absl::Span<const int32_t>> tables;
    for (int h = 0; h < n_kv; ++h) tables.push_back(kv.table(seq, layer, h).blocks);
    const SequenceSlice slice{past, n_new, tables, {}};
    const std::vector<float> q = random_rows(n_new, qc);
    auto upload = [&](absl::Span<const float> x, int64_t cols) {
      auto t = be.NewActivation(n_new, cols).value();
      EXPECT_TRUE(be.CopyFromHost(x, *t).ok());
      return t;
    };
    auto qt = upload(q, qc);
    auto kt = upload(absl::MakeConstSpan(hk).subspan(past * kc, n_new * kc), kc);
    auto vt = upload(absl::MakeConstSpan(hv).subspan(past * kc, n_new * kc), kc);
    auto out = be.NewActivation(n_new, qc).value();
    const AttentionParams p{layer, n_heads, n_kv, hd, scale, l.span, rules};
    const absl::Status st = be.Attention(*qt, *kt, *vt, {&slice, 1}, p, pool, *out);
    ASSERT_TRUE(st.ok()) << where << ": layer " << layer << ": " << st;
    std::vector<float> y(n_new * qc);
    ASSERT_TRUE(be.CopyToHost(*out, absl::MakeSpan(y)).ok());
    std::vector<double> logit(new_len), ref(hd);
    for (int64_t r = 0; r < n_new; ++r) {
      const int64_t qp = past + r;
      for (int h = 0; h < n_heads; ++h) {
        const int kvh = h / group;
        double mx = -INFINITY;
        for (int64_t kp = 0; kp <= qp; ++kp) {
          logit[kp] = -INFINITY;
          if (!IsVisible(RuleOf(l, layer, kvh), l.span, qp, kp)) continue;
          double dot = 0;
          for (int i = 0; i < hd; ++i) {
            dot += double{q[(r * n_heads + h) * hd + i]} * hk[(kp * n_kv + kvh) * hd + i];
          }
          logit[kp] = dot * scale;
          mx = std::max(mx, logit[kp]);
        }
        double sum = 0;
        for (int64_t kp = 0; kp <= qp; ++kp) sum += std::exp(logit[kp] - mx);
        std::fill(ref.begin(), ref.end(), 0.0);
        for (int64_t kp = 0; kp <= qp; ++kp) {
          const double w = std::exp(logit[kp] - mx) / sum;
          if (w == 0) continue;
          for (int i = 0; i < hd; ++i) ref[i] += w * hv[(kp * n_kv + kvh) * hd + i];
        }
        for (int i = 0; i < hd; ++i) {
          ASSERT_NEAR(y[(r * n_heads + h) * hd + i], ref[i], 2e-5 * std::max(1.0, std::abs(ref[i])))
              << where << ": layer " << layer << " head " << h << " position " << qp << " dim "
              << i;
        }
      }
      ++rows_checked;
    }
  }
}

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
  // Attention data (GQA ratio, queries, keys, values) has its own stream so the schedules do not
  // depend on it.
  std::mt19937 data_rng(77);
  auto be = NewCpuBackend(1);
  int64_t steps = 0, exhausted = 0, preemptions = 0, cancels = 0, finishes = 0;
  int64_t rows_checked = 0, recomputed_rows = 0;
  for (int scenario = 0; scenario < 200; ++scenario) {
    const KvLayout layout = RandomLayout(rng);
    const int group = std::uniform_int_distribution<int>(1, 3)(data_rng);
    const int64_t heads = int64_t{layout.n_layers} * layout.n_kv_heads;
    // From "fits one short request" to roomy.
    const int32_t num_blocks = static_cast<int32_t>(
        heads * pick(CeilDiv(24, layout.block_size), CeilDiv(200, layout.block_size)));
    KvCacheManager kv(layout, num_blocks);
    auto pool = be->NewKvPool(num_blocks, layout.block_size, layout.head_dim).value();
    const std::string where = absl::StrCat("scenario ", scenario);
    std::vector<Request> waiting;
    std::vector<Running> running;  // oldest first
    const int64_t chunk = pick(1, 24);
    for (int step = 0; step < 60; ++step, ++steps) {
      const std::string at = absl::StrCat(where, " step ", step);
      if (pick(0, 2) == 0) {
        const int64_t prompt = pick(1, 60);
        waiting.push_back({prompt, pick(1, 40), {}});
      }
      // Admit the oldest waiting request when there is room for its first chunk.
      if (!waiting.empty() && running.size() < 4 &&
          kv.BlocksForNew(std::min(chunk, waiting.front().prompt)) <= kv.free_blocks()) {
        running.push_back({kv.AddSequence(), std::move(waiting.front())});
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
          const bool victim_is_this = &running.back() == &r;
          Running victim = std::move(running.back());
          running.pop_back();
          ASSERT_TRUE(kv.Release(victim.seq).ok()) << at;
          ++preemptions;
          // Recomputed later: what it generated so far becomes part of its prompt, and its K/V
          // rows are written again from scratch (the same values: recomputation is exact).
          waiting.insert(waiting.begin(), Request{victim.req.prompt + victim.generated,
                                                  victim.req.to_generate - victim.generated,
                                                  std::move(victim.req.history)});
          if (victim_is_this) continue;  // it was this one: nothing to run
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
        // ... and attention through those tables reads exactly what was written there.
        recomputed_rows += std::max<int64_t>(0, std::min(new_len, r.req.history.length) - past);
        ASSERT_NO_FATAL_FAILURE(ExpectAttentionEqualsDense(*be, *pool, kv, r.seq, group, past,
                                                           new_len, r.req.history, data_rng,
                                                           rows_checked, at));
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
            << " preemptions, " << cancels << " cancels, " << finishes << " finishes, "
            << rows_checked << " attention rows checked (" << recomputed_rows
            << " recomputed after a preemption)\n";
  // The schedule must have exercised every path.
  EXPECT_GT(steps, 3000);
  EXPECT_GT(exhausted, 10);
  EXPECT_GT(preemptions, 10);
  EXPECT_GT(cancels, 10);
  EXPECT_GT(finishes, 100);
  EXPECT_GT(rows_checked, 20000);
  EXPECT_GT(recomputed_rows, 500);
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

// Two layers of two KV heads, blocks of 4: a dense, a local, an elastic and a dense head.
KvLayout TwoLayerMixedLayout() {
  KvLayout l;
  l.n_layers = 2;
  l.n_kv_heads = 2;
  l.head_dim = 4;
  l.block_size = 4;
  l.span = {4, 4};
  l.rules = {{SpanRule{}, SpanRule{false, 8, 0.0}}, {SpanRule{false, 4, 0.5}, SpanRule{}}};
  return l;
}

// A backend may keep its own copy of a table and trust it while the version stays (TableVersion,
// kernels/backend.h): every change of the entries must change the version, and ids must be
// unique across managers.
TEST(KvCacheManager, TableVersionsChangeWithTheTablesAndIdsAreUnique) {
  const KvLayout l = TwoLayerMixedLayout();
  KvCacheManager kv(l, 400);
  KvCacheManager other(l, 400);
  const SeqId a = kv.AddSequence(), b = kv.AddSequence(), c = other.AddSequence();
  std::set<uint64_t> ids;
  for (SeqId s : {a, b}) {
    for (int layer = 0; layer < 2; ++layer) {
      for (int h = 0; h < 2; ++h) ids.insert(kv.table(s, layer, h).id);
    }
  }
  for (int layer = 0; layer < 2; ++layer) {
    for (int h = 0; h < 2; ++h) ids.insert(other.table(c, layer, h).id);
  }
  EXPECT_EQ(ids.size(), 12u);
  EXPECT_EQ(ids.count(0), 0u);
  // LayerTables: the same tables, one lookup.
  std::vector<const HeadBlockTable*> layer(2);
  ASSERT_TRUE(kv.LayerTables(b, 1, absl::MakeSpan(layer)));
  EXPECT_EQ(layer[0], &kv.table(b, 1, 0));
  EXPECT_EQ(layer[1], &kv.table(b, 1, 1));
  EXPECT_FALSE(kv.LayerTables(b, 2, absl::MakeSpan(layer)));
  EXPECT_FALSE(kv.LayerTables(12345, 0, absl::MakeSpan(layer)));
  std::vector<const HeadBlockTable*> three(3);
  EXPECT_FALSE(kv.LayerTables(b, 0, absl::MakeSpan(three)));
  std::vector<HeadBlockTable> before(4);
  for (int64_t n = 1; n <= 60; ++n) {
    ASSERT_TRUE(kv.Grow(a, n).ok());
    for (int pass = 0; pass < 2; ++pass) {  // after Grow, then after Trim
      for (int layer = 0; layer < 2; ++layer) {
        for (int h = 0; h < 2; ++h) {
          const HeadBlockTable& t = kv.table(a, layer, h);
          HeadBlockTable& old = before[layer * 2 + h];
          EXPECT_EQ(t.blocks != old.blocks, t.version != old.version)
              << "n " << n << " pass " << pass << " layer " << layer << " head " << h;
          old = t;
        }
      }
      kv.Trim(a);
    }
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
  const KvLayout l = TwoLayerMixedLayout();
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
