// Small pieces shared by the tokenizer implementations.
#pragma once

#include <string_view>

namespace moa {

// Special-token texts that end a generation besides EOS: chat turn terminators and the
// end-of-text markers of the supported families (llama.cpp keeps the same kind of list).
inline bool IsEndOfGenerationText(std::string_view t) {
  return t == "<|im_end|>" || t == "<|eot_id|>" || t == "<|eom_id|>" || t == "<|end_of_text|>" ||
         t == "<|endoftext|>" || t == "</s>" || t == "<|end|>" || t == "<end_of_turn>" ||
         t == "<EOT>";
}

// GGUF tokenizer.ggml.token_type values.
enum GgufTokenType : int32_t {
  kTokenNormal = 1,
  kTokenUnknown = 2,
  kTokenControl = 3,
  kTokenUserDefined = 4,
  kTokenUnused = 5,
  kTokenByte = 6,
};

}  // namespace moa
