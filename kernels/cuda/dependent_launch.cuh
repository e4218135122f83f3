// Programmatic dependent launch (compute capability 9.0 and up): a kernel started with
// LaunchDependent may be scheduled while the kernel before it on the stream is still running,
// and waits in WaitForPriorGrid until that kernel has finished and its writes are visible. Each
// such kernel calls WaitForPriorGrid before it touches global memory, so results are those of
// plain stream order; what is saved is the gap between the two kernels (a decode step is
// hundreds of short kernels: docs/benchmarks-gpu-e2e.md). On older devices it is a plain launch.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace moa::cuda {

__device__ __forceinline__ void WaitForPriorGrid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Asked of the driver once per device: every kernel of a decode step is launched through here.
inline bool DependentLaunchSupported() {
  constexpr int kDevices = 64;
  static std::atomic<int8_t> known[kDevices] = {};  // 0: not asked yet, 1: no, 2: yes
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  const bool cached = device >= 0 && device < kDevices;
  if (cached && known[device].load(std::memory_order_relaxed) != 0) {
    return known[device].load(std::memory_order_relaxed) == 2;
  }
  const bool yes =
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
      major >= 9;
  if (cached) known[device].store(yes ? 2 : 1, std::memory_order_relaxed);
  return yes;
}

template <typename... Params, typename... Args>
cudaError_t LaunchDependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                            cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attr = {};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = DependentLaunchSupported() ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

}  // namespace moa::cuda
