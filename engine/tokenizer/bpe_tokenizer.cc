#include "engine/tokenizer/bpe_tokenizer.h"

#include <array>
#include <queue>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/pre_tokenizer.h"
#include "engine/tokenizer/special_tokens.h"
#include "engine/tokenizer/utf8.h"
#include "engine/tokenizer/vocab_util.h"
#include "nlohmann/json.hpp"

namespace moa {
namespace {

// Refuses vocabularies no real model has, before allocating per-id tables.
constexpr size_t kMaxVocab = 1 << 22;

enum class Kind : uint8_t { kNormal, kSpecial, kAdded };

class BpeTokenizer final : public Tokenizer {
 public:
  // Vocabulary in id order (byte-level strings); ids without an entry stay empty.
  absl::Status Init(std::vector<std::string> tokens,
                    const std::vector<std::pair<std::string, std::string>>& merges) {
    id_to_token_ = std::move(tokens);
    token_to_id_.reserve(id_to_token_.size());
    for (size_t i = 0; i < id_to_token_.size(); ++i) {
      token_to_id_.try_emplace(id_to_token_[i], static_cast<int32_t>(i));
    }
    kinds_.assign(id_to_token_.size(), Kind::kNormal);
    const auto& b2c = utf8::ByteToCodePoint();
    for (int b = 0; b < 256; ++b) {
      std::string s;
      utf8::Append(b2c[b], &s);
      auto it = token_to_id_.find(s);
      byte_ids_[b] = it == token_to_id_.end() ? -1 : it->second;
    }
    merges_.reserve(merges.size());
    for (size_t rank = 0; rank < merges.size(); ++rank) {
      const auto& [a, b] = merges[rank];
      auto ia = token_to_id_.find(a), ib = token_to_id_.find(b);
      auto im = token_to_id_.find(absl::StrCat(a, b));
      if (ia == token_to_id_.end() || ib == token_to_id_.end() || im == token_to_id_.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("merge #", rank, " \"", a, " ", b, "\" uses a token not in the vocab"));
      }
      // The first (lowest-rank) occurrence of a pair wins.
      merges_.try_emplace(PairKey(ia->second, ib->second),
                          Merge{static_cast<int32_t>(rank), im->second});
    }
    return absl::OkStatus();
  }

  void MarkSpecial(int32_t id, bool special) {
    kinds_[id] = special ? Kind::kSpecial : Kind::kAdded;
    splitter_.Add(id_to_token_[id], id, !special);
  }

  void Finish(PreTokenizer pre, bool ignore_merges, int32_t bos, int32_t eos, bool add_bos) {
    pre_ = std::move(pre);
    ignore_merges_ = ignore_merges;
    bos_ = bos >= 0 && bos < vocab_size() ? bos : -1;
    eos_ = eos >= 0 && eos < vocab_size() ? eos : -1;
    add_bos_ = add_bos;
    id_bytes_.resize(id_to_token_.size());
    eog_.assign(id_to_token_.size(), false);
    for (size_t i = 0; i < id_to_token_.size(); ++i) {
      const std::string& t = id_to_token_[i];
      if (kinds_[i] != Kind::kNormal) {
        id_bytes_[i] = t;  // added tokens are stored as plain text, not byte-mapped
        eog_[i] = kinds_[i] == Kind::kSpecial && IsEndOfGenerationText(t);
        continue;
      }
      size_t pos = 0;
      while (pos < t.size()) {
        const size_t start = pos;
        uint32_t cp = 0;
        const int b = utf8::NextCodePoint(t, &pos, &cp) ? utf8::CodePointToByte(cp) : -1;
        // A character outside the byte map is kept as it is (HF's ByteLevel decoder does so).
        if (b >= 0) {
          id_bytes_[i].push_back(static_cast<char>(b));
        } else {
          id_bytes_[i].append(t, start, pos - start);
        }
      }
    }
    if (eos_ >= 0) eog_[eos_] = true;
  }

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_bos,
                                              bool parse_special) const override {
    std::vector<int32_t> out;
    if (add_bos && add_bos_ && bos_ >= 0) out.push_back(bos_);
    for (const auto& frag : splitter_.Split(text, parse_special)) {
      if (frag.id >= 0) {
        out.push_back(frag.id);
        continue;
      }
      auto words = pre_.Split(frag.text);
      if (!words.ok()) return words.status();
      for (const auto& w : *words) EncodeWord(w, &out);
    }
    return out;
  }

  absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids) const override {
    std::string out;
    for (int32_t id : ids) {
      if (id < 0 || id >= vocab_size()) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", id, " out of range [0, ", vocab_size(), ")"));
      }
      out += id_bytes_[id];
    }
    return out;
  }

  int32_t vocab_size() const override { return static_cast<int32_t>(id_to_token_.size()); }
  int32_t bos_id() const override { return bos_; }
  int32_t eos_id() const override { return eos_; }
  bool IsEndOfGeneration(int32_t id) const override {
    return id >= 0 && id < vocab_size() && eog_[id];
  }
  std::string SpecialTokenText(int32_t id) const override {
    if (id < 0 || id >= vocab_size() || kinds_[id] == Kind::kNormal) return "";
    return id_to_token_[id];
  }

 private:
  struct Merge {
    int32_t rank;
    int32_t id;
  };
  static uint64_t PairKey(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  // BPE on one pre-tokenized word: merge the lowest-ranked adjacent pair (leftmost on ties)
  // until none applies, like HF's Word::merge_all and llama.cpp's bigram queue.
  void EncodeWord(std::string_view word, std::vector<int32_t>* out) const {
    if (ignore_merges_) {
      std::string mapped;
      for (unsigned char c : word) utf8::Append(utf8::ByteToCodePoint()[c], &mapped);
      if (auto it = token_to_id_.find(mapped); it != token_to_id_.end()) {
        out->push_back(it->second);
        return;
      }
    }
    struct Sym {
      int32_t id;
      int32_t prev, next;
    };
    std::vector<Sym> syms;
    syms.reserve(word.size());
    for (unsigned char c : word) {
      // A byte missing from the vocabulary is dropped, as HF's BPE does without unk_token.
      if (byte_ids_[c] < 0) continue;
      const int32_t n = static_cast<int32_t>(syms.size());
      syms.push_back({byte_ids_[c], n - 1, n + 1});
    }
    if (syms.empty()) return;
    syms.back().next = -1;
    struct Candidate {
      int32_t rank, pos, left_id, right_id;
      bool operator>(const Candidate& o) const {
        return rank != o.rank ? rank > o.rank : pos > o.pos;
      }
    };
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
    auto push = [&](int32_t pos) {
      if (pos < 0 || syms[pos].next < 0) return;
      const int32_t l = syms[pos].id, r = syms[syms[pos].next].id;
      if (auto it = merges_.find(PairKey(l, r)); it != merges_.end()) {
        queue.push({it->second.rank, pos, l, r});
      }
    };
    for (int32_t i = 0; i + 1 < static_cast<int32_t>(syms.size()); ++i) push(i);
    while (!queue.empty()) {
      const Candidate c = queue.top();
      queue.pop();
      Sym& left = syms[c.pos];
      // Stale entries (a side was merged away or changed since) no longer match.
      if (left.id != c.left_id || left.next < 0 || syms[left.next].id != c.right_id) continue;
      const int32_t right = left.next;
      left.id = merges_.find(PairKey(c.left_id, c.right_id))->second.id;
      left.next = syms[right].next;
      if (left.next >= 0) syms[left.next].prev = c.pos;
      syms[right].id = -1;
      push(left.prev);
      push(c.pos);
    }
    for (int32_t i = 0; i >= 0; i = syms[i].next) out->push_back(syms[i].id);
  }

  std::vector<std::string> id_to_token_;
  std::vector<std::string> id_bytes_;
  std::vector<Kind> kinds_;
  std::vector<bool> eog_;
  absl::flat_hash_map<std::string, int32_t> token_to_id_;
  absl::flat_hash_map<uint64_t, Merge> merges_;
  std::array<int32_t, 256> byte_ids_{};
  PreTokenizer pre_;
  SpecialTokenSplitter splitter_;
  bool ignore_merges_ = false;
  int32_t bos_ = -1, eos_ = -1;
  bool add_bos_ = false;
};

const nlohmann::json* Field(const nlohmann::json& j, const char* key) {
  if (!j.is_object()) return nullptr;
  auto it = j.find(key);
  return it == j.end() ? nullptr : &*it;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(const nlohmann::json& root, int32_t bos_id,
                                                    int32_t eos_id, bool add_bos) {
  const auto* model = Field(root, "model");
  if (model == nullptr || !model->is_object()) {
    return absl::InvalidArgumentError("tokenizer.json: missing \"model\" object");
  }
  if (const auto* type = Field(*model, "type");
      type != nullptr && !(type->is_string() && type->get_ref<const std::string&>() == "BPE")) {
    return absl::UnimplementedError(
        absl::StrCat("tokenizer.json: model.type ", type->dump(), " (only BPE is supported)"));
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    const auto* f = Field(*model, key);
    if (f != nullptr && !f->is_null() &&
        !(f->is_string() && f->get_ref<const std::string&>().empty())) {
      return absl::UnimplementedError(absl::StrCat("tokenizer.json: model.", key, " is set"));
    }
  }
  if (const auto* norm = Field(root, "normalizer"); norm != nullptr && !norm->is_null()) {
    return absl::UnimplementedError(
        absl::StrCat("tokenizer.json: normalizer ", norm->dump().substr(0, 80), " unsupported"));
  }
  const auto* vocab = Field(*model, "vocab");
  const auto* merges = Field(*model, "merges");
  if (vocab == nullptr || !vocab->is_object()) {
    return absl::InvalidArgumentError("tokenizer.json: model.vocab is not an object");
  }
  if (merges == nullptr || !merges->is_array()) {
    return absl::InvalidArgumentError("tokenizer.json: model.merges is not an array");
  }
  const auto* added = Field(root, "added_tokens");
  if (added != nullptr && !added->is_null() && !added->is_array()) {
    return absl::InvalidArgumentError("tokenizer.json: added_tokens is not an array");
  }
  const size_t n_added = added != nullptr && added->is_array() ? added->size() : 0;
  const size_t max_ids = vocab->size() + n_added;
  if (max_ids > kMaxVocab) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", max_ids, " tokens"));
  }

  // Ids must be dense enough to index a table: each below the number of entries.
  std::vector<std::string> tokens;
  auto place = [&](const std::string& text, const nlohmann::json& idv) -> absl::Status {
    if (!idv.is_number_integer()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.json: id of \"", text, "\" is not an integer"));
    }
    const int64_t id = idv.get<int64_t>();
    if (id < 0 || static_cast<uint64_t>(id) >= max_ids) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: id ", id, " of \"", text,
                                                     "\" out of range [0, ", max_ids, ")"));
    }
    if (static_cast<size_t>(id) >= tokens.size()) tokens.resize(id + 1);
    tokens[id] = text;
    return absl::OkStatus();
  };
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    if (auto s = place(it.key(), it.value()); !s.ok()) return s;
  }
  std::vector<std::pair<int32_t, bool>> specials;
  if (n_added > 0) {
    for (const auto& a : *added) {
      const auto* content = Field(a, "content");
      const auto* id = Field(a, "id");
      if (content == nullptr || !content->is_string() || id == nullptr) {
        return absl::InvalidArgumentError("tokenizer.json: added token without content/id");
      }
      const std::string& text = content->get_ref<const std::string&>();
      if (auto s = place(text, *id); !s.ok()) return s;
      const auto* special = Field(a, "special");
      specials.emplace_back(static_cast<int32_t>(id->get<int64_t>()),
                            special != nullptr && special->is_boolean() && special->get<bool>());
    }
  }

  std::vector<std::pair<std::string, std::string>> pairs;
  pairs.reserve(merges->size());
  for (const auto& m : *merges) {
    if (m.is_string()) {
      const std::string& s = m.get_ref<const std::string&>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
        return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: bad merge \"", s, "\""));
      }
      pairs.emplace_back(s.substr(0, sp), s.substr(sp + 1));
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      pairs.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.json: bad merge ", m.dump().substr(0, 80)));
    }
  }

  bool byte_level = false;
  const auto* pre_json = Field(root, "pre_tokenizer");
  auto pre =
      PreTokenizer::FromJson(pre_json != nullptr ? *pre_json : nlohmann::json(), &byte_level);
  if (!pre.ok()) return pre.status();
  if (!byte_level) {
    return absl::UnimplementedError(
        "tokenizer.json: only byte-level BPE (a ByteLevel pre_tokenizer) is supported");
  }
  auto tok = std::make_unique<BpeTokenizer>();
  if (auto s = tok->Init(std::move(tokens), pairs); !s.ok()) return s;
  for (const auto& [id, special] : specials) tok->MarkSpecial(id, special);
  const auto* ignore = Field(*model, "ignore_merges");
  tok->Finish(*std::move(pre), ignore != nullptr && ignore->is_boolean() && ignore->get<bool>(),
              bos_id, eos_id, add_bos);
  return tok;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> CreateBpeTokenizerFromGguf(const GgufTokenizerData& d) {
  if (d.tokens.empty() || d.tokens.size() > kMaxVocab) {
    return absl::InvalidArgumentError(absl::StrCat("GGUF tokenizer: ", d.tokens.size(), " tokens"));
  }
  if (!d.token_types.empty() && d.token_types.size() != d.tokens.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GGUF tokenizer: ", d.token_types.size(), " token types for ", d.tokens.size(), " tokens"));
  }
  std::vector<std::pair<std::string, std::string>> pairs;
  pairs.reserve(d.merges.size());
  for (const auto& m : d.merges) {
    // As llama.cpp: split at the first space after the first character.
    const size_t sp = m.find(' ', 1);
    if (sp == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat("GGUF tokenizer: bad merge \"", m, "\""));
    }
    pairs.emplace_back(m.substr(0, sp), m.substr(sp + 1));
  }
  bool ignore_merges = false;
  auto pre = PreTokenizer::FromGgufPre(d.pre.empty() ? "default" : d.pre, &ignore_merges);
  if (!pre.ok()) return pre.status();
  auto tok = std::make_unique<BpeTokenizer>();
  if (auto s = tok->Init(d.tokens, pairs); !s.ok()) return s;
  for (size_t i = 0; i < d.token_types.size(); ++i) {
    const int32_t t = d.token_types[i];
    if (t == kTokenControl || t == kTokenUserDefined) {
      tok->MarkSpecial(static_cast<int32_t>(i), t == kTokenControl);
    }
  }
  tok->Finish(*std::move(pre), ignore_merges, d.bos_id, d.eos_id, d.add_bos);
  return tok;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> CreateBpeTokenizerFromJson(std::string_view json_text,
                                                                      int32_t bos_id,
                                                                      int32_t eos_id,
                                                                      bool add_bos) {
  nlohmann::json root = nlohmann::json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) return absl::InvalidArgumentError("tokenizer.json: invalid JSON");
  // The accessors above check types before use; this guards any that still throw.
  try {
    return FromJson(root, bos_id, eos_id, add_bos);
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", e.what()));
  }
}

}  // namespace moa
