// Launch shapes shared by the element-wise kernels (cuda_kernels.cu, random_fill.cu), whose
// grid-stride loops take any grid.
#pragma once

#include <algorithm>
#include <cstdint>

namespace moa::cuda {

inline constexpr int kThreads = 256;
// Grid-stride loops cap the grid here; more blocks would only queue.
inline constexpr int64_t kMaxBlocks = int64_t{1} << 16;

inline unsigned GridFor(int64_t n) {
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min(kMaxBlocks, (n + kThreads - 1) / kThreads)));
}

}  // namespace moa::cuda
