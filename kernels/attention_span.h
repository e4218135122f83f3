// Which keys an attention head sees: sink tokens plus a sliding window whose length follows the
// head's elastic rule S(N) = alpha + beta * N (docs/moa-method.md §1, §3).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace moa {

struct SpanRule {
  bool dense = true;  // sees every earlier token; alpha/beta unused
  int64_t alpha = 0;
  double beta = 0.0;
};

struct SpanParams {
  int64_t sink = 64;   // first tokens every head always sees
  int64_t block = 64;  // granularity of the rule, as in the method's block masks
};

// Span in tokens at sequence length n (sink included): alpha rounded down to whole blocks, as in
// the method's block masks, plus floor(beta * n), never less than one block beyond the sink so a
// head always sees its recent tokens. The growing term is rounded to tokens, not blocks: with
// 0 <= beta <= 1 the span then grows by at most one token per token, so the window's left edge
// never moves left and a key that left the window never re-enters it (its KV block can be freed
// for good). Rounding beta * n to blocks would make the span jump a block at once and pull the
// left edge back.
inline int64_t SpanTokens(const SpanRule& r, const SpanParams& p, int64_t n) {
  if (r.dense) return n;
  const int64_t alpha_blocks =
      static_cast<int64_t>(std::floor(static_cast<double>(r.alpha) / static_cast<double>(p.block)));
  const int64_t s =
      p.block * alpha_blocks + static_cast<int64_t>(std::floor(r.beta * static_cast<double>(n)));
  return std::max<int64_t>(s, p.sink + p.block);
}

// For a query at position `pos` (0-based; the sequence then has n = pos + 1 tokens): the key
// positions seen are [0, sink_end) and [window_begin, pos]. The two ranges may overlap.
struct VisibleKeys {
  int64_t sink_end;
  int64_t window_begin;
};

inline VisibleKeys VisibleKeysAt(const SpanRule& r, const SpanParams& p, int64_t pos) {
  const int64_t n = pos + 1;
  const int64_t span = SpanTokens(r, p, n);
  if (span >= n) return {0, 0};  // everything, expressed as a window from 0
  const int64_t window = span - p.sink;
  return {std::min(p.sink, n), n - window};
}

// True if the query at `q_pos` sees the key at `k_pos` (k_pos <= q_pos).
inline bool IsVisible(const SpanRule& r, const SpanParams& p, int64_t q_pos, int64_t k_pos) {
  if (k_pos > q_pos) return false;
  const VisibleKeys v = VisibleKeysAt(r, p, q_pos);
  return k_pos < v.sink_end || k_pos >= v.window_begin;
}

}  // namespace moa
