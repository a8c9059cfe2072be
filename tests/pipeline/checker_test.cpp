// Checker: it must find each kind of broken schedule, naming the rank and operation, and find
// deadlocks with the ranks and operations involved.
// Run: build-pipeline/tests/test_pipeline --gtest_filter='Checker*'
#include "fp8moe/pipeline/checker.h"

#include <gtest/gtest.h>

namespace fp8moe::pipeline {
namespace {

Schedule from_text(Method method, int ranks, int micro,
                   const std::vector<std::vector<std::string>>& lists) {
  Schedule s{method, ranks, micro, {}};
  for (const auto& list : lists) {
    auto& out = s.ranks_ops.emplace_back();
    for (const auto& t : list) out.push_back(parse_step(t));
  }
  return s;
}

bool mentions(const std::vector<std::string>& lines, const std::string& a, const std::string& b) {
  for (const auto& l : lines)
    if (l.find(a) != std::string::npos && l.find(b) != std::string::npos) return true;
  return false;
}

TEST(Checker, AcceptsAHandWrittenSchedule) {
  const auto s = from_text(Method::k1F1B, 2, 2,
                           {{"F0.0", "F0.1", "B0.0", "B0.1"}, {"F0.0", "B0.0", "F0.1", "B0.1"}});
  EXPECT_TRUE(check_schedule(s).ok()) << check_schedule(s).summary();
  // Splitting a backward into I and W is accepted for any method.
  const auto z =
      from_text(Method::k1F1B, 2, 2,
                {{"F0.0", "F0.1", "I0.0", "B0.1", "W0.0"}, {"F0.0", "B0.0", "F0.1", "B0.1"}});
  EXPECT_TRUE(check_schedule(z).ok()) << check_schedule(z).summary();
}

TEST(Checker, FindsMissingAndDuplicatedOperations) {
  const auto s =
      from_text(Method::k1F1B, 2, 2, {{"F0.0", "F0.1", "B0.0", "B0.0"}, {"F0.0", "B0.0", "B0.1"}});
  const CheckReport r = check_schedule(s);
  EXPECT_FALSE(r.ok());
  EXPECT_TRUE(r.deadlock.empty());  // no replay of a schedule that fails the census
  EXPECT_TRUE(mentions(r.problems, "rank 1", "F0.1 appears 0 times")) << r.summary();
  EXPECT_TRUE(mentions(r.problems, "rank 0", "B x2")) << r.summary();
  EXPECT_TRUE(mentions(r.problems, "rank 0", "micro-batch 1 has B x0")) << r.summary();
}

TEST(Checker, FindsForeignAndInconsistentOperations) {
  // Chunk 1 does not exist in 1F1B; micro-batch 2 is out of range; W without I; B with W.
  const auto s = from_text(
      Method::k1F1B, 2, 2,
      {{"F0.0", "F0.1", "B0.0", "B0.1", "W0.1", "F1.0", "F0.2"}, {"F0.0", "B0.0", "F0.1", "B0.1"}});
  const CheckReport r = check_schedule(s);
  EXPECT_TRUE(mentions(r.problems, "rank 0 step 5", "'F1.0' is not an operation")) << r.summary();
  EXPECT_TRUE(mentions(r.problems, "rank 0 step 6", "'F0.2'")) << r.summary();
  EXPECT_TRUE(mentions(r.problems, "rank 0", "B x1, I x0, W x1")) << r.summary();
}

TEST(Checker, RejectsAPairOfOneMicroBatch) {
  auto s = make_schedule(Method::kDualPipe, 4, 8);
  // Replace some pair by a pair of the same chunk and micro-batch.
  for (auto& step : s.ranks_ops[1])
    if (step.second) {
      step.second = Op{OpKind::kB, step.first.chunk, step.first.micro};
      break;
    }
  const CheckReport r = check_schedule(s);
  EXPECT_TRUE(mentions(r.problems, "rank 1", "same micro-batch")) << r.summary();
}

TEST(Checker, ReportsACrossRankDeadlock) {
  // Rank 1 wants micro-batch 1 before 0, rank 0 wants the gradient of 0 before sending 1.
  const auto s = from_text(Method::k1F1B, 2, 2,
                           {{"F0.0", "B0.0", "F0.1", "B0.1"}, {"F0.1", "F0.0", "B0.0", "B0.1"}});
  const CheckReport r = check_schedule(s);
  EXPECT_TRUE(r.problems.empty()) << r.summary();
  ASSERT_FALSE(r.deadlock.empty());
  EXPECT_TRUE(mentions(r.deadlock, "rank 0 blocked at step 1 'B0.0'", "B0.0 or I0.0 on rank 1"))
      << r.summary();
  EXPECT_TRUE(mentions(r.deadlock, "rank 1 blocked at step 0 'F0.1'", "F0.1 on rank 0"))
      << r.summary();
}

TEST(Checker, ReportsADeadlockInsideAGeneratedSchedule) {
  // Move rank 3's first weight gradient before its input gradient: W waits for I on its rank.
  auto s = make_schedule(Method::kZB1P, 4, 8);
  auto& ops = s.ranks_ops[3];
  size_t i = 0, w = 0;
  for (size_t k = 0; k < ops.size(); ++k) {
    if (ops[k].first == Op{OpKind::kI, 0, 0}) i = k;
    if (ops[k].first == Op{OpKind::kW, 0, 0}) w = k;
  }
  ASSERT_LT(i, w);
  std::swap(ops[i], ops[w]);
  const CheckReport r = check_schedule(s);
  ASSERT_FALSE(r.deadlock.empty());
  EXPECT_TRUE(mentions(r.deadlock, "rank 3 blocked", "'W0.0' waiting for B0.0 or I0.0 on rank 3"))
      << r.summary();
}

TEST(Checker, ReferenceReversedDirectionsDeadlock) {
  // DualPipe with the two directions' chunks swapped on every rank cannot run.
  auto s = make_schedule(Method::kDualPipe, 4, 8);
  for (auto& ops : s.ranks_ops)
    for (auto& step : ops) {
      step.first.chunk ^= 1;
      if (step.second) step.second->chunk ^= 1;
    }
  const CheckReport r = check_schedule(s);
  EXPECT_TRUE(r.problems.empty()) << r.summary();
  EXPECT_FALSE(r.deadlock.empty());
}

}  // namespace
}  // namespace fp8moe::pipeline
