// Splits special/added token text out of the input before the model tokenizes the rest, longest
// match first at the leftmost position (as HF tokenizers and llama.cpp do).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moa {

class SpecialTokenSplitter {
 public:
  // `always`: split even when the caller does not parse special tokens (HF added tokens that
  // are not special, GGUF user-defined tokens); otherwise only with parse_special.
  void Add(std::string_view text, int32_t id, bool always);

  struct Fragment {
    std::string_view text;  // the raw text when id < 0
    int32_t id;
  };
  std::vector<Fragment> Split(std::string_view text, bool parse_special) const;

 private:
  struct Entry {
    std::string text;
    int32_t id;
    bool always;
  };
  std::vector<Entry> entries_;
  // Entry indices by first byte, longest text first.
  std::array<std::vector<int32_t>, 256> by_first_byte_;
};

}  // namespace moa
