// The batched pick of kernels/cuda/sampling.h. Each step names the step of SampleWithUniform
// (kernels/sampling.h) it follows; the arithmetic is the same (fp32 penalties with explicit
// rounding, fp64 exponentials and sums), only the order of the sums differs.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cub/cub.cuh>
#include <cuda/functional>
#include <vector>

#include "kernels/cuda/sampling.h"

namespace moa::cuda {
namespace {

constexpr int kPrepThreads = 512;
constexpr int kArgmaxThreads = 512;
// The pick walks the sorted candidates in chunks of kPickThreads * kPickItems, each thread a
// run of kPickItems consecutive ones (its own sequential prefix, then a block-wide scan).
constexpr int kPickThreads = 512;
constexpr int kPickItems = 8;
constexpr int64_t kChunk = int64_t{kPickThreads} * kPickItems;

// The copy step 1 works on: keys = logits, and ids = 0 .. vocab - 1 (the sort's values) for
// sampled rows. Blocks along y split a row, so that the copy runs at the device's bandwidth.
constexpr int64_t kCopyPerBlock = 8192;

__global__ void CopyRowsKernel(const float* logits, int64_t vocab, const DeviceSampleRow* rows,
                               const int32_t* list, float* keys, int32_t* ids) {
  const int32_t row = list[blockIdx.x];
  const bool sampled = rows[row].temperature > 0.0f;
  const int64_t begin = blockIdx.y * kCopyPerBlock;
  const int64_t end = begin + kCopyPerBlock < vocab ? begin + kCopyPerBlock : vocab;
  const float* src = logits + row * vocab;
  float* dst = keys + row * vocab;
  int32_t* id = ids + row * vocab;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    dst[i] = src[i];
    if (sampled) id[i] = static_cast<int32_t>(i);
  }
}

// Step 1 on the copy: each of the row's (distinct) seen tokens, one thread each.
__global__ void PenaltyKernel(int64_t vocab, const DeviceSampleRow* rows, const int32_t* list,
                              const int32_t* pen_ids, const int32_t* pen_counts, float* keys) {
  const int32_t row = list[blockIdx.x];
  const DeviceSampleRow p = rows[row];
  float* dst = keys + row * vocab;
  for (int32_t j = threadIdx.x; j < p.penalty_len; j += blockDim.x) {
    const int64_t e = p.penalty_begin + j;
    float l = dst[pen_ids[e]];
    l = l > 0.0f ? __fdiv_rn(l, p.repetition_penalty) : __fmul_rn(l, p.repetition_penalty);
    l = __fsub_rn(
        l, __fmaf_rn(p.frequency_penalty, static_cast<float>(pen_counts[e]), p.presence_penalty));
    dst[pen_ids[e]] = l;
  }
}

struct ArgMax {
  float v;
  int32_t i;
};

struct ArgMaxOp {
  __device__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    return a.v > b.v || (a.v == b.v && a.i < b.i) ? a : b;
  }
};

// Step 2: the largest logit, the lowest id among equal ones. Rows with penalties read the
// penalized copy.
__global__ void ArgmaxKernel(const float* logits, const float* keys, int64_t vocab,
                             const DeviceSampleRow* rows, const int32_t* list, int32_t* tokens) {
  using Reduce = cub::BlockReduce<ArgMax, kArgmaxThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int32_t row = list[blockIdx.x];
  const float* src = (rows[row].penalty_len > 0 ? keys : logits) + row * vocab;
  ArgMax best{-INFINITY, INT_MAX};
  const ArgMaxOp op;
  for (int64_t i = threadIdx.x; i < vocab; i += kArgmaxThreads) {
    best = op(best, ArgMax{src[i], static_cast<int32_t>(i)});
  }
  const ArgMax r = Reduce(tmp).Reduce(best, op);
  // With every logit -inf (or NaN) nothing beats the start value: the CPU then returns id 0.
  if (threadIdx.x == 0) tokens[row] = r.i == INT_MAX ? 0 : r.i;
}

union PickShared {
  typename cub::BlockReduce<double, kPickThreads>::TempStorage sum;
  typename cub::BlockReduce<long long, kPickThreads>::TempStorage index;
  typename cub::BlockScan<double, kPickThreads>::TempStorage scan;
};

// The block-wide sum of `v`, in every thread.
__device__ double BlockSum(double v, PickShared& sh, double* out) {
  const double s = cub::BlockReduce<double, kPickThreads>(sh.sum).Sum(v);
  if (threadIdx.x == 0) *out = s;
  __syncthreads();
  const double r = *out;
  __syncthreads();
  return r;
}

// The smallest of `v` over the block, in every thread.
__device__ long long BlockMin(long long v, PickShared& sh, long long* out) {
  const long long m =
      cub::BlockReduce<long long, kPickThreads>(sh.index).Reduce(v, ::cuda::minimum<>{});
  if (threadIdx.x == 0) *out = m;
  __syncthreads();
  const long long r = *out;
  __syncthreads();
  return r;
}

// The sorted candidates of one row and their probabilities p_i = e_i / z (steps 3 and 4).
struct Candidates {
  const float* key;
  double top;
  double temperature;
  double z;
  __device__ double e(int64_t i) const {
    return exp((static_cast<double>(key[i]) - top) / temperature);
  }
  __device__ double p(int64_t i) const { return e(i) / z; }
};

struct ScanHit {
  long long index;  // first i < n whose c_i passes, n if none
  double cum;       // c at that index, or c_{n-1} if none
};

// Walks c_i = p_0 + ... + p_i over i < n and stops at the first c_i >= t (strict: c_i > t).
__device__ ScanHit ScanUntil(const Candidates& c, int64_t n, double t, bool strict, PickShared& sh,
                             long long* idx_slot, double* cum_slot) {
  double carry = 0.0;
  for (int64_t base = 0; base < n; base += kChunk) {
    const int64_t first = base + int64_t{threadIdx.x} * kPickItems;
    double v[kPickItems];
    double local = 0.0;
#pragma unroll
    for (int j = 0; j < kPickItems; ++j) {
      v[j] = first + j < n ? c.p(first + j) : 0.0;
      local += v[j];
    }
    double before, chunk_total;
    cub::BlockScan<double, kPickThreads>(sh.scan).ExclusiveSum(local, before, chunk_total);
    __syncthreads();
    double cum = carry + before;
    long long hit = LLONG_MAX;
    double hit_cum = 0.0;
#pragma unroll
    for (int j = 0; j < kPickItems; ++j) {
      if (first + j < n && hit == LLONG_MAX) {
        cum += v[j];
        if (strict ? cum > t : cum >= t) {
          hit = first + j;
          hit_cum = cum;
        }
      }
    }
    const long long found = BlockMin(hit, sh, idx_slot);
    if (found != LLONG_MAX) {
      if (hit == found) *cum_slot = hit_cum;
      __syncthreads();
      return {found, *cum_slot};
    }
    carry += chunk_total;
  }
  return {n, carry};
}

// Steps 3 to 7 for one sampled row, over its candidates sorted by CUB.
__global__ void PickKernel(const float* sorted_keys, const int32_t* sorted_ids, int64_t vocab,
                           const DeviceSampleRow* rows, const int32_t* list, int32_t* tokens) {
  __shared__ PickShared sh;
  __shared__ double sum_slot, cum_slot;
  __shared__ long long idx_slot;
  const int32_t row = list[blockIdx.x];
  const DeviceSampleRow p = rows[row];
  const int32_t* ids = sorted_ids + row * vocab;
  Candidates c{sorted_keys + row * vocab, 0.0, p.temperature, 1.0};
  c.top = c.key[0];
  const int64_t k = p.top_k > 0 && p.top_k < vocab ? p.top_k : vocab;
  // Step 4: z.
  double part = 0.0;
  for (int64_t i = threadIdx.x; i < k; i += kPickThreads) part += c.e(i);
  c.z = BlockSum(part, sh, &sum_slot);
  int64_t keep = k;
  // Step 5: p_0 = e_0 / z = 1 / z; the p_i do not increase, so the kept ones are a prefix that
  // ends before the first p_i below the floor.
  if (p.min_p > 0.0f) {
    const double floor = static_cast<double>(p.min_p) * (1.0 / c.z);
    for (int64_t base = 0; base < k; base += kChunk) {
      long long below = LLONG_MAX;
      const int64_t end = base + kChunk < k ? base + kChunk : k;
      for (int64_t i = base + threadIdx.x; i < end; i += kPickThreads) {
        if (c.p(i) < floor) {
          below = i;
          break;
        }
      }
      const long long first = BlockMin(below, sh, &idx_slot);
      if (first != LLONG_MAX) {
        keep = first > 1 ? first : 1;
        break;
      }
    }
  }
  // Steps 6 and 7's total: one walk finds the top-p cut and the sum of what is kept.
  const bool top_p = p.top_p < 1.0f;
  const ScanHit cut = ScanUntil(c, keep, top_p ? static_cast<double>(p.top_p) : INFINITY, false, sh,
                                &idx_slot, &cum_slot);
  if (top_p && cut.index < keep) keep = cut.index + 1;
  const double r = p.u * cut.cum;
  // Step 7.
  const ScanHit pick = ScanUntil(c, keep, r, true, sh, &idx_slot, &cum_slot);
  if (threadIdx.x == 0) tokens[row] = ids[pick.index < keep ? pick.index : keep - 1];
}

// Host arrays packed into one upload: each part aligned to 16 bytes.
class MetaPacker {
 public:
  template <typename T>
  size_t Add(const T* data, size_t n) {
    const size_t at = (bytes_.size() + 15) / 16 * 16;
    bytes_.resize(at + n * sizeof(T));
    if (n > 0) std::copy_n(reinterpret_cast<const char*>(data), n * sizeof(T), bytes_.data() + at);
    return at;
  }
  const std::vector<char>& bytes() const { return bytes_; }

 private:
  std::vector<char> bytes_;
};

unsigned Blocks(size_t n) { return static_cast<unsigned>(n); }

}  // namespace

SampleScratch::~SampleScratch() {
  for (void* p : ptr_) {
    if (p != nullptr) cudaFree(p);
  }
}

cudaError_t SampleScratch::Grow(int slot, size_t bytes, cudaStream_t stream) {
  if (bytes <= bytes_[slot]) return cudaSuccess;
  if (ptr_[slot] != nullptr) {
    // Work queued earlier may still use the old buffer.
    if (cudaError_t e = cudaStreamSynchronize(stream); e != cudaSuccess) return e;
    cudaFree(ptr_[slot]);
    ptr_[slot] = nullptr;
    bytes_[slot] = 0;
  }
  const size_t want = std::max(bytes, 2 * bytes_[slot]);
  if (cudaError_t e = cudaMalloc(&ptr_[slot], want); e != cudaSuccess) {
    ptr_[slot] = nullptr;
    return e;
  }
  bytes_[slot] = want;
  return cudaSuccess;
}

cudaError_t SampleRows(const float* logits, int64_t rows, int64_t vocab,
                       const DeviceSampleRow* host_rows, const int32_t* penalty_ids,
                       const int32_t* penalty_counts, int64_t n_penalties, int32_t* tokens,
                       SampleScratch* s, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  std::vector<int32_t> greedy, prepared, sampled, seg_begin, seg_end;
  for (int32_t r = 0; r < rows; ++r) {
    const bool is_sampled = host_rows[r].temperature > 0.0f;
    if (is_sampled) {
      sampled.push_back(r);
      seg_begin.push_back(static_cast<int32_t>(r * vocab));
      seg_end.push_back(static_cast<int32_t>((r + 1) * vocab));
    } else {
      greedy.push_back(r);
    }
    if (is_sampled || host_rows[r].penalty_len > 0) prepared.push_back(r);
  }
  MetaPacker m;
  const size_t at_rows = m.Add(host_rows, rows);
  const size_t at_pen_ids = m.Add(penalty_ids, n_penalties);
  const size_t at_pen_counts = m.Add(penalty_counts, n_penalties);
  const size_t at_greedy = m.Add(greedy.data(), greedy.size());
  const size_t at_prepared = m.Add(prepared.data(), prepared.size());
  const size_t at_sampled = m.Add(sampled.data(), sampled.size());
  const size_t at_begin = m.Add(seg_begin.data(), seg_begin.size());
  const size_t at_end = m.Add(seg_end.data(), seg_end.size());
  const size_t at_tokens = m.Add(tokens, rows);  // room for the answer
  if (cudaError_t e = s->Grow(SampleScratch::kMeta, m.bytes().size(), stream); e != cudaSuccess) {
    return e;
  }
  char* meta = static_cast<char*>(s->get(SampleScratch::kMeta));
  // A pageable source is staged before the call returns, so `m` may go.
  if (cudaError_t e =
          cudaMemcpyAsync(meta, m.bytes().data(), m.bytes().size(), cudaMemcpyHostToDevice, stream);
      e != cudaSuccess) {
    return e;
  }
  const auto* d_rows = reinterpret_cast<const DeviceSampleRow*>(meta + at_rows);
  auto at = [meta](size_t offset) { return reinterpret_cast<int32_t*>(meta + offset); };
  int32_t* d_tokens = at(at_tokens);

  const size_t elems = static_cast<size_t>(rows * vocab);
  float* keys[2] = {nullptr, nullptr};
  int32_t* ids[2] = {nullptr, nullptr};
  if (!prepared.empty()) {
    for (int slot : {SampleScratch::kKeys0, SampleScratch::kKeys1, SampleScratch::kIds0,
                     SampleScratch::kIds1}) {
      if (cudaError_t e = s->Grow(slot, elems * 4, stream); e != cudaSuccess) return e;
    }
    keys[0] = static_cast<float*>(s->get(SampleScratch::kKeys0));
    keys[1] = static_cast<float*>(s->get(SampleScratch::kKeys1));
    ids[0] = static_cast<int32_t*>(s->get(SampleScratch::kIds0));
    ids[1] = static_cast<int32_t*>(s->get(SampleScratch::kIds1));
    const dim3 grid(Blocks(prepared.size()),
                    static_cast<unsigned>((vocab + kCopyPerBlock - 1) / kCopyPerBlock));
    CopyRowsKernel<<<grid, kPrepThreads, 0, stream>>>(logits, vocab, d_rows, at(at_prepared),
                                                      keys[0], ids[0]);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    PenaltyKernel<<<Blocks(prepared.size()), kPrepThreads, 0, stream>>>(
        vocab, d_rows, at(at_prepared), at(at_pen_ids), at(at_pen_counts), keys[0]);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  if (!greedy.empty()) {
    ArgmaxKernel<<<Blocks(greedy.size()), kArgmaxThreads, 0, stream>>>(
        logits, keys[0], vocab, d_rows, at(at_greedy), d_tokens);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  if (!sampled.empty()) {
    // Segments outside the sampled rows are neither read nor written by the sort.
    cub::DoubleBuffer<float> k(keys[0], keys[1]);
    cub::DoubleBuffer<int32_t> v(ids[0], ids[1]);
    const int n_items = static_cast<int>(sampled.size() * vocab);
    const int n_segs = static_cast<int>(sampled.size());
    size_t temp = 0;
    if (cudaError_t e = cub::DeviceSegmentedRadixSort::SortPairsDescending(
            nullptr, temp, k, v, n_items, n_segs, at(at_begin), at(at_end), 0, 32, stream);
        e != cudaSuccess) {
      return e;
    }
    if (cudaError_t e = s->Grow(SampleScratch::kCub, temp, stream); e != cudaSuccess) return e;
    if (cudaError_t e = cub::DeviceSegmentedRadixSort::SortPairsDescending(
            s->get(SampleScratch::kCub), temp, k, v, n_items, n_segs, at(at_begin), at(at_end), 0,
            32, stream);
        e != cudaSuccess) {
      return e;
    }
    PickKernel<<<Blocks(sampled.size()), kPickThreads, 0, stream>>>(
        k.Current(), v.Current(), vocab, d_rows, at(at_sampled), d_tokens);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  if (cudaError_t e =
          cudaMemcpyAsync(tokens, d_tokens, rows * sizeof(int32_t), cudaMemcpyDeviceToHost, stream);
      e != cudaSuccess) {
    return e;
  }
  return cudaStreamSynchronize(stream);
}

}  // namespace moa::cuda
