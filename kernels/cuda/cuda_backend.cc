// The CUDA backend (see cuda_backend.h). Every check on shapes and block tables is the CPU
// backend's (kernels/cpu/cpu_backend.cc), with the same messages, so that the engine sees the same
// errors on either backend. Work is queued on one stream; CopyToHost waits for it.
#include "kernels/cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/container/node_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "kernels/backend_checks.h"
#include "kernels/block_table_cache.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/decode_attention.h"
#include "kernels/cuda/dequantize.h"
#include "kernels/cuda/prefill_attention.h"
#include "kernels/cuda/random_fill.h"
#include "kernels/cuda/sampling.h"
#include "kernels/cuda/step_graph.h"
#include "kernels/quant.h"
#include "kernels/random_fill.h"
#include "kernels/status_macros.h"

namespace moa {
namespace {

// Refuses single allocations larger than this (a corrupt shape must not exhaust memory).
constexpr int64_t kMaxAllocBytes = int64_t{1} << 40;

absl::Status CudaError(cudaError_t e, absl::string_view what) {
  if (e == cudaSuccess) return absl::OkStatus();
  // The runtime also keeps a failed call's error as the thread's last error, which every kernel
  // launch here checks: left there, an allocation refused for lack of memory would fail the next,
  // unrelated launch. Reading it clears it (a sticky error, a broken context, stays anyway).
  cudaGetLastError();
  // What the first CUDA call of a process says on a machine without a GPU or its driver.
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) {
    return absl::FailedPreconditionError(
        absl::StrCat("CUDA: no usable GPU here (", cudaGetErrorName(e), ": ", cudaGetErrorString(e),
                     "); --device cpu runs without one"));
  }
  std::string message =
      absl::StrCat("CUDA: ", what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
  if (e == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(std::move(message));
  return absl::InternalError(std::move(message));
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
  // Stream-ordered memory from the device's pool, for activations made and dropped every step:
  // cudaMalloc is slow and cudaFree waits for the whole device, cudaMallocAsync/cudaFreeAsync
  // neither (the pool keeps freed memory, NewCudaBackend sets its release threshold).
  static absl::StatusOr<std::unique_ptr<DeviceBuffer>> CreateOnStream(int64_t bytes,
                                                                      cudaStream_t stream,
                                                                      absl::string_view what) {
    auto b = std::make_unique<DeviceBuffer>();
    b->stream_ = stream;
    RETURN_IF_ERROR(b->Allocate(bytes, what));
    return b;
  }
  absl::Status Allocate(int64_t bytes, absl::string_view what) {
    Free();
    if (bytes < 0 || bytes > kMaxAllocBytes) {
      return absl::ResourceExhaustedError(absl::StrCat(what, ": ", bytes, " bytes is too large"));
    }
    const cudaError_t e = stream_ != nullptr
                              ? cudaMallocAsync(&ptr_, std::max<int64_t>(bytes, 1), stream_)
                              : cudaMalloc(&ptr_, std::max<int64_t>(bytes, 1));
    RETURN_IF_ERROR(CudaError(e, absl::StrCat(what, ": allocating ", bytes, " bytes")));
    bytes_ = bytes;
    return absl::OkStatus();
  }
  void* get() const { return ptr_; }
  int64_t bytes() const { return bytes_; }

 private:
  void Free() {
    if (ptr_ != nullptr) {
      if (stream_ != nullptr) {
        cudaFreeAsync(ptr_, stream_);
      } else {
        cudaFree(ptr_);
      }
    }
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* ptr_ = nullptr;
  int64_t bytes_ = 0;
  cudaStream_t stream_ = nullptr;  // set: stream-ordered allocation
};

// A weight: fp16 [rows, cols], or fp32 for one-row weights (norm scales keep full precision);
// or an fp32 activation.
class CudaTensor : public Tensor {
 public:
  enum class Kind { kHalfWeight, kFloatWeight, kActivation };
  CudaTensor(int64_t rows, int64_t cols, Kind kind, std::unique_ptr<DeviceBuffer> buf)
      : rows_(rows), cols_(cols), kind_(kind), buf_(std::move(buf)), data_(buf_->get()) {}
  // An activation in memory owned by someone else (a replayable step's scratch arena).
  CudaTensor(int64_t rows, int64_t cols, void* borrowed)
      : rows_(rows), cols_(cols), kind_(Kind::kActivation), data_(borrowed) {}
  // Which tensor and which of its contents, for copies made of it (CudaBackend's HalfCopy): an id
  // no other tensor of the process gets, and a count of the writes to it so far.
  uint64_t id() const { return id_; }
  uint64_t writes() const { return writes_; }
  void CountWrite() { ++writes_; }
  int64_t rows() const override { return rows_; }
  int64_t cols() const override { return cols_; }
  Kind kind() const { return kind_; }
  bool is_activation() const { return kind_ == Kind::kActivation; }
  bool is_half() const { return kind_ == Kind::kHalfWeight; }
  void* data() const { return data_; }
  float* f32() const { return static_cast<float*>(data_); }

 private:
  int64_t rows_;
  int64_t cols_;
  Kind kind_;
  std::unique_ptr<DeviceBuffer> buf_;
  void* data_;
  uint64_t id_ = NextId();
  uint64_t writes_ = 0;
  static uint64_t NextId() {
    static std::atomic<uint64_t> next{1};
    return next.fetch_add(1, std::memory_order_relaxed);
  }
};

// The CPU backend's layout (all key blocks, then all value blocks), in fp16.
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
    return {static_cast<__half*>(data_->get()), num_blocks_, block_size_, head_dim_};
  }

 private:
  int32_t num_blocks_;
  int32_t block_size_;
  int head_dim_;
  std::unique_ptr<DeviceBuffer> data_;
};

// The first key in [from, to) whose block is missing from `table` (no entry, or not a block of
// the pool), or `to` if every one is there. Runs over every visible block of every head each
// step, so the usual case (all there) is one branch-free pass the compiler vectorizes.
int64_t FirstMissingKey(absl::Span<const int32_t> table, int64_t from, int64_t to, int64_t bs,
                        int32_t num_blocks) {
  if (from >= to) return to;
  const int64_t first = from / bs, last = (to - 1) / bs;
  const int64_t n = static_cast<int64_t>(table.size());
  const int64_t end = std::min(last + 1, n);
  const auto missing = [&](int64_t b) {
    return static_cast<uint32_t>(table[b]) >= static_cast<uint32_t>(num_blocks);
  };
  bool any = end < last + 1;
  for (int64_t b = first; b < end; ++b) any |= missing(b);
  if (!any) return to;
  for (int64_t b = first; b <= last; ++b) {
    if (b >= n || missing(b)) return std::max(from, b * bs);
  }
  return to;
}

absl::StatusOr<const CudaTensor*> AsCuda(const Tensor& t, absl::string_view what) {
  return AsBackendTensor<CudaTensor>(t, what, "CUDA");
}
absl::StatusOr<const CudaTensor*> AsActivation(const Tensor& t, absl::string_view what) {
  return AsBackendActivation<const CudaTensor>(t, what, "CUDA");
}
// For the operations that write `t`: each such call counts as a write (see CudaTensor::writes).
absl::StatusOr<CudaTensor*> AsActivation(Tensor& t, absl::string_view what) {
  absl::StatusOr<CudaTensor*> c = AsBackendActivation<CudaTensor>(t, what, "CUDA");
  if (c.ok()) (*c)->CountWrite();
  return c;
}

// out [rows, n] = x [rows, k] · w [n, k]ᵀ: shapes that agree, an output that is not the input,
// dimensions cuBLAS takes as int.
absl::Status CheckMatMulShapes(const CudaTensor& x, const CudaTensor& w, const CudaTensor& out) {
  const int64_t rows = x.rows(), k = x.cols(), n = w.rows();
  if (w.cols() != k) {
    return absl::InvalidArgumentError(
        absl::StrCat("MatMul: input has ", k, " columns, weight ", w.cols()));
  }
  RETURN_IF_ERROR(CheckShape(out, rows, n, "MatMul output"));
  if (&out == &x) return absl::InvalidArgumentError("MatMul: output aliases the input");
  constexpr int64_t kMaxDim = std::numeric_limits<int>::max();
  if (rows > kMaxDim || k > kMaxDim || n > kMaxDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("MatMul: [", rows, ", ", k, "] x [", n, ", ", k, "] is too large"));
  }
  return absl::OkStatus();
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
  CudaBackend(cudaStream_t stream, cublasHandle_t cublas, std::unique_ptr<DeviceBuffer> cublas_ws,
              const CudaBackendOptions& options)
      : stream_(stream),
        cublas_(cublas),
        cublas_ws_(std::move(cublas_ws)),
        options_(options),
        table_cache_(std::clamp<int64_t>(options.block_table_entries, 1, int64_t{1} << 32)) {}
  ~CudaBackend() override {
    graphs_.Cancel();
    cudaStreamSynchronize(stream_);
    cublasDestroy(cublas_);
    cudaStreamDestroy(stream_);
  }

  std::string_view name() const override { return "cuda"; }

  absl::StatusOr<std::unique_ptr<Tensor>> LoadWeight(const HostTensor& t) override;
  absl::StatusOr<std::unique_ptr<Tensor>> RandomWeight(int64_t rows, int64_t cols, uint64_t seed,
                                                       float scale, float offset) override;
  absl::StatusOr<std::unique_ptr<Tensor>> NewActivation(int64_t rows, int64_t cols) override {
    if (rows < 0 || cols <= 0 || rows > std::numeric_limits<int64_t>::max() / cols) {
      return absl::InvalidArgumentError(absl::StrCat("activation [", rows, ", ", cols, "]"));
    }
    if (rows * cols > kMaxAllocBytes / static_cast<int64_t>(sizeof(float))) {
      return absl::ResourceExhaustedError(
          absl::StrCat("activation: ", rows * cols, " floats is too large"));
    }
    if (graphs_.in_step()) {
      ASSIGN_OR_RETURN(void* p, graphs_.Scratch(rows * cols * 4));
      return std::make_unique<CudaTensor>(rows, cols, p);
    }
    ASSIGN_OR_RETURN(auto buf,
                     DeviceBuffer::CreateOnStream(rows * cols * 4, stream_, "activation"));
    return std::make_unique<CudaTensor>(rows, cols, CudaTensor::Kind::kActivation, std::move(buf));
  }
  absl::Status CopyToHost(const Tensor& t, absl::Span<float> out) override;
  absl::Status CopyFromHost(absl::Span<const float> in, Tensor& t) override;
  absl::Status Embed(const Tensor& table, absl::Span<const int32_t> tokens, Tensor& out) override;
  absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) override;
  absl::Status MatMul(const Tensor& x, const Tensor& w, Tensor& out) override;
  absl::Status MatMuls(const Tensor& x, absl::Span<const Tensor* const> w,
                       absl::Span<Tensor* const> out) override;
  absl::Status Rope(Tensor& x, int n_heads, int head_dim, absl::Span<const float> inv_freq,
                    absl::Span<const int32_t> positions, RopeLayout layout) override;
  absl::Status RopeQK(Tensor& q, int n_heads, Tensor& k, int n_kv_heads, int head_dim,
                      absl::Span<const float> inv_freq, absl::Span<const int32_t> positions,
                      RopeLayout layout) override;
  absl::Status SwiGlu(const Tensor& gate, const Tensor& up, Tensor& out) override;
  absl::Status Add(Tensor& x, const Tensor& y) override;
  absl::Status AddRmsNorm(Tensor& x, const Tensor& y, const Tensor& weight, float eps,
                          Tensor& out) override;
  absl::StatusOr<std::unique_ptr<KvPool>> NewKvPool(int32_t num_blocks, int32_t block_size,
                                                    int head_dim) override;
  int64_t KvBlockBytes(int32_t block_size, int head_dim) const override {
    return int64_t{block_size} * head_dim * 2 * static_cast<int64_t>(sizeof(__half));
  }
  absl::Status Attention(const Tensor& q, const Tensor& k, const Tensor& v,
                         absl::Span<const SequenceSlice> seqs, const AttentionParams& p,
                         KvPool& pool, Tensor& out) override;
  absl::Status GatherRows(const Tensor& x, absl::Span<const int64_t> rows, Tensor& out) override;
  absl::Status Sample(const Tensor& logits, absl::Span<const SampleRow> rows,
                      absl::Span<int32_t> tokens) override;
  absl::Status BeginStep(int64_t key) override;
  absl::Status EndStep() override;
  void CancelStep() override;

  CudaGraphStats graph_stats() const {
    return {graphs_.captures(),
            graphs_.replays(),
            graphs_.replay_host_seconds(),
            graphs_.replay_device_seconds(),
            graphs_.device_timed_replays(),
            direct_steps_,
            direct_host_s_};
  }

 private:
  // Per-call host data to the device: staged into a replayable step, else copied through `buf`.
  template <typename T>
  absl::StatusOr<const T*> Upload(UploadBuffer& buf, absl::Span<const T> in,
                                  absl::string_view what) {
    if (graphs_.in_step()) {
      ASSIGN_OR_RETURN(void* p, graphs_.Stage(in.data(), in.size() * sizeof(T)));
      return static_cast<const T*>(p);
    }
    return buf.Upload(in, stream_, what);
  }
  // In a replayable step: states what an operation's kernels are given (StepGraphs::Record).
  template <typename T>
  static uint64_t StepArg(T v) {
    if constexpr (std::is_pointer_v<T>) {
      return reinterpret_cast<uintptr_t>(v);
    } else if constexpr (std::is_floating_point_v<T>) {
      return std::bit_cast<uint32_t>(static_cast<float>(v));
    } else {
      return static_cast<uint64_t>(v);
    }
  }
  template <typename... T>
  absl::Status StepOp(int op, T... args) {
    return graphs_.Record({static_cast<uint64_t>(op), StepArg(args)...});
  }
  // For operations that cannot be part of a replayable step.
  absl::Status NotInStep(absl::string_view op) const {
    if (!graphs_.in_step()) return absl::OkStatus();
    return absl::FailedPreconditionError(
        absl::StrCat(op, " inside a replayable step (BeginStep .. EndStep)"));
  }

  cudaStream_t stream_;
  cublasHandle_t cublas_;
  std::unique_ptr<DeviceBuffer> cublas_ws_;  // fixed, so that cuBLAS calls can be captured
  CudaBackendOptions options_;
  cuda::StepGraphs graphs_;
  absl::Status BeginGraphStep(int64_t key);
  // Steps run without a graph: when the current one began, how many ran, their host time.
  std::optional<std::chrono::steady_clock::time_point> direct_begin_;
  int64_t direct_steps_ = 0;
  double direct_host_s_ = 0;
  struct {
    int head_dim = 0, group = 0, pairs = 0;
  } pending_decode_;  // a decode workspace to grow before the next step (pairs > 0)
  // MatMul reads its input in fp16. The operations whose output is usually a MatMul's input
  // (RmsNorm, AddRmsNorm, SwiGlu, and Attention where only the decode kernel writes the output)
  // write its fp16 rounding as well, and a MatMul on the input of the MatMul before it reads the
  // same copy: a decode layer then converts nothing of its own, where it converted the input of
  // each of its seven MatMuls (docs/benchmarks-gpu-e2e.md). The copy lives in half_x_ outside
  // steps, in the step's scratch inside one.
  struct HalfCopy {
    uint64_t tensor = 0;  // CudaTensor::id, 0 = none
    uint64_t writes = 0;  // CudaTensor::writes when the copy was made
    void* data = nullptr;
  };
  HalfCopy half_copy_;
  DeviceBuffer half_x_;
  // Room for an fp16 copy of `t`: half_x_ outside steps (what half_copy_ noted there is
  // forgotten, as it is about to be overwritten), step scratch inside one. The caller notes the
  // copy once the kernel that writes it is queued (or staged, in a replay).
  absl::StatusOr<void*> HalfCopyRoom(const CudaTensor& t);
  void NoteHalfCopy(const CudaTensor& t, void* at) { half_copy_ = {t.id(), t.writes(), at}; }
  // x in fp16, as a MatMul reads it: the copy noted in half_copy_, else converted now.
  absl::StatusOr<const void*> HalfInput(const CudaTensor& x);
  // out[i] = x · w[i]ᵀ for i in `which`, fp16 weights of one shape, as one cuBLAS batch.
  absl::Status BatchedMatMul(const CudaTensor& x, absl::Span<const CudaTensor* const> w,
                             absl::Span<Tensor* const> out, absl::Span<const size_t> which);
  UploadBuffer up_ptrs_;  // BatchedMatMul's pointer arrays
  absl::Status NormOp(int op, const CudaTensor& x, const CudaTensor* y, CudaTensor* x_sum,
                      const Tensor& weight, float eps, Tensor& out);
  // Per-call metadata: Rope's frequencies and positions in a replayable step, Embed's tokens.
  UploadBuffer up_a_, up_b_;
  absl::Status RopeOp(CudaTensor& x, int x_heads, CudaTensor* y, int y_heads, int head_dim,
                      absl::Span<const float> inv_freq, absl::Span<const int32_t> positions,
                      RopeLayout layout);
  // Outside replayable steps: Rope's inputs as last uploaded (to rope_freq_, rope_pos_).
  struct RopeInputs {
    std::vector<float> freq;
    std::vector<int32_t> pos;
    const float* d_freq = nullptr;
    const int32_t* d_pos = nullptr;
  };
  RopeInputs rope_inputs_;
  UploadBuffer rope_freq_, rope_pos_;
  // Attention: per-call metadata packed on the host and uploaded in one copy (the vectors are
  // kept to reuse their memory), and the decode kernel's configuration and workspace.
  absl::Status EnsureDecodeWorkspace(int head_dim, int group, int pairs);
  UploadBuffer attn_meta_;
  std::vector<uint8_t> attn_host_;
  std::vector<int32_t> attn_order_;
  std::vector<int64_t> attn_first_row_;
  std::vector<BlockTableCache::Placed*> attn_placed_;
  // What an earlier call found of one (sequence, layer)'s tables, keyed by the first head's table
  // id: while none of them, the rules and the pool change, and a decode query still lies in the
  // blocks checked then (up to covered_to), later decode calls take this record instead of
  // looking at every head.
  struct TableGroup {
    std::vector<TableVersion> versions;
    std::vector<SpanRule> rules;
    SpanParams span;
    int32_t num_blocks = 0;
    int64_t last_end = 0, covered_to = 0;  // query ends [last_end, covered_to] are covered
    int64_t write_block = 0;               // logical block the new row goes to
    std::vector<int64_t> begin;            // per head: where the table is in the arena
    std::vector<int32_t> len;
    std::vector<int32_t> written;  // per head: the pool block of write_block
  };
  TableGroup* MatchingGroup(const SequenceSlice& s, const AttentionParams& p, int32_t num_blocks,
                            int64_t block_size);
  void RecordGroup(const SequenceSlice& s, const AttentionParams& p, int32_t num_blocks,
                   int64_t block_size, absl::Span<BlockTableCache::Placed* const> placed);
  // Empties the table cache and the records that point into it.
  void ForgetTables();
  absl::node_hash_map<uint64_t, TableGroup> table_groups_;
  std::vector<TableGroup*> attn_fast_;  // per slice: its record, or null
  // The block tables, kept on the device across calls (kernels/block_table_cache.h): the arena,
  // the host's record of it, its updates on their way, and a size to grow it to before the next
  // step (set where a step could not grow it; 0: none).
  absl::StatusOr<int32_t*> TableArena();
  absl::StatusOr<int32_t*> GrowTableArena(int64_t entries);
  absl::Status SendTableUpdates();
  DeviceBuffer table_arena_;
  BlockTableCache table_cache_;
  UploadBuffer table_updates_;
  int64_t table_arena_want_ = 0;
  // Per pool block: the last Attention call that wrote it, and which of its sequences.
  std::vector<uint32_t> write_stamp_;
  std::vector<int32_t> write_seq_;
  uint32_t write_call_ = 0;
  cuda::DecodeAttentionConfig decode_cfg_;
  DeviceBuffer decode_ws_;
  cuda::SampleScratch sample_;  // Sample's device memory
};

absl::StatusOr<std::unique_ptr<Tensor>> CudaBackend::LoadWeight(const HostTensor& t) {
  RETURN_IF_ERROR(NotInStep("LoadWeight"));
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

// Filled on the device, in LoadWeight's formats: fp16, or fp32 (of the fp16 values) for one row.
absl::StatusOr<std::unique_ptr<Tensor>> CudaBackend::RandomWeight(int64_t rows, int64_t cols,
                                                                  uint64_t seed, float scale,
                                                                  float offset) {
  RETURN_IF_ERROR(NotInStep("RandomWeight"));
  RETURN_IF_ERROR(CheckRandomWeight(rows, cols, scale, offset, kMaxAllocBytes));
  const std::string what = absl::StrCat("RandomWeight [", rows, ", ", cols, "]");
  if (rows == 1) {
    ASSIGN_OR_RETURN(auto buf, DeviceBuffer::Create(cols * 4, what));
    RETURN_IF_ERROR(
        CudaError(cuda::LaunchRandomFillHalfAsFloat(seed, scale, offset, cols,
                                                    static_cast<float*>(buf->get()), stream_),
                  what));
    return std::make_unique<CudaTensor>(rows, cols, CudaTensor::Kind::kFloatWeight, std::move(buf));
  }
  ASSIGN_OR_RETURN(auto buf, DeviceBuffer::Create(rows * cols * 2, what));
  RETURN_IF_ERROR(CudaError(
      cuda::LaunchRandomFillHalf(seed, scale, offset, rows * cols, buf->get(), stream_), what));
  return std::make_unique<CudaTensor>(rows, cols, CudaTensor::Kind::kHalfWeight, std::move(buf));
}

absl::Status CudaBackend::CopyToHost(const Tensor& t, absl::Span<float> out) {
  RETURN_IF_ERROR(NotInStep("CopyToHost"));
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
  RETURN_IF_ERROR(NotInStep("CopyFromHost"));
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
    RETURN_IF_ERROR(NotInStep("Embed of a one-row table"));
    for (size_t i = 0; i < tokens.size(); ++i) {
      RETURN_IF_ERROR(CudaError(cudaMemcpyAsync(o->f32() + i * tab->cols(), tab->data(),
                                                tab->cols() * 4, cudaMemcpyDeviceToDevice, stream_),
                                "Embed"));
    }
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(const int32_t* d_tokens, Upload(up_a_, tokens, "Embed tokens"));
  RETURN_IF_ERROR(StepOp(1, tab->data(), tab->cols(), d_tokens, tokens.size(), o->data()));
  if (!graphs_.launching()) return absl::OkStatus();  // a replay: staged only
  return CudaError(cuda::LaunchEmbed(tab->data(), tab->cols(), d_tokens,
                                     static_cast<int64_t>(tokens.size()), o->f32(), stream_),
                   "Embed");
}

absl::Status CudaBackend::RmsNorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) {
  ASSIGN_OR_RETURN(const CudaTensor* xc, AsActivation(x, "RmsNorm input"));
  return NormOp(2, *xc, nullptr, nullptr, weight, eps, out);
}

absl::Status CudaBackend::AddRmsNorm(Tensor& x, const Tensor& y, const Tensor& weight, float eps,
                                     Tensor& out) {
  ASSIGN_OR_RETURN(CudaTensor * xc, AsActivation(x, "Add x"));
  ASSIGN_OR_RETURN(const CudaTensor* yc, AsActivation(y, "Add y"));
  RETURN_IF_ERROR(CheckShape(*yc, xc->rows(), xc->cols(), "Add y"));
  return NormOp(8, *xc, yc, xc, weight, eps, out);
}

// RmsNorm of x, or of x + y written to x_sum (AddRmsNorm), with the fp16 copy of the output.
absl::Status CudaBackend::NormOp(int op, const CudaTensor& x, const CudaTensor* y,
                                 CudaTensor* x_sum, const Tensor& weight, float eps, Tensor& out) {
  ASSIGN_OR_RETURN(const CudaTensor* wc, AsCuda(weight, "RmsNorm weight"));
  ASSIGN_OR_RETURN(CudaTensor * o, AsActivation(out, "RmsNorm output"));
  const int64_t d = x.cols();
  RETURN_IF_ERROR(CheckShape(*wc, 1, d, "RmsNorm weight"));
  RETURN_IF_ERROR(CheckShape(*o, x.rows(), d, "RmsNorm output"));
  // A [1, d] weight is fp32: LoadWeight keeps one-row weights in fp32, or it is an activation.
  if (x.rows() > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("RmsNorm: ", x.rows(), " rows"));
  }
  if (x.rows() == 0) return absl::OkStatus();
  ASSIGN_OR_RETURN(void* half, HalfCopyRoom(*o));
  const float* yd = y != nullptr ? y->f32() : nullptr;
  float* sum = x_sum != nullptr ? x_sum->f32() : nullptr;
  RETURN_IF_ERROR(StepOp(op, x.data(), yd, sum, wc->data(), x.rows(), d, eps, o->data(), half));
  if (graphs_.launching()) {  // else a replay: staged only
    RETURN_IF_ERROR(CudaError(
        cuda::LaunchRmsNorm(x.f32(), yd, sum, wc->f32(), x.rows(), d, eps, o->f32(), half, stream_),
        "RmsNorm"));
  }
  NoteHalfCopy(*o, half);
  return absl::OkStatus();
}

absl::StatusOr<void*> CudaBackend::HalfCopyRoom(const CudaTensor& t) {
  const int64_t bytes = t.rows() * t.cols() * 2;
  void* at = nullptr;
  if (graphs_.in_step()) {
    ASSIGN_OR_RETURN(at, graphs_.Scratch(bytes));
  } else {
    half_copy_ = {};
    if (bytes > half_x_.bytes()) {
      // Queued kernels may still read the old buffer.
      RETURN_IF_ERROR(CudaError(cudaStreamSynchronize(stream_), "fp16 copy"));
      RETURN_IF_ERROR(half_x_.Allocate(std::max(bytes, 2 * half_x_.bytes()), "fp16 copy"));
    }
    at = half_x_.get();
  }
  return at;
}

absl::Status CudaBackend::MatMul(const Tensor& x, const Tensor& w, Tensor& out) {
  ASSIGN_OR_RETURN(const CudaTensor* xc, AsActivation(x, "MatMul input"));
  ASSIGN_OR_RETURN(const CudaTensor* wc, AsCuda(w, "MatMul weight"));
  ASSIGN_OR_RETURN(CudaTensor * o, AsActivation(out, "MatMul output"));
  RETURN_IF_ERROR(CheckMatMulShapes(*xc, *wc, *o));
  const int64_t t_rows = xc->rows();
  const int64_t k = xc->cols();
  const int64_t n = wc->rows();
  if (t_rows == 0) return absl::OkStatus();
  // Column-major view: outᵀ [n, rows] = W [k, n]ᵀ · xᵀ [k, rows], fp32 accumulation.
  const void* b = xc->data();
  cudaDataType_t ab_type = CUDA_R_32F;
  if (wc->is_half()) {
    ab_type = CUDA_R_16F;
    ASSIGN_OR_RETURN(b, HalfInput(*xc));
  }
  RETURN_IF_ERROR(StepOp(3, xc->data(), wc->data(), b, o->data(), t_rows, k, n, ab_type));
  if (!graphs_.launching()) return absl::OkStatus();  // a replay: staged only
  const float alpha = 1.0f, beta = 0.0f;
  return CublasError(
      cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(t_rows),
                   static_cast<int>(k), &alpha, wc->data(), ab_type, static_cast<int>(k), b,
                   ab_type, static_cast<int>(k), &beta, o->data(), CUDA_R_32F, static_cast<int>(n),
                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      absl::StrCat("MatMul [", t_rows, ", ", k, "] x [", n, ", ", k, "]"));
}

absl::StatusOr<const void*> CudaBackend::HalfInput(const CudaTensor& x) {
  if (half_copy_.tensor == x.id() && half_copy_.writes == x.writes()) {
    return half_copy_.data;  // made by the operation that wrote x, or by the MatMul before
  }
  ASSIGN_OR_RETURN(void* half, HalfCopyRoom(x));
  if (graphs_.launching()) {
    RETURN_IF_ERROR(CudaError(cuda::LaunchFloatToHalf(x.f32(), x.rows() * x.cols(), half, stream_),
                              "MatMul input to fp16"));
  }
  NoteHalfCopy(x, half);
  return half;
}

// fp16 weights of one shape go to cuBLAS as one batch: q, k and v of a Llama-2-7B layer (4096 x
// 4096 each) take one launch with three times the thread blocks, where three launches each
// left SMs idle (docs/benchmarks-gpu-e2e.md). The rest run as MatMul.
absl::Status CudaBackend::MatMuls(const Tensor& x, absl::Span<const Tensor* const> w,
                                  absl::Span<Tensor* const> out) {
  RETURN_IF_ERROR(CheckMatMulsOutputs(w, out));
  ASSIGN_OR_RETURN(const CudaTensor* xc, AsActivation(x, "MatMul input"));
  // A few weights per call, two calls per layer of every step: no heap allocations.
  absl::InlinedVector<const CudaTensor*, 8> wc(w.size());
  for (size_t i = 0; i < w.size(); ++i) {
    ASSIGN_OR_RETURN(wc[i], AsCuda(*w[i], "MatMul weight"));
  }
  absl::InlinedVector<bool, 8> done(w.size(), false);
  for (size_t i = 0; i < w.size(); ++i) {
    if (done[i]) continue;
    absl::InlinedVector<size_t, 8> same = {i};
    for (size_t j = i + 1; j < w.size() && wc[i]->is_half(); ++j) {
      if (!done[j] && wc[j]->is_half() && wc[j]->rows() == wc[i]->rows() &&
          wc[j]->cols() == wc[i]->cols()) {
        same.push_back(j);
      }
    }
    for (size_t j : same) done[j] = true;
    if (same.size() == 1) {
      RETURN_IF_ERROR(MatMul(x, *w[i], *out[i]));
    } else {
      RETURN_IF_ERROR(BatchedMatMul(*xc, wc, out, same));
    }
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::BatchedMatMul(const CudaTensor& x, absl::Span<const CudaTensor* const> w,
                                        absl::Span<Tensor* const> out,
                                        absl::Span<const size_t> which) {
  const int64_t rows = x.rows(), k = x.cols();
  const size_t g = which.size();
  // The pointer arrays cuBLAS reads on the device: all weights, then the input g times, then
  // all outputs.
  absl::InlinedVector<const void*, 24> ptrs(3 * g);
  int64_t n = 0;
  for (size_t j = 0; j < g; ++j) {
    const CudaTensor& wc = *w[which[j]];
    ASSIGN_OR_RETURN(CudaTensor * o, AsActivation(*out[which[j]], "MatMul output"));
    RETURN_IF_ERROR(CheckMatMulShapes(x, wc, *o));
    n = wc.rows();
    ptrs[j] = wc.data();
    ptrs[2 * g + j] = o->data();
  }
  if (rows == 0) return absl::OkStatus();
  ASSIGN_OR_RETURN(const void* b, HalfInput(x));
  for (size_t j = 0; j < g; ++j) ptrs[g + j] = b;
  ASSIGN_OR_RETURN(const void* const* d_ptrs,
                   Upload(up_ptrs_, absl::MakeConstSpan(ptrs), "MatMul pointer arrays"));
  for (size_t j = 0; j < g; ++j) {
    RETURN_IF_ERROR(StepOp(9, x.data(), ptrs[j], b, ptrs[2 * g + j], rows, k, n, g, d_ptrs));
  }
  if (!graphs_.launching()) return absl::OkStatus();  // a replay: staged only
  const float alpha = 1.0f, beta = 0.0f;
  return CublasError(
      cublasGemmBatchedEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n),
                          static_cast<int>(rows), static_cast<int>(k), &alpha, d_ptrs, CUDA_R_16F,
                          static_cast<int>(k), d_ptrs + g, CUDA_R_16F, static_cast<int>(k), &beta,
                          const_cast<void* const*>(d_ptrs + 2 * g), CUDA_R_32F, static_cast<int>(n),
                          static_cast<int>(g), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      absl::StrCat("MatMul x", g, " [", rows, ", ", k, "] x [", n, ", ", k, "]"));
}

absl::Status CudaBackend::Rope(Tensor& x, int n_heads, int head_dim,
                               absl::Span<const float> inv_freq,
                               absl::Span<const int32_t> positions, RopeLayout layout) {
  ASSIGN_OR_RETURN(CudaTensor * xc, AsActivation(x, "Rope input"));
  return RopeOp(*xc, n_heads, nullptr, 0, head_dim, inv_freq, positions, layout);
}

absl::Status CudaBackend::RopeQK(Tensor& q, int n_heads, Tensor& k, int n_kv_heads, int head_dim,
                                 absl::Span<const float> inv_freq,
                                 absl::Span<const int32_t> positions, RopeLayout layout) {
  ASSIGN_OR_RETURN(CudaTensor * qc, AsActivation(q, "Rope input"));
  ASSIGN_OR_RETURN(CudaTensor * kc, AsActivation(k, "Rope input"));
  if (qc == kc) return absl::InvalidArgumentError("RopeQK: q and k are the same tensor");
  return RopeOp(*qc, n_heads, kc, n_kv_heads, head_dim, inv_freq, positions, layout);
}

// Rope on x and, where set, on y (RopeQK), in one launch; each checked as Rope checks it.
absl::Status CudaBackend::RopeOp(CudaTensor& x, int x_heads, CudaTensor* y, int y_heads,
                                 int head_dim, absl::Span<const float> inv_freq,
                                 absl::Span<const int32_t> positions, RopeLayout layout) {
  for (const auto& [t, n_heads] : {std::pair{&x, x_heads}, std::pair{y, y_heads}}) {
    if (t == nullptr) continue;
    if (n_heads <= 0 || head_dim <= 0 || head_dim % 2 != 0 ||
        t->cols() != int64_t{n_heads} * head_dim) {
      return absl::InvalidArgumentError(
          absl::StrCat("Rope: ", n_heads, " heads of ", head_dim, " on ", t->cols(), " columns"));
    }
    if (static_cast<int>(inv_freq.size()) != head_dim / 2 ||
        static_cast<int64_t>(positions.size()) != t->rows()) {
      return absl::InvalidArgumentError(absl::StrCat("Rope: ", inv_freq.size(), " frequencies and ",
                                                     positions.size(), " positions for ", t->rows(),
                                                     " rows"));
    }
  }
  if (positions.empty()) return absl::OkStatus();
  const int half = head_dim / 2;
  const int step = layout == RopeLayout::kHalfSplit ? 1 : 2;
  const int partner = layout == RopeLayout::kHalfSplit ? half : 1;
  const float* d_freq = nullptr;
  const int32_t* d_pos = nullptr;
  if (graphs_.in_step()) {
    ASSIGN_OR_RETURN(d_freq, Upload(up_a_, inv_freq, "Rope frequencies"));
    ASSIGN_OR_RETURN(d_pos, Upload(up_b_, positions, "Rope positions"));
  } else {
    // Every layer of a step rotates by the same frequencies and positions. Outside a replayable
    // step each upload is a copy the stream waits for between two kernels, so they are sent
    // once and reused while the host's values stay the same.
    RopeInputs& c = rope_inputs_;
    if (c.d_freq == nullptr ||
        !std::equal(inv_freq.begin(), inv_freq.end(), c.freq.begin(), c.freq.end())) {
      ASSIGN_OR_RETURN(c.d_freq, rope_freq_.Upload(inv_freq, stream_, "Rope frequencies"));
      c.freq.assign(inv_freq.begin(), inv_freq.end());
    }
    if (c.d_pos == nullptr ||
        !std::equal(positions.begin(), positions.end(), c.pos.begin(), c.pos.end())) {
      ASSIGN_OR_RETURN(c.d_pos, rope_pos_.Upload(positions, stream_, "Rope positions"));
      c.pos.assign(positions.begin(), positions.end());
    }
    d_freq = c.d_freq;
    d_pos = c.d_pos;
  }
  float* yd = y != nullptr ? y->f32() : nullptr;
  const int yh = y != nullptr ? y_heads : 0;
  RETURN_IF_ERROR(
      StepOp(4, x.data(), x.rows(), x_heads, yd, yh, head_dim, d_freq, d_pos, step, partner));
  if (!graphs_.launching()) return absl::OkStatus();  // a replay: staged only
  return CudaError(cuda::LaunchRope(x.f32(), x_heads, yd, yh, x.rows(), head_dim, d_freq, d_pos,
                                    step, partner, stream_),
                   "Rope");
}

absl::Status CudaBackend::SwiGlu(const Tensor& gate, const Tensor& up, Tensor& out) {
  ASSIGN_OR_RETURN(const CudaTensor* g, AsActivation(gate, "SwiGlu gate"));
  ASSIGN_OR_RETURN(const CudaTensor* u, AsActivation(up, "SwiGlu up"));
  ASSIGN_OR_RETURN(CudaTensor * o, AsActivation(out, "SwiGlu output"));
  RETURN_IF_ERROR(CheckShape(*u, g->rows(), g->cols(), "SwiGlu up"));
  RETURN_IF_ERROR(CheckShape(*o, g->rows(), g->cols(), "SwiGlu output"));
  if (g->rows() == 0) return absl::OkStatus();
  ASSIGN_OR_RETURN(void* half, HalfCopyRoom(*o));
  RETURN_IF_ERROR(StepOp(5, g->data(), u->data(), o->data(), g->rows() * g->cols(), half));
  if (graphs_.launching()) {  // else a replay: staged only
    RETURN_IF_ERROR(CudaError(
        cuda::LaunchSwiGlu(g->f32(), u->f32(), g->rows() * g->cols(), o->f32(), half, stream_),
        "SwiGlu"));
  }
  NoteHalfCopy(*o, half);
  return absl::OkStatus();
}

absl::Status CudaBackend::Add(Tensor& x, const Tensor& y) {
  ASSIGN_OR_RETURN(CudaTensor * xc, AsActivation(x, "Add x"));
  ASSIGN_OR_RETURN(const CudaTensor* yc, AsActivation(y, "Add y"));
  RETURN_IF_ERROR(CheckShape(*yc, xc->rows(), xc->cols(), "Add y"));
  RETURN_IF_ERROR(StepOp(6, xc->data(), yc->data(), xc->rows() * xc->cols()));
  if (!graphs_.launching()) return absl::OkStatus();  // a replay: staged only
  return CudaError(cuda::LaunchAdd(xc->f32(), yc->f32(), xc->rows() * xc->cols(), stream_), "Add");
}

absl::StatusOr<std::unique_ptr<KvPool>> CudaBackend::NewKvPool(int32_t num_blocks,
                                                               int32_t block_size, int head_dim) {
  RETURN_IF_ERROR(NotInStep("NewKvPool"));
  if (num_blocks <= 0 || block_size <= 0 || head_dim <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV pool: ", num_blocks, " blocks of ", block_size, " x ", head_dim));
  }
  const int64_t per_block = int64_t{block_size} * head_dim * 2;
  if (num_blocks > kMaxAllocBytes / static_cast<int64_t>(sizeof(__half)) / per_block) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV pool of ", num_blocks, " blocks of ", per_block, " halves is too large"));
  }
  // Not zeroed: only positions that were written are ever read.
  ASSIGN_OR_RETURN(
      auto data, DeviceBuffer::Create(per_block * num_blocks * int64_t{sizeof(__half)}, "KV pool"));
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
  const int n_kv = p.n_kv_heads;
  const int64_t rows = qc->rows();
  // Limits of this kernel, not of the interface.
  const int group = p.n_heads / n_kv;
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

  // Validate every slice before writing anything, in the CPU backend's order of errors: each
  // slice's own numbers, the blocks its new rows go to, blocks written by two sequences, then the
  // blocks of the keys the rows see.
  int64_t total = 0;
  for (size_t index = 0; index < seqs.size(); ++index) {
    const SequenceSlice& s = seqs[index];
    if (s.past < 0 || s.n_new < 0 || s.past > std::numeric_limits<int32_t>::max() * bs) {
      return absl::OutOfRangeError(
          absl::StrCat("Attention: sequence ", index, ": positions ", s.past, " + ", s.n_new));
    }
    if (static_cast<int>(s.block_tables.size()) != n_kv) {
      return absl::InvalidArgumentError(absl::StrCat("Attention: sequence ", index, ": ",
                                                     s.block_tables.size(), " block tables for ",
                                                     n_kv, " kv heads"));
    }
    RETURN_IF_ERROR(CheckTableVersions(s, index, n_kv));
    if (s.n_new > rows - total) {
      return absl::InvalidArgumentError(
          absl::StrCat("Attention: slices hold more rows than the ", rows, " of q"));
    }
    if (s.past + s.n_new > std::numeric_limits<int32_t>::max()) {
      return absl::OutOfRangeError(absl::StrCat("Attention: sequence ", index, ": positions ",
                                                s.past, " + ", s.n_new, " (the CUDA kernels ",
                                                "take 32-bit positions)"));
    }
    total += s.n_new;
  }
  if (total != rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("Attention: slices hold ", total, " rows, q has ", rows));
  }
  if (rows == 0) return absl::OkStatus();

  // A decode slice whose tables, rules and pool are as an earlier call checked them, with its
  // query still in the blocks checked then, takes that call's record (TableGroup): no look at
  // each head's table. Sequences of one new token go to the decode kernel where it has an
  // instance for this shape.
  const bool decode_kernel = cuda::DecodeAttentionSupports(hd, group);
  std::vector<TableGroup*>& fast = attn_fast_;
  fast.assign(seqs.size(), nullptr);
  for (size_t index = 0; index < seqs.size(); ++index) {
    if (seqs[index].n_new == 1 && decode_kernel) {
      fast[index] = MatchingGroup(seqs[index], p, num_blocks, bs);
    }
  }
  for (size_t index = 0; index < seqs.size(); ++index) {
    const SequenceSlice& s = seqs[index];
    if (fast[index] != nullptr) continue;  // the same blocks as when checked
    for (int h = 0; h < n_kv; ++h) {
      for (int64_t pos = s.past; pos < s.past + s.n_new; pos += bs - pos % bs) {
        if (block_of(s.block_tables[h], pos) < 0) {
          return absl::InternalError(absl::StrCat("Attention: layer ", p.layer, " sequence ", index,
                                                  " kv head ", h, ": no KV block for new ",
                                                  "position ", pos));
        }
      }
    }
  }
  // Two writers of one block, through a stamp per pool block (this call's number and the
  // writer): one look per written block instead of a sort.
  if (write_stamp_.size() < static_cast<size_t>(num_blocks)) {
    write_stamp_.assign(num_blocks, 0);
    write_seq_.assign(num_blocks, 0);
  }
  if (++write_call_ == 0) {  // the stamps wrapped: start afresh
    std::fill(write_stamp_.begin(), write_stamp_.end(), 0);
    write_call_ = 1;
  }
  for (size_t index = 0; index < seqs.size(); ++index) {
    const SequenceSlice& s = seqs[index];
    for (int h = 0; h < n_kv; ++h) {
      for (int64_t pos = s.past; pos < s.past + s.n_new; pos += bs - pos % bs) {
        const int32_t id =
            fast[index] != nullptr ? fast[index]->written[h] : block_of(s.block_tables[h], pos);
        if (write_stamp_[id] == write_call_ && write_seq_[id] != static_cast<int32_t>(index)) {
          return absl::InternalError(absl::StrCat("Attention: layer ", p.layer, ": KV block ", id,
                                                  " is written by two sequences"));
        }
        write_stamp_[id] = write_call_;
        write_seq_[id] = static_cast<int32_t>(index);
      }
    }
  }

  // Decode sequences are numbered first.
  std::vector<int32_t>& order = attn_order_;  // sequence indices, decode first
  order.clear();
  int32_t max_n_new = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (seqs[i].n_new == 1 && decode_kernel) order.push_back(static_cast<int32_t>(i));
  }
  const int n_dec = static_cast<int>(order.size());
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (seqs[i].n_new > 0 && !(seqs[i].n_new == 1 && decode_kernel)) {
      order.push_back(static_cast<int32_t>(i));
      max_n_new = std::max<int32_t>(max_n_new, static_cast<int32_t>(seqs[i].n_new));
    }
  }
  const int n_all = static_cast<int>(order.size());
  const int n_pf = n_all - n_dec;
  const int64_t pairs = int64_t{n_all} * n_kv;

  // The per-call metadata in one buffer, one copy: 8-byte aligned sections. The tables
  // themselves are in the device's table cache (table_cache_), sent only where they changed.
  int64_t size = 0;
  const auto section = [&size](int64_t bytes) {
    const int64_t at = size;
    size += (bytes + 7) / 8 * 8;
    return at;
  };
  const int64_t o_begin = section(pairs * 8);
  const int64_t o_head_rules = section(int64_t{n_kv} * sizeof(cuda::DeviceSpanRule));
  const int64_t o_rules = section(int64_t{n_pf} * n_kv * sizeof(cuda::DeviceSpanRule));
  const int64_t o_len = section(pairs * 4);
  const int64_t o_row_pos = section(rows * 4);
  const int64_t o_row_seq = section(rows * 4);
  const int64_t o_dec_row = section(int64_t{n_dec} * 4);
  const int64_t o_dec_len = section(int64_t{n_dec} * 4);
  const int64_t o_pf_row = section(int64_t{n_pf} * 4);
  const int64_t o_pf_new = section(int64_t{n_pf} * 4);
  const int64_t o_pf_past = section(int64_t{n_pf} * 4);
  // Packed straight into a replayable step's staging memory, else into attn_host_ and uploaded.
  uint8_t* base = nullptr;
  const uint8_t* dev = nullptr;
  if (graphs_.in_step()) {
    ASSIGN_OR_RETURN(auto room, graphs_.Reserve(size));
    base = static_cast<uint8_t*>(room.first);
    dev = static_cast<const uint8_t*>(room.second);
  } else {
    attn_host_.resize(size);
    base = attn_host_.data();
  }
  const auto at = [base](int64_t off, auto* type) {
    return reinterpret_cast<std::remove_pointer_t<decltype(type)>*>(base + off);
  };
  int64_t* table_begin = at(o_begin, static_cast<int64_t*>(nullptr));
  int32_t* table_len = at(o_len, static_cast<int32_t*>(nullptr));

  // Every other table into the cache. Placing fails when the cache's arena is full; it is then
  // emptied (and grown if half of it is needed now) and everything placed again. Inside a
  // replayable step the tables placed by this step's earlier calls must stay where they are, so
  // the step runs again instead.
  ASSIGN_OR_RETURN(int32_t * arena, TableArena());
  std::vector<BlockTableCache::Placed*>& placed = attn_placed_;  // per pair; null where fast
  placed.assign(pairs, nullptr);
  for (int attempt = 0;; ++attempt) {
    bool placed_all = true;
    for (int c = 0; c < n_all && placed_all; ++c) {
      const SequenceSlice& s = seqs[order[c]];
      if (const TableGroup* g = fast[order[c]]; g != nullptr) {
        std::copy(g->begin.begin(), g->begin.end(), table_begin + int64_t{c} * n_kv);
        std::copy(g->len.begin(), g->len.end(), table_len + int64_t{c} * n_kv);
        continue;
      }
      for (int h = 0; h < n_kv; ++h) {
        const TableVersion v = s.table_versions.empty() ? TableVersion{} : s.table_versions[h];
        BlockTableCache::Placed* t = table_cache_.Place(s.block_tables[h], v);
        if (t == nullptr) {
          placed_all = false;
          break;
        }
        placed[int64_t{c} * n_kv + h] = t;
        table_begin[int64_t{c} * n_kv + h] = t->begin;
        table_len[int64_t{c} * n_kv + h] = t->len;
      }
    }
    if (placed_all) break;
    // Full. Mostly room left behind by tables that moved or whose sequences ended: emptying the
    // cache suffices. If the tables in use fill half of it, or one call does not fit an empty
    // one, it grows.
    const int64_t need = table_cache_.in_use() + table_cache_.shortfall();
    const bool grow = attempt > 0 || 2 * need > table_cache_.capacity();
    const int64_t want =
        grow ? 4 * std::max(table_cache_.capacity(), need) : table_cache_.capacity();
    ForgetTables();
    if (graphs_.in_step()) {
      table_arena_want_ = want;
      return absl::AbortedError("Attention: block-table cache full; run the step again");
    }
    if (grow) {
      ASSIGN_OR_RETURN(arena, GrowTableArena(want));
    }
    fast.assign(seqs.size(), nullptr);  // their records went with the cache
  }

  // The blocks of every visible key, checked once per (sequence, KV head) of the slow slices
  // (or found checked in the table's current version by an earlier call): windows only move
  // right, so the keys all rows of a sequence see are [0, sink_end of its last row) and [window
  // begin of its first row, last position]. The kernels read only through blocks checked here.
  // The error names the first query (then the lowest head) that sees a missing block, and the
  // first missing key it sees: max(past, key) is that query.
  const auto visible = [&](int h, int64_t pos) {
    VisibleKeys vis{0, 0};
    if (!p.rules.empty()) vis = VisibleKeysAt(p.rules[h], p.span, pos);
    vis.window_begin = std::max(vis.window_begin, vis.sink_end);
    return vis;
  };
  for (int c = 0; c < n_all; ++c) {
    const int32_t index = order[c];
    if (fast[index] != nullptr) continue;
    const SequenceSlice& s = seqs[index];
    const int64_t last = s.past + s.n_new - 1;
    int64_t bad_query = std::numeric_limits<int64_t>::max(), bad_key = 0;
    int bad_head = -1;
    for (int h = 0; h < n_kv; ++h) {
      BlockTableCache::Placed& t = *placed[int64_t{c} * n_kv + h];
      const int64_t sink_end = visible(h, last).sink_end;
      const int64_t win_begin = visible(h, s.past).window_begin;
      if (CheckedKeys(t, num_blocks, sink_end, win_begin, last + 1)) continue;
      bool ok = true;
      for (const auto& [from, to] :
           {std::pair{int64_t{0}, sink_end}, std::pair{win_begin, last + 1}}) {
        const int64_t kp = FirstMissingKey(s.block_tables[h], from, to, bs, num_blocks);
        if (kp < to) {
          ok = false;
          if (std::max(s.past, kp) < bad_query) {
            bad_query = std::max(s.past, kp);
            bad_key = kp;
            bad_head = h;
          }
          break;
        }
      }
      if (ok) MarkChecked(t, num_blocks, bs, sink_end, win_begin, last + 1);
    }
    if (bad_head >= 0) {
      // Nothing of this call runs, so the updates it queued are lost: the cache starts over.
      ForgetTables();
      return absl::InternalError(absl::StrCat("Attention: layer ", p.layer, " sequence ", index,
                                              " kv head ", bad_head, ": no KV block for visible ",
                                              "key ", bad_key, " of the query at ", bad_query));
    }
  }
  for (int c = 0; c < n_dec; ++c) {
    if (fast[order[c]] == nullptr) {
      RecordGroup(seqs[order[c]], p, num_blocks, bs,
                  absl::MakeConstSpan(placed).subspan(int64_t{c} * n_kv, n_kv));
    }
  }

  int32_t* row_pos = at(o_row_pos, static_cast<int32_t*>(nullptr));
  int32_t* row_seq = at(o_row_seq, static_cast<int32_t*>(nullptr));
  std::vector<int64_t>& first_row = attn_first_row_;  // row of each sequence's first token
  first_row.resize(seqs.size());
  for (size_t i = 0, r = 0; i < seqs.size(); r += seqs[i].n_new, ++i) first_row[i] = r;
  for (int c = 0; c < n_all; ++c) {
    const SequenceSlice& s = seqs[order[c]];
    for (int64_t i = 0; i < s.n_new; ++i) {
      row_pos[first_row[order[c]] + i] = static_cast<int32_t>(s.past + i);
      row_seq[first_row[order[c]] + i] = c;
    }
  }
  int32_t* dec_row = at(o_dec_row, static_cast<int32_t*>(nullptr));
  int32_t* dec_len = at(o_dec_len, static_cast<int32_t*>(nullptr));
  for (int c = 0; c < n_dec; ++c) {
    dec_row[c] = static_cast<int32_t>(first_row[order[c]]);
    dec_len[c] = static_cast<int32_t>(seqs[order[c]].past + 1);
  }
  const auto clamp32 = [](int64_t x) {
    return static_cast<int32_t>(std::clamp<int64_t>(x, std::numeric_limits<int32_t>::min(),
                                                    std::numeric_limits<int32_t>::max()));
  };
  // The span rule of each KV head as the kernels take it (SpanTokens' terms,
  // kernels/attention_span.h; clamping to 32 bits changes no window, as positions are 32-bit):
  // once per head for the decode kernel, once per (sequence, head) for the prefill kernels.
  auto* head_rules = at(o_head_rules, static_cast<cuda::DeviceSpanRule*>(nullptr));
  for (int h = 0; h < n_kv; ++h) {
    cuda::DeviceSpanRule& r = head_rules[h];
    r = {};
    r.dense = p.rules.empty() || p.rules[h].dense ? 1 : 0;
    if (r.dense) continue;
    const double blocks =
        std::floor(static_cast<double>(p.rules[h].alpha) / static_cast<double>(p.span.block));
    r.alpha_tokens = clamp32(p.span.block * static_cast<int64_t>(blocks));
    r.beta = p.rules[h].beta;
    r.min_span = clamp32(p.span.sink + p.span.block);
  }
  auto* rules = at(o_rules, static_cast<cuda::DeviceSpanRule*>(nullptr));
  int32_t* pf_row = at(o_pf_row, static_cast<int32_t*>(nullptr));
  int32_t* pf_new = at(o_pf_new, static_cast<int32_t*>(nullptr));
  int32_t* pf_past = at(o_pf_past, static_cast<int32_t*>(nullptr));
  for (int c = 0; c < n_pf; ++c) {
    const SequenceSlice& s = seqs[order[n_dec + c]];
    pf_row[c] = static_cast<int32_t>(first_row[order[n_dec + c]]);
    pf_new[c] = static_cast<int32_t>(s.n_new);
    pf_past[c] = static_cast<int32_t>(s.past);
    std::copy_n(head_rules, n_kv, rules + int64_t{c} * n_kv);
  }

  if (!graphs_.in_step()) {
    ASSIGN_OR_RETURN(dev, attn_meta_.Upload<uint8_t>(absl::MakeConstSpan(base, size), stream_,
                                                     "Attention metadata"));
    // The tables' changes reach the arena before this call's kernels read it (same stream); in
    // a replayable step they are sent before the step's graph runs (EndStep).
    RETURN_IF_ERROR(SendTableUpdates());
  }
  const auto dev_at = [dev](int64_t off, auto* type) {
    return reinterpret_cast<std::remove_pointer_t<decltype(type)>*>(dev + off);
  };
  const auto* d_begin = dev_at(o_begin, static_cast<const int64_t*>(nullptr));
  const auto* d_len = dev_at(o_len, static_cast<const int32_t*>(nullptr));
  const int32_t* d_data = arena;
  const cuda::DevicePool dpool = kv->device();
  if (n_dec > 0) RETURN_IF_ERROR(EnsureDecodeWorkspace(hd, group, n_dec * n_kv));
  // Where the decode kernel writes every row (no prefill rows), it writes the fp16 copy of the
  // output that the output projection reads (HalfCopy) as well.
  void* out_half = nullptr;
  if (n_pf == 0 && n_dec > 0) {
    ASSIGN_OR_RETURN(out_half, HalfCopyRoom(*oc));
  }
  RETURN_IF_ERROR(StepOp(7, qc->data(), kc->data(), vc->data(), oc->data(), dpool.data,
                         dpool.num_blocks, dpool.block_size, hd, p.n_heads, n_kv, p.scale,
                         p.span.sink, rows, n_dec, n_pf, max_n_new, dev, decode_ws_.get(),
                         decode_cfg_.grid, out_half));
  if (!graphs_.launching()) {  // a replay: staged only
    if (out_half != nullptr) NoteHalfCopy(*oc, out_half);
    return absl::OkStatus();
  }

  // Keys and values first: each new row attends to the earlier new rows (same stream: ordered).
  cuda::DeviceAttention w{};
  w.k = kc->f32();
  w.v = vc->f32();
  w.rows = rows;
  w.n_kv_heads = n_kv;
  w.row_pos = dev_at(o_row_pos, static_cast<const int32_t*>(nullptr));
  w.row_seq = dev_at(o_row_seq, static_cast<const int32_t*>(nullptr));
  w.table_begin = d_begin;
  w.table_len = d_len;
  w.table_data = d_data;
  RETURN_IF_ERROR(CudaError(cuda::LaunchKvWrite(w, dpool, stream_), "Attention KV write"));

  if (n_dec > 0) {
    cuda::DecodeAttentionArgs d{};
    d.q = qc->f32();
    d.out = oc->f32();
    d.n_seqs = n_dec;
    d.n_heads = p.n_heads;
    d.n_kv_heads = n_kv;
    d.scale = p.scale;
    d.row = dev_at(o_dec_row, static_cast<const int32_t*>(nullptr));
    d.table_begin = d_begin;
    d.table_len = d_len;
    d.table_data = d_data;
    d.seq_len = dev_at(o_dec_len, static_cast<const int32_t*>(nullptr));
    d.rules = dev_at(o_head_rules, static_cast<const cuda::DeviceSpanRule*>(nullptr));
    d.sink = clamp32(p.span.sink);
    d.out_half = static_cast<__half*>(out_half);
    RETURN_IF_ERROR(
        CudaError(cuda::LaunchDecodeAttention(d, dpool, decode_cfg_, decode_ws_.get(), stream_),
                  "Attention (decode)"));
    if (out_half != nullptr) NoteHalfCopy(*oc, out_half);
  }
  if (n_pf == 0) return absl::OkStatus();
  cuda::PrefillAttentionArgs a{};
  a.q = qc->f32();
  a.out = oc->f32();
  a.n_heads = p.n_heads;
  a.n_kv_heads = n_kv;
  a.head_dim = hd;
  a.scale = p.scale;
  a.sink = clamp32(p.span.sink);
  a.n_seqs = n_pf;
  a.q_row = dev_at(o_pf_row, static_cast<const int32_t*>(nullptr));
  a.n_new = dev_at(o_pf_new, static_cast<const int32_t*>(nullptr));
  a.past = dev_at(o_pf_past, static_cast<const int32_t*>(nullptr));
  a.max_n_new = max_n_new;
  a.table_begin = d_begin + int64_t{n_dec} * n_kv;
  a.table_len = d_len + int64_t{n_dec} * n_kv;
  a.table_data = d_data;
  a.rules = dev_at(o_rules, static_cast<const cuda::DeviceSpanRule*>(nullptr));
  // The flash kernel where it has an instance (every head_dim Llama models use), else the
  // general one-block-per-row kernel.
  if (cuda::PrefillAttentionSupports(hd, group)) {
    return CudaError(cuda::LaunchPrefillAttention(a, dpool, stream_), "Attention (prefill)");
  }
  return CudaError(cuda::LaunchAttention(a, dpool, stream_), "Attention");
}

absl::Status CudaBackend::BeginStep(int64_t key) {
  half_copy_ = {};  // in half_x_, which a step does not use
  RETURN_IF_ERROR(BeginGraphStep(key));
  if (!graphs_.in_step()) direct_begin_ = std::chrono::steady_clock::now();
  return absl::OkStatus();
}

absl::Status CudaBackend::BeginGraphStep(int64_t key) {
  if (!options_.graphs) return absl::OkStatus();
  if (pending_decode_.pairs > 0) {
    RETURN_IF_ERROR(EnsureDecodeWorkspace(pending_decode_.head_dim, pending_decode_.group,
                                          pending_decode_.pairs));
    pending_decode_ = {};
    graphs_.Reset();  // they point at the old workspace
  }
  if (table_arena_want_ > 0) {
    if (table_arena_want_ > table_cache_.capacity() || table_arena_.get() == nullptr) {
      RETURN_IF_ERROR(GrowTableArena(table_arena_want_).status());
    }
    table_arena_want_ = 0;
  }
  return graphs_.Begin(key, stream_);
}

absl::Status CudaBackend::EndStep() {
  half_copy_ = {};  // in the step's scratch, which the next step reuses
  if (!graphs_.in_step()) {
    if (direct_begin_) {
      direct_host_s_ +=
          std::chrono::duration<double>(std::chrono::steady_clock::now() - *direct_begin_).count();
      ++direct_steps_;
      direct_begin_.reset();
    }
    return absl::OkStatus();
  }
  return graphs_.End([this] { return SendTableUpdates(); });
}

void CudaBackend::CancelStep() {
  half_copy_ = {};
  graphs_.Cancel();
  direct_begin_.reset();
  // The step's table updates were never sent: what the cache believes the arena holds is wrong.
  ForgetTables();
}

void CudaBackend::ForgetTables() {
  table_cache_.Clear();
  table_groups_.clear();
}

namespace {

bool SameRules(absl::Span<const SpanRule> a, absl::Span<const SpanRule> b) {
  return std::equal(
      a.begin(), a.end(), b.begin(), b.end(), [](const SpanRule& x, const SpanRule& y) {
        return x.dense == y.dense && (x.dense || (x.alpha == y.alpha && x.beta == y.beta));
      });
}

}  // namespace

CudaBackend::TableGroup* CudaBackend::MatchingGroup(const SequenceSlice& s,
                                                    const AttentionParams& p, int32_t num_blocks,
                                                    int64_t block_size) {
  if (s.table_versions.empty()) return nullptr;
  auto it = table_groups_.find(s.table_versions[0].id);
  if (it == table_groups_.end()) return nullptr;
  TableGroup& g = it->second;
  const int64_t end = s.past + 1;
  if (g.num_blocks != num_blocks || end < g.last_end || end > g.covered_to ||
      s.past / block_size != g.write_block || g.span.sink != p.span.sink ||
      g.span.block != p.span.block) {
    return nullptr;
  }
  if (!std::equal(s.table_versions.begin(), s.table_versions.end(), g.versions.begin(),
                  g.versions.end(), [](const TableVersion& x, const TableVersion& y) {
                    return x.id == y.id && x.version == y.version;
                  })) {
    return nullptr;
  }
  return SameRules(p.rules, g.rules) ? &g : nullptr;
}

void CudaBackend::RecordGroup(const SequenceSlice& s, const AttentionParams& p, int32_t num_blocks,
                              int64_t block_size,
                              absl::Span<BlockTableCache::Placed* const> placed) {
  // Only tables with identity, and rules whose windows never move left (beta in [0, 1]): the
  // record stands for later queries only because their keys lie in the blocks checked now.
  if (s.table_versions.empty()) return;
  for (const TableVersion& v : s.table_versions) {
    if (v.id == 0) return;
  }
  for (const SpanRule& r : p.rules) {
    if (!r.dense && !(r.beta >= 0.0 && r.beta <= 1.0)) return;
  }
  const int64_t end = s.past + 1;
  // Later queries see [0, sink) and a window within the keys checked now. Below the sink a query
  // sees more of it than the one before: no record there.
  int64_t covered_to = end;
  if (end >= p.span.sink || p.rules.empty()) {
    covered_to = std::numeric_limits<int64_t>::max();
    for (const BlockTableCache::Placed* t : placed)
      covered_to = std::min(covered_to, t->checked_to);
  }
  if (covered_to < end) return;
  TableGroup& g = table_groups_[s.table_versions[0].id];
  g.versions.assign(s.table_versions.begin(), s.table_versions.end());
  g.rules.assign(p.rules.begin(), p.rules.end());
  g.span = p.span;
  g.num_blocks = num_blocks;
  g.last_end = end;
  g.covered_to = covered_to;
  g.write_block = s.past / block_size;
  const size_t n = placed.size();
  g.begin.resize(n);
  g.len.resize(n);
  g.written.resize(n);
  for (size_t h = 0; h < n; ++h) {
    g.begin[h] = placed[h]->begin;
    g.len[h] = placed[h]->len;
    g.written[h] = s.block_tables[h][g.write_block];
  }
}

absl::StatusOr<int32_t*> CudaBackend::TableArena() {
  if (table_arena_.get() != nullptr) return static_cast<int32_t*>(table_arena_.get());
  if (graphs_.in_step()) {
    // Allocating would break a capture: before the next step instead.
    table_arena_want_ = table_cache_.capacity();
    return absl::AbortedError("Attention: no block-table arena yet; run the step again");
  }
  return GrowTableArena(table_cache_.capacity());
}

absl::StatusOr<int32_t*> CudaBackend::GrowTableArena(int64_t entries) {
  if (entries > (int64_t{1} << 32)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("Attention: block tables of ", entries, " entries (the cache takes 2^32)"));
  }
  // Queued kernels may still read the old arena; graphs point at it.
  RETURN_IF_ERROR(CudaError(cudaStreamSynchronize(stream_), "block-table arena"));
  graphs_.Reset();
  table_cache_.Resize(entries);
  table_groups_.clear();
  RETURN_IF_ERROR(table_arena_.Allocate(entries * int64_t{sizeof(int32_t)}, "block-table arena"));
  return static_cast<int32_t*>(table_arena_.get());
}

absl::Status CudaBackend::SendTableUpdates() {
  const std::vector<BlockTableCache::Update>& u = table_cache_.updates();
  if (u.empty()) return absl::OkStatus();
  static_assert(sizeof(BlockTableCache::Update) == sizeof(uint2));
  ASSIGN_OR_RETURN(const uint2* d,
                   table_updates_.Upload<uint2>(
                       absl::MakeConstSpan(reinterpret_cast<const uint2*>(u.data()), u.size()),
                       stream_, "block-table updates"));
  RETURN_IF_ERROR(CudaError(cuda::LaunchTableUpdates(static_cast<int32_t*>(table_arena_.get()), d,
                                                     static_cast<int64_t>(u.size()), stream_),
                            "block-table updates"));
  table_cache_.ClearUpdates();
  return absl::OkStatus();
}

absl::Status CudaBackend::EnsureDecodeWorkspace(int head_dim, int group, int pairs) {
  if (decode_cfg_.head_dim == head_dim && decode_cfg_.group == group &&
      decode_cfg_.max_pairs >= pairs) {
    return absl::OkStatus();
  }
  if (graphs_.in_step()) {
    // Allocating would break a capture and move memory that graphs point to: grow before the
    // next step instead (BeginStep), and have this one run again.
    pending_decode_ = {head_dim, group, pairs};
    return absl::AbortedError("decode attention workspace outgrown; run the step again");
  }
  // Room for twice as many pairs as seen (at least 256), so that a growing batch rarely
  // reallocates; the old workspace may still be in use by queued kernels.
  int max_pairs = 256;
  while (max_pairs < pairs) max_pairs *= 2;
  if (decode_cfg_.head_dim == head_dim && decode_cfg_.group == group) {
    max_pairs = std::max(max_pairs, 2 * decode_cfg_.max_pairs);
  }
  cuda::DecodeAttentionConfig cfg;
  RETURN_IF_ERROR(CudaError(cuda::GetDecodeAttentionConfig(head_dim, group, max_pairs, &cfg),
                            "decode attention config"));
  RETURN_IF_ERROR(CudaError(cudaStreamSynchronize(stream_), "decode attention workspace"));
  decode_cfg_ = {};
  RETURN_IF_ERROR(decode_ws_.Allocate(cfg.workspace_bytes, "decode attention workspace"));
  RETURN_IF_ERROR(CudaError(cuda::InitDecodeAttentionWorkspace(cfg, decode_ws_.get(), stream_),
                            "decode attention workspace"));
  decode_cfg_ = cfg;
  return absl::OkStatus();
}

absl::Status CudaBackend::Sample(const Tensor& logits, absl::Span<const SampleRow> rows,
                                 absl::Span<int32_t> tokens) {
  RETURN_IF_ERROR(NotInStep("Sample"));
  ASSIGN_OR_RETURN(const CudaTensor* lc, AsActivation(logits, "Sample logits"));
  const int64_t vocab = lc->cols();
  RETURN_IF_ERROR(CheckSampleArgs(lc->rows(), vocab, rows, tokens.size()));
  if (lc->rows() > std::numeric_limits<int>::max() / vocab) {
    return absl::UnimplementedError(absl::StrCat("Sample: logits [", lc->rows(), ", ", vocab,
                                                 "] (the device sort takes 2^31 entries)"));
  }
  std::vector<cuda::DeviceSampleRow> dev(rows.size());
  std::vector<int32_t> pen_ids, pen_counts;
  for (size_t i = 0; i < rows.size(); ++i) {
    const SamplingParams& p = rows[i].params;
    dev[i] = {rows[i].u,
              p.temperature,
              p.top_p,
              p.min_p,
              p.repetition_penalty,
              p.presence_penalty,
              p.frequency_penalty,
              p.top_k,
              static_cast<int32_t>(rows[i].penalty_ids.size()),
              static_cast<int64_t>(pen_ids.size())};
    pen_ids.insert(pen_ids.end(), rows[i].penalty_ids.begin(), rows[i].penalty_ids.end());
    pen_counts.insert(pen_counts.end(), rows[i].penalty_counts.begin(),
                      rows[i].penalty_counts.end());
  }
  return CudaError(
      cuda::SampleRows(lc->f32(), lc->rows(), vocab, dev.data(), pen_ids.data(), pen_counts.data(),
                       static_cast<int64_t>(pen_ids.size()), tokens.data(), &sample_, stream_),
      "Sample");
}

// A few rows (the last of each prompt): one device-to-device copy each.
absl::Status CudaBackend::GatherRows(const Tensor& x, absl::Span<const int64_t> rows, Tensor& out) {
  ASSIGN_OR_RETURN(const CudaTensor* xc, AsActivation(x, "GatherRows input"));
  ASSIGN_OR_RETURN(CudaTensor * o, AsActivation(out, "GatherRows output"));
  RETURN_IF_ERROR(CheckGatherRows(*xc, rows, *o));
  RETURN_IF_ERROR(NotInStep("GatherRows"));
  const int64_t cols = xc->cols();
  for (size_t i = 0; i < rows.size(); ++i) {
    RETURN_IF_ERROR(
        CudaError(cudaMemcpyAsync(o->f32() + i * cols, xc->f32() + rows[i] * cols,
                                  cols * sizeof(float), cudaMemcpyDeviceToDevice, stream_),
                  "GatherRows"));
  }
  return absl::OkStatus();
}

}  // namespace

CudaGraphStats GetCudaGraphStats(const Backend& backend) {
  const auto* cuda = dynamic_cast<const CudaBackend*>(&backend);
  return cuda != nullptr ? cuda->graph_stats() : CudaGraphStats{};
}

absl::StatusOr<std::unique_ptr<Backend>> NewCudaBackend(int device,
                                                        const CudaBackendOptions& options) {
  int count = 0;
  RETURN_IF_ERROR(CudaError(cudaGetDeviceCount(&count), "cudaGetDeviceCount"));
  if (device < 0 || device >= count) {
    return absl::NotFoundError(
        absl::StrCat("CUDA device ", device, " requested, ", count, " present"));
  }
  RETURN_IF_ERROR(CudaError(cudaSetDevice(device), absl::StrCat("cudaSetDevice(", device, ")")));
  // Activations come from the device's stream-ordered pool: keep what is freed for reuse.
  cudaMemPool_t mem_pool = nullptr;
  RETURN_IF_ERROR(CudaError(cudaDeviceGetDefaultMemPool(&mem_pool, device), "memory pool"));
  uint64_t keep = std::numeric_limits<uint64_t>::max();
  RETURN_IF_ERROR(CudaError(
      cudaMemPoolSetAttribute(mem_pool, cudaMemPoolAttrReleaseThreshold, &keep), "memory pool"));
  cudaStream_t stream = nullptr;
  RETURN_IF_ERROR(
      CudaError(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate"));
  cublasHandle_t cublas = nullptr;
  if (absl::Status s = CublasError(cublasCreate(&cublas), "cublasCreate"); !s.ok()) {
    cudaStreamDestroy(stream);
    return s;
  }
  // A workspace of its own: without one cuBLAS allocates while a step is being captured.
  constexpr int64_t kCublasWorkspace = 32 << 20;
  absl::StatusOr<std::unique_ptr<DeviceBuffer>> ws =
      DeviceBuffer::Create(kCublasWorkspace, "cuBLAS workspace");
  absl::Status s = ws.status();
  if (s.ok()) s = CublasError(cublasSetStream(cublas, stream), "cublasSetStream");
  if (s.ok()) {
    s = CublasError(cublasSetWorkspace(cublas, (*ws)->get(), kCublasWorkspace),
                    "cublasSetWorkspace");
  }
  if (!s.ok()) {
    cublasDestroy(cublas);
    cudaStreamDestroy(stream);
    return s;
  }
  return std::make_unique<CudaBackend>(stream, cublas, *std::move(ws), options);
}

}  // namespace moa
