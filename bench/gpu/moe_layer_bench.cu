// One DeepSeekMoE layer's forward and backward across EP ranks (comm/moe_layer_gpu.h: MoeLayerGpu;
// one process, one rank per GPU), the way a trainer runs it, two forms in one run:
//   host_counts (the anchor: the conventional form, DeepEP's normal mode's design): the dispatch
//     expands every token into its rows (expand_payload on) and the backward copies the experts'
//     row counts to the host and waits for them (MoeLayerOptions::backward_host_counts), so the
//     host drives it eagerly, phase by phase across the ranks;
//   device (ours): the dispatch stops at the layout (records read in place, expand_payload off)
//     and the backward reads the experts' row ranges on the device: no host synchronisation, so
//     forward + backward are one CUDA graph per rank, replayed.
// Also timed: ours eager (the same calls without the graph), ours with the weight gradients
// written over instead of added (MoeLayerGrads::overwrite), and the forward alone of both.
// Shape (defaults): DeepSeek-V3's MoE layer — 4096 tokens a rank, hidden 7168, 256 routed experts
// (inter 2048) over the ranks, top-8, one shared expert (inter 2048); FP8 dispatch, BF16 combine;
// the rows bound (EpConfig::max_rows) 1.3x the mean received rows + one 128-row block an expert.
// Weights are random E4M3 codes written on the device with constant scales (values do not matter
// to the times); routing uniform random top-8 (distinct experts), gate weights in [0.05, 0.3].
// Timing: time = the slowest rank's device-event interval; the graph and the device-form eager
// runs start all ranks together behind a gate kernel (bench/gpu/gated_timing.cuh); the host-
// counts form cannot (its host waits mid-backward), so its interval starts when each rank's
// stream is idle and includes the host's enqueueing of the other ranks' phases — what a
// one-process driver of several GPUs pays. Median of --iters, the forms interleaved.
// Correctness: the tests (test_comm_gpu --gtest_filter='MoeLayerApi*'); this checks that the
// two forms' grad_x agree bit for bit on every rank once (the run exits 1 otherwise).
// Run: moe_layer_bench [--out f.jsonl] [--iters 10] [--tokens 4096] [--date D] [--commit C]
//      (needs >= 2 GPUs; every visible GPU is one rank)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "bench_args.h"
#include "fp8moe/comm/device_ep.h"
#include "fp8moe/comm/ep.h"
#include "fp8moe/comm/moe_layer_gpu.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "gated_timing.cuh"
#include "random_expert_weights.cuh"

namespace {

using namespace fp8moe;
using namespace fp8moe::comm;
using namespace fp8moe::bench;

struct Rank {
  int device = 0;
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, end = nullptr;
  std::unique_ptr<DeviceWeights> routed, shared;
  uint16_t *x = nullptr, *gy = nullptr;
  int32_t* idx = nullptr;
  float* w = nullptr;
  struct Form {
    std::unique_ptr<MoeLayerGpu> layer;
    uint16_t *y = nullptr, *gx = nullptr;
    float* gw = nullptr;
    MoeLayerGrads dw;
  } form[2];  // [0] host counts (anchor), [1] device (ours)
};

struct Args {
  std::string out, date = "unknown", commit = "unknown";
  int iters = 10;
  int64_t tokens = 4096;
};

}  // namespace

int main(int argc, char** argv) try {
  Args a;
  bench::parse_flags(argc, argv, "moe_layer_bench",
                     {{"--out", [&](const std::string& v) { a.out = v; }},
                      {"--iters", [&](const std::string& v) { a.iters = std::stoi(v); }},
                      {"--tokens", [&](const std::string& v) { a.tokens = std::stoll(v); }},
                      {"--date", [&](const std::string& v) { a.date = v; }},
                      {"--commit", [&](const std::string& v) { a.commit = v; }}});
  FM_CHECK_ARG(a.iters >= 1 && a.tokens >= 1, "moe_layer_bench: --iters and --tokens >= 1");
  int gpus = 0;
  if (cudaGetDeviceCount(&gpus) != cudaSuccess || gpus < 2) {
    std::fprintf(stderr, "moe_layer_bench: needs >= 2 GPUs (one rank each)\n");
    return 77;
  }
  const int R = gpus;
  const int64_t T = a.tokens, H = 7168, I = 2048, Is = 2048;
  EpConfig cfg;
  cfg.num_ranks = R;
  cfg.num_experts = 256;
  cfg.top_k = 8;
  cfg.hidden = H;
  cfg.max_tokens_per_rank = T;
  cfg.payload = Payload::kFP8;
  cfg.timeout_s = 60.0;
  const int64_t L = cfg.experts_per_rank();
  cfg.max_rows = (T * cfg.top_k * 13 / 10 + L * 128 + 127) / 128 * 128;
  std::vector<int> devices(R);
  for (int r = 0; r < R; ++r) devices[r] = r;
  DeviceEpOptions opt;
  DeviceEpGroup expanded(cfg, devices, opt);
  opt.expand_payload = false;
  DeviceEpGroup gathered(cfg, devices, opt);
  DeviceEpGroup* groups[2] = {&expanded, &gathered};

  std::vector<Rank> rk(R);
  cudaDeviceProp prop{};
  FM_CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  for (int r = 0; r < R; ++r) {
    Rank& k = rk[r];
    k.device = devices[r];
    FM_CHECK_CUDA(cudaSetDevice(k.device));
    bench::create_timed_stream(k);
    k.routed = std::make_unique<DeviceWeights>(L, H, I, 100 + 10 * r, k.stream);
    k.shared = std::make_unique<DeviceWeights>(1, H, Is, 900 + 10 * r, k.stream);
    k.x = device_alloc<uint16_t>(T * H);
    k.gy = device_alloc<uint16_t>(T * H);
    fill_bf16_kernel<<<kFillBlocks, 256, 0, k.stream>>>(k.x, T * H, 7 + r);
    fill_bf16_kernel<<<kFillBlocks, 256, 0, k.stream>>>(k.gy, T * H, 17 + r);
    FM_CHECK_LAUNCH();
    // Uniform random top-k of distinct experts, gate weights in [0.05, 0.3].
    std::vector<int32_t> idx;
    std::vector<float> w;
    random_topk(T, cfg.top_k, cfg.num_experts, 1234, static_cast<uint64_t>(r), idx, w);
    k.idx = device_alloc<int32_t>(T * cfg.top_k);
    k.w = device_alloc<float>(T * cfg.top_k);
    FM_CHECK_CUDA(cudaMemcpy(k.idx, idx.data(), idx.size() * 4, cudaMemcpyHostToDevice));
    FM_CHECK_CUDA(cudaMemcpy(k.w, w.data(), w.size() * 4, cudaMemcpyHostToDevice));
    for (int f = 0; f < 2; ++f) {
      MoeLayerOptions lo;
      lo.backward = true;
      lo.backward_host_counts = f == 0;
      Rank::Form& q = k.form[f];
      q.layer =
          std::make_unique<MoeLayerGpu>(groups[f]->rank(r), k.routed->view, k.shared->view, lo);
      q.y = device_alloc<uint16_t>(T * H);
      q.gx = device_alloc<uint16_t>(T * H);
      q.gw = device_alloc<float>(T * cfg.top_k);
      // NOTE: both forms accumulate into the same weight gradients (22.5 GB a rank at V3's
      // shape with 2 ranks; their values do not matter to the times).
      if (f == 0) {
        q.dw.routed_dw13 = device_alloc<float>(L * 2 * I * H);
        q.dw.routed_dw2 = device_alloc<float>(L * H * I);
        q.dw.shared_dw13 = device_alloc<float>(2 * Is * H);
        q.dw.shared_dw2 = device_alloc<float>(H * Is);
        for (auto [p, n] :
             {std::pair{q.dw.routed_dw13, L * 2 * I * H}, std::pair{q.dw.routed_dw2, L * H * I},
              std::pair{q.dw.shared_dw13, 2 * Is * H}, std::pair{q.dw.shared_dw2, H * Is}})
          FM_CHECK_CUDA(cudaMemsetAsync(p, 0, n * 4, k.stream));
      } else {
        q.dw = k.form[0].dw;
      }
    }
    FM_CHECK_CUDA(cudaStreamSynchronize(k.stream));
  }
  auto bf = [](uint16_t* p) { return reinterpret_cast<bf16*>(p); };
  // The forms' phases, each across all ranks before the next (ranks share one host thread).
  const auto forward_all = [&](int f) {
    for (int r = 0; r < R; ++r)
      rk[r].form[f].layer->forward(bf(rk[r].x), rk[r].idx, rk[r].w, T, bf(rk[r].form[f].y),
                                   rk[r].stream);
  };
  const auto backward_all = [&](int f) {
    for (int r = 0; r < R; ++r)
      rk[r].form[f].layer->combine_backward(bf(rk[r].gy), rk[r].form[f].gw, rk[r].stream);
    for (int r = 0; r < R; ++r)
      rk[r].form[f].layer->experts_backward(rk[r].form[f].dw, rk[r].stream);
    for (int r = 0; r < R; ++r)
      rk[r].form[f].layer->dispatch_backward(bf(rk[r].form[f].gx), rk[r].stream);
  };
  const auto sync_all = [&](int f) {
    for (int r = 0; r < R; ++r) {
      FM_CHECK_CUDA(cudaSetDevice(rk[r].device));
      FM_CHECK_CUDA(cudaStreamSynchronize(rk[r].stream));
    }
    groups[f]->check();
  };
  // Warm-up, and the two forms' grad_x compared once (bit for bit: same bits by contract).
  for (int f = 0; f < 2; ++f) {
    forward_all(f);
    backward_all(f);
    sync_all(f);
  }
  for (int r = 0; r < R; ++r) {
    std::vector<uint16_t> g0(T * H), g1(T * H);
    FM_CHECK_CUDA(cudaSetDevice(rk[r].device));
    FM_CHECK_CUDA(cudaMemcpy(g0.data(), rk[r].form[0].gx, T * H * 2, cudaMemcpyDeviceToHost));
    FM_CHECK_CUDA(cudaMemcpy(g1.data(), rk[r].form[1].gx, T * H * 2, cudaMemcpyDeviceToHost));
    if (std::memcmp(g0.data(), g1.data(), g0.size() * 2) != 0) {
      std::fprintf(stderr, "moe_layer_bench: rank %d grad_x differs between the forms\n", r);
      return 1;
    }
  }
  // Ours as one graph per rank: forward + backward, the weight gradients accumulated (execs) or
  // written over (execs_over: MoeLayerGrads::overwrite, a step's first micro-batch).
  std::vector<cudaGraphExec_t> execs(R), execs_over(R);
  for (int r = 0; r < R; ++r) {
    Rank& k = rk[r];
    Rank::Form& q = k.form[1];
    FM_CHECK_CUDA(cudaSetDevice(k.device));
    for (const bool over : {false, true}) {
      MoeLayerGrads dw = q.dw;
      dw.overwrite = over;
      FM_CHECK_CUDA(cudaStreamBeginCapture(k.stream, cudaStreamCaptureModeThreadLocal));
      q.layer->forward(bf(k.x), k.idx, k.w, T, bf(q.y), k.stream);
      q.layer->backward(bf(k.gy), bf(q.gx), q.gw, dw, k.stream);
      cudaGraph_t graph;
      FM_CHECK_CUDA(cudaStreamEndCapture(k.stream, &graph));
      FM_CHECK_CUDA(cudaGraphInstantiate(over ? &execs_over[r] : &execs[r], graph, 0));
      FM_CHECK_CUDA(cudaGraphDestroy(graph));
    }
  }
  int* gate_flag = bench::alloc_gate_flag();
  int gate_value = 0;
  // The anchor's interval: events first on every rank, then the phases (the host waits inside).
  const auto ungated_us = [&](const std::function<void()>& enqueue) {
    for (auto& k : rk) {
      FM_CHECK_CUDA(cudaSetDevice(k.device));
      FM_CHECK_CUDA(cudaEventRecord(k.start, k.stream));
    }
    enqueue();
    double worst = 0;
    for (auto& k : rk) {
      FM_CHECK_CUDA(cudaSetDevice(k.device));
      FM_CHECK_CUDA(cudaEventRecord(k.end, k.stream));
      FM_CHECK_CUDA(cudaEventSynchronize(k.end));
      float ms = 0;
      FM_CHECK_CUDA(cudaEventElapsedTime(&ms, k.start, k.end));
      worst = std::max(worst, 1000.0 * ms);
    }
    return worst;
  };
  enum {
    kAnchorStep,
    kOursGraphStep,
    kOursEagerStep,
    kOursGraphOverStep,
    kAnchorFwd,
    kOursFwd,
    kOps
  };
  const char* names[kOps] = {"forward+backward", "forward+backward", "forward+backward",
                             "forward+backward", "forward",          "forward"};
  const char* impls[kOps] = {"host_counts",  "device_graph",
                             "device_eager", "device_graph_dw_overwrite",
                             "host_counts",  "device_eager"};
  std::vector<std::vector<double>> t(kOps);
  for (int it = 0; it < a.iters; ++it) {
    t[kAnchorStep].push_back(ungated_us([&] {
      forward_all(0);
      backward_all(0);
    }));
    sync_all(0);
    t[kOursGraphStep].push_back(bench::gated_slowest_us(rk, gate_flag, gate_value, true, [&] {
      for (int r = 0; r < R; ++r) {
        FM_CHECK_CUDA(cudaSetDevice(rk[r].device));
        FM_CHECK_CUDA(cudaGraphLaunch(execs[r], rk[r].stream));
      }
    }));
    sync_all(1);
    t[kOursGraphOverStep].push_back(bench::gated_slowest_us(rk, gate_flag, gate_value, true, [&] {
      for (int r = 0; r < R; ++r) {
        FM_CHECK_CUDA(cudaSetDevice(rk[r].device));
        FM_CHECK_CUDA(cudaGraphLaunch(execs_over[r], rk[r].stream));
      }
    }));
    sync_all(1);
    t[kOursEagerStep].push_back(bench::gated_slowest_us(rk, gate_flag, gate_value, true, [&] {
      forward_all(1);
      backward_all(1);
    }));
    sync_all(1);
    t[kAnchorFwd].push_back(
        bench::gated_slowest_us(rk, gate_flag, gate_value, true, [&] { forward_all(0); }));
    backward_all(0);  // every forward gets its backward (one backward per forward)
    sync_all(0);
    t[kOursFwd].push_back(
        bench::gated_slowest_us(rk, gate_flag, gate_value, true, [&] { forward_all(1); }));
    backward_all(1);
    sync_all(1);
  }
  std::FILE* out = a.out.empty() ? nullptr : std::fopen(a.out.c_str(), "w");
  FM_CHECK(a.out.empty() || out != nullptr, "moe_layer_bench: cannot write ", a.out);
  // GEMM work of the layer on one rank: routed rows T*K (on average per rank) and T shared rows,
  // 6 H I flops a row forward, twice that backward.
  const double fwd_flops = 6.0 * H * (double(T) * cfg.top_k * I + double(T) * Is);
  std::printf(
      "moe_layer_bench on %d x %s: %lld tokens a rank, hidden %lld, %d experts (%lld a "
      "rank, inter %lld), top-%d, shared inter %lld, rows bound %lld; median of %d\n",
      R, prop.name, static_cast<long long>(T), static_cast<long long>(H), cfg.num_experts,
      static_cast<long long>(L), static_cast<long long>(I), cfg.top_k, static_cast<long long>(Is),
      static_cast<long long>(cfg.max_rows), a.iters);
  std::printf("  %-18s %-26s %10s %9s %10s\n", "op", "impl", "us", "TFLOPS/GPU", "tokens/s/GPU");
  double med[kOps];
  for (int o = 0; o < kOps; ++o) {
    std::sort(t[o].begin(), t[o].end());
    med[o] = t[o][t[o].size() / 2];
    const double flops = o <= kOursGraphOverStep ? 3.0 * fwd_flops : fwd_flops;
    std::printf("  %-18s %-26s %10.1f %9.0f %10.0f\n", names[o], impls[o], med[o],
                flops / med[o] * 1e-6, double(T) / med[o] * 1e6);
    if (out != nullptr)
      std::fprintf(out,
                   "{\"bench\":\"moe_layer\",\"gpu\":\"%s\",\"gpus\":%d,\"date\":\"%s\","
                   "\"commit\":\"%s\",\"impl\":\"%s\",\"op\":\"%s\",\"tokens\":%lld,"
                   "\"hidden\":%lld,\"experts\":%d,\"topk\":%d,\"us\":%.1f,\"tflops\":%.1f,"
                   "\"tokens_per_s\":%.0f}\n",
                   prop.name, R, a.date.c_str(), a.commit.c_str(), impls[o], names[o],
                   static_cast<long long>(T), static_cast<long long>(H), cfg.num_experts, cfg.top_k,
                   med[o], flops / med[o] * 1e-6, double(T) / med[o] * 1e6);
  }
  std::printf(
      "  forward+backward: host_counts / device_graph %.3f, host_counts / device_eager "
      "%.3f; forward: host_counts / device %.3f\n",
      med[kAnchorStep] / med[kOursGraphStep], med[kAnchorStep] / med[kOursEagerStep],
      med[kAnchorFwd] / med[kOursFwd]);
  if (out != nullptr) std::fclose(out);
  for (auto e : execs) cudaGraphExecDestroy(e);
  for (auto e : execs_over) cudaGraphExecDestroy(e);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "moe_layer_bench: %s\n", e.what());
  return 1;
}
