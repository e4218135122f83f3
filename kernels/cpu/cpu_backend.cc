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
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "kernels/backend.h"
#include "kernels/cpu/dot.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/quant.h"

namespace moa {
namespace {

// Refuses single allocations larger than this (a corrupt shape must not exhaust memory).
constexpr int64_t kMaxAllocBytes = int64_t{1} << 40;

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

class CpuKvCache : public KvCache {
 public:
  CpuKvCache(const KvCacheShape& shape, std::unique_ptr<float[]> data)
      : shape_(shape), data_(std::move(data)) {}
  int64_t capacity() const override { return shape_.capacity; }
  const KvCacheShape& shape() const { return shape_; }

  // Keys (which = 0) or values (1) of one (layer, kv head): [capacity, head_dim].
  float* Plane(int layer, int kv_head, int which) {
    const int64_t plane = shape_.capacity * shape_.head_dim;
    return data_.get() + ((int64_t{layer} * shape_.n_kv_heads + kv_head) * 2 + which) * plane;
  }

 private:
  KvCacheShape shape_;
  std::unique_ptr<float[]> data_;
};

absl::StatusOr<const CpuTensor*> AsCpu(const Tensor& t, absl::string_view what) {
  const auto* c = dynamic_cast<const CpuTensor*>(&t);
  if (c == nullptr) return absl::InvalidArgumentError(absl::StrCat(what, ": not a CPU tensor"));
  return c;
}

absl::StatusOr<const CpuTensor*> AsActivation(const Tensor& t, absl::string_view what) {
  const auto* c = dynamic_cast<const CpuTensor*>(&t);
  if (c == nullptr || !c->is_activation()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": not a CPU activation"));
  }
  return c;
}

absl::StatusOr<CpuTensor*> AsActivation(Tensor& t, absl::string_view what) {
  auto* c = dynamic_cast<CpuTensor*>(&t);
  if (c == nullptr || !c->is_activation()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": not a CPU activation"));
  }
  return c;
}

absl::Status CheckShape(const Tensor& t, int64_t rows, int64_t cols, absl::string_view what) {
  if (t.rows() != rows || t.cols() != cols) {
    return absl::InvalidArgumentError(absl::StrCat(what, " is [", t.rows(), ", ", t.cols(),
                                                   "], expected [", rows, ", ", cols, "]"));
  }
  return absl::OkStatus();
}

#define MOA_ASSIGN_OR_RETURN_IMPL(var, expr, tmp) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  var = *std::move(tmp)
#define MOA_CONCAT_INNER(a, b) a##b
#define MOA_CONCAT(a, b) MOA_CONCAT_INNER(a, b)
#define ASSIGN_OR_RETURN(var, expr) \
  MOA_ASSIGN_OR_RETURN_IMPL(var, expr, MOA_CONCAT(status_or_, __LINE__))
#define RETURN_IF_ERROR(expr)                 \
  do {                                        \
    if (absl::Status s_ = (expr); !s_.ok()) { \
      return s_;                              \
    }                                         \
  } while (0)

class CpuBackend : public Backend {
 public:
  explicit CpuBackend(int n_threads) : pool_(n_threads) {}

  std::string_view name() const override { return "cpu"; }

  absl::StatusOr<std::unique_ptr<Tensor>> LoadWeight(const HostTensor& t) override {
    if (t.shape.empty() || t.shape.size() > 4) {
      return absl::InvalidArgumentError(
          absl::StrCat("weight ", t.name, ": rank ", t.shape.size(), " is not 1..4"));
    }
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < t.shape.size(); ++i) {
      if (t.shape[i] <= 0 || rows > std::numeric_limits<int64_t>::max() / t.shape[i]) {
        return absl::InvalidArgumentError(absl::StrCat("weight ", t.name, ": bad shape"));
      }
      rows *= t.shape[i];
    }
    const int64_t cols = t.shape.back();
    if (cols <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("weight ", t.name, ": ", cols, " columns"));
    }
    auto row_bytes = RowBytes(t.dtype, cols);
    if (!row_bytes.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("weight ", t.name, ": ", row_bytes.status().message()));
    }
    if (*row_bytes > 0 && rows > t.nbytes / *row_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "weight ", t.name, ": ", t.nbytes, " bytes cannot hold ", rows, " rows of ", *row_bytes));
    }
    if (t.data == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("weight ", t.name, ": no data"));
    }
    std::shared_ptr<const void> owner = t.owner;
    const uint8_t* data = t.data;
    if (owner == nullptr) {  // nothing keeps the bytes alive: take a copy
      const int64_t n = rows * *row_bytes;
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
    return CpuTensor::Weight(rows, cols, t.dtype, *row_bytes, data, std::move(owner));
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

  absl::StatusOr<std::unique_ptr<KvCache>> NewKvCache(const KvCacheShape& s) override {
    if (s.n_layers <= 0 || s.n_kv_heads <= 0 || s.head_dim <= 0 || s.capacity <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("KV cache shape: ", s.n_layers, " layers, ",
                                                     s.n_kv_heads, " kv heads, head_dim ",
                                                     s.head_dim, ", capacity ", s.capacity));
    }
    const int64_t per_token = int64_t{s.n_layers} * s.n_kv_heads * s.head_dim * 2;
    if (s.capacity > kMaxAllocBytes / static_cast<int64_t>(sizeof(float)) / per_token) {
      return absl::ResourceExhaustedError(
          absl::StrCat("KV cache of ", s.capacity, " tokens is too large"));
    }
    // Not zeroed: only positions that were written are ever read, and untouched pages of a
    // large cache then cost no memory.
    ASSIGN_OR_RETURN(auto data, AllocFloats(per_token * s.capacity, "KV cache"));
    return std::make_unique<CpuKvCache>(s, std::move(data));
  }

  absl::Status Attention(const Tensor& q, const Tensor& k, const Tensor& v,
                         absl::Span<const SequenceSlice> seqs, const AttentionParams& p,
                         Tensor& out) override;

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
                                   Tensor& out) {
  ASSIGN_OR_RETURN(const CpuTensor* qc, AsActivation(q, "Attention q"));
  ASSIGN_OR_RETURN(const CpuTensor* kc, AsActivation(k, "Attention k"));
  ASSIGN_OR_RETURN(const CpuTensor* vc, AsActivation(v, "Attention v"));
  ASSIGN_OR_RETURN(CpuTensor * oc, AsActivation(out, "Attention output"));
  if (p.n_heads <= 0 || p.n_kv_heads <= 0 || p.head_dim <= 0 || p.n_heads % p.n_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Attention: ", p.n_heads, " heads, ", p.n_kv_heads, " kv heads, head_dim ", p.head_dim));
  }
  if (!p.rules.empty() && static_cast<int>(p.rules.size()) != p.n_kv_heads) {
    return absl::InvalidArgumentError(
        absl::StrCat("Attention: ", p.rules.size(), " span rules for ", p.n_kv_heads, " kv heads"));
  }
  if (p.span.sink < 0 || p.span.block <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Attention: span sink ", p.span.sink, ", block ", p.span.block));
  }
  const int hd = p.head_dim;
  const int64_t q_cols = int64_t{p.n_heads} * hd;
  const int64_t kv_cols = int64_t{p.n_kv_heads} * hd;
  const int64_t rows = qc->rows();
  RETURN_IF_ERROR(CheckShape(*kc, rows, kv_cols, "Attention k"));
  RETURN_IF_ERROR(CheckShape(*vc, rows, kv_cols, "Attention v"));
  RETURN_IF_ERROR(CheckShape(*qc, rows, q_cols, "Attention q"));
  RETURN_IF_ERROR(CheckShape(*oc, rows, q_cols, "Attention output"));

  // Validate every slice before writing anything.
  struct Slice {
    CpuKvCache* cache;
    int64_t past;
    int64_t first_row;
  };
  std::vector<Slice> slices;
  std::vector<int64_t> row_slice(rows);  // row -> index into slices
  int64_t total = 0;
  for (const SequenceSlice& s : seqs) {
    auto* cache = dynamic_cast<CpuKvCache*>(s.cache);
    if (cache == nullptr) return absl::InvalidArgumentError("Attention: not a CPU KV cache");
    const KvCacheShape& cs = cache->shape();
    if (cs.n_kv_heads != p.n_kv_heads || cs.head_dim != hd || p.layer < 0 ||
        p.layer >= cs.n_layers) {
      return absl::InvalidArgumentError(absl::StrCat(
          "Attention: KV cache of ", cs.n_layers, " layers x ", cs.n_kv_heads, " x ", cs.head_dim,
          " does not fit layer ", p.layer, " with ", p.n_kv_heads, " x ", hd));
    }
    if (s.past < 0 || s.n_new < 0 || s.past > cs.capacity - s.n_new) {
      return absl::OutOfRangeError(absl::StrCat("Attention: positions ", s.past, " + ", s.n_new,
                                                " exceed the KV cache capacity ", cs.capacity));
    }
    for (const Slice& other : slices) {
      if (other.cache == cache) {
        return absl::InvalidArgumentError("Attention: one KV cache in two slices of a batch");
      }
    }
    if (s.n_new > rows - total) {
      return absl::InvalidArgumentError(
          absl::StrCat("Attention: slices hold more rows than the ", rows, " of q"));
    }
    for (int64_t i = 0; i < s.n_new; ++i) row_slice[total + i] = slices.size();
    slices.push_back({cache, s.past, total});
    total += s.n_new;
  }
  if (total != rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("Attention: slices hold ", total, " rows, q has ", rows));
  }

  // Store the new keys and values first: each new row attends to the earlier new rows.
  for (int64_t r = 0; r < rows; ++r) {
    const Slice& s = slices[row_slice[r]];
    const int64_t pos = s.past + (r - s.first_row);
    for (int h = 0; h < p.n_kv_heads; ++h) {
      std::memcpy(s.cache->Plane(p.layer, h, 0) + pos * hd, kc->f32() + r * kv_cols + h * hd,
                  hd * sizeof(float));
      std::memcpy(s.cache->Plane(p.layer, h, 1) + pos * hd, vc->f32() + r * kv_cols + h * hd,
                  hd * sizeof(float));
    }
  }

  const int group = p.n_heads / p.n_kv_heads;
  // Work item = (row, kv head); later rows see more keys, hence the dynamic schedule.
  pool_.ParallelForGrain(rows * p.n_kv_heads, 4, [&](int, int64_t begin, int64_t end) {
    thread_local std::vector<float> scores;
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
      const auto key_at = [&](int64_t idx) {
        return idx < sink_end ? idx : win_begin + idx - sink_end;
      };
      scores.resize(group * n_keys);
      const float* kp = s.cache->Plane(p.layer, h, 0);
      const float* vp = s.cache->Plane(p.layer, h, 1);
      const float* qrow = qc->f32() + r * q_cols + int64_t{h} * group * hd;
      for (int64_t idx = 0; idx < n_keys; ++idx) {
        const float* key = kp + key_at(idx) * hd;
        for (int g = 0; g < group; ++g) {
          scores[g * n_keys + idx] = cpu::DotF32(key, qrow + g * hd, hd) * p.scale;
        }
      }
      float* orow = oc->f32() + r * q_cols + int64_t{h} * group * hd;
      std::fill_n(orow, group * hd, 0.0f);
      std::vector<float> inv_sum(group);
      for (int g = 0; g < group; ++g) {
        float* sc = scores.data() + g * n_keys;
        const float mx = *std::max_element(sc, sc + n_keys);
        float sum = 0.0f;
        for (int64_t idx = 0; idx < n_keys; ++idx) {
          sc[idx] = std::exp(sc[idx] - mx);
          sum += sc[idx];
        }
        inv_sum[g] = 1.0f / sum;
      }
      for (int64_t idx = 0; idx < n_keys; ++idx) {
        const float* val = vp + key_at(idx) * hd;
        for (int g = 0; g < group; ++g) {
          const float w = scores[g * n_keys + idx];
          float* o = orow + g * hd;
          for (int i = 0; i < hd; ++i) o[i] += w * val[i];
        }
      }
      for (int g = 0; g < group; ++g) {
        for (int i = 0; i < hd; ++i) orow[g * hd + i] *= inv_sum[g];
      }
    }
  });
  return absl::OkStatus();
}

}  // namespace

std::unique_ptr<Backend> NewCpuBackend(int n_threads) {
  if (n_threads <= 0) n_threads = static_cast<int>(std::thread::hardware_concurrency());
  return std::make_unique<CpuBackend>(n_threads);
}

}  // namespace moa
