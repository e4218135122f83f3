// The gRPC server end to end, in-process on 127.0.0.1 with a picked port: request validation
// (as functions and over real RPCs), streaming, tokenization, model info, health, reflection,
// and the life cycle (cancel, abort, deadline, full queue, drain) with the per-call state count
// and the engine's idle invariant checked after each.
//
// Most tests use the tiny random model (tests/tools/make_tiny_model.py); the life-cycle tests
// need generations that last long enough to be interrupted and use the default model (skipped
// when it is absent).
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "google/protobuf/unknown_field_set.h"
#include "gtest/gtest.h"
#include "moa/v1/moa.grpc.pb.h"
#include "server/moa_server.h"
#include "server/request_validation.h"
#include "tests/test_util.h"

namespace moa {
namespace {

constexpr int kTinyVocab = 300;
constexpr int kTinyContext = 128;

std::string TinyModelPath() { return testing::GeneratedDataDir() + "/tiny/model-f32.gguf"; }

// Waits up to `limit` for `pred`.
bool WaitFor(const std::function<bool()>& pred, absl::Duration limit = absl::Seconds(10)) {
  const absl::Time end = absl::Now() + limit;
  while (absl::Now() < end) {
    if (pred()) return true;
    absl::SleepFor(absl::Milliseconds(2));
  }
  return pred();
}

v1::GenerateRequest ValidRequest() {
  v1::GenerateRequest r;
  r.mutable_token_ids()->add_ids(1);
  r.mutable_token_ids()->add_ids(72);
  r.mutable_token_ids()->add_ids(101);
  r.set_max_tokens(4);
  return r;
}

// ---------------------------------------------------------------------------------------------
// The validation table: each case breaks one thing of a valid request.

struct BadCase {
  std::string name;
  std::function<void(v1::GenerateRequest*)> mutate;
  std::string expected;  // a part of the error message
};

std::vector<BadCase> BadCases() {
  const std::string bad_utf8 = "ab\xC3\x28zz";  // a lead byte without its continuation
  return {
      {"no_input", [](v1::GenerateRequest* r) { r->clear_input(); }, "no input"},
      {"empty_text", [](v1::GenerateRequest* r) { r->set_text(""); }, "text is empty"},
      {"empty_token_ids", [](v1::GenerateRequest* r) { r->mutable_token_ids()->clear_ids(); },
       "token_ids is empty"},
      {"prompt_longer_than_context",
       [](v1::GenerateRequest* r) {
         for (int i = 0; i < kTinyContext + 5; ++i) r->mutable_token_ids()->add_ids(65);
       },
       "the context holds 128"},
      {"prompt_fills_context",
       [](v1::GenerateRequest* r) {
         r->mutable_token_ids()->clear_ids();
         for (int i = 0; i < kTinyContext; ++i) r->mutable_token_ids()->add_ids(65);
         r->clear_max_tokens();
       },
       "no room to generate"},
      {"max_tokens_zero", [](v1::GenerateRequest* r) { r->set_max_tokens(0); }, "max_tokens"},
      {"max_tokens_negative", [](v1::GenerateRequest* r) { r->set_max_tokens(-3); }, "max_tokens"},
      {"max_tokens_huge", [](v1::GenerateRequest* r) { r->set_max_tokens(1 << 30); },
       "max_tokens must be in [1, 128]"},
      {"prompt_plus_max_tokens_over_context",
       [](v1::GenerateRequest* r) { r->set_max_tokens(kTinyContext); },
       "exceed the context length"},
      {"negative_temperature",
       [](v1::GenerateRequest* r) { r->mutable_sampling()->set_temperature(-0.5f); },
       "temperature"},
      {"top_p_zero", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_top_p(0.0f); },
       "top_p must be in (0, 1]"},
      {"top_p_above_one", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_top_p(1.5f); },
       "top_p must be in (0, 1]"},
      {"top_k_negative", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_top_k(-1); },
       "top_k"},
      {"min_p_one", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_min_p(1.0f); },
       "min_p"},
      {"repetition_penalty_zero",
       [](v1::GenerateRequest* r) { r->mutable_sampling()->set_repetition_penalty(0.0f); },
       "repetition_penalty"},
      {"presence_penalty_large",
       [](v1::GenerateRequest* r) { r->mutable_sampling()->set_presence_penalty(3.0f); },
       "presence_penalty"},
      {"unknown_token_id", [](v1::GenerateRequest* r) { r->mutable_token_ids()->add_ids(300); },
       "token_ids.ids[3] = 300 is not a token id"},
      {"negative_token_id", [](v1::GenerateRequest* r) { r->mutable_token_ids()->set_ids(0, -1); },
       "is not a token id"},
      {"invalid_utf8_text", [bad_utf8](v1::GenerateRequest* r) { r->set_text(bad_utf8); },
       "text is not valid UTF-8"},
      {"invalid_utf8_stop", [bad_utf8](v1::GenerateRequest* r) { r->add_stop(bad_utf8); },
       "stop[0] is not valid UTF-8"},
      {"invalid_utf8_chat",
       [bad_utf8](v1::GenerateRequest* r) {
         v1::ChatMessage* m = r->mutable_chat()->add_messages();
         m->set_role("user");
         m->set_content(bad_utf8);
       },
       "chat.messages[0].content is not valid UTF-8"},
      {"too_many_stops",
       [](v1::GenerateRequest* r) {
         for (int i = 0; i < 17; ++i) r->add_stop(absl::StrCat("s", i));
       },
       "stop has 17 strings, at most 16"},
      {"stop_too_long", [](v1::GenerateRequest* r) { r->add_stop(std::string(300, 'x')); },
       "stop[0] has 300 bytes"},
      {"empty_stop", [](v1::GenerateRequest* r) { r->add_stop(""); }, "stop[0] is empty"},
      {"stop_token_unknown", [](v1::GenerateRequest* r) { r->add_stop_token_ids(kTinyVocab); },
       "stop_token_ids[0] = 300"},
      {"text_too_large",
       [](v1::GenerateRequest* r) { r->set_text(std::string((1 << 20) + 1, 'a')); },
       "at most 1048576"},
      {"unknown_role",
       [](v1::GenerateRequest* r) {
         v1::ChatMessage* m = r->mutable_chat()->add_messages();
         m->set_role("wizard");
         m->set_content("hi");
       },
       "role 'wizard' is unknown"},
      {"no_chat_messages", [](v1::GenerateRequest* r) { r->mutable_chat(); },
       "chat has no messages"},
      {"top_logprobs_too_many", [](v1::GenerateRequest* r) { r->set_top_logprobs(21); },
       "top_logprobs must be in [0, 20]"},
  };
}

ValidationLimits TinyLimits() {
  ValidationLimits l;
  l.vocab_size = kTinyVocab;
  l.context_length = kTinyContext;
  return l;
}

// The checks as functions: token ids stand for themselves, text for one token per byte.
absl::Status ValidateAsFunctions(const v1::GenerateRequest& r) {
  const ValidationLimits l = TinyLimits();
  if (absl::Status s = ValidateGenerateRequest(r, l); !s.ok()) return s;
  std::vector<int32_t> prompt;
  if (r.has_token_ids()) prompt.assign(r.token_ids().ids().begin(), r.token_ids().ids().end());
  if (r.has_text()) prompt.assign(r.text().size(), 65);
  if (r.has_chat()) prompt.assign(8, 65);
  return MakeGenerationRequest(r, prompt, l).status();
}

TEST(RequestValidationTest, TableOfBadRequests) {
  ASSERT_TRUE(ValidateAsFunctions(ValidRequest()).ok());
  for (const BadCase& c : BadCases()) {
    v1::GenerateRequest r = ValidRequest();
    c.mutate(&r);
    const absl::Status s = ValidateAsFunctions(r);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.name << ": " << s;
    EXPECT_NE(s.message().find(c.expected), std::string::npos)
        << c.name << ": '" << s.message() << "' lacks '" << c.expected << "'";
  }
}

TEST(RequestValidationTest, DefaultsAndResolvedMaxTokens) {
  v1::GenerateRequest r = ValidRequest();
  r.clear_max_tokens();
  r.add_stop("\n\n");
  r.add_stop_token_ids(5);
  r.set_top_logprobs(3);
  r.mutable_sampling()->set_temperature(0.7f);
  absl::StatusOr<GenerationRequest> g = MakeGenerationRequest(r, {1, 2, 3}, TinyLimits());
  ASSERT_TRUE(g.ok()) << g.status();
  // Unset max_tokens: the default 256 capped by the room the 3-token prompt leaves.
  EXPECT_EQ(g->max_tokens, kTinyContext - 3);
  EXPECT_FLOAT_EQ(g->sampling.top_p, 1.0f);
  EXPECT_FLOAT_EQ(g->sampling.repetition_penalty, 1.0f);
  EXPECT_FLOAT_EQ(g->sampling.temperature, 0.7f);
  EXPECT_EQ(g->stop_strings, std::vector<std::string>{"\n\n"});
  EXPECT_EQ(g->stop_token_ids, std::vector<int32_t>{5});
  EXPECT_EQ(g->top_logprobs, 3);
  EXPECT_TRUE(IsValidUtf8("h\xC3\xA9llo \xF0\x9F\x98\x80"));
  EXPECT_FALSE(IsValidUtf8("\xED\xA0\x80"));  // a UTF-16 surrogate
  EXPECT_FALSE(IsValidUtf8("\xC0\xAF"));      // overlong
}

// ---------------------------------------------------------------------------------------------
// A server in-process.

struct Generation {
  grpc::Status status;
  std::vector<v1::GenerateResponse> messages;
  std::string text;  // the text deltas concatenated
  std::vector<int32_t> tokens;
  const v1::GenerateResponse* last() const { return messages.empty() ? nullptr : &messages.back(); }
};

class ServerFixture : public ::testing::Test {
 protected:
  void StartServer(const std::string& model, EngineOptions engine = {}, std::string plan = "") {
    ServerOptions o;
    o.model_path = model;
    o.plan_path = std::move(plan);
    o.host = "127.0.0.1";
    o.port = 0;
    o.metrics_port = -1;
    o.threads = 2;
    o.engine = engine;
    absl::StatusOr<std::unique_ptr<MoaServer>> s = MoaServer::Start(o);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = *std::move(s);
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server_->port()),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::MoaService::NewStub(channel_);
  }

  void TearDown() override {
    if (server_ == nullptr) return;
    server_->Drain(absl::ZeroDuration());
    const CallStateCounts c = server_->call_states();
    EXPECT_EQ(c.created, c.released) << "per-call states leaked";
    EXPECT_TRUE(server_->engine().CheckIdle().ok()) << server_->engine().CheckIdle();
  }

  Generation Generate(const v1::GenerateRequest& req, grpc::ClientContext* ctx = nullptr) {
    grpc::ClientContext local;
    if (ctx == nullptr) ctx = &local;
    Generation g;
    auto reader = stub_->Generate(ctx, req);
    v1::GenerateResponse m;
    while (reader->Read(&m)) {
      g.text += m.text();
      g.tokens.insert(g.tokens.end(), m.token_ids().begin(), m.token_ids().end());
      g.messages.push_back(m);
    }
    g.status = reader->Finish();
    return g;
  }

  // Every Generate call released and the engine idle, within a few seconds.
  void ExpectAllReleased() {
    EXPECT_TRUE(WaitFor([&] {
      const CallStateCounts c = server_->call_states();
      return c.created == c.released && server_->engine().CheckIdle().ok();
    })) << "calls created "
        << server_->call_states().created << ", released " << server_->call_states().released
        << "; engine: " << server_->engine().CheckIdle();
  }

  std::unique_ptr<MoaServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::MoaService::Stub> stub_;
};

class TinyServerTest : public ServerFixture {
 protected:
  void SetUp() override {
    ASSERT_TRUE(testing::FileExists(TinyModelPath()))
        << TinyModelPath() << " is missing: run .venv/bin/python tests/tools/make_tiny_model.py";
    StartServer(TinyModelPath());
  }
};

TEST_F(TinyServerTest, BadRequestsGetInvalidArgumentAndTheNextOneIsServed) {
  for (const BadCase& c : BadCases()) {
    v1::GenerateRequest r = ValidRequest();
    c.mutate(&r);
    const Generation bad = Generate(r);
    EXPECT_EQ(bad.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << c.name << ": " << bad.status.error_message();
    EXPECT_NE(bad.status.error_message().find(c.expected), std::string::npos)
        << c.name << ": '" << bad.status.error_message() << "' lacks '" << c.expected << "'";
    EXPECT_TRUE(bad.messages.empty()) << c.name;
    const Generation good = Generate(ValidRequest());
    ASSERT_TRUE(good.status.ok()) << c.name << " then: " << good.status.error_message();
    EXPECT_EQ(good.last()->generated_tokens(), 4);
  }
  // Text that tokenizes to more than the context, found only after tokenization.
  v1::GenerateRequest r;
  r.set_text(std::string(3000, 'q'));
  const Generation bad = Generate(r);
  EXPECT_EQ(bad.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(bad.status.error_message().find("the context holds 128"), std::string::npos)
      << bad.status.error_message();
  // A message over the gRPC receive limit (4 MiB) is refused by the transport.
  r.set_text(std::string(5 << 20, 'a'));
  EXPECT_EQ(Generate(r).status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_TRUE(Generate(ValidRequest()).status.ok());
  ExpectAllReleased();
}

TEST_F(TinyServerTest, StreamCarriesIdTokensAndFinalStats) {
  v1::GenerateRequest r = ValidRequest();
  r.set_max_tokens(24);
  r.set_ignore_eos(true);
  r.set_top_logprobs(2);
  const Generation g = Generate(r);
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  ASSERT_GE(g.messages.size(), 2u);
  // First message: the request id and nothing else.
  const v1::GenerateResponse& first = g.messages.front();
  EXPECT_GT(first.request_id(), 0);
  EXPECT_TRUE(first.token_ids().empty());
  EXPECT_TRUE(first.text().empty());
  // Only the last carries a finish reason.
  for (size_t i = 0; i + 1 < g.messages.size(); ++i) {
    EXPECT_EQ(g.messages[i].finish_reason(), v1::FINISH_REASON_UNSPECIFIED);
    EXPECT_EQ(g.messages[i].logprobs_size(), g.messages[i].token_ids_size());
    for (const v1::TokenLogprob& lp : g.messages[i].logprobs()) {
      EXPECT_LE(lp.logprob(), 0.0f);
      EXPECT_EQ(lp.top_size(), 2);
    }
  }
  const v1::GenerateResponse& last = *g.last();
  EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(last.prompt_tokens(), 3);
  EXPECT_EQ(last.generated_tokens(), 24);
  EXPECT_EQ(g.tokens.size(), 24u);
  EXPECT_GE(last.timings().total_seconds(), last.timings().ttft_seconds());
  EXPECT_GE(last.timings().ttft_seconds(), last.timings().queued_seconds());
  EXPECT_GT(last.timings().total_seconds(), 0.0);

  // Streamed text equals the text of all tokens at once, and greedy output repeats exactly.
  v1::DetokenizeRequest d;
  d.mutable_token_ids()->Add(g.tokens.begin(), g.tokens.end());
  v1::DetokenizeResponse dr;
  grpc::ClientContext ctx;
  ASSERT_TRUE(stub_->Detokenize(&ctx, d, &dr).ok());
  EXPECT_EQ(g.text, dr.text());
  const Generation again = Generate(r);
  EXPECT_EQ(again.tokens, g.tokens);
  EXPECT_EQ(again.text, g.text);
  EXPECT_NE(again.messages.front().request_id(), first.request_id());
}

TEST_F(TinyServerTest, StopStringEndsGenerationWithoutSendingIt) {
  v1::GenerateRequest r = ValidRequest();
  r.set_max_tokens(40);
  r.set_ignore_eos(true);
  const Generation full = Generate(r);
  ASSERT_TRUE(full.status.ok());
  ASSERT_GE(full.text.size(), 8u);
  // A stop string taken from the middle of the greedy output.
  const std::string stop = full.text.substr(4, 3);
  r.add_stop(stop);
  const Generation stopped = Generate(r);
  ASSERT_TRUE(stopped.status.ok()) << stopped.status.error_message();
  EXPECT_EQ(stopped.last()->finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(stopped.last()->stop_matched(), stop);
  EXPECT_EQ(stopped.text, full.text.substr(0, full.text.find(stop)));
}

TEST_F(TinyServerTest, TokenizeDetokenizeRoundTrip) {
  v1::TokenizeRequest t;
  t.set_text("Hello, world! h\xC3\xA9llo");
  v1::TokenizeResponse tr;
  grpc::ClientContext c1;
  ASSERT_TRUE(stub_->Tokenize(&c1, t, &tr).ok());
  ASSERT_FALSE(tr.token_ids().empty());
  v1::DetokenizeRequest d;
  *d.mutable_token_ids() = tr.token_ids();
  v1::DetokenizeResponse dr;
  grpc::ClientContext c2;
  ASSERT_TRUE(stub_->Detokenize(&c2, d, &dr).ok());
  EXPECT_EQ(dr.text(), t.text());

  // Bad input to both is INVALID_ARGUMENT.
  d.add_token_ids(kTinyVocab);
  grpc::ClientContext c3;
  const grpc::Status s3 = stub_->Detokenize(&c3, d, &dr);
  EXPECT_EQ(s3.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  t.set_text("\xFF");
  grpc::ClientContext c4;
  EXPECT_EQ(stub_->Tokenize(&c4, t, &tr).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(TinyServerTest, ModelInfoWithoutPlan) {
  v1::GetModelInfoResponse info;
  grpc::ClientContext ctx;
  ASSERT_TRUE(stub_->GetModelInfo(&ctx, {}, &info).ok());
  EXPECT_EQ(info.architecture(), "llama");
  EXPECT_EQ(info.n_layers(), 2);
  EXPECT_EQ(info.d_model(), 64);
  EXPECT_EQ(info.n_heads(), 4);
  EXPECT_EQ(info.n_kv_heads(), 2);
  EXPECT_EQ(info.head_dim(), 16);
  EXPECT_EQ(info.vocab_size(), kTinyVocab);
  EXPECT_EQ(info.context_length(), kTinyContext);
  EXPECT_FALSE(info.plan().loaded());
  // K and V of every (layer, KV head), at least one byte per element.
  EXPECT_GE(info.kv_bytes_per_token_dense(), 2 * 2 * 16 * 2);
  EXPECT_DOUBLE_EQ(info.kv_bytes_per_token_plan(),
                   static_cast<double>(info.kv_bytes_per_token_dense()));
}

TEST_F(TinyServerTest, AbortOfUnknownIdIsNotFound) {
  v1::AbortRequest a;
  a.set_request_id(123456);
  v1::AbortResponse ar;
  grpc::ClientContext ctx;
  EXPECT_EQ(stub_->Abort(&ctx, a, &ar).error_code(), grpc::StatusCode::NOT_FOUND);
}

// Health and reflection through the generic stub: their generated code is not installed, so
// requests are written in the wire format and responses read as unknown fields.
std::string Bytes(const grpc::ByteBuffer& b) {
  std::vector<grpc::Slice> slices;
  (void)b.Dump(&slices);
  std::string out;
  for (const grpc::Slice& s : slices)
    out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

grpc::ByteBuffer Buffer(const std::string& s) {
  grpc::Slice slice(s);
  return grpc::ByteBuffer(&slice, 1);
}

// grpc.health.v1.Health/Check: 1 SERVING, 2 NOT_SERVING; -1 when the call fails.
int HealthStatus(grpc::Channel* channel, const std::string& service) {
  grpc::GenericStub stub(channel->shared_from_this());
  std::string req;
  if (!service.empty()) req = std::string("\x0a", 1) + static_cast<char>(service.size()) + service;
  const grpc::ByteBuffer request = Buffer(req);
  grpc::ByteBuffer response;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  absl::Notification done;
  grpc::Status status;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&](grpc::Status s) {
                   status = std::move(s);
                   done.Notify();
                 });
  done.WaitForNotification();
  if (!status.ok()) return -1;
  google::protobuf::UnknownFieldSet fields;
  if (!fields.ParseFromString(Bytes(response))) return -1;
  for (int i = 0; i < fields.field_count(); ++i) {
    if (fields.field(i).number() == 1) return static_cast<int>(fields.field(i).varint());
  }
  return 0;  // UNKNOWN is the default value, not sent
}

TEST_F(TinyServerTest, HealthIsServing) {
  EXPECT_EQ(HealthStatus(channel_.get(), ""), 1);
  EXPECT_EQ(HealthStatus(channel_.get(), "moa.v1.MoaService"), 1);
}

TEST_F(TinyServerTest, ReflectionListsTheService) {
  grpc::GenericStub stub(channel_);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  auto call =
      stub.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  void* tag;
  bool ok;
  auto step = [&](intptr_t t) {
    EXPECT_TRUE(cq.Next(&tag, &ok));
    EXPECT_EQ(reinterpret_cast<intptr_t>(tag), t);
    return ok;
  };
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(step(1));
  // ServerReflectionRequest{list_services (7): ""}
  call->Write(Buffer(std::string("\x3a\x00", 2)), reinterpret_cast<void*>(2));
  ASSERT_TRUE(step(2));
  grpc::ByteBuffer response;
  call->Read(&response, reinterpret_cast<void*>(3));
  ASSERT_TRUE(step(3));
  call->WritesDone(reinterpret_cast<void*>(4));
  step(4);
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  step(5);
  EXPECT_TRUE(status.ok()) << status.error_message();

  // ServerReflectionResponse{list_services_response (6): {service (1): {name (1)}}}
  google::protobuf::UnknownFieldSet fields;
  ASSERT_TRUE(fields.ParseFromString(Bytes(response)));
  std::vector<std::string> names;
  for (int i = 0; i < fields.field_count(); ++i) {
    if (fields.field(i).number() != 6) continue;
    google::protobuf::UnknownFieldSet list;
    ASSERT_TRUE(list.ParseFromString(fields.field(i).length_delimited()));
    for (int j = 0; j < list.field_count(); ++j) {
      google::protobuf::UnknownFieldSet service;
      ASSERT_TRUE(service.ParseFromString(list.field(j).length_delimited()));
      names.push_back(service.field(0).length_delimited());
    }
  }
  EXPECT_NE(std::find(names.begin(), names.end(), "moa.v1.MoaService"), names.end());
  EXPECT_NE(std::find(names.begin(), names.end(), "grpc.health.v1.Health"), names.end());
}

TEST_F(TinyServerTest, DrainLetsShortRequestsFinishAndBalancesStates) {
  // Several streams in flight, then a drain with time enough for them: all finish normally.
  std::vector<std::thread> clients;
  std::atomic<int> admitted{0}, ok{0};
  for (int i = 0; i < 6; ++i) {
    clients.emplace_back([&] {
      v1::GenerateRequest r = ValidRequest();
      r.set_max_tokens(60);
      r.set_ignore_eos(true);
      grpc::ClientContext ctx;
      auto reader = stub_->Generate(&ctx, r);
      v1::GenerateResponse m;
      // The first message (the request id) comes once the engine has queued the request.
      if (reader->Read(&m)) ++admitted;
      while (reader->Read(&m)) {
      }
      if (reader->Finish().ok()) ++ok;
    });
  }
  // Drain only once all six are in the engine: a call still on its way in would be refused.
  ASSERT_TRUE(WaitFor([&] { return admitted.load() == 6; }));
  server_->Drain(absl::Seconds(30));
  for (std::thread& t : clients) t.join();
  EXPECT_EQ(ok.load(), 6);
  // gRPC releases a call's state just after its client has seen the status.
  EXPECT_TRUE(WaitFor([&] { return server_->call_states().released == 6; }));
  const CallStateCounts c = server_->call_states();
  EXPECT_EQ(c.created, 6);
  EXPECT_EQ(c.released, 6);
  EXPECT_TRUE(server_->engine().CheckIdle().ok());
}

TEST(ServerStartTest, UnusableModelOrPlanIsAClearError) {
  ServerOptions o;
  o.model_path = "/nonexistent/model.gguf";
  o.port = 0;
  o.metrics_port = -1;
  absl::StatusOr<std::unique_ptr<MoaServer>> s = MoaServer::Start(o);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("/nonexistent/model.gguf"), std::string::npos) << s.status();

  const std::string dir = testing::MakeTempDir();
  std::ofstream(dir + "/plan.json") << R"({"alphas": [[1]], "betas": [[0.5]]})";
  o.model_path = TinyModelPath();
  o.plan_path = dir + "/plan.json";
  s = MoaServer::Start(o);
  ASSERT_FALSE(s.ok());
}

TEST(ServerStartTest, ModelInfoReportsThePlan) {
  ASSERT_TRUE(testing::FileExists(TinyModelPath()));
  const std::string dir = testing::MakeTempDir();
  const std::string plan = dir + "/plan.json";
  // 2 layers x 2 KV heads; the tiny context (128) leaves room for small sink and block sizes.
  std::ofstream(plan) << R"({"format": "moa-plan", "version": 1, "sink": 16, "block_size": 16,
    "model": {"name": "tiny", "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
    "rules": [[{"alpha": 32, "beta": 0.0}, {"dense": true}],
              [{"alpha": 16, "beta": 0.25}, {"alpha": 48, "beta": 0.0}]]})";
  ServerOptions o;
  o.model_path = TinyModelPath();
  o.plan_path = plan;
  o.host = "127.0.0.1";
  o.port = 0;
  o.metrics_port = -1;
  o.threads = 1;
  absl::StatusOr<std::unique_ptr<MoaServer>> s = MoaServer::Start(o);
  ASSERT_TRUE(s.ok()) << s.status();
  auto stub = v1::MoaService::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", (*s)->port()),
                                                          grpc::InsecureChannelCredentials()));
  v1::GetModelInfoResponse info;
  grpc::ClientContext ctx;
  ASSERT_TRUE(stub->GetModelInfo(&ctx, {}, &info).ok());
  ASSERT_TRUE(info.plan().loaded());
  EXPECT_EQ(info.plan().path(), plan);
  EXPECT_EQ(info.plan().sink(), 16);
  EXPECT_EQ(info.plan().block(), 16);
  ASSERT_EQ(info.plan().layers_size(), 2);
  ASSERT_EQ(info.plan().layers(0).kv_heads_size(), 2);
  EXPECT_TRUE(info.plan().layers(0).kv_heads(1).dense());
  EXPECT_EQ(info.plan().layers(1).kv_heads(0).alpha(), 16);
  EXPECT_DOUBLE_EQ(info.plan().layers(1).kv_heads(0).beta(), 0.25);
  ASSERT_GE(info.plan().density_size(), 1);
  EXPECT_EQ(info.plan().density(info.plan().density_size() - 1).length(), kTinyContext);
  for (const v1::KvDensity& d : info.plan().density()) {
    EXPECT_GT(d.density(), 0.0);
    EXPECT_LT(d.density(), 1.0);
  }
  EXPECT_LT(info.kv_bytes_per_token_plan(), info.kv_bytes_per_token_dense());
  // A plan-restricted model still generates.
  v1::GenerateRequest r = ValidRequest();
  r.set_max_tokens(100);
  r.set_ignore_eos(true);
  grpc::ClientContext gctx;
  auto reader = stub->Generate(&gctx, r);
  v1::GenerateResponse m;
  int64_t generated = 0;
  while (reader->Read(&m)) generated = m.generated_tokens();
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(generated, 100);
  (*s)->Drain(absl::ZeroDuration());
  EXPECT_TRUE((*s)->engine().CheckIdle().ok());
}

// ---------------------------------------------------------------------------------------------
// Life cycle on the default model: its generations last long enough to be interrupted.

class LifeCycleTest : public ServerFixture {
 protected:
  void SetUp() override {
    if (!testing::FileExists(testing::DefaultModelPath())) {
      GTEST_SKIP() << "default model absent: " << testing::DefaultModelPath()
                   << " (scripts/setup.sh fetches it)";
    }
    EngineOptions e;
    e.max_running = 1;
    e.max_queue = 1;
    StartServer(testing::DefaultModelPath(), e);
  }

  static v1::GenerateRequest Long() {
    v1::GenerateRequest r;
    r.set_text("Once upon a time");
    r.set_max_tokens(400);
    r.set_ignore_eos(true);
    return r;
  }

  // Starts a long generation and returns once its first token arrived.
  struct Stream {
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader;
    int64_t id = 0;
  };
  std::unique_ptr<Stream> StartLong() {
    auto s = std::make_unique<Stream>();
    s->reader = stub_->Generate(&s->ctx, Long());
    v1::GenerateResponse m;
    while (s->reader->Read(&m)) {
      if (m.request_id() != 0) s->id = m.request_id();
      if (!m.token_ids().empty()) break;
    }
    return s;
  }

  static grpc::Status Drain(Stream* s, v1::GenerateResponse* last = nullptr) {
    v1::GenerateResponse m;
    while (s->reader->Read(&m)) {
      if (last != nullptr) *last = m;
    }
    return s->reader->Finish();
  }
};

TEST_F(LifeCycleTest, ClientCancelFreesEverything) {
  std::unique_ptr<Stream> s = StartLong();
  ASSERT_GT(s->id, 0);
  EXPECT_EQ(server_->engine().running(), 1);
  EXPECT_GT(server_->engine().kv_blocks_used(), 0);
  const absl::Time cancelled = absl::Now();
  s->ctx.TryCancel();
  EXPECT_EQ(Drain(s.get()).error_code(), grpc::StatusCode::CANCELLED);
  ExpectAllReleased();
  // Within about one engine step (a decode step of this model is tens of milliseconds).
  EXPECT_LT(absl::Now() - cancelled, absl::Seconds(2));
  EXPECT_EQ(server_->engine().kv_blocks_used(), 0);
}

TEST_F(LifeCycleTest, AbortByRequestId) {
  std::unique_ptr<Stream> s = StartLong();
  v1::AbortRequest a;
  a.set_request_id(s->id);
  v1::AbortResponse ar;
  grpc::ClientContext ctx;
  ASSERT_TRUE(stub_->Abort(&ctx, a, &ar).ok());
  v1::GenerateResponse last;
  const grpc::Status status = Drain(s.get(), &last);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_CANCELLED);
  EXPECT_GE(last.generated_tokens(), 1);
  EXPECT_LT(last.generated_tokens(), 400);
  ExpectAllReleased();
  grpc::ClientContext again;
  EXPECT_EQ(stub_->Abort(&again, a, &ar).error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(LifeCycleTest, DeadlineExceeded) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(700));
  const absl::Time start = absl::Now();
  const Generation g = Generate(Long(), &ctx);
  EXPECT_EQ(g.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
  ExpectAllReleased();
  EXPECT_NE(server_->metrics().Scrape().find("moa_requests_finished_total{reason=\"deadline\"} 1"),
            std::string::npos)
      << server_->metrics().Scrape();
  // The next request is served.
  v1::GenerateRequest r = Long();
  r.set_max_tokens(2);
  EXPECT_TRUE(Generate(r).status.ok());
}

TEST_F(LifeCycleTest, FullQueueIsRefusedAtOnce) {
  std::unique_ptr<Stream> running = StartLong();  // max_running 1: it runs
  auto queued = std::make_unique<Stream>();       // max_queue 1: this one waits
  queued->reader = stub_->Generate(&queued->ctx, Long());
  v1::GenerateResponse m;
  ASSERT_TRUE(queued->reader->Read(&m));  // the id arrives as soon as it is queued
  EXPECT_GT(m.request_id(), 0);
  EXPECT_EQ(server_->engine().waiting(), 1);

  const absl::Time start = absl::Now();
  v1::GenerateRequest r = Long();
  r.set_max_tokens(1);
  const Generation refused = Generate(r);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << refused.status.error_message();
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(500));

  // Cancelling the queued one (never scheduled) and the running one leaves nothing behind.
  queued->ctx.TryCancel();
  EXPECT_EQ(Drain(queued.get()).error_code(), grpc::StatusCode::CANCELLED);
  running->ctx.TryCancel();
  EXPECT_EQ(Drain(running.get()).error_code(), grpc::StatusCode::CANCELLED);
  ExpectAllReleased();
}

TEST_F(LifeCycleTest, DrainTurnsHealthNotServingRefusesNewAndCancelsAtTimeout) {
  EXPECT_EQ(HealthStatus(channel_.get(), "moa.v1.MoaService"), 1);
  std::unique_ptr<Stream> s = StartLong();
  std::thread drain([&] { server_->Drain(absl::Milliseconds(800)); });
  ASSERT_TRUE(WaitFor([&] { return HealthStatus(channel_.get(), "moa.v1.MoaService") == 2; }));
  EXPECT_EQ(HealthStatus(channel_.get(), ""), 2);
  v1::GenerateRequest r = Long();
  r.set_max_tokens(1);
  const Generation refused = Generate(r);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << refused.status.error_message();
  // The in-flight one could not finish 400 tokens in 0.8 s: cancelled, with its final chunk.
  v1::GenerateResponse last;
  EXPECT_EQ(Drain(s.get(), &last).error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_CANCELLED);
  drain.join();
  const CallStateCounts c = server_->call_states();
  EXPECT_EQ(c.created, c.released);
  EXPECT_TRUE(server_->engine().CheckIdle().ok());
}

// ---------------------------------------------------------------------------------------------
// The programs: exit codes, environment variables, and the client against a live server.

struct CommandResult {
  int code = -1;
  std::string output;  // stdout and stderr
};

CommandResult RunCommand(const std::string& command) {
  const std::string out = testing::MakeTempDir() + "/out.txt";
  CommandResult r;
  const int status = std::system((command + " > " + out + " 2>&1").c_str());
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(out);
  r.output.assign(std::istreambuf_iterator<char>(in), {});
  return r;
}

TEST(ProgramsTest, ServerFlagsAndEnvironment) {
  const std::string server = std::string(MOA_BIN_DIR) + "/moa-server";
  CommandResult r = RunCommand(server + " --no-such-flag");
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("unknown flag --no_such_flag"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("usage: moa-server"), std::string::npos) << r.output;
  r = RunCommand(server + " --port 1");  // no model
  EXPECT_EQ(r.code, 2) << r.output;
  r = RunCommand("MOA_MAX_RUNNING=many " + server + " --model x");
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("MOA_MAX_RUNNING"), std::string::npos) << r.output;
  // The model from the environment: unusable, so exit 1 naming it.
  r = RunCommand("MOA_MODEL=/nonexistent/m.gguf " + server + " --port 0 --metrics-port -1");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("/nonexistent/m.gguf"), std::string::npos) << r.output;
  // The command line wins over the environment.
  r = RunCommand("MOA_MODEL=/nonexistent/env.gguf " + server +
                 " --model=/nonexistent/flag.gguf --port 0 --metrics-port -1");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("/nonexistent/flag.gguf"), std::string::npos) << r.output;
}

TEST(ProgramsTest, SigtermDrainsAndExitsZero) {
  const std::string model = testing::GeneratedDataDir() + "/tiny/model-f32.gguf";
  ASSERT_TRUE(testing::FileExists(model)) << model << " is missing: run make_tiny_model.py";
  const std::string log = testing::MakeTempDir() + "/server.log";
  // Start it, wait until it serves, SIGTERM it, and report its exit code.
  const std::string script = absl::StrCat(
      MOA_BIN_DIR, "/moa-server --model ", model, " --port 0 --metrics-port -1 2>", log,
      " & pid=$!; for i in $(seq 1 300); do grep -q serving ", log,
      " && break; sleep 0.05; done; kill -TERM $pid; wait $pid; echo exit=$?; cat ", log);
  const CommandResult r = RunCommand("sh -c '" + script + "'");
  EXPECT_NE(r.output.find("exit=0"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("SIGTERM, draining"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("moa-server: stopped"), std::string::npos) << r.output;
}

TEST_F(TinyServerTest, ClientProgramStreamsAndReportsErrors) {
  const std::string client =
      absl::StrCat(MOA_BIN_DIR, "/moa-client --address 127.0.0.1:", server_->port());
  CommandResult r = RunCommand(client + " --prompt Hello --max-tokens 5 --ignore-eos");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("finish: length | prompt"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("generated 5"), std::string::npos) << r.output;
  r = RunCommand(client + " --prompt Hello --max-tokens 5000");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("INVALID_ARGUMENT: max_tokens"), std::string::npos) << r.output;
  r = RunCommand(client);  // neither --prompt nor --chat
  EXPECT_EQ(r.code, 2) << r.output;
}

}  // namespace
}  // namespace moa
