// The CUDA backend (see cuda_backend.h). Every check on shapes and block tables is the CPU
// backend's (kernels/cpu/cpu_backend.cc), with the same messages, so that the engine sees the same
// errors on either backend. Work is queued on one stream; CopyToHost waits for it.
#include "kernels/cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "kernels/backend_checks.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/dequantize.h"
#include "kernels/quant.h"
#include "kernels/status_macros.h"

namespace moa {
namespace {

// Refuses single allocations larger than this (a corrupt shape must not exhaust memory).
constexpr int64_t kMaxAllocBytes = int64_t{1} << 40;

absl::Status CudaError(cudaError_t e, absl::string_view what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat("CUDA: ", what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
}

absl::Status CublasError(cublasStatus_t e, absl::string_view what) {
  if (e == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("cuBLAS: ", what, ": ", cublasGetStatusName(e), " (",
                                          cublasGetStatusString(e), ")"));
}

// Device memory owned by one object.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { Free(); }

  static absl::StatusOr<std::unique_ptr<DeviceBuffer>> Create(int64_t bytes,
                                                              absl::string_view what) {
    auto b = std::make_unique<DeviceBuffer>();
    RETURN_IF_ERROR(b->Allocate(bytes, what));
    return b;
  }
  absl::Status Allocate(int64_t bytes, absl::string_view what) {
    Free();
    if (bytes < 0 || bytes > kMaxAllocBytes) {
      return absl::ResourceExhaustedError(absl::StrCat(what, ": ", bytes, " bytes is too large"));
    }
    RETURN_IF_ERROR(CudaError(cudaMalloc(&ptr_, std::max<int64_t>(bytes, 1)),
                              absl::StrCat(what, ": cudaMalloc of ", bytes, " bytes")));
    bytes_ = bytes;
    return absl::OkStatus();
  }
  void* get() const { return ptr_; }
  int64_t bytes() const { return bytes_; }

 private:
  void Free() {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* ptr_ = nullptr;
  int64_t bytes_ = 0;
};

// A weight: fp16 [rows, cols], or fp32 for one-row weights (norm scales keep full precision);
// or an fp32 activation.
class CudaTensor : public Tensor {
 public:
  enum class Kind { kHalfWeight, kFloatWeight, kActivation };
  CudaTensor(int64_t rows, int64_t cols, Kind kind, std::unique_ptr<DeviceBuffer> buf)
      : rows_(rows), cols_(cols), kind_(kind), buf_(std::move(buf)) {}
  int64_t rows() const override { return rows_; }
  int64_t cols() const override { return cols_; }
  Kind kind() const { return kind_; }
  bool is_activation() const { return kind_ == Kind::kActivation; }
  bool is_half() const { return kind_ == Kind::kHalfWeight; }
  void* data() const { return buf_->get(); }
  float* f32() const { return static_cast<float*>(buf_->get()); }

 private:
  int64_t rows_;
  int64_t cols_;
  Kind kind_;
  std::unique_ptr<DeviceBuffer> buf_;
};

// The CPU backend's layout: all key blocks, then all value blocks.
class CudaKvPool : public KvPool {
 public:
  CudaKvPool(int32_t num_blocks, int32_t block_size, int head_dim,
             std::unique_ptr<DeviceBuffer> data)
      : num_blocks_(num_blocks),
        block_size_(block_size),
        head_dim_(head_dim),
        data_(std::move(data)) {}
  int32_t num_blocks() const override { return num_blocks_; }
  int32_t block_size() const override { return block_size_; }
  int head_dim() const override { return head_dim_; }
  cuda::DevicePool device() const {
    return {static_cast<float*>(data_->get()), num_blocks_, block_size_, head_dim_};
  }

 private:
  int32_t num_blocks_;
  int32_t block_size_;
  int head_dim_;
  std::unique_ptr<DeviceBuffer> data_;
};

absl::StatusOr<const CudaTensor*> AsCuda(const Tensor& t, absl::string_view what) {
  const auto* c = dynamic_cast<const CudaTensor*>(&t);
  if (c == nullptr) return absl::InvalidArgumentError(absl::StrCat(what, ": not a CUDA tensor"));
  return c;
}

absl::StatusOr<const CudaTensor*> AsActivation(const Tensor& t, absl::string_view what) {
  const auto* c = dynamic_cast<const CudaTensor*>(&t);
  if (c == nullptr || !c->is_activation()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": not a CUDA activation"));
  }
  return c;
}

absl::StatusOr<CudaTensor*> AsActivation(Tensor& t, absl::string_view what) {
  auto* c = dynamic_cast<CudaTensor*>(&t);
  if (c == nullptr || !c->is_activation()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": not a CUDA activation"));
  }
  return c;
}

// Per-call host data (positions, block tables ...) copied to a reused device buffer.
class UploadBuffer {
 public:
  // Copies `in` to the device on `stream` and returns its device address. The buffer grows as
  // needed (after the stream has drained, as queued kernels may still read the old one).
  template <typename T>
  absl::StatusOr<const T*> Upload(absl::Span<const T> in, cudaStream_t stream,
                                  absl::string_view what) {
    const int64_t bytes = static_cast<int64_t>(in.size() * sizeof(T));
    if (bytes > buf_.bytes()) {
      RETURN_IF_ERROR(CudaError(cudaStreamSynchronize(stream), what));
      RETURN_IF_ERROR(buf_.Allocate(std::max<int64_t>(bytes, 2 * buf_.bytes()), what));
    }
    if (bytes > 0) {
      RETURN_IF_ERROR(CudaError(
          cudaMemcpyAsync(buf_.get(), in.data(), bytes, cudaMemcpyHostToDevice, stream), what));
    }
    return static_cast<const T*>(buf_.get());
  }

 private:
  DeviceBuffer buf_;
};

class CudaBackend : public Backend {
 public:
  CudaBackend(cudaStream_t stream, cublasHandle_t cublas) : stream_(stream), cublas_(cublas) {}
  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    cublasDestroy(cublas_);
    cudaStreamDestroy(stream_);
  }

  std::string_view name() const override { return "cuda"; }

  absl::StatusOr<std::unique_ptr<Tensor>> LoadWeight(const HostTensor& t) override;
  absl::StatusOr<std::unique_ptr<Tensor>> NewActivation(int64_t rows, int64_t cols) override {
    if (rows < 0 || cols <= 0 || rows > std::numeric_limits<int64_t>::max() / cols) {
      return absl::InvalidArgumentError(absl::StrCat("activation [", rows, ", ", cols, "]"));
    }
    if (rows * cols > kMaxAllocBytes / static_cast<int64_t>(sizeof(float))) {
      return absl::ResourceExhaustedError(
          absl::StrCat("activation: ", rows * cols, " floats is too large"));
    }
    ASSIGN_OR_RETURN(auto buf, DeviceBuffer::Create(rows * cols * 4, "activation"));
    return std::make_unique<CudaTensor>(rows, cols, CudaTensor::Kind::kActivation, std::move(buf));
  }
  absl::Status CopyToHost(const Tensor& t, absl::Span<float> out) override;
  absl::Status CopyFromHost(absl::Span<const float> in, Tensor& t) override;
  absl::Status Embed(const Tensor& table, absl::Span<const int32_t> tokens, Tensor& out) override;
  absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) override;
  absl::Status MatMul(const Tensor& x, const Tensor& w, Tensor& out) override;
  absl::Status Rope(Tensor& x, int n_heads, int head_dim, absl::Span<const float> inv_freq,
                    absl::Span<const int32_t> positions, RopeLayout layout) override;
  absl::Status SwiGlu(const Tensor& gate, const Tensor& up, Tensor& out) override;
  absl::Status Add(Tensor& x, const Tensor& y) override;
  absl::StatusOr<std::unique_ptr<KvPool>> NewKvPool(int32_t num_blocks, int32_t block_size,
                                                    int head_dim) override;
  int64_t KvBlockBytes(int32_t block_size, int head_dim) const override {
    return int64_t{block_size} * head_dim * 2 * static_cast<int64_t>(sizeof(float));
  }
  absl::Status Attention(const Tensor& q, const Tensor& k, const Tensor& v,
                         absl::Span<const SequenceSlice> seqs, const AttentionParams& p,
                         KvPool& pool, Tensor& out) override;

 private:
  cudaStream_t stream_;
  cublasHandle_t cublas_;
  DeviceBuffer half_x_;  // MatMul's input converted to fp16
  // Per-call metadata: Rope's frequencies and positions, Embed's tokens, Attention's tables.
  UploadBuffer up_a_, up_b_, up_c_, up_d_, up_e_, up_f_, up_g_;
};

absl::StatusOr<std::unique_ptr<Tensor>> CudaBackend::LoadWeight(const HostTensor& t) {
  ASSIGN_OR_RETURN(const WeightLayout w, CheckWeight(t));
  const int64_t rows = w.rows;
  const int64_t cols = w.cols;
  const int64_t row_bytes = w.row_bytes;
  const std::string what = absl::StrCat("weight ", t.name);
  if (rows > kMaxAllocBytes / 2 / cols || rows * row_bytes > kMaxAllocBytes) {
    return absl::ResourceExhaustedError(absl::StrCat(what, " is too large"));
  }
  if (rows == 1) {
    // One row (a norm scale): decoded on the host, kept in fp32.
    std::vector<float> host(cols);
    RETURN_IF_ERROR(DequantizeRow(t.dtype, t.data, cols, host.data()));
    ASSIGN_OR_RETURN(auto buf, DeviceBuffer::Create(cols * 4, what));
    // On the backend's stream (a non-blocking stream does not wait for plain cudaMemcpy).
    RETURN_IF_ERROR(CudaError(
        cudaMemcpyAsync(buf->get(), host.data(), cols * 4, cudaMemcpyHostToDevice, stream_), what));
    RETURN_IF_ERROR(CudaError(cudaStreamSynchronize(stream_), what));
    return std::make_unique<CudaTensor>(rows, cols, CudaTensor::Kind::kFloatWeight, std::move(buf));
  }
  // Stored bytes to the device, decoded there to fp16.
  const int64_t src_bytes = rows * row_bytes;
  ASSIGN_OR_RETURN(auto src, DeviceBuffer::Create(src_bytes, what));
  RETURN_IF_ERROR(CudaError(
      cudaMemcpyAsync(src->get(), t.data, src_bytes, cudaMemcpyHostToDevice, stream_), what));
  ASSIGN_OR_RETURN(auto buf, DeviceBuffer::Create(rows * cols * 2, what));
  RETURN_IF_ERROR(cuda::DequantizeToHalf(t.dtype, src->get(), rows * cols, buf->get(), stream_));
  // `src` is freed on return: wait until the decoder has read it.
  RETURN_IF_ERROR(CudaError(cudaStreamSynchronize(stream_), what));
  return std::make_unique<CudaTensor>(rows, cols, CudaTensor::Kind::kHalfWeight, std::move(buf));
}

absl::Status CudaBackend::CopyToHost(const Tensor& t, absl::Span<float> out) {
  ASSIGN_OR_RETURN(const CudaTensor* c, AsCuda(t, "CopyToHost"));
  const int64_t n = c->rows() * c->cols();
  if (static_cast<int64_t>(out.size()) != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("CopyToHost: ", out.size(), " floats for a tensor of ", n));
  }
  if (!c->is_half()) {
    RETURN_IF_ERROR(
        CudaError(cudaMemcpyAsync(out.data(), c->data(), n * 4, cudaMemcpyDeviceToHost, stream_),
                  "CopyToHost"));
    return CudaError(cudaStreamSynchronize(stream_), "CopyToHost");
  }
  std::vector<uint16_t> halves(n);
  RETURN_IF_ERROR(
      CudaError(cudaMemcpyAsync(halves.data(), c->data(), n * 2, cudaMemcpyDeviceToHost, stream_),
                "CopyToHost"));
  RETURN_IF_ERROR(CudaError(cudaStreamSynchronize(stream_), "CopyToHost"));
  for (int64_t i = 0; i < n; ++i) out[i] = Fp16ToF32(halves[i]);
  return absl::OkStatus();
}

absl::Status CudaBackend::CopyFromHost(absl::Span<const float> in, Tensor& t) {
  ASSIGN_OR_RETURN(CudaTensor * c, AsActivation(t, "CopyFromHost"));
  if (static_cast<int64_t>(in.size()) != c->rows() * c->cols()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "CopyFromHost: ", in.size(), " floats for a tensor of ", c->rows() * c->cols()));
  }
  // On the stream, after the kernels that may still read the tensor; a pageable source is staged
  // before the call returns, so the caller may free `in`.
  return CudaError(cudaMemcpyAsync(c->data(), in.data(), in.size() * sizeof(float),
                                   cudaMemcpyHostToDevice, stream_),
                   "CopyFromHost");
}

absl::Status CudaBackend::Embed(const Tensor& table, absl::Span<const int32_t> tokens,
                                Tensor& out) {
  ASSIGN_OR_RETURN(const CudaTensor* tab, AsCuda(table, "Embed table"));
  ASSIGN_OR_RETURN(CudaTensor * o, AsActivation(out, "Embed output"));
  RETURN_IF_ERROR(CheckShape(*o, static_cast<int64_t>(tokens.size()), tab->cols(), "Embed output"));
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= tab->rows()) {
      return absl::InvalidArgumentError(
          absl::StrCat("Embed: token id ", tokens[i], " outside [0, ", tab->rows(), ")"));
    }
  }
  if (tokens.empty()) return absl::OkStatus();
  if (!tab->is_half()) {  // a one-row table: every token is row 0
    for (size_t i = 0; i < tokens.size(); ++i) {
      RETURN_IF_ERROR(CudaError(cudaMemcpyAsync(o->f32() + i * tab->cols(), tab->data(),
                                                tab->cols() * 4, cudaMemcpyDeviceToDevice, stream_),
                                "Embed"));
    }
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(const int32_t* d_tokens, up_a_.Upload(tokens, stream_, "Embed tokens"));
  return CudaError(cuda::LaunchEmbed(tab->data(), tab->cols(), d_tokens,
                                     static_cast<int64_t>(tokens.size()), o->f32(), stream_),
                   "Embed");
}

absl::Status CudaBackend::RmsNorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) {
  ASSIGN_OR_RETURN(const CudaTensor* xc, AsActivation(x, "RmsNorm input"));
  ASSIGN_OR_RETURN(const CudaTensor* wc, AsCuda(weight, "RmsNorm weight"));
  ASSIGN_OR_RETURN(CudaTensor * o, AsActivation(out, "RmsNorm output"));
  const int64_t d = xc->cols();
  RETURN_IF_ERROR(CheckShape(*wc, 1, d, "RmsNorm weight"));
  RETURN_IF_ERROR(CheckShape(*o, xc->rows(), d, "RmsNorm output"));
  // A [1, d] weight is fp32: LoadWeight keeps one-row weights in fp32, or it is an activation.
  if (xc->rows() > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("RmsNorm: ", xc->rows(), " rows"));
  }
  return CudaError(cuda::LaunchRmsNorm(xc->f32(), wc->f32(), xc->rows(), d, eps, o->f32(), stream_),
                   "RmsNorm");
}

absl::Status CudaBackend::MatMul(const Tensor& x, const Tensor& w, Tensor& out) {
  ASSIGN_OR_RETURN(const CudaTensor* xc, AsActivation(x, "MatMul input"));
  ASSIGN_OR_RETURN(const CudaTensor* wc, AsCuda(w, "MatMul weight"));
  ASSIGN_OR_RETURN(CudaTensor * o, AsActivation(out, "MatMul output"));
  const int64_t t_rows = xc->rows();
  const int64_t k = xc->cols();
  const int64_t n = wc->rows();
  if (wc->cols() != k) {
    return absl::InvalidArgumentError(
        absl::StrCat("MatMul: input has ", k, " columns, weight ", wc->cols()));
  }
  RETURN_IF_ERROR(CheckShape(*o, t_rows, n, "MatMul output"));
  if (o == xc) return absl::InvalidArgumentError("MatMul: output aliases the input");
  constexpr int64_t kMaxDim = std::numeric_limits<int>::max();
  if (t_rows > kMaxDim || k > kMaxDim || n > kMaxDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("MatMul: [", t_rows, ", ", k, "] x [", n, ", ", k, "] is too large"));
  }
  if (t_rows == 0) return absl::OkStatus();
  // Column-major view: outᵀ [n, rows] = W [k, n]ᵀ · xᵀ [k, rows], fp32 accumulation.
  const void* b = xc->data();
  cudaDataType_t ab_type = CUDA_R_32F;
  if (wc->is_half()) {
    const int64_t bytes = t_rows * k * 2;
    if (bytes > half_x_.bytes()) {
      RETURN_IF_ERROR(CudaError(cudaStreamSynchronize(stream_), "MatMul"));
      RETURN_IF_ERROR(half_x_.Allocate(std::max(bytes, 2 * half_x_.bytes()), "MatMul scratch"));
    }
    RETURN_IF_ERROR(
        CudaError(cuda::LaunchFloatToHalf(xc->f32(), t_rows * k, half_x_.get(), stream_),
                  "MatMul input to fp16"));
    b = half_x_.get();
    ab_type = CUDA_R_16F;
  }
  const float alpha = 1.0f, beta = 0.0f;
  return CublasError(
      cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(t_rows),
                   static_cast<int>(k), &alpha, wc->data(), ab_type, static_cast<int>(k), b,
                   ab_type, static_cast<int>(k), &beta, o->data(), CUDA_R_32F, static_cast<int>(n),
                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      absl::StrCat("MatMul [", t_rows, ", ", k, "] x [", n, ", ", k, "]"));
}

absl::Status CudaBackend::Rope(Tensor& x, int n_heads, int head_dim,
                               absl::Span<const float> inv_freq,
                               absl::Span<const int32_t> positions, RopeLayout layout) {
  ASSIGN_OR_RETURN(CudaTensor * xc, AsActivation(x, "Rope input"));
  if (n_heads <= 0 || head_dim <= 0 || head_dim % 2 != 0 ||
      xc->cols() != int64_t{n_heads} * head_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("Rope: ", n_heads, " heads of ", head_dim, " on ", xc->cols(), " columns"));
  }
  const int half = head_dim / 2;
  if (static_cast<int>(inv_freq.size()) != half ||
      static_cast<int64_t>(positions.size()) != xc->rows()) {
    return absl::InvalidArgumentError(absl::StrCat("Rope: ", inv_freq.size(), " frequencies and ",
                                                   positions.size(), " positions for ", xc->rows(),
                                                   " rows"));
  }
  if (positions.empty()) return absl::OkStatus();
  const int step = layout == RopeLayout::kHalfSplit ? 1 : 2;
  const int partner = layout == RopeLayout::kHalfSplit ? half : 1;
  ASSIGN_OR_RETURN(const float* d_freq, up_a_.Upload(inv_freq, stream_, "Rope frequencies"));
  ASSIGN_OR_RETURN(const int32_t* d_pos, up_b_.Upload(positions, stream_, "Rope positions"));
  return CudaError(cuda::LaunchRope(xc->f32(), xc->rows(), n_heads, head_dim, d_freq, d_pos, step,
                                    partner, stream_),
                   "Rope");
}

absl::Status CudaBackend::SwiGlu(const Tensor& gate, const Tensor& up, Tensor& out) {
  ASSIGN_OR_RETURN(const CudaTensor* g, AsActivation(gate, "SwiGlu gate"));
  ASSIGN_OR_RETURN(const CudaTensor* u, AsActivation(up, "SwiGlu up"));
  ASSIGN_OR_RETURN(CudaTensor * o, AsActivation(out, "SwiGlu output"));
  RETURN_IF_ERROR(CheckShape(*u, g->rows(), g->cols(), "SwiGlu up"));
  RETURN_IF_ERROR(CheckShape(*o, g->rows(), g->cols(), "SwiGlu output"));
  return CudaError(cuda::LaunchSwiGlu(g->f32(), u->f32(), g->rows() * g->cols(), o->f32(), stream_),
                   "SwiGlu");
}

absl::Status CudaBackend::Add(Tensor& x, const Tensor& y) {
  ASSIGN_OR_RETURN(CudaTensor * xc, AsActivation(x, "Add x"));
  ASSIGN_OR_RETURN(const CudaTensor* yc, AsActivation(y, "Add y"));
  RETURN_IF_ERROR(CheckShape(*yc, xc->rows(), xc->cols(), "Add y"));
  return CudaError(cuda::LaunchAdd(xc->f32(), yc->f32(), xc->rows() * xc->cols(), stream_), "Add");
}

absl::StatusOr<std::unique_ptr<KvPool>> CudaBackend::NewKvPool(int32_t num_blocks,
                                                               int32_t block_size, int head_dim) {
  if (num_blocks <= 0 || block_size <= 0 || head_dim <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV pool: ", num_blocks, " blocks of ", block_size, " x ", head_dim));
  }
  const int64_t per_block = int64_t{block_size} * head_dim * 2;
  if (num_blocks > kMaxAllocBytes / static_cast<int64_t>(sizeof(float)) / per_block) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV pool of ", num_blocks, " blocks of ", per_block, " floats is too large"));
  }
  // Not zeroed: only positions that were written are ever read.
  ASSIGN_OR_RETURN(auto data, DeviceBuffer::Create(per_block * num_blocks * 4, "KV pool"));
  return std::make_unique<CudaKvPool>(num_blocks, block_size, head_dim, std::move(data));
}

absl::Status CudaBackend::Attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                    absl::Span<const SequenceSlice> seqs, const AttentionParams& p,
                                    KvPool& pool, Tensor& out) {
  ASSIGN_OR_RETURN(const CudaTensor* qc, AsActivation(q, "Attention q"));
  ASSIGN_OR_RETURN(const CudaTensor* kc, AsActivation(k, "Attention k"));
  ASSIGN_OR_RETURN(const CudaTensor* vc, AsActivation(v, "Attention v"));
  ASSIGN_OR_RETURN(CudaTensor * oc, AsActivation(out, "Attention output"));
  auto* kv = dynamic_cast<CudaKvPool*>(&pool);
  if (kv == nullptr) return absl::InvalidArgumentError("Attention: not a CUDA KV pool");
  RETURN_IF_ERROR(CheckAttentionArgs(*qc, *kc, *vc, *oc, p, kv->head_dim()));
  const int hd = p.head_dim;
  const int64_t rows = qc->rows();
  // Limits of this kernel, not of the interface.
  const int group = p.n_heads / p.n_kv_heads;
  if (hd > 256) {
    return absl::UnimplementedError(
        absl::StrCat("Attention: head_dim ", hd, " (the CUDA kernel takes up to 256)"));
  }
  if (cuda::AttentionSharedBytes(group, hd) > 200 * 1024) {
    return absl::UnimplementedError(absl::StrCat("Attention: ", group, " query heads per KV head ",
                                                 "of head_dim ", hd, " exceed shared memory"));
  }
  const int64_t bs = kv->block_size();
  const int32_t num_blocks = kv->num_blocks();
  const auto block_of = [&](absl::Span<const int32_t> table, int64_t pos) -> int32_t {
    const int64_t b = pos / bs;
    if (b >= static_cast<int64_t>(table.size())) return -1;
    const int32_t id = table[b];
    return id < num_blocks ? id : -1;
  };

  // Validate every slice, and every block the new rows go to, before writing anything.
  std::vector<int32_t> row_pos(rows), row_seq(rows);
  std::vector<int64_t> table_begin;
  std::vector<int32_t> table_len, table_data;
  std::vector<std::pair<int32_t, size_t>> written;  // (block, slice)
  int64_t total = 0;
  for (size_t index = 0; index < seqs.size(); ++index) {
    const SequenceSlice& s = seqs[index];
    if (s.past < 0 || s.n_new < 0 || s.past > std::numeric_limits<int32_t>::max() * bs) {
      return absl::OutOfRangeError(
          absl::StrCat("Attention: sequence ", index, ": positions ", s.past, " + ", s.n_new));
    }
    if (static_cast<int>(s.block_tables.size()) != p.n_kv_heads) {
      return absl::InvalidArgumentError(absl::StrCat("Attention: sequence ", index, ": ",
                                                     s.block_tables.size(), " block tables for ",
                                                     p.n_kv_heads, " kv heads"));
    }
    if (s.n_new > rows - total) {
      return absl::InvalidArgumentError(
          absl::StrCat("Attention: slices hold more rows than the ", rows, " of q"));
    }
    if (s.past + s.n_new > std::numeric_limits<int32_t>::max()) {
      return absl::OutOfRangeError(absl::StrCat("Attention: sequence ", index, ": positions ",
                                                s.past, " + ", s.n_new, " (the CUDA kernels ",
                                                "take 32-bit positions)"));
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
      table_begin.push_back(static_cast<int64_t>(table_data.size()));
      table_len.push_back(static_cast<int32_t>(
          std::min<size_t>(s.block_tables[h].size(), std::numeric_limits<int32_t>::max())));
      table_data.insert(table_data.end(), s.block_tables[h].begin(),
                        s.block_tables[h].begin() + table_len.back());
    }
    for (int64_t i = 0; i < s.n_new; ++i) {
      row_pos[total + i] = static_cast<int32_t>(s.past + i);
      row_seq[total + i] = static_cast<int32_t>(index);
    }
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

  // Each (row, head)'s visible keys, and a check that every block they live in is there (the
  // kernel reads only through blocks checked here).
  std::vector<int32_t> sink_end(rows * p.n_kv_heads), win_begin(rows * p.n_kv_heads);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = row_pos[r];
    const SequenceSlice& s = seqs[row_seq[r]];
    for (int h = 0; h < p.n_kv_heads; ++h) {
      VisibleKeys vis{0, 0};
      if (!p.rules.empty()) vis = VisibleKeysAt(p.rules[h], p.span, pos);
      const int64_t se = vis.sink_end;
      const int64_t wb = std::max(vis.window_begin, se);
      sink_end[r * p.n_kv_heads + h] = static_cast<int32_t>(se);
      win_begin[r * p.n_kv_heads + h] = static_cast<int32_t>(wb);
      for (const auto& [from, to] : {std::pair{int64_t{0}, se}, std::pair{wb, pos + 1}}) {
        for (int64_t kp = from; kp < to; kp += bs - kp % bs) {
          if (block_of(s.block_tables[h], kp) < 0) {
            return absl::InternalError(
                absl::StrCat("Attention: layer ", p.layer, " sequence ", row_seq[r], " kv head ", h,
                             ": no KV block for visible key ", kp, " of the query at ", pos));
          }
        }
      }
    }
  }
  if (rows == 0) return absl::OkStatus();

  cuda::DeviceAttention a{};
  a.q = qc->f32();
  a.k = kc->f32();
  a.v = vc->f32();
  a.out = oc->f32();
  a.rows = rows;
  a.n_heads = p.n_heads;
  a.n_kv_heads = p.n_kv_heads;
  a.scale = p.scale;
  ASSIGN_OR_RETURN(a.row_pos, up_a_.Upload<int32_t>(row_pos, stream_, "Attention positions"));
  ASSIGN_OR_RETURN(a.row_seq, up_b_.Upload<int32_t>(row_seq, stream_, "Attention rows"));
  ASSIGN_OR_RETURN(a.table_begin,
                   up_c_.Upload<int64_t>(table_begin, stream_, "Attention block tables"));
  ASSIGN_OR_RETURN(a.table_len,
                   up_d_.Upload<int32_t>(table_len, stream_, "Attention block tables"));
  ASSIGN_OR_RETURN(a.table_data,
                   up_e_.Upload<int32_t>(table_data, stream_, "Attention block tables"));
  ASSIGN_OR_RETURN(a.sink_end, up_f_.Upload<int32_t>(sink_end, stream_, "Attention spans"));
  ASSIGN_OR_RETURN(a.win_begin, up_g_.Upload<int32_t>(win_begin, stream_, "Attention spans"));
  // Keys and values first: each new row attends to the earlier new rows (same stream: ordered).
  RETURN_IF_ERROR(CudaError(cuda::LaunchKvWrite(a, kv->device(), stream_), "Attention KV write"));
  return CudaError(cuda::LaunchAttention(a, kv->device(), stream_), "Attention");
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> NewCudaBackend(int device) {
  int count = 0;
  RETURN_IF_ERROR(CudaError(cudaGetDeviceCount(&count), "cudaGetDeviceCount"));
  if (device < 0 || device >= count) {
    return absl::NotFoundError(
        absl::StrCat("CUDA device ", device, " requested, ", count, " present"));
  }
  RETURN_IF_ERROR(CudaError(cudaSetDevice(device), absl::StrCat("cudaSetDevice(", device, ")")));
  cudaStream_t stream = nullptr;
  RETURN_IF_ERROR(
      CudaError(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate"));
  cublasHandle_t cublas = nullptr;
  if (absl::Status s = CublasError(cublasCreate(&cublas), "cublasCreate"); !s.ok()) {
    cudaStreamDestroy(stream);
    return s;
  }
  if (absl::Status s = CublasError(cublasSetStream(cublas, stream), "cublasSetStream"); !s.ok()) {
    cublasDestroy(cublas);
    cudaStreamDestroy(stream);
    return s;
  }
  return std::make_unique<CudaBackend>(stream, cublas);
}

}  // namespace moa
