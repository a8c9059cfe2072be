// CPU reference benchmarks: fine-grained quantisation and the reference FP8 GEMM (fast FP32
// model and the emulated 14-bit accumulator). These references run inside every GPU test and
// in the CPU training path, so their speed matters.
//   ./build/bench/fp8_reference_bench --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>

#include <vector>

#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/gemm_reference.h"
#include "fp8moe/fp8/quantize.h"

namespace fp8moe {
namespace {

std::vector<float> random_matrix(int64_t rows, int64_t cols, uint64_t stream) {
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (size_t i = 0; i < x.size(); ++i) x[i] = philox_normal(1, stream, i);
  return x;
}

void BM_Quantize(benchmark::State& state, ScaleGranularity g, bool pow2) {
  const int64_t rows = state.range(0), cols = state.range(1);
  const auto x = random_matrix(rows, cols, 1);
  for (auto _ : state) {
    auto q = quantize(x.data(), rows, cols, cols, g, {.pow2_scales = pow2});
    benchmark::DoNotOptimize(q.codes.data());
  }
  state.SetBytesProcessed(state.iterations() * rows * cols * 5);  // read f32, write e4m3
}
BENCHMARK_CAPTURE(BM_Quantize, act_1x128, ScaleGranularity::k1x128, false)->Args({4096, 7168});
BENCHMARK_CAPTURE(BM_Quantize, act_1x128_pow2, ScaleGranularity::k1x128, true)->Args({4096, 7168});
BENCHMARK_CAPTURE(BM_Quantize, weight_128x128, ScaleGranularity::k128x128, false)
    ->Args({7168, 2048});

void BM_GemmReference(benchmark::State& state, AccumulatorModel model) {
  const int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  const int threads = static_cast<int>(state.range(3));
  const auto xa = random_matrix(m, k, 2), xb = random_matrix(n, k, 3);
  const auto a = quantize(xa.data(), m, k, k, ScaleGranularity::k1x128);
  const auto b = quantize(xb.data(), n, k, k, ScaleGranularity::k128x128);
  std::vector<float> d(static_cast<size_t>(m * n));
  for (auto _ : state) {
    gemm_fp8_reference(a.ref(), b.ref(), d.data(), n, model, false, threads);
    benchmark::DoNotOptimize(d.data());
  }
  state.counters["GFLOPS"] =
      benchmark::Counter(2.0 * m * n * k * state.iterations() / 1e9, benchmark::Counter::kIsRate);
}
BENCHMARK_CAPTURE(BM_GemmReference, fp32_promoted, AccumulatorModel{})
    ->Args({256, 256, 1024, 1})
    ->Args({256, 256, 1024, 2})
    ->Args({1024, 512, 512, 2})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
// The fast model per SIMD code (all give the same bits), on the shapes of configs/tiny.json's
// layers: Fprop/Dgrad [512 tokens x 128..384] x K=128..384, Wgrad K = 512 tokens.
void BM_GemmReferenceSimd(benchmark::State& state, FastSimd simd) {
  const FastSimd saved = gemm_fp8_reference_simd();
  if (!set_gemm_fp8_reference_simd(simd)) {
    state.SkipWithError("this CPU cannot run this SIMD code");
    return;
  }
  BM_GemmReference(state, AccumulatorModel{});
  set_gemm_fp8_reference_simd(saved);
}
#define FM_SIMD_SHAPES(name, simd)                    \
  BENCHMARK_CAPTURE(BM_GemmReferenceSimd, name, simd) \
      ->Args({256, 256, 1024, 1})                     \
      ->Args({512, 384, 128, 1})                      \
      ->Args({512, 128, 384, 1})                      \
      ->Args({384, 128, 512, 1})                      \
      ->Unit(benchmark::kMicrosecond)                 \
      ->UseRealTime()
FM_SIMD_SHAPES(generic, FastSimd::kGeneric);
FM_SIMD_SHAPES(avx2, FastSimd::kAvx2);

BENCHMARK_CAPTURE(BM_GemmReference, emulated_14bit, AccumulatorModel::hopper_tensor_core(128))
    ->Args({128, 128, 4096, 2})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace fp8moe

BENCHMARK_MAIN();
