#include "kernels/dtype.h"

#include <limits>

#include "absl/strings/str_cat.h"

namespace moa {

const DTypeInfo& GetDTypeInfo(DType t) {
  // Block layouts follow ggml (ggml-common.h): QK4_0 = QK4_1 = QK8_0 = 32, QK_K = 256.
  static constexpr DTypeInfo kInfo[] = {
      {"F32", 1, 4},      {"F16", 1, 2},      {"BF16", 1, 2},
      {"Q8_0", 32, 34},   {"Q4_0", 32, 18},   {"Q4_1", 32, 20},
      {"Q4_K", 256, 144}, {"Q5_K", 256, 176}, {"Q6_K", 256, 210},
  };
  return kInfo[static_cast<int>(t)];
}

absl::StatusOr<int64_t> RowBytes(DType t, int64_t n) {
  const DTypeInfo& info = GetDTypeInfo(t);
  if (n < 0 || n % info.block_elems != 0) {
    return absl::InvalidArgumentError(absl::StrCat(n, " elements is not a whole number of ",
                                                   info.name, " blocks of ", info.block_elems));
  }
  const int64_t blocks = n / info.block_elems;
  if (blocks > std::numeric_limits<int64_t>::max() / info.block_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("tensor of ", n, " elements is too large"));
  }
  return blocks * info.block_bytes;
}

}  // namespace moa
