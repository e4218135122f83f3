// UTF-8 helpers shared by the tokenizers: character lengths, validation with U+FFFD
// replacement, and GPT-2's byte <-> unicode mapping used by byte-level BPE vocabularies.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace moa::utf8 {

// Appends the UTF-8 encoding of `cp` (must be a valid scalar value).
void Append(uint32_t cp, std::string* out);

// Length of the character starting with lead byte `c` (1 for bytes that cannot start one).
inline size_t LeadLength(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c & 0xE0) == 0xC0) return 2;
  if ((c & 0xF0) == 0xE0) return 3;
  if ((c & 0xF8) == 0xF0) return 4;
  return 1;
}

// Moves the longest prefix of `*in` that can be emitted to `*out`: complete characters as they
// are, bytes that can never become valid as U+FFFD (one per maximal invalid subpart, as Python
// and the Unicode standard do). A trailing incomplete-but-still-valid sequence is left in `*in`
// unless `final`, in which case it becomes U+FFFD too.
void DrainValid(std::string* in, std::string* out, bool final);

// GPT-2's reversible byte -> code point map: printable bytes map to themselves, the others to
// U+0100 and up, so every byte string becomes printable text without spaces.
const std::array<uint32_t, 256>& ByteToCodePoint();
// Inverse of ByteToCodePoint(): returns -1 for code points that no byte maps to.
int CodePointToByte(uint32_t cp);

// Decodes one code point at `s[*pos]`, advancing `*pos`; returns false on invalid UTF-8 (then
// `*pos` advances by one byte).
bool NextCodePoint(std::string_view s, size_t* pos, uint32_t* cp);

}  // namespace moa::utf8
