#include "engine/tokenizer/utf8.h"

namespace moa::utf8 {

void Append(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

namespace {

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";

// Result of scanning one sequence: its length in bytes and whether it is a complete character,
// a valid prefix cut off by the end of the input, or invalid (length = maximal subpart).
enum class Scan { kComplete, kIncomplete, kInvalid };

// Well-formed sequences per the Unicode standard (table 3-7): the second byte's range depends
// on the lead byte, which excludes overlongs, surrogates and code points above U+10FFFF.
Scan ScanOne(std::string_view s, size_t pos, size_t* len) {
  const unsigned char c = s[pos];
  if (c < 0x80) {
    *len = 1;
    return Scan::kComplete;
  }
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    need = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    need = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    need = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    *len = 1;
    return Scan::kInvalid;
  }
  size_t i = 1;
  for (; i < need; ++i) {
    if (pos + i >= s.size()) {
      *len = i;
      return Scan::kIncomplete;
    }
    const unsigned char b = s[pos + i];
    const unsigned char l = i == 1 ? lo : 0x80;
    const unsigned char h = i == 1 ? hi : 0xBF;
    if (b < l || b > h) {
      *len = i;
      return Scan::kInvalid;
    }
  }
  *len = need;
  return Scan::kComplete;
}

}  // namespace

void DrainValid(std::string* in, std::string* out, bool final) {
  const std::string_view s = *in;
  size_t pos = 0;
  while (pos < s.size()) {
    size_t len = 0;
    const Scan r = ScanOne(s, pos, &len);
    if (r == Scan::kIncomplete && !final) break;
    if (r == Scan::kComplete) {
      out->append(s.substr(pos, len));
    } else {
      out->append(kReplacement);
    }
    pos += len;
  }
  in->erase(0, pos);
}

bool NextCodePoint(std::string_view s, size_t* pos, uint32_t* cp) {
  size_t len = 0;
  if (ScanOne(s, *pos, &len) != Scan::kComplete) {
    *pos += 1;
    return false;
  }
  const unsigned char c = s[*pos];
  uint32_t v = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
  for (size_t i = 1; i < len; ++i) v = (v << 6) | (static_cast<unsigned char>(s[*pos + i]) & 0x3F);
  *pos += len;
  *cp = v;
  return true;
}

const std::array<uint32_t, 256>& ByteToCodePoint() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable =
          (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      t[b] = printable ? static_cast<uint32_t>(b) : next++;
    }
    return t;
  }();
  return table;
}

int CodePointToByte(uint32_t cp) {
  // The map sends bytes to [0, 0x144): invert it once into a dense table.
  static const std::array<int16_t, 0x144> inverse = [] {
    std::array<int16_t, 0x144> inv;
    inv.fill(-1);
    const auto& fwd = ByteToCodePoint();
    for (int b = 0; b < 256; ++b) inv[fwd[b]] = static_cast<int16_t>(b);
    return inv;
  }();
  return cp < inverse.size() ? inverse[cp] : -1;
}

}  // namespace moa::utf8
