// The GGUF reader, the GGUF model loader and the model-file dispatch: files written by gguf-py
// (the committed fuzz seeds), files built here (valid and malformed), and the default model.
#include "engine/model/gguf.h"

#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <ostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/model/gguf_loader.h"
#include "engine/model/model_config.h"
#include "engine/model/model_file.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/quant.h"
#include "tests/gguf_test_writer.h"
#include "tests/test_util.h"

namespace moa {
namespace {

using ::moa::testing::GgufStr;
using ::moa::testing::GgufWriter;
using ::moa::testing::Le;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
namespace t = ::moa::testing;

std::string SeedPath(const std::string& name) {
  return t::SourceDir() + "/tests/fuzz/corpus/gguf/" + name;
}

std::string WriteTemp(const std::string& bytes, const std::string& name = "m.gguf") {
  const std::string path = t::MakeTempDir() + "/" + name;
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

// The message of an error, or a marker that cannot match the expected substring when it is OK.
std::string ErrorOf(const absl::Status& s) {
  return s.ok() ? "<OK, no error>" : std::string(s.message());
}
template <typename T>
std::string ErrorOf(const absl::StatusOr<T>& s) {
  return ErrorOf(s.status());
}

#define EXPECT_ERROR(s, substr) EXPECT_THAT(ErrorOf(s), HasSubstr(substr))

// ---------------------------------------------------------------------------------------------
// Files written by gguf-py (tests/tools/write_gguf_fuzz_seeds.py).

TEST(GgufPyFiles, AllMetadataTypes) {
  absl::StatusOr<GgufFile> f = GgufFile::Open(SeedPath("all_types.gguf"));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->alignment(), 32u);
  EXPECT_EQ(f->data_offset() % 32, 0u);
  EXPECT_EQ(f->metadata().size(), 17u);
  EXPECT_EQ(f->metadata()[0].first, "general.architecture");

  EXPECT_EQ(f->Find("t.u8")->type, GgufType::kUint8);
  EXPECT_EQ(*f->GetI64("t.u8"), 200);
  EXPECT_EQ(*f->GetI32("t.i8"), -100);
  EXPECT_EQ(*f->GetU32("t.u16"), 60000u);
  EXPECT_EQ(*f->GetI64("t.i16"), -30000);
  EXPECT_EQ(*f->GetU32("t.u32"), 4000000000u);
  EXPECT_EQ(*f->GetI32("t.i32"), -2000000000);
  EXPECT_EQ(*f->GetF32("t.f32"), 1.5f);
  EXPECT_EQ(*f->GetBool("t.bool"), true);
  EXPECT_EQ(*f->GetString("t.str"), "h\xC3\xA9llo");
  EXPECT_EQ(*f->GetU64("t.u64"), (uint64_t{1} << 63) + 5);
  EXPECT_EQ(*f->GetI64("t.i64"), -(int64_t{1} << 40));
  EXPECT_EQ(*f->GetF64("t.f64"), 0.1);
  EXPECT_THAT(*f->GetI32Array("t.arr_i16"), ElementsAre(1, -2, 3));
  EXPECT_THAT(*f->GetF32Array("t.arr_f32"), ElementsAre(0.5f, -0.25f));
  EXPECT_THAT(*f->GetStringArray("t.arr_str"), ElementsAre("a", "", "ccc"));

  const GgufValue* nested = f->Find("t.arr_nested");
  ASSERT_NE(nested, nullptr);
  ASSERT_EQ(nested->elem_type, GgufType::kArray);
  absl::StatusOr<std::vector<GgufValue>> outer = GgufArrayElements(*nested);
  ASSERT_TRUE(outer.ok()) << outer.status();
  ASSERT_EQ(outer->size(), 2u);
  absl::StatusOr<std::vector<GgufValue>> first = GgufArrayElements((*outer)[0]);
  ASSERT_TRUE(first.ok());
  ASSERT_EQ(first->size(), 2u);
  EXPECT_EQ((*first)[0].str, "x");
  EXPECT_EQ((*first)[1].str, "y");
  EXPECT_EQ(GgufArrayElements((*outer)[1])->at(0).str, "z");

  // Conversions only where they are safe.
  EXPECT_ERROR(f->GetU32("t.i8"), "out of range");
  EXPECT_ERROR(f->GetI32("t.u32"), "out of range");
  EXPECT_ERROR(f->GetI64("t.u64"), "out of range");
  EXPECT_ERROR(f->GetF32("t.u8"), "not a float");
  EXPECT_ERROR(f->GetU32("t.f32"), "not an integer");
  EXPECT_ERROR(f->GetBool("t.u8"), "not a bool");
  EXPECT_ERROR(f->GetString("t.arr_str"), "not a string");
  EXPECT_ERROR(f->GetStringArray("t.arr_i16"), "not an array of strings");
  EXPECT_ERROR(f->GetI32Array("t.arr_f32"), "not an array of integers");
  EXPECT_ERROR(f->GetF32Array("t.str"), "not an array of floats");
  absl::StatusOr<uint32_t> missing = f->GetU32("no.such.key");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_ERROR(missing, "'no.such.key' is missing");
  EXPECT_ERROR(missing, "all_types.gguf");  // errors name the file
}

TEST(GgufPyFiles, TensorsOfEveryFormat) {
  absl::StatusOr<GgufFile> f = GgufFile::Open(SeedPath("all_types.gguf"));
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_EQ(f->tensors().size(), 9u);
  struct Want {
    const char* name;
    DType dtype;
    std::vector<int64_t> shape;
  };
  const Want wants[] = {
      {"f32", DType::kF32, {2, 32}},    {"f16", DType::kF16, {32}},
      {"bf16", DType::kBF16, {2, 8}},   {"q8_0", DType::kQ8_0, {3, 64}},
      {"q4_0", DType::kQ4_0, {3, 64}},  {"q4_1", DType::kQ4_1, {3, 64}},
      {"q4_k", DType::kQ4_K, {2, 256}}, {"q5_k", DType::kQ5_K, {2, 256}},
      {"q6_k", DType::kQ6_K, {2, 256}},
  };
  for (const Want& w : wants) {
    const GgufTensorInfo* info = f->FindTensor(w.name);
    ASSERT_NE(info, nullptr) << w.name;
    const HostTensor h = f->TensorView(*info);
    EXPECT_EQ(h.name, w.name);
    EXPECT_EQ(h.dtype, w.dtype) << w.name;
    EXPECT_EQ(h.shape, w.shape) << w.name;
    EXPECT_EQ(h.nbytes, *RowBytes(w.dtype, h.NumElements())) << w.name;
    EXPECT_EQ(info->offset % 32, 0u);
    EXPECT_NE(h.owner, nullptr);
    std::vector<float> row(w.shape.back());
    EXPECT_TRUE(DequantizeRow(h.dtype, h.data, w.shape.back(), row.data()).ok());
  }
  // The F32 tensor holds 0..63 and the F16 one -1..1: the views point at the right bytes.
  const HostTensor f32 = f->TensorView(*f->FindTensor("f32"));
  for (int i = 0; i < 64; ++i) {
    float v;
    std::memcpy(&v, f32.data + 4 * i, 4);
    ASSERT_EQ(v, static_cast<float>(i));
  }
  const HostTensor f16 = f->TensorView(*f->FindTensor("f16"));
  std::vector<float> x(32);
  ASSERT_TRUE(DequantizeRow(DType::kF16, f16.data, 32, x.data()).ok());
  EXPECT_EQ(x.front(), -1.0f);
  EXPECT_EQ(x.back(), 1.0f);
}

TEST(GgufPyFiles, VersionTwoWithCustomAlignment) {
  absl::StatusOr<GgufFile> v2 = GgufFile::Open(SeedPath("align64_v2.gguf"));
  ASSERT_TRUE(v2.ok()) << v2.status();
  absl::StatusOr<GgufFile> v3 = GgufFile::Open(SeedPath("all_types.gguf"));
  ASSERT_TRUE(v3.ok()) << v3.status();
  EXPECT_EQ(v2->version(), 2u);
  EXPECT_EQ(v2->alignment(), 64u);
  EXPECT_EQ(v2->data_offset() % 64, 0u);
  ASSERT_EQ(v2->tensors().size(), v3->tensors().size());
  for (const GgufTensorInfo& a : v3->tensors()) {
    const GgufTensorInfo* b = v2->FindTensor(a.name);
    ASSERT_NE(b, nullptr);
    EXPECT_EQ(b->offset % 64, 0u);
    const HostTensor ha = v3->TensorView(a), hb = v2->TensorView(*b);
    ASSERT_EQ(ha.nbytes, hb.nbytes);
    EXPECT_EQ(std::memcmp(ha.data, hb.data, ha.nbytes), 0) << a.name;
  }
}

TEST(GgufPyFiles, EmptyFile) {
  absl::StatusOr<GgufFile> f = GgufFile::Open(SeedPath("empty.gguf"));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_TRUE(f->metadata().empty());
  EXPECT_TRUE(f->tensors().empty());
}

TEST(GgufPyFiles, TinyLlamaLoads) {
  absl::StatusOr<ModelFile> m = LoadGgufModel(SeedPath("tiny_llama.gguf"));
  ASSERT_TRUE(m.ok()) << m.status();
  const ModelConfig& c = m->config;
  EXPECT_EQ(c.architecture, "llama");
  EXPECT_EQ(c.name, "tiny test llama");
  EXPECT_EQ(c.n_layers, 1);
  EXPECT_EQ(c.d_model, 32);
  EXPECT_EQ(c.n_heads, 4);
  EXPECT_EQ(c.n_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.d_ff, 64);
  EXPECT_EQ(c.vocab_size, 40);
  EXPECT_EQ(c.max_context, 256);
  EXPECT_FLOAT_EQ(c.rms_eps, 1e-5f);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.rope_layout, RopeLayout::kInterleaved);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_TRUE(c.tied_embeddings);
  EXPECT_EQ(m->tensors.size(), 11u);
  EXPECT_EQ(m->tensors.at("blk.0.attn_k.weight").shape, (std::vector<int64_t>{16, 32}));
  EXPECT_EQ(m->tensors.at("blk.0.attn_k.weight").dtype, DType::kQ4_1);
  const TokenizerSource& tok = m->tokenizer;
  ASSERT_TRUE(tok.has_gguf);
  EXPECT_EQ(tok.gguf.model, "gpt2");
  EXPECT_EQ(tok.gguf.pre, "default");
  EXPECT_EQ(tok.gguf.tokens.size(), 40u);
  EXPECT_EQ(tok.gguf.tokens[33], "Ġa");
  EXPECT_EQ(tok.gguf.token_types.size(), 40u);
  EXPECT_TRUE(tok.gguf.scores.empty());
  EXPECT_THAT(tok.gguf.merges, ElementsAre("a b", "c d", "e f", "Ġ a", "g h"));
  EXPECT_EQ(tok.gguf.bos_id, 0);
  EXPECT_EQ(tok.gguf.eos_id, 1);
  EXPECT_EQ(tok.gguf.unk_id, 2);
  EXPECT_EQ(tok.gguf.pad_id, -1);
  EXPECT_TRUE(tok.gguf.add_bos);
  EXPECT_FALSE(tok.gguf.add_eos);
  EXPECT_EQ(tok.bos_id, 0);
  EXPECT_EQ(tok.eos_id, 1);
  EXPECT_TRUE(tok.add_bos);
  EXPECT_EQ(m->chat_template, "{% for m in messages %}{{ m.content }}{% endfor %}");
}

// ---------------------------------------------------------------------------------------------
// Files built here.

// Every metadata type, including nested arrays, empty arrays and strings, in both versions and
// with the default and a custom alignment.
struct RoundTripCase {
  uint32_t version;
  uint32_t alignment;  // 0: default (no key)
};
void PrintTo(const RoundTripCase& c, std::ostream* os) {
  *os << "v" << c.version << " alignment " << c.alignment;
}

class GgufRoundTrip : public ::testing::TestWithParam<RoundTripCase> {};

TEST_P(GgufRoundTrip, EveryTypeAndTensors) {
  const RoundTripCase& p = GetParam();
  GgufWriter w(p.version);
  if (p.alignment != 0) w.Alignment(p.alignment);
  w.Kv("u8", t::kTU8, Le<uint8_t>(255))
      .Kv("i8", t::kTI8, Le<int8_t>(-128))
      .Kv("u16", t::kTU16, Le<uint16_t>(65535))
      .Kv("i16", t::kTI16, Le<int16_t>(-32768))
      .U32("u32", 0xFFFFFFFFu)
      .I32("i32", -7)
      .F32("f32", -0.0f)
      .Bool("b0", false)
      .Bool("b1", true)
      .Str("s", "")
      .Kv("u64", t::kTU64, Le<uint64_t>(~uint64_t{0}))
      .Kv("i64", t::kTI64, Le<int64_t>(INT64_MIN))
      .Kv("f64", t::kTF64, Le<double>(1e300))
      .Array<uint8_t>("a_bool", t::kTBool, {1, 0, 1})
      .Array<uint64_t>("a_u64", t::kTU64, {1, 2})
      .Array<double>("a_f64", t::kTF64, {2.5})
      .Array<int32_t>("a_empty", t::kTI32, {})
      .StrArray("a_str", {"x", "", "yz"});
  // [[1, 2], []] as an array of arrays of int8.
  const std::string inner1 =
      Le<uint32_t>(t::kTI8) + Le<uint64_t>(2) + Le<int8_t>(1) + Le<int8_t>(2);
  const std::string inner2 = Le<uint32_t>(t::kTI8) + Le<uint64_t>(0);
  w.Kv("nested", t::kTArray, Le<uint32_t>(t::kTArray) + Le<uint64_t>(2) + inner1 + inner2);
  const std::string data_a(4 * 8, '\0'), data_b(34 * 2, '\1');
  w.Tensor("a", t::kGgmlF32, {4, 2}, data_a).Tensor("b", t::kGgmlQ8_0, {32, 1, 2}, data_b);

  absl::StatusOr<GgufFile> f = GgufFile::Parse(w.Build(), "rt.gguf");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->version(), p.version);
  const uint64_t align = p.alignment != 0 ? p.alignment : 32;
  EXPECT_EQ(f->alignment(), align);
  EXPECT_EQ(f->data_offset() % align, 0u);
  EXPECT_EQ(*f->GetU32("u8"), 255u);
  EXPECT_EQ(*f->GetI32("i8"), -128);
  EXPECT_EQ(*f->GetU32("u16"), 65535u);
  EXPECT_EQ(*f->GetI32("i16"), -32768);
  EXPECT_EQ(*f->GetU32("u32"), 0xFFFFFFFFu);
  EXPECT_EQ(*f->GetI64("i32"), -7);
  EXPECT_TRUE(std::signbit(*f->GetF32("f32")));
  EXPECT_FALSE(*f->GetBool("b0"));
  EXPECT_TRUE(*f->GetBool("b1"));
  EXPECT_EQ(*f->GetString("s"), "");
  EXPECT_EQ(*f->GetU64("u64"), ~uint64_t{0});
  EXPECT_EQ(*f->GetI64("i64"), INT64_MIN);
  EXPECT_EQ(*f->GetF64("f64"), 1e300);
  EXPECT_TRUE(std::isinf(*f->GetF32("f64")));  // float64 -> float32 as C++ converts
  absl::StatusOr<std::vector<GgufValue>> bools = GgufArrayElements(*f->Find("a_bool"));
  ASSERT_TRUE(bools.ok());
  ASSERT_EQ(bools->size(), 3u);
  EXPECT_EQ((*bools)[0].u, 1u);
  EXPECT_EQ((*bools)[1].u, 0u);
  EXPECT_THAT(*f->GetI32Array("a_u64"), ElementsAre(1, 2));
  EXPECT_THAT(*f->GetF32Array("a_f64"), ElementsAre(2.5f));
  EXPECT_TRUE(f->GetI32Array("a_empty")->empty());
  EXPECT_THAT(*f->GetStringArray("a_str"), ElementsAre("x", "", "yz"));
  absl::StatusOr<std::vector<GgufValue>> nested = GgufArrayElements(*f->Find("nested"));
  ASSERT_TRUE(nested.ok());
  ASSERT_EQ(nested->size(), 2u);
  absl::StatusOr<std::vector<GgufValue>> n0 = GgufArrayElements((*nested)[0]);
  ASSERT_TRUE(n0.ok());
  ASSERT_EQ(n0->size(), 2u);
  EXPECT_EQ((*n0)[1].i, 2);
  EXPECT_EQ(GgufArrayElements((*nested)[1])->size(), 0u);

  ASSERT_EQ(f->tensors().size(), 2u);
  const HostTensor b = f->TensorView(f->tensors()[1]);
  EXPECT_EQ(b.shape, (std::vector<int64_t>{2, 1, 32}));
  EXPECT_EQ(b.nbytes, 68);
  EXPECT_EQ(f->tensors()[1].offset % align, 0u);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(b.data), b.nbytes), data_b);
}

INSTANTIATE_TEST_SUITE_P(VersionsAndAlignments, GgufRoundTrip,
                         ::testing::Values(RoundTripCase{2, 0}, RoundTripCase{3, 0},
                                           RoundTripCase{3, 128}, RoundTripCase{2, 8},
                                           RoundTripCase{3, 1}),
                         [](const auto& info) {
                           return absl::StrCat("v", info.param.version, "_align",
                                               info.param.alignment);
                         });

GgufWriter SmallValidFile() {
  GgufWriter w;
  w.Str("general.architecture", "llama")
      .StrArray("list", {"one", "two"})
      .Array<float>("floats", t::kTF32, {1.0f, 2.0f})
      .Tensor("w", t::kGgmlQ4_0, {32, 2}, std::string(36, '\x11'))
      .Tensor("n", t::kGgmlF32, {8}, std::string(32, '\0'));
  return w;
}

TEST(GgufMalformed, EveryTruncationIsAnError) {
  const std::string full = SmallValidFile().Build();
  ASSERT_TRUE(GgufFile::Parse(full).ok());
  for (size_t cut = 0; cut < full.size(); ++cut) {
    absl::StatusOr<GgufFile> f = GgufFile::Parse(full.substr(0, cut), "cut.gguf");
    ASSERT_FALSE(f.ok()) << "a file cut at " << cut << " of " << full.size() << " parsed";
    EXPECT_THAT(std::string(f.status().message()), HasSubstr("cut.gguf: ")) << cut;
  }
  EXPECT_ERROR(GgufFile::Parse(full.substr(0, 30)), "metadata count 3 cannot fit in a file of 30");
  // The data section is at most 31 bytes of padding after the last tensor info, which is 33
  // bytes long: 40 bytes before it is inside that info.
  absl::StatusOr<GgufFile> whole = GgufFile::Parse(full);
  EXPECT_ERROR(GgufFile::Parse(full.substr(0, whole->data_offset() - 40)), "truncated");
  EXPECT_ERROR(GgufFile::Parse(full.substr(0, full.size() - 1)), "extends past the end");
}

TEST(GgufMalformed, HeaderProblems) {
  EXPECT_ERROR(GgufFile::Parse(""), "not a GGUF file");
  EXPECT_ERROR(GgufFile::Parse("GGML" + Le<uint32_t>(3) + Le<uint64_t>(0) + Le<uint64_t>(0)),
               "not a GGUF file");
  EXPECT_ERROR(GgufFile::Parse(GgufWriter(1).Build()), "GGUF version 1 is not supported");
  EXPECT_ERROR(GgufFile::Parse(GgufWriter(99).Build()), "unsupported GGUF version 99");
  EXPECT_ERROR(GgufFile::Parse(GgufWriter(0x03000000).Build()), "big-endian");
  EXPECT_ERROR(GgufFile::Parse(GgufWriter().TensorCount(uint64_t{1} << 40).Build()),
               "tensor count 1099511627776 cannot fit");
  EXPECT_ERROR(GgufFile::Parse(GgufWriter().KvCount(uint64_t{1} << 62).Build()),
               "metadata count 4611686018427387904 cannot fit");
  // A count larger than what follows, but small enough to pass the first check.
  EXPECT_ERROR(GgufFile::Parse(GgufWriter().Str("a", std::string(100, 'x')).KvCount(2).Build()),
               "truncated: metadata key #1 needs 8 bytes");
}

TEST(GgufMalformed, MetadataProblems) {
  auto parse = [](const GgufWriter& w) { return GgufFile::Parse(w.Build(), "md.gguf"); };
  // Key length of 2^60.
  std::string huge_key =
      GgufWriter().KvCount(1).Build() + Le<uint64_t>(uint64_t{1} << 60) + std::string(20, 'k');
  EXPECT_ERROR(GgufFile::Parse(huge_key), "string length 1152921504606846976 exceeds");
  EXPECT_ERROR(parse(GgufWriter().Kv("s", t::kTString, Le<uint64_t>(uint64_t{1} << 60) + "ab")),
               "metadata 's': string length 1152921504606846976");
  EXPECT_ERROR(parse(GgufWriter().Kv("a", t::kTArray,
                                     Le<uint32_t>(t::kTU32) + Le<uint64_t>(uint64_t{1} << 60))),
               "array of 1152921504606846976 uint32 elements cannot fit");
  EXPECT_ERROR(parse(GgufWriter().Kv("a", t::kTArray,
                                     Le<uint32_t>(t::kTString) + Le<uint64_t>(1000) + "xx")),
               "array of 1000 string elements cannot fit");
  EXPECT_ERROR(parse(GgufWriter().Kv("x", 13, Le<uint32_t>(0))), "'x': unknown value type 13");
  EXPECT_ERROR(parse(GgufWriter().Kv("a", t::kTArray, Le<uint32_t>(99) + Le<uint64_t>(0))),
               "unknown array element type 99");
  EXPECT_ERROR(parse(GgufWriter().Kv("b", t::kTBool, Le<uint8_t>(2))), "bool value 2");
  // Found by the fuzzer: an array of bools was accepted whole, and decoding it then failed.
  EXPECT_ERROR(parse(GgufWriter().Array<uint8_t>("bools", t::kTBool, {1, 0, 5})),
               "metadata 'bools': bool array element 2 is 5, neither 0 nor 1");
  EXPECT_ERROR(parse(GgufWriter().U32("k", 1).U32("k", 2)), "duplicate metadata key 'k'");
  // Arrays nested 20 deep.
  std::string nested = Le<uint32_t>(t::kTI8) + Le<uint64_t>(0);
  for (int i = 0; i < 20; ++i) nested = Le<uint32_t>(t::kTArray) + Le<uint64_t>(1) + nested;
  EXPECT_ERROR(parse(GgufWriter().Kv("deep", t::kTArray, nested)), "nested deeper than");
  // general.alignment must be a power of two held in an integer.
  EXPECT_ERROR(parse(GgufWriter().U32("general.alignment", 48)),
               "general.alignment 48 is not a power of two");
  EXPECT_ERROR(parse(GgufWriter().U32("general.alignment", 0)), "is not a power of two");
  EXPECT_ERROR(parse(GgufWriter().Str("general.alignment", "32")), "not an integer");
}

TEST(GgufMalformed, TensorProblems) {
  auto parse = [](const GgufWriter& w) { return GgufFile::Parse(w.Build(), "t.gguf"); };
  const std::string f32x8(32, '\0');
  EXPECT_ERROR(parse(GgufWriter().Tensor("x", 77, {8}, f32x8)), "'x': unknown ggml type id 77");
  EXPECT_ERROR(parse(GgufWriter().Tensor("x", 6, {32}, std::string(22, '\0'))),
               "unsupported ggml type id 6 (Q5_0)");
  EXPECT_ERROR(parse(GgufWriter().Tensor("x", t::kGgmlF32, {}, f32x8)), "0 dimensions");
  EXPECT_ERROR(parse(GgufWriter().Tensor("x", t::kGgmlF32, {1, 1, 1, 1, 8}, f32x8)),
               "5 dimensions (must be 1 to 4)");
  EXPECT_ERROR(parse(GgufWriter().Tensor("x", t::kGgmlF32, {8, 0}, f32x8)),
               "dimension 1 = 0 is zero");
  EXPECT_ERROR(
      parse(GgufWriter().Tensor("x", t::kGgmlF32, {uint64_t{1} << 40, uint64_t{1} << 40}, f32x8)),
      "makes the element count overflow");
  EXPECT_ERROR(parse(GgufWriter().Tensor("x", t::kGgmlF32, {~uint64_t{0}}, f32x8)),
               "makes the element count overflow");
  EXPECT_ERROR(parse(GgufWriter().Tensor("x", t::kGgmlQ4_0, {33}, std::string(36, '\0'))),
               "not a whole number of Q4_0 blocks of 32");
  EXPECT_ERROR(parse(GgufWriter().Tensor("x", t::kGgmlF32, {8}, "", uint64_t{1} << 50)),
               "'x': data [1125899906842624, +32) extends past the end");
  EXPECT_ERROR(parse(GgufWriter().Tensor("x", t::kGgmlF32, {8}, "", ~uint64_t{0} - 31)),
               "extends past the end");
  EXPECT_ERROR(parse(GgufWriter().Tensor("x", t::kGgmlF32, {1 << 20}, f32x8)),
               "extends past the end");
  EXPECT_ERROR(parse(GgufWriter().Tensor("x", t::kGgmlF32, {8}, f32x8, 16)),
               "'x': data offset 16 is not a multiple of the alignment 32");
  EXPECT_ERROR(parse(GgufWriter()
                         .Tensor("a", t::kGgmlF32, {16}, std::string(64, '\0'), 0)
                         .Tensor("b", t::kGgmlF32, {8}, f32x8, 32)),
               "tensors 'a' and 'b' overlap");
  EXPECT_ERROR(
      parse(GgufWriter().Tensor("a", t::kGgmlF32, {8}, f32x8).Tensor("a", t::kGgmlF32, {8}, f32x8)),
      "duplicate tensor name 'a'");
  // Tensor infos but no data section at all.
  std::string no_data = GgufWriter().Tensor("x", t::kGgmlF32, {8}, "").Build();
  EXPECT_ERROR(GgufFile::Parse(no_data), "extends past the end");
}

TEST(GgufOpen, FileErrors) {
  absl::StatusOr<GgufFile> f = GgufFile::Open("/nonexistent/model.gguf");
  EXPECT_EQ(f.status().code(), absl::StatusCode::kNotFound);
  EXPECT_ERROR(f, "/nonexistent/model.gguf");
  EXPECT_ERROR(GgufFile::Open(WriteTemp("")), "file is empty");
  EXPECT_ERROR(GgufFile::Open(t::MakeTempDir()), "not a regular file");
  absl::StatusOr<GgufFile> ok = GgufFile::Open(WriteTemp(SmallValidFile().Build()));
  ASSERT_TRUE(ok.ok()) << ok.status();
  // Tensor views keep the mapping alive after the GgufFile is gone.
  HostTensor n = ok->TensorView(*ok->FindTensor("n"));
  ok = absl::InternalError("dropped");
  EXPECT_EQ(n.data[31], 0);
}

// ---------------------------------------------------------------------------------------------
// The loader, on tiny Llama files built here: 2 layers, d_model 8, 2 query heads and 1 KV head
// of 4, d_ff 16, vocab 6. All tensors F32 zeros.

struct TinySpec {
  std::string arch = "llama";
  int n_heads = 2;
  int n_kv_heads = 1;
  bool with_output = false;
  std::string skip_tensor = "";
  std::string wide_tensor = "";  // gets ne[1] doubled
  std::function<void(GgufWriter&)> extra = nullptr;
  bool with_block_count = true;
  int32_t bos = 0;
  std::vector<float> scores = {};
};

std::string TinyLlama(const TinySpec& s) {
  const uint64_t d = 8, hd = 4, ff = 16, vocab = 6;
  GgufWriter w;
  const std::string p = s.arch + ".";
  w.Str("general.architecture", s.arch).Str("general.name", "tiny");
  if (s.with_block_count) w.U32(p + "block_count", 2);
  w.U32(p + "context_length", 64)
      .U32(p + "embedding_length", d)
      .U32(p + "feed_forward_length", ff)
      .U32(p + "attention.head_count", s.n_heads)
      .U32(p + "attention.head_count_kv", s.n_kv_heads)
      .F32(p + "attention.layer_norm_rms_epsilon", 1e-6f)
      .Str("tokenizer.ggml.model", "llama")
      .StrArray("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "a", "b", "c"})
      .I32("tokenizer.ggml.bos_token_id", s.bos);
  if (!s.scores.empty()) w.Array<float>("tokenizer.ggml.scores", t::kTF32, s.scores);
  if (s.extra) s.extra(w);
  auto add = [&](const std::string& name, std::vector<uint64_t> ne) {
    if (name == s.skip_tensor) return;
    if (name == s.wide_tensor) ne[1] *= 2;
    uint64_t n = 1;
    for (uint64_t x : ne) n *= x;
    w.Tensor(name, t::kGgmlF32, ne, std::string(4 * n, '\0'));
  };
  const uint64_t q = s.n_heads * hd, kv = s.n_kv_heads * hd;
  add("token_embd.weight", {d, vocab});
  add("output_norm.weight", {d});
  if (s.with_output) add("output.weight", {d, vocab});
  for (int l = 0; l < 2; ++l) {
    const std::string b = "blk." + std::to_string(l) + ".";
    add(b + "attn_norm.weight", {d});
    add(b + "attn_q.weight", {d, q});
    add(b + "attn_k.weight", {d, kv});
    add(b + "attn_v.weight", {d, kv});
    add(b + "attn_output.weight", {q, d});
    add(b + "ffn_norm.weight", {d});
    add(b + "ffn_gate.weight", {d, ff});
    add(b + "ffn_up.weight", {d, ff});
    add(b + "ffn_down.weight", {ff, d});
  }
  return w.Build();
}

absl::StatusOr<ModelFile> LoadTiny(const TinySpec& s) {
  return LoadGgufModel(WriteTemp(TinyLlama(s)));
}

TEST(GgufLoader, TinyModelDefaults) {
  absl::StatusOr<ModelFile> m = LoadTiny({});
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->config.head_dim, 4);    // d_model / n_heads without rope.dimension_count
  EXPECT_EQ(m->config.vocab_size, 6);  // the token count without llama.vocab_size
  EXPECT_EQ(m->config.rope_theta, 10000.0);
  EXPECT_TRUE(m->config.tied_embeddings);
  EXPECT_EQ(m->tensors.at("blk.1.ffn_down.weight").shape, (std::vector<int64_t>{8, 16}));
  // SentencePiece-style vocabularies default to BOS and a space prefix, as in llama.cpp.
  EXPECT_TRUE(m->tokenizer.gguf.add_bos);
  EXPECT_TRUE(m->tokenizer.gguf.add_space_prefix);
  EXPECT_TRUE(m->chat_template.empty());
}

TEST(GgufLoader, UntiedOutputAndMistral) {
  absl::StatusOr<ModelFile> m = LoadTiny({.with_output = true});
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_FALSE(m->config.tied_embeddings);
  m = LoadTiny({.arch = "mistral"});
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->config.architecture, "mistral");
}

TEST(GgufLoader, RopeScaling) {
  absl::StatusOr<ModelFile> m = LoadTiny({.extra = [](GgufWriter& w) {
    w.Str("llama.rope.scaling.type", "linear")
        .F32("llama.rope.scaling.factor", 4.0f)
        .U32("llama.rope.scaling.original_context_length", 16)
        .F32("llama.rope.freq_base", 500000.0f);
  }});
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->config.rope_scaling.type, RopeScaling::Type::kLinear);
  EXPECT_EQ(m->config.rope_scaling.factor, 4.0);
  EXPECT_EQ(m->config.rope_scaling.original_max_position, 16);
  EXPECT_EQ(m->config.rope_theta, 500000.0);
  m = LoadTiny({.extra = [](GgufWriter& w) { w.F32("llama.rope.scale_linear", 2.0f); }});
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->config.rope_scaling.factor, 2.0);
  m = LoadTiny({.extra = [](GgufWriter& w) { w.Str("llama.rope.scaling.type", "yarn"); }});
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_ERROR(m, "rope.scaling.type 'yarn' is not supported");
  m = LoadTiny({.extra = [](GgufWriter& w) {
    w.U32("llama.rope.dimension_count", 2).U32("llama.attention.key_length", 4);
  }});
  EXPECT_ERROR(m, "partial RoPE is not supported");
}

TEST(GgufLoader, Errors) {
  EXPECT_ERROR(LoadTiny({.arch = "gpt2"}), "architecture 'gpt2' is not supported");
  EXPECT_ERROR(LoadTiny({.with_block_count = false}), "'llama.block_count' is missing");
  EXPECT_ERROR(LoadTiny({.skip_tensor = "blk.1.ffn_down.weight"}),
               "missing tensor 'blk.1.ffn_down.weight'");
  EXPECT_ERROR(LoadTiny({.skip_tensor = "token_embd.weight"}),
               "missing tensor 'token_embd.weight'");
  EXPECT_ERROR(LoadTiny({.wide_tensor = "blk.0.attn_k.weight"}),
               "tensor 'blk.0.attn_k.weight' has shape [8, 8], expected [4, 8]");
  EXPECT_ERROR(LoadTiny({.wide_tensor = "token_embd.weight"}),
               "tensor 'token_embd.weight' has shape [12, 8], expected [6, 8]");
  EXPECT_ERROR(LoadTiny({.n_heads = 3, .n_kv_heads = 2}), "not a multiple of n_kv_heads 2");
  EXPECT_ERROR(LoadTiny({.bos = 99}), "bos_token_id = 99 is not a token id (6 tokens)");
  EXPECT_ERROR(LoadTiny({.scores = {1.0f, 2.0f}}), "scores has 2 entries for 6 tokens");
  EXPECT_ERROR(LoadTiny({.extra =
                             [](GgufWriter& w) {
                               w.Kv("llama.embedding_length", t::kTU64,
                                    Le<uint64_t>(uint64_t{1} << 40));
                             }}),
               "duplicate metadata key");
  EXPECT_ERROR(LoadTiny({.extra =
                             [](GgufWriter& w) {
                               w.Kv("llama.vocab_size", t::kTU64, Le<uint64_t>(uint64_t{1} << 40));
                             }}),
               "'llama.vocab_size' = 1099511627776 is out of range");
  EXPECT_ERROR(LoadTiny({.extra = [](GgufWriter& w) { w.U32("llama.vocab_size", 7); }}),
               "tensor 'token_embd.weight' has shape [6, 8], expected [7, 8]");
  const std::string rope_freqs(4 * 2, '\0');
  EXPECT_ERROR(LoadTiny({.extra =
                             [&](GgufWriter& w) {
                               w.Tensor("rope_freqs.weight", t::kGgmlF32, {2}, rope_freqs);
                             }}),
               "rope_freqs.weight");
}

TEST(ModelFile, LoadModelDispatch) {
  absl::StatusOr<ModelFile> m = LoadModel(WriteTemp(TinyLlama({}), "tiny.bin"));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->config.n_layers, 2);
  EXPECT_ERROR(LoadModel(WriteTemp("{\"not\": \"a model\"}", "x.json")),
               "supported are GGUF files and Hugging Face checkpoint directories");
  EXPECT_ERROR(LoadModel(WriteTemp("GG", "short")), "unrecognised model format");
  EXPECT_EQ(LoadModel("/nonexistent/path").status().code(), absl::StatusCode::kNotFound);
  // A directory goes to the Hugging Face loader, which finds no config.json in an empty one.
  EXPECT_FALSE(LoadModel(t::MakeTempDir()).ok());
}

ModelConfig GoodConfig() {
  ModelConfig c;
  c.n_layers = 2;
  c.d_model = 64;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.d_ff = 128;
  c.vocab_size = 100;
  c.max_context = 512;
  return c;
}

TEST(ModelFile, ValidateConfig) {
  EXPECT_TRUE(ValidateConfig(GoodConfig()).ok());
  auto with = [](auto mutate) {
    ModelConfig c = GoodConfig();
    mutate(c);
    return ValidateConfig(c);
  };
  EXPECT_ERROR(with([](ModelConfig& c) { c.n_layers = 0; }), "n_layers = 0 is outside 1..1024");
  EXPECT_ERROR(with([](ModelConfig& c) { c.n_layers = 2000; }), "n_layers = 2000");
  EXPECT_ERROR(with([](ModelConfig& c) { c.d_model = 100000; }), "d_model = 100000");
  EXPECT_ERROR(with([](ModelConfig& c) { c.n_kv_heads = -1; }), "n_kv_heads = -1");
  EXPECT_ERROR(with([](ModelConfig& c) { c.vocab_size = 5 << 20; }), "vocab_size = 5242880");
  EXPECT_ERROR(with([](ModelConfig& c) { c.max_context = int64_t{1} << 25; }), "max_context");
  EXPECT_ERROR(with([](ModelConfig& c) { c.n_kv_heads = 3; }), "not a multiple of n_kv_heads 3");
  EXPECT_ERROR(with([](ModelConfig& c) { c.head_dim = 15; }), "head_dim = 15 is odd");
  EXPECT_ERROR(with([](ModelConfig& c) { c.rms_eps = 0.0f; }), "rms_eps");
  EXPECT_ERROR(with([](ModelConfig& c) { c.rope_theta = NAN; }), "rope_theta");
  EXPECT_ERROR(with([](ModelConfig& c) {
                 c.rope_scaling.type = RopeScaling::Type::kLinear;
                 c.rope_scaling.factor = 0.0;
               }),
               "rope_scaling.factor");
  EXPECT_ERROR(with([](ModelConfig& c) {
                 c.rope_scaling.type = RopeScaling::Type::kLlama3;
                 c.rope_scaling.factor = 8.0;
                 c.rope_scaling.high_freq_factor = 0.5;
               }),
               "high_freq_factor");
}

// ---------------------------------------------------------------------------------------------
// The default model.

TEST(DefaultModel, ConfigAndTokenizer) {
  const std::string path = t::DefaultModelPath();
  if (!t::FileExists(path)) GTEST_SKIP() << "default model not found at " << path;
  absl::StatusOr<ModelFile> m = LoadModel(path);
  ASSERT_TRUE(m.ok()) << m.status();
  const ModelConfig& c = m->config;
  EXPECT_EQ(c.architecture, "llama");
  EXPECT_EQ(c.n_layers, 30);
  EXPECT_EQ(c.d_model, 576);
  EXPECT_EQ(c.n_heads, 9);
  EXPECT_EQ(c.n_kv_heads, 3);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.d_ff, 1536);
  EXPECT_EQ(c.vocab_size, 49152);
  EXPECT_EQ(c.max_context, 8192);
  EXPECT_EQ(c.rope_theta, 100000.0);
  EXPECT_FLOAT_EQ(c.rms_eps, 1e-5f);
  EXPECT_TRUE(c.tied_embeddings);
  EXPECT_EQ(c.rope_layout, RopeLayout::kInterleaved);
  EXPECT_EQ(m->tensors.size(), 272u);
  EXPECT_EQ(m->tensors.at("token_embd.weight").dtype, DType::kQ8_0);
  EXPECT_EQ(m->tensors.at("blk.0.attn_q.weight").dtype, DType::kQ4_1);
  EXPECT_EQ(m->tensors.at("blk.0.attn_norm.weight").dtype, DType::kF32);
  const GgufTokenizerData& tok = m->tokenizer.gguf;
  EXPECT_EQ(tok.model, "gpt2");
  EXPECT_EQ(tok.pre, "smollm");
  EXPECT_EQ(tok.tokens.size(), 49152u);
  EXPECT_EQ(tok.merges.size(), 48900u);
  EXPECT_EQ(tok.token_types.size(), 49152u);
  EXPECT_EQ(tok.tokens[1], "<|im_start|>");
  EXPECT_EQ(tok.bos_id, 1);
  EXPECT_EQ(tok.eos_id, 2);
  EXPECT_FALSE(tok.add_bos);
  EXPECT_FALSE(m->chat_template.empty());

  // The first row of each weight decodes to finite, not-all-zero values.
  for (const char* name : {"token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight"}) {
    const HostTensor& h = m->tensors.at(name);
    std::vector<float> row(h.shape.back());
    ASSERT_TRUE(DequantizeRow(h.dtype, h.data, h.shape.back(), row.data()).ok());
    double sum = 0;
    for (float v : row) {
      ASSERT_TRUE(std::isfinite(v)) << name;
      sum += std::fabs(v);
    }
    EXPECT_GT(sum, 0.0) << name;
  }
}

}  // namespace
}  // namespace moa
