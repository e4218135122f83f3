// The entry points of libmoa_cuda_backend.so (see cuda_plugin.h): the only symbols it exports.
#include "kernels/cuda/cuda_plugin.h"

#include <cstdio>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kernels/cuda/cuda_backend.h"

extern "C" {

int moa_backend_plugin_abi_version() { return MOA_BACKEND_ABI; }

moa::Backend* moa_backend_plugin_new(int device, int* code, char* error, size_t error_size) {
  absl::StatusOr<std::unique_ptr<moa::Backend>> backend = moa::NewCudaBackend(device);
  if (backend.ok()) return backend->release();
  *code = static_cast<int>(backend.status().code());
  std::snprintf(error, error_size, "%s", std::string(backend.status().message()).c_str());
  return nullptr;
}
}
