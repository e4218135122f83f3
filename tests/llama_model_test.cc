// The Llama forward pass on a tiny random model against a plain double-precision forward written
// here, plus RoPE frequencies and a smoke test on the default model.
#include "engine/llama_model.h"

#include <cmath>
#include <memory>
#include <numbers>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/moa_plan.h"
#include "engine/model/model_file.h"
#include "engine/rope.h"
#include "gtest/gtest.h"
#include "kernels/attention_span.h"
#include "kernels/backend.h"
#include "tests/test_util.h"

namespace moa {
namespace {

// ---------------------------------------------------------------------------------------------
// RoPE frequencies.

TEST(RopeInvFreq, Unscaled) {
  const std::vector<float> f = RopeInvFreq(8, 10000.0, RopeScaling{}).value();
  ASSERT_EQ(f.size(), 4u);
  // 10000^(-2i/8) = 1, 0.1, 0.01, 0.001.
  EXPECT_FLOAT_EQ(f[0], 1.0f);
  EXPECT_FLOAT_EQ(f[1], 0.1f);
  EXPECT_FLOAT_EQ(f[2], 0.01f);
  EXPECT_FLOAT_EQ(f[3], 0.001f);
}

TEST(RopeInvFreq, LinearDividesByFactor) {
  RopeScaling s;
  s.type = RopeScaling::Type::kLinear;
  s.factor = 4.0;
  const std::vector<float> f = RopeInvFreq(8, 10000.0, s).value();
  EXPECT_FLOAT_EQ(f[0], 0.25f);
  EXPECT_FLOAT_EQ(f[1], 0.025f);
  EXPECT_FLOAT_EQ(f[3], 0.00025f);
}

TEST(RopeInvFreq, Llama3) {
  // Llama 3.1: theta 500000, head_dim 128, factor 8, low 1, high 4, original context 8192.
  // Wavelengths below 8192 / 4 = 2048 are kept, those above 8192 / 1 are divided by 8, and
  // between them smooth = (8192 / wavelen - 1) / (4 - 1) blends f / 8 with f.
  RopeScaling s;
  s.type = RopeScaling::Type::kLlama3;
  s.factor = 8.0;
  s.low_freq_factor = 1.0;
  s.high_freq_factor = 4.0;
  s.original_max_position = 8192;
  const std::vector<float> f = RopeInvFreq(128, 500000.0, s).value();
  ASSERT_EQ(f.size(), 64u);
  int kept = 0, divided = 0, blended = 0;
  for (int i = 0; i < 64; ++i) {
    const double base = std::pow(500000.0, -2.0 * i / 128);
    const double wavelen = 2 * std::numbers::pi / base;
    double expected;
    if (wavelen < 2048) {
      expected = base;
      ++kept;
    } else if (wavelen > 8192) {
      expected = base / 8;
      ++divided;
    } else {
      const double smooth = (8192 / wavelen - 1) / 3;
      expected = (1 - smooth) * base / 8 + smooth * base;
      ++blended;
    }
    EXPECT_NEAR(f[i], expected, 1e-6 * expected) << i;
  }
  // By hand: i = 0 keeps 1; i = 63 is 500000^(-126/128) / 8.
  EXPECT_FLOAT_EQ(f[0], 1.0f);
  EXPECT_NEAR(f[63], std::pow(500000.0, -126.0 / 128) / 8, 1e-12);
  // i = 26: base = 500000^(-52/128) = 0.0048394, wavelen = 1298.3 < 2048: kept.
  EXPECT_NEAR(f[26], 0.0048394, 1e-7);
  // i = 32: base = 500000^(-0.5) = 0.0014142, wavelen = 4442.9: smooth = (8192/4442.9 - 1) / 3
  // = 0.28128, f = 0.71872 * 0.00017678 + 0.28128 * 0.0014142 = 0.00052485.
  EXPECT_NEAR(f[32], 0.00052485, 2e-8);
  EXPECT_GT(kept, 0);
  EXPECT_GT(divided, 0);
  EXPECT_GT(blended, 0);
}

TEST(RopeInvFreq, RejectsBadParameters) {
  EXPECT_FALSE(RopeInvFreq(7, 10000.0, RopeScaling{}).ok());
  EXPECT_FALSE(RopeInvFreq(8, 0.5, RopeScaling{}).ok());
  RopeScaling s;
  s.type = RopeScaling::Type::kLlama3;
  s.factor = 8;
  s.low_freq_factor = 4;
  s.high_freq_factor = 4;
  EXPECT_FALSE(RopeInvFreq(8, 10000.0, s).ok());
}

// ---------------------------------------------------------------------------------------------
// A tiny random model with float32 weights owned by the test.

using testing::TinyConfig;
using testing::TinyModel;

// The plain forward pass: a whole sequence from position 0, double precision, attention as a
// dense softmax under the explicit mask IsVisible() (everything causal when `plan` is null).
// Returns logits [tokens.size(), vocab].
std::vector<double> ReferenceForward(const ModelFile& m, const std::vector<int32_t>& tokens,
                                     const MoaPlan* plan) {
  const ModelConfig& c = m.config;
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int d = c.d_model, hd = c.head_dim, nh = c.n_heads, nkv = c.n_kv_heads;
  auto w = [&](const std::string& name) {
    return reinterpret_cast<const float*>(m.tensors.at(name).data);
  };
  auto matmul = [](const std::vector<double>& x, int64_t rows, int k, const float* wt, int out) {
    std::vector<double> y(rows * out, 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int j = 0; j < out; ++j) {
        double s = 0;
        for (int i = 0; i < k; ++i) s += x[r * k + i] * wt[int64_t{j} * k + i];
        y[r * out + j] = s;
      }
    }
    return y;
  };
  auto rmsnorm = [&](const std::vector<double>& x, const float* wt) {
    std::vector<double> y(x.size());
    for (int64_t r = 0; r < n; ++r) {
      double ss = 0;
      for (int i = 0; i < d; ++i) ss += x[r * d + i] * x[r * d + i];
      const double inv = 1.0 / std::sqrt(ss / d + c.rms_eps);
      for (int i = 0; i < d; ++i) y[r * d + i] = x[r * d + i] * inv * wt[i];
    }
    return y;
  };
  auto rope = [&](std::vector<double>& x, int heads) {
    for (int64_t r = 0; r < n; ++r) {
      for (int h = 0; h < heads; ++h) {
        double* v = &x[(r * heads + h) * hd];
        for (int i = 0; i < hd / 2; ++i) {
          const double angle = r * std::pow(c.rope_theta, -2.0 * i / hd);
          const bool half = c.rope_layout == RopeLayout::kHalfSplit;
          double& a = v[half ? i : 2 * i];
          double& b = v[half ? i + hd / 2 : 2 * i + 1];
          const double a0 = a, b0 = b;
          a = a0 * std::cos(angle) - b0 * std::sin(angle);
          b = a0 * std::sin(angle) + b0 * std::cos(angle);
        }
      }
    }
  };
  std::vector<double> x(n * d);
  for (int64_t r = 0; r < n; ++r) {
    for (int i = 0; i < d; ++i) x[r * d + i] = w("token_embd.weight")[tokens[r] * d + i];
  }
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = absl::StrCat("blk.", l, ".");
    std::vector<double> xn = rmsnorm(x, w(p + "attn_norm.weight"));
    std::vector<double> q = matmul(xn, n, d, w(p + "attn_q.weight"), nh * hd);
    std::vector<double> k = matmul(xn, n, d, w(p + "attn_k.weight"), nkv * hd);
    std::vector<double> v = matmul(xn, n, d, w(p + "attn_v.weight"), nkv * hd);
    rope(q, nh);
    rope(k, nkv);
    std::vector<double> att(n * nh * hd, 0.0);
    for (int64_t qp = 0; qp < n; ++qp) {
      for (int h = 0; h < nh; ++h) {
        const int g = h / (nh / nkv);
        const SpanRule rule = plan ? plan->layer_rules(l)[g] : SpanRule{};
        const SpanParams sp = plan ? plan->params() : SpanParams{};
        std::vector<double> s(n, 0.0);
        double mx = -INFINITY;
        for (int64_t kp = 0; kp <= qp; ++kp) {
          if (!IsVisible(rule, sp, qp, kp)) continue;
          double dot = 0;
          for (int i = 0; i < hd; ++i)
            dot += q[(qp * nh + h) * hd + i] * k[(kp * nkv + g) * hd + i];
          s[kp] = dot / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, s[kp]);
        }
        double sum = 0;
        for (int64_t kp = 0; kp <= qp; ++kp) {
          s[kp] = IsVisible(rule, sp, qp, kp) ? std::exp(s[kp] - mx) : 0.0;
          sum += s[kp];
        }
        for (int64_t kp = 0; kp <= qp; ++kp) {
          for (int i = 0; i < hd; ++i) {
            att[(qp * nh + h) * hd + i] += s[kp] / sum * v[(kp * nkv + g) * hd + i];
          }
        }
      }
    }
    std::vector<double> o = matmul(att, n, nh * hd, w(p + "attn_output.weight"), d);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    xn = rmsnorm(x, w(p + "ffn_norm.weight"));
    std::vector<double> gate = matmul(xn, n, d, w(p + "ffn_gate.weight"), c.d_ff);
    const std::vector<double> up = matmul(xn, n, d, w(p + "ffn_up.weight"), c.d_ff);
    for (size_t i = 0; i < gate.size(); ++i) gate[i] = gate[i] / (1 + std::exp(-gate[i])) * up[i];
    o = matmul(gate, n, c.d_ff, w(p + "ffn_down.weight"), d);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
  }
  const std::vector<double> xn = rmsnorm(x, w("output_norm.weight"));
  const char* out = c.tied_embeddings ? "token_embd.weight" : "output.weight";
  return matmul(xn, n, d, w(out), c.vocab_size);
}

std::vector<int32_t> RandomTokens(int64_t n, int vocab, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> dist(0, vocab - 1);
  std::vector<int32_t> t(n);
  for (int32_t& x : t) x = dist(rng);
  return t;
}

// A model's KV cache for the tests: a block manager with its pool, and one engine-like step
// (Grow, Forward, Trim).
struct ModelKv {
  ModelKv(LlamaModel& model, int32_t blocks, int32_t block_size = 4)
      : kv(KvCacheManager::Create(model.kv_layout(block_size), blocks).value()),
        pool(model.NewKvPool(blocks, block_size).value()) {}

  absl::Status Step(LlamaModel& model, SeqId seq, int64_t past, absl::Span<const int32_t> tokens,
                    bool all_logits, std::vector<float>* logits) {
    if (absl::Status s = kv->Grow(seq, past + static_cast<int64_t>(tokens.size())); !s.ok()) {
      return s;
    }
    const ForwardInput in{seq, past, tokens, all_logits};
    absl::Status s = model.Forward({&in, 1}, *kv, *pool, logits);
    kv->Trim(seq);
    return s;
  }

  std::unique_ptr<KvCacheManager> kv;
  std::unique_ptr<KvPool> pool;
};

// Logits of one sequence in a single Forward call with all_logits.
std::vector<float> RunAll(LlamaModel& model, const std::vector<int32_t>& tokens) {
  ModelKv mk(model, 1024);
  std::vector<float> logits;
  EXPECT_TRUE(mk.Step(model, mk.kv->AddSequence(), 0, tokens, true, &logits).ok());
  return logits;
}

// The last-token logits of a chunked prefill followed by token-by-token decoding, with the
// windows' blocks trimmed after every step: one vocab row per step after the prefill.
std::vector<float> RunPrefillThenDecode(LlamaModel& model, const std::vector<int32_t>& tokens,
                                        int64_t prefill, int64_t chunk) {
  ModelKv mk(model, 1024);
  const SeqId seq = mk.kv->AddSequence();
  const auto all = absl::MakeConstSpan(tokens);
  std::vector<float> got;
  for (int64_t past = 0; past < prefill; past += chunk) {
    got.clear();
    const int64_t n = std::min(chunk, prefill - past);
    EXPECT_TRUE(mk.Step(model, seq, past, all.subspan(past, n), false, &got).ok());
  }
  for (int64_t i = prefill; i < static_cast<int64_t>(tokens.size()); ++i) {
    EXPECT_TRUE(mk.Step(model, seq, i, all.subspan(i, 1), false, &got).ok());
  }
  EXPECT_TRUE(mk.kv->CheckInvariants().ok());
  return got;
}

void ExpectNearReference(const std::vector<float>& got, const std::vector<double>& ref) {
  ASSERT_EQ(got.size(), ref.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    ASSERT_NEAR(got[i], ref[i], 1e-3 * (1 + std::fabs(ref[i]))) << "logit " << i;
  }
}

struct Variant {
  std::string name;
  RopeLayout layout;
  bool tied;
};
void PrintTo(const Variant& v, std::ostream* os) { *os << v.name; }

class TinyModelTest : public ::testing::TestWithParam<Variant> {};

TEST_P(TinyModelTest, MatchesPlainReference) {
  ModelConfig c = TinyConfig();
  c.rope_layout = GetParam().layout;
  c.tied_embeddings = GetParam().tied;
  const ModelFile file = TinyModel(c, 1);
  auto be = NewCpuBackend(2);
  auto model = LlamaModel::Create(file, be.get(), nullptr).value();
  const std::vector<int32_t> tokens = RandomTokens(23, c.vocab_size, 2);
  ExpectNearReference(RunAll(*model, tokens), ReferenceForward(file, tokens, nullptr));
}

INSTANTIATE_TEST_SUITE_P(Variants, TinyModelTest,
                         ::testing::Values(Variant{"HalfSplit", RopeLayout::kHalfSplit, false},
                                           Variant{"InterleavedTied", RopeLayout::kInterleaved,
                                                   true}),
                         [](const auto& info) { return info.param.name; });

// The CPU backend computes every row the same way whatever else is in the batch, so these
// agree bitwise.
TEST(LlamaModel, PrefillThenDecodeEqualsOnePass) {
  const ModelFile file = TinyModel(TinyConfig(), 3);
  auto be = NewCpuBackend(2);
  auto model = LlamaModel::Create(file, be.get(), nullptr).value();
  const std::vector<int32_t> tokens = RandomTokens(20, 97, 4);
  const std::vector<float> all = RunAll(*model, tokens);
  const int64_t prefill = 13;
  const std::vector<float> got = RunPrefillThenDecode(*model, tokens, prefill, prefill);
  const std::vector<float> expected(all.begin() + (prefill - 1) * 97, all.end());
  EXPECT_EQ(got, expected);
  // Chunked prefill too.
  EXPECT_EQ(RunPrefillThenDecode(*model, tokens, prefill, 5), expected);
}

TEST(LlamaModel, BatchEqualsEachSequenceAlone) {
  const ModelFile file = TinyModel(TinyConfig(), 5);
  auto be = NewCpuBackend(3);
  auto model = LlamaModel::Create(file, be.get(), nullptr).value();
  const std::vector<std::vector<int32_t>> seqs = {RandomTokens(11, 97, 6), RandomTokens(4, 97, 7),
                                                  RandomTokens(17, 97, 8)};
  // Each sequence first gets a prefill of its own (of different lengths), then one batched
  // step carries the rest of all three, with all logits for the second one only.
  const std::vector<int64_t> first = {6, 1, 16};
  ModelKv mk(*model, 64);
  std::vector<SeqId> ids;
  for (size_t s = 0; s < seqs.size(); ++s) {
    ids.push_back(mk.kv->AddSequence());
    std::vector<float> ignored;
    ASSERT_TRUE(
        mk.Step(*model, ids[s], 0, absl::MakeConstSpan(seqs[s]).first(first[s]), false, &ignored)
            .ok());
  }
  std::vector<ForwardInput> batch;
  for (size_t s = 0; s < seqs.size(); ++s) {
    ASSERT_TRUE(mk.kv->Grow(ids[s], static_cast<int64_t>(seqs[s].size())).ok());
    batch.push_back({ids[s], first[s], absl::MakeConstSpan(seqs[s]).subspan(first[s]), s == 1});
  }
  std::vector<float> got;
  ASSERT_TRUE(model->Forward(batch, *mk.kv, *mk.pool, &got).ok());

  std::vector<float> expected;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const std::vector<float> alone = RunAll(*model, seqs[s]);
    const int64_t from = s == 1 ? first[s] : static_cast<int64_t>(seqs[s].size()) - 1;
    expected.insert(expected.end(), alone.begin() + from * 97, alone.end());
  }
  EXPECT_EQ(got, expected);
}

// Sink 4, block 4: windows far shorter than the 40-token sequence.
constexpr char kShortWindowPlan[] = R"({
  "format": "moa-plan", "version": 1, "sink": 4, "block_size": 4,
  "model": {"name": "tiny", "n_heads": 4, "n_kv_heads": 2},
  "rules": [[{"alpha": 8, "beta": 0}, {"dense": true}],
            [{"alpha": 4, "beta": 0.25}, {"alpha": 12, "beta": 0}]]
})";

TEST(LlamaModel, PlanWithShortWindowsMatchesMaskedReference) {
  const ModelFile file = TinyModel(TinyConfig(), 9);
  const MoaPlan plan = MoaPlan::FromJson(kShortWindowPlan).value();
  auto be = NewCpuBackend(2);
  auto sparse = LlamaModel::Create(file, be.get(), &plan).value();
  auto dense = LlamaModel::Create(file, be.get(), nullptr).value();
  const std::vector<int32_t> tokens = RandomTokens(40, 97, 10);
  const std::vector<float> got = RunAll(*sparse, tokens);
  ExpectNearReference(got, ReferenceForward(file, tokens, &plan));
  // The windows matter: the dense model's later logits are different.
  const std::vector<float> dense_logits = RunAll(*dense, tokens);
  double diff = 0;
  for (size_t i = 30 * 97; i < got.size(); ++i) {
    diff = std::max(diff, static_cast<double>(std::fabs(got[i] - dense_logits[i])));
  }
  EXPECT_GT(diff, 0.05);
  // And the first positions, inside every window, agree.
  for (size_t i = 0; i < 8 * 97; ++i) ASSERT_NEAR(got[i], dense_logits[i], 1e-5);
  // Chunked prefill and decoding over a cache whose passed window blocks are freed after every
  // step give the same logits as the one pass.
  const std::vector<float> expected(got.begin() + 16 * 97, got.end());
  EXPECT_EQ(RunPrefillThenDecode(*sparse, tokens, 17, 6), expected);
}

TEST(LlamaModel, PlanMustFitTheModel) {
  ModelConfig other = TinyConfig();
  other.n_layers = 3;
  const MoaPlan plan = MoaPlan::Dense(other, SpanParams{});
  const ModelFile file = TinyModel(TinyConfig(), 11);
  auto be = NewCpuBackend(1);
  EXPECT_FALSE(LlamaModel::Create(file, be.get(), &plan).ok());
}

TEST(LlamaModel, RejectsBadInput) {
  const ModelFile file = TinyModel(TinyConfig(), 12);
  auto be = NewCpuBackend(1);
  auto model = LlamaModel::Create(file, be.get(), nullptr).value();
  ModelKv mk(*model, 8);
  KvCacheManager& kv = *mk.kv;
  const SeqId seq = kv.AddSequence();
  ASSERT_TRUE(kv.Grow(seq, 3).ok());
  std::vector<float> logits;
  const std::vector<int32_t> ok_tokens = {1, 2, 3};
  EXPECT_FALSE(model->Forward({}, kv, *mk.pool, &logits).ok());
  ForwardInput empty{seq, 3, {}, false};
  EXPECT_FALSE(model->Forward({&empty, 1}, kv, *mk.pool, &logits).ok());
  const std::vector<int32_t> bad_id = {1, 2, 97};
  ForwardInput out_of_range{seq, 0, bad_id, false};
  EXPECT_FALSE(model->Forward({&out_of_range, 1}, kv, *mk.pool, &logits).ok());
  const std::vector<int32_t> negative = {1, 2, -1};
  ForwardInput neg{seq, 0, negative, false};
  EXPECT_FALSE(model->Forward({&neg, 1}, kv, *mk.pool, &logits).ok());
  // Positions the cache was not grown to.
  ForwardInput not_grown{seq, 1, ok_tokens, false};
  EXPECT_EQ(model->Forward({&not_grown, 1}, kv, *mk.pool, &logits).code(),
            absl::StatusCode::kOutOfRange);
  ForwardInput unknown{seq + 100, 0, ok_tokens, false};
  EXPECT_FALSE(model->Forward({&unknown, 1}, kv, *mk.pool, &logits).ok());
  ForwardInput twice{seq, 0, ok_tokens, false};
  const ForwardInput same_seq_twice[] = {twice, twice};
  EXPECT_FALSE(model->Forward(same_seq_twice, kv, *mk.pool, &logits).ok());
  // A manager of another layout (block size, plan) or a pool that does not fit it.
  ModelKv other_blocks(*model, 8, 2);
  EXPECT_FALSE(model->Forward({&twice, 1}, kv, *other_blocks.pool, &logits).ok());
  auto small_pool = model->NewKvPool(4, 4).value();
  EXPECT_FALSE(model->Forward({&twice, 1}, kv, *small_pool, &logits).ok());
  const MoaPlan plan = MoaPlan::FromJson(kShortWindowPlan).value();
  auto windowed = LlamaModel::Create(file, be.get(), &plan).value();
  EXPECT_FALSE(windowed->Forward({&twice, 1}, kv, *mk.pool, &logits).ok());
  EXPECT_TRUE(logits.empty());
  EXPECT_TRUE(model->Forward({&twice, 1}, kv, *mk.pool, &logits).ok());
  EXPECT_EQ(logits.size(), 97u);
  EXPECT_EQ(model->BytesPerKvBlock(4), 4 * TinyConfig().head_dim * 2 * 4);

  ModelFile broken = TinyModel(TinyConfig(), 13);
  broken.tensors.erase("blk.1.ffn_up.weight");
  EXPECT_FALSE(LlamaModel::Create(broken, be.get(), nullptr).ok());
}

TEST(LlamaModel, DefaultModelGivesFiniteLogits) {
  const std::string path = testing::DefaultModelPath();
  if (!testing::FileExists(path)) GTEST_SKIP() << "default model absent: " << path;
  const ModelFile file = LoadModel(path).value();
  auto be = NewCpuBackend(0);
  auto model = LlamaModel::Create(file, be.get(), nullptr).value();
  ModelKv mk(*model, 2 * file.config.n_layers * file.config.n_kv_heads, 16);
  const SeqId seq = mk.kv->AddSequence();
  const std::vector<int32_t> tokens = {1, 504, 2365, 6354, 16438, 27003, 690, 260};
  std::vector<float> logits;
  ASSERT_TRUE(mk.Step(*model, seq, 0, tokens, false, &logits).ok());
  ASSERT_EQ(logits.size(), static_cast<size_t>(file.config.vocab_size));
  for (float x : logits) ASSERT_TRUE(std::isfinite(x));
  const std::vector<int32_t> next = {30};
  logits.clear();
  ASSERT_TRUE(mk.Step(*model, seq, 8, next, false, &logits).ok());
  for (float x : logits) ASSERT_TRUE(std::isfinite(x));
}

}  // namespace
}  // namespace moa
