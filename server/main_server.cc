// moa-server: serves a model over gRPC (proto/moa/v1/moa.proto) with Prometheus metrics.
// Every flag can also come from the environment variable MOA_<FLAG> (the command line wins).
// SIGTERM / SIGINT drain the server (docs/server.md) and exit 0.
#include <signal.h>

#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "kernels/backend_factory.h"
#include "server/flags_env.h"
#include "server/moa_server.h"

ABSL_FLAG(std::string, model, "", "GGUF file or Hugging Face checkpoint directory (required)");
ABSL_FLAG(std::string, plan, "", "MoA plan (JSON); without one every head attends densely");
ABSL_FLAG(std::string, host, "0.0.0.0", "address to listen on (gRPC and /metrics)");
ABSL_FLAG(int32_t, port, 50051, "gRPC port; 0 picks a free one");
ABSL_FLAG(int32_t, metrics_port, 9090, "HTTP port of /metrics; 0 picks a free one, -1 disables");
ABSL_FLAG(int32_t, max_running, 16, "sequences decoded together");
ABSL_FLAG(int32_t, max_queue, 64, "waiting requests; more are refused with RESOURCE_EXHAUSTED");
ABSL_FLAG(int32_t, step_token_budget, 512, "tokens per engine step (decodes + prefill chunks)");
ABSL_FLAG(int64_t, kv_cache_bytes, 256LL << 20, "memory of the KV block pool in bytes");
ABSL_FLAG(int32_t, kv_block_size, 16, "positions per KV block");
ABSL_FLAG(std::string, device, "cpu", "backend: cpu or cuda (CUDA device 0)");
ABSL_FLAG(int32_t, threads, 0, "CPU threads; 0 = all hardware threads");
ABSL_FLAG(absl::Duration, drain_timeout, absl::Seconds(30),
          "on SIGTERM, how long in-flight requests may finish before they are cancelled");
ABSL_FLAG(int32_t, max_receive_bytes, 4 << 20, "largest gRPC request accepted");
ABSL_FLAG(int64_t, max_text_bytes, 1 << 20, "largest prompt text (or chat contents) accepted");
ABSL_FLAG(int32_t, default_max_tokens, 256, "max_tokens of requests that leave it unset");

namespace {

constexpr char kUsage[] = R"(usage: moa-server --model PATH [--plan PLAN] [flags]

  --model PATH             GGUF file or Hugging Face checkpoint directory (required)
  --plan PLAN              MoA plan (JSON); without one every head attends densely
  --host ADDR              address to listen on, gRPC and /metrics (default 0.0.0.0)
  --port N                 gRPC port, 0 picks a free one (default 50051)
  --metrics-port N         HTTP /metrics port, 0 picks a free one, -1 disables (default 9090)
  --max-running N          sequences decoded together (default 16)
  --max-queue N            waiting requests; more get RESOURCE_EXHAUSTED (default 64)
  --step-token-budget N    tokens per engine step, decodes + prefill chunks (default 512)
  --kv-cache-bytes N       memory of the KV block pool (default 268435456)
  --kv-block-size N        positions per KV block (default 16)
  --device D               backend: cpu or cuda, CUDA device 0 (default cpu)
  --threads N              CPU threads, 0 = all (default 0)
  --drain-timeout D        on SIGTERM/SIGINT, time in-flight requests get to finish (default 30s)
  --max-receive-bytes N    largest gRPC request (default 4194304)
  --max-text-bytes N       largest prompt text or chat contents (default 1048576)
  --default-max-tokens N   max_tokens of requests that leave it unset (default 256)

Each flag may also be set by the environment variable MOA_<FLAG>, e.g. MOA_MAX_RUNNING=32;
the command line wins.
)";

const std::vector<std::string> kFlags = {
    "model",          "plan",
    "host",           "port",
    "metrics_port",   "max_running",
    "max_queue",      "step_token_budget",
    "kv_cache_bytes", "kv_block_size",
    "device",         "threads",
    "drain_timeout",  "max_receive_bytes",
    "max_text_bytes", "default_max_tokens",
};

int UsageError(const std::string& what) {
  std::cerr << "moa-server: " << what << "\n\n" << kUsage;
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") {
      std::cout << kUsage;
      return 0;
    }
  }
  if (absl::Status s = moa::ParseFlagsWithEnv(argc, argv, kFlags, "MOA_"); !s.ok()) {
    return UsageError(std::string(s.message()));
  }
  moa::ServerOptions o;
  o.model_path = absl::GetFlag(FLAGS_model);
  o.plan_path = absl::GetFlag(FLAGS_plan);
  o.host = absl::GetFlag(FLAGS_host);
  o.port = absl::GetFlag(FLAGS_port);
  o.metrics_port = absl::GetFlag(FLAGS_metrics_port);
  o.engine.max_running = absl::GetFlag(FLAGS_max_running);
  o.engine.max_queue = absl::GetFlag(FLAGS_max_queue);
  o.engine.step_token_budget = absl::GetFlag(FLAGS_step_token_budget);
  o.engine.kv_cache_bytes = absl::GetFlag(FLAGS_kv_cache_bytes);
  o.engine.kv_block_size = absl::GetFlag(FLAGS_kv_block_size);
  o.device = absl::GetFlag(FLAGS_device);
  o.threads = absl::GetFlag(FLAGS_threads);
  o.drain_timeout = absl::GetFlag(FLAGS_drain_timeout);
  o.max_receive_bytes = absl::GetFlag(FLAGS_max_receive_bytes);
  o.max_text_bytes = absl::GetFlag(FLAGS_max_text_bytes);
  o.default_max_tokens = absl::GetFlag(FLAGS_default_max_tokens);

  if (o.model_path.empty()) return UsageError("--model is required");
  if (o.port < 0 || o.port > 65535) return UsageError("--port must be in [0, 65535]");
  if (o.metrics_port < -1 || o.metrics_port > 65535) {
    return UsageError("--metrics-port must be in [-1, 65535]");
  }
  if (o.engine.max_running < 1) return UsageError("--max-running must be at least 1");
  if (o.engine.max_queue < 0) return UsageError("--max-queue must be >= 0");
  if (o.engine.step_token_budget < 1) return UsageError("--step-token-budget must be >= 1");
  if (o.engine.kv_cache_bytes < 1) return UsageError("--kv-cache-bytes must be positive");
  if (o.engine.kv_block_size < 1) return UsageError("--kv-block-size must be positive");
  if (!moa::IsKnownDevice(o.device)) {
    return UsageError(absl::StrCat("--device must be cpu or cuda, got '", o.device, "'"));
  }
  if (o.threads < 0) return UsageError("--threads must be >= 0");
  if (o.drain_timeout < absl::ZeroDuration()) return UsageError("--drain-timeout must be >= 0");
  if (o.max_receive_bytes < 1024) return UsageError("--max-receive-bytes must be >= 1024");
  if (o.max_text_bytes < 1 || o.max_text_bytes >= o.max_receive_bytes) {
    return UsageError("--max-text-bytes must be positive and below --max-receive-bytes");
  }
  if (o.default_max_tokens < 1) return UsageError("--default-max-tokens must be >= 1");

  // Block the stop signals before any thread starts so that every thread inherits the mask and
  // only the sigwait below receives them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  absl::StatusOr<std::unique_ptr<moa::MoaServer>> server = moa::MoaServer::Start(o);
  if (!server.ok()) {
    std::cerr << "moa-server: " << server.status() << "\n";
    return 1;
  }
  std::cerr << "moa-server: serving " << o.model_path << " (device " << o.device << ") on "
            << o.host << ":" << (*server)->port();
  if ((*server)->metrics_port() > 0) {
    std::cerr << ", metrics on http://" << o.host << ":" << (*server)->metrics_port() << "/metrics";
  }
  std::cerr << std::endl;

  int sig = 0;
  sigwait(&stop_signals, &sig);
  std::cerr << "moa-server: " << (sig == SIGTERM ? "SIGTERM" : "SIGINT") << ", draining for up to "
            << absl::FormatDuration(o.drain_timeout) << std::endl;
  (*server)->Drain(o.drain_timeout);
  std::cerr << "moa-server: stopped" << std::endl;
  return 0;
}
