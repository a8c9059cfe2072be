// One MoE layer's decoding step across EP ranks (comm/moe_layer_gpu.h: MoeLayerGpu; one process,
// one rank per GPU), two forms in one run, each captured as one CUDA graph per rank and replayed
// (the serving engine's form, serve/generator_gpu.h):
//   normal (the anchor: what decoding ran until session 26): the grouped layout, the EP kernels'
//     normal form (notify, chunked layout, expanded rows), a row bound sized for the prefill
//     passes the same endpoint serves (--normal-max-tokens a rank);
//   low latency (ours): the masked layout of low-latency mode (EpConfig::masked_capacity = ranks x
//     --ll-max-tokens rounded up to 128, so no expert overflows), the EP kernels' low-latency
//     form, the experts' GEMMs two ways (comm::MaskedExperts): the masked grouped GEMMs ("LL
//     masked", the library's kAuto pick) and the grouped-contiguous GEMMs over the masked layout's
//     row index ("LL contig").
// Each form is timed twice: the whole layer (dispatch, the routed experts and the shared expert,
// combine, the shared add) and its exchange alone (DeviceEpRank dispatch + combine of the layer's
// expert rows), so the table splits a step's MoE time into exchange and experts.
// Shapes (--shapes): small-gpu (hidden 1024, 16 experts of 256, top-4), v3-slice (7168, 32 of
// 2048, top-8), v3 (7168, 256 of 2048, top-8); one shared expert of the routed inter. Tokens a
// rank: --tokens (default 1,8,32,64,128), routing uniform random top-k of distinct experts.
// Timing: time = the slowest rank's device interval over --reps replays back to back, all ranks
// started together behind a gate kernel (bench/gpu/gated_timing.cuh), divided by reps; median of
// --iters, the forms interleaved. Correctness: test_comm_gpu --gtest_filter='MoeLayerApi*' (the
// masked layer equals the grouped one bit for bit); here each form's y is checked equal once.
// Run: moe_decode_bench [--shapes small-gpu,v3-slice,v3] [--tokens 1,8,32,64,128] [--iters 7]
//      [--reps 20] [--ll-max-tokens 128] [--normal-max-tokens 256] [--out f.jsonl] [--date D]
//      [--commit C] [--ranks R]   (R ranks on GPUs 0 .. R-1, one each; default: every visible
//      GPU; one rank is one GPU's serving, every expert local)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
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

struct Shape {
  std::string name;
  int64_t hidden, inter;
  int experts, top_k;
};

const Shape kShapes[] = {
    {"small-gpu", 1024, 256, 16, 4}, {"v3-slice", 7168, 2048, 32, 8}, {"v3", 7168, 2048, 256, 8}};

struct Args {
  std::string shapes = "small-gpu,v3-slice,v3", tokens = "1,8,32,64,128", out, date = "unknown",
              commit = "unknown";
  int iters = 7, reps = 20;
  int ranks = 0;  // 0: every visible GPU
  int64_t ll_max_tokens = 128, normal_max_tokens = 256;
};

struct Rank {
  int device = 0;
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, end = nullptr;
  std::unique_ptr<DeviceWeights> routed, shared;
  uint16_t* x = nullptr;
  int32_t* idx = nullptr;
  float* w = nullptr;
  uint16_t* y[3] = {nullptr, nullptr, nullptr};
  // [0] normal, [1] low latency with the masked GEMMs, [2] with the contiguous GEMMs
  std::unique_ptr<MoeLayerGpu> layer[3];
  cudaGraphExec_t graph[3][2] = {};  // [form][0 layer, 1 exchange]
};

// One graph per rank of `enqueue(r)` on rank r's stream.
template <class Fn>
void capture(std::vector<Rank>& rk, int form, int what, Fn enqueue) {
  for (size_t r = 0; r < rk.size(); ++r) {
    FM_CHECK_CUDA(cudaSetDevice(rk[r].device));
    FM_CHECK_CUDA(cudaStreamBeginCapture(rk[r].stream, cudaStreamCaptureModeThreadLocal));
    enqueue(r);
    cudaGraph_t g;
    FM_CHECK_CUDA(cudaStreamEndCapture(rk[r].stream, &g));
    if (rk[r].graph[form][what] != nullptr) cudaGraphExecDestroy(rk[r].graph[form][what]);
    FM_CHECK_CUDA(cudaGraphInstantiate(&rk[r].graph[form][what], g, 0));
    FM_CHECK_CUDA(cudaGraphDestroy(g));
  }
}

}  // namespace

int main(int argc, char** argv) try {
  Args a;
  const auto set_i64 = [](int64_t& v) { return [&v](const std::string& s) { v = std::stoll(s); }; };
  bench::parse_flags(argc, argv, "moe_decode_bench",
                     {{"--shapes", [&](const std::string& v) { a.shapes = v; }},
                      {"--tokens", [&](const std::string& v) { a.tokens = v; }},
                      {"--iters", [&](const std::string& v) { a.iters = std::stoi(v); }},
                      {"--reps", [&](const std::string& v) { a.reps = std::stoi(v); }},
                      {"--ll-max-tokens", set_i64(a.ll_max_tokens)},
                      {"--normal-max-tokens", set_i64(a.normal_max_tokens)},
                      {"--out", [&](const std::string& v) { a.out = v; }},
                      {"--date", [&](const std::string& v) { a.date = v; }},
                      {"--commit", [&](const std::string& v) { a.commit = v; }},
                      {"--ranks", [&](const std::string& v) { a.ranks = std::stoi(v); }}});
  FM_CHECK_ARG(a.iters >= 1 && a.reps >= 1 && a.ranks >= 0,
               "moe_decode_bench: --iters and --reps must be >= 1, --ranks >= 0");
  std::vector<int64_t> tokens;
  for (const std::string& t : split_list(a.tokens)) tokens.push_back(std::stoll(t));
  for (int64_t t : tokens)
    FM_CHECK_ARG(t >= 1 && t <= a.ll_max_tokens && t <= a.normal_max_tokens,
                 "moe_decode_bench: --tokens ", t,
                 " outside [1, min(--ll-max-tokens, "
                 "--normal-max-tokens)]");
  int gpus = 0;
  if (cudaGetDeviceCount(&gpus) != cudaSuccess || gpus < 1) {
    std::fprintf(stderr, "moe_decode_bench: no GPU\n");
    return 77;
  }
  FM_CHECK_ARG(a.ranks <= gpus, "moe_decode_bench: --ranks ", a.ranks, " but ", gpus,
               " GPUs visible (one rank a GPU)");
  const int R = a.ranks > 0 ? a.ranks : gpus;
  std::vector<int> devices(R);
  for (int r = 0; r < R; ++r) devices[r] = r;
  cudaDeviceProp prop{};
  FM_CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  FILE* f = a.out.empty() ? nullptr : std::fopen(a.out.c_str(), "a");
  int* gate = alloc_gate_flag();
  int gate_value = 0;
  std::printf("%-10s %5s %6s %10s %10s %10s %8s %8s %10s %8s %10s %10s %10s %5s\n", "shape",
              "ranks", "tokens", "normal us", "LL masked", "LL contig", "x", "x", "normal EP",
              "LL EP", "normal rest", "masked rest", "contig rest", "auto");
  for (const std::string& shape_name : split_list(a.shapes)) {
    const Shape* sh = nullptr;
    for (const Shape& s : kShapes)
      if (s.name == shape_name) sh = &s;
    FM_CHECK_ARG(sh != nullptr, "moe_decode_bench: unknown shape '", shape_name, "'");
    const int64_t H = sh->hidden, I = sh->inter,
                  Tmax = std::max(a.ll_max_tokens, a.normal_max_tokens);
    EpConfig cfg[2];
    cfg[0].num_ranks = R;
    cfg[0].num_experts = sh->experts;
    cfg[0].top_k = sh->top_k;
    cfg[0].hidden = H;
    cfg[0].payload = Payload::kFP8;
    cfg[0].timeout_s = 60.0;
    cfg[1] = cfg[0];
    cfg[0].max_tokens_per_rank = a.normal_max_tokens;
    cfg[1].max_tokens_per_rank = a.ll_max_tokens;
    cfg[1].masked_capacity = (R * a.ll_max_tokens + 127) / 128 * 128;
    const int64_t L = cfg[0].experts_per_rank();
    DeviceEpGroup normal_group(cfg[0], devices), ll_group(cfg[1], devices);
    DeviceEpGroup* groups[3] = {&normal_group, &ll_group, &ll_group};
    std::vector<Rank> rk(R);
    for (int r = 0; r < R; ++r) {
      Rank& k = rk[r];
      k.device = devices[r];
      FM_CHECK_CUDA(cudaSetDevice(k.device));
      create_timed_stream(k);
      k.routed = std::make_unique<DeviceWeights>(L, H, I, 100 + 10 * r, k.stream);
      k.shared = std::make_unique<DeviceWeights>(1, H, I, 900 + 10 * r, k.stream);
      k.x = device_alloc<uint16_t>(Tmax * H);
      fill_bf16_kernel<<<kFillBlocks, 256, 0, k.stream>>>(k.x, Tmax * H, 7 + r);
      FM_CHECK_LAUNCH();
      std::vector<int32_t> idx;
      std::vector<float> w;
      random_topk(Tmax, sh->top_k, sh->experts, 4321, static_cast<uint64_t>(r), idx, w);
      k.idx = device_alloc<int32_t>(idx.size());
      k.w = device_alloc<float>(w.size());
      FM_CHECK_CUDA(cudaMemcpy(k.idx, idx.data(), idx.size() * 4, cudaMemcpyHostToDevice));
      FM_CHECK_CUDA(cudaMemcpy(k.w, w.data(), w.size() * 4, cudaMemcpyHostToDevice));
      for (int form = 0; form < 3; ++form) {
        MoeLayerOptions lo;
        if (form > 0)
          lo.masked_experts =
              form == 1 ? MaskedExperts::kMaskedGemm : MaskedExperts::kContiguousGemm;
        k.layer[form] = std::make_unique<MoeLayerGpu>(groups[form]->rank(r), k.routed->view,
                                                      k.shared->view, lo);
        k.y[form] = device_alloc<uint16_t>(Tmax * H);
      }
      FM_CHECK_CUDA(cudaStreamSynchronize(k.stream));
    }
    auto bf = [](uint16_t* p) { return reinterpret_cast<bf16*>(p); };
    for (const int64_t T : tokens) {
      // Eager once (lazy set-up outside the captures), y compared across the forms.
      for (int form = 0; form < 3; ++form) {
        for (int r = 0; r < R; ++r)
          rk[r].layer[form]->forward(bf(rk[r].x), rk[r].idx, rk[r].w, T, bf(rk[r].y[form]),
                                     rk[r].stream);
        for (int r = 0; r < R; ++r) {
          FM_CHECK_CUDA(cudaSetDevice(rk[r].device));
          FM_CHECK_CUDA(cudaStreamSynchronize(rk[r].stream));
        }
        groups[form]->check();
      }
      for (int r = 0; r < R; ++r) {
        std::vector<uint16_t> y0(T * H), y1(T * H);
        FM_CHECK_CUDA(cudaSetDevice(rk[r].device));
        FM_CHECK_CUDA(cudaMemcpy(y0.data(), rk[r].y[0], T * H * 2, cudaMemcpyDeviceToHost));
        for (int form = 1; form < 3; ++form) {
          FM_CHECK_CUDA(cudaMemcpy(y1.data(), rk[r].y[form], T * H * 2, cudaMemcpyDeviceToHost));
          FM_CHECK(y0 == y1, "moe_decode_bench: ", sh->name, " tokens ", T, " rank ", r,
                   ": the low-latency layer's y (form ", form, ") differs from the normal one's");
        }
      }
      for (int form = 0; form < 3; ++form) {
        capture(rk, form, 0, [&](size_t r) {
          rk[r].layer[form]->forward(bf(rk[r].x), rk[r].idx, rk[r].w, T, bf(rk[r].y[form]),
                                     rk[r].stream);
        });
        capture(rk, form, 1, [&](size_t r) {
          DeviceEpRank& ep = rk[r].layer[form]->ep();
          ep.dispatch_send({T, rk[r].x, rk[r].idx, rk[r].w}, rk[r].stream);
          ep.dispatch_recv(rk[r].stream);
          ep.combine_send(reinterpret_cast<const uint16_t*>(rk[r].layer[form]->expert_rows()),
                          rk[r].stream);
          ep.combine_recv(rk[r].y[form], rk[r].stream);
        });
      }
      std::vector<double> us[3][2];
      for (int it = 0; it < a.iters + 1; ++it)
        for (int form = 0; form < 3; ++form)
          for (int what = 0; what < 2; ++what) {
            const double t = gated_slowest_us(rk, gate, gate_value, true, [&] {
              for (int rep = 0; rep < a.reps; ++rep)
                for (int r = 0; r < R; ++r) {
                  FM_CHECK_CUDA(cudaSetDevice(rk[r].device));
                  FM_CHECK_CUDA(cudaGraphLaunch(rk[r].graph[form][what], rk[r].stream));
                }
            });
            if (it > 0) us[form][what].push_back(t / a.reps);  // the first: warm-up
          }
      for (int form = 0; form < 3; ++form) groups[form]->check();
      double med[3][2];
      for (int form = 0; form < 3; ++form)
        for (int what = 0; what < 2; ++what) {
          std::vector<double>& v = us[form][what];
          std::sort(v.begin(), v.end());
          med[form][what] = v[v.size() / 2];
        }
      const int pick = 1;  // kAuto: the masked GEMMs
      std::printf(
          "%-10s %5d %6lld %10.1f %10.1f %10.1f %7.3fx %7.3fx %10.1f %8.1f %10.1f %10.1f %10.1f "
          "%5s\n",
          sh->name.c_str(), R, static_cast<long long>(T), med[0][0], med[1][0], med[2][0],
          med[0][0] / med[1][0], med[0][0] / med[2][0], med[0][1], med[1][1], med[0][0] - med[0][1],
          med[1][0] - med[1][1], med[2][0] - med[2][1], pick == 2 ? "contig" : "masked");
      const char* impls[3] = {"fp8moe_normal", "fp8moe_low_latency_masked_gemm",
                              "fp8moe_low_latency_contiguous_gemm"};
      for (int form = 2; form >= 0 && f != nullptr; --form)
        std::fprintf(f,
                     "{\"bench\":\"moe_decode\",\"gpu\":\"%s\",\"gpus\":%d,\"date\":\"%s\","
                     "\"commit\":\"%s\",\"impl\":\"%s\",\"shape\":\"%s\",\"tokens_per_rank\":%lld,"
                     "\"hidden\":%lld,\"experts\":%d,\"top_k\":%d,\"inter\":%lld,"
                     "\"max_tokens_per_rank\":%lld,\"reps\":%d,\"iters\":%d,\"us\":%.2f,"
                     "\"exchange_us\":%.2f,\"speedup_vs_normal\":%.4f,\"auto_pick\":%s}\n",
                     prop.name, R, a.date.c_str(), a.commit.c_str(), impls[form], sh->name.c_str(),
                     static_cast<long long>(T), static_cast<long long>(H), sh->experts, sh->top_k,
                     static_cast<long long>(I),
                     static_cast<long long>(form > 0 ? a.ll_max_tokens : a.normal_max_tokens),
                     a.reps, a.iters, med[form][0], med[form][1], med[0][0] / med[form][0],
                     form == pick ? "true" : "false");
    }
    for (Rank& k : rk) {
      FM_CHECK_CUDA(cudaSetDevice(k.device));
      FM_CHECK_CUDA(cudaStreamSynchronize(k.stream));
      for (auto& form : k.graph)
        for (cudaGraphExec_t g : form)
          if (g != nullptr) cudaGraphExecDestroy(g);
      for (auto& layer : k.layer) layer.reset();
      for (void* p :
           {static_cast<void*>(k.x), static_cast<void*>(k.idx), static_cast<void*>(k.w),
            static_cast<void*>(k.y[0]), static_cast<void*>(k.y[1]), static_cast<void*>(k.y[2])})
        cudaFree(p);
      k.routed.reset();
      k.shared.reset();
      cudaStreamDestroy(k.stream);
      cudaEventDestroy(k.start);
      cudaEventDestroy(k.end);
    }
  }
  cudaFreeHost(gate);
  if (f != nullptr) std::fclose(f);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "moe_decode_bench: %s\n", e.what());
  return 1;
}
