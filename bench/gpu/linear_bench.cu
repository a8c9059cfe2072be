// The FP8 linear layer (model/linear_gpu.h: LinearFp8Gpu) against the BF16 linear layer a trainer
// would otherwise run, LinearBf16Gpu (cuBLASLt's BF16 GEMMs, FP32 accumulation), in the same run:
//   forward   ours: quantise x 1x128 + FP8 GEMM;              anchor: y = x W^T (BF16 out)
//   backward  ours: dy quantised (and transposed), x^T requantised from the FP8 cache, Dgrad
//             and Wgrad FP8 GEMMs;                             anchor: dx = dy W (BF16 out) and
//             dW += dy^T x (FP32 out, beta 1)
// Shapes: DeepSeek-V3's dense projections at M = 4096 tokens (N, K): the fused q_a + kv_a
// (2112, 7168), q_b (24576, 1536), kv_b (32768, 512), o (7168, 16384), the dense FFN's gate + up
// (36864, 7168) and down (7168, 18432). The weights are refreshed from FP32 masters once, outside
// the timing (a trainer does it once per optimizer step).
// Timing: each op is one CUDA graph; a replay = an L2 flush (a 256 MB write, outside the timed
// interval), start event, the graph, end event; median of --reps replays, ours and the anchor
// interleaved. TFLOPS: forward 2 M N K, backward 4 M N K. Correctness is the tests' job
// (test_model_gpu --gtest_filter='LinearFp8Gpu*'); the bench prints ||ours - anchor|| / ||anchor||
// of y and dx as a sanity line (FP8 against BF16: ~3-4e-2 expected for independent normal inputs,
// E4M3's ~2.6 % RMS rounding on both operands).
// Run: linear_bench [--out rows.jsonl] [--reps 15] [--m 4096] [--date D] [--commit C]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "bench_args.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/fp8_gemm.h"
#include "fp8moe/kernels/quantize.h"
#include "fp8moe/kernels/requantize.h"
#include "fp8moe/model/linear_gpu.h"

namespace {

using namespace fp8moe;

template <typename T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) { FM_CHECK_CUDA(cudaMalloc(&p, n * sizeof(T))); }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
};

// x[i] = scale * N(0, 1), counter-based (core/philox.h): independent values, so that the
// FP8-vs-BF16 sanity line measures rounding, not a structured input's coherent sums.
__global__ void fill_normal_kernel(float* x, int64_t n, float scale, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] = scale * philox_normal(seed, 0, static_cast<uint64_t>(i));
}
__global__ void to_bf16_kernel(const float* x, __nv_bfloat16* y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    y[i] = __float2bfloat16_rn(x[i]);
}
__global__ void flush_kernel(uint4* p, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    p[i] = make_uint4(static_cast<uint32_t>(i), 0, 0, 0);
}

struct Timer {
  cudaStream_t stream;
  Dev<uint4>& flush;
  std::vector<cudaGraphExec_t> execs;

  int add(const std::function<void()>& op) {
    cudaGraph_t g;
    cudaGraphExec_t e;
    FM_CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    op();
    FM_CHECK_CUDA(cudaStreamEndCapture(stream, &g));
    FM_CHECK_CUDA(cudaGraphInstantiate(&e, g, 0));
    FM_CHECK_CUDA(cudaGraphDestroy(g));
    execs.push_back(e);
    return static_cast<int>(execs.size()) - 1;
  }
  // Median microseconds of each graph, replays interleaved.
  std::vector<double> run(int reps) {
    std::vector<std::vector<double>> samples(execs.size());
    cudaEvent_t e0, e1;
    FM_CHECK_CUDA(cudaEventCreate(&e0));
    FM_CHECK_CUDA(cudaEventCreate(&e1));
    for (int r = -1; r < reps; ++r) {
      for (size_t g = 0; g < execs.size(); ++g) {
        flush_kernel<<<1024, 256, 0, stream>>>(flush.p, static_cast<int64_t>(flush.n));
        FM_CHECK_CUDA(cudaEventRecord(e0, stream));
        FM_CHECK_CUDA(cudaGraphLaunch(execs[g], stream));
        FM_CHECK_CUDA(cudaEventRecord(e1, stream));
        FM_CHECK_CUDA(cudaEventSynchronize(e1));
        float ms = 0;
        FM_CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
        if (r >= 0) samples[g].push_back(ms * 1000.0);
      }
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    std::vector<double> out;
    for (auto& s : samples) {
      std::sort(s.begin(), s.end());
      out.push_back(s[s.size() / 2]);
    }
    return out;
  }
  ~Timer() {
    for (auto e : execs) cudaGraphExecDestroy(e);
  }
};

double rel_diff_bf16(const bf16* a, const bf16* b, int64_t n) {
  std::vector<uint16_t> x(static_cast<size_t>(n)), y(static_cast<size_t>(n));
  FM_CHECK_CUDA(cudaMemcpy(x.data(), a, n * 2, cudaMemcpyDeviceToHost));
  FM_CHECK_CUDA(cudaMemcpy(y.data(), b, n * 2, cudaMemcpyDeviceToHost));
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float u = to_float(bf16{x[i]}), v = to_float(bf16{y[i]});
    num += double(u - v) * (u - v);
    den += double(v) * v;
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

struct Args {
  std::string out, date = "unknown", commit = "unknown";
  int reps = 15;
  int64_t m = 4096;
};

Args parse(int argc, char** argv) {
  Args a;
  bench::parse_flags(argc, argv, "linear_bench",
                     {{"--out", [&](const std::string& v) { a.out = v; }},
                      {"--reps", [&](const std::string& v) { a.reps = std::stoi(v); }},
                      {"--m", [&](const std::string& v) { a.m = std::stoll(v); }},
                      {"--date", [&](const std::string& v) { a.date = v; }},
                      {"--commit", [&](const std::string& v) { a.commit = v; }}});
  FM_CHECK_ARG(a.reps >= 1 && a.m >= 1, "linear_bench: --reps and --m must be >= 1");
  return a;
}

}  // namespace

int main(int argc, char** argv) try {
  const Args args = parse(argc, argv);
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "linear_bench: no GPU\n");
    return 77;
  }
  cudaDeviceProp prop{};
  FM_CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  FILE* out = args.out.empty() ? nullptr : std::fopen(args.out.c_str(), "w");
  FM_CHECK(args.out.empty() || out != nullptr, "linear_bench: cannot write ", args.out);
  cudaStream_t stream;
  FM_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  Dev<uint4> flush((size_t(256) << 20) / sizeof(uint4));

  struct Shape {
    const char* name;
    int64_t n, k;
  };
  const Shape shapes[] = {{"q_a+kv_a", 2112, 7168},     {"q_b", 24576, 1536},
                          {"kv_b", 32768, 512},         {"o", 7168, 16384},
                          {"ffn_gate_up", 36864, 7168}, {"ffn_down", 7168, 18432}};
  const int64_t M = args.m;
  std::printf("linear_bench on %s (%d SMs), M = %lld tokens, median of %d cold-L2 replays\n",
              prop.name, prop.multiProcessorCount, static_cast<long long>(M), args.reps);
  std::printf("  %-12s %6s %6s  %-8s %10s %8s %12s %8s %9s  %s\n", "shape", "N", "K", "op",
              "fp8moe us", "TFLOPS", "bf16 lt us", "TFLOPS", "lt / ours", "|ours-lt|/|lt|");
  for (const Shape& sh : shapes) {
    const int64_t N = sh.n, K = sh.k;
    Dev<float> master(size_t(N * K)), xf(size_t(M * K)), dyf(size_t(M * N)), dw(size_t(N * K)),
        dw_lt(size_t(N * K));
    Dev<bf16> x(size_t(M * K)), dy(size_t(M * N)), y(size_t(M * N)), y_lt(size_t(M * N)),
        dx(size_t(M * K)), dx_lt(size_t(M * K));
    fill_normal_kernel<<<1024, 256, 0, stream>>>(master.p, N * K, 1.0f / std::sqrt(float(K)), 1);
    fill_normal_kernel<<<1024, 256, 0, stream>>>(xf.p, M * K, 1.0f, 2);
    fill_normal_kernel<<<1024, 256, 0, stream>>>(dyf.p, M * N, 1e-3f, 3);
    to_bf16_kernel<<<1024, 256, 0, stream>>>(xf.p, reinterpret_cast<__nv_bfloat16*>(x.p), M * K);
    to_bf16_kernel<<<1024, 256, 0, stream>>>(dyf.p, reinterpret_cast<__nv_bfloat16*>(dy.p), M * N);
    FM_CHECK_CUDA(cudaMemsetAsync(dw.p, 0, dw.n * 4, stream));
    FM_CHECK_CUDA(cudaMemsetAsync(dw_lt.p, 0, dw_lt.n * 4, stream));
    LinearWeightsDevice weights(N, K);
    weights.refresh(master.p, stream);
    LinearFp8Gpu layer(M, N, K);
    // The anchor: the same layer in BF16 (LinearBf16Gpu, cuBLASLt), its plans made eagerly once.
    LinearBf16Gpu bf16_layer(M, N, K);
    bf16_layer.refresh_weight(master.p, stream);
    bf16_layer.forward(x.p, M, y_lt.p, stream);
    const LinearWeightsGpu wv = weights.view();
    Timer timer{stream, flush, {}};
    const int ours_f = timer.add([&] { layer.forward(x.p, M, wv, y.p, stream); });
    const int ours_b = timer.add([&] { layer.backward(dy.p, wv, dx.p, dw.p, stream); });
    const int ours_bo = timer.add(
        [&] { layer.backward(dy.p, wv, dx.p, dw.p, stream, kernels::WgradOutput::kOverwrite); });
    const int lt_f = timer.add([&] { bf16_layer.forward(x.p, M, y_lt.p, stream); });
    const int lt_b = timer.add([&] { bf16_layer.backward(dy.p, dx_lt.p, dw_lt.p, stream); });
    // The backward's steps as the layer runs them (own buffers; the layer's are private), for
    // the breakdown lines: dy quantised (+ transposed), x^T requantised, Dgrad, Wgrad.
    const int64_t np = (N + 127) / 128 * 128, kb = K / 128;
    Dev<uint8_t> dy8(size_t(M * np)), dyt(size_t(N * M)), x8(size_t(M * K)), xt(size_t(K * M));
    Dev<float> sdy(size_t(np / 128 * M)), sdyt(size_t(M / 128 * ((N + 3) / 4 * 4))),
        xs(size_t(M * kb)), sxt(size_t(M / 128 * ((K + 3) / 4 * 4)));
    constexpr auto kMn = kernels::ScaleLayout::kMnMajor;
    const bool steps = M % 128 == 0 && N % 128 == 0;
    kernels::quantize_1x128(x.p, M, K, K, false, x8.p, K, xs.p, kernels::ScaleLayout::kRowMajor,
                            stream);
    int step_ids[4] = {-1, -1, -1, -1}, fwd_ids[2] = {-1, -1};
    Dev<float> sa(size_t(kb * ((M + 3) / 4 * 4)));
    fwd_ids[0] = timer.add([&] {
      kernels::quantize_1x128(x.p, M, K, K, false, x8.p, K, sa.p, kernels::ScaleLayout::kMnMajor,
                              stream);
    });
    fwd_ids[1] =
        timer.add([&] { kernels::fp8_gemm_nt(x8.p, sa.p, wv.w, wv.sw, y.p, M, N, K, stream); });
    if (steps) {
      step_ids[0] = timer.add([&] {
        kernels::quantize_1x128_transpose(dy.p, M, N, N, false, dy8.p, sdy.p, dyt.p, sdyt.p, kMn,
                                          stream);
      });
      step_ids[1] = timer.add([&] {
        kernels::requantize_1x128_transpose(x8.p, K, xs.p, kernels::ScaleLayout::kRowMajor, M, K,
                                            nullptr, false, xt.p, sxt.p, stream);
      });
      step_ids[2] = timer.add(
          [&] { kernels::fp8_gemm_nt(dy8.p, sdy.p, wv.wt, wv.swt, dx.p, M, K, np, stream); });
      step_ids[3] = timer.add(
          [&] { kernels::fp8_gemm_nt_wgrad(dyt.p, sdyt.p, xt.p, sxt.p, dw.p, N, K, M, stream); });
    }
    const std::vector<double> us = timer.run(args.reps);
    FM_CHECK_CUDA(cudaStreamSynchronize(stream));
    const double e_y = rel_diff_bf16(y.p, y_lt.p, M * N),
                 e_dx = rel_diff_bf16(dx.p, dx_lt.p, M * K);
    const double flops[2] = {2.0 * M * N * K, 4.0 * M * N * K};
    const char* ops[2] = {"forward", "backward"};
    const int ours[2] = {ours_f, ours_b}, anchor[2] = {lt_f, lt_b};
    const double errs[2] = {e_y, e_dx};
    for (int o = 0; o < 2; ++o) {
      const double a = us[ours[o]], b = us[anchor[o]];
      std::printf("  %-12s %6lld %6lld  %-8s %10.1f %8.0f %12.1f %8.0f %9.3f  %.2e\n", sh.name,
                  static_cast<long long>(N), static_cast<long long>(K), ops[o], a,
                  flops[o] / a * 1e-6, b, flops[o] / b * 1e-6, b / a, errs[o]);
      if (o == 0)
        std::printf(
            "  %-12s %6s %6s     x quantise %.1f; fprop GEMM (no "
            "workspace) %.1f;\n",
            "", "", "", us[fwd_ids[0]], us[fwd_ids[1]]);
      if (o == 1 && steps) {
        const char* names[4] = {"dy quantise+transpose", "x requantise^T", "dgrad GEMM",
                                "wgrad GEMM"};
        std::printf("  %-12s %6s %6s    ", "", "", "");
        for (int i = 0; i < 4; ++i) std::printf(" %s %.1f;", names[i], us[step_ids[i]]);
        std::printf(" (backward with dW overwritten: %.1f)", us[ours_bo]);
        std::printf("\n");
      }
      if (out == nullptr) continue;
      const char* impls[2] = {"fp8moe", "cublaslt_bf16"};
      const double t[2] = {a, b};
      for (int i = 0; i < 2; ++i)
        std::fprintf(
            out,
            "{\"bench\":\"linear\",\"gpu\":\"%s\",\"gpus\":1,\"date\":\"%s\","
            "\"commit\":\"%s\",\"impl\":\"%s\",\"shape\":\"%s\",\"op\":\"%s\","
            "\"m\":%lld,\"n\":%lld,\"k\":%lld,\"us\":%.2f,\"tflops\":%.1f%s}\n",
            prop.name, args.date.c_str(), args.commit.c_str(), impls[i], sh.name, ops[o],
            static_cast<long long>(M), static_cast<long long>(N), static_cast<long long>(K), t[i],
            flops[o] / t[i] * 1e-6,
            i == 0 ? (std::string(",\"anchor_over_ours\":") + std::to_string(b / a)).c_str() : "");
    }
  }
  if (out != nullptr) std::fclose(out);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "linear_bench: %s\n", e.what());
  return 1;
}
