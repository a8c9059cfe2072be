// Model config parsing (the DESIGN.md contract) and parameter counts of the real V3 config.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "fp8moe/model/config.h"

namespace fp8moe {
namespace {

const std::string kSource = FP8MOE_SOURCE_DIR;

TEST(ModelConfig, DeepSeekV3CountsMatchTheReport) {
  const ModelConfig c = load_model_config(kSource + "/configs/deepseek-v3.json");
  EXPECT_EQ(c.hidden_size, 7168);
  EXPECT_EQ(c.n_routed_experts, 256);
  EXPECT_EQ(c.rope_scaling.type, "yarn");
  const ParameterReport r = count_parameters(c);
  // The report: 671B total, 37B activated per token; the published checkpoint (main model +
  // the MTP module, which stores its own copy of the embedding and the head) holds 685B.
  EXPECT_NEAR(static_cast<double>(r.main_total) / 1e9, 671.0, 0.5);
  EXPECT_NEAR(static_cast<double>(r.main_activated) / 1e9, 37.5, 0.6);
  const double emb = 129280.0 * 7168.0;
  EXPECT_NEAR((static_cast<double>(r.main_total + r.mtp_total) + 2 * emb) / 1e9, 685.0, 0.6);
}

// DeepSeek-V2-Lite's shape (its config.json has "q_lora_rank": null: queries projected directly
// by q_proj). Its router (softmax, greedy top-k) is not V3's, so V3's is used here; the counts
// do not depend on it. The V2 paper: 15.7B parameters, 2.4B activated per token.
TEST(ModelConfig, NullQLoraRankCountsTheDirectQueryProjection) {
  Json j = {{"vocab_size", 102400},
            {"hidden_size", 2048},
            {"intermediate_size", 10944},
            {"moe_intermediate_size", 1408},
            {"num_hidden_layers", 27},
            {"first_k_dense_replace", 1},
            {"n_routed_experts", 64},
            {"n_shared_experts", 2},
            {"num_experts_per_tok", 6},
            {"n_group", 1},
            {"topk_group", 1},
            {"num_attention_heads", 16},
            {"num_key_value_heads", 16},
            {"q_lora_rank", nullptr},
            {"kv_lora_rank", 512},
            {"qk_nope_head_dim", 128},
            {"qk_rope_head_dim", 64},
            {"v_head_dim", 128},
            {"num_nextn_predict_layers", 0}};
  const ModelConfig c = parse_model_config(j, "v2-lite");
  EXPECT_EQ(c.q_lora_rank, 0);
  EXPECT_TRUE(c.to_json().at("q_lora_rank").is_null());  // written back as HF writes it
  EXPECT_EQ(parse_model_config(c.to_json(), "again").to_json(), c.to_json());
  const ParameterReport r = count_parameters(c);
  EXPECT_NEAR(static_cast<double>(r.main_total) / 1e9, 15.7, 0.05);
  // Activated without the embedding row (the paper's convention): 2.45B.
  const double emb = 102400.0 * 2048.0;
  EXPECT_NEAR((static_cast<double>(r.main_activated) - emb) / 1e9, 2.4, 0.1);
  // q_proj [16 * 192, 2048] per layer in place of q_a/q_b and the norm.
  EXPECT_EQ(r.parts[1].name, "attention (MLA)");
  const int64_t per_layer = 2048 * 16 * 192 + 2048 * 576 + 512 + 512 * 16 * 256 + 16 * 128 * 2048;
  EXPECT_EQ(r.parts[1].total, 27 * per_layer);
  // 0 means the same as null; a missing key keeps V3's 1536.
  j["q_lora_rank"] = 0;
  EXPECT_EQ(parse_model_config(j, "zero").to_json(), c.to_json());
  j.erase("q_lora_rank");
  EXPECT_EQ(parse_model_config(j, "missing").q_lora_rank, 1536);
}

TEST(ModelConfig, MissingKeysTakeDeepSeekV3Values) {
  const ModelConfig c = parse_model_config(Json::object(), "empty");
  const ModelConfig d;
  EXPECT_EQ(c.to_json(), d.to_json());
  EXPECT_EQ(c.q_lora_rank, 1536);
  EXPECT_EQ(c.num_nextn_predict_layers, 1);
}

TEST(ModelConfig, TinyConfigMatchesTheTokenizer) {
  const ModelConfig c = load_model_config(kSource + "/configs/tiny.json");
  EXPECT_EQ(c.vocab_size, 2048);  // data/kjv_sp2048.model
  EXPECT_TRUE(c.rope_scaling.type.empty());
}

TEST(ModelConfig, IgnoredKeysAreAccepted) {
  Json j = {{"architectures", {"DeepseekV3ForCausalLM"}},
            {"torch_dtype", "bfloat16"},
            {"quantization_config", {{"fmt", "e4m3"}}},
            {"transformers_version", "4.33.1"},
            {"use_cache", true},
            {"auto_map", Json::object()}};
  EXPECT_NO_THROW(parse_model_config(j, "cfg"));
}

void expect_error(const Json& j, const std::string& needle) {
  try {
    parse_model_config(j, "cfg.json");
    ADD_FAILURE() << "no error for " << j.dump();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    EXPECT_NE(e.message().find(needle), std::string::npos) << e.message();
  }
}

TEST(ModelConfig, BadConfigsAreErrorsThatNameTheProblem) {
  expect_error({{"hidden_sise", 128}}, "unknown key 'hidden_sise'");
  expect_error({{"hidden_size", "big"}}, "'hidden_size' has the wrong type");
  expect_error({{"n_routed_experts", 10}, {"n_group", 4}}, "cfg.json");
  expect_error({{"first_k_dense_replace", 70}}, "first_k_dense_replace");
  expect_error({{"qk_rope_head_dim", 3}}, "qk_rope_head_dim");
  expect_error({{"scoring_func", "softmax"}}, "scoring_func");
  expect_error({{"rope_scaling", {{"type", "linear"}, {"factor", 2}}}}, "yarn");
  expect_error({{"rope_scaling", {{"type", "yarn"}, {"factr", 2}}}}, "factr");
  expect_error({{"num_key_value_heads", 8}}, "num_key_value_heads");
  expect_error({{"aux_loss_alpha", -1.0}}, "aux_loss_alpha");
  expect_error({{"q_lora_rank", -1}}, "q_lora_rank");
}

TEST(ModelCli, InfoPrintsTheV3Totals) {
  const std::string cmd = std::string(FP8MOE_CLI) + " model info --config " + kSource +
                          "/configs/deepseek-v3.json 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[256];
  while (fgets(buf, sizeof buf, p)) out += buf;
  EXPECT_EQ(pclose(p), 0) << out;
  EXPECT_NE(out.find("671."), std::string::npos) << out;
  EXPECT_NE(out.find("37."), std::string::npos) << out;
}

TEST(ModelCli, UnknownKeyExitsWithTwo) {
  const std::string path = testing::TempDir() + "/bad_config.json";
  FILE* f = std::fopen(path.c_str(), "w");
  std::fputs("{\"hidden_size\": 64, \"n_expert\": 4}", f);
  std::fclose(f);
  const std::string cmd = std::string(FP8MOE_CLI) + " model info --config " + path + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[256];
  while (fgets(buf, sizeof buf, p)) out += buf;
  const int status = pclose(p);
  EXPECT_EQ(WEXITSTATUS(status), 2) << out;
  EXPECT_NE(out.find("unknown key 'n_expert'"), std::string::npos) << out;
}

}  // namespace
}  // namespace fp8moe
