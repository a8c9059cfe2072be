// EPLB placement time at DeepSeek-V3 scale (58 MoE layers x 256 experts) and on the public
// reference's README example, on the same loads the reference was timed on
// (tests/eplb/fixtures/eplb_v3.json, found from the working directory or FP8MOE_EPLB_FIXTURE;
// without it, loads of the same distribution are generated and the label says "synthetic").
// Run: build-*/bench/eplb_bench   (from the repository root)
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "fp8moe/core/json.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/eplb/eplb.h"

namespace {

using fp8moe::eplb::Problem;

struct V3Loads {
  std::vector<float> weight;
  std::string label;
};

const V3Loads& v3_loads() {
  static const V3Loads loads = [] {
    std::vector<std::string> paths = {"tests/eplb/fixtures/eplb_v3.json",
                                      "../tests/eplb/fixtures/eplb_v3.json"};
    if (const char* env = std::getenv("FP8MOE_EPLB_FIXTURE")) paths.insert(paths.begin(), env);
    for (const auto& p : paths) {
      if (!std::filesystem::exists(p)) continue;
      const fp8moe::Json fx = fp8moe::read_json_file(p);
      V3Loads out;
      for (const auto& row : fx.at("weight"))
        for (const auto& v : row) out.weight.push_back(static_cast<float>(v.get<double>()));
      out.label = "fixture";
      return out;
    }
    // Same distribution as scripts/eplb/make_fixtures.py: exp(1.2 N(0,1)) * 100.
    V3Loads out;
    fp8moe::PhiloxStream rng(7, 0);
    for (int i = 0; i < 58 * 256; ++i) out.weight.push_back(std::exp(1.2f * rng.normal()) * 100.0f);
    out.label = "synthetic";
    return out;
  }();
  return loads;
}

void run(benchmark::State& state, const Problem& p, const std::string& label) {
  for (auto _ : state) {
    fp8moe::eplb::Plan plan = fp8moe::eplb::rebalance_experts(p);
    benchmark::DoNotOptimize(plan.phy2log.data());
  }
  state.SetLabel(label);
}

void BM_ReadmeExample(benchmark::State& state) {
  Problem p;
  p.num_layers = 2;
  p.num_experts = 12;
  p.weight = {90, 132, 40,  61, 104, 165, 39,  4,   73,  56, 183, 86,
              20, 107, 104, 64, 19,  197, 187, 157, 172, 86, 16,  27};
  p.num_replicas = 16;
  p.num_groups = 4;
  p.num_nodes = 2;
  p.num_gpus = 8;
  run(state, p, "readme");
}

Problem v3(int replicas, int nodes, int gpus) {
  Problem p;
  p.num_layers = 58;
  p.num_experts = 256;
  p.weight = v3_loads().weight;
  p.num_replicas = replicas;
  p.num_groups = 8;
  p.num_nodes = nodes;
  p.num_gpus = gpus;
  return p;
}

void BM_V3_Hierarchical_288_4Nodes_32Gpus(benchmark::State& state) {
  run(state, v3(288, 4, 32), v3_loads().label);
}
void BM_V3_Hierarchical_320_8Nodes_64Gpus(benchmark::State& state) {
  run(state, v3(320, 8, 64), v3_loads().label);
}
// 8 groups on 40 nodes: not divisible, so the global policy (as the reference decides).
void BM_V3_Global_320_320Gpus(benchmark::State& state) {
  run(state, v3(320, 40, 320), v3_loads().label);
}

BENCHMARK(BM_ReadmeExample)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_V3_Hierarchical_288_4Nodes_32Gpus)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_V3_Hierarchical_320_8Nodes_64Gpus)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_V3_Global_320_320Gpus)->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
