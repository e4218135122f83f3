#include "server/flags_env.h"

#include <cstdlib>
#include <optional>

#include "absl/container/flat_hash_set.h"
#include "absl/flags/commandlineflag.h"
#include "absl/flags/reflection.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"

namespace moa {

std::string FlagEnvName(absl::string_view env_prefix, absl::string_view name) {
  return absl::StrCat(env_prefix, absl::AsciiStrToUpper(name));
}

absl::Status ParseFlagsWithEnv(int argc, char** argv, const std::vector<std::string>& names,
                               absl::string_view env_prefix) {
  const absl::flat_hash_set<std::string> known(names.begin(), names.end());
  absl::flat_hash_set<std::string> given;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0 || arg.size() == 2) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", arg, "'"));
    }
    std::string name = arg.substr(2);
    std::optional<std::string> value;
    if (const size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    name = absl::StrReplaceAll(name, {{"-", "_"}});
    absl::CommandLineFlag* flag = known.contains(name) ? absl::FindCommandLineFlag(name) : nullptr;
    if (flag == nullptr) return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    if (!value) {
      if (flag->IsOfType<bool>()) {
        value = "true";
      } else if (i + 1 < argc) {
        value = argv[++i];
      } else {
        return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
      }
    }
    if (!given.insert(name).second) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " given twice"));
    }
    std::string error;
    if (!flag->ParseFrom(*value, &error)) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, ": ", error));
    }
  }
  if (env_prefix.empty()) return absl::OkStatus();
  for (const std::string& name : names) {
    if (given.contains(name)) continue;
    const std::string env = FlagEnvName(env_prefix, name);
    const char* value = std::getenv(env.c_str());
    if (value == nullptr) continue;
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    if (flag == nullptr)
      return absl::InternalError(absl::StrCat("flag --", name, " is not defined"));
    std::string error;
    if (!flag->ParseFrom(value, &error)) {
      return absl::InvalidArgumentError(absl::StrCat("environment variable ", env, ": ", error));
    }
  }
  return absl::OkStatus();
}

}  // namespace moa
