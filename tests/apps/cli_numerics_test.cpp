#include <gtest/gtest.h>

#include "../support/run_cli.h"
#include "fp8moe/core/json.h"

namespace fp8moe {
namespace {

using test::run_cli;

TEST(CliNumerics, HelpExplainsEveryFlag) {
  const auto top = run_cli("--help");
  EXPECT_EQ(top.exit_code, 0);
  EXPECT_NE(top.output.find("numerics"), std::string::npos);
  const auto r = run_cli("numerics accumulation --help");
  EXPECT_EQ(r.exit_code, 0);
  for (const char* flag : {"--k", "--mantissa-bits", "--interval", "--trials", "--seed", "--json",
                           "--dist", "--rounding"})
    EXPECT_NE(r.output.find(flag), std::string::npos) << flag;
}

TEST(CliNumerics, BadFlagsAndValuesExitTwoWithOneLine) {
  for (const char* args :
       {"--k 0", "--k 512,abc", "--mantissa-bits 0", "--mantissa-bits 24", "--interval -32",
        "--interval 48", "--trials 0", "--bogus", "--dist cauchy", "--mantissa-bits x"}) {
    const auto r = run_cli(std::string("numerics accumulation ") + args);
    EXPECT_EQ(r.exit_code, 2) << args << ": " << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << args << ": " << r.output;
  }
  EXPECT_EQ(run_cli("").exit_code, 2);
  EXPECT_EQ(run_cli("nosuchcommand").exit_code, 2);
}

TEST(CliNumerics, JsonIsTheDesignedObjectAndShowsPromotionWinning) {
  const auto r = run_cli("numerics accumulation --k 1024,4096 --m 32 --n 32 --trials 1 --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Json j = parse_json(r.output, "cli output");
  EXPECT_EQ(j.at("mantissa_bits"), 14);
  EXPECT_EQ(j.at("interval"), 128);
  ASSERT_EQ(j.at("rows").size(), 2u);
  double previous = 0;
  for (const auto& row : j.at("rows")) {
    const double lim = row.at("limited").at("max_rel_err");
    const double pro = row.at("promoted").at("max_rel_err");
    EXPECT_GT(row.at("limited").at("mean_rel_err").get<double>(), 0.0);
    EXPECT_GT(row.at("promoted").at("mean_rel_err").get<double>(), 0.0);
    if (row.at("k") == 4096) {
      EXPECT_GT(lim, 10 * pro);
    }
    EXPECT_GT(lim, previous);
    previous = lim;
  }
}

TEST(CliNumerics, NormalInputsAndNoPromotionRun) {
  const auto r = run_cli(
      "numerics accumulation --k 256 --m 8 --n 8 --dist normal --interval 0 --rounding nearest");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("256"), std::string::npos);
}

}  // namespace
}  // namespace fp8moe
