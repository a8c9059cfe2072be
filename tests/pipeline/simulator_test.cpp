// Simulator: exact timings on cases small enough to work out by hand, memory, and the closed-form
// bubbles over the P x M grid in the regimes where they hold (docs/pipeline/README.md).
// Run: build-pipeline/tests/test_pipeline --gtest_filter='Simulator*:ClosedForm*'
#include "fp8moe/pipeline/simulator.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>

namespace fp8moe::pipeline {
namespace {

std::vector<int> micro_grid(Method method, int p) {
  std::vector<int> out;
  for (int m : {p, p + 1, p + 2, 2 * p, 2 * p + 1, 2 * p + 2, 3 * p, 20, 33, 64}) {
    try {
      check_supported(method, p, m);
      if (std::find(out.begin(), out.end(), m) == out.end()) out.push_back(m);
    } catch (const Error&) {
    }
  }
  return out;
}

SimResult run(Method method, int p, int m, const Costs& costs, P2P p2p = {}) {
  SimOptions o;
  o.costs = costs;
  o.p2p = p2p;
  return simulate(make_schedule(method, p, m), o);
}

TEST(SimulatorCosts, ParsesAndFillsDefaults) {
  const Costs c = parse_costs("F=1,B=2,I=1,W=1,FB=2.6");
  EXPECT_EQ(c.fb, 2.6);
  const Costs d = parse_costs("B=3");
  EXPECT_EQ(d.f, 1);
  EXPECT_EQ(d.w, 1.5);
  EXPECT_EQ(d.i, 1.5);
  EXPECT_EQ(d.fb, 4);
  EXPECT_EQ(parse_costs("f&b=2").fb, 2);
  for (const char* bad : {"X=1", "F=-1", "F=abc", "F", "F=1,F=2", "W=3", "F=nan"})
    EXPECT_THROW(parse_costs(bad), Error) << bad;
}

TEST(SimulatorTimes, OneFOneBByHand) {
  // P=2, M=2, F=1, B=2: rank 0 F0 [0,1] F1 [1,2] B0 [4,6] B1 [7,9];
  // rank 1 F0 [1,2] B0 [2,4] F1 [4,5] B1 [5,7].
  const SimResult r = run(Method::k1F1B, 2, 2, parse_costs("F=1,B=2"));
  EXPECT_EQ(r.makespan, 9);
  const std::vector<std::pair<double, double>> want0 = {{0, 1}, {1, 2}, {4, 6}, {7, 9}};
  const std::vector<std::pair<double, double>> want1 = {{1, 2}, {2, 4}, {4, 5}, {5, 7}};
  for (size_t k = 0; k < 4; ++k) {
    EXPECT_EQ(r.times[0][k].start, want0[k].first) << k;
    EXPECT_EQ(r.times[0][k].end, want0[k].second) << k;
    EXPECT_EQ(r.times[1][k].start, want1[k].first) << k;
    EXPECT_EQ(r.times[1][k].end, want1[k].second) << k;
  }
  EXPECT_EQ(r.bubble[0], 3);
  EXPECT_EQ(r.bubble[1], 3);
}

TEST(SimulatorTimes, PointToPointLatencyDelaysOnlyCrossRankDependencies) {
  // As above with 0.5 per transfer: rank 1 F0 [1.5,2.5] B0 [2.5,4.5] F1 [4.5,5.5] B1 [5.5,7.5];
  // rank 0 B0 [5,7] B1 [8,10].
  const SimResult r = run(Method::k1F1B, 2, 2, parse_costs("F=1,B=2"), P2P{0.5, 0, 0});
  EXPECT_EQ(r.makespan, 10);
  EXPECT_EQ(r.times[1][0].start, 1.5);
  EXPECT_EQ(r.times[1][2].start, 4.5);
  EXPECT_EQ(r.times[0][2].start, 5);
  EXPECT_EQ(r.times[0][3].start, 8);
  // Bandwidth: 100 bytes at 200 bytes per unit adds the same 0.5.
  EXPECT_EQ(run(Method::k1F1B, 2, 2, parse_costs("F=1,B=2"), P2P{0, 200, 100}).makespan, 10);
  // DualPipeV's turn at the last rank (chunk 0 to chunk 1) is on one rank: no transfer there.
  const SimResult v0 = run(Method::kDualPipeV, 2, 4, parse_costs("F=1,B=2"));
  const SimResult v1 = run(Method::kDualPipeV, 2, 4, parse_costs("F=1,B=2"), P2P{0.25, 0, 0});
  EXPECT_GT(v1.makespan, v0.makespan);
}

TEST(SimulatorTimes, PairsCostFBAndHoldBothActivations) {
  const Schedule s = make_schedule(Method::kDualPipe, 4, 8);
  SimOptions o;
  o.costs = parse_costs("F=1,B=2,W=1,FB=2.5");
  const SimResult r = simulate(s, o);
  for (int k = 0; k < 4; ++k)
    for (size_t j = 0; j < s.ranks_ops[k].size(); ++j)
      if (s.ranks_ops[k][j].second) {
        EXPECT_DOUBLE_EQ(r.times[k][j].end - r.times[k][j].start, 2.5);
      }
  // Each rank computes M forwards and M backwards' worth: 8 F, 8 backward (B or I+W).
  for (int k = 0; k < 4; ++k) EXPECT_LE(r.busy[k], 8 * 3.0);
}

TEST(SimulatorMemory, PeaksAndParametersMatchTheReadmeTable) {
  const Costs c = parse_costs("F=1,B=2,W=1");
  for (int p : {2, 4, 6, 8, 16}) {
    const int m = 4 * p;
    for (Method method : kAllMethods)
      for (int mb : micro_grid(method, p)) {
        const SimResult r = run(method, p, mb, c);
        const ClosedForm cf = closed_form(method, p, c, {});
        const int peak =
            *std::max_element(r.peak_activation_chunks.begin(), r.peak_activation_chunks.end());
        EXPECT_EQ(peak, cf.activation_chunks) << method_name(method) << " P=" << p << " M=" << mb;
        for (double params : r.parameters)
          EXPECT_EQ(params, cf.parameter_copies) << method_name(method) << " P=" << p;
      }
    // 1F1B's rank r holds P-r activations.
    const SimResult r = run(Method::k1F1B, p, m, c);
    for (int k = 0; k < p; ++k) EXPECT_EQ(r.peak_activation_chunks[k], p - k);
  }
}

void expect_closed_form_on_grid(Method method, const Costs& c, const std::string& what) {
  for (int p : {2, 4, 6, 8, 16}) {
    const ClosedForm cf = closed_form(method, p, c, {});
    ASSERT_TRUE(cf.applies) << what << ": " << cf.note;
    for (int m : micro_grid(method, p)) {
      const SimResult r = run(method, p, m, c);
      EXPECT_NEAR(r.max_bubble(), cf.bubble, 1e-9)
          << method_name(method) << " P=" << p << " M=" << m << " costs " << what;
    }
  }
}

TEST(ClosedForm, OneFOneBHoldsForAnyCosts) {
  for (const char* c : {"F=1,B=2", "F=3,B=2", "F=1,B=1", "F=0.5,B=4", "F=2,B=0.5"})
    expect_closed_form_on_grid(Method::k1F1B, parse_costs(c), c);
}

TEST(ClosedForm, ZB1PHoldsWhenWFitsTheGaps) {
  for (const char* c : {"F=1,B=2,W=1", "F=1,B=2,W=0.5", "F=2,B=2,W=1", "F=1,B=3,W=1", "F=1,B=2,W=0",
                        "F=3,B=2,W=1", "F=1.5,B=1,W=0.5"})
    expect_closed_form_on_grid(Method::kZB1P, parse_costs(c), c);
}

TEST(ClosedForm, DualPipeAndDualPipeVHoldWhenFEqualsIEqualsW) {
  for (const char* c : {"F=1,B=2,W=1,FB=2", "F=1,B=2,W=1,FB=2.6", "F=1,B=2,W=1,FB=3",
                        "F=2,B=4,W=2,FB=5", "F=0.5,B=1,W=0.5,FB=1.2"}) {
    expect_closed_form_on_grid(Method::kDualPipe, parse_costs(c), c);
    expect_closed_form_on_grid(Method::kDualPipeV, parse_costs(c), c);
  }
}

TEST(ClosedForm, RandomCostsInsideTheRegimes) {
  std::mt19937 rng(7);
  auto pick = [&](std::initializer_list<double> v) {
    return *(v.begin() + std::uniform_int_distribution<size_t>(0, v.size() - 1)(rng));
  };
  for (int trial = 0; trial < 6; ++trial) {
    Costs c;
    c.f = pick({0.5, 1, 1.5, 2, 3});
    c.i = pick({0.5, 1, 1.5, 2});
    c.w = std::min({c.f, c.i, pick({0, 0.25, 0.5, 1, 2})});
    c.b = c.i + c.w;
    c.fb = c.f + c.b;
    const int p = pick({2, 4, 8});
    const int m = 2 * p + 2 * static_cast<int>(pick({0, 1, 5}));
    for (Method method : {Method::k1F1B, Method::kZB1P}) {
      const ClosedForm cf = closed_form(method, p, c, {});
      ASSERT_TRUE(cf.applies) << to_string(c);
      EXPECT_NEAR(run(method, p, m, c).max_bubble(), cf.bubble, 1e-9)
          << method_name(method) << " P=" << p << " M=" << m << " " << to_string(c);
    }
    Costs d;
    d.f = d.i = d.w = c.f;
    d.b = 2 * d.f;
    d.fb = d.b + pick({0, 0.25, 0.5, 1}) * d.f;
    for (Method method : {Method::kDualPipe, Method::kDualPipeV}) {
      const ClosedForm cf = closed_form(method, p, d, {});
      ASSERT_TRUE(cf.applies) << to_string(d);
      EXPECT_NEAR(run(method, p, m, d).max_bubble(), cf.bubble, 1e-9)
          << method_name(method) << " P=" << p << " M=" << m << " " << to_string(d);
    }
  }
}

// Outside the regimes the formulas are estimates; these are the simulator's numbers that
// docs/pipeline/README.md quotes.
TEST(ClosedForm, OutsideTheRegimesTheSimulationDiffers) {
  struct Case {
    Method method;
    const char* costs;
    int p, m;
    double simulated, formula;
  };
  const Case cases[] = {
      {Method::kZB1P, "F=0.5,B=2,W=1", 8, 32, 7, 3.5},           // W > F
      {Method::kDualPipe, "F=1,B=2,W=0.5,FB=2.5", 8, 32, 8, 9},  // W < F = 1 < I
      {Method::kDualPipe, "F=1,B=2,W=1,FB=1", 8, 32, 7, 0},      // F&B < B
      {Method::kDualPipe, "F=1,B=2,W=1,FB=4", 8, 32, 11, 9},     // F&B > F+B
      {Method::kDualPipeV, "F=2,B=2,W=1,FB=3", 8, 32, 10.5, 7},  // F > I
  };
  for (const Case& k : cases) {
    const Costs c = parse_costs(k.costs);
    const ClosedForm cf = closed_form(k.method, k.p, c, {});
    EXPECT_FALSE(cf.applies) << k.costs;
    EXPECT_FALSE(cf.note.empty());
    EXPECT_DOUBLE_EQ(cf.bubble, k.formula) << method_name(k.method) << " " << k.costs;
    EXPECT_NEAR(run(k.method, k.p, k.m, c).max_bubble(), k.simulated, 1e-9)
        << method_name(k.method) << " " << k.costs;
  }
  EXPECT_FALSE(closed_form(Method::k1F1B, 4, parse_costs("F=1"), P2P{0.1, 0, 0}).applies);
}

TEST(Simulator, RefusesABrokenSchedule) {
  Schedule s = make_schedule(Method::k1F1B, 2, 2);
  s.ranks_ops[1].pop_back();
  EXPECT_THROW(simulate(s, {}), Error);
}

}  // namespace
}  // namespace fp8moe::pipeline
