// Early returns on error Status, for code that calls many StatusOr-returning functions in a row
// (the Abseil release Debian ships has no public macros for this).
#pragma once

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define MOA_STATUS_CONCAT_INNER(a, b) a##b
#define MOA_STATUS_CONCAT(a, b) MOA_STATUS_CONCAT_INNER(a, b)
#define MOA_ASSIGN_OR_RETURN_IMPL(var, expr, tmp) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  var = *std::move(tmp)

// `ASSIGN_OR_RETURN(T x, F());` declares x from F()'s value, or returns F()'s error.
#define ASSIGN_OR_RETURN(var, expr) \
  MOA_ASSIGN_OR_RETURN_IMPL(var, expr, MOA_STATUS_CONCAT(status_or_, __LINE__))

// Returns the Status of `expr` unless it is OK.
#define RETURN_IF_ERROR(expr)                 \
  do {                                        \
    if (absl::Status s_ = (expr); !s_.ok()) { \
      return s_;                              \
    }                                         \
  } while (0)
