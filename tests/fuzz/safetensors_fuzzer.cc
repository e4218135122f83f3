// libFuzzer target: arbitrary bytes as a safetensors file image.
#include <cstddef>
#include <cstdint>

#include "absl/types/span.h"
#include "engine/model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::StatusOr<moa::SafetensorsTensors> tensors =
      moa::ParseSafetensors(absl::MakeConstSpan(data, size), nullptr, "fuzz");
  if (!tensors.ok()) return 0;
  // Every accepted tensor must lie inside the input: touching its first and last byte lets
  // ASan catch a bounds bug.
  volatile uint8_t sink = 0;
  for (const auto& [name, t] : *tensors) {
    if (t.nbytes > 0) sink = sink + t.data[0] + t.data[t.nbytes - 1];
  }
  return 0;
}
