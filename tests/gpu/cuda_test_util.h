// Shared by the GPU tests (moa_gpu_tests), which run on another machine than the one they were
// built on: the repository root comes from MOA_SOURCE_DIR at run time.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
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

}  // namespace moa::gpu_test
