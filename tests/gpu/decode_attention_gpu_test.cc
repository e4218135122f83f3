// The split-KV decode attention kernel (kernels/cuda/decode_attention.cu) against a plain host
// reference (double precision) over the same paged pool: random batch sizes, GQA ratios, head
// dims, lengths not a multiple of the block size, sinks with windows shorter and longer than the
// sequence, dense pairs mixed with short ones, and random physical block placement where blocks
// holding no visible key are left out of the tables (-1), so reading one would show.
// Runs on the GPU machine only (moa_gpu_tests --gtest_filter='Decode*').
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

namespace moa::cuda {
namespace {

#define CUDA_OK(expr)                                                          \
  do {                                                                         \
    cudaError_t err_ = (expr);                                                 \
    ASSERT_EQ(err_, cudaSuccess) << #expr << ": " << cudaGetErrorString(err_); \
  } while (0)

// fp32 data, fp32 accumulation over up to a few thousand keys, against double.
constexpr double kTolerance = 1e-4;

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  ~DeviceBuffer() { cudaFree(ptr); }
  cudaError_t Upload(const std::vector<T>& v) {
    cudaError_t e = cudaMalloc(&ptr, std::max<size_t>(1, v.size()) * sizeof(T));
    if (e == cudaSuccess && !v.empty()) {
      e = cudaMemcpy(ptr, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
    }
    return e;
  }
};

struct Case {
  int n_seqs;
  int n_kv_heads;
  int group;
  int head_dim;
  int block_size;
  uint32_t seed;
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
  std::vector<int32_t> place(num_blocks);
  std::iota(place.begin(), place.end(), 0);
  std::shuffle(place.begin(), place.end(), rng);
  std::vector<int64_t> table_begin(n_pairs);
  std::vector<int32_t> table_len(n_pairs), table_data;
  for (int p = 0; p < n_pairs; ++p) {
    table_begin[p] = static_cast<int64_t>(table_data.size());
    table_len[p] = static_cast<int32_t>(tables[p].size());
    for (int32_t& id : tables[p]) {
      if (id >= 0) id = place[id];
      table_data.push_back(id);
    }
  }

  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> pool(2 * static_cast<size_t>(num_blocks) * bs * hd);
  for (float& x : pool) x = normal(rng);
  std::vector<float> q(static_cast<size_t>(c.n_seqs) * n_heads * hd);
  for (float& x : q) x = 2.0f * normal(rng);  // sharper softmaxes than unit scores
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  // Reference.
  const size_t value_offset = static_cast<size_t>(num_blocks) * bs * hd;
  std::vector<float> want(q.size());
  for (int p = 0; p < n_pairs; ++p) {
    const int s = p / c.n_kv_heads, h = p % c.n_kv_heads;
    std::vector<int32_t> keys;
    for (int32_t k = 0; k < seq_len[s]; ++k) {
      if (k < sink_end[p] || k >= win_begin[p]) keys.push_back(k);
    }
    for (int g = 0; g < c.group; ++g) {
      const size_t qoff = (static_cast<size_t>(s) * n_heads + h * c.group + g) * hd;
      std::vector<double> score(keys.size());
      double mx = -INFINITY;
      for (size_t i = 0; i < keys.size(); ++i) {
        const int32_t id = tables[p][keys[i] / bs];
        const float* key = pool.data() + (static_cast<size_t>(id) * bs + keys[i] % bs) * hd;
        double dot = 0.0;
        for (int d = 0; d < hd; ++d) dot += double{q[qoff + d]} * key[d];
        score[i] = dot * scale;
        mx = std::max(mx, score[i]);
      }
      std::vector<double> o(hd, 0.0);
      double l = 0.0;
      for (size_t i = 0; i < keys.size(); ++i) {
        const double e = std::exp(score[i] - mx);
        l += e;
        const int32_t id = tables[p][keys[i] / bs];
        const float* val =
            pool.data() + value_offset + (static_cast<size_t>(id) * bs + keys[i] % bs) * hd;
        for (int d = 0; d < hd; ++d) o[d] += e * val[d];
      }
      for (int d = 0; d < hd; ++d) want[qoff + d] = static_cast<float>(o[d] / l);
    }
  }

  DeviceBuffer<float> d_pool, d_q, d_out;
  DeviceBuffer<int64_t> d_begin;
  DeviceBuffer<int32_t> d_len, d_data, d_sink, d_win, d_seq;
  CUDA_OK(d_pool.Upload(pool));
  CUDA_OK(d_q.Upload(q));
  CUDA_OK(d_out.Upload(std::vector<float>(q.size(), NAN)));  // poison
  CUDA_OK(d_begin.Upload(table_begin));
  CUDA_OK(d_len.Upload(table_len));
  CUDA_OK(d_data.Upload(table_data));
  CUDA_OK(d_sink.Upload(sink_end));
  CUDA_OK(d_win.Upload(win_begin));
  CUDA_OK(d_seq.Upload(seq_len));

  DecodeAttentionConfig cfg;
  CUDA_OK(GetDecodeAttentionConfig(hd, c.group, n_pairs, &cfg));
  DeviceBuffer<char> d_ws;
  CUDA_OK(cudaMalloc(&d_ws.ptr, cfg.workspace_bytes));
  const DecodeAttentionArgs args{d_q.ptr,      d_out.ptr,  c.n_seqs,    n_heads,
                                 c.n_kv_heads, scale,      d_begin.ptr, d_len.ptr,
                                 d_data.ptr,   d_sink.ptr, d_win.ptr,   d_seq.ptr};
  const DevicePool dpool{d_pool.ptr, num_blocks, bs, hd};
  CUDA_OK(LaunchDecodeAttention(args, dpool, cfg, d_ws.ptr, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<float> got(q.size());
  CUDA_OK(cudaMemcpy(got.data(), d_out.ptr, got.size() * sizeof(float), cudaMemcpyDeviceToHost));

  double worst = 0.0, ref_max = 0.0;
  size_t at = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    ref_max = std::max(ref_max, std::fabs(double{want[i]}));
    const double e = std::fabs(double{got[i]} - double{want[i]});
    if (!(e <= worst)) {  // NaN (poison left unwritten) counts as the worst
      worst = std::isnan(e) ? INFINITY : e;
      at = i;
    }
  }
  EXPECT_LE(worst / std::max(ref_max, 1e-30), kTolerance)
      << "max |diff| " << worst << " at seq " << at / (n_heads * hd) << " head "
      << at % (n_heads * hd) / hd << " dim " << at % hd << ": gpu " << got[at] << ", ref "
      << want[at];
}

TEST(DecodeAttention, MatchesHostReferenceAcrossShapes) {
  uint32_t seed = 1;
  for (const int group : {1, 3, 4, 8}) {
    for (const int head_dim : {64, 128}) {
      for (const int n_seqs : {1, 5, 33}) {
        const int n_kv_heads = group == 1 ? 4 : 2;
        const int block_size = seed % 2 == 0 ? 16 : 32;
        RunCase({n_seqs, n_kv_heads, group, head_dim, block_size, seed++});
      }
    }
  }
}

TEST(DecodeAttention, RefusesUnsupportedShapes) {
  EXPECT_FALSE(DecodeAttentionSupports(96, 1));
  EXPECT_FALSE(DecodeAttentionSupports(128, 5));
  DecodeAttentionConfig cfg;
  EXPECT_EQ(GetDecodeAttentionConfig(96, 1, 4, &cfg), cudaErrorInvalidValue);
  ASSERT_EQ(GetDecodeAttentionConfig(64, 2, 4, &cfg), cudaSuccess);
  // More pairs than the workspace was sized for.
  const DecodeAttentionArgs args{nullptr, nullptr, 3,       4,       2,       1.0f,
                                 nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  EXPECT_EQ(LaunchDecodeAttention(args, DevicePool{nullptr, 1, 16, 64}, cfg, nullptr, nullptr),
            cudaErrorInvalidValue);
}

}  // namespace
}  // namespace moa::cuda
