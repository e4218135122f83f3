// A tensor as stored in a model file, in host memory (usually a view into a memory-mapped file).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/dtype.h"

namespace moa {

struct HostTensor {
  std::string name;
  DType dtype = DType::kF32;
  // Outermost dimension first; the last dimension is contiguous. A weight matrix of a linear
  // layer is {out_features, in_features} (GGUF's ne[] reversed).
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  int64_t nbytes = 0;
  // Keeps `data` alive (a mapping or a buffer).
  std::shared_ptr<const void> owner;

  int64_t NumElements() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

}  // namespace moa
