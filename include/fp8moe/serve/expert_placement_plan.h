// Redundant experts at serving time from observed load (V3's deployments: EPLB over the load
// statistics of recent serving, then the heavy experts replicated): the bridge between a
// generator's counts (GenerationStats::expert_load), EPLB (fp8moe/eplb/eplb.h, `fp8moe eplb`)
// and the placements a serving model runs over (ModelGpuParallel::placements). CPU code, tested
// in tests/serve/expert_placement_plan_test.cpp.
//
//   fp8moe generate --device gpu ... --expert-load-out load.json --redundant-experts 16
//   fp8moe eplb --input load.json --output plan.json
//   fp8moe generate --device gpu ... --expert-placement plan.json     (or fp8moe serve)
#pragma once

#include <cstdint>
#include <vector>

#include "fp8moe/core/json.h"
#include "fp8moe/eplb/eplb.h"
#include "fp8moe/model/config.h"
#include "fp8moe/moe/expert_placement.h"

namespace fp8moe::serve {

// The MoE blocks of `config` (main layers, then the MTP modules'): expert_load's rows.
int moe_block_count(const ModelConfig& config);

// EPLB's problem for `load` [moe blocks x n_routed_experts] (summed over a group's ranks):
// n_routed_experts + redundant physical slots a block over `gpus` GPUs of one node, the config's
// expert groups (the hierarchical policy). Throws kInvalidArgument for a load of another shape,
// negative counts or slots that do not split over the GPUs.
eplb::Problem expert_load_problem(const ModelConfig& config, const std::vector<int64_t>& load,
                                  int redundant, int gpus);
// The same as `fp8moe eplb` reads it (DESIGN.md's input format).
OrderedJson expert_load_problem_json(const eplb::Problem& problem);

// One placement a MoE block from a plan (eplb::rebalance_experts) or its JSON (`fp8moe eplb`'s
// output: "phy2log" is read, "log2phy" / "logcnt" are derived again). Throws kInvalidArgument
// naming the problem: another block count or expert count than the config's, a slot count that
// does not split over `gpus`, an id outside the experts, an expert without a slot.
std::vector<ExpertPlacement> placements_from_plan(const eplb::Plan& plan, const ModelConfig& config,
                                                  int gpus);
std::vector<ExpertPlacement> placements_from_plan_json(const Json& plan, const ModelConfig& config,
                                                       int gpus);

// The largest GPU's share of the routed tokens over the mean share, per block, for `load` spread
// as the placements spread it (a replica takes an equal part of its expert's load; identity
// placements when `placements` is empty): 1 is perfect balance. [moe blocks].
std::vector<double> gpu_imbalance(const ModelConfig& config, const std::vector<int64_t>& load,
                                  const std::vector<ExpertPlacement>& placements, int gpus);

}  // namespace fp8moe::serve
