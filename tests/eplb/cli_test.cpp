// `fp8moe eplb` through the real command line: the README example, stdin/stdout, and exit 2
// with no output written on bad input.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include "../support/run_cli.h"
#include "fp8moe/core/json.h"

namespace fp8moe {
namespace {

namespace fs = std::filesystem;

int run(const std::string& args) {
  return test::run_cli_status(args);
}

fs::path temp_dir() {
  return test::fresh_test_dir("fp8moe_eplb_cli");
}

const char* kReadme = R"({"weight": [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
  [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]],
  "num_replicas": 16, "num_groups": 4, "num_nodes": 2, "num_gpus": 8})";

TEST(EplbCli, ReadmeExample) {
  const fs::path dir = temp_dir();
  std::ofstream(dir / "in.json") << kReadme;
  ASSERT_EQ(run("eplb --input " + (dir / "in.json").string() + " --output " +
                (dir / "out.json").string()),
            0);
  const Json out = read_json_file((dir / "out.json").string());
  EXPECT_EQ(out.at("phy2log"), Json::parse("[[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],"
                                           " [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]"));
  EXPECT_EQ(out.at("logcnt"), Json::parse("[[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],"
                                          " [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]"));
  // log2phy: [layers][experts][max replicas], -1 padded, consistent with phy2log.
  ASSERT_EQ(out.at("log2phy").size(), 2u);
  ASSERT_EQ(out["log2phy"][0].size(), 12u);
  ASSERT_EQ(out["log2phy"][0][0].size(), 2u);
  for (int l = 0; l < 2; ++l)
    for (int e = 0; e < 12; ++e) {
      int n = 0;
      for (const auto& slot : out["log2phy"][l][e]) {
        if (slot.get<int>() < 0) continue;
        EXPECT_EQ(out["phy2log"][l][slot.get<int>()].get<int>(), e);
        ++n;
      }
      EXPECT_EQ(n, out["logcnt"][l][e].get<int>());
    }
  // stdin to stdout gives the same document.
  const std::string pipe = "cat " + (dir / "in.json").string() + " | " + FP8MOE_CLI +
                           " eplb --input - --output - > " + (dir / "piped.json").string();
  ASSERT_EQ(std::system(pipe.c_str()), 0);
  EXPECT_EQ(read_json_file((dir / "piped.json").string()), out);
  fs::remove_all(dir);
}

TEST(EplbCli, RandomFixtureCasesMatchTheReference) {
  // Every case of the reference's fixture, through the command line, compared whole.
  const fs::path dir = temp_dir();
  const Json fx =
      read_json_file(std::string(FP8MOE_SOURCE_DIR) + "/tests/eplb/fixtures/eplb_small.json");
  for (const auto& c : fx.at("cases")) {
    std::ofstream(dir / "in.json") << c.at("input").dump();
    ASSERT_EQ(run("eplb --input " + (dir / "in.json").string() + " --output " +
                  (dir / "out.json").string()),
              0);
    const Json out = read_json_file((dir / "out.json").string());
    const std::string name = c.at("name").get<std::string>();
    EXPECT_EQ(out.at("phy2log"), c.at("phy2log")) << name;
    EXPECT_EQ(out.at("logcnt"), c.at("logcnt")) << name;
    EXPECT_EQ(out.at("log2phy"), c.at("log2phy")) << name;
  }
  fs::remove_all(dir);
}

TEST(EplbCli, BadInputExits2AndWritesNothing) {
  const fs::path dir = temp_dir();
  const std::map<std::string, std::string> bad = {
      {"ragged",
       R"({"weight": [[1, 2], [3]], "num_replicas": 4, "num_groups": 1, "num_nodes": 1, "num_gpus": 2})"},
      {"r_mod_p",
       R"({"weight": [[1, 2]], "num_replicas": 3, "num_groups": 1, "num_nodes": 1, "num_gpus": 2})"},
      {"negative",
       R"({"weight": [[1, -2]], "num_replicas": 4, "num_groups": 1, "num_nodes": 1, "num_gpus": 2})"},
      {"missing", R"({"weight": [[1, 2]], "num_replicas": 4, "num_groups": 1, "num_gpus": 2})"},
      {"not_json", R"({"weight": )"},
  };
  for (const auto& [name, text] : bad) {
    std::ofstream(dir / "in.json") << text;
    const fs::path out = dir / (name + ".json");
    EXPECT_EQ(run("eplb --input " + (dir / "in.json").string() + " --output " + out.string()), 2)
        << name;
    EXPECT_FALSE(fs::exists(out)) << name;
  }
  EXPECT_EQ(run("eplb --input " + (dir / "nope.json").string() + " --output -"), 2);
  EXPECT_EQ(run("eplb --output -"), 2);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace fp8moe
