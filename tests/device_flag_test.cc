// The --device flag of `moa generate` and `moa-server`: a name that is no backend is a usage
// error (exit 2); `--device cuda` loads the CUDA backend plugin (kernels/backend_factory.h) and
// fails cleanly (exit 1, saying why) when there is no plugin, a broken one, or no usable GPU.
#include <dlfcn.h>
#include <sys/wait.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace moa {
namespace {

using ::testing::HasSubstr;

struct CommandResult {
  int code = -1;
  std::string output;  // stdout and stderr
};

// Runs `command` through the shell; its output is stdout, and stderr too `with_stderr`.
CommandResult RunCommand(const std::string& command, bool with_stderr = true) {
  const std::string out = testing::MakeTempDir() + "/out.txt";
  const std::string redirect = with_stderr ? " > " + out + " 2>&1" : " 2>/dev/null > " + out;
  const int status = std::system((command + redirect + " </dev/null").c_str());
  CommandResult r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(out);
  r.output.assign(std::istreambuf_iterator<char>(in), {});
  return r;
}

std::string TinyModel() {
  const std::string path = testing::GeneratedDataDir() + "/tiny/model-f32.gguf";
  EXPECT_TRUE(testing::FileExists(path))
      << path << " is missing: run .venv/bin/python tests/tools/make_tiny_model.py";
  return path;
}

std::string Generate(const std::string& device) {
  return absl::StrCat(MOA_BIN_DIR, "/moa generate --model ", TinyModel(),
                      " --prompt Hello --max-tokens 3 --temperature 0 --device ", device);
}

std::string Server(const std::string& flags) {
  return absl::StrCat(MOA_BIN_DIR, "/moa-server --model ", TinyModel(),
                      " --host 127.0.0.1 --port 0 --metrics-port -1 ", flags);
}

// Starts the server (its command line after `env`, e.g. variables to set), waits until it serves
// (or exits), SIGTERMs it and prints its exit code.
CommandResult RunServerUntilServing(const std::string& flags, const std::string& env = "") {
  const std::string log = testing::MakeTempDir() + "/server.log";
  const std::string script = absl::StrCat(
      env, " ", Server(flags), " 2>", log, " & pid=$!; for i in $(seq 1 600); do grep -q serving ",
      log, " && break; kill -0 $pid 2>/dev/null || break; sleep 0.05; done; kill -TERM $pid ",
      "2>/dev/null; wait $pid; echo exit=$?; cat ", log);
  return RunCommand("sh -c '" + script + "'");
}

TEST(DeviceFlag, UnknownDeviceIsAUsageError) {
  CommandResult r = RunCommand(Generate("bogus"));
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_THAT(r.output, HasSubstr("--device must be cpu or cuda, got 'bogus'"));
  EXPECT_THAT(r.output, HasSubstr("usage:"));

  r = RunCommand(Server("--device bogus"));
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_THAT(r.output, HasSubstr("--device must be cpu or cuda, got 'bogus'"));
  EXPECT_THAT(r.output, HasSubstr("usage: moa-server"));
  // The environment variable is checked the same way.
  r = RunCommand("MOA_DEVICE=gpu " + Server(""));
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_THAT(r.output, HasSubstr("got 'gpu'"));
}

TEST(DeviceFlag, CpuWorks) {
  CommandResult r = RunCommand(Generate("cpu"));
  EXPECT_EQ(r.code, 0) << r.output;
  r = RunServerUntilServing("--device cpu --threads 1");
  EXPECT_THAT(r.output, HasSubstr("exit=0"));
  EXPECT_THAT(r.output, HasSubstr("(device cpu)"));
}

// Where nvcc was found, the build puts the CUDA plugin in build/lib/, where build/bin/moa and
// moa-server find it without help (MOA_CUDA_PLUGIN_BUILT): --device cuda then works on a machine
// with a GPU and fails cleanly on one without (exit 1, FAILED_PRECONDITION: no usable GPU, with the
// CUDA error). A build without nvcc says so.
#ifdef MOA_CUDA_PLUGIN_BUILT
constexpr char kNoCudaError[] =
    "FAILED_PRECONDITION: --device cuda: CUDA: no usable GPU here (cudaError";
#else
constexpr char kNoCudaError[] =
    "FAILED_PRECONDITION: --device cuda: this program was built without the CUDA backend";
#endif

TEST(DeviceFlag, CudaWorksOrFailsCleanly) {
  CommandResult r = RunCommand("env -u MOA_CUDA_PLUGIN " + Generate("cuda"));
  if (r.code != 0) {
    EXPECT_EQ(r.code, 1) << r.output;
    EXPECT_THAT(r.output, HasSubstr(kNoCudaError));
    EXPECT_THAT(r.output, ::testing::Not(HasSubstr("usage:")));
  }
  r = RunServerUntilServing("--device cuda", "env -u MOA_CUDA_PLUGIN");
  if (r.output.find("serving") != std::string::npos) {
    EXPECT_THAT(r.output, HasSubstr("exit=0"));
    EXPECT_THAT(r.output, HasSubstr("(device cuda)"));
  } else {
    EXPECT_THAT(r.output, HasSubstr("exit=1"));
    EXPECT_THAT(r.output, HasSubstr(kNoCudaError));
  }
}

// A CPU backend behind the plugin entry points (tests/fake_backend_plugin.cc) takes the whole
// path a CUDA plugin takes: found through MOA_CUDA_PLUGIN, loaded, checked, its Backend used and
// destroyed by the program. It must generate what the CPU backend generates.
std::string FakePlugin(const std::string& mode = "") {
  return absl::StrCat("MOA_FAKE_PLUGIN=", mode, " MOA_CUDA_PLUGIN=", MOA_LIB_DIR,
                      "/libmoa_fake_backend_plugin.so ");
}

TEST(DeviceFlag, PluginBackendServes) {
  const CommandResult cpu = RunCommand(Generate("cpu"), /*with_stderr=*/false);
  ASSERT_EQ(cpu.code, 0) << cpu.output;
  ASSERT_FALSE(cpu.output.empty());
  const CommandResult plugin = RunCommand(FakePlugin() + Generate("cuda"), /*with_stderr=*/false);
  EXPECT_EQ(plugin.code, 0) << plugin.output;
  EXPECT_EQ(plugin.output, cpu.output);

  const CommandResult server = RunServerUntilServing("--device cuda", FakePlugin());
  EXPECT_THAT(server.output, HasSubstr("exit=0"));
  EXPECT_THAT(server.output, HasSubstr("(device cuda)"));
}

// Each way of failing to get a plugin is exit 1 with a message that says which and where.
void ExpectFails(const std::string& command, const std::string& message) {
  const CommandResult r = RunCommand(command);
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_THAT(r.output, HasSubstr(message));
  EXPECT_THAT(r.output, ::testing::Not(HasSubstr("usage:")));
}

// Without MOA_CUDA_PLUGIN the plugin is looked for in lib/ beside the program's directory, then in
// that directory: a copy of moa finds the stand-in at each place, and names both when it is at
// neither.
TEST(DeviceFlag, PluginIsFoundBesideTheProgram) {
  const std::string root = testing::MakeTempDir();
  const std::string bin = root + "/bin";
  const std::string lib = root + "/lib";
  const std::string copy =
      absl::StrCat("mkdir -p ", bin, " ", lib, " && cp ", MOA_BIN_DIR, "/moa ", bin, "/ && ");
  const std::string generate =
      absl::StrCat("env -u MOA_CUDA_PLUGIN ", bin, "/moa generate --model ", TinyModel(),
                   " --prompt Hello --max-tokens 3 --temperature 0 --device cuda");
#ifdef MOA_CUDA_PLUGIN_BUILT
  const std::string not_found =
      absl::StrCat("--device cuda: the CUDA backend plugin was not found at ", lib,
                   "/libmoa_cuda_backend.so or ", bin, "/libmoa_cuda_backend.so");
#else
  const std::string not_found = absl::StrCat(
      "--device cuda: this program was built without the CUDA backend (nvcc not found, or "
      "MOA_CUDA=OFF), and no CUDA backend plugin is at ",
      lib, "/libmoa_cuda_backend.so or ", bin, "/libmoa_cuda_backend.so");
#endif
  ExpectFails(copy + generate, not_found);

  const std::string fake = absl::StrCat(MOA_LIB_DIR, "/libmoa_fake_backend_plugin.so");
  CommandResult r =
      RunCommand(absl::StrCat("cp ", fake, " ", lib, "/libmoa_cuda_backend.so && ", generate));
  EXPECT_EQ(r.code, 0) << r.output;
  r = RunCommand(absl::StrCat("mv ", lib, "/libmoa_cuda_backend.so ", bin, " && ", generate));
  EXPECT_EQ(r.code, 0) << r.output;
}

TEST(DeviceFlag, PluginErrorsSayWhy) {
  const std::string generate = Generate("cuda");
  ExpectFails("MOA_CUDA_PLUGIN=/nonexistent/plugin.so " + generate,
              "--device cuda: MOA_CUDA_PLUGIN names /nonexistent/plugin.so, which does not exist");

  // A file that is no shared library: dlopen's error.
  ExpectFails(
      absl::StrCat("MOA_CUDA_PLUGIN=", TinyModel(), " ", generate),
      absl::StrCat("--device cuda: cannot load the CUDA backend plugin ", TinyModel(), ": "));

  // A shared library that is no plugin: the C library.
  Dl_info info;
  ASSERT_NE(dladdr(reinterpret_cast<void*>(&std::abort), &info), 0);
  ExpectFails(
      absl::StrCat("MOA_CUDA_PLUGIN=", info.dli_fname, " ", generate),
      absl::StrCat(info.dli_fname,
                   " is not a MoA backend plugin: it lacks moa_backend_plugin_abi_version"));

  ExpectFails(FakePlugin("abi") + generate,
              "libmoa_fake_backend_plugin.so was built for backend ABI ");
  ExpectFails(FakePlugin("fail") + generate, "--device cuda: fake plugin: device 0 is not there");

  const CommandResult server = RunServerUntilServing("--device cuda", FakePlugin("fail"));
  EXPECT_THAT(server.output, HasSubstr("exit=1"));
  EXPECT_THAT(server.output, HasSubstr("--device cuda: fake plugin: device 0 is not there"));
}

}  // namespace
}  // namespace moa
