// libFuzzer target for the GGUF reader: parse the input, then touch everything a loader would
// (every metadata value through every accessor, array contents recursively, every tensor view and
// the first row of each tensor dequantized).
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "engine/model/gguf.h"
#include "kernels/quant.h"

namespace {

// Arrays were depth-checked when parsed, so this recursion is bounded.
void WalkValue(const moa::GgufValue& v) {
  if (v.type != moa::GgufType::kArray) return;
  absl::StatusOr<std::vector<moa::GgufValue>> elems = moa::GgufArrayElements(v);
  if (!elems.ok()) __builtin_trap();  // validated at parse time: decoding must succeed
  if (elems->size() != v.count) __builtin_trap();
  for (const moa::GgufValue& e : *elems) WalkValue(e);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::StatusOr<moa::GgufFile> f =
      moa::GgufFile::Parse(std::string(reinterpret_cast<const char*>(data), size), "fuzz");
  if (!f.ok()) return 0;
  for (const auto& [key, value] : f->metadata()) {
    WalkValue(value);
    (void)f->GetU32(key);
    (void)f->GetI32(key);
    (void)f->GetU64(key);
    (void)f->GetI64(key);
    (void)f->GetF32(key);
    (void)f->GetF64(key);
    (void)f->GetBool(key);
    (void)f->GetString(key);
    (void)f->GetStringArray(key);
    (void)f->GetF32Array(key);
    (void)f->GetI32Array(key);
  }
  std::vector<float> row;
  volatile uint8_t sink = 0;
  for (const moa::GgufTensorInfo& t : f->tensors()) {
    const moa::HostTensor h = f->TensorView(t);
    // Under ASan, reading the first and last bytes checks that the view lies inside the buffer.
    sink = sink + h.data[0] + h.data[h.nbytes - 1];
    const int64_t n = h.shape.back();
    absl::StatusOr<int64_t> row_bytes = moa::RowBytes(h.dtype, n);
    if (!row_bytes.ok() || *row_bytes > h.nbytes) __builtin_trap();  // the parser checked both
    if (n > (int64_t{1} << 20)) continue;                            // keep iterations fast
    row.resize(n);
    if (!moa::DequantizeRow(h.dtype, h.data, n, row.data()).ok()) __builtin_trap();
  }
  return 0;
}
