// libFuzzer target: arbitrary bytes as the content of a Hugging Face config.json.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "engine/model/hf_loader.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)moa::ParseHfConfig(std::string_view(reinterpret_cast<const char*>(data), size));
  return 0;
}
