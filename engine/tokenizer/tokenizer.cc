#include "engine/tokenizer/tokenizer.h"

#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/bpe_tokenizer.h"
#include "engine/tokenizer/spm_tokenizer.h"
#include "engine/tokenizer/utf8.h"

namespace moa {

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Create(const TokenizerSource& source) {
  const int n_set = static_cast<int>(source.has_gguf) + !source.tokenizer_json_path.empty() +
                    !source.sentencepiece_path.empty();
  if (n_set != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("TokenizerSource: exactly one source must be set, got ", n_set));
  }
  if (source.has_gguf) {
    const auto& g = source.gguf;
    if (g.model == "gpt2") return CreateBpeTokenizerFromGguf(g);
    if (g.model == "llama") return CreateSpmTokenizerFromGguf(g);
    return absl::UnimplementedError(
        absl::StrCat("GGUF tokenizer.ggml.model \"", g.model, "\" (supported: gpt2, llama)"));
  }
  if (!source.sentencepiece_path.empty()) {
    return CreateSentencePieceTokenizer(source.sentencepiece_path, source.bos_id, source.eos_id,
                                        source.add_bos);
  }
  std::ifstream in(source.tokenizer_json_path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot open ", source.tokenizer_json_path));
  }
  std::ostringstream text;
  text << in.rdbuf();
  if (!in.good() && !in.eof()) {
    return absl::DataLossError(absl::StrCat("cannot read ", source.tokenizer_json_path));
  }
  auto tok = CreateBpeTokenizerFromJson(text.str(), source.bos_id, source.eos_id, source.add_bos);
  if (!tok.ok()) {
    return absl::Status(tok.status().code(),
                        absl::StrCat(source.tokenizer_json_path, ": ", tok.status().message()));
  }
  return tok;
}

absl::StatusOr<std::string> IncrementalDecoder::Add(int32_t id) {
  std::string piece;
  if (prev_id_ < 0) {
    auto d = tok_->Decode({id});
    if (!d.ok()) return d.status();
    piece = *std::move(d);
  } else {
    const int32_t pair[2] = {prev_id_, id};
    auto both = tok_->Decode(pair);
    if (!both.ok()) return both.status();
    auto prev = tok_->Decode({prev_id_});
    if (!prev.ok()) return prev.status();
    if (both->compare(0, prev->size(), *prev) != 0) {
      return absl::InternalError("tokenizer decodes a token differently in context");
    }
    piece = both->substr(prev->size());
  }
  prev_id_ = id;
  pending_ += piece;
  std::string out;
  utf8::DrainValid(&pending_, &out, /*final=*/false);
  return out;
}

std::string IncrementalDecoder::Flush() {
  std::string out;
  utf8::DrainValid(&pending_, &out, /*final=*/true);
  return out;
}

}  // namespace moa
