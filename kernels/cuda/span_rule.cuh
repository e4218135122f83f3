// The keys a query sees under a span rule, on the device: the host's VisibleKeysAt
// (kernels/attention_span.h) with the same double product and floor, so that both agree to the
// key. Shared by the kernels that take rules (cuda_kernels.cu, decode_attention.cu).
#pragma once

#include <cstdint>

#include "kernels/cuda/prefill_attention.h"

namespace moa::cuda {

// The visible keys of a query at `pos` under `r`: [0, *sink_end) and [*win_begin, pos] with
// *win_begin >= *sink_end ("every key": both 0).
__device__ __forceinline__ void VisibleKeys(const DeviceSpanRule& r, int32_t sink, int64_t pos,
                                            int64_t* sink_end, int64_t* win_begin) {
  const int64_t n = pos + 1;
  *sink_end = 0;
  *win_begin = 0;
  if (r.dense) return;
  const int64_t span = max(static_cast<int64_t>(r.alpha_tokens) +
                               static_cast<int64_t>(floor(r.beta * static_cast<double>(n))),
                           static_cast<int64_t>(r.min_span));
  if (span >= n) return;
  *sink_end = min(static_cast<int64_t>(sink), n);
  *win_begin = max(n - (span - sink), *sink_end);
}

}  // namespace moa::cuda
