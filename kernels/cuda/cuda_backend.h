// The CUDA backend: weights dequantized to fp16 on the device at load (one-row weights such as
// norm scales stay fp32), fp32 activations in device memory, MatMul through cuBLAS (fp16 inputs,
// fp32 accumulation), the KV pool in device memory with the CPU backend's block layout.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "kernels/backend.h"

namespace moa {

// A backend on CUDA device `device`; an error if there is no such device or CUDA/cuBLAS cannot
// start on it.
absl::StatusOr<std::unique_ptr<Backend>> NewCudaBackend(int device);

}  // namespace moa
