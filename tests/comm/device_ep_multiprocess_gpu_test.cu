// One process per GPU: the test launches R = (visible GPUs) copies of this executable through
// fp8moe/comm/launcher.h; each copy is one rank (EpMultiProcessChild.Rank, selected by
// FP8MOE_EP_MP_CHILD). A rank makes its DeviceEpRank on its own device, trades CUDA IPC handles
// through the launcher's store and runs dispatch, combine and combine_tokens over the NVLink
// kernels, then the same over the NCCL wire with a communicator from nccl_bootstrap.h; first in
// one node, then as nodes of GPUs over the two-stage route (R/2 GPUs per node when R is even:
// 2 x 1 on 2 GPUs, 2 x 2 on 4; also R x 1 from 4 GPUs), whose network hop is our NVLink stores
// or NCCL among the ranks of one local index (ep_nccl_comm_init). Every rank connects the same
// way whatever the wire (all-gather ipc_handle(), connect_ipc). Inputs are drawn per rank from
// fixed seeds, so every rank knows every rank's input and checks its own result bit for bit
// against dispatch_reference / combine_reference / combine_tokens_reference (two rounds through
// the same buffers). A mismatch ends that rank with status 1 (a hang with status 3, after printing
// its flags), which fails the launch naming the rank.
// Run: build/tests/test_comm_gpu --gtest_filter='EpMultiProcess*' (2+ GPUs), or by hand:
//   FP8MOE_EP_MP_CHILD=1 fp8moe launch -n 2 -- test_comm_gpu --gtest_filter=EpMultiProcessChild.*
#include <gtest/gtest.h>

#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "../../src/comm/device_ep_forward.h"
#include "device_copy.h"
#include "ep_test_util.h"
#include "fp8moe/comm/device_ep.h"
#include "fp8moe/comm/launcher.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#if defined(FP8MOE_HAVE_NCCL)
#include "fp8moe/comm/nccl_bootstrap.h"
#endif

namespace fp8moe::comm {
namespace {

constexpr const char* kChildVar = "FP8MOE_EP_MP_CHILD";
constexpr double kWaitS = 60;  // store waits: a rank's CUDA start-up can take seconds

using testing::batches_of;
using testing::expect_same_dispatch;
using testing::expected_node_slot;
using testing::make_inputs;
using testing::RankData;
using testing::Routing;

using testing::to_device;
using testing::to_host;
int visible_gpus() {
  return testing::gpu_count();
}

// A failed expectation ends the rank at once: its peers would otherwise wait for it until their
// own timeouts, and the launcher ends them as soon as this rank's status is known.
void bail_on_failure(int rank, const std::string& where) {
  if (!::testing::Test::HasFailure()) return;
  std::fprintf(stderr, "rank %d: %s: result differs from the CPU reference\n", rank, where.c_str());
  std::fflush(stdout);
  std::fflush(stderr);
  std::_Exit(1);
}

// Bit-for-bit comparison of BF16 rows; reports the first differing element, not both vectors.
void expect_same_rows(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want,
                      int64_t hidden, int rank, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what << ", rank " << rank;
  int64_t bad = 0, first = -1;
  for (size_t i = 0; i < got.size(); ++i)
    if (got[i] != want[i]) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++bad;
    }
  if (bad == 0) return;
  ADD_FAILURE() << what << ", rank " << rank << ": " << bad << " of " << got.size()
                << " values differ; first at token " << first / hidden << " column "
                << first % hidden << ": got 0x" << std::hex << got[first] << ", want 0x"
                << want[first];
}

struct MpCase {
  const char* name;
  int experts_per_rank, top_k;
  int64_t hidden, max_tokens;
  Payload payload;
  Routing routing;
  std::function<int64_t(int rank)> tokens;
  int64_t masked_capacity = 0;
  int max_nodes = 0;  // EpConfig::max_nodes_per_token (two-stage cases)
};

std::vector<MpCase> mp_cases() {
  return {
      {"random_bf16", 8, 4, 512, 96, Payload::kBF16, Routing::kRandom,
       [](int r) { return std::max<int64_t>(0, 96 - 13 * r); }},
      {"random_fp8_k8", 32, 8, 2048, 160, Payload::kFP8, Routing::kRandom,
       [](int r) { return r % 2 ? 129 : 160; }},
      {"holes_t0_fp8", 8, 8, 256, 40, Payload::kFP8, Routing::kHoles,
       [](int r) { return r == 0 ? 0 : 40; }},
      {"skewed_masked_bf16", 16, 4, 256, 64, Payload::kBF16, Routing::kSkewed,
       [](int r) { return 64 - 7 * (r % 3); }, 256},
  };
}

// The two-stage route's cases: besides the one-node shapes, all experts of a token on one rank
// with max_nodes_per_token = 1, FP8 records at hidden 7168 (the V3 row), a masked FP8 layout.
std::vector<MpCase> xnode_cases() {
  return {
      {"x_random_bf16", 8, 4, 512, 96, Payload::kBF16, Routing::kRandom,
       [](int r) { return std::max<int64_t>(0, 96 - 13 * r); }},
      {"x_random_fp8_k8", 32, 8, 2048, 160, Payload::kFP8, Routing::kRandom,
       [](int r) { return r % 2 ? 129 : 160; }},
      {"x_one_rank_m1_fp8", 8, 4, 384, 48, Payload::kFP8, Routing::kOneRank,
       [](int r) { return r == 1 ? 1 : 48; }, 0, 1},
      {"x_hidden_7168_fp8", 4, 8, 7168, 24, Payload::kFP8, Routing::kRandom,
       [](int r) { return 24 - 5 * (r % 2); }},
      {"x_holes_t0_bf16", 8, 8, 256, 40, Payload::kBF16, Routing::kHoles,
       [](int r) { return r == 0 ? 0 : 40; }},
      {"x_skewed_masked_fp8", 16, 4, 1024, 64, Payload::kFP8, Routing::kSkewed,
       [](int r) { return 64 - 7 * (r % 3); }, 256},
  };
}

struct Rank {
  RankEnv env;
  int device = 0;
  int gpus = 1;
  Store store;
};

// The stream drained, within a bound: device waits end by themselves within cfg.timeout_s, so a
// stream still busy well after that is a hang. The rank then prints its flags (two-stage route)
// and exits 3, which ends the launch naming it, instead of waiting for the launcher's timeout.
void sync_bounded(const Rank& me, const EpConfig& cfg, const DeviceEpRank& ep, cudaStream_t stream,
                  const std::string& at) {
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  for (;;) {
    const cudaError_t e = cudaStreamQuery(stream);
    if (e == cudaSuccess) return;
    if (e != cudaErrorNotReady) FM_CHECK_CUDA(e);
    if (Clock::now() - t0 > std::chrono::duration<double>(4 * cfg.timeout_s + 5)) {
      std::fprintf(stderr, "rank %d: HANG in %s\n", me.env.rank, at.c_str());
      if (cfg.nodes() > 1)
        std::fprintf(
            stderr, "  %s\n",
            detail::forward_debug_state(cfg, me.env.rank, me.device, ep.workspace()).c_str());
      std::fflush(stdout);
      std::fflush(stderr);
      std::_Exit(3);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

// One case on one topology (gpus_per_node 0: one node) and wire; nccl_comm: this rank's
// communicator for that topology (Wire::kNccl).
void run_case(Rank& me, const MpCase& c, int case_index, int gpus_per_node, Wire wire,
              void* nccl_comm) {
  const int R = me.env.world_size, rank = me.env.rank;
  const std::string topo =
      gpus_per_node > 0 ? std::to_string(R / gpus_per_node) + "x" + std::to_string(gpus_per_node)
                        : std::string("1node");
  const std::string where = std::string(wire_name(wire)) + " " + topo + " case " + c.name;
  const std::string tag = std::string(wire_name(wire)) + "/" + topo + "/" + c.name;
  const auto t0 = std::chrono::steady_clock::now();
  EpConfig cfg;
  cfg.num_ranks = R;
  cfg.gpus_per_node = gpus_per_node;
  cfg.num_experts = c.experts_per_rank * R;
  cfg.top_k = c.top_k;
  cfg.hidden = c.hidden;
  cfg.max_tokens_per_rank = c.max_tokens;
  cfg.payload = c.payload;
  cfg.masked_capacity = c.masked_capacity;
  cfg.max_nodes_per_token = c.max_nodes;
  cfg.timeout_s = 20;
  const uint64_t seed = 700 + case_index + 100 * gpus_per_node;
  std::vector<int64_t> tokens(R);
  for (int r = 0; r < R; ++r) tokens[r] = c.tokens(r);

  // ---- every rank's input and the reference, computed by every rank ----
  const std::vector<RankData> data = make_inputs(cfg, tokens, c.routing, seed);
  const std::vector<DispatchResult> want = dispatch_reference(cfg, batches_of(data));
  EpConfig rows_cfg = cfg;  // one row per received slot (combine_tokens)
  rows_cfg.masked_capacity = 0;
  rows_cfg.max_rows = (cfg.max_recv_tokens() + 127) / 128 * 128;
  std::vector<std::vector<uint16_t>> ys, grads;
  std::vector<const uint16_t*> y_ptrs, g_ptrs;
  for (int r = 0; r < R; ++r) {
    ys.push_back(testing::expert_outputs(cfg, r, seed));
    grads.push_back(testing::expert_outputs(rows_cfg, r, seed + 1));
  }
  for (int r = 0; r < R; ++r) {
    y_ptrs.push_back(ys[r].data());
    g_ptrs.push_back(grads[r].data());
  }
  for (int r = 0; r < R; ++r)
    FM_CHECK(!want[r].grouped.overflow, where, ": case overflows its bound on rank ", r);
  const std::vector<uint16_t> want_out = combine_reference(cfg, want, y_ptrs)[rank];
  const std::vector<uint16_t> want_back = combine_tokens_reference(cfg, want, g_ptrs)[rank];
  const std::vector<int32_t> want_node_slot =
      cfg.nodes() > 1 ? expected_node_slot(cfg, want[rank].handle) : std::vector<int32_t>{};

  // ---- this rank's device side, connected the same way for every wire and topology ----
  FM_CHECK_CUDA(cudaSetDevice(me.device));
  DeviceEpOptions opt;
  opt.wire = wire;
  opt.nccl_comm = nccl_comm;
  opt.num_blocks = 6;
  opt.ranks_per_device = (R + me.gpus - 1) / me.gpus;  // kernels that poll peers stay resident
  auto ep = std::make_unique<DeviceEpRank>(cfg, rank, me.device, opt);
  {
    const cudaIpcMemHandle_t mine = ep->ipc_handle();
    const auto all = me.store.all_gather(
        "ipc/" + tag, std::string_view(reinterpret_cast<const char*>(&mine), sizeof(mine)), kWaitS);
    std::vector<cudaIpcMemHandle_t> handles(R);
    for (int r = 0; r < R; ++r) {
      FM_CHECK(all[r].size() == sizeof(cudaIpcMemHandle_t), "rank ", r, " published ",
               all[r].size(), " bytes for its IPC handle");
      std::memcpy(&handles[r], all[r].data(), sizeof(cudaIpcMemHandle_t));
    }
    ep->connect_ipc(handles);
  }
  me.store.barrier("connected", kWaitS);

  const RankData& d = data[rank];
  const int64_t H = cfg.hidden;
  cudaStream_t stream;
  FM_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  uint16_t* x = to_device(me.device, d.x);
  int32_t* idx = to_device(me.device, d.idx);
  float* w = to_device(me.device, d.w);
  uint16_t* y = to_device(me.device, ys[rank]);
  uint16_t* rows = to_device(me.device, grads[rank]);
  uint16_t* out =
      to_device(me.device, std::vector<uint16_t>(std::max<int64_t>(1, d.tokens) * H, 0xFFFF));
  const DeviceBatch batch{d.tokens, x, idx, w};
  auto sync_and_check = [&](const std::string& at) {
    sync_bounded(me, cfg, *ep, stream, at);
    ep->check();
  };

  // Round 0 meets at a barrier after every phase; round 1 runs the phases back to back, so only
  // the device-side flags and acknowledgements (and NCCL's matching) order this rank against its
  // peers.
  for (int round = 0; round < 2; ++round) {
    const std::string at = where + " round " + std::to_string(round);
    ep->dispatch_send(batch, stream);
    ep->dispatch_recv(stream);
    sync_and_check(at + " dispatch");
    const DispatchResult got = ep->download();
    expect_same_dispatch(cfg, want[rank], got, rank);
    EXPECT_EQ(got.handle.slot, want[rank].handle.slot) << "rank " << rank;
    if (cfg.nodes() > 1) EXPECT_EQ(got.handle.node_slot, want_node_slot) << "rank " << rank;
    bail_on_failure(rank, at + " dispatch");
    if (round == 0) me.store.barrier("phase", kWaitS);

    FM_CHECK_CUDA(cudaMemsetAsync(out, 0xFF, d.tokens * H * 2, stream));
    ep->combine_send(y, stream);
    ep->combine_recv(out, stream);
    sync_and_check(at + " combine");
    expect_same_rows(to_host(me.device, out, d.tokens * H), want_out, H, rank, "combine");
    bail_on_failure(rank, at + " combine");
    if (round == 0) me.store.barrier("phase", kWaitS);

    FM_CHECK_CUDA(cudaMemsetAsync(out, 0xFF, d.tokens * H * 2, stream));
    ep->combine_tokens_send(rows, stream);
    ep->combine_recv(out, stream);
    sync_and_check(at + " combine_tokens");
    expect_same_rows(to_host(me.device, out, d.tokens * H), want_back, H, rank, "combine_tokens");
    bail_on_failure(rank, at + " combine_tokens");
    if (round == 0) me.store.barrier("phase", kWaitS);
  }

  // NOTE: peers write into this rank's workspace (records, acknowledgements): nobody frees or
  // unmaps before everybody is done; and nobody makes the next case's workspace (which may reuse
  // the address) before every peer has closed its mapping of this one.
  me.store.barrier("case done", kWaitS);
  ep.reset();
  for (void* p : {static_cast<void*>(x), static_cast<void*>(idx), static_cast<void*>(w),
                  static_cast<void*>(y), static_cast<void*>(rows), static_cast<void*>(out)})
    FM_CHECK_CUDA(cudaFree(p));
  FM_CHECK_CUDA(cudaStreamDestroy(stream));
  me.store.barrier("case closed", kWaitS);
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::printf(
      "rank %d: %s: %lld tokens, dispatch + combine + combine_tokens x2 equal the CPU "
      "reference (%.0f ms)\n",
      rank, where.c_str(), static_cast<long long>(d.tokens), ms);
  std::fflush(stdout);
}

// GPUs per node of the two-stage topologies run at R ranks: R/2 (two nodes) when R is even, and
// one (R nodes) from 4 ranks on.
std::vector<int> xnode_topologies(int R) {
  std::vector<int> g;
  if (R >= 2 && R % 2 == 0) g.push_back(R / 2);
  if (R >= 4) g.push_back(1);
  return g;
}

void run_rank() {
  Rank me{rank_env(), 0, visible_gpus(), Store::from_env()};
  me.device = rank_device(me.env, me.gpus);
  FM_CHECK_CUDA(cudaSetDevice(me.device));
  cudaDeviceProp prop;
  FM_CHECK_CUDA(cudaGetDeviceProperties(&prop, me.device));
  const int R = me.env.world_size;
  std::printf("rank %d of %d: pid %d, device %d (%s), NCCL_NVLS_ENABLE=%s\n", me.env.rank, R,
              static_cast<int>(::getpid()), me.device, prop.name,
              std::getenv("NCCL_NVLS_ENABLE") ? std::getenv("NCCL_NVLS_ENABLE") : "(unset)");
  std::fflush(stdout);
  const auto cases = mp_cases();
  const auto xcases = xnode_cases();
  const std::vector<int> topologies = xnode_topologies(R);
  for (size_t i = 0; i < cases.size(); ++i)
    run_case(me, cases[i], static_cast<int>(i), 0, Wire::kNvlink, nullptr);
  for (int g : topologies)
    for (size_t i = 0; i < xcases.size(); ++i)
      run_case(me, xcases[i], static_cast<int>(i), g, Wire::kNvlink, nullptr);
#if defined(FP8MOE_HAVE_NCCL)
  if (R > me.gpus) {
    std::printf("rank %d: NCCL wire skipped: %d ranks on %d GPUs (NCCL takes one rank a GPU)\n",
                me.env.rank, R, me.gpus);
    return;
  }
  {
    EpConfig one;  // the communicator depends on the topology only
    one.num_ranks = R;
    void* comm = ep_nccl_comm_init(me.store, one, me.device, "ep", kWaitS);
    for (size_t i = 0; i < cases.size(); ++i)
      run_case(me, cases[i], static_cast<int>(i), 0, Wire::kNccl, comm);
    me.store.barrier("nccl done", kWaitS);
    nccl_comm_destroy(comm);
  }
  for (int g : topologies) {
    EpConfig topo;
    topo.num_ranks = R;
    topo.gpus_per_node = g;
    // One communicator per local index, over the ranks of that index (comm rank = node).
    void* comm = ep_nccl_comm_init(me.store, topo, me.device, "ep_g" + std::to_string(g), kWaitS);
    for (size_t i = 0; i < xcases.size(); ++i)
      run_case(me, xcases[i], static_cast<int>(i), g, Wire::kNccl, comm);
    me.store.barrier("nccl done", kWaitS);
    nccl_comm_destroy(comm);
  }
#else
  std::printf("rank %d: NCCL wire skipped: built without NCCL\n", me.env.rank);
#endif
}

#if defined(FP8MOE_HAVE_NCCL)
// The bootstrap refuses, before any NCCL call, a topology that does not fit the store or itself.
TEST(EpNcclBootstrap, RejectsATopologyThatDoesNotFit) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                    ("fp8moe_ep_bootstrap_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  Store store(dir.string(), 1, 4);
  auto message_of = [](const std::function<void()>& fn) -> std::string {
    try {
      fn();
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument) << e.message();
      return e.message();
    }
    ADD_FAILURE() << "expected an error";
    return "";
  };
  EpConfig cfg;
  cfg.num_ranks = 3;
  std::string m = message_of([&] { ep_nccl_comm_init(store, cfg, 0); });
  EXPECT_NE(m.find("rank 1: the store has 4 ranks, the EP config 3"), std::string::npos) << m;
  cfg.num_ranks = 4;
  cfg.gpus_per_node = 3;
  m = message_of([&] { ep_nccl_comm_init(store, cfg, 0); });
  EXPECT_NE(m.find("gpus_per_node=3 does not divide num_ranks=4"), std::string::npos) << m;
  m = message_of([&] { nccl_comm_init_group(store, 0, "g", 2, 2); });
  EXPECT_NE(m.find("rank 1: group rank 2 of 2 for communicator 'g'"), std::string::npos) << m;
  std::filesystem::remove_all(dir);
}
#endif

// One rank of the job below (or of `fp8moe launch`); skipped when run on its own.
TEST(EpMultiProcessChild, Rank) {
  if (!std::getenv(kChildVar)) GTEST_SKIP() << "runs as a rank of EpMultiProcess.* only";
  try {
    run_rank();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    std::fflush(stdout);
    std::fflush(stderr);
    std::_Exit(1);
  }
}

TEST(EpMultiProcess, OneProcessPerGpuMatchesReference) {
  if (std::getenv(kChildVar)) GTEST_SKIP() << "inside a rank";
  const int gpus = visible_gpus();
  if (gpus < 2) GTEST_SKIP() << "needs 2 or more GPUs, found " << gpus;
  LaunchOptions opt;
  opt.num_ranks = gpus;
  opt.command = {std::filesystem::read_symlink("/proc/self/exe").string(),
                 "--gtest_filter=EpMultiProcessChild.Rank"};
  opt.env = {{kChildVar, "1"}};
  opt.timeout_s = 300;
  const LaunchResult res = launch(opt);
  ASSERT_TRUE(res.ok()) << res.error;
  for (const RankExit& e : res.ranks) EXPECT_TRUE(e.exited && e.code == 0) << describe(e);
}

}  // namespace
}  // namespace fp8moe::comm
