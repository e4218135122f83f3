// Argument checks shared by every backend, so that all of them refuse the same inputs with the
// same messages (the GPU tests compare the CUDA backend's errors with the CPU backend's).
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "kernels/backend.h"

namespace moa {

// INVALID_ARGUMENT "<what> is [r, c], expected [rows, cols]" unless t has that shape.
absl::Status CheckShape(const Tensor& t, int64_t rows, int64_t cols, absl::string_view what);

// Backend::Attention's parameters and tensor shapes (everything but the block tables), for a KV
// pool whose blocks hold `pool_head_dim` values per position.
absl::Status CheckAttentionArgs(const Tensor& q, const Tensor& k, const Tensor& v,
                                const Tensor& out, const AttentionParams& p, int pool_head_dim);

}  // namespace moa
