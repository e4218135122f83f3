// Choosing a backend by name, for the programs' --device flags ("cpu" or "cuda").
//
// The CUDA backend is not linked into the programs: it is a plugin, libmoa_cuda_backend.so, loaded
// with dlopen() on first use (kernels/cuda/cuda_plugin.h says why). It is looked for at
//   $MOA_CUDA_PLUGIN, when set (that file only), else
//   <dir of the program>/../lib/libmoa_cuda_backend.so  (build/lib/, or lib/ beside bin/), then
//   <dir of the program>/libmoa_cuda_backend.so.
// The build puts it in build/lib/ wherever nvcc was found.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/backend.h"

namespace moa {

// Whether `device` names a backend at all, whether or not this build has it: a bad name is a
// usage error, a missing backend or GPU is a failure to start.
bool IsKnownDevice(absl::string_view device);

// "cpu": the CPU backend with `threads` threads (0 = all hardware threads). "cuda": the CUDA
// backend on device 0 from the plugin (`threads` unused); FAILED_PRECONDITION naming the paths
// tried when the plugin cannot be found or loaded (or is from another build), the CUDA error when
// no GPU can be used. Every error message starts with "--device cuda: ".
absl::StatusOr<std::unique_ptr<Backend>> NewBackend(absl::string_view device, int threads);

}  // namespace moa
