// The 1x128 quantise-transposes of the experts' backward against the previous kernels, same run:
//   quantize_1x128_transpose (BF16 in; codes + scales and the transposed codes + scales out):
//     new  = ld = cols (the vectorised BF16 kernel), prev = ld = cols + 4, which the vectorised
//     kernel declines (ld % 8 != 0), so the generic kernel of session 19 runs: same bytes;
//   requantize_1x128_transpose (E4M3 + MN-major scales in, the transposed copy out): the current
//     kernel;
//   quantize_1x128 (BF16 in, codes + MN-major scales out) at 768, 8192 and 32768 x 7168: new =
//     the vectorised BF16 kernel (session 20), prev = ld = cols + 4, the generic kernel.
// Shapes: 768 x 7168 (decode-size), 8192 x 7168, 32768 x 7168 (dy of 4 x 8192 rows, H 7168),
// 32768 x 4096 (d_gate_up, 2 I = 4096); pow2 scales off (ExpertFfnGpu's default) and on.
// Timing: CUDA events around `iters` launches rotating over buffer sets of >= 256 MB together
// (> L2), median of `rounds`. GB/s = minimal bytes (read x; write codes, scales, codes_t,
// scales_t) / time, for both impls. Correctness is the tests' job:
// test_kernels_gpu --gtest_filter='*Quantiz*:Requant*'.
// Run: quantize_bench [--out rows.jsonl] [--iters 20] [--rounds 5] [--date D] [--commit C]
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
#include "fp8moe/kernels/requantize.h"

namespace {

using namespace fp8moe;
using kernels::ScaleLayout;

// Normal-ish BF16 values in (-4, 4), a few columns scaled up so that amax varies per tile.
__global__ void fill_bf16(bf16* x, int64_t n, uint64_t seed) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint32_t bits = philox_u32(seed, 5, static_cast<uint64_t>(i));
  const float v = (static_cast<float>(bits >> 8) * (1.0f / 16777216.0f) - 0.5f) * 8.0f;
  x[i] = bf16{static_cast<uint16_t>(__float_as_uint((i % 97 == 0) ? v * 64.0f : v) >> 16)};
}
// Random E4M3 codes without NaN (0x7F / 0xFF need the low 7 bits all set), scales 1 / 2^k.
__global__ void fill_codes(uint8_t* c, int64_t n, uint64_t seed) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  c[i] = static_cast<uint8_t>(philox_u32(seed, 6, static_cast<uint64_t>(i)) & 0xF7u);
}
__global__ void fill_scales(float* s, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) s[i] = 1.0f / static_cast<float>(1 << (i % 7));
}
unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>((n + 255) / 256);
}
int64_t pad4(int64_t x) {
  return (x + 3) / 4 * 4;
}

void emit(const bench::BenchOptions& o, FILE* f, const char* kernel, const char* impl, int64_t rows,
          int64_t cols, bool pow2, double us, double bytes) {
  char line[512];
  std::snprintf(line, sizeof line,
                "{\"bench\":\"quantize\",\"kernel\":\"%s\",\"impl\":\"%s\",\"rows\":%lld,"
                "\"cols\":%lld,\"pow2\":%s,\"us\":%.2f,\"gbps\":%.1f,\"date\":\"%s\","
                "\"commit\":\"%s\"}",
                kernel, impl, static_cast<long long>(rows), static_cast<long long>(cols),
                pow2 ? "true" : "false", us, bytes / us * 1e-3, o.date.c_str(), o.commit.c_str());
  std::puts(line);
  if (f != nullptr) std::fprintf(f, "%s\n", line);
}

void run_shape(const bench::BenchOptions& o, FILE* f, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols, ld_prev = cols + 4;
  const int64_t tr = (rows + 127) / 128, tc = (cols + 127) / 128;
  const int64_t s_elems = rows * tc, st_elems = cols * tr;
  const double set_bytes = 2.0 * rows * ld_prev + 2.0 * n + 4.0 * (s_elems + st_elems);
  const int sets = static_cast<int>(std::clamp(256e6 / set_bytes + 1.0, 1.0, 8.0));
  struct Set {
    bf16 *x = nullptr, *xp = nullptr;
    uint8_t *c = nullptr, *ct = nullptr;
    float *s = nullptr, *st = nullptr;
  };
  std::vector<Set> v(sets);
  for (int i = 0; i < sets; ++i) {
    FM_CHECK_CUDA(cudaMalloc(&v[i].x, 2 * n));
    FM_CHECK_CUDA(cudaMalloc(&v[i].xp, 2 * rows * ld_prev));
    FM_CHECK_CUDA(cudaMalloc(&v[i].c, n));
    FM_CHECK_CUDA(cudaMalloc(&v[i].ct, n));
    FM_CHECK_CUDA(cudaMalloc(&v[i].s, 4 * tc * pad4(rows)));
    FM_CHECK_CUDA(cudaMalloc(&v[i].st, 4 * tr * pad4(cols)));
    fill_bf16<<<blocks_for(n), 256>>>(v[i].x, n, 11 + i);
    fill_bf16<<<blocks_for(rows * ld_prev), 256>>>(v[i].xp, rows * ld_prev, 11 + i);
    FM_CHECK_LAUNCH();
  }
  const double q_bytes = 2.0 * n + 2.0 * n + 4.0 * (s_elems + st_elems);
  for (bool pow2 : {false, true}) {
    for (int impl = 0; impl < 2; ++impl) {
      const double us = bench::median_us(o, sets, [&](int i) {
        kernels::quantize_1x128_transpose(impl == 0 ? v[i].x : v[i].xp, rows, cols,
                                          impl == 0 ? cols : ld_prev, pow2, v[i].c, v[i].s, v[i].ct,
                                          v[i].st, ScaleLayout::kMnMajor, nullptr);
      });
      emit(o, f, "quantize_1x128_transpose", impl == 0 ? "new" : "prev", rows, cols, pow2, us,
           q_bytes);
    }
  }
  if (cols == 7168 && rows >= 768) {  // the 1x128 quantise alone: new (vectorised) vs prev
    const double q1_bytes = 2.0 * n + 1.0 * n + 4.0 * s_elems;
    for (bool pow2 : {false, true}) {
      for (int impl = 0; impl < 2; ++impl) {
        const double us = bench::median_us(o, sets, [&](int i) {
          kernels::quantize_1x128(impl == 0 ? v[i].x : v[i].xp, rows, cols,
                                  impl == 0 ? cols : ld_prev, pow2, v[i].c, cols, v[i].s,
                                  ScaleLayout::kMnMajor, nullptr, nullptr);
        });
        emit(o, f, "quantize_1x128", impl == 0 ? "new" : "prev", rows, cols, pow2, us, q1_bytes);
      }
    }
  }
  if (rows % 128 == 0) {  // requantize: codes (v.c) + MN-major scales (v.s) -> v.ct, v.st
    for (int i = 0; i < sets; ++i) {
      fill_codes<<<blocks_for(n), 256>>>(v[i].c, n, 21 + i);
      fill_scales<<<blocks_for(tc * pad4(rows)), 256>>>(v[i].s, tc * pad4(rows));
      FM_CHECK_LAUNCH();
    }
    const double rq_bytes = 2.0 * n + 4.0 * (s_elems + st_elems);
    for (bool pow2 : {false, true}) {
      const double us = bench::median_us(o, sets, [&](int i) {
        kernels::requantize_1x128_transpose(v[i].c, cols, v[i].s, ScaleLayout::kMnMajor, rows, cols,
                                            nullptr, pow2, v[i].ct, v[i].st, nullptr);
      });
      emit(o, f, "requantize_1x128_transpose", "current", rows, cols, pow2, us, rq_bytes);
    }
  }
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  for (Set& s : v) {
    FM_CHECK_CUDA(cudaFree(s.x));
    FM_CHECK_CUDA(cudaFree(s.xp));
    FM_CHECK_CUDA(cudaFree(s.c));
    FM_CHECK_CUDA(cudaFree(s.ct));
    FM_CHECK_CUDA(cudaFree(s.s));
    FM_CHECK_CUDA(cudaFree(s.st));
  }
}

}  // namespace

int main(int argc, char** argv) {
  bench::BenchOptions o;
  bench::parse_bench_options(argc, argv, o);
  if (!bench::have_gpu("quantize_bench")) return 77;
  FILE* f = o.out.empty() ? nullptr : std::fopen(o.out.c_str(), "a");
  try {
    for (auto [rows, cols] :
         {std::pair<int64_t, int64_t>{768, 7168}, {8192, 7168}, {32768, 7168}, {32768, 4096}})
      run_shape(o, f, rows, cols);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "quantize_bench: %s\n", e.what());
    return 1;
  }
  if (f != nullptr) std::fclose(f);
  return 0;
}
