// Decode-attention bandwidth on the GPU (issue 4, item 7a): measures the device's copy bandwidth
// (cudaMemcpy device to device, bytes read + written), then the split-KV decode kernel
// (kernels/cuda/decode_attention.cu) in both its variants (CUDA cores: the first kernel; tensor
// cores: mma.sync tiles) and, with --general, the backend's general one-block-per-(row, KV head)
// kernel, over a paged fp16 pool of random values with random block placement, for
// Llama-2-7B-like (32 query / 32 KV heads) and Llama-3-8B-like (32 / 8) layers, head_dim 128, one
// layer. Prints one row per (shape, batch, KV length, plan): the K and V bytes of the visible keys
// over the time, as a fraction of the copy bandwidth, for each variant, and whether the variants'
// outputs agree; then summaries, sweeps of the tensor kernel's pipeline depth and of the keys a
// pair start counts as, and a sweep of the minimum keys per block at batch 1. Runs on the GPU
// machine only.
// Usage: moa_gpu_bench [--quick] [--general] [--read] [--read-warps N] [--only SPEC[,SPEC...]]
//                      [--variant cuda|tensor] [--stages N] [--runs N] [--timing queued|idle]
//                      [--spread GB] [--pair-keys N]
//   --quick: batch 1 and 8, 4k and 8k only; --read: also a plain read of the same pool blocks;
//   --read-warps N: that read with N warps per SM (a multiple of 4; 8 = the decode kernel's);
//   --only: just these rows of the table and no sweeps, SPEC = model/batch/len/plan (model mha or
//   gqa, plan dense, w50, w25 or mixed, any field *), e.g. for the profiler; --variant: time one
//   variant only; --stages: the tensor kernel's pipeline depth in the table; --runs: timed runs
//   per row (the median is shown; 15 by default); --timing: whether the device is busy (queued,
//   the default) or idle (idle) when a timed launch is made (see LaunchTiming); --spread: place
//   the blocks at random in a pool of at least GB gigabytes (the engine's pool fills the GPU)
//   instead of one just large enough, to see what the larger address range costs; --pair-keys:
//   the keys each pair start counts as in the split among blocks (pair_start_keys) in the table.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/decode_attention.h"
#include "kernels/cuda/prefill_attention.h"

namespace {

using moa::cuda::DecodeAttentionVariant;
using moa::cuda::DevicePool;
using moa::cuda::DeviceSpanRule;
using moa::cuda::PrefillAttentionArgs;

constexpr int kHeadDim = 128;
constexpr int kBlockSize = 16;  // the engine's default KV block (engine/engine.h)
constexpr int kSink = 64;       // SpanParams' default sink
constexpr double kMaxPoolBytes = 40e9;
constexpr int kWarmup = 3;
int g_runs = 15;
// --read: also time a plain read of the same pool blocks (no attention work): what the device
// gives for this access pattern (random blocks of 4 KB of keys and 4 KB of values).
bool g_read = false;
// --read-warps N: the read with N warps per SM (e.g. 8, as the decode kernel's 2 blocks of 4:
// the same bytes in flight per SM) instead of as many as fit (64, 8x the bytes in flight).
int g_read_warps = 0;
double g_spread_bytes = 0;  // --spread
// The variants' outputs must agree to this (relative to the largest output): both are fp32-level.
constexpr double kAgree = 1e-3;

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

// Pool values in [-2, 2) from a hash of the index: random enough for the softmax, made on the GPU.
__global__ void FillPool(__half* p, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 0x9E3779B9u ^ static_cast<uint32_t>(i >> 32);
    x ^= x >> 16;
    x *= 0x85EBCA6Bu;
    x ^= x >> 13;
    p[i] = __float2half(static_cast<float>(x >> 8) * (4.0f / 16777216.0f) - 2.0f);
  }
}

// Reads the keys and values of the pool blocks ids[0, n) once, 16 bytes per lane, two blocks per
// warp in flight; folds them into a value that is written only if it hits a constant (so that
// the loads stay).
__global__ void ReadBlocks(const __half* pool, const int32_t* ids, int64_t n, int64_t value_offset,
                           uint32_t* sink) {
  constexpr int kPerLane = kBlockSize * kHeadDim * static_cast<int>(sizeof(__half)) / 16 / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  uint32_t acc = 0;
  for (int64_t b = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; b < n;
       b += 2 * warps) {
    uint4 x[2][2][kPerLane];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int64_t i = b + u * warps;
      const int32_t id = i < n ? ids[i] : -1;
      const __half* k = pool + static_cast<int64_t>(id) * kBlockSize * kHeadDim + lane * 8;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        x[u][0][j] = id >= 0 ? __ldg(reinterpret_cast<const uint4*>(k + j * 256)) : uint4{};
        x[u][1][j] =
            id >= 0 ? __ldg(reinterpret_cast<const uint4*>(k + value_offset + j * 256)) : uint4{};
      }
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        acc ^= x[u][0][j].x ^ x[u][0][j].y ^ x[u][0][j].z ^ x[u][0][j].w ^ x[u][1][j].x ^
               x[u][1][j].y ^ x[u][1][j].z ^ x[u][1][j].w;
      }
    }
  }
  if (acc == 0x9E3779B9u) *sink = acc;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// How a launch is timed. Before every run (warm-up included) a read of four times the L2 size
// evicts the pool from the L2, as the other kernels of a decode step do between two layers'
// attention (a read, not a memset: the dirty lines a memset leaves in the L2 are written back
// during the timed kernel, 2-6 us more per batch-1 launch on an H200). kQueued (the default): the
// start event and the launch are enqueued while that read still runs, so the time is the
// device's alone, as in the engine's CUDA-graph replays. kIdle: the device is idle when the start
// event is recorded, so the time includes the host's launch call (what one launch outside a graph
// costs).
enum class LaunchTiming { kQueued, kIdle };
LaunchTiming g_launch_timing = LaunchTiming::kQueued;
uint4* g_flush = nullptr;
size_t g_flush_bytes = 0;
int* g_flush_sink = nullptr;

// Reads `n` 16-byte words; the sum goes to *sink only if it is a value no fill can give, so the
// loads cannot be dropped and nothing is written.
__global__ void ReadToFlushL2(const uint4* p, size_t n, int* sink) {
  unsigned x = 0;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint4 v = p[i];
    x ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (x == 0x9e3779b9u) *sink = 1;
}

void FlushL2() {
  ReadToFlushL2<<<1024, 256>>>(g_flush, g_flush_bytes / sizeof(uint4), g_flush_sink);
  CHECK_CUDA(cudaGetLastError());
}

// Median seconds of `fn` enqueued on the default stream, after warm-up, timed as g_launch_timing
// says.
template <typename Fn>
double TimeIt(Fn fn) {
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  std::vector<double> t;
  for (int i = 0; i < kWarmup + g_runs; ++i) {
    FlushL2();
    if (g_launch_timing == LaunchTiming::kIdle) CHECK_CUDA(cudaDeviceSynchronize());
    CHECK_CUDA(cudaEventRecord(start));
    fn();
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0.0f;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    if (i >= kWarmup) t.push_back(ms * 1e-3);
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

struct Timing {
  DecodeAttentionVariant variant;
  int stages;          // 0: the default
  int min_keys;        // 0: the default
  int pair_keys = -1;  // -1: the default
};

struct Result {
  bool ran = false;
  std::vector<double> fraction;  // of the copy bandwidth, per timing
  double disagreement = 0.0;     // max |tensor - cuda cores| / max |output| (first two timings)
};

// Times the decode kernel as each of `timings` asks on one (model, batch, len, plan) setup and
// prints a row: `label` columns, then per timing the time and fraction of the copy bandwidth.
// With `check`, timings[0] and timings[1] outputs are compared; with `general`, the general
// kernel is timed too; with `show_grid`, each timing's thread blocks are printed.
Result RunConfig(const Model& m, int batch, int len, Plan plan, double copy_bw, std::mt19937& rng,
                 const std::vector<Timing>& timings, bool check, bool general, bool show_grid,
                 const char* suffix) {
  Result res;
  const int n_pairs = batch * m.n_kv_heads;
  std::vector<int32_t> sink_end(n_pairs), win_begin(n_pairs), seq_len(batch, len);
  // The general kernel's view: one new row per sequence at position len - 1, the same windows
  // as a span rule (span tokens = alpha, so that the window is exactly the decode kernel's).
  std::vector<int32_t> q_row(batch), n_new(batch, 1), past(batch, len - 1);
  std::iota(q_row.begin(), q_row.end(), 0);
  std::vector<DeviceSpanRule> rules(n_pairs);
  int64_t visible = 0;
  std::vector<std::vector<int32_t>> tables(n_pairs);
  int64_t used = 0;
  int shift = 0;  // per sequence: which heads get which span in the mixed plan
  for (int p = 0; p < n_pairs; ++p) {
    if (p % m.n_kv_heads == 0) shift = static_cast<int>(rng() % 4);
    const double d = Density(plan, p, shift);
    rules[p] = {};
    rules[p].dense = 1;
    if (d >= 1.0) {
      sink_end[p] = win_begin[p] = 0;
    } else {
      const int span = static_cast<int>(d * len);
      sink_end[p] = kSink;
      win_begin[p] = len - (span - kSink);
      rules[p].dense = 0;
      rules[p].alpha_tokens = span;
      rules[p].min_span = kSink + kBlockSize;
    }
    visible += sink_end[p] + (len - std::max(win_begin[p], sink_end[p]));
    tables[p].assign((len + kBlockSize - 1) / kBlockSize, -1);
    for (int b = 0; b < static_cast<int>(tables[p].size()); ++b) {
      const int first = b * kBlockSize, last = std::min(len, first + kBlockSize) - 1;
      if (first < sink_end[p] || last >= win_begin[p]) tables[p][b] = static_cast<int32_t>(used++);
    }
  }
  const double block_bytes = static_cast<double>(kBlockSize) * kHeadDim * sizeof(__half) * 2;
  // The pool's blocks: those used, or with --spread as many as fill g_spread_bytes.
  const int64_t pool_blocks = std::max(used, static_cast<int64_t>(g_spread_bytes / block_bytes));
  const double pool_bytes = static_cast<double>(pool_blocks) * block_bytes;
  const double kv_bytes = static_cast<double>(visible) * kHeadDim * sizeof(__half) * 2;
  std::printf("| %-10s | %5d | %6d | %-10s | %9.0f |", m.name, batch, len, PlanName(plan),
              kv_bytes / 1e6);
  if (pool_bytes > std::max(kMaxPoolBytes, g_spread_bytes) || pool_blocks > INT32_MAX) {
    std::printf(" skipped: pool %.1f GB > %.0f GB |\n", pool_bytes / 1e9,
                std::max(kMaxPoolBytes, g_spread_bytes) / 1e9);
    return res;
  }
  std::vector<int32_t> place(pool_blocks);
  std::iota(place.begin(), place.end(), 0);
  std::shuffle(place.begin(), place.end(), rng);
  std::vector<int64_t> table_begin(n_pairs);
  std::vector<int32_t> table_len(n_pairs), table_data;
  for (int p = 0; p < n_pairs; ++p) {
    table_begin[p] = static_cast<int64_t>(table_data.size());
    table_len[p] = static_cast<int32_t>(tables[p].size());
    for (int32_t id : tables[p]) table_data.push_back(id >= 0 ? place[id] : -1);
  }

  __half* pool = nullptr;
  const size_t pool_elems = static_cast<size_t>(pool_bytes) / sizeof(__half);
  CHECK_CUDA(cudaMalloc(&pool, static_cast<size_t>(pool_bytes)));
  FillPool<<<1024, 256>>>(pool, pool_elems);
  CHECK_CUDA(cudaGetLastError());
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
  int32_t* d_q_row = Upload(q_row);
  int32_t* d_n_new = Upload(n_new);
  int32_t* d_past = Upload(past);
  DeviceSpanRule* d_rules = Upload(rules);

  const float scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
  const DevicePool dpool{pool, static_cast<int32_t>(pool_blocks), kBlockSize, kHeadDim};
  const moa::cuda::DecodeAttentionArgs args{q,      out,     batch,   m.n_heads, m.n_kv_heads,
                                            scale,  nullptr, d_begin, d_len,     d_data,
                                            d_sink, d_win,   d_seq,   nullptr,   0};
  std::vector<std::vector<float>> outs;
  for (const Timing& tm : timings) {
    moa::cuda::DecodeAttentionConfig cfg;
    CHECK_CUDA(moa::cuda::GetDecodeAttentionConfig(kHeadDim, m.n_heads / m.n_kv_heads, n_pairs,
                                                   &cfg, tm.variant, tm.stages));
    if (tm.min_keys > 0) cfg.min_keys_per_block = tm.min_keys;
    if (tm.pair_keys >= 0) cfg.pair_start_keys = tm.pair_keys;
    void* ws = nullptr;
    CHECK_CUDA(cudaMalloc(&ws, cfg.workspace_bytes));
    CHECK_CUDA(moa::cuda::InitDecodeAttentionWorkspace(cfg, ws, nullptr));
    const double t = TimeIt(
        [&] { CHECK_CUDA(moa::cuda::LaunchDecodeAttention(args, dpool, cfg, ws, nullptr)); });
    const double bw = kv_bytes / t;
    res.fraction.push_back(bw / copy_bw);
    std::printf(" %9.1f | %5.1f%% |", t * 1e6, 100.0 * bw / copy_bw);
    if (show_grid) std::printf(" grid %4d |", cfg.grid);
    if (check && outs.size() < 2) {
      outs.emplace_back(q_host.size());
      CHECK_CUDA(cudaMemcpy(outs.back().data(), out, q_host.size() * sizeof(float),
                            cudaMemcpyDeviceToHost));
    }
    CHECK_CUDA(cudaFree(ws));
  }
  if (g_read) {
    std::vector<int32_t> ids;
    for (int32_t id : table_data) {
      if (id >= 0) ids.push_back(id);
    }
    int32_t* d_ids = Upload(ids);
    uint32_t* d_sink = nullptr;
    CHECK_CUDA(cudaMalloc(&d_sink, sizeof(uint32_t)));
    int per_sm = 0, sms = 0;
    CHECK_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, ReadBlocks, 256, 0));
    CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    // --read-warps: blocks of 4 warps, that many warps per SM in all (else as many as fit).
    const int threads = g_read_warps > 0 ? 128 : 256;
    const int grid = g_read_warps > 0 ? sms * (g_read_warps / 4) : sms * per_sm;
    const int64_t value_offset = pool_blocks * kBlockSize * kHeadDim;
    const double t = TimeIt([&] {
      ReadBlocks<<<grid, threads>>>(pool, d_ids, static_cast<int64_t>(ids.size()), value_offset,
                                    d_sink);
      CHECK_CUDA(cudaGetLastError());
    });
    std::printf(" read %9.1f | %5.1f%% |", t * 1e6, 100.0 * used * block_bytes / t / copy_bw);
    CHECK_CUDA(cudaFree(d_ids));
    CHECK_CUDA(cudaFree(d_sink));
  }
  if (timings.size() >= 2) std::printf(" %6.2fx |", res.fraction[1] / res.fraction[0]);
  if (check && outs.size() == 2) {
    double worst = 0.0, ref = 0.0;
    for (size_t i = 0; i < outs[0].size(); ++i) {
      ref = std::max(ref, static_cast<double>(std::fabs(outs[0][i])));
      const double e = std::fabs(static_cast<double>(outs[1][i]) - outs[0][i]);
      if (!(e <= worst)) worst = std::isnan(e) ? INFINITY : e;
    }
    res.disagreement = worst / std::max(ref, 1e-30);
    std::printf(" %7.1e%s |", res.disagreement, res.disagreement <= kAgree ? "" : " MISMATCH");
  }

  if (general) {
    PrefillAttentionArgs gen{};
    gen.q = q;
    gen.out = out;
    gen.n_heads = m.n_heads;
    gen.n_kv_heads = m.n_kv_heads;
    gen.head_dim = kHeadDim;
    gen.scale = scale;
    gen.sink = kSink;
    gen.n_seqs = batch;
    gen.q_row = d_q_row;
    gen.n_new = d_n_new;
    gen.past = d_past;
    gen.max_n_new = 1;
    gen.table_begin = d_begin;
    gen.table_len = d_len;
    gen.table_data = d_data;
    gen.rules = d_rules;
    const double t_gen =
        TimeIt([&] { CHECK_CUDA(moa::cuda::LaunchAttention(gen, dpool, nullptr)); });
    std::printf(" %9.1f |", t_gen * 1e6);
  }
  std::printf("%s\n", suffix);
  std::fflush(stdout);

  for (void* p :
       {static_cast<void*>(pool), static_cast<void*>(q), static_cast<void*>(out),
        static_cast<void*>(d_begin), static_cast<void*>(d_len), static_cast<void*>(d_data),
        static_cast<void*>(d_sink), static_cast<void*>(d_win), static_cast<void*>(d_seq),
        static_cast<void*>(d_q_row), static_cast<void*>(d_n_new), static_cast<void*>(d_past),
        static_cast<void*>(d_rules)}) {
    CHECK_CUDA(cudaFree(p));
  }
  res.ran = true;
  return res;
}

struct Summary {
  std::vector<double> all;
  int at_target = 0;
  double worst = 1e9;
  std::string worst_row;

  void Add(double f, const std::string& row) {
    all.push_back(f);
    at_target += f >= 0.8 ? 1 : 0;
    if (f < worst) {
      worst = f;
      worst_row = row;
    }
  }
  void Print(const char* name) {
    if (all.empty()) return;
    std::sort(all.begin(), all.end());
    std::printf(
        "summary, %s: %zu configurations, %d at >= 80%% of copy bandwidth; median %.1f%%, "
        "min %.1f%% (%s)\n",
        name, all.size(), at_target, 100.0 * all[all.size() / 2], 100.0 * worst, worst_row.c_str());
  }
};

// One --only row selector: model/batch/len/plan, each field a value or * (any).
struct Only {
  std::string model, plan;  // "" = any
  int batch = 0, len = 0;   // 0 = any
};

bool ParseOnly(const std::string& spec, Only* o) {
  std::vector<std::string> f;
  size_t at = 0;
  for (size_t slash; (slash = spec.find('/', at)) != std::string::npos; at = slash + 1) {
    f.push_back(spec.substr(at, slash - at));
  }
  f.push_back(spec.substr(at));
  if (f.size() != 4) return false;
  const auto any = [](const std::string& x) { return x == "*"; };
  if (!any(f[0]) && f[0] != "mha" && f[0] != "gqa") return false;
  if (!any(f[3]) && f[3] != "dense" && f[3] != "w50" && f[3] != "w25" && f[3] != "mixed") {
    return false;
  }
  o->model = any(f[0]) ? "" : f[0];
  o->plan = any(f[3]) ? "" : f[3];
  o->batch = any(f[1]) ? 0 : std::atoi(f[1].c_str());
  o->len = any(f[2]) ? 0 : std::atoi(f[2].c_str());
  return (any(f[1]) || o->batch > 0) && (any(f[2]) || o->len > 0);
}

const char* PlanKey(Plan p) {
  switch (p) {
    case Plan::kDense:
      return "dense";
    case Plan::kUniform50:
      return "w50";
    case Plan::kUniform25:
      return "w25";
    case Plan::kMixed50:
      return "mixed";
  }
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, general = false;
  std::vector<Only> only;
  std::string variant = "both";
  int stages = 0, pair_keys = -1;
  for (int i = 1; i < argc; ++i) {
    const bool has_value = i + 1 < argc;
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else if (std::strcmp(argv[i], "--general") == 0) {
      general = true;
    } else if (std::strcmp(argv[i], "--read") == 0) {
      g_read = true;
    } else if (std::strcmp(argv[i], "--only") == 0 && has_value) {
      const std::string list = argv[++i];
      size_t at = 0;
      for (;;) {
        const size_t comma = list.find(',', at);
        Only o;
        if (!ParseOnly(list.substr(at, comma == std::string::npos ? comma : comma - at), &o)) {
          std::fprintf(stderr, "bad --only spec in %s\n", list.c_str());
          return 2;
        }
        only.push_back(o);
        if (comma == std::string::npos) break;
        at = comma + 1;
      }
    } else if (std::strcmp(argv[i], "--variant") == 0 && has_value &&
               (std::strcmp(argv[i + 1], "cuda") == 0 || std::strcmp(argv[i + 1], "tensor") == 0)) {
      variant = argv[++i];
    } else if (std::strcmp(argv[i], "--stages") == 0 && has_value && std::atoi(argv[i + 1]) > 0) {
      stages = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--pair-keys") == 0 && has_value &&
               std::atoi(argv[i + 1]) >= 0) {
      pair_keys = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--read-warps") == 0 && has_value &&
               std::atoi(argv[i + 1]) >= 4 && std::atoi(argv[i + 1]) % 4 == 0) {
      g_read = true;
      g_read_warps = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--runs") == 0 && has_value && std::atoi(argv[i + 1]) > 0) {
      g_runs = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--spread") == 0 && has_value && std::atof(argv[i + 1]) > 0) {
      g_spread_bytes = std::atof(argv[++i]) * 1e9;
    } else if (std::strcmp(argv[i], "--timing") == 0 && has_value &&
               (std::strcmp(argv[i + 1], "queued") == 0 || std::strcmp(argv[i + 1], "idle") == 0)) {
      g_launch_timing =
          std::strcmp(argv[++i], "idle") == 0 ? LaunchTiming::kIdle : LaunchTiming::kQueued;
    } else {
      std::fprintf(
          stderr,
          "usage: %s [--quick] [--general] [--read] [--read-warps N] [--only SPEC[,SPEC...]] "
          "[--variant cuda|tensor] [--stages N] [--runs N] [--timing queued|idle] [--spread GB] "
          "[--pair-keys N]\n",
          argv[0]);
      return 2;
    }
  }
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  g_flush_bytes = 4 * static_cast<size_t>(prop.l2CacheSize);
  CHECK_CUDA(cudaMalloc(&g_flush, g_flush_bytes));
  CHECK_CUDA(cudaMemset(g_flush, 0, g_flush_bytes));
  CHECK_CUDA(cudaMalloc(&g_flush_sink, sizeof(int)));
  const double copy_bw = CopyBandwidth();
  std::printf("device: %s, %d SMs; copy bandwidth (read + written, median of %d): %.0f GB/s\n",
              prop.name, prop.multiProcessorCount, g_runs, copy_bw / 1e9);
  std::printf(
      "decode attention, one layer, head_dim %d, fp16 KV in blocks of %d positions (random "
      "placement, random values), sink %d;\nKV MB = key and value bytes of the visible keys; "
      "time = median of %d after %d warm-up runs, the L2 flushed before each, %s; CUDA cores = the "
      "first kernel, tensor cores = "
      "mma.sync tiles (default pipeline depth);\ndiff = max |tensor - CUDA cores| / max |output|"
      "%s\n\n",
      kHeadDim, kBlockSize, kSink, g_runs, kWarmup,
      g_launch_timing == LaunchTiming::kQueued
          ? "launch queued behind the flush (device time only, as in a graph replay)"
          : "launch on an idle device (includes the host's launch call)",
      general ? "; general = the backend's one block per (row, KV head) kernel" : "");
  if (g_read_warps > 0) {
    std::printf("the plain read runs %d warps per SM (--read-warps)\n\n", g_read_warps);
  }
  if (g_spread_bytes > 0) {
    std::printf("blocks placed at random in a pool of at least %.0f GB (--spread)\n\n",
                g_spread_bytes / 1e9);
  }
  const bool one_variant = variant != "both";
  std::printf("| model      | batch | KV len | plan       |     KV MB |%s%s\n",
              one_variant
                  ? (variant == "cuda" ? " CUDA cores us | of copy |" : " tensor us | of copy |")
                  : " CUDA cores us | of copy | tensor us | of copy | speedup |    diff |",
              general ? " general us |" : "");
  std::printf("|------------|-------|--------|------------|-----------|%s%s\n",
              one_variant
                  ? (variant == "cuda" ? "---------------|---------|" : "-----------|---------|")
                  : "---------------|---------|-----------|---------|---------|---------|",
              general ? "------------|" : "");
  const Model models[] = {{"L2-7B MHA", 32, 32}, {"L3-8B GQA", 32, 8}};
  std::vector<int> batches = {1, 8, 32, 64}, lens = {4096, 8192, 16384, 32768};
  if (quick) {
    batches = {1, 8};
    lens = {4096, 8192};
  }
  std::vector<Timing> timed;
  if (variant != "tensor") timed.push_back({DecodeAttentionVariant::kCudaCores, 0, 0, pair_keys});
  if (variant != "cuda") {
    timed.push_back({DecodeAttentionVariant::kTensorCores, stages, 0, pair_keys});
  }
  const auto selected = [&](const Model& m, int batch, int len, Plan plan) {
    if (only.empty()) return true;
    const std::string model = m.n_heads == m.n_kv_heads ? "mha" : "gqa";
    for (const Only& o : only) {
      if ((o.model.empty() || o.model == model) && (o.batch == 0 || o.batch == batch) &&
          (o.len == 0 || o.len == len) && (o.plan.empty() || o.plan == PlanKey(plan))) {
        return true;
      }
    }
    return false;
  };
  std::mt19937 rng(7);
  Summary cuda_cores, tensor, by_default;
  int mismatches = 0;
  for (const Model& m : models) {
    moa::cuda::DecodeAttentionConfig def;
    CHECK_CUDA(moa::cuda::GetDecodeAttentionConfig(kHeadDim, m.n_heads / m.n_kv_heads, 1, &def));
    for (int batch : batches) {
      for (int len : lens) {
        for (Plan plan : {Plan::kDense, Plan::kUniform50, Plan::kUniform25, Plan::kMixed50}) {
          if (!selected(m, batch, len, plan)) continue;
          const Result r =
              RunConfig(m, batch, len, plan, copy_bw, rng, timed, true, general, false, "");
          if (!r.ran) continue;
          const std::string row = std::string(m.name) + " batch " + std::to_string(batch) +
                                  " len " + std::to_string(len) + " " + PlanName(plan);
          if (timed.size() == 1) {
            (variant == "cuda" ? cuda_cores : tensor).Add(r.fraction[0], row);
            continue;
          }
          cuda_cores.Add(r.fraction[0], row);
          tensor.Add(r.fraction[1], row);
          by_default.Add(r.fraction[def.tensor_cores ? 1 : 0], row);
          mismatches += r.disagreement <= kAgree ? 0 : 1;
        }
      }
    }
  }
  std::printf("\n");
  cuda_cores.Print("CUDA cores");
  tensor.Print("tensor cores");
  by_default.Print("default variant per model");
  std::printf("variants disagreeing by more than %.0e: %d\n", kAgree, mismatches);
  if (!only.empty()) return mismatches == 0 ? 0 : 1;

  // The tensor kernel's pipeline depth (16-key tiles in flight per warp; deeper stages take more
  // shared memory, so fewer blocks fit on an SM).
  std::printf("\ntensor cores by pipeline depth: time us and fraction at 2, 3, 4 stages\n\n");
  const std::vector<Timing> depths = {{DecodeAttentionVariant::kTensorCores, 2, 0},
                                      {DecodeAttentionVariant::kTensorCores, 3, 0},
                                      {DecodeAttentionVariant::kTensorCores, 4, 0}};
  struct Point {
    int model, batch, len;
    Plan plan;
  };
  const Point depth_points[] = {{1, 1, 32768, Plan::kDense},   {1, 8, 16384, Plan::kDense},
                                {1, 64, 8192, Plan::kDense},   {1, 32, 4096, Plan::kUniform25},
                                {0, 8, 4096, Plan::kDense},    {0, 32, 16384, Plan::kDense},
                                {0, 64, 32768, Plan::kMixed50}};
  for (const Point& pt : depth_points) {
    if (quick && (pt.batch > 8 || pt.len > 8192)) continue;
    RunConfig(models[pt.model], pt.batch, pt.len, pt.plan, copy_bw, rng, depths, false, false, true,
              " 2 / 3 / 4 stages |");
  }

  // The keys a pair start counts as, where blocks take one or two pairs each (batch 1 and 8).
  std::printf(
      "\ntensor cores by the keys a pair start counts as: time us and fraction at 0, 256, "
      "512, 768, 1024\n\n");
  std::vector<Timing> starts;
  for (const int k : {0, 256, 512, 768, 1024}) {
    starts.push_back({DecodeAttentionVariant::kTensorCores, 0, 0, k});
  }
  const Point start_points[] = {{0, 1, 8192, Plan::kDense},     {0, 1, 16384, Plan::kMixed50},
                                {0, 8, 4096, Plan::kUniform25}, {1, 1, 32768, Plan::kDense},
                                {1, 8, 8192, Plan::kDense},     {1, 8, 16384, Plan::kUniform25}};
  for (const Point& pt : start_points) {
    if (quick && (pt.batch > 8 || pt.len > 8192)) continue;
    RunConfig(models[pt.model], pt.batch, pt.len, pt.plan, copy_bw, rng, starts, false, false,
              false, " 0 / 256 / 512 / 768 / 1024 keys |");
  }

  // Batch 1 (the fewest pairs) by the minimum keys per block, both variants.
  std::printf("\nbatch 1 by the minimum keys per block: CUDA cores, tensor cores\n\n");
  for (const Model& m : models) {
    for (const int len : {4096, 16384}) {
      for (const Plan plan : {Plan::kDense, Plan::kUniform25}) {
        for (const int min_keys : {16, 32, 64, 128, 256}) {
          const std::vector<Timing> t = {{DecodeAttentionVariant::kCudaCores, 0, min_keys},
                                         {DecodeAttentionVariant::kTensorCores, 0, min_keys}};
          const std::string suffix = " min keys per block " + std::to_string(min_keys) + " |";
          RunConfig(m, 1, len, plan, copy_bw, rng, t, false, false, false, suffix.c_str());
        }
      }
    }
  }
  return mismatches == 0 ? 0 : 1;
}
