#include "engine/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace moa {
namespace {

using nlohmann::json;

// Reads a JSON number that must be a non-negative integer representable as int64_t.
bool GetNonNegativeInt(const json& j, int64_t* out) {
  if (!j.is_number_unsigned()) return false;  // negative integers and floats are not unsigned
  const uint64_t u = j.get<uint64_t>();
  if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
  *out = static_cast<int64_t>(u);
  return true;
}

// A value for an error message, cut short: it comes from the file and can be arbitrarily big.
std::string Shown(const json& v) {
  constexpr size_t kMax = 80;
  std::string s = v.dump();
  if (s.size() > kMax) s = absl::StrCat(s.substr(0, kMax), "...");
  return s;
}

absl::StatusOr<DType> ParseDType(absl::string_view s) {
  if (s == "F32") return DType::kF32;
  if (s == "F16") return DType::kF16;
  if (s == "BF16") return DType::kBF16;
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported dtype \"", s, "\" (only F32, F16 and BF16 weights are supported)"));
}

struct Entry {
  std::string name;
  int64_t begin;
  int64_t end;
};

// Closes the file descriptor on every path out of ReadSafetensorsFile.
class FdCloser {
 public:
  explicit FdCloser(int fd) : fd_(fd) {}
  ~FdCloser() { ::close(fd_); }
  FdCloser(const FdCloser&) = delete;
  FdCloser& operator=(const FdCloser&) = delete;

 private:
  int fd_;
};

}  // namespace

absl::StatusOr<SafetensorsTensors> ParseSafetensors(absl::Span<const uint8_t> bytes,
                                                    std::shared_ptr<const void> owner,
                                                    std::string_view origin_std) {
  // This Abseil's StrCat takes absl::string_view, which is not std::string_view here.
  const absl::string_view origin(origin_std.data(), origin_std.size());
  const auto fail = [origin](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat("safetensors file ", origin, ": ", what));
  };
  const int64_t size = static_cast<int64_t>(bytes.size());
  if (size < 8) {
    return fail(absl::StrCat("truncated: ", size, " bytes, less than the 8-byte header length"));
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  if (header_len > static_cast<uint64_t>(kMaxSafetensorsHeaderBytes)) {
    return fail(absl::StrCat("header length ", header_len, " exceeds the limit of ",
                             kMaxSafetensorsHeaderBytes, " bytes"));
  }
  if (header_len > static_cast<uint64_t>(size - 8)) {
    return fail(absl::StrCat("truncated: header length ", header_len, " but only ", size - 8,
                             " bytes follow"));
  }
  const uint8_t* header_begin = bytes.data() + 8;
  const uint8_t* data = header_begin + header_len;
  const int64_t data_size = size - 8 - static_cast<int64_t>(header_len);

  const json header = json::parse(header_begin, data, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded()) return fail("header is not valid JSON");
  if (!header.is_object()) return fail("header is not a JSON object");

  SafetensorsTensors tensors;
  std::vector<Entry> entries;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") continue;
    const std::string where = absl::StrCat("tensor \"", name, "\"");
    if (!info.is_object()) return fail(absl::StrCat(where, ": entry is not an object"));
    const auto dtype_it = info.find("dtype");
    if (dtype_it == info.end() || !dtype_it->is_string()) {
      return fail(absl::StrCat(where, ": missing or non-string \"dtype\""));
    }
    absl::StatusOr<DType> dtype = ParseDType(dtype_it->get_ref<const std::string&>());
    if (!dtype.ok()) return fail(absl::StrCat(where, ": ", dtype.status().message()));

    const auto offsets_it = info.find("data_offsets");
    int64_t begin = 0;
    int64_t end = 0;
    if (offsets_it == info.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
        !GetNonNegativeInt((*offsets_it)[0], &begin) ||
        !GetNonNegativeInt((*offsets_it)[1], &end)) {
      return fail(absl::StrCat(where, ": \"data_offsets\" must be two non-negative integers"));
    }
    if (begin > end || end > data_size) {
      return fail(absl::StrCat(where, ": data_offsets [", begin, ", ", end,
                               ") outside the data section of ", data_size, " bytes"));
    }

    const auto shape_it = info.find("shape");
    if (shape_it == info.end() || !shape_it->is_array()) {
      return fail(absl::StrCat(where, ": missing or non-array \"shape\""));
    }
    const int64_t elem_bytes = GetDTypeInfo(*dtype).block_bytes;
    const int64_t nbytes = end - begin;
    // numel is checked against what the byte range can hold after every factor, so it never
    // overflows whatever the shape says.
    const int64_t max_elems = nbytes / elem_bytes;
    std::vector<int64_t> shape;
    int64_t numel = 1;
    for (const json& d : *shape_it) {
      int64_t dim = 0;
      if (!GetNonNegativeInt(d, &dim)) {
        return fail(absl::StrCat(where,
                                 ": shape has a dimension that is not a non-negative "
                                 "integer: ",
                                 Shown(d)));
      }
      if (dim != 0 && numel > max_elems / dim) {
        return fail(absl::StrCat(where, ": shape ", Shown(*shape_it), " needs more than the ",
                                 nbytes, " bytes of data_offsets [", begin, ", ", end, ")"));
      }
      numel *= dim;
      shape.push_back(dim);
    }
    if (numel * elem_bytes != nbytes) {
      return fail(absl::StrCat(where, ": shape ", Shown(*shape_it), " of ",
                               GetDTypeInfo(*dtype).name, " needs ", numel * elem_bytes,
                               " bytes but data_offsets [", begin, ", ", end, ") hold ", nbytes));
    }

    HostTensor t;
    t.name = name;
    t.dtype = *dtype;
    t.shape = std::move(shape);
    t.data = data + begin;
    t.nbytes = nbytes;
    t.owner = owner;
    tensors.emplace(name, std::move(t));
    entries.push_back({name, begin, end});
  }

  // Byte ranges must not overlap (empty tensors occupy nothing).
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const Entry* prev = nullptr;
  for (const Entry& e : entries) {
    if (e.begin == e.end) continue;
    if (prev != nullptr && e.begin < prev->end) {
      return fail(absl::StrCat("tensors \"", prev->name, "\" [", prev->begin, ", ", prev->end,
                               ") and \"", e.name, "\" [", e.begin, ", ", e.end,
                               ") overlap in the data section"));
    }
    prev = &e;
  }
  return tensors;
}

absl::StatusOr<SafetensorsTensors> ReadSafetensorsFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(
        absl::StrCat("cannot open safetensors file ", path, ": ", std::strerror(errno)));
  }
  FdCloser closer(fd);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    return absl::InternalError(absl::StrCat("cannot stat ", path, ": ", std::strerror(errno)));
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a regular file"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    return absl::InvalidArgumentError(absl::StrCat("safetensors file ", path, ": truncated: ", size,
                                                   " bytes, less than the 8-byte header length"));
  }
  void* addr = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (addr == MAP_FAILED) {
    return absl::InternalError(absl::StrCat("cannot mmap ", path, ": ", std::strerror(errno)));
  }
  std::shared_ptr<const void> mapping(
      addr, [size](const void* p) { ::munmap(const_cast<void*>(p), size); });
  return ParseSafetensors(absl::MakeConstSpan(static_cast<const uint8_t*>(addr), size), mapping,
                          path);
}

}  // namespace moa
