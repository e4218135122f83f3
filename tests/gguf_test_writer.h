// A small GGUF writer for the tests: builds valid files, and lets a test override any count,
// offset or type to build the malformed ones.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace moa::testing {

// Little-endian encoders for the pieces of a GGUF file.
template <typename T>
std::string Le(T v) {
  std::string s(sizeof(T), '\0');
  std::memcpy(s.data(), &v, sizeof(T));
  return s;
}
inline std::string GgufStr(const std::string& s) { return Le<uint64_t>(s.size()) + s; }

// Metadata and ggml type ids as in the file format.
enum GgufTypeId : uint32_t {
  kTU8 = 0,
  kTI8,
  kTU16,
  kTI16,
  kTU32,
  kTI32,
  kTF32,
  kTBool,
  kTString,
  kTArray,
  kTU64,
  kTI64,
  kTF64,
};
enum GgmlTypeId : uint32_t {
  kGgmlF32 = 0,
  kGgmlF16 = 1,
  kGgmlQ4_0 = 2,
  kGgmlQ4_1 = 3,
  kGgmlQ8_0 = 8,
  kGgmlQ4_K = 12,
  kGgmlQ5_K = 13,
  kGgmlQ6_K = 14,
  kGgmlBF16 = 30,
};

class GgufWriter {
 public:
  explicit GgufWriter(uint32_t version = 3) : version_(version) {}

  // A key-value pair whose value is already encoded (`payload` follows the type id).
  GgufWriter& Kv(const std::string& key, uint32_t type, const std::string& payload) {
    kvs_ += GgufStr(key) + Le<uint32_t>(type) + payload;
    ++n_kv_;
    return *this;
  }
  GgufWriter& U32(const std::string& key, uint32_t v) { return Kv(key, kTU32, Le(v)); }
  GgufWriter& I32(const std::string& key, int32_t v) { return Kv(key, kTI32, Le(v)); }
  GgufWriter& F32(const std::string& key, float v) { return Kv(key, kTF32, Le(v)); }
  GgufWriter& Bool(const std::string& key, bool v) { return Kv(key, kTBool, Le<uint8_t>(v)); }
  GgufWriter& Str(const std::string& key, const std::string& v) {
    return Kv(key, kTString, GgufStr(v));
  }
  GgufWriter& StrArray(const std::string& key, const std::vector<std::string>& v) {
    std::string body = Le<uint32_t>(kTString) + Le<uint64_t>(v.size());
    for (const std::string& s : v) body += GgufStr(s);
    return Kv(key, kTArray, body);
  }
  template <typename T>
  GgufWriter& Array(const std::string& key, uint32_t elem_type, const std::vector<T>& v) {
    std::string body = Le<uint32_t>(elem_type) + Le<uint64_t>(v.size());
    for (const T& x : v) body += Le(x);
    return Kv(key, kTArray, body);
  }

  // Sets general.alignment (as a uint32 key) and lays the data out with it.
  GgufWriter& Alignment(uint32_t a) {
    alignment_ = a;
    return U32("general.alignment", a);
  }

  // A tensor whose data is placed at the next aligned offset (or at `offset` when given; pass
  // empty data for an offset that should point past the end). `ne` is in ggml order (ne[0]
  // contiguous).
  GgufWriter& Tensor(const std::string& name, uint32_t ggml_type, std::vector<uint64_t> ne,
                     std::string data, std::optional<uint64_t> offset = std::nullopt) {
    tensors_.push_back({name, ggml_type, std::move(ne), std::move(data), offset});
    return *this;
  }

  // Overrides of the counts in the header.
  GgufWriter& TensorCount(uint64_t n) {
    tensor_count_ = n;
    return *this;
  }
  GgufWriter& KvCount(uint64_t n) {
    kv_count_ = n;
    return *this;
  }

  std::string Build() const {
    std::string out = "GGUF" + Le(version_) +
                      Le<uint64_t>(tensor_count_.value_or(tensors_.size())) +
                      Le<uint64_t>(kv_count_.value_or(n_kv_)) + kvs_;
    std::vector<uint64_t> offsets;
    uint64_t next = 0;
    for (const TensorEntry& t : tensors_) {
      const uint64_t off = t.offset.value_or(next);
      offsets.push_back(off);
      next = std::max(next, AlignUp(off + t.data.size()));
      out += GgufStr(t.name) + Le<uint32_t>(t.ne.size());
      for (uint64_t d : t.ne) out += Le(d);
      out += Le(t.ggml_type) + Le(off);
    }
    if (tensors_.empty()) return out;  // no data section, so no padding either
    out.resize(AlignUp(out.size()), '\0');
    std::string data;
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const std::string& d = tensors_[i].data;
      if (d.empty()) continue;
      if (data.size() < offsets[i] + d.size()) data.resize(offsets[i] + d.size(), '\0');
      data.replace(offsets[i], d.size(), d);
    }
    return out + data;
  }

 private:
  struct TensorEntry {
    std::string name;
    uint32_t ggml_type;
    std::vector<uint64_t> ne;
    std::string data;
    std::optional<uint64_t> offset;
  };
  uint64_t AlignUp(uint64_t v) const { return (v + alignment_ - 1) / alignment_ * alignment_; }

  uint32_t version_;
  uint64_t alignment_ = 32;
  std::string kvs_;
  uint64_t n_kv_ = 0;
  std::vector<TensorEntry> tensors_;
  std::optional<uint64_t> tensor_count_;
  std::optional<uint64_t> kv_count_;
};

}  // namespace moa::testing
