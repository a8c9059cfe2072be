// Schedule generators: text/JSON forms, supported settings, the checker over a grid of P and M,
// and DualPipe/DualPipeV against the public reference's orders (tests/pipeline/fixtures, made
// by scripts/pipeline/dump_reference_orders.py).
// Run: build-pipeline/tests/test_pipeline --gtest_filter='Schedule*'
#include "fp8moe/pipeline/schedule.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <set>

#include "fp8moe/pipeline/checker.h"

namespace fp8moe::pipeline {
namespace {

// Settings each method accepts on the grid P in {2,4,6,8,16}, M up to 64.
std::vector<std::pair<int, int>> grid(Method method) {
  std::vector<std::pair<int, int>> out;
  for (int p : {2, 4, 6, 8, 16})
    for (int m = 1; m <= 64; ++m) {
      try {
        check_supported(method, p, m);
        out.push_back({p, m});
      } catch (const Error&) {
      }
    }
  return out;
}

TEST(ScheduleText, RoundTripsSteps) {
  for (const char* text : {"F0.0", "B1.12", "I0.3", "W1.0", "F0.5|B1.2", "F1.63|B0.7"})
    EXPECT_EQ(to_string(parse_step(text)), text);
  const Step pair = parse_step("F0.5|B1.2");
  ASSERT_TRUE(pair.second.has_value());
  EXPECT_EQ(pair.first, (Op{OpKind::kF, 0, 5}));
  EXPECT_EQ(*pair.second, (Op{OpKind::kB, 1, 2}));
}

TEST(ScheduleText, RejectsMalformedSteps) {
  for (const char* text : {"", "F", "F0", "F0.", "X0.1", "F-1.2", "F0.1|", "F0.1|B", "f0.1",
                           "F0.1x", "F0.1|B1.2|W0.0", "F 0.1"}) {
    try {
      parse_step(text);
      ADD_FAILURE() << "accepted '" << text << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kFormat) << text;
    }
  }
}

TEST(ScheduleSupport, RejectsWhatTheMethodsCannotTake) {
  auto rejects = [](Method m, int p, int mb) {
    try {
      check_supported(m, p, mb);
      return false;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
      EXPECT_EQ(e.message().find('\n'), std::string::npos) << "one line: " << e.message();
      return true;
    }
  };
  EXPECT_TRUE(rejects(Method::k1F1B, 4, 3));
  EXPECT_FALSE(rejects(Method::k1F1B, 4, 4));
  EXPECT_TRUE(rejects(Method::kZB1P, 8, 7));
  EXPECT_FALSE(rejects(Method::kZB1P, 3, 3));
  EXPECT_TRUE(rejects(Method::kDualPipe, 3, 12));  // odd P
  EXPECT_TRUE(rejects(Method::kDualPipe, 4, 9));   // odd M
  EXPECT_TRUE(rejects(Method::kDualPipe, 4, 6));   // M < 2P
  EXPECT_FALSE(rejects(Method::kDualPipe, 4, 8));
  EXPECT_TRUE(rejects(Method::kDualPipeV, 4, 7));
  EXPECT_FALSE(rejects(Method::kDualPipeV, 3, 6));
  EXPECT_FALSE(rejects(Method::kDualPipeV, 4, 9));
  EXPECT_TRUE(rejects(Method::k1F1B, 1, 4));
  EXPECT_TRUE(rejects(Method::kDualPipeV, 2, 0));
  EXPECT_THROW(make_schedule(Method::kDualPipe, 6, 10), Error);
  EXPECT_THROW(parse_method("gpipe"), Error);
  for (Method m : kAllMethods) EXPECT_EQ(parse_method(method_name(m)), m);
}

// DESIGN.md's rules, written out again: what each method accepts on the P x M grid, and that
// everything else is refused with one line of kind kInvalidArgument.
TEST(ScheduleGrid, AcceptsExactlyTheDocumentedSettings) {
  for (Method method : kAllMethods)
    for (int p : {2, 3, 4, 6, 8, 16})
      for (int m = 0; m <= 64; ++m) {
        bool want = m >= 1;
        if (method == Method::k1F1B || method == Method::kZB1P) want = want && m >= p;
        if (method == Method::kDualPipe) want = want && p % 2 == 0 && m % 2 == 0 && m >= 2 * p;
        if (method == Method::kDualPipeV) want = want && m >= 2 * p;
        try {
          const Schedule s = make_schedule(method, p, m);
          EXPECT_TRUE(want) << method_name(method) << " P=" << p << " M=" << m;
          EXPECT_EQ(static_cast<int>(s.ranks_ops.size()), p);
        } catch (const Error& e) {
          EXPECT_FALSE(want) << method_name(method) << " P=" << p << " M=" << m << ": "
                             << e.message();
          EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
          EXPECT_EQ(e.message().find('\n'), std::string::npos);
        }
      }
}

TEST(ScheduleGrid, EveryMethodChecksOnTheGrid) {
  for (Method method : kAllMethods) {
    const auto settings = grid(method);
    EXPECT_GT(settings.size(), 50u) << method_name(method);
    for (auto [p, m] : settings) {
      const Schedule s = make_schedule(method, p, m);
      const CheckReport report = check_schedule(s);
      ASSERT_TRUE(report.ok()) << method_name(method) << " P=" << p << " M=" << m << "\n"
                               << report.summary();
    }
  }
}

TEST(ScheduleGrid, ZeroBubbleSplitOnlyWhereExpected) {
  // 1F1B never splits the backward; ZB1P always does; the dual methods pair F with B.
  for (Method method : kAllMethods) {
    const Schedule s = make_schedule(method, 4, 16);
    std::set<OpKind> kinds;
    int pairs = 0;
    for (const auto& ops : s.ranks_ops)
      for (const Step& step : ops) {
        kinds.insert(step.first.kind);
        if (step.second) {
          ++pairs;
          EXPECT_EQ(step.first.kind, OpKind::kF);
          EXPECT_EQ(step.second->kind, OpKind::kB);
        }
      }
    const bool dual = method == Method::kDualPipe || method == Method::kDualPipeV;
    EXPECT_EQ(kinds.count(OpKind::kB) > 0, method != Method::kZB1P) << method_name(method);
    EXPECT_EQ(kinds.count(OpKind::kI) > 0, method != Method::k1F1B) << method_name(method);
    EXPECT_EQ(pairs > 0, dual) << method_name(method);
  }
}

TEST(ScheduleJson, RoundTrips) {
  for (Method method : kAllMethods) {
    const Schedule s = make_schedule(method, 4, 10);
    const Json j = Json::parse(schedule_to_json(s).dump());
    EXPECT_EQ(j.at("method"), method_name(method));
    EXPECT_EQ(j.at("ranks"), 4);
    EXPECT_EQ(j.at("micro_batches"), 10);
    const Schedule back = schedule_from_json(j, "test");
    EXPECT_EQ(back.method, s.method);
    EXPECT_EQ(back.ranks_ops, s.ranks_ops);
  }
  Json bad = Json::parse(schedule_to_json(make_schedule(Method::k1F1B, 2, 2)).dump());
  bad["extra"] = 1;
  EXPECT_THROW(schedule_from_json(bad, "test"), Error);
}

TEST(ScheduleTopology, DualPipePlacesMirroredChunks) {
  const Topology dp(Method::kDualPipe, 8, 20);
  EXPECT_EQ(dp.num_flows(), 2);
  EXPECT_EQ(dp.micro_batches_per_flow(), 10);
  // Rank 2 holds stage 2 of the copy fed from rank 0 and stage 5 of the one fed from rank 7.
  EXPECT_EQ(dp.place(2, 0).stage, 2);
  EXPECT_EQ(dp.place(2, 1).stage, 5);
  EXPECT_EQ(dp.rank_of(1, 5), 2);
  const Topology v(Method::kDualPipeV, 4, 8);
  EXPECT_EQ(v.stages_per_flow(), 8);
  EXPECT_EQ(v.place(1, 1).stage, 6);
  EXPECT_EQ(v.rank_of(0, 6), 1);
  EXPECT_EQ(v.chunk_of(0, 6), 1);
  EXPECT_EQ(v.chunk_size(), 0.5);
}

// DualPipeV is DualPipe "cut in half" (the reference README's words): ranks 0..P/2-1 of DualPipe
// on P ranks and 2N micro-batches run DualPipeV's order on P/2 ranks and N micro-batches.
TEST(ScheduleGrid, DualPipeVIsTheFirstHalfOfDualPipe) {
  for (int p : {4, 8, 16})
    for (int m = 2 * p; m <= 64; m += 2) {
      const Schedule dp = make_schedule(Method::kDualPipe, p, m);
      const Schedule v = make_schedule(Method::kDualPipeV, p / 2, m / 2);
      for (int r = 0; r < p / 2; ++r)
        ASSERT_EQ(dp.ranks_ops[r], v.ranks_ops[r]) << "P=" << p << " M=" << m << " rank " << r;
    }
}

// The reference's per-rank orders, recorded by scripts/pipeline/dump_reference_orders.py.
TEST(ScheduleReference, DualPipeAndDualPipeVEqualTheReferenceOrders) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(FP8MOE_SOURCE_DIR) / "tests/pipeline/fixtures";
  int seen_dualpipe = 0, seen_dualpipev = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().extension() != ".json") continue;
    const Json j = read_json_file(entry.path().string());
    ASSERT_TRUE(j.contains("reference")) << entry.path();
    const Schedule want = schedule_from_json(j, entry.path().string());
    const Schedule got = make_schedule(want.method, want.ranks, want.micro_batches);
    ASSERT_EQ(got.ranks_ops.size(), want.ranks_ops.size());
    for (int r = 0; r < want.ranks; ++r) {
      ASSERT_EQ(got.ranks_ops[r].size(), want.ranks_ops[r].size()) << entry.path() << " rank " << r;
      for (size_t k = 0; k < want.ranks_ops[r].size(); ++k)
        ASSERT_EQ(to_string(got.ranks_ops[r][k]), to_string(want.ranks_ops[r][k]))
            << entry.path().filename() << " rank " << r << " step " << k;
    }
    (want.method == Method::kDualPipe ? seen_dualpipe : seen_dualpipev) += 1;
  }
  EXPECT_GE(seen_dualpipe, 5);
  EXPECT_GE(seen_dualpipev, 5);
}

}  // namespace
}  // namespace fp8moe::pipeline
