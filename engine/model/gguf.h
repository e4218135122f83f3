// A reader for GGUF files (versions 2 and 3, little-endian), llama.cpp's model format.
//
// The file is memory-mapped read-only and nothing is copied: keys, strings, array contents and
// tensor data are views into the mapping, which the GgufFile (and every HostTensor it hands
// out) keeps alive. Parsing checks every count, length, dimension and offset against the bytes
// actually present before using it, so a malformed file is an error, never a crash or a huge
// allocation.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/model/host_tensor.h"
#include "kernels/dtype.h"

namespace moa {

// Metadata value types, numbered as in the file (gguf_type).
enum class GgufType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

absl::string_view GgufTypeName(GgufType t);

// One metadata value, already validated. Scalars are decoded; arrays stay encoded (`body`) and
// are decoded on demand by GgufArrayElements or the typed accessors of GgufFile.
struct GgufValue {
  GgufType type = GgufType::kUint8;
  uint64_t u = 0;                         // kUint8/16/32/64, kBool (0 or 1)
  int64_t i = 0;                          // kInt8/16/32/64
  double f = 0.0;                         // kFloat32/64
  absl::string_view str;                  // kString
  GgufType elem_type = GgufType::kUint8;  // kArray: element type
  uint64_t count = 0;                     // kArray: number of elements
  absl::string_view body;                 // kArray: the encoded elements
};

// The elements of an array value, decoded one level deep (nested arrays stay encoded). Each
// element becomes a GgufValue: for long numeric or string arrays the typed accessors of
// GgufFile use far less memory.
absl::StatusOr<std::vector<GgufValue>> GgufArrayElements(const GgufValue& array);

struct GgufTensorInfo {
  absl::string_view name;
  uint32_t ggml_type = 0;  // the type id as stored
  DType dtype = DType::kF32;
  int n_dims = 0;
  std::array<int64_t, 4> ne = {1, 1, 1, 1};  // ggml order: ne[0] is contiguous
  uint64_t offset = 0;                       // from the start of the data section
  int64_t nbytes = 0;
};

class GgufFile {
 public:
  // Maps and parses the file at `path`.
  static absl::StatusOr<GgufFile> Open(const std::string& path);
  // Parses a file held in memory; `name` is used in error messages.
  static absl::StatusOr<GgufFile> Parse(std::string bytes, std::string name = "<buffer>");

  const std::string& name() const { return name_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }

  // Metadata in file order.
  const std::vector<std::pair<absl::string_view, GgufValue>>& metadata() const { return kv_; }
  const GgufValue* Find(absl::string_view key) const;
  bool Has(absl::string_view key) const { return Find(key) != nullptr; }

  // Typed accessors: NotFound when the key is absent, InvalidArgument when the value has another
  // type or does not fit. Integers of any width and signedness convert when the value is in
  // range; float32 and float64 convert to each other; nothing else converts.
  absl::StatusOr<uint32_t> GetU32(absl::string_view key) const;
  absl::StatusOr<int32_t> GetI32(absl::string_view key) const;
  absl::StatusOr<uint64_t> GetU64(absl::string_view key) const;
  absl::StatusOr<int64_t> GetI64(absl::string_view key) const;
  absl::StatusOr<float> GetF32(absl::string_view key) const;
  absl::StatusOr<double> GetF64(absl::string_view key) const;
  absl::StatusOr<bool> GetBool(absl::string_view key) const;
  absl::StatusOr<std::string> GetString(absl::string_view key) const;
  absl::StatusOr<std::vector<std::string>> GetStringArray(absl::string_view key) const;
  absl::StatusOr<std::vector<float>> GetF32Array(absl::string_view key) const;
  absl::StatusOr<std::vector<int32_t>> GetI32Array(absl::string_view key) const;

  // Tensor infos in file order.
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* FindTensor(absl::string_view name) const;
  // A view of the tensor's data; the shape is ne[] reversed (last dimension contiguous).
  HostTensor TensorView(const GgufTensorInfo& t) const;

 private:
  GgufFile() = default;
  absl::Status ParseContents();
  absl::StatusOr<const GgufValue*> Lookup(absl::string_view key) const;

  std::string name_;
  std::shared_ptr<const void> owner_;  // the mapping or the buffer
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<std::pair<absl::string_view, GgufValue>> kv_;
  absl::flat_hash_map<absl::string_view, size_t> kv_index_;
  std::vector<GgufTensorInfo> tensors_;
  absl::flat_hash_map<absl::string_view, size_t> tensor_index_;
};

}  // namespace moa
