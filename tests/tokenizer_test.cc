// Tokenizer conformance against reference implementations (HF `tokenizers`, llama.cpp,
// `sentencepiece`), data from tests/tools/make_tokenizer_cases.py.
#include "engine/tokenizer/tokenizer.h"

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "engine/tokenizer/bpe_tokenizer.h"
#include "engine/tokenizer/pre_tokenizer.h"
#include "engine/tokenizer/utf8.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace moa {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;

constexpr char kRegenerate[] =
    "missing generated data; run: .venv/bin/python tests/tools/make_tokenizer_cases.py";

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

nlohmann::json LoadJson(const std::string& name) {
  const std::string path = testing::GeneratedDataDir() + "/" + name;
  if (!testing::FileExists(path)) return nlohmann::json();
  return nlohmann::json::parse(ReadFile(path), nullptr, false);
}

GgufTokenizerData GgufFromJson(const nlohmann::json& j) {
  GgufTokenizerData d;
  d.model = j.value("model", "");
  d.pre = j.value("pre", "");
  d.tokens = j["tokens"].get<std::vector<std::string>>();
  d.token_types = j["token_types"].get<std::vector<int32_t>>();
  if (j.contains("merges")) d.merges = j["merges"].get<std::vector<std::string>>();
  if (j.contains("scores")) d.scores = j["scores"].get<std::vector<float>>();
  d.bos_id = j.value("bos_id", -1);
  d.eos_id = j.value("eos_id", -1);
  d.unk_id = j.value("unk_id", -1);
  d.add_bos = j.value("add_bos", false);
  d.add_space_prefix = j.value("add_space_prefix", false);
  return d;
}

std::string Escape(const std::string& s) { return nlohmann::json(s).dump(); }

// True when `s` is valid UTF-8 (DrainValid changes nothing).
bool IsValidUtf8(const std::string& s) {
  std::string in = s, out;
  utf8::DrainValid(&in, &out, /*final=*/true);
  return out == s;
}

class SmolLm2Test : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const nlohmann::json vocab = LoadJson("smollm2_gguf_vocab.json");
    cases_ = new nlohmann::json(LoadJson("tokenizer_cases.json"));
    if (vocab.is_object()) {
      TokenizerSource src;
      src.has_gguf = true;
      src.gguf = GgufFromJson(vocab);
      auto t = Tokenizer::Create(src);
      ASSERT_TRUE(t.ok()) << t.status();
      gguf_ = t->release();
    }
    TokenizerSource js;
    js.tokenizer_json_path = testing::GeneratedDataDir() + "/smollm2_tokenizer.json";
    js.bos_id = 1;
    js.eos_id = 2;
    if (testing::FileExists(js.tokenizer_json_path)) {
      auto t = Tokenizer::Create(js);
      ASSERT_TRUE(t.ok()) << t.status();
      json_ = t->release();
    }
  }
  void SetUp() override {
    ASSERT_NE(gguf_, nullptr) << kRegenerate;
    ASSERT_NE(json_, nullptr) << kRegenerate;
    ASSERT_TRUE(cases_->is_object()) << kRegenerate;
  }
  static const nlohmann::json& cases() { return (*cases_)["cases"]; }

  static inline Tokenizer* gguf_ = nullptr;
  static inline Tokenizer* json_ = nullptr;
  static inline nlohmann::json* cases_ = nullptr;
};

TEST_F(SmolLm2Test, MatchesHfTokenizersAndLlamaCpp) {
  ASSERT_GE(cases().size(), 300u);
  int llama_cpp_checked = 0;
  for (const auto& c : cases()) {
    const std::string text = c["text"].get<std::string>();
    const auto want = c["ids"].get<std::vector<int32_t>>();
    for (const Tokenizer* tok : {gguf_, json_}) {
      auto ids = tok->Encode(text, /*add_bos=*/false, /*parse_special=*/true);
      ASSERT_TRUE(ids.ok()) << ids.status();
      EXPECT_EQ(*ids, want) << (tok == gguf_ ? "GGUF" : "tokenizer.json") << " " << Escape(text);
      auto back = tok->Decode(*ids);
      ASSERT_TRUE(back.ok()) << back.status();
      EXPECT_EQ(*back, text);
    }
    if (c.contains("llama_cpp_ids")) {
      ++llama_cpp_checked;
      EXPECT_EQ(*gguf_->Encode(text, false, true), c["llama_cpp_ids"].get<std::vector<int32_t>>())
          << "llama.cpp " << Escape(text);
    }
    if (c.contains("ids_no_special")) {
      const auto plain = c["ids_no_special"].get<std::vector<int32_t>>();
      EXPECT_EQ(*gguf_->Encode(text, false, /*parse_special=*/false), plain) << Escape(text);
      EXPECT_EQ(*json_->Encode(text, false, /*parse_special=*/false), plain) << Escape(text);
    }
  }
  // The second oracle is optional in the generator; say when it was not there.
  if (llama_cpp_checked == 0) std::cerr << "note: no llama.cpp ids in tokenizer_cases.json\n";
}

TEST_F(SmolLm2Test, SpecialTokens) {
  EXPECT_EQ(gguf_->vocab_size(), 49152);
  EXPECT_EQ(gguf_->bos_id(), 1);
  EXPECT_EQ(gguf_->eos_id(), 2);
  for (const Tokenizer* tok : {gguf_, json_}) {
    EXPECT_TRUE(tok->IsEndOfGeneration(2));  // <|im_end|>
    EXPECT_TRUE(tok->IsEndOfGeneration(0));  // <|endoftext|>
    EXPECT_FALSE(tok->IsEndOfGeneration(1));
    EXPECT_FALSE(tok->IsEndOfGeneration(100));
    EXPECT_FALSE(tok->IsEndOfGeneration(-1));
    EXPECT_EQ(tok->SpecialTokenText(1), "<|im_start|>");
    EXPECT_EQ(tok->SpecialTokenText(100), "");
    EXPECT_EQ(tok->SpecialTokenText(1 << 20), "");
    // The model does not ask for BOS, so add_bos adds nothing.
    EXPECT_THAT(*tok->Encode("<|im_end|>", /*add_bos=*/true, true), ElementsAre(2));
    EXPECT_EQ(tok->Decode({49152}).status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(tok->Decode({-1}).status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST_F(SmolLm2Test, IncrementalDecoderHoldsBackPartialCharacters) {
  const std::string text = "Grüße 😀 中文 👨‍👩‍👧‍👦 ok\n🇯🇵";
  auto ids = gguf_->Encode(text, false, true);
  ASSERT_TRUE(ids.ok());
  IncrementalDecoder dec(gguf_);
  std::string streamed;
  int split_tokens = 0;
  for (int32_t id : *ids) {
    if (!IsValidUtf8(*gguf_->Decode({id}))) ++split_tokens;
    auto piece = dec.Add(id);
    ASSERT_TRUE(piece.ok()) << piece.status();
    EXPECT_TRUE(IsValidUtf8(*piece)) << Escape(*piece);
    streamed += *piece;
  }
  streamed += dec.Flush();
  EXPECT_EQ(streamed, text);
  EXPECT_GT(split_tokens, 0) << "the text should contain characters split across tokens";
}

// Token id of one raw byte in the byte-level vocabulary.
int32_t ByteToken(const Tokenizer& tok, unsigned char b) {
  for (int32_t id = 0; id < tok.vocab_size(); ++id) {
    if (tok.Decode({id}).value() == std::string(1, static_cast<char>(b))) return id;
  }
  return -1;
}

TEST_F(SmolLm2Test, IncrementalDecoderInvalidBytes) {
  const int32_t e4 = ByteToken(*gguf_, 0xE4), b8 = ByteToken(*gguf_, 0xB8),
                ad = ByteToken(*gguf_, 0xAD), cont = ByteToken(*gguf_, 0x80),
                a = ByteToken(*gguf_, 'a');
  ASSERT_GE(std::min({e4, b8, ad, cont, a}), 0);
  {
    // 中 = E4 B8 AD: held back until complete, never replaced.
    IncrementalDecoder dec(gguf_);
    EXPECT_EQ(*dec.Add(e4), "");
    EXPECT_EQ(*dec.Add(b8), "");
    EXPECT_EQ(*dec.Add(ad), "中");
    EXPECT_EQ(dec.Flush(), "");
  }
  {
    // A truncated character followed by ASCII can never complete.
    IncrementalDecoder dec(gguf_);
    EXPECT_EQ(*dec.Add(e4), "");
    EXPECT_EQ(*dec.Add(b8), "");
    EXPECT_EQ(*dec.Add(a), "\uFFFDa");
  }
  {
    // A continuation byte cannot start a character; a truncated tail becomes U+FFFD only on
    // Flush. (SmolLM2's vocabulary has no token for bytes such as 0xFF.)
    IncrementalDecoder dec(gguf_);
    EXPECT_EQ(*dec.Add(cont), "\uFFFD");
    EXPECT_EQ(*dec.Add(e4), "");
    EXPECT_EQ(dec.Flush(), "\uFFFD");
    EXPECT_EQ(dec.Flush(), "");
  }
  IncrementalDecoder dec(gguf_);
  EXPECT_FALSE(dec.Add(1 << 20).ok());
}

TEST_F(SmolLm2Test, EncodesFourThousandTokensInMilliseconds) {
  std::string text;
  for (const auto& c : cases()) text += c["text"].get<std::string>() + "\n";
  std::string prompt;
  while (gguf_->Encode(prompt, false, true)->size() < 4096) prompt += text;
  const absl::Time start = absl::Now();
  auto ids = gguf_->Encode(prompt, false, true);
  const absl::Duration took = absl::Now() - start;
  ASSERT_TRUE(ids.ok());
  EXPECT_LT(took, absl::Milliseconds(250)) << ids->size() << " tokens took " << took;
  std::cerr << ids->size() << " tokens encoded in " << took << "\n";
}

std::vector<std::string> Words(const PreTokenizer& p, std::string_view text) {
  auto w = p.Split(text);
  EXPECT_TRUE(w.ok()) << w.status();
  return w.ok() ? *w : std::vector<std::string>{};
}

TEST(PreTokenizerTest, Gpt2WhitespaceRuns) {
  bool ignore_merges = true;
  auto p = PreTokenizer::FromGgufPre("gpt2", &ignore_merges);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_FALSE(ignore_merges);
  // The last space of a run belongs to the next word.
  EXPECT_THAT(Words(*p, "Hello   world  "), ElementsAre("Hello", "  ", " world", "  "));
  EXPECT_THAT(Words(*p, "a\tb"), ElementsAre("a", "\t", "b"));
  EXPECT_THAT(Words(*p, "I'm 42!"), ElementsAre("I", "'m", " 42", "!"));
  auto smol = PreTokenizer::FromGgufPre("smollm", &ignore_merges);
  ASSERT_TRUE(smol.ok());
  EXPECT_THAT(Words(*smol, "x 123"), ElementsAre("x", " ", "1", "2", "3"));
  auto llama3 = PreTokenizer::FromGgufPre("llama-bpe", &ignore_merges);
  ASSERT_TRUE(llama3.ok());
  EXPECT_TRUE(ignore_merges);
  EXPECT_THAT(Words(*llama3, "x 12345"), ElementsAre("x", " ", "123", "45"));
  EXPECT_EQ(PreTokenizer::FromGgufPre("no-such-pre", &ignore_merges).status().code(),
            absl::StatusCode::kUnimplemented);
}

TEST(PreTokenizerTest, SplitBehaviorsAsHfTokenizers) {
  // The example of HF tokenizers' SplitDelimiterBehavior documentation.
  const std::vector<std::pair<std::string, std::vector<std::string>>> want = {
      {"Removed", {"the", "final", "countdown"}},
      {"Isolated", {"the", "-", "final", "-", "-", "countdown"}},
      {"MergedWithPrevious", {"the-", "final-", "-", "countdown"}},
      {"MergedWithNext", {"the", "-final", "-", "-countdown"}},
      {"Contiguous", {"the", "-", "final", "--", "countdown"}},
  };
  for (const auto& [behavior, words] : want) {
    bool byte_level = true;
    auto p = PreTokenizer::FromJson(
        {{"type", "Split"}, {"pattern", {{"String", "-"}}}, {"behavior", behavior}}, &byte_level);
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_FALSE(byte_level);
    EXPECT_THAT(Words(*p, "the-final--countdown"), ElementsAreArray(words)) << behavior;
  }
  bool byte_level = false;
  auto inverted = PreTokenizer::FromJson({{"type", "Split"},
                                          {"pattern", {{"Regex", "\\p{L}+"}}},
                                          {"behavior", "Removed"},
                                          {"invert", true}},
                                         &byte_level);
  ASSERT_TRUE(inverted.ok());
  EXPECT_THAT(Words(*inverted, "ab, cd"), ElementsAre("ab", "cd"));
  auto bad = PreTokenizer::FromJson(
      {{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}},
      &byte_level);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PreTokenizer::FromJson({{"type", "Whitespace"}}, &byte_level).status().code(),
            absl::StatusCode::kUnimplemented);
}

TEST(TokenizerJsonTest, RejectsMalformedFiles) {
  const std::string bytes_vocab = [] {
    nlohmann::json v = nlohmann::json::object();
    const auto& map = utf8::ByteToCodePoint();
    for (int b = 0; b < 256; ++b) {
      std::string s;
      utf8::Append(map[b], &s);
      v[s] = b;
    }
    v["ab"] = 256;
    return v.dump();
  }();
  auto make = [&](const std::string& merges, const std::string& extra) {
    return "{\"model\":{\"type\":\"BPE\",\"vocab\":" + bytes_vocab + ",\"merges\":" + merges +
           "}," + extra + "\"pre_tokenizer\":{\"type\":\"ByteLevel\",\"add_prefix_space\":false}}";
  };
  // A minimal valid file, merges as pairs.
  auto ok = CreateBpeTokenizerFromJson(make("[[\"a\",\"b\"]]", ""), -1, -1, false);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_THAT(*(*ok)->Encode("abc", false, false), ElementsAre(256, 'c'));
  const std::vector<std::pair<std::string, absl::StatusCode>> bad = {
      {"not json", absl::StatusCode::kInvalidArgument},
      {"{}", absl::StatusCode::kInvalidArgument},
      {"[1,2]", absl::StatusCode::kInvalidArgument},
      {make("[\"a b c\"]", ""), absl::StatusCode::kInvalidArgument},
      {make("[\"a zz\"]", ""), absl::StatusCode::kInvalidArgument},
      {make("[7]", ""), absl::StatusCode::kInvalidArgument},
      {make("[]", "\"added_tokens\":[{\"id\":999999,\"content\":\"<x>\"}],"),
       absl::StatusCode::kInvalidArgument},
      {make("[]", "\"added_tokens\":[{\"id\":\"1\",\"content\":\"<x>\"}],"),
       absl::StatusCode::kInvalidArgument},
      {make("[]", "\"normalizer\":{\"type\":\"NFC\"},"), absl::StatusCode::kUnimplemented},
      {"{\"model\":{\"type\":\"WordPiece\",\"vocab\":{}}}", absl::StatusCode::kUnimplemented},
      {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]}}",
       absl::StatusCode::kUnimplemented},  // no ByteLevel: not byte-level BPE
  };
  for (const auto& [json, code] : bad) {
    EXPECT_EQ(CreateBpeTokenizerFromJson(json, -1, -1, false).status().code(), code) << json;
  }
  TokenizerSource none;
  EXPECT_EQ(Tokenizer::Create(none).status().code(), absl::StatusCode::kInvalidArgument);
  TokenizerSource missing;
  missing.tokenizer_json_path = "/nonexistent/tokenizer.json";
  EXPECT_EQ(Tokenizer::Create(missing).status().code(), absl::StatusCode::kNotFound);
}

// The SentencePiece BPE model trained by the generator, through both of our paths: the GGUF
// "llama" vocabulary (llama.cpp's algorithm) and the .model file (libsentencepiece).
class SentencePieceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    data_ = LoadJson("spm_cases.json");
    ASSERT_TRUE(data_.is_object()) << kRegenerate;
    TokenizerSource g;
    g.has_gguf = true;
    g.gguf = GgufFromJson(data_);
    auto t = Tokenizer::Create(g);
    ASSERT_TRUE(t.ok()) << t.status();
    gguf_ = *std::move(t);
    TokenizerSource m;
    m.sentencepiece_path = testing::GeneratedDataDir() + "/spm_test.model";
    m.add_bos = true;
    auto s = Tokenizer::Create(m);
    ASSERT_TRUE(s.ok()) << s.status();
    model_ = *std::move(s);
  }
  nlohmann::json data_;
  std::unique_ptr<Tokenizer> gguf_, model_;
};

TEST_F(SentencePieceTest, MatchesSentencePiece) {
  ASSERT_GE(data_["cases"].size(), 300u);
  int byte_fallbacks = 0;
  for (const auto& c : data_["cases"]) {
    const std::string text = c["text"].get<std::string>();
    const auto want = c["ids"].get<std::vector<int32_t>>();
    for (const auto* tok : {gguf_.get(), model_.get()}) {
      auto ids = tok->Encode(text, /*add_bos=*/false, /*parse_special=*/false);
      ASSERT_TRUE(ids.ok()) << ids.status();
      EXPECT_EQ(*ids, want) << (tok == gguf_.get() ? "GGUF" : ".model") << " " << Escape(text);
      EXPECT_EQ(*tok->Decode(*ids), text) << Escape(text);
    }
    for (int32_t id : want) byte_fallbacks += data_["token_types"][id].get<int>() == 6;
  }
  EXPECT_GT(byte_fallbacks, 0) << "cases should exercise byte fallback";
}

TEST_F(SentencePieceTest, BosAndSpecialTokens) {
  const int32_t bos = data_["bos_id"].get<int32_t>();
  const int32_t eos = data_["eos_id"].get<int32_t>();
  // Only the .model source asks for BOS here.
  EXPECT_EQ(model_->Encode("the", true, false)->front(), bos);
  EXPECT_NE(gguf_->Encode("the", true, false)->front(), bos);
  for (const auto* tok : {gguf_.get(), model_.get()}) {
    EXPECT_EQ(tok->bos_id(), bos);
    EXPECT_TRUE(tok->IsEndOfGeneration(eos));
    EXPECT_EQ(tok->SpecialTokenText(eos), "</s>");
    // "</s>" parsed as special: a text fragment after it gets its own dummy prefix.
    auto ids = tok->Encode("the</s>the", false, /*parse_special=*/true);
    ASSERT_TRUE(ids.ok());
    auto plain = tok->Encode("the", false, false);
    std::vector<int32_t> want = *plain;
    want.push_back(eos);
    want.insert(want.end(), plain->begin(), plain->end());
    EXPECT_EQ(*ids, want);
    EXPECT_EQ(*tok->Decode(*ids), "the</s>the");
  }
  // Streaming a SentencePiece sequence gives what Decode gives.
  const std::string text = "the naïve fox 😀 jumps";
  auto ids = gguf_->Encode(text, false, false);
  IncrementalDecoder dec(gguf_.get());
  std::string streamed;
  for (int32_t id : *ids) streamed += dec.Add(id).value();
  streamed += dec.Flush();
  EXPECT_EQ(streamed, text);
}

TEST(GgufTokenizerTest, RejectsInconsistentData) {
  TokenizerSource src;
  src.has_gguf = true;
  src.gguf.model = "gpt2";
  EXPECT_EQ(Tokenizer::Create(src).status().code(), absl::StatusCode::kInvalidArgument);
  src.gguf.tokens = {"a", "b", "ab"};
  src.gguf.token_types = {1, 1};
  EXPECT_EQ(Tokenizer::Create(src).status().code(), absl::StatusCode::kInvalidArgument);
  src.gguf.token_types = {1, 1, 1};
  src.gguf.merges = {"a c"};
  src.gguf.pre = "gpt2";
  EXPECT_EQ(Tokenizer::Create(src).status().code(), absl::StatusCode::kInvalidArgument);
  src.gguf.merges = {"a b"};
  EXPECT_TRUE(Tokenizer::Create(src).ok());
  src.gguf.pre = "no-such-pre";
  EXPECT_EQ(Tokenizer::Create(src).status().code(), absl::StatusCode::kUnimplemented);
  src.gguf.model = "llama";
  src.gguf.scores = {0.f};
  EXPECT_EQ(Tokenizer::Create(src).status().code(), absl::StatusCode::kInvalidArgument);
  src.gguf.model = "bert";
  EXPECT_EQ(Tokenizer::Create(src).status().code(), absl::StatusCode::kUnimplemented);
}

}  // namespace
}  // namespace moa
