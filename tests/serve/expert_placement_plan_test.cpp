// From a generator's expert load to placements: EPLB's problem for the model, the plan as
// placements (directly and through `fp8moe eplb`'s JSON), the GPU balance they give, and the
// errors for plans that do not fit the model.
#include "fp8moe/serve/expert_placement_plan.h"

#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "fp8moe/core/error.h"

namespace fp8moe::serve {
namespace {

ModelConfig config16() {
  ModelConfig c;
  c.num_hidden_layers = 3;
  c.first_k_dense_replace = 1;
  c.num_nextn_predict_layers = 1;
  c.n_routed_experts = 16;
  c.n_group = 4;
  c.topk_group = 2;
  c.num_experts_per_tok = 4;
  return c;
}

// Three MoE blocks; the hot experts 0-3 (all on GPU 0 of 2 in the plain layout).
std::vector<int64_t> skewed_load() {
  std::vector<int64_t> load;
  for (int b = 0; b < 3; ++b)
    for (int e = 0; e < 16; ++e) load.push_back(e < 4 ? 900 + 10 * b + e : 100 + e);
  return load;
}

TEST(ExpertPlacementPlan, ReplicasEvenTheGpusLoad) {
  const ModelConfig c = config16();
  EXPECT_EQ(moe_block_count(c), 3);
  const std::vector<int64_t> load = skewed_load();
  const eplb::Problem problem = expert_load_problem(c, load, 4, 2);
  EXPECT_EQ(problem.num_replicas, 20);
  EXPECT_EQ(problem.num_groups, 4);
  const std::vector<ExpertPlacement> placed =
      placements_from_plan(eplb::rebalance_experts(problem), c, 2);
  ASSERT_EQ(placed.size(), 3u);
  const std::vector<double> before = gpu_imbalance(c, load, {}, 2);
  const std::vector<double> after = gpu_imbalance(c, load, placed, 2);
  for (int b = 0; b < 3; ++b) {
    EXPECT_EQ(placed[b].physical(), 20);
    // The 4 extra slots go to the hot experts.
    for (int e = 0; e < 4; ++e) EXPECT_EQ(placed[b].logcnt()[e], 2) << "block " << b;
    EXPECT_GT(before[b], 1.5);
    EXPECT_LT(after[b], 1.05);
  }
}

TEST(ExpertPlacementPlan, ThroughTheEplbCommandsJson) {
  const ModelConfig c = config16();
  const eplb::Problem problem = expert_load_problem(c, skewed_load(), 4, 2);
  // The problem as `fp8moe eplb` reads it, and its output read back.
  const eplb::Problem parsed =
      eplb::problem_from_json(Json::parse(expert_load_problem_json(problem).dump()));
  EXPECT_EQ(parsed.weight, problem.weight);
  EXPECT_EQ(parsed.num_replicas, problem.num_replicas);
  const eplb::Plan plan = eplb::rebalance_experts(parsed);
  const auto a = placements_from_plan(plan, c, 2);
  const auto b = placements_from_plan_json(Json::parse(eplb::plan_to_json(plan).dump()), c, 2);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i].phy2log(), b[i].phy2log());
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.message();
  }
  return "no error";
}

TEST(ExpertPlacementPlan, PlansThatDoNotFitAreRefusedByName) {
  const ModelConfig c = config16();
  std::vector<int32_t> row(16);
  for (int e = 0; e < 16; ++e) row[e] = e;
  Json two_layers = {{"phy2log", {row, row}}};
  EXPECT_NE(error_of([&] {
              placements_from_plan_json(two_layers, c, 2);
            }).find("2 layers in the plan, the model has 3 MoE blocks"),
            std::string::npos);
  std::vector<int32_t> bad = row;
  bad[5] = 16;
  Json out_of_range = {{"phy2log", {row, bad, row}}};
  EXPECT_NE(error_of([&] {
              placements_from_plan_json(out_of_range, c, 2);
            }).find("layer 1: ExpertPlacement: slot 5 holds expert 16"),
            std::string::npos);
  std::vector<int32_t> odd = row;
  odd.push_back(0);
  Json uneven = {{"phy2log", {odd, odd, odd}}};
  EXPECT_NE(error_of([&] {
              placements_from_plan_json(uneven, c, 2);
            }).find("17 physical slots do not split evenly over 2"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              placements_from_plan_json(Json{{"logcnt", 1}}, c, 2);
            }).find("no \"phy2log\""),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              expert_load_problem(c, std::vector<int64_t>(47, 1), 0, 2);
            }).find("47 counts, the model has 3 MoE blocks x 16 experts"),
            std::string::npos);
  std::vector<int64_t> negative(48, 1);
  negative[20] = -1;
  EXPECT_NE(error_of([&] {
              expert_load_problem(c, negative, 0, 2);
            }).find("block 1 expert 4 is negative"),
            std::string::npos);
}

}  // namespace
}  // namespace fp8moe::serve
