#include "kernels/backend_checks.h"

#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/status_macros.h"

namespace moa {

absl::StatusOr<WeightLayout> CheckWeight(const HostTensor& t) {
  if (t.shape.empty() || t.shape.size() > 4) {
    return absl::InvalidArgumentError(
        absl::StrCat("weight ", t.name, ": rank ", t.shape.size(), " is not 1..4"));
  }
  WeightLayout w;
  w.rows = 1;
  for (size_t i = 0; i + 1 < t.shape.size(); ++i) {
    if (t.shape[i] <= 0 || w.rows > std::numeric_limits<int64_t>::max() / t.shape[i]) {
      return absl::InvalidArgumentError(absl::StrCat("weight ", t.name, ": bad shape"));
    }
    w.rows *= t.shape[i];
  }
  w.cols = t.shape.back();
  if (w.cols <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("weight ", t.name, ": ", w.cols, " columns"));
  }
  absl::StatusOr<int64_t> row_bytes = RowBytes(t.dtype, w.cols);
  if (!row_bytes.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("weight ", t.name, ": ", row_bytes.status().message()));
  }
  w.row_bytes = *row_bytes;
  if (w.row_bytes > 0 && w.rows > t.nbytes / w.row_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("weight ", t.name, ": ", t.nbytes,
                                                   " bytes cannot hold ", w.rows, " rows of ",
                                                   w.row_bytes));
  }
  if (t.data == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("weight ", t.name, ": no data"));
  }
  return w;
}

absl::Status CheckShape(const Tensor& t, int64_t rows, int64_t cols, absl::string_view what) {
  if (t.rows() != rows || t.cols() != cols) {
    return absl::InvalidArgumentError(absl::StrCat(what, " is [", t.rows(), ", ", t.cols(),
                                                   "], expected [", rows, ", ", cols, "]"));
  }
  return absl::OkStatus();
}

absl::Status CheckTableVersions(const SequenceSlice& s, size_t index, int n_kv_heads) {
  if (s.table_versions.empty() || static_cast<int>(s.table_versions.size()) == n_kv_heads) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat("Attention: sequence ", index, ": ",
                                                 s.table_versions.size(), " table versions for ",
                                                 n_kv_heads, " kv heads"));
}

absl::Status CheckAttentionArgs(const Tensor& q, const Tensor& k, const Tensor& v,
                                const Tensor& out, const AttentionParams& p, int pool_head_dim) {
  if (p.n_heads <= 0 || p.n_kv_heads <= 0 || p.head_dim <= 0 || p.n_heads % p.n_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Attention: ", p.n_heads, " heads, ", p.n_kv_heads, " kv heads, head_dim ", p.head_dim));
  }
  if (pool_head_dim != p.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat("Attention: KV pool of head_dim ", pool_head_dim,
                                                   " for head_dim ", p.head_dim));
  }
  if (!p.rules.empty() && static_cast<int>(p.rules.size()) != p.n_kv_heads) {
    return absl::InvalidArgumentError(
        absl::StrCat("Attention: ", p.rules.size(), " span rules for ", p.n_kv_heads, " kv heads"));
  }
  if (p.span.sink < 0 || p.span.block <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Attention: span sink ", p.span.sink, ", block ", p.span.block));
  }
  const int64_t rows = q.rows();
  const int64_t q_cols = int64_t{p.n_heads} * p.head_dim;
  const int64_t kv_cols = int64_t{p.n_kv_heads} * p.head_dim;
  if (absl::Status s = CheckShape(k, rows, kv_cols, "Attention k"); !s.ok()) return s;
  if (absl::Status s = CheckShape(v, rows, kv_cols, "Attention v"); !s.ok()) return s;
  if (absl::Status s = CheckShape(q, rows, q_cols, "Attention q"); !s.ok()) return s;
  return CheckShape(out, rows, q_cols, "Attention output");
}

absl::Status CheckGatherRows(const Tensor& x, absl::Span<const int64_t> rows, const Tensor& out) {
  RETURN_IF_ERROR(
      CheckShape(out, static_cast<int64_t>(rows.size()), x.cols(), "GatherRows output"));
  for (int64_t r : rows) {
    if (r < 0 || r >= x.rows()) {
      return absl::InvalidArgumentError(
          absl::StrCat("GatherRows: row ", r, " outside [0, ", x.rows(), ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckMatMulsOutputs(absl::Span<const Tensor* const> w, absl::Span<Tensor* const> out) {
  if (w.size() != out.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("MatMuls: ", w.size(), " weights for ", out.size(), " outputs"));
  }
  for (size_t i = 0; i < out.size(); ++i) {
    if (w[i] == nullptr || out[i] == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("MatMuls: no tensor at ", i));
    }
    for (size_t j = 0; j < i; ++j) {
      if (out[j] == out[i]) {
        return absl::InvalidArgumentError(
            absl::StrCat("MatMuls: outputs ", j, " and ", i, " are the same tensor"));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace moa
