// Reader for the safetensors format (Hugging Face): an 8-byte little-endian header length, a JSON
// header {name: {dtype, shape, data_offsets: [begin, end)}, "__metadata__": {...}}, then the data
// section the offsets point into. Only the float types the engine loads (F32, F16, BF16) are
// accepted; everything read from the file is bounds-checked before use.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/model/host_tensor.h"

namespace moa {

// Tensors by their name in the file.
using SafetensorsTensors = std::map<std::string, HostTensor>;

// Largest JSON header accepted: real headers are a few hundred KiB even for 400B-parameter
// shards, so anything bigger is a corrupt or hostile file.
inline constexpr int64_t kMaxSafetensorsHeaderBytes = int64_t{100} << 20;

// Parses a whole safetensors file image. The tensors view `bytes`; each holds a copy of `owner`,
// which must keep `bytes` alive. `origin` (a path) is used in error messages.
absl::StatusOr<SafetensorsTensors> ParseSafetensors(absl::Span<const uint8_t> bytes,
                                                    std::shared_ptr<const void> owner,
                                                    std::string_view origin);

// Memory-maps `path` read-only and parses it; the tensors keep the mapping alive.
absl::StatusOr<SafetensorsTensors> ReadSafetensorsFile(const std::string& path);

}  // namespace moa
