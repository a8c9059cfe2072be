// The command line: `fp8moe pipeline schedule|check|simulate|compare` exit codes and JSON.
// Run: build-pipeline/tests/test_pipeline --gtest_filter='PipelineCli*'
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "../support/run_cli.h"
#include "fp8moe/pipeline/schedule.h"

namespace fp8moe::pipeline {
namespace {

using test::run_cli;

class PipelineCli : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(FP8MOE_CLI)) GTEST_SKIP() << "CLI not built: " << FP8MOE_CLI;
  }
};

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("fp8moe_pipeline_" + name)).string();
}

TEST_F(PipelineCli, ScheduleJsonIsTheLibrarySchedule) {
  for (Method m : kAllMethods) {
    const auto r = run_cli(std::string("pipeline schedule --method ") + method_name(m) +
                           " --ranks 4 --micro-batches 8 --json");
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(Json::parse(r.output), Json::parse(schedule_to_json(make_schedule(m, 4, 8)).dump()));
  }
}

TEST_F(PipelineCli, UnsupportedSettingsExitTwoWithOneLine) {
  for (const char* args :
       {"pipeline schedule --method dualpipe --ranks 3 --micro-batches 12 --json",
        "pipeline schedule --method dualpipe --ranks 4 --micro-batches 9",
        "pipeline schedule --method dualpipev --ranks 4 --micro-batches 7",
        "pipeline schedule --method 1f1b --ranks 8 --micro-batches 7",
        "pipeline schedule --method zb1p --ranks 1 --micro-batches 7",
        "pipeline schedule --method gpipe --ranks 4 --micro-batches 8",
        "pipeline schedule --ranks 4 --micro-batches 8",
        "pipeline simulate --method 1f1b --ranks 4 --micro-batches 8 --cost X=1",
        "pipeline simulate --method 1f1b --ranks 4 --micro-batches 8 --cost F=-1",
        "pipeline simulate --method 1f1b --ranks 4 --micro-batches 8 --p2p-latency -1",
        "pipeline simulate --method 1f1b --ranks 4 --micro-batches abc",
        "pipeline compare --ranks 0 --micro-batches 8",
        "pipeline simulate --method 1f1b --ranks 4 --micro-batches 8 --chunk-scale -1"}) {
    const auto r = run_cli(args);
    EXPECT_EQ(r.exit_code, 2) << args << "\n" << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << args << "\n" << r.output;
  }
}

TEST_F(PipelineCli, HelpListsEveryFlag) {
  const auto r = run_cli("pipeline simulate --help");
  EXPECT_EQ(r.exit_code, 0);
  for (const char* flag :
       {"--method", "--ranks", "--micro-batches", "--cost", "--p2p-latency", "--p2p-bandwidth",
        "--p2p-bytes", "--chunk-scale", "--trace", "--svg", "--json", "--input"})
    EXPECT_NE(r.output.find(flag), std::string::npos) << flag;
  for (const char* sub : {"schedule", "check", "compare"})
    EXPECT_EQ(run_cli(std::string("pipeline ") + sub + " --help").exit_code, 0) << sub;
}

TEST_F(PipelineCli, SimulateJsonAndPictures) {
  const std::string trace = temp_path("trace.json"), svg = temp_path("timeline.svg");
  const auto r = run_cli(
      "pipeline simulate --method dualpipe --ranks 4 --micro-batches 8 --cost "
      "F=1,B=2,W=1,FB=2.6 --json --trace " +
      trace + " --svg " + svg);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Json j = Json::parse(r.output);
  EXPECT_EQ(j.at("method"), "dualpipe");
  EXPECT_EQ(j.at("per_rank").size(), 4u);
  EXPECT_NEAR(j.at("max_bubble").get<double>(), 1.6, 1e-9);  // (P/2-1)(F&B+B-3W)
  EXPECT_TRUE(j.at("closed_form").at("agrees").get<bool>());
  std::ifstream t(trace);
  const Json tj = Json::parse(t);
  EXPECT_GT(tj.at("traceEvents").size(), 62u);
  std::ifstream s(svg);
  const std::string text((std::istreambuf_iterator<char>(s)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text.rfind("<svg", 0), 0u);
  std::filesystem::remove(trace);
  std::filesystem::remove(svg);
}

TEST_F(PipelineCli, CompareJsonCoversEveryMethod) {
  const auto r = run_cli("pipeline compare --ranks 8 --micro-batches 20 --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Json j = Json::parse(r.output);
  ASSERT_EQ(j.at("methods").size(), 4u);
  for (const auto& row : j.at("methods")) {
    EXPECT_TRUE(row.at("supported").get<bool>()) << row.dump();
    EXPECT_TRUE(row.at("agrees").get<bool>()) << row.dump();
  }
  const auto odd = run_cli("pipeline compare --ranks 6 --micro-batches 10 --json");
  ASSERT_EQ(odd.exit_code, 0) << odd.output;
  EXPECT_FALSE(Json::parse(odd.output).at("methods").at(2).at("supported").get<bool>());
}

TEST_F(PipelineCli, CheckAcceptsAFixtureAndRejectsABrokenSchedule) {
  const std::string fixture =
      std::string(FP8MOE_SOURCE_DIR) + "/tests/pipeline/fixtures/dualpipe-P8-M20.json";
  const auto ok = run_cli("pipeline check --input " + fixture);
  EXPECT_EQ(ok.exit_code, 0) << ok.output;
  Schedule s = make_schedule(Method::k1F1B, 2, 2);
  std::swap(s.ranks_ops[1][0], s.ranks_ops[1][2]);  // rank 1: F0.1 before F0.0
  const auto bad = run_cli("pipeline check --input -", schedule_to_json(s).dump());
  EXPECT_EQ(bad.exit_code, 1) << bad.output;
  EXPECT_NE(bad.output.find("deadlock"), std::string::npos) << bad.output;
  const auto garbage = run_cli("pipeline check --input -", "{\"method\":\"1f1b\"}");
  EXPECT_EQ(garbage.exit_code, 2) << garbage.output;
}

}  // namespace
}  // namespace fp8moe::pipeline
