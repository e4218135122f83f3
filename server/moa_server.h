// The gRPC server: loads a model, runs a moa::Engine, serves moa.v1.MoaService (proto/moa/v1/
// moa.proto), the standard grpc.health.v1 health service and server reflection, and exposes the
// Prometheus metrics on HTTP /metrics.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "engine/engine.h"
#include "server/metrics.h"
#include "server/request_validation.h"

namespace grpc {
class Server;
}

namespace moa {

struct ServerOptions {
  std::string model_path;  // GGUF file or Hugging Face checkpoint directory
  std::string plan_path;   // MoA plan; empty: dense attention
  std::string host = "0.0.0.0";
  int port = 50051;            // 0 picks a free port (see MoaServer::port)
  int metrics_port = 9090;     // 0 picks a free port; -1: no /metrics endpoint
  std::string device = "cpu";  // backend: "cpu" or "cuda" (kernels/backend_factory.h)
  int threads = 0;             // CPU backend threads; 0 = all hardware threads
  EngineOptions engine;
  absl::Duration drain_timeout = absl::Seconds(30);
  // gRPC receive limit. Text limits (ValidationLimits::max_text_bytes) sit below it so that
  // oversized text gets a precise INVALID_ARGUMENT rather than the transport's refusal.
  int max_receive_bytes = 4 << 20;
  int64_t max_text_bytes = 1 << 20;
  int32_t default_max_tokens = 256;
};

// Per-call states of Generate streams (Triton's state-cleanup count): one is created when a
// call starts and released when gRPC is done with it; after any mix of finishes, cancels,
// deadlines, errors and shutdown the two must be equal.
struct CallStateCounts {
  int64_t created = 0;
  int64_t released = 0;
};

class MoaService;

class MoaServer {
 public:
  // Loads the model (errors name the file and the problem), starts the engine, the gRPC server
  // and the metrics endpoint.
  static absl::StatusOr<std::unique_ptr<MoaServer>> Start(const ServerOptions& options);
  // Drains with a zero timeout if Drain was not called.
  ~MoaServer();

  int port() const { return port_; }
  int metrics_port() const;

  // Graceful stop: health turns NOT_SERVING, new Generate calls get UNAVAILABLE, in-flight
  // generations may finish within `timeout`, then the rest are cancelled and gRPC is shut down.
  // Thread-safe; later calls wait for the first to complete.
  void Drain(absl::Duration timeout);
  // Blocks until Drain has completed.
  void Wait();

  const Engine& engine() const { return *engine_; }
  const ServerMetrics& metrics() const { return *metrics_; }
  CallStateCounts call_states() const;

 private:
  MoaServer();
  struct Model;

  std::unique_ptr<Model> model_;
  std::unique_ptr<ServerMetrics> metrics_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<MoaService> service_;
  std::unique_ptr<grpc::Server> grpc_server_;
  int port_ = 0;

  absl::Mutex drain_mu_;
  bool drain_started_ ABSL_GUARDED_BY(drain_mu_) = false;
  bool drained_ ABSL_GUARDED_BY(drain_mu_) = false;
};

}  // namespace moa
