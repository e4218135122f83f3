#include "engine/tokenizer/special_tokens.h"

#include <algorithm>

namespace moa {

void SpecialTokenSplitter::Add(std::string_view text, int32_t id, bool always) {
  if (text.empty()) return;
  entries_.push_back({std::string(text), id, always});
  auto& bucket = by_first_byte_[static_cast<unsigned char>(text[0])];
  // Keep the bucket ordered longest first (ties in insertion order) as entries arrive.
  auto pos =
      std::upper_bound(bucket.begin(), bucket.end(), text.size(),
                       [this](size_t len, int32_t idx) { return len > entries_[idx].text.size(); });
  bucket.insert(pos, static_cast<int32_t>(entries_.size() - 1));
}

std::vector<SpecialTokenSplitter::Fragment> SpecialTokenSplitter::Split(std::string_view text,
                                                                        bool parse_special) const {
  std::vector<Fragment> out;
  size_t plain_begin = 0;
  size_t i = 0;
  while (i < text.size()) {
    const Entry* hit = nullptr;
    for (int32_t idx : by_first_byte_[static_cast<unsigned char>(text[i])]) {
      const Entry& e = entries_[idx];
      if ((e.always || parse_special) && text.substr(i, e.text.size()) == e.text) {
        hit = &e;
        break;
      }
    }
    if (hit == nullptr) {
      ++i;
      continue;
    }
    if (i > plain_begin) out.push_back({text.substr(plain_begin, i - plain_begin), -1});
    out.push_back({text.substr(i, hit->text.size()), hit->id});
    i += hit->text.size();
    plain_begin = i;
  }
  if (plain_begin < text.size()) out.push_back({text.substr(plain_begin), -1});
  return out;
}

}  // namespace moa
