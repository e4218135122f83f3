#include "tests/test_util.h"

#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <vector>

namespace moa::testing {

std::string SourceDir() {
  if (const char* s = std::getenv("MOA_SOURCE_DIR"); s != nullptr && *s != '\0') return s;
  return MOA_SOURCE_DIR;
}

std::string DefaultModelPath() {
  if (const char* s = std::getenv("MOA_MODEL"); s != nullptr && *s != '\0') return s;
  return SourceDir() + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

std::string GeneratedDataDir() { return SourceDir() + "/tests/data/generated"; }

namespace {
std::vector<std::string>& TempDirs() {
  static auto* dirs = new std::vector<std::string>();
  return *dirs;
}
void RemoveTempDirs() {
  for (const auto& d : TempDirs()) {
    std::error_code ec;
    std::filesystem::remove_all(d, ec);
  }
}
}  // namespace

std::string MakeTempDir() {
  static std::once_flag once;
  std::call_once(once, [] { std::atexit(RemoveTempDirs); });
  std::string tmpl = (std::filesystem::temp_directory_path() / "moa-test-XXXXXX").string();
  char* made = mkdtemp(tmpl.data());
  if (made == nullptr) std::abort();
  TempDirs().push_back(made);
  return made;
}

bool FileExists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

}  // namespace moa::testing
