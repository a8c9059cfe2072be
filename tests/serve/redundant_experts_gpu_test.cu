// Redundant experts at serving time (ModelGpuParallel::placements, serve/expert_placement_plan.h)
// on the small V3-shaped model of the serving tests (one dense and one MoE layer of 8 experts,
// top-2; random weights):
// - One GPU: a placement with replicas changes which slot computes a token's expert, not the
//   arithmetic (a replica is its original's weights; one rank sums a token's experts in k order,
//   comm/ep.h), so greedy and sampled texts are the same bits, and so is the logical load.
// - Two GPUs (skipped where one is visible): the load one group observes, EPLB's plan over it
//   (4 redundant slots), a group that serves over the plan. A token's experts may now sit on other
//   ranks than before, and the combine rounds each rank's partial sum to BF16 (comm/ep.h), so texts
//   may differ in a few tokens: every first token agrees, most texts are equal (printed).
// - A backward through a model with redundant experts, and placements that do not fit the model,
//   are refused by name.
// Run: test_serve_gpu --gtest_filter='RedundantExperts*'
#include <gtest/gtest.h>

#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/model/model.h"
#include "fp8moe/model/model_gpu.h"
#include "fp8moe/serve/expert_placement_plan.h"
#include "fp8moe/serve/generator_gpu.h"
#include "fp8moe/serve/generator_group.h"
#include "serve_test_support.h"

namespace fp8moe::serve {
namespace {

using test_support::greedy_sampling;
using test_support::nucleus_sampling;
using test_support::random_tokens;
using test_support::two_gpus;

GeneratorOptions options() {
  return test_support::three_at_once();
}

std::vector<std::vector<int32_t>> prompts() {
  return {random_tokens(5, 512, 61),   random_tokens(100, 512, 62), random_tokens(33, 512, 63),
          random_tokens(130, 512, 64), random_tokens(9, 512, 65),   random_tokens(64, 512, 66)};
}

// 8 experts in 12 slots: experts 2, 5, 6 and 7 twice, the copies spread.
ExpertPlacement twelve_slots() {
  return ExpertPlacement::from_phy2log(8, {7, 0, 5, 1, 2, 6, 3, 2, 4, 5, 6, 7});
}

TEST(RedundantExperts, OneGpuTextIsTheSameBits) {
  const ModelConfig cfg = test_support::serve_config(0, 1, "redundant experts test config");
  Model cpu(cfg, 21);
  const SamplingOptions greedy = greedy_sampling(12);
  const SamplingOptions sampled = nucleus_sampling(12, 5);
  GenerationStats plain_st, placed_st;
  std::vector<std::vector<int32_t>> plain_g, plain_s, placed_g, placed_s;
  {
    GeneratorGpu plain(cpu, options());
    plain_g = plain.generate(prompts(), greedy, &plain_st);
    plain_s = plain.generate(prompts(), sampled);
  }
  GeneratorParallel par;
  par.model.placements = {twelve_slots()};
  GeneratorGpu placed(cpu, options(), par);
  placed_g = placed.generate(prompts(), greedy, &placed_st);
  placed_s = placed.generate(prompts(), sampled);
  EXPECT_EQ(placed_g, plain_g);
  EXPECT_EQ(placed_s, plain_s);
  // The load is counted per logical expert, before the map: the same counts.
  ASSERT_EQ(plain_st.expert_load.size(), 8u);
  EXPECT_EQ(placed_st.expert_load, plain_st.expert_load);
  const int64_t routed =
      std::accumulate(plain_st.expert_load.begin(), plain_st.expert_load.end(), int64_t{0});
  std::printf("[ eplb ] one GPU: %lld routed slots over 8 experts, texts equal\n",
              static_cast<long long>(routed));
  EXPECT_GE(routed, 2 * (plain_st.prefill_tokens + plain_st.decode_tokens - 6));
  EXPECT_EQ(routed % 2, 0);
}

TEST(RedundantExperts, TwoGpusServeOverThePlanOfTheirLoad) {
  if (!two_gpus()) GTEST_SKIP() << "one GPU visible";
  const ModelConfig cfg = test_support::serve_config(0, 1, "redundant experts test config");
  Model cpu(cfg, 22);
  SamplingOptions greedy = greedy_sampling(12);
  std::vector<std::vector<int32_t>> plain;
  std::vector<int64_t> load(8, 0);
  {
    GeneratorGroup group(cpu, options(), {0, 1});
    std::vector<GenerationStats> st;
    plain = group.generate(prompts(), greedy, &st);
    for (const GenerationStats& s : st)
      for (size_t i = 0; i < load.size(); ++i) load[i] += s.expert_load[i];
  }
  const std::vector<ExpertPlacement> placements =
      placements_from_plan(eplb::rebalance_experts(expert_load_problem(cfg, load, 4, 2)), cfg, 2);
  ASSERT_EQ(placements.size(), 1u);
  EXPECT_EQ(placements[0].physical(), 12);
  const double before = gpu_imbalance(cfg, load, {}, 2)[0];
  const double after = gpu_imbalance(cfg, load, placements, 2)[0];
  std::printf("[ eplb ] two GPUs: load max/mean %.3f without, %.3f with the plan\n", before, after);
  EXPECT_LE(after, before + 1e-9);
  GeneratorGroup group(cpu, options(), {0, 1}, placements);
  std::vector<GenerationStats> st;
  const auto placed = group.generate(prompts(), greedy, &st);
  int same = 0;
  for (size_t i = 0; i < placed.size(); ++i) {
    ASSERT_EQ(placed[i].size(), 12u);
    EXPECT_EQ(placed[i][0], plain[i][0]) << "prompt " << i << ": first token";
    same += placed[i] == plain[i];
  }
  std::printf("[ eplb ] two GPUs: %d of 6 texts equal to the group's without the plan\n", same);
  EXPECT_GE(same, 4);
  // The same requests routed the same logical experts up to those few tokens.
  int64_t total = 0;
  for (const GenerationStats& s : st)
    total += std::accumulate(s.expert_load.begin(), s.expert_load.end(), int64_t{0});
  EXPECT_EQ(total, std::accumulate(load.begin(), load.end(), int64_t{0}));
}

TEST(RedundantExperts, BackwardAndMisfitsAreRefused) {
  const ModelConfig cfg = test_support::serve_config(0, 1, "redundant experts test config");
  ModelGpuParallel par;
  par.placements = {twelve_slots()};
  ModelGpu model(cfg, 1, 16, par);
  LossGpu* loss = nullptr;
  int32_t* tokens = nullptr;
  FM_CHECK_CUDA(cudaMalloc(&loss, sizeof(LossGpu)));
  FM_CHECK_CUDA(cudaMalloc(&tokens, sizeof(int32_t) * 1 * model.window()));
  try {
    model.forward_backward(tokens, 0.0f, true, loss, nullptr);
    ADD_FAILURE() << "a backward with redundant experts was taken";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no backward with redundant experts"), std::string::npos)
        << e.what();
  }
  cudaFree(loss);
  cudaFree(tokens);
  ModelGpuParallel two = par;
  two.placements.push_back(twelve_slots());  // two placements, one MoE block
  EXPECT_THROW(ModelGpu(cfg, 1, 16, two), Error);
  ModelGpuParallel other;
  other.placements = {ExpertPlacement::from_phy2log(4, {0, 1, 2, 3, 0, 1})};  // 4 experts, not 8
  EXPECT_THROW(ModelGpu(cfg, 1, 16, other), Error);
}

}  // namespace
}  // namespace fp8moe::serve
