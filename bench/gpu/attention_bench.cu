// MLA's causal attention core (kernels::mla_attention_forward / _backward) against a naive GPU
// anchor of the same run: the keys concatenated (k_nope | k_pe per head, a copy kernel), cuBLASLt
// BF16 GEMMs S = Q K^T (FP32 scores materialised, all S^2 of them, per sequence batched over the
// heads) and O = P V (BF16 out), a causal softmax kernel between (FP32 in, BF16 P out, kept);
// backward from that P: dP = dO V^T (FP32), a kernel for D and dS = P (dP - D) scale (BF16), dV =
// P^T dO, dQ = dS K, dK = dS^T Q (FP32), a kernel summing dK's k_pe columns over the heads.
// Shapes: batch 1 x seq 4096 x 128 heads (V3 pre-training), batch 4 x seq 1024 x 16 heads.
// FLOPs (causal: the pairs t2 <= t, S (S + 1) / 2 a sequence and head): forward 2 (192 + 128) a
// pair, backward FA2's five products 2 (3 x 192 + 2 x 128) a pair (this kernel recomputes S and
// dP once more: its own work is 2 (4 x 192 + 3 x 128)); the anchor's TFLOPS use the same causal
// count, so the ratio of TFLOPS is the ratio of times. rel_diff: ||ours - naive|| / ||naive|| of
// the forward's out, the backward's dq and dk_pe (full-size checks the CPU reference is too slow
// for; the backward's column prints dq's).
// Rows: naive_cublaslt, fp8moe_mma (the backward's MlaBackwardImpl::kMmaSync, session 20's) and
// fp8moe (the default backward, kWgmma since session 21; its JSON row also has
// dq_rel_diff_vs_mma). Before session 21 the row "fp8moe" was the mma.sync backward. Forward:
// fp8moe_mma (MlaForwardImpl::kMmaSync, session 20's; its out and lse feed the backward rows),
// fp8moe_wgmma (kWgmma) and fp8moe (the default, kWgmmaPingPong since session 21; called
// fp8moe_wgmma_pp in s21-af's call); the last two timed after the other rows, their JSON rows
// with out_rel_diff_vs_mma. Before session 21 the row "fp8moe" was the mma.sync forward.
// Timing: CUDA events around `iters` calls, median of `rounds`. Correctness is the test's job
// (test_kernels_gpu --gtest_filter='MlaAttentionGpu*').
// Run: attention_bench [--out rows.jsonl] [--iters 5] [--rounds 5] [--date D] [--commit C]
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "bench_args.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/mla_attention.h"

#define CHECK_CUBLAS(call)                                                            \
  do {                                                                                \
    cublasStatus_t st_ = (call);                                                      \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                 \
      FM_THROW(ErrorKind::kRuntime, #call " failed: status ", static_cast<int>(st_)); \
  } while (0)

namespace {

using namespace fp8moe;
using kernels::MlaAttentionShape;
constexpr int64_t kDn = 128, kDr = 64, kDv = 128, kDq = 192, kDkv = 256;
constexpr float kScale = 0.1352f;

__global__ void fill_kernel(bf16* x, int64_t n, uint64_t seed) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  // About N(0, 1): the sum of four uniforms, centred and scaled.
  float s = 0;
  for (int k = 0; k < 4; ++k) s += static_cast<float>(philox_u32(seed, k, i) >> 8) * 0x1p-24f;
  x[i] = to_bf16((s - 2.0f) * 1.7320508f);
}

// ---- the naive anchor ----
// K [T, H, 192] = k_nope | k_pe of each head.
__global__ void concat_keys_kernel(const bf16* kv, const bf16* kpe, bf16* k, int64_t rows,
                                   int heads) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // 8-elem chunk
  if (i >= rows * 24) return;
  const int64_t row = i / 24, c = i % 24, t = row / heads;
  const uint4 v = c < 16 ? reinterpret_cast<const uint4*>(kv + row * kDkv)[c]
                         : reinterpret_cast<const uint4*>(kpe + t * kDr)[c - 16];
  reinterpret_cast<uint4*>(k + row * kDq)[c] = v;
}
// P[h, s, :] = softmax over keys <= s of S[h, s, :] (scaled already), BF16; zeros above.
__global__ void causal_softmax_kernel(const float* s, bf16* p, int seq) {
  const int64_t row = blockIdx.x;  // h * seq + query
  const int query = static_cast<int>(row % seq);
  const float* x = s + row * seq;
  __shared__ float red[32];
  float mx = -INFINITY;
  for (int j = threadIdx.x; j <= query; j += blockDim.x) mx = fmaxf(mx, x[j]);
  for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, o));
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = mx;
  __syncthreads();
  mx = red[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) mx = fmaxf(mx, red[w]);
  __syncthreads();
  float sum = 0;
  for (int j = threadIdx.x; j <= query; j += blockDim.x) sum += __expf(x[j] - mx);
  for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = sum;
  __syncthreads();
  sum = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) sum += red[w];
  const float inv = 1.0f / sum;
  for (int j = threadIdx.x; j < seq; j += blockDim.x)
    p[row * seq + j] = to_bf16(j <= query ? __expf(x[j] - mx) * inv : 0.0f);
}

// dS[h, s, :] = P (dP - D) scale for keys <= s (zeros above), D = rowsum(dout * out) of the
// row (its token t = t0 + s, head h), BF16.
__global__ void causal_ds_kernel(const float* dp, const bf16* p, const bf16* out, const bf16* dout,
                                 bf16* ds, int seq, int heads, int64_t t0, float scale) {
  const int64_t row = blockIdx.x;  // h * seq + query
  const int query = static_cast<int>(row % seq), h = static_cast<int>(row / seq);
  __shared__ float red[32];
  const int64_t off = ((t0 + query) * heads + h) * kDv;
  float d = threadIdx.x < kDv ? to_float(out[off + threadIdx.x]) * to_float(dout[off + threadIdx.x])
                              : 0.0f;
  for (int o = 16; o > 0; o /= 2) d += __shfl_xor_sync(0xFFFFFFFFu, d, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = d;
  __syncthreads();
  d = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) d += red[w];
  for (int j = threadIdx.x; j < seq; j += blockDim.x) {
    const int64_t i = row * seq + j;
    ds[i] = to_bf16(j <= query ? to_float(p[i]) * (dp[i] - d) * scale : 0.0f);
  }
}
// dk_pe[t, :] = sum over heads of dK[t, h, 128:192] (FP32), in head order.
__global__ void kpe_sum_kernel(const float* dk, float* dk_pe, int64_t tokens, int heads) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= tokens * kDr) return;
  const int64_t t = i / kDr, c = i % kDr;
  float sum = 0;
  for (int h = 0; h < heads; ++h) sum += dk[(t * heads + h) * kDq + kDn + c];
  dk_pe[i] = sum;
}

// One strided-batched cuBLASLt matmul, column-major: D (m x n, ldd) = alpha op(A) op(B) with
// A, B BF16, D `dtype`, FP32 compute; strides between the batch's matrices sa, sb, sd.
struct LtGemm {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, ld = nullptr;
  cublasLtMatmulAlgo_t algo{};
  LtGemm(cublasLtHandle_t h, bool ta, bool tb, int64_t m, int64_t n, int64_t k, int64_t lda,
         int64_t sa, int64_t ldb, int64_t sb, cudaDataType dtype, int64_t ldd, int64_t sd,
         int batch, size_t ws_bytes) {
    CHECK_CUBLAS(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                            opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    CHECK_CUBLAS(
        cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa));
    CHECK_CUBLAS(
        cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb));
    CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, ta ? k : m, ta ? m : k, lda));
    CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, tb ? n : k, tb ? k : n, ldb));
    CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&ld, dtype, m, n, ldd));
    for (auto [l, stride] : {std::pair{la, sa}, {lb, sb}, {ld, sd}}) {
      CHECK_CUBLAS(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch,
                                                    sizeof batch));
      CHECK_CUBLAS(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                    &stride, sizeof stride));
    }
    cublasLtMatmulPreference_t pref;
    CHECK_CUBLAS(cublasLtMatmulPreferenceCreate(&pref));
    CHECK_CUBLAS(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes, sizeof ws_bytes));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    CHECK_CUBLAS(cublasLtMatmulAlgoGetHeuristic(h, desc, la, lb, ld, ld, pref, 1, &result, &found));
    cublasLtMatmulPreferenceDestroy(pref);
    FM_CHECK(found > 0, "cuBLASLt has no algorithm for m=", m, " n=", n, " k=", k);
    algo = result.algo;
  }
  ~LtGemm() {
    cublasLtMatmulDescDestroy(desc);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(ld);
  }
  void run(cublasLtHandle_t h, float alpha, const void* a, const void* b, void* d, void* ws,
           size_t ws_bytes, cudaStream_t stream) const {
    const float beta = 0.0f;
    CHECK_CUBLAS(cublasLtMatmul(h, desc, &alpha, a, la, b, lb, &beta, d, ld, d, ld, &algo, ws,
                                ws_bytes, stream));
  }
};

struct Options {
  std::string out, date = "unknown", commit = "unknown";
  int iters = 5, rounds = 5;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <typename T>
T* dev_alloc(size_t count) {
  T* p = nullptr;
  FM_CHECK_CUDA(cudaMalloc(&p, count * sizeof(T)));
  return p;
}

double as_double(bf16 v) {
  return to_float(v);
}
double as_double(float v) {
  return v;
}
// ||a - b|| / ||b|| of two device arrays.
template <typename T>
double rel_diff(const T* a, const T* b, size_t n) {
  std::vector<T> x(n), y(n);
  FM_CHECK_CUDA(cudaMemcpy(x.data(), a, n * sizeof(T), cudaMemcpyDeviceToHost));
  FM_CHECK_CUDA(cudaMemcpy(y.data(), b, n * sizeof(T), cudaMemcpyDeviceToHost));
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    const double u = as_double(x[i]), w = as_double(y[i]);
    num += (u - w) * (u - w);
    den += w * w;
  }
  return std::sqrt(num / den);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Options o;
    bench::parse_flags(argc, argv, "attention_bench",
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
    FM_CHECK(o.out.empty() || f != nullptr, "attention_bench: cannot open ", o.out);
    cudaStream_t stream;
    FM_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaEvent_t t0, t1;
    FM_CHECK_CUDA(cudaEventCreate(&t0));
    FM_CHECK_CUDA(cudaEventCreate(&t1));
    cublasLtHandle_t lt;
    CHECK_CUBLAS(cublasLtCreate(&lt));
    const size_t lt_ws_bytes = size_t(64) << 20;
    void* lt_ws = dev_alloc<uint8_t>(lt_ws_bytes);
    std::printf("attention_bench on %s (%d SMs), %d calls a timing, median of %d\n", prop.name,
                prop.multiProcessorCount, o.iters, o.rounds);
    std::printf("  %-20s %-9s %-15s %10s %9s %9s %11s\n", "batch x seq x heads", "op", "impl", "us",
                "TFLOPS", "vs naive", "rel_diff");

    const MlaAttentionShape shapes[] = {{1, 4096, 128}, {4, 1024, 16}};
    for (const MlaAttentionShape& s : shapes) {
      const int64_t T = s.tokens(), H = s.heads, S = s.seq;
      bf16 *q = dev_alloc<bf16>(T * H * kDq), *kv = dev_alloc<bf16>(T * H * kDkv),
           *kpe = dev_alloc<bf16>(T * kDr), *out = dev_alloc<bf16>(T * H * kDv),
           *dout = dev_alloc<bf16>(T * H * kDv), *dq = dev_alloc<bf16>(T * H * kDq),
           *dkv = dev_alloc<bf16>(T * H * kDkv), *k = dev_alloc<bf16>(T * H * kDq),
           *out_naive = dev_alloc<bf16>(T * H * kDv), *p = dev_alloc<bf16>(s.batch * H * S * S),
           *ds = dev_alloc<bf16>(H * S * S), *dq_naive = dev_alloc<bf16>(T * H * kDq),
           *dkv_naive = dev_alloc<bf16>(T * H * kDkv), *dq_mma = dev_alloc<bf16>(T * H * kDq),
           *out_wg = dev_alloc<bf16>(T * H * kDv);
      float *lse = dev_alloc<float>(H * T), *dkpe = dev_alloc<float>(T * kDr),
            *sc = dev_alloc<float>(H * S * S), *dk_naive = dev_alloc<float>(T * H * kDq),
            *dkpe_naive = dev_alloc<float>(T * kDr), *lse_wg = dev_alloc<float>(H * T);
      const size_t ws_bytes = kernels::mla_attention_backward_workspace_bytes(s);
      void* ws = dev_alloc<uint8_t>(ws_bytes);
      const auto fill = [&](bf16* x, int64_t n, uint64_t seed) {
        fill_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(x, n, seed);
        FM_CHECK_LAUNCH();
      };
      fill(q, T * H * kDq, 1);
      fill(kv, T * H * kDkv, 2);
      fill(kpe, T * kDr, 3);
      fill(dout, T * H * kDv, 4);

      // Per sequence: S = K Q^T in column-major terms (keys x queries, ld S) batched over heads;
      // O^T = V^T P^T (dv x queries, ld H * 128).
      const LtGemm qk(lt, true, false, S, S, kDq, H * kDq, kDq, H * kDq, kDq, CUDA_R_32F, S, S * S,
                      static_cast<int>(H), lt_ws_bytes);
      const LtGemm pv(lt, false, false, kDv, S, S, H * kDkv, kDkv, S, S * S, CUDA_R_16BF, H * kDv,
                      kDv, static_cast<int>(H), lt_ws_bytes);
      const auto naive_fwd = [&] {
        const int64_t chunks = T * H * 24;
        concat_keys_kernel<<<static_cast<unsigned>((chunks + 255) / 256), 256, 0, stream>>>(
            kv, kpe, k, T * H, static_cast<int>(H));
        FM_CHECK_LAUNCH();
        for (int64_t b = 0; b < s.batch; ++b) {
          const int64_t t0b = b * S;
          qk.run(lt, kScale, k + t0b * H * kDq, q + t0b * H * kDq, sc, lt_ws, lt_ws_bytes, stream);
          bf16* pb = p + b * H * S * S;  // kept for the backward
          causal_softmax_kernel<<<static_cast<unsigned>(H * S), 256, 0, stream>>>(
              sc, pb, static_cast<int>(S));
          FM_CHECK_LAUNCH();
          pv.run(lt, 1.0f, kv + t0b * H * kDkv + kDn, pb, out_naive + t0b * H * kDv, lt_ws,
                 lt_ws_bytes, stream);
        }
      };
      // Backward, from the forward's P: dP^T-major as S (keys x queries) = V dO^T; dS; dV^T =
      // dO^T P; dQ^T = K^T dS^T (all column-major views of row-major [query][key] matrices).
      const LtGemm dp_g(lt, true, false, S, S, kDv, H * kDkv, kDkv, H * kDv, kDv, CUDA_R_32F, S,
                        S * S, static_cast<int>(H), lt_ws_bytes);
      const LtGemm dv_g(lt, false, true, kDv, S, S, H * kDv, kDv, S, S * S, CUDA_R_16BF, H * kDkv,
                        kDkv, static_cast<int>(H), lt_ws_bytes);
      const LtGemm dq_g(lt, false, false, kDq, S, S, H * kDq, kDq, S, S * S, CUDA_R_16BF, H * kDq,
                        kDq, static_cast<int>(H), lt_ws_bytes);
      const LtGemm dk_g(lt, false, true, kDq, S, S, H * kDq, kDq, S, S * S, CUDA_R_32F, H * kDq,
                        kDq, static_cast<int>(H), lt_ws_bytes);
      const auto naive_bwd = [&] {
        for (int64_t b = 0; b < s.batch; ++b) {
          const int64_t t0b = b * S;
          const bf16* pb = p + b * H * S * S;
          dp_g.run(lt, 1.0f, kv + t0b * H * kDkv + kDn, dout + t0b * H * kDv, sc, lt_ws,
                   lt_ws_bytes, stream);
          causal_ds_kernel<<<static_cast<unsigned>(H * S), 256, 0, stream>>>(
              sc, pb, out_naive, dout, ds, static_cast<int>(S), static_cast<int>(H), t0b, kScale);
          FM_CHECK_LAUNCH();
          dv_g.run(lt, 1.0f, dout + t0b * H * kDv, pb, dkv_naive + t0b * H * kDkv + kDn, lt_ws,
                   lt_ws_bytes, stream);
          dq_g.run(lt, 1.0f, k + t0b * H * kDq, ds, dq_naive + t0b * H * kDq, lt_ws, lt_ws_bytes,
                   stream);
          dk_g.run(lt, 1.0f, q + t0b * H * kDq, ds, dk_naive + t0b * H * kDq, lt_ws, lt_ws_bytes,
                   stream);
        }
        kpe_sum_kernel<<<static_cast<unsigned>((T * kDr + 255) / 256), 256, 0, stream>>>(
            dk_naive, dkpe_naive, T, static_cast<int>(H));
        FM_CHECK_LAUNCH();
      };
      const auto ours_fwd = [&] {  // session 20's mma.sync forward; its out / lse feed the backward
        kernels::mla_attention_forward(q, kv, kpe, s, kScale, out, lse, stream,
                                       kernels::MlaForwardImpl::kMmaSync);
      };
      const auto ours_fwd_wgmma = [&](const char* label) {  // s21-af, own out / lse
        const bool is_default = std::string(label) == "fp8moe";
        return [&, is_default] {
          if (is_default)
            kernels::mla_attention_forward(q, kv, kpe, s, kScale, out_wg, lse_wg, stream);
          else
            kernels::mla_attention_forward(q, kv, kpe, s, kScale, out_wg, lse_wg, stream,
                                           kernels::MlaForwardImpl::kWgmma);
        };
      };
      const auto ours_bwd = [&] {  // session 20's mma.sync kernels
        kernels::mla_attention_backward(q, kv, kpe, out, dout, lse, s, kScale, dq, dkv, dkpe, ws,
                                        ws_bytes, stream, kernels::MlaBackwardImpl::kMmaSync);
      };
      const auto ours_bwd_wgmma = [&] {  // the default since session 21
        kernels::mla_attention_backward(q, kv, kpe, out, dout, lse, s, kScale, dq, dkv, dkpe, ws,
                                        ws_bytes, stream);
      };
      const auto time_us = [&](const std::function<void()>& call) {
        call();
        FM_CHECK_CUDA(cudaStreamSynchronize(stream));
        std::vector<double> us;
        for (int round = 0; round < o.rounds; ++round) {
          FM_CHECK_CUDA(cudaEventRecord(t0, stream));
          for (int i = 0; i < o.iters; ++i) call();
          FM_CHECK_CUDA(cudaEventRecord(t1, stream));
          FM_CHECK_CUDA(cudaEventSynchronize(t1));
          float ms = 0;
          FM_CHECK_CUDA(cudaEventElapsedTime(&ms, t0, t1));
          us.push_back(1000.0 * ms / o.iters);
        }
        return median(us);
      };
      // Interleaved, so that clocks and temperature drift hit both alike.
      const double naive_us = time_us(naive_fwd), fwd_us = time_us(ours_fwd);
      const double naive_bwd_us = time_us(naive_bwd), bwd_us = time_us(ours_bwd);
      FM_CHECK_CUDA(cudaStreamSynchronize(stream));
      const double diff = rel_diff(out, out_naive, static_cast<size_t>(T * H * kDv));
      const double diff_dq = rel_diff(dq, dq_naive, static_cast<size_t>(T * H * kDq));
      const double diff_dkpe = rel_diff(dkpe, dkpe_naive, static_cast<size_t>(T * kDr));
      const double pairs = static_cast<double>(s.batch) * H * S * (S + 1) / 2;
      const double fwd_flops = pairs * 2 * (kDq + kDv), bwd_flops = pairs * 2 * (3 * kDq + 2 * kDv);
      struct Row {
        const char *op, *impl;
        double us, flops;
        double diff_dq = 0, diff_dkpe = 0, diff_dq_mma = -1;  // the backward's
        double diff_out = -1, diff_out_mma = -1;              // a forward variant's
      };
      const auto emit = [&](const Row& r) {
        const bool fwd = std::string(r.op) == "forward";
        const double tflops = r.flops / r.us / 1e6;
        const double ratio = (fwd ? naive_us : naive_bwd_us) / r.us;
        const double out_diff = r.diff_out >= 0 ? r.diff_out : diff;
        const bool ours = std::string(r.impl) != "naive_cublaslt";
        char dims[64];
        std::snprintf(dims, sizeof dims, "%lld x %lld x %lld", static_cast<long long>(s.batch),
                      static_cast<long long>(S), static_cast<long long>(H));
        std::printf("  %-20s %-9s %-15s %10.1f %9.1f %9.3f %11.3e\n", dims, r.op, r.impl, r.us,
                    tflops, ratio, ours ? (fwd ? out_diff : r.diff_dq) : 0.0);
        if (f) {
          std::fprintf(f,
                       "{\"bench\":\"attention\",\"gpu\":\"%s\",\"gpus\":1,\"date\":\"%s\","
                       "\"commit\":\"%s\",\"impl\":\"%s\",\"op\":\"%s\",\"batch\":%lld,"
                       "\"seq\":%lld,\"heads\":%lld,\"causal\":true,\"us\":%.1f,\"tflops\":%.1f",
                       prop.name, o.date.c_str(), o.commit.c_str(), r.impl, r.op,
                       static_cast<long long>(s.batch), static_cast<long long>(S),
                       static_cast<long long>(H), r.us, tflops);
          if (ours && fwd)
            std::fprintf(f, ",\"speedup_vs_naive\":%.3f,\"rel_diff_vs_naive\":%.3e", ratio,
                         out_diff);
          if (ours && !fwd)
            std::fprintf(f,
                         ",\"speedup_vs_naive\":%.3f,\"dq_rel_diff_vs_naive\":%.3e,"
                         "\"dk_pe_rel_diff_vs_naive\":%.3e",
                         ratio, r.diff_dq, r.diff_dkpe);
          if (r.diff_dq_mma >= 0) std::fprintf(f, ",\"dq_rel_diff_vs_mma\":%.3e", r.diff_dq_mma);
          if (r.diff_out_mma >= 0) std::fprintf(f, ",\"out_rel_diff_vs_mma\":%.3e", r.diff_out_mma);
          std::fprintf(f, "}\n");
          std::fflush(f);
        }
      };
      // The measured rows first: a failing variant below must not lose them.
      emit({"forward", "naive_cublaslt", naive_us, fwd_flops});
      emit({"forward", "fp8moe_mma", fwd_us, fwd_flops});
      emit({"backward", "naive_cublaslt", naive_bwd_us, bwd_flops});
      emit({"backward", "fp8moe_mma", bwd_us, bwd_flops, diff_dq, diff_dkpe});
      // s21-ab: the wgmma variant of the backward (MlaBackwardImpl::kWgmma), its dq also
      // against the default's (dq_mma, kept from the run above).
      FM_CHECK_CUDA(cudaMemcpyAsync(dq_mma, dq, static_cast<size_t>(T * H * kDq) * sizeof(bf16),
                                    cudaMemcpyDeviceToDevice, stream));
      const double wg_us = time_us(ours_bwd_wgmma);
      FM_CHECK_CUDA(cudaStreamSynchronize(stream));
      emit({"backward", "fp8moe", wg_us, bwd_flops,
            rel_diff(dq, dq_naive, static_cast<size_t>(T * H * kDq)),
            rel_diff(dkpe, dkpe_naive, static_cast<size_t>(T * kDr)),
            rel_diff(dq, dq_mma, static_cast<size_t>(T * H * kDq))});
      // s21-af: the wgmma forwards, against the naive out and the default's (out, from the
      // forward timed above; the backward does not write it).
      for (const char* label : {"fp8moe_wgmma", "fp8moe"}) {
        const double fwd_wg_us = time_us(ours_fwd_wgmma(label));
        FM_CHECK_CUDA(cudaStreamSynchronize(stream));
        Row wg_row{"forward", label, fwd_wg_us, fwd_flops};
        wg_row.diff_out = rel_diff(out_wg, out_naive, static_cast<size_t>(T * H * kDv));
        wg_row.diff_out_mma = rel_diff(out_wg, out, static_cast<size_t>(T * H * kDv));
        emit(wg_row);
      }
      for (void* ptr : {static_cast<void*>(q),         static_cast<void*>(kv),
                        static_cast<void*>(kpe),       static_cast<void*>(out),
                        static_cast<void*>(dout),      static_cast<void*>(dq),
                        static_cast<void*>(dkv),       static_cast<void*>(k),
                        static_cast<void*>(out_naive), static_cast<void*>(p),
                        static_cast<void*>(lse),       static_cast<void*>(dkpe),
                        static_cast<void*>(sc),        static_cast<void*>(ds),
                        static_cast<void*>(dq_naive),  static_cast<void*>(dkv_naive),
                        static_cast<void*>(dk_naive),  static_cast<void*>(dkpe_naive),
                        static_cast<void*>(dq_mma),    static_cast<void*>(out_wg),
                        static_cast<void*>(lse_wg),    ws})
        FM_CHECK_CUDA(cudaFree(ptr));
    }
    cudaFree(lt_ws);
    cublasLtDestroy(lt);
    if (f) std::fclose(f);
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "attention_bench: %s\n", e.what());
    return e.kind() == ErrorKind::kInvalidArgument ? 2 : 1;
  }
}
