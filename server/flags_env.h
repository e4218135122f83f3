// Command-line parsing for moa-server and moa-client on top of Abseil flags, with two additions:
// a flag not given on the command line is read from the environment variable <prefix><NAME>
// (e.g. MOA_MAX_RUNNING; the command line wins), and names may be written with dashes
// (--max-running) as well as underscores. Errors come back as a Status so that the programs can
// print their usage and exit with code 2 (absl::ParseCommandLine would exit with 1 itself).
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace moa {

// `names`: the flags (as declared, with underscores) the program accepts; `env_prefix` empty
// disables the environment. `--name value`, `--name=value`, and `--name` alone for booleans.
absl::Status ParseFlagsWithEnv(int argc, char** argv, const std::vector<std::string>& names,
                               absl::string_view env_prefix);

// The environment variable of flag `name`: prefix + upper-case name.
std::string FlagEnvName(absl::string_view env_prefix, absl::string_view name);

}  // namespace moa
