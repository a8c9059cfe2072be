// The model's small kernels (model/model_kernels_gpu.h, moe/router_backward_cuda.h) against naive
// kernels of the same arithmetic timed in the same run:
//   rope_qk        rope_apply_qk_gpu (q_pe of every head and k_pe, one launch, 16-byte accesses)
//                  vs a thread per pair, scalar BF16 and table loads, a launch for q and one for k;
//   embed_fwd      embedding_forward_gpu (FP32 table) vs a thread per element;
//   embed_bwd      embedding_backward_gpu (sort + segment sums: deterministic) vs a float
//                  atomicAdd per element (the textbook scatter, not reproducible);
//   cross_entropy  cross_entropy_gpu (online max/sum, one read for the statistics, one read + one
//                  write for dlogits, + the loss sum) vs a block per row in three passes (max, sum,
//                  dlogits), scalar loads, shared-memory tree sums;
//   router_bwd     route_backward_cuda (a warp per token) vs a thread per token.
// Shapes (V3): T 4096 tokens x 128 heads (RoPE), T 8192 x hidden 7168 over vocab 129280
// (embedding), 4096 rows x vocab 129280 (cross-entropy), 16384 tokens x 256 experts, K 8 (router).
// Timing: CUDA events around `iters` launches, median of `rounds`. GB/s = minimal bytes / time,
// the same bytes for both impls (the GB/s ratio is the speed ratio). Correctness is the tests'
// job (test_model_gpu --gtest_filter='ModelKernelsGpu*', test_moe_gpu
// --gtest_filter='RouterBackwardGpu*').
// Run: model_kernels_bench [--out rows.jsonl] [--iters 20] [--rounds 5] [--date D] [--commit C]
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/model/model_kernels_gpu.h"
#include "fp8moe/moe/router.h"
#include "fp8moe/moe/router_backward_cuda.h"

namespace {

using namespace fp8moe;

__global__ void fill_bf16(bf16* x, int64_t n, uint64_t seed) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint32_t bits = philox_u32(seed, 3, static_cast<uint64_t>(i));
  x[i] = bf16{static_cast<uint16_t>(0x3E80u + (bits & 0x3FFu) + ((bits >> 10) & 0x8000u))};
}
__global__ void fill_f32(float* x, int64_t n, uint64_t seed, float mag) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint32_t bits = philox_u32(seed, 5, static_cast<uint64_t>(i));
  x[i] = mag * (static_cast<float>(bits) * 2.3283064e-10f - 0.5f);
}
unsigned grid(int64_t n, int threads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

// ---- naive anchors ----
__global__ void naive_rope(const float* cos, const float* sin, int64_t dim, bf16* x, int64_t tokens,
                           int64_t heads, int64_t ld_token, int64_t ld_head, const int32_t* pos) {
  const int64_t half = dim / 2;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= tokens * heads * half) return;
  const int64_t pair = i % half, row = i / half, t = row / heads, h = row % heads;
  bf16* p = x + t * ld_token + h * ld_head + 2 * pair;
  const float c = cos[pos[t] * half + pair], s = sin[pos[t] * half + pair];
  const float x0 = to_float(p[0]), x1 = to_float(p[1]);
  p[0] = to_bf16(x0 * c - x1 * s);
  p[1] = to_bf16(x0 * s + x1 * c);
}

__global__ void naive_embed_fwd(const float* table, int64_t hidden, const int32_t* ids,
                                int64_t tokens, bf16* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= tokens * hidden) return;
  const int64_t t = i / hidden, c = i % hidden;
  out[i] = to_bf16(table[static_cast<int64_t>(ids[t]) * hidden + c]);
}

__global__ void naive_embed_bwd(const bf16* dy, const int32_t* ids, int64_t tokens, int64_t hidden,
                                float* dtable) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= tokens * hidden) return;
  const int64_t t = i / hidden, c = i % hidden;
  atomicAdd(dtable + static_cast<int64_t>(ids[t]) * hidden + c, to_float(dy[i]));
}

__device__ float naive_reduce(float v, float* sh, bool is_max) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s)
      sh[threadIdx.x] = is_max ? fmaxf(sh[threadIdx.x], sh[threadIdx.x + s])
                               : sh[threadIdx.x] + sh[threadIdx.x + s];
    __syncthreads();
  }
  const float r = sh[0];
  __syncthreads();
  return r;
}

__global__ void naive_cross_entropy(const bf16* logits, const int32_t* targets, int64_t vocab,
                                    float scale, bf16* dlogits, float* row_loss) {
  __shared__ float sh[256];
  const bf16* l = logits + blockIdx.x * vocab;
  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, to_float(l[i]));
  m = naive_reduce(m, sh, true);
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) s += expf(to_float(l[i]) - m);
  s = naive_reduce(s, sh, false);
  const int32_t t = targets[blockIdx.x];
  if (threadIdx.x == 0) row_loss[blockIdx.x] = logf(s) + m - to_float(l[t]);
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x)
    dlogits[blockIdx.x * vocab + i] =
        to_bf16(expf(to_float(l[i]) - m) / s * scale - (i == t ? scale : 0.0f));
}

__global__ void naive_router_bwd(const float* scores, const int32_t* idx, const float* g,
                                 int64_t tokens, int E, int K, double c, float* out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  for (int e = 0; e < E; ++e) out[t * E + e] = 0.0f;
  double S = 0, gs = 0;
  for (int k = 0; k < K; ++k) {
    const double s = scores[t * E + idx[t * K + k]];
    S += s;
    gs += g[t * K + k] * s;
  }
  for (int k = 0; k < K; ++k) {
    const double s = scores[t * E + idx[t * K + k]];
    out[t * E + idx[t * K + k]] =
        static_cast<float>(c * (g[t * K + k] / S - gs / (S * S)) * s * (1.0 - s));
  }
}

struct Options {
  std::string out, date = "unknown", commit = "unknown";
  int iters = 20, rounds = 5;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Options o;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      const auto next = [&]() -> std::string {
        FM_CHECK_ARG(i + 1 < argc, "model_kernels_bench: ", a, " needs a value");
        return argv[++i];
      };
      if (a == "--out")
        o.out = next();
      else if (a == "--iters")
        o.iters = std::stoi(next());
      else if (a == "--rounds")
        o.rounds = std::stoi(next());
      else if (a == "--date")
        o.date = next();
      else if (a == "--commit")
        o.commit = next();
      else
        FM_THROW(ErrorKind::kInvalidArgument, "model_kernels_bench: unknown argument ", a);
    }
    int dev = 0;
    FM_CHECK_CUDA(cudaGetDevice(&dev));
    cudaDeviceProp prop{};
    FM_CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
    std::FILE* f = o.out.empty() ? nullptr : std::fopen(o.out.c_str(), "w");
    FM_CHECK(o.out.empty() || f != nullptr, "model_kernels_bench: cannot open ", o.out);
    cudaStream_t stream;
    FM_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaEvent_t t0, t1;
    FM_CHECK_CUDA(cudaEventCreate(&t0));
    FM_CHECK_CUDA(cudaEventCreate(&t1));
    std::printf("model_kernels_bench on %s (%d SMs), %d launches a timing, median of %d\n",
                prop.name, prop.multiProcessorCount, o.iters, o.rounds);
    std::printf("  %-14s %-28s %-7s %10s %9s %9s\n", "op", "shape", "impl", "us", "GB/s",
                "vs naive");
    const auto time_us = [&](const std::function<void(int)>& launch) {
      for (int k = 0; k < 2; ++k) launch(k);
      std::vector<double> us;
      for (int round = 0; round < o.rounds; ++round) {
        FM_CHECK_CUDA(cudaEventRecord(t0, stream));
        for (int i = 0; i < o.iters; ++i) launch(i);
        FM_CHECK_CUDA(cudaEventRecord(t1, stream));
        FM_CHECK_CUDA(cudaEventSynchronize(t1));
        float ms = 0;
        FM_CHECK_CUDA(cudaEventElapsedTime(&ms, t0, t1));
        us.push_back(1000.0 * ms / o.iters);
      }
      FM_CHECK_LAUNCH();
      return median(us);
    };
    const auto emit = [&](const char* op, const std::string& shape, const char* impl, double us,
                          double bytes, double naive_us) {
      const double gbps = bytes / us / 1e3;
      std::printf("  %-14s %-28s %-7s %10.2f %9.1f %9.3f\n", op, shape.c_str(), impl, us, gbps,
                  naive_us / us);
      if (f)
        std::fprintf(f,
                     "{\"bench\":\"model_kernels\",\"gpu\":\"%s\",\"gpus\":1,\"date\":\"%s\","
                     "\"commit\":\"%s\",\"impl\":\"%s\",\"op\":\"%s\",\"shape\":\"%s\","
                     "\"us\":%.3f,\"bytes\":%.0f,\"gbps\":%.1f,\"speedup_vs_naive\":%.4f}\n",
                     prop.name, o.date.c_str(), o.commit.c_str(), impl, op, shape.c_str(), us,
                     bytes, gbps, naive_us / us);
    };
    const auto alloc = [](size_t bytes) {
      void* p = nullptr;
      FM_CHECK_CUDA(cudaMalloc(&p, bytes));
      return p;
    };
    std::mt19937_64 rng(2026);
    uint32_t* status = static_cast<uint32_t*>(alloc(4));
    FM_CHECK_CUDA(cudaMemset(status, 0, 4));

    // ---- RoPE: q [T, H, 192] (q_pe the last 64 of each head), k_pe inside [T, 576] ----
    {
      const int64_t T = 4096, H = 128, qd = 192, ldk = 576, P = 4096;
      const RopeScaling yarn{"yarn", 40.0, 32.0, 1.0, 1.0, 1.0, 4096};
      const RopeTable table = make_rope_table(64, P, 10000.0, yarn);
      RopeTableGpu dt(table);
      bf16* q = static_cast<bf16*>(alloc(T * H * qd * 2));
      bf16* kv = static_cast<bf16*>(alloc(T * ldk * 2));
      fill_bf16<<<grid(T * H * qd, 256), 256, 0, stream>>>(q, T * H * qd, 1);
      fill_bf16<<<grid(T * ldk, 256), 256, 0, stream>>>(kv, T * ldk, 2);
      std::vector<int32_t> pos(T);
      for (int64_t t = 0; t < T; ++t) pos[t] = static_cast<int32_t>(t % P);
      int32_t* dpos = static_cast<int32_t*>(alloc(T * 4));
      FM_CHECK_CUDA(cudaMemcpy(dpos, pos.data(), T * 4, cudaMemcpyHostToDevice));
      const double bytes = T * (H + 1) * 64 * 2.0 * 2 + T * 4.0;
      const double naive = time_us([&](int) {
        naive_rope<<<grid(T * H * 32, 256), 256, 0, stream>>>(dt.view().cos, dt.view().sin, 64,
                                                              q + 128, T, H, H * qd, qd, dpos);
        naive_rope<<<grid(T * 32, 256), 256, 0, stream>>>(dt.view().cos, dt.view().sin, 64,
                                                          kv + 512, T, 1, ldk, 64, dpos);
      });
      const double ours = time_us([&](int i) {
        rope_apply_qk_gpu(dt.view(), q, T, H, qd, kv + 512, ldk, dpos, i % 2 == 1, status, stream);
      });
      const std::string shape = "T4096 H128 q192 k576 d64";
      emit("rope_qk", shape, "naive", naive, bytes, naive);
      emit("rope_qk", shape, "fp8moe", ours, bytes, naive);
      FM_CHECK_CUDA(cudaFree(q));
      FM_CHECK_CUDA(cudaFree(kv));
      FM_CHECK_CUDA(cudaFree(dpos));
    }
    // ---- Embedding: V 129280 x 7168 FP32, T 8192 ----
    {
      const int64_t V = 129280, Hd = 7168, T = 8192;
      float* table = static_cast<float*>(alloc(V * Hd * 4));
      float* dtable = static_cast<float*>(alloc(V * Hd * 4));
      bf16* rows = static_cast<bf16*>(alloc(T * Hd * 2));
      bf16* dy = static_cast<bf16*>(alloc(T * Hd * 2));
      fill_f32<<<grid(V * Hd, 256), 256, 0, stream>>>(table, V * Hd, 3, 0.04f);
      FM_CHECK_CUDA(cudaMemsetAsync(dtable, 0, V * Hd * 4, stream));
      fill_bf16<<<grid(T * Hd, 256), 256, 0, stream>>>(dy, T * Hd, 4);
      std::vector<int32_t> ids(T);
      for (auto& id : ids) id = static_cast<int32_t>(rng() % V);
      for (int64_t t = 0; t < T; t += 3) ids[t] = static_cast<int32_t>(rng() % 16);  // repeats
      int32_t* dids = static_cast<int32_t*>(alloc(T * 4));
      FM_CHECK_CUDA(cudaMemcpy(dids, ids.data(), T * 4, cudaMemcpyHostToDevice));
      const size_t wb = embedding_backward_workspace_bytes(T, V);
      void* ws = alloc(wb);
      const std::string shape = "T8192 V129280 H7168";
      const double fb = T * Hd * 6.0 + T * 4.0;
      const double nf = time_us([&](int) {
        naive_embed_fwd<<<grid(T * Hd, 256), 256, 0, stream>>>(table, Hd, dids, T, rows);
      });
      const double of = time_us(
          [&](int) { embedding_forward_gpu(table, V, Hd, dids, T, rows, Hd, status, stream); });
      emit("embed_fwd", shape, "naive", nf, fb, nf);
      emit("embed_fwd", shape, "fp8moe", of, fb, nf);
      // Backward: dy read, every distinct row read and written once (T * 2 B per element + the
      // distinct rows' 8 B).
      int64_t distinct = 0;
      {
        std::vector<int32_t> s = ids;
        std::sort(s.begin(), s.end());
        distinct = std::unique(s.begin(), s.end()) - s.begin();
      }
      const double bb = T * Hd * 2.0 + distinct * Hd * 8.0 + T * 4.0;
      const double nb = time_us([&](int) {
        naive_embed_bwd<<<grid(T * Hd, 256), 256, 0, stream>>>(dy, dids, T, Hd, dtable);
      });
      const double ob = time_us([&](int) {
        embedding_backward_gpu(dy, Hd, dids, T, V, Hd, dtable, ws, wb, status, stream);
      });
      emit("embed_bwd", shape, "naive", nb, bb, nb);
      emit("embed_bwd", shape, "fp8moe", ob, bb, nb);
      for (void* p :
           {static_cast<void*>(table), static_cast<void*>(dtable), static_cast<void*>(rows),
            static_cast<void*>(dy), static_cast<void*>(dids), ws})
        FM_CHECK_CUDA(cudaFree(p));
    }
    // ---- Cross-entropy: 4096 x 129280 BF16 ----
    {
      const int64_t R = 4096, V = 129280;
      bf16* logits = static_cast<bf16*>(alloc(R * V * 2));
      bf16* dl = static_cast<bf16*>(alloc(R * V * 2));
      float* loss = static_cast<float*>(alloc(R * 4));
      double* sum = static_cast<double*>(alloc(8));
      fill_bf16<<<grid(R * V, 256), 256, 0, stream>>>(logits, R * V, 5);
      std::vector<int32_t> tgt(R);
      for (auto& t : tgt) t = static_cast<int32_t>(rng() % V);
      int32_t* dt = static_cast<int32_t*>(alloc(R * 4));
      FM_CHECK_CUDA(cudaMemcpy(dt, tgt.data(), R * 4, cudaMemcpyHostToDevice));
      const double bytes = R * V * 4.0 + R * 8.0;
      const float scale = 1.0f / R;
      const double naive = time_us([&](int) {
        naive_cross_entropy<<<static_cast<unsigned>(R), 256, 0, stream>>>(logits, dt, V, scale, dl,
                                                                          loss);
      });
      const double ours = time_us([&](int) {
        cross_entropy_gpu(logits, V, dt, R, V, scale, dl, V, loss, sum, nullptr, status, stream);
      });
      const std::string shape = "R4096 V129280";
      emit("cross_entropy", shape, "naive", naive, bytes, naive);
      emit("cross_entropy", shape, "fp8moe", ours, bytes, naive);
      const double lo = time_us([&](int) {
        cross_entropy_gpu(logits, V, dt, R, V, scale, nullptr, V, loss, sum, nullptr, status,
                          stream);
      });
      emit("cross_entropy_loss_only", shape, "fp8moe", lo, R * V * 2.0 + R * 8.0, naive);
      for (void* p : {static_cast<void*>(logits), static_cast<void*>(dl), static_cast<void*>(loss),
                      static_cast<void*>(sum), static_cast<void*>(dt)})
        FM_CHECK_CUDA(cudaFree(p));
    }
    // ---- Router backward: T 16384, E 256, K 8 ----
    {
      RouterConfig config;  // V3 defaults
      const int64_t T = 16384;
      const int E = config.n_routed_experts, K = config.num_experts_per_tok;
      std::vector<float> logits(T * E), grad(T * K);
      std::normal_distribution<float> normal(0.0f, 2.0f);
      for (auto& v : logits) v = normal(rng);
      for (auto& v : grad) v = normal(rng) * 1e-3f;
      const RouterOutput fwd = route(config, logits.data(), T, nullptr);
      float* ds = static_cast<float*>(alloc(T * E * 4));
      float* dg = static_cast<float*>(alloc(T * K * 4));
      float* out = static_cast<float*>(alloc(T * E * 4));
      int32_t* di = static_cast<int32_t*>(alloc(T * K * 4));
      FM_CHECK_CUDA(cudaMemcpy(ds, fwd.scores.data(), T * E * 4, cudaMemcpyHostToDevice));
      FM_CHECK_CUDA(cudaMemcpy(dg, grad.data(), T * K * 4, cudaMemcpyHostToDevice));
      FM_CHECK_CUDA(cudaMemcpy(di, fwd.topk_idx.data(), T * K * 4, cudaMemcpyHostToDevice));
      const double bytes = T * E * 4.0 + T * K * 12.0;
      const double naive = time_us([&](int) {
        naive_router_bwd<<<grid(T, 128), 128, 0, stream>>>(ds, di, dg, T, E, K,
                                                           config.routed_scaling_factor, out);
      });
      const double ours =
          time_us([&](int) { route_backward_cuda(config, ds, di, dg, T, out, status, stream); });
      const std::string shape = "T16384 E256 K8";
      emit("router_bwd", shape, "naive", naive, bytes, naive);
      emit("router_bwd", shape, "fp8moe", ours, bytes, naive);
      for (void* p : {static_cast<void*>(ds), static_cast<void*>(dg), static_cast<void*>(out),
                      static_cast<void*>(di)})
        FM_CHECK_CUDA(cudaFree(p));
    }
    check_model_kernels_status(status, "model_kernels_bench", stream);
    if (f) std::fclose(f);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "model_kernels_bench: %s\n", e.what());
    return 1;
  }
}
