// Decode-attention bandwidth on the GPU (issue 4, item 7a): measures the device's copy bandwidth
// (cudaMemcpy device to device, bytes read + written), then the split-KV decode kernel
// (kernels/cuda/decode_attention.cu) and, for comparison, the backend's one-block-per-(row, head)
// kernel, over a paged fp32 pool with random block placement, for Llama-2-7B-like (32 query / 32
// KV heads) and Llama-3-8B-like (32 / 8) layers, head_dim 128, one layer. Prints the KV bytes
// read per step over the time as a fraction of the copy bandwidth. Runs on the GPU machine only.
// Usage: moa_gpu_bench [--quick]   (--quick: batch 1 and 8, 4k and 8k only)
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/decode_attention.h"

namespace {

using moa::cuda::DeviceAttention;
using moa::cuda::DevicePool;

constexpr int kHeadDim = 128;
constexpr int kBlockSize = 16;  // the engine's default KV block (engine/engine.h)
constexpr int kSink = 64;       // SpanParams' default sink
constexpr double kMaxPoolBytes = 40e9;
constexpr int kWarmup = 3;
constexpr int kRuns = 15;

#define CHECK_CUDA(expr)                                                 \
  do {                                                                   \
    const cudaError_t err_ = (expr);                                     \
    if (err_ != cudaSuccess) {                                           \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, \
                   cudaGetErrorString(err_));                            \
      std::exit(1);                                                      \
    }                                                                    \
  } while (0)

template <typename T>
T* Upload(const std::vector<T>& v) {
  T* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, std::max<size_t>(1, v.size()) * sizeof(T)));
  if (!v.empty()) {
    CHECK_CUDA(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  return p;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median seconds of `fn` enqueued on the default stream, after warm-up.
template <typename Fn>
double TimeIt(Fn fn) {
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  for (int i = 0; i < kWarmup; ++i) fn();
  std::vector<double> t;
  for (int i = 0; i < kRuns; ++i) {
    CHECK_CUDA(cudaEventRecord(start));
    fn();
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0.0f;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    t.push_back(ms * 1e-3);
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  return Median(t);
}

double CopyBandwidth() {
  const size_t bytes = size_t{2} << 30;
  void *a = nullptr, *b = nullptr;
  CHECK_CUDA(cudaMalloc(&a, bytes));
  CHECK_CUDA(cudaMalloc(&b, bytes));
  CHECK_CUDA(cudaMemset(a, 1, bytes));
  const double s = TimeIt([&] { CHECK_CUDA(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice)); });
  CHECK_CUDA(cudaFree(a));
  CHECK_CUDA(cudaFree(b));
  return 2.0 * static_cast<double>(bytes) / s;  // read + written
}

struct Model {
  const char* name;
  int n_heads;
  int n_kv_heads;
};

// Fraction of the sequence each (sequence, KV head) pair sees; "mixed" averages 50%.
enum class Plan { kDense, kUniform50, kUniform25, kMixed50 };
const char* PlanName(Plan p) {
  switch (p) {
    case Plan::kDense:
      return "dense";
    case Plan::kUniform50:
      return "window 50%";
    case Plan::kUniform25:
      return "window 25%";
    case Plan::kMixed50:
      return "mixed 50%";
  }
  return "";
}

double Density(Plan plan, int pair, int shift) {
  static constexpr double kMixed[4] = {1.0, 0.5, 0.25, 0.25};
  switch (plan) {
    case Plan::kDense:
      return 1.0;
    case Plan::kUniform50:
      return 0.5;
    case Plan::kUniform25:
      return 0.25;
    case Plan::kMixed50:
      return kMixed[(pair + shift) % 4];
  }
  return 1.0;
}

void RunConfig(const Model& m, int batch, int len, Plan plan, double copy_bw, std::mt19937& rng) {
  const int n_pairs = batch * m.n_kv_heads;
  std::vector<int32_t> sink_end(n_pairs), win_begin(n_pairs), seq_len(batch, len);
  std::vector<int32_t> row_pos(batch, len - 1), row_seq(batch);
  std::iota(row_seq.begin(), row_seq.end(), 0);
  int64_t visible = 0;
  std::vector<std::vector<int32_t>> tables(n_pairs);
  int64_t used = 0;
  int shift = 0;  // per sequence: which heads get which span in the mixed plan
  for (int p = 0; p < n_pairs; ++p) {
    if (p % m.n_kv_heads == 0) shift = static_cast<int>(rng() % 4);
    const double d = Density(plan, p, shift);
    if (d >= 1.0) {
      sink_end[p] = win_begin[p] = 0;
    } else {
      const int span = static_cast<int>(d * len);
      sink_end[p] = kSink;
      win_begin[p] = len - (span - kSink);
    }
    visible += sink_end[p] + (len - std::max(win_begin[p], sink_end[p]));
    tables[p].assign((len + kBlockSize - 1) / kBlockSize, -1);
    for (int b = 0; b < static_cast<int>(tables[p].size()); ++b) {
      const int first = b * kBlockSize, last = std::min(len, first + kBlockSize) - 1;
      if (first < sink_end[p] || last >= win_begin[p]) tables[p][b] = static_cast<int32_t>(used++);
    }
  }
  const double pool_bytes = static_cast<double>(used) * kBlockSize * kHeadDim * sizeof(float) * 2;
  const double kv_bytes = static_cast<double>(visible) * kHeadDim * sizeof(float) * 2;
  if (pool_bytes > kMaxPoolBytes || used > INT32_MAX) {
    std::printf("| %-10s | %5d | %6d | %-10s | %9.0f | skipped: pool %.1f GB > 40 GB |\n", m.name,
                batch, len, PlanName(plan), kv_bytes / 1e6, pool_bytes / 1e9);
    return;
  }
  std::vector<int32_t> place(used);
  std::iota(place.begin(), place.end(), 0);
  std::shuffle(place.begin(), place.end(), rng);
  std::vector<int64_t> table_begin(n_pairs);
  std::vector<int32_t> table_len(n_pairs), table_data;
  for (int p = 0; p < n_pairs; ++p) {
    table_begin[p] = static_cast<int64_t>(table_data.size());
    table_len[p] = static_cast<int32_t>(tables[p].size());
    for (int32_t id : tables[p]) table_data.push_back(id >= 0 ? place[id] : -1);
  }

  float* pool = nullptr;
  CHECK_CUDA(cudaMalloc(&pool, static_cast<size_t>(pool_bytes)));
  CHECK_CUDA(cudaMemset(pool, 0, static_cast<size_t>(pool_bytes)));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> q_host(static_cast<size_t>(batch) * m.n_heads * kHeadDim);
  for (float& x : q_host) x = normal(rng);
  float* q = Upload(q_host);
  float* out = nullptr;
  CHECK_CUDA(cudaMalloc(&out, q_host.size() * sizeof(float)));
  int64_t* d_begin = Upload(table_begin);
  int32_t* d_len = Upload(table_len);
  int32_t* d_data = Upload(table_data);
  int32_t* d_sink = Upload(sink_end);
  int32_t* d_win = Upload(win_begin);
  int32_t* d_seq = Upload(seq_len);
  int32_t* d_pos = Upload(row_pos);
  int32_t* d_row_seq = Upload(row_seq);

  const float scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
  const DevicePool dpool{pool, static_cast<int32_t>(used), kBlockSize, kHeadDim};
  moa::cuda::DecodeAttentionConfig cfg;
  CHECK_CUDA(
      moa::cuda::GetDecodeAttentionConfig(kHeadDim, m.n_heads / m.n_kv_heads, n_pairs, &cfg));
  void* ws = nullptr;
  CHECK_CUDA(cudaMalloc(&ws, cfg.workspace_bytes));
  const moa::cuda::DecodeAttentionArgs args{q,       out,   batch,  m.n_heads, m.n_kv_heads, scale,
                                            d_begin, d_len, d_data, d_sink,    d_win,        d_seq};
  const double t_split =
      TimeIt([&] { CHECK_CUDA(moa::cuda::LaunchDecodeAttention(args, dpool, cfg, ws, nullptr)); });

  // The backend's current kernel over the same pool (rows = sequences, one new token each).
  DeviceAttention old{};
  old.q = q;
  old.out = out;
  old.rows = batch;
  old.n_heads = m.n_heads;
  old.n_kv_heads = m.n_kv_heads;
  old.scale = scale;
  old.row_pos = d_pos;
  old.row_seq = d_row_seq;
  old.table_begin = d_begin;
  old.table_len = d_len;
  old.table_data = d_data;
  old.sink_end = d_sink;
  old.win_begin = d_win;
  const double t_old = TimeIt([&] { CHECK_CUDA(moa::cuda::LaunchAttention(old, dpool, nullptr)); });

  const double bw = kv_bytes / t_split;
  std::printf("| %-10s | %5d | %6d | %-10s | %9.0f | %9.1f | %7.0f | %5.1f%% | %9.1f | %6.2fx |\n",
              m.name, batch, len, PlanName(plan), kv_bytes / 1e6, t_split * 1e6, bw / 1e9,
              100.0 * bw / copy_bw, t_old * 1e6, t_old / t_split);
  std::fflush(stdout);

  for (void* p :
       {static_cast<void*>(pool), static_cast<void*>(q), static_cast<void*>(out),
        static_cast<void*>(d_begin), static_cast<void*>(d_len), static_cast<void*>(d_data),
        static_cast<void*>(d_sink), static_cast<void*>(d_win), static_cast<void*>(d_seq),
        static_cast<void*>(d_pos), static_cast<void*>(d_row_seq), ws}) {
    CHECK_CUDA(cudaFree(p));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  const double copy_bw = CopyBandwidth();
  std::printf("device: %s, %d SMs; copy bandwidth (read + written, median of %d): %.0f GB/s\n",
              prop.name, prop.multiProcessorCount, kRuns, copy_bw / 1e9);
  std::printf(
      "decode attention, one layer, head_dim %d, fp32 KV in blocks of %d positions (random "
      "placement), sink %d;\nKV MB = key and value bytes the visible keys take (fp16 KV would "
      "halve them); time = median of %d after %d warm-up runs; old = one block per (row, KV "
      "head)\n\n",
      kHeadDim, kBlockSize, kSink, kRuns, kWarmup);
  std::printf(
      "| model      | batch | KV len | plan       |     KV MB |   time us |    GB/s | of copy |"
      "    old us | speedup |\n"
      "|------------|-------|--------|------------|-----------|-----------|---------|---------|"
      "-----------|---------|\n");
  const Model models[] = {{"L2-7B MHA", 32, 32}, {"L3-8B GQA", 32, 8}};
  std::vector<int> batches = {1, 8, 32, 64}, lens = {4096, 8192, 16384, 32768};
  if (quick) {
    batches = {1, 8};
    lens = {4096, 8192};
  }
  std::mt19937 rng(7);
  for (const Model& m : models) {
    for (int batch : batches) {
      for (int len : lens) {
        for (Plan plan : {Plan::kDense, Plan::kUniform50, Plan::kUniform25, Plan::kMixed50}) {
          RunConfig(m, batch, len, plan, copy_bw, rng);
        }
      }
    }
  }
  return 0;
}
