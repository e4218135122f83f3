// The compute behind the engine. The engine's Llama forward pass (engine/llama_model.cc) is a
// sequence of these operations; a backend owns the memory they run on. The CPU backend is the
// reference every other backend is tested against.
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/model/host_tensor.h"
#include "engine/model/model_config.h"
#include "kernels/attention_span.h"
#include "kernels/sampling.h"

namespace moa {

// A 2-D tensor resident on a backend: a weight in whatever format the backend chose, or an
// activation [rows, cols] in the backend's compute precision.
class Tensor {
 public:
  virtual ~Tensor() = default;
  virtual int64_t rows() const = 0;
  virtual int64_t cols() const = 0;
};

// Keys and values in fixed-size blocks, in backend memory. A block holds `block_size` consecutive
// positions of ONE (layer, KV head) of one sequence: keys [block_size, head_dim] and values
// [block_size, head_dim]. Which block backs what is the KV cache manager's bookkeeping
// (kvcache/); the kernels only follow the block tables they are given.
class KvPool {
 public:
  virtual ~KvPool() = default;
  virtual int32_t num_blocks() const = 0;
  virtual int32_t block_size() const = 0;
  virtual int head_dim() const = 0;
};

// One sequence's share of a batched step: its rows in the activations are consecutive, in the
// order the sequences are listed; its new tokens take positions past .. past + n_new - 1.
// block_tables has one table per KV head of the layer being computed: entry b is the pool block
// that holds positions [b * block_size, (b + 1) * block_size) of that head, -1 where none does.
// (Tables are plain int32 arrays so that a GPU backend can upload them as they are.)
//
// table_versions is empty or has one entry per table. It lets a device backend keep its own copy
// of the tables across calls and send only what changed, instead of every table every step:
// tables with the same non-zero id are the same table (one KV head of one layer of one
// sequence), and while its version stays the same its entries stay the same. Id 0: a table
// without identity, read afresh. KvCacheManager's tables carry ids unique in the process.
struct TableVersion {
  uint64_t id = 0;
  uint64_t version = 0;
};
struct SequenceSlice {
  int64_t past = 0;
  int64_t n_new = 0;
  absl::Span<const absl::Span<const int32_t>> block_tables;
  absl::Span<const TableVersion> table_versions;
};

struct AttentionParams {
  int layer = 0;  // for error messages; the block tables already name the layer's blocks
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  float scale = 1.0f;  // usually 1/sqrt(head_dim)
  SpanParams span;
  absl::Span<const SpanRule> rules;  // one per KV head of this layer; empty = all dense
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string_view name() const = 0;

  // A weight for MatMul / Embed / RmsNorm, converted to the backend's storage format (the CPU
  // backend keeps quantized blocks as they are). 1-D tensors become one row.
  virtual absl::StatusOr<std::unique_ptr<Tensor>> LoadWeight(const HostTensor& t) = 0;
  // A random weight [rows, cols], made where it lives (a 7B-shaped model need not exist on the
  // host): what LoadWeight makes of an F16 tensor of that shape whose element i is
  // RandomUniform(RandomKey(seed), i, scale, offset) (kernels/random_fill.h) rounded to fp16,
  // i.e. uniform in [offset - scale, offset + scale). Every backend gives the same values.
  virtual absl::StatusOr<std::unique_ptr<Tensor>> RandomWeight(int64_t rows, int64_t cols,
                                                               uint64_t seed, float scale,
                                                               float offset) = 0;
  // An uninitialised activation [rows, cols].
  virtual absl::StatusOr<std::unique_ptr<Tensor>> NewActivation(int64_t rows, int64_t cols) = 0;
  virtual absl::Status CopyToHost(const Tensor& t, absl::Span<float> out) = 0;
  virtual absl::Status CopyFromHost(absl::Span<const float> in, Tensor& t) = 0;

  // out[i] = table row tokens[i].
  virtual absl::Status Embed(const Tensor& table, absl::Span<const int32_t> tokens,
                             Tensor& out) = 0;
  // out = x / rms(x) * weight, row by row.
  virtual absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) = 0;
  // out[rows, w.rows] = x[rows, w.cols] · wᵀ.
  virtual absl::Status MatMul(const Tensor& x, const Tensor& w, Tensor& out) = 0;
  // out[i] = x · w[i]ᵀ for each i, on one input (q, k and v; gate and up), which a backend may
  // run as one batch. No two outputs may be the same tensor. The default runs MatMul for each.
  virtual absl::Status MatMuls(const Tensor& x, absl::Span<const Tensor* const> w,
                               absl::Span<Tensor* const> out);
  // Rotates each head of x[rows, n_heads * head_dim] in place; row i is at positions[i].
  // inv_freq has head_dim / 2 entries (scaling already applied by the engine).
  virtual absl::Status Rope(Tensor& x, int n_heads, int head_dim, absl::Span<const float> inv_freq,
                            absl::Span<const int32_t> positions, RopeLayout layout) = 0;
  // Rope on q [rows, n_heads * head_dim] and on k [rows, n_kv_heads * head_dim] with the same
  // positions, frequencies and layout, which a backend may do in one pass. The default runs Rope
  // on q, then on k.
  virtual absl::Status RopeQK(Tensor& q, int n_heads, Tensor& k, int n_kv_heads, int head_dim,
                              absl::Span<const float> inv_freq, absl::Span<const int32_t> positions,
                              RopeLayout layout);
  // out = silu(gate) * up.
  virtual absl::Status SwiGlu(const Tensor& gate, const Tensor& up, Tensor& out) = 0;
  // x += y.
  virtual absl::Status Add(Tensor& x, const Tensor& y) = 0;
  // x += y, then out = RmsNorm(x, weight): a residual add and the norm after it, which a backend
  // may do in one pass over x. The default runs Add, then RmsNorm.
  virtual absl::Status AddRmsNorm(Tensor& x, const Tensor& y, const Tensor& weight, float eps,
                                  Tensor& out);

  // A pool of num_blocks KV blocks (see KvPool); contents uninitialised.
  virtual absl::StatusOr<std::unique_ptr<KvPool>> NewKvPool(int32_t num_blocks, int32_t block_size,
                                                            int head_dim) = 0;
  // Memory one KV block takes in this backend (keys and values).
  virtual int64_t KvBlockBytes(int32_t block_size, int head_dim) const = 0;
  // Writes k, v [rows, n_kv_heads * head_dim] (keys already rotated) into the pool blocks of each
  // sequence's new positions, then computes out[rows, n_heads * head_dim] = causal attention of q
  // [rows, n_heads * head_dim] over the cached keys, each KV head restricted by its span rule.
  // Reads only the keys a head's span makes visible, through the block tables; a block missing
  // from a table where a new row is written or a visible key lives is an INTERNAL error.
  virtual absl::Status Attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                 absl::Span<const SequenceSlice> seqs, const AttentionParams& p,
                                 KvPool& pool, Tensor& out) = 0;
  // out[i] = x[rows[i]] (each index in [0, x.rows())).
  virtual absl::Status GatherRows(const Tensor& x, absl::Span<const int64_t> rows, Tensor& out) = 0;

  // Replayable steps. Between BeginStep(key) and EndStep() the caller runs, for a given key, the
  // same operations on tensors of the same shapes every time (decode steps of one batch size);
  // only host inputs (tokens, positions, block tables) change, and no CopyToHost / CopyFromHost
  // happens in between. A backend may record the first such step and replay it afterwards (the
  // CUDA backend: CUDA graphs); results are available after EndStep. ABORTED from any operation
  // or EndStep means nothing of the step ran and the caller should run it once more; after any
  // other error the caller calls CancelStep. Backends without replay run every step directly.
  virtual absl::Status BeginStep(int64_t key) { return absl::OkStatus(); }
  virtual absl::Status EndStep() { return absl::OkStatus(); }
  virtual void CancelStep() {}

  // tokens[i] = the token SampleWithUniform (kernels/sampling.h) picks from row i of `logits`
  // [rows.size(), vocab] under rows[i]; `logits` is left unchanged. A backend may pick another
  // token only where rounding moves a boundary of the cumulative distribution past u (see
  // kernels/sampling.h). The default copies the logits to the host and picks there; a device
  // backend overrides it so that only the tokens come back. Not inside BeginStep / EndStep.
  virtual absl::Status Sample(const Tensor& logits, absl::Span<const SampleRow> rows,
                              absl::Span<int32_t> tokens);
};

// The CPU backend; n_threads <= 0 means one per hardware thread.
std::unique_ptr<Backend> NewCpuBackend(int n_threads);

}  // namespace moa
