// Shared by the GPU tests that call the CUDA runtime directly.
#pragma once

#include <cuda_runtime.h>

#include "gtest/gtest.h"

// Fails the test (and returns from it) unless `expr` gives cudaSuccess.
#define CUDA_OK(expr)                                                          \
  do {                                                                         \
    cudaError_t err_ = (expr);                                                 \
    ASSERT_EQ(err_, cudaSuccess) << #expr << ": " << cudaGetErrorString(err_); \
  } while (0)
