// Expert-parallel dispatch/combine benchmark: our device back end (NVLink kernels, and the same
// kernels over the NCCL wire) against NCCL all-to-all of the same bytes and the raw peer copy
// (cudaMemcpyPeerAsync), all in one run. Every rank starts each timed iteration together (a gate
// kernel released from the host once everything is enqueued); time = the slowest rank's
// device-event interval; median of --iters. GB/s as DeepEP reports it: bytes a rank receives
// (dispatch: one record per received token, itself included; combine: the same tokens in BF16)
// over the time. Dispatch results are checked bit for bit against dispatch_reference. Ops:
// dispatch (expanded into the grouped layout), dispatch_layout_only (expand_payload off),
// combine (the expert rows summed with their gate weights and sent back), combine_tokens (one
// BF16 row per received token sent back and summed, after the layout-only dispatch: the bytes
// NCCL's combine anchor moves).
// Run: ep_bench --out ep.jsonl [--ranks-per-gpu 2] [--blocks 32,48 --chunks 16,32 ...]
// (one JSON object per line, a table on stdout, a summary of the best variants last).
// A/B of kernel variants: ep_bench --ab base,PC,PCB --ab-rounds 3 (each variant timed every
// round, order rotating, normal and low-latency FP8 with NCCL and the peer copy of the same run;
// names: parse_variant); --ab-plan 3 = --ab v5,base --ab-rounds 3. The sweep with a variant's
// options: --variant base (default: DeviceEpOptions' defaults). Under a profiler:
// ep_bench --ncu --iters 1 --warmup 0 --blocks 64 --chunks 16 [--plan-once] (no gate kernel, which
// a serialising profiler would never see released; normal FP8 dispatch and combine only).
// A/B of the low-latency path: ep_bench --ab-ll 4 [--ll-blocks 32] (the low-latency shape only:
// the normal kernels with the masked layout vs the low-latency kernels, alternated per round,
// dispatch and combine checked bit for bit against the reference, NCCL and the peer copy of the
// same run; "# ab_ll" lines give the medians; --ll-cap N sets its masked capacity, --ll-no-expand
// times the layout-only dispatch). --ll-variants old,new,0,0N,0T times the low-latency options
// too (ll_variant_options; "# ab_ll_var" lines, each against the first; letters N, X, O, T, 0, H
// and the suffixes :bN / :rN for a path's send / receive grids; --ll-graph N also times N
// rounds of dispatch + combine replayed from one graph per rank, ours and NCCL's alike,
// "# ll_graph" lines).
// The normal mode replayed from CUDA graphs: --graph N (after the eager rows of the sweep, or of
// the --ab variants) times N rounds per graph of each op (layout-only dispatch, combine_tokens,
// dispatch, combine; NCCL's all-to-alls of the same bytes beside them), each graph's output
// checked once; rows with note "graph_rounds=N ...", and a "# summary, graph replays" block.
// Cross-node form: ep_bench --gpus-per-node G [--ranks-per-gpu G] (nodes of G ranks, rank r on
// GPU r / ranks-per-gpu): the two-stage route with the network hop over NVLink stores and over
// NCCL against the direct route, side by side, normal FP8 dispatch and BF16 combine; rows add
// "gpus_per_node" and "rdma_gbps" (bytes a rank receives from other nodes, each token once per
// node, over the time: DeepEP's internode "RDMA" figure). It ends with a "# cross-node summary"
// block: a line per route, the anchors, and a short JSON object per row (what
// scripts/comm/ep_device_suite.sh prints). Any checked result that differs from the reference
// (a MISMATCH row) makes ep_bench exit 1 after printing everything.
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "fp8moe/comm/device_ep.h"
#include "fp8moe/comm/ep.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/codec.h"
#include "gated_timing.cuh"

#if defined(FP8MOE_HAVE_NCCL)
#include <nccl.h>
#define BENCH_NCCL(call)                                                       \
  do {                                                                         \
    const ncclResult_t st_ = (call);                                           \
    if (st_ != ncclSuccess)                                                    \
      FM_THROW(fp8moe::ErrorKind::kNccl, #call ": ", ncclGetErrorString(st_)); \
  } while (0)
#endif

namespace {

using namespace fp8moe;
using namespace fp8moe::comm;

struct Options {
  int64_t tokens = 4096, hidden = 7168, ll_tokens = 128;
  int experts = 256, topk = 8, ranks_per_gpu = 1, iters = 20, warmup = 3;
  std::vector<int> blocks = {48, 64, 80};
  std::vector<int> ll_blocks = {32, 64};
  std::vector<int> chunks = {16, 32};
  std::vector<int> ll_chunks = {2, 4};
  int recv_blocks = 0;  // 0 = DeviceEpOptions' automatic size
  bool overlap = true;
  bool plan_once = true;  // DeviceEpOptions::plan_once for the sweep (--plan-per-block: off)
  int ab_ll = 0;          // rounds of the low-latency A/B (0: the usual sweep)
  int ll_graph = 0;       // --ll-graph N: the A/B also times N rounds captured in one graph
  int graph = 0;          // --graph N: the normal mode's ops also as graphs of N rounds (gr1)
  bool ll_expand = true;  // --ll-no-expand: the A/B's dispatch builds the layout only
  int64_t ll_cap = 0;     // --ll-cap: masked capacity of the A/B (0: ranks x ll_tokens)
  // --ll-variants: the A/B's paths (ll_variant_options): "old", "new", or letters of the
  // low-latency options on top of "new" (N X O T; 0 turns all four off; H, R, W, D, F, G, Z, V:
  // options off by default), e.g. old,new,0,0N,0T,newR,newFG.
  std::vector<std::string> ll_variants = {"old", "new"};
  std::string variant = "default";       // the sweep's kernel variant (bench_ab's names; --variant)
  int ab_rounds = 0;                     // rounds of the variant A/B (0: the usual sweep)
  std::vector<std::string> ab_variants;  // bench_ab's variants (the first is the baseline)
  bool ncu = false;
  std::string out, commit = "unknown", date = "unknown";
  bool check = true;
  int gpus_per_node = 0;  // > 0: the cross-node comparison (run_xnode) instead of the sweep
};

std::vector<int> parse_list(const char* s) {
  std::vector<int> v;
  for (const char* p = s; *p;) {
    v.push_back(std::atoi(p));
    while (*p && *p != ',') ++p;
    if (*p) ++p;
  }
  return v;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "ep_bench: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--tokens")
      o.tokens = std::atoll(next());
    else if (a == "--hidden")
      o.hidden = std::atoll(next());
    else if (a == "--ll-tokens")
      o.ll_tokens = std::atoll(next());
    else if (a == "--experts")
      o.experts = std::atoi(next());
    else if (a == "--topk")
      o.topk = std::atoi(next());
    else if (a == "--ranks-per-gpu")
      o.ranks_per_gpu = std::atoi(next());
    else if (a == "--gpus-per-node")
      o.gpus_per_node = std::atoi(next());
    else if (a == "--iters")
      o.iters = std::atoi(next());
    else if (a == "--blocks")
      o.blocks = parse_list(next());
    else if (a == "--ll-blocks")
      o.ll_blocks = parse_list(next());
    else if (a == "--chunks")
      o.chunks = parse_list(next());
    else if (a == "--ll-chunks")
      o.ll_chunks = parse_list(next());
    else if (a == "--recv-blocks")
      o.recv_blocks = std::atoi(next());
    else if (a == "--no-overlap")
      o.overlap = false;
    else if (a == "--plan-once")
      o.plan_once = true;
    else if (a == "--plan-per-block")
      o.plan_once = false;
    else if (a == "--ll-cap")
      o.ll_cap = std::atoll(next());
    else if (a == "--ll-no-expand")
      o.ll_expand = false;
    else if (a == "--ab-ll")
      o.ab_ll = std::atoi(next());
    else if (a == "--ll-graph")
      o.ll_graph = std::atoi(next());
    else if (a == "--graph")
      o.graph = std::atoi(next());
    else if (a == "--ll-variants") {
      o.ll_variants.clear();
      for (std::string l = next(); !l.empty();) {
        const size_t comma = l.find(',');
        const std::string name = l.substr(0, comma);
        const std::string base = name.substr(0, name.find(':'));  // ":bN" / ":rN" suffixes
        const std::string letters = base.rfind("new", 0) == 0 ? base.substr(3) : base;
        if (base != "old" && letters.find_first_not_of("NXOTHRWA0DFGZUVSIB") != std::string::npos) {
          std::fprintf(
              stderr,
              "ep_bench: --ll-variants: '%s' is not old, new or letters NXOTHRWA0DFGZUVSIB\n",
              name.c_str());
          std::exit(2);
        }
        o.ll_variants.push_back(name);
        l = comma == std::string::npos ? "" : l.substr(comma + 1);
      }
    } else if (a == "--ab-plan") {
      o.ab_rounds = std::atoi(next());
      o.ab_variants = {"v5", "base"};
    } else if (a == "--ab") {
      o.ab_variants.clear();
      for (std::string l = next(); !l.empty();) {
        const size_t comma = l.find(',');
        o.ab_variants.push_back(l.substr(0, comma));
        l = comma == std::string::npos ? "" : l.substr(comma + 1);
      }
    } else if (a == "--ab-rounds")
      o.ab_rounds = std::atoi(next());  // --ab without it: 3 rounds
    else if (a == "--variant")
      o.variant = next();
    else if (a == "--ncu")
      o.ncu = true;
    else if (a == "--warmup")
      o.warmup = std::atoi(next());
    else if (a == "--out")
      o.out = next();
    else if (a == "--commit")
      o.commit = next();
    else if (a == "--date")
      o.date = next();
    else if (a == "--no-check")
      o.check = false;
    else {
      std::fprintf(stderr, "ep_bench: unknown flag %s\n", a.c_str());
      std::exit(2);
    }
  }
  if (!o.ab_variants.empty() && o.ab_rounds == 0) o.ab_rounds = 3;
  return o;
}

__global__ void k_fill_bf16(uint16_t* y, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] = static_cast<uint16_t>(0x3F00u | (philox_u32(seed, 7, i) & 0x80FFu));
}

struct Row {
  std::string impl, mode, op, dtype, note;
  int64_t tokens = 0;
  double us = 0, gbps = 0;
  double rdma_gbps = 0;  // cross-node rows: bytes received from other nodes over the time
  int gpus_per_node = 0;
  int blocks = 0, chunk = 0;
  int check = -1;  // -1 not checked, 0 mismatch, 1 bit-exact
};

struct Rank {
  int device = 0;
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, end = nullptr;
  std::vector<uint16_t> x;
  std::vector<int32_t> idx;
  std::vector<float> w;
  uint16_t* dx = nullptr;
  int32_t* didx = nullptr;
  float* dw = nullptr;
  uint16_t* dy = nullptr;
  uint16_t* dout = nullptr;
  uint16_t* dtok = nullptr;  // combine_tokens' rows: one per received token slot [R * Tmax, H]
};

struct World {
  Options opt;
  int gpus = 0, R = 0;
  std::string gpu_name;
  std::vector<Rank> ranks;
  int* gate_host = nullptr;
  int gate_value = 0;
  std::FILE* out = nullptr;
  std::vector<Row> rows;  // everything emitted, for the closing summary
  // Cross-node runs (run_xnode): the topology of the configs bench_ours makes, a suffix of its
  // impl names, and the bytes per rank that cross nodes (FP8 dispatch, BF16 combine).
  int cfg_gpus_per_node = 0;
  std::string impl_suffix;
  double rdma_bytes_fp8 = 0, rdma_bytes_bf16 = 0;
#if defined(FP8MOE_HAVE_NCCL)
  std::vector<ncclComm_t> comms;
#endif

  // One timed region per rank, all released together; returns the median of the slowest rank.
  double time_us(const std::function<void()>& enqueue, int iters, int warmup) {
    std::vector<double> samples;
    // NOTE: one ungated call first: NCCL connects peers and CUDA loads modules on first use, and
    // either may wait for the device, which would never finish behind a closed gate.
    enqueue();
    for (auto& r : ranks) {
      FM_CHECK_CUDA(cudaSetDevice(r.device));
      FM_CHECK_CUDA(cudaStreamSynchronize(r.stream));
    }
    for (int it = 0; it < warmup + iters; ++it) {
      const double worst = bench::gated_slowest_us(ranks, gate_host, gate_value, !opt.ncu, enqueue);
      if (it >= warmup) samples.push_back(worst);
    }
    std::sort(samples.begin(), samples.end());
    return samples[samples.size() / 2];
  }
};

void make_inputs(World& w, int64_t T, uint64_t seed) {
  const int K = w.opt.topk, E = w.opt.experts;
  const int64_t H = w.opt.hidden;
  for (int r = 0; r < w.R; ++r) {
    Rank& k = w.ranks[r];
    k.x.resize(T * H);
    k.idx.resize(T * K);
    k.w.resize(T * K);
    for (int64_t i = 0; i < T * H; ++i)
      k.x[i] = float_to_bf16_bits(philox_normal(seed, 100 + r, i) * 2.0f);
    uint64_t n = 0;
    for (int64_t t = 0; t < T; ++t) {
      for (int j = 0; j < K;) {
        const int e = static_cast<int>(philox_u32(seed, 200 + r, n++) % E);
        bool dup = false;
        for (int q = 0; q < j; ++q) dup = dup || k.idx[t * K + q] == e;
        if (!dup) k.idx[t * K + j++] = e;
      }
      for (int j = 0; j < K; ++j) k.w[t * K + j] = philox_uniform(seed, 300 + r, t * K + j);
    }
    FM_CHECK_CUDA(cudaSetDevice(k.device));
    cudaFree(k.dx);
    cudaFree(k.didx);
    cudaFree(k.dw);
    FM_CHECK_CUDA(cudaMalloc(&k.dx, k.x.size() * 2));
    FM_CHECK_CUDA(cudaMalloc(&k.didx, k.idx.size() * 4));
    FM_CHECK_CUDA(cudaMalloc(&k.dw, k.w.size() * 4));
    FM_CHECK_CUDA(cudaMemcpy(k.dx, k.x.data(), k.x.size() * 2, cudaMemcpyHostToDevice));
    FM_CHECK_CUDA(cudaMemcpy(k.didx, k.idx.data(), k.idx.size() * 4, cudaMemcpyHostToDevice));
    FM_CHECK_CUDA(cudaMemcpy(k.dw, k.w.data(), k.w.size() * 4, cudaMemcpyHostToDevice));
  }
}

// counts[s][d]: tokens of s that go to d (a token once per destination rank).
std::vector<std::vector<int64_t>> pair_counts(const World& w, int64_t T) {
  const int K = w.opt.topk, L = w.opt.experts / w.R;
  std::vector<std::vector<int64_t>> c(w.R, std::vector<int64_t>(w.R, 0));
  for (int s = 0; s < w.R; ++s)
    for (int64_t t = 0; t < T; ++t) {
      uint64_t mask = 0;
      for (int k = 0; k < K; ++k) mask |= 1ull << (w.ranks[s].idx[t * K + k] / L);
      for (int d = 0; d < w.R; ++d) c[s][d] += (mask >> d) & 1;
    }
  return c;
}

// The rows each rank's grouped layout needs (caller-set bound of the benchmark).
int64_t needed_rows(const World& w, int64_t T) {
  const int K = w.opt.topk, L = w.opt.experts / w.R;
  int64_t worst = 0;
  for (int d = 0; d < w.R; ++d) {
    std::vector<int64_t> cnt(L, 0);
    for (int s = 0; s < w.R; ++s)
      for (int64_t i = 0; i < T * K; ++i) {
        const int e = w.ranks[s].idx[i];
        if (e / L == d) ++cnt[e % L];
      }
    int64_t rows = 0;
    for (int64_t c : cnt) rows += (c + 127) / 128 * 128;
    worst = std::max(worst, rows);
  }
  return worst;
}

bool same_dispatch(const EpConfig& cfg, const DispatchResult& a, const DispatchResult& b) {
  if (a.recv.count != b.recv.count) return false;
  const int64_t H = cfg.hidden, SC = cfg.scale_cols(), Tmax = cfg.max_tokens_per_rank;
  const int K = cfg.top_k;
  for (int s = 0; s < cfg.num_ranks; ++s)
    for (int64_t j = 0; j < a.recv.count[s]; ++j) {
      const int64_t at = s * Tmax + j;
      if (a.recv.src_token[at] != b.recv.src_token[at]) return false;
      for (int k = 0; k < K; ++k)
        if (a.recv.topk_local[at * K + k] != b.recv.topk_local[at * K + k] ||
            a.recv.topk_weight[at * K + k] != b.recv.topk_weight[at * K + k])
          return false;
      if (cfg.payload == Payload::kBF16) {
        if (std::memcmp(&a.recv.x_bf16[at * H], &b.recv.x_bf16[at * H], H * 2)) return false;
      } else if (std::memcmp(&a.recv.x_fp8[at * H], &b.recv.x_fp8[at * H], H) ||
                 std::memcmp(&a.recv.x_scales[at * SC], &b.recv.x_scales[at * SC], SC * 4)) {
        return false;
      }
    }
  const GroupedRecv &g = a.grouped, &h = b.grouped;
  if (g.overflow != h.overflow || g.num_rows != h.num_rows ||
      g.expert_offsets != h.expert_offsets || g.m_indices != h.m_indices || g.row_src != h.row_src)
    return false;
  for (int64_t row = 0; row < g.num_rows; ++row) {
    if (g.row_src[row] < 0) continue;
    if (cfg.payload == Payload::kBF16) {
      if (std::memcmp(&g.x_bf16[row * H], &h.x_bf16[row * H], H * 2)) return false;
    } else if (std::memcmp(&g.x_fp8[row * H], &h.x_fp8[row * H], H) ||
               std::memcmp(&g.x_scales[row * SC], &h.x_scales[row * SC], SC * 4)) {
      return false;
    }
  }
  return true;
}

void emit(World& w, const Row& r) {
  std::printf("%-18s %-11s %-16s %-5s T=%-5lld blocks=%-3d chunk=%-3d %9.1f us %8.1f GB/s %s%s\n",
              r.impl.c_str(), r.mode.c_str(), r.op.c_str(), r.dtype.c_str(),
              static_cast<long long>(r.tokens), r.blocks, r.chunk, r.us, r.gbps,
              r.check < 0 ? "" : (r.check ? "bit-exact " : "MISMATCH "), r.note.c_str());
  std::fflush(stdout);
  w.rows.push_back(r);
  if (!w.out) return;
  std::fprintf(w.out,
               "{\"bench\":\"ep\",\"gpu\":\"%s\",\"gpus\":%d,\"ranks\":%d,\"date\":\"%s\","
               "\"commit\":\"%s\",\"impl\":\"%s\",\"mode\":\"%s\",\"op\":\"%s\",\"dtype\":\"%s\","
               "\"tokens\":%lld,\"hidden\":%lld,\"topk\":%d,\"experts\":%d,\"us\":%.2f,"
               "\"gbps\":%.2f,\"blocks\":%d,\"chunk\":%d,\"checked\":%s,\"note\":\"%s\"",
               w.gpu_name.c_str(), w.gpus, w.R, w.opt.date.c_str(), w.opt.commit.c_str(),
               r.impl.c_str(), r.mode.c_str(), r.op.c_str(), r.dtype.c_str(),
               static_cast<long long>(r.tokens), static_cast<long long>(w.opt.hidden), w.opt.topk,
               w.opt.experts, r.us, r.gbps, r.blocks, r.chunk,
               r.check < 0 ? "null" : (r.check ? "true" : "false"), r.note.c_str());
  if (r.gpus_per_node > 0)
    std::fprintf(w.out, ",\"gpus_per_node\":%d,\"rdma_gbps\":%.2f", r.gpus_per_node, r.rdma_gbps);
  std::fprintf(w.out, "}\n");
  std::fflush(w.out);
}

EpConfig make_config(const World& w, int64_t T, Payload p, int64_t masked_capacity,
                     int64_t max_rows) {
  EpConfig c;
  c.num_ranks = w.R;
  c.gpus_per_node = w.cfg_gpus_per_node;
  c.num_experts = w.opt.experts;
  c.top_k = w.opt.topk;
  c.hidden = w.opt.hidden;
  c.max_tokens_per_rank = T;
  c.payload = p;
  c.masked_capacity = masked_capacity;
  c.max_rows = masked_capacity > 0 ? 0 : max_rows;
  c.timeout_s = 10.0;
  return c;
}

std::vector<int> devices_of(const World& w) {
  std::vector<int> d;
  for (const auto& r : w.ranks) d.push_back(r.device);
  return d;
}

// The graph captured on `stream` (its device current), instantiated.
cudaGraphExec_t end_capture(cudaStream_t stream) {
  cudaGraph_t graph;
  FM_CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec;
  FM_CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  FM_CHECK_CUDA(cudaGraphDestroy(graph));
  return exec;
}

// One replay of every rank's graph, each on its rank's stream.
void replay_graphs(const World& w, const std::vector<cudaGraphExec_t>& execs) {
  for (int r = 0; r < w.R; ++r) {
    FM_CHECK_CUDA(cudaSetDevice(w.ranks[r].device));
    FM_CHECK_CUDA(cudaGraphLaunch(execs[r], w.ranks[r].stream));
  }
}

// A kernel variant by name: "v5" (the plan in every send block, no session-3 option), "base"
// (plan_once alone: the session-2 kernels), "default" (DeviceEpOptions' defaults), or letters of
// the options on top of plan_once: P prefetch_payload, C combine_two_steps (so "PC" = the
// session-3 defaults), and of session 4: B combine_peer_blocks, D dispatch_direct_rows, L
// dispatch_self_rows (with D) ("PCBDL" = the session-4 defaults), and of session 5: Y
// combine_stream_rows (with C), Q plan_fast_count ("PCBDLQY" = the session-6 defaults), and of
// session 7 (with C and Y): Z combine_recv_early_stage, U combine_recv_warp_wait, I
// combine_recv_warp_items ("PCBDLQYZUI:s2" = session 7's defaults; with I the automatic receive
// tile is 4 tokens at the V3 shape, as ":t4"). The letters of the options removed after they
// measured slower or no faster (A, S, E, R, N, H, T, F; commit 0d66fed has them; session 6's W, V
// and the ":p" suffix: docs/comm/README.md, "Session 6") are rejected. Suffixes ":c8", ":b80",
// ":r132" set the chunk size, the send blocks and the receive blocks (without ":r",
// DeviceEpOptions' automatic receive grid: every SM since session 4; ":r68" on a 132-SM H100 with
// 64 send blocks is the earlier one); ":g48" the combine send's own grid
// (DeviceEpOptions::combine_blocks), ":t8" the combine receive's tokens per item
// (DeviceEpOptions::combine_recv_tile; ":t16" the rule before session 6 at the V3 shape), ":s2" /
// ":s4" the combine send's warps per record (DeviceEpOptions::combine_send_parts), ":m8" the
// combine's own chunk (DeviceEpOptions::combine_chunk_tokens; session 15, ep26). Session 8 (ep9),
// the dispatch prologue: G dispatch_plan_counts (with D, Q, P), X plan_block_scan (with Q), O
// dispatch_release_only (with D, P); "default+GX" = the defaults plus those letters (any letter
// above may follow "default+"). X is a default since the end of session 8, O and K since session
// 9 (K combine_release_only: the dispatch receive's acknowledgement; the combine's flags with C
// and Y, its acknowledgement with I too): "PCBDLQYZUIXOK:s2" = "default" (session 6's K,
// combine_prefetch, never landed). Session 9 (ep11), the low-latency combine receive: H
// ll_combine_own_narrow (only the low_latency rows move; the letter of an option removed from the
// normal path, commit 0d66fed). Session 11 (ep14), the source-region send (the layout-only
// dispatch's; lower case, the upper-case letters being taken): o layout_release_only, d
// layout_claim_chunks (call 1's n layout_notify_block and m
// layout_metadata_first measured no faster: docs/comm/runs/ep-s11-ep14-call1-onm.patch); the suffix
// ":l96" sets the layout-only dispatch's send grid (DeviceEpOptions::layout_send_blocks). o, d and
// l96 are defaults since the end of session 11; x takes the three back (the send before it).
// Session 11 (ep15): a record_align_128 (the FP8 record stride on 128-byte lines; call 1's p / q
// layout_tail_pieces measured slower: docs/comm/runs/ep-s11-ep15-call1-pqa.patch). a is a default
// since session 12; u takes it back (the 16-byte record stride). Session 12 (ep16): w
// layout_warp_claims measured slower (+12 %) and was not landed
// (docs/comm/runs/ep-s12-prep-warp-claims.patch). Session 13 (ep19): k combine_bulk_rows (the
// combine send's record sums fed through shared memory by bulk copies; with C and Y), a default
// since session 13's ep19 call; r takes it back (the register send). Session 13 late (ep21): j
// dispatch_recv_bulk_rows (the dispatch receive's row copies by bulk copies through shared
// memory; with expand_payload), a default since session 14's first call; q takes it back (the
// lanes' row copies). Session 14 (ep22): f layout_token_slots (the source-region send's records at
// their token's index, so the payload does not wait for the plan; NVLink wire only), a default
// since ep22's call; n takes it back (the records at their rank among the source's tokens).
// Session 15 (ep25): w layout_payload_claims = 1 (the layout-only send's payload claimed per warp
// in units of one 1024-column step; the letter of session 12's removed layout_warp_claims, reused),
// the suffix ":w7" its unit in steps (7 = a whole token at hidden 7168; alone it turns it on too);
// a default since session 15 (1); p takes it back (0: the chunks carry the payload).
struct Variant {
  std::string name;
  DeviceEpOptions opt;
};
Variant parse_variant(const std::string& spec, int blocks, int chunk) {
  Variant v{spec, {}};
  v.opt.num_blocks = blocks;
  v.opt.chunk_tokens = chunk;
  std::string head = spec.substr(0, spec.find(':'));
  for (size_t at = spec.find(':'); at != std::string::npos; at = spec.find(':', at + 1)) {
    const char key = at + 1 < spec.size() ? spec[at + 1] : '?';
    const int val = std::atoi(spec.c_str() + at + 2);
    if (key == 'c')
      v.opt.chunk_tokens = val;
    else if (key == 'b')
      v.opt.num_blocks = val;
    else if (key == 'r')
      v.opt.recv_blocks = val;
    else if (key == 'g')
      v.opt.combine_blocks = val;
    else if (key == 'l')
      v.opt.layout_send_blocks = val;
    else if (key == 't')
      v.opt.combine_recv_tile = val;
    else if (key == 's')
      v.opt.combine_send_parts = val;
    else if (key == 'w')
      v.opt.layout_payload_claims = val;
    else if (key == 'm')
      v.opt.combine_chunk_tokens = val;
    else
      FM_THROW(ErrorKind::kInvalidArgument, "variant ", spec, ": unknown suffix");
  }
  if (head == "default") return v;  // DeviceEpOptions' defaults
  const bool on_defaults = head.rfind("default+", 0) == 0;
  if (on_defaults) head = head.substr(8);
  if (!on_defaults) {
    v.opt.plan_once = head != "v5";
    v.opt.prefetch_payload = false;
    v.opt.combine_two_steps = false;
    v.opt.combine_peer_blocks = false;
    v.opt.dispatch_direct_rows = v.opt.dispatch_self_rows = false;
    v.opt.combine_stream_rows = v.opt.plan_fast_count = false;
    v.opt.combine_recv_early_stage = v.opt.combine_recv_warp_wait = false;
    v.opt.combine_recv_warp_items = false;
    v.opt.combine_send_parts = 0;
    v.opt.plan_block_scan = v.opt.dispatch_release_only = false;
    v.opt.combine_release_only = false;
    v.opt.record_align_128 = false;
    v.opt.combine_bulk_rows = false;
    v.opt.dispatch_recv_bulk_rows = false;
    v.opt.layout_token_slots = false;
    if (head == "v5" || head == "base") return v;
  }
  for (char c : head) {
    if (c == 'P')
      v.opt.prefetch_payload = true;
    else if (c == 'C')
      v.opt.combine_two_steps = true;
    else if (c == 'B')
      v.opt.combine_peer_blocks = true;
    else if (c == 'D')
      v.opt.dispatch_direct_rows = true;
    else if (c == 'L')
      v.opt.dispatch_self_rows = true;
    else if (c == 'Y')
      v.opt.combine_stream_rows = true;
    else if (c == 'Q')
      v.opt.plan_fast_count = true;
    else if (c == 'Z')
      v.opt.combine_recv_early_stage = true;
    else if (c == 'U')
      v.opt.combine_recv_warp_wait = true;
    else if (c == 'I')
      v.opt.combine_recv_warp_items = true;
    else if (c == 'G')
      v.opt.dispatch_plan_counts = true;
    else if (c == 'X')
      v.opt.plan_block_scan = true;
    else if (c == 'O')
      v.opt.dispatch_release_only = true;
    else if (c == 'K')
      v.opt.combine_release_only = true;
    else if (c == 'H')
      v.opt.ll_combine_own_narrow = true;
    else if (c == 'o')
      v.opt.layout_release_only = true;
    else if (c == 'd')
      v.opt.layout_claim_chunks = true;
    else if (c == 'a')
      v.opt.record_align_128 = true;
    else if (c == 'u')
      v.opt.record_align_128 = false;
    else if (c == 'k')
      v.opt.combine_bulk_rows = true;
    else if (c == 'r')
      v.opt.combine_bulk_rows = false;
    else if (c == 'j')
      v.opt.dispatch_recv_bulk_rows = true;
    else if (c == 'q')
      v.opt.dispatch_recv_bulk_rows = false;
    else if (c == 'f')
      v.opt.layout_token_slots = true;
    else if (c == 'n')
      v.opt.layout_token_slots = false;
    else if (c == 'w') {
      if (v.opt.layout_payload_claims == 0) v.opt.layout_payload_claims = 1;  // ":wN" keeps N
    } else if (c == 'p') {
      v.opt.layout_payload_claims = 0;
    } else if (c == 'x') {
      v.opt.layout_release_only = v.opt.layout_claim_chunks = false;
      v.opt.layout_send_blocks = 0;
    } else
      FM_THROW(ErrorKind::kInvalidArgument, "variant ", spec, ": unknown letter ", c);
  }
  return v;
}

// Ours at one shape: dispatch (expanded into the grouped layout, and layout only) and combine.
void bench_ours(World& w, const char* mode, int64_t T, Payload p, int64_t masked_capacity,
                const std::vector<int>& blocks_list, const std::vector<int>& chunk_list, Wire wire,
                double recv_bytes_fp8, double recv_bytes_bf16) {
  const int64_t H = w.opt.hidden;
  const int64_t rows = needed_rows(w, T);
  const int64_t max_rows = (rows + 127) / 128 * 128;
  const EpConfig cfg = make_config(w, T, p, masked_capacity, max_rows);
  const double disp_bytes = p == Payload::kFP8 ? recv_bytes_fp8 : recv_bytes_bf16;
  const std::string impl = (wire == Wire::kNccl ? "fp8moe_nccl_wire" : "fp8moe") + w.impl_suffix;
  bool checked = false;
  for (int blocks : blocks_list)
    for (int chunk : chunk_list) {
      for (bool expand : {true, false}) {
        if (!expand && (masked_capacity > 0 || w.opt.ncu)) continue;
        // Every option of the variant (its letters and suffixes over this sweep point's blocks
        // and chunk), then what the sweep itself sets.
        DeviceEpOptions o = parse_variant(w.opt.variant, blocks, chunk).opt;
        o.plan_once = w.opt.plan_once && o.plan_once;
        o.wire = wire;
        o.expand_payload = expand;
        if (w.opt.recv_blocks > 0) o.recv_blocks = w.opt.recv_blocks;
        o.overlap_recv = w.opt.overlap;
        DeviceEpGroup group(cfg, devices_of(w), o);
        for (int r = 0; r < w.R; ++r) {
          Rank& k = w.ranks[r];
          FM_CHECK_CUDA(cudaSetDevice(k.device));
          cudaFree(k.dy);
          cudaFree(k.dout);
          FM_CHECK_CUDA(cudaMalloc(&k.dy, cfg.row_bound() * H * 2));
          FM_CHECK_CUDA(cudaMalloc(&k.dout, std::max<int64_t>(1, T) * H * 2));
          k_fill_bf16<<<1024, 256, 0, k.stream>>>(k.dy, cfg.row_bound() * H, 11 + r);
          FM_CHECK_LAUNCH();
        }
        const bool grouped = wire == Wire::kNccl;
        auto dispatch = [&] {
          if (grouped) nccl_group_start();
          for (int r = 0; r < w.R; ++r)
            group.rank(r).dispatch_send({T, w.ranks[r].dx, w.ranks[r].didx, w.ranks[r].dw},
                                        w.ranks[r].stream);
          if (grouped) nccl_group_end();
          for (int r = 0; r < w.R; ++r) group.rank(r).dispatch_recv(w.ranks[r].stream);
        };
        auto combine = [&] {
          if (grouped) nccl_group_start();
          for (int r = 0; r < w.R; ++r)
            group.rank(r).combine_send(w.ranks[r].dy, w.ranks[r].stream);
          if (grouped) nccl_group_end();
          for (int r = 0; r < w.R; ++r)
            group.rank(r).combine_recv(w.ranks[r].dout, w.ranks[r].stream);
        };
        Row row;
        row.impl = impl;
        row.mode = mode;
        row.dtype = payload_name(p);
        row.tokens = T;
        row.blocks = blocks;
        row.chunk = chunk;
        row.note = w.opt.plan_once ? "plan_once" : "";
        row.op = expand ? "dispatch" : "dispatch_layout_only";
        row.us = w.time_us(dispatch, w.opt.iters, w.opt.warmup);
        row.gbps = disp_bytes / (row.us * 1e3);
        if (w.rdma_bytes_fp8 > 0) {
          row.gpus_per_node = w.cfg_gpus_per_node > 0 ? w.cfg_gpus_per_node : w.R;
          row.rdma_gbps =
              (p == Payload::kFP8 ? w.rdma_bytes_fp8 : w.rdma_bytes_bf16) / (row.us * 1e3);
        }
        group.check();
        if (expand && w.opt.check && !checked) {
          std::vector<TokenBatch> batches;
          for (auto& k : w.ranks) batches.push_back({T, k.x.data(), k.idx.data(), k.w.data()});
          const auto want = dispatch_reference(cfg, batches);
          row.check = 1;
          for (int r = 0; r < w.R; ++r)
            row.check = row.check && same_dispatch(cfg, want[r], group.rank(r).download());
          checked = true;
        }
        emit(w, row);
        if (!expand) {
          // The combine of one BF16 row per received token (combine_tokens: what DeepEP's combine
          // and NCCL's anchor move; the expert rows' weighted sum, which "combine" also does,
          // stays with the caller), after the layout-only dispatch. Not on the two-stage route.
          if (w.cfg_gpus_per_node > 0) continue;
          for (int r = 0; r < w.R; ++r) {
            Rank& k = w.ranks[r];
            FM_CHECK_CUDA(cudaSetDevice(k.device));
            cudaFree(k.dtok);
            FM_CHECK_CUDA(
                cudaMalloc(&k.dtok, std::max<int64_t>(1, w.R * cfg.max_tokens_per_rank) * H * 2));
            k_fill_bf16<<<1024, 256, 0, k.stream>>>(k.dtok, w.R * cfg.max_tokens_per_rank * H,
                                                    23 + r);
            FM_CHECK_LAUNCH();
          }
          auto combine_tokens = [&] {
            if (grouped) nccl_group_start();
            for (int r = 0; r < w.R; ++r)
              group.rank(r).combine_tokens_send(w.ranks[r].dtok, w.ranks[r].stream);
            if (grouped) nccl_group_end();
            for (int r = 0; r < w.R; ++r)
              group.rank(r).combine_recv(w.ranks[r].dout, w.ranks[r].stream);
          };
          Row t = row;
          t.op = "combine_tokens";
          t.dtype = "bf16";
          t.check = -1;
          t.us = w.time_us(combine_tokens, w.opt.iters, w.opt.warmup);
          t.gbps = recv_bytes_bf16 / (t.us * 1e3);
          group.check();
          emit(w, t);
          continue;
        }
        Row c = row;
        c.op = "combine";
        c.dtype = "bf16";
        c.check = -1;
        c.us = w.time_us(combine, w.opt.iters, w.opt.warmup);
        c.gbps = recv_bytes_bf16 / (c.us * 1e3);
        if (w.rdma_bytes_bf16 > 0) c.rdma_gbps = w.rdma_bytes_bf16 / (c.us * 1e3);
        group.check();
        emit(w, c);
      }
    }
}

// A/B of kernel variants at one FP8 shape (variant names: parse_variant). All variants live side
// by side and every round times each (dispatch, dispatch layout only, combine), the order
// rotating from round to round, so drift of the machine hits them alike; medians over the rounds
// are printed as "# ab" lines. The first round's dispatch of each variant is checked bit for bit
// against the reference. --ab-plan N = --ab v5,base --ab-rounds N.
void bench_ab(World& w, const char* mode, int64_t T, int64_t cap, int blocks, int chunk,
              double recv_bytes_fp8, double recv_bytes_bf16) {
  const int64_t H = w.opt.hidden;
  const int64_t rows = needed_rows(w, T);
  const EpConfig cfg = make_config(w, T, Payload::kFP8, cap, (rows + 127) / 128 * 128);
  std::vector<Variant> vars;
  for (const std::string& spec : w.opt.ab_variants)
    vars.push_back(parse_variant(spec, blocks, chunk));
  const int nv = static_cast<int>(vars.size());
  std::vector<std::array<std::unique_ptr<DeviceEpGroup>, 2>> groups(nv);  // [variant][expand]
  for (int v = 0; v < nv; ++v)
    for (int expand = 0; expand < 2; ++expand) {
      if (!expand && cap > 0) continue;
      DeviceEpOptions o = vars[v].opt;
      o.expand_payload = expand;
      if (o.recv_blocks == 0) o.recv_blocks = w.opt.recv_blocks;
      o.overlap_recv = w.opt.overlap;
      groups[v][expand] = std::make_unique<DeviceEpGroup>(cfg, devices_of(w), o);
    }
  for (int r = 0; r < w.R; ++r) {
    Rank& k = w.ranks[r];
    FM_CHECK_CUDA(cudaSetDevice(k.device));
    cudaFree(k.dy);
    cudaFree(k.dout);
    FM_CHECK_CUDA(cudaMalloc(&k.dy, cfg.row_bound() * H * 2));
    FM_CHECK_CUDA(cudaMalloc(&k.dout, std::max<int64_t>(1, T) * H * 2));
    k_fill_bf16<<<1024, 256, 0, k.stream>>>(k.dy, cfg.row_bound() * H, 11 + r);
    FM_CHECK_LAUNCH();
  }
  std::vector<DispatchResult> want;
  if (w.opt.check) {
    std::vector<TokenBatch> batches;
    for (auto& k : w.ranks) batches.push_back({T, k.x.data(), k.idx.data(), k.w.data()});
    want = dispatch_reference(cfg, batches);
  }
  const char* ops[3] = {"dispatch", "dispatch_layout_only", "combine"};
  std::vector<std::array<std::vector<double>, 3>> us(nv);
  const int rounds = std::max(1, w.opt.ab_rounds);
  for (int round = 0; round < rounds; ++round)
    for (int q = 0; q < nv; ++q) {
      const int v = (q + round) % nv;
      for (int op = 0; op < 3; ++op) {
        DeviceEpGroup* g = groups[v][op == 1 ? 0 : 1].get();
        if (!g) continue;
        auto dispatch = [&] {
          for (int r = 0; r < w.R; ++r)
            g->rank(r).dispatch_send({T, w.ranks[r].dx, w.ranks[r].didx, w.ranks[r].dw},
                                     w.ranks[r].stream);
          for (int r = 0; r < w.R; ++r) g->rank(r).dispatch_recv(w.ranks[r].stream);
        };
        auto combine = [&] {
          for (int r = 0; r < w.R; ++r) g->rank(r).combine_send(w.ranks[r].dy, w.ranks[r].stream);
          for (int r = 0; r < w.R; ++r) g->rank(r).combine_recv(w.ranks[r].dout, w.ranks[r].stream);
        };
        Row row;
        row.impl = "fp8moe";
        row.mode = mode;
        row.op = ops[op];
        row.dtype = op == 2 ? "bf16" : "fp8";
        row.tokens = T;
        row.blocks = vars[v].opt.num_blocks;
        row.chunk = vars[v].opt.chunk_tokens;
        row.note = "ab=" + vars[v].name + " round=" + std::to_string(round);
        // NOTE: combine reads the layout of the last dispatch of its group, so the expanded
        // group's dispatch always runs (timed) right before its combine.
        row.us = w.time_us(op == 2 ? std::function<void()>(combine) : dispatch, w.opt.iters,
                           w.opt.warmup);
        row.gbps = (op == 2 ? recv_bytes_bf16 : recv_bytes_fp8) / (row.us * 1e3);
        g->check();
        if (op == 0 && round == 0 && w.opt.check) {
          row.check = 1;
          for (int r = 0; r < w.R; ++r)
            row.check = row.check && same_dispatch(cfg, want[r], g->rank(r).download());
        }
        us[v][op].push_back(row.us);
        emit(w, row);
      }
    }
  auto median = [](std::vector<double> x) {
    std::sort(x.begin(), x.end());
    return x.empty() ? 0.0 : x[x.size() / 2];
  };
  for (int op = 0; op < 3; ++op) {
    if (us[0][op].empty()) continue;
    const double base = median(us[0][op]);
    for (int v = 0; v < nv; ++v) {
      const double m = median(us[v][op]);
      std::printf("# ab %-11s %-21s %-14s %8.1f us  (/%s %.3f, %d rounds)\n", mode, ops[op],
                  vars[v].name.c_str(), m, vars[0].name.c_str(), m / base, rounds);
    }
  }
}

// A low-latency A/B path by name: "old" (the normal kernels with the masked layout,
// DeviceEpOptions::low_latency = false), "new" (the low-latency kernels, defaults), or letters
// of the low-latency options on top of "new": N ll_early_notify, X ll_combine_spread, O
// ll_combine_own_recv, T ll_token_flags, and 0: all four (the defaults) off, i.e. the session-4
// kernels (e.g. "0", "0N"; "new" may lead: "new0T"); session 9's H ll_combine_own_narrow (off by
// default; "0" leaves it as it is); session 14's R / W ll_dispatch_rotate 1 / 2 (the dispatch
// send's destinations from rank + 1 on, the rank itself last; W moves each item's first peer by its
// index; R the default since ep24's call, A the ascending order before it; "0" leaves it);
// session 15 late's D ll_defer_dispatch_ack (off; "0" leaves it); session 16's F / G
// ll_defer_acks bits 1 / 2 (the dispatch / combine receive's acknowledgement from the rank's next
// send kernel; both the default since session 16's final, U sets 0 first, so "newU" is the
// session-15 kernels and "newUF" bit 1 alone) and Z ll_deferred_ack_first_block (given by block
// 0's warp 0, off); session 17's V ll_recv_plan (the dispatch planned by the receiver; the default
// since session 17's final, S turns it off: "newS" is session 16's path); I ll_recv_plan_ids_block
// (ll5: V's ids as round-tagged words from one extra send block that stores no payload; the
// default since session 18, B turns it off: "newB" is session 17's V).
// Suffixes ":bN" / ":rN" set the send /
// receive grids of that path (num_blocks, recv_blocks; else --ll-blocks and --recv-blocks).
DeviceEpOptions ll_variant_options(const std::string& full) {
  DeviceEpOptions o;
  o.num_blocks = 0;    // 0: the bench's --ll-blocks
  o.recv_blocks = -1;  // -1: the bench's --recv-blocks
  std::string name = full;
  for (size_t c = name.find(':'); c != std::string::npos; c = name.find(':')) {
    const size_t next = name.find(':', c + 1);
    const std::string suf = name.substr(c + 1, next == std::string::npos ? next : next - c - 1);
    name.erase(c, suf.size() + 1);
    if (suf.size() > 1 && suf[0] == 'b')
      o.num_blocks = std::atoi(suf.c_str() + 1);
    else if (suf.size() > 1 && suf[0] == 'r')
      o.recv_blocks = std::atoi(suf.c_str() + 1);
    else
      FM_THROW(ErrorKind::kInvalidArgument, "low-latency variant ", full,
               ": unknown suffix :", suf);
  }
  if (name == "old") {
    o.low_latency = false;
    return o;
  }
  const std::string letters = name.rfind("new", 0) == 0 ? name.substr(3) : name;
  for (char c : letters) {
    if (c == 'N')
      o.ll_early_notify = true;
    else if (c == 'X')
      o.ll_combine_spread = true;
    else if (c == 'O')
      o.ll_combine_own_recv = true;
    else if (c == 'T')
      o.ll_token_flags = true;
    else if (c == 'H')
      o.ll_combine_own_narrow = true;
    else if (c == 'R')
      o.ll_dispatch_rotate = 1;
    else if (c == 'W')
      o.ll_dispatch_rotate = 2;
    else if (c == 'A')
      o.ll_dispatch_rotate = 0;
    else if (c == 'D')  // session 15 late: the dispatch acknowledgement from the next send
      o.ll_defer_dispatch_ack = true;
    else if (c == 'F')  // session 16: the dispatch receive's acknowledgement from the next send
      o.ll_defer_acks |= 1;
    else if (c == 'G')  // session 16: the combine receive's acknowledgement from the next send
      o.ll_defer_acks |= 2;
    else if (c == 'Z')  // session 16: those from warp 0 of block 0
      o.ll_deferred_ack_first_block = true;
    else if (c == 'U')  // session 16: FG is the default; U: every receive acknowledges at its end
      o.ll_defer_acks = 0;
    else if (c == 'V')  // session 17 (ll3): the dispatch planned by the receiver (the default)
      o.ll_recv_plan = true;
    else if (c == 'S')  // session 17: V is the default; S: the send plans (the path before)
      o.ll_recv_plan = false;
    else if (c == 'I')  // ll5: V's ids from an extra send block of their own (the default)
      o.ll_recv_plan = o.ll_recv_plan_ids_block = true;
    else if (c == 'B')  // session 18: I is the default; B: V's ids from send block 0
      o.ll_recv_plan_ids_block = false;
    else if (c == '0')  // the session-4 kernels: session 5's defaults off
      o.ll_early_notify = o.ll_combine_spread = o.ll_combine_own_recv = o.ll_token_flags = false;
    else
      FM_THROW(ErrorKind::kInvalidArgument, "low-latency variant ", name, ": unknown letter ", c);
  }
  return o;
}

// The low-latency A/B at the decoding shape (FP8 dispatch, BF16 combine): the paths of
// --ll-variants (default: "old", the normal kernels with the masked layout, against "new", the
// low-latency kernels), all built side by side and timed every round, the order rotating from
// round to round, so drift of the machine hits them alike. Round 0 of each checks the dispatch
// and the combine output bit for bit against the reference. Returns the medians [variant][op].
std::vector<std::vector<double>> bench_ab_ll(World& w, int64_t T, int64_t cap, int blocks,
                                             int chunk, double bytes_fp8, double bytes_bf16) {
  const int64_t H = w.opt.hidden;
  const EpConfig cfg = make_config(w, T, Payload::kFP8, cap, 0);
  const std::vector<std::string>& names = w.opt.ll_variants;
  const int nv = static_cast<int>(names.size());
  std::vector<std::unique_ptr<DeviceEpGroup>> groups(nv);
  std::vector<int> send_blocks(nv);
  for (int v = 0; v < nv; ++v) {
    DeviceEpOptions o = ll_variant_options(names[v]);
    if (o.num_blocks == 0) o.num_blocks = blocks;
    send_blocks[v] = o.num_blocks;
    o.chunk_tokens = chunk;
    if (o.recv_blocks < 0) o.recv_blocks = w.opt.recv_blocks;
    o.overlap_recv = w.opt.overlap;
    o.expand_payload = w.opt.ll_expand;
    groups[v] = std::make_unique<DeviceEpGroup>(cfg, devices_of(w), o);
  }
  std::vector<std::vector<uint16_t>> y_host(w.R);
  for (int r = 0; r < w.R; ++r) {
    Rank& k = w.ranks[r];
    FM_CHECK_CUDA(cudaSetDevice(k.device));
    cudaFree(k.dy);
    cudaFree(k.dout);
    FM_CHECK_CUDA(cudaMalloc(&k.dy, cfg.row_bound() * H * 2));
    FM_CHECK_CUDA(cudaMalloc(&k.dout, std::max<int64_t>(1, T) * H * 2));
    k_fill_bf16<<<1024, 256, 0, k.stream>>>(k.dy, cfg.row_bound() * H, 11 + r);
    FM_CHECK_LAUNCH();
    if (w.opt.check) {
      FM_CHECK_CUDA(cudaStreamSynchronize(k.stream));
      y_host[r].resize(cfg.row_bound() * H);
      FM_CHECK_CUDA(
          cudaMemcpy(y_host[r].data(), k.dy, y_host[r].size() * 2, cudaMemcpyDeviceToHost));
    }
  }
  std::vector<DispatchResult> want;
  std::vector<std::vector<uint16_t>> want_out;
  if (w.opt.check) {
    std::vector<TokenBatch> batches;
    for (auto& k : w.ranks) batches.push_back({T, k.x.data(), k.idx.data(), k.w.data()});
    want = dispatch_reference(cfg, batches);
    std::vector<const uint16_t*> y;
    for (auto& v : y_host) y.push_back(v.data());
    want_out = combine_reference(cfg, want, y);
  }
  const char* ops[2] = {"dispatch", "combine"};
  std::vector<std::array<std::vector<double>, 2>> us(nv);
  const int rounds = std::max(1, w.opt.ab_ll);
  for (int round = 0; round < rounds; ++round)
    for (int q = 0; q < nv; ++q) {
      // Two paths alternate (as before --ll-variants); more rotate.
      const int v = nv == 2 ? (round % 2 == 0 ? q : 1 - q) : (q + round) % nv;
      DeviceEpGroup* g = groups[v].get();
      auto dispatch = [&] {
        for (int r = 0; r < w.R; ++r)
          g->rank(r).dispatch_send({T, w.ranks[r].dx, w.ranks[r].didx, w.ranks[r].dw},
                                   w.ranks[r].stream);
        for (int r = 0; r < w.R; ++r) g->rank(r).dispatch_recv(w.ranks[r].stream);
      };
      auto combine = [&] {
        for (int r = 0; r < w.R; ++r) g->rank(r).combine_send(w.ranks[r].dy, w.ranks[r].stream);
        for (int r = 0; r < w.R; ++r) g->rank(r).combine_recv(w.ranks[r].dout, w.ranks[r].stream);
      };
      for (int op = 0; op < 2; ++op) {
        Row row;
        row.impl = "fp8moe";
        row.mode = "low_latency";
        row.op = ops[op];
        row.dtype = op == 1 ? "bf16" : "fp8";
        row.tokens = T;
        row.blocks = send_blocks[v];
        row.chunk = names[v] == "old" ? chunk : 0;
        row.note = "ab_ll=" + names[v] + " round=" + std::to_string(round);
        // NOTE: combine reads the layout of its group's last dispatch, which runs right before.
        row.us = w.time_us(op == 1 ? std::function<void()>(combine) : dispatch, w.opt.iters,
                           w.opt.warmup);
        row.gbps = (op == 1 ? bytes_bf16 : bytes_fp8) / (row.us * 1e3);
        g->check();
        if (!w.opt.ll_expand) row.note += " layout_only";
        if (round == 0 && w.opt.check && w.opt.ll_expand) {
          row.check = 1;
          for (int r = 0; r < w.R; ++r) {
            if (op == 0) {
              row.check = row.check && same_dispatch(cfg, want[r], g->rank(r).download());
            } else {
              std::vector<uint16_t> out(T * H);
              FM_CHECK_CUDA(cudaSetDevice(w.ranks[r].device));
              FM_CHECK_CUDA(cudaStreamSynchronize(w.ranks[r].stream));
              FM_CHECK_CUDA(
                  cudaMemcpy(out.data(), w.ranks[r].dout, out.size() * 2, cudaMemcpyDeviceToHost));
              row.check = row.check && out == want_out[r];
            }
          }
        }
        us[v][op].push_back(row.us);
        emit(w, row);
      }
    }
  // --ll-graph N: what a decoding step that replays a graph of the layer sees. Per rank, N
  // rounds of dispatch_send, dispatch_recv, combine_send, combine_recv captured in one graph;
  // one replay of every rank's graph is timed like any other enqueue (gate, events), and the
  // row gives the time per round. NCCL gets the same treatment (bench_nccl_graph). Every
  // variant's graphs are captured first and then timed as the rows above are, `rounds` times
  // with the order rotating (session 16 read a graph gain that was the first place's ~0.3 us),
  // the row the median. The last round's combine output is checked against the reference.
  if (w.opt.ll_graph > 0) {
    const int N = w.opt.ll_graph;
    std::vector<std::vector<cudaGraphExec_t>> execs(nv, std::vector<cudaGraphExec_t>(w.R));
    for (int v = 0; v < nv; ++v)
      for (int r = 0; r < w.R; ++r) {
        Rank& k = w.ranks[r];
        FM_CHECK_CUDA(cudaSetDevice(k.device));
        FM_CHECK_CUDA(cudaStreamBeginCapture(k.stream, cudaStreamCaptureModeThreadLocal));
        auto& ep = groups[v]->rank(r);
        for (int i = 0; i < N; ++i) {
          ep.dispatch_send({T, k.dx, k.didx, k.dw}, k.stream);
          ep.dispatch_recv(k.stream);
          ep.combine_send(k.dy, k.stream);
          ep.combine_recv(k.dout, k.stream);
        }
        execs[v][r] = end_capture(k.stream);
      }
    std::vector<std::vector<double>> graph_us(nv);
    for (int round = 0; round < rounds; ++round)
      for (int q = 0; q < nv; ++q) {
        const int v = (q + round) % nv;
        const auto replay = [&] { replay_graphs(w, execs[v]); };
        graph_us[v].push_back(w.time_us(replay, w.opt.iters, w.opt.warmup) / N);
      }
    for (int v = 0; v < nv; ++v) {
      DeviceEpGroup* g = groups[v].get();
      // The check reads the output of this variant's replays: one more, on its own.
      replay_graphs(w, execs[v]);
      Row row;
      row.impl = "fp8moe";
      row.mode = "low_latency";
      row.op = "dispatch+combine";
      row.dtype = "fp8+bf16";
      row.tokens = T;
      row.blocks = send_blocks[v];
      row.note = "graph_rounds=" + std::to_string(N) + " ab_ll=" + names[v] +
                 " timing_rounds=" + std::to_string(rounds);
      std::vector<double> x = graph_us[v];
      std::sort(x.begin(), x.end());
      row.us = x[x.size() / 2];
      row.gbps = (bytes_fp8 + bytes_bf16) / (row.us * 1e3);
      g->check();
      if (w.opt.check && w.opt.ll_expand) {
        row.check = 1;
        for (int r = 0; r < w.R; ++r) {
          std::vector<uint16_t> out(T * H);
          FM_CHECK_CUDA(cudaSetDevice(w.ranks[r].device));
          FM_CHECK_CUDA(cudaStreamSynchronize(w.ranks[r].stream));
          FM_CHECK_CUDA(
              cudaMemcpy(out.data(), w.ranks[r].dout, out.size() * 2, cudaMemcpyDeviceToHost));
          row.check = row.check && out == want_out[r];
        }
      }
      emit(w, row);
      for (auto e : execs[v]) cudaGraphExecDestroy(e);
    }
  }
  std::vector<std::vector<double>> med(nv, std::vector<double>(2));
  for (int v = 0; v < nv; ++v)
    for (int op = 0; op < 2; ++op) {
      std::vector<double> x = us[v][op];
      std::sort(x.begin(), x.end());
      med[v][op] = x[x.size() / 2];
    }
  return med;
}

#if defined(FP8MOE_HAVE_NCCL)
// One grouped all-to-all as ncclSend/ncclRecv pairs: rank r sends cnt[r][p] records of
// record_bytes from region p of its send buffer and receives cnt[p][r] into region p of its
// receive buffer (regions of T records).
void nccl_all_to_all(World& w, const std::vector<char*>& sbuf, const std::vector<char*>& rbuf,
                     int64_t T, const std::vector<std::vector<int64_t>>& cnt,
                     int64_t record_bytes) {
  BENCH_NCCL(ncclGroupStart());
  for (int r = 0; r < w.R; ++r)
    for (int p = 0; p < w.R; ++p) {
      BENCH_NCCL(ncclSend(sbuf[r] + p * T * record_bytes, cnt[r][p] * record_bytes, ncclUint8, p,
                          w.comms[r], w.ranks[r].stream));
      BENCH_NCCL(ncclRecv(rbuf[r] + p * T * record_bytes, cnt[p][r] * record_bytes, ncclUint8, p,
                          w.comms[r], w.ranks[r].stream));
    }
  BENCH_NCCL(ncclGroupEnd());
}

// NCCL all-to-all (grouped send/recv) of exactly the bytes the dispatch moves.
void bench_nccl(World& w, const char* mode, int64_t T, const std::vector<std::vector<int64_t>>& cnt,
                const char* op, const char* dtype, int64_t record_bytes, double recv_bytes) {
  std::vector<char*> sbuf(w.R), rbuf(w.R);
  for (int r = 0; r < w.R; ++r) {
    FM_CHECK_CUDA(cudaSetDevice(w.ranks[r].device));
    FM_CHECK_CUDA(cudaMalloc(&sbuf[r], w.R * T * record_bytes + 16));
    FM_CHECK_CUDA(cudaMalloc(&rbuf[r], w.R * T * record_bytes + 16));
    FM_CHECK_CUDA(cudaMemset(sbuf[r], 1, w.R * T * record_bytes + 16));
  }
  auto a2a = [&] { nccl_all_to_all(w, sbuf, rbuf, T, cnt, record_bytes); };
  Row row;
  row.impl = "nccl";
  row.mode = mode;
  row.op = op;
  row.dtype = dtype;
  row.tokens = T;
  row.note = "all_to_all_same_bytes";
  row.us = w.time_us(a2a, w.opt.iters, w.opt.warmup);
  row.gbps = recv_bytes / (row.us * 1e3);
  emit(w, row);
  for (int r = 0; r < w.R; ++r) {
    FM_CHECK_CUDA(cudaSetDevice(w.ranks[r].device));
    cudaFree(sbuf[r]);
    cudaFree(rbuf[r]);
  }
}
#endif

#if defined(FP8MOE_HAVE_NCCL)
// --ll-graph N for the anchor: N rounds of the dispatch all-to-all and the combine all-to-all
// (the bytes of bench_nccl) captured in one graph per rank's stream, timed as bench_ab_ll times
// ours; the row gives the time per round. A capture NCCL refuses is reported and skipped.
void bench_nccl_graph(World& w, int64_t T, const std::vector<std::vector<int64_t>>& cnt,
                      int64_t fp8_record, int64_t bf16_record, double recv_bytes) {
  const int N = w.opt.ll_graph;
  const int64_t rb = std::max(fp8_record, bf16_record);
  std::vector<char*> sbuf(w.R), rbuf(w.R);
  for (int r = 0; r < w.R; ++r) {
    FM_CHECK_CUDA(cudaSetDevice(w.ranks[r].device));
    FM_CHECK_CUDA(cudaMalloc(&sbuf[r], w.R * T * rb + 16));
    FM_CHECK_CUDA(cudaMalloc(&rbuf[r], w.R * T * rb + 16));
    FM_CHECK_CUDA(cudaMemset(sbuf[r], 1, w.R * T * rb + 16));
  }
  auto a2a = [&](int64_t record_bytes) { nccl_all_to_all(w, sbuf, rbuf, T, cnt, record_bytes); };
  std::vector<cudaGraphExec_t> execs(w.R, nullptr);
  try {
    for (auto& k : w.ranks) {
      FM_CHECK_CUDA(cudaSetDevice(k.device));
      FM_CHECK_CUDA(cudaStreamBeginCapture(k.stream, cudaStreamCaptureModeRelaxed));
    }
    for (int i = 0; i < N; ++i) {
      a2a(fp8_record);
      a2a(bf16_record);
    }
    for (int r = 0; r < w.R; ++r) {
      FM_CHECK_CUDA(cudaSetDevice(w.ranks[r].device));
      execs[r] = end_capture(w.ranks[r].stream);
    }
    const auto replay = [&] { replay_graphs(w, execs); };
    Row row;
    row.impl = "nccl";
    row.mode = "low_latency";
    row.op = "dispatch+combine";
    row.dtype = "fp8+bf16";
    row.tokens = T;
    row.note = "graph_rounds=" + std::to_string(N) + " all_to_all_same_bytes";
    row.us = w.time_us(replay, w.opt.iters, w.opt.warmup) / N;
    row.gbps = recv_bytes / (row.us * 1e3);
    emit(w, row);
  } catch (const Error& e) {
    std::printf("# nccl graph: not measured (%s)\n", e.what());
    for (auto& k : w.ranks) {  // leave no stream capturing
      cudaSetDevice(k.device);
      cudaGraph_t graph = nullptr;
      if (cudaStreamEndCapture(k.stream, &graph) == cudaSuccess && graph) cudaGraphDestroy(graph);
    }
    cudaGetLastError();
  }
  for (int r = 0; r < w.R; ++r) {
    FM_CHECK_CUDA(cudaSetDevice(w.ranks[r].device));
    if (execs[r]) cudaGraphExecDestroy(execs[r]);
    cudaFree(sbuf[r]);
    cudaFree(rbuf[r]);
  }
}
#endif

// The layout-only dispatch (expand_payload off) leaves the grouped rows unwritten: each row with a
// token is filled here from its record (row_src = (the source's first index + j) * K + k), so
// same_dispatch covers the records through the layout as with the expansion (the tests'
// expand_on_host, tests/comm/device_ep_gpu_test.cu).
void expand_on_host(const EpConfig& cfg, DispatchResult& got) {
  const int R = cfg.num_ranks, K = cfg.top_k;
  const int64_t H = cfg.hidden, SC = cfg.scale_cols(), Tmax = cfg.max_tokens_per_rank;
  if (got.grouped.overflow) return;
  std::vector<int64_t> roff(R + 1, 0);
  for (int s = 0; s < R; ++s) roff[s + 1] = roff[s] + got.recv.count[s];
  for (int64_t row = 0; row < got.grouped.num_rows; ++row) {
    const int32_t src = got.grouped.row_src[row];
    if (src < 0) continue;
    const int64_t i = src / K;
    int s = 0;
    while (s + 1 < R && roff[s + 1] <= i) ++s;
    const int64_t at = s * Tmax + (i - roff[s]);
    if (cfg.payload == Payload::kBF16) {
      std::copy_n(&got.recv.x_bf16[at * H], H, &got.grouped.x_bf16[row * H]);
    } else {
      std::copy_n(&got.recv.x_fp8[at * H], H, &got.grouped.x_fp8[row * H]);
      std::copy_n(&got.recv.x_scales[at * SC], SC, &got.grouped.x_scales[row * SC]);
    }
  }
}

bool is_graph_row(const Row& r) {
  return r.note.rfind("graph_rounds=", 0) == 0;
}

// --graph N (gr1): the normal mode as a serving or training step runs it, replayed from CUDA
// graphs (dispatch and combine never wait for the host, so a layer captures whole). Per variant
// (the sweep's own at its first blocks and chunk, or every --ab variant) and rank, four graphs of
// N rounds each, captured on the rank's stream in thread-local mode as --ll-graph does:
// layout-only dispatches and combine_tokens (one group, expand_payload off), expanded dispatches
// and combines (one group, expand_payload on). The combine is a graph of its own, not a [dispatch;
// combine] pair minus a dispatch graph: the handle allows repeated combines after one dispatch (the
// tests run combine, combine_tokens, combine again; the eager rows time the combine so), so its row
// is its own median and not the difference of two medians that carries both spreads (each ~1 % of
// a ~100-250 us op). NCCL: a graph of N all-to-alls of the eager dispatch anchor's bytes and one of
// the combine anchor's, captured as bench_nccl_graph does (one thread, every rank's stream, relaxed
// mode). Every graph replays once to be checked (after the replays, so the record is what the
// graph wrote last): the records via download() against dispatch_reference (the layout-only ones
// expanded on the host), the outputs poisoned before and compared with combine_reference /
// combine_tokens_reference after. Then `rounds` timing rounds (--ab-rounds, else 3), each timing
// every graph (time_us of one replay of every rank's graph, per round = / N), the order rotating
// from round to round; a row is the median, note "graph_rounds=N ...".
void bench_graph(World& w, int64_t T, const std::vector<std::vector<int64_t>>& cnt,
                 int64_t fp8_record, int64_t bf16_record, double recv_bytes_fp8,
                 double recv_bytes_bf16) {
  const int N = w.opt.graph, R = w.R;
  const int64_t H = w.opt.hidden;
  const bool ab = w.opt.ab_rounds > 0;
  const int rounds = ab ? w.opt.ab_rounds : 3;
  const int64_t rows = needed_rows(w, T);
  const EpConfig cfg = make_config(w, T, Payload::kFP8, 0, (rows + 127) / 128 * 128);
  const int blocks = w.opt.blocks.front(), chunk = w.opt.chunks.front();
  std::vector<Variant> vars;
  std::vector<std::string> labels;
  if (ab) {
    for (const std::string& spec : w.opt.ab_variants) {
      vars.push_back(parse_variant(spec, blocks, chunk));
      if (vars.back().opt.recv_blocks == 0) vars.back().opt.recv_blocks = w.opt.recv_blocks;
      labels.push_back("ab=" + spec);
    }
  } else {  // bench_ours' options at this sweep point
    vars.push_back(parse_variant(w.opt.variant, blocks, chunk));
    DeviceEpOptions& o = vars.back().opt;
    o.plan_once = w.opt.plan_once && o.plan_once;
    if (w.opt.recv_blocks > 0) o.recv_blocks = w.opt.recv_blocks;
    labels.push_back("variant=" + w.opt.variant);
  }
  const int nv = static_cast<int>(vars.size());
  std::vector<std::array<std::unique_ptr<DeviceEpGroup>, 2>> groups(nv);  // [variant][expand]
  for (int v = 0; v < nv; ++v)
    for (int expand = 0; expand < 2; ++expand) {
      DeviceEpOptions o = vars[v].opt;
      o.wire = Wire::kNvlink;
      o.expand_payload = expand;
      o.overlap_recv = w.opt.overlap;
      groups[v][expand] = std::make_unique<DeviceEpGroup>(cfg, devices_of(w), o);
    }
  // The graphs' own buffers (bench_ours frees and reallocates the Rank ones): expert outputs y,
  // combine_tokens' rows, the combine output.
  std::vector<uint16_t*> y(R), tok(R), out(R);
  std::vector<std::vector<uint16_t>> y_host(R), tok_host(R);
  const int64_t tok_n = std::max<int64_t>(1, R * T) * H;
  for (int r = 0; r < R; ++r) {
    Rank& k = w.ranks[r];
    FM_CHECK_CUDA(cudaSetDevice(k.device));
    FM_CHECK_CUDA(cudaMalloc(&y[r], cfg.row_bound() * H * 2));
    FM_CHECK_CUDA(cudaMalloc(&tok[r], tok_n * 2));
    FM_CHECK_CUDA(cudaMalloc(&out[r], std::max<int64_t>(1, T) * H * 2));
    k_fill_bf16<<<1024, 256, 0, k.stream>>>(y[r], cfg.row_bound() * H, 11 + r);
    FM_CHECK_LAUNCH();
    k_fill_bf16<<<1024, 256, 0, k.stream>>>(tok[r], tok_n, 23 + r);
    FM_CHECK_LAUNCH();
    if (w.opt.check) {
      FM_CHECK_CUDA(cudaStreamSynchronize(k.stream));
      y_host[r].resize(cfg.row_bound() * H);
      tok_host[r].resize(tok_n);
      FM_CHECK_CUDA(
          cudaMemcpy(y_host[r].data(), y[r], y_host[r].size() * 2, cudaMemcpyDeviceToHost));
      FM_CHECK_CUDA(
          cudaMemcpy(tok_host[r].data(), tok[r], tok_host[r].size() * 2, cudaMemcpyDeviceToHost));
    }
  }
  std::vector<DispatchResult> want;
  std::vector<std::vector<uint16_t>> want_out, want_back;
  if (w.opt.check) {
    std::vector<TokenBatch> batches;
    for (auto& k : w.ranks) batches.push_back({T, k.x.data(), k.idx.data(), k.w.data()});
    want = dispatch_reference(cfg, batches);
    std::vector<const uint16_t*> yp, tp;
    for (int r = 0; r < R; ++r) {
      yp.push_back(y_host[r].data());
      tp.push_back(tok_host[r].data());
    }
    want_out = combine_reference(cfg, want, yp);
    want_back = combine_tokens_reference(cfg, want, tp);
  }
  // Our graphs [variant][op][rank]; op 0 layout-only dispatch, 1 combine_tokens (both on the
  // layout-only group), 2 dispatch, 3 combine (the expanded group). A rank's capture order is the
  // op order, so each combine's host-side state (its last dispatch's T) is its group's.
  const char* ops[4] = {"dispatch_layout_only", "combine_tokens", "dispatch", "combine"};
  std::vector<std::array<std::vector<cudaGraphExec_t>, 4>> execs(nv);
  for (int v = 0; v < nv; ++v)
    for (int op = 0; op < 4; ++op) execs[v][op].assign(R, nullptr);
  for (int v = 0; v < nv; ++v)
    for (int r = 0; r < R; ++r) {
      Rank& k = w.ranks[r];
      FM_CHECK_CUDA(cudaSetDevice(k.device));
      for (int op = 0; op < 4; ++op) {
        DeviceEpRank& ep = groups[v][op / 2]->rank(r);
        FM_CHECK_CUDA(cudaStreamBeginCapture(k.stream, cudaStreamCaptureModeThreadLocal));
        for (int i = 0; i < N; ++i) {
          if (op % 2 == 0) {
            ep.dispatch_send({T, k.dx, k.didx, k.dw}, k.stream);
            ep.dispatch_recv(k.stream);
          } else {
            if (op == 1)
              ep.combine_tokens_send(tok[r], k.stream);
            else
              ep.combine_send(y[r], k.stream);
            ep.combine_recv(out[r], k.stream);
          }
        }
        execs[v][op][r] = end_capture(k.stream);
      }
    }
  auto sync_all = [&] {
    for (auto& k : w.ranks) {
      FM_CHECK_CUDA(cudaSetDevice(k.device));
      FM_CHECK_CUDA(cudaStreamSynchronize(k.stream));
    }
  };
  // Every graph checked once, each dispatch before the combines of its group.
  std::vector<std::array<int, 4>> checks(nv);
  for (int v = 0; v < nv; ++v)
    for (int op : {0, 2, 1, 3}) {
      const bool comb = op % 2 == 1;
      if (comb && w.opt.check)
        for (int r = 0; r < R; ++r) {
          FM_CHECK_CUDA(cudaSetDevice(w.ranks[r].device));
          FM_CHECK_CUDA(cudaMemsetAsync(out[r], 0xFF, T * H * 2, w.ranks[r].stream));
        }
      replay_graphs(w, execs[v][op]);
      sync_all();
      groups[v][op / 2]->check();
      checks[v][op] = -1;
      if (!w.opt.check) continue;
      checks[v][op] = 1;
      for (int r = 0; r < R; ++r) {
        if (!comb) {
          DispatchResult got = groups[v][op / 2]->rank(r).download();
          if (op == 0) expand_on_host(cfg, got);
          checks[v][op] = checks[v][op] && same_dispatch(cfg, want[r], got);
        } else {
          std::vector<uint16_t> o(T * H);
          FM_CHECK_CUDA(cudaSetDevice(w.ranks[r].device));
          FM_CHECK_CUDA(cudaMemcpy(o.data(), out[r], o.size() * 2, cudaMemcpyDeviceToHost));
          checks[v][op] = checks[v][op] && o == (op == 1 ? want_back[r] : want_out[r]);
        }
      }
    }
  // What is timed: ours, then NCCL's graphs.
  struct Item {
    std::vector<cudaGraphExec_t>* execs;
    Row row;
    std::vector<double> us;
  };
  std::vector<Item> items;
  const std::string head = "graph_rounds=" + std::to_string(N);
  for (int v = 0; v < nv; ++v)
    for (int op = 0; op < 4; ++op) {
      Row row;
      row.impl = "fp8moe";
      row.mode = "normal";
      row.op = ops[op];
      row.dtype = op % 2 ? "bf16" : "fp8";
      row.tokens = T;
      row.blocks = vars[v].opt.num_blocks;
      row.chunk = vars[v].opt.chunk_tokens;
      row.check = checks[v][op];
      row.note = head + " " + labels[v] + " timing_rounds=" + std::to_string(rounds);
      items.push_back({&execs[v][op], row, {}});
    }
  std::vector<std::vector<cudaGraphExec_t>> nccl_execs;
  std::vector<char*> sbuf, rbuf;
#if defined(FP8MOE_HAVE_NCCL)
  if (!w.comms.empty()) {
    const int64_t rb = std::max(fp8_record, bf16_record);
    sbuf.assign(R, nullptr);
    rbuf.assign(R, nullptr);
    for (int r = 0; r < R; ++r) {
      FM_CHECK_CUDA(cudaSetDevice(w.ranks[r].device));
      FM_CHECK_CUDA(cudaMalloc(&sbuf[r], R * T * rb + 16));
      FM_CHECK_CUDA(cudaMalloc(&rbuf[r], R * T * rb + 16));
      FM_CHECK_CUDA(cudaMemset(sbuf[r], 1, R * T * rb + 16));
    }
    nccl_execs.reserve(2);         // items hold pointers into it
    for (int c = 0; c < 2; ++c) {  // the dispatch anchor's bytes, then the combine's
      const int64_t rec = c ? bf16_record : fp8_record;
      std::vector<cudaGraphExec_t> ex(R, nullptr);
      try {
        for (auto& k : w.ranks) {
          FM_CHECK_CUDA(cudaSetDevice(k.device));
          FM_CHECK_CUDA(cudaStreamBeginCapture(k.stream, cudaStreamCaptureModeRelaxed));
        }
        for (int i = 0; i < N; ++i) nccl_all_to_all(w, sbuf, rbuf, T, cnt, rec);
        for (int r = 0; r < R; ++r) {
          FM_CHECK_CUDA(cudaSetDevice(w.ranks[r].device));
          ex[r] = end_capture(w.ranks[r].stream);
        }
      } catch (const Error& e) {
        std::printf("# nccl graph (normal): not measured (%s)\n", e.what());
        for (auto& k : w.ranks) {  // leave no stream capturing
          cudaSetDevice(k.device);
          cudaGraph_t graph = nullptr;
          if (cudaStreamEndCapture(k.stream, &graph) == cudaSuccess && graph)
            cudaGraphDestroy(graph);
        }
        cudaGetLastError();
        for (auto e2 : ex)
          if (e2) cudaGraphExecDestroy(e2);
        break;
      }
      const bool comb = c == 1;
      nccl_execs.push_back(ex);
      Row row;
      row.impl = "nccl";
      row.mode = "normal";
      row.op = comb ? "combine" : "dispatch";
      row.dtype = comb ? "bf16" : "fp8";
      row.tokens = T;
      row.note = head + " all_to_all_same_bytes timing_rounds=" + std::to_string(rounds);
      items.push_back({&nccl_execs.back(), row, {}});
    }
  }
#else
  (void)cnt;
  (void)fp8_record;
  (void)bf16_record;
#endif
  const int ni = static_cast<int>(items.size());
  for (int round = 0; round < rounds; ++round)
    for (int q = 0; q < ni; ++q) {
      Item& it = items[(q + round) % ni];
      const auto replay = [&] { replay_graphs(w, *it.execs); };
      it.us.push_back(w.time_us(replay, w.opt.iters, w.opt.warmup) / N);
    }
  for (int v = 0; v < nv; ++v) groups[v][0]->check(), groups[v][1]->check();
  for (Item& it : items) {
    std::sort(it.us.begin(), it.us.end());
    it.row.us = it.us[it.us.size() / 2];
    const bool comb = it.row.op.starts_with("combine");
    it.row.gbps = (comb ? recv_bytes_bf16 : recv_bytes_fp8) / (it.row.us * 1e3);
    emit(w, it.row);
  }
  for (int r = 0; r < R; ++r) {
    FM_CHECK_CUDA(cudaSetDevice(w.ranks[r].device));
    for (auto& e : execs)
      for (auto& x : e) cudaGraphExecDestroy(x[r]);
    for (auto& x : nccl_execs) cudaGraphExecDestroy(x[r]);
    cudaFree(y[r]);
    cudaFree(tok[r]);
    cudaFree(out[r]);
    if (!sbuf.empty()) {
      cudaFree(sbuf[r]);
      cudaFree(rbuf[r]);
    }
  }
}

// The second block of the summary (--graph N): per variant, each op replayed from graphs against
// NCCL's graphs of the same bytes and the peer copy of this run, the eager rows beside them (the
// sweep's best; with --ab the variant's median over its rounds).
void graph_summary(const World& w) {
  auto median = [](std::vector<double> x) {
    std::sort(x.begin(), x.end());
    return x.empty() ? 0.0 : x[x.size() / 2];
  };
  auto find = [&](const char* impl, const std::string& op, const char* dtype, bool graph,
                  const std::string& note_prefix, bool best) -> double {
    std::vector<double> x;
    for (const Row& r : w.rows)
      if (r.impl == impl && r.mode == "normal" && r.op == op && r.dtype == dtype &&
          is_graph_row(r) == graph && r.note.rfind(note_prefix, 0) == 0)
        x.push_back(r.us);
    if (x.empty()) return 0.0;
    return best ? *std::min_element(x.begin(), x.end()) : median(x);
  };
  auto peer = [&](const char* note) {
    for (const Row& r : w.rows)
      if (r.impl == "peer_copy" && r.mode == "normal" && r.op == "copy_bidirectional" &&
          r.note == note)
        return r.us;
    return 0.0;
  };
  std::vector<std::string> labels;  // the variants' notes, in order
  for (const Row& r : w.rows)
    if (r.impl == "fp8moe" && r.mode == "normal" && is_graph_row(r) &&
        std::find(labels.begin(), labels.end(), r.note) == labels.end())
      labels.push_back(r.note);
  if (labels.empty()) return;
  const double nd = find("nccl", "dispatch", "fp8", true, "", true);
  const double nc = find("nccl", "combine", "bf16", true, "", true);
  const double ned = find("nccl", "dispatch", "fp8", false, "all_to_all_same_bytes", true);
  const double nec = find("nccl", "combine", "bf16", false, "all_to_all_same_bytes", true);
  std::printf(
      "# summary, graph replays (us per round; nccl: its graphs of the same bytes; eager in "
      "parentheses)\n");
  for (const std::string& label : labels) {
    // The eager rows of this variant: --ab's "ab=NAME round=K" (median), else the sweep's best.
    const size_t at = label.find("ab=");
    const bool ab = at != std::string::npos;
    const std::string eager_prefix = ab ? label.substr(at, label.find(' ', at) - at) + " " : "";
    std::printf("# %s\n", label.c_str());
    double g[4] = {0, 0, 0, 0};
    const char* ops[4] = {"dispatch", "dispatch_layout_only", "combine", "combine_tokens"};
    for (int i = 0; i < 4; ++i) {
      const bool comb = i >= 2;
      const Row* o = nullptr;
      for (const Row& r : w.rows)
        if (r.impl == "fp8moe" && r.op == ops[i] && r.note == label) o = &r;
      if (!o) continue;
      g[i] = o->us;
      const double e = find("fp8moe", ops[i], comb ? "bf16" : "fp8", false, eager_prefix, !ab);
      const double n = comb ? nc : nd, ne = comb ? nec : ned;
      const double pc = peer(comb ? "bf16_combine_cross_bytes" : "fp8_dispatch_cross_bytes");
      std::printf("normal      %-21s ours %8.1f us (%6.1f)", ops[i], o->us, e);
      if (n > 0)
        std::printf("  nccl %8.1f us (%6.1f) -> %.2fx (%.2fx)", n, ne, n / o->us,
                    e > 0 ? ne / e : 0.0);
      if (pc > 0)
        std::printf("  peer-copy floor %7.1f us -> %.0f%% of peer bandwidth", pc,
                    100.0 * pc / o->us);
      std::printf("%s\n", o->check == 0 ? "  MISMATCH" : "");
    }
    if (g[0] > 0 && g[2] > 0 && nd > 0 && nc > 0)
      std::printf("normal      dispatch+combine      ours %8.1f us  nccl %8.1f us -> %.2fx\n",
                  g[0] + g[2], nd + nc, (nd + nc) / (g[0] + g[2]));
    if (g[1] > 0 && g[3] > 0 && nd > 0 && nc > 0)
      std::printf("normal      layout+combine_tokens ours %8.1f us  nccl %8.1f us -> %.2fx\n",
                  g[1] + g[3], nd + nc, (nd + nc) / (g[1] + g[3]));
  }
  std::fflush(stdout);
}

// Raw peer copies between GPUs 0 and 1: one direction, and both directions at once.
void bench_peer(World& w, int64_t bytes, const char* mode, const char* note) {
  if (w.gpus < 2) return;
  char* buf[2][2];
  for (int g = 0; g < 2; ++g) {
    FM_CHECK_CUDA(cudaSetDevice(g));
    FM_CHECK_CUDA(cudaMalloc(&buf[g][0], bytes));
    FM_CHECK_CUDA(cudaMalloc(&buf[g][1], bytes));
    FM_CHECK_CUDA(cudaMemset(buf[g][0], 3, bytes));
  }
  const Rank& r0 = w.ranks[0];
  const Rank* r1 = nullptr;
  for (const auto& r : w.ranks)
    if (r.device == 1) r1 = &r;
  for (bool both : {false, true}) {
    auto copy = [&] {
      FM_CHECK_CUDA(cudaMemcpyPeerAsync(buf[1][1], 1, buf[0][0], 0, bytes, r0.stream));
      if (both) FM_CHECK_CUDA(cudaMemcpyPeerAsync(buf[0][1], 0, buf[1][0], 1, bytes, r1->stream));
    };
    Row row;
    row.impl = "peer_copy";
    row.mode = mode;
    row.op = both ? "copy_bidirectional" : "copy_one_way";
    row.dtype = "bytes";
    row.note = note;
    row.us = w.time_us(copy, w.opt.iters, w.opt.warmup);
    row.gbps = static_cast<double>(bytes) / (row.us * 1e3);  // per direction
    emit(w, row);
  }
  for (int g = 0; g < 2; ++g) {
    FM_CHECK_CUDA(cudaSetDevice(g));
    cudaFree(buf[g][0]);
    cudaFree(buf[g][1]);
  }
}

// Best of ours per (mode, op) against the anchors of this run: the issue's targets as ratios.
void summary(const World& w) {
  auto best = [&](const char* impl, const std::string& mode, const char* op, const char* dtype,
                  const char* note = nullptr) {
    const Row* b = nullptr;
    for (const Row& r : w.rows)
      if (r.impl == impl && r.mode == mode && r.op == op && r.dtype == dtype &&
          (!note || r.note == note) && !is_graph_row(r) && (!b || r.us < b->us))
        b = &r;
    return b;
  };
  std::printf("# summary (best of ours; anchors of this run)\n");
  for (const char* mode : {"normal", "low_latency"}) {
    const Row* nccl_d = best("nccl", mode, "dispatch", "fp8");
    const Row* nccl_c = best("nccl", mode, "combine", "bf16");
    const Row* peer_d =
        best("peer_copy", mode, "copy_bidirectional", "bytes", "fp8_dispatch_cross_bytes");
    const Row* peer_c =
        best("peer_copy", mode, "copy_bidirectional", "bytes", "bf16_combine_cross_bytes");
    for (const char* op : {"dispatch", "dispatch_layout_only", "combine", "combine_tokens"}) {
      const bool comb = std::string(op).starts_with("combine");
      const Row* o = best("fp8moe", mode, op, comb ? "bf16" : "fp8");
      if (!o) continue;
      const Row* n = comb ? nccl_c : nccl_d;
      const Row* pc = comb ? peer_c : peer_d;
      std::printf("%-11s %-21s ours %8.1f us (blocks %d, chunk %d)", mode, op, o->us, o->blocks,
                  o->chunk);
      if (n) std::printf("  nccl %8.1f us -> %.2fx", n->us, n->us / o->us);
      if (pc)
        std::printf("  peer-copy floor %7.1f us -> %.0f%% of peer bandwidth", pc->us,
                    100.0 * pc->us / o->us);
      std::printf("\n");
    }
    const Row* od = best("fp8moe", mode, "dispatch", "fp8");
    const Row* oc = best("fp8moe", mode, "combine", "bf16");
    if (od && oc && nccl_d && nccl_c)
      std::printf("%-11s dispatch+combine      ours %8.1f us  nccl %8.1f us -> %.2fx\n", mode,
                  od->us + oc->us, nccl_d->us + nccl_c->us,
                  (nccl_d->us + nccl_c->us) / (od->us + oc->us));
  }
}

// The closing block of the cross-node form, compact enough to survive a device call's output
// tail: one line per route (FP8 dispatch, layout only, BF16 combine), the anchors of the run, then
// one short JSON object per row (ours and anchors) for scripts that lose the --out file.
void xnode_summary(const World& w, int N, int G) {
  auto find = [&](const std::string& impl, const char* op, const char* dtype,
                  const char* note = nullptr) -> const Row* {
    for (const Row& r : w.rows)
      if (r.impl == impl && r.op == op && r.dtype == dtype && (!note || r.note == note)) return &r;
    return nullptr;
  };
  std::printf(
      "# cross-node summary: %d nodes x %d ranks on %d GPU(s), %lld tokens/rank, hidden %lld, "
      "top-%d of %d experts; median of %d iterations, slowest rank\n",
      N, G, w.gpus, static_cast<long long>(w.opt.tokens), static_cast<long long>(w.opt.hidden),
      w.opt.topk, w.opt.experts, w.opt.iters);
  std::printf("# us (GB/s of all received bytes / GB/s from other nodes, a token once per node)\n");
  std::printf("# %-22s %-30s %-12s %s\n", "route", "fp8 dispatch", "layout only", "bf16 combine");
  const char* routes[][2] = {{"fp8moe_direct", "direct"},
                             {"fp8moe_2stage", "two-stage, NVLink hop"},
                             {"fp8moe_nccl_wire_2stage", "two-stage, NCCL hop"}};
  for (const auto& [impl, label] : routes) {
    const Row* d = find(impl, "dispatch", "fp8");
    if (!d) continue;
    const Row* l = find(impl, "dispatch_layout_only", "fp8");
    const Row* c = find(impl, "combine", "bf16");
    std::printf("# %-22s %8.1f us (%6.1f / %6.1f)%s", label, d->us, d->gbps, d->rdma_gbps,
                d->check == 0 ? " MISMATCH" : "");
    if (l) std::printf("  %8.1f us", l->us);
    if (c) std::printf("  %8.1f us (%6.1f / %6.1f)", c->us, c->gbps, c->rdma_gbps);
    std::printf("\n");
  }
  const Row* nd = find("nccl", "dispatch", "fp8");
  const Row* nc = find("nccl", "combine", "bf16");
  const Row* p1 = find("peer_copy", "copy_one_way", "bytes", "fp8_dispatch_cross_bytes");
  const Row* p2 = find("peer_copy", "copy_bidirectional", "bytes", "fp8_dispatch_cross_bytes");
  std::printf("# anchors:");
  if (nd && nc)
    std::printf(" NCCL all-to-all of the same bytes %.1f us (fp8) / %.1f us (bf16 combine);",
                nd->us, nc->us);
  if (p1 && p2)
    std::printf(" peer copy of the cross bytes %.1f us one way / %.1f us both ways", p1->us,
                p2->us);
  if (!(nd && nc) && !(p1 && p2)) std::printf(" none in this run");
  std::printf("\n");
  for (const Row& r : w.rows) {
    const bool ours = r.gpus_per_node > 0;
    const bool anchor = r.impl == "nccl" || (r.impl == "peer_copy" && r.mode == "normal");
    if (!ours && !anchor) continue;
    std::printf(
        "{\"bench\":\"ep\",\"xnode\":\"%dx%d\",\"gpus\":%d,\"impl\":\"%s\",\"op\":\"%s\","
        "\"dtype\":\"%s\",\"tokens\":%lld,\"us\":%.2f,\"gbps\":%.2f",
        N, G, w.gpus, r.impl.c_str(), r.op.c_str(), r.dtype.c_str(),
        static_cast<long long>(r.tokens), r.us, r.gbps);
    if (ours)
      std::printf(",\"gpus_per_node\":%d,\"rdma_gbps\":%.2f,\"checked\":%s", r.gpus_per_node,
                  r.rdma_gbps, r.check < 0 ? "null" : (r.check ? "true" : "false"));
    std::printf("}\n");
  }
  std::fflush(stdout);
}

// The cross-node form at the normal shape: direct route, two-stage route with the network hop
// over our NVLink stores, and over NCCL (where the ranks of a local index have distinct GPUs),
// each dispatch checked bit for bit against the reference; NCCL all-to-all and the peer copy of
// the same run. GB/s as DeepEP: all received bytes, and the "RDMA" part (from other nodes, a
// token once per node).
void run_xnode(World& w) {
  const int64_t H = w.opt.hidden, T = w.opt.tokens;
  const int64_t fp8_record = H + H / 128 * 4, bf16_record = H * 2;
  const int G = w.opt.gpus_per_node, K = w.opt.topk, L = w.opt.experts / w.R;
  FM_CHECK_ARG(G > 0 && w.R % G == 0 && w.R / G > 1, "--gpus-per-node ", G, " must divide the ",
               w.R, " ranks into 2 or more nodes");
  const int N = w.R / G;
  make_inputs(w, T, 1);
  const auto cnt = pair_counts(w, T);
  double recv = 0, cross = 0, remote = 0;
  for (int s = 0; s < w.R; ++s) {
    for (int d = 0; d < w.R; ++d) {
      recv += cnt[s][d];
      if (s != d) cross += cnt[s][d];
    }
    for (int64_t t = 0; t < T; ++t) {
      uint32_t nodes = 0;
      for (int k = 0; k < K; ++k) nodes |= 1u << (w.ranks[s].idx[t * K + k] / L / G);
      remote += __builtin_popcount(nodes & ~(1u << (s / G)));
    }
  }
  recv /= w.R;
  cross /= w.R;
  remote /= w.R;
  std::printf(
      "# cross-node: %d nodes x %d ranks, %lld tokens/rank, %.0f tokens received per rank "
      "(%.0f from peers, %.0f from other nodes, a token once per node)\n",
      N, G, static_cast<long long>(T), recv, cross, remote);
  std::vector<int> devs = devices_of(w);
  bool nccl_ok = nccl_available();
  for (int l = 0; l < G; ++l)
    for (int m = 1; m < N; ++m) nccl_ok = nccl_ok && devs[m * G + l] != devs[l];
  w.rdma_bytes_fp8 = remote * fp8_record;
  w.rdma_bytes_bf16 = remote * bf16_record;
  struct Variant {
    int gpus_per_node;
    Wire wire;
    const char* suffix;
  };
  std::vector<Variant> variants = {{0, Wire::kNvlink, "_direct"}, {G, Wire::kNvlink, "_2stage"}};
  if (nccl_ok) variants.push_back({G, Wire::kNccl, "_2stage"});
  for (const Variant& v : variants) {
    w.cfg_gpus_per_node = v.gpus_per_node;
    w.impl_suffix = v.suffix;
    bench_ours(w, "normal", T, Payload::kFP8, 0, {w.opt.blocks.front()}, {w.opt.chunks.front()},
               v.wire, recv * fp8_record, recv * bf16_record);
  }
  w.cfg_gpus_per_node = 0;
  w.impl_suffix.clear();
  w.rdma_bytes_fp8 = w.rdma_bytes_bf16 = 0;
#if defined(FP8MOE_HAVE_NCCL)
  if (!w.comms.empty()) {
    bench_nccl(w, "normal", T, cnt, "dispatch", "fp8", fp8_record, recv * fp8_record);
    bench_nccl(w, "normal", T, cnt, "combine", "bf16", bf16_record, recv * bf16_record);
  }
#endif
  bench_peer(w, static_cast<int64_t>(cross * fp8_record), "normal", "fp8_dispatch_cross_bytes");
  xnode_summary(w, N, G);
}

void run(World& w) {
  if (w.opt.gpus_per_node > 0) return run_xnode(w);
  const int64_t H = w.opt.hidden;
  const int64_t fp8_record = H + H / 128 * 4, bf16_record = H * 2;
  if (w.opt.ab_ll > 0) {  // the low-latency A/B and its anchors only
    const int64_t T = w.opt.ll_tokens;
    make_inputs(w, T, 2);
    const auto cnt = pair_counts(w, T);
    double recv = 0, cross = 0;
    for (int s = 0; s < w.R; ++s)
      for (int d = 0; d < w.R; ++d) {
        recv += cnt[s][d];
        if (s != d) cross += cnt[s][d];
      }
    recv /= w.R;
    cross /= w.R;
    std::printf("# low_latency: %lld tokens/rank, %d ranks, %.0f tokens received per rank\n",
                static_cast<long long>(T), w.R, recv);
    const int64_t cap = w.opt.ll_cap > 0 ? w.opt.ll_cap : w.R * T;
    std::printf("# masked capacity %lld\n", static_cast<long long>(cap));
    const auto med = bench_ab_ll(w, T, cap, w.opt.ll_blocks.front(), w.opt.ll_chunks.front(),
                                 recv * fp8_record, recv * bf16_record);
    double nccl[2] = {0, 0};
#if defined(FP8MOE_HAVE_NCCL)
    if (!w.comms.empty()) {
      bench_nccl(w, "low_latency", T, cnt, "dispatch", "fp8", fp8_record, recv * fp8_record);
      bench_nccl(w, "low_latency", T, cnt, "combine", "bf16", bf16_record, recv * bf16_record);
      for (const Row& r : w.rows)
        if (r.impl == "nccl" && r.mode == "low_latency" && r.op != "dispatch+combine")
          nccl[r.op == "combine"] = r.us;
      if (w.opt.ll_graph > 0)
        bench_nccl_graph(w, T, cnt, fp8_record, bf16_record, recv * (fp8_record + bf16_record));
    }
#endif
    bench_peer(w, static_cast<int64_t>(cross * fp8_record), "low_latency",
               "fp8_dispatch_cross_bytes");
    bench_peer(w, static_cast<int64_t>(cross * bf16_record), "low_latency",
               "bf16_combine_cross_bytes");
    const char* ops[2] = {"dispatch", "combine"};
    const auto& names = w.opt.ll_variants;
    const auto at = [&](const char* name) {
      return static_cast<int>(std::find(names.begin(), names.end(), name) - names.begin());
    };
    const int io = at("old"), in = at("new"), nv = static_cast<int>(names.size());
    const double c = nccl[0] + nccl[1];
    if (io < nv && in < nv) {
      for (int op = 0; op < 2; ++op)
        std::printf("# ab_ll %-8s old %7.1f us  new %7.1f us  (new/old %.3f)  nccl %7.1f us\n",
                    ops[op], med[io][op], med[in][op], med[in][op] / med[io][op], nccl[op]);
      const double o = med[io][0] + med[io][1], n = med[in][0] + med[in][1];
      std::printf(
          "# ab_ll sum      old %7.1f us  new %7.1f us  nccl %7.1f us -> nccl/new %.2fx, %d "
          "rounds\n",
          o, n, c, n > 0 ? c / n : 0.0, std::max(1, w.opt.ab_ll));
    }
    // Every path against the first (medians over the rounds).
    for (int v = 0; v < nv; ++v) {
      const double n = med[v][0] + med[v][1], b = med[0][0] + med[0][1];
      std::printf(
          "# ab_ll_var %-8s dispatch %7.1f  combine %7.1f  sum %7.1f us  (/%s %.3f)  nccl/sum "
          "%.2fx\n",
          names[v].c_str(), med[v][0], med[v][1], n, names[0].c_str(), b > 0 ? n / b : 0.0,
          n > 0 ? c / n : 0.0);
    }
    // --ll-graph: per round of a replayed graph, every path against NCCL's graph.
    double ng = 0;
    for (const Row& r : w.rows)
      if (r.impl == "nccl" && r.op == "dispatch+combine") ng = r.us;
    for (const Row& r : w.rows)
      if (r.impl == "fp8moe" && r.op == "dispatch+combine")
        std::printf("# ll_graph %-24s %7.1f us per round  nccl %7.1f us -> nccl/ours %.2fx%s\n",
                    r.note.c_str(), r.us, ng, r.us > 0 ? ng / r.us : 0.0,
                    r.check == 0 ? " MISMATCH" : "");
    return;
  }
  if (w.opt.ncu) {  // normal FP8 dispatch and combine only, one variant
    make_inputs(w, w.opt.tokens, 1);
    bench_ours(w, "normal", w.opt.tokens, Payload::kFP8, 0, {w.opt.blocks.front()},
               {w.opt.chunks.front()}, Wire::kNvlink, 0, 0);
    return;
  }
  struct Shape {
    const char* mode;
    int64_t T;
    const std::vector<int>* blocks;
  };
  for (const Shape& s : {Shape{"normal", w.opt.tokens, &w.opt.blocks},
                         Shape{"low_latency", w.opt.ll_tokens, &w.opt.ll_blocks}}) {
    make_inputs(w, s.T, s.T == w.opt.tokens ? 1 : 2);
    const auto cnt = pair_counts(w, s.T);
    // Per-rank received tokens (itself included), averaged; and the cross-rank part.
    double recv = 0, cross = 0;
    for (int s2 = 0; s2 < w.R; ++s2)
      for (int d = 0; d < w.R; ++d) {
        recv += cnt[s2][d];
        if (s2 != d) cross += cnt[s2][d];
      }
    recv /= w.R;
    cross /= w.R;
    std::printf(
        "# %s: %lld tokens/rank, %d ranks, %.0f tokens received per rank (%.0f from peers)\n",
        s.mode, static_cast<long long>(s.T), w.R, recv, cross);
    const bool ll = std::string(s.mode) == "low_latency";
    const std::vector<int>& chunks = ll ? w.opt.ll_chunks : w.opt.chunks;
    const int64_t cap = ll ? w.R * s.T : 0;
    if (w.opt.ab_rounds > 0) {  // the variant A/B and this shape's anchors only
      bench_ab(w, s.mode, s.T, cap, s.blocks->front(), chunks.front(), recv * fp8_record,
               recv * bf16_record);
#if defined(FP8MOE_HAVE_NCCL)
      if (!w.comms.empty()) {
        bench_nccl(w, s.mode, s.T, cnt, "dispatch", "fp8", fp8_record, recv * fp8_record);
        bench_nccl(w, s.mode, s.T, cnt, "combine", "bf16", bf16_record, recv * bf16_record);
      }
#endif
      bench_peer(w, static_cast<int64_t>(cross * fp8_record), s.mode, "fp8_dispatch_cross_bytes");
      bench_peer(w, static_cast<int64_t>(cross * bf16_record), s.mode, "bf16_combine_cross_bytes");
      if (!ll && w.opt.graph > 0)
        bench_graph(w, s.T, cnt, fp8_record, bf16_record, recv * fp8_record, recv * bf16_record);
      continue;
    }
    if (!ll)
      bench_ours(w, s.mode, s.T, Payload::kBF16, 0, {s.blocks->front()}, {chunks.front()},
                 Wire::kNvlink, recv * fp8_record, recv * bf16_record);
    bench_ours(w, s.mode, s.T, Payload::kFP8, cap, *s.blocks, chunks, Wire::kNvlink,
               recv * fp8_record, recv * bf16_record);
#if defined(FP8MOE_HAVE_NCCL)
    if (!w.comms.empty()) {
      bench_nccl(w, s.mode, s.T, cnt, "dispatch", "fp8", fp8_record, recv * fp8_record);
      bench_nccl(w, s.mode, s.T, cnt, "dispatch", "bf16", bf16_record, recv * bf16_record);
      bench_nccl(w, s.mode, s.T, cnt, "combine", "bf16", bf16_record, recv * bf16_record);
      bench_ours(w, s.mode, s.T, Payload::kFP8, cap, {s.blocks->front()}, {chunks.front()},
                 Wire::kNccl, recv * fp8_record, recv * bf16_record);
    }
#endif
    bench_peer(w, static_cast<int64_t>(cross * fp8_record), s.mode, "fp8_dispatch_cross_bytes");
    bench_peer(w, static_cast<int64_t>(cross * bf16_record), s.mode, "bf16_combine_cross_bytes");
    if (!ll && w.opt.graph > 0)
      bench_graph(w, s.T, cnt, fp8_record, bf16_record, recv * fp8_record, recv * bf16_record);
  }
  if (w.opt.ab_rounds > 0) {
    if (w.opt.graph > 0) graph_summary(w);
    return;
  }
  bench_peer(w, 256ll << 20, "-", "256MiB");
  summary(w);
  if (w.opt.graph > 0) graph_summary(w);
}

}  // namespace

int main(int argc, char** argv) {
  World w;
  w.opt = parse(argc, argv);
  try {
    FM_CHECK_CUDA(cudaGetDeviceCount(&w.gpus));
    FM_CHECK_ARG(w.gpus > 0, "no GPU");
    cudaDeviceProp prop;
    FM_CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
    w.gpu_name = prop.name;
    w.R = w.gpus * w.opt.ranks_per_gpu;
    for (int r = 0; r < w.R; ++r) {
      Rank k;
      // Cross-node runs keep the ranks of a GPU consecutive, so nodes of G = ranks-per-gpu ranks
      // are GPUs.
      k.device = w.opt.gpus_per_node > 0 ? r / w.opt.ranks_per_gpu : r % w.gpus;
      FM_CHECK_CUDA(cudaSetDevice(k.device));
      bench::create_timed_stream(k);
      w.ranks.push_back(k);
    }
    w.gate_host = bench::alloc_gate_flag();
    if (!w.opt.out.empty()) {
      w.out = std::fopen(w.opt.out.c_str(), "a");
      FM_CHECK_ARG(w.out, "cannot open ", w.opt.out);
    }
#if defined(FP8MOE_HAVE_NCCL)
    if (w.opt.ranks_per_gpu == 1 && w.gpus > 1 && !w.opt.ncu) {
      w.comms.resize(w.R);
      std::vector<int> devs = devices_of(w);
      BENCH_NCCL(ncclCommInitAll(w.comms.data(), w.R, devs.data()));
    }
#endif
    std::printf("# ep_bench on %d x %s, %d ranks, hidden %lld, top-%d of %d experts\n", w.gpus,
                w.gpu_name.c_str(), w.R, static_cast<long long>(w.opt.hidden), w.opt.topk,
                w.opt.experts);
    run(w);
#if defined(FP8MOE_HAVE_NCCL)
    for (auto c : w.comms) ncclCommDestroy(c);
#endif
    if (w.out) std::fclose(w.out);
    // A timing of a wrong result is no result: the run fails, after printing everything.
    int mismatches = 0;
    for (const Row& r : w.rows) mismatches += r.check == 0;
    if (mismatches > 0) {
      std::fprintf(stderr, "ep_bench: %d checked row(s) differ from the reference (MISMATCH)\n",
                   mismatches);
      return 1;
    }
  } catch (const Error& e) {
    std::fprintf(stderr, "ep_bench: %s\n", e.what());
    return e.kind() == ErrorKind::kInvalidArgument ? 2 : 1;
  }
  return 0;
}
