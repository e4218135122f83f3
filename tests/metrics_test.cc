// Scrapes the server's HTTP /metrics endpoint (a plain HTTP GET on loopback) after known traffic
// on the tiny model and checks the values against what was sent.
#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <map>
#include <memory>
#include <sstream>
#include <string>

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

// GET http://127.0.0.1:port/metrics; the body, or empty on failure.
std::string HttpGetMetrics(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string response;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const std::string req = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if (write(fd, req.data(), req.size()) == static_cast<ssize_t>(req.size())) {
      char buf[4096];
      for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) response.append(buf, n);
    }
  }
  close(fd);
  const size_t body = response.find("\r\n\r\n");
  if (response.rfind("HTTP/1.", 0) != 0 || response.find(" 200 ") == std::string::npos ||
      body == std::string::npos) {
    return "";
  }
  return response.substr(body + 4);
}

// Sample lines "name{labels} value" -> value, keyed by "name{labels}".
std::map<std::string, double> ParseSamples(const std::string& text) {
  std::map<std::string, double> out;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    double v;
    if (space == absl::string_view::npos || !absl::SimpleAtod(line.substr(space + 1), &v)) {
      continue;
    }
    out[std::string(line.substr(0, space))] = v;
  }
  return out;
}

TEST(MetricsTest, EndpointReportsTheTrafficSent) {
  const std::string model = testing::GeneratedDataDir() + "/tiny/model-f32.gguf";
  ASSERT_TRUE(testing::FileExists(model))
      << model << " is missing: run .venv/bin/python tests/tools/make_tiny_model.py";
  ServerOptions o;
  o.model_path = model;
  o.host = "127.0.0.1";
  o.port = 0;
  o.metrics_port = 0;
  o.threads = 1;
  absl::StatusOr<std::unique_ptr<MoaServer>> server = MoaServer::Start(o);
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->metrics_port();
  ASSERT_GT(port, 0);
  auto stub = v1::MoaService::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", (*server)->port()), grpc::InsecureChannelCredentials()));

  // Known traffic: 5 generations of prompt i+2 tokens and 3i+1 generated tokens (ignore_eos so
  // that each ends by length), 2 invalid requests.
  int64_t prompt_sent = 0, generated_sent = 0;
  for (int i = 0; i < 5; ++i) {
    v1::GenerateRequest r;
    for (int t = 0; t < i + 2; ++t) r.mutable_token_ids()->add_ids(40 + t);
    r.set_max_tokens(3 * i + 1);
    r.set_ignore_eos(true);
    prompt_sent += i + 2;
    generated_sent += 3 * i + 1;
    grpc::ClientContext ctx;
    auto reader = stub->Generate(&ctx, r);
    v1::GenerateResponse m;
    while (reader->Read(&m)) {
    }
    ASSERT_TRUE(reader->Finish().ok());
    EXPECT_EQ(m.generated_tokens(), 3 * i + 1);
  }
  for (int i = 0; i < 2; ++i) {
    v1::GenerateRequest r;
    r.set_text("");
    grpc::ClientContext ctx;
    auto reader = stub->Generate(&ctx, r);
    v1::GenerateResponse m;
    while (reader->Read(&m)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }

  const std::string body = HttpGetMetrics(port);
  ASSERT_FALSE(body.empty()) << "no /metrics response on port " << port;
  // The endpoint adds the exporter's own exposer_* metrics to the server's.
  EXPECT_NE(body.find((*server)->metrics().Scrape()), std::string::npos)
      << "HTTP and in-process views differ";
  const std::map<std::string, double> m = ParseSamples(body);
  auto value = [&](const std::string& key) {
    auto it = m.find(key);
    EXPECT_NE(it, m.end()) << key << " missing from /metrics:\n" << body;
    return it == m.end() ? -1.0 : it->second;
  };
  EXPECT_EQ(value("moa_prompt_tokens_total"), prompt_sent);
  EXPECT_EQ(value("moa_generation_tokens_total"), generated_sent);
  EXPECT_EQ(value("moa_requests_finished_total{reason=\"length\"}"), 5);
  EXPECT_EQ(value("moa_requests_rejected_total{code=\"INVALID_ARGUMENT\"}"), 2);
  EXPECT_EQ(value("moa_time_to_first_token_seconds_count"), 5);
  EXPECT_EQ(value("moa_request_queue_time_seconds_count"), 5);
  EXPECT_EQ(value("moa_e2e_request_latency_seconds_count"), 5);
  // Every generated token after a request's first has an inter-token gap.
  EXPECT_EQ(value("moa_inter_token_latency_seconds_count"), generated_sent - 5);
  // The ITL buckets start at 1 ms.
  EXPECT_NE(m.find("moa_inter_token_latency_seconds_bucket{le=\"0.001\"}"), m.end());
  EXPECT_GE(value("moa_step_duration_seconds_count"), 1);
  EXPECT_EQ(value("moa_batch_size_count"), value("moa_step_duration_seconds_count"));
  EXPECT_EQ(value("moa_preemptions_total"), 0);
  EXPECT_EQ(value("moa_requests_running"), 0);
  EXPECT_EQ(value("moa_requests_waiting"), 0);
  EXPECT_EQ(value("moa_kv_blocks_used"), 0);
  EXPECT_GT(value("moa_kv_blocks_total"), 0);
  EXPECT_EQ(value("moa_kv_cache_usage_ratio"), 0);
  // Dense model: the plan saves nothing.
  EXPECT_EQ(value("moa_kv_bytes_saved"), 0);
  (*server)->Drain(absl::ZeroDuration());
  EXPECT_TRUE((*server)->engine().CheckIdle().ok());
}

}  // namespace
}  // namespace moa
