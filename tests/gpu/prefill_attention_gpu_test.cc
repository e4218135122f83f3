// The flash-attention prefill kernel (kernels/cuda/prefill_attention.cu) against a plain host
// reference over the same fp16 pool, on fresh random inputs: several sequences per launch (a
// whole prompt, chunks on top of an existing cache whose length is not a multiple of the block
// size, single-row chunks), GQA groups 1/3/4/8 (and 16), head_dim 64/128 (and 80, 256 padded),
// KV blocks of 16 and 7 tokens at shuffled pool places, dense heads next to sink + window heads
// whose windows are shorter or longer than the sequence. Blocks that hold no key any new row
// sees are left out of the tables (-1), and every key no new row sees is NaN in the pool, so
// reading one would show. Outputs start as NaN; rows of no listed sequence must stay NaN.
// Runs on the GPU machine only (moa_gpu_tests --gtest_filter='Prefill*').
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "kernels/attention_span.h"
#include "kernels/cuda/prefill_attention.h"
#include "tests/gpu/cuda_test_util.h"

namespace moa::cuda {
namespace {

// The reference takes the same fp16 keys and values and the same fp16 query (the kernel feeds
// the tensor cores q * scale * log2(e) rounded to fp16, and so does the reference), so what is
// left is the kernel's rounding of the softmax weights to fp16 before P * V (relative 2^-11 per
// weight) and fp32 sums: at most 2^-11 * max|v| (about 2.5e-3 for these unit-normal values) if
// every weight erred the same way; the errors are independent, so 2e-3 is several times what
// they add up to. A key wrongly seen or missed moves an output by its weight times |v|, which
// with windows of a few dozen keys and sharp scores is well above that.
constexpr double kTolerance = 2e-3;
constexpr float kLog2e = 1.4426950408889634f;

using gpu_test::DeviceBuffer;

struct Case {
  int n_kv_heads;
  int group;
  int head_dim;
  int block_size;
  uint32_t seed;
};

void RunCase(const Case& c) {
  SCOPED_TRACE(absl::StrFormat("kv_heads %d group %d head_dim %d block %d seed %u", c.n_kv_heads,
                               c.group, c.head_dim, c.block_size, c.seed));
  std::mt19937 rng(c.seed);
  const auto uniform = [&](int lo, int hi) {
    return std::uniform_int_distribution<int>(lo, hi)(rng);
  };
  const int hd = c.head_dim, bs = c.block_size;
  const int n_heads = c.n_kv_heads * c.group;

  // Sequences: a whole prompt, a chunk on a cache of odd length, a single-row chunk, then more
  // of either kind; a gap of unused rows before each.
  const int n_seqs = uniform(3, 5);
  std::vector<int32_t> past(n_seqs), n_new(n_seqs), q_row(n_seqs);
  int32_t rows = 0;
  for (int s = 0; s < n_seqs; ++s) {
    const int kind = s < 3 ? s : uniform(0, 2);
    past[s] = kind == 0 ? 0 : uniform(1, 700);
    n_new[s] = kind == 2 ? 1 : uniform(2, 300);
    rows += uniform(0, 3);
    q_row[s] = rows;
    rows += n_new[s];
  }
  rows += uniform(0, 3);
  const int32_t max_n_new = *std::max_element(n_new.begin(), n_new.end());

  // Span rules per (sequence, KV head): dense, or sink + window, the window shorter or longer
  // than the sequence.
  const SpanParams params{4 * uniform(0, 4), 8 * uniform(1, 8)};
  const int n_pairs = n_seqs * c.n_kv_heads;
  std::vector<SpanRule> rules(n_pairs);
  std::vector<DeviceSpanRule> device_rules(n_pairs);
  for (int p = 0; p < n_pairs; ++p) {
    const int32_t len = past[p / c.n_kv_heads] + n_new[p / c.n_kv_heads];
    SpanRule& r = rules[p];
    r.dense = uniform(0, 3) == 0;
    r.alpha = uniform(0, 3) == 0 ? uniform(0, 2 * len) : uniform(0, 64);
    r.beta = uniform(0, 2) == 0 ? 0.0 : std::uniform_real_distribution<double>(0.0, 1.0)(rng);
    device_rules[p] = {r.dense ? 1 : 0,
                       static_cast<int32_t>(params.block * (r.alpha / params.block)), r.beta,
                       static_cast<int32_t>(params.sink + params.block)};
  }

  // Keys some new row sees, per pair; blocks holding none are left out of the table.
  std::vector<std::vector<char>> seen(n_pairs);
  std::vector<std::vector<int32_t>> tables(n_pairs);
  int32_t used = 0;
  for (int p = 0; p < n_pairs; ++p) {
    const int s = p / c.n_kv_heads;
    const int32_t len = past[s] + n_new[s];
    seen[p].assign(len, 0);
    for (int32_t pos = past[s]; pos < len; ++pos) {
      for (int32_t k = 0; k <= pos; ++k) {
        if (IsVisible(rules[p], params, pos, k)) seen[p][k] = 1;
      }
    }
    tables[p].assign((len + bs - 1) / bs, -1);
    for (int32_t b = 0; b < static_cast<int32_t>(tables[p].size()); ++b) {
      const int32_t end = std::min(len, (b + 1) * bs);
      if (std::any_of(seen[p].begin() + b * bs, seen[p].begin() + end, [](char x) { return x; })) {
        tables[p][b] = used++;
      }
    }
  }
  const int32_t num_blocks = used + used / 4 + 1;
  const gpu_test::PackedTables packed = gpu_test::ShuffleAndPack(tables, num_blocks, rng);

  // Pool: unit normals for keys some new row sees, NaN everywhere else.
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const size_t value_offset = static_cast<size_t>(num_blocks) * bs * hd;
  std::vector<__half> pool(2 * value_offset, __float2half(NAN));
  const auto key_at = [&](int p, int32_t k) {
    return (static_cast<size_t>(tables[p][k / bs]) * bs + k % bs) * hd;
  };
  for (int p = 0; p < n_pairs; ++p) {
    for (int32_t k = 0; k < static_cast<int32_t>(seen[p].size()); ++k) {
      if (!seen[p][k]) continue;
      for (int d = 0; d < hd; ++d) {
        pool[key_at(p, k) + d] = __float2half(normal(rng));
        pool[value_offset + key_at(p, k) + d] = __float2half(normal(rng));
      }
    }
  }
  const size_t row_width = static_cast<size_t>(n_heads) * hd;
  std::vector<float> q(static_cast<size_t>(rows) * row_width);
  for (float& x : q) x = 2.0f * normal(rng);  // sharper softmaxes than unit scores
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const float qscale = scale * kLog2e;

  // Reference: base-2 softmax over the visible keys with the fp16 query, sums in double.
  std::vector<float> want(q.size(), NAN);
  std::vector<float> qh(hd);
  std::vector<double> score, o(hd);
  for (int p = 0; p < n_pairs; ++p) {
    const int s = p / c.n_kv_heads, h = p % c.n_kv_heads;
    for (int32_t t = 0; t < n_new[s]; ++t) {
      const int32_t pos = past[s] + t;
      const VisibleKeys vis = VisibleKeysAt(rules[p], params, pos);
      std::vector<int32_t> keys;
      for (int32_t k = 0; k <= pos; ++k) {
        if (k < vis.sink_end || k >= vis.window_begin) keys.push_back(k);
      }
      for (int g = 0; g < c.group; ++g) {
        const size_t qoff = (q_row[s] + t) * row_width + static_cast<size_t>(h * c.group + g) * hd;
        for (int d = 0; d < hd; ++d) qh[d] = __half2float(__float2half(q[qoff + d] * qscale));
        score.assign(keys.size(), 0.0);
        double mx = -INFINITY;
        for (size_t i = 0; i < keys.size(); ++i) {
          const __half* key = pool.data() + key_at(p, keys[i]);
          for (int d = 0; d < hd; ++d) score[i] += double{qh[d]} * __half2float(key[d]);
          mx = std::max(mx, score[i]);
        }
        std::fill(o.begin(), o.end(), 0.0);
        double l = 0.0;
        for (size_t i = 0; i < keys.size(); ++i) {
          const double e = std::exp2(score[i] - mx);
          l += e;
          const __half* val = pool.data() + value_offset + key_at(p, keys[i]);
          for (int d = 0; d < hd; ++d) o[d] += e * __half2float(val[d]);
        }
        for (int d = 0; d < hd; ++d) want[qoff + d] = static_cast<float>(o[d] / l);
      }
    }
  }

  DeviceBuffer<__half> d_pool;
  DeviceBuffer<float> d_q, d_out;
  DeviceBuffer<int64_t> d_begin;
  DeviceBuffer<int32_t> d_len, d_data, d_q_row, d_n_new, d_past;
  DeviceBuffer<DeviceSpanRule> d_rules;
  CUDA_OK(d_pool.Upload(pool));
  CUDA_OK(d_q.Upload(q));
  CUDA_OK(d_out.Upload(std::vector<float>(q.size(), NAN)));  // poison
  CUDA_OK(d_begin.Upload(packed.begin));
  CUDA_OK(d_len.Upload(packed.len));
  CUDA_OK(d_data.Upload(packed.data));
  CUDA_OK(d_q_row.Upload(q_row));
  CUDA_OK(d_n_new.Upload(n_new));
  CUDA_OK(d_past.Upload(past));
  CUDA_OK(d_rules.Upload(device_rules));

  PrefillAttentionArgs args{};
  args.q = d_q.ptr;
  args.out = d_out.ptr;
  args.n_heads = n_heads;
  args.n_kv_heads = c.n_kv_heads;
  args.head_dim = hd;
  args.scale = scale;
  args.sink = static_cast<int32_t>(params.sink);
  args.n_seqs = n_seqs;
  args.q_row = d_q_row.ptr;
  args.n_new = d_n_new.ptr;
  args.past = d_past.ptr;
  args.max_n_new = max_n_new;
  args.table_begin = d_begin.ptr;
  args.table_len = d_len.ptr;
  args.table_data = d_data.ptr;
  args.rules = d_rules.ptr;
  CUDA_OK(LaunchPrefillAttention(args, DevicePool{d_pool.ptr, num_blocks, bs, hd}, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<float> got(q.size());
  CUDA_OK(cudaMemcpy(got.data(), d_out.ptr, got.size() * sizeof(float), cudaMemcpyDeviceToHost));

  double worst = 0.0;
  size_t at = 0, untouched_written = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(want[i])) {  // a row of no listed sequence
      untouched_written += !std::isnan(got[i]);
      continue;
    }
    const double e = std::fabs(double{got[i]} - double{want[i]});
    if (!(e <= worst)) {  // NaN counts as the worst
      worst = std::isnan(e) ? INFINITY : e;
      at = i;
    }
  }
  EXPECT_EQ(untouched_written, 0u) << "values written into rows of no listed sequence";
  EXPECT_LE(worst, kTolerance) << "max |diff| " << worst << " at row " << at / row_width << " head "
                               << at % row_width / hd << " dim " << at % hd << ": gpu " << got[at]
                               << ", ref " << want[at];
}

TEST(PrefillAttention, MatchesHostReferenceAcrossShapes) {
  uint32_t seed = 1;
  for (const int group : {1, 3, 4, 8}) {
    for (const int head_dim : {64, 128}) {
      for (const int block_size : {16, 7}) {
        RunCase({group == 8 ? 1 : 2, group, head_dim, block_size, seed++});
      }
    }
  }
}

TEST(PrefillAttention, PaddedHeadDimsAndLargeGroups) {
  RunCase({2, 2, 80, 16, 101});
  RunCase({1, 1, 256, 7, 102});
  RunCase({2, 1, 8, 5, 103});
  RunCase({1, 16, 64, 16, 104});
}

TEST(PrefillAttention, RefusesUnsupportedShapes) {
  EXPECT_TRUE(PrefillAttentionSupports(128, 8));
  EXPECT_FALSE(PrefillAttentionSupports(100, 1));
  EXPECT_FALSE(PrefillAttentionSupports(264, 1));
  EXPECT_FALSE(PrefillAttentionSupports(0, 1));
  EXPECT_FALSE(PrefillAttentionSupports(128, 0));
  EXPECT_FALSE(PrefillAttentionSupports(128, 65));
  PrefillAttentionArgs args{};
  args.n_heads = 6;
  args.n_kv_heads = 4;  // not a whole group
  args.head_dim = 64;
  args.n_seqs = 1;
  args.max_n_new = 1;
  EXPECT_EQ(LaunchPrefillAttention(args, DevicePool{nullptr, 1, 16, 64}, nullptr),
            cudaErrorInvalidValue);
  args.n_kv_heads = 2;
  EXPECT_EQ(LaunchPrefillAttention(args, DevicePool{nullptr, 1, 16, 128}, nullptr),
            cudaErrorInvalidValue);  // pool of another head_dim
  EXPECT_EQ(LaunchPrefillAttention(args, DevicePool{nullptr, 1, 0, 64}, nullptr),
            cudaErrorInvalidValue);  // empty blocks
  args.n_seqs = 0;                   // nothing to do
  EXPECT_EQ(LaunchPrefillAttention(args, DevicePool{nullptr, 1, 16, 64}, nullptr), cudaSuccess);
}

}  // namespace
}  // namespace moa::cuda
