// Default implementations of the Backend operations a backend may override to run faster.
#include "kernels/backend.h"

#include <cstddef>

#include "absl/status/status.h"
#include "kernels/backend_checks.h"
#include "kernels/status_macros.h"

namespace moa {

absl::Status Backend::RopeQK(Tensor& q, int n_heads, Tensor& k, int n_kv_heads, int head_dim,
                             absl::Span<const float> inv_freq, absl::Span<const int32_t> positions,
                             RopeLayout layout) {
  RETURN_IF_ERROR(Rope(q, n_heads, head_dim, inv_freq, positions, layout));
  return Rope(k, n_kv_heads, head_dim, inv_freq, positions, layout);
}

absl::Status Backend::AddRmsNorm(Tensor& x, const Tensor& y, const Tensor& weight, float eps,
                                 Tensor& out) {
  RETURN_IF_ERROR(Add(x, y));
  return RmsNorm(x, weight, eps, out);
}

absl::Status Backend::MatMuls(const Tensor& x, absl::Span<const Tensor* const> w,
                              absl::Span<Tensor* const> out) {
  RETURN_IF_ERROR(CheckMatMulsOutputs(w, out));
  for (size_t i = 0; i < w.size(); ++i) RETURN_IF_ERROR(MatMul(x, *w[i], *out[i]));
  return absl::OkStatus();
}

}  // namespace moa
