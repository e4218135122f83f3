#include "engine/llama_model.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/moa_plan.h"
#include "engine/rope.h"
#include "kernels/status_macros.h"

namespace moa {
namespace {

bool SameRule(const SpanRule& a, const SpanRule& b) {
  return a.dense == b.dense && (a.dense || (a.alpha == b.alpha && a.beta == b.beta));
}

}  // namespace

struct LlamaModel::Impl {
  struct Layer {
    std::unique_ptr<Tensor> attn_norm, q, k, v, o, ffn_norm, gate, up, down;
  };

  Backend* backend = nullptr;
  SpanParams span;
  std::vector<std::vector<SpanRule>> rules;  // [layer][kv head]; empty: dense
  std::vector<float> inv_freq;
  std::unique_ptr<Tensor> token_embd, output_norm, output;  // output null when tied
  std::vector<Layer> layers;

  const Tensor& logits_weight() const { return output ? *output : *token_embd; }
};

LlamaModel::~LlamaModel() = default;

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Build(const ModelConfig& c,
                                                              Backend* backend, const MoaPlan* plan,
                                                              const WeightSource& weight) {
  if (backend == nullptr) return absl::InvalidArgumentError("LlamaModel: no backend");
  RETURN_IF_ERROR(ValidateConfig(c));
  std::unique_ptr<LlamaModel> m(new LlamaModel());
  m->config_ = c;
  m->impl_ = std::make_unique<Impl>();
  Impl& im = *m->impl_;
  im.backend = backend;
  if (plan != nullptr) {
    RETURN_IF_ERROR(plan->CheckFits(c));
    im.span = plan->params();
    for (int l = 0; l < c.n_layers; ++l) im.rules.push_back(plan->layer_rules(l));
  }
  absl::StatusOr<std::vector<float>> inv = RopeInvFreq(c.head_dim, c.rope_theta, c.rope_scaling);
  if (!inv.ok()) return inv.status();
  im.inv_freq = *std::move(inv);

  auto load = [&](const std::string& name, int64_t rows, int64_t cols, bool norm,
                  std::unique_ptr<Tensor>* dst) -> absl::Status {
    absl::StatusOr<std::unique_ptr<Tensor>> t = weight(name, rows, cols, norm);
    if (!t.ok()) return t.status();
    *dst = *std::move(t);
    return absl::OkStatus();
  };
  const int64_t d = c.d_model;
  const int64_t q_rows = int64_t{c.n_heads} * c.head_dim;
  const int64_t kv_rows = int64_t{c.n_kv_heads} * c.head_dim;
  RETURN_IF_ERROR(load("token_embd.weight", c.vocab_size, d, false, &im.token_embd));
  RETURN_IF_ERROR(load("output_norm.weight", 1, d, true, &im.output_norm));
  if (!c.tied_embeddings) {
    RETURN_IF_ERROR(load("output.weight", c.vocab_size, d, false, &im.output));
  }
  im.layers.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = absl::StrCat("blk.", l, ".");
    Impl::Layer& L = im.layers[l];
    RETURN_IF_ERROR(load(p + "attn_norm.weight", 1, d, true, &L.attn_norm));
    RETURN_IF_ERROR(load(p + "attn_q.weight", q_rows, d, false, &L.q));
    RETURN_IF_ERROR(load(p + "attn_k.weight", kv_rows, d, false, &L.k));
    RETURN_IF_ERROR(load(p + "attn_v.weight", kv_rows, d, false, &L.v));
    RETURN_IF_ERROR(load(p + "attn_output.weight", d, q_rows, false, &L.o));
    RETURN_IF_ERROR(load(p + "ffn_norm.weight", 1, d, true, &L.ffn_norm));
    RETURN_IF_ERROR(load(p + "ffn_gate.weight", c.d_ff, d, false, &L.gate));
    RETURN_IF_ERROR(load(p + "ffn_up.weight", c.d_ff, d, false, &L.up));
    RETURN_IF_ERROR(load(p + "ffn_down.weight", d, c.d_ff, false, &L.down));
  }
  return m;
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Create(const ModelFile& file,
                                                               Backend* backend,
                                                               const MoaPlan* plan) {
  RETURN_IF_ERROR(ValidateConfig(file.config));
  // Also checks every shape, so the loader below need not.
  RETURN_IF_ERROR(ValidateTensors(file));
  return Build(file.config, backend, plan,
               [&](const std::string& name, int64_t, int64_t,
                   bool) -> absl::StatusOr<std::unique_ptr<Tensor>> {
                 auto it = file.tensors.find(name);
                 if (it == file.tensors.end()) {
                   return absl::NotFoundError(absl::StrCat("missing ", name));
                 }
                 return backend->LoadWeight(it->second);
               });
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::CreateRandom(const ModelConfig& config,
                                                                     Backend* backend,
                                                                     const MoaPlan* plan,
                                                                     uint64_t seed) {
  uint64_t index = 0;  // tensors in Build's order: each its own stream of values
  return Build(config, backend, plan,
               [&](const std::string& name, int64_t rows, int64_t cols,
                   bool norm) -> absl::StatusOr<std::unique_ptr<Tensor>> {
                 const uint64_t tensor_seed = seed * 0x100000001B3ull + ++index;
                 if (norm) return backend->RandomWeight(rows, cols, tensor_seed, 0.125f, 1.0f);
                 // Uniform in [-a, a) has variance a^2 / 3: a = sqrt(3 / fan_in) keeps a unit
                 // input at unit output. The embedding is a lookup, not a product: [-1, 1).
                 const float scale = name == "token_embd.weight"
                                         ? 1.0f
                                         : std::sqrt(3.0f / static_cast<float>(cols));
                 return backend->RandomWeight(rows, cols, tensor_seed, scale, 0.0f);
               });
}

KvLayout LlamaModel::kv_layout(int32_t block_size) const {
  KvLayout l;
  l.n_layers = config_.n_layers;
  l.n_kv_heads = config_.n_kv_heads;
  l.head_dim = config_.head_dim;
  l.block_size = block_size;
  l.span = impl_->span;
  l.rules = impl_->rules;
  return l;
}

int64_t LlamaModel::BytesPerKvBlock(int32_t block_size) const {
  return impl_->backend->KvBlockBytes(block_size, config_.head_dim);
}

absl::StatusOr<std::unique_ptr<KvPool>> LlamaModel::NewKvPool(int32_t num_blocks,
                                                              int32_t block_size) {
  return impl_->backend->NewKvPool(num_blocks, block_size, config_.head_dim);
}

// The manager's layout must be this model's: its tables are per (layer, KV head), and its Trim
// must free only what this model's attention never reads again.
absl::Status LlamaModel::CheckKvLayout(const KvLayout& l) const {
  const ModelConfig& c = config_;
  bool same = l.n_layers == c.n_layers && l.n_kv_heads == c.n_kv_heads && l.head_dim == c.head_dim;
  const SpanRule dense;
  for (int layer = 0; same && layer < c.n_layers; ++layer) {
    for (int h = 0; same && h < c.n_kv_heads; ++h) {
      const SpanRule& mine = impl_->rules.empty() ? dense : impl_->rules[layer][h];
      if (!l.rules.empty() && (static_cast<int>(l.rules.size()) != c.n_layers ||
                               static_cast<int>(l.rules[layer].size()) != c.n_kv_heads)) {
        same = false;
        break;
      }
      const SpanRule& theirs = l.rules.empty() ? dense : l.rules[layer][h];
      same = SameRule(mine, theirs) &&
             (mine.dense || (l.span.sink == impl_->span.sink && l.span.block == impl_->span.block));
    }
  }
  if (!same) {
    return absl::InvalidArgumentError(
        "Forward: the KV cache manager's layout is not this model's (LlamaModel::kv_layout)");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Tensor>> LlamaModel::ForwardToLogits(
    absl::Span<const ForwardInput> batch, const KvCacheManager& kv, KvPool& pool) {
  if (batch.empty()) return absl::InvalidArgumentError("Forward: empty batch");
  const ModelConfig& c = config_;
  Impl& im = *impl_;
  Backend& be = *im.backend;
  RETURN_IF_ERROR(CheckKvLayout(kv.layout()));
  if (pool.block_size() != kv.layout().block_size || pool.head_dim() != c.head_dim ||
      pool.num_blocks() < kv.total_blocks()) {
    return absl::InvalidArgumentError(
        absl::StrCat("Forward: a KV pool of ", pool.num_blocks(), " blocks of ", pool.block_size(),
                     " x ", pool.head_dim(), " cannot back ", kv.total_blocks(), " blocks of ",
                     kv.layout().block_size, " x ", c.head_dim));
  }

  // Check the whole batch before touching any cache.
  std::vector<SequenceSlice> slices;
  std::vector<SeqId> seen;
  std::vector<int32_t> tokens;
  std::vector<int32_t> positions;
  std::vector<int64_t> wanted_rows;  // rows whose logits are returned, in order
  for (size_t s = 0; s < batch.size(); ++s) {
    const ForwardInput& in = batch[s];
    if (!kv.contains(in.seq)) {
      return absl::InvalidArgumentError(
          absl::StrCat("Forward: input ", s, ": no sequence ", in.seq, " in the KV cache"));
    }
    if (std::find(seen.begin(), seen.end(), in.seq) != seen.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("Forward: sequence ", in.seq, " appears twice in the batch"));
    }
    seen.push_back(in.seq);
    if (in.tokens.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("Forward: sequence ", s, " has no tokens"));
    }
    const int64_t n = static_cast<int64_t>(in.tokens.size());
    if (in.past < 0 || in.past + n != kv.length(in.seq) ||
        in.past + n > std::numeric_limits<int32_t>::max()) {
      return absl::OutOfRangeError(absl::StrCat(
          "Forward: sequence ", in.seq, ": ", in.past, " + ", n, " tokens, but the KV cache was ",
          "grown to ", kv.length(in.seq), " (KvCacheManager::Grow before Forward)"));
    }
    for (int32_t t : in.tokens) {
      if (t < 0 || t >= c.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("Forward: sequence ", s, ": token id ", t,
                                                       " outside [0, ", c.vocab_size, ")"));
      }
    }
    const int64_t first = static_cast<int64_t>(tokens.size());
    for (int64_t i = 0; i < n; ++i) {
      positions.push_back(static_cast<int32_t>(in.past + i));
      if (in.all_logits || i == n - 1) wanted_rows.push_back(first + i);
    }
    tokens.insert(tokens.end(), in.tokens.begin(), in.tokens.end());
    slices.push_back({in.past, n, {}, {}});
  }
  const int64_t rows = static_cast<int64_t>(tokens.size());
  const int64_t d = c.d_model;
  const int64_t q_cols = int64_t{c.n_heads} * c.head_dim;
  const int64_t kv_cols = int64_t{c.n_kv_heads} * c.head_dim;

  // The step itself; everything it allocates is dropped at its end except the logits.
  const auto run = [&]() -> absl::StatusOr<std::unique_ptr<Tensor>> {
    std::unique_ptr<Tensor> x, xn, q, k, v, attn, proj, gate, up, act;
    const std::pair<std::unique_ptr<Tensor>*, int64_t> scratch[] = {
        {&x, d},         {&xn, d},   {&q, q_cols},    {&k, kv_cols}, {&v, kv_cols},
        {&attn, q_cols}, {&proj, d}, {&gate, c.d_ff}, {&up, c.d_ff}, {&act, c.d_ff}};
    for (const auto& [dst, cols] : scratch) {
      absl::StatusOr<std::unique_ptr<Tensor>> t = be.NewActivation(rows, cols);
      if (!t.ok()) return t.status();
      *dst = *std::move(t);
    }

    // Per layer, each sequence's block tables of every KV head, as the backend takes them.
    const size_t n_seqs = batch.size();
    std::vector<absl::Span<const int32_t>> tables(n_seqs * c.n_kv_heads);
    std::vector<TableVersion> versions(n_seqs * c.n_kv_heads);
    std::vector<const HeadBlockTable*> layer_tables(c.n_kv_heads);
    for (size_t s = 0; s < n_seqs; ++s) {
      slices[s].block_tables = absl::MakeConstSpan(tables).subspan(s * c.n_kv_heads, c.n_kv_heads);
      slices[s].table_versions =
          absl::MakeConstSpan(versions).subspan(s * c.n_kv_heads, c.n_kv_heads);
    }

    RETURN_IF_ERROR(be.Embed(*im.token_embd, tokens, *x));
    AttentionParams ap;
    ap.n_heads = c.n_heads;
    ap.n_kv_heads = c.n_kv_heads;
    ap.head_dim = c.head_dim;
    ap.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    ap.span = im.span;
    for (int l = 0; l < c.n_layers; ++l) {
      const Impl::Layer& L = im.layers[l];
      // The previous layer's last residual add (its MLP's output, in proj) goes with this norm.
      if (l == 0) {
        RETURN_IF_ERROR(be.RmsNorm(*x, *L.attn_norm, c.rms_eps, *xn));
      } else {
        RETURN_IF_ERROR(be.AddRmsNorm(*x, *proj, *L.attn_norm, c.rms_eps, *xn));
      }
      const Tensor* qkv_weights[] = {L.q.get(), L.k.get(), L.v.get()};
      Tensor* const qkv[] = {q.get(), k.get(), v.get()};
      RETURN_IF_ERROR(be.MatMuls(*xn, qkv_weights, qkv));
      RETURN_IF_ERROR(be.RopeQK(*q, c.n_heads, *k, c.n_kv_heads, c.head_dim, im.inv_freq, positions,
                                c.rope_layout));
      ap.layer = l;
      for (size_t s = 0; s < n_seqs; ++s) {
        if (!kv.LayerTables(batch[s].seq, l, absl::MakeSpan(layer_tables))) {
          return absl::InternalError(absl::StrCat("Forward: no tables of sequence ", batch[s].seq,
                                                  " layer ", l, " in the KV cache"));
        }
        for (int h = 0; h < c.n_kv_heads; ++h) {
          tables[s * c.n_kv_heads + h] = layer_tables[h]->blocks;
          versions[s * c.n_kv_heads + h] = {layer_tables[h]->id, layer_tables[h]->version};
        }
      }
      ap.rules = im.rules.empty() ? absl::Span<const SpanRule>() : im.rules[l];
      RETURN_IF_ERROR(be.Attention(*q, *k, *v, slices, ap, pool, *attn));
      RETURN_IF_ERROR(be.MatMul(*attn, *L.o, *proj));
      RETURN_IF_ERROR(be.AddRmsNorm(*x, *proj, *L.ffn_norm, c.rms_eps, *xn));
      const Tensor* gate_up_weights[] = {L.gate.get(), L.up.get()};
      Tensor* const gate_up[] = {gate.get(), up.get()};
      RETURN_IF_ERROR(be.MatMuls(*xn, gate_up_weights, gate_up));
      RETURN_IF_ERROR(be.SwiGlu(*gate, *up, *act));
      RETURN_IF_ERROR(be.MatMul(*act, *L.down, *proj));
    }
    if (c.n_layers > 0) RETURN_IF_ERROR(be.Add(*x, *proj));

    // Only the wanted rows go through the final norm and the (large) vocabulary projection.
    const int64_t n_out = static_cast<int64_t>(wanted_rows.size());
    std::unique_ptr<Tensor> last = std::move(x);
    if (n_out != rows) {
      absl::StatusOr<std::unique_ptr<Tensor>> t = be.NewActivation(n_out, d);
      if (!t.ok()) return t.status();
      RETURN_IF_ERROR(be.GatherRows(*last, wanted_rows, **t));
      last = *std::move(t);
    }
    absl::StatusOr<std::unique_ptr<Tensor>> normed = be.NewActivation(n_out, d);
    if (!normed.ok()) return normed.status();
    absl::StatusOr<std::unique_ptr<Tensor>> out = be.NewActivation(n_out, c.vocab_size);
    if (!out.ok()) return out.status();
    RETURN_IF_ERROR(be.RmsNorm(*last, *im.output_norm, c.rms_eps, **normed));
    RETURN_IF_ERROR(be.MatMul(**normed, im.logits_weight(), **out));
    return out;
  };
  // A decode step (one new token per sequence) has the same shapes every time for a batch size:
  // the backend may record it once and replay it (Backend::BeginStep). ABORTED means the
  // recording no longer fits (longer block tables, a bigger workspace) and nothing ran: again.
  const bool replayable = std::all_of(batch.begin(), batch.end(),
                                      [](const ForwardInput& in) { return in.tokens.size() == 1; });
  if (!replayable) return run();
  absl::Status s;
  // Each retry follows a growth of the recording's memory, at least 4x: a few suffice.
  for (int attempt = 0; attempt < 8; ++attempt) {
    RETURN_IF_ERROR(be.BeginStep(static_cast<int64_t>(batch.size())));
    absl::StatusOr<std::unique_ptr<Tensor>> out = run();
    s = out.ok() ? be.EndStep() : out.status();
    if (s.ok()) return out;
    be.CancelStep();
    if (!absl::IsAborted(s)) return s;
  }
  return s;
}

absl::Status LlamaModel::Forward(absl::Span<const ForwardInput> batch, const KvCacheManager& kv,
                                 KvPool& pool, std::vector<float>* logits) {
  if (logits == nullptr) return absl::InvalidArgumentError("Forward: no logits output");
  ASSIGN_OR_RETURN(const std::unique_ptr<Tensor> out, ForwardToLogits(batch, kv, pool));
  const int64_t n = out->rows() * out->cols();
  const size_t old = logits->size();
  logits->resize(old + n);
  return impl_->backend->CopyToHost(*out, absl::MakeSpan(logits->data() + old, n));
}

absl::Status LlamaModel::ForwardAndSample(absl::Span<const ForwardInput> batch,
                                          const KvCacheManager& kv, KvPool& pool,
                                          absl::Span<const SampleRow> rows,
                                          std::vector<int32_t>* tokens,
                                          std::vector<float>* logits) {
  if (tokens == nullptr) return absl::InvalidArgumentError("ForwardAndSample: no tokens output");
  // Bad rows are refused before the step writes the KV cache.
  int64_t returned = 0;
  for (const ForwardInput& in : batch) {
    returned += in.all_logits ? static_cast<int64_t>(in.tokens.size()) : 1;
  }
  RETURN_IF_ERROR(CheckSampleArgs(returned, config_.vocab_size, rows, rows.size()));
  ASSIGN_OR_RETURN(const std::unique_ptr<Tensor> out, ForwardToLogits(batch, kv, pool));
  Backend& be = *impl_->backend;
  tokens->resize(rows.size());
  RETURN_IF_ERROR(be.Sample(*out, rows, absl::MakeSpan(*tokens)));
  if (logits == nullptr) return absl::OkStatus();
  logits->resize(out->rows() * out->cols());
  return be.CopyToHost(*out, absl::MakeSpan(*logits));
}

}  // namespace moa
