// The split-KV decode attention kernel (kernels/cuda/decode_attention.cu) against a plain host
// reference (double precision) over the same paged fp16 pool: random batch sizes, GQA ratios,
// head dims, lengths not a multiple of the block size, sinks with windows shorter and longer than
// the sequence, dense pairs mixed with short ones, random physical block placement where blocks
// holding no visible key are left out of the tables (-1), so reading one would show, and the
// sequences' rows shuffled among extra rows that must stay untouched. Every case runs on both
// kernels (CUDA cores, tensor cores at each pipeline depth) and with a small minimum of keys per
// block (many partials to merge), each twice on one workspace (the second run checks that the
// first left its arrival counters at zero). Block sizes of 8 and 24 positions make the tensor
// kernel's 16-key tiles straddle pool blocks. A large minimum of keys per block, and many short
// pairs, make one block work through hundreds of pairs, finishing each (written out, or published
// as a partial) before the next.
// Runs on the GPU machine only (moa_gpu_tests --gtest_filter='Decode*').
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
#include "kernels/cuda/decode_attention.h"
#include "tests/gpu/cuda_test_util.h"

namespace moa::cuda {
namespace {

// The reference reads the same fp16 keys and values; what is left is fp32 accumulation over up
// to a few thousand keys and the merge of partials, against double. The tensor kernel carries the
// query and the softmax weights as fp16 hi + lo pairs, so it is held to the same tolerance.
constexpr double kTolerance = 1e-4;

struct Variant {
  DecodeAttentionVariant kind;
  int stages;     // 0: the default
  int min_keys;   // 0: the default
  int pair_keys;  // -1: the default
  const char* name;
};

constexpr Variant kVariants[] = {
    {DecodeAttentionVariant::kCudaCores, 0, 0, -1, "cuda cores"},
    {DecodeAttentionVariant::kCudaCores, 0, 16, -1, "cuda cores, min 16 keys per block"},
    {DecodeAttentionVariant::kTensorCores, 2, 0, -1, "tensor cores, 2 stages"},
    {DecodeAttentionVariant::kTensorCores, 3, 0, -1, "tensor cores, 3 stages"},
    {DecodeAttentionVariant::kTensorCores, 4, 0, -1, "tensor cores, 4 stages"},
    {DecodeAttentionVariant::kTensorCores, 3, 16, -1, "tensor cores, min 16 keys per block"},
    {DecodeAttentionVariant::kCudaCores, 0, 1024, -1, "cuda cores, min 1024 keys per block"},
    {DecodeAttentionVariant::kTensorCores, 2, 1024, -1, "tensor cores, 2 stages, min 1024 keys"},
    // A pair start worth no keys (the split of the keys alone), and worth more than most pairs'
    // keys (blocks whose range holds only pair starts take no keys).
    {DecodeAttentionVariant::kTensorCores, 3, 16, 0, "tensor cores, pair starts cost nothing"},
    {DecodeAttentionVariant::kCudaCores, 0, 16, 5000, "cuda cores, 5000 keys per pair start"},
    {DecodeAttentionVariant::kTensorCores, 3, 16, 5000, "tensor cores, 5000 keys per pair start"},
    {DecodeAttentionVariant::kDefault, 0, 0, -1, "default"},
};

using gpu_test::DeviceBuffer;

struct Case {
  int n_seqs;
  int n_kv_heads;
  int group;
  int head_dim;
  int block_size;
  uint32_t seed;
  int32_t fixed_len = 0;  // > 0: every sequence has this length
};

void RunCase(const Case& c) {
  SCOPED_TRACE(absl::StrFormat("seqs %d kv_heads %d group %d head_dim %d block %d seed %u",
                               c.n_seqs, c.n_kv_heads, c.group, c.head_dim, c.block_size, c.seed));
  std::mt19937 rng(c.seed);
  const int hd = c.head_dim, bs = c.block_size;
  const int n_heads = c.n_kv_heads * c.group;
  const int n_pairs = c.n_seqs * c.n_kv_heads;

  // Lengths: mostly short, a few long ones (the case split-KV exists for), rarely 1.
  std::vector<int32_t> seq_len(c.n_seqs);
  for (int32_t& n : seq_len) {
    if (c.fixed_len > 0) {
      n = c.fixed_len;
      continue;
    }
    const int kind = std::uniform_int_distribution<int>(0, 9)(rng);
    n = kind == 0  ? 1
        : kind < 3 ? std::uniform_int_distribution<int>(1500, 4000)(rng)
                   : std::uniform_int_distribution<int>(2, 300)(rng);
  }
  // Per pair: dense, or a sink of 0..2 blocks and a window shorter or longer than the sequence.
  std::vector<int32_t> sink_end(n_pairs), win_begin(n_pairs);
  for (int p = 0; p < n_pairs; ++p) {
    const int32_t n = seq_len[p / c.n_kv_heads];
    if (std::uniform_int_distribution<int>(0, 2)(rng) == 0) {
      sink_end[p] = win_begin[p] = 0;
      continue;
    }
    const int32_t sink = std::min(n, bs * std::uniform_int_distribution<int>(0, 2)(rng));
    const int32_t window = std::uniform_int_distribution<int>(1, n + 50)(rng);
    sink_end[p] = sink;
    win_begin[p] = std::max(sink, n - window);
  }

  // Blocks: only those holding a visible key, at shuffled pool places among unused ones.
  std::vector<std::vector<int32_t>> tables(n_pairs);
  int32_t used = 0;
  for (int p = 0; p < n_pairs; ++p) {
    const int32_t n = seq_len[p / c.n_kv_heads];
    tables[p].assign((n + bs - 1) / bs, -1);
    for (int32_t b = 0; b < static_cast<int32_t>(tables[p].size()); ++b) {
      const int32_t first = b * bs, last = std::min(n, first + bs) - 1;
      if (first < sink_end[p] || last >= win_begin[p]) tables[p][b] = used++;
    }
  }
  const int32_t num_blocks = used + used / 4 + 1;
  const gpu_test::PackedTables packed = gpu_test::ShuffleAndPack(tables, num_blocks, rng);

  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<__half> pool(2 * static_cast<size_t>(num_blocks) * bs * hd);
  for (__half& x : pool) x = __float2half(normal(rng));
  // q has a few more rows than sequences; sequence s is at row_of[s].
  const int n_rows = c.n_seqs + 3;
  std::vector<int32_t> row_of(n_rows);
  std::iota(row_of.begin(), row_of.end(), 0);
  std::shuffle(row_of.begin(), row_of.end(), rng);
  row_of.resize(c.n_seqs);
  std::vector<float> q(static_cast<size_t>(n_rows) * n_heads * hd);
  for (float& x : q) x = 2.0f * normal(rng);  // sharper softmaxes than unit scores
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  // Reference.
  const size_t value_offset = static_cast<size_t>(num_blocks) * bs * hd;
  std::vector<float> want(q.size(), NAN);  // rows of no sequence stay poisoned
  for (int p = 0; p < n_pairs; ++p) {
    const int s = p / c.n_kv_heads, h = p % c.n_kv_heads;
    std::vector<int32_t> keys;
    for (int32_t k = 0; k < seq_len[s]; ++k) {
      if (k < sink_end[p] || k >= win_begin[p]) keys.push_back(k);
    }
    for (int g = 0; g < c.group; ++g) {
      const size_t qoff = (static_cast<size_t>(row_of[s]) * n_heads + h * c.group + g) * hd;
      std::vector<double> score(keys.size());
      double mx = -INFINITY;
      for (size_t i = 0; i < keys.size(); ++i) {
        const int32_t id = tables[p][keys[i] / bs];
        const __half* key = pool.data() + (static_cast<size_t>(id) * bs + keys[i] % bs) * hd;
        double dot = 0.0;
        for (int d = 0; d < hd; ++d) dot += double{q[qoff + d]} * __half2float(key[d]);
        score[i] = dot * scale;
        mx = std::max(mx, score[i]);
      }
      std::vector<double> o(hd, 0.0);
      double l = 0.0;
      for (size_t i = 0; i < keys.size(); ++i) {
        const double e = std::exp(score[i] - mx);
        l += e;
        const int32_t id = tables[p][keys[i] / bs];
        const __half* val =
            pool.data() + value_offset + (static_cast<size_t>(id) * bs + keys[i] % bs) * hd;
        for (int d = 0; d < hd; ++d) o[d] += e * __half2float(val[d]);
      }
      for (int d = 0; d < hd; ++d) want[qoff + d] = static_cast<float>(o[d] / l);
    }
  }

  DeviceBuffer<__half> d_pool;
  DeviceBuffer<float> d_q, d_out;
  DeviceBuffer<__half> d_half;
  DeviceBuffer<int64_t> d_begin;
  DeviceBuffer<int32_t> d_len, d_data, d_sink, d_win, d_seq, d_row;
  CUDA_OK(d_pool.Upload(pool));
  CUDA_OK(d_q.Upload(q));
  CUDA_OK(d_out.Upload(std::vector<float>(q.size(), NAN)));  // poison
  const __half half_nan = __ushort_as_half(0x7e00);
  const std::vector<__half> half_poison(q.size(), half_nan);
  CUDA_OK(d_half.Upload(half_poison));
  CUDA_OK(d_row.Upload(row_of));
  CUDA_OK(d_begin.Upload(packed.begin));
  CUDA_OK(d_len.Upload(packed.len));
  CUDA_OK(d_data.Upload(packed.data));
  CUDA_OK(d_sink.Upload(sink_end));
  CUDA_OK(d_win.Upload(win_begin));
  CUDA_OK(d_seq.Upload(seq_len));

  const DecodeAttentionArgs args{d_q.ptr,    d_out.ptr, c.n_seqs,    n_heads,   c.n_kv_heads,
                                 scale,      d_row.ptr, d_begin.ptr, d_len.ptr, d_data.ptr,
                                 d_sink.ptr, d_win.ptr, d_seq.ptr,   nullptr,   0};
  const DevicePool dpool{d_pool.ptr, num_blocks, bs, hd};
  for (const Variant& v : kVariants) {
    SCOPED_TRACE(v.name);
    DecodeAttentionConfig cfg;
    CUDA_OK(GetDecodeAttentionConfig(hd, c.group, n_pairs, &cfg, v.kind, v.stages));
    if (v.kind != DecodeAttentionVariant::kDefault) {
      ASSERT_EQ(cfg.tensor_cores, v.kind == DecodeAttentionVariant::kTensorCores);
    }
    if (v.min_keys > 0) cfg.min_keys_per_block = v.min_keys;
    if (v.pair_keys >= 0) cfg.pair_start_keys = v.pair_keys;
    DeviceBuffer<char> d_ws;
    CUDA_OK(cudaMalloc(&d_ws.ptr, cfg.workspace_bytes));
    CUDA_OK(InitDecodeAttentionWorkspace(cfg, d_ws.ptr, nullptr));
    for (int run = 0; run < 2; ++run) {
      // The second run also writes the fp16 copy of the output.
      SCOPED_TRACE(run == 0 ? "first run" : "second run on the same workspace, with out_half");
      CUDA_OK(cudaMemcpy(d_out.ptr, std::vector<float>(q.size(), NAN).data(),
                         q.size() * sizeof(float), cudaMemcpyHostToDevice));
      DecodeAttentionArgs run_args = args;
      if (run == 1) {
        CUDA_OK(cudaMemcpy(d_half.ptr, half_poison.data(), q.size() * sizeof(__half),
                           cudaMemcpyHostToDevice));
        run_args.out_half = d_half.ptr;
      }
      CUDA_OK(LaunchDecodeAttention(run_args, dpool, cfg, d_ws.ptr, nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      std::vector<float> got(q.size());
      CUDA_OK(
          cudaMemcpy(got.data(), d_out.ptr, got.size() * sizeof(float), cudaMemcpyDeviceToHost));

      double worst = 0.0, ref_max = 0.0;
      size_t at = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        if (std::isnan(want[i])) {  // a row of no sequence: must still hold the poison
          ASSERT_TRUE(std::isnan(got[i])) << "row " << i / (n_heads * hd) << " was written";
          continue;
        }
        ref_max = std::max(ref_max, std::fabs(double{want[i]}));
        const double e = std::fabs(double{got[i]} - double{want[i]});
        if (!(e <= worst)) {  // NaN (poison left unwritten) counts as the worst
          worst = std::isnan(e) ? INFINITY : e;
          at = i;
        }
      }
      EXPECT_LE(worst / std::max(ref_max, 1e-30), kTolerance)
          << "max |diff| " << worst << " at row " << at / (n_heads * hd) << " head "
          << at % (n_heads * hd) / hd << " dim " << at % hd << ": gpu " << got[at] << ", ref "
          << want[at];
      if (run == 1) {  // each written output's fp16 rounding; rows of no sequence untouched
        std::vector<__half> halves(q.size());
        CUDA_OK(cudaMemcpy(halves.data(), d_half.ptr, halves.size() * sizeof(__half),
                           cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < got.size(); ++i) {
          const uint16_t want_bits =
              __half_as_ushort(std::isnan(want[i]) ? half_nan : __float2half_rn(got[i]));
          ASSERT_EQ(__half_as_ushort(halves[i]), want_bits) << "fp16 copy of output " << i;
        }
      }
    }
  }
}

TEST(DecodeAttention, MatchesHostReferenceAcrossShapes) {
  uint32_t seed = 1;
  for (const int group : {1, 2, 3, 4, 6, 8}) {
    for (const int head_dim : {64, 128}) {
      for (const int n_seqs : {1, 5, 33}) {
        const int n_kv_heads = group == 1 ? 4 : 2;
        static constexpr int kBlockSizes[] = {16, 32, 8, 24};
        const int block_size = kBlockSizes[seed % 4];
        RunCase({n_seqs, n_kv_heads, group, head_dim, block_size, seed++});
      }
    }
  }
}

// One long pair spread over more blocks than a block has threads: the merge of many partials.
TEST(DecodeAttention, LongSinglePair) {
  RunCase({1, 1, 4, 128, 16, 101, 40011});
  RunCase({2, 1, 1, 64, 32, 102, 25003});
  RunCase({1, 1, 8, 64, 24, 103, 30001});
}

// Hundreds of pairs of 1-3 visible keys: a block's range holds more pairs than it has threads
// (the plan's slices then hold several pairs each), each shorter than one tile.
TEST(DecodeAttention, ManyShortPairs) {
  RunCase({300, 2, 4, 128, 16, 201, 3});
  RunCase({700, 1, 1, 64, 8, 202, 2});
}

TEST(DecodeAttention, RefusesUnsupportedShapes) {
  EXPECT_FALSE(DecodeAttentionSupports(96, 1));
  EXPECT_FALSE(DecodeAttentionSupports(128, 5));
  DecodeAttentionConfig cfg;
  EXPECT_EQ(GetDecodeAttentionConfig(96, 1, 4, &cfg), cudaErrorInvalidValue);
  EXPECT_EQ(GetDecodeAttentionConfig(128, 5, 4, &cfg, DecodeAttentionVariant::kTensorCores),
            cudaErrorInvalidValue);
  for (const int stages : {1, 5}) {
    EXPECT_EQ(
        GetDecodeAttentionConfig(128, 4, 4, &cfg, DecodeAttentionVariant::kTensorCores, stages),
        cudaErrorInvalidValue)
        << stages << " stages";
  }
  ASSERT_EQ(GetDecodeAttentionConfig(64, 2, 4, &cfg), cudaSuccess);
  // More pairs than the workspace was sized for.
  const DecodeAttentionArgs args{nullptr, nullptr, 3,       4,       2,
                                 1.0f,    nullptr, nullptr, nullptr, nullptr,
                                 nullptr, nullptr, nullptr, nullptr, 0};
  EXPECT_EQ(LaunchDecodeAttention(args, DevicePool{nullptr, 1, 16, 64}, cfg, nullptr, nullptr),
            cudaErrorInvalidValue);
  // The default counts a pair start as the same bytes at every head_dim; a negative count is
  // refused.
  DecodeAttentionConfig cfg128;
  ASSERT_EQ(GetDecodeAttentionConfig(128, 2, 4, &cfg128), cudaSuccess);
  EXPECT_GT(cfg128.pair_start_keys, 0);
  EXPECT_EQ(cfg.pair_start_keys, 2 * cfg128.pair_start_keys);
  const DecodeAttentionArgs two{nullptr, nullptr, 1,       4,       2,
                                1.0f,    nullptr, nullptr, nullptr, nullptr,
                                nullptr, nullptr, nullptr, nullptr, 0};
  cfg.pair_start_keys = -1;
  EXPECT_EQ(LaunchDecodeAttention(two, DevicePool{nullptr, 1, 16, 64}, cfg, nullptr, nullptr),
            cudaErrorInvalidValue);
}

}  // namespace
}  // namespace moa::cuda
