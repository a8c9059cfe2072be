// The FP8 weight refresh (FP32 masters -> 128x128-scaled E4M3 codes and their transposed copy)
// against its previous form, same run:
//   new  = kernels::WeightQuantizer: every weight of the set in one launch;
//   prev = per weight quantize_128x128 then transpose_fp8_weight_blocks (model/linear_gpu.h), and
//          per expert the stacked w13 (gate, up) transposed as one: the five launches an expert
//          that ExpertWeightsFromMasters made until session 22.
// Sets (V3's widths, configs/v3-slice.json): "experts" = 32 routed experts of I 2048, H 7168
// (gate, up, down); "dense" = one dense FFN of I 18432; "attention" = one MLA block's projections
// (q_a 1536 x 7168, q_b 24576 x 1536, kv_a 576 x 7168, kv_b 32768 x 512, o 7168 x 16384).
// Timing: CUDA events around `iters` refreshes of the whole set (each set is GBs: L2 holds none of
// it), median of `rounds`. GB/s = (FP32 master read + codes and transposed codes written +
// scales) / time. Correctness is the tests' job: test_kernels_gpu
// --gtest_filter='QuantizeGpu.WeightQuantizer*' (bit for bit the previous form's output).
// Prints a table; --out appends the rows as JSON lines.
// Run: weight_quant_bench [--out rows.jsonl] [--iters 5] [--rounds 5] [--date D] [--commit C]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "bench_common.cuh"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/kernels/quantize.h"
#include "fp8moe/model/linear_gpu.h"

namespace {

using namespace fp8moe;

__global__ void fill_f32(float* x, int64_t n, uint64_t seed) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint32_t bits = philox_u32(seed, 7, static_cast<uint64_t>(i));
  x[i] = (static_cast<float>(bits >> 8) * (1.0f / 16777216.0f) - 0.5f) * 0.04f;
}

// One weight [n, k] (or a stacked group of `parts` weights of n rows each, quantised separately
// and transposed as one, as w13) with its device buffers.
struct Weight {
  int64_t n = 0, k = 0, parts = 1;
  std::vector<float*> master;  // one per part
  uint8_t *w = nullptr, *wt = nullptr;
  float *sw = nullptr, *swt = nullptr;
};

Weight make_weight(int64_t n, int64_t k, int64_t parts, uint64_t seed) {
  Weight x;
  x.n = n;
  x.k = k;
  x.parts = parts;
  const int64_t rows = n * parts, np = (rows + 127) / 128 * 128;
  for (int64_t p = 0; p < parts; ++p) {
    float* m = nullptr;
    FM_CHECK_CUDA(cudaMalloc(&m, static_cast<size_t>(n * k) * 4));
    fill_f32<<<static_cast<unsigned>((n * k + 255) / 256), 256>>>(m, n * k, seed + p);
    FM_CHECK_LAUNCH();
    x.master.push_back(m);
  }
  FM_CHECK_CUDA(cudaMalloc(&x.w, static_cast<size_t>(rows * k)));
  FM_CHECK_CUDA(cudaMalloc(&x.wt, static_cast<size_t>(np * k)));
  FM_CHECK_CUDA(cudaMalloc(&x.sw, static_cast<size_t>(np / 128 * (k / 128)) * 4));
  FM_CHECK_CUDA(cudaMalloc(&x.swt, static_cast<size_t>(np / 128 * (k / 128)) * 4));
  return x;
}

void free_weight(Weight& x) {
  for (float* m : x.master) FM_CHECK_CUDA(cudaFree(m));
  for (void* p : {static_cast<void*>(x.w), static_cast<void*>(x.wt), static_cast<void*>(x.sw),
                  static_cast<void*>(x.swt)})
    FM_CHECK_CUDA(cudaFree(p));
}

void run_set(const bench::BenchOptions& o, FILE* f, const char* set,
             const std::vector<Weight>& weights) {
  std::vector<kernels::WeightQuantJob> jobs;
  double bytes = 0;
  for (const Weight& x : weights) {
    const int64_t rows = x.n * x.parts, np = (rows + 127) / 128 * 128, kb = x.k / 128;
    for (int64_t p = 0; p < x.parts; ++p)
      jobs.push_back({x.master[p], x.n, x.k, x.w + p * x.n * x.k, x.sw + p * (x.n / 128) * kb,
                      x.wt + p * x.n, np, x.swt + p * (x.n / 128), np / 128});
    bytes += 4.0 * rows * x.k + rows * x.k + np * x.k + 8.0 * (np / 128) * kb;
  }
  const kernels::WeightQuantizer quantizer(jobs);
  double us[2];
  us[0] = bench::median_us(o, 1, [&](int) { quantizer.run(nullptr); });
  us[1] = bench::median_us(o, 1, [&](int) {
    for (const Weight& x : weights) {
      const int64_t kb = x.k / 128;
      for (int64_t p = 0; p < x.parts; ++p)
        kernels::quantize_128x128(x.master[p], x.n, x.k, x.k, false, x.w + p * x.n * x.k, x.k,
                                  x.sw + p * (x.n / 128) * kb, nullptr);
      transpose_fp8_weight_blocks(x.w, x.sw, x.n * x.parts, x.k, x.wt, x.swt, nullptr);
    }
  });
  const char* impls[2] = {"new", "prev"};
  for (int i = 0; i < 2; ++i) {
    char line[512];
    std::snprintf(line, sizeof line,
                  "{\"bench\":\"weight_quant\",\"set\":\"%s\",\"impl\":\"%s\",\"weights\":%zu,"
                  "\"launches\":%zu,\"us\":%.1f,\"gbps\":%.1f,\"speedup_vs_prev\":%.2f,"
                  "\"date\":\"%s\",\"commit\":\"%s\"}",
                  set, impls[i], weights.size(), i == 0 ? size_t{1} : jobs.size() + weights.size(),
                  us[i], bytes / us[i] * 1e-3, us[1] / us[i], o.date.c_str(), o.commit.c_str());
    std::printf("%-10s %-5s %9.1f %8.1f %7.2fx  (%zu weights, %zu launches)\n", set, impls[i],
                us[i], bytes / us[i] * 1e-3, us[1] / us[i], weights.size(),
                i == 0 ? size_t{1} : jobs.size() + weights.size());
    if (f != nullptr) std::fprintf(f, "%s\n", line);
  }
}

}  // namespace

int main(int argc, char** argv) {
  bench::BenchOptions o;
  o.iters = 5;
  bench::parse_bench_options(argc, argv, o);
  if (!bench::have_gpu("weight_quant_bench")) return 77;
  FILE* f = o.out.empty() ? nullptr : std::fopen(o.out.c_str(), "a");
  try {
    std::printf("%-10s %-5s %9s %8s %8s\n", "set", "impl", "us", "GB/s", "vs prev");
    const int64_t H = 7168;
    {
      std::vector<Weight> experts;
      for (int e = 0; e < 32; ++e) {
        experts.push_back(make_weight(2048, H, 2, 100 + 10 * e));  // w13: gate, up
        experts.push_back(make_weight(H, 2048, 1, 105 + 10 * e));  // w2: down
      }
      run_set(o, f, "experts", experts);
      for (Weight& x : experts) free_weight(x);
    }
    {
      std::vector<Weight> dense = {make_weight(18432, H, 2, 7), make_weight(H, 18432, 1, 8)};
      run_set(o, f, "dense", dense);
      for (Weight& x : dense) free_weight(x);
    }
    {
      std::vector<Weight> attention = {make_weight(1536, H, 1, 11), make_weight(24576, 1536, 1, 12),
                                       make_weight(576, H, 1, 13), make_weight(32768, 512, 1, 14),
                                       make_weight(H, 16384, 1, 15)};
      run_set(o, f, "attention", attention);
      for (Weight& x : attention) free_weight(x);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "weight_quant_bench: %s\n", e.what());
    return 1;
  }
  if (f != nullptr) std::fclose(f);
  return 0;
}
