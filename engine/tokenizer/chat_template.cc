#include "engine/tokenizer/chat_template.h"

#include <algorithm>
#include <regex>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/utf8.h"

namespace moa {
namespace {

// Python's str.isspace() for one code point (what Jinja's trim filter and str.strip() remove).
bool IsPythonSpace(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 ||
         cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
         cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

// Python's str.strip() on UTF-8 text.
std::string PyStrip(std::string_view s) {
  size_t begin = s.size(), end = 0;
  for (size_t pos = 0; pos < s.size();) {
    const size_t start = pos;
    uint32_t cp = 0;
    if (!utf8::NextCodePoint(s, &pos, &cp) || !IsPythonSpace(cp)) {
      if (begin == s.size()) begin = start;
      end = pos;
    }
  }
  return begin < end ? std::string(s.substr(begin, end - begin)) : std::string();
}

// Undoes the escapes of a Jinja string literal (\n, \t, \', \", \\).
std::string UnescapeJinja(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\' || i + 1 == s.size()) {
      out.push_back(s[i]);
      continue;
    }
    const char c = s[++i];
    out.push_back(c == 'n' ? '\n' : c == 't' ? '\t' : c);
  }
  return out;
}

// The default system prompt written literally in a template, if any: ChatML templates that
// inject "<|im_start|>system\n...<|im_end|>" when the conversation has no system message, and
// Vicuna-style templates that set system_message to a string literal.
std::string ExtractDefaultSystem(const std::string& src, ChatTemplate::Family family) {
  std::smatch m;
  if (family == ChatTemplate::Family::kChatML) {
    // Literal text only: no quotes or braces (which would mean an expression like
    // messages[0]['content'] is concatenated in).
    static const std::regex re(R"(<\|im_start\|>system(?:\n|\\n)([^'"{}]*?)<\|im_end\|>)");
    if (std::regex_search(src, m, re)) return UnescapeJinja(m[1].str());
  } else if (family == ChatTemplate::Family::kVicuna) {
    static const std::regex dq(R"re(system_message\s*=\s*"((?:[^"\\]|\\.)*)")re");
    static const std::regex sq(R"(system_message\s*=\s*'((?:[^'\\]|\\.)*)')");
    if (std::regex_search(src, m, dq) || std::regex_search(src, m, sq)) {
      return UnescapeJinja(m[1].str());
    }
  }
  return "";
}

absl::Status CheckRoles(absl::Span<const ChatMessage> messages) {
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& r = messages[i].role;
    if (r != "system" && r != "user" && r != "assistant") {
      return absl::InvalidArgumentError(
          absl::StrCat("chat message ", i, ": unknown role \"", r, "\""));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ChatTemplate> ChatTemplate::FromTemplateSource(std::string_view jinja_source) {
  const std::string src(jinja_source);
  ChatTemplate t;
  if (absl::StrContains(src, "<|im_start|>")) {
    t.family_ = Family::kChatML;
  } else if (absl::StrContains(src, "<|start_header_id|>")) {
    t.family_ = Family::kLlama3;
    t.bos_text_ = "<|begin_of_text|>";
  } else if (absl::StrContains(src, "[INST]")) {
    t.family_ = Family::kLlama2;
    t.bos_text_ = "<s>";
    t.eos_text_ = "</s>";
  } else if (absl::StrContains(src, "USER:") && absl::StrContains(src, "ASSISTANT:")) {
    t.family_ = Family::kVicuna;
    t.eos_text_ = "</s>";
  } else {
    return absl::InvalidArgumentError(
        "chat template: not a recognized family (ChatML, Llama-2, Vicuna, Llama-3)");
  }
  t.default_system_ = ExtractDefaultSystem(src, t.family_);
  return t;
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromModel(const ModelFile& model) {
  const auto& tok = model.tokenizer;
  absl::StatusOr<ChatTemplate> t;
  if (!model.chat_template.empty()) {
    t = FromTemplateSource(model.chat_template);
  } else {
    // No template shipped: guess from the vocabulary and the model name.
    Family f;
    const auto& tokens = tok.gguf.tokens;
    auto has = [&](std::string_view s) {
      return std::find(tokens.begin(), tokens.end(), s) != tokens.end();
    };
    if (has("<|im_start|>")) {
      f = Family::kChatML;
    } else if (has("<|start_header_id|>")) {
      f = Family::kLlama3;
    } else if (absl::StrContains(absl::AsciiStrToLower(model.config.name), "vicuna")) {
      f = Family::kVicuna;
    } else if (tok.has_gguf && tok.gguf.model == "llama") {
      f = Family::kLlama2;
    } else {
      return absl::NotFoundError(
          absl::StrCat("model \"", model.config.name, "\" has no chat template"));
    }
    static constexpr std::string_view kSources[] = {"<|im_start|>", "[INST]",
                                                    "USER: ASSISTANT:", "<|start_header_id|>"};
    t = FromTemplateSource(kSources[static_cast<int>(f)]);
  }
  if (!t.ok()) return t;
  // The model's own BOS/EOS spelling, where the template uses them.
  const int64_t n = static_cast<int64_t>(tok.gguf.tokens.size());
  if (tok.has_gguf && tok.gguf.bos_id >= 0 && tok.gguf.bos_id < n && !t->bos_text_.empty()) {
    t->bos_text_ = tok.gguf.tokens[tok.gguf.bos_id];
  }
  if (tok.has_gguf && tok.gguf.eos_id >= 0 && tok.gguf.eos_id < n && !t->eos_text_.empty()) {
    t->eos_text_ = tok.gguf.tokens[tok.gguf.eos_id];
  }
  return t;
}

std::string_view ChatTemplate::family_name() const {
  switch (family_) {
    case Family::kChatML:
      return "chatml";
    case Family::kLlama2:
      return "llama2";
    case Family::kVicuna:
      return "vicuna";
    case Family::kLlama3:
      return "llama3";
  }
  return "unknown";
}

absl::StatusOr<std::string> ChatTemplate::Render(absl::Span<const ChatMessage> messages,
                                                 bool add_generation_prompt) const {
  if (auto s = CheckRoles(messages); !s.ok()) return s;
  std::string out;
  const bool has_system = !messages.empty() && messages[0].role == "system";
  switch (family_) {
    case Family::kChatML:
      if (!has_system && !messages.empty() && !default_system_.empty()) {
        absl::StrAppend(&out, "<|im_start|>system\n", default_system_, "<|im_end|>\n");
      }
      for (const auto& m : messages) {
        absl::StrAppend(&out, "<|im_start|>", m.role, "\n", m.content, "<|im_end|>\n");
      }
      if (add_generation_prompt) out += "<|im_start|>assistant\n";
      break;
    case Family::kLlama3:
      if (!messages.empty()) out += bos_text_;
      for (const auto& m : messages) {
        absl::StrAppend(&out, "<|start_header_id|>", m.role, "<|end_header_id|>\n\n",
                        PyStrip(m.content), "<|eot_id|>");
      }
      if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      break;
    case Family::kLlama2: {
      // The official template has no generation-prompt branch: "[/INST]" already is one.
      const size_t first = has_system ? 1 : 0;
      for (size_t i = first; i < messages.size(); ++i) {
        const auto& m = messages[i];
        if ((m.role == "user") != ((i - first) % 2 == 0) || m.role == "system") {
          return absl::InvalidArgumentError(
              absl::StrCat("chat message ", i,
                           ": Llama-2 roles must alternate user/assistant after an "
                           "optional first system message, got \"",
                           m.role, "\""));
        }
        std::string content = m.content;
        if (i == first && has_system) {
          content = absl::StrCat("<<SYS>>\n", messages[0].content, "\n<</SYS>>\n\n", m.content);
        }
        if (m.role == "user") {
          absl::StrAppend(&out, bos_text_, "[INST] ", PyStrip(content), " [/INST]");
        } else {
          absl::StrAppend(&out, " ", PyStrip(content), " ", eos_text_);
        }
      }
      break;
    }
    case Family::kVicuna:
      absl::StrAppend(&out, has_system ? messages[0].content : default_system_, " ");
      for (size_t i = has_system ? 1 : 0; i < messages.size(); ++i) {
        const auto& m = messages[i];
        if (m.role == "user") {
          absl::StrAppend(&out, "USER: ", m.content, " ");
        } else if (m.role == "assistant") {
          absl::StrAppend(&out, "ASSISTANT: ", m.content, eos_text_);
        } else {
          return absl::InvalidArgumentError(
              absl::StrCat("chat message ", i, ": Vicuna allows a system message only first"));
        }
      }
      if (add_generation_prompt) out += "ASSISTANT:";
      break;
  }
  return out;
}

}  // namespace moa
