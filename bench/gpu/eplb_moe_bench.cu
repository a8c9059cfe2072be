// Redundant experts where they pay: one DeepSeekMoE layer's forward across EP ranks (one process,
// one rank per visible GPU; comm/moe_layer_gpu.h: MoeLayerGpu) at DeepSeek-V3's prefill shape
// (4096 tokens a rank, hidden 7168, 256 routed experts of inter 2048, top-8, one shared expert),
// with skewed routing, two placements in one run:
//   plain (the anchor): expert e on rank e / (E / R), as every rank holds E / R experts;
//   eplb (ours): --redundant extra slots (V3's prefill: 32), placed by EPLB (eplb/eplb.h, the
//     global policy over R GPUs) from the counts of an earlier sample of the same traffic; each
//     token's experts mapped to replicas by map_to_physical_cuda (moe/expert_placement_cuda.h).
// Routing: each token draws top-8 distinct experts with probability proportional to
// (1 + popularity rank)^-zipf over a random order of the experts (--zipf 0: uniform); gate weights
// in [0.05, 0.3]. Rows give, per placement, the tokens-times-experts rows each GPU computes (max
// over mean) and the forward's time (the slowest rank's device interval, all ranks started
// together behind a gate: bench/gpu/gated_timing.cuh), median of --iters, the placements
// interleaved; and the ratio plain / eplb. Weights are random E4M3 codes (values do not matter to
// the times). Correctness: test_moe_gpu (the map), test_serve_gpu (RedundantExperts).
// Run: eplb_moe_bench [--zipf 1.0] [--redundant 32] [--tokens 4096] [--iters 10]
//      [--out f.jsonl] [--date D] [--commit C]   (needs >= 2 GPUs; every visible GPU is one rank)
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "bench_args.h"
#include "fp8moe/comm/device_ep.h"
#include "fp8moe/comm/ep.h"
#include "fp8moe/comm/moe_layer_gpu.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/eplb/eplb.h"
#include "fp8moe/moe/expert_placement.h"
#include "fp8moe/moe/expert_placement_cuda.h"
#include "gated_timing.cuh"
#include "random_expert_weights.cuh"

namespace {

using namespace fp8moe;
using namespace fp8moe::comm;
using namespace fp8moe::bench;

struct Args {
  std::string out, date = "unknown", commit = "unknown";
  int iters = 10, redundant = 32;
  int64_t tokens = 4096;
  double zipf = 1.0;
};

// Top-k distinct experts a token, drawn with probability p (normalised), k times without
// replacement; gate weights in [0.05, 0.3].
void draw_routing(const std::vector<double>& p, int64_t tokens, int k, uint64_t seed, int stream,
                  std::vector<int32_t>* idx, std::vector<float>* w) {
  const int E = static_cast<int>(p.size());
  idx->assign(static_cast<size_t>(tokens * k), -1);
  w->assign(idx->size(), 0.0f);
  PhiloxStream rng(seed, static_cast<uint64_t>(stream));
  std::vector<char> taken(static_cast<size_t>(E));
  for (int64_t t = 0; t < tokens; ++t) {
    std::fill(taken.begin(), taken.end(), 0);
    double left = 1.0;
    for (int j = 0; j < k; ++j) {
      double u = rng.uniform() * left;
      int e = 0;
      for (; e < E - 1; ++e) {
        if (taken[e]) continue;
        if ((u -= p[e]) < 0) break;
      }
      while (taken[e]) --e;  // rounding at the end of the range
      taken[e] = 1;
      left -= p[e];
      (*idx)[t * k + j] = e;
      (*w)[t * k + j] = 0.05f + 0.25f * rng.uniform();
    }
  }
}

struct Rank {
  int device = 0;
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, end = nullptr;
  uint16_t *x = nullptr, *y = nullptr;
  float* w = nullptr;
  int32_t* idx[2] = {nullptr, nullptr};  // [0] logical (plain), [1] the eplb slots
  std::unique_ptr<DeviceWeights> routed[2], shared;
  std::unique_ptr<MoeLayerGpu> layer[2];
};

// The rows each rank's experts compute for the routings idx_all (ids of `experts` slots, placed
// contiguously over R ranks).
std::vector<int64_t> rank_rows(const std::vector<std::vector<int32_t>>& idx_all, int experts,
                               int R) {
  std::vector<int64_t> rows(static_cast<size_t>(R), 0);
  for (const auto& idx : idx_all)
    for (int32_t e : idx)
      if (e >= 0) ++rows[static_cast<size_t>(e / (experts / R))];
  return rows;
}

}  // namespace

int main(int argc, char** argv) try {
  Args a;
  bench::parse_flags(argc, argv, "eplb_moe_bench",
                     {{"--out", [&](const std::string& v) { a.out = v; }},
                      {"--iters", [&](const std::string& v) { a.iters = std::stoi(v); }},
                      {"--tokens", [&](const std::string& v) { a.tokens = std::stoll(v); }},
                      {"--redundant", [&](const std::string& v) { a.redundant = std::stoi(v); }},
                      {"--zipf", [&](const std::string& v) { a.zipf = std::stod(v); }},
                      {"--date", [&](const std::string& v) { a.date = v; }},
                      {"--commit", [&](const std::string& v) { a.commit = v; }}});
  FM_CHECK_ARG(a.iters >= 1 && a.tokens >= 1 && a.redundant >= 0 && a.zipf >= 0,
               "eplb_moe_bench: --iters, --tokens >= 1, --redundant, --zipf >= 0");
  int gpus = 0;
  if (cudaGetDeviceCount(&gpus) != cudaSuccess || gpus < 2) {
    std::fprintf(stderr, "eplb_moe_bench: needs >= 2 GPUs (one rank each)\n");
    return 77;
  }
  const int R = gpus, E = 256, K = 8;
  const int64_t T = a.tokens, H = 7168, I = 2048, Is = 2048;
  const int P = E + a.redundant;
  FM_CHECK_ARG(E % R == 0 && P % R == 0, "eplb_moe_bench: ", E, " experts and ", P,
               " slots must split over ", R, " GPUs");

  // Popularity: Zipf over a random order of the experts.
  std::vector<double> p(E);
  {
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    PhiloxStream rng(4242, 0);
    for (int i = E - 1; i > 0; --i) std::swap(order[i], order[rng.next_u32() % (i + 1)]);
    for (int i = 0; i < E; ++i) p[order[i]] = std::pow(1.0 + i, -a.zipf);
    const double sum = std::accumulate(p.begin(), p.end(), 0.0);
    for (double& v : p) v /= sum;
  }
  // EPLB's plan from an earlier sample of the same traffic (other tokens).
  std::vector<float> observed(E, 0.0f);
  {
    std::vector<int32_t> idx;
    std::vector<float> w;
    for (int r = 0; r < R; ++r) {
      draw_routing(p, T, K, 777, r, &idx, &w);
      for (int32_t e : idx) observed[static_cast<size_t>(e)] += 1.0f;
    }
  }
  eplb::Problem problem;
  problem.num_layers = 1;
  problem.num_experts = E;
  problem.weight = observed;
  problem.num_replicas = P;
  problem.num_gpus = R;
  const eplb::Plan plan = eplb::rebalance_experts(problem);
  const ExpertPlacement placement = ExpertPlacement::from_phy2log(E, plan.phy2log);

  // The timed traffic, logical and mapped to slots (positions: the token's index in the job).
  std::vector<std::vector<int32_t>> logical(R), physical(R);
  std::vector<std::vector<float>> gate(R);
  for (int r = 0; r < R; ++r) {
    draw_routing(p, T, K, 1234, r, &logical[r], &gate[r]);
    std::vector<int32_t> pos(static_cast<size_t>(T));
    std::iota(pos.begin(), pos.end(), static_cast<int32_t>(r * T));
    physical[r].resize(logical[r].size());
    map_to_physical_reference(placement, logical[r].data(), pos.data(), T, K, physical[r].data());
  }
  const std::vector<int64_t> rows[2] = {rank_rows(logical, E, R), rank_rows(physical, P, R)};
  const int slots[2] = {E, P};
  EpConfig cfg[2];
  std::unique_ptr<DeviceEpGroup> group[2];
  std::vector<int> devices(R);
  std::iota(devices.begin(), devices.end(), 0);
  for (int f = 0; f < 2; ++f) {
    cfg[f].num_ranks = R;
    cfg[f].num_experts = slots[f];
    cfg[f].top_k = K;
    cfg[f].hidden = H;
    cfg[f].max_tokens_per_rank = T;
    cfg[f].payload = Payload::kFP8;
    cfg[f].timeout_s = 60.0;
    const int64_t L = cfg[f].experts_per_rank();
    cfg[f].max_rows =
        (*std::max_element(rows[f].begin(), rows[f].end()) + L * 128 + 127) / 128 * 128;
    group[f] = std::make_unique<DeviceEpGroup>(cfg[f], devices, DeviceEpOptions{});
  }

  std::vector<Rank> rk(R);
  cudaDeviceProp prop{};
  FM_CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  for (int r = 0; r < R; ++r) {
    Rank& k = rk[r];
    k.device = devices[r];
    FM_CHECK_CUDA(cudaSetDevice(k.device));
    bench::create_timed_stream(k);
    k.x = device_alloc<uint16_t>(T * H);
    k.y = device_alloc<uint16_t>(T * H);
    fill_bf16_kernel<<<kFillBlocks, 256, 0, k.stream>>>(k.x, T * H, 7 + r);
    FM_CHECK_LAUNCH();
    k.w = device_alloc<float>(T * K);
    FM_CHECK_CUDA(cudaMemcpy(k.w, gate[r].data(), T * K * 4, cudaMemcpyHostToDevice));
    k.shared = std::make_unique<DeviceWeights>(1, H, Is, 900 + 10 * r, k.stream);
    for (int f = 0; f < 2; ++f) {
      const std::vector<int32_t>& ids = f == 0 ? logical[r] : physical[r];
      k.idx[f] = device_alloc<int32_t>(T * K);
      FM_CHECK_CUDA(cudaMemcpy(k.idx[f], ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
      k.routed[f] = std::make_unique<DeviceWeights>(cfg[f].experts_per_rank(), H, I,
                                                    100 + 10 * r + f, k.stream);
      k.layer[f] = std::make_unique<MoeLayerGpu>(group[f]->rank(r), k.routed[f]->view,
                                                 k.shared->view, MoeLayerOptions{});
    }
    FM_CHECK_CUDA(cudaStreamSynchronize(k.stream));
  }
  auto bf = [](uint16_t* q) { return reinterpret_cast<bf16*>(q); };
  const auto forward_all = [&](int f) {
    for (int r = 0; r < R; ++r) {
      FM_CHECK_CUDA(cudaSetDevice(rk[r].device));
      rk[r].layer[f]->forward(bf(rk[r].x), rk[r].idx[f], rk[r].w, T, bf(rk[r].y), rk[r].stream);
    }
  };
  const auto sync_all = [&](int f) {
    for (int r = 0; r < R; ++r) {
      FM_CHECK_CUDA(cudaSetDevice(rk[r].device));
      FM_CHECK_CUDA(cudaStreamSynchronize(rk[r].stream));
    }
    group[f]->check();
  };
  for (int f = 0; f < 2; ++f) {  // warm-up
    forward_all(f);
    sync_all(f);
  }
  int* gate_flag = bench::alloc_gate_flag();
  int gate_value = 0;
  std::vector<double> t[2];
  for (int it = 0; it < a.iters; ++it)
    for (int f = 0; f < 2; ++f) {
      t[f].push_back(
          bench::gated_slowest_us(rk, gate_flag, gate_value, true, [&] { forward_all(f); }));
      sync_all(f);
    }
  const char* impls[2] = {"plain", "eplb"};
  double med[2], imbalance[2];
  for (int f = 0; f < 2; ++f) {
    std::sort(t[f].begin(), t[f].end());
    med[f] = t[f][t[f].size() / 2];
    const double mean =
        std::accumulate(rows[f].begin(), rows[f].end(), 0.0) / static_cast<double>(R);
    imbalance[f] = static_cast<double>(*std::max_element(rows[f].begin(), rows[f].end())) / mean;
  }
  // The routed and shared GEMM work of the layer a rank on average: 6 H I flops a row.
  const double flops = 6.0 * H * (double(T) * K * I + double(T) * Is);
  std::printf(
      "eplb_moe_bench on %d x %s: %lld tokens a rank, hidden %lld, %d experts (inter %lld), "
      "top-%d, shared inter %lld; zipf %.2f; eplb: %d slots (%d redundant, the most copies of "
      "one expert %d); median of %d\n",
      R, prop.name, static_cast<long long>(T), static_cast<long long>(H), E,
      static_cast<long long>(I), K, static_cast<long long>(Is), a.zipf, P, a.redundant,
      placement.max_replicas(), a.iters);
  std::printf("  %-8s %6s %14s %10s %10s %9s\n", "impl", "slots", "rows max/mean", "us",
              "TFLOPS/GPU", "vs plain");
  std::FILE* out = a.out.empty() ? nullptr : std::fopen(a.out.c_str(), "a");
  FM_CHECK(a.out.empty() || out != nullptr, "eplb_moe_bench: cannot write ", a.out);
  for (int f = 0; f < 2; ++f) {
    std::printf("  %-8s %6d %14.3f %10.1f %10.0f %8.3fx\n", impls[f], slots[f], imbalance[f],
                med[f], flops / med[f] * 1e-6, med[0] / med[f]);
    if (out != nullptr)
      std::fprintf(out,
                   "{\"bench\":\"eplb_moe\",\"gpu\":\"%s\",\"gpus\":%d,\"date\":\"%s\","
                   "\"commit\":\"%s\",\"impl\":\"%s\",\"op\":\"forward\",\"tokens\":%lld,"
                   "\"hidden\":%lld,\"experts\":%d,\"slots\":%d,\"topk\":%d,\"zipf\":%.3f,"
                   "\"rows_max_over_mean\":%.4f,\"us\":%.1f,\"tflops\":%.1f,"
                   "\"speedup_vs_plain\":%.4f}\n",
                   prop.name, R, a.date.c_str(), a.commit.c_str(), impls[f],
                   static_cast<long long>(T), static_cast<long long>(H), E, slots[f], K, a.zipf,
                   imbalance[f], med[f], flops / med[f] * 1e-6, med[0] / med[f]);
  }
  if (out != nullptr) std::fclose(out);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "eplb_moe_bench: %s\n", e.what());
  return 1;
}
