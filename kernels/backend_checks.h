// Argument checks shared by every backend, so that all of them refuse the same inputs with the
// same messages (the GPU tests compare the CUDA backend's errors with the CPU backend's).
#pragma once

#include <cstdint>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "kernels/backend.h"

namespace moa {

// A weight as a backend stores it: rows of `cols` elements of t.dtype, `row_bytes` bytes each.
struct WeightLayout {
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_bytes = 0;
};
// Checks that `t` is a weight a backend can load (rank 1..4, positive sizes, whole blocks, enough
// bytes, data present) and flattens it: the last dimension is the row, the others multiply.
absl::StatusOr<WeightLayout> CheckWeight(const HostTensor& t);

// Backend::MatMuls' lists: as many outputs as weights, none null, no output twice.
absl::Status CheckMatMulsOutputs(absl::Span<const Tensor* const> w, absl::Span<Tensor* const> out);

// INVALID_ARGUMENT "<what> is [r, c], expected [rows, cols]" unless t has that shape.
absl::Status CheckShape(const Tensor& t, int64_t rows, int64_t cols, absl::string_view what);

// Backend::Attention's parameters and tensor shapes (everything but the block tables), for a KV
// pool whose blocks hold `pool_head_dim` values per position.
// A slice's table_versions: empty or one per KV head (SequenceSlice). `index` names the slice.
absl::Status CheckTableVersions(const SequenceSlice& s, size_t index, int n_kv_heads);
absl::Status CheckAttentionArgs(const Tensor& q, const Tensor& k, const Tensor& v,
                                const Tensor& out, const AttentionParams& p, int pool_head_dim);

// `t` as a backend's own tensor type T (which has is_activation()), or INVALID_ARGUMENT
// "<what>: not a <backend> tensor" naming the backend ("CPU", "CUDA").
template <typename T>
absl::StatusOr<const T*> AsBackendTensor(const Tensor& t, absl::string_view what,
                                         absl::string_view backend) {
  const auto* c = dynamic_cast<const T*>(&t);
  if (c == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": not a ", backend, " tensor"));
  }
  return c;
}
// The same for an activation: "<what>: not a <backend> activation" for anything else.
template <typename T>
absl::StatusOr<T*> AsBackendActivation(
    std::conditional_t<std::is_const_v<T>, const Tensor, Tensor>& t, absl::string_view what,
    absl::string_view backend) {
  auto* c = dynamic_cast<T*>(&t);
  if (c == nullptr || !c->is_activation()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": not a ", backend, " activation"));
  }
  return c;
}

// Backend::GatherRows's arguments: out is [rows.size(), x.cols()], every index a row of x.
absl::Status CheckGatherRows(const Tensor& x, absl::Span<const int64_t> rows, const Tensor& out);

}  // namespace moa
