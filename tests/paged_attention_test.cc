// CPU attention over paged KV blocks against a dense softmax under an explicit IsVisible mask:
// random shapes, spans, block sizes and physical block placement, several sequences batched,
// chunked prefill and decode with the window blocks trimmed between steps.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "gtest/gtest.h"
#include "kernels/attention_span.h"
#include "kernels/backend.h"
#include "kvcache/kv_cache_manager.h"

namespace moa {
namespace {

struct Seq {
  int64_t len;
  std::vector<float> q, k, v;  // [len, heads * hd]
  std::vector<double> ref;     // reference output [len, n_heads * hd]
  SeqId id = 0;
  std::vector<int64_t> chunks;  // tokens per step
  size_t next_chunk = 0;
  int64_t done = 0;
};

std::vector<float> RandomFloats(std::mt19937& rng, int64_t n) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Dense softmax over every earlier key, masked with IsVisible().
std::vector<double> Reference(const Seq& s, int n_heads, int n_kv, int hd, const SpanParams& sp,
                              const std::vector<SpanRule>& rules, float scale) {
  const int group = n_heads / n_kv;
  std::vector<double> out(s.len * n_heads * hd, 0.0);
  std::vector<double> logit(s.len);
  for (int64_t qp = 0; qp < s.len; ++qp) {
    for (int h = 0; h < n_heads; ++h) {
      const int kvh = h / group;
      double mx = -INFINITY;
      for (int64_t kp = 0; kp <= qp; ++kp) {
        logit[kp] = -INFINITY;
        if (!IsVisible(rules[kvh], sp, qp, kp)) continue;
        double dot = 0;
        for (int i = 0; i < hd; ++i) {
          dot += double{s.q[(qp * n_heads + h) * hd + i]} * s.k[(kp * n_kv + kvh) * hd + i];
        }
        logit[kp] = dot * scale;
        mx = std::max(mx, logit[kp]);
      }
      double sum = 0;
      for (int64_t kp = 0; kp <= qp; ++kp) sum += std::exp(logit[kp] - mx);
      for (int64_t kp = 0; kp <= qp; ++kp) {
        const double p = std::exp(logit[kp] - mx) / sum;
        if (p == 0) continue;
        for (int i = 0; i < hd; ++i) {
          out[(qp * n_heads + h) * hd + i] += p * s.v[(kp * n_kv + kvh) * hd + i];
        }
      }
    }
  }
  return out;
}

std::unique_ptr<Tensor> Upload(Backend& be, const std::vector<float>& v, int64_t rows,
                               int64_t cols) {
  auto t = be.NewActivation(rows, cols).value();
  EXPECT_TRUE(be.CopyFromHost(v, *t).ok());
  return t;
}

TEST(PagedAttention, EqualsDenseMaskedReferenceOverRandomPagesAndSchedules) {
  std::mt19937 rng(4242);
  auto pick = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  auto be = NewCpuBackend(2);
  int64_t rows_checked = 0, trimmed_heads = 0;
  for (int trial = 0; trial < 150; ++trial) {
    const int n_kv = static_cast<int>(pick(1, 3));
    const int group_sizes[] = {1, 3, 4};
    const int n_heads = n_kv * group_sizes[pick(0, 2)];
    const int hd = static_cast<int>(pick(1, 3)) * 8;
    const int32_t block_sizes[] = {1, 16, 64};
    const int32_t bs = block_sizes[pick(0, 2)];
    SpanParams sp;
    sp.block = pick(1, 8);
    sp.sink = pick(0, 2) == 0 ? 0 : pick(1, 2) == 1 ? pick(1, 8) : pick(100, 200);  // > lengths
    std::vector<SpanRule> rules(n_kv);
    for (SpanRule& r : rules) {
      switch (pick(0, 3)) {
        case 0:
          break;  // dense
        case 1:
          r = SpanRule{false, pick(0, 24), 0.0};  // window shorter than most sequences
          break;
        case 2:
          r = SpanRule{false, pick(200, 400), 0.0};  // window longer than any sequence
          break;
        default:
          r = SpanRule{false, pick(0, 16), std::uniform_real_distribution<double>(0, 1)(rng)};
      }
    }
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const std::string where = absl::StrCat("trial ", trial, ": ", n_heads, "/", n_kv, " heads, hd ",
                                           hd, ", block ", bs, ", sink ", sp.sink);

    KvLayout layout;
    layout.n_layers = 1;
    layout.n_kv_heads = n_kv;
    layout.head_dim = hd;
    layout.block_size = bs;
    layout.span = sp;
    layout.rules = {rules};
    const int n_seqs = static_cast<int>(pick(1, 3));
    std::vector<Seq> seqs(n_seqs);
    int64_t blocks = 0;
    for (Seq& s : seqs) {
      s.len = pick(1, 90);
      s.q = RandomFloats(rng, s.len * n_heads * hd);
      s.k = RandomFloats(rng, s.len * n_kv * hd);
      s.v = RandomFloats(rng, s.len * n_kv * hd);
      s.ref = Reference(s, n_heads, n_kv, hd, sp, rules, scale);
      const int64_t prompt = pick(1, s.len);
      for (int64_t done = 0; done < prompt;) {
        const int64_t n = std::min(prompt - done, pick(1, 40));
        s.chunks.push_back(n);
        done += n;
      }
      s.chunks.resize(s.chunks.size() + (s.len - prompt), 1);  // then decode
      blocks += n_kv * ((s.len + bs - 1) / bs);
    }
    KvCacheManager kv(layout, static_cast<int32_t>(blocks));
    for (Seq& s : seqs) s.id = kv.AddSequence();
    // The manager's block ids, scattered over the pool by a random permutation.
    std::vector<int32_t> perm(blocks);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    auto pool = be->NewKvPool(static_cast<int32_t>(blocks), bs, hd).value();

    const int64_t qc = int64_t{n_heads} * hd, kc = int64_t{n_kv} * hd;
    while (true) {
      std::vector<float> q, k, v;
      std::vector<Seq*> active;
      std::vector<SequenceSlice> slices;
      std::vector<std::vector<int32_t>> tables;  // [active seq * n_kv + head], permuted
      for (Seq& s : seqs) {
        if (s.next_chunk == s.chunks.size()) continue;
        const int64_t n = s.chunks[s.next_chunk++];
        ASSERT_TRUE(kv.Grow(s.id, s.done + n).ok()) << where;
        active.push_back(&s);
        auto rows = [&](const std::vector<float>& src, int64_t cols, std::vector<float>& dst) {
          dst.insert(dst.end(), src.begin() + s.done * cols, src.begin() + (s.done + n) * cols);
        };
        rows(s.q, qc, q);
        rows(s.k, kc, k);
        rows(s.v, kc, v);
        for (int h = 0; h < n_kv; ++h) {
          std::vector<int32_t> t = kv.table(s.id, 0, h).blocks;
          for (int32_t& b : t) b = b < 0 ? -1 : perm[b];
          tables.push_back(std::move(t));
        }
        slices.push_back({s.done, n, {}, {}});
      }
      if (active.empty()) break;
      std::vector<absl::Span<const int32_t>> spans(tables.begin(), tables.end());
      for (size_t i = 0; i < slices.size(); ++i) {
        slices[i].block_tables = absl::MakeConstSpan(spans).subspan(i * n_kv, n_kv);
      }
      const int64_t rows = static_cast<int64_t>(q.size()) / qc;
      auto qt = Upload(*be, q, rows, qc);
      auto kt = Upload(*be, k, rows, kc);
      auto vt = Upload(*be, v, rows, kc);
      auto out = be->NewActivation(rows, qc).value();
      const AttentionParams p{0, n_heads, n_kv, hd, scale, sp, rules};
      const absl::Status st = be->Attention(*qt, *kt, *vt, slices, p, *pool, *out);
      ASSERT_TRUE(st.ok()) << where << ": " << st;
      std::vector<float> y(rows * qc);
      ASSERT_TRUE(be->CopyToHost(*out, absl::MakeSpan(y)).ok());
      int64_t row = 0;
      for (size_t i = 0; i < active.size(); ++i) {
        Seq& s = *active[i];
        for (int64_t r = 0; r < slices[i].n_new; ++r, ++row) {
          const int64_t pos = s.done + r;
          for (int64_t c = 0; c < qc; ++c) {
            ASSERT_NEAR(y[row * qc + c], s.ref[pos * qc + c], 2e-5)
                << where << ", sequence " << i << ", position " << pos << ", column " << c;
          }
          ++rows_checked;
        }
        s.done += slices[i].n_new;
        const int64_t before = kv.blocks_held(s.id);
        kv.Trim(s.id);
        trimmed_heads += kv.blocks_held(s.id) < before;
      }
      ASSERT_TRUE(kv.CheckInvariants().ok()) << where << ": " << kv.CheckInvariants();
    }
  }
  EXPECT_GT(rows_checked, 2000);
  EXPECT_GT(trimmed_heads, 50);  // windows did give blocks back while the test ran
}

// A block missing where a visible key lives, or where a new row goes, is an INTERNAL error.
TEST(PagedAttention, MissingBlocksAreInternalErrors) {
  auto be = NewCpuBackend(2);
  const int nh = 2, nkv = 1, hd = 8;
  const int32_t bs = 4;
  auto pool = be->NewKvPool(8, bs, hd).value();
  std::mt19937 rng(3);
  auto q = Upload(*be, RandomFloats(rng, 10 * nh * hd), 10, nh * hd);
  auto k = Upload(*be, RandomFloats(rng, 10 * nkv * hd), 10, nkv * hd);
  auto v = Upload(*be, RandomFloats(rng, 10 * nkv * hd), 10, nkv * hd);
  auto out = be->NewActivation(10, nh * hd).value();
  const AttentionParams p{3, nh, nkv, hd, 0.3f, {}, {}};
  std::vector<int32_t> table = {5, 2, 7};
  absl::Span<const int32_t> spans[] = {table};
  SequenceSlice s{0, 10, spans, {}};
  ASSERT_TRUE(be->Attention(*q, *k, *v, {&s, 1}, p, *pool, *out).ok());

  // Decode one more token over a table whose first block was dropped: a dense head sees it.
  auto q1 = Upload(*be, RandomFloats(rng, nh * hd), 1, nh * hd);
  auto k1 = Upload(*be, RandomFloats(rng, nkv * hd), 1, nkv * hd);
  auto v1 = Upload(*be, RandomFloats(rng, nkv * hd), 1, nkv * hd);
  auto out1 = be->NewActivation(1, nh * hd).value();
  std::vector<int32_t> holed = {-1, 2, 7};
  absl::Span<const int32_t> holed_spans[] = {holed};
  SequenceSlice decode{10, 1, holed_spans, {}};
  absl::Status st = be->Attention(*q1, *k1, *v1, {&decode, 1}, p, *pool, *out1);
  EXPECT_EQ(st.code(), absl::StatusCode::kInternal) << st;
  // A local head that no longer sees block 0 is fine with the hole.
  const SpanRule local[] = {SpanRule{false, 4, 0.0}};
  AttentionParams lp = p;
  lp.span = {0, 4};
  lp.rules = local;
  EXPECT_TRUE(be->Attention(*q1, *k1, *v1, {&decode, 1}, lp, *pool, *out1).ok());
  // No block for the new position 12 (the table is too short), or an id outside the pool.
  SequenceSlice past_end{12, 1, spans, {}};
  st = be->Attention(*q1, *k1, *v1, {&past_end, 1}, p, *pool, *out1);
  EXPECT_EQ(st.code(), absl::StatusCode::kInternal) << st;
  std::vector<int32_t> outside = {5, 2, 8};
  absl::Span<const int32_t> outside_spans[] = {outside};
  SequenceSlice bad_id{10, 1, outside_spans, {}};
  EXPECT_EQ(be->Attention(*q1, *k1, *v1, {&bad_id, 1}, p, *pool, *out1).code(),
            absl::StatusCode::kInternal);
  // Two sequences writing into one block.
  auto q2 = Upload(*be, RandomFloats(rng, 2 * nh * hd), 2, nh * hd);
  auto k2 = Upload(*be, RandomFloats(rng, 2 * nkv * hd), 2, nkv * hd);
  auto v2 = Upload(*be, RandomFloats(rng, 2 * nkv * hd), 2, nkv * hd);
  auto out2 = be->NewActivation(2, nh * hd).value();
  std::vector<int32_t> other = {6, 7};
  absl::Span<const int32_t> other_spans[] = {other};
  const SequenceSlice two[] = {{10, 1, spans, {}}, {5, 1, other_spans, {}}};
  EXPECT_EQ(be->Attention(*q2, *k2, *v2, two, p, *pool, *out2).code(), absl::StatusCode::kInternal);
  // Wrong number of tables, a pool of another head_dim, bad pool shapes.
  SequenceSlice no_tables{10, 1, {}, {}};
  EXPECT_EQ(be->Attention(*q1, *k1, *v1, {&no_tables, 1}, p, *pool, *out1).code(),
            absl::StatusCode::kInvalidArgument);
  const TableVersion two_versions[] = {{1, 1}, {2, 1}};  // one table, two versions
  SequenceSlice bad_versions{10, 1, spans, two_versions};
  st = be->Attention(*q1, *k1, *v1, {&bad_versions, 1}, p, *pool, *out1);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("2 table versions for 1 kv heads"), std::string::npos) << st;
  auto other_pool = be->NewKvPool(8, bs, 2 * hd).value();
  EXPECT_FALSE(be->Attention(*q1, *k1, *v1, {&decode, 1}, p, *other_pool, *out1).ok());
  EXPECT_FALSE(be->NewKvPool(0, 16, 64).ok());
  EXPECT_FALSE(be->NewKvPool(8, 0, 64).ok());
  EXPECT_FALSE(be->NewKvPool(1 << 30, 1 << 20, 1 << 20).ok());
  EXPECT_EQ(be->KvBlockBytes(16, 64), 16 * 64 * 2 * 4);
}

}  // namespace
}  // namespace moa
