// Chat prompt formats: ChatML (SmolLM2, Qwen), Llama-2 / Vicuna and Llama-3, chosen from the
// template the model ships, rendering exactly what that template renders.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/model/model_file.h"

namespace moa {

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

class ChatTemplate {
 public:
  enum class Family { kChatML, kLlama2, kVicuna, kLlama3 };

  // Picks the family from the model's chat template source (or its name when it has none).
  static absl::StatusOr<ChatTemplate> FromModel(const ModelFile& model);
  static absl::StatusOr<ChatTemplate> FromTemplateSource(std::string_view jinja_source);

  // Unknown roles (not system/user/assistant) are errors, and so are conversations the
  // family's template refuses: Llama-2 turns that do not alternate user/assistant, a system
  // message other than the first for Llama-2 and Vicuna.
  absl::StatusOr<std::string> Render(absl::Span<const ChatMessage> messages,
                                     bool add_generation_prompt) const;

  Family family() const { return family_; }
  std::string_view family_name() const;

 private:
  Family family_ = Family::kChatML;
  std::string default_system_;  // e.g. SmolLM2's, taken from the template source
  std::string bos_text_;        // Llama-2 / Llama-3 "<s>" / "<|begin_of_text|>"
  std::string eos_text_;        // Llama-2 / Vicuna "</s>" after assistant turns
};

}  // namespace moa
