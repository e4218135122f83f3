// Stop strings over streamed text: finds the first stop string in the generated text and holds
// back any tail that could still become the start of one, so that a stop string is never sent,
// not even in part.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace moa {

class StopMatcher {
 public:
  // Every stop string must be non-empty.
  explicit StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {}

  struct Result {
    std::string text;  // what can be sent now
    int matched = -1;  // index of the stop string found, -1 if none
  };

  // Appends newly decoded text. If a stop string now occurs, returns the text before the
  // earliest occurrence and its index (the text after it is dropped); otherwise returns all but
  // the longest tail that is a proper prefix of some stop string. The tail of valid UTF-8 text
  // that equals the start of a valid UTF-8 stop string begins at a character boundary, so the
  // cut never splits a character.
  Result Add(std::string_view text);
  // Whatever is held back (when generation ends for another reason).
  std::string Flush();

 private:
  std::vector<std::string> stops_;
  std::string held_;
};

}  // namespace moa
