// model_parameter_table (model/parameter_table.h) equals a CPU Model's parameters() and buffers()
// — names, shapes, weight decay, order — for tiny.json, tiny.json with the direct query
// projection (q_lora_rank null) and tiny.json with two MTP depths; and its total equals
// count_parameters for DeepSeek-V3's own config (no Model built).
#include <gtest/gtest.h>

#include <deque>
#include <string>

#include "fp8moe/core/json.h"
#include "fp8moe/model/config.h"
#include "fp8moe/model/model.h"
#include "fp8moe/model/parameter_table.h"

namespace fp8moe {
namespace {

ModelConfig tiny(const Json& overrides) {
  Json j = load_model_config(std::string(FP8MOE_SOURCE_DIR) + "/configs/tiny.json").to_json();
  for (auto it = overrides.begin(); it != overrides.end(); ++it) j[it.key()] = it.value();
  return parse_model_config(j, "tiny.json with overrides");
}

void expect_same(const std::vector<ParameterSpec>& specs, const std::deque<Parameter>& params,
                 const char* what) {
  ASSERT_EQ(specs.size(), params.size()) << what;
  for (size_t i = 0; i < specs.size(); ++i) {
    EXPECT_EQ(specs[i].name, params[i].name) << what << " #" << i;
    EXPECT_EQ(specs[i].shape, params[i].shape) << what << " " << params[i].name;
    EXPECT_EQ(specs[i].weight_decay, params[i].weight_decay) << what << " " << params[i].name;
    EXPECT_EQ(specs[i].numel(), params[i].numel()) << what << " " << params[i].name;
  }
}

TEST(ParameterTable, EqualsTheCpuModelsParametersAndBuffers) {
  const Json cases[] = {Json::object(), Json{{"q_lora_rank", nullptr}},
                        Json{{"num_nextn_predict_layers", 2}}};
  for (const Json& o : cases) {
    const ModelConfig c = tiny(o);
    Model model(c, 7);
    const ParameterTable t = model_parameter_table(c);
    expect_same(t.parameters, model.parameters(), o.dump().c_str());
    expect_same(t.buffers, model.buffers(), o.dump().c_str());
    int64_t n = 0;
    for (const auto& p : t.parameters) n += p.numel();
    EXPECT_EQ(n, model.parameter_count()) << o.dump();
  }
}

TEST(ParameterTable, TotalMatchesTheCountOfDeepSeekV3) {
  const ModelConfig c =
      load_model_config(std::string(FP8MOE_SOURCE_DIR) + "/configs/deepseek-v3.json");
  const ParameterTable t = model_parameter_table(c);
  int64_t n = 0;
  for (const auto& p : t.parameters) n += p.numel();
  const ParameterReport r = count_parameters(c);
  EXPECT_EQ(n, r.main_total + r.mtp_total);
  EXPECT_EQ(static_cast<int64_t>(t.buffers.size()),
            (c.num_hidden_layers + c.num_nextn_predict_layers - c.first_k_dense_replace));
}

}  // namespace
}  // namespace fp8moe
