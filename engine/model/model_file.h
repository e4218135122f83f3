// A loaded model file: configuration, tensors under canonical names, tokenizer data, chat
// template. Produced by the GGUF and the Hugging Face loaders; consumed by the engine.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/host_tensor.h"
#include "engine/model/model_config.h"

namespace moa {

// Tokenizer as embedded in a GGUF file (tokenizer.ggml.*).
struct GgufTokenizerData {
  std::string model;  // "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE by scores)
  std::string pre;    // pre-tokenizer name, e.g. "smollm", "llama-bpe", "default"
  std::vector<std::string> tokens;
  std::vector<float> scores;         // may be empty
  std::vector<int32_t> token_types;  // may be empty; 1 normal, 2 unknown, 3 control, 4 user, 6 byte
  std::vector<std::string> merges;   // "a b" pairs, gpt2 only
  int32_t bos_id = -1;
  int32_t eos_id = -1;
  int32_t unk_id = -1;
  int32_t pad_id = -1;
  bool add_bos = false;
  bool add_eos = false;
  bool add_space_prefix = false;
};

// Where the tokenizer comes from. Exactly one of the three is set.
struct TokenizerSource {
  bool has_gguf = false;
  GgufTokenizerData gguf;
  std::string tokenizer_json_path;  // Hugging Face tokenizer.json
  std::string sentencepiece_path;   // tokenizer.model
  // From tokenizer_config.json / generation_config.json for the HF paths (GGUF: from gguf).
  int32_t bos_id = -1;
  int32_t eos_id = -1;
  bool add_bos = false;
};

struct ModelFile {
  ModelConfig config;
  // Canonical (GGUF) names: token_embd.weight, output_norm.weight, output.weight (absent when
  // tied),
  // blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,ffn_gate,ffn_up,ffn_down}.weight
  std::map<std::string, HostTensor> tensors;
  TokenizerSource tokenizer;
  std::string chat_template;  // Jinja source as shipped with the model; may be empty
};

// Loads a GGUF file, or a Hugging Face checkpoint directory (config.json + safetensors).
absl::StatusOr<ModelFile> LoadModel(const std::string& path);

// Checks that every tensor the Llama forward pass needs is present with the right shape.
absl::Status ValidateTensors(const ModelFile& m);

}  // namespace moa
