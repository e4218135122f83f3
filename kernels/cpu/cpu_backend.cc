// The CPU backend: float32 activations, weights kept in their stored (possibly block-quantized)
// format, work split over a small thread pool. Every result is computed by exactly one thread in
// a fixed order, so the output does not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "kernels/backend.h"
#include "kernels/backend_checks.h"
#include "kernels/cpu/dot.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/quant.h"
#include "kernels/random_fill.h"
#include "kernels/status_macros.h"

namespace moa {
namespace {

// Refuses single allocations larger than this (a corrupt shape must not exhaust memory).
constexpr int64_t kMaxAllocBytes = int64_t{1} << 40;

// Key / value rows the attention loops fetch ahead of use.
constexpr int64_t kPrefetchRows = 16;

void Prefetch(const float* row, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
}

// Rows of activations processed against one pass over a thread's share of a weight matrix: the
// weights are streamed from memory once per tile while the tile's activations stay in cache.
constexpr int64_t kTileRows = 32;

absl::StatusOr<std::unique_ptr<float[]>> AllocFloats(int64_t n, absl::string_view what) {
  if (n < 0 || n > kMaxAllocBytes / static_cast<int64_t>(sizeof(float))) {
    return absl::ResourceExhaustedError(absl::StrCat(what, ": ", n, " floats is too large"));
  }
  std::unique_ptr<float[]> p(new (std::nothrow) float[std::max<int64_t>(n, 1)]);
  if (p == nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat(what, ": cannot allocate ", n, " floats"));
  }
  return p;
}

// A weight (any dtype, rows of `row_bytes`) or a float32 activation.
class CpuTensor : public Tensor {
 public:
  static std::unique_ptr<CpuTensor> Weight(int64_t rows, int64_t cols, DType dtype,
                                           int64_t row_bytes, const uint8_t* data,
                                           std::shared_ptr<const void> owner) {
    auto t = std::unique_ptr<CpuTensor>(new CpuTensor(rows, cols, dtype));
    t->row_bytes_ = row_bytes;
    t->data_ = data;
    t->owner_ = std::move(owner);
    return t;
  }
  static std::unique_ptr<CpuTensor> Activation(int64_t rows, int64_t cols,
                                               std::unique_ptr<float[]> buf) {
    auto t = std::unique_ptr<CpuTensor>(new CpuTensor(rows, cols, DType::kF32));
    t->row_bytes_ = cols * static_cast<int64_t>(sizeof(float));
    t->data_ = reinterpret_cast<const uint8_t*>(buf.get());
    t->act_ = std::move(buf);
    return t;
  }

  int64_t rows() const override { return rows_; }
  int64_t cols() const override { return cols_; }
  DType dtype() const { return dtype_; }
  bool is_activation() const { return act_ != nullptr; }
  const uint8_t* row(int64_t r) const { return data_ + r * row_bytes_; }
  float* f32() { return act_.get(); }
  const float* f32() const { return act_.get(); }

 private:
  CpuTensor(int64_t rows, int64_t cols, DType dtype) : rows_(rows), cols_(cols), dtype_(dtype) {}

  int64_t rows_;
  int64_t cols_;
  DType dtype_;
  int64_t row_bytes_ = 0;
  const uint8_t* data_ = nullptr;
  std::shared_ptr<const void> owner_;  // keeps a weight's bytes alive
  std::unique_ptr<float[]> act_;       // an activation's storage
};

// All keys first, then all values: key block i is [block_size, head_dim] at i * block_size *
// head_dim, its value block value_offset() floats further on. A head's consecutive blocks (a
// prefill allocates them in a row) then hold its keys contiguously, as a dense cache would, which
// the hardware prefetcher streams well.
class CpuKvPool : public KvPool {
 public:
  CpuKvPool(int32_t num_blocks, int32_t block_size, int head_dim, std::unique_ptr<float[]> data)
      : num_blocks_(num_blocks),
        block_size_(block_size),
        head_dim_(head_dim),
        data_(std::move(data)) {}
  int32_t num_blocks() const override { return num_blocks_; }
  int32_t block_size() const override { return block_size_; }
  int head_dim() const override { return head_dim_; }

  // Key row of position `offset` (< block_size) of block `id`; its value row is value_offset()
  // floats further on.
  float* Key(int32_t id, int64_t offset) {
    return data_.get() + (int64_t{id} * block_size_ + offset) * head_dim_;
  }
  int64_t value_offset() const { return int64_t{num_blocks_} * block_size_ * head_dim_; }

 private:
  int32_t num_blocks_;
  int32_t block_size_;
  int head_dim_;
  std::unique_ptr<float[]> data_;
};

absl::StatusOr<const CpuTensor*> AsCpu(const Tensor& t, absl::string_view what) {
  return AsBackendTensor<CpuTensor>(t, what, "CPU");
}
absl::StatusOr<const CpuTensor*> AsActivation(const Tensor& t, absl::string_view what) {
  return AsBackendActivation<const CpuTensor>(t, what, "CPU");
}
absl::StatusOr<CpuTensor*> AsActivation(Tensor& t, absl::string_view what) {
  return AsBackendActivation<CpuTensor>(t, what, "CPU");
}

class CpuBackend : public Backend {
 public:
  explicit CpuBackend(int n_threads) : pool_(n_threads) {}

  std::string_view name() const override { return "cpu"; }

  absl::StatusOr<std::unique_ptr<Tensor>> LoadWeight(const HostTensor& t) override {
    ASSIGN_OR_RETURN(const WeightLayout w, CheckWeight(t));
    const int64_t rows = w.rows;
    const int64_t cols = w.cols;
    const int64_t row_bytes = w.row_bytes;
    std::shared_ptr<const void> owner = t.owner;
    const uint8_t* data = t.data;
    if (owner == nullptr) {  // nothing keeps the bytes alive: take a copy
      const int64_t n = rows * row_bytes;
      if (n > kMaxAllocBytes) {
        return absl::ResourceExhaustedError(absl::StrCat("weight ", t.name, " is too large"));
      }
      std::shared_ptr<uint8_t[]> copy(new (std::nothrow) uint8_t[std::max<int64_t>(n, 1)]);
      if (copy == nullptr) {
        return absl::ResourceExhaustedError(absl::StrCat("weight ", t.name, ": out of memory"));
      }
      std::memcpy(copy.get(), t.data, n);
      data = copy.get();
      owner = std::move(copy);
    }
    return CpuTensor::Weight(rows, cols, t.dtype, row_bytes, data, std::move(owner));
  }

  absl::StatusOr<std::unique_ptr<Tensor>> RandomWeight(int64_t rows, int64_t cols, uint64_t seed,
                                                       float scale, float offset) override {
    RETURN_IF_ERROR(CheckRandomWeight(rows, cols, scale, offset, kMaxAllocBytes));
    const int64_t n = rows * cols;
    std::shared_ptr<uint16_t[]> data(new (std::nothrow) uint16_t[n]);
    if (data == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("RandomWeight [", rows, ", ", cols, "]: out of memory"));
    }
    const uint64_t key = RandomKey(seed);
    uint16_t* dst = data.get();
    pool_.ParallelFor(n, [&](int, int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        dst[i] = F32ToFp16(RandomUniform(key, static_cast<uint64_t>(i), scale, offset));
      }
    });
    const auto* bytes = reinterpret_cast<const uint8_t*>(dst);
    return CpuTensor::Weight(rows, cols, DType::kF16, cols * 2, bytes, std::move(data));
  }

  absl::StatusOr<std::unique_ptr<Tensor>> NewActivation(int64_t rows, int64_t cols) override {
    if (rows < 0 || cols <= 0 || rows > std::numeric_limits<int64_t>::max() / cols) {
      return absl::InvalidArgumentError(absl::StrCat("activation [", rows, ", ", cols, "]"));
    }
    ASSIGN_OR_RETURN(auto buf, AllocFloats(rows * cols, "activation"));
    return CpuTensor::Activation(rows, cols, std::move(buf));
  }

  absl::Status CopyToHost(const Tensor& t, absl::Span<float> out) override {
    ASSIGN_OR_RETURN(const CpuTensor* c, AsCpu(t, "CopyToHost"));
    if (static_cast<int64_t>(out.size()) != c->rows() * c->cols()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "CopyToHost: ", out.size(), " floats for a tensor of ", c->rows() * c->cols()));
    }
    if (c->is_activation()) {
      std::copy_n(c->f32(), out.size(), out.data());
      return absl::OkStatus();
    }
    for (int64_t r = 0; r < c->rows(); ++r) {
      RETURN_IF_ERROR(DequantizeRow(c->dtype(), c->row(r), c->cols(), out.data() + r * c->cols()));
    }
    return absl::OkStatus();
  }

  absl::Status CopyFromHost(absl::Span<const float> in, Tensor& t) override {
    ASSIGN_OR_RETURN(CpuTensor * c, AsActivation(t, "CopyFromHost"));
    if (static_cast<int64_t>(in.size()) != c->rows() * c->cols()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "CopyFromHost: ", in.size(), " floats for a tensor of ", c->rows() * c->cols()));
    }
    std::copy(in.begin(), in.end(), c->f32());
    return absl::OkStatus();
  }

  absl::Status Embed(const Tensor& table, absl::Span<const int32_t> tokens, Tensor& out) override {
    ASSIGN_OR_RETURN(const CpuTensor* tab, AsCpu(table, "Embed table"));
    ASSIGN_OR_RETURN(CpuTensor * o, AsActivation(out, "Embed output"));
    RETURN_IF_ERROR(
        CheckShape(*o, static_cast<int64_t>(tokens.size()), tab->cols(), "Embed output"));
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (tokens[i] < 0 || tokens[i] >= tab->rows()) {
        return absl::InvalidArgumentError(
            absl::StrCat("Embed: token id ", tokens[i], " outside [0, ", tab->rows(), ")"));
      }
      RETURN_IF_ERROR(DequantizeRow(tab->dtype(), tab->row(tokens[i]), tab->cols(),
                                    o->f32() + i * tab->cols()));
    }
    return absl::OkStatus();
  }

  absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) override {
    ASSIGN_OR_RETURN(const CpuTensor* xc, AsActivation(x, "RmsNorm input"));
    ASSIGN_OR_RETURN(const CpuTensor* wc, AsCpu(weight, "RmsNorm weight"));
    ASSIGN_OR_RETURN(CpuTensor * o, AsActivation(out, "RmsNorm output"));
    const int64_t d = xc->cols();
    RETURN_IF_ERROR(CheckShape(*wc, 1, d, "RmsNorm weight"));
    RETURN_IF_ERROR(CheckShape(*o, xc->rows(), d, "RmsNorm output"));
    std::vector<float> w(d);
    RETURN_IF_ERROR(DequantizeRow(wc->dtype(), wc->row(0), d, w.data()));
    for (int64_t r = 0; r < xc->rows(); ++r) {
      const float* in = xc->f32() + r * d;
      float* dst = o->f32() + r * d;
      double ss = 0.0;
      for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(in[i]) * in[i];
      const float inv = static_cast<float>(1.0 / std::sqrt(ss / d + eps));
      for (int64_t i = 0; i < d; ++i) dst[i] = in[i] * inv * w[i];
    }
    return absl::OkStatus();
  }

  absl::Status MatMul(const Tensor& x, const Tensor& w, Tensor& out) override {
    ASSIGN_OR_RETURN(const CpuTensor* xc, AsActivation(x, "MatMul input"));
    ASSIGN_OR_RETURN(const CpuTensor* wc, AsCpu(w, "MatMul weight"));
    ASSIGN_OR_RETURN(CpuTensor * o, AsActivation(out, "MatMul output"));
    const int64_t t_rows = xc->rows();
    const int64_t k = xc->cols();
    const int64_t n = wc->rows();
    if (wc->cols() != k) {
      return absl::InvalidArgumentError(
          absl::StrCat("MatMul: input has ", k, " columns, weight ", wc->cols()));
    }
    RETURN_IF_ERROR(CheckShape(*o, t_rows, n, "MatMul output"));
    if (o == xc) return absl::InvalidArgumentError("MatMul: output aliases the input");
    switch (wc->dtype()) {
      case DType::kQ8_0:
        return MatMulInt8(*xc, *wc, *o, cpu::DotQ8_0);
      case DType::kQ4_0:
        return MatMulInt8(*xc, *wc, *o, cpu::DotQ4_0);
      case DType::kQ4_1:
        return MatMulInt8(*xc, *wc, *o, cpu::DotQ4_1);
      default:
        return MatMulFloat(*xc, *wc, *o);
    }
  }

  absl::Status Rope(Tensor& x, int n_heads, int head_dim, absl::Span<const float> inv_freq,
                    absl::Span<const int32_t> positions, RopeLayout layout) override {
    ASSIGN_OR_RETURN(CpuTensor * xc, AsActivation(x, "Rope input"));
    if (n_heads <= 0 || head_dim <= 0 || head_dim % 2 != 0 ||
        xc->cols() != int64_t{n_heads} * head_dim) {
      return absl::InvalidArgumentError(
          absl::StrCat("Rope: ", n_heads, " heads of ", head_dim, " on ", xc->cols(), " columns"));
    }
    const int half = head_dim / 2;
    if (static_cast<int>(inv_freq.size()) != half ||
        static_cast<int64_t>(positions.size()) != xc->rows()) {
      return absl::InvalidArgumentError(absl::StrCat("Rope: ", inv_freq.size(), " frequencies and ",
                                                     positions.size(), " positions for ",
                                                     xc->rows(), " rows"));
    }
    // Pair i of a head is (lo + i * lo_step, lo + i * lo_step + partner).
    const int step = layout == RopeLayout::kHalfSplit ? 1 : 2;
    const int partner = layout == RopeLayout::kHalfSplit ? half : 1;
    std::vector<float> cs(half), sn(half);
    for (int64_t r = 0; r < xc->rows(); ++r) {
      // Angles in float, as Hugging Face computes them (pos * inv_freq in float32).
      const float pos = static_cast<float>(positions[r]);
      for (int i = 0; i < half; ++i) {
        const float angle = pos * inv_freq[i];
        cs[i] = std::cos(angle);
        sn[i] = std::sin(angle);
      }
      float* row = xc->f32() + r * xc->cols();
      for (int h = 0; h < n_heads; ++h) {
        float* head = row + int64_t{h} * head_dim;
        for (int i = 0; i < half; ++i) {
          float& a = head[i * step];
          float& b = head[i * step + partner];
          const float a0 = a, b0 = b;
          a = a0 * cs[i] - b0 * sn[i];
          b = a0 * sn[i] + b0 * cs[i];
        }
      }
    }
    return absl::OkStatus();
  }

  absl::Status SwiGlu(const Tensor& gate, const Tensor& up, Tensor& out) override {
    ASSIGN_OR_RETURN(const CpuTensor* g, AsActivation(gate, "SwiGlu gate"));
    ASSIGN_OR_RETURN(const CpuTensor* u, AsActivation(up, "SwiGlu up"));
    ASSIGN_OR_RETURN(CpuTensor * o, AsActivation(out, "SwiGlu output"));
    RETURN_IF_ERROR(CheckShape(*u, g->rows(), g->cols(), "SwiGlu up"));
    RETURN_IF_ERROR(CheckShape(*o, g->rows(), g->cols(), "SwiGlu output"));
    const float* gp = g->f32();
    const float* upp = u->f32();
    float* op = o->f32();
    pool_.ParallelForGrain(g->rows() * g->cols(), 1 << 14, [&](int, int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) op[i] = gp[i] / (1.0f + std::exp(-gp[i])) * upp[i];
    });
    return absl::OkStatus();
  }

  absl::Status Add(Tensor& x, const Tensor& y) override {
    ASSIGN_OR_RETURN(CpuTensor * xc, AsActivation(x, "Add x"));
    ASSIGN_OR_RETURN(const CpuTensor* yc, AsActivation(y, "Add y"));
    RETURN_IF_ERROR(CheckShape(*yc, xc->rows(), xc->cols(), "Add y"));
    const int64_t n = xc->rows() * xc->cols();
    float* xp = xc->f32();
    const float* yp = yc->f32();
    for (int64_t i = 0; i < n; ++i) xp[i] += yp[i];
    return absl::OkStatus();
  }

  absl::Status GatherRows(const Tensor& x, absl::Span<const int64_t> rows, Tensor& out) override {
    ASSIGN_OR_RETURN(const CpuTensor* xc, AsActivation(x, "GatherRows input"));
    ASSIGN_OR_RETURN(CpuTensor * o, AsActivation(out, "GatherRows output"));
    RETURN_IF_ERROR(CheckGatherRows(*xc, rows, *o));
    const int64_t cols = xc->cols();
    for (size_t i = 0; i < rows.size(); ++i) {
      std::copy_n(xc->f32() + rows[i] * cols, cols, o->f32() + i * cols);
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::unique_ptr<KvPool>> NewKvPool(int32_t num_blocks, int32_t block_size,
                                                    int head_dim) override {
    if (num_blocks <= 0 || block_size <= 0 || head_dim <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("KV pool: ", num_blocks, " blocks of ", block_size, " x ", head_dim));
    }
    const int64_t per_block = int64_t{block_size} * head_dim * 2;
    if (num_blocks > kMaxAllocBytes / static_cast<int64_t>(sizeof(float)) / per_block) {
      return absl::ResourceExhaustedError(absl::StrCat("KV pool of ", num_blocks, " blocks of ",
                                                       per_block, " floats is too large"));
    }
    // Not zeroed: only positions that were written are ever read, and untouched pages of a
    // large pool then cost no memory.
    ASSIGN_OR_RETURN(auto data, AllocFloats(per_block * num_blocks, "KV pool"));
    return std::make_unique<CpuKvPool>(num_blocks, block_size, head_dim, std::move(data));
  }

  int64_t KvBlockBytes(int32_t block_size, int head_dim) const override {
    return int64_t{block_size} * head_dim * 2 * static_cast<int64_t>(sizeof(float));
  }

  absl::Status Attention(const Tensor& q, const Tensor& k, const Tensor& v,
                         absl::Span<const SequenceSlice> seqs, const AttentionParams& p,
                         KvPool& pool, Tensor& out) override;

 private:
  using DotInt8 = float (*)(const uint8_t*, const cpu::ActBlock*, int64_t);
  absl::Status MatMulInt8(const CpuTensor& x, const CpuTensor& w, CpuTensor& out, DotInt8 dot);
  absl::Status MatMulFloat(const CpuTensor& x, const CpuTensor& w, CpuTensor& out);

  ThreadPool pool_;
  std::vector<cpu::ActBlock> act_blocks_;  // quantized activations of the current MatMul
};

absl::Status CpuBackend::MatMulInt8(const CpuTensor& x, const CpuTensor& w, CpuTensor& out,
                                    DotInt8 dot) {
  const int64_t t_rows = x.rows();
  const int64_t k = x.cols();
  const int64_t n = w.rows();
  if (k % cpu::kActBlock != 0) {
    return absl::InvalidArgumentError(absl::StrCat("MatMul: ", k, " columns"));
  }
  const int64_t nb = k / cpu::kActBlock;
  act_blocks_.resize(t_rows * nb);
  cpu::ActBlock* act = act_blocks_.data();
  pool_.ParallelFor(t_rows, [&](int, int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) cpu::QuantizeActRow(x.f32() + t * k, k, act + t * nb);
  });
  float* o = out.f32();
  // Each thread owns a contiguous range of weight rows; activations are processed in tiles.
  pool_.ParallelFor(n, [&](int, int64_t n0, int64_t n1) {
    for (int64_t t0 = 0; t0 < t_rows; t0 += kTileRows) {
      const int64_t t1 = std::min(t_rows, t0 + kTileRows);
      for (int64_t j = n0; j < n1; ++j) {
        const uint8_t* wr = w.row(j);
        for (int64_t t = t0; t < t1; ++t) o[t * n + j] = dot(wr, act + t * nb, nb);
      }
    }
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::MatMulFloat(const CpuTensor& x, const CpuTensor& w, CpuTensor& out) {
  const int64_t t_rows = x.rows();
  const int64_t k = x.cols();
  const int64_t n = w.rows();
  const DType dt = w.dtype();
  const bool direct = dt == DType::kF32 || dt == DType::kF16 || dt == DType::kBF16;
  float* o = out.f32();
  std::vector<std::vector<float>> scratch(pool_.size());
  if (!direct) {
    for (auto& s : scratch) s.resize(k);
  }
  std::vector<absl::Status> errors(pool_.size());
  pool_.ParallelFor(n, [&](int thread, int64_t n0, int64_t n1) {
    for (int64_t t0 = 0; t0 < t_rows; t0 += kTileRows) {
      const int64_t t1 = std::min(t_rows, t0 + kTileRows);
      for (int64_t j = n0; j < n1; ++j) {
        const uint8_t* wr = w.row(j);
        if (dt == DType::kF32) {
          const auto* wf = reinterpret_cast<const float*>(wr);
          for (int64_t t = t0; t < t1; ++t) o[t * n + j] = cpu::DotF32(wf, x.f32() + t * k, k);
        } else if (dt == DType::kF16) {
          const auto* wh = reinterpret_cast<const uint16_t*>(wr);
          for (int64_t t = t0; t < t1; ++t) o[t * n + j] = cpu::DotF16(wh, x.f32() + t * k, k);
        } else if (dt == DType::kBF16) {
          const auto* wh = reinterpret_cast<const uint16_t*>(wr);
          for (int64_t t = t0; t < t1; ++t) o[t * n + j] = cpu::DotBF16(wh, x.f32() + t * k, k);
        } else {
          // K-quants: expand the row once per tile, then dot it with every activation row.
          float* buf = scratch[thread].data();
          if (absl::Status s = DequantizeRow(dt, wr, k, buf); !s.ok()) {
            errors[thread] = s;
            return;
          }
          for (int64_t t = t0; t < t1; ++t) o[t * n + j] = cpu::DotF32(buf, x.f32() + t * k, k);
        }
      }
    }
  });
  for (const absl::Status& s : errors) RETURN_IF_ERROR(s);
  return absl::OkStatus();
}

absl::Status CpuBackend::Attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                   absl::Span<const SequenceSlice> seqs, const AttentionParams& p,
                                   KvPool& pool, Tensor& out) {
  ASSIGN_OR_RETURN(const CpuTensor* qc, AsActivation(q, "Attention q"));
  ASSIGN_OR_RETURN(const CpuTensor* kc, AsActivation(k, "Attention k"));
  ASSIGN_OR_RETURN(const CpuTensor* vc, AsActivation(v, "Attention v"));
  ASSIGN_OR_RETURN(CpuTensor * oc, AsActivation(out, "Attention output"));
  auto* kv = dynamic_cast<CpuKvPool*>(&pool);
  if (kv == nullptr) return absl::InvalidArgumentError("Attention: not a CPU KV pool");
  RETURN_IF_ERROR(CheckAttentionArgs(*qc, *kc, *vc, *oc, p, kv->head_dim()));
  const int hd = p.head_dim;
  const int64_t q_cols = int64_t{p.n_heads} * hd;
  const int64_t kv_cols = int64_t{p.n_kv_heads} * hd;
  const int64_t rows = qc->rows();
  const int64_t bs = kv->block_size();
  const int32_t num_blocks = kv->num_blocks();
  // Physical block of position `pos` of one head's table, or -1 if the table has none.
  const auto block_of = [&](absl::Span<const int32_t> table, int64_t pos) -> int32_t {
    const int64_t b = pos / bs;
    if (b >= static_cast<int64_t>(table.size())) return -1;
    const int32_t id = table[b];
    return id < num_blocks ? id : -1;
  };

  // Validate every slice, and every block the new rows go to, before writing anything.
  struct Slice {
    int64_t past;
    int64_t first_row;
    absl::Span<const absl::Span<const int32_t>> tables;
  };
  std::vector<Slice> slices;
  std::vector<int64_t> row_slice(rows);             // row -> index into slices
  std::vector<std::pair<int32_t, size_t>> written;  // (block, slice)
  int64_t total = 0;
  for (const SequenceSlice& s : seqs) {
    const size_t index = slices.size();
    if (s.past < 0 || s.n_new < 0 || s.past > std::numeric_limits<int32_t>::max() * bs) {
      return absl::OutOfRangeError(
          absl::StrCat("Attention: sequence ", index, ": positions ", s.past, " + ", s.n_new));
    }
    if (static_cast<int>(s.block_tables.size()) != p.n_kv_heads) {
      return absl::InvalidArgumentError(absl::StrCat("Attention: sequence ", index, ": ",
                                                     s.block_tables.size(), " block tables for ",
                                                     p.n_kv_heads, " kv heads"));
    }
    if (absl::Status v = CheckTableVersions(s, index, p.n_kv_heads); !v.ok()) return v;
    if (s.n_new > rows - total) {
      return absl::InvalidArgumentError(
          absl::StrCat("Attention: slices hold more rows than the ", rows, " of q"));
    }
    for (int h = 0; h < p.n_kv_heads; ++h) {
      for (int64_t pos = s.past; pos < s.past + s.n_new; pos += bs - pos % bs) {
        const int32_t id = block_of(s.block_tables[h], pos);
        if (id < 0) {
          return absl::InternalError(absl::StrCat("Attention: layer ", p.layer, " sequence ", index,
                                                  " kv head ", h, ": no KV block for new ",
                                                  "position ", pos));
        }
        written.emplace_back(id, index);
      }
    }
    for (int64_t i = 0; i < s.n_new; ++i) row_slice[total + i] = index;
    slices.push_back({s.past, total, s.block_tables});
    total += s.n_new;
  }
  if (total != rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("Attention: slices hold ", total, " rows, q has ", rows));
  }
  std::sort(written.begin(), written.end());
  for (size_t i = 1; i < written.size(); ++i) {
    if (written[i].first == written[i - 1].first && written[i].second != written[i - 1].second) {
      return absl::InternalError(absl::StrCat("Attention: layer ", p.layer, ": KV block ",
                                              written[i].first, " is written by two sequences"));
    }
  }

  // Store the new keys and values first: each new row attends to the earlier new rows.
  const int64_t voff = kv->value_offset();
  for (int64_t r = 0; r < rows; ++r) {
    const Slice& s = slices[row_slice[r]];
    const int64_t pos = s.past + (r - s.first_row);
    for (int h = 0; h < p.n_kv_heads; ++h) {
      float* key = kv->Key(block_of(s.tables[h], pos), pos % bs);
      std::memcpy(key, kc->f32() + r * kv_cols + h * hd, hd * sizeof(float));
      std::memcpy(key + voff, vc->f32() + r * kv_cols + h * hd, hd * sizeof(float));
    }
  }

  const int group = p.n_heads / p.n_kv_heads;
  const int64_t row_bytes = int64_t{hd} * static_cast<int64_t>(sizeof(float));
  // A visible key whose block is missing: the first one each thread meets.
  std::vector<absl::Status> errors(pool_.size());
  // Work item = (row, kv head); later rows see more keys, hence the dynamic schedule.
  pool_.ParallelForGrain(rows * p.n_kv_heads, 4, [&](int thread, int64_t begin, int64_t end) {
    thread_local std::vector<float> scores;
    thread_local std::vector<const float*> keys;  // key row of each visible key, in order
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / p.n_kv_heads;
      const int h = static_cast<int>(item % p.n_kv_heads);
      const Slice& s = slices[row_slice[r]];
      const int64_t pos = s.past + (r - s.first_row);
      VisibleKeys vis{0, 0};
      if (!p.rules.empty()) vis = VisibleKeysAt(p.rules[h], p.span, pos);
      // Visible keys: [0, sink_end) then [win_begin, pos]; the ranges may overlap.
      const int64_t sink_end = vis.sink_end;
      const int64_t win_begin = std::max(vis.window_begin, sink_end);
      const int64_t n_keys = sink_end + (pos + 1 - win_begin);
      keys.resize(n_keys);
      bool missing = false;
      int64_t idx = 0;
      for (const auto& [from, to] :
           {std::pair{int64_t{0}, sink_end}, std::pair{win_begin, pos + 1}}) {
        for (int64_t kp = from; kp < to && !missing;) {
          const int32_t id = block_of(s.tables[h], kp);
          if (id < 0) {
            missing = true;
            if (errors[thread].ok()) {
              errors[thread] = absl::InternalError(absl::StrCat(
                  "Attention: layer ", p.layer, " sequence ", row_slice[r], " kv head ", h,
                  ": no KV block for visible key ", kp, " of the query at ", pos));
            }
            break;
          }
          const int64_t block_end = std::min(to, (kp / bs + 1) * bs);
          const float* key = kv->Key(id, kp % bs);
          for (; kp < block_end; ++kp, key += hd) keys[idx++] = key;
        }
      }
      float* orow = oc->f32() + r * q_cols + int64_t{h} * group * hd;
      if (missing) {
        std::fill_n(orow, group * hd, 0.0f);
        continue;
      }
      scores.resize(group * n_keys);
      float* const sc_all = scores.data();
      const float* const* const kptr = keys.data();
      const float* qrow = qc->f32() + r * q_cols + int64_t{h} * group * hd;
      for (int64_t i = 0; i < n_keys; ++i) {
        // Rows of consecutive keys are contiguous only within a block: fetch a few rows ahead so
        // that block boundaries do not stall the stream.
        if (i + kPrefetchRows < n_keys) Prefetch(kptr[i + kPrefetchRows], row_bytes);
        for (int g = 0; g < group; ++g) {
          sc_all[g * n_keys + i] = cpu::DotF32(kptr[i], qrow + g * hd, hd) * p.scale;
        }
      }
      std::fill_n(orow, group * hd, 0.0f);
      std::vector<float> inv_sum(group);
      for (int g = 0; g < group; ++g) {
        float* sc = sc_all + g * n_keys;
        const float mx = *std::max_element(sc, sc + n_keys);
        float sum = 0.0f;
        for (int64_t i = 0; i < n_keys; ++i) {
          sc[i] = std::exp(sc[i] - mx);
          sum += sc[i];
        }
        inv_sum[g] = 1.0f / sum;
      }
      for (int64_t i = 0; i < n_keys; ++i) {
        if (i + kPrefetchRows < n_keys) Prefetch(kptr[i + kPrefetchRows] + voff, row_bytes);
        const float* val = kptr[i] + voff;
        for (int g = 0; g < group; ++g) {
          const float w = sc_all[g * n_keys + i];
          float* o = orow + g * hd;
          for (int j = 0; j < hd; ++j) o[j] += w * val[j];
        }
      }
      for (int g = 0; g < group; ++g) {
        for (int j = 0; j < hd; ++j) orow[g * hd + j] *= inv_sum[g];
      }
    }
  });
  for (const absl::Status& e : errors) RETURN_IF_ERROR(e);
  return absl::OkStatus();
}

}  // namespace

std::unique_ptr<Backend> NewCpuBackend(int n_threads) {
  if (n_threads <= 0) n_threads = static_cast<int>(std::thread::hardware_concurrency());
  return std::make_unique<CpuBackend>(n_threads);
}

}  // namespace moa
