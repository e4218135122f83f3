// The safetensors reader and the Hugging Face checkpoint loader: configs, dtypes, shards, tied
// embeddings, rope scaling, tokenizer metadata, and a table of malformed inputs that must each
// be refused with a message naming the problem.
#include "engine/model/hf_loader.h"

#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "engine/model/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace moa {
namespace {

using nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// --- helpers -------------------------------------------------------------------------------

// gtest prints this Abseil's string_view character by character.
std::string Msg(const absl::Status& s) { return std::string(s.message()); }

std::string Raw(const std::string& header, const std::string& data, uint64_t header_len) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((header_len >> (8 * i)) & 0xff);
  return out + header + data;
}
std::string Raw(const std::string& header, const std::string& data) {
  return Raw(header, data, header.size());
}

struct Spec {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
};

// A well-formed file; element k of each tensor holds the bytes of k (mod 256).
std::string BuildSafetensors(const std::vector<Spec>& specs) {
  json header = json::object();
  header["__metadata__"] = {{"format", "pt"}};
  std::string data;
  for (const Spec& s : specs) {
    int64_t n = s.dtype == "F32" ? 4 : 2;
    for (int64_t d : s.shape) n *= d;
    header[s.name] = {
        {"dtype", s.dtype}, {"shape", s.shape}, {"data_offsets", {data.size(), data.size() + n}}};
    for (int64_t i = 0; i < n; ++i) data.push_back(static_cast<char>(i));
  }
  return Raw(header.dump(), data);
}

absl::StatusOr<SafetensorsTensors> Parse(const std::string& bytes) {
  return ParseSafetensors(
      absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()), nullptr,
      "test.safetensors");
}

void WriteFile(const std::string& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary);
  out << content;
  ASSERT_TRUE(out.good()) << path;
}

// 1 layer, d_model 8, 2 heads of 4, 1 KV head, d_ff 16, vocab 16.
json TinyConfig() {
  return {{"architectures", {"LlamaForCausalLM"}},
          {"hidden_size", 8},
          {"intermediate_size", 16},
          {"num_hidden_layers", 1},
          {"num_attention_heads", 2},
          {"num_key_value_heads", 1},
          {"vocab_size", 16},
          {"max_position_embeddings", 32},
          {"rms_norm_eps", 1e-5},
          {"rope_theta", 10000.0}};
}

std::vector<Spec> TinyTensors() {
  const std::string l = "model.layers.0.";
  return {{"model.embed_tokens.weight", "F32", {16, 8}},
          {l + "input_layernorm.weight", "F32", {8}},
          {l + "self_attn.q_proj.weight", "F32", {8, 8}},
          {l + "self_attn.k_proj.weight", "F32", {4, 8}},
          {l + "self_attn.v_proj.weight", "F32", {4, 8}},
          {l + "self_attn.o_proj.weight", "F32", {8, 8}},
          {l + "post_attention_layernorm.weight", "F32", {8}},
          {l + "mlp.gate_proj.weight", "F32", {16, 8}},
          {l + "mlp.up_proj.weight", "F32", {16, 8}},
          {l + "mlp.down_proj.weight", "F32", {8, 16}},
          {"model.norm.weight", "F32", {8}},
          {"lm_head.weight", "F32", {16, 8}}};
}

const char* kTokenizerJson = R"({
  "added_tokens": [{"id": 1, "content": "<s>"}, {"id": 2, "content": "</s>"}],
  "model": {"type": "BPE", "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "<|end|>": 7}}
})";

// A complete valid checkpoint directory.
std::string MakeCheckpoint(const json& config, const std::vector<Spec>& tensors) {
  const std::string dir = testing::MakeTempDir();
  WriteFile(dir + "/config.json", config.dump());
  WriteFile(dir + "/model.safetensors", BuildSafetensors(tensors));
  WriteFile(dir + "/tokenizer.json", kTokenizerJson);
  WriteFile(dir + "/tokenizer_config.json",
            R"({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": true,
                "chat_template": "{{ messages }}"})");
  return dir;
}

// --- config.json ---------------------------------------------------------------------------

TEST(HfConfigTest, LlamaWithDefaults) {
  json c = TinyConfig();
  c.erase("num_key_value_heads");
  c.erase("rope_theta");
  absl::StatusOr<ModelConfig> cfg = ParseHfConfig(c.dump());
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->architecture, "llama");
  EXPECT_EQ(cfg->n_layers, 1);
  EXPECT_EQ(cfg->d_model, 8);
  EXPECT_EQ(cfg->d_ff, 16);
  EXPECT_EQ(cfg->n_heads, 2);
  EXPECT_EQ(cfg->n_kv_heads, 2);  // defaults to num_attention_heads
  EXPECT_EQ(cfg->head_dim, 4);    // defaults to hidden_size / heads
  EXPECT_EQ(cfg->vocab_size, 16);
  EXPECT_EQ(cfg->max_context, 32);
  EXPECT_FLOAT_EQ(cfg->rms_eps, 1e-5f);
  EXPECT_EQ(cfg->rope_theta, 10000.0);
  EXPECT_EQ(cfg->rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_EQ(cfg->rope_layout, RopeLayout::kHalfSplit);
  EXPECT_FALSE(cfg->tied_embeddings);
}

TEST(HfConfigTest, ExplicitHeadDimGqaTiedAndTheta) {
  json c = TinyConfig();
  c["head_dim"] = 8;
  c["num_attention_heads"] = 2;
  c["num_key_value_heads"] = 1;
  c["tie_word_embeddings"] = true;
  c["rope_theta"] = 500000;  // an integer in some configs
  absl::StatusOr<ModelConfig> cfg = ParseHfConfig(c.dump());
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->head_dim, 8);
  EXPECT_EQ(cfg->n_kv_heads, 1);
  EXPECT_TRUE(cfg->tied_embeddings);
  EXPECT_EQ(cfg->rope_theta, 500000.0);
}

TEST(HfConfigTest, RopeScaling) {
  json c = TinyConfig();
  c["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  absl::StatusOr<ModelConfig> cfg = ParseHfConfig(c.dump());
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(cfg->rope_scaling.factor, 8.0);
  EXPECT_EQ(cfg->rope_scaling.low_freq_factor, 1.0);
  EXPECT_EQ(cfg->rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(cfg->rope_scaling.original_max_position, 8192);

  c["rope_scaling"] = {{"type", "linear"}, {"factor", 2.5}};
  cfg = ParseHfConfig(c.dump());
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->rope_scaling.type, RopeScaling::Type::kLinear);
  EXPECT_EQ(cfg->rope_scaling.factor, 2.5);

  for (const json& none : {json(nullptr), json{{"rope_type", "default"}}}) {
    c["rope_scaling"] = none;
    cfg = ParseHfConfig(c.dump());
    ASSERT_TRUE(cfg.ok()) << cfg.status();
    EXPECT_EQ(cfg->rope_scaling.type, RopeScaling::Type::kNone);
  }
}

TEST(HfConfigTest, Mistral) {
  json c = TinyConfig();
  c["architectures"] = {"MistralForCausalLM"};
  c["sliding_window"] = nullptr;
  absl::StatusOr<ModelConfig> cfg = ParseHfConfig(c.dump());
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->architecture, "mistral");
  // A window as long as the context is no window at all.
  c["sliding_window"] = 32;
  EXPECT_TRUE(ParseHfConfig(c.dump()).ok());
}

struct BadConfig {
  const char* what;
  json config;
  const char* message;
};

TEST(HfConfigTest, BadConfigsAreRefusedWithAMessage) {
  auto with = [](const char* key, json value) {
    json c = TinyConfig();
    if (value.is_discarded()) {
      c.erase(key);
    } else {
      c[key] = std::move(value);
    }
    return c;
  };
  const json removed(json::value_t::discarded);
  const std::vector<BadConfig> cases = {
      {"unknown architecture", with("architectures", {"GPT2LMHeadModel"}), "GPT2LMHeadModel"},
      {"no architectures", with("architectures", removed), "architectures"},
      {"missing hidden_size", with("hidden_size", removed), "hidden_size"},
      {"negative heads", with("num_attention_heads", -2), "num_attention_heads"},
      {"float layers", with("num_hidden_layers", 1.5), "num_hidden_layers"},
      {"huge vocab", with("vocab_size", 1e12), "vocab_size"},
      {"string eps", with("rms_norm_eps", "small"), "rms_norm_eps"},
      {"zero theta", with("rope_theta", 0), "rope_theta"},
      {"indivisible heads", with("num_attention_heads", 3), "hidden_size"},
      {"yarn", with("rope_scaling", {{"rope_type", "yarn"}, {"factor", 4.0}}), "yarn"},
      {"dynamic", with("rope_scaling", {{"type", "dynamic"}, {"factor", 2.0}}), "dynamic"},
      {"linear without factor", with("rope_scaling", {{"type", "linear"}}), "factor"},
      {"rope_scaling not object", with("rope_scaling", 3), "rope_scaling"},
      {"attention bias", with("attention_bias", true), "attention_bias"},
      {"gelu", with("hidden_act", "gelu"), "hidden_act"},
      {"tie not bool", with("tie_word_embeddings", "yes"), "tie_word_embeddings"},
  };
  for (const BadConfig& c : cases) {
    absl::StatusOr<ModelConfig> cfg = ParseHfConfig(c.config.dump());
    ASSERT_FALSE(cfg.ok()) << c.what;
    EXPECT_THAT(Msg(cfg.status()), HasSubstr(c.message)) << c.what;
  }
  EXPECT_THAT(Msg(ParseHfConfig("{\"architectures\": [").status()), HasSubstr("invalid JSON"));
  EXPECT_THAT(Msg(ParseHfConfig("[1, 2]").status()), HasSubstr("not a JSON object"));

  json sliding = TinyConfig();
  sliding["architectures"] = {"MistralForCausalLM"};
  sliding["sliding_window"] = 16;
  EXPECT_THAT(Msg(ParseHfConfig(sliding.dump()).status()),
              HasSubstr("sliding-window Mistral is not supported"));
}

// --- safetensors ---------------------------------------------------------------------------

TEST(SafetensorsTest, ParsesDtypesShapesAndOffsets) {
  const std::string bytes = BuildSafetensors(
      {{"a", "F32", {2, 3}}, {"b", "F16", {5}}, {"c", "BF16", {1, 2, 2}}, {"s", "F32", {}}});
  absl::StatusOr<SafetensorsTensors> t = Parse(bytes);
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_EQ(t->size(), 4u);  // __metadata__ is not a tensor
  const HostTensor& a = t->at("a");
  EXPECT_EQ(a.name, "a");
  EXPECT_EQ(a.dtype, DType::kF32);
  EXPECT_THAT(a.shape, ElementsAre(2, 3));
  EXPECT_EQ(a.nbytes, 24);
  const HostTensor& b = t->at("b");
  EXPECT_EQ(b.dtype, DType::kF16);
  EXPECT_EQ(b.nbytes, 10);
  EXPECT_EQ(b.data, a.data + 24);  // views into the buffer, no copies
  EXPECT_EQ(t->at("c").dtype, DType::kBF16);
  EXPECT_THAT(t->at("c").shape, ElementsAre(1, 2, 2));
  EXPECT_EQ(t->at("s").NumElements(), 1);
  EXPECT_EQ(t->at("s").nbytes, 4);
  EXPECT_EQ(a.data[5], 5);
}

TEST(SafetensorsTest, MalformedFilesAreRefusedWithAMessage) {
  const std::string data(64, '\0');
  struct Case {
    const char* what;
    std::string bytes;
    const char* message;
  };
  auto one = [](const std::string& entry) { return "{\"t\": " + entry + "}"; };
  const std::vector<Case> cases = {
      {"empty", "", "truncated"},
      {"shorter than the length", std::string(5, '\0'), "truncated"},
      {"absurd header length", Raw("{}", data, uint64_t{1} << 62), "exceeds the limit"},
      {"header past the end", Raw("{}", "", 100), "truncated: header length 100"},
      {"bad JSON", Raw("{\"t\": {", data), "not valid JSON"},
      {"not an object", Raw("[1,2]", data), "not a JSON object"},
      {"entry not an object", Raw(one("3"), data), "not an object"},
      {"unknown dtype", Raw(one(R"({"dtype":"I64","shape":[2],"data_offsets":[0,16]})"), data),
       "\"I64\""},
      {"fp8 dtype", Raw(one(R"({"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]})"), data),
       "F8_E4M3"},
      {"no dtype", Raw(one(R"({"shape":[2],"data_offsets":[0,8]})"), data), "dtype"},
      {"offsets past end", Raw(one(R"({"dtype":"F32","shape":[32],"data_offsets":[0,128]})"), data),
       "outside the data section"},
      {"offsets reversed", Raw(one(R"({"dtype":"F32","shape":[0],"data_offsets":[8,4]})"), data),
       "outside the data section"},
      {"negative offset", Raw(one(R"({"dtype":"F32","shape":[1],"data_offsets":[-4,0]})"), data),
       "data_offsets"},
      {"one offset", Raw(one(R"({"dtype":"F32","shape":[1],"data_offsets":[4]})"), data),
       "data_offsets"},
      {"too many bytes", Raw(one(R"({"dtype":"F32","shape":[2,3],"data_offsets":[0,28]})"), data),
       "needs 24 bytes but data_offsets [0, 28) hold 28"},
      {"too few bytes", Raw(one(R"({"dtype":"F32","shape":[2,3],"data_offsets":[0,20]})"), data),
       "needs more than the 20 bytes"},
      {"overflowing shape",
       Raw(one(R"({"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]})"),
           data),
       "needs more than"},
      {"negative dim", Raw(one(R"({"dtype":"F32","shape":[-1],"data_offsets":[0,4]})"), data),
       "shape"},
      {"shape not array", Raw(one(R"({"dtype":"F32","shape":4,"data_offsets":[0,16]})"), data),
       "shape"},
      {"overlap",
       Raw(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
           R"("b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
           data),
       "overlap"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<SafetensorsTensors> t = Parse(c.bytes);
    ASSERT_FALSE(t.ok()) << c.what;
    EXPECT_THAT(Msg(t.status()), HasSubstr(c.message)) << c.what;
    EXPECT_THAT(Msg(t.status()), HasSubstr("test.safetensors")) << c.what;
  }
}

TEST(SafetensorsTest, ReadsFilesAndKeepsTheMappingAlive) {
  const std::string dir = testing::MakeTempDir();
  WriteFile(dir + "/m.safetensors", BuildSafetensors({{"w", "F32", {4}}}));
  HostTensor w;
  {
    absl::StatusOr<SafetensorsTensors> t = ReadSafetensorsFile(dir + "/m.safetensors");
    ASSERT_TRUE(t.ok()) << t.status();
    w = t->at("w");
  }
  ASSERT_NE(w.owner, nullptr);
  EXPECT_EQ(w.data[15], 15);  // still mapped after the map of tensors is gone

  WriteFile(dir + "/short.safetensors", "abc");
  EXPECT_THAT(Msg(ReadSafetensorsFile(dir + "/short.safetensors").status()),
              HasSubstr("truncated"));
  absl::StatusOr<SafetensorsTensors> missing = ReadSafetensorsFile(dir + "/nope.safetensors");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Msg(missing.status()), HasSubstr("nope.safetensors"));
}

// --- checkpoint directories -----------------------------------------------------------------

TEST(HfLoaderTest, LoadsACheckpointUnderCanonicalNames) {
  std::vector<Spec> tensors = TinyTensors();
  tensors.push_back({"model.layers.0.self_attn.rotary_emb.inv_freq", "F32", {2}});
  const std::string dir = MakeCheckpoint(TinyConfig(), tensors);
  absl::StatusOr<ModelFile> m = LoadHfModel(dir);
  ASSERT_TRUE(m.ok()) << m.status();
  std::vector<std::string> names;
  for (const auto& [name, t] : m->tensors) {
    names.push_back(name);
    EXPECT_EQ(t.name, name);
  }
  EXPECT_THAT(
      names,
      ElementsAre("blk.0.attn_k.weight", "blk.0.attn_norm.weight", "blk.0.attn_output.weight",
                  "blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.0.ffn_down.weight",
                  "blk.0.ffn_gate.weight", "blk.0.ffn_norm.weight", "blk.0.ffn_up.weight",
                  "output.weight", "output_norm.weight", "token_embd.weight"));
  EXPECT_THAT(m->tensors.at("blk.0.attn_k.weight").shape, ElementsAre(4, 8));
  EXPECT_FALSE(m->config.tied_embeddings);
  EXPECT_EQ(m->config.rope_layout, RopeLayout::kHalfSplit);
  EXPECT_EQ(m->tokenizer.tokenizer_json_path, dir + "/tokenizer.json");
  EXPECT_TRUE(m->tokenizer.sentencepiece_path.empty());
  EXPECT_FALSE(m->tokenizer.has_gguf);
  EXPECT_EQ(m->tokenizer.bos_id, 1);
  EXPECT_EQ(m->tokenizer.eos_id, 2);
  EXPECT_TRUE(m->tokenizer.add_bos);
  EXPECT_EQ(m->chat_template, "{{ messages }}");
}

TEST(HfLoaderTest, TiedEmbeddings) {
  // lm_head absent: tied whatever the config says.
  std::vector<Spec> tensors = TinyTensors();
  tensors.pop_back();
  absl::StatusOr<ModelFile> m = LoadHfModel(MakeCheckpoint(TinyConfig(), tensors));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_TRUE(m->config.tied_embeddings);
  EXPECT_FALSE(m->tensors.contains("output.weight"));

  // tie_word_embeddings with a (redundant) lm_head: the head is not used.
  json c = TinyConfig();
  c["tie_word_embeddings"] = true;
  m = LoadHfModel(MakeCheckpoint(c, TinyTensors()));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_TRUE(m->config.tied_embeddings);
  EXPECT_FALSE(m->tensors.contains("output.weight"));
}

TEST(HfLoaderTest, TokenizerMetadataFallbacks) {
  const std::string dir = MakeCheckpoint(TinyConfig(), TinyTensors());
  // A list of named templates, no eos_token: eos comes from generation_config.json.
  WriteFile(dir + "/tokenizer_config.json",
            R"({"bos_token": {"content": "<s>"}, "add_bos_token": false,
                "chat_template": [{"name": "tool_use", "template": "T"},
                                  {"name": "default", "template": "D"}]})");
  WriteFile(dir + "/generation_config.json", R"({"eos_token_id": [7, 2]})");
  absl::StatusOr<ModelFile> m = LoadHfModel(dir);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->chat_template, "D");
  EXPECT_EQ(m->tokenizer.bos_id, 1);
  EXPECT_EQ(m->tokenizer.eos_id, 7);
  EXPECT_FALSE(m->tokenizer.add_bos);

  // Only a SentencePiece model.
  std::remove((dir + "/tokenizer.json").c_str());
  WriteFile(dir + "/tokenizer.model", "not parsed by the loader");
  m = LoadHfModel(dir);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_TRUE(m->tokenizer.tokenizer_json_path.empty());
  EXPECT_EQ(m->tokenizer.sentencepiece_path, dir + "/tokenizer.model");
  EXPECT_EQ(m->tokenizer.eos_id, 7);

  std::remove((dir + "/tokenizer.model").c_str());
  EXPECT_THAT(Msg(LoadHfModel(dir).status()), HasSubstr("tokenizer.json"));
}

TEST(HfLoaderTest, Shards) {
  const std::string dir = MakeCheckpoint(TinyConfig(), TinyTensors());
  std::remove((dir + "/model.safetensors").c_str());
  std::vector<Spec> all = TinyTensors();
  std::vector<Spec> first(all.begin(), all.begin() + 5);
  std::vector<Spec> second(all.begin() + 5, all.end());
  WriteFile(dir + "/a.safetensors", BuildSafetensors(first));
  WriteFile(dir + "/b.safetensors", BuildSafetensors(second));
  json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", json::object()}};
  for (const Spec& s : first) index["weight_map"][s.name] = "a.safetensors";
  for (const Spec& s : second) index["weight_map"][s.name] = "b.safetensors";
  WriteFile(dir + "/model.safetensors.index.json", index.dump());
  absl::StatusOr<ModelFile> m = LoadHfModel(dir);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->tensors.size(), 12u);

  json moved = index;  // the index names the wrong shard for one tensor
  moved["weight_map"]["model.norm.weight"] = "a.safetensors";
  WriteFile(dir + "/model.safetensors.index.json", moved.dump());
  EXPECT_THAT(Msg(LoadHfModel(dir).status()),
              HasSubstr("tensor \"model.norm.weight\" is not in shard a.safetensors"));

  json missing = index;
  missing["weight_map"]["model.norm.weight"] = "c.safetensors";
  WriteFile(dir + "/model.safetensors.index.json", missing.dump());
  EXPECT_THAT(Msg(LoadHfModel(dir).status()), HasSubstr("shard c.safetensors listed in"));

  json escaping = index;
  escaping["weight_map"]["model.norm.weight"] = "../b.safetensors";
  WriteFile(dir + "/model.safetensors.index.json", escaping.dump());
  EXPECT_THAT(Msg(LoadHfModel(dir).status()), HasSubstr("bad shard file name"));

  WriteFile(dir + "/model.safetensors.index.json", R"({"weight_map": [1]})");
  EXPECT_THAT(Msg(LoadHfModel(dir).status()), HasSubstr("weight_map"));
}

TEST(HfLoaderTest, BadCheckpointsAreRefusedWithAMessage) {
  auto replace_shape = [](const std::string& name, std::vector<int64_t> shape) {
    std::vector<Spec> t = TinyTensors();
    for (Spec& s : t) {
      if (s.name == name) s.shape = shape;
    }
    return t;
  };
  auto without = [](const std::string& name) {
    std::vector<Spec> t = TinyTensors();
    std::erase_if(t, [&](const Spec& s) { return s.name == name; });
    return t;
  };
  json gpt2 = TinyConfig();
  gpt2["architectures"] = {"GPT2LMHeadModel"};
  std::vector<Spec> extra_layer = TinyTensors();
  extra_layer.push_back({"model.layers.3.mlp.up_proj.weight", "F32", {16, 8}});
  std::vector<Spec> int_tensor = TinyTensors();
  int_tensor[0].dtype = "I8";

  struct Case {
    const char* what;
    json config;
    std::vector<Spec> tensors;
    const char* message;
  };
  const std::vector<Case> cases = {
      {"shape mismatch", TinyConfig(),
       replace_shape("model.layers.0.self_attn.q_proj.weight", {8, 4}), "blk.0.attn_q.weight"},
      {"missing tensor", TinyConfig(), without("model.layers.0.mlp.up_proj.weight"),
       "blk.0.ffn_up.weight"},
      {"unknown architecture", gpt2, TinyTensors(), "GPT2LMHeadModel"},
      {"layer beyond the config", TinyConfig(), extra_layer, "num_hidden_layers"},
      {"unsupported dtype", TinyConfig(), int_tensor, "\"I8\""},
  };
  for (const Case& c : cases) {
    absl::StatusOr<ModelFile> m = LoadHfModel(MakeCheckpoint(c.config, c.tensors));
    ASSERT_FALSE(m.ok()) << c.what;
    EXPECT_THAT(Msg(m.status()), HasSubstr(c.message)) << c.what;
  }

  const std::string dir = MakeCheckpoint(TinyConfig(), TinyTensors());
  const std::string good = BuildSafetensors(TinyTensors());
  WriteFile(dir + "/model.safetensors", good.substr(0, good.size() - 4));
  EXPECT_THAT(Msg(LoadHfModel(dir).status()), HasSubstr("outside the data section"));
  WriteFile(dir + "/model.safetensors", good.substr(0, 100));
  EXPECT_THAT(Msg(LoadHfModel(dir).status()), HasSubstr("truncated"));
  std::remove((dir + "/model.safetensors").c_str());
  EXPECT_THAT(Msg(LoadHfModel(dir).status()), HasSubstr("model.safetensors"));
  std::remove((dir + "/config.json").c_str());
  EXPECT_THAT(Msg(LoadHfModel(dir).status()), HasSubstr("config.json"));
}

// --- the generated tiny model (tests/tools/make_tiny_model.py) ------------------------------

std::string TinyDir(const std::string& variant) {
  return testing::GeneratedDataDir() + "/tiny/" + variant;
}

#define LOAD_TINY(var, variant)                                                                  \
  ASSERT_TRUE(testing::FileExists(TinyDir(variant) + "/config.json"))                            \
      << TinyDir(variant) << " is missing: run .venv/bin/python tests/tools/make_tiny_model.py"; \
  absl::StatusOr<ModelFile> var = LoadHfModel(TinyDir(variant));                                 \
  ASSERT_TRUE(var.ok()) << var.status()

TEST(HfLoaderGeneratedTest, F32Checkpoint) {
  LOAD_TINY(m, "hf");
  const ModelConfig& c = m->config;
  EXPECT_EQ(c.n_layers, 2);
  EXPECT_EQ(c.d_model, 64);
  EXPECT_EQ(c.n_heads, 4);
  EXPECT_EQ(c.n_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.d_ff, 96);
  EXPECT_EQ(c.vocab_size, 300);
  EXPECT_EQ(c.max_context, 128);
  EXPECT_FALSE(c.tied_embeddings);
  EXPECT_EQ(m->tensors.size(), 2u * 9 + 3);  // rotary_emb.inv_freq is skipped
  for (const auto& [name, t] : m->tensors) EXPECT_EQ(t.dtype, DType::kF32) << name;
  EXPECT_THAT(m->tensors.at("blk.1.ffn_down.weight").shape, ElementsAre(64, 96));
  EXPECT_EQ(m->tokenizer.bos_id, 0);
  EXPECT_EQ(m->tokenizer.eos_id, 1);
  EXPECT_TRUE(m->tokenizer.add_bos);
  EXPECT_THAT(m->chat_template, HasSubstr("message['role']"));
}

TEST(HfLoaderGeneratedTest, HalfPrecisionCheckpoints) {
  LOAD_TINY(f16, "hf_f16");
  LOAD_TINY(bf16, "hf_bf16");
  for (const auto& [name, t] : f16->tensors) EXPECT_EQ(t.dtype, DType::kF16) << name;
  for (const auto& [name, t] : bf16->tensors) EXPECT_EQ(t.dtype, DType::kBF16) << name;
  EXPECT_EQ(f16->tensors.at("token_embd.weight").nbytes, 300 * 64 * 2);
  EXPECT_EQ(bf16->tensors.size(), 21u);
}

TEST(HfLoaderGeneratedTest, ShardedEqualsSingleFile) {
  LOAD_TINY(single, "hf");
  LOAD_TINY(sharded, "hf_sharded");
  ASSERT_EQ(sharded->tensors.size(), single->tensors.size());
  for (const auto& [name, t] : single->tensors) {
    ASSERT_TRUE(sharded->tensors.contains(name)) << name;
    const HostTensor& s = sharded->tensors.at(name);
    EXPECT_EQ(s.shape, t.shape) << name;
    ASSERT_EQ(s.nbytes, t.nbytes) << name;
    EXPECT_EQ(std::memcmp(s.data, t.data, t.nbytes), 0) << name;
  }
}

TEST(HfLoaderGeneratedTest, TiedAndRopeScaling) {
  LOAD_TINY(tied, "hf_tied");
  EXPECT_TRUE(tied->config.tied_embeddings);
  EXPECT_FALSE(tied->tensors.contains("output.weight"));
  LOAD_TINY(llama3, "hf_llama3");
  EXPECT_EQ(llama3->config.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(llama3->config.rope_scaling.factor, 4.0);
  EXPECT_EQ(llama3->config.rope_scaling.original_max_position, 32);
  LOAD_TINY(linear, "hf_linear");
  EXPECT_EQ(linear->config.rope_scaling.type, RopeScaling::Type::kLinear);
  EXPECT_EQ(linear->config.rope_scaling.factor, 2.0);
}

}  // namespace
}  // namespace moa
