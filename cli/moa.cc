// moa: the command-line front end of the engine.
//
//   moa generate --model PATH [--plan PLAN] (--prompt TEXT | --prompt-file F) [--chat]
//                [--system TEXT] [--max-tokens N] [--temperature T] [--top-p P] [--top-k K]
//                [--seed S] [--device cpu|cuda] [--threads N]
//   moa info --model PATH [--plan PLAN]
//
// Flags are parsed here rather than with absl flags because bad usage must exit with code 2 and
// a usage message, and each subcommand has its own flags.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/generator.h"
#include "engine/llama_model.h"
#include "engine/moa_plan.h"
#include "engine/model/model_file.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/tokenizer.h"
#include "kernels/backend.h"
#include "kernels/backend_factory.h"

namespace {

constexpr char kUsage[] =
    R"(usage:
  moa generate --model PATH [--plan PLAN] (--prompt TEXT | --prompt-file FILE) [--chat]
               [--system TEXT] [--max-tokens N] [--temperature T] [--top-p P] [--top-k K]
               [--seed S] [--device cpu|cuda] [--threads N]
  moa info --model PATH [--plan PLAN]

  --model PATH        a GGUF file or a Hugging Face checkpoint directory
  --plan PLAN         a MoA plan (JSON); without one every head attends densely
  --prompt TEXT       the prompt text; --prompt-file FILE reads it from a file ('-': stdin)
  --chat              wrap the prompt as a user message in the model's chat template
  --system TEXT       system message for --chat (default: the template's own)
  --max-tokens N      tokens to generate at most (default 256)
  --temperature T     0 = greedy (default 0.2)
  --top-p P           nucleus sampling, in (0, 1] (default 0.9)
  --top-k K           0 = off (default 0)
  --seed S            random seed (default 0)
  --device D          backend: cpu or cuda, CUDA device 0 (default cpu)
  --threads N         CPU threads (default: all hardware threads)
)";

constexpr int kUsageError = 2;

int UsageError(const std::string& what) {
  std::cerr << "moa: " << what << "\n\n" << kUsage;
  return kUsageError;
}

// --name value / --name=value pairs, and boolean switches.
struct Args {
  std::map<std::string, std::string> values;
  std::map<std::string, bool> switches;
};

std::optional<std::string> ParseArgs(int argc, char** argv, int first,
                                     const std::vector<std::string>& value_flags,
                                     const std::vector<std::string>& switch_flags, Args* out) {
  auto is_in = [](const std::vector<std::string>& v, const std::string& s) {
    return std::find(v.begin(), v.end(), s) != v.end();
  };
  for (int i = first; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0) return absl::StrCat("unexpected argument '", a, "'");
    std::string name = a.substr(2);
    std::optional<std::string> value;
    if (const size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    if (is_in(switch_flags, name)) {
      if (value) return absl::StrCat("--", name, " takes no value");
      out->switches[name] = true;
    } else if (is_in(value_flags, name)) {
      if (!value) {
        if (i + 1 >= argc) return absl::StrCat("--", name, " needs a value");
        value = argv[++i];
      }
      if (out->values.count(name)) return absl::StrCat("--", name, " given twice");
      out->values[name] = *value;
    } else {
      return absl::StrCat("unknown flag --", name);
    }
  }
  return std::nullopt;
}

template <typename T>
std::optional<std::string> GetNumber(const Args& args, const std::string& name, T* out) {
  auto it = args.values.find(name);
  if (it == args.values.end()) return std::nullopt;
  bool ok;
  if constexpr (std::is_floating_point_v<T>) {
    ok = absl::SimpleAtof(it->second, out);
  } else {
    ok = absl::SimpleAtoi(it->second, out);
  }
  if (!ok) return absl::StrCat("--", name, " needs a number, got '", it->second, "'");
  return std::nullopt;
}

// Model, plan, tokenizer: what every subcommand loads.
struct Loaded {
  moa::ModelFile file;
  std::optional<moa::MoaPlan> plan;
  std::unique_ptr<moa::Tokenizer> tokenizer;
};

absl::StatusOr<Loaded> Load(const Args& args) {
  Loaded l;
  absl::StatusOr<moa::ModelFile> file = moa::LoadModel(args.values.at("model"));
  if (!file.ok()) return file.status();
  l.file = *std::move(file);
  if (auto it = args.values.find("plan"); it != args.values.end()) {
    absl::StatusOr<moa::MoaPlan> plan = moa::MoaPlan::FromFile(it->second);
    if (!plan.ok()) return plan.status();
    absl::StatusOr<moa::MoaPlan> fitted = plan->ForModel(l.file.config);
    if (!fitted.ok()) return fitted.status();
    l.plan = *std::move(fitted);
  }
  absl::StatusOr<std::unique_ptr<moa::Tokenizer>> tok = moa::Tokenizer::Create(l.file.tokenizer);
  if (!tok.ok()) return tok.status();
  l.tokenizer = *std::move(tok);
  return l;
}

int Fail(const absl::Status& s) {
  std::cerr << "moa: " << s << "\n";
  return 1;
}

int RunInfo(const Args& args) {
  absl::StatusOr<Loaded> l = Load(args);
  if (!l.ok()) return Fail(l.status());
  const moa::ModelConfig& c = l->file.config;
  std::cout << absl::StrFormat(
      "model: %s (%s)\nlayers %d, d_model %d, heads %d, kv heads %d, head_dim %d, d_ff %d\n"
      "vocab %d, context %d, rope theta %g (%s layout), tied embeddings: %s\n",
      c.name, c.architecture, c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff,
      c.vocab_size, c.max_context, c.rope_theta,
      c.rope_layout == moa::RopeLayout::kInterleaved ? "interleaved" : "half-split",
      c.tied_embeddings ? "yes" : "no");
  if (l->plan) {
    std::cout << "plan: sink " << l->plan->params().sink << ", block " << l->plan->params().block
              << "; KV density";
    for (int64_t n : {1024, 2048, 4096, 8192}) {
      std::cout << absl::StrFormat(" %dk: %.3f", n / 1024, l->plan->Density(n));
    }
    std::cout << "\n";
  } else {
    std::cout << "plan: none (dense attention)\n";
  }
  return 0;
}

int RunGenerate(const Args& args) {
  const bool has_prompt = args.values.count("prompt") > 0;
  const bool has_file = args.values.count("prompt-file") > 0;
  if (has_prompt == has_file) return UsageError("give exactly one of --prompt or --prompt-file");
  moa::GenerateOptions opts;
  opts.sampling.temperature = 0.2f;
  opts.sampling.top_p = 0.9f;
  int threads = 0;
  int64_t seed = 0;
  for (const auto& err : {GetNumber(args, "max-tokens", &opts.max_tokens),
                          GetNumber(args, "temperature", &opts.sampling.temperature),
                          GetNumber(args, "top-p", &opts.sampling.top_p),
                          GetNumber(args, "top-k", &opts.sampling.top_k),
                          GetNumber(args, "seed", &seed), GetNumber(args, "threads", &threads)}) {
    if (err) return UsageError(*err);
  }
  opts.sampling.seed = static_cast<uint64_t>(seed);
  if (opts.max_tokens < 1) return UsageError("--max-tokens must be at least 1");
  if (threads < 0) return UsageError("--threads must be >= 0");
  const std::string device = args.values.count("device") ? args.values.at("device") : "cpu";
  if (!moa::IsKnownDevice(device)) {
    return UsageError(absl::StrCat("--device must be cpu or cuda, got '", device, "'"));
  }
  if (absl::Status s = moa::ValidateSamplingParams(opts.sampling); !s.ok()) {
    return UsageError(std::string(s.message()));
  }

  std::string prompt;
  if (has_prompt) {
    prompt = args.values.at("prompt");
  } else {
    const std::string& path = args.values.at("prompt-file");
    std::stringstream ss;
    if (path == "-") {
      ss << std::cin.rdbuf();
    } else {
      std::ifstream in(path, std::ios::binary);
      if (!in) return Fail(absl::NotFoundError(absl::StrCat("cannot open prompt file ", path)));
      ss << in.rdbuf();
    }
    prompt = ss.str();
  }
  if (prompt.empty()) return UsageError("the prompt is empty");
  const bool chat = args.switches.count("chat") > 0;
  if (!chat && args.values.count("system")) return UsageError("--system needs --chat");

  // The backend first: a missing GPU is reported before a large model is read.
  absl::StatusOr<std::unique_ptr<moa::Backend>> backend = moa::NewBackend(device, threads);
  if (!backend.ok()) return Fail(backend.status());
  absl::StatusOr<Loaded> l = Load(args);
  if (!l.ok()) return Fail(l.status());
  if (chat) {
    absl::StatusOr<moa::ChatTemplate> tmpl = moa::ChatTemplate::FromModel(l->file);
    if (!tmpl.ok()) return Fail(tmpl.status());
    std::vector<moa::ChatMessage> messages;
    if (auto it = args.values.find("system"); it != args.values.end()) {
      messages.push_back({"system", it->second});
    }
    messages.push_back({"user", prompt});
    absl::StatusOr<std::string> rendered = tmpl->Render(messages, /*add_generation_prompt=*/true);
    if (!rendered.ok()) return Fail(rendered.status());
    prompt = *std::move(rendered);
  }
  // A rendered chat prompt carries its special tokens (BOS included) as text; a plain prompt is
  // plain text and gets BOS if the model asks for it.
  absl::StatusOr<std::vector<int32_t>> ids = l->tokenizer->Encode(
      prompt, /*add_bos=*/!chat && l->file.tokenizer.add_bos, /*parse_special=*/chat);
  if (!ids.ok()) return Fail(ids.status());

  absl::StatusOr<std::unique_ptr<moa::LlamaModel>> model =
      moa::LlamaModel::Create(l->file, backend->get(), l->plan ? &*l->plan : nullptr);
  if (!model.ok()) return Fail(model.status());

  absl::StatusOr<moa::GenerateResult> r =
      moa::Generate(**model, *l->tokenizer, *ids, opts, [](std::string_view text) {
        std::fwrite(text.data(), 1, text.size(), stdout);
        std::fflush(stdout);
      });
  std::cout << std::endl;
  if (!r.ok()) return Fail(r.status());
  const int64_t n_gen = static_cast<int64_t>(r->tokens.size());
  std::cerr << absl::StrFormat(
      "[prompt: %d tokens, %.1f tokens/s | generation: %d tokens, %.1f tokens/s | finish: %s]\n",
      r->prompt_tokens, r->prompt_tokens / std::max(r->prefill_seconds, 1e-9), n_gen,
      n_gen > 1 ? (n_gen - 1) / std::max(r->decode_seconds, 1e-9) : 0.0, r->finish_reason);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return UsageError("missing command");
  const std::string cmd = argv[1];
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    std::cout << kUsage;
    return 0;
  }
  Args args;
  std::optional<std::string> err;
  if (cmd == "generate") {
    err = ParseArgs(argc, argv, 2,
                    {"model", "plan", "prompt", "prompt-file", "system", "max-tokens",
                     "temperature", "top-p", "top-k", "seed", "device", "threads"},
                    {"chat"}, &args);
  } else if (cmd == "info") {
    err = ParseArgs(argc, argv, 2, {"model", "plan"}, {}, &args);
  } else {
    return UsageError(absl::StrCat("unknown command '", cmd, "'"));
  }
  if (err) return UsageError(*err);
  if (!args.values.count("model")) return UsageError("--model is required");
  return cmd == "generate" ? RunGenerate(args) : RunInfo(args);
}
