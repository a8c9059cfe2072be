// `fp8moe moe route` and `fp8moe moe simulate` through the real command line: DESIGN.md's JSON
// contract, exit code 2 (and no output file) on inconsistent input.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
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
  return test::fresh_test_dir("fp8moe_moe_cli");
}

void write(const fs::path& p, const std::string& text) {
  std::ofstream(p) << text;
}

TEST(MoeCli, RouteHandCase) {
  const fs::path dir = temp_dir();
  // 8 experts in 4 groups, keep 2 groups, top-2 (router_test's group-limit case, as logits of
  // the probabilities 0.3 0.2 0.6 0.5 0.8 0.7 0.95 0.01) plus an all-equal token.
  write(dir / "in.json", R"({"n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4,
      "topk_group": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": true,
      "scoring_func": "sigmoid",
      "logits": [[-0.8472979, -1.3862944, 0.4054651, 0.0, 1.3862944, 0.8472979, 2.9444390, -4.5951199],
                 [0, 0, 0, 0, 0, 0, 0, 0]],
      "bias": [0, 0, 0, 0, 0, 0, 0, 0]})");
  ASSERT_EQ(run("moe route --input " + (dir / "in.json").string() + " --output " +
                (dir / "out.json").string()),
            0);
  const Json out = read_json_file((dir / "out.json").string());
  EXPECT_EQ(out.at("topk_idx"), Json::parse("[[4, 5], [0, 1]]"));
  EXPECT_NEAR(out["topk_weight"][0][0].get<double>(), 0.8 / 1.5 * 2.5, 1e-6);
  EXPECT_NEAR(out["topk_weight"][0][1].get<double>(), 0.7 / 1.5 * 2.5, 1e-6);
  EXPECT_NEAR(out["topk_weight"][1][0].get<double>(), 1.25, 1e-6);
  fs::remove_all(dir);
}

TEST(MoeCli, RouteRejectsInconsistentInputWithExit2) {
  const fs::path dir = temp_dir();
  const std::string base = R"("num_experts_per_tok": 2, "routed_scaling_factor": 1.0, )";
  const std::map<std::string, std::string> bad = {
      {"row_length", R"({"n_routed_experts": 8, "n_group": 4, "topk_group": 2, )" + base +
                         R"("logits": [[0,0,0,0,0,0,0]]})"},
      {"e_mod_g", R"({"n_routed_experts": 8, "n_group": 3, "topk_group": 2, )" + base +
                      R"("logits": [[0,0,0,0,0,0,0,0]]})"},
      {"tg_gt_g", R"({"n_routed_experts": 8, "n_group": 4, "topk_group": 5, )" + base +
                      R"("logits": [[0,0,0,0,0,0,0,0]]})"},
      {"k_too_big",
       R"({"n_routed_experts": 8, "n_group": 4, "topk_group": 1, "num_experts_per_tok": 3, "logits": [[0,0,0,0,0,0,0,0]]})"},
      {"softmax",
       R"({"n_routed_experts": 8, "n_group": 4, "topk_group": 2, "scoring_func": "softmax", )" +
           base + R"("logits": [[0,0,0,0,0,0,0,0]]})"},
      {"unknown_key", R"({"n_routed_experts": 8, "n_group": 4, "topk_group": 2, "typo": 1, )" +
                          base + R"("logits": [[0,0,0,0,0,0,0,0]]})"},
      {"bias_length", R"({"n_routed_experts": 8, "n_group": 4, "topk_group": 2, )" + base +
                          R"("logits": [[0,0,0,0,0,0,0,0]], "bias": [0]})"},
      {"not_json", "{"},
  };
  for (const auto& [name, text] : bad) {
    write(dir / "in.json", text);
    const fs::path out = dir / (name + ".json");
    EXPECT_EQ(run("moe route --input " + (dir / "in.json").string() + " --output " + out.string()),
              2)
        << name;
    EXPECT_FALSE(fs::exists(out)) << name;
  }
  EXPECT_EQ(run("moe route --input " + (dir / "missing.json").string() + " --output -"), 2);
  fs::remove_all(dir);
}

TEST(MoeCli, SimulateWritesJsonLinesAndSvg) {
  const fs::path dir = temp_dir();
  const std::string args =
      "moe simulate --steps 60 --tokens 128 --seq-len 64 --experts 64 "
      "--top-k 6 --groups 8 --topk-group 4 --gpus 8 --nodes 2 "
      "--redundant 8 --gamma 0.01 --eplb-every 20 --out " +
      (dir / "sim.jsonl").string() + " --svg " + (dir / "sim.svg").string();
  ASSERT_EQ(run(args), 0);
  std::ifstream in(dir / "sim.jsonl");
  std::map<std::string, std::vector<Json>> rows;
  for (std::string line; std::getline(in, line);) {
    const Json j = Json::parse(line);
    rows[j.at("variant").get<std::string>()].push_back(j);
  }
  for (const char* v : {"none", "bias", "seqloss", "bias+seqloss", "eplb", "bias+eplb"})
    ASSERT_EQ(rows[v].size(), 60u) << v;
  const auto tail_mean = [&](const std::string& v, const char* key) {
    double s = 0;
    for (int i = 50; i < 60; ++i) s += rows[v][i].at(key).get<double>() / 10;
    return s;
  };
  EXPECT_LT(tail_mean("bias", "max_vio"), 0.7 * tail_mean("none", "max_vio"));
  EXPECT_LT(tail_mean("eplb", "gpu_imbalance"), tail_mean("none", "gpu_imbalance"));
  EXPECT_TRUE(rows["eplb"][59].at("eplb_placed").get<bool>());
  std::ifstream svg(dir / "sim.svg");
  std::stringstream text;
  text << svg.rdbuf();
  EXPECT_EQ(text.str().rfind("<svg", 0), 0u);
  EXPECT_NE(text.str().find("bias+eplb"), std::string::npos);
  // tokens not a multiple of the sequence length: exit 2, nothing written.
  EXPECT_EQ(
      run("moe simulate --steps 2 --tokens 100 --seq-len 64 --out " + (dir / "bad.jsonl").string()),
      2);
  EXPECT_FALSE(fs::exists(dir / "bad.jsonl"));
  fs::remove_all(dir);
}

}  // namespace
}  // namespace fp8moe
