// Shared by the GPU tests (moa_gpu_tests), which run on another machine than the one they were
// built on: the repository root comes from MOA_SOURCE_DIR at run time.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

// Fails the test (and returns from it) unless `expr` gives cudaSuccess.
#define CUDA_OK(expr)                                                          \
  do {                                                                         \
    cudaError_t err_ = (expr);                                                 \
    ASSERT_EQ(err_, cudaSuccess) << #expr << ": " << cudaGetErrorString(err_); \
  } while (0)

namespace moa::gpu_test {

// $MOA_SOURCE_DIR, else the current directory.
inline std::string SourceDir() {
  const char* env = std::getenv("MOA_SOURCE_DIR");
  return env != nullptr && *env != '\0' ? env : ".";
}

inline bool FileExists(const std::string& path) { return std::ifstream(path).good(); }

// Device memory holding a copy of a host vector, freed with the object.
template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  ~DeviceBuffer() { cudaFree(ptr); }
  cudaError_t Upload(const std::vector<T>& v) {
    cudaError_t e = cudaMalloc(&ptr, std::max<size_t>(1, v.size()) * sizeof(T));
    if (e == cudaSuccess && !v.empty()) {
      e = cudaMemcpy(ptr, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
    }
    return e;
  }
};

// Block tables as the attention kernels take them: pair p's entries are
// data[begin[p] .. begin[p] + len[p]).
struct PackedTables {
  std::vector<int64_t> begin;
  std::vector<int32_t> len;
  std::vector<int32_t> data;
};

// Moves every block of `tables` (logical ids 0, 1, ... ; -1 = none) to its own shuffled place
// among `num_blocks` pool blocks, in place, and packs the tables.
inline PackedTables ShuffleAndPack(std::vector<std::vector<int32_t>>& tables, int32_t num_blocks,
                                   std::mt19937& rng) {
  std::vector<int32_t> place(num_blocks);
  std::iota(place.begin(), place.end(), 0);
  std::shuffle(place.begin(), place.end(), rng);
  PackedTables packed;
  for (std::vector<int32_t>& table : tables) {
    packed.begin.push_back(static_cast<int64_t>(packed.data.size()));
    packed.len.push_back(static_cast<int32_t>(table.size()));
    for (int32_t& id : table) {
      if (id >= 0) id = place[id];
      packed.data.push_back(id);
    }
  }
  return packed;
}

}  // namespace moa::gpu_test
