// Prefill attention throughput (kernels/cuda/prefill_attention.cu) on one prompt of 4k and 16k
// tokens, Llama-2-7B shape (32 heads, head_dim 128, MHA) and Llama-3-8B shape (32 query heads
// over 8 KV heads), KV blocks of 16 tokens at shuffled pool places: dense causal, and every head
// on an elastic span of 50% and 25% of the sequence (sink 64, rule blocks of 64). TFLOP/s count
// only the visible keys (4 * head_dim flops per query head and key), so a kernel that skips the
// invisible tiles keeps its rate while its time falls with the density.
// Usage: prefill_attention_bench (on the GPU machine). CUDA events after warm-up, medians.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/attention_span.h"
#include "kernels/cuda/prefill_attention.h"

namespace moa::cuda {
namespace {

#define CHECK_CUDA(expr)                                                                           \
  do {                                                                                             \
    const cudaError_t err_ = (expr);                                                               \
    if (err_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      return false;                                                                                \
    }                                                                                              \
  } while (0)

constexpr int kBlockSize = 16;
constexpr int kHeadDim = 128;
constexpr int kWarmup = 2;
constexpr int kReps = 10;

struct Plan {
  const char* name;
  SpanRule rule;
};

// Fills n device halves with N(0, 1) values: a random host block copied over and over.
bool FillHalves(__half* dst, int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<__half> block(1 << 20);
  for (__half& x : block) x = __float2half(normal(rng));
  for (int64_t at = 0; at < n; at += static_cast<int64_t>(block.size())) {
    const int64_t len = std::min<int64_t>(n - at, static_cast<int64_t>(block.size()));
    CHECK_CUDA(cudaMemcpy(dst + at, block.data(), len * sizeof(__half), cudaMemcpyHostToDevice));
  }
  return true;
}

bool FillFloats(float* dst, int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> block(1 << 20);
  for (float& x : block) x = normal(rng);
  for (int64_t at = 0; at < n; at += static_cast<int64_t>(block.size())) {
    const int64_t len = std::min<int64_t>(n - at, static_cast<int64_t>(block.size()));
    CHECK_CUDA(cudaMemcpy(dst + at, block.data(), len * sizeof(float), cudaMemcpyHostToDevice));
  }
  return true;
}

// Visible keys summed over the prompt's positions.
double TotalVisibleKeys(const SpanRule& rule, const SpanParams& params, int64_t n) {
  double total = 0;
  for (int64_t pos = 0; pos < n; ++pos) {
    const VisibleKeys v = VisibleKeysAt(rule, params, pos);
    total += static_cast<double>(v.sink_end + (pos + 1 - v.window_begin));
  }
  return total;
}

bool Bench(const char* shape, int n_heads, int n_kv_heads, int n, double* dense_ms) {
  std::mt19937 rng(7);
  const SpanParams params{64, 64};
  const int blocks_per_pair = (n + kBlockSize - 1) / kBlockSize;
  const int32_t num_blocks = blocks_per_pair * n_kv_heads;
  const int64_t pool_halves = 2LL * num_blocks * kBlockSize * kHeadDim;
  const int64_t q_floats = static_cast<int64_t>(n) * n_heads * kHeadDim;

  __half* pool = nullptr;
  float *q = nullptr, *out = nullptr;
  int32_t *meta = nullptr, *table_len = nullptr, *table_data = nullptr;
  int64_t* table_begin = nullptr;
  DeviceSpanRule* rules = nullptr;
  CHECK_CUDA(cudaMalloc(&pool, pool_halves * sizeof(__half)));
  CHECK_CUDA(cudaMalloc(&q, q_floats * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&out, q_floats * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&meta, 3 * sizeof(int32_t)));
  CHECK_CUDA(cudaMalloc(&table_len, n_kv_heads * sizeof(int32_t)));
  CHECK_CUDA(cudaMalloc(&table_begin, n_kv_heads * sizeof(int64_t)));
  CHECK_CUDA(cudaMalloc(&table_data, num_blocks * sizeof(int32_t)));
  CHECK_CUDA(cudaMalloc(&rules, n_kv_heads * sizeof(DeviceSpanRule)));
  if (!FillHalves(pool, pool_halves, rng) || !FillFloats(q, q_floats, rng)) return false;

  std::vector<int32_t> place(num_blocks);
  std::iota(place.begin(), place.end(), 0);
  std::shuffle(place.begin(), place.end(), rng);
  std::vector<int64_t> begin(n_kv_heads);
  for (int h = 0; h < n_kv_heads; ++h) begin[h] = static_cast<int64_t>(h) * blocks_per_pair;
  const std::vector<int32_t> len(n_kv_heads, blocks_per_pair);
  const int32_t host_meta[3] = {0, n, 0};  // q_row, n_new, past
  CHECK_CUDA(cudaMemcpy(meta, host_meta, sizeof(host_meta), cudaMemcpyHostToDevice));
  CHECK_CUDA(
      cudaMemcpy(table_data, place.data(), num_blocks * sizeof(int32_t), cudaMemcpyHostToDevice));
  CHECK_CUDA(
      cudaMemcpy(table_begin, begin.data(), n_kv_heads * sizeof(int64_t), cudaMemcpyHostToDevice));
  CHECK_CUDA(
      cudaMemcpy(table_len, len.data(), n_kv_heads * sizeof(int32_t), cudaMemcpyHostToDevice));

  const Plan plans[] = {{"dense", SpanRule{true, 0, 0.0}},
                        {"span 50%", SpanRule{false, 0, 0.5}},
                        {"span 25%", SpanRule{false, 0, 0.25}}};
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  const double causal_keys = TotalVisibleKeys(SpanRule{}, params, n);
  for (const Plan& plan : plans) {
    const SpanRule& r = plan.rule;
    const DeviceSpanRule dr{r.dense ? 1 : 0,
                            static_cast<int32_t>(params.block * (r.alpha / params.block)), r.beta,
                            static_cast<int32_t>(params.sink + params.block)};
    const std::vector<DeviceSpanRule> host_rules(n_kv_heads, dr);
    CHECK_CUDA(cudaMemcpy(rules, host_rules.data(), n_kv_heads * sizeof(DeviceSpanRule),
                          cudaMemcpyHostToDevice));
    PrefillAttentionArgs a{};
    a.q = q;
    a.out = out;
    a.n_heads = n_heads;
    a.n_kv_heads = n_kv_heads;
    a.head_dim = kHeadDim;
    a.scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
    a.sink = static_cast<int32_t>(params.sink);
    a.n_seqs = 1;
    a.q_row = meta;
    a.n_new = meta + 1;
    a.past = meta + 2;
    a.max_n_new = n;
    a.table_begin = table_begin;
    a.table_len = table_len;
    a.table_data = table_data;
    a.rules = rules;
    const DevicePool dp{pool, num_blocks, kBlockSize, kHeadDim};
    std::vector<float> ms;
    for (int i = 0; i < kWarmup + kReps; ++i) {
      CHECK_CUDA(cudaEventRecord(start));
      CHECK_CUDA(LaunchPrefillAttention(a, dp, nullptr));
      CHECK_CUDA(cudaEventRecord(stop));
      CHECK_CUDA(cudaEventSynchronize(stop));
      float t = 0;
      CHECK_CUDA(cudaEventElapsedTime(&t, start, stop));
      if (i >= kWarmup) ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    const double med = ms[ms.size() / 2];
    const double keys = TotalVisibleKeys(r, params, n);
    const double tflops = 4.0 * kHeadDim * n_heads * keys / (med * 1e-3) / 1e12;
    if (r.dense) *dense_ms = med;
    std::printf("%-9s %6d  %-9s %7.1f%%  %9.3f  %8.1f  %7.2fx  %7.2fx\n", shape, n, plan.name,
                100.0 * keys / causal_keys, med, tflops, *dense_ms / med, causal_keys / keys);
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  CHECK_CUDA(cudaFree(pool));
  CHECK_CUDA(cudaFree(q));
  CHECK_CUDA(cudaFree(out));
  CHECK_CUDA(cudaFree(meta));
  CHECK_CUDA(cudaFree(table_len));
  CHECK_CUDA(cudaFree(table_begin));
  CHECK_CUDA(cudaFree(table_data));
  CHECK_CUDA(cudaFree(rules));
  return true;
}

}  // namespace
}  // namespace moa::cuda

int main() {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  std::printf("prefill attention on %s, head_dim %d, KV blocks of %d, one prompt\n", prop.name,
              moa::cuda::kHeadDim, moa::cuda::kBlockSize);
  std::printf("%-9s %6s  %-9s %8s  %9s  %8s  %8s  %8s\n", "shape", "tokens", "plan", "density",
              "ms", "TFLOP/s", "speedup", "ideal");
  struct Shape {
    const char* name;
    int n_heads, n_kv_heads;
  };
  for (const Shape& s : {Shape{"7B-MHA", 32, 32}, Shape{"8B-GQA", 32, 8}}) {
    for (const int n : {4096, 16384}) {
      double dense_ms = 0;
      if (!moa::cuda::Bench(s.name, s.n_heads, s.n_kv_heads, n, &dense_ms)) return 1;
    }
  }
  return 0;
}
