#include "kernels/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/backend.h"
#include "kernels/status_macros.h"

namespace moa {

absl::Status ValidateSamplingParams(const SamplingParams& p) {
  auto bad = [](const std::string& what) { return absl::InvalidArgumentError(what); };
  if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature)) {
    return bad(absl::StrCat("temperature must be >= 0, got ", p.temperature));
  }
  if (p.top_k < 0) return bad(absl::StrCat("top_k must be >= 0, got ", p.top_k));
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) {
    return bad(absl::StrCat("top_p must be in (0, 1], got ", p.top_p));
  }
  if (!(p.min_p >= 0.0f && p.min_p < 1.0f)) {
    return bad(absl::StrCat("min_p must be in [0, 1), got ", p.min_p));
  }
  if (!(p.repetition_penalty > 0.0f) || !std::isfinite(p.repetition_penalty)) {
    return bad(absl::StrCat("repetition_penalty must be > 0, got ", p.repetition_penalty));
  }
  if (!std::isfinite(p.presence_penalty) || std::abs(p.presence_penalty) > 2.0f) {
    return bad(absl::StrCat("presence_penalty must be in [-2, 2], got ", p.presence_penalty));
  }
  if (!std::isfinite(p.frequency_penalty) || std::abs(p.frequency_penalty) > 2.0f) {
    return bad(absl::StrCat("frequency_penalty must be in [-2, 2], got ", p.frequency_penalty));
  }
  return absl::OkStatus();
}

bool HasPenalties(const SamplingParams& p) {
  return p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f;
}

TokenCounts CountTokens(absl::Span<const int32_t> history, int32_t vocab) {
  TokenCounts c;
  AddTokenCounts(history, vocab, &c);
  return c;
}

void AddTokenCounts(absl::Span<const int32_t> tokens, int32_t vocab, TokenCounts* counts) {
  std::vector<int32_t> sorted;
  sorted.reserve(tokens.size());
  for (int32_t t : tokens) {
    if (t >= 0 && t < vocab) sorted.push_back(t);
  }
  if (sorted.empty()) return;
  std::sort(sorted.begin(), sorted.end());
  // Merge the sorted new tokens into the sorted (id, count) lists.
  TokenCounts merged;
  merged.ids.reserve(counts->ids.size() + sorted.size());
  merged.counts.reserve(counts->ids.size() + sorted.size());
  size_t i = 0, j = 0;
  while (i < counts->ids.size() || j < sorted.size()) {
    const bool old_first =
        j == sorted.size() || (i < counts->ids.size() && counts->ids[i] <= sorted[j]);
    const int32_t id = old_first ? counts->ids[i] : sorted[j];
    int32_t n = 0;
    if (i < counts->ids.size() && counts->ids[i] == id) n += counts->counts[i++];
    while (j < sorted.size() && sorted[j] == id) {
      ++n;
      ++j;
    }
    merged.ids.push_back(id);
    merged.counts.push_back(n);
  }
  *counts = std::move(merged);
}

absl::Status CheckSampleArgs(int64_t logit_rows, int64_t vocab, absl::Span<const SampleRow> rows,
                             size_t n_tokens) {
  if (static_cast<int64_t>(rows.size()) != logit_rows || n_tokens != rows.size()) {
    return absl::InvalidArgumentError(absl::StrCat("Sample: ", rows.size(), " rows and ", n_tokens,
                                                   " tokens for logits [", logit_rows, ", ", vocab,
                                                   "]"));
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    const SampleRow& r = rows[i];
    auto bad = [i](auto... parts) {
      return absl::InvalidArgumentError(absl::StrCat("Sample: row ", i, ": ", parts...));
    };
    if (absl::Status s = ValidateSamplingParams(r.params); !s.ok()) return bad(s.message());
    if (r.penalty_ids.size() != r.penalty_counts.size()) {
      return bad(r.penalty_ids.size(), " penalty ids but ", r.penalty_counts.size(), " counts");
    }
    for (size_t j = 0; j < r.penalty_ids.size(); ++j) {
      if (r.penalty_ids[j] < 0 || r.penalty_ids[j] >= vocab) {
        return bad("penalty id ", r.penalty_ids[j], " outside [0, ", vocab, ")");
      }
      if (j > 0 && r.penalty_ids[j] <= r.penalty_ids[j - 1]) {
        return bad("penalty ids not strictly ascending at ", j);
      }
      if (r.penalty_counts[j] < 1) return bad("penalty count ", r.penalty_counts[j], " < 1");
    }
    if (!(r.u >= 0.0 && r.u < 1.0)) return bad("u = ", r.u, " outside [0, 1)");
  }
  return absl::OkStatus();
}

int32_t SampleWithUniform(absl::Span<float> logits, const SampleRow& row) {
  const SamplingParams& p = row.params;
  const int32_t n = static_cast<int32_t>(logits.size());
  for (size_t j = 0; j < row.penalty_ids.size(); ++j) {
    float& l = logits[row.penalty_ids[j]];
    l = l > 0 ? l / p.repetition_penalty : l * p.repetition_penalty;
    // One rounding (fma) rather than whatever contraction the compiler picks: the device does
    // the same.
    l -= std::fma(p.frequency_penalty, static_cast<float>(row.penalty_counts[j]),
                  p.presence_penalty);
  }
  if (p.temperature == 0.0f) {
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  std::vector<int32_t> ids(n);
  std::iota(ids.begin(), ids.end(), 0);
  const int32_t k = p.top_k > 0 ? std::min(p.top_k, n) : n;
  auto by_logit = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), by_logit);
  ids.resize(k);
  std::vector<double> probs(k);
  const double top = logits[ids[0]];
  double sum = 0;
  for (int32_t i = 0; i < k; ++i) {
    probs[i] = std::exp((logits[ids[i]] - top) / p.temperature);
    sum += probs[i];
  }
  for (double& q : probs) q /= sum;
  int32_t keep = k;
  if (p.min_p > 0.0f) {
    const double floor = p.min_p * probs[0];
    while (keep > 1 && probs[keep - 1] < floor) --keep;
  }
  if (p.top_p < 1.0f) {
    double cum = 0;
    for (int32_t i = 0; i < keep; ++i) {
      cum += probs[i];
      if (cum >= p.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  const double total = std::accumulate(probs.begin(), probs.begin() + keep, 0.0);
  const double r = row.u * total;
  double cum = 0;
  for (int32_t i = 0; i < keep; ++i) {
    cum += probs[i];
    if (r < cum) return ids[i];
  }
  return ids[keep - 1];
}

// The host path: the logits come back, each row is picked by SampleWithUniform.
absl::Status Backend::Sample(const Tensor& logits, absl::Span<const SampleRow> rows,
                             absl::Span<int32_t> tokens) {
  const int64_t vocab = logits.cols();
  RETURN_IF_ERROR(CheckSampleArgs(logits.rows(), vocab, rows, tokens.size()));
  if (rows.empty()) return absl::OkStatus();
  std::vector<float> host(rows.size() * vocab);
  RETURN_IF_ERROR(CopyToHost(logits, absl::MakeSpan(host)));
  for (size_t i = 0; i < rows.size(); ++i) {
    tokens[i] = SampleWithUniform(absl::MakeSpan(host).subspan(i * vocab, vocab), rows[i]);
  }
  return absl::OkStatus();
}

}  // namespace moa
