// EPLB against the public reference's own outputs (tests/eplb/fixtures/, made by
// scripts/eplb/make_fixtures.py on a machine with PyTorch): the README example, seeded random
// cases of both policies, and DeepSeek-V3 scale. phy2log and logcnt must be identical; log2phy
// rows must hold the same slots (their order may differ: the reference's comes from an
// unstable sort), and we count how often the order matches too.
#include "fp8moe/eplb/eplb.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "fp8moe/core/error.h"
#include "fp8moe/core/json.h"
#include "fp8moe/core/philox.h"

namespace fp8moe::eplb {
namespace {

const std::string kFixtures = std::string(FP8MOE_SOURCE_DIR) + "/tests/eplb/fixtures/";

std::vector<int32_t> flat(const Json& rows) {
  std::vector<int32_t> out;
  for (const auto& row : rows)
    for (const auto& v : row) out.push_back(v.get<int32_t>());
  return out;
}

void expect_matches_reference(const Json& c, const Json& weight, bool compare_log2phy) {
  Json input = c.at("input");
  input["weight"] = weight;
  const Problem problem = problem_from_json(input);
  const Plan plan = rebalance_experts(problem);
  const std::string name = c.at("name").get<std::string>();
  EXPECT_EQ(policy_name(plan.policy), c.at("policy").get<std::string>()) << name;
  EXPECT_EQ(plan.phy2log, flat(c.at("phy2log"))) << name;
  EXPECT_EQ(plan.logcnt, flat(c.at("logcnt"))) << name;
  if (!compare_log2phy) return;
  const Json& ref = c.at("log2phy");
  ASSERT_EQ(static_cast<int>(ref[0][0].size()), plan.max_replicas) << name;
  for (int l = 0; l < plan.num_layers; ++l)
    for (int e = 0; e < plan.num_experts; ++e) {
      std::vector<int32_t> want = ref[l][e].get<std::vector<int32_t>>();
      const auto begin = plan.log2phy.begin() + (l * plan.num_experts + e) * plan.max_replicas;
      std::vector<int32_t> got(begin, begin + plan.max_replicas);
      // Our std::sort reproduces torch's tie order, so even the order agrees.
      EXPECT_EQ(got, want) << name << " layer " << l << " expert " << e << " (order)";
      std::sort(want.begin(), want.end());
      std::sort(got.begin(), got.end());
      EXPECT_EQ(got, want) << name << " layer " << l << " expert " << e;
    }
}

TEST(Eplb, ReadmeExample) {
  // The README's printed output, independent of the fixture file.
  Problem p;
  p.num_layers = 2;
  p.num_experts = 12;
  p.weight = {90, 132, 40,  61, 104, 165, 39,  4,   73,  56, 183, 86,
              20, 107, 104, 64, 19,  197, 187, 157, 172, 86, 16,  27};
  p.num_replicas = 16;
  p.num_groups = 4;
  p.num_nodes = 2;
  p.num_gpus = 8;
  const Plan plan = rebalance_experts(p);
  EXPECT_EQ(plan.policy, Policy::kHierarchical);
  EXPECT_EQ(plan.phy2log,
            (std::vector<int32_t>{5, 6,  5, 7, 8, 4,  3, 4, 10, 9, 10, 2, 0, 1, 11, 1,
                                  7, 10, 6, 8, 6, 11, 8, 9, 2,  4, 5,  1, 5, 0, 3,  1}));
}

TEST(Eplb, SmallCasesMatchTheReference) {
  const Json fx = read_json_file(kFixtures + "eplb_small.json");
  int cases = 0;
  for (const auto& c : fx.at("cases")) {
    expect_matches_reference(c, c.at("input").at("weight"), true);
    ++cases;
  }
  EXPECT_GE(cases, 10);
}

TEST(Eplb, DeepSeekV3ScaleMatchesTheReference) {
  const Json fx = read_json_file(kFixtures + "eplb_v3.json");
  for (const auto& c : fx.at("cases")) expect_matches_reference(c, fx.at("weight"), false);
}

TEST(Eplb, SortTiesFollowTorch) {
  const Json fx = read_json_file(kFixtures + "sort_probe.json");
  for (const auto& probe : fx.at("sort_desc")) {
    const std::vector<float> keys = probe.at("keys").get<std::vector<float>>();
    EXPECT_EQ(sort_descending_like_torch(keys.data(), static_cast<int>(keys.size())),
              probe.at("order").get<std::vector<int32_t>>())
        << "n=" << keys.size();
  }
  // The reference's arg-max returns the first maximum; replicate_experts breaks ties the same.
  EXPECT_EQ(fx.at("max_first_index").get<int>(), 1);
  const float w[4] = {2.0f, 4.0f, 4.0f, 1.0f};
  int32_t phy2log[6], rank[6], cnt[4];
  replicate_experts(w, 4, 6, phy2log, rank, cnt);
  EXPECT_EQ(phy2log[4], 1);
  EXPECT_EQ(phy2log[5], 2);
}

// The batched replication against the one-at-a-time greedy on loads built to stress it: heavy
// tails, integer loads with many ties, equal loads, zeros, one dominant expert, tiny and huge
// magnitudes; few to many experts and extra slots.
TEST(Eplb, BatchedReplicationMatchesTheGreedy) {
  PhiloxStream rng(2026, 11);
  int cases = 0, batched = 0, heavy_cases = 0, heavy_batched = 0;
  for (const int num_log : {1, 2, 7, 16, 64, 256, 300}) {
    for (const int extra : {1, 15, 16, 17, 64, 100, 700}) {
      for (int kind = 0; kind < 7; ++kind) {
        std::vector<float> w(num_log);
        for (int e = 0; e < num_log; ++e) {
          switch (kind) {
            case 0:
              w[e] = std::exp(1.2f * rng.normal()) * 100.0f;
              break;
            case 1:
              w[e] = static_cast<float>(rng.next_u32() % 4);
              break;  // ties and zeros
            case 2:
              w[e] = 5.0f;
              break;
            case 3:
              w[e] = e % 3 == 0 ? 0.0f : rng.uniform(0.0f, 1.0f);
              break;
            case 4:
              w[e] = e == num_log / 2 ? 1e6f : rng.uniform(1.0f, 2.0f);
              break;
            case 5:
              w[e] = std::exp(2.0f * rng.normal()) * 1e-30f;
              break;
            default:
              w[e] = std::exp(2.0f * rng.normal()) * 1e30f;
              break;
          }
        }
        const int num_phy = num_log + extra;
        std::vector<int32_t> p1(num_phy), r1(num_phy), c1(num_log);
        std::vector<int32_t> p2(num_phy), r2(num_phy), c2(num_log);
        replicate_experts_greedy(w.data(), num_log, num_phy, p1.data(), r1.data(), c1.data());
        const std::string name = "num_log=" + std::to_string(num_log) +
                                 " extra=" + std::to_string(extra) +
                                 " kind=" + std::to_string(kind);
        const bool applied =
            replicate_experts_batched(w.data(), num_log, num_phy, p2.data(), r2.data(), c2.data());
        if (applied) {
          EXPECT_EQ(p2, p1) << name;
          EXPECT_EQ(r2, r1) << name;
          EXPECT_EQ(c2, c1) << name;
        }
        replicate_experts(w.data(), num_log, num_phy, p2.data(), r2.data(), c2.data());
        EXPECT_EQ(p2, p1) << name;
        EXPECT_EQ(r2, r1) << name;
        EXPECT_EQ(c2, c1) << name;
        ++cases;
        batched += applied;
        if (kind == 0 && num_log >= 16 && extra >= 16) {
          ++heavy_cases;
          heavy_batched += applied;
        }
      }
    }
  }
  // The shortcut must actually run on V3-like loads, or the comparison above proves nothing.
  EXPECT_EQ(heavy_batched, heavy_cases);
  EXPECT_GT(batched, cases / 2) << batched << " of " << cases;
}

TEST(Eplb, BalancedPackingKeepsPackSizesAndBalances) {
  const float w[8] = {10, 9, 8, 7, 6, 5, 4, 3};
  int32_t pack[8], rank[8];
  balanced_packing(w, 8, 2, pack, rank);
  // Greedy LPT with equal counts: 10->0, 9->1, 8->1, 7->0, 6->0, 5->1, 4->1, 3->0 (pack 0 full
  // at four items only at the end).
  EXPECT_EQ(std::vector<int32_t>(pack, pack + 8), (std::vector<int32_t>{0, 1, 1, 0, 0, 1, 1, 0}));
  EXPECT_EQ(std::vector<int32_t>(rank, rank + 8), (std::vector<int32_t>{0, 0, 1, 1, 2, 2, 3, 3}));
}

TEST(Eplb, GpuLoadsSumToTheTotal) {
  const Json fx = read_json_file(kFixtures + "eplb_v3.json");
  Json input = fx.at("cases")[0].at("input");
  input["weight"] = fx.at("weight");
  const Problem p = problem_from_json(input);
  const Plan plan = rebalance_experts(p);
  const std::vector<double> loads = gpu_loads(plan, p.weight, p.num_gpus);
  // Against the plain placement (8 experts per GPU in id order, no replicas), averaged over
  // the layers: EPLB's hottest GPU must be clearly cooler.
  double eplb_ratio = 0, plain_ratio = 0;
  const int per_gpu = p.num_experts / p.num_gpus;
  for (int l = 0; l < p.num_layers; ++l) {
    double total = 0, sum = 0, mx = 0, plain_mx = 0;
    for (int e = 0; e < p.num_experts; ++e) total += p.weight[l * p.num_experts + e];
    for (int g = 0; g < p.num_gpus; ++g) {
      sum += loads[l * p.num_gpus + g];
      mx = std::max(mx, loads[l * p.num_gpus + g]);
      double plain = 0;
      for (int e = g * per_gpu; e < (g + 1) * per_gpu; ++e)
        plain += p.weight[l * p.num_experts + e];
      plain_mx = std::max(plain_mx, plain);
    }
    EXPECT_NEAR(sum, total, 1e-6 * total);
    eplb_ratio += mx / (total / p.num_gpus) / p.num_layers;
    plain_ratio += plain_mx / (total / p.num_gpus) / p.num_layers;
  }
  EXPECT_LT(eplb_ratio, 0.75 * plain_ratio) << "eplb " << eplb_ratio << " plain " << plain_ratio;
}

TEST(Eplb, RejectsBadInput) {
  const auto bad = [](const char* text) {
    try {
      problem_from_json(parse_json(text, "test"));
    } catch (const Error& e) {
      return e.kind() == ErrorKind::kInvalidArgument;
    }
    return false;
  };
  EXPECT_TRUE(
      bad(R"({"weight":[[1,2],[3]],"num_replicas":4,"num_groups":1,"num_nodes":1,"num_gpus":2})"));
  EXPECT_TRUE(
      bad(R"({"weight":[[1,2]],"num_replicas":3,"num_groups":1,"num_nodes":1,"num_gpus":2})"));
  EXPECT_TRUE(
      bad(R"({"weight":[[1,-2]],"num_replicas":4,"num_groups":1,"num_nodes":1,"num_gpus":2})"));
  EXPECT_TRUE(
      bad(R"({"weight":[[1,2]],"num_replicas":1,"num_groups":1,"num_nodes":1,"num_gpus":1})"));
  EXPECT_TRUE(bad(
      R"({"weight":[[1,2]],"num_replicas":4,"num_groups":1,"num_nodes":1,"num_gpus":2,"x":1})"));
  EXPECT_TRUE(bad(R"({"weight":[],"num_replicas":4,"num_groups":1,"num_nodes":1,"num_gpus":2})"));
  EXPECT_TRUE(
      bad(R"({"weight":[[1,"a"]],"num_replicas":4,"num_groups":1,"num_nodes":1,"num_gpus":2})"));
  EXPECT_TRUE(
      bad(R"({"weight":[[1,2]],"num_replicas":4,"num_groups":0,"num_nodes":1,"num_gpus":2})"));
  EXPECT_TRUE(
      bad(R"({"weight":[[1,2]],"num_replicas":4,"num_groups":1,"num_nodes":1,"num_gpus":2.5})"));
  // Hierarchical needs E % G == 0; global (G % N != 0) does not, as in the reference.
  EXPECT_TRUE(
      bad(R"({"weight":[[1,2,3]],"num_replicas":4,"num_groups":2,"num_nodes":1,"num_gpus":2})"));
  EXPECT_FALSE(
      bad(R"({"weight":[[1,2,3]],"num_replicas":4,"num_groups":2,"num_nodes":3,"num_gpus":2})"));
}

}  // namespace
}  // namespace fp8moe::eplb
