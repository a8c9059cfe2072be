// Pipeline schedules on the CPU: generating, checking and simulating a schedule. `compare` and
// the tests run these for many settings, so they should stay well under a millisecond.
//   ./build/bench/pipeline_simulate_bench --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>

#include "fp8moe/pipeline/checker.h"
#include "fp8moe/pipeline/schedule.h"
#include "fp8moe/pipeline/simulator.h"

namespace fp8moe::pipeline {
namespace {

int64_t steps_of(const Schedule& s) {
  int64_t n = 0;
  for (const auto& ops : s.ranks_ops) n += static_cast<int64_t>(ops.size());
  return n;
}

void BM_Make(benchmark::State& state, Method method) {
  const int p = static_cast<int>(state.range(0)), m = static_cast<int>(state.range(1));
  int64_t steps = 0;
  for (auto _ : state) {
    const Schedule s = make_schedule(method, p, m);
    steps = steps_of(s);
    benchmark::DoNotOptimize(s.ranks_ops.data());
  }
  state.counters["steps"] = static_cast<double>(steps);
}

void BM_Check(benchmark::State& state, Method method) {
  const Schedule s =
      make_schedule(method, static_cast<int>(state.range(0)), static_cast<int>(state.range(1)));
  for (auto _ : state) benchmark::DoNotOptimize(check_schedule(s).ok());
  state.counters["steps/s"] = benchmark::Counter(static_cast<double>(steps_of(s)),
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

void BM_Simulate(benchmark::State& state, Method method) {
  const Schedule s =
      make_schedule(method, static_cast<int>(state.range(0)), static_cast<int>(state.range(1)));
  SimOptions o;
  o.costs = parse_costs("F=1,B=2,I=1,W=1,FB=2.6");
  for (auto _ : state) benchmark::DoNotOptimize(simulate(s, o).makespan);
  state.counters["steps/s"] = benchmark::Counter(static_cast<double>(steps_of(s)),
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

void shapes(benchmark::internal::Benchmark* b) {
  b->Args({8, 20})->Args({16, 64})->Unit(benchmark::kMicrosecond);
}

BENCHMARK_CAPTURE(BM_Make, dualpipe, Method::kDualPipe)->Apply(shapes);
BENCHMARK_CAPTURE(BM_Make, zb1p, Method::kZB1P)->Apply(shapes);
BENCHMARK_CAPTURE(BM_Check, dualpipe, Method::kDualPipe)->Apply(shapes);
BENCHMARK_CAPTURE(BM_Simulate, 1f1b, Method::k1F1B)->Apply(shapes);
BENCHMARK_CAPTURE(BM_Simulate, dualpipe, Method::kDualPipe)->Apply(shapes);
BENCHMARK_CAPTURE(BM_Simulate, dualpipev, Method::kDualPipeV)->Apply(shapes);

}  // namespace
}  // namespace fp8moe::pipeline

BENCHMARK_MAIN();
