// The router's CPU reference and the dispatch layout at DeepSeek-V3's gate shape (256 experts,
// top-8, 8 groups, 4 kept), per batch of tokens.
// Run: build-*/bench/router_bench
#include <benchmark/benchmark.h>

#include <vector>

#include "fp8moe/core/philox.h"
#include "fp8moe/moe/dispatch_layout.h"
#include "fp8moe/moe/router.h"

namespace {

std::vector<float> random_logits(int64_t n) {
  fp8moe::PhiloxStream rng(3, 0);
  std::vector<float> v(n);
  for (auto& x : v) x = rng.normal();
  return v;
}

void BM_Route(benchmark::State& state) {
  const fp8moe::RouterConfig c;  // DeepSeek-V3's values
  const int64_t T = state.range(0);
  const std::vector<float> logits = random_logits(T * c.n_routed_experts);
  const std::vector<float> bias(c.n_routed_experts, 0.01f);
  for (auto _ : state) {
    fp8moe::RouterOutput out = fp8moe::route(c, logits.data(), T, bias.data());
    benchmark::DoNotOptimize(out.topk_idx.data());
  }
  state.SetItemsProcessed(state.iterations() * T);
}

void BM_GroupedLayoutEp8(benchmark::State& state) {
  const fp8moe::RouterConfig c;
  const int64_t T = state.range(0);
  const std::vector<float> logits = random_logits(T * c.n_routed_experts);
  const fp8moe::RouterOutput routed = fp8moe::route(c, logits.data(), T, nullptr);
  for (auto _ : state) {
    fp8moe::GroupedLayout g =
        fp8moe::grouped_layout(routed.topk_idx.data(), T, 8, fp8moe::ExpertSharding{256, 8}, 3);
    benchmark::DoNotOptimize(g.row_src.data());
  }
  state.SetItemsProcessed(state.iterations() * T);
}

BENCHMARK(BM_Route)->Arg(128)->Arg(4096)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_GroupedLayoutEp8)->Arg(4096)->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
