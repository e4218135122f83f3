#include "engine/model/hf_loader.h"

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "engine/model/safetensors.h"
#include "nlohmann/json.hpp"

namespace moa {
namespace {

using nlohmann::json;

// Small JSON files (config.json, tokenizer_config.json, index) vs tokenizer.json, which holds a
// whole vocabulary (Llama 3's is ~9 MiB).
constexpr int64_t kMaxConfigBytes = int64_t{16} << 20;
constexpr int64_t kMaxTokenizerJsonBytes = int64_t{256} << 20;

absl::StatusOr<std::string> ReadFileBounded(const std::string& path, int64_t max_bytes) {
  std::error_code ec;
  const auto size = std::filesystem::file_size(path, ec);
  if (ec) return absl::NotFoundError(absl::StrCat("cannot read ", path, ": ", ec.message()));
  if (size > static_cast<uintmax_t>(max_bytes)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, " is ", size, " bytes, more than the limit of ", max_bytes));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::string text(static_cast<size_t>(size), '\0');
  in.read(text.data(), static_cast<std::streamsize>(size));
  if (in.gcount() != static_cast<std::streamsize>(size)) {
    return absl::DataLossError(absl::StrCat("short read from ", path));
  }
  return text;
}

absl::StatusOr<json> ReadJsonFile(const std::string& path, int64_t max_bytes) {
  absl::StatusOr<std::string> text = ReadFileBounded(path, max_bytes);
  if (!text.ok()) return text.status();
  json j = json::parse(*text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": invalid JSON"));
  if (!j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": top level is not a JSON object"));
  }
  return j;
}

bool IsRegularFile(const std::string& path) {
  std::error_code ec;
  return std::filesystem::is_regular_file(path, ec);
}

// A field that is absent or null: HF configs write null for "use the default".
bool IsUnset(const json& obj, const char* key) {
  const auto it = obj.find(key);
  return it == obj.end() || it->is_null();
}

// A value for an error message, cut short: it comes from the file and can be arbitrarily big.
std::string Shown(const json& v) {
  constexpr size_t kMax = 80;
  std::string s = v.dump();
  if (s.size() > kMax) s = absl::StrCat(s.substr(0, kMax), "...");
  return s;
}

absl::Status ConfigError(absl::string_view key, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("config.json: \"", key, "\" ", what));
}

// A positive integer that fits an int.
absl::StatusOr<int> GetPositiveInt(const json& obj, const char* key) {
  if (IsUnset(obj, key)) return ConfigError(key, "is missing");
  const json& v = obj.at(key);
  if (!v.is_number_integer())
    return ConfigError(key, absl::StrCat("is not an integer: ", Shown(v)));
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u >= 1 && u <= static_cast<uint64_t>(std::numeric_limits<int>::max())) {
      return static_cast<int>(u);
    }
  }
  return ConfigError(key, absl::StrCat("must be a positive integer, got ", Shown(v)));
}

absl::StatusOr<double> GetPositiveNumber(const json& obj, const char* key,
                                         absl::string_view where = "config.json") {
  if (IsUnset(obj, key)) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": \"", key, "\" is missing"));
  }
  const json& v = obj.at(key);
  if (v.is_number()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && d > 0) return d;
  }
  return absl::InvalidArgumentError(
      absl::StrCat(where, ": \"", key, "\" must be a positive number, got ", Shown(v)));
}

absl::StatusOr<bool> GetBool(const json& obj, const char* key, bool default_value) {
  if (IsUnset(obj, key)) return default_value;
  const json& v = obj.at(key);
  if (!v.is_boolean()) return ConfigError(key, absl::StrCat("is not a boolean: ", Shown(v)));
  return v.get<bool>();
}

absl::StatusOr<RopeScaling> ParseRopeScaling(const json& cfg) {
  RopeScaling rs;
  if (IsUnset(cfg, "rope_scaling")) return rs;
  const json& j = cfg.at("rope_scaling");
  if (!j.is_object()) return ConfigError("rope_scaling", "is not an object");
  // Newer configs say "rope_type", older ones "type".
  const char* type_key = IsUnset(j, "rope_type") ? "type" : "rope_type";
  if (IsUnset(j, type_key) || !j.at(type_key).is_string()) {
    return ConfigError("rope_scaling", "has no \"rope_type\" / \"type\" string");
  }
  const std::string& type = j.at(type_key).get_ref<const std::string&>();
  if (type == "default") return rs;
  constexpr absl::string_view kWhere = "config.json rope_scaling";
  if (type == "linear") {
    rs.type = RopeScaling::Type::kLinear;
  } else if (type == "llama3") {
    rs.type = RopeScaling::Type::kLlama3;
    for (auto [key, field] : {std::pair{"low_freq_factor", &rs.low_freq_factor},
                              std::pair{"high_freq_factor", &rs.high_freq_factor}}) {
      if (IsUnset(j, key)) continue;
      absl::StatusOr<double> v = GetPositiveNumber(j, key, kWhere);
      if (!v.ok()) return v.status();
      *field = *v;
    }
    if (!IsUnset(j, "original_max_position_embeddings")) {
      absl::StatusOr<int> v = GetPositiveInt(j, "original_max_position_embeddings");
      if (!v.ok()) return v.status();
      rs.original_max_position = *v;
    }
    if (rs.high_freq_factor <= rs.low_freq_factor) {
      return absl::InvalidArgumentError(
          absl::StrCat(kWhere, ": high_freq_factor ", rs.high_freq_factor,
                       " must be greater than low_freq_factor ", rs.low_freq_factor));
    }
  } else {
    return ConfigError("rope_scaling", absl::StrCat("has unsupported type \"", type,
                                                    "\" (supported: linear, llama3, default)"));
  }
  absl::StatusOr<double> factor = GetPositiveNumber(j, "factor", kWhere);
  if (!factor.ok()) return factor.status();
  rs.factor = *factor;
  return rs;
}

// HF tensor name -> canonical (GGUF) name; nullopt for tensors the engine does not use.
std::optional<std::string> CanonicalName(absl::string_view hf, int* layer) {
  *layer = -1;
  if (hf == "model.embed_tokens.weight") return "token_embd.weight";
  if (hf == "model.norm.weight") return "output_norm.weight";
  if (hf == "lm_head.weight") return "output.weight";
  if (!absl::ConsumePrefix(&hf, "model.layers.")) return std::nullopt;
  const size_t dot = hf.find('.');
  if (dot == absl::string_view::npos || !absl::SimpleAtoi(hf.substr(0, dot), layer) || *layer < 0) {
    return std::nullopt;
  }
  static const auto* const kSuffixes = new std::map<absl::string_view, absl::string_view>{
      {"self_attn.q_proj.weight", "attn_q.weight"},
      {"self_attn.k_proj.weight", "attn_k.weight"},
      {"self_attn.v_proj.weight", "attn_v.weight"},
      {"self_attn.o_proj.weight", "attn_output.weight"},
      {"mlp.gate_proj.weight", "ffn_gate.weight"},
      {"mlp.up_proj.weight", "ffn_up.weight"},
      {"mlp.down_proj.weight", "ffn_down.weight"},
      {"input_layernorm.weight", "attn_norm.weight"},
      {"post_attention_layernorm.weight", "ffn_norm.weight"},
  };
  const auto it = kSuffixes->find(hf.substr(dot + 1));
  if (it == kSuffixes->end()) return std::nullopt;
  return absl::StrCat("blk.", *layer, ".", it->second);
}

// All tensors of the checkpoint under their HF names.
absl::StatusOr<SafetensorsTensors> LoadHfTensors(const std::string& dir) {
  const std::string index_path = dir + "/model.safetensors.index.json";
  const std::string single_path = dir + "/model.safetensors";
  if (!IsRegularFile(index_path)) {
    if (!IsRegularFile(single_path)) {
      return absl::NotFoundError(
          absl::StrCat(dir, " has neither model.safetensors nor model.safetensors.index.json"));
    }
    return ReadSafetensorsFile(single_path);
  }
  absl::StatusOr<json> index = ReadJsonFile(index_path, kMaxConfigBytes);
  if (!index.ok()) return index.status();
  const auto map_it = index->find("weight_map");
  if (map_it == index->end() || !map_it->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(index_path, ": no \"weight_map\" object"));
  }
  std::map<std::string, std::string> weight_map;  // tensor -> shard file name
  for (const auto& [tensor, shard] : map_it->items()) {
    if (!shard.is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": shard of tensor \"", tensor, "\" is not a string"));
    }
    const std::string& file = shard.get_ref<const std::string&>();
    // Shards are plain file names next to the index; anything else could escape the directory.
    if (file.empty() || file == "." || file == ".." || file.find('/') != std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": bad shard file name \"", file, "\" for \"", tensor, "\""));
    }
    weight_map.emplace(tensor, file);
  }
  std::map<std::string, SafetensorsTensors> shards;
  for (const auto& [tensor, file] : weight_map) {
    if (shards.contains(file)) continue;
    const std::string path = absl::StrCat(dir, "/", file);
    if (!IsRegularFile(path)) {
      return absl::NotFoundError(
          absl::StrCat("shard ", file, " listed in ", index_path, " does not exist"));
    }
    absl::StatusOr<SafetensorsTensors> t = ReadSafetensorsFile(path);
    if (!t.ok()) return t.status();
    shards.emplace(file, *std::move(t));
  }
  SafetensorsTensors all;
  for (const auto& [tensor, file] : weight_map) {
    const SafetensorsTensors& shard = shards.at(file);
    const auto it = shard.find(tensor);
    if (it == shard.end()) {
      return absl::NotFoundError(absl::StrCat("tensor \"", tensor, "\" is not in shard ", file,
                                              " where ", index_path, " puts it"));
    }
    all.emplace(tensor, it->second);
  }
  return all;
}

// bos_token / eos_token in tokenizer_config.json: "text" or {"content": "text", ...}.
std::optional<std::string> TokenText(const json& cfg, const char* key) {
  const auto it = cfg.find(key);
  if (it == cfg.end()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) {
    const auto c = it->find("content");
    if (c != it->end() && c->is_string()) return c->get<std::string>();
  }
  return std::nullopt;
}

// Looks a token's text up in tokenizer.json: added_tokens first, then the model's vocab (an
// object for BPE / WordPiece, a list of [piece, score] for Unigram).
int32_t FindTokenId(const json& tok, const std::string& text) {
  if (const auto added = tok.find("added_tokens"); added != tok.end() && added->is_array()) {
    for (const json& t : *added) {
      if (!t.is_object()) continue;
      const auto c = t.find("content");
      const auto id = t.find("id");
      if (c != t.end() && c->is_string() && *c == text && id != t.end() &&
          id->is_number_unsigned() && id->get<uint64_t>() <= INT32_MAX) {
        return static_cast<int32_t>(id->get<uint64_t>());
      }
    }
  }
  const auto model = tok.find("model");
  if (model == tok.end() || !model->is_object()) return -1;
  const auto vocab = model->find("vocab");
  if (vocab == model->end()) return -1;
  if (vocab->is_object()) {
    const auto it = vocab->find(text);
    if (it != vocab->end() && it->is_number_unsigned() && it->get<uint64_t>() <= INT32_MAX) {
      return static_cast<int32_t>(it->get<uint64_t>());
    }
  } else if (vocab->is_array()) {
    for (size_t i = 0; i < vocab->size() && i <= INT32_MAX; ++i) {
      const json& e = (*vocab)[i];
      if (e.is_array() && !e.empty() && e[0].is_string() && e[0] == text) {
        return static_cast<int32_t>(i);
      }
    }
  }
  return -1;
}

// Whether tokenizer.json's post-processor starts a single sequence with a special token (the
// way fast tokenizers express "add BOS").
bool PostProcessorAddsBos(const json& tok) {
  const auto pp = tok.find("post_processor");
  if (pp == tok.end() || !pp->is_object()) return false;
  std::vector<const json*> procs = {&*pp};
  if (const auto seq = pp->find("processors"); seq != pp->end() && seq->is_array()) {
    for (const json& p : *seq) procs.push_back(&p);
  }
  for (const json* p : procs) {
    if (!p->is_object()) continue;
    const auto single = p->find("single");
    if (single != p->end() && single->is_array() && !single->empty() && (*single)[0].is_object() &&
        (*single)[0].contains("SpecialToken")) {
      return true;
    }
  }
  return false;
}

// First id of generation_config.json's `key` (an int or a list of ints), or -1.
int32_t GenerationConfigId(const json& gen, const char* key) {
  const auto it = gen.find(key);
  if (it == gen.end()) return -1;
  const json* v = &*it;
  if (v->is_array()) {
    if (v->empty()) return -1;
    v = &(*v)[0];
  }
  if (v->is_number_unsigned() && v->get<uint64_t>() <= INT32_MAX) {
    return static_cast<int32_t>(v->get<uint64_t>());
  }
  return -1;
}

absl::Status LoadTokenizerInfo(const std::string& dir, ModelFile* m) {
  TokenizerSource& src = m->tokenizer;
  const std::string tok_json_path = dir + "/tokenizer.json";
  const std::string sp_path = dir + "/tokenizer.model";
  json tok;  // tokenizer.json, when there is one
  if (IsRegularFile(tok_json_path)) {
    src.tokenizer_json_path = tok_json_path;
    absl::StatusOr<json> t = ReadJsonFile(tok_json_path, kMaxTokenizerJsonBytes);
    if (!t.ok()) return t.status();
    tok = *std::move(t);
  } else if (IsRegularFile(sp_path)) {
    src.sentencepiece_path = sp_path;
  } else {
    return absl::NotFoundError(
        absl::StrCat(dir, " has neither tokenizer.json nor tokenizer.model"));
  }

  // LlamaTokenizer (SentencePiece) adds BOS unless told otherwise.
  src.add_bos = tok.is_object() ? PostProcessorAddsBos(tok) : true;
  const std::string cfg_path = dir + "/tokenizer_config.json";
  if (IsRegularFile(cfg_path)) {
    absl::StatusOr<json> cfg = ReadJsonFile(cfg_path, kMaxConfigBytes);
    if (!cfg.ok()) return cfg.status();
    if (const auto it = cfg->find("add_bos_token"); it != cfg->end() && it->is_boolean()) {
      src.add_bos = it->get<bool>();
    }
    if (const auto it = cfg->find("chat_template"); it != cfg->end()) {
      if (it->is_string()) {
        m->chat_template = it->get<std::string>();
      } else if (it->is_array()) {
        // Several named templates: the engine's chat path uses "default".
        for (const json& t : *it) {
          if (t.is_object() && t.value("name", json()) == "default" && t.contains("template") &&
              t["template"].is_string()) {
            m->chat_template = t["template"].get<std::string>();
          }
        }
      }
    }
    if (tok.is_object()) {
      if (std::optional<std::string> bos = TokenText(*cfg, "bos_token")) {
        src.bos_id = FindTokenId(tok, *bos);
      }
      if (std::optional<std::string> eos = TokenText(*cfg, "eos_token")) {
        src.eos_id = FindTokenId(tok, *eos);
      }
    }
  }
  // Recent transformers versions save the template next to tokenizer_config.json instead.
  if (m->chat_template.empty() && IsRegularFile(dir + "/chat_template.jinja")) {
    absl::StatusOr<std::string> t = ReadFileBounded(dir + "/chat_template.jinja", kMaxConfigBytes);
    if (!t.ok()) return t.status();
    m->chat_template = *std::move(t);
  }
  const std::string gen_path = dir + "/generation_config.json";
  if ((src.bos_id < 0 || src.eos_id < 0) && IsRegularFile(gen_path)) {
    absl::StatusOr<json> gen = ReadJsonFile(gen_path, kMaxConfigBytes);
    if (!gen.ok()) return gen.status();
    if (src.bos_id < 0) src.bos_id = GenerationConfigId(*gen, "bos_token_id");
    if (src.eos_id < 0) src.eos_id = GenerationConfigId(*gen, "eos_token_id");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ParseHfConfig(std::string_view text) {
  const json cfg = json::parse(text.begin(), text.end(), /*cb=*/nullptr,
                               /*allow_exceptions=*/false);
  if (cfg.is_discarded()) return absl::InvalidArgumentError("config.json: invalid JSON");
  if (!cfg.is_object()) {
    return absl::InvalidArgumentError("config.json: top level is not a JSON object");
  }
  ModelConfig c;
  const auto arch_it = cfg.find("architectures");
  if (arch_it == cfg.end() || !arch_it->is_array() || arch_it->empty() ||
      !(*arch_it)[0].is_string()) {
    return ConfigError("architectures", "is missing or not a list of strings");
  }
  const std::string& arch = (*arch_it)[0].get_ref<const std::string&>();
  if (arch == "LlamaForCausalLM") {
    c.architecture = "llama";
  } else if (arch == "MistralForCausalLM") {
    c.architecture = "mistral";
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json: unsupported architecture \"", arch,
                     "\" (supported: LlamaForCausalLM, MistralForCausalLM)"));
  }
  if (const auto it = cfg.find("_name_or_path"); it != cfg.end() && it->is_string()) {
    c.name = it->get<std::string>();
  }

  for (auto [key, field] :
       {std::pair{"hidden_size", &c.d_model}, std::pair{"intermediate_size", &c.d_ff},
        std::pair{"num_hidden_layers", &c.n_layers}, std::pair{"num_attention_heads", &c.n_heads},
        std::pair{"vocab_size", &c.vocab_size}}) {
    absl::StatusOr<int> v = GetPositiveInt(cfg, key);
    if (!v.ok()) return v.status();
    *field = *v;
  }
  absl::StatusOr<int> max_pos = GetPositiveInt(cfg, "max_position_embeddings");
  if (!max_pos.ok()) return max_pos.status();
  c.max_context = *max_pos;
  c.n_kv_heads = c.n_heads;
  if (!IsUnset(cfg, "num_key_value_heads")) {
    absl::StatusOr<int> v = GetPositiveInt(cfg, "num_key_value_heads");
    if (!v.ok()) return v.status();
    c.n_kv_heads = *v;
  }
  if (!IsUnset(cfg, "head_dim")) {
    absl::StatusOr<int> v = GetPositiveInt(cfg, "head_dim");
    if (!v.ok()) return v.status();
    c.head_dim = *v;
  } else {
    if (c.d_model % c.n_heads != 0) {
      return ConfigError("hidden_size",
                         absl::StrCat(c.d_model, " is not a multiple of ", "num_attention_heads ",
                                      c.n_heads, " and there is no head_dim"));
    }
    c.head_dim = c.d_model / c.n_heads;
  }
  // LlamaConfig's and MistralConfig's default.
  c.rms_eps = 1e-6f;
  if (!IsUnset(cfg, "rms_norm_eps")) {
    absl::StatusOr<double> v = GetPositiveNumber(cfg, "rms_norm_eps");
    if (!v.ok()) return v.status();
    c.rms_eps = static_cast<float>(*v);
  }
  c.rope_theta = 10000.0;
  if (!IsUnset(cfg, "rope_theta")) {
    absl::StatusOr<double> v = GetPositiveNumber(cfg, "rope_theta");
    if (!v.ok()) return v.status();
    c.rope_theta = *v;
  }
  absl::StatusOr<bool> tied = GetBool(cfg, "tie_word_embeddings", false);
  if (!tied.ok()) return tied.status();
  c.tied_embeddings = *tied;
  absl::StatusOr<RopeScaling> rs = ParseRopeScaling(cfg);
  if (!rs.ok()) return rs.status();
  c.rope_scaling = *rs;
  c.rope_layout = RopeLayout::kHalfSplit;

  // Options of the HF implementation that the engine's forward pass does not have: refuse them
  // rather than silently compute something else.
  if (!IsUnset(cfg, "sliding_window")) {
    const json& sw = cfg.at("sliding_window");
    if (!sw.is_number_integer()) {
      return ConfigError("sliding_window", absl::StrCat("is not an integer: ", Shown(sw)));
    }
    if (sw.is_number_unsigned() && sw.get<uint64_t>() < static_cast<uint64_t>(c.max_context)) {
      return ConfigError("sliding_window",
                         absl::StrCat("is ", Shown(sw), ", smaller than max_position_embeddings ",
                                      c.max_context, ": sliding-window Mistral is not supported"));
    }
  }
  for (const char* key : {"attention_bias", "mlp_bias"}) {
    absl::StatusOr<bool> bias = GetBool(cfg, key, false);
    if (!bias.ok()) return bias.status();
    if (*bias) return ConfigError(key, "is true: bias terms are not supported");
  }
  if (!IsUnset(cfg, "hidden_act")) {
    const json& act = cfg.at("hidden_act");
    if (!act.is_string() || act != "silu") {
      return ConfigError("hidden_act", absl::StrCat("is ", Shown(act), "; only silu is supported"));
    }
  }
  if (absl::Status s = ValidateConfig(c); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("config.json: ", s.message()));
  }
  return c;
}

absl::StatusOr<ModelFile> LoadHfModel(const std::string& dir) {
  const std::string config_path = dir + "/config.json";
  absl::StatusOr<std::string> config_text = ReadFileBounded(config_path, kMaxConfigBytes);
  if (!config_text.ok()) return config_text.status();
  absl::StatusOr<ModelConfig> config = ParseHfConfig(*config_text);
  if (!config.ok()) {
    return absl::Status(config.status().code(), absl::StrCat(dir, ": ", config.status().message()));
  }
  ModelFile m;
  m.config = *std::move(config);
  if (m.config.name.empty()) {
    std::filesystem::path p = std::filesystem::path(dir).lexically_normal();
    if (!p.has_filename()) p = p.parent_path();  // "dir/"
    m.config.name = p.filename().string();
  }

  absl::StatusOr<SafetensorsTensors> hf = LoadHfTensors(dir);
  if (!hf.ok()) return hf.status();
  for (auto& [hf_name, tensor] : *hf) {
    int layer = -1;
    std::optional<std::string> name = CanonicalName(hf_name, &layer);
    if (!name.has_value()) continue;  // e.g. rotary_emb.inv_freq: recomputed by the engine
    if (layer >= m.config.n_layers) {
      return absl::InvalidArgumentError(
          absl::StrCat(dir, ": tensor \"", hf_name, "\" is for layer ", layer,
                       " but config.json has num_hidden_layers ", m.config.n_layers));
    }
    if (*name == "output.weight" && m.config.tied_embeddings) continue;
    tensor.name = *name;
    m.tensors.emplace(*name, std::move(tensor));
  }
  // Checkpoints saved with tied weights usually omit lm_head.weight whatever the config says.
  if (!m.tensors.contains("output.weight")) m.config.tied_embeddings = true;

  if (absl::Status s = LoadTokenizerInfo(dir, &m); !s.ok()) return s;
  if (absl::Status s = ValidateTensors(m); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(dir, ": ", s.message()));
  }
  return m;
}

}  // namespace moa
