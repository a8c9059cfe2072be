// Serving over several ranks (serve/generator_group.h: GeneratorGpu ranks as threads of this
// process, data-parallel attention, expert-parallel MoE) on the small V3-shaped model of
// generator_gpu_test.cu (one dense and one MoE layer of 8 experts, top-2; random weights):
// - Two ranks on two GPUs (skipped where one is visible; one rank a GPU, serve/generator_group.h):
//   a request's text does not depend on the rank that serves it nor on the other requests — six
//   prompts spread over both ranks equal the same six on rank 0 alone while rank 1 idles (its
//   lockstep passes), greedy and sampled, with CUDA graphs and prefill chunks interleaved with the
//   other rank's steps.
// - Against one rank (GeneratorGpu alone, every expert local): the EP combine rounds each rank's
//   partial sum to BF16 before adding them (comm/ep.h), so the MoE output may differ in its last
//   bits; every request's first token agrees and most texts are equal (printed).
// - The MTP draft over two ranks keeps the two-rank greedy text.
// - Decoding passes over the low-latency EP kernels (GeneratorOptions::low_latency_ep, the
//   default) give the texts of the normal kernels, greedy, sampled and with the MTP draft.
// - Four ranks on four GPUs (skipped under four visible): the rank invariance and the low-latency
//   check again, two experts a rank.
// Run: test_serve_gpu --gtest_filter='GeneratorGroup*'
#include <gtest/gtest.h>

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/model/config.h"
#include "fp8moe/model/model.h"
#include "fp8moe/serve/generator_gpu.h"
#include "fp8moe/serve/generator_group.h"
#include "serve_test_support.h"

namespace fp8moe::serve {
namespace {

using test_support::greedy_sampling;
using test_support::nucleus_sampling;
using test_support::random_tokens;
using test_support::two_gpus;

ModelConfig group_config(int64_t mtp) {
  return test_support::serve_config(mtp, 1, "serve group test config");
}

GeneratorOptions options() {
  return test_support::three_at_once();
}

std::vector<std::vector<int32_t>> six_prompts() {
  return {random_tokens(5, 512, 51),   random_tokens(100, 512, 52), random_tokens(33, 512, 53),
          random_tokens(130, 512, 54), random_tokens(9, 512, 55),   random_tokens(64, 512, 56)};
}

// Rank of prompt i when handed out backwards: R - 1, R - 2, ..., 0, R - 1, ...
std::vector<int> backwards(size_t prompts, int ranks) {
  std::vector<int> r(prompts);
  for (size_t i = 0; i < prompts; ++i) r[i] = ranks - 1 - static_cast<int>(i % ranks);
  return r;
}

// GPUs 0 .. n - 1 when that many are visible, else empty.
std::vector<int> first_gpus(int n) {
  int count = 0;
  FM_CHECK_CUDA(cudaGetDeviceCount(&count));
  std::vector<int> d;
  if (count >= n)
    for (int i = 0; i < n; ++i) d.push_back(i);
  return d;
}

// Six prompts on one rank a GPU of `devices`: spread, all on rank 0 (the others idle through
// their lockstep passes), backwards and sampled; against one rank's texts.
void expect_rank_invariant(const std::vector<int>& devices) {
  const ModelConfig cfg = group_config(0);
  Model cpu(cfg, 11);
  const auto prompts = six_prompts();
  const SamplingOptions greedy = greedy_sampling(12);
  const SamplingOptions sampled = nucleus_sampling(12, 3);
  std::vector<std::vector<int32_t>> one_greedy, one_sampled;
  {
    GeneratorGpu one(cpu, options());
    one_greedy = one.generate(prompts, greedy);
    one_sampled = one.generate(prompts, sampled);
  }
  const int ranks = static_cast<int>(devices.size());
  const std::string where = std::to_string(ranks) + " GPUs";  // one rank each
  GeneratorGroup group(cpu, options(), devices);
  ASSERT_EQ(group.ranks(), ranks);
  std::fprintf(stderr, "[ group ] %s: ranks made\n", where.c_str());
  std::vector<GenerationStats> st;
  const auto spread = group.generate(prompts, greedy, &st);
  for (int r = 0; r < ranks; ++r)
    std::fprintf(stderr, "[ group ] %s: spread: rank %d %lld steps (%lld idle)\n", where.c_str(), r,
                 static_cast<long long>(st[r].decode_steps),
                 static_cast<long long>(st[r].idle_steps));
  const auto alone = group.generate(prompts, greedy, &st, std::vector<int>(prompts.size(), 0));
  for (int r = 1; r < ranks; ++r) {
    EXPECT_EQ(st[r].decode_steps, 0) << "rank " << r;
    EXPECT_GT(st[r].idle_steps, 0) << "rank " << r;
  }
  EXPECT_EQ(st[0].decode_tokens, 6 * 11);
  EXPECT_EQ(spread, alone) << where;
  const auto back = group.generate(prompts, sampled, nullptr, backwards(prompts.size(), ranks));
  EXPECT_EQ(group.generate(prompts, sampled), back) << where;
  int same = 0, same_sampled = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_EQ(spread[i].size(), 12u);
    EXPECT_EQ(spread[i][0], one_greedy[i][0]) << "prompt " << i << ": first token";
    same += spread[i] == one_greedy[i];
    same_sampled += back[i] == one_sampled[i];
  }
  std::fprintf(stderr, "[ group ] %s: texts equal to one rank's: %d of 6 greedy, %d of 6 sampled\n",
               where.c_str(), same, same_sampled);
  EXPECT_GE(same, 4);
}

// Decoding passes over the low-latency EP kernels give the normal kernels' texts on `devices`:
// greedy, sampled (backwards) and with the MTP draft (one prompt on the last rank).
void expect_low_latency_keeps_text(const std::vector<int>& devices) {
  const ModelConfig cfg = group_config(1);
  Model cpu(cfg, 14);
  const auto prompts = six_prompts();
  const SamplingOptions greedy = greedy_sampling(12);
  const SamplingOptions sampled = nucleus_sampling(12, 5);
  GeneratorOptions normal = options(), ll = options();
  normal.low_latency_ep = false;
  ll.low_latency_ep = true;
  const int ranks = static_cast<int>(devices.size());
  std::vector<int> drafted_on(prompts.size(), 0);
  drafted_on[4] = ranks - 1;
  std::vector<std::vector<std::vector<int32_t>>> texts[2];
  for (int use_ll = 0; use_ll < 2; ++use_ll) {
    GeneratorGroup group(cpu, use_ll ? ll : normal, devices);
    std::vector<GenerationStats> st;
    texts[use_ll].push_back(group.generate(prompts, greedy, &st));
    const int64_t passes = st[0].low_latency_passes;
    for (int r = 1; r < ranks; ++r)
      EXPECT_EQ(st[r].low_latency_passes, passes) << "rank " << r << " disagrees on the kernels";
    if (use_ll) {
      // Prefill passes (some rank filling) stay on the normal kernels: both kinds ran.
      EXPECT_GT(passes, 0);
      EXPECT_LT(passes, st[0].decode_steps + st[0].idle_steps + st[0].prefill_steps);
    } else {
      EXPECT_EQ(passes, 0);
    }
    std::printf(
        "[ group ] %d ranks, low_latency_ep %s: rank 0 %lld of its %lld decoding and idle passes "
        "over the low-latency kernels\n",
        ranks, use_ll ? "on" : "off", static_cast<long long>(passes),
        static_cast<long long>(st[0].decode_steps + st[0].idle_steps));
    texts[use_ll].push_back(
        group.generate(prompts, sampled, nullptr, backwards(prompts.size(), ranks)));
    for (int r = 0; r < ranks; ++r) group.rank(r).set_mtp_draft(true);
    texts[use_ll].push_back(group.generate(prompts, greedy, nullptr, drafted_on));
  }
  EXPECT_EQ(texts[1][0], texts[0][0]) << "greedy";
  EXPECT_EQ(texts[1][1], texts[0][1]) << "sampled";
  EXPECT_EQ(texts[1][2], texts[0][2]) << "MTP draft";
  EXPECT_EQ(texts[1][2], texts[1][0]) << "the MTP draft's greedy text";
}

TEST(GeneratorGroup, TextDoesNotDependOnTheRank) {
  if (!two_gpus()) GTEST_SKIP() << "one GPU visible";
  expect_rank_invariant({0, 1});
}

TEST(GeneratorGroup, MtpDraftKeepsTheGreedyText) {
  const ModelConfig cfg = group_config(1);
  Model cpu(cfg, 12);
  const auto prompts = six_prompts();
  SamplingOptions s = greedy_sampling(10);
  if (!two_gpus()) GTEST_SKIP() << "one GPU visible";
  const std::vector<int> devices = {0, 1};
  std::fprintf(stderr, "[ group ] %s, MTP draft: start\n", "two GPUs");
  GeneratorGroup group(cpu, options(), devices);
  const auto plain = group.generate(prompts, s);
  for (int r = 0; r < 2; ++r) group.rank(r).set_mtp_draft(true);
  std::vector<GenerationStats> st;
  const auto drafted = group.generate(prompts, s, &st, {0, 0, 0, 0, 1, 0});
  std::printf(
      "[ group ] %s, MTP draft: rank 0 %lld drafts (%lld kept), rank 1 %lld (%lld kept), "
      "%lld idle\n",
      "two GPUs", static_cast<long long>(st[0].drafted), static_cast<long long>(st[0].accepted),
      static_cast<long long>(st[1].drafted), static_cast<long long>(st[1].accepted),
      static_cast<long long>(st[1].idle_steps));
  EXPECT_EQ(drafted, plain);
  EXPECT_GT(st[1].idle_steps, 0);
}

TEST(GeneratorGroup, LowLatencyExchangeKeepsTheText) {
  if (!two_gpus()) GTEST_SKIP() << "one GPU visible";
  expect_low_latency_keeps_text({0, 1});
}

// Four ranks (2 of the 8 experts each): the same two checks (skipped under 4 visible GPUs).
TEST(GeneratorGroup, FourRanksKeepTheText) {
  const std::vector<int> devices = first_gpus(4);
  if (devices.empty()) GTEST_SKIP() << "fewer than 4 GPUs visible";
  expect_rank_invariant(devices);
  expect_low_latency_keeps_text(devices);
}

TEST(GeneratorGroup, RejectsBadLayouts) {
  const ModelConfig cfg = group_config(0);
  Model cpu(cfg, 13);
  EXPECT_THROW(GeneratorGroup(cpu, options(), {}), Error);
  EXPECT_THROW(GeneratorGroup(cpu, options(), {0, 1000}), Error);
  try {
    GeneratorGroup shared(cpu, options(), {0, 0});
    ADD_FAILURE() << "two ranks on one GPU were taken";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("one rank a GPU"), std::string::npos) << e.what();
  }
  if (!two_gpus()) return;
  // 8 experts do not split over 3 ranks (checked on every rank before any EP endpoint).
  int count = 0;
  FM_CHECK_CUDA(cudaGetDeviceCount(&count));
  if (count >= 3) EXPECT_THROW(GeneratorGroup(cpu, options(), {0, 1, 2}), Error);
  GeneratorGroup group(cpu, options(), {0, 1});
  SamplingOptions s;
  EXPECT_THROW(group.generate({random_tokens(5, 512, 1)}, s, nullptr, {2}), Error);
}

}  // namespace
}  // namespace fp8moe::serve
