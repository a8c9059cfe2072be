// One training step (forward + backward) of configs/tiny.json on the CPU, per precision:
// the figure that sizes the README's fp8-vs-bf16 run. Run from the repository root:
// build/model_step_bench (FP8MOE_CONFIG=path picks another config).
#include <benchmark/benchmark.h>

#include <cstdlib>

#include "fp8moe/core/philox.h"
#include "fp8moe/model/config.h"
#include "fp8moe/model/model.h"

namespace {

void BM_TinyStep(benchmark::State& state) {
  using namespace fp8moe;
  const char* env = std::getenv("FP8MOE_CONFIG");
  const ModelConfig c = load_model_config(env ? env : "configs/tiny.json");
  Model model(c, 1);
  const Precision p = static_cast<Precision>(state.range(0));
  const int64_t batch = 4, window = 128 + c.num_nextn_predict_layers + 1;
  std::vector<int32_t> tokens(static_cast<size_t>(batch * window));
  for (size_t i = 0; i < tokens.size(); ++i)
    tokens[i] = static_cast<int32_t>(philox_u32(1, 0, i) % c.vocab_size);
  for (auto _ : state) {
    model.zero_grad();
    benchmark::DoNotOptimize(model.forward_backward(tokens.data(), batch, window, p, 0.3f, true));
  }
  state.SetLabel(precision_name(p));
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(batch * 128),
                                                  benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_TinyStep)->Arg(0)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
