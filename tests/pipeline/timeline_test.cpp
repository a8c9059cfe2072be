// Timelines: the trace has one complete event per step at its simulated time on its rank's row;
// the SVG has a box group per step and a row label per rank.
// Run: build-pipeline/tests/test_pipeline --gtest_filter='Timeline*'
#include "fp8moe/pipeline/timeline.h"

#include <gtest/gtest.h>

namespace fp8moe::pipeline {
namespace {

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t pos = text.find(what); pos != std::string::npos; pos = text.find(what, pos + 1)) ++n;
  return n;
}

TEST(Timeline, ChromeTraceHasOneEventPerStep) {
  const Schedule s = make_schedule(Method::kDualPipe, 4, 8);
  SimOptions o;
  o.costs = parse_costs("F=1,B=2,W=1,FB=2.6");
  const SimResult r = simulate(s, o);
  const Json trace = Json::parse(chrome_trace(s, r, 1000).dump());
  size_t steps = 0;
  for (const auto& ops : s.ranks_ops) steps += ops.size();
  size_t events = 0, names = 0;
  for (const auto& e : trace.at("traceEvents")) {
    if (e.at("ph") == "M" && e.at("name") == "thread_name") ++names;
    if (e.at("ph") != "X") continue;
    ++events;
    const int rank = e.at("tid");
    const int step = e.at("args").at("step");
    ASSERT_LT(rank, 4);
    EXPECT_EQ(e.at("name"), to_string(s.ranks_ops[rank][step]));
    EXPECT_NEAR(e.at("ts").get<double>(), r.times[rank][step].start * 1000, 1e-3);
    EXPECT_NEAR(e.at("dur").get<double>(),
                (r.times[rank][step].end - r.times[rank][step].start) * 1000, 1e-3);
    EXPECT_EQ(e.at("cat"), s.ranks_ops[rank][step].second
                               ? "F&B"
                               : std::string(1, e.at("name").get<std::string>()[0]));
  }
  EXPECT_EQ(events, steps);
  EXPECT_EQ(names, 4u);
}

TEST(Timeline, SvgHasARowPerRankAndABoxPerStep) {
  const Schedule s = make_schedule(Method::kDualPipeV, 4, 8);
  const SimResult r = simulate(s, {});
  const std::string svg = timeline_svg(s, r);
  size_t steps = 0, pairs = 0;
  for (const auto& ops : s.ranks_ops)
    for (const Step& step : ops) {
      ++steps;
      pairs += step.second.has_value();
    }
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
  EXPECT_EQ(count(svg, "<g>"), steps);
  EXPECT_EQ(count(svg, "</g>"), steps);
  EXPECT_EQ(count(svg, ">rank ") - count(svg, "<title>rank "), 4u);  // row labels
  EXPECT_EQ(count(svg, "<title>rank "), steps);                      // tooltips
  // Pair borders: one per pair plus the legend's.
  EXPECT_EQ(count(svg, "stroke=\"black\" stroke-width=\"2\""), pairs + 1);
}

}  // namespace
}  // namespace fp8moe::pipeline
