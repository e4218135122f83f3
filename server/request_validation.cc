#include "server/request_validation.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "engine/tokenizer/utf8.h"

namespace moa {
namespace {

absl::Status Bad(absl::string_view what) { return absl::InvalidArgumentError(what); }

absl::Status CheckText(absl::string_view field, absl::string_view text) {
  if (!IsValidUtf8(std::string_view(text.data(), text.size())))
    return Bad(absl::StrCat(field, " is not valid UTF-8"));
  return absl::OkStatus();
}

absl::Status CheckTokenIds(absl::string_view field,
                           const google::protobuf::RepeatedField<int32_t>& ids,
                           int32_t vocab_size) {
  for (int i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab_size) {
      return Bad(absl::StrCat(field, "[", i, "] = ", ids[i], " is not a token id (vocabulary size ",
                              vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckChat(absl::string_view field, const v1::ChatMessages& chat,
                       const ValidationLimits& l) {
  if (chat.messages().empty()) return Bad(absl::StrCat(field, " has no messages"));
  if (chat.messages_size() > l.max_messages) {
    return Bad(absl::StrCat(field, " has ", chat.messages_size(), " messages, at most ",
                            l.max_messages, " are allowed"));
  }
  int64_t total = 0;
  for (int i = 0; i < chat.messages_size(); ++i) {
    const v1::ChatMessage& m = chat.messages(i);
    const std::string name = absl::StrCat(field, ".messages[", i, "]");
    if (m.role() != "system" && m.role() != "user" && m.role() != "assistant") {
      return Bad(absl::StrCat(name, ".role '", m.role(),
                              "' is unknown (expected system, user or assistant)"));
    }
    if (absl::Status s = CheckText(absl::StrCat(name, ".content"), m.content()); !s.ok()) return s;
    total += static_cast<int64_t>(m.content().size());
  }
  if (total > l.max_text_bytes) {
    return Bad(absl::StrCat(field, " contents have ", total, " bytes, at most ", l.max_text_bytes,
                            " are allowed"));
  }
  return absl::OkStatus();
}

absl::Status CheckPromptText(absl::string_view field, absl::string_view text,
                             const ValidationLimits& l) {
  if (text.empty()) return Bad(absl::StrCat(field, " is empty"));
  if (static_cast<int64_t>(text.size()) > l.max_text_bytes) {
    return Bad(absl::StrCat(field, " has ", text.size(), " bytes, at most ", l.max_text_bytes,
                            " are allowed"));
  }
  return CheckText(field, text);
}

}  // namespace

bool IsValidUtf8(std::string_view s) {
  size_t pos = 0;
  uint32_t cp;
  while (pos < s.size()) {
    if (!utf8::NextCodePoint(s, &pos, &cp)) return false;
  }
  return true;
}

absl::StatusOr<SamplingParams> ToSamplingParams(const v1::SamplingParams& p) {
  SamplingParams s;
  s.temperature = p.temperature();
  s.top_p = p.has_top_p() ? p.top_p() : 1.0f;
  s.top_k = p.top_k();
  s.min_p = p.min_p();
  s.repetition_penalty = p.has_repetition_penalty() ? p.repetition_penalty() : 1.0f;
  s.presence_penalty = p.presence_penalty();
  s.frequency_penalty = p.frequency_penalty();
  s.seed = p.seed();
  if (absl::Status st = ValidateSamplingParams(s); !st.ok()) {
    return Bad(absl::StrCat("sampling.", st.message()));
  }
  return s;
}

absl::Status ValidateGenerateRequest(const v1::GenerateRequest& r, const ValidationLimits& l) {
  switch (r.input_case()) {
    case v1::GenerateRequest::kText:
      if (absl::Status s = CheckPromptText("text", r.text(), l); !s.ok()) return s;
      break;
    case v1::GenerateRequest::kTokenIds:
      if (r.token_ids().ids().empty()) return Bad("token_ids is empty");
      if (r.token_ids().ids_size() > l.context_length) {
        return Bad(absl::StrCat("token_ids has ", r.token_ids().ids_size(),
                                " tokens, the context holds ", l.context_length));
      }
      if (absl::Status s = CheckTokenIds("token_ids.ids", r.token_ids().ids(), l.vocab_size);
          !s.ok()) {
        return s;
      }
      break;
    case v1::GenerateRequest::kChat:
      if (absl::Status s = CheckChat("chat", r.chat(), l); !s.ok()) return s;
      break;
    case v1::GenerateRequest::INPUT_NOT_SET:
      return Bad("no input: set one of text, token_ids or chat");
  }
  if (absl::StatusOr<SamplingParams> s = ToSamplingParams(r.sampling()); !s.ok()) {
    return s.status();
  }
  if (r.has_max_tokens() && (r.max_tokens() < 1 || r.max_tokens() > l.context_length)) {
    return Bad(absl::StrCat("max_tokens must be in [1, ", l.context_length,
                            "] (the context length), or unset for the default; got ",
                            r.max_tokens()));
  }
  if (r.stop_size() > l.max_stop_strings) {
    return Bad(absl::StrCat("stop has ", r.stop_size(), " strings, at most ", l.max_stop_strings,
                            " are allowed"));
  }
  for (int i = 0; i < r.stop_size(); ++i) {
    const std::string& stop = r.stop(i);
    if (stop.empty()) return Bad(absl::StrCat("stop[", i, "] is empty"));
    if (static_cast<int32_t>(stop.size()) > l.max_stop_string_bytes) {
      return Bad(absl::StrCat("stop[", i, "] has ", stop.size(), " bytes, at most ",
                              l.max_stop_string_bytes, " are allowed"));
    }
    if (absl::Status s = CheckText(absl::StrCat("stop[", i, "]"), stop); !s.ok()) return s;
  }
  if (r.stop_token_ids_size() > l.max_stop_token_ids) {
    return Bad(absl::StrCat("stop_token_ids has ", r.stop_token_ids_size(), " ids, at most ",
                            l.max_stop_token_ids, " are allowed"));
  }
  if (absl::Status s = CheckTokenIds("stop_token_ids", r.stop_token_ids(), l.vocab_size); !s.ok()) {
    return s;
  }
  if (r.top_logprobs() < 0 || r.top_logprobs() > l.max_top_logprobs) {
    return Bad(absl::StrCat("top_logprobs must be in [0, ", l.max_top_logprobs, "], got ",
                            r.top_logprobs()));
  }
  return absl::OkStatus();
}

absl::StatusOr<GenerationRequest> MakeGenerationRequest(const v1::GenerateRequest& r,
                                                        std::vector<int32_t> prompt,
                                                        const ValidationLimits& l) {
  const int64_t n = static_cast<int64_t>(prompt.size());
  if (n == 0) return Bad("the prompt has no tokens");
  if (n >= l.context_length) {
    return Bad(absl::StrCat("the prompt has ", n, " tokens; the context holds ", l.context_length,
                            ", which leaves no room to generate"));
  }
  const int64_t room = l.context_length - n;
  int32_t max_tokens = r.max_tokens();
  if (!r.has_max_tokens()) {
    max_tokens = static_cast<int32_t>(std::min<int64_t>(l.default_max_tokens, room));
  } else if (max_tokens > room) {
    return Bad(absl::StrCat("the prompt has ", n, " tokens and max_tokens is ", max_tokens,
                            "; together they exceed the context length ", l.context_length));
  }
  absl::StatusOr<SamplingParams> sampling = ToSamplingParams(r.sampling());
  if (!sampling.ok()) return sampling.status();

  GenerationRequest g;
  g.prompt = std::move(prompt);
  g.sampling = *sampling;
  g.max_tokens = max_tokens;
  g.stop_strings.assign(r.stop().begin(), r.stop().end());
  g.stop_token_ids.assign(r.stop_token_ids().begin(), r.stop_token_ids().end());
  g.ignore_eos = r.ignore_eos();
  g.top_logprobs = r.top_logprobs();
  return g;
}

absl::Status ValidateTokenizeRequest(const v1::TokenizeRequest& r, const ValidationLimits& l) {
  switch (r.input_case()) {
    case v1::TokenizeRequest::kText:
      if (static_cast<int64_t>(r.text().size()) > l.max_text_bytes) {
        return Bad(absl::StrCat("text has ", r.text().size(), " bytes, at most ", l.max_text_bytes,
                                " are allowed"));
      }
      return CheckText("text", r.text());
    case v1::TokenizeRequest::kChat:
      return CheckChat("chat", r.chat(), l);
    case v1::TokenizeRequest::INPUT_NOT_SET:
      return Bad("no input: set text or chat");
  }
  return absl::OkStatus();
}

absl::Status ValidateDetokenizeRequest(const v1::DetokenizeRequest& r, const ValidationLimits& l) {
  return CheckTokenIds("token_ids", r.token_ids(), l.vocab_size);
}

}  // namespace moa
