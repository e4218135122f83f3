// Programmatic dependent launch (compute capability 9.0 and up): a kernel started with
// LaunchDependent may be scheduled while the kernel before it on the stream is still running,
// and waits in WaitForPriorGrid until that kernel has finished and its writes are visible. Each
// such kernel calls WaitForPriorGrid before it touches global memory, so results are those of
// plain stream order; what is saved is the gap between the two kernels (a decode step is
// hundreds of short kernels: docs/benchmarks-gpu-e2e.md). On older devices it is a plain launch.
#pragma once

#include <cuda_runtime.h>

namespace moa::cuda {

__device__ __forceinline__ void WaitForPriorGrid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

inline bool DependentLaunchSupported() {
  int device = 0, major = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
         major >= 9;
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
