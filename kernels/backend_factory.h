// Choosing a backend by name, for the programs' --device flags ("cpu" or "cuda").
//
// Header-only on purpose: kernels/*.cc build moa_kernels, which cannot link the CUDA backend
// (moa_cuda exists only where nvcc is). Every target that links moa_cuda gets the compile
// definition MOA_HAVE_CUDA from it (CMakeLists.txt), so this function is compiled with the same
// branch everywhere in one program, and a build without CUDA says so instead of failing to link.
#pragma once

#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "kernels/backend.h"
#ifdef MOA_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace moa {

// Whether `device` names a backend at all, whether or not this build has it: a bad name is a
// usage error, a missing backend or GPU is a failure to start.
inline bool IsKnownDevice(absl::string_view device) { return device == "cpu" || device == "cuda"; }

// "cpu": the CPU backend with `threads` threads (0 = all hardware threads). "cuda": the CUDA
// backend on device 0 (`threads` unused); FAILED_PRECONDITION in a build without it, the CUDA
// error when no GPU can be used.
inline absl::StatusOr<std::unique_ptr<Backend>> NewBackend(absl::string_view device, int threads) {
  if (device == "cpu") return NewCpuBackend(threads);
  if (device == "cuda") {
#ifdef MOA_HAVE_CUDA
    absl::StatusOr<std::unique_ptr<Backend>> backend = NewCudaBackend(0);
    if (!backend.ok()) {
      return absl::Status(backend.status().code(),
                          absl::StrCat("--device cuda: ", backend.status().message()));
    }
    return backend;
#else
    return absl::FailedPreconditionError(
        "--device cuda: this program was built without the CUDA backend");
#endif
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown device '", device, "': expected cpu or cuda"));
}

}  // namespace moa
