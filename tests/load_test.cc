// A bounded load test on loopback: 32 concurrent streams send 300 requests of mixed prompt and
// output lengths to the tiny model; every tenth is cancelled by its client midway. Checks: no
// errors but the expected cancellations, every other request generated exactly what it asked
// for, no per-call state or KV block left behind, and the metrics agree with what was sent.
// Prints throughput and latency percentiles.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "moa/v1/moa.grpc.pb.h"
#include "server/moa_server.h"
#include "tests/test_util.h"

namespace moa {
namespace {

constexpr int kStreams = 32;
constexpr int kRequests = 300;

struct Outcome {
  grpc::StatusCode code = grpc::StatusCode::OK;
  bool cancelled_by_client = false;
  int64_t prompt_tokens = 0;
  int64_t max_tokens = 0;
  int64_t tokens_received = 0;
  int64_t generated_reported = -1;  // from the final message, when it arrived
  double ttft = 0;                  // client-side, seconds
  double e2e = 0;
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())));
  return v[i];
}

double Sample(const std::string& text, const std::string& key) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (line.substr(0, key.size()) == key && line.size() > key.size() && line[key.size()] == ' ') {
      double v = -1;
      if (absl::SimpleAtod(line.substr(key.size() + 1), &v)) return v;
    }
  }
  return -1;
}

TEST(LoadTest, ConcurrentStreamsWithCancellations) {
  const std::string model = testing::GeneratedDataDir() + "/tiny/model-f32.gguf";
  ASSERT_TRUE(testing::FileExists(model))
      << model << " is missing: run .venv/bin/python tests/tools/make_tiny_model.py";
  ServerOptions o;
  o.model_path = model;
  o.host = "127.0.0.1";
  o.port = 0;
  o.metrics_port = -1;
  o.threads = 1;
  o.engine.max_running = 32;
  o.engine.max_queue = 64;  // never full: 32 clients have at most 32 requests outstanding
  absl::StatusOr<std::unique_ptr<MoaServer>> server = MoaServer::Start(o);
  ASSERT_TRUE(server.ok()) << server.status();
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", (*server)->port()),
                                     grpc::InsecureChannelCredentials());
  auto stub = v1::MoaService::NewStub(channel);

  std::vector<Outcome> outcomes(kRequests);
  std::atomic<int> next{0};
  const absl::Time start = absl::Now();
  std::vector<std::thread> clients;
  for (int c = 0; c < kStreams; ++c) {
    clients.emplace_back([&, c] {
      std::mt19937 rng(1234 + c);
      for (int i; (i = next.fetch_add(1)) < kRequests;) {
        Outcome& out = outcomes[i];
        // Mixed lengths within the tiny model's 128-token context.
        out.prompt_tokens = std::uniform_int_distribution<int>(1, 60)(rng);
        out.max_tokens = std::uniform_int_distribution<int>(1, 60)(rng);
        out.cancelled_by_client = i % 10 == 5;
        // A request to be cancelled asks for all the room left, so that on a loaded machine the
        // client's cancel still lands long before the end.
        if (out.cancelled_by_client) out.max_tokens = 128 - out.prompt_tokens;
        v1::GenerateRequest r;
        for (int t = 0; t < out.prompt_tokens; ++t) {
          r.mutable_token_ids()->add_ids(std::uniform_int_distribution<int>(3, 299)(rng));
        }
        r.set_max_tokens(static_cast<int32_t>(out.max_tokens));
        r.set_ignore_eos(true);
        r.mutable_sampling()->set_temperature(i % 3 == 0 ? 0.8f : 0.0f);
        r.mutable_sampling()->set_seed(i);
        grpc::ClientContext ctx;
        const absl::Time t0 = absl::Now();
        auto reader = stub->Generate(&ctx, r);
        v1::GenerateResponse m;
        while (reader->Read(&m)) {
          if (!m.token_ids().empty() && out.tokens_received == 0) {
            out.ttft = absl::ToDoubleSeconds(absl::Now() - t0);
          }
          out.tokens_received += m.token_ids_size();
          if (m.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
            out.generated_reported = m.generated_tokens();
          }
          // Cancel midway: after the first tokens, well before the 60 asked for.
          if (out.cancelled_by_client && out.tokens_received >= 3) ctx.TryCancel();
        }
        out.code = reader->Finish().error_code();
        out.e2e = absl::ToDoubleSeconds(absl::Now() - t0);
      }
    });
  }
  for (std::thread& t : clients) t.join();
  const double wall = absl::ToDoubleSeconds(absl::Now() - start);

  int ok = 0, cancelled = 0;
  int64_t tokens_ok = 0, tokens_cancelled = 0, prompt_total = 0;
  std::vector<double> ttft, e2e;
  for (int i = 0; i < kRequests; ++i) {
    const Outcome& out = outcomes[i];
    prompt_total += out.prompt_tokens;
    if (out.cancelled_by_client && out.code == grpc::StatusCode::CANCELLED) {
      ++cancelled;
      tokens_cancelled += out.tokens_received;
      continue;
    }
    // Anything else must have succeeded and generated exactly what it asked for (a request to
    // be cancelled may also finish first).
    ASSERT_EQ(out.code, grpc::StatusCode::OK) << "request " << i;
    ++ok;
    EXPECT_EQ(out.tokens_received, out.max_tokens) << "request " << i;
    EXPECT_EQ(out.generated_reported, out.max_tokens) << "request " << i;
    tokens_ok += out.tokens_received;
    ttft.push_back(out.ttft);
    e2e.push_back(out.e2e);
  }
  EXPECT_EQ(ok + cancelled, kRequests);
  EXPECT_GE(cancelled, kRequests / 10 / 4) << "cancellations should mostly land midway";

  // Nothing left behind.
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (absl::Now() < deadline && !(*server)->engine().CheckIdle().ok()) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_TRUE((*server)->engine().CheckIdle().ok()) << (*server)->engine().CheckIdle();
  // gRPC releases a call's state after the client has seen its status: wait for the last ones.
  while (absl::Now() < deadline && (*server)->call_states().released < kRequests) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  CallStateCounts calls = (*server)->call_states();
  EXPECT_EQ(calls.created, kRequests);
  EXPECT_EQ(calls.released, kRequests);

  // Metrics agree with what was sent.
  const std::string metrics = (*server)->metrics().Scrape();
  // A client may cancel after the server has already finished the request: the server then
  // counts it by length while the client sees CANCELLED.
  const double by_length = Sample(metrics, "moa_requests_finished_total{reason=\"length\"}");
  const double by_cancel = Sample(metrics, "moa_requests_finished_total{reason=\"cancelled\"}");
  EXPECT_EQ(by_length + by_cancel, kRequests);
  EXPECT_GE(by_length, ok);
  EXPECT_LE(by_cancel, cancelled);
  EXPECT_EQ(Sample(metrics, "moa_e2e_request_latency_seconds_count"), kRequests);
  const double preemptions = Sample(metrics, "moa_preemptions_total");
  EXPECT_EQ(preemptions, 0);
  EXPECT_EQ(Sample(metrics, "moa_prompt_tokens_total"), prompt_total);
  // A cancelled request may have generated a token or two its client never read.
  const double generated = Sample(metrics, "moa_generation_tokens_total");
  EXPECT_GE(generated, tokens_ok + tokens_cancelled);
  EXPECT_LE(generated, tokens_ok + cancelled * 128);
  EXPECT_EQ(Sample(metrics, "moa_kv_blocks_used"), 0);
  EXPECT_EQ(Sample(metrics, "moa_requests_running"), 0);
  EXPECT_EQ(Sample(metrics, "moa_requests_waiting"), 0);

  std::printf(
      "load: %d requests (%d ok, %d cancelled) over %d streams in %.2f s: %.1f requests/s, "
      "%.0f generated tokens/s\n"
      "  TTFT p50 %.1f ms, p90 %.1f ms, p99 %.1f ms | end-to-end p50 %.1f ms, p90 %.1f ms, "
      "p99 %.1f ms\n",
      kRequests, ok, cancelled, kStreams, wall, kRequests / wall, generated / wall,
      1e3 * Percentile(ttft, 0.5), 1e3 * Percentile(ttft, 0.9), 1e3 * Percentile(ttft, 0.99),
      1e3 * Percentile(e2e, 0.5), 1e3 * Percentile(e2e, 0.9), 1e3 * Percentile(e2e, 0.99));

  (*server)->Drain(absl::ZeroDuration());
  calls = (*server)->call_states();
  EXPECT_EQ(calls.created, calls.released);
}

}  // namespace
}  // namespace moa
