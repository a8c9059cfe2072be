// One process per GPU: the test launches R = (visible GPUs) copies of this executable through
// fp8moe/comm/launcher.h; each copy is one rank (EpMultiProcessChild.Rank, selected by
// FP8MOE_EP_MP_CHILD). A rank makes its DeviceEpRank on its own device, trades CUDA IPC handles
// through the launcher's store and runs dispatch, combine and combine_tokens over the NVLink
// kernels, then the same over the NCCL wire with a communicator from nccl_bootstrap.h. Inputs are
// drawn per rank from fixed seeds, so every rank knows every rank's input and checks its own
// result bit for bit against dispatch_reference / combine_reference. A mismatch ends that rank
// with status 1, which fails the launch naming the rank.
// Run: build-launch/tests/test_comm_gpu --gtest_filter='EpMultiProcess*' (2+ GPUs), or by hand:
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
#include <vector>

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

struct Rank {
  RankEnv env;
  int device = 0;
  Store store;
};

void run_case(Rank& me, const MpCase& c, int case_index, Wire wire, void* nccl_comm) {
  const int R = me.env.world_size, rank = me.env.rank;
  const std::string where = std::string(wire_name(wire)) + " case " + c.name;
  const auto t0 = std::chrono::steady_clock::now();
  EpConfig cfg;
  cfg.num_ranks = R;
  cfg.num_experts = c.experts_per_rank * R;
  cfg.top_k = c.top_k;
  cfg.hidden = c.hidden;
  cfg.max_tokens_per_rank = c.max_tokens;
  cfg.payload = c.payload;
  cfg.masked_capacity = c.masked_capacity;
  cfg.timeout_s = 20;
  const uint64_t seed = 700 + case_index;
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

  // ---- this rank's device side ----
  FM_CHECK_CUDA(cudaSetDevice(me.device));
  DeviceEpOptions opt;
  opt.wire = wire;
  opt.nccl_comm = nccl_comm;
  opt.num_blocks = 6;
  auto ep = std::make_unique<DeviceEpRank>(cfg, rank, me.device, opt);
  if (wire == Wire::kNvlink) {
    const cudaIpcMemHandle_t mine = ep->ipc_handle();
    const auto all = me.store.all_gather(
        std::string("ipc/") + c.name,
        std::string_view(reinterpret_cast<const char*>(&mine), sizeof(mine)), kWaitS);
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
  auto sync_and_check = [&] {
    FM_CHECK_CUDA(cudaStreamSynchronize(stream));
    ep->check();
  };

  // Round 0 meets at a barrier after every phase; round 1 runs the phases back to back, so only
  // the device-side flags and acknowledgements order this rank against its peers.
  for (int round = 0; round < 2; ++round) {
    const std::string at = where + " round " + std::to_string(round);
    ep->dispatch_send(batch, stream);
    ep->dispatch_recv(stream);
    sync_and_check();
    const DispatchResult got = ep->download();
    expect_same_dispatch(cfg, want[rank], got, rank);
    EXPECT_EQ(got.handle.slot, want[rank].handle.slot) << "rank " << rank;
    bail_on_failure(rank, at + " dispatch");
    if (round == 0) me.store.barrier("phase", kWaitS);

    FM_CHECK_CUDA(cudaMemsetAsync(out, 0xFF, d.tokens * H * 2, stream));
    ep->combine_send(y, stream);
    ep->combine_recv(out, stream);
    sync_and_check();
    expect_same_rows(to_host(me.device, out, d.tokens * H), want_out, H, rank, "combine");
    bail_on_failure(rank, at + " combine");
    if (round == 0) me.store.barrier("phase", kWaitS);

    FM_CHECK_CUDA(cudaMemsetAsync(out, 0xFF, d.tokens * H * 2, stream));
    ep->combine_tokens_send(rows, stream);
    ep->combine_recv(out, stream);
    sync_and_check();
    expect_same_rows(to_host(me.device, out, d.tokens * H), want_back, H, rank, "combine_tokens");
    bail_on_failure(rank, at + " combine_tokens");
    if (round == 0) me.store.barrier("phase", kWaitS);
  }

  // NOTE: peers write into this rank's workspace (records, acknowledgements): nobody frees or
  // unmaps before everybody is done.
  me.store.barrier("case done", kWaitS);
  ep.reset();
  for (void* p : {static_cast<void*>(x), static_cast<void*>(idx), static_cast<void*>(w),
                  static_cast<void*>(y), static_cast<void*>(rows), static_cast<void*>(out)})
    FM_CHECK_CUDA(cudaFree(p));
  FM_CHECK_CUDA(cudaStreamDestroy(stream));
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::printf(
      "rank %d: %s: %lld tokens, dispatch + combine + combine_tokens x2 equal the CPU "
      "reference (%.0f ms)\n",
      rank, where.c_str(), static_cast<long long>(d.tokens), ms);
  std::fflush(stdout);
}

void run_rank() {
  Rank me{rank_env(), 0, Store::from_env()};
  const int gpus = visible_gpus();
  me.device = rank_device(me.env, gpus);
  FM_CHECK_CUDA(cudaSetDevice(me.device));
  cudaDeviceProp prop;
  FM_CHECK_CUDA(cudaGetDeviceProperties(&prop, me.device));
  std::printf("rank %d of %d: pid %d, device %d (%s), NCCL_NVLS_ENABLE=%s\n", me.env.rank,
              me.env.world_size, static_cast<int>(::getpid()), me.device, prop.name,
              std::getenv("NCCL_NVLS_ENABLE") ? std::getenv("NCCL_NVLS_ENABLE") : "(unset)");
  std::fflush(stdout);
  const auto cases = mp_cases();
  for (size_t i = 0; i < cases.size(); ++i)
    run_case(me, cases[i], static_cast<int>(i), Wire::kNvlink, nullptr);
#if defined(FP8MOE_HAVE_NCCL)
  if (me.env.world_size > gpus) {
    std::printf("rank %d: NCCL wire skipped: %d ranks on %d GPUs (NCCL takes one rank a GPU)\n",
                me.env.rank, me.env.world_size, gpus);
    return;
  }
  void* comm = nccl_comm_init_rank(me.store, me.device, "ep", kWaitS);
  for (size_t i = 0; i < cases.size(); ++i)
    run_case(me, cases[i], static_cast<int>(i), Wire::kNccl, comm);
  me.store.barrier("nccl done", kWaitS);
  nccl_comm_destroy(comm);
#else
  std::printf("rank %d: NCCL wire skipped: built without NCCL\n", me.env.rank);
#endif
}

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
