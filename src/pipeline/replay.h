// Internal to fp8moe_pipeline: runs the per-rank orders of a schedule against the operations'
// dependencies (shared by the checker's deadlock search and the simulator's clock).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "fp8moe/pipeline/schedule.h"
#include "fp8moe/pipeline/simulator.h"

namespace fp8moe::pipeline::detail {

struct ReplayResult {
  bool complete = false;
  std::vector<std::vector<StepTime>> times;  // [rank][step]; valid for the steps that ran
  std::vector<std::string> blocked;          // when !complete: one line per stuck rank
};

// Requires every operation to be in range for the schedule's topology (the checker's first
// pass). Each rank runs its steps in order; a step starts at the later of the rank's previous
// end and the end of each dependency (+ p2p_time when that ran on another rank).
ReplayResult replay(const Schedule& schedule, const std::function<double(const Step&)>& duration,
                    double p2p_time);

}  // namespace fp8moe::pipeline::detail
