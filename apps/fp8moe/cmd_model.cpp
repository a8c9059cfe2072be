// fp8moe model info --config F [--json]: total and activated parameters per part of a
// DeepSeek-V3-architecture model given as a Hugging Face config.json.
#include <cstdio>
#include <iostream>

#include "command.h"
#include "fp8moe/core/json.h"
#include "fp8moe/model/config.h"

namespace {

std::string human(int64_t n) {
  char buf[32];
  const double v = static_cast<double>(n);
  if (v >= 1e9)
    std::snprintf(buf, sizeof buf, "%.2fB", v / 1e9);
  else if (v >= 1e6)
    std::snprintf(buf, sizeof buf, "%.2fM", v / 1e6);
  else if (v >= 1e3)
    std::snprintf(buf, sizeof buf, "%.1fK", v / 1e3);
  else
    std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(n));
  return buf;
}

void setup(CLI::App& app) {
  app.require_subcommand(1);
  CLI::App* info = app.add_subcommand("info", "Total and activated parameters per part");
  auto config = std::make_shared<std::string>();
  auto json = std::make_shared<bool>(false);
  info->add_option("--config", *config, "Hugging Face config.json (DeepSeek-V3 field names)")
      ->required();
  info->add_flag("--json", *json, "Print one JSON object");
  info->callback([config, json] {
    using namespace fp8moe;
    const ModelConfig c = load_model_config(*config);
    const ParameterReport r = count_parameters(c);
    if (*json) {
      OrderedJson out;
      out["config"] = *config;
      out["parts"] = OrderedJson::array();
      for (const auto& p : r.parts)
        out["parts"].push_back({{"name", p.name}, {"total", p.total}, {"activated", p.activated}});
      out["total"] = r.main_total;
      out["activated"] = r.main_activated;
      out["mtp_total"] = r.mtp_total;
      out["mtp_activated"] = r.mtp_activated;
      std::cout << out.dump(2) << "\n";
      return;
    }
    std::printf("%-36s %14s %14s\n", "part", "total", "activated");
    for (const auto& p : r.parts)
      std::printf("%-36s %14s %14s\n", p.name.c_str(), human(p.total).c_str(),
                  human(p.activated).c_str());
    std::printf("%-36s %14s %14s\n", "main model (without MTP)", human(r.main_total).c_str(),
                human(r.main_activated).c_str());
    if (c.num_nextn_predict_layers > 0)
      std::printf("%-36s %14s %14s\n", "MTP modules (own weights)", human(r.mtp_total).c_str(),
                  human(r.mtp_activated).c_str());
    std::printf("%-36s %14s %14s\n", "all", human(r.main_total + r.mtp_total).c_str(),
                human(r.main_activated + r.mtp_activated).c_str());
    if (c.num_nextn_predict_layers > 0) {
      // NOTE: Hugging Face checkpoints store a copy of the embedding and the head in each MTP
      // layer, which is how DeepSeek-V3's files add up to 685B.
      const int64_t copies = 2 * c.num_nextn_predict_layers * c.vocab_size * c.hidden_size;
      std::printf("%-36s %14s\n", "as stored in an HF checkpoint",
                  human(r.main_total + r.mtp_total + copies).c_str());
    }
  });
}

}  // namespace

FM_REGISTER_COMMAND("model", "The V3-architecture model: parameter counts", setup);
