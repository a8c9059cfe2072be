// Token sampling on the GPU (kernels::sample_rows: one CTA a row, radix search for the nucleus)
// against the anchor "host_copy", GeneratorGpu's current way (cudaMemcpy of the BF16 logits rows
// to pinned host memory, conversion to float, model/sampling.h's sample_token a row), and a
// "naive" one-thread-per-row argmax kernel (greedy rows only). Same run, same inputs.
// Shapes: rows {1, 8, 64, 256} x vocab {32000, 129280} x {greedy, T 0.8 top_p 0.9}; logits
// 3 x N(0, 1) in BF16, resident in device memory (L2 keeps them between launches where they fit,
// as right after the LM head). Timing: fp8moe and naive by CUDA events (median of rounds of
// `iters` launches); host_copy by the wall clock of copy + sampling (median of 3 rounds, 1
// iteration: its top_p rows sort the vocabulary). mismatches: fp8moe's tokens against the CPU
// reference (rows <= 64).
// Run: sampling_bench [--out rows.jsonl] [--iters 20] [--rounds 5] [--date D] [--commit C]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "bench_common.cuh"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/sampling.h"
#include "fp8moe/model/sampling.h"

namespace {

using namespace fp8moe;
using kernels::SampleRow;

__global__ void fill_logits(__nv_bfloat16* x, int64_t n, uint64_t seed) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  x[i] = __float2bfloat16(3.0f * philox_normal(seed, 5, static_cast<uint64_t>(i)));
}

// naive: one thread a row, a plain argmax (greedy only).
__global__ void naive_argmax(const __nv_bfloat16* x, int64_t rows, int64_t vocab, int32_t* tokens) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const __nv_bfloat16* row = x + r * vocab;
  float best = __bfloat162float(row[0]);
  int32_t id = 0;
  for (int64_t v = 1; v < vocab; ++v) {
    const float f = __bfloat162float(row[v]);
    if (f > best) {
      best = f;
      id = static_cast<int32_t>(v);
    }
  }
  tokens[r] = id;
}

double host_copy_us(const bf16* d_logits, bf16* h_logits, std::vector<float>& f, int64_t rows,
                    int64_t vocab, const std::vector<SampleRow>& params) {
  std::vector<double> t;
  for (int round = 0; round < 4; ++round) {  // the first is a warm-up
    const auto t0 = std::chrono::steady_clock::now();
    FM_CHECK_CUDA(cudaMemcpy(h_logits, d_logits, static_cast<size_t>(rows * vocab) * 2,
                             cudaMemcpyDeviceToHost));
    for (int64_t i = 0; i < rows * vocab; ++i) f[i] = to_float(h_logits[i]);
    int64_t sink = 0;
    for (int64_t r = 0; r < rows; ++r) {
      PhiloxStream rng(params[r].seed, params[r].stream, params[r].counter);
      sink +=
          sample_token(f.data() + r * vocab, vocab, params[r].temperature, params[r].top_p, rng);
    }
    const auto t1 = std::chrono::steady_clock::now();
    if (sink < 0) std::printf("?");
    if (round > 0) t.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

void run_case(const bench::BenchOptions& o, FILE* f, int64_t rows, int64_t vocab, bool greedy,
              const std::string& gpu) {
  bf16* d_logits = nullptr;
  bf16* h_logits = nullptr;
  SampleRow* d_params = nullptr;
  int32_t* d_tokens = nullptr;
  const size_t n = static_cast<size_t>(rows * vocab);
  FM_CHECK_CUDA(cudaMalloc(&d_logits, n * 2));
  FM_CHECK_CUDA(cudaMallocHost(&h_logits, n * 2));
  FM_CHECK_CUDA(cudaMalloc(&d_params, static_cast<size_t>(rows) * sizeof(SampleRow)));
  FM_CHECK_CUDA(cudaMalloc(&d_tokens, static_cast<size_t>(rows) * 4));
  fill_logits<<<static_cast<unsigned>((n + 255) / 256), 256>>>(
      reinterpret_cast<__nv_bfloat16*>(d_logits), static_cast<int64_t>(n),
      static_cast<uint64_t>(rows * 1000 + vocab));
  FM_CHECK_LAUNCH();
  std::vector<SampleRow> params(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    params[r].temperature = greedy ? 0.0f : 0.8f;
    params[r].top_p = greedy ? 1.0f : 0.9f;
    params[r].seed = 42;
    params[r].stream = static_cast<uint64_t>(r);
    params[r].counter = 7;
  }
  FM_CHECK_CUDA(cudaMemcpy(d_params, params.data(), params.size() * sizeof(SampleRow),
                           cudaMemcpyHostToDevice));

  const double us = bench::median_us(o, 1, [&](int) {
    kernels::sample_rows(d_logits, vocab, rows, vocab, d_params, d_tokens, nullptr);
  });
  double naive = -1;
  if (greedy)
    naive = bench::median_us(o, 1, [&](int) {
      naive_argmax<<<static_cast<unsigned>((rows + 127) / 128), 128>>>(
          reinterpret_cast<const __nv_bfloat16*>(d_logits), rows, vocab, d_tokens);
    });
  std::vector<float> fl(n);
  const double host = host_copy_us(d_logits, h_logits, fl, rows, vocab, params);

  // Correctness of the timed configuration: the GPU's tokens against the CPU reference.
  long long mismatches = -1;
  if (rows <= 64) {
    kernels::sample_rows(d_logits, vocab, rows, vocab, d_params, d_tokens, nullptr);
    std::vector<int32_t> got(static_cast<size_t>(rows)), want(static_cast<size_t>(rows));
    FM_CHECK_CUDA(cudaMemcpy(got.data(), d_tokens, got.size() * 4, cudaMemcpyDeviceToHost));
    kernels::sample_rows_reference(h_logits, vocab, rows, vocab, params.data(), want.data());
    mismatches = 0;
    for (int64_t r = 0; r < rows; ++r) mismatches += got[r] != want[r];
  }

  const char* mode = greedy ? "greedy" : "top_p";
  const struct {
    const char* impl;
    double us;
  } rows_out[3] = {{"fp8moe", us}, {"naive", naive}, {"host_copy", host}};
  for (const auto& ro : rows_out) {
    if (ro.us < 0) continue;
    std::printf("%-10s %4lld %7lld %-7s %12.1f %10.2fx %6lld\n", ro.impl,
                static_cast<long long>(rows), static_cast<long long>(vocab), mode, ro.us,
                host / ro.us, ro.impl[0] == 'f' ? mismatches : -1LL);
    if (f != nullptr)
      std::fprintf(f,
                   "{\"bench\":\"sampling\",\"gpu\":\"%s\",\"gpus\":1,\"date\":\"%s\","
                   "\"commit\":\"%s\",\"impl\":\"%s\",\"mode\":\"%s\",\"rows\":%lld,"
                   "\"vocab\":%lld,\"temperature\":%.2f,\"top_p\":%.2f,\"us\":%.2f,"
                   "\"speedup_vs_host_copy\":%.3f%s}\n",
                   gpu.c_str(), o.date.c_str(), o.commit.c_str(), ro.impl, mode,
                   static_cast<long long>(rows), static_cast<long long>(vocab),
                   params[0].temperature, params[0].top_p, ro.us, host / ro.us,
                   ro.impl[0] == 'f' && mismatches >= 0
                       ? (",\"mismatches\":" + std::to_string(mismatches)).c_str()
                       : "");
  }
  std::fflush(stdout);
  cudaFree(d_logits);
  cudaFreeHost(h_logits);
  cudaFree(d_params);
  cudaFree(d_tokens);
}

}  // namespace

int main(int argc, char** argv) {
  bench::BenchOptions o;
  bench::parse_bench_options(argc, argv, o);
  if (!bench::have_gpu("sampling_bench")) return 77;
  FILE* f = o.out.empty() ? nullptr : std::fopen(o.out.c_str(), "a");
  try {
    cudaDeviceProp prop{};
    FM_CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
    std::printf("%-10s %4s %7s %-7s %12s %11s %6s\n", "impl", "rows", "vocab", "mode", "us",
                "vs host", "mism");
    for (bool greedy : {true, false})
      for (int64_t vocab : {32000, 129280})
        for (int64_t rows : {1, 8, 64, 256}) run_case(o, f, rows, vocab, greedy, prop.name);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sampling_bench: %s\n", e.what());
    return 1;
  }
  if (f != nullptr) std::fclose(f);
  return 0;
}
