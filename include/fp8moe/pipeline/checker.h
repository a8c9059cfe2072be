// Validation of a pipeline schedule: every required operation exactly once on its rank, and the
// per-rank orders run to completion when each operation waits for those it depends on.
#pragma once

#include <string>
#include <vector>

#include "fp8moe/pipeline/schedule.h"

namespace fp8moe::pipeline {

struct CheckReport {
  // Missing, duplicated, foreign (chunk or micro-batch out of range) or inconsistent operations
  // (B together with I or W of the same chunk and micro-batch, W without I, a pair of one
  // micro-batch with itself), one line each naming the rank and the operation.
  std::vector<std::string> problems;
  // Set when the orders deadlock: one line per rank that cannot finish, naming its blocked step
  // and the operations (with their ranks) it waits for.
  std::vector<std::string> deadlock;
  bool ok() const { return problems.empty() && deadlock.empty(); }
  // All lines, problems first, joined with newlines.
  std::string summary() const;
};

// Dependencies: F of a stage waits for F of the stage before (same flow and micro-batch); B or I
// waits for its own F and for B or I of the stage after; W waits for its I. A pair waits for
// the dependencies of both its operations. The deadlock check runs only when no problems were
// found.
CheckReport check_schedule(const Schedule& schedule);

}  // namespace fp8moe::pipeline
