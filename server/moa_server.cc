#include "server/moa_server.h"

#include <grpc/support/time.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <atomic>
#include <chrono>
#include <deque>
#include <optional>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "engine/llama_model.h"
#include "engine/moa_plan.h"
#include "engine/model/model_file.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/utf8.h"
#include "kernels/backend.h"
#include "kernels/backend_factory.h"
#include "moa/v1/moa.grpc.pb.h"

namespace moa {
namespace {

constexpr char kServiceName[] = "moa.v1.MoaService";
// A cancel this close to the call's deadline is taken for the deadline itself.
constexpr absl::Duration kDeadlineSlack = absl::Milliseconds(100);

grpc::Status ToGrpc(const absl::Status& s) {
  // absl and gRPC share the canonical code numbering.
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

// The call's deadline as an engine deadline (InfiniteFuture when the client set none).
absl::Time DeadlineOf(const grpc::CallbackServerContext& ctx) {
  const gpr_timespec raw = ctx.raw_deadline();
  if (gpr_time_cmp(raw, gpr_inf_future(raw.clock_type)) == 0) return absl::InfiniteFuture();
  const gpr_timespec real = gpr_convert_clock_type(raw, GPR_CLOCK_REALTIME);
  return absl::FromUnixSeconds(real.tv_sec) + absl::Nanoseconds(real.tv_nsec);
}

v1::FinishReason ToProto(FinishReason r) {
  switch (r) {
    case FinishReason::kNone:
      return v1::FINISH_REASON_UNSPECIFIED;
    case FinishReason::kEos:
      return v1::FINISH_REASON_EOS;
    case FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case FinishReason::kCancelled:
      return v1::FINISH_REASON_CANCELLED;
    case FinishReason::kDeadline:
      return v1::FINISH_REASON_DEADLINE;
    case FinishReason::kError:
      return v1::FINISH_REASON_ERROR;
  }
  return v1::FINISH_REASON_ERROR;
}

// Appends the tokens, text and logprobs of `c` to `m`.
void AppendTokens(const GenerationChunk& c, v1::GenerateResponse* m) {
  for (int32_t t : c.tokens) m->add_token_ids(t);
  m->mutable_text()->append(c.text);
  for (const TokenLogprob& lp : c.logprobs) {
    v1::TokenLogprob* p = m->add_logprobs();
    p->set_token_id(lp.token);
    p->set_logprob(lp.logprob);
    for (const auto& [id, logprob] : lp.top) {
      v1::TopLogprob* t = p->add_top();
      t->set_token_id(id);
      t->set_logprob(logprob);
    }
  }
}

}  // namespace

// Everything loaded from the model path, kept alive for the engine and the service.
struct MoaServer::Model {
  ModelFile file;
  std::optional<MoaPlan> plan;
  std::unique_ptr<Tokenizer> tokenizer;
  std::optional<ChatTemplate> chat;
  absl::Status chat_error;  // why `chat` is absent
  std::unique_ptr<Backend> backend;
  std::unique_ptr<LlamaModel> llama;
};

class GenerateCall;

// The moa.v1.MoaService implementation, on gRPC's callback API: a Generate stream costs no
// thread while it waits for the engine, and a client cancel or disconnect reaches the engine at
// once through ServerWriteReactor::OnCancel rather than by polling IsCancelled.
class MoaService final : public v1::MoaService::CallbackService {
 public:
  MoaService(Engine* engine, const Tokenizer* tokenizer, const ChatTemplate* chat,
             absl::Status chat_error, bool add_bos, ServerMetrics* metrics, ValidationLimits limits,
             v1::GetModelInfoResponse info)
      : engine_(engine),
        tokenizer_(tokenizer),
        chat_(chat),
        chat_error_(std::move(chat_error)),
        add_bos_(add_bos),
        metrics_(metrics),
        limits_(limits),
        info_(std::move(info)) {}

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* ctx, const v1::GenerateRequest* request) override;

  grpc::ServerUnaryReactor* Abort(grpc::CallbackServerContext* ctx, const v1::AbortRequest* req,
                                  v1::AbortResponse* resp) override {
    grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
    bool found;
    {
      absl::MutexLock lock(&mu_);
      found = active_ids_.contains(req->request_id());
    }
    if (!found) {
      r->Finish(grpc::Status(
          grpc::StatusCode::NOT_FOUND,
          absl::StrCat("no generation with id ", req->request_id(), " is in progress")));
      return r;
    }
    engine_->Cancel(req->request_id());
    r->Finish(grpc::Status::OK);
    return r;
  }

  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* ctx,
                                     const v1::TokenizeRequest* req,
                                     v1::TokenizeResponse* resp) override {
    grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
    r->Finish(ToGrpc(DoTokenize(*req, resp)));
    return r;
  }

  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* ctx,
                                       const v1::DetokenizeRequest* req,
                                       v1::DetokenizeResponse* resp) override {
    grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
    r->Finish(ToGrpc(DoDetokenize(*req, resp)));
    return r;
  }

  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* ctx,
                                         const v1::GetModelInfoRequest* req,
                                         v1::GetModelInfoResponse* resp) override {
    *resp = info_;
    grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
    r->Finish(grpc::Status::OK);
    return r;
  }

  Engine* engine() const { return engine_; }

  // Validation, tokenization and limits: the engine request for `r`, or the reason it is refused.
  absl::StatusOr<GenerationRequest> Prepare(const v1::GenerateRequest& r) const {
    if (draining_.load()) return absl::UnavailableError("the server is shutting down");
    if (absl::Status s = ValidateGenerateRequest(r, limits_); !s.ok()) return s;
    absl::StatusOr<std::vector<int32_t>> prompt;
    switch (r.input_case()) {
      case v1::GenerateRequest::kText:
        prompt = tokenizer_->Encode(r.text(), add_bos_, /*parse_special=*/false);
        break;
      case v1::GenerateRequest::kTokenIds:
        prompt = std::vector<int32_t>(r.token_ids().ids().begin(), r.token_ids().ids().end());
        break;
      case v1::GenerateRequest::kChat:
        prompt = EncodeChat(r.chat());
        break;
      case v1::GenerateRequest::INPUT_NOT_SET:
        return absl::InvalidArgumentError("no input");
    }
    if (!prompt.ok()) return prompt.status();
    return MakeGenerationRequest(r, *std::move(prompt), limits_);
  }

  void OnRejected(const absl::Status& s) {
    metrics_->OnRejected(absl::StatusCodeToString(s.code()));
  }

  void CallCreated() {
    absl::MutexLock lock(&mu_);
    ++calls_.created;
  }
  void CallReleased() {
    absl::MutexLock lock(&mu_);
    ++calls_.released;
  }
  CallStateCounts call_states() const {
    absl::MutexLock lock(&mu_);
    return calls_;
  }

  void Register(int64_t id) {
    absl::MutexLock lock(&mu_);
    active_ids_.insert(id);
  }
  void Unregister(int64_t id) {
    absl::MutexLock lock(&mu_);
    active_ids_.erase(id);
  }

  void StartDraining() { draining_.store(true); }
  bool draining() const { return draining_.load(); }

  // Waits until every Generate call is released or `deadline` passes.
  void WaitForCalls(absl::Time deadline) {
    absl::MutexLock lock(&mu_);
    auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return calls_.created == calls_.released;
    };
    mu_.AwaitWithDeadline(absl::Condition(&idle), deadline);
  }

 private:
  absl::StatusOr<std::vector<int32_t>> EncodeChat(const v1::ChatMessages& chat) const {
    if (chat_ == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("this model has no usable chat template: ", chat_error_.message()));
    }
    std::vector<ChatMessage> messages;
    for (const v1::ChatMessage& m : chat.messages()) messages.push_back({m.role(), m.content()});
    absl::StatusOr<std::string> text = chat_->Render(messages, /*add_generation_prompt=*/true);
    if (!text.ok())
      return absl::InvalidArgumentError(absl::StrCat("chat: ", text.status().message()));
    // The rendered prompt carries its special tokens (BOS included) as text.
    return tokenizer_->Encode(*text, /*add_bos=*/false, /*parse_special=*/true);
  }

  absl::Status DoTokenize(const v1::TokenizeRequest& req, v1::TokenizeResponse* resp) const {
    if (absl::Status s = ValidateTokenizeRequest(req, limits_); !s.ok()) return s;
    absl::StatusOr<std::vector<int32_t>> ids =
        req.input_case() == v1::TokenizeRequest::kChat
            ? EncodeChat(req.chat())
            : tokenizer_->Encode(req.text(), req.add_bos() && add_bos_, req.parse_special());
    if (!ids.ok()) return ids.status();
    resp->mutable_token_ids()->Add(ids->begin(), ids->end());
    return absl::OkStatus();
  }

  absl::Status DoDetokenize(const v1::DetokenizeRequest& req, v1::DetokenizeResponse* resp) const {
    if (absl::Status s = ValidateDetokenizeRequest(req, limits_); !s.ok()) return s;
    absl::StatusOr<std::string> bytes =
        tokenizer_->Decode(absl::MakeConstSpan(req.token_ids().data(), req.token_ids_size()));
    if (!bytes.ok()) return bytes.status();
    // Tokens may end inside a character; the response is a proto string and must be UTF-8.
    utf8::DrainValid(&*bytes, resp->mutable_text(), /*final=*/true);
    return absl::OkStatus();
  }

  Engine* const engine_;
  const Tokenizer* const tokenizer_;
  const ChatTemplate* const chat_;
  const absl::Status chat_error_;
  const bool add_bos_;
  ServerMetrics* const metrics_;
  const ValidationLimits limits_;
  const v1::GetModelInfoResponse info_;
  std::atomic<bool> draining_{false};

  mutable absl::Mutex mu_;
  CallStateCounts calls_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<int64_t> active_ids_ ABSL_GUARDED_BY(mu_);
};

// One Generate stream. Engine chunks (engine thread) are queued and written one at a time
// (gRPC allows one outstanding write); chunks that arrive while a write is in flight are merged.
// The call is finished only after the engine's final chunk, so the engine never calls back into
// a deleted call; Finish is always the last thing touched, outside the lock, because OnDone may
// delete the call right after it.
class GenerateCall final : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  GenerateCall(MoaService* service, grpc::CallbackServerContext* ctx,
               const v1::GenerateRequest& request)
      : service_(service), engine_(service->engine()) {
    service_->CallCreated();
    Start(*ctx, request);
  }

  // After the lock is released another thread may finish the call and OnDone delete it: the
  // code after an unlock touches locals only.
  void OnWriteDone(bool ok) override {
    Engine* const engine = engine_;
    std::optional<grpc::Status> finish;
    int64_t cancel_id = -1;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) {
        // The client is gone: stop writing and stop the generation.
        broken_ = true;
        pending_.clear();
        if (ShouldCancelLocked()) cancel_id = id_;
      }
      finish = WriteOrFinishLocked();
    }
    if (cancel_id >= 0) engine->Cancel(cancel_id);
    if (finish) Finish(*finish);
  }

  void OnCancel() override {
    Engine* const engine = engine_;
    int64_t cancel_id = -1;
    {
      absl::MutexLock lock(&mu_);
      cancelled_ = true;
      if (ShouldCancelLocked()) cancel_id = id_;
    }
    if (cancel_id >= 0) engine->Cancel(cancel_id);
  }

  void OnDone() override {
    service_->CallReleased();
    delete this;
  }

 private:
  void Start(const grpc::CallbackServerContext& ctx, const v1::GenerateRequest& request) {
    absl::StatusOr<GenerationRequest> g = service_->Prepare(request);
    if (!g.ok()) {
      Reject(g.status());
      return;
    }
    {
      absl::MutexLock lock(&mu_);
      deadline_ = g->deadline = DeadlineOf(ctx);
    }
    Engine* const engine = engine_;
    absl::StatusOr<int64_t> id =
        engine->Submit(*std::move(g), [this](const GenerationChunk& c) { OnChunk(c); });
    if (!id.ok()) {
      Reject(id.status());
      return;
    }
    std::optional<grpc::Status> finish;
    bool cancel = false;
    {
      absl::MutexLock lock(&mu_);
      id_ = *id;
      id_known_ = true;
      v1::GenerateResponse first;
      first.set_request_id(*id);
      pending_.push_front(std::move(first));
      if (!final_received_) {
        service_->Register(*id);
        registered_ = true;
        cancel = cancelled_;
      }
      finish = WriteOrFinishLocked();
    }
    if (cancel) engine->Cancel(*id);
    if (finish) Finish(*finish);
  }

  // Whether a dead call should cancel its engine request. At the call's deadline gRPC cancels
  // the call, usually from the client's side first (its timer started before the server's); the
  // engine then ends the request itself at its next step, with the right reason (kDeadline,
  // counted as such in the metrics).
  bool ShouldCancelLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return id_known_ && !final_received_ && absl::Now() + kDeadlineSlack < deadline_;
  }

  void Reject(const absl::Status& s) {
    service_->OnRejected(s);
    Finish(ToGrpc(s));
  }

  // Engine thread.
  void OnChunk(const GenerationChunk& c) {
    std::optional<grpc::Status> finish;
    {
      absl::MutexLock lock(&mu_);
      if (c.finish == FinishReason::kNone) {
        if (!broken_) {
          // Messages in pending_ are not in flight (that one is current_), so a queued token
          // message can take more tokens.
          const bool merge = !pending_.empty() && pending_.back().request_id() == 0 &&
                             pending_.back().finish_reason() == v1::FINISH_REASON_UNSPECIFIED;
          if (!merge) pending_.emplace_back();
          AppendTokens(c, &pending_.back());
        }
      } else {
        final_received_ = true;
        final_status_ = StatusFor(c);
        // Before the final message is queued: a client that has seen it finds the id gone.
        if (registered_) service_->Unregister(id_);
        if (!broken_) {
          v1::GenerateResponse& m = pending_.emplace_back();
          AppendTokens(c, &m);
          m.set_finish_reason(ToProto(c.finish));
          m.set_stop_matched(c.stop_matched);
          m.set_error(c.error);
          m.set_prompt_tokens(c.prompt_tokens);
          m.set_generated_tokens(c.generated_tokens);
          m.mutable_timings()->set_queued_seconds(c.queued_seconds);
          m.mutable_timings()->set_ttft_seconds(c.ttft_seconds);
          m.mutable_timings()->set_total_seconds(c.total_seconds);
        }
      }
      finish = WriteOrFinishLocked();
    }
    if (finish) Finish(*finish);
  }

  grpc::Status StatusFor(const GenerationChunk& c) const {
    switch (c.finish) {
      case FinishReason::kEos:
      case FinishReason::kLength:
      case FinishReason::kStop:
        return grpc::Status::OK;
      case FinishReason::kCancelled:
        return grpc::Status(
            grpc::StatusCode::CANCELLED,
            service_->draining() ? "cancelled: the server is shutting down" : "cancelled");
      case FinishReason::kDeadline:
        return grpc::Status(
            grpc::StatusCode::DEADLINE_EXCEEDED,
            absl::StrCat("deadline exceeded after ", c.generated_tokens, " generated tokens"));
      case FinishReason::kError:
        return grpc::Status(grpc::StatusCode::INTERNAL, absl::StrCat("engine error: ", c.error));
      case FinishReason::kNone:
        break;
    }
    return grpc::Status(grpc::StatusCode::INTERNAL, "the engine ended a stream without a reason");
  }

  // Starts the next write, or returns the status to Finish with once everything is written
  // (the caller calls Finish after releasing the lock).
  std::optional<grpc::Status> WriteOrFinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || finish_called_ || !id_known_) return std::nullopt;
    if (!pending_.empty()) {
      current_ = std::move(pending_.front());
      pending_.pop_front();
      writing_ = true;
      StartWrite(&current_);
      return std::nullopt;
    }
    if (!final_received_) return std::nullopt;
    finish_called_ = true;
    if (broken_) return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
    return final_status_;
  }

  MoaService* const service_;
  Engine* const engine_;
  absl::Mutex mu_;
  std::deque<v1::GenerateResponse> pending_ ABSL_GUARDED_BY(mu_);
  v1::GenerateResponse current_ ABSL_GUARDED_BY(mu_);  // the message being written
  absl::Time deadline_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  int64_t id_ ABSL_GUARDED_BY(mu_) = -1;
  bool id_known_ ABSL_GUARDED_BY(mu_) = false;
  bool registered_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  bool final_received_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_called_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status final_status_ ABSL_GUARDED_BY(mu_);
};

grpc::ServerWriteReactor<v1::GenerateResponse>* MoaService::Generate(
    grpc::CallbackServerContext* ctx, const v1::GenerateRequest* request) {
  return new GenerateCall(this, ctx, *request);
}

namespace {

v1::GetModelInfoResponse MakeModelInfo(const ModelConfig& c, const LlamaModel& llama,
                                       const Tokenizer& tok, const MoaPlan* plan,
                                       const std::string& plan_path, const ChatTemplate* chat,
                                       int32_t block_size) {
  v1::GetModelInfoResponse info;
  info.set_name(c.name);
  info.set_architecture(c.architecture);
  info.set_n_layers(c.n_layers);
  info.set_d_model(c.d_model);
  info.set_n_heads(c.n_heads);
  info.set_n_kv_heads(c.n_kv_heads);
  info.set_head_dim(c.head_dim);
  info.set_d_ff(c.d_ff);
  info.set_vocab_size(c.vocab_size);
  info.set_context_length(c.max_context);
  info.set_bos_id(tok.bos_id());
  info.set_eos_id(tok.eos_id());
  if (chat != nullptr) info.set_chat_template(std::string(chat->family_name()));
  const int64_t dense_per_token =
      llama.BytesPerKvBlock(block_size) / block_size * c.n_layers * c.n_kv_heads;
  info.set_kv_bytes_per_token_dense(dense_per_token);
  info.set_kv_bytes_per_token_plan(static_cast<double>(dense_per_token));
  v1::Plan* p = info.mutable_plan();
  if (plan != nullptr) {
    p->set_loaded(true);
    p->set_path(plan_path);
    p->set_sink(plan->params().sink);
    p->set_block(plan->params().block);
    for (int l = 0; l < plan->n_layers(); ++l) {
      v1::LayerRules* lr = p->add_layers();
      for (const SpanRule& r : plan->layer_rules(l)) {
        v1::SpanRule* pr = lr->add_kv_heads();
        pr->set_dense(r.dense);
        pr->set_alpha(r.alpha);
        pr->set_beta(r.beta);
      }
    }
    std::vector<int64_t> lengths;
    for (int64_t n = 1024; n < c.max_context; n *= 2) lengths.push_back(n);
    lengths.push_back(c.max_context);
    for (int64_t n : lengths) {
      v1::KvDensity* d = p->add_density();
      d->set_length(n);
      d->set_density(plan->Density(n));
    }
    info.set_kv_bytes_per_token_plan(static_cast<double>(dense_per_token) *
                                     plan->Density(c.max_context));
  }
  return info;
}

}  // namespace

MoaServer::MoaServer() = default;

MoaServer::~MoaServer() { Drain(absl::ZeroDuration()); }

absl::StatusOr<std::unique_ptr<MoaServer>> MoaServer::Start(const ServerOptions& options) {
  std::unique_ptr<MoaServer> server(new MoaServer());
  server->model_ = std::make_unique<Model>();
  Model& m = *server->model_;

  absl::StatusOr<ModelFile> file = LoadModel(options.model_path);
  if (!file.ok()) return file.status();
  m.file = *std::move(file);
  if (!options.plan_path.empty()) {
    absl::StatusOr<MoaPlan> plan = MoaPlan::FromFile(options.plan_path);
    if (!plan.ok()) return plan.status();
    absl::StatusOr<MoaPlan> fitted = plan->ForModel(m.file.config);
    if (!fitted.ok()) return fitted.status();
    m.plan = *std::move(fitted);
  }
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok = Tokenizer::Create(m.file.tokenizer);
  if (!tok.ok()) return tok.status();
  m.tokenizer = *std::move(tok);
  // A model without a usable chat template still serves text and token input.
  absl::StatusOr<ChatTemplate> chat = ChatTemplate::FromModel(m.file);
  if (chat.ok()) {
    m.chat = *std::move(chat);
  } else {
    m.chat_error = chat.status();
  }
  absl::StatusOr<std::unique_ptr<Backend>> backend = NewBackend(options.device, options.threads);
  if (!backend.ok()) return backend.status();
  m.backend = *std::move(backend);
  absl::StatusOr<std::unique_ptr<LlamaModel>> llama =
      LlamaModel::Create(m.file, m.backend.get(), m.plan ? &*m.plan : nullptr);
  if (!llama.ok()) return llama.status();
  m.llama = *std::move(llama);

  const int32_t block_size = options.engine.kv_block_size;
  absl::StatusOr<std::unique_ptr<ServerMetrics>> metrics = ServerMetrics::Create(
      m.llama->BytesPerKvBlock(block_size),
      options.metrics_port < 0 ? "" : absl::StrCat(options.host, ":", options.metrics_port));
  if (!metrics.ok()) return metrics.status();
  server->metrics_ = *std::move(metrics);

  absl::StatusOr<std::unique_ptr<Engine>> engine =
      Engine::Create(m.llama.get(), m.tokenizer.get(), options.engine, server->metrics_.get());
  if (!engine.ok()) return engine.status();
  server->engine_ = *std::move(engine);

  ValidationLimits limits;
  limits.vocab_size = m.tokenizer->vocab_size();
  limits.context_length = m.file.config.max_context;
  limits.default_max_tokens = options.default_max_tokens;
  limits.max_text_bytes = options.max_text_bytes;
  server->service_ = std::make_unique<MoaService>(
      server->engine_.get(), m.tokenizer.get(), m.chat ? &*m.chat : nullptr, m.chat_error,
      m.file.tokenizer.add_bos, server->metrics_.get(), limits,
      MakeModelInfo(m.file.config, *m.llama, *m.tokenizer, m.plan ? &*m.plan : nullptr,
                    options.plan_path, m.chat ? &*m.chat : nullptr, block_size));

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  const std::string address = absl::StrCat(options.host, ":", options.port);
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &server->port_);
  builder.RegisterService(server->service_.get());
  builder.SetMaxReceiveMessageSize(options.max_receive_bytes);
  server->grpc_server_ = builder.BuildAndStart();
  if (server->grpc_server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", address));
  }
  grpc::HealthCheckServiceInterface* health = server->grpc_server_->GetHealthCheckService();
  health->SetServingStatus(true);
  health->SetServingStatus(kServiceName, true);
  return server;
}

int MoaServer::metrics_port() const { return metrics_->port(); }

CallStateCounts MoaServer::call_states() const { return service_->call_states(); }

void MoaServer::Drain(absl::Duration timeout) {
  {
    absl::MutexLock lock(&drain_mu_);
    if (drain_started_) {
      drain_mu_.Await(absl::Condition(&drained_));
      return;
    }
    drain_started_ = true;
  }
  // Start() may have failed half-way: stop whatever was started. New requests are refused
  // before health says NOT_SERVING, so that a client that saw NOT_SERVING is never queued.
  if (service_ != nullptr) service_->StartDraining();
  if (engine_ != nullptr) engine_->StopAccepting();
  if (grpc_server_ != nullptr) {
    grpc::HealthCheckServiceInterface* health = grpc_server_->GetHealthCheckService();
    health->SetServingStatus(false);
    health->SetServingStatus(kServiceName, false);
  }
  if (service_ != nullptr) service_->WaitForCalls(absl::Now() + timeout);
  // Cancels what is left; every stream gets its final chunk and finishes.
  if (engine_ != nullptr) engine_->Shutdown();
  if (grpc_server_ != nullptr) {
    grpc_server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    grpc_server_->Wait();
  }
  absl::MutexLock lock(&drain_mu_);
  drained_ = true;
}

void MoaServer::Wait() {
  absl::MutexLock lock(&drain_mu_);
  drain_mu_.Await(absl::Condition(&drained_));
}

}  // namespace moa
