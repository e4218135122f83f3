#include "engine/stop_matcher.h"

#include <algorithm>

namespace moa {

StopMatcher::Result StopMatcher::Add(std::string_view text) {
  held_.append(text);
  Result r;
  if (stops_.empty()) {
    r.text = std::move(held_);
    held_.clear();
    return r;
  }
  // The earliest occurrence wins; at equal positions the first stop string listed.
  size_t best = std::string::npos;
  for (size_t i = 0; i < stops_.size(); ++i) {
    const size_t pos = held_.find(stops_[i]);
    if (pos < best) {
      best = pos;
      r.matched = static_cast<int>(i);
    }
  }
  if (r.matched >= 0) {
    r.text = held_.substr(0, best);
    held_.clear();
    return r;
  }
  // No stop string is complete, so any occurrence to come starts inside a tail that is a proper
  // prefix of that stop string: keep the longest such tail.
  size_t keep = 0;
  for (const std::string& s : stops_) {
    for (size_t k = std::min(s.size() - 1, held_.size()); k > keep; --k) {
      if (std::string_view(held_).substr(held_.size() - k) == std::string_view(s).substr(0, k)) {
        keep = k;
        break;
      }
    }
  }
  r.text = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return r;
}

std::string StopMatcher::Flush() {
  std::string out = std::move(held_);
  held_.clear();
  return out;
}

}  // namespace moa
