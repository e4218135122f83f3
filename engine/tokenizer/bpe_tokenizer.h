// Byte-level BPE (GPT-2 style) tokenizers, from a GGUF vocabulary (tokenizer.ggml.model "gpt2")
// or from a Hugging Face tokenizer.json.
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "engine/model/model_file.h"
#include "engine/tokenizer/tokenizer.h"

namespace moa {

absl::StatusOr<std::unique_ptr<Tokenizer>> CreateBpeTokenizerFromGguf(const GgufTokenizerData& d);

// `json_text` is the content of tokenizer.json; BOS/EOS come from tokenizer_config.json.
absl::StatusOr<std::unique_ptr<Tokenizer>> CreateBpeTokenizerFromJson(std::string_view json_text,
                                                                      int32_t bos_id,
                                                                      int32_t eos_id, bool add_bos);

}  // namespace moa
