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

namespace moa {

// A 2-D tensor resident on a backend: a weight in whatever format the backend chose, or an
// activation [rows, cols] in the backend's compute precision.
class Tensor {
 public:
  virtual ~Tensor() = default;
  virtual int64_t rows() const = 0;
  virtual int64_t cols() const = 0;
};

// Keys and values of one sequence, for every layer and KV head, positions 0..capacity-1.
class KvCache {
 public:
  virtual ~KvCache() = default;
  virtual int64_t capacity() const = 0;
};

struct KvCacheShape {
  int n_layers = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int64_t capacity = 0;  // tokens
};

// One sequence's share of a batched step: its rows in the activations are consecutive, in the
// order the sequences are listed; its new tokens take positions past .. past + n_new - 1.
struct SequenceSlice {
  KvCache* cache = nullptr;
  int64_t past = 0;
  int64_t n_new = 0;
};

struct AttentionParams {
  int layer = 0;
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
  // Rotates each head of x[rows, n_heads * head_dim] in place; row i is at positions[i].
  // inv_freq has head_dim / 2 entries (scaling already applied by the engine).
  virtual absl::Status Rope(Tensor& x, int n_heads, int head_dim, absl::Span<const float> inv_freq,
                            absl::Span<const int32_t> positions, RopeLayout layout) = 0;
  // out = silu(gate) * up.
  virtual absl::Status SwiGlu(const Tensor& gate, const Tensor& up, Tensor& out) = 0;
  // x += y.
  virtual absl::Status Add(Tensor& x, const Tensor& y) = 0;

  virtual absl::StatusOr<std::unique_ptr<KvCache>> NewKvCache(const KvCacheShape& shape) = 0;
  // Writes k, v [rows, n_kv_heads * head_dim] (keys already rotated) into each sequence's cache at
  // its new positions, then computes out[rows, n_heads * head_dim] = causal attention of q
  // [rows, n_heads * head_dim] over the cache, each KV head restricted by its span rule.
  virtual absl::Status Attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                 absl::Span<const SequenceSlice> seqs, const AttentionParams& p,
                                 Tensor& out) = 0;
};

// The CPU backend; n_threads <= 0 means one per hardware thread.
std::unique_ptr<Backend> NewCpuBackend(int n_threads);

}  // namespace moa
