// The C entry points of the CUDA backend plugin, libmoa_cuda_backend.so (a dlopen'ed MODULE).
//
// Why a plugin: cuBLASLt carries ~94 KB of static TLS. Linked into a program, glibc carves that
// out of every thread's stack, and the 100 KB stacks of civetweb (prometheus-cpp's HTTP server
// behind moa-server's /metrics) are then too small for its threads to start. A library loaded
// with dlopen() gets its TLS allocated on demand instead. kernels/backend_factory.cc loads it.
//
// Everything else in the plugin is hidden, so its copies of moa_kernels and friends never clash
// with the program's. Across the boundary go only plain C values and a moa::Backend*, so the
// program and the plugin must agree on the Backend interface: the plugin exports the ABI version
// it was built with (MOA_BACKEND_ABI, a hash of the interface headers computed by CMake), and the
// program refuses a plugin whose version differs from its own.
#pragma once

#include <cstddef>

#include "kernels/backend.h"

#define MOA_PLUGIN_EXPORT __attribute__((visibility("default")))

extern "C" {

// MOA_BACKEND_ABI of the plugin's build.
MOA_PLUGIN_EXPORT int moa_backend_plugin_abi_version();

// A backend on CUDA device `device`, owned by the caller (delete it through the pointer; its
// code lives in the plugin, which must then stay loaded). On failure returns null, sets *code to
// the absl::StatusCode and writes the message, NUL-terminated and cut to error_size bytes, to
// `error`.
MOA_PLUGIN_EXPORT moa::Backend* moa_backend_plugin_new(int device, int* code, char* error,
                                                       size_t error_size);
}

namespace moa {

inline constexpr char kCudaPluginFile[] = "libmoa_cuda_backend.so";
inline constexpr char kPluginAbiSymbol[] = "moa_backend_plugin_abi_version";
inline constexpr char kPluginNewSymbol[] = "moa_backend_plugin_new";
using PluginAbiFn = int (*)();
using PluginNewFn = Backend* (*)(int, int*, char*, size_t);

}  // namespace moa
