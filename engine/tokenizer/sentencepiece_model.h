// A thin wrapper over libsentencepiece. Kept free of Abseil includes on purpose:
// sentencepiece_processor.h declares `absl::string_view` as an alias of std::string_view, which
// clashes with the system Abseil's own class, so the two can never meet in one translation unit.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace moa {

class SentencePieceModel {
 public:
  ~SentencePieceModel();
  // nullptr with `*error` set when the file cannot be loaded.
  static std::unique_ptr<SentencePieceModel> Load(const std::string& path, std::string* error);

  bool Encode(std::string_view text, std::vector<int>* ids, std::string* error) const;

  int size() const;
  std::string piece(int id) const;
  float score(int id) const;
  int gguf_type(int id) const;  // the GGUF tokenizer.ggml.token_type value for the piece
  int bos_id() const;
  int eos_id() const;
  int unk_id() const;
  // Whether the model prepends a space (normalizer add_dummy_prefix).
  bool adds_dummy_prefix() const { return dummy_prefix_; }

 private:
  SentencePieceModel();
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  bool dummy_prefix_ = false;
};

}  // namespace moa
