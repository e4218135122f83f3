// Picking a token from a row of logits: greedy, or temperature sampling filtered by top-k, min-p
// and top-p, after repetition / presence / frequency penalties on the tokens seen so far.
//
// The random draw is not made here: the caller passes one uniform u in [0, 1) per sampled token
// (engine/sampler.h draws it from the request's seeded generator). Everything else is a pure
// function of (logits, seen tokens, parameters, u), written down step by step below so that a
// device implementation (kernels/cuda/sampling.h) follows the same arithmetic and picks the same
// token except where u lies within rounding of a boundary of the cumulative distribution.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace moa {

struct SamplingParams {
  float temperature = 0.0f;         // 0 = greedy
  int32_t top_k = 0;                // 0 = off
  float top_p = 1.0f;               // in (0, 1]
  float min_p = 0.0f;               // in [0, 1)
  float repetition_penalty = 1.0f;  // > 0; 1 = off (divides positive logits, as in HF/llama.cpp)
  float presence_penalty = 0.0f;    // subtracted once from every token already seen
  float frequency_penalty = 0.0f;   // subtracted per occurrence
  uint64_t seed = 0;                // for the caller's generator; unused by the pick itself
};

// INVALID_ARGUMENT naming the first bad field.
absl::Status ValidateSamplingParams(const SamplingParams& p);

// Whether any penalty is on (only then do the seen tokens matter).
bool HasPenalties(const SamplingParams& p);

// The tokens a sequence has seen, each once in ascending id order, with their number of
// occurrences: all the penalties need from the history.
struct TokenCounts {
  std::vector<int32_t> ids;
  std::vector<int32_t> counts;
};
// Ids outside [0, vocab) are dropped.
TokenCounts CountTokens(absl::Span<const int32_t> history, int32_t vocab);
// Adds `tokens` to `counts`, as if CountTokens had seen them too: a sequence's counts follow it
// token by token instead of being recounted over the whole history every step.
void AddTokenCounts(absl::Span<const int32_t> tokens, int32_t vocab, TokenCounts* counts);

// One row of a batched pick.
struct SampleRow {
  SamplingParams params;
  // Distinct ids in [0, vocab) and their counts (>= 1), same length; empty when no penalty is
  // on. CountTokens makes them.
  absl::Span<const int32_t> penalty_ids;
  absl::Span<const int32_t> penalty_counts;
  double u = 0.0;  // in [0, 1); unused by greedy rows
};

// Backend::Sample's argument checks, shared by the backends: one row and one token per logit row,
// then INVALID_ARGUMENT naming the row and the problem: bad parameters, penalty lists of
// different lengths, ids outside [0, vocab) or not ascending, counts < 1, u outside [0, 1).
absl::Status CheckSampleArgs(int64_t logit_rows, int64_t vocab, absl::Span<const SampleRow> rows,
                             size_t n_tokens);

// The token picked from `logits` (modified in place: penalties). The steps, in this order:
//  1. Penalties, in fp32, for each (id, count) of the row: l = l > 0 ? l / rep : l * rep, then
//     l -= fma(frequency, float(count), presence) (one rounding).
//  2. Greedy (temperature 0): the id of the largest l, the lowest id among equal ones.
//  3. Candidates: ids sorted by l descending, equal l by ascending id (-0 equals +0); the first
//     k = top_k > 0 ? min(top_k, vocab) : vocab of them.
//  4. In double: e_i = exp((l_i - l_0) / temperature), Z = the sum of e_i over the k candidates,
//     p_i = e_i / Z. The p_i do not increase with i.
//  5. min-p (min_p > 0): keep the first max(1, #{i : p_i >= min_p * p_0}) candidates.
//  6. top-p (top_p < 1): with c_i = p_0 + ... + p_i, keep the first j + 1 of those kept, j the
//     smallest index with c_j >= top_p (all of them if there is none).
//  7. With T = the sum of p_i over the n kept and r = u * T: the first kept i with r < c_i, or
//     the last kept one if rounding leaves none.
// Sums are sequential here; a parallel implementation sums in another order, which can move
// c_i, Z or T by a few units in the last place (double) and so flip a pick only when r, top_p or
// min_p * p_0 lies that close to a boundary.
int32_t SampleWithUniform(absl::Span<float> logits, const SampleRow& row);

}  // namespace moa
