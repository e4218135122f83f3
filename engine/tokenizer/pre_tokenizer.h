// Pre-tokenization: splitting text into words before BPE, as a sequence of regex splits (PCRE2
// in UTF + UCP mode), configured from a GGUF `pre` name (llama.cpp's table) or a tokenizer.json
// pre_tokenizer.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace moa {

// What a split step does with the matches of its pattern, as in HF tokenizers'
// SplitDelimiterBehavior.
enum class SplitBehavior { kIsolated, kRemoved, kMergedWithPrevious, kMergedWithNext, kContiguous };

class PreTokenizer {
 public:
  PreTokenizer();
  ~PreTokenizer();
  PreTokenizer(PreTokenizer&&) noexcept;
  PreTokenizer& operator=(PreTokenizer&&) noexcept;

  // llama.cpp's regex list for a GGUF tokenizer.ggml.pre name; `ignore_merges` is set for the
  // vocabularies llama.cpp encodes whole-word-first (Llama-3).
  static absl::StatusOr<PreTokenizer> FromGgufPre(std::string_view pre, bool* ignore_merges);
  // A tokenizer.json "pre_tokenizer" value (null, ByteLevel, Digits, Split or a Sequence of
  // them). `*byte_level` is set when a ByteLevel step is present.
  static absl::StatusOr<PreTokenizer> FromJson(const nlohmann::json& j, bool* byte_level);

  // Splits `text` into words (byte ranges of possibly prefixed text, so returned as strings).
  absl::StatusOr<std::vector<std::string>> Split(std::string_view text) const;

 private:
  struct Step;
  absl::Status AddRegex(std::string_view pattern, bool literal, SplitBehavior behavior,
                        bool invert);
  absl::Status AddJson(const nlohmann::json& j, bool* byte_level, int depth);

  std::vector<std::unique_ptr<Step>> steps_;
};

}  // namespace moa
