// The latent form's per-head products (kernels/mla_absorb.h): the tensor-core forms (_tc) against
// the CUDA-core forms (the anchor: FP32 FMAs in index order, the CPU reference's bits), same run,
// same inputs, at small-gpu's attention (8 heads, latent 256) and V3's (128 heads, latent 512),
// from a decoding step's tokens to a prefill pass's. Random BF16 inputs, random E4M3 codes with
// scales spread over binades. Time: median over rounds of the mean of `iters` launches (inputs
// stay in L2 at the small shapes: the products' weights are read once a call either way).
// TFLOPS = 2 x tokens x heads x 128 x latent / time. rel: the tensor-core output's relative
// Frobenius distance to the anchor's.
// Run: mla_absorb_bench [--out rows.jsonl] [--iters 20] [--rounds 5] [--date D] [--commit C]
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "bench_common.cuh"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/dtypes.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/mla_absorb.h"

namespace {

using namespace fp8moe;

template <typename T>
T* upload(const std::vector<T>& v) {
  T* p = nullptr;
  FM_CHECK_CUDA(cudaMalloc(&p, v.size() * sizeof(T)));
  FM_CHECK_CUDA(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

std::vector<float> download_float(const bf16* p, size_t n) {
  std::vector<bf16> h(n);
  FM_CHECK_CUDA(cudaMemcpy(h.data(), p, n * sizeof(bf16), cudaMemcpyDeviceToHost));
  std::vector<float> f(n);
  for (size_t i = 0; i < n; ++i) f[i] = to_float(h[i]);
  return f;
}

double rel(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    den += double(want[i]) * want[i];
  }
  return std::sqrt(num / den);
}

}  // namespace

int main(int argc, char** argv) try {
  bench::BenchOptions o;
  bench::parse_bench_options(argc, argv, o);
  if (!bench::have_gpu("mla_absorb_bench")) return 77;
  cudaDeviceProp prop{};
  FM_CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::FILE* out = o.out.empty() ? nullptr : std::fopen(o.out.c_str(), "a");
  std::printf("%-8s %6s %6s %7s %12s %12s %8s %12s %12s %8s %9s %9s\n", "heads", "latent", "tokens",
              "", "absorb us", "anchor us", "x", "unabsorb us", "anchor us", "x", "rel abs.",
              "rel unab.");
  struct Shape {
    int64_t heads, latent;
  };
  for (const Shape sh : {Shape{8, 256}, Shape{128, 512}}) {
    for (const int64_t T : {1, 8, 64, 512, 4096}) {
      kernels::MlaAbsorbDims d;
      d.heads = sh.heads;
      d.latent_dim = sh.latent;
      const int64_t rows = d.heads * (d.nope_dim + d.value_dim), qd = d.nope_dim + d.rope_dim;
      std::mt19937_64 rng(11 + T);
      std::uniform_real_distribution<float> u(-1.0f, 1.0f);
      std::uniform_int_distribution<int> code(0, 255), e(-12, -4);
      std::vector<uint8_t> codes(static_cast<size_t>(rows * d.latent_dim));
      for (auto& c : codes) {
        c = static_cast<uint8_t>(code(rng));
        if ((c & 0x7F) == 0x7F) c ^= 1;  // no NaN codes
      }
      std::vector<float> scales(static_cast<size_t>(rows / 128 * d.latent_dim / 128));
      for (auto& s : scales) s = std::ldexp(1.0f, e(rng));
      std::vector<bf16> q(static_cast<size_t>(T * d.heads * qd)),
          ol(static_cast<size_t>(T * d.heads * d.latent_dim));
      for (auto& x : q) x = to_bf16(u(rng));
      for (auto& x : ol) x = to_bf16(u(rng));
      uint8_t* dc = upload(codes);
      float* ds = upload(scales);
      bf16* dq = upload(q);
      bf16* dol = upload(ol);
      const size_t nq = static_cast<size_t>(T * d.heads * (d.latent_dim + d.rope_dim)),
                   na = static_cast<size_t>(T * d.heads * d.value_dim);
      bf16 *q1 = nullptr, *q2 = nullptr, *a1 = nullptr, *a2 = nullptr;
      for (bf16** p : {&q1, &q2}) FM_CHECK_CUDA(cudaMalloc(p, nq * sizeof(bf16)));
      for (bf16** p : {&a1, &a2}) FM_CHECK_CUDA(cudaMalloc(p, na * sizeof(bf16)));
      const double t_abs = bench::median_us(
          o, 1, [&](int) { kernels::mla_absorb_query_tc(dq, T, d, dc, ds, q2, nullptr); });
      const double t_abs0 = bench::median_us(
          o, 1, [&](int) { kernels::mla_absorb_query(dq, T, d, dc, ds, q1, nullptr); });
      const double t_un = bench::median_us(
          o, 1, [&](int) { kernels::mla_unabsorb_output_tc(dol, T, d, dc, ds, a2, nullptr); });
      const double t_un0 = bench::median_us(
          o, 1, [&](int) { kernels::mla_unabsorb_output(dol, T, d, dc, ds, a1, nullptr); });
      FM_CHECK_CUDA(cudaDeviceSynchronize());
      const double r_abs = rel(download_float(q2, nq), download_float(q1, nq));
      const double r_un = rel(download_float(a2, na), download_float(a1, na));
      const double flops = 2.0 * T * d.heads * 128.0 * d.latent_dim;
      std::printf("%-8lld %6lld %6lld %7s %12.1f %12.1f %7.2fx %12.1f %12.1f %7.2fx %9.2e %9.2e\n",
                  static_cast<long long>(d.heads), static_cast<long long>(d.latent_dim),
                  static_cast<long long>(T), "", t_abs, t_abs0, t_abs0 / t_abs, t_un, t_un0,
                  t_un0 / t_un, r_abs, r_un);
      for (int op = 0; op < 2 && out != nullptr; ++op)
        for (int impl = 0; impl < 2; ++impl) {
          const double us = op == 0 ? (impl == 0 ? t_abs : t_abs0) : (impl == 0 ? t_un : t_un0);
          std::fprintf(out,
                       "{\"bench\":\"mla_absorb\",\"gpu\":\"%s\",\"date\":\"%s\",\"commit\":\"%s\","
                       "\"op\":\"%s\",\"impl\":\"%s\",\"heads\":%lld,\"latent\":%lld,"
                       "\"tokens\":%lld,\"us\":%.2f,\"tflops\":%.2f,\"speedup_vs_anchor\":%.3f,"
                       "\"rel_vs_anchor\":%.3e}\n",
                       prop.name, o.date.c_str(), o.commit.c_str(), op == 0 ? "absorb" : "unabsorb",
                       impl == 0 ? "tensor_cores" : "cuda_cores_anchor",
                       static_cast<long long>(d.heads), static_cast<long long>(d.latent_dim),
                       static_cast<long long>(T), us, flops / us * 1e-6,
                       impl == 0 ? (op == 0 ? t_abs0 / t_abs : t_un0 / t_un) : 1.0,
                       impl == 0 ? (op == 0 ? r_abs : r_un) : 0.0);
        }
      for (void* p : {static_cast<void*>(dc), static_cast<void*>(ds), static_cast<void*>(dq),
                      static_cast<void*>(dol), static_cast<void*>(q1), static_cast<void*>(q2),
                      static_cast<void*>(a1), static_cast<void*>(a2)})
        cudaFree(p);
    }
  }
  if (out != nullptr) std::fclose(out);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "mla_absorb_bench: %s\n", e.what());
  return 1;
}
