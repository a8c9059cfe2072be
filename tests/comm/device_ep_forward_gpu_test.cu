// The two-stage (cross-node) route of the device back end against the CPU reference, bit for bit:
// "nodes" of GPUs (2 x 1 and 2 x 2 ranks on 2 GPUs) and of ranks sharing one GPU (2 x 2 and
// 4 x 1 on one GPU), the network hop over our NVLink stores and over NCCL, random / skewed /
// one-rank / holes routings, ranks with T = 0, k = 1 and k = 8, FP8 and BF16, grouped and masked
// layouts, dispatch then combine and combine_tokens twice through the same buffers, a captured
// graph replayed, and the failures: max_nodes_per_token, a silent peer, an overflow.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <thread>

#include "../../src/comm/device_ep_forward.h"
#include "device_copy.h"
#include "ep_test_util.h"
#include "fp8moe/comm/device_ep.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"

namespace fp8moe::comm {
namespace {

using testing::batches_of;
using testing::expect_same_dispatch;
using testing::expected_node_slot;
using testing::gpu_count;
using testing::make_inputs;
using testing::RankData;
using testing::Routing;
using testing::to_device;
using testing::to_host;

// Progress on stderr with seconds since the start, so that a run cut short says where it was.
void progress(const std::string& what) {
  static const auto t0 = std::chrono::steady_clock::now();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "  .. %7.2f s %s\n", s, what.c_str());
}

struct RankBuffers {
  int device = 0;
  cudaStream_t stream = nullptr;
  uint16_t *x = nullptr, *y = nullptr, *rows = nullptr, *out = nullptr;
  int32_t* idx = nullptr;
  float* w = nullptr;
};

struct Harness {
  EpConfig cfg;
  std::vector<RankData> data;
  std::vector<std::vector<uint16_t>> ys, grads;
  std::vector<RankBuffers> buf;
  std::unique_ptr<DeviceEpGroup> group;
  bool nccl = false;

  Harness(const EpConfig& c, const std::vector<int>& devices, const std::vector<int64_t>& tokens,
          Routing routing, uint64_t seed, DeviceEpOptions opt = {})
      : cfg(c), nccl(opt.wire == Wire::kNccl) {
    data = make_inputs(cfg, tokens, routing, seed);
    group = std::make_unique<DeviceEpGroup>(cfg, devices, opt);
    for (int r = 0; r < cfg.num_ranks; ++r) {
      ys.push_back(testing::expert_outputs(cfg, r, seed));
      EpConfig rows_cfg = cfg;
      rows_cfg.masked_capacity = 0;
      rows_cfg.max_rows = (cfg.max_recv_tokens() + 127) / 128 * 128;
      grads.push_back(testing::expert_outputs(rows_cfg, r, seed + 1));
      RankBuffers b;
      b.device = devices[r];
      FM_CHECK_CUDA(cudaSetDevice(b.device));
      FM_CHECK_CUDA(cudaStreamCreateWithFlags(&b.stream, cudaStreamNonBlocking));
      b.x = to_device(b.device, data[r].x);
      b.idx = to_device(b.device, data[r].idx);
      b.w = to_device(b.device, data[r].w);
      b.y = to_device(b.device, ys[r]);
      b.rows = to_device(b.device, grads[r]);
      b.out = to_device(b.device, std::vector<uint16_t>(
                                      std::max<int64_t>(1, data[r].tokens) * cfg.hidden, 0xFFFF));
      buf.push_back(b);
    }
  }
  ~Harness() {
    for (auto& b : buf) {
      cudaSetDevice(b.device);
      cudaStreamSynchronize(b.stream);
      for (void* p :
           {static_cast<void*>(b.x), static_cast<void*>(b.y), static_cast<void*>(b.rows),
            static_cast<void*>(b.out), static_cast<void*>(b.idx), static_cast<void*>(b.w)})
        cudaFree(p);
      cudaStreamDestroy(b.stream);
    }
  }
  DeviceBatch batch(int r) const { return {data[r].tokens, buf[r].x, buf[r].idx, buf[r].w}; }
  // Every rank's stream drained. NOTE: device waits end by themselves within timeout_s; a
  // stream still busy well after that is a hang, so the run stops here with every rank's epochs,
  // block counters and flags instead of waiting for the test's outer timeout.
  void sync(const char* what = "sync") {
    using Clock = std::chrono::steady_clock;
    const auto t0 = Clock::now();
    for (;;) {
      bool done = true;
      for (auto& b : buf) {
        FM_CHECK_CUDA(cudaSetDevice(b.device));
        const cudaError_t e = cudaStreamQuery(b.stream);
        if (e == cudaErrorNotReady)
          done = false;
        else
          FM_CHECK_CUDA(e);
      }
      if (done) break;
      if (Clock::now() - t0 > std::chrono::duration<double>(4 * cfg.timeout_s + 5)) {
        std::fprintf(stderr, "HANG in %s\n", what);
        for (int r = 0; r < cfg.num_ranks; ++r)
          std::fprintf(
              stderr, "  %s\n",
              detail::forward_debug_state(cfg, r, buf[r].device, group->rank(r).workspace())
                  .c_str());
        std::fflush(stderr);
        std::_Exit(3);
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    if (ms > 200) progress(std::string(what) + " took " + std::to_string(ms) + " ms");
  }
  void dispatch() {
    if (nccl) nccl_group_start();
    for (int r = 0; r < cfg.num_ranks; ++r) group->rank(r).dispatch_send(batch(r), buf[r].stream);
    if (nccl) nccl_group_end();
    for (int r = 0; r < cfg.num_ranks; ++r) group->rank(r).dispatch_recv(buf[r].stream);
  }
  void combine(bool weighted) {
    if (nccl) nccl_group_start();
    for (int r = 0; r < cfg.num_ranks; ++r) {
      FM_CHECK_CUDA(cudaSetDevice(buf[r].device));
      FM_CHECK_CUDA(
          cudaMemsetAsync(buf[r].out, 0xFF, data[r].tokens * cfg.hidden * 2, buf[r].stream));
      if (weighted)
        group->rank(r).combine_send(buf[r].y, buf[r].stream);
      else
        group->rank(r).combine_tokens_send(buf[r].rows, buf[r].stream);
    }
    if (nccl) nccl_group_end();
    for (int r = 0; r < cfg.num_ranks; ++r) group->rank(r).combine_recv(buf[r].out, buf[r].stream);
  }
  std::vector<uint16_t> out(int r) {
    return to_host(buf[r].device, buf[r].out, data[r].tokens * cfg.hidden);
  }
};

void check_against_reference(Harness& h, int rounds) {
  const EpConfig& cfg = h.cfg;
  const auto want = dispatch_reference(cfg, batches_of(h.data));
  std::vector<const uint16_t*> y, g;
  for (int r = 0; r < cfg.num_ranks; ++r) {
    y.push_back(h.ys[r].data());
    g.push_back(h.grads[r].data());
  }
  bool overflow = false;
  for (const auto& w : want) overflow = overflow || w.grouped.overflow;
  std::vector<std::vector<uint16_t>> want_out;
  if (overflow) {
    for (int r = 0; r < cfg.num_ranks; ++r) want_out.emplace_back(h.data[r].tokens * cfg.hidden, 0);
  } else {
    want_out = combine_reference(cfg, want, y);
  }
  auto check = [&] {
    if (!overflow) return h.group->check();
    try {
      h.group->check();
      ADD_FAILURE() << "overflow not reported";
    } catch (const Error& e) {
      EXPECT_NE(e.message().find("overflowed its row bound"), std::string::npos) << e.message();
    }
  };
  const auto want_back = combine_tokens_reference(cfg, want, g);
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    h.dispatch();
    h.sync("dispatch");
    check();
    for (int r = 0; r < cfg.num_ranks; ++r) {
      DispatchResult got = h.group->rank(r).download();
      expect_same_dispatch(cfg, want[r], got, r);
      ASSERT_EQ(got.handle.slot, want[r].handle.slot) << "rank " << r;
      ASSERT_EQ(got.handle.node_slot, expected_node_slot(cfg, want[r].handle)) << "rank " << r;
    }
    h.combine(true);
    h.sync("combine");
    check();
    for (int r = 0; r < cfg.num_ranks; ++r)
      ASSERT_EQ(h.out(r), want_out[r]) << "combine, rank " << r;
    h.combine(false);
    h.sync("combine_tokens");
    check();
    for (int r = 0; r < cfg.num_ranks; ++r)
      ASSERT_EQ(h.out(r), want_back[r]) << "combine_tokens, rank " << r;
  }
}

struct Case {
  const char* name;
  int N, G, E, K;  // nodes x ranks per node
  int64_t H, Tmax;
  std::vector<int64_t> tokens;
  Routing routing;
  int64_t masked_capacity = 0;
  int max_nodes = 0;
};

std::vector<Case> cases() {
  return {
      {"random_2x2", 2, 2, 32, 4, 512, 96, {96, 70, 96, 33}, Routing::kRandom},
      {"skewed_2x2", 2, 2, 32, 4, 256, 64, {64, 64, 64, 64}, Routing::kSkewed},
      {"one_rank_m1_2x2", 2, 2, 16, 4, 384, 48, {48, 1, 30, 48}, Routing::kOneRank, 0, 1},
      {"none_to_last_2x2", 2, 2, 16, 2, 256, 40, {40, 40, 40, 40}, Routing::kNoneToLastRank},
      {"t0_2x2", 2, 2, 16, 3, 256, 32, {0, 32, 0, 5}, Routing::kRandom},
      {"k1_2x1", 2, 1, 8, 1, 256, 200, {200, 150}, Routing::kRandom},
      {"k8_256_experts_2x1", 2, 1, 256, 8, 2048, 160, {160, 129}, Routing::kRandom, 0, 2},
      {"hidden_7168_2x2", 2, 2, 16, 8, 7168, 40, {40, 30, 17, 40}, Routing::kRandom},
      {"holes_2x2", 2, 2, 32, 8, 256, 40, {40, 12, 40, 40}, Routing::kHoles},
      {"masked_2x2", 2, 2, 16, 8, 1024, 64, {64, 50, 64, 1}, Routing::kRandom, 256},
      {"random_4x1", 4, 1, 32, 8, 256, 100, {100, 64, 0, 77}, Routing::kRandom},
      {"skewed_4x1_m4", 4, 1, 16, 4, 512, 70, {70, 70, 70, 70}, Routing::kSkewed, 0, 4},
      {"many_tiles_2x1", 2, 1, 64, 8, 256, 1100, {1100, 777}, Routing::kRandom},
  };
}

EpConfig config_of(const Case& c, Payload p) {
  EpConfig cfg = testing::config(c.N * c.G, c.G, c.E, c.K, c.H, c.Tmax, p);
  cfg.timeout_s = 3.0;
  cfg.masked_capacity = c.masked_capacity;
  cfg.max_nodes_per_token = c.max_nodes;
  return cfg;
}

// Ranks of node n on GPU n % gpus ("nodes" of GPUs), or all on GPU 0.
std::vector<int> node_devices(int N, int G, int gpus) {
  std::vector<int> d;
  for (int n = 0; n < N; ++n)
    for (int l = 0; l < G; ++l) d.push_back(n % gpus);
  return d;
}

class ForwardTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (gpu_count() == 0) GTEST_SKIP() << "no GPU";
  }
};

// gpus: GPUs the nodes are spread over (1: every rank on GPU 0).
void run_cases(Payload p, int gpus, Wire wire) {
  int ran = 0;
  for (const Case& c : cases()) {
    const auto devices = node_devices(c.N, c.G, gpus);
    if (wire == Wire::kNccl) {  // NCCL: the ranks of one local index on distinct GPUs
      if (gpus < c.N) continue;
    }
    ++ran;
    progress(std::string("case ") + c.name + " " + payload_name(p) + " " + wire_name(wire) +
             " on " + std::to_string(gpus) + " GPU(s)");
    SCOPED_TRACE(std::string(c.name) + " " + payload_name(p) + " on " + std::to_string(gpus) +
                 " GPU(s), network hop over " + wire_name(wire));
    DeviceEpOptions opt;
    opt.wire = wire;
    opt.num_blocks = 1 + ran % 5;  // fewer blocks than tokens: grid-stride paths
    opt.recv_blocks = ran % 3 == 0 ? 3 : 0;
    Harness h(config_of(c, p), devices, c.tokens, c.routing, 70 + ran, opt);
    check_against_reference(h, 2);
  }
  EXPECT_GT(ran, 0);
}

TEST_F(ForwardTest, NodesOfGpusNvlinkWire) {
  if (gpu_count() < 2) GTEST_SKIP() << "needs 2 GPUs";
  run_cases(Payload::kFP8, 2, Wire::kNvlink);
  run_cases(Payload::kBF16, 2, Wire::kNvlink);
}
TEST_F(ForwardTest, NodesOfGpusNcclWire) {
  if (gpu_count() < 2) GTEST_SKIP() << "needs 2 GPUs";
  if (!nccl_available()) GTEST_SKIP() << "built without NCCL";
  run_cases(Payload::kFP8, 2, Wire::kNccl);
  run_cases(Payload::kBF16, 2, Wire::kNccl);
}
TEST_F(ForwardTest, NodesOnOneGpu) {
  run_cases(Payload::kFP8, 1, Wire::kNvlink);
  run_cases(Payload::kBF16, 1, Wire::kNvlink);
}

TEST_F(ForwardTest, GraphCapturedRoundReplays) {
  const int gpus = std::min(2, gpu_count());
  const Case c{"graph", 2, 2, 32, 8, 1024, 128, {128, 90, 17, 128}, Routing::kRandom};
  const EpConfig cfg = config_of(c, Payload::kFP8);
  Harness h(cfg, node_devices(2, 2, gpus), c.tokens, c.routing, 9);
  const auto want = dispatch_reference(cfg, batches_of(h.data));
  std::vector<const uint16_t*> y;
  for (int r = 0; r < 4; ++r) y.push_back(h.ys[r].data());
  const auto want_out = combine_reference(cfg, want, y);
  std::vector<cudaGraphExec_t> execs;
  for (int r = 0; r < 4; ++r) {
    FM_CHECK_CUDA(cudaSetDevice(h.buf[r].device));
    FM_CHECK_CUDA(cudaStreamBeginCapture(h.buf[r].stream, cudaStreamCaptureModeThreadLocal));
    auto& ep = h.group->rank(r);
    ep.dispatch_send(h.batch(r), h.buf[r].stream);
    ep.dispatch_recv(h.buf[r].stream);
    ep.combine_send(h.buf[r].y, h.buf[r].stream);
    ep.combine_recv(h.buf[r].out, h.buf[r].stream);
    cudaGraph_t graph;
    FM_CHECK_CUDA(cudaStreamEndCapture(h.buf[r].stream, &graph));
    cudaGraphExec_t exec;
    FM_CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    FM_CHECK_CUDA(cudaGraphDestroy(graph));
    execs.push_back(exec);
  }
  for (int replay = 0; replay < 3; ++replay) {
    for (int r = 0; r < 4; ++r) {
      FM_CHECK_CUDA(cudaSetDevice(h.buf[r].device));
      FM_CHECK_CUDA(
          cudaMemsetAsync(h.buf[r].out, 0xFF, h.data[r].tokens * cfg.hidden * 2, h.buf[r].stream));
      FM_CHECK_CUDA(cudaGraphLaunch(execs[r], h.buf[r].stream));
    }
    h.sync();
    h.group->check();
    for (int r = 0; r < 4; ++r) ASSERT_EQ(h.out(r), want_out[r]) << "replay " << replay;
  }
  for (auto e : execs) cudaGraphExecDestroy(e);
}

TEST_F(ForwardTest, NodeLimitIsEnforced) {
  // Random top-4 of 16 experts over 4 nodes of 1: almost every token spans several nodes.
  const Case c{"limit", 4, 1, 16, 4, 256, 32, {32, 32, 32, 32}, Routing::kRandom, 0, 1};
  const EpConfig cfg = config_of(c, Payload::kBF16);
  Harness h(cfg, node_devices(4, 1, 1), c.tokens, c.routing, 5);
  EXPECT_THROW(dispatch_reference(cfg, batches_of(h.data)), Error);
  h.dispatch();
  h.sync();
  int reported = 0;
  for (int r = 0; r < 4; ++r) {
    try {
      h.group->rank(r).check();
    } catch (const Error& e) {
      const std::string m = e.message();
      EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument) << m;
      EXPECT_NE(m.find("rank " + std::to_string(r) + " token "), std::string::npos) << m;
      EXPECT_NE(m.find("nodes, more than max_nodes_per_token=1"), std::string::npos) << m;
      ++reported;
    }
  }
  EXPECT_EQ(reported, 4);
}

TEST_F(ForwardTest, SilentPeerEndsWithErrorNamingRankPeerCounter) {
  const Case c{"silent", 2, 1, 8, 2, 256, 16, {16, 16}, Routing::kRandom};
  EpConfig cfg = config_of(c, Payload::kBF16);
  cfg.timeout_s = 0.3;
  Harness h(cfg, node_devices(2, 1, std::min(2, gpu_count())), c.tokens, c.routing, 3);
  h.group->rank(0).dispatch_send(h.batch(0), h.buf[0].stream);  // rank 1 never sends
  h.group->rank(0).dispatch_recv(h.buf[0].stream);
  h.sync();
  try {
    h.group->rank(0).check();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string m = e.message();
    EXPECT_NE(m.find("rank 0: peer 1 did not answer within 0.3 s"), std::string::npos) << m;
    EXPECT_NE(m.find("dispatch.forward.arrived[rank=0][src=1], expected >= 1, seen 0"),
              std::string::npos)
        << m;
  }
}

TEST_F(ForwardTest, OverflowIsReported) {
  const Case c{"overflow", 2, 2, 8, 2, 256, 200, {200, 200, 200, 200}, Routing::kRandom};
  EpConfig cfg = config_of(c, Payload::kFP8);
  cfg.max_rows = 256;
  Harness h(cfg, node_devices(2, 2, std::min(2, gpu_count())), c.tokens, c.routing, 5);
  check_against_reference(h, 1);
}

// What a process-per-GPU caller must connect: a call before connect is refused, and connect
// names a workspace the route writes into (a rank of the node, or over the NVLink stand-in the
// forwarder of another node) when it is missing; the others may be left out.
TEST_F(ForwardTest, ConnectNamesTheWorkspacesTheRouteNeeds) {
  const Case c{"connect", 2, 2, 16, 2, 256, 16, {16, 16, 16, 16}, Routing::kRandom};
  const EpConfig cfg = config_of(c, Payload::kBF16);
  std::vector<std::unique_ptr<DeviceEpRank>> ranks;
  std::vector<void*> bases;
  for (int r = 0; r < 4; ++r) {
    ranks.push_back(std::make_unique<DeviceEpRank>(cfg, r, 0));
    bases.push_back(ranks.back()->workspace());
  }
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
  const DeviceBatch none{0, nullptr, nullptr, nullptr};
  std::string m = message_of([&] { ranks[0]->dispatch_send(none, nullptr); });
  EXPECT_NE(m.find("rank 0: dispatch_send before connect()"), std::string::npos) << m;
  m = message_of([&] { ranks[1]->combine_send(nullptr, nullptr); });
  EXPECT_NE(m.find("rank 1: combine_send before connect()"), std::string::npos) << m;
  // Rank 0 (node 0, local 0) writes ranks 0 and 1 (its node) and rank 2 (local 0 of node 1).
  std::vector<void*> partial = bases;
  partial[1] = nullptr;
  m = message_of([&] { ranks[0]->connect(partial); });
  EXPECT_NE(m.find("rank 0: connect without the workspace of rank 1"), std::string::npos) << m;
  EXPECT_NE(m.find("a rank of its node"), std::string::npos) << m;
  partial = bases;
  partial[2] = nullptr;
  m = message_of([&] { ranks[0]->connect(partial); });
  EXPECT_NE(m.find("rank 0: connect without the workspace of rank 2"), std::string::npos) << m;
  EXPECT_NE(m.find("the forwarder of node 1"), std::string::npos) << m;
  partial = bases;
  partial[3] = nullptr;  // local 1 of node 1: rank 0 never writes there
  EXPECT_NO_THROW(ranks[0]->connect(partial));
}

TEST_F(ForwardTest, NcclAcrossNodesNeedsDistinctGpus) {
  if (!nccl_available()) GTEST_SKIP() << "built without NCCL";
  const Case c{"nccl_one_gpu", 2, 1, 8, 2, 256, 16, {16, 16}, Routing::kRandom};
  DeviceEpOptions opt;
  opt.wire = Wire::kNccl;
  try {
    DeviceEpGroup group(config_of(c, Payload::kBF16), {0, 0}, opt);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    EXPECT_NE(e.message().find("share device 0"), std::string::npos) << e.message();
  }
}

}  // namespace
}  // namespace fp8moe::comm
