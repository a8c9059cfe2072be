// The trainer's memory-bound kernels beside the GEMMs, against naive kernels of the same
// arithmetic timed in the same run:
//   rmsnorm_fwd       kernels::rmsnorm_forward vs a block-per-row kernel (scalar BF16 loads, x read
//                     twice from global, shared-memory tree sum);
//   rmsnorm_fwd_quant kernels::rmsnorm_forward_quantize_1x128 (y BF16 too) vs rmsnorm_forward +
//                     kernels::quantize_1x128 of y (the unfused pipeline, both ours);
//   rmsnorm_bwd       kernels::rmsnorm_backward (dx + deterministic dw) vs a block-per-row
//                     kernel with dw by float atomicAdd (not reproducible);
//   adamw / adamw_clip AdamWGpu (all tensors in one launch; _clip adds the grad-norm pass,
//                     clipping and the non-finite skip) vs one thread per element, a launch per
//                     tensor, scalar accesses.
// Shapes: RMSNorm [32768, 7168] and [4096, 7168]; AdamW ~1e9 parameters in 300 tensors (every
// tenth a 7168-element norm weight). Timing: CUDA events around `iters` launches (RMSNorm buffers
// rotate over sets of > 300 MB together, beyond L2), median of `rounds`. GB/s = minimal bytes /
// time (the same bytes for both impls, so the GB/s ratio is the speed ratio).
// Correctness is the tests' job (test_kernels_gpu --gtest_filter='RmsNormGpu*',
// test_train_gpu --gtest_filter='AdamWGpu*').
// Run: train_kernels_bench [--out rows.jsonl] [--iters 20] [--rounds 5] [--date D] [--commit C]
//      [--adamw-params 1e9]
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "bench_args.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/quantize.h"
#include "fp8moe/kernels/rmsnorm.h"
#include "fp8moe/train/adamw_gpu.h"

namespace {

using namespace fp8moe;

__global__ void fill_bf16(bf16* x, int64_t n, uint64_t seed) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint32_t bits = philox_u32(seed, 3, static_cast<uint64_t>(i));
  x[i] = bf16{static_cast<uint16_t>(0x3E80u + (bits & 0x1FFu) + ((bits >> 9) & 0x8000u))};
}
__global__ void fill_f32(float* x, int64_t n, uint64_t seed, float mag) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint32_t bits = philox_u32(seed, 5, static_cast<uint64_t>(i));
  x[i] = mag * (static_cast<float>(bits) * 2.3283064e-10f - 0.5f);
}

// ---- naive anchors ----
__device__ float naive_block_sum(float v, float* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  const float r = sh[0];
  __syncthreads();
  return r;
}

__global__ void naive_rmsnorm_fwd(const bf16* x, const float* w, int64_t dim, float eps, bf16* y,
                                  float* rstd) {
  __shared__ float sh[256];
  const bf16* xr = x + blockIdx.x * dim;
  float acc = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = to_float(xr[i]);
    acc += v * v;
  }
  const float rs = 1.0f / sqrtf(naive_block_sum(acc, sh) / dim + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = rs;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x)
    y[blockIdx.x * dim + i] = to_bf16(to_float(xr[i]) * rs * w[i]);
}

// The textbook backward: a block per row for dx, dw by a float atomicAdd per element (fast to
// write, not reproducible: the order of the adds varies run to run).
__global__ void naive_rmsnorm_bwd(const bf16* dy, const bf16* x, const float* w, const float* rstd,
                                  int64_t dim, bf16* dx, float* dw) {
  __shared__ float sh[256];
  const int64_t base = blockIdx.x * dim;
  float acc = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x)
    acc += to_float(dy[base + i]) * w[i] * to_float(x[base + i]);
  const float rs = rstd[blockIdx.x];
  const float coef = naive_block_sum(acc, sh) * rs * rs * rs / dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float d = to_float(dy[base + i]), xi = to_float(x[base + i]);
    dx[base + i] = to_bf16(rs * d * w[i] - coef * xi);
    atomicAdd(dw + i, d * xi * rs);
  }
}

__global__ void naive_adamw(float* value, const float* grad, uint16_t* m, uint16_t* v, int64_t n,
                            float b1, float omb1, float b2, float omb2, double lr, double c1,
                            double c2, double eps, double wd) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float g = grad[i];
  const float mj = __fadd_rn(__fmul_rn(b1, bf16_bits_to_float(m[i])), __fmul_rn(omb1, g));
  const float vj =
      __fadd_rn(__fmul_rn(b2, bf16_bits_to_float(v[i])), __fmul_rn(__fmul_rn(omb2, g), g));
  m[i] = float_to_bf16_bits(mj);
  v[i] = float_to_bf16_bits(vj);
  const double mh = static_cast<double>(bf16_bits_to_float(m[i])) / c1;
  const double vh = static_cast<double>(bf16_bits_to_float(v[i])) / c2;
  const double w = value[i];
  value[i] = static_cast<float>(w - lr * (mh / (sqrt(vh) + eps) + wd * w));
}

struct Options {
  std::string out, date = "unknown", commit = "unknown";
  int iters = 20, rounds = 5;
  double adamw_params = 1e9;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Row {
  std::string op, impl, shape;
  int64_t rows, dim, params, tensors;
  double us, bytes, naive_us;
};

}  // namespace

int main(int argc, char** argv) {
  try {
    Options o;
    bench::parse_flags(
        argc, argv, "train_kernels_bench",
        {{"--out", [&](const std::string& v) { o.out = v; }},
         {"--iters", [&](const std::string& v) { o.iters = std::stoi(v); }},
         {"--rounds", [&](const std::string& v) { o.rounds = std::stoi(v); }},
         {"--date", [&](const std::string& v) { o.date = v; }},
         {"--commit", [&](const std::string& v) { o.commit = v; }},
         {"--adamw-params", [&](const std::string& v) { o.adamw_params = std::stod(v); }}});
    int dev = 0;
    FM_CHECK_CUDA(cudaGetDevice(&dev));
    cudaDeviceProp prop{};
    FM_CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
    std::FILE* f = o.out.empty() ? nullptr : std::fopen(o.out.c_str(), "w");
    FM_CHECK(o.out.empty() || f != nullptr, "train_kernels_bench: cannot open ", o.out);
    cudaStream_t stream;
    FM_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaEvent_t t0, t1;
    FM_CHECK_CUDA(cudaEventCreate(&t0));
    FM_CHECK_CUDA(cudaEventCreate(&t1));
    std::printf("train_kernels_bench on %s (%d SMs), %d launches a timing, median of %d\n",
                prop.name, prop.multiProcessorCount, o.iters, o.rounds);
    std::printf("  %-18s %-22s %-13s %10s %9s %9s\n", "op", "shape", "impl", "us", "GB/s",
                "vs naive");
    const auto time_us = [&](int iters, const std::function<void(int)>& launch) {
      for (int k = 0; k < 2; ++k) launch(k);
      std::vector<double> us;
      for (int round = 0; round < o.rounds; ++round) {
        FM_CHECK_CUDA(cudaEventRecord(t0, stream));
        for (int i = 0; i < iters; ++i) launch(i);
        FM_CHECK_CUDA(cudaEventRecord(t1, stream));
        FM_CHECK_CUDA(cudaEventSynchronize(t1));
        float ms = 0;
        FM_CHECK_CUDA(cudaEventElapsedTime(&ms, t0, t1));
        us.push_back(1000.0 * ms / iters);
      }
      return median(us);
    };
    std::vector<Row> rows_out;
    const auto emit = [&](const Row& r) {
      const double gbps = r.bytes / r.us / 1e3;
      std::printf("  %-18s %-22s %-13s %10.2f %9.1f %9.3f\n", r.op.c_str(), r.shape.c_str(),
                  r.impl.c_str(), r.us, gbps, r.naive_us / r.us);
      if (f)
        std::fprintf(f,
                     "{\"bench\":\"train_kernels\",\"gpu\":\"%s\",\"gpus\":1,\"date\":\"%s\","
                     "\"commit\":\"%s\",\"impl\":\"%s\",\"op\":\"%s\",\"shape\":\"%s\","
                     "\"rows\":%lld,\"dim\":%lld,\"params\":%lld,\"tensors\":%lld,\"us\":%.3f,"
                     "\"bytes\":%.0f,\"gbps\":%.1f,\"speedup_vs_naive\":%.4f}\n",
                     prop.name, o.date.c_str(), o.commit.c_str(), r.impl.c_str(), r.op.c_str(),
                     r.shape.c_str(), static_cast<long long>(r.rows), static_cast<long long>(r.dim),
                     static_cast<long long>(r.params), static_cast<long long>(r.tensors), r.us,
                     r.bytes, gbps, r.naive_us / r.us);
    };

    // ---- RMSNorm ----
    for (const int64_t rows : {int64_t{32768}, int64_t{4096}}) {
      const int64_t dim = 7168, n = rows * dim, tiles = dim / 128;
      const int64_t ns = tiles * ((rows + 3) / 4 * 4);
      const kernels::RmsNormPlan plan = kernels::rmsnorm_plan(rows, dim);
      const double set_bytes = n * (2.0 * 4 + 1);  // x, y, dy, dx, codes
      const int sets = std::max(1, static_cast<int>(std::ceil(300e6 / set_bytes)));
      struct Set {
        bf16 *x, *y, *g, *dx;
        uint8_t* codes;
        float *scales, *rstd;
      };
      std::vector<Set> buf(sets);
      float *w = nullptr, *dw = nullptr, *ws = nullptr;
      FM_CHECK_CUDA(cudaMalloc(&w, dim * 4));
      FM_CHECK_CUDA(cudaMalloc(&dw, dim * 4));
      FM_CHECK_CUDA(cudaMalloc(&ws, plan.workspace_floats * 4));
      fill_f32<<<static_cast<unsigned>((dim + 255) / 256), 256, 0, stream>>>(w, dim, 3, 2.0f);
      for (int k = 0; k < sets; ++k) {
        Set& b = buf[k];
        FM_CHECK_CUDA(cudaMalloc(&b.x, n * 2));
        FM_CHECK_CUDA(cudaMalloc(&b.y, n * 2));
        FM_CHECK_CUDA(cudaMalloc(&b.g, n * 2));
        FM_CHECK_CUDA(cudaMalloc(&b.dx, n * 2));
        FM_CHECK_CUDA(cudaMalloc(&b.codes, n));
        FM_CHECK_CUDA(cudaMalloc(&b.scales, ns * 4));
        FM_CHECK_CUDA(cudaMalloc(&b.rstd, rows * 4));
        fill_bf16<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(b.x, n, 10 + k);
        fill_bf16<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(b.g, n, 20 + k);
        FM_CHECK_LAUNCH();
        kernels::rmsnorm_forward(b.x, dim, w, rows, dim, 1e-6, b.y, dim, b.rstd, stream);
      }
      char shape[64];
      std::snprintf(shape, sizeof shape, "%lld x %lld", static_cast<long long>(rows),
                    static_cast<long long>(dim));
      const auto S = [&](int i) -> const Set& { return buf[i % sets]; };
      const double fwd_bytes = n * 4.0 + rows * 4.0 + dim * 4.0;
      const double fq_bytes = n * 5.0 + rows * 4.0 + ns * 4.0 + dim * 4.0;
      const double bwd_bytes = n * 6.0 + rows * 4.0 + dim * 8.0;  // + w, dw
      const double nf = time_us(o.iters, [&](int i) {
        naive_rmsnorm_fwd<<<static_cast<unsigned>(rows), 256, 0, stream>>>(S(i).x, w, dim, 1e-6f,
                                                                           S(i).y, S(i).rstd);
      });
      const double ff = time_us(o.iters, [&](int i) {
        kernels::rmsnorm_forward(S(i).x, dim, w, rows, dim, 1e-6, S(i).y, dim, S(i).rstd, stream);
      });
      const double nq = time_us(o.iters, [&](int i) {
        kernels::rmsnorm_forward(S(i).x, dim, w, rows, dim, 1e-6, S(i).y, dim, S(i).rstd, stream);
        kernels::quantize_1x128(S(i).y, rows, dim, dim, false, S(i).codes, dim, S(i).scales,
                                kernels::ScaleLayout::kMnMajor, stream);
      });
      const double fq = time_us(o.iters, [&](int i) {
        kernels::rmsnorm_forward_quantize_1x128(S(i).x, dim, w, rows, dim, 1e-6, S(i).y, dim,
                                                S(i).rstd, false, S(i).codes, dim, S(i).scales,
                                                kernels::ScaleLayout::kMnMajor, stream);
      });
      const double nb = time_us(o.iters, [&](int i) {
        naive_rmsnorm_bwd<<<static_cast<unsigned>(rows), 256, 0, stream>>>(
            S(i).g, S(i).x, w, S(i).rstd, dim, S(i).dx, dw);
      });
      const double fb = time_us(o.iters, [&](int i) {
        kernels::rmsnorm_backward(S(i).g, dim, S(i).x, dim, w, S(i).rstd, rows, dim, S(i).dx, dim,
                                  dw, true, ws, stream);
      });
      FM_CHECK_LAUNCH();
      FM_CHECK_CUDA(cudaStreamSynchronize(stream));
      const Row rs[] = {{"rmsnorm_fwd", "naive", shape, rows, dim, 0, 0, nf, fwd_bytes, nf},
                        {"rmsnorm_fwd", "fp8moe", shape, rows, dim, 0, 0, ff, fwd_bytes, nf},
                        {"rmsnorm_fwd_quant", "unfused", shape, rows, dim, 0, 0, nq, fq_bytes, nq},
                        {"rmsnorm_fwd_quant", "fp8moe", shape, rows, dim, 0, 0, fq, fq_bytes, nq},
                        {"rmsnorm_bwd", "naive", shape, rows, dim, 0, 0, nb, bwd_bytes, nb},
                        {"rmsnorm_bwd", "fp8moe", shape, rows, dim, 0, 0, fb, bwd_bytes, nb}};
      for (const Row& r : rs) emit(r);
      for (Set& b : buf)
        for (void* p : {static_cast<void*>(b.x), static_cast<void*>(b.y), static_cast<void*>(b.g),
                        static_cast<void*>(b.dx), static_cast<void*>(b.codes),
                        static_cast<void*>(b.scales), static_cast<void*>(b.rstd)})
          FM_CHECK_CUDA(cudaFree(p));
      for (void* p : {static_cast<void*>(w), static_cast<void*>(dw), static_cast<void*>(ws)})
        FM_CHECK_CUDA(cudaFree(p));
    }

    // ---- AdamW: ~adamw_params in 300 tensors ----
    {
      const int tensors = 300;
      std::vector<int64_t> sizes(tensors);
      const int64_t big = static_cast<int64_t>((o.adamw_params - 30 * 7168.0) / 270) / 128 * 128;
      int64_t total = 0;
      for (int t = 0; t < tensors; ++t) total += sizes[t] = t % 10 == 9 ? 7168 : big;
      float *value = nullptr, *grad = nullptr;
      uint16_t *m = nullptr, *v = nullptr, *copy = nullptr;
      FM_CHECK_CUDA(cudaMalloc(&value, total * 4));
      FM_CHECK_CUDA(cudaMalloc(&grad, total * 4));
      FM_CHECK_CUDA(cudaMalloc(&m, total * 2));
      FM_CHECK_CUDA(cudaMalloc(&v, total * 2));
      FM_CHECK_CUDA(cudaMalloc(&copy, total * 2));
      fill_f32<<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(value, total, 1,
                                                                               0.2f);
      fill_f32<<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(grad, total, 2,
                                                                               1e-3f);
      FM_CHECK_LAUNCH();
      FM_CHECK_CUDA(cudaMemsetAsync(m, 0, total * 2, stream));
      FM_CHECK_CUDA(cudaMemsetAsync(v, 0, total * 2, stream));
      std::vector<AdamWGpuTensor> ts, ts_copy;
      int64_t off = 0;
      for (int t = 0; t < tensors; ++t) {
        ts.push_back({value + off, grad + off, m + off, v + off, sizes[t], t % 10 != 9, nullptr});
        ts_copy.push_back(ts.back());
        ts_copy.back().value_bf16 = reinterpret_cast<bf16*>(copy) + off;
        off += (sizes[t] + 127) / 128 * 128;
      }
      AdamWConfig plain;
      plain.clip_norm = 0;
      AdamWConfig clipped;  // clip_norm 1
      AdamWGpu opt_plain(plain, ts, /*skip_nonfinite=*/false);
      AdamWGpu opt_clip(clipped, ts, true);
      AdamWGpu opt_copy(clipped, ts_copy, true);
      const int iters = std::max(2, o.iters / 4);
      const double lr = learning_rate(plain, 40);
      const double c1 = 1.0 - std::pow(plain.beta1, 41.0), c2 = 1.0 - std::pow(plain.beta2, 41.0);
      const double na = time_us(iters, [&](int) {
        for (int t = 0; t < tensors; ++t)
          naive_adamw<<<static_cast<unsigned>((sizes[t] + 255) / 256), 256, 0, stream>>>(
              ts[t].value, ts[t].grad, ts[t].m, ts[t].v, sizes[t], static_cast<float>(plain.beta1),
              static_cast<float>(1 - plain.beta1), static_cast<float>(plain.beta2),
              static_cast<float>(1 - plain.beta2), lr, c1, c2, plain.eps,
              t % 10 != 9 ? plain.weight_decay : 0.0);
      });
      const double fa = time_us(iters, [&](int) { opt_plain.step(40, stream); });
      const double fc = time_us(iters, [&](int) { opt_clip.step(40, stream); });
      const double fcc = time_us(iters, [&](int) { opt_copy.step(40, stream); });
      FM_CHECK_LAUNCH();
      FM_CHECK_CUDA(cudaStreamSynchronize(stream));
      char shape[64];
      std::snprintf(shape, sizeof shape, "%.3g params / %d", static_cast<double>(total), tensors);
      const double b = static_cast<double>(total);
      const Row rs[] = {
          {"adamw", "naive", shape, 0, 0, total, tensors, na, 20 * b, na},
          {"adamw", "fp8moe", shape, 0, 0, total, tensors, fa, 20 * b, na},
          {"adamw_clip", "fp8moe", shape, 0, 0, total, tensors, fc, 24 * b, na},
          {"adamw_clip_bf16copy", "fp8moe", shape, 0, 0, total, tensors, fcc, 26 * b, na}};
      for (const Row& r : rs) emit(r);
      for (void* p : {static_cast<void*>(value), static_cast<void*>(grad), static_cast<void*>(m),
                      static_cast<void*>(v), static_cast<void*>(copy)})
        FM_CHECK_CUDA(cudaFree(p));
    }
    if (f) std::fclose(f);
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "train_kernels_bench: %s\n", e.what());
    return e.kind() == ErrorKind::kInvalidArgument ? 2 : 1;
  }
}
