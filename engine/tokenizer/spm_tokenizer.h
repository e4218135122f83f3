// SentencePiece tokenizers: a tokenizer.model through libsentencepiece, or a GGUF "llama"
// vocabulary (pieces + scores + types) encoded with llama.cpp's merge-by-score algorithm.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/model/model_file.h"
#include "engine/tokenizer/tokenizer.h"

namespace moa {

absl::StatusOr<std::unique_ptr<Tokenizer>> CreateSpmTokenizerFromGguf(const GgufTokenizerData& d);

// bos_id / eos_id < 0: take the model's own.
absl::StatusOr<std::unique_ptr<Tokenizer>> CreateSentencePieceTokenizer(const std::string& path,
                                                                        int32_t bos_id,
                                                                        int32_t eos_id,
                                                                        bool add_bos);

}  // namespace moa
