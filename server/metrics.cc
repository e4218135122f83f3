#include "server/metrics.h"

#include <exception>
#include <utility>

#include "absl/strings/str_cat.h"
#include "prometheus/text_serializer.h"

namespace moa {
namespace {

// Latencies of single tokens on a fast GPU are a few milliseconds: the buckets start at 1 ms
// (vLLM's start at 10 ms and cannot tell 2 ms from 9 ms).
const prometheus::Histogram::BucketBoundaries kTokenBuckets = {
    0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.04,
    0.05,  0.075, 0.1,   0.15,  0.2,   0.3,  0.5,   1.0,  2.5,  5.0};
const prometheus::Histogram::BucketBoundaries kRequestBuckets = {
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,  0.25, 0.5,   0.75,
    1.0,   2.5,   5.0,  7.5,  10.0, 20.0, 40.0, 80.0, 160., 320.0, 640.0};
const prometheus::Histogram::BucketBoundaries kBatchBuckets = {1,  2,   4,   8,   16,   32,
                                                               64, 128, 256, 512, 1024, 2048};

template <typename T>
T& One(std::shared_ptr<prometheus::Registry>& r, const std::string& name, const std::string& help,
       auto&&... args) {
  auto& family = prometheus::detail::Builder<T>().Name(name).Help(help).Register(*r);
  return family.Add({}, std::forward<decltype(args)>(args)...);
}

}  // namespace

ServerMetrics::ServerMetrics(int64_t kv_block_bytes)
    : kv_block_bytes_(kv_block_bytes), registry_(std::make_shared<prometheus::Registry>()) {
  using prometheus::Counter;
  using prometheus::Gauge;
  using prometheus::Histogram;
  running_ = &One<Gauge>(registry_, "moa_requests_running", "Requests in the running batch.");
  waiting_ = &One<Gauge>(registry_, "moa_requests_waiting", "Requests waiting in the queue.");
  kv_used_ = &One<Gauge>(registry_, "moa_kv_blocks_used", "KV cache blocks in use.");
  kv_total_ = &One<Gauge>(registry_, "moa_kv_blocks_total", "KV cache blocks in the pool.");
  kv_usage_ = &One<Gauge>(registry_, "moa_kv_cache_usage_ratio",
                          "Fraction of the KV cache blocks in use (0..1).");
  kv_bytes_saved_ = &One<Gauge>(
      registry_, "moa_kv_bytes_saved",
      "KV cache bytes the MoA plan saves right now versus dense attention of the same sequences.");
  finished_ = &prometheus::BuildCounter()
                   .Name("moa_requests_finished_total")
                   .Help("Requests finished, by finish reason.")
                   .Register(*registry_);
  rejected_ = &prometheus::BuildCounter()
                   .Name("moa_requests_rejected_total")
                   .Help("Generate calls refused before reaching the engine queue, by gRPC code.")
                   .Register(*registry_);
  prompt_tokens_ = &One<Counter>(registry_, "moa_prompt_tokens_total", "Prompt tokens prefilled.");
  generated_tokens_ = &One<Counter>(registry_, "moa_generation_tokens_total", "Tokens generated.");
  preemptions_ = &One<Counter>(registry_, "moa_preemptions_total",
                               "Sequences preempted for lack of KV blocks (recomputed later).");
  ttft_ = &One<Histogram>(registry_, "moa_time_to_first_token_seconds",
                          "From arrival to the first generated token.", kRequestBuckets);
  itl_ = &One<Histogram>(registry_, "moa_inter_token_latency_seconds",
                         "Between consecutive tokens of one request.", kTokenBuckets);
  e2e_ = &One<Histogram>(registry_, "moa_e2e_request_latency_seconds",
                         "From arrival to the end of a request.", kRequestBuckets);
  queue_time_ = &One<Histogram>(registry_, "moa_request_queue_time_seconds",
                                "From arrival to the first scheduled step.", kRequestBuckets);
  step_time_ =
      &One<Histogram>(registry_, "moa_step_duration_seconds",
                      "Duration of one engine step (one batched forward pass).", kTokenBuckets);
  batch_size_ =
      &One<Histogram>(registry_, "moa_batch_size", "Sequences in one engine step.", kBatchBuckets);
  batch_tokens_ =
      &One<Histogram>(registry_, "moa_batch_tokens",
                      "Tokens (decodes plus prefill chunks) in one engine step.", kBatchBuckets);
}

ServerMetrics::~ServerMetrics() = default;

absl::StatusOr<std::unique_ptr<ServerMetrics>> ServerMetrics::Create(
    int64_t kv_block_bytes, const std::string& bind_address) {
  // prometheus-cpp and civetweb report failures (a port in use, a bad address) by throwing.
  try {
    std::unique_ptr<ServerMetrics> m(new ServerMetrics(kv_block_bytes));
    if (!bind_address.empty()) {
      m->exposer_ = std::make_unique<prometheus::Exposer>(bind_address, /*num_threads=*/1);
      m->exposer_->RegisterCollectable(m->registry_);
      const std::vector<int> ports = m->exposer_->GetListeningPorts();
      if (ports.empty()) {
        return absl::UnavailableError(absl::StrCat("metrics: not listening on ", bind_address));
      }
      m->port_ = ports[0];
    }
    return m;
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("metrics: cannot serve /metrics on ", bind_address, ": ", e.what()));
  }
}

std::string ServerMetrics::Scrape() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

void ServerMetrics::OnRejected(const std::string& code) {
  rejected_->Add({{"code", code}}).Increment();
}

void ServerMetrics::OnStep(double seconds, int batch_sequences, int batch_tokens) {
  step_time_->Observe(seconds);
  batch_size_->Observe(batch_sequences);
  batch_tokens_->Observe(batch_tokens);
}

void ServerMetrics::OnQueueChange(int running, int waiting) {
  running_->Set(running);
  waiting_->Set(waiting);
}

void ServerMetrics::OnKvBlocks(int64_t used, int64_t total, int64_t dense_equivalent_used) {
  kv_used_->Set(static_cast<double>(used));
  kv_total_->Set(static_cast<double>(total));
  kv_usage_->Set(total > 0 ? static_cast<double>(used) / static_cast<double>(total) : 0.0);
  kv_bytes_saved_->Set(static_cast<double>((dense_equivalent_used - used) * kv_block_bytes_));
}

void ServerMetrics::OnPreemption() { preemptions_->Increment(); }

void ServerMetrics::OnTokens(int64_t prompt_tokens, int64_t generated_tokens) {
  prompt_tokens_->Increment(static_cast<double>(prompt_tokens));
  generated_tokens_->Increment(static_cast<double>(generated_tokens));
}

void ServerMetrics::OnFirstToken(double ttft_seconds, double queued_seconds) {
  ttft_->Observe(ttft_seconds);
  queue_time_->Observe(queued_seconds);
}

void ServerMetrics::OnInterToken(double seconds) { itl_->Observe(seconds); }

void ServerMetrics::OnFinish(FinishReason reason, double e2e_seconds) {
  finished_->Add({{"reason", FinishReasonName(reason)}}).Increment();
  e2e_->Observe(e2e_seconds);
}

}  // namespace moa
