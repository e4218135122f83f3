#include "engine/tokenizer/spm_tokenizer.h"

#include <array>
#include <queue>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "engine/tokenizer/sentencepiece_model.h"
#include "engine/tokenizer/special_tokens.h"
#include "engine/tokenizer/utf8.h"
#include "engine/tokenizer/vocab_util.h"

namespace moa {
namespace {

constexpr absl::string_view kSpaceMarker = "\xE2\x96\x81";  // U+2581, SentencePiece's space
constexpr size_t kMaxVocab = 1 << 22;

class SpmTokenizer final : public Tokenizer {
 public:
  // `types` uses GGUF token type values; `sp` (optional) does the encoding of plain text.
  SpmTokenizer(std::vector<std::string> pieces, std::vector<float> scores,
               std::vector<int32_t> types, bool add_space_prefix, int32_t bos, int32_t eos,
               int32_t unk, bool add_bos, std::unique_ptr<SentencePieceModel> sp)
      : pieces_(std::move(pieces)),
        scores_(std::move(scores)),
        types_(std::move(types)),
        sp_(std::move(sp)),
        add_space_prefix_(add_space_prefix),
        add_bos_(add_bos) {
    const int32_t n = vocab_size();
    bos_ = bos >= 0 && bos < n ? bos : -1;
    eos_ = eos >= 0 && eos < n ? eos : -1;
    unk_ = unk >= 0 && unk < n ? unk : -1;
    byte_ids_.fill(-1);
    bytes_.resize(n);
    eog_.assign(n, false);
    for (int32_t i = 0; i < n; ++i) {
      const std::string& p = pieces_[i];
      switch (types_[i]) {
        case kTokenNormal:
        case kTokenUserDefined:
          // SentencePiece only merges into normal and user-defined pieces.
          mergeable_.try_emplace(p, i);
          bytes_[i] = absl::StrReplaceAll(p, {{kSpaceMarker, " "}});
          if (types_[i] == kTokenUserDefined) splitter_.Add(p, i, /*always=*/true);
          break;
        case kTokenByte: {
          int value = 0;
          if (p.size() == 6 && p.compare(0, 3, "<0x") == 0 && p[5] == '>' &&
              absl::SimpleHexAtoi(p.substr(3, 2), &value)) {
            byte_ids_[value] = i;
            bytes_[i] = std::string(1, static_cast<char>(value));
          } else {
            bytes_[i] = p;
          }
          break;
        }
        case kTokenControl:
        case kTokenUnknown:
          bytes_[i] = p;
          splitter_.Add(p, i, /*always=*/false);
          eog_[i] = types_[i] == kTokenControl && IsEndOfGenerationText(p);
          break;
        default:
          bytes_[i] = p;
          break;
      }
    }
    if (eos_ >= 0) eog_[eos_] = true;
  }

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_bos,
                                              bool parse_special) const override {
    std::vector<int32_t> out;
    if (add_bos && add_bos_ && bos_ >= 0) out.push_back(bos_);
    // As llama.cpp: every text fragment that starts the input or follows a special token gets
    // the dummy space prefix (SentencePiece adds it to each piece of text it is given).
    bool prev_special = true;
    for (const auto& frag : splitter_.Split(text, parse_special)) {
      if (frag.id >= 0) {
        out.push_back(frag.id);
        prev_special = true;
        continue;
      }
      if (sp_ != nullptr) {
        std::vector<int> ids;
        std::string error;
        if (!sp_->Encode(frag.text, &ids, &error)) {
          return absl::InternalError(absl::StrCat("sentencepiece: ", error));
        }
        out.insert(out.end(), ids.begin(), ids.end());
      } else {
        std::string escaped = add_space_prefix_ && prev_special ? " " : "";
        escaped.append(frag.text);
        EncodeText(absl::StrReplaceAll(escaped, {{" ", kSpaceMarker}}), &out);
      }
      prev_special = false;
    }
    return out;
  }

  absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids) const override {
    std::string out;
    bool prev_special = true;
    for (int32_t id : ids) {
      if (id < 0 || id >= vocab_size()) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", id, " out of range [0, ", vocab_size(), ")"));
      }
      const std::string& b = bytes_[id];
      const bool special = types_[id] == kTokenControl || types_[id] == kTokenUnknown;
      // Undo the dummy prefix Encode adds at the start and after special tokens.
      if (add_space_prefix_ && prev_special && !special && !b.empty() && b[0] == ' ' &&
          types_[id] != kTokenByte) {
        out.append(b, 1);
      } else {
        out += b;
      }
      prev_special = special;
    }
    return out;
  }

  int32_t vocab_size() const override { return static_cast<int32_t>(pieces_.size()); }
  int32_t bos_id() const override { return bos_; }
  int32_t eos_id() const override { return eos_; }
  bool IsEndOfGeneration(int32_t id) const override {
    return id >= 0 && id < vocab_size() && eog_[id];
  }
  std::string SpecialTokenText(int32_t id) const override {
    if (id < 0 || id >= vocab_size()) return "";
    const int32_t t = types_[id];
    return t == kTokenControl || t == kTokenUserDefined ? pieces_[id] : "";
  }

 private:
  // llama.cpp's llm_tokenizer_spm (after SentencePiece's BPE): start from UTF-8 characters and
  // repeatedly merge the adjacent pair whose concatenation is the highest-scoring piece
  // (leftmost on ties); leftovers that are not pieces become byte tokens.
  void EncodeText(std::string_view text, std::vector<int32_t>* out) const {
    struct Sym {
      size_t begin, len;
      int32_t prev, next;
    };
    std::vector<Sym> syms;
    for (size_t pos = 0; pos < text.size();) {
      const size_t len = std::min(utf8::LeadLength(text[pos]), text.size() - pos);
      const int32_t n = static_cast<int32_t>(syms.size());
      syms.push_back({pos, len, n - 1, n + 1});
      pos += len;
    }
    if (syms.empty()) return;
    syms.back().next = -1;
    struct Bigram {
      float score;
      int32_t left, right;
      size_t len;
      bool operator<(const Bigram& o) const {
        return score < o.score || (score == o.score && left > o.left);
      }
    };
    std::priority_queue<Bigram> queue;
    auto try_add = [&](int32_t l, int32_t r) {
      if (l < 0 || r < 0) return;
      const size_t len = syms[l].len + syms[r].len;
      auto it = mergeable_.find(absl::string_view(text.data() + syms[l].begin, len));
      if (it == mergeable_.end()) return;
      queue.push({scores_[it->second], l, r, len});
    };
    for (int32_t i = 1; i < static_cast<int32_t>(syms.size()); ++i) try_add(i - 1, i);
    while (!queue.empty()) {
      const Bigram b = queue.top();
      queue.pop();
      Sym& l = syms[b.left];
      Sym& r = syms[b.right];
      if (l.len == 0 || r.len == 0 || l.len + r.len != b.len) continue;  // stale
      l.len += r.len;
      r.len = 0;
      l.next = r.next;
      if (r.next >= 0) syms[r.next].prev = b.left;
      try_add(l.prev, b.left);
      try_add(b.left, l.next);
    }
    for (int32_t i = 0; i >= 0; i = syms[i].next) {
      const std::string_view s = text.substr(syms[i].begin, syms[i].len);
      if (auto it = mergeable_.find(absl::string_view(s.data(), s.size()));
          it != mergeable_.end()) {
        out->push_back(it->second);
        continue;
      }
      for (unsigned char c : s) {
        if (byte_ids_[c] >= 0) {
          out->push_back(byte_ids_[c]);
        } else if (unk_ >= 0) {
          out->push_back(unk_);
          break;  // one unknown token per character, as without byte fallback
        }
      }
    }
  }

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::vector<int32_t> types_;
  std::vector<std::string> bytes_;  // what each id decodes to (mid-text)
  std::vector<bool> eog_;
  absl::flat_hash_map<std::string, int32_t> mergeable_;
  std::array<int32_t, 256> byte_ids_{};
  SpecialTokenSplitter splitter_;
  std::unique_ptr<SentencePieceModel> sp_;
  bool add_space_prefix_;
  bool add_bos_;
  int32_t bos_ = -1, eos_ = -1, unk_ = -1;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> CreateSpmTokenizerFromGguf(const GgufTokenizerData& d) {
  const size_t n = d.tokens.size();
  if (n == 0 || n > kMaxVocab) {
    return absl::InvalidArgumentError(absl::StrCat("GGUF tokenizer: ", n, " tokens"));
  }
  if (d.scores.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF llama tokenizer: ", d.scores.size(), " scores for ", n, " tokens"));
  }
  if (!d.token_types.empty() && d.token_types.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF tokenizer: ", d.token_types.size(), " token types for ", n, " tokens"));
  }
  std::vector<int32_t> types = d.token_types;
  if (types.empty()) types.assign(n, kTokenNormal);
  return std::make_unique<SpmTokenizer>(d.tokens, d.scores, std::move(types), d.add_space_prefix,
                                        d.bos_id, d.eos_id, d.unk_id, d.add_bos, nullptr);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> CreateSentencePieceTokenizer(const std::string& path,
                                                                        int32_t bos_id,
                                                                        int32_t eos_id,
                                                                        bool add_bos) {
  std::string error;
  auto sp = SentencePieceModel::Load(path, &error);
  if (sp == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("sentencepiece model ", path, ": ", error));
  }
  const int n = sp->size();
  std::vector<std::string> pieces(n);
  std::vector<float> scores(n);
  std::vector<int32_t> types(n);
  for (int i = 0; i < n; ++i) {
    pieces[i] = sp->piece(i);
    scores[i] = sp->score(i);
    types[i] = sp->gguf_type(i);
  }
  const bool dummy_prefix = sp->adds_dummy_prefix();
  const int32_t bos = bos_id >= 0 ? bos_id : sp->bos_id();
  const int32_t eos = eos_id >= 0 ? eos_id : sp->eos_id();
  const int32_t unk = sp->unk_id();
  return std::make_unique<SpmTokenizer>(std::move(pieces), std::move(scores), std::move(types),
                                        dummy_prefix, bos, eos, unk, add_bos, std::move(sp));
}

}  // namespace moa
