// The MLA attention block (model/mla_block_gpu.h: MlaBlockGpu, FP8 projections) against the same
// block with BF16 projections (MlaBlockGpuOptions::bf16_projections: LinearBf16Gpu, cuBLASLt), in
// the same run, at DeepSeek-V3's shape (hidden 7168, 128 heads, q_lora 1536, kv_lora 512, head
// dims 128/64/128, YaRN RoPE) and T = batch x seq tokens (default 1 x 4096).
// Timing: forward, backward (gradients accumulated) each one CUDA graph; a replay = an L2 flush
// (256 MB write, outside the timed interval), start event, the graph, end event; median of --reps
// replays, the two blocks interleaved. The weights are refreshed once, outside the timing.
// FLOPs counted (the useful ones): forward = 2 T (the five projections' N K) + the causal
// attention's 2 B H (S (S + 1) / 2) (192 + 128); backward = 2x the projections' + 2.5x the
// attention's (five S x S products against the forward's two).
// Sanity line: ||fp8 - bf16|| / ||bf16|| of out and dx (the FP8 recipe's error against BF16: a few
// per cent). Correctness is test_model_gpu --gtest_filter='MlaBlockGpu*'.
// Run: mla_block_bench [--out rows.jsonl] [--reps 10] [--batch 1] [--seq 4096] [--date D]
// [--commit C]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "bench_args.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/model/config.h"
#include "fp8moe/model/mla_block_gpu.h"
#include "fp8moe/model/ops.h"

namespace {

using namespace fp8moe;

template <typename T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) {
    FM_CHECK_CUDA(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
  }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
};

__global__ void normal_kernel(float* x, int64_t n, float mean, float std, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] = mean + std * philox_normal(seed, 0, static_cast<uint64_t>(i));
}
__global__ void normal_bf16_kernel(bf16* x, int64_t n, float std, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] = to_bf16(std * philox_normal(seed, 0, static_cast<uint64_t>(i)));
}
__global__ void flush_kernel(uint4* p, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    p[i] = make_uint4(static_cast<uint32_t>(i), 0, 0, 0);
}

double rel_bf16(const bf16* a, const bf16* b, int64_t n) {
  std::vector<bf16> x(static_cast<size_t>(n)), y(static_cast<size_t>(n));
  FM_CHECK_CUDA(cudaMemcpy(x.data(), a, n * sizeof(bf16), cudaMemcpyDeviceToHost));
  FM_CHECK_CUDA(cudaMemcpy(y.data(), b, n * sizeof(bf16), cudaMemcpyDeviceToHost));
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double u = to_float(x[i]), v = to_float(y[i]);
    num += (u - v) * (u - v);
    den += v * v;
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

struct Args {
  std::string out, date = "unknown", commit = "unknown";
  int reps = 10;
  int64_t batch = 1, seq = 4096;
};

// One block with its masters, gradients and buffers.
struct Setup {
  MlaBlockDims d;
  Dev<float> q_a, q_a_norm, q_b, kv_a, kv_a_norm, kv_b, o;
  Dev<float> g_q_a, g_q_a_norm, g_q_b, g_kv_a, g_kv_a_norm, g_kv_b, g_o;
  Setup(const MlaBlockDims& dims)
      : d(dims),
        q_a(size_t(d.q_lora_rank * d.hidden)),
        q_a_norm(size_t(d.q_lora_rank)),
        q_b(size_t(d.heads * d.qd() * d.q_lora_rank)),
        kv_a(size_t((d.kv_lora_rank + d.dr) * d.hidden)),
        kv_a_norm(size_t(d.kv_lora_rank)),
        kv_b(size_t(d.heads * d.kvd() * d.kv_lora_rank)),
        o(size_t(d.hidden * d.heads * d.dv)),
        g_q_a(q_a.n),
        g_q_a_norm(q_a_norm.n),
        g_q_b(q_b.n),
        g_kv_a(kv_a.n),
        g_kv_a_norm(kv_a_norm.n),
        g_kv_b(kv_b.n),
        g_o(o.n) {}
  void init(cudaStream_t s) {
    auto fill = [&](Dev<float>& w, int64_t in, uint64_t seed) {
      normal_kernel<<<1024, 256, 0, s>>>(w.p, int64_t(w.n), 0.0f,
                                         1.0f / std::sqrt(static_cast<float>(in)), seed);
    };
    fill(q_a, d.hidden, 11);
    fill(q_b, d.q_lora_rank, 12);
    fill(kv_a, d.hidden, 13);
    fill(kv_b, d.kv_lora_rank, 14);
    fill(o, d.heads * d.dv, 15);
    normal_kernel<<<1024, 256, 0, s>>>(q_a_norm.p, int64_t(q_a_norm.n), 1.0f, 0.1f, 16);
    normal_kernel<<<1024, 256, 0, s>>>(kv_a_norm.p, int64_t(kv_a_norm.n), 1.0f, 0.1f, 17);
    for (Dev<float>* g : {&g_q_a, &g_q_a_norm, &g_q_b, &g_kv_a, &g_kv_a_norm, &g_kv_b, &g_o})
      FM_CHECK_CUDA(cudaMemsetAsync(g->p, 0, g->n * sizeof(float), s));
  }
  MlaBlockMastersGpu masters() const {
    MlaBlockMastersGpu m;
    m.q_a = q_a.p, m.q_a_norm = q_a_norm.p, m.q_b = q_b.p, m.kv_a = kv_a.p;
    m.kv_a_norm = kv_a_norm.p, m.kv_b = kv_b.p, m.o = o.p;
    return m;
  }
  MlaBlockGradsGpu grads() const {
    MlaBlockGradsGpu g;
    g.q_a = g_q_a.p, g.q_a_norm = g_q_a_norm.p, g.q_b = g_q_b.p, g.kv_a = g_kv_a.p;
    g.kv_a_norm = g_kv_a_norm.p, g.kv_b = g_kv_b.p, g.o = g_o.p;
    return g;
  }
};

}  // namespace

int main(int argc, char** argv) try {
  Args args;
  bench::parse_flags(argc, argv, "mla_block_bench",
                     {{"--out", [&](const std::string& v) { args.out = v; }},
                      {"--reps", [&](const std::string& v) { args.reps = std::stoi(v); }},
                      {"--batch", [&](const std::string& v) { args.batch = std::stoll(v); }},
                      {"--seq", [&](const std::string& v) { args.seq = std::stoll(v); }},
                      {"--date", [&](const std::string& v) { args.date = v; }},
                      {"--commit", [&](const std::string& v) { args.commit = v; }}});
  FM_CHECK_ARG(args.reps >= 1 && args.batch >= 1 && args.seq >= 1,
               "mla_block_bench: --reps, --batch and --seq must be >= 1");
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "mla_block_bench: no GPU\n");
    return 77;
  }
  cudaDeviceProp prop{};
  FM_CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  FILE* out = args.out.empty() ? nullptr : std::fopen(args.out.c_str(), "w");
  FM_CHECK(args.out.empty() || out != nullptr, "mla_block_bench: cannot write ", args.out);
  cudaStream_t stream;
  FM_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  Dev<uint4> flush((size_t(256) << 20) / sizeof(uint4));

  const ModelConfig cfg;  // DeepSeek-V3
  const MlaBlockDims d = MlaBlockDims::from(cfg);
  const int64_t B = args.batch, S = args.seq, T = B * S, H = d.heads, hid = d.hidden;
  const RopeTable rope = make_rope_table(d.dr, S, cfg.rope_theta, cfg.rope_scaling);
  RopeTableGpu rope_gpu(rope);
  std::vector<int32_t> pos_h(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) pos_h[t] = static_cast<int32_t>(t % S);
  Dev<int32_t> pos(pos_h.size());
  FM_CHECK_CUDA(cudaMemcpy(pos.p, pos_h.data(), pos_h.size() * 4, cudaMemcpyHostToDevice));
  Dev<bf16> x(size_t(T * hid)), dout(size_t(T * hid));
  normal_bf16_kernel<<<1024, 256, 0, stream>>>(x.p, T * hid, 1.0f, 1);
  normal_bf16_kernel<<<1024, 256, 0, stream>>>(dout.p, T * hid, 1e-2f, 2);
  Dev<uint32_t> status(1);
  FM_CHECK_CUDA(cudaMemsetAsync(status.p, 0, 4, stream));

  Setup s8(d), s16(d);
  s8.init(stream);
  s16.init(stream);
  MlaBlockGpu fp8(d, T, rope_gpu.view()), b16(d, T, rope_gpu.view(), MlaBlockGpuOptions{true});
  fp8.refresh(s8.masters(), stream);
  b16.refresh(s16.masters(), stream);
  Dev<bf16> y8(size_t(T * hid)), y16(size_t(T * hid)), dx8(size_t(T * hid)), dx16(size_t(T * hid));
  // Eager once (cuBLASLt plans, first-touch), then the graphs.
  fp8.forward(x.p, pos.p, B, S, y8.p, status.p, stream);
  fp8.backward(dout.p, dx8.p, s8.grads(), status.p, stream);
  b16.forward(x.p, pos.p, B, S, y16.p, status.p, stream);
  b16.backward(dout.p, dx16.p, s16.grads(), status.p, stream);
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  check_model_kernels_status(status.p, "mla_block_bench", stream);
  const double e_y = rel_bf16(y8.p, y16.p, T * hid), e_dx = rel_bf16(dx8.p, dx16.p, T * hid);

  std::vector<cudaGraphExec_t> execs;
  auto add = [&](const std::function<void()>& op) {
    cudaGraph_t g;
    cudaGraphExec_t e;
    FM_CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    op();
    FM_CHECK_CUDA(cudaStreamEndCapture(stream, &g));
    FM_CHECK_CUDA(cudaGraphInstantiate(&e, g, 0));
    FM_CHECK_CUDA(cudaGraphDestroy(g));
    execs.push_back(e);
  };
  add([&] { fp8.forward(x.p, pos.p, B, S, y8.p, status.p, stream); });
  add([&] { fp8.backward(dout.p, dx8.p, s8.grads(), status.p, stream); });
  add([&] { b16.forward(x.p, pos.p, B, S, y16.p, status.p, stream); });
  add([&] { b16.backward(dout.p, dx16.p, s16.grads(), status.p, stream); });
  std::vector<std::vector<double>> samples(execs.size());
  cudaEvent_t e0, e1;
  FM_CHECK_CUDA(cudaEventCreate(&e0));
  FM_CHECK_CUDA(cudaEventCreate(&e1));
  for (int r = -1; r < args.reps; ++r)
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
  std::vector<double> us;
  for (auto& v : samples) {
    std::sort(v.begin(), v.end());
    us.push_back(v[v.size() / 2]);
  }
  check_model_kernels_status(status.p, "mla_block_bench", stream);

  const double proj_nk = double(hid) * d.q_lora_rank + double(d.q_lora_rank) * H * d.qd() +
                         double(hid) * (d.kv_lora_rank + d.dr) +
                         double(d.kv_lora_rank) * H * d.kvd() + double(H) * d.dv * hid;
  const double attn = 2.0 * B * H * (double(S) * (S + 1) / 2) * (d.qd() + d.dv);
  const double flops[2] = {2.0 * T * proj_nk + attn, 4.0 * T * proj_nk + 2.5 * attn};
  std::printf(
      "mla_block_bench on %s (%d SMs): V3 MLA block, T = %lld x %lld, median of %d "
      "cold-L2 replays\n",
      prop.name, prop.multiProcessorCount, static_cast<long long>(B), static_cast<long long>(S),
      args.reps);
  std::printf("  %-9s %10s %8s %12s %8s %10s\n", "op", "fp8 us", "TFLOPS", "bf16-proj us", "TFLOPS",
              "bf16/fp8");
  const char* ops[2] = {"forward", "backward"};
  for (int o = 0; o < 2; ++o) {
    const double a = us[o], b = us[2 + o];
    std::printf("  %-9s %10.1f %8.0f %12.1f %8.0f %10.3f\n", ops[o], a, flops[o] / a * 1e-6, b,
                flops[o] / b * 1e-6, b / a);
    if (out == nullptr) continue;
    const char* impls[2] = {"fp8moe", "bf16_projections"};
    const double t[2] = {a, b};
    for (int i = 0; i < 2; ++i)
      std::fprintf(out,
                   "{\"bench\":\"mla_block\",\"gpu\":\"%s\",\"gpus\":1,\"date\":\"%s\","
                   "\"commit\":\"%s\",\"impl\":\"%s\",\"op\":\"%s\",\"batch\":%lld,\"seq\":%lld,"
                   "\"us\":%.2f,\"tflops\":%.1f}\n",
                   prop.name, args.date.c_str(), args.commit.c_str(), impls[i], ops[o],
                   static_cast<long long>(B), static_cast<long long>(S), t[i],
                   flops[o] / t[i] * 1e-6);
  }
  std::printf("  sanity: |fp8 - bf16| / |bf16|  out %.2e  dx %.2e\n", e_y, e_dx);
  for (auto e : execs) cudaGraphExecDestroy(e);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  if (out != nullptr) std::fclose(out);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "mla_block_bench: %s\n", e.what());
  return 1;
}
