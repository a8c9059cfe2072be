// ExpertPlacement's tables, its input checks, and the logical -> physical map on the CPU: the
// replicas an expert's tokens take, and the ids the map leaves alone.
#include "fp8moe/moe/expert_placement.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "fp8moe/core/error.h"

namespace fp8moe {
namespace {

TEST(ExpertPlacement, IdentityMapsEveryExpertToItself) {
  const ExpertPlacement p = ExpertPlacement::identity(6);
  EXPECT_TRUE(p.is_identity());
  EXPECT_EQ(p.physical(), 6);
  EXPECT_EQ(p.max_replicas(), 1);
  const std::vector<int32_t> logical = {5, 0, 3, -1, 2, 4};
  const std::vector<int32_t> pos = {7, 100, 3};
  std::vector<int32_t> physical(6, -7);
  map_to_physical_reference(p, logical.data(), pos.data(), 3, 2, physical.data());
  EXPECT_EQ(physical, logical);
}

TEST(ExpertPlacement, TablesFromPhy2log) {
  // 4 experts in 6 slots: expert 1 three times, expert 3 twice.
  const ExpertPlacement p = ExpertPlacement::from_phy2log(4, {1, 3, 0, 1, 2, 1, 3, 1});
  EXPECT_FALSE(p.is_identity());
  EXPECT_EQ(p.physical(), 8);
  EXPECT_EQ(p.max_replicas(), 4);
  EXPECT_EQ(p.logcnt(), (std::vector<int32_t>{1, 4, 1, 2}));
  EXPECT_EQ(p.log2phy(),
            (std::vector<int32_t>{2, -1, -1, -1, 0, 3, 5, 7, 4, -1, -1, -1, 1, 6, -1, -1}));
  EXPECT_EQ(p.rank_slots(0, 2), (std::vector<int32_t>{1, 3, 0, 1}));
  EXPECT_EQ(p.rank_slots(1, 2), (std::vector<int32_t>{2, 1, 3, 1}));
  EXPECT_EQ(p.rank_slots(3, 4), (std::vector<int32_t>{3, 1}));
}

TEST(ExpertPlacement, BadTablesAreRefusedByName) {
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message([] {
              ExpertPlacement::from_phy2log(3, {0, 1, 3});
            }).find("outside [0, 3)"),
            std::string::npos);
  EXPECT_NE(message([] {
              ExpertPlacement::from_phy2log(3, {0, 1, 1, 0});
            }).find("expert 2 has no physical slot"),
            std::string::npos);
  EXPECT_NE(message([] {
              ExpertPlacement::from_phy2log(3, {0, 1});
            }).find("2 physical slots"),
            std::string::npos);
  EXPECT_NE(message([] {
              ExpertPlacement::from_phy2log(3, {0, 1, 2, 2}).rank_slots(0, 3);
            }).find("do not split evenly over 3"),
            std::string::npos);
}

TEST(ExpertPlacement, TokensSpreadEvenlyOverReplicasAndKeepTheirExpert) {
  const ExpertPlacement p = ExpertPlacement::from_phy2log(3, {0, 1, 2, 0, 0, 2});
  const int64_t T = 6000;
  const int K = 3;
  std::vector<int32_t> logical(T * K), pos(T), physical(T * K, -7);
  for (int64_t t = 0; t < T; ++t) {
    pos[t] = static_cast<int32_t>((t * 7919) % 4096);  // positions of many sequences
    for (int k = 0; k < K; ++k) logical[t * K + k] = k;
  }
  logical[5] = -1;  // a dropped slot passes through
  map_to_physical_reference(p, logical.data(), pos.data(), T, K, physical.data());
  std::vector<int64_t> per_slot(6, 0);
  for (int64_t i = 0; i < T * K; ++i) {
    if (logical[i] < 0) {
      EXPECT_EQ(physical[i], -1);
      continue;
    }
    ASSERT_GE(physical[i], 0);
    ASSERT_LT(physical[i], 6);
    EXPECT_EQ(p.phy2log()[physical[i]], logical[i]);  // a replica of the chosen expert
    ++per_slot[physical[i]];
  }
  // Expert 0 (slots 0, 3, 4): about T / 3 each; expert 2 (slots 2, 5): about T / 2 each.
  for (int s : {0, 3, 4}) EXPECT_NEAR(per_slot[s], T / 3, T / 30) << "slot " << s;
  for (int s : {2, 5}) EXPECT_NEAR(per_slot[s], T / 2, T / 30) << "slot " << s;
  EXPECT_EQ(per_slot[1], T);
}

TEST(ExpertPlacement, ReplicaDependsOnlyOnPositionAndExpert) {
  for (int32_t count = 1; count <= 5; ++count)
    for (int32_t pos = 0; pos < 300; ++pos)
      for (int32_t e = 0; e < 40; ++e) {
        const int32_t r = replica_index(pos, e, count);
        ASSERT_GE(r, 0);
        ASSERT_LT(r, count);
        ASSERT_EQ(r, replica_index(pos, e, count));
      }
}

}  // namespace
}  // namespace fp8moe
