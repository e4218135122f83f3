// The `moa` program as a user runs it: exit codes, usage, streaming output, error messages.
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace moa {
namespace {

using ::testing::HasSubstr;

struct CliRun {
  int exit_code;
  std::string out;  // stdout
  std::string err;  // stderr
};

CliRun RunMoa(const std::string& args) {
  const std::string dir = testing::MakeTempDir();
  const std::string cmd =
      std::string(MOA_BIN_DIR) + "/moa " + args + " >" + dir + "/out 2>" + dir + "/err </dev/null";
  const int status = std::system(cmd.c_str());
  auto slurp = [](const std::string& path) {
    std::ifstream in(path);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(dir + "/out"), slurp(dir + "/err")};
}

TEST(Cli, BadUsageExitsWithTwoAndPrintsUsage) {
  const std::string model = "--model " + testing::DefaultModelPath();
  const struct {
    std::string args;
    std::string message;
  } cases[] = {
      {"", "missing command"},
      {"frobnicate", "unknown command"},
      {"generate --prompt hi", "--model is required"},
      {"generate " + model, "exactly one of --prompt or --prompt-file"},
      {"generate " + model + " --prompt a --prompt-file b", "exactly one of"},
      {"generate " + model + " --prompt hi --bogus 1", "unknown flag --bogus"},
      {"generate " + model + " --prompt hi --max-tokens abc", "--max-tokens needs a number"},
      {"generate " + model + " --prompt hi --max-tokens 0", "--max-tokens must be at least 1"},
      {"generate " + model + " --prompt hi --temperature -1", "temperature must be >= 0"},
      {"generate " + model + " --prompt hi --top-p 0", "top_p must be in (0, 1]"},
      {"generate " + model + " --prompt hi --top-p 1.5", "top_p"},
      {"generate " + model + " --prompt hi --top-k -2", "top_k"},
      {"generate " + model + " --prompt hi --max-tokens", "--max-tokens needs a value"},
      {"generate " + model + " --prompt hi --chat=yes", "--chat takes no value"},
      {"generate " + model + " --prompt hi --system x", "--system needs --chat"},
      {"generate " + model + " --prompt ''", "the prompt is empty"},
      {"generate " + model + " --prompt hi --seed 1 --seed 2", "given twice"},
  };
  for (const auto& c : cases) {
    const CliRun r = RunMoa(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << "\n" << r.err;
    EXPECT_THAT(r.err, HasSubstr(c.message)) << c.args;
    EXPECT_THAT(r.err, HasSubstr("usage:")) << c.args;
  }
}

TEST(Cli, HelpExitsZero) {
  const CliRun r = RunMoa("--help");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.out, HasSubstr("moa generate --model PATH"));
}

TEST(Cli, UnusableInputsExitWithOneAndSayWhy) {
  const std::string dir = testing::MakeTempDir();
  { std::ofstream(dir + "/junk.bin") << "this is not a model"; }
  CliRun r = RunMoa("generate --model /nonexistent/model.gguf --prompt hi");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("/nonexistent/model.gguf"));
  r = RunMoa("generate --model " + dir + "/junk.bin --prompt hi");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_FALSE(r.err.empty());
  r = RunMoa("generate --model " + testing::DefaultModelPath() + " --prompt-file " + dir +
             "/missing.txt");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("cannot open prompt file"));
}

class CliWithModel : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!testing::FileExists(testing::DefaultModelPath())) {
      GTEST_SKIP() << "default model absent: run scripts/setup.sh";
    }
  }
  std::string model_ = "--model " + testing::DefaultModelPath() + " --threads 2";
};

TEST_F(CliWithModel, GeneratesAndReportsSpeed) {
  const CliRun r = RunMoa(
      "generate " + model_ +
      " --chat --prompt 'What is the capital of France? Answer in one sentence.' --max-tokens 16 "
      "--temperature 0");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("Paris"));
  EXPECT_THAT(r.err, HasSubstr("tokens/s"));
  EXPECT_THAT(r.err, HasSubstr("prompt:"));
}

TEST_F(CliWithModel, SameSeedSameText) {
  const std::string args = "generate " + model_ +
                           " --prompt 'Once upon a time' --max-tokens 10 --temperature 0.9 "
                           "--seed 7";
  const CliRun a = RunMoa(args);
  const CliRun b = RunMoa(args);
  ASSERT_EQ(a.exit_code, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
}

TEST_F(CliWithModel, PlanThatDoesNotFitIsRejected) {
  const std::string dir = testing::MakeTempDir();
  { std::ofstream(dir + "/plan.json") << R"({"alphas": [[0, 0]], "betas": [[0, 0]]})"; }
  const CliRun r = RunMoa("generate " + model_ + " --plan " + dir + "/plan.json --prompt hi");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("layers"));
}

TEST_F(CliWithModel, InfoPrintsTheModel) {
  const CliRun r = RunMoa("info --model " + testing::DefaultModelPath());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("layers 30"));
  EXPECT_THAT(r.out, HasSubstr("kv heads 3"));
}

}  // namespace
}  // namespace moa
