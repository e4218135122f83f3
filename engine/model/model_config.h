// Architecture hyper-parameters of a Llama-family model, whatever file it came from.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace moa {

// How RoPE pairs the dimensions of a head.
//  kHalfSplit:   dimension i rotates with i + head_dim/2 (Hugging Face "rotate_half").
//  kInterleaved: dimension 2i rotates with 2i+1. llama.cpp's converter permutes the rows of
//                Q and K so that this layout on GGUF weights equals kHalfSplit on the originals.
enum class RopeLayout { kHalfSplit, kInterleaved };

struct RopeScaling {
  enum class Type { kNone, kLinear, kLlama3 };
  Type type = Type::kNone;
  double factor = 1.0;
  // llama3 only.
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position = 8192;
};

struct ModelConfig {
  std::string architecture = "llama";  // "llama" or "mistral"
  std::string name;                    // human-readable, e.g. from general.name
  int n_layers = 0;
  int d_model = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int d_ff = 0;
  int vocab_size = 0;
  int64_t max_context = 0;
  float rms_eps = 1e-5f;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  RopeLayout rope_layout = RopeLayout::kHalfSplit;
  bool tied_embeddings = false;  // no separate output.weight: logits use token_embd.weight
};

// Checks internal consistency (positive sizes, heads divide evenly, sane limits).
absl::Status ValidateConfig(const ModelConfig& c);

}  // namespace moa
