#include "kernels/backend_factory.h"

#include <dlfcn.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/cuda/cuda_plugin.h"

namespace moa {
namespace {

namespace fs = std::filesystem;

absl::Status PluginError(absl::string_view what) {
  return absl::FailedPreconditionError(absl::StrCat("--device cuda: ", what));
}

// Where the plugin may be beside the program, in the order tried (kernels/backend_factory.h).
std::vector<std::string> PluginCandidates() {
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (ec) return {};
  const fs::path dir = exe.parent_path();
  return {(dir.parent_path() / "lib" / kCudaPluginFile).string(), (dir / kCudaPluginFile).string()};
}

// Loads the plugin: its constructor function, or why not. The library is never unloaded, since
// the backends it makes run its code.
absl::StatusOr<PluginNewFn> LoadPlugin() {
  const char* env = std::getenv("MOA_CUDA_PLUGIN");
  const bool from_env = env != nullptr && *env != '\0';
  const std::vector<std::string> candidates =
      from_env ? std::vector<std::string>{env} : PluginCandidates();
  for (const std::string& path : candidates) {
    std::error_code ec;
    if (!fs::exists(path, ec)) continue;
    // RTLD_LOCAL: the plugin's symbols stay out of the program's way.
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      return PluginError(
          absl::StrCat("cannot load the CUDA backend plugin ", path, ": ", dlerror()));
    }
    auto abi = reinterpret_cast<PluginAbiFn>(dlsym(handle, kPluginAbiSymbol));
    auto make = reinterpret_cast<PluginNewFn>(dlsym(handle, kPluginNewSymbol));
    if (abi == nullptr || make == nullptr) {
      return PluginError(absl::StrCat(path, " is not a MoA backend plugin: it lacks ",
                                      abi == nullptr ? kPluginAbiSymbol : kPluginNewSymbol));
    }
    if (const int version = abi(); version != MOA_BACKEND_ABI) {
      return PluginError(absl::StrCat("the CUDA backend plugin ", path,
                                      " was built for backend ABI ", version, ", this program has ",
                                      MOA_BACKEND_ABI, ": build them together"));
    }
    return make;
  }
  if (from_env) {
    return PluginError(absl::StrCat("MOA_CUDA_PLUGIN names ", env, ", which does not exist"));
  }
  if (candidates.empty()) return PluginError("cannot read /proc/self/exe to find the CUDA plugin");
#ifdef MOA_CUDA_PLUGIN_BUILT
  return PluginError(absl::StrCat("the CUDA backend plugin was not found at ",
                                  absl::StrJoin(candidates, " or "),
                                  " (set MOA_CUDA_PLUGIN to its path)"));
#else
  return PluginError(absl::StrCat(
      "this program was built without the CUDA backend (nvcc not found, or MOA_CUDA=OFF), and no "
      "CUDA backend plugin is at ",
      absl::StrJoin(candidates, " or ")));
#endif
}

absl::StatusOr<std::unique_ptr<Backend>> NewCudaBackend() {
  // Loaded once per process, thread-safely; the outcome (a failure too) stays.
  static const absl::StatusOr<PluginNewFn>* const plugin =
      new absl::StatusOr<PluginNewFn>(LoadPlugin());
  if (!plugin->ok()) return plugin->status();
  int code = static_cast<int>(absl::StatusCode::kInternal);
  char error[1024] = "";
  Backend* backend = (**plugin)(/*device=*/0, &code, error, sizeof(error));
  if (backend != nullptr) return std::unique_ptr<Backend>(backend);
  const auto status_code = static_cast<absl::StatusCode>(code);
  return absl::Status(
      status_code == absl::StatusCode::kOk ? absl::StatusCode::kInternal : status_code,
      absl::StrCat("--device cuda: ", error));
}

}  // namespace

bool IsKnownDevice(absl::string_view device) { return device == "cpu" || device == "cuda"; }

absl::StatusOr<std::unique_ptr<Backend>> NewBackend(absl::string_view device, int threads) {
  if (device == "cpu") return NewCpuBackend(threads);
  if (device == "cuda") return NewCudaBackend();
  return absl::InvalidArgumentError(
      absl::StrCat("unknown device '", device, "': expected cpu or cuda"));
}

}  // namespace moa
