// Chat templates against jinja2 renderings of the real templates
// (tests/tools/make_chat_cases.py -> tests/data/generated/chat_cases.json).
#include "engine/tokenizer/chat_template.h"

#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace moa {
namespace {

nlohmann::json LoadCases() {
  const std::string path = testing::GeneratedDataDir() + "/chat_cases.json";
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return nlohmann::json::parse(s.str(), nullptr, false);
}

std::vector<ChatMessage> Messages(const nlohmann::json& j) {
  std::vector<ChatMessage> out;
  for (const auto& m : j) out.push_back({m["role"].get<std::string>(), m["content"]});
  return out;
}

class ChatTemplateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    data_ = LoadCases();
    ASSERT_TRUE(data_.is_object())
        << "missing generated data; run: .venv/bin/python tests/tools/make_chat_cases.py";
    for (const auto& t : data_["templates"]) {
      auto ct = ChatTemplate::FromTemplateSource(t["source"].get<std::string>());
      ASSERT_TRUE(ct.ok()) << t["name"] << ": " << ct.status();
      EXPECT_EQ(ct->family_name(), t["family"].get<std::string>()) << t["name"];
      templates_.emplace(t["name"].get<std::string>(), *ct);
    }
  }
  const ChatTemplate& Get(const std::string& name) { return templates_.at(name); }

  nlohmann::json data_;
  std::map<std::string, ChatTemplate> templates_;
};

TEST_F(ChatTemplateTest, MatchesJinjaRendering) {
  ASSERT_EQ(templates_.size(), 5u);
  int rendered = 0, refused = 0;
  for (const auto& c : data_["cases"]) {
    const std::string name = c["template"].get<std::string>();
    const auto messages = Messages(c["messages"]);
    auto out = Get(name).Render(messages, c["add_generation_prompt"].get<bool>());
    if (c.value("error", false)) {
      EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument) << name << c.dump();
      ++refused;
      continue;
    }
    ASSERT_TRUE(out.ok()) << name << ": " << out.status();
    EXPECT_EQ(*out, c["expected"].get<std::string>()) << name << " " << c["messages"].dump();
    ++rendered;
  }
  EXPECT_GE(rendered, 70);
  EXPECT_GE(refused, 2);
}

TEST_F(ChatTemplateTest, DefaultSystemPromptComesFromTheTemplate) {
  const std::vector<ChatMessage> hi = {{"user", "hi"}};
  EXPECT_EQ(*Get("smollm2").Render(hi, false),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n");
  EXPECT_EQ(*Get("qwen2.5").Render(hi, false),
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
            "assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n");
  // A ChatML template without a literal system prompt injects none.
  auto plain = ChatTemplate::FromTemplateSource(
      "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + "
      "'<|im_end|>\\n'}}{% endfor %}");
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(*plain->Render(hi, false), "<|im_start|>user\nhi<|im_end|>\n");
}

TEST_F(ChatTemplateTest, RejectsUnknownRolesAndMisplacedSystem) {
  for (const auto& [name, t] : templates_) {
    auto out = t.Render({{"user", "a"}, {"tool", "b"}}, true);
    EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument) << name;
  }
  // Jinja's Llama-2 template silently drops a system message at an odd position; refuse it.
  EXPECT_EQ(Get("llama2").Render({{"user", "a"}, {"system", "b"}}, true).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Get("llama2").Render({{"assistant", "a"}}, true).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ChatTemplate::FromTemplateSource("{{ messages }}").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ChatTemplateModelTest, FromModelUsesTheModelsTokens) {
  ModelFile m;
  m.chat_template = "{{ bos_token + '[INST] ' + x + ' [/INST]' }}";
  m.tokenizer.has_gguf = true;
  m.tokenizer.gguf.tokens = {"<unk>", "<BOS>", "<EOS>"};
  m.tokenizer.gguf.bos_id = 1;
  m.tokenizer.gguf.eos_id = 2;
  auto t = ChatTemplate::FromModel(m);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->family(), ChatTemplate::Family::kLlama2);
  EXPECT_EQ(*t->Render({{"user", "q"}, {"assistant", "a"}}, false),
            "<BOS>[INST] q [/INST] a <EOS>");
  // Without a template the vocabulary decides.
  ModelFile chatml;
  chatml.tokenizer.has_gguf = true;
  chatml.tokenizer.gguf.tokens = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
  auto c = ChatTemplate::FromModel(chatml);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->family(), ChatTemplate::Family::kChatML);
  ModelFile none;
  EXPECT_EQ(ChatTemplate::FromModel(none).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace moa
