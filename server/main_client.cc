// moa-client: streams one generation from a moa-server to stdout and prints the final stats on
// stderr. A non-OK gRPC status prints its code and message and exits 1; bad flags exit 2.
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "moa/v1/moa.grpc.pb.h"
#include "server/flags_env.h"

ABSL_FLAG(std::string, address, "localhost:50051", "server address (env MOA_ADDRESS)");
ABSL_FLAG(std::string, prompt, "", "plain text prompt");
ABSL_FLAG(std::string, chat, "", "a user message, rendered with the model's chat template");
ABSL_FLAG(std::string, system, "", "system message for --chat");
ABSL_FLAG(int32_t, max_tokens, 0, "tokens to generate at most; 0 = the server's default");
ABSL_FLAG(float, temperature, 0.0f, "0 = greedy");
ABSL_FLAG(float, top_p, 1.0f, "nucleus sampling, in (0, 1]");
ABSL_FLAG(int32_t, top_k, 0, "0 = off");
ABSL_FLAG(float, min_p, 0.0f, "in [0, 1)");
ABSL_FLAG(float, repetition_penalty, 1.0f, "> 0; 1 = off");
ABSL_FLAG(float, presence_penalty, 0.0f, "in [-2, 2]");
ABSL_FLAG(float, frequency_penalty, 0.0f, "in [-2, 2]");
ABSL_FLAG(uint64_t, seed, 0, "random seed");
ABSL_FLAG(std::vector<std::string>, stop, {}, "stop strings, comma-separated");
ABSL_FLAG(bool, ignore_eos, false, "keep generating past end-of-generation tokens");
ABSL_FLAG(absl::Duration, timeout, absl::ZeroDuration(), "call deadline; 0 = none");

namespace {

constexpr char kUsage[] = R"(usage: moa-client (--prompt TEXT | --chat TEXT [--system TEXT]) [flags]

  --address HOST:PORT      server (default localhost:50051; env MOA_ADDRESS)
  --prompt TEXT            plain text prompt
  --chat TEXT              a user message, rendered with the model's chat template
  --system TEXT            system message for --chat
  --max-tokens N           0 = the server's default
  --temperature T          0 = greedy (default)
  --top-p P  --top-k K  --min-p P  --seed S
  --repetition-penalty R  --presence-penalty P  --frequency-penalty F
  --stop A,B               stop strings
  --ignore-eos             keep generating past end-of-generation tokens
  --timeout D              call deadline, e.g. 30s (default: none)
)";

const std::vector<std::string> kFlags = {"address",
                                         "prompt",
                                         "chat",
                                         "system",
                                         "max_tokens",
                                         "temperature",
                                         "top_p",
                                         "top_k",
                                         "min_p",
                                         "seed",
                                         "stop",
                                         "ignore_eos",
                                         "timeout",
                                         "repetition_penalty",
                                         "presence_penalty",
                                         "frequency_penalty"};

const char* ReasonName(moa::v1::FinishReason r) {
  switch (r) {
    case moa::v1::FINISH_REASON_EOS:
      return "eos";
    case moa::v1::FINISH_REASON_LENGTH:
      return "length";
    case moa::v1::FINISH_REASON_STOP:
      return "stop";
    case moa::v1::FINISH_REASON_CANCELLED:
      return "cancelled";
    case moa::v1::FINISH_REASON_DEADLINE:
      return "deadline";
    case moa::v1::FINISH_REASON_ERROR:
      return "error";
    default:
      return "none";
  }
}

int UsageError(const std::string& what) {
  std::cerr << "moa-client: " << what << "\n\n" << kUsage;
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
  // Only the address comes from the environment: a prompt in the environment would surprise.
  if (absl::Status s = moa::ParseFlagsWithEnv(argc, argv, kFlags, ""); !s.ok()) {
    return UsageError(std::string(s.message()));
  }
  std::string address = absl::GetFlag(FLAGS_address);
  if (const char* env = std::getenv("MOA_ADDRESS"); env != nullptr) {
    bool given = false;
    for (int i = 1; i < argc; ++i) given |= std::string(argv[i]).rfind("--address", 0) == 0;
    if (!given) address = env;
  }
  const std::string prompt = absl::GetFlag(FLAGS_prompt);
  const std::string chat = absl::GetFlag(FLAGS_chat);
  if (prompt.empty() == chat.empty()) return UsageError("give exactly one of --prompt or --chat");
  if (!absl::GetFlag(FLAGS_system).empty() && chat.empty()) {
    return UsageError("--system needs --chat");
  }

  moa::v1::GenerateRequest req;
  if (!prompt.empty()) {
    req.set_text(prompt);
  } else {
    if (!absl::GetFlag(FLAGS_system).empty()) {
      moa::v1::ChatMessage* m = req.mutable_chat()->add_messages();
      m->set_role("system");
      m->set_content(absl::GetFlag(FLAGS_system));
    }
    moa::v1::ChatMessage* m = req.mutable_chat()->add_messages();
    m->set_role("user");
    m->set_content(chat);
  }
  moa::v1::SamplingParams* s = req.mutable_sampling();
  s->set_temperature(absl::GetFlag(FLAGS_temperature));
  s->set_top_p(absl::GetFlag(FLAGS_top_p));
  s->set_top_k(absl::GetFlag(FLAGS_top_k));
  s->set_min_p(absl::GetFlag(FLAGS_min_p));
  s->set_repetition_penalty(absl::GetFlag(FLAGS_repetition_penalty));
  s->set_presence_penalty(absl::GetFlag(FLAGS_presence_penalty));
  s->set_frequency_penalty(absl::GetFlag(FLAGS_frequency_penalty));
  s->set_seed(absl::GetFlag(FLAGS_seed));
  if (absl::GetFlag(FLAGS_max_tokens) != 0) req.set_max_tokens(absl::GetFlag(FLAGS_max_tokens));
  for (const std::string& stop : absl::GetFlag(FLAGS_stop)) req.add_stop(stop);
  req.set_ignore_eos(absl::GetFlag(FLAGS_ignore_eos));

  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  auto stub = moa::v1::MoaService::NewStub(channel);
  grpc::ClientContext ctx;
  if (const absl::Duration t = absl::GetFlag(FLAGS_timeout); t > absl::ZeroDuration()) {
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + t));
  }
  auto reader = stub->Generate(&ctx, req);
  moa::v1::GenerateResponse chunk;
  moa::v1::GenerateResponse last;
  int64_t request_id = 0;
  while (reader->Read(&chunk)) {
    if (chunk.request_id() != 0) request_id = chunk.request_id();
    std::fwrite(chunk.text().data(), 1, chunk.text().size(), stdout);
    std::fflush(stdout);
    if (chunk.finish_reason() != moa::v1::FINISH_REASON_UNSPECIFIED) last = chunk;
  }
  std::fputc('\n', stdout);
  const grpc::Status status = reader->Finish();
  if (last.finish_reason() != moa::v1::FINISH_REASON_UNSPECIFIED) {
    const moa::v1::Timings& t = last.timings();
    std::cerr << absl::StrFormat(
        "[request %d | finish: %s%s | prompt %d tokens, generated %d | queued %.3f s, "
        "ttft %.3f s, total %.3f s, %.1f tokens/s]\n",
        request_id, ReasonName(last.finish_reason()),
        last.stop_matched().empty() ? "" : " (" + last.stop_matched() + ")", last.prompt_tokens(),
        last.generated_tokens(), t.queued_seconds(), t.ttft_seconds(), t.total_seconds(),
        t.total_seconds() > t.ttft_seconds()
            ? (last.generated_tokens() - 1) / (t.total_seconds() - t.ttft_seconds())
            : 0.0);
  }
  if (!status.ok()) {
    std::cerr << "moa-client: "
              << absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code()))
              << ": " << status.error_message() << "\n";
    return 1;
  }
  return 0;
}
