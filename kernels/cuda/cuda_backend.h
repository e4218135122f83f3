// The CUDA backend: weights dequantized to fp16 on the device at load (one-row weights such as
// norm scales stay fp32), fp32 activations in device memory, MatMul through cuBLAS (fp16 inputs,
// fp32 accumulation), the KV pool in device memory in fp16 with the CPU backend's block layout,
// replayable steps as CUDA graphs (kernels/cuda/step_graph.h).
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "kernels/backend.h"

namespace moa {

struct CudaBackendOptions {
  bool graphs = true;  // replay decode steps from CUDA graphs (Backend::BeginStep)
  // Entries the device block-table cache starts with (kernels/block_table_cache.h); it grows as
  // the tables in use need. Small values exercise its emptying and growth in tests.
  int64_t block_table_entries = int64_t{1} << 20;
};

// A backend on CUDA device `device`; an error if there is no such device or CUDA/cuBLAS cannot
// start on it.
absl::StatusOr<std::unique_ptr<Backend>> NewCudaBackend(int device,
                                                        const CudaBackendOptions& options = {});

// Steps captured into graphs and steps replayed from them so far (zeros for other backends).
struct CudaGraphStats {
  int64_t captures = 0;
  int64_t replays = 0;
  // Of the replays: host time spent preparing them (staging inputs) and device time running them.
  double replay_host_seconds = 0;
  double replay_device_seconds = 0;
  int64_t device_timed_replays = 0;  // replays counted in replay_device_seconds so far
  // Steps run without a graph (BeginStep .. EndStep) and their host time: the kernels enqueued,
  // not run (the device overlaps with it).
  int64_t direct_steps = 0;
  double direct_host_seconds = 0;
};
CudaGraphStats GetCudaGraphStats(const Backend& backend);

}  // namespace moa
