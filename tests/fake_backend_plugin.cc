// A stand-in for libmoa_cuda_backend.so built everywhere, GPU or not, so that device_flag_test can
// drive the plugin loading of kernels/backend_factory.cc end to end: the same entry points
// (kernels/cuda/cuda_plugin.h) handing out a CPU backend. MOA_FAKE_PLUGIN picks a failure:
// "abi" reports another ABI version, "fail" fails to make a backend.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/status/status.h"
#include "kernels/backend.h"
#include "kernels/cuda/cuda_plugin.h"

namespace {

std::string Mode() {
  const char* mode = std::getenv("MOA_FAKE_PLUGIN");
  return mode == nullptr ? "" : mode;
}

}  // namespace

extern "C" {

int moa_backend_plugin_abi_version() {
  return Mode() == "abi" ? MOA_BACKEND_ABI + 1 : MOA_BACKEND_ABI;
}

moa::Backend* moa_backend_plugin_new(int device, int* code, char* error, size_t error_size) {
  if (Mode() == "fail") {
    *code = static_cast<int>(absl::StatusCode::kUnavailable);
    std::snprintf(error, error_size, "fake plugin: device %d is not there", device);
    return nullptr;
  }
  return moa::NewCpuBackend(1).release();
}
}
