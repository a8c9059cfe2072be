// What the GPU benchmarks share: their common options (--out, --iters, --rounds, --date, --commit),
// the exit without a GPU (77, as the GPU tests) and the median time of rounds of launches.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "fp8moe/core/cuda_check.h"

namespace fp8moe::bench {

struct BenchOptions {
  std::string out, date = "unknown", commit = "unknown";
  int iters = 20, rounds = 5;
};

// argv into o (o's values are the defaults); a bad or unknown argument: a message naming it,
// exit 2.
inline void parse_bench_options(int argc, char** argv, BenchOptions& o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--out")
      o.out = next();
    else if (a == "--iters")
      o.iters = std::atoi(next().c_str());
    else if (a == "--rounds")
      o.rounds = std::atoi(next().c_str());
    else if (a == "--date")
      o.date = next();
    else if (a == "--commit")
      o.commit = next();
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      std::exit(2);
    }
  }
  if (o.iters < 1 || o.rounds < 1) {
    std::fprintf(stderr, "--iters and --rounds must be positive\n");
    std::exit(2);
  }
}

// False (after a message) when no GPU is visible: the caller exits 77.
inline bool have_gpu(const char* bench) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0) return true;
  std::fprintf(stderr, "%s: no GPU\n", bench);
  return false;
}

// Median over o.rounds of the mean time (µs) of o.iters launches; launch(i) with i rotating over
// `sets` buffer sets (each launched once before, as warm-up).
inline double median_us(const BenchOptions& o, int sets, const std::function<void(int)>& launch) {
  cudaEvent_t a, b;
  FM_CHECK_CUDA(cudaEventCreate(&a));
  FM_CHECK_CUDA(cudaEventCreate(&b));
  for (int i = 0; i < sets; ++i) launch(i);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<double> t;
  for (int r = 0; r < o.rounds; ++r) {
    FM_CHECK_CUDA(cudaEventRecord(a));
    for (int i = 0; i < o.iters; ++i) launch(i % sets);
    FM_CHECK_CUDA(cudaEventRecord(b));
    FM_CHECK_CUDA(cudaEventSynchronize(b));
    float ms = 0;
    FM_CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
    t.push_back(1000.0 * ms / o.iters);
  }
  FM_CHECK_CUDA(cudaEventDestroy(a));
  FM_CHECK_CUDA(cudaEventDestroy(b));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace fp8moe::bench
