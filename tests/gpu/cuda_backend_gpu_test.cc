// The CUDA backend against the CPU backend (the reference): every op on fresh random inputs, the
// paged attention over random block placements with chunked prefill then decode, the same errors
// for bad shapes and missing blocks, and whole models through LlamaModel on both backends.
// Runs on the GPU machine only (moa_gpu_tests). Model files are found under the repository root
// given by the environment variable MOA_SOURCE_DIR (default: the current directory).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/llama_model.h"
#include "engine/model/model_file.h"
#include "engine/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/decode_attention.h"
#include "kernels/quant.h"
#include "kvcache/kv_cache_manager.h"
#include "tests/gpu/cuda_test_util.h"
#include "tests/gpu/model_run.h"

namespace moa {
namespace {

using gpu_test::FileExists;
using gpu_test::SourceDir;

std::vector<float> RandomFloats(int64_t n, std::mt19937& rng, float sd = 1.0f) {
  std::normal_distribution<float> dist(0.0f, sd);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Largest |got - want| over the largest |want|, with where it happened, for the messages.
struct Diff {
  double max_abs = 0.0;
  double ref_max = 0.0;
  int64_t worst = -1;
  double rel() const { return max_abs / std::max(ref_max, 1e-30); }
};

Diff Compare(const std::vector<float>& got, const std::vector<float>& want) {
  Diff d;
  for (size_t i = 0; i < want.size(); ++i) {
    d.ref_max = std::max(d.ref_max, std::fabs(double{want[i]}));
    const double e = std::fabs(double{got[i]} - double{want[i]});
    // NaN (e.g. poison left unwritten) counts as the worst error.
    if (!(e <= d.max_abs)) {
      d.max_abs = std::isnan(e) ? INFINITY : e;
      d.worst = static_cast<int64_t>(i);
    }
  }
  return d;
}

std::string Describe(const Diff& d, const std::vector<float>& got, const std::vector<float>& want,
                     int64_t cols) {
  if (d.worst < 0) return "no difference";
  return absl::StrFormat(
      "max |diff| %.3g (relative to max |ref| %.3g: %.3g) at row %d col %d: "
      "gpu %.6g, cpu %.6g",
      d.max_abs, d.ref_max, d.rel(), d.worst / cols, d.worst % cols, got[d.worst], want[d.worst]);
}

#define EXPECT_CLOSE(got, want, cols, tol, what)                               \
  do {                                                                         \
    ASSERT_EQ((got).size(), (want).size()) << what;                            \
    const Diff d_ = Compare(got, want);                                        \
    EXPECT_LE(d_.rel(), tol) << what << ": " << Describe(d_, got, want, cols); \
  } while (0)

// A host tensor of `dtype` encoding `values` [rows, cols] (cols a whole number of blocks).
HostTensor MakeWeight(const std::string& name, DType dtype, int64_t rows, int64_t cols,
                      const std::vector<float>& values, bool one_d = false) {
  HostTensor t;
  t.name = name;
  t.dtype = dtype;
  t.shape = one_d ? std::vector<int64_t>{cols} : std::vector<int64_t>{rows, cols};
  const int64_t row_bytes = RowBytes(dtype, cols).value();
  auto buf = std::make_shared<std::vector<uint8_t>>(rows * row_bytes);
  for (int64_t r = 0; r < rows; ++r) {
    EXPECT_TRUE(
        QuantizeRow(dtype, values.data() + r * cols, cols, buf->data() + r * row_bytes).ok());
  }
  t.data = buf->data();
  t.nbytes = static_cast<int64_t>(buf->size());
  t.owner = buf;
  return t;
}

// A tensor's contents on the host.
std::vector<float> Host(Backend& be, const Tensor& t) {
  std::vector<float> v(t.rows() * t.cols());
  const absl::Status s = be.CopyToHost(t, absl::MakeSpan(v));
  EXPECT_TRUE(s.ok()) << be.name() << " CopyToHost: " << s;
  return v;
}

class CudaBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Backend>> gpu = NewCudaBackend(0);
    ASSERT_TRUE(gpu.ok()) << "no CUDA backend: " << gpu.status();
    gpu_ = *std::move(gpu);
    cpu_ = NewCpuBackend(0);
  }

  // An activation [rows, cols] holding `values` on `be`. On the GPU the buffer is poisoned (NaN)
  // first so that a kernel that skips an element is caught.
  std::unique_ptr<Tensor> Act(Backend& be, int64_t rows, int64_t cols,
                              const std::vector<float>& values) {
    std::unique_ptr<Tensor> t = be.NewActivation(rows, cols).value();
    EXPECT_TRUE(be.CopyFromHost(values, *t).ok());
    return t;
  }
  std::unique_ptr<Tensor> Poisoned(Backend& be, int64_t rows, int64_t cols) {
    return Act(be, rows, cols, std::vector<float>(rows * cols, NAN));
  }

  std::unique_ptr<Backend> gpu_, cpu_;
  std::mt19937 rng_{20261123};
};

TEST_F(CudaBackendTest, CopyRoundTripAndWeightReadBack) {
  const std::vector<float> x = RandomFloats(7 * 33, rng_);
  auto t = Act(*gpu_, 7, 33, x);
  EXPECT_EQ(Host(*gpu_, *t), x);
  // A weight reads back as its fp16 rounding.
  const std::vector<float> w = RandomFloats(5 * 64, rng_);
  auto wt = gpu_->LoadWeight(MakeWeight("w", DType::kF32, 5, 64, w)).value();
  const std::vector<float> got = Host(*gpu_, *wt);
  for (size_t i = 0; i < w.size(); ++i) ASSERT_EQ(got[i], Fp16ToF32(F32ToFp16(w[i]))) << i;
}

// MatMul: fp16 weights and fp16-rounded activations with fp32 accumulation, against the CPU's
// exact fp32 (F32/F16 weights) or int8-activation (Q8_0/Q4_1 weights) products.
TEST_F(CudaBackendTest, MatMul) {
  struct Case {
    int64_t rows, k, n;
  };
  struct Type {
    DType dtype;
    double tol;  // max |diff| / max |ref|
  };
  // fp16 rounding of x and w: ~2^-11 each, averaged over K; int8 activations on the CPU: ~1%.
  for (const Type& ty : {Type{DType::kF32, 4e-3}, Type{DType::kF16, 4e-3}, Type{DType::kQ8_0, 2e-2},
                         Type{DType::kQ4_1, 2e-2}}) {
    for (const Case& c : {Case{1, 576, 1536}, Case{7, 224, 33}, Case{33, 96, 250}, Case{5, 1056, 7},
                          Case{64, 576, 576}}) {
      const std::string what = absl::StrCat(GetDTypeInfo(ty.dtype).name, " [", c.rows, ", ", c.k,
                                            "] x [", c.n, ", ", c.k, "]");
      const std::vector<float> x = RandomFloats(c.rows * c.k, rng_);
      const HostTensor w = MakeWeight("w", ty.dtype, c.n, c.k, RandomFloats(c.n * c.k, rng_));
      std::vector<float> out[2];
      Backend* bes[2] = {cpu_.get(), gpu_.get()};
      for (int b = 0; b < 2; ++b) {
        auto wt = bes[b]->LoadWeight(w).value();
        auto xt = Act(*bes[b], c.rows, c.k, x);
        auto ot = Poisoned(*bes[b], c.rows, c.n);
        const absl::Status s = bes[b]->MatMul(*xt, *wt, *ot);
        ASSERT_TRUE(s.ok()) << bes[b]->name() << " " << what << ": " << s;
        out[b] = Host(*bes[b], *ot);
      }
      EXPECT_CLOSE(out[1], out[0], c.n, ty.tol, what);
    }
  }
}

// An allocation the GPU cannot hold (256 GiB, under the backend's own size limit, so cudaMalloc
// itself refuses it) is RESOURCE_EXHAUSTED, and leaves nothing behind: the runtime keeps a failed
// call's error for the next launch's check, which must not see it.
TEST_F(CudaBackendTest, OutOfMemoryIsResourceExhaustedAndHarmless) {
  for (int attempt = 0; attempt < 2; ++attempt) {
    const absl::StatusOr<std::unique_ptr<Tensor>> big =
        gpu_->NewActivation(int64_t{1} << 16, int64_t{1} << 20);
    ASSERT_FALSE(big.ok());
    EXPECT_EQ(big.status().code(), absl::StatusCode::kResourceExhausted) << big.status();
    EXPECT_NE(big.status().message().find("cudaErrorMemoryAllocation"), absl::string_view::npos)
        << big.status();
    // The next launch (an embedding lookup) runs and is right.
    const int64_t vocab = 37, d = 64;
    const HostTensor table =
        MakeWeight("emb", DType::kF16, vocab, d, RandomFloats(vocab * d, rng_));
    const std::vector<int32_t> tokens = {3, 0, 36, 3};
    std::vector<float> out[2];
    Backend* bes[2] = {cpu_.get(), gpu_.get()};
    for (int b = 0; b < 2; ++b) {
      auto tt = bes[b]->LoadWeight(table).value();
      auto ot = Poisoned(*bes[b], 4, d);
      const absl::Status s = bes[b]->Embed(*tt, tokens, *ot);
      ASSERT_TRUE(s.ok()) << bes[b]->name() << " after a refused allocation: " << s;
      out[b] = Host(*bes[b], *ot);
    }
    EXPECT_EQ(out[1], out[0]);
  }
}

TEST_F(CudaBackendTest, Embed) {
  for (DType dt : {DType::kF16, DType::kQ8_0, DType::kF32}) {
    const int64_t vocab = 301, d = 96;
    const HostTensor table = MakeWeight("emb", dt, vocab, d, RandomFloats(vocab * d, rng_));
    std::vector<int32_t> tokens(37);
    std::uniform_int_distribution<int32_t> tok(0, vocab - 1);
    for (int32_t& t : tokens) t = tok(rng_);
    tokens[0] = 0;
    tokens[1] = vocab - 1;
    std::vector<float> out[2];
    Backend* bes[2] = {cpu_.get(), gpu_.get()};
    for (int b = 0; b < 2; ++b) {
      auto tt = bes[b]->LoadWeight(table).value();
      auto ot = Poisoned(*bes[b], 37, d);
      ASSERT_TRUE(bes[b]->Embed(*tt, tokens, *ot).ok()) << bes[b]->name();
      out[b] = Host(*bes[b], *ot);
    }
    // The GPU stores the table in fp16: at most one fp16 rounding (exact for F16).
    EXPECT_CLOSE(out[1], out[0], d, dt == DType::kF16 ? 0.0 : 1e-3, GetDTypeInfo(dt).name);
  }
}

TEST_F(CudaBackendTest, RmsNorm) {
  // Rows held in registers as 1, 2, 4 or 8 float4s per thread (576 and 100; 2048; 4096; 8192),
  // and the two-pass kernel (not a multiple of 4: 5, 4097; longer than 8192: 8196).
  for (int64_t rows : {1, 7, 33}) {
    for (int64_t d : {576, 100, 2048, 4096, 8192, 5, 4097, 8196}) {
      const std::vector<float> x = RandomFloats(rows * d, rng_, 3.0f);
      std::vector<float> wv = RandomFloats(d, rng_, 0.2f);
      for (float& w : wv) w += 1.0f;
      const HostTensor w = MakeWeight("norm", DType::kF32, 1, d, wv, /*one_d=*/true);
      std::vector<float> out[2];
      Backend* bes[2] = {cpu_.get(), gpu_.get()};
      for (int b = 0; b < 2; ++b) {
        auto wt = bes[b]->LoadWeight(w).value();
        auto xt = Act(*bes[b], rows, d, x);
        auto ot = Poisoned(*bes[b], rows, d);
        ASSERT_TRUE(bes[b]->RmsNorm(*xt, *wt, 1e-5f, *ot).ok()) << bes[b]->name();
        out[b] = Host(*bes[b], *ot);
      }
      EXPECT_CLOSE(out[1], out[0], d, 1e-5, absl::StrCat("RmsNorm [", rows, ", ", d, "]"));
    }
  }
}

// MatMuls: weights of one shape run as one cuBLAS batch (here q-, k- and v-like weights of a GQA
// layer: two of one shape, one of another, in an order that interleaves them), each output
// against the CPU; an output given twice is refused by both backends alike.
TEST_F(CudaBackendTest, MatMulsMatchesMatMul) {
  const int64_t k = 96;
  const int64_t ns[] = {40, 24, 40, 24, 7};
  for (const int64_t rows : {int64_t{1}, int64_t{13}}) {
    const std::vector<float> x = RandomFloats(rows * k, rng_);
    std::vector<HostTensor> ws;
    for (const int64_t n : ns)
      ws.push_back(MakeWeight("w", DType::kF16, n, k, RandomFloats(n * k, rng_)));
    std::vector<std::vector<float>> got[2];
    absl::Status twice[2];
    Backend* bes[2] = {cpu_.get(), gpu_.get()};
    for (int b = 0; b < 2; ++b) {
      Backend& be = *bes[b];
      auto xt = Act(be, rows, k, x);
      std::vector<std::unique_ptr<Tensor>> wt, ot;
      std::vector<const Tensor*> wp;
      std::vector<Tensor*> op;
      for (size_t i = 0; i < ws.size(); ++i) {
        wt.push_back(be.LoadWeight(ws[i]).value());
        ot.push_back(Poisoned(be, rows, ns[i]));
        wp.push_back(wt.back().get());
        op.push_back(ot.back().get());
      }
      const absl::Status s = be.MatMuls(*xt, wp, op);
      ASSERT_TRUE(s.ok()) << be.name() << ": " << s;
      for (const auto& o : ot) got[b].push_back(Host(be, *o));
      op[2] = op[0];
      twice[b] = be.MatMuls(*xt, wp, op);
    }
    for (size_t i = 0; i < ws.size(); ++i) {
      EXPECT_CLOSE(got[1][i], got[0][i], ns[i], 4e-3, absl::StrCat("MatMuls output ", i));
    }
    EXPECT_FALSE(twice[1].ok());
    EXPECT_EQ(twice[1], twice[0]);
  }
}

// AddRmsNorm (x += y, then out = RmsNorm(x)): both x and out against the CPU's Add then RmsNorm.
TEST_F(CudaBackendTest, AddRmsNorm) {
  for (int64_t rows : {1, 9}) {
    for (int64_t d : {576, 4096, 4097}) {
      const std::vector<float> x = RandomFloats(rows * d, rng_, 3.0f);
      const std::vector<float> y = RandomFloats(rows * d, rng_);
      std::vector<float> wv = RandomFloats(d, rng_, 0.2f);
      for (float& w : wv) w += 1.0f;
      const HostTensor w = MakeWeight("norm", DType::kF32, 1, d, wv, /*one_d=*/true);
      std::vector<float> sum[2], out[2];
      Backend* bes[2] = {cpu_.get(), gpu_.get()};
      for (int b = 0; b < 2; ++b) {
        auto wt = bes[b]->LoadWeight(w).value();
        auto xt = Act(*bes[b], rows, d, x);
        auto yt = Act(*bes[b], rows, d, y);
        auto ot = Poisoned(*bes[b], rows, d);
        ASSERT_TRUE(bes[b]->AddRmsNorm(*xt, *yt, *wt, 1e-5f, *ot).ok()) << bes[b]->name();
        sum[b] = Host(*bes[b], *xt);
        out[b] = Host(*bes[b], *ot);
      }
      const std::string what = absl::StrCat("AddRmsNorm [", rows, ", ", d, "]");
      EXPECT_CLOSE(sum[1], sum[0], d, 0.0, what + " x + y");
      EXPECT_CLOSE(out[1], out[0], d, 1e-5, what);
    }
  }
}

// MatMul reads the fp16 copy that RmsNorm, AddRmsNorm, SwiGlu or the MatMul before it made of
// its input, for as long as nothing wrote the input since: after each way of writing it (an op
// in place, a copy from the host, another op's output) the products must follow the new values.
TEST_F(CudaBackendTest, MatMulAfterWritesToItsInput) {
  const int64_t rows = 5, d = 96, n = 40;
  const HostTensor w = MakeWeight("w", DType::kF16, n, d, RandomFloats(n * d, rng_));
  const HostTensor norm = MakeWeight("norm", DType::kF32, 1, d, RandomFloats(d, rng_), true);
  const std::vector<float> x0 = RandomFloats(rows * d, rng_), y0 = RandomFloats(rows * d, rng_);
  const std::vector<float> z0 = RandomFloats(rows * d, rng_);
  std::vector<int32_t> pos(rows);
  std::iota(pos.begin(), pos.end(), 3);
  std::vector<float> inv_freq(8);
  for (int i = 0; i < 8; ++i) inv_freq[i] = std::pow(100.0f, -i / 8.0f);
  std::vector<std::vector<float>> got[2];
  Backend* bes[2] = {cpu_.get(), gpu_.get()};
  for (int b = 0; b < 2; ++b) {
    Backend& be = *bes[b];
    auto wt = be.LoadWeight(w).value();
    auto nt = be.LoadWeight(norm).value();
    auto x = Act(be, rows, d, x0), y = Act(be, rows, d, y0);
    auto xn = Poisoned(be, rows, d), out = Poisoned(be, rows, n);
    const auto product = [&](const Tensor& in) {
      ASSERT_TRUE(be.MatMul(in, *wt, *out).ok()) << be.name();
      got[b].push_back(Host(be, *out));
    };
    ASSERT_TRUE(be.RmsNorm(*x, *nt, 1e-5f, *xn).ok());
    product(*xn);
    product(*xn);  // the same input again (as k and v after q)
    ASSERT_TRUE(be.Add(*xn, *y).ok());
    product(*xn);
    ASSERT_TRUE(be.Rope(*xn, 6, 16, inv_freq, pos, RopeLayout::kHalfSplit).ok());
    product(*xn);
    ASSERT_TRUE(be.CopyFromHost(z0, *xn).ok());
    product(*xn);
    product(*y);  // another input between two products of xn
    product(*xn);
    ASSERT_TRUE(be.AddRmsNorm(*x, *y, *nt, 1e-5f, *xn).ok());
    product(*xn);
    product(*x);  // AddRmsNorm wrote x too
    ASSERT_TRUE(be.SwiGlu(*x, *y, *xn).ok());
    product(*xn);
    ASSERT_TRUE(be.RmsNorm(*y, *nt, 1e-5f, *y).ok());  // in place
    product(*y);
    ASSERT_TRUE(be.Add(*y, *x).ok());
    {  // a batch of two products of y (MatMuls), then one more of y alone
      auto out2 = Poisoned(be, rows, n);
      const Tensor* both_w[] = {wt.get(), wt.get()};
      Tensor* const both[] = {out.get(), out2.get()};
      ASSERT_TRUE(be.MatMuls(*y, both_w, both).ok()) << be.name();
      got[b].push_back(Host(be, *out));
      got[b].push_back(Host(be, *out2));
    }
    product(*y);
  }
  ASSERT_EQ(got[0].size(), got[1].size());
  for (size_t i = 0; i < got[0].size(); ++i) {
    EXPECT_CLOSE(got[1][i], got[0][i], n, 4e-3, absl::StrCat("product ", i));
  }
}

TEST_F(CudaBackendTest, Rope) {
  for (RopeLayout layout : {RopeLayout::kHalfSplit, RopeLayout::kInterleaved}) {
    for (auto [rows, n_heads, hd] :
         {std::tuple{1, 9, 64}, std::tuple{37, 3, 16}, std::tuple{5, 8, 128}}) {
      const int64_t cols = int64_t{n_heads} * hd;
      const std::vector<float> x = RandomFloats(rows * cols, rng_);
      std::vector<float> inv_freq(hd / 2);
      for (int i = 0; i < hd / 2; ++i) {
        inv_freq[i] = static_cast<float>(std::pow(10000.0, -2.0 * i / hd));
      }
      std::vector<int32_t> pos(rows);
      std::uniform_int_distribution<int32_t> pd(0, 9000);
      for (int32_t& p : pos) p = pd(rng_);
      std::vector<float> out[2];
      Backend* bes[2] = {cpu_.get(), gpu_.get()};
      for (int b = 0; b < 2; ++b) {
        auto xt = Act(*bes[b], rows, cols, x);
        ASSERT_TRUE(bes[b]->Rope(*xt, n_heads, hd, inv_freq, pos, layout).ok()) << bes[b]->name();
        out[b] = Host(*bes[b], *xt);
      }
      // Same float angles; sincosf and std::sin/cos both within an ulp or two of exact.
      EXPECT_CLOSE(out[1], out[0], cols, 2e-5,
                   absl::StrCat("Rope layout ", static_cast<int>(layout), " [", rows, ", ", n_heads,
                                " x ", hd, "]"));
    }
  }
}

// RopeQK (q and k in one pass) against the CPU, three calls in a row on the same tensors: the
// positions change, then the frequencies (the CUDA backend reuses uploaded ones while equal).
TEST_F(CudaBackendTest, RopeQKFollowsChangingPositionsAndFrequencies) {
  const int rows = 7, nq = 6, nk = 2, hd = 32;
  const std::vector<float> q0 = RandomFloats(rows * nq * hd, rng_);
  const std::vector<float> k0 = RandomFloats(rows * nk * hd, rng_);
  std::vector<float> f1(hd / 2), f2(hd / 2);
  for (int i = 0; i < hd / 2; ++i) {
    f1[i] = static_cast<float>(std::pow(10000.0, -2.0 * i / hd));
    f2[i] = static_cast<float>(std::pow(500000.0, -2.0 * i / hd));
  }
  std::vector<int32_t> p1(rows), p2(rows);
  std::iota(p1.begin(), p1.end(), 100);
  std::iota(p2.begin(), p2.end(), 4000);
  for (RopeLayout layout : {RopeLayout::kHalfSplit, RopeLayout::kInterleaved}) {
    std::vector<float> got[2][2];
    Backend* bes[2] = {cpu_.get(), gpu_.get()};
    for (int b = 0; b < 2; ++b) {
      auto qt = Act(*bes[b], rows, nq * hd, q0);
      auto kt = Act(*bes[b], rows, nk * hd, k0);
      for (const auto& [f, p] : {std::pair{&f1, &p1}, std::pair{&f1, &p2}, std::pair{&f2, &p2}}) {
        ASSERT_TRUE(bes[b]->RopeQK(*qt, nq, *kt, nk, hd, *f, *p, layout).ok()) << bes[b]->name();
      }
      got[b][0] = Host(*bes[b], *qt);
      got[b][1] = Host(*bes[b], *kt);
    }
    EXPECT_CLOSE(got[1][0], got[0][0], nq * hd, 2e-5, "RopeQK q");
    EXPECT_CLOSE(got[1][1], got[0][1], nk * hd, 2e-5, "RopeQK k");
  }
}

TEST_F(CudaBackendTest, SwiGluAndAdd) {
  for (auto [rows, cols] : {std::pair{1, 1536}, std::pair{33, 77}}) {
    const std::vector<float> g = RandomFloats(rows * cols, rng_, 3.0f);
    const std::vector<float> u = RandomFloats(rows * cols, rng_);
    std::vector<float> sw[2], add[2];
    Backend* bes[2] = {cpu_.get(), gpu_.get()};
    for (int b = 0; b < 2; ++b) {
      auto gt = Act(*bes[b], rows, cols, g);
      auto ut = Act(*bes[b], rows, cols, u);
      auto ot = Poisoned(*bes[b], rows, cols);
      ASSERT_TRUE(bes[b]->SwiGlu(*gt, *ut, *ot).ok()) << bes[b]->name();
      sw[b] = Host(*bes[b], *ot);
      ASSERT_TRUE(bes[b]->Add(*gt, *ut).ok()) << bes[b]->name();
      add[b] = Host(*bes[b], *gt);
    }
    EXPECT_CLOSE(sw[1], sw[0], cols, 1e-6, "SwiGlu");
    EXPECT_CLOSE(add[1], add[0], cols, 0.0, "Add");
  }
}

TEST_F(CudaBackendTest, SameErrorsForBadShapes) {
  Backend* bes[2] = {cpu_.get(), gpu_.get()};
  absl::Status got[2][5];
  for (int b = 0; b < 2; ++b) {
    Backend& be = *bes[b];
    auto x = be.NewActivation(3, 64).value();
    auto y = be.NewActivation(3, 32).value();
    auto w = be.LoadWeight(MakeWeight("w", DType::kF16, 8, 32, RandomFloats(256, rng_))).value();
    auto n =
        be.LoadWeight(MakeWeight("n", DType::kF32, 1, 32, RandomFloats(32, rng_), true)).value();
    got[b][0] = be.MatMul(*x, *w, *y);
    got[b][1] = be.RmsNorm(*x, *n, 1e-5f, *x);
    got[b][2] = be.Add(*x, *y);
    std::vector<float> f(16, 1.0f);
    std::vector<int32_t> pos(2, 0);
    got[b][3] = be.Rope(*x, 2, 32, f, pos, RopeLayout::kHalfSplit);
    got[b][4] = be.NewKvPool(0, 16, 64).status();
  }
  for (int i = 0; i < 5; ++i) {
    EXPECT_FALSE(got[1][i].ok()) << "case " << i;
    EXPECT_EQ(got[1][i], got[0][i]) << "case " << i;
  }
}

// ---------------------------------------------------------------------------------------------
// Paged attention.

struct AttnCase {
  std::string name;
  int n_kv_heads, group, head_dim;
  int32_t block_size;
  SpanParams span;
  std::vector<SpanRule> rules;   // per KV head; empty = dense
  std::vector<int64_t> lengths;  // final length of each sequence
  std::vector<int64_t> chunks;   // prefill chunk sizes, cycled; then decode steps of one token
  int64_t decode_steps;
};

// Runs the same steps on both backends, each sequence's tables placing its blocks at random in
// the pool, and compares the output of every step. Sequences at one new token go to the split-KV
// decode kernel on the GPU (head_dim 64 and 128) while others in the same call prefill.
void RunAttention(Backend& cpu, Backend& gpu, const AttnCase& c, std::mt19937& rng) {
  const int n_heads = c.n_kv_heads * c.group;
  const int hd = c.head_dim;
  const int64_t n_seqs = static_cast<int64_t>(c.lengths.size());
  int64_t blocks_per_table = 0;
  for (int64_t len : c.lengths) {
    blocks_per_table = std::max(blocks_per_table, (len + c.block_size - 1) / c.block_size);
  }
  const int32_t num_blocks = static_cast<int32_t>(n_seqs * c.n_kv_heads * blocks_per_table + 5);
  std::vector<int32_t> ids(num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<std::vector<int32_t>> tables(n_seqs * c.n_kv_heads);
  size_t next = 0;
  for (int64_t s = 0; s < n_seqs; ++s) {
    for (int h = 0; h < c.n_kv_heads; ++h) {
      const int64_t nb = (c.lengths[s] + c.block_size - 1) / c.block_size;
      for (int64_t b = 0; b < nb; ++b) tables[s * c.n_kv_heads + h].push_back(ids[next++]);
    }
  }
  std::vector<absl::Span<const int32_t>> spans(tables.begin(), tables.end());
  // Every other step names the tables (the GPU then keeps them on the device and checks them
  // once, as in the engine), the others do not (sent afresh).
  static uint64_t next_table_id = uint64_t{1} << 62;  // apart from KvCacheManager's ids
  std::vector<TableVersion> versions(tables.size());
  for (TableVersion& v : versions) v = {next_table_id++, 1};
  auto cpu_pool = cpu.NewKvPool(num_blocks, c.block_size, hd).value();
  auto gpu_pool = gpu.NewKvPool(num_blocks, c.block_size, hd).value();
  AttentionParams p;
  p.layer = 3;
  p.n_heads = n_heads;
  p.n_kv_heads = c.n_kv_heads;
  p.head_dim = hd;
  p.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  p.span = c.span;
  p.rules = c.rules;

  std::vector<int64_t> done(n_seqs, 0);
  int step = 0;
  size_t chunk_i = 0;
  while (true) {
    // Every unfinished sequence takes its next chunk (prefill) or one token (decode).
    std::vector<SequenceSlice> slices;
    int64_t rows = 0;
    for (int64_t s = 0; s < n_seqs; ++s) {
      const int64_t prefill_end = c.lengths[s] - c.decode_steps;
      int64_t n = done[s] < prefill_end
                      ? std::min(c.chunks[chunk_i % c.chunks.size()], prefill_end - done[s])
                      : std::min<int64_t>(1, c.lengths[s] - done[s]);
      if (n == 0) continue;
      slices.push_back(
          {done[s], n, absl::MakeConstSpan(spans).subspan(s * c.n_kv_heads, c.n_kv_heads),
           step % 2 == 0 ? absl::MakeConstSpan(versions).subspan(s * c.n_kv_heads, c.n_kv_heads)
                         : absl::Span<const TableVersion>()});
      done[s] += n;
      rows += n;
    }
    ++chunk_i;
    if (rows == 0) break;
    const std::vector<float> q = RandomFloats(rows * n_heads * hd, rng);
    // The GPU keeps keys and values in fp16. Both backends get K/V already rounded to fp16, so
    // that the comparison measures the kernels' arithmetic (fp32 accumulation in another order,
    // exp2 against exp), not the storage format: then 1e-4 of the largest output holds.
    std::vector<float> k = RandomFloats(rows * c.n_kv_heads * hd, rng);
    std::vector<float> v = RandomFloats(rows * c.n_kv_heads * hd, rng);
    for (std::vector<float>* kv : {&k, &v}) {
      for (float& x : *kv) x = Fp16ToF32(F32ToFp16(x));
    }
    std::vector<float> out[2];
    Backend* bes[2] = {&cpu, &gpu};
    KvPool* pools[2] = {cpu_pool.get(), gpu_pool.get()};
    for (int b = 0; b < 2; ++b) {
      Backend& be = *bes[b];
      auto qt = be.NewActivation(rows, int64_t{n_heads} * hd).value();
      auto kt = be.NewActivation(rows, int64_t{c.n_kv_heads} * hd).value();
      auto vt = be.NewActivation(rows, int64_t{c.n_kv_heads} * hd).value();
      ASSERT_TRUE(be.CopyFromHost(q, *qt).ok());
      ASSERT_TRUE(be.CopyFromHost(k, *kt).ok());
      ASSERT_TRUE(be.CopyFromHost(v, *vt).ok());
      auto ot = be.NewActivation(rows, int64_t{n_heads} * hd).value();
      ASSERT_TRUE(be.CopyFromHost(std::vector<float>(rows * n_heads * hd, NAN), *ot).ok());
      const absl::Status s = be.Attention(*qt, *kt, *vt, slices, p, *pools[b], *ot);
      ASSERT_TRUE(s.ok()) << c.name << " step " << step << " " << be.name() << ": " << s;
      out[b] = Host(be, *ot);
    }
    // Decode rows on the decode kernel: fp32 arithmetic, 1e-4. Prefill rows, and decode rows of
    // shapes the decode kernel has no instance for, go through the flash kernel, whose tensor
    // cores take the query and the softmax weights in fp16 (relative rounding 2^-11 each): a few
    // 1e-3 of the largest output.
    const bool decode_only = cuda::DecodeAttentionSupports(hd, n_heads / c.n_kv_heads) &&
                             std::all_of(slices.begin(), slices.end(),
                                         [](const SequenceSlice& sl) { return sl.n_new == 1; });
    EXPECT_CLOSE(out[1], out[0], int64_t{n_heads} * hd, decode_only ? 1e-4 : 4e-3,
                 absl::StrCat(c.name, " step ", step, " (", rows, " rows)"));
    ++step;
  }
}

TEST_F(CudaBackendTest, AttentionMatchesCpu) {
  const SpanParams sp{4, 16};
  const SpanRule dense{};
  const SpanRule short_win{false, 16, 0.0};   // sink 4 + 12 keys: shorter than the sequences
  const SpanRule long_win{false, 4096, 0.0};  // longer than the sequences: dense in effect
  const SpanRule elastic{false, 16, 0.25};
  std::vector<AttnCase> cases = {
      {"mha dense", 4, 1, 64, 16, sp, {}, {45}, {17, 8}, 5},
      {"gqa3 smollm-like", 3, 3, 64, 16, sp, {short_win, dense, elastic}, {100, 61}, {37}, 6},
      {"gqa4 windows", 2, 4, 128, 16, sp, {short_win, long_win}, {77, 3, 130}, {29, 50}, 4},
      {"gqa8 head_dim 80 odd block", 1, 8, 80, 7, sp, {elastic}, {93}, {31}, 9},
      {"gqa8 two kv heads",
       2,
       8,
       64,
       32,
       SpanParams{0, 32},
       {SpanRule{false, 32, 0.1}, short_win},
       {200, 41},
       {64, 13},
       3},
      // Long enough that a decode pair's keys are split over many thread blocks and merged; a
      // sequence of one token decodes from position 0.
      {"gqa4 long decode",
       2,
       4,
       128,
       16,
       SpanParams{64, 64},
       {SpanRule{false, 256, 0.25}, dense},
       {2301, 1},
       {1024},
       4},
      {"mha head_dim 128 mixed spans",
       4,
       1,
       128,
       16,
       SpanParams{64, 64},
       {dense, SpanRule{false, 128, 0.5}, long_win, short_win},
       {1777, 700, 3},
       {999},
       3},
  };
  for (const AttnCase& c : cases) {
    SCOPED_TRACE(c.name);
    RunAttention(*cpu_, *gpu_, c, rng_);
  }
}

// q, k, v of `rows` rows filled with `value`, and an output, for Attention's error cases.
struct AttnTensors {
  std::unique_ptr<Tensor> q, k, v, out;
};
AttnTensors ConstantAttnTensors(Backend& be, int64_t rows, int n_heads, int n_kv, int hd,
                                float value) {
  AttnTensors t;
  t.q = be.NewActivation(rows, int64_t{n_heads} * hd).value();
  t.k = be.NewActivation(rows, int64_t{n_kv} * hd).value();
  t.v = be.NewActivation(rows, int64_t{n_kv} * hd).value();
  t.out = be.NewActivation(rows, int64_t{n_heads} * hd).value();
  for (Tensor* x : {t.q.get(), t.k.get(), t.v.get()}) {
    EXPECT_TRUE(be.CopyFromHost(std::vector<float>(x->rows() * x->cols(), value), *x).ok());
  }
  return t;
}

// A table missing a block where a new row goes, or where a visible key lives: the same INTERNAL
// error from both backends, and no crash.
TEST_F(CudaBackendTest, AttentionMissingBlocks) {
  const int hd = 32, n_kv = 2, n_heads = 4;
  for (int variant = 0; variant < 2; ++variant) {
    absl::Status got[2];
    Backend* bes[2] = {cpu_.get(), gpu_.get()};
    for (int b = 0; b < 2; ++b) {
      Backend& be = *bes[b];
      auto pool = be.NewKvPool(16, 8, hd).value();
      // 20 cached + 3 new positions: blocks 0..2. Variant 0 drops block 2 (new rows) of head 1,
      // variant 1 block 0 (visible keys) of head 0.
      std::vector<int32_t> t0 = {5, 6, 7}, t1 = {9, 10, 11};
      if (variant == 0) t1[2] = -1;
      if (variant == 1) t0[0] = -1;
      const absl::Span<const int32_t> tabs[2] = {t0, t1};
      SequenceSlice s{20, 3, tabs, {}};
      AttentionParams p;
      p.n_heads = n_heads;
      p.n_kv_heads = n_kv;
      p.head_dim = hd;
      AttnTensors t = ConstantAttnTensors(be, 3, n_heads, n_kv, hd, 0.5f);
      got[b] = be.Attention(*t.q, *t.k, *t.v, {&s, 1}, p, *pool, *t.out);
      // The backend is still usable afterwards.
      EXPECT_EQ(Host(be, *t.out).size(), size_t{3 * n_heads * hd});
    }
    EXPECT_EQ(got[1].code(), absl::StatusCode::kInternal) << got[1];
    if (variant == 0) {
      EXPECT_EQ(got[1], got[0]);
    } else {
      // The CPU reports whichever query its threads met first; both name the missing key.
      EXPECT_EQ(got[1].code(), got[0].code()) << got[0];
      for (const absl::Status& s : got) {
        EXPECT_NE(s.message().find("no KV block for visible key 0 "), std::string::npos) << s;
      }
    }
  }
}

// A block written by two sequences of one call is refused by both backends alike, also when one
// of the sequences takes the GPU's record of an earlier call (its tables unchanged).
TEST_F(CudaBackendTest, AttentionTwoWritersOfOneBlock) {
  const int n_kv = 2, n_heads = 4, hd = 64;
  AttentionParams p;
  p.n_heads = n_heads;
  p.n_kv_heads = n_kv;
  p.head_dim = hd;
  // Position 20 is in block 2 of blocks of 8: sequence a writes pool block 7 through head 0.
  const std::vector<int32_t> a0 = {5, 6, 7}, a1 = {9, 10, 11};
  const std::vector<int32_t> ok0 = {1, 2, 3}, ok1 = {4, 8, 12}, bad0 = {1, 2, 7};
  const absl::Span<const int32_t> a_tabs[2] = {a0, a1};
  const absl::Span<const int32_t> ok_tabs[2] = {ok0, ok1}, bad_tabs[2] = {bad0, ok1};
  static uint64_t next_id = (uint64_t{1} << 62) + (uint64_t{1} << 40);
  const uint64_t a_id = next_id, b_id = next_id + 2;
  next_id += 4;
  const TableVersion a_v[2] = {{a_id, 1}, {a_id + 1, 1}};
  const TableVersion ok_v[2] = {{b_id, 1}, {b_id + 1, 1}}, bad_v[2] = {{b_id, 2}, {b_id + 1, 1}};
  absl::Status got[2];
  Backend* bes[2] = {cpu_.get(), gpu_.get()};
  for (int b = 0; b < 2; ++b) {
    Backend& be = *bes[b];
    auto pool = be.NewKvPool(16, 8, hd).value();
    AttnTensors t = ConstantAttnTensors(be, 2, n_heads, n_kv, hd, 0.5f);
    // First the visible keys 0..19 of both sequences must be backed: write them as one prefill.
    AttnTensors t20 = ConstantAttnTensors(be, 40, n_heads, n_kv, hd, 0.25f);
    const SequenceSlice prefill[2] = {{0, 20, a_tabs, a_v}, {0, 20, ok_tabs, ok_v}};
    ASSERT_TRUE(be.Attention(*t20.q, *t20.k, *t20.v, prefill, p, *pool, *t20.out).ok());
    // A clean decode step, then one where sequence b's head 0 now writes block 7 too.
    const SequenceSlice fine[2] = {{20, 1, a_tabs, a_v}, {20, 1, ok_tabs, ok_v}};
    ASSERT_TRUE(be.Attention(*t.q, *t.k, *t.v, fine, p, *pool, *t.out).ok()) << be.name();
    const SequenceSlice clash[2] = {{20, 1, a_tabs, a_v}, {20, 1, bad_tabs, bad_v}};
    got[b] = be.Attention(*t.q, *t.k, *t.v, clash, p, *pool, *t.out);
    // Without versions the same.
    const SequenceSlice plain[2] = {{20, 1, a_tabs, {}}, {20, 1, bad_tabs, {}}};
    EXPECT_EQ(be.Attention(*t.q, *t.k, *t.v, plain, p, *pool, *t.out), got[b]) << be.name();
  }
  EXPECT_EQ(got[1].code(), absl::StatusCode::kInternal) << got[1];
  EXPECT_NE(got[1].message().find("KV block 7 is written by two sequences"), std::string::npos)
      << got[1];
  EXPECT_EQ(got[1], got[0]);
}

// ---------------------------------------------------------------------------------------------
// Whole models through LlamaModel.

using gpu_test::ModelRun;
using gpu_test::RunModel;

// Same top-1 at every position (unless the CPU's lead over the GPU's choice is below
// tie_margin) and logits within max_abs / mean_abs of the CPU's.
void CompareModels(const std::string& path, const std::vector<int32_t>& tokens, int64_t prefill,
                   int64_t chunk, float max_abs, float mean_abs, float tie_margin, Backend& cpu,
                   Backend& gpu) {
  absl::StatusOr<ModelFile> file = LoadModel(path);
  ASSERT_TRUE(file.ok()) << path << ": " << file.status();
  absl::StatusOr<ModelRun> want = RunModel(*file, cpu, tokens, prefill, chunk);
  ASSERT_TRUE(want.ok()) << "cpu: " << want.status();
  absl::StatusOr<ModelRun> got = RunModel(*file, gpu, tokens, prefill, chunk);
  ASSERT_TRUE(got.ok()) << "cuda: " << got.status();
  const int64_t vocab = file->config.vocab_size;
  const int64_t n = static_cast<int64_t>(tokens.size());
  ASSERT_EQ(want->logits.size(), static_cast<size_t>(n * vocab));
  ASSERT_EQ(got->logits.size(), static_cast<size_t>(n * vocab));
  double worst = 0.0, sum = 0.0;
  int64_t worst_pos = 0;
  int ties = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float* w = want->logits.data() + i * vocab;
    const float* g = got->logits.data() + i * vocab;
    for (int64_t j = 0; j < vocab; ++j) {
      const double e = std::fabs(double{g[j]} - double{w[j]});
      sum += e;
      if (!(e <= worst)) {
        worst = std::isnan(e) ? INFINITY : e;
        worst_pos = i;
      }
    }
    const int64_t top_w = std::max_element(w, w + vocab) - w;
    const int64_t top_g = std::max_element(g, g + vocab) - g;
    if (top_w != top_g) {
      EXPECT_LT(w[top_w] - w[top_g], tie_margin)
          << "position " << i << ": cpu top-1 " << top_w << " (" << w[top_w] << "), cuda top-1 "
          << top_g << " (cpu logit " << w[top_g] << ")";
      ++ties;
    }
  }
  const double mean = sum / static_cast<double>(n * vocab);
  std::printf(
      "[ model    ] %s: %lld positions, max |logit diff| %.4f (position %lld), mean %.5f, "
      "top-1 differs at %d near-ties\n",
      path.c_str(), static_cast<long long>(n), worst, static_cast<long long>(worst_pos), mean,
      ties);
  EXPECT_LE(worst, max_abs) << "position " << worst_pos;
  EXPECT_LE(mean, mean_abs);
  EXPECT_LE(ties, 2) << "too many positions where the top-1 differs";
}

TEST_F(CudaBackendTest, TinyModelMatchesCpu) {
  const std::string path = SourceDir() + "/tests/data/generated/tiny/model-f32.gguf";
  if (!FileExists(path)) {
    GTEST_SKIP() << path << " is absent: set MOA_SOURCE_DIR to the repository root and generate "
                 << "the test data (scripts/test.sh) or carry tests/data/generated/tiny";
  }
  const int64_t vocab = LoadModel(path).value().config.vocab_size;
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(vocab - 1));
  std::vector<int32_t> tokens(101);
  for (int32_t& t : tokens) t = tok(rng_);
  // fp32 weights on the CPU, fp16 on the GPU: differences from rounding only.
  CompareModels(path, tokens, 80, 27, 5e-2f, 5e-3f, 0.05f, *cpu_, *gpu_);
}

TEST_F(CudaBackendTest, DefaultModelMatchesCpu) {
  const std::string path = SourceDir() + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (!FileExists(path)) {
    GTEST_SKIP() << path << " is absent: set MOA_SOURCE_DIR to the repository root";
  }
  absl::StatusOr<ModelFile> file = LoadModel(path);
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok = Tokenizer::Create(file->tokenizer);
  ASSERT_TRUE(tok.ok()) << tok.status();
  const std::string text =
      "<|im_start|>user\nThe history of the printing press begins in the fifteenth century, "
      "when Johannes Gutenberg combined movable metal type, oil-based ink and a screw press. "
      "Explain in three short paragraphs why this mattered for science, religion and politics "
      "in Europe, and give one example for each.<|im_end|>\n<|im_start|>assistant\nThe printing "
      "press changed Europe because";
  absl::StatusOr<std::vector<int32_t>> tokens = (*tok)->Encode(text, true, true);
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  ASSERT_GE(tokens->size(), 60u);
  // The CPU runs Q4_1 x int8 activations, the GPU fp16 x fp16: both approximate the same
  // product; the bounds were chosen well inside the llama.cpp conformance test's (3.5 / 0.5).
  CompareModels(path, *tokens, static_cast<int64_t>(tokens->size()) - 12, 33, 1.5f, 0.2f, 0.5f,
                *cpu_, *gpu_);
}

}  // namespace
}  // namespace moa
