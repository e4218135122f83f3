// Text <-> token ids: byte-level BPE (GPT-2 style, from GGUF or tokenizer.json) and SentencePiece
// (tokenizer.model via libsentencepiece, or a GGUF "llama" vocabulary).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/model/model_file.h"

namespace moa {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  static absl::StatusOr<std::unique_ptr<Tokenizer>> Create(const TokenizerSource& source);

  // add_bos: prepend BOS if the model asks for it (TokenizerSource::add_bos).
  // parse_special: text like "<|im_start|>" becomes its special token; otherwise plain text.
  virtual absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_bos,
                                                      bool parse_special) const = 0;
  // The bytes of the tokens (special tokens included as their text), possibly ending inside a
  // UTF-8 character; see IncrementalDecoder for streaming.
  virtual absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids) const = 0;

  virtual int32_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;  // -1 if none
  virtual int32_t eos_id() const = 0;
  // End of generation: EOS and the chat turn terminators (<|im_end|>, <|eot_id|>, ...).
  virtual bool IsEndOfGeneration(int32_t id) const = 0;
  // Text of one special token id, e.g. "<|im_end|>"; empty if `id` is not special.
  virtual std::string SpecialTokenText(int32_t id) const = 0;
};

// Streams text from tokens as they are generated without ever emitting broken UTF-8: bytes of
// an incomplete character are held back until it completes.
class IncrementalDecoder {
 public:
  explicit IncrementalDecoder(const Tokenizer* tok) : tok_(tok) {}
  // Returns the newly completed text (maybe empty). Bytes that can never start or continue a
  // valid character are emitted as U+FFFD right away; only a possibly-valid incomplete tail is
  // held back.
  absl::StatusOr<std::string> Add(int32_t id);
  // Whatever is still held back, invalid bytes replaced by U+FFFD.
  std::string Flush();

 private:
  const Tokenizer* tok_;
  // A token's text can depend on the one before it (SentencePiece's dummy-prefix space), so
  // each token is decoded in the context of its predecessor.
  int32_t prev_id_ = -1;
  std::string pending_;
};

}  // namespace moa
