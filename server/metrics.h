// Prometheus metrics of the server and the engine (names prefixed moa_), served on HTTP
// /metrics by prometheus-cpp. The engine-side ones come in through moa::EngineObserver, the
// request-side ones (rejections) from the gRPC service.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/engine.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace moa {

class ServerMetrics : public EngineObserver {
 public:
  // `kv_block_bytes`: memory of one KV block, to turn block counts into bytes saved by the plan.
  // `bind_address` like "0.0.0.0:9090" ("host:0" picks a free port); empty: no HTTP endpoint.
  static absl::StatusOr<std::unique_ptr<ServerMetrics>> Create(int64_t kv_block_bytes,
                                                               const std::string& bind_address);
  ~ServerMetrics() override;

  // The port /metrics listens on, 0 without an endpoint.
  int port() const { return port_; }
  // The metrics in the Prometheus text format (what /metrics returns).
  std::string Scrape() const;

  // A request refused before it reached the engine's queue, by gRPC status code name.
  void OnRejected(const std::string& code);

  // EngineObserver.
  void OnStep(double seconds, int batch_sequences, int batch_tokens) override;
  void OnQueueChange(int running, int waiting) override;
  void OnKvBlocks(int64_t used, int64_t total, int64_t dense_equivalent_used) override;
  void OnPreemption() override;
  void OnTokens(int64_t prompt_tokens, int64_t generated_tokens) override;
  void OnFirstToken(double ttft_seconds, double queued_seconds) override;
  void OnInterToken(double seconds) override;
  void OnFinish(FinishReason reason, double e2e_seconds) override;

 private:
  explicit ServerMetrics(int64_t kv_block_bytes);

  int64_t kv_block_bytes_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;

  prometheus::Gauge* running_;
  prometheus::Gauge* waiting_;
  prometheus::Gauge* kv_used_;
  prometheus::Gauge* kv_total_;
  prometheus::Gauge* kv_usage_;
  prometheus::Gauge* kv_bytes_saved_;
  prometheus::Family<prometheus::Counter>* finished_;
  prometheus::Family<prometheus::Counter>* rejected_;
  prometheus::Counter* prompt_tokens_;
  prometheus::Counter* generated_tokens_;
  prometheus::Counter* preemptions_;
  prometheus::Histogram* ttft_;
  prometheus::Histogram* itl_;
  prometheus::Histogram* e2e_;
  prometheus::Histogram* queue_time_;
  prometheus::Histogram* step_time_;
  prometheus::Histogram* batch_size_;
  prometheus::Histogram* batch_tokens_;
};

}  // namespace moa
