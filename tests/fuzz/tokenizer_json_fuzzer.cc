// libFuzzer target: bytes parsed as a Hugging Face tokenizer.json; when they form a tokenizer,
// a few strings are encoded, decoded and streamed through IncrementalDecoder.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "engine/tokenizer/bpe_tokenizer.h"
#include "engine/tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto tok = moa::CreateBpeTokenizerFromJson(
      std::string_view(reinterpret_cast<const char*>(data), size), 1, 2, true);
  if (!tok.ok()) return 0;
  const moa::Tokenizer& t = **tok;
  for (std::string_view text : {"Hello world, it's 2024!", "  a\t\tb\n\n 12345 <|im_start|>x",
                                "中文 😀 👨‍👩‍👧", "\xff\xfe\xc3 bad", ""}) {
    for (bool special : {false, true}) {
      auto ids = t.Encode(text, true, special);
      if (!ids.ok()) continue;
      (void)t.Decode(*ids);
      moa::IncrementalDecoder dec(&t);
      for (int32_t id : *ids) (void)dec.Add(id);
      (void)dec.Flush();
      for (int32_t id : *ids) {
        (void)t.IsEndOfGeneration(id);
        (void)t.SpecialTokenText(id);
      }
    }
  }
  (void)t.Decode({-1, t.vocab_size(), 0});
  return 0;
}
