#include "engine/model/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"

namespace moa {
namespace {

constexpr int kMaxDims = 4;        // GGML_MAX_DIMS
constexpr int kMaxArrayDepth = 8;  // nesting of arrays of arrays; bounds the parser's recursion
constexpr uint64_t kDefaultAlignment = 32;

bool IsKnownType(uint32_t t) { return t <= static_cast<uint32_t>(GgufType::kFloat64); }

// Encoded size of a fixed-size value, or 0 for strings and arrays.
uint64_t FixedSize(GgufType t) {
  switch (t) {
    case GgufType::kUint8:
    case GgufType::kInt8:
    case GgufType::kBool:
      return 1;
    case GgufType::kUint16:
    case GgufType::kInt16:
      return 2;
    case GgufType::kUint32:
    case GgufType::kInt32:
    case GgufType::kFloat32:
      return 4;
    case GgufType::kUint64:
    case GgufType::kInt64:
    case GgufType::kFloat64:
      return 8;
    case GgufType::kString:
    case GgufType::kArray:
      return 0;
  }
  return 0;
}

// The fewest bytes one value of type `t` can take: used to refuse counts the file cannot hold
// before looping over them.
uint64_t MinEncodedSize(GgufType t) {
  if (t == GgufType::kString) return 8;     // length
  if (t == GgufType::kArray) return 4 + 8;  // element type + count
  return FixedSize(t);
}

bool IsUnsigned(GgufType t) {
  return t == GgufType::kUint8 || t == GgufType::kUint16 || t == GgufType::kUint32 ||
         t == GgufType::kUint64;
}
bool IsSigned(GgufType t) {
  return t == GgufType::kInt8 || t == GgufType::kInt16 || t == GgufType::kInt32 ||
         t == GgufType::kInt64;
}
bool IsFloat(GgufType t) { return t == GgufType::kFloat32 || t == GgufType::kFloat64; }

// ggml type ids (enum ggml_type) of the formats this engine reads.
std::optional<DType> DTypeFromGgml(uint32_t id) {
  switch (id) {
    case 0:
      return DType::kF32;
    case 1:
      return DType::kF16;
    case 2:
      return DType::kQ4_0;
    case 3:
      return DType::kQ4_1;
    case 8:
      return DType::kQ8_0;
    case 12:
      return DType::kQ4_K;
    case 13:
      return DType::kQ5_K;
    case 14:
      return DType::kQ6_K;
    case 30:
      return DType::kBF16;
    default:
      return std::nullopt;
  }
}

// Names of ggml types that exist but that this engine does not read, for clearer errors.
absl::string_view UnsupportedGgmlTypeName(uint32_t id) {
  static constexpr std::pair<uint32_t, absl::string_view> kNames[] = {
      {6, "Q5_0"},    {7, "Q5_1"},     {9, "Q8_1"},    {10, "Q2_K"},    {11, "Q3_K"},
      {15, "Q8_K"},   {16, "IQ2_XXS"}, {17, "IQ2_XS"}, {18, "IQ3_XXS"}, {19, "IQ1_S"},
      {20, "IQ4_NL"}, {21, "IQ3_S"},   {22, "IQ2_S"},  {23, "IQ4_XS"},  {24, "I8"},
      {25, "I16"},    {26, "I32"},     {27, "I64"},    {28, "F64"},     {29, "IQ1_M"},
      {34, "TQ1_0"},  {35, "TQ2_0"},   {39, "MXFP4"},
  };
  for (const auto& [k, name] : kNames) {
    if (k == id) return name;
  }
  return {};
}

// Sequential little-endian reader over [begin, end) of a buffer; `base` is the file start, for
// offsets in messages. Every read checks the remaining size first.
class Reader {
 public:
  Reader(const uint8_t* base, uint64_t begin, uint64_t end) : base_(base), pos_(begin), end_(end) {}

  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return end_ - pos_; }

  absl::Status Truncated(absl::string_view what, uint64_t need) const {
    return absl::InvalidArgumentError(absl::StrCat("truncated: ", what, " needs ", need,
                                                   " bytes at offset ", pos_, " but only ",
                                                   remaining(), " remain"));
  }

  absl::StatusOr<absl::string_view> Bytes(uint64_t n, absl::string_view what) {
    if (n > remaining()) return Truncated(what, n);
    absl::string_view v(reinterpret_cast<const char*>(base_ + pos_), n);
    pos_ += n;
    return v;
  }

  template <typename T>
  absl::StatusOr<T> Read(absl::string_view what) {
    absl::StatusOr<absl::string_view> b = Bytes(sizeof(T), what);
    if (!b.ok()) return b.status();
    T v;
    std::memcpy(&v, b->data(), sizeof(T));
    return v;
  }

  absl::StatusOr<absl::string_view> String(absl::string_view what) {
    absl::StatusOr<uint64_t> len = Read<uint64_t>(what);
    if (!len.ok()) return len.status();
    if (*len > remaining()) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": string length ", *len, " exceeds the ", remaining(), " bytes left in the file"));
    }
    return Bytes(*len, what);
  }

  // One value of type `t`; arrays are validated recursively but kept encoded.
  absl::StatusOr<GgufValue> Value(GgufType t, absl::string_view what, int depth) {
    GgufValue v;
    v.type = t;
    switch (t) {
      case GgufType::kUint8:
        return Scalar<uint8_t>(v, what);
      case GgufType::kInt8:
        return Scalar<int8_t>(v, what);
      case GgufType::kUint16:
        return Scalar<uint16_t>(v, what);
      case GgufType::kInt16:
        return Scalar<int16_t>(v, what);
      case GgufType::kUint32:
        return Scalar<uint32_t>(v, what);
      case GgufType::kInt32:
        return Scalar<int32_t>(v, what);
      case GgufType::kUint64:
        return Scalar<uint64_t>(v, what);
      case GgufType::kInt64:
        return Scalar<int64_t>(v, what);
      case GgufType::kFloat32:
        return Scalar<float>(v, what);
      case GgufType::kFloat64:
        return Scalar<double>(v, what);
      case GgufType::kBool: {
        absl::StatusOr<uint8_t> b = Read<uint8_t>(what);
        if (!b.ok()) return b.status();
        if (*b > 1) {
          return absl::InvalidArgumentError(
              absl::StrCat(what, ": bool value ", *b, " is neither 0 nor 1"));
        }
        v.u = *b;
        return v;
      }
      case GgufType::kString: {
        absl::StatusOr<absl::string_view> s = String(what);
        if (!s.ok()) return s.status();
        v.str = *s;
        return v;
      }
      case GgufType::kArray:
        return Array(v, what, depth);
    }
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": unknown value type ", static_cast<uint32_t>(t)));
  }

 private:
  template <typename T>
  absl::StatusOr<GgufValue> Scalar(GgufValue& v, absl::string_view what) {
    absl::StatusOr<T> x = Read<T>(what);
    if (!x.ok()) return x.status();
    if constexpr (std::is_floating_point_v<T>) {
      v.f = *x;
    } else if constexpr (std::is_signed_v<T>) {
      v.i = *x;
    } else {
      v.u = *x;
    }
    return v;
  }

  absl::StatusOr<GgufValue> Array(GgufValue& v, absl::string_view what, int depth) {
    if (depth >= kMaxArrayDepth) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": arrays nested deeper than ", kMaxArrayDepth));
    }
    absl::StatusOr<uint32_t> et = Read<uint32_t>(what);
    if (!et.ok()) return et.status();
    if (!IsKnownType(*et)) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": unknown array element type ", *et));
    }
    absl::StatusOr<uint64_t> count = Read<uint64_t>(what);
    if (!count.ok()) return count.status();
    v.elem_type = static_cast<GgufType>(*et);
    v.count = *count;
    const uint64_t min_size = MinEncodedSize(v.elem_type);
    if (v.count > remaining() / min_size) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": array of ", v.count, " ", GgufTypeName(v.elem_type),
                       " elements cannot fit in the ", remaining(), " bytes left in the file"));
    }
    const uint64_t start = pos_;
    if (const uint64_t fixed = FixedSize(v.elem_type); fixed != 0) {
      pos_ += v.count * fixed;  // fits: checked above
      // Of the fixed-size types only bool has invalid encodings; refuse them here, as for a
      // single bool, so that decoding a parsed array never fails.
      if (v.elem_type == GgufType::kBool) {
        for (uint64_t k = start; k < pos_; ++k) {
          if (base_[k] > 1) {
            return absl::InvalidArgumentError(absl::StrCat(what, ": bool array element ", k - start,
                                                           " is ", base_[k], ", neither 0 nor 1"));
          }
        }
      }
    } else {
      for (uint64_t k = 0; k < v.count; ++k) {
        absl::StatusOr<GgufValue> e = Value(v.elem_type, what, depth + 1);
        if (!e.ok()) return e.status();
      }
    }
    v.body = absl::string_view(reinterpret_cast<const char*>(base_ + start), pos_ - start);
    return v;
  }

  const uint8_t* base_;
  uint64_t pos_;
  uint64_t end_;
};

// Calls `fn` on each element of a stored array in turn, without materialising them all: the
// typed accessors use it so that their memory stays proportional to what they return. The
// nesting depth is not stored, so children are decoded as if at depth 1; the body was
// validated with at least that much room when parsed.
template <typename Fn>
absl::Status ForEachElement(const GgufValue& a, Fn fn) {
  if (a.type != GgufType::kArray) {
    return absl::InvalidArgumentError(
        absl::StrCat("value of type ", GgufTypeName(a.type), " is not an array"));
  }
  Reader r(reinterpret_cast<const uint8_t*>(a.body.data()), 0, a.body.size());
  for (uint64_t k = 0; k < a.count; ++k) {
    absl::StatusOr<GgufValue> e = r.Value(a.elem_type, "array element", 1);
    if (!e.ok()) return e.status();
    if (absl::Status s = fn(*e); !s.ok()) return s;
  }
  return absl::OkStatus();
}

template <typename T>
absl::StatusOr<T> IntegerAs(const GgufValue& v, absl::string_view key) {
  if (IsUnsigned(v.type)) {
    if (std::in_range<T>(v.u)) return static_cast<T>(v.u);
  } else if (IsSigned(v.type)) {
    if (std::in_range<T>(v.i)) return static_cast<T>(v.i);
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF metadata '", key, "' is a ", GgufTypeName(v.type), ", not an integer"));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "GGUF metadata '", key, "' = ", IsUnsigned(v.type) ? absl::StrCat(v.u) : absl::StrCat(v.i),
      " is out of range for the expected integer type"));
}

absl::StatusOr<double> FloatOf(const GgufValue& v, absl::string_view key) {
  if (!IsFloat(v.type)) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF metadata '", key, "' is a ", GgufTypeName(v.type), ", not a float"));
  }
  return v.f;
}

absl::Status CheckArrayOf(const GgufValue& v, absl::string_view key, bool (*elem_ok)(GgufType),
                          absl::string_view wanted) {
  if (v.type != GgufType::kArray || !elem_ok(v.elem_type)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GGUF metadata '", key, "' is ",
        v.type == GgufType::kArray ? absl::StrCat("an array of ", GgufTypeName(v.elem_type))
                                   : absl::StrCat("a ", GgufTypeName(v.type)),
        ", not an array of ", wanted));
  }
  return absl::OkStatus();
}

// Read-only mapping of a whole file, unmapped when the last reference goes.
struct Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr != nullptr) munmap(addr, size);
  }
};

}  // namespace

absl::string_view GgufTypeName(GgufType t) {
  switch (t) {
    case GgufType::kUint8:
      return "uint8";
    case GgufType::kInt8:
      return "int8";
    case GgufType::kUint16:
      return "uint16";
    case GgufType::kInt16:
      return "int16";
    case GgufType::kUint32:
      return "uint32";
    case GgufType::kInt32:
      return "int32";
    case GgufType::kFloat32:
      return "float32";
    case GgufType::kBool:
      return "bool";
    case GgufType::kString:
      return "string";
    case GgufType::kArray:
      return "array";
    case GgufType::kUint64:
      return "uint64";
    case GgufType::kInt64:
      return "int64";
    case GgufType::kFloat64:
      return "float64";
  }
  return "unknown";
}

absl::StatusOr<std::vector<GgufValue>> GgufArrayElements(const GgufValue& array) {
  std::vector<GgufValue> out;
  out.reserve(array.count);  // array.count elements were found in its body when it was parsed
  absl::Status s = ForEachElement(array, [&](const GgufValue& e) {
    out.push_back(e);
    return absl::OkStatus();
  });
  if (!s.ok()) return s;
  return out;
}

absl::StatusOr<GgufFile> GgufFile::Open(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    close(fd);
    return absl::InternalError(absl::StrCat(path, ": cannot stat: ", std::strerror(err)));
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  if (st.st_size == 0) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": file is empty, not a GGUF file"));
  }
  auto mapping = std::make_shared<Mapping>();
  mapping->size = static_cast<size_t>(st.st_size);
  void* addr = mmap(nullptr, mapping->size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int err = errno;
  close(fd);  // the mapping stays valid without the descriptor
  if (addr == MAP_FAILED) {
    return absl::InternalError(absl::StrCat(path, ": mmap failed: ", std::strerror(err)));
  }
  mapping->addr = addr;

  GgufFile f;
  f.name_ = path;
  f.data_ = static_cast<const uint8_t*>(addr);
  f.size_ = mapping->size;
  f.owner_ = std::move(mapping);
  if (absl::Status s = f.ParseContents(); !s.ok()) return s;
  return f;
}

absl::StatusOr<GgufFile> GgufFile::Parse(std::string bytes, std::string name) {
  auto buffer = std::make_shared<const std::string>(std::move(bytes));
  GgufFile f;
  f.name_ = std::move(name);
  f.data_ = reinterpret_cast<const uint8_t*>(buffer->data());
  f.size_ = buffer->size();
  f.owner_ = std::move(buffer);
  if (absl::Status s = f.ParseContents(); !s.ok()) return s;
  return f;
}

absl::Status GgufFile::ParseContents() {
  auto fail = [this](const absl::Status& s) {
    return absl::Status(s.code(), absl::StrCat(name_, ": ", s.message()));
  };
  auto error = [this](absl::string_view msg) {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": ", msg));
  };
  Reader r(data_, 0, size_);

  absl::StatusOr<absl::string_view> magic = r.Bytes(4, "magic");
  if (!magic.ok() || *magic != "GGUF") {
    return error("not a GGUF file (the first 4 bytes are not \"GGUF\")");
  }
  absl::StatusOr<uint32_t> version = r.Read<uint32_t>("version");
  if (!version.ok()) return fail(version.status());
  version_ = *version;
  if (version_ == 1) {
    return error("GGUF version 1 is not supported (only versions 2 and 3; re-convert the model)");
  }
  if (version_ == 0x02000000 || version_ == 0x03000000) {
    return error("big-endian GGUF files are not supported");
  }
  if (version_ != 2 && version_ != 3) {
    return error(absl::StrCat("unsupported GGUF version ", version_, " (supported: 2 and 3)"));
  }
  absl::StatusOr<uint64_t> n_tensors = r.Read<uint64_t>("tensor count");
  if (!n_tensors.ok()) return fail(n_tensors.status());
  absl::StatusOr<uint64_t> n_kv = r.Read<uint64_t>("metadata count");
  if (!n_kv.ok()) return fail(n_kv.status());
  // A key-value pair takes at least 13 bytes, a tensor info at least 32 (name length, n_dims, one
  // dimension, type, offset): refuse counts the file cannot hold before reserving anything.
  if (*n_kv > r.remaining() / 13) {
    return error(
        absl::StrCat("metadata count ", *n_kv, " cannot fit in a file of ", size_, " bytes"));
  }
  if (*n_tensors > r.remaining() / 32) {
    return error(
        absl::StrCat("tensor count ", *n_tensors, " cannot fit in a file of ", size_, " bytes"));
  }

  kv_.reserve(*n_kv);
  for (uint64_t k = 0; k < *n_kv; ++k) {
    absl::StatusOr<absl::string_view> key = r.String(absl::StrCat("metadata key #", k));
    if (!key.ok()) return fail(key.status());
    const std::string what = absl::StrCat("metadata '", *key, "'");
    absl::StatusOr<uint32_t> type = r.Read<uint32_t>(what);
    if (!type.ok()) return fail(type.status());
    if (!IsKnownType(*type)) return error(absl::StrCat(what, ": unknown value type ", *type));
    absl::StatusOr<GgufValue> value = r.Value(static_cast<GgufType>(*type), what, 0);
    if (!value.ok()) return fail(value.status());
    if (!kv_index_.emplace(*key, kv_.size()).second) {
      return error(absl::StrCat("duplicate metadata key '", *key, "'"));
    }
    kv_.emplace_back(*key, *std::move(value));
  }

  if (Has("general.alignment")) {
    absl::StatusOr<uint32_t> a = GetU32("general.alignment");  // errors name the file already
    if (!a.ok()) return a.status();
    if (*a == 0 || (*a & (*a - 1)) != 0) {
      return error(absl::StrCat("general.alignment ", *a, " is not a power of two"));
    }
    alignment_ = *a;
  } else {
    alignment_ = kDefaultAlignment;
  }

  tensors_.reserve(*n_tensors);
  for (uint64_t k = 0; k < *n_tensors; ++k) {
    GgufTensorInfo t;
    absl::StatusOr<absl::string_view> tname = r.String(absl::StrCat("tensor name #", k));
    if (!tname.ok()) return fail(tname.status());
    t.name = *tname;
    const std::string what = absl::StrCat("tensor '", t.name, "'");
    absl::StatusOr<uint32_t> n_dims = r.Read<uint32_t>(what);
    if (!n_dims.ok()) return fail(n_dims.status());
    if (*n_dims < 1 || *n_dims > kMaxDims) {
      return error(absl::StrCat(what, ": ", *n_dims, " dimensions (must be 1 to ", kMaxDims, ")"));
    }
    t.n_dims = static_cast<int>(*n_dims);
    int64_t n_elements = 1;
    for (int d = 0; d < t.n_dims; ++d) {
      absl::StatusOr<uint64_t> ne = r.Read<uint64_t>(what);
      if (!ne.ok()) return fail(ne.status());
      if (*ne == 0 || *ne > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          static_cast<int64_t>(*ne) > std::numeric_limits<int64_t>::max() / n_elements) {
        return error(absl::StrCat(what, ": dimension ", d, " = ", *ne,
                                  " is zero or makes the element count overflow"));
      }
      t.ne[d] = static_cast<int64_t>(*ne);
      n_elements *= t.ne[d];
    }
    absl::StatusOr<uint32_t> type = r.Read<uint32_t>(what);
    if (!type.ok()) return fail(type.status());
    t.ggml_type = *type;
    std::optional<DType> dtype = DTypeFromGgml(*type);
    if (!dtype.has_value()) {
      const absl::string_view known = UnsupportedGgmlTypeName(*type);
      return error(absl::StrCat(
          what, ": ",
          known.empty() ? absl::StrCat("unknown ggml type id ", *type)
                        : absl::StrCat("unsupported ggml type id ", *type, " (", known, ")")));
    }
    t.dtype = *dtype;
    absl::StatusOr<int64_t> row_bytes = RowBytes(t.dtype, t.ne[0]);
    if (!row_bytes.ok())
      return error(absl::StrCat(what, ": row length: ", row_bytes.status().message()));
    const int64_t rows = n_elements / t.ne[0];
    if (rows > std::numeric_limits<int64_t>::max() / *row_bytes) {
      return error(absl::StrCat(what, ": size overflows"));
    }
    t.nbytes = rows * *row_bytes;
    absl::StatusOr<uint64_t> offset = r.Read<uint64_t>(what);
    if (!offset.ok()) return fail(offset.status());
    t.offset = *offset;
    if (!tensor_index_.emplace(t.name, tensors_.size()).second) {
      return error(absl::StrCat("duplicate tensor name '", t.name, "'"));
    }
    tensors_.push_back(t);
  }

  // The data section starts at the next multiple of the alignment (r.pos() <= size_, so adding
  // alignment_ - 1 cannot overflow).
  data_offset_ = (r.pos() + alignment_ - 1) / alignment_ * alignment_;
  if (tensors_.empty()) return absl::OkStatus();
  if (data_offset_ > size_) {
    return error(absl::StrCat("the tensor data section would start at offset ", data_offset_,
                              ", past the end of the file (", size_, " bytes)"));
  }
  const uint64_t data_size = size_ - data_offset_;
  for (const GgufTensorInfo& t : tensors_) {
    if (t.offset % alignment_ != 0) {
      return error(absl::StrCat("tensor '", t.name, "': data offset ", t.offset,
                                " is not a multiple of the alignment ", alignment_));
    }
    if (t.offset > data_size || static_cast<uint64_t>(t.nbytes) > data_size - t.offset) {
      return error(absl::StrCat("tensor '", t.name, "': data [", t.offset, ", +", t.nbytes,
                                ") extends past the end of the data section (", data_size,
                                " bytes)"));
    }
  }
  std::vector<const GgufTensorInfo*> by_offset;
  by_offset.reserve(tensors_.size());
  for (const GgufTensorInfo& t : tensors_) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const GgufTensorInfo* a, const GgufTensorInfo* b) { return a->offset < b->offset; });
  for (size_t k = 1; k < by_offset.size(); ++k) {
    const GgufTensorInfo& prev = *by_offset[k - 1];
    const GgufTensorInfo& cur = *by_offset[k];
    if (prev.offset + static_cast<uint64_t>(prev.nbytes) > cur.offset) {
      return error(absl::StrCat("tensors '", prev.name, "' and '", cur.name,
                                "' overlap in the data section"));
    }
  }
  return absl::OkStatus();
}

const GgufValue* GgufFile::Find(absl::string_view key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

absl::StatusOr<const GgufValue*> GgufFile::Lookup(absl::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) {
    return absl::NotFoundError(absl::StrCat(name_, ": GGUF metadata '", key, "' is missing"));
  }
  return v;
}

namespace {
// Prefixes an accessor's error with the file name.
absl::Status InFile(const std::string& name, const absl::Status& s) {
  return absl::Status(s.code(), absl::StrCat(name, ": ", s.message()));
}
template <typename T>
absl::StatusOr<T> InFile(const std::string& name, absl::StatusOr<T> x) {
  if (x.ok()) return x;
  return InFile(name, x.status());
}
}  // namespace

absl::StatusOr<uint32_t> GgufFile::GetU32(absl::string_view key) const {
  absl::StatusOr<const GgufValue*> v = Lookup(key);
  if (!v.ok()) return v.status();
  return InFile(name_, IntegerAs<uint32_t>(**v, key));
}

absl::StatusOr<int32_t> GgufFile::GetI32(absl::string_view key) const {
  absl::StatusOr<const GgufValue*> v = Lookup(key);
  if (!v.ok()) return v.status();
  return InFile(name_, IntegerAs<int32_t>(**v, key));
}

absl::StatusOr<uint64_t> GgufFile::GetU64(absl::string_view key) const {
  absl::StatusOr<const GgufValue*> v = Lookup(key);
  if (!v.ok()) return v.status();
  return InFile(name_, IntegerAs<uint64_t>(**v, key));
}

absl::StatusOr<int64_t> GgufFile::GetI64(absl::string_view key) const {
  absl::StatusOr<const GgufValue*> v = Lookup(key);
  if (!v.ok()) return v.status();
  return InFile(name_, IntegerAs<int64_t>(**v, key));
}

absl::StatusOr<double> GgufFile::GetF64(absl::string_view key) const {
  absl::StatusOr<const GgufValue*> v = Lookup(key);
  if (!v.ok()) return v.status();
  return InFile(name_, FloatOf(**v, key));
}

absl::StatusOr<float> GgufFile::GetF32(absl::string_view key) const {
  absl::StatusOr<double> x = GetF64(key);
  if (!x.ok()) return x.status();
  return static_cast<float>(*x);
}

absl::StatusOr<bool> GgufFile::GetBool(absl::string_view key) const {
  absl::StatusOr<const GgufValue*> v = Lookup(key);
  if (!v.ok()) return v.status();
  if ((*v)->type != GgufType::kBool) {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": GGUF metadata '", key, "' is a ",
                                                   GgufTypeName((*v)->type), ", not a bool"));
  }
  return (*v)->u != 0;
}

absl::StatusOr<std::string> GgufFile::GetString(absl::string_view key) const {
  absl::StatusOr<const GgufValue*> v = Lookup(key);
  if (!v.ok()) return v.status();
  if ((*v)->type != GgufType::kString) {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": GGUF metadata '", key, "' is a ",
                                                   GgufTypeName((*v)->type), ", not a string"));
  }
  return std::string((*v)->str);
}

absl::StatusOr<std::vector<std::string>> GgufFile::GetStringArray(absl::string_view key) const {
  absl::StatusOr<const GgufValue*> v = Lookup(key);
  if (!v.ok()) return v.status();
  const absl::Status type_ok = CheckArrayOf(
      **v, key, [](GgufType t) { return t == GgufType::kString; }, "strings");
  if (!type_ok.ok()) return InFile(name_, type_ok);
  std::vector<std::string> out;
  out.reserve((*v)->count);
  absl::Status s = ForEachElement(**v, [&](const GgufValue& e) {
    out.emplace_back(e.str);
    return absl::OkStatus();
  });
  if (!s.ok()) return InFile(name_, s);
  return out;
}

absl::StatusOr<std::vector<float>> GgufFile::GetF32Array(absl::string_view key) const {
  absl::StatusOr<const GgufValue*> v = Lookup(key);
  if (!v.ok()) return v.status();
  const absl::Status type_ok = CheckArrayOf(**v, key, IsFloat, "floats");
  if (!type_ok.ok()) return InFile(name_, type_ok);
  std::vector<float> out;
  out.reserve((*v)->count);
  absl::Status s = ForEachElement(**v, [&](const GgufValue& e) {
    out.push_back(static_cast<float>(e.f));
    return absl::OkStatus();
  });
  if (!s.ok()) return InFile(name_, s);
  return out;
}

absl::StatusOr<std::vector<int32_t>> GgufFile::GetI32Array(absl::string_view key) const {
  absl::StatusOr<const GgufValue*> v = Lookup(key);
  if (!v.ok()) return v.status();
  const absl::Status type_ok = CheckArrayOf(
      **v, key, [](GgufType t) { return IsSigned(t) || IsUnsigned(t); }, "integers");
  if (!type_ok.ok()) return InFile(name_, type_ok);
  std::vector<int32_t> out;
  out.reserve((*v)->count);
  absl::Status s = ForEachElement(**v, [&](const GgufValue& e) {
    absl::StatusOr<int32_t> x = IntegerAs<int32_t>(e, key);
    if (!x.ok()) return x.status();
    out.push_back(*x);
    return absl::OkStatus();
  });
  if (!s.ok()) return InFile(name_, s);
  return out;
}

const GgufTensorInfo* GgufFile::FindTensor(absl::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

HostTensor GgufFile::TensorView(const GgufTensorInfo& t) const {
  HostTensor h;
  h.name = std::string(t.name);
  h.dtype = t.dtype;
  for (int d = t.n_dims - 1; d >= 0; --d) h.shape.push_back(t.ne[d]);
  h.data = data_ + data_offset_ + t.offset;
  h.nbytes = t.nbytes;
  h.owner = owner_;
  return h;
}

}  // namespace moa
