// The fused SwiGLU + 1x128 quantisation (kernels::swiglu_quantize_1x128) and its backward
// (kernels::swiglu_backward) against the unfused anchors of the same run:
//   forward  naive = a BF16 swiglu kernel written here (16-byte vectors, h = silu(g) * u * w to
//            BF16) then kernels::quantize_1x128 of h: 4 + 2 + 2 + 1 bytes an element instead of 5;
//   backward naive = an elementwise kernel (dg, du; 16-byte vectors) plus, with row weights, a
//            second pass over g, u, dh for d_row_scale (a block per row).
// Shapes: routed 32768 x 2048 (V3 routed experts, 4 x 8192 rows, row weights), dense 4096 x 18432
// (V3 dense FFN, no weights), decode masked 8 x 256 x 2048 (masked_m random in [0, 256], weights).
// Timing: CUDA events around `iters` launches that rotate over buffer sets of > 200 MB together
// (> L2), median of `rounds`. GB/s = the fused form's minimal bytes (real rows: read g, u [, dh];
// write codes + scales [, dg, du]) / time, for both impls, so the GB/s ratio is the speed ratio.
// Correctness is the test's job (test_kernels_gpu --gtest_filter='SwigluGpu*').
// Run: swiglu_bench [--out rows.jsonl] [--iters 50] [--rounds 5] [--date D] [--commit C]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "bench_args.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/kernels/quantize.h"
#include "fp8moe/kernels/swiglu.h"
#include "naive_swiglu.cuh"

namespace {

using namespace fp8moe;
using kernels::ScaleLayout;

using namespace fp8moe::bench;  // the naive anchors (naive_swiglu.cuh)

__global__ void fill_kernel(bf16* x, int64_t n, uint64_t seed) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  // Values in about [-4, 4]: sign, exponent 2^-2..2^1, random mantissa.
  const uint32_t bits = philox_u32(seed, 3, static_cast<uint64_t>(i));
  x[i] = bf16{static_cast<uint16_t>(0x3E80u + (bits & 0x1FFu) + ((bits >> 9) & 0x8000u))};
}

struct Shape {
  const char* name;
  int64_t rows, inter, groups;  // groups > 0: masked, rows = groups * group_rows
  bool weighted;
};

struct Buffers {  // one rotating set
  bf16 *gu, *dh, *h, *d;
  uint8_t* codes;
  float* scales;
  float* drs;
};

struct Options {
  std::string out, date = "unknown", commit = "unknown";
  int iters = 50, rounds = 5;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Options o;
    bench::parse_flags(argc, argv, "swiglu_bench",
                       {{"--out", [&](const std::string& v) { o.out = v; }},
                        {"--iters", [&](const std::string& v) { o.iters = std::stoi(v); }},
                        {"--rounds", [&](const std::string& v) { o.rounds = std::stoi(v); }},
                        {"--date", [&](const std::string& v) { o.date = v; }},
                        {"--commit", [&](const std::string& v) { o.commit = v; }}});
    int dev = 0;
    FM_CHECK_CUDA(cudaGetDevice(&dev));
    cudaDeviceProp prop{};
    FM_CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
    std::FILE* f = o.out.empty() ? nullptr : std::fopen(o.out.c_str(), "w");
    FM_CHECK(o.out.empty() || f != nullptr, "swiglu_bench: cannot open ", o.out);
    cudaStream_t stream;
    FM_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaEvent_t t0, t1;
    FM_CHECK_CUDA(cudaEventCreate(&t0));
    FM_CHECK_CUDA(cudaEventCreate(&t1));
    std::printf("swiglu_bench on %s (%d SMs), %d launches a timing, median of %d\n", prop.name,
                prop.multiProcessorCount, o.iters, o.rounds);
    std::printf("  %-7s %-8s %-17s %-7s %10s %9s %9s\n", "shape", "op", "rows x inter", "impl",
                "us", "GB/s", "vs naive");

    const Shape shapes[] = {{"routed", 32768, 2048, 0, true},
                            {"dense", 4096, 18432, 0, false},
                            {"decode", 8 * 256, 2048, 8, true}};
    for (const Shape& s : shapes) {
      const int64_t rows = s.rows, inter = s.inter, tiles = inter / 128;
      const int64_t group_rows = s.groups > 0 ? rows / s.groups : 0;
      std::vector<int32_t> masked_m;
      int64_t real_rows = rows;
      if (s.groups > 0) {
        real_rows = 0;
        for (int64_t g = 0; g < s.groups; ++g) {
          masked_m.push_back(static_cast<int32_t>(philox_u32(7, 1, g) % (group_rows + 1)));
          real_rows += masked_m.back();
        }
      }
      const int64_t nscales = s.groups > 0 ? s.groups * tiles * ((group_rows + 3) / 4 * 4)
                                           : tiles * ((rows + 3) / 4 * 4);
      // Rotating sets: together > 200 MB (H100 L2: 50 MB).
      const double set_bytes = static_cast<double>(rows) * inter * (4 + 2 + 2 + 4 + 1);
      const int sets = std::max(2, static_cast<int>(200e6 / set_bytes) + 1);
      std::vector<Buffers> buf(sets);
      float* w = nullptr;
      int32_t* d_masked = nullptr;
      FM_CHECK_CUDA(cudaMalloc(&w, rows * sizeof(float)));
      std::vector<float> wh(rows);
      for (int64_t r = 0; r < rows; ++r) wh[r] = 0.05f + 0.001f * static_cast<float>(r % 97);
      FM_CHECK_CUDA(cudaMemcpy(w, wh.data(), rows * sizeof(float), cudaMemcpyHostToDevice));
      if (!masked_m.empty()) {
        FM_CHECK_CUDA(cudaMalloc(&d_masked, masked_m.size() * sizeof(int32_t)));
        FM_CHECK_CUDA(cudaMemcpy(d_masked, masked_m.data(), masked_m.size() * sizeof(int32_t),
                                 cudaMemcpyHostToDevice));
      }
      for (int k = 0; k < sets; ++k) {
        Buffers& b = buf[k];
        FM_CHECK_CUDA(cudaMalloc(&b.gu, rows * 2 * inter * sizeof(bf16)));
        FM_CHECK_CUDA(cudaMalloc(&b.dh, rows * inter * sizeof(bf16)));
        FM_CHECK_CUDA(cudaMalloc(&b.h, rows * inter * sizeof(bf16)));
        FM_CHECK_CUDA(cudaMalloc(&b.d, rows * 2 * inter * sizeof(bf16)));
        FM_CHECK_CUDA(cudaMalloc(&b.codes, rows * inter));
        FM_CHECK_CUDA(cudaMalloc(&b.scales, nscales * sizeof(float)));
        FM_CHECK_CUDA(cudaMalloc(&b.drs, rows * sizeof(float)));
        const int64_t n = rows * 2 * inter;
        fill_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(b.gu, n, 11 + k);
        fill_kernel<<<static_cast<unsigned>((n / 2 + 255) / 256), 256, 0, stream>>>(b.dh, n / 2,
                                                                                    97 + k);
        FM_CHECK_LAUNCH();
      }
      const float* wa = s.weighted ? w : nullptr;
      const kernels::SwigluRows which{nullptr, d_masked, group_rows};
      const int64_t elems = real_rows * inter;
      const double fwd_bytes = elems * 5.0 + nscales * 4.0;
      const double bwd_bytes = elems * 10.0 + (s.weighted ? real_rows * 4.0 : 0.0);

      // us per launch: median over rounds of `iters` launches rotating over the sets.
      const auto time_us = [&](const std::function<void(const Buffers&)>& launch) {
        for (int k = 0; k < 3; ++k) launch(buf[k % sets]);
        std::vector<double> us;
        for (int round = 0; round < o.rounds; ++round) {
          FM_CHECK_CUDA(cudaEventRecord(t0, stream));
          for (int i = 0; i < o.iters; ++i) launch(buf[i % sets]);
          FM_CHECK_CUDA(cudaEventRecord(t1, stream));
          FM_CHECK_CUDA(cudaEventSynchronize(t1));
          float ms = 0;
          FM_CHECK_CUDA(cudaEventElapsedTime(&ms, t0, t1));
          us.push_back(1000.0 * ms / o.iters);
        }
        return median(us);
      };
      const auto fused_fwd = [&](const Buffers& b) {
        kernels::swiglu_quantize_1x128(b.gu, 2 * inter, rows, inter, wa, which, false, b.codes,
                                       inter, b.scales, ScaleLayout::kMnMajor, stream);
      };
      const auto naive_fwd = [&](const Buffers& b) {
        naive_swiglu_kernel<<<static_cast<unsigned>((rows * inter / 8 + 255) / 256), 256, 0,
                              stream>>>(b.gu, rows, inter, wa, b.h);
        FM_CHECK_LAUNCH();
        kernels::quantize_1x128(b.h, rows, inter, inter, false, b.codes, inter, b.scales,
                                ScaleLayout::kMnMajor, stream);
      };
      const auto fused_bwd = [&](const Buffers& b) {
        kernels::swiglu_backward(b.gu, 2 * inter, b.dh, inter, rows, inter, wa, which, b.d,
                                 2 * inter, s.weighted ? b.drs : nullptr, stream);
      };
      const auto naive_bwd = [&](const Buffers& b) {
        naive_backward_kernel<<<static_cast<unsigned>((rows * inter / 8 + 255) / 256), 256, 0,
                                stream>>>(b.gu, b.dh, rows, inter, wa, b.d);
        FM_CHECK_LAUNCH();
        if (s.weighted) {
          naive_row_sum_kernel<<<static_cast<unsigned>(rows), 256, 0, stream>>>(b.gu, b.dh, inter,
                                                                                b.drs);
          FM_CHECK_LAUNCH();
        }
      };
      struct Row {
        const char *op, *impl;
        double us, bytes;
      };
      std::vector<Row> results;
      // Interleaved, so that clocks and temperature drift hit both alike.
      const double nf = time_us(naive_fwd), ff = time_us(fused_fwd);
      const double nb = time_us(naive_bwd), fb = time_us(fused_bwd);
      FM_CHECK_CUDA(cudaStreamSynchronize(stream));
      results = {{"forward", "naive", nf, fwd_bytes},
                 {"forward", "fp8moe", ff, fwd_bytes},
                 {"backward", "naive", nb, bwd_bytes},
                 {"backward", "fp8moe", fb, bwd_bytes}};
      for (const Row& r : results) {
        const double naive_us = std::string(r.op) == "forward" ? nf : nb;
        const double gbps = r.bytes / r.us / 1e3;
        char dims[64];
        std::snprintf(dims, sizeof dims, "%lld x %lld%s", static_cast<long long>(rows),
                      static_cast<long long>(inter), s.groups > 0 ? " (masked)" : "");
        std::printf("  %-7s %-8s %-17s %-7s %10.2f %9.1f %9.3f\n", s.name, r.op, dims, r.impl, r.us,
                    gbps, naive_us / r.us);
        if (f)
          std::fprintf(f,
                       "{\"bench\":\"swiglu\",\"gpu\":\"%s\",\"gpus\":1,\"date\":\"%s\","
                       "\"commit\":\"%s\",\"impl\":\"%s\",\"op\":\"%s\",\"shape\":\"%s\","
                       "\"rows\":%lld,\"inter\":%lld,\"groups\":%lld,\"real_rows\":%lld,"
                       "\"row_scale\":%s,\"us\":%.3f,\"bytes\":%.0f,\"gbps\":%.1f,"
                       "\"speedup_vs_naive\":%.4f}\n",
                       prop.name, o.date.c_str(), o.commit.c_str(), r.impl, r.op, s.name,
                       static_cast<long long>(rows), static_cast<long long>(inter),
                       static_cast<long long>(s.groups), static_cast<long long>(real_rows),
                       s.weighted ? "true" : "false", r.us, r.bytes, gbps, naive_us / r.us);
      }
      for (Buffers& b : buf)
        for (void* p : {static_cast<void*>(b.gu), static_cast<void*>(b.dh), static_cast<void*>(b.h),
                        static_cast<void*>(b.d), static_cast<void*>(b.codes),
                        static_cast<void*>(b.scales), static_cast<void*>(b.drs)})
          FM_CHECK_CUDA(cudaFree(p));
      FM_CHECK_CUDA(cudaFree(w));
      if (d_masked != nullptr) FM_CHECK_CUDA(cudaFree(d_masked));
    }
    if (f) std::fclose(f);
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "swiglu_bench: %s\n", e.what());
    return e.kind() == ErrorKind::kInvalidArgument ? 2 : 1;
  }
}
