#include "engine/tokenizer/pre_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/utf8.h"

namespace moa {
namespace {

// GPT-2's pattern as HF's ByteLevel pre-tokenizer writes it. The `\s+(?!\S)` alternative leaves
// the last space of a run to the following word; PCRE2 backtracks exactly like Oniguruma here.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// llama.cpp's adaptation of the Llama-3 pattern (case-insensitive contractions spelled out).
constexpr std::string_view kLlama3Pattern =
    R"((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

constexpr std::string_view kQwen2Pattern =
    R"((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// llama.cpp's GPT-2 entry lacks the final `|\s+`: it keeps unmatched text as words anyway.
constexpr std::string_view kLlamaCppGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S))";

// Bounds the backtracking of one match so a pathological pattern (tokenizer.json is input)
// fails with an error instead of hanging.
constexpr uint32_t kMatchLimit = 1'000'000;
constexpr uint32_t kDepthLimit = 10'000;

struct CodeDeleter {
  void operator()(pcre2_code* c) const { pcre2_code_free(c); }
};
struct MatchContextDeleter {
  void operator()(pcre2_match_context* c) const { pcre2_match_context_free(c); }
};
struct MatchDataDeleter {
  void operator()(pcre2_match_data* d) const { pcre2_match_data_free(d); }
};

std::string Pcre2Error(int code) {
  PCRE2_UCHAR buf[256];
  if (pcre2_get_error_message(code, buf, sizeof(buf)) < 0) return absl::StrCat("error ", code);
  return reinterpret_cast<const char*>(buf);
}

struct Segment {
  size_t begin, end;
  bool is_match;
};

}  // namespace

struct PreTokenizer::Step {
  // A regex split, or (when `code` is null) ByteLevel's add_prefix_space.
  std::unique_ptr<pcre2_code, CodeDeleter> code;
  std::unique_ptr<pcre2_match_context, MatchContextDeleter> context;
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;

  absl::Status Apply(const std::string& piece, std::vector<std::string>* out) const;
};

absl::Status PreTokenizer::Step::Apply(const std::string& piece,
                                       std::vector<std::string>* out) const {
  if (code == nullptr) {
    out->push_back(!piece.empty() && piece[0] == ' ' ? piece : absl::StrCat(" ", piece));
    return absl::OkStatus();
  }
  std::unique_ptr<pcre2_match_data, MatchDataDeleter> md(
      pcre2_match_data_create_from_pattern(code.get(), nullptr));
  if (md == nullptr) return absl::ResourceExhaustedError("pcre2_match_data_create failed");
  std::vector<Segment> segs;
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(piece.data());
  size_t start = 0, gap_begin = 0;
  while (start <= piece.size()) {
    const int rc =
        pcre2_match(code.get(), subject, piece.size(), start, 0, md.get(), context.get());
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("pre-tokenizer regex failed at byte ", start, ": ", Pcre2Error(rc)));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
    const size_t mb = ov[0], me = ov[1];
    if (me <= mb) {
      // Empty match: nothing to split off; step over one character (or stray byte).
      if (mb >= piece.size()) break;
      start = mb + std::min(utf8::LeadLength(piece[mb]), piece.size() - mb);
      continue;
    }
    if (mb > gap_begin) segs.push_back({gap_begin, mb, false});
    segs.push_back({mb, me, true});
    gap_begin = start = me;
  }
  if (gap_begin < piece.size()) segs.push_back({gap_begin, piece.size(), false});
  if (invert) {
    for (auto& s : segs) s.is_match = !s.is_match;
  }

  // Same folds as HF tokenizers' NormalizedString::split.
  std::vector<Segment> merged;
  bool previous_match = false;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      merged = std::move(segs);
      break;
    case SplitBehavior::kRemoved:
      for (const auto& s : segs) {
        if (!s.is_match) merged.push_back(s);
      }
      break;
    case SplitBehavior::kMergedWithPrevious:
      for (const auto& s : segs) {
        if (s.is_match && !previous_match && !merged.empty()) {
          merged.back().end = s.end;
        } else {
          merged.push_back(s);
        }
        previous_match = s.is_match;
      }
      break;
    case SplitBehavior::kMergedWithNext:
      for (auto it = segs.rbegin(); it != segs.rend(); ++it) {
        if (it->is_match && !previous_match && !merged.empty()) {
          merged.back().begin = it->begin;
        } else {
          merged.push_back(*it);
        }
        previous_match = it->is_match;
      }
      std::reverse(merged.begin(), merged.end());
      break;
    case SplitBehavior::kContiguous:
      for (const auto& s : segs) {
        if (s.is_match == previous_match && !merged.empty()) {
          merged.back().end = s.end;
        } else {
          merged.push_back(s);
        }
        previous_match = s.is_match;
      }
      break;
  }
  for (const auto& s : merged) out->push_back(piece.substr(s.begin, s.end - s.begin));
  return absl::OkStatus();
}

PreTokenizer::PreTokenizer() = default;
PreTokenizer::~PreTokenizer() = default;
PreTokenizer::PreTokenizer(PreTokenizer&&) noexcept = default;
PreTokenizer& PreTokenizer::operator=(PreTokenizer&&) noexcept = default;

absl::Status PreTokenizer::AddRegex(std::string_view pattern, bool literal, SplitBehavior behavior,
                                    bool invert) {
  auto step = std::make_unique<Step>();
  int err = 0;
  PCRE2_SIZE err_offset = 0;
  const uint32_t options = literal ? (PCRE2_LITERAL | PCRE2_UTF | PCRE2_MATCH_INVALID_UTF)
                                   : (PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF);
  step->code.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                 options, &err, &err_offset, nullptr));
  if (step->code == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("bad pre-tokenizer regex \"",
                                                   std::string(pattern), "\" at offset ",
                                                   err_offset, ": ", Pcre2Error(err)));
  }
  // JIT is an optimization only: without it (unsupported CPU, no executable memory) the
  // interpreter gives the same matches.
  pcre2_jit_compile(step->code.get(), PCRE2_JIT_COMPLETE);
  step->context.reset(pcre2_match_context_create(nullptr));
  if (step->context == nullptr) return absl::ResourceExhaustedError("pcre2 context failed");
  pcre2_set_match_limit(step->context.get(), kMatchLimit);
  pcre2_set_depth_limit(step->context.get(), kDepthLimit);
  step->behavior = behavior;
  step->invert = invert;
  steps_.push_back(std::move(step));
  return absl::OkStatus();
}

absl::StatusOr<PreTokenizer> PreTokenizer::FromGgufPre(std::string_view pre, bool* ignore_merges) {
  // llama.cpp (llama-vocab.cpp): pre name -> pre type -> list of regexes applied in turn.
  std::vector<std::string_view> patterns;
  *ignore_merges = false;
  if (pre == "llama3" || pre == "llama-v3" || pre == "llama-bpe" || pre == "falcon3" ||
      pre == "dbrx" || pre == "smaug-bpe") {
    patterns = {kLlama3Pattern};
    *ignore_merges = pre != "dbrx" && pre != "smaug-bpe";
  } else if (pre == "default") {
    patterns = {R"([\p{P}\$\+<=>\^~\|]+)", kLlamaCppGpt2Pattern, R"(\p{N}+)", "[0-9][0-9][0-9]"};
  } else if (pre == "gpt-2" || pre == "gpt2" || pre == "mpt" || pre == "olmo" || pre == "jais" ||
             pre == "trillion" || pre == "granite-docling") {
    patterns = {kLlamaCppGpt2Pattern};
  } else if (pre == "starcoder" || pre == "refact" || pre == "command-r" || pre == "smollm" ||
             pre == "codeshell" || pre == "exaone" || pre == "minerva-7b") {
    patterns = {R"(\p{N})", kLlamaCppGpt2Pattern};
  } else if (pre == "qwen2" || pre == "stablelm2" || pre == "hunyuan" ||
             pre == "deepseek-r1-qwen") {
    patterns = {kQwen2Pattern};
  } else if (pre == "chatglm-bpe") {
    patterns = {kLlama3Pattern};
  } else if (pre == "falcon") {
    patterns = {R"([\p{P}\$\+<=>\^~\|`]+)", kLlamaCppGpt2Pattern, "[0-9][0-9][0-9]"};
  } else if (pre == "poro-chat" || pre == "bloom" || pre == "gpt3-finnish") {
    patterns = {R"( ?[^(\s|.,!?…。，、।۔،)]+)"};
  } else if (pre == "viking") {
    patterns = {R"( ?[^(\s|.,!?…。，、।۔،)]+)", R"(\p{N})"};
  } else {
    return absl::UnimplementedError(
        absl::StrCat("unsupported GGUF tokenizer.ggml.pre \"", std::string(pre), "\""));
  }
  PreTokenizer p;
  for (auto pat : patterns) {
    if (auto s = p.AddRegex(pat, false, SplitBehavior::kIsolated, false); !s.ok()) return s;
  }
  return p;
}

namespace {

const nlohmann::json* Field(const nlohmann::json& j, const char* key) {
  if (!j.is_object()) return nullptr;
  auto it = j.find(key);
  return it == j.end() ? nullptr : &*it;
}

bool BoolField(const nlohmann::json& j, const char* key, bool dflt) {
  const auto* f = Field(j, key);
  return f != nullptr && f->is_boolean() ? f->get<bool>() : dflt;
}

}  // namespace

absl::Status PreTokenizer::AddJson(const nlohmann::json& j, bool* byte_level, int depth) {
  if (j.is_null()) return absl::OkStatus();
  if (depth > 8) return absl::InvalidArgumentError("pre_tokenizer: Sequence nested too deeply");
  const auto* type = Field(j, "type");
  if (type == nullptr || !type->is_string()) {
    return absl::InvalidArgumentError("pre_tokenizer: missing \"type\"");
  }
  const std::string& t = type->get_ref<const std::string&>();
  if (t == "Sequence") {
    const auto* list = Field(j, "pretokenizers");
    if (list == nullptr || !list->is_array()) {
      return absl::InvalidArgumentError("pre_tokenizer Sequence: missing \"pretokenizers\"");
    }
    for (const auto& item : *list) {
      if (auto s = AddJson(item, byte_level, depth + 1); !s.ok()) return s;
    }
    return absl::OkStatus();
  }
  if (t == "ByteLevel") {
    *byte_level = true;
    // HF's defaults: add_prefix_space true, use_regex true.
    if (BoolField(j, "add_prefix_space", true)) steps_.push_back(std::make_unique<Step>());
    if (BoolField(j, "use_regex", true)) {
      return AddRegex(kGpt2Pattern, false, SplitBehavior::kIsolated, false);
    }
    return absl::OkStatus();
  }
  if (t == "Digits") {
    return AddRegex(BoolField(j, "individual_digits", false) ? R"(\p{N})" : R"(\p{N}+)", false,
                    SplitBehavior::kIsolated, false);
  }
  if (t == "Split") {
    const auto* pattern = Field(j, "pattern");
    const auto* regex = pattern != nullptr ? Field(*pattern, "Regex") : nullptr;
    const auto* str = pattern != nullptr ? Field(*pattern, "String") : nullptr;
    const auto* behavior = Field(j, "behavior");
    if ((regex == nullptr || !regex->is_string()) && (str == nullptr || !str->is_string())) {
      return absl::InvalidArgumentError("pre_tokenizer Split: missing pattern Regex/String");
    }
    if (behavior == nullptr || !behavior->is_string()) {
      return absl::InvalidArgumentError("pre_tokenizer Split: missing \"behavior\"");
    }
    const std::string& b = behavior->get_ref<const std::string&>();
    SplitBehavior sb;
    if (b == "Isolated") {
      sb = SplitBehavior::kIsolated;
    } else if (b == "Removed") {
      sb = SplitBehavior::kRemoved;
    } else if (b == "MergedWithPrevious") {
      sb = SplitBehavior::kMergedWithPrevious;
    } else if (b == "MergedWithNext") {
      sb = SplitBehavior::kMergedWithNext;
    } else if (b == "Contiguous") {
      sb = SplitBehavior::kContiguous;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("pre_tokenizer Split: behavior \"", b, "\""));
    }
    const bool literal = regex == nullptr || !regex->is_string();
    const std::string& pat = (literal ? str : regex)->get_ref<const std::string&>();
    if (pat.empty()) return absl::InvalidArgumentError("pre_tokenizer Split: empty pattern");
    return AddRegex(pat, literal, sb, BoolField(j, "invert", false));
  }
  return absl::UnimplementedError(absl::StrCat("unsupported pre_tokenizer type \"", t, "\""));
}

absl::StatusOr<PreTokenizer> PreTokenizer::FromJson(const nlohmann::json& j, bool* byte_level) {
  PreTokenizer p;
  *byte_level = false;
  if (auto s = p.AddJson(j, byte_level, 0); !s.ok()) return s;
  return p;
}

absl::StatusOr<std::vector<std::string>> PreTokenizer::Split(std::string_view text) const {
  std::vector<std::string> pieces;
  if (!text.empty()) pieces.emplace_back(text);
  std::vector<std::string> next;
  for (const auto& step : steps_) {
    next.clear();
    for (const auto& piece : pieces) {
      if (auto s = step->Apply(piece, &next); !s.ok()) return s;
    }
    pieces.swap(next);
  }
  return pieces;
}

}  // namespace moa
