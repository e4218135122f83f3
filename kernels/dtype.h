// Element types of stored tensors, including llama.cpp's block-quantized formats.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "absl/status/statusor.h"

namespace moa {

enum class DType : uint8_t {
  kF32,
  kF16,
  kBF16,
  kQ8_0,
  kQ4_0,
  kQ4_1,
  kQ4_K,
  kQ5_K,
  kQ6_K,
};

// Elements per block and bytes per block; plain types are blocks of one element.
struct DTypeInfo {
  const char* name;
  int64_t block_elems;
  int64_t block_bytes;
};

const DTypeInfo& GetDTypeInfo(DType t);

// Bytes taken by `n` elements of type `t`; an error if `n` is not a whole number of blocks or
// the size overflows.
absl::StatusOr<int64_t> RowBytes(DType t, int64_t n);

}  // namespace moa
