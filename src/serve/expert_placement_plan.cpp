// Expert load -> EPLB problem -> placements (fp8moe/serve/expert_placement_plan.h).
#include "fp8moe/serve/expert_placement_plan.h"

#include <algorithm>

#include "fp8moe/core/error.h"

namespace fp8moe::serve {

int moe_block_count(const ModelConfig& config) {
  int n = 0;
  for (int64_t l = 0; l < config.num_hidden_layers + config.num_nextn_predict_layers; ++l)
    n += config.is_moe_layer(l) ? 1 : 0;
  return n;
}

eplb::Problem expert_load_problem(const ModelConfig& config, const std::vector<int64_t>& load,
                                  int redundant, int gpus) {
  const int blocks = moe_block_count(config);
  const auto E = static_cast<int>(config.n_routed_experts);
  FM_CHECK_ARG(static_cast<int64_t>(load.size()) == static_cast<int64_t>(blocks) * E,
               "expert load: ", load.size(), " counts, the model has ", blocks, " MoE blocks x ", E,
               " experts");
  FM_CHECK_ARG(redundant >= 0, "expert load: ", redundant, " redundant experts");
  eplb::Problem p;
  p.num_layers = blocks;
  p.num_experts = E;
  p.num_replicas = E + redundant;
  p.num_groups = static_cast<int>(config.n_group);
  p.num_nodes = 1;
  p.num_gpus = gpus;
  p.weight.reserve(load.size());
  for (size_t i = 0; i < load.size(); ++i) {
    FM_CHECK_ARG(load[i] >= 0, "expert load: count ", load[i], " of block ", i / E, " expert ",
                 i % E, " is negative");
    p.weight.push_back(static_cast<float>(load[i]));
  }
  eplb::validate(p);
  return p;
}

OrderedJson expert_load_problem_json(const eplb::Problem& problem) {
  OrderedJson j;
  OrderedJson rows = OrderedJson::array();
  for (int l = 0; l < problem.num_layers; ++l)
    rows.push_back(std::vector<float>(problem.weight.begin() + l * problem.num_experts,
                                      problem.weight.begin() + (l + 1) * problem.num_experts));
  j["weight"] = rows;
  j["num_replicas"] = problem.num_replicas;
  j["num_groups"] = problem.num_groups;
  j["num_nodes"] = problem.num_nodes;
  j["num_gpus"] = problem.num_gpus;
  return j;
}

namespace {

std::vector<ExpertPlacement> placements_from_rows(const std::vector<std::vector<int32_t>>& rows,
                                                  const ModelConfig& config, int gpus) {
  const int blocks = moe_block_count(config);
  FM_CHECK_ARG(static_cast<int>(rows.size()) == blocks, "expert placement: ", rows.size(),
               " layers in the plan, the model has ", blocks, " MoE blocks");
  std::vector<ExpertPlacement> out;
  for (size_t b = 0; b < rows.size(); ++b) {
    try {
      out.push_back(
          ExpertPlacement::from_phy2log(static_cast<int>(config.n_routed_experts), rows[b]));
      out.back().rank_slots(0, gpus);  // the slots split over the GPUs
    } catch (const Error& e) {
      FM_THROW(ErrorKind::kInvalidArgument, "expert placement, layer ", b, ": ", e.message());
    }
  }
  return out;
}

}  // namespace

std::vector<ExpertPlacement> placements_from_plan(const eplb::Plan& plan, const ModelConfig& config,
                                                  int gpus) {
  std::vector<std::vector<int32_t>> rows;
  for (int l = 0; l < plan.num_layers; ++l)
    rows.emplace_back(plan.phy2log.begin() + l * plan.num_replicas,
                      plan.phy2log.begin() + (l + 1) * plan.num_replicas);
  return placements_from_rows(rows, config, gpus);
}

std::vector<ExpertPlacement> placements_from_plan_json(const Json& plan, const ModelConfig& config,
                                                       int gpus) {
  FM_CHECK_ARG(plan.is_object() && plan.contains("phy2log") && plan["phy2log"].is_array(),
               "expert placement: the plan has no \"phy2log\" array (fp8moe eplb's output)");
  std::vector<std::vector<int32_t>> rows;
  for (const Json& row : plan["phy2log"]) {
    FM_CHECK_ARG(row.is_array(), "expert placement: phy2log row ", rows.size(), " is not an array");
    std::vector<int32_t> r;
    for (const Json& v : row) {
      FM_CHECK_ARG(v.is_number_integer(), "expert placement: phy2log row ", rows.size(),
                   " holds a non-integer");
      r.push_back(v.get<int32_t>());
    }
    rows.push_back(std::move(r));
  }
  return placements_from_rows(rows, config, gpus);
}

std::vector<double> gpu_imbalance(const ModelConfig& config, const std::vector<int64_t>& load,
                                  const std::vector<ExpertPlacement>& placements, int gpus) {
  const int blocks = moe_block_count(config);
  const auto E = static_cast<int>(config.n_routed_experts);
  FM_CHECK_ARG(static_cast<int64_t>(load.size()) == static_cast<int64_t>(blocks) * E,
               "gpu_imbalance: ", load.size(), " counts for ", blocks, " x ", E);
  std::vector<double> out;
  for (int b = 0; b < blocks; ++b) {
    const ExpertPlacement p =
        placements.empty() ? ExpertPlacement::identity(E) : placements[static_cast<size_t>(b)];
    const int per = p.physical() / gpus;
    FM_CHECK_ARG(per * gpus == p.physical(), "gpu_imbalance: ", p.physical(), " slots over ", gpus,
                 " GPUs");
    std::vector<double> g(static_cast<size_t>(gpus), 0.0);
    double total = 0;
    for (int s = 0; s < p.physical(); ++s) {
      const int32_t e = p.phy2log()[static_cast<size_t>(s)];
      const double share = static_cast<double>(load[static_cast<size_t>(b) * E + e]) /
                           p.logcnt()[static_cast<size_t>(e)];
      g[static_cast<size_t>(s / per)] += share;
      total += share;
    }
    out.push_back(total > 0 ? *std::max_element(g.begin(), g.end()) / (total / gpus) : 1.0);
  }
  return out;
}

}  // namespace fp8moe::serve
