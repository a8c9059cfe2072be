// Combine backward on the NVLink kernels (DeviceEpRank::combine_backward_send / _recv) against
// combine_backward_reference, bit for bit: every grad_y element of the row bound (padding and
// unused rows +0) and every grad_w value, outputs poisoned with NaN bits before each call; random,
// skewed, all-on-one-rank, nobody-to-a-rank, T=0, k=1, k=8 of 256 experts, hidden 7168, dropped
// slots, masked layout on the normal kernels, many tiles; ranks over all GPUs and several ranks on
// one GPU; backward mixed with forward combines through the shared combine stage (both still
// exact); graph capture and replay; a silent peer, an overflowed dispatch and the configurations
// without a combine backward (each a clear error).
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "device_copy.h"
#include "ep_test_util.h"
#include "fp8moe/comm/device_ep.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"

namespace fp8moe::comm {
namespace {

using testing::batches_of;
using testing::gpu_count;
using testing::make_inputs;
using testing::RankData;
using testing::Routing;
using testing::to_device;
using testing::to_host;

void progress(const std::string& what) {
  std::fprintf(stderr, "  .. %s\n", what.c_str());
}

std::vector<int> devices_for(int R, int gpus) {
  std::vector<int> d(R);
  for (int r = 0; r < R; ++r) d[r] = r % gpus;
  return d;
}

// One node; a short timeout (a hung case should fail fast).
EpConfig config(int R, int E, int K, int64_t H, int64_t Tmax, Payload p) {
  EpConfig c = testing::config(R, 0, E, K, H, Tmax, p);
  c.timeout_s = 5.0;
  return c;
}

// Output gradients [T_s, H] BF16 per source: normal values, a few exact zeros.
std::vector<uint16_t> output_grad(const EpConfig& cfg, int64_t tokens, int s, uint64_t seed) {
  std::vector<uint16_t> g(tokens * cfg.hidden);
  for (size_t i = 0; i < g.size(); ++i)
    g[i] = i % 17 == 3 ? 0 : float_to_bf16_bits(philox_normal(seed, 7000 + s, i));
  return g;
}

constexpr uint8_t kPoison = 0xFF;  // NaN bits in BF16 and in float

struct RankBuffers {
  int device = 0;
  cudaStream_t stream = nullptr;
  uint16_t *x = nullptr, *y = nullptr, *out = nullptr, *grad_out = nullptr, *grad_y = nullptr;
  int32_t* idx = nullptr;
  float *w = nullptr, *grad_w = nullptr;
};

struct Harness {
  EpConfig cfg;
  std::vector<RankData> data;
  std::vector<std::vector<uint16_t>> ys, grads;
  std::vector<RankBuffers> buf;
  std::unique_ptr<DeviceEpGroup> group;

  Harness(const EpConfig& c, const std::vector<int>& devices, std::vector<int64_t> tokens,
          Routing routing, uint64_t seed, DeviceEpOptions opt = {})
      : cfg(c) {
    data = make_inputs(cfg, tokens, routing, seed);
    group = std::make_unique<DeviceEpGroup>(cfg, devices, opt);
    const int64_t H = cfg.hidden, K = cfg.top_k;
    for (int r = 0; r < cfg.num_ranks; ++r) {
      ys.push_back(testing::expert_outputs(cfg, r, seed));
      grads.push_back(output_grad(cfg, data[r].tokens, r, seed));
      RankBuffers b;
      b.device = devices[r];
      FM_CHECK_CUDA(cudaSetDevice(b.device));
      FM_CHECK_CUDA(cudaStreamCreateWithFlags(&b.stream, cudaStreamNonBlocking));
      b.x = to_device(b.device, data[r].x);
      b.idx = to_device(b.device, data[r].idx);
      b.w = to_device(b.device, data[r].w);
      b.y = to_device(b.device, ys[r]);
      b.grad_out = to_device(b.device, grads[r]);
      const int64_t T1 = std::max<int64_t>(1, data[r].tokens);
      b.out = to_device(b.device, std::vector<uint16_t>(T1 * H, 0xFFFF));
      b.grad_y = to_device(b.device, std::vector<uint16_t>(cfg.row_bound() * H, 0xFFFF));
      b.grad_w = to_device(b.device, std::vector<float>(T1 * K, 0.0f));
      buf.push_back(b);
    }
  }
  ~Harness() {
    for (auto& b : buf) {
      cudaSetDevice(b.device);
      cudaStreamSynchronize(b.stream);
      for (void* p :
           {static_cast<void*>(b.x), static_cast<void*>(b.y), static_cast<void*>(b.out),
            static_cast<void*>(b.grad_out), static_cast<void*>(b.grad_y), static_cast<void*>(b.idx),
            static_cast<void*>(b.w), static_cast<void*>(b.grad_w)})
        cudaFree(p);
      cudaStreamDestroy(b.stream);
    }
  }
  int R() const { return cfg.num_ranks; }
  DeviceBatch batch(int r) const { return {data[r].tokens, buf[r].x, buf[r].idx, buf[r].w}; }
  void sync() {
    for (auto& b : buf) {
      FM_CHECK_CUDA(cudaSetDevice(b.device));
      FM_CHECK_CUDA(cudaStreamSynchronize(b.stream));
    }
  }
  // New output gradients (a second backward must not see the first one's rows).
  void set_grads(uint64_t seed) {
    for (int r = 0; r < R(); ++r) {
      grads[r] = output_grad(cfg, data[r].tokens, r, seed);
      if (grads[r].empty()) continue;
      FM_CHECK_CUDA(cudaSetDevice(buf[r].device));
      FM_CHECK_CUDA(cudaMemcpy(buf[r].grad_out, grads[r].data(), grads[r].size() * 2,
                               cudaMemcpyHostToDevice));
    }
  }
  void dispatch() {
    for (int r = 0; r < R(); ++r) group->rank(r).dispatch_send(batch(r), buf[r].stream);
    for (int r = 0; r < R(); ++r) group->rank(r).dispatch_recv(buf[r].stream);
  }
  void poison_forward(int r) {
    FM_CHECK_CUDA(cudaSetDevice(buf[r].device));
    FM_CHECK_CUDA(
        cudaMemsetAsync(buf[r].out, kPoison, data[r].tokens * cfg.hidden * 2, buf[r].stream));
  }
  void poison_backward(int r) {
    FM_CHECK_CUDA(cudaSetDevice(buf[r].device));
    FM_CHECK_CUDA(
        cudaMemsetAsync(buf[r].grad_y, kPoison, cfg.row_bound() * cfg.hidden * 2, buf[r].stream));
    FM_CHECK_CUDA(
        cudaMemsetAsync(buf[r].grad_w, kPoison, data[r].tokens * cfg.top_k * 4, buf[r].stream));
  }
  void combine() {
    for (int r = 0; r < R(); ++r) {
      poison_forward(r);
      group->rank(r).combine_send(buf[r].y, buf[r].stream);
    }
    for (int r = 0; r < R(); ++r) group->rank(r).combine_recv(buf[r].out, buf[r].stream);
  }
  void backward() {
    for (int r = 0; r < R(); ++r) {
      poison_backward(r);
      group->rank(r).combine_backward_send(buf[r].grad_out, buf[r].y, buf[r].stream);
    }
    for (int r = 0; r < R(); ++r)
      group->rank(r).combine_backward_recv(buf[r].grad_y, buf[r].grad_w, buf[r].stream);
  }
  std::vector<uint16_t> out(int r) {
    return to_host(buf[r].device, buf[r].out, data[r].tokens * cfg.hidden);
  }
  std::vector<uint16_t> grad_y(int r) {
    return to_host(buf[r].device, buf[r].grad_y, cfg.row_bound() * cfg.hidden);
  }
  std::vector<uint32_t> grad_w_bits(int r) {
    const auto v = to_host(buf[r].device, buf[r].grad_w, data[r].tokens * cfg.top_k);
    std::vector<uint32_t> b(v.size());
    std::memcpy(b.data(), v.data(), v.size() * 4);
    return b;
  }
  std::vector<std::span<const uint16_t>> grad_spans() const { return {grads.begin(), grads.end()}; }
  std::vector<std::span<const uint16_t>> y_spans() const { return {ys.begin(), ys.end()}; }
};

std::vector<uint32_t> bits(const std::vector<float>& v) {
  std::vector<uint32_t> b(v.size());
  std::memcpy(b.data(), v.data(), v.size() * 4);
  return b;
}

// Every element; the first difference named by its index (row and column for a row-major H).
template <typename T>
void expect_same(const std::vector<T>& want, const std::vector<T>& got, int64_t cols,
                 const std::string& what) {
  ASSERT_EQ(want.size(), got.size()) << what;
  const auto diff = std::mismatch(want.begin(), want.end(), got.begin());
  if (diff.first == want.end()) return;
  const size_t i = static_cast<size_t>(diff.first - want.begin());
  FAIL() << what << ": first difference at row " << i / cols << " column " << i % cols
         << " (want 0x" << std::hex << +want[i] << ", got 0x" << +got[i] << std::dec << ")";
}

// The device results of the last backward against the reference.
void expect_backward(Harness& h, const CombineBackward& want) {
  for (int r = 0; r < h.R(); ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    expect_same(want.grad_y[r], h.grad_y(r), h.cfg.hidden, "grad_y");
    expect_same(bits(want.grad_w[r]), h.grad_w_bits(r), h.cfg.top_k, "grad_w");
  }
}

// The reference must not be trivially zero where tokens were routed (else equal zeros would
// pass a kernel that wrote nothing after the clearing).
void expect_nontrivial(const Harness& h, const CombineBackward& want) {
  size_t routed = 0, nonzero_w = 0, nonzero_y = 0;
  for (int r = 0; r < h.R(); ++r) {
    for (int32_t e : h.data[r].idx) routed += e >= 0;
    for (float v : want.grad_w[r]) nonzero_w += v != 0.0f;
    for (uint16_t v : want.grad_y[r]) nonzero_y += v != 0;
  }
  if (routed == 0) return;
  EXPECT_GT(nonzero_w, routed / 2) << "reference grad_w mostly zero";
  EXPECT_GT(nonzero_y, 0u) << "reference grad_y all zero";
}

// dispatch; combine; backward; a second backward with other gradients; combine again (the
// combine stage served both, in both orders); each result against its reference.
void check_rounds(Harness& h) {
  const EpConfig& cfg = h.cfg;
  const auto disp = dispatch_reference(cfg, batches_of(h.data));
  std::vector<const uint16_t*> y;
  for (int r = 0; r < h.R(); ++r) y.push_back(h.ys[r].data());
  const auto want_out = combine_reference(cfg, disp, y);
  progress("dispatch + combine");
  h.dispatch();
  h.combine();
  h.sync();
  h.group->check();
  for (int r = 0; r < h.R(); ++r) ASSERT_EQ(h.out(r), want_out[r]) << "combine, rank " << r;
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE("backward " + std::to_string(round));
    progress("backward " + std::to_string(round));
    if (round > 0) h.set_grads(100 + round);
    const CombineBackward want = combine_backward_reference(cfg, disp, h.grad_spans(), h.y_spans());
    expect_nontrivial(h, want);
    h.backward();
    h.sync();
    h.group->check();
    expect_backward(h, want);
    if (::testing::Test::HasFatalFailure()) return;
  }
  progress("combine after backward");
  h.combine();
  h.sync();
  h.group->check();
  for (int r = 0; r < h.R(); ++r)
    ASSERT_EQ(h.out(r), want_out[r]) << "combine after backward, rank " << r;
}

struct Case {
  const char* name;
  int R, E, K;
  int64_t H, Tmax;
  std::vector<int64_t> tokens;
  Routing routing;
  int64_t masked_capacity = 0;
};

std::vector<Case> cases() {
  return {
      {"random", 2, 16, 4, 512, 96, {96, 70}, Routing::kRandom},
      {"skewed", 4, 32, 4, 256, 64, {64, 64, 64, 64}, Routing::kSkewed},
      {"one_rank", 4, 16, 4, 384, 48, {48, 1, 30, 48}, Routing::kOneRank},
      {"none_to_last", 4, 16, 2, 256, 40, {40, 40, 40, 40}, Routing::kNoneToLastRank},
      {"t0", 3, 12, 3, 256, 32, {0, 32, 0}, Routing::kRandom},
      {"all_t0", 2, 8, 2, 256, 16, {0, 0}, Routing::kRandom},
      {"k1", 2, 8, 1, 256, 200, {200, 150}, Routing::kRandom},
      {"k8_256_experts", 2, 256, 8, 2048, 160, {160, 129}, Routing::kRandom},
      {"hidden_7168", 2, 16, 8, 7168, 64, {64, 50}, Routing::kRandom},
      {"hidden_7168_4_ranks", 4, 32, 8, 7168, 24, {24, 9, 0, 24}, Routing::kSkewed},
      {"holes", 4, 32, 8, 256, 40, {40, 12, 40, 40}, Routing::kHoles},
      {"masked", 2, 16, 8, 1024, 128, {128, 100}, Routing::kRandom, 256},
      {"masked_holes", 4, 32, 4, 256, 64, {64, 64, 50, 64}, Routing::kHoles, 256},
      {"many_tiles", 2, 64, 8, 256, 1100, {1100, 777}, Routing::kRandom},
  };
}

class CombineBackwardGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (gpu_count() == 0) GTEST_SKIP() << "no GPU";
  }
};

void run_cases(int gpus) {
  int ran = 0;
  for (const Case& c : cases()) {
    ++ran;
    // Both dispatch payloads (the backward's rows are BF16 either way), send grids of 5 blocks
    // (fewer than tokens: grid-stride) or 64, receive grids of 3 blocks or automatic, and the
    // dispatch variants whose layout fields the backward reads (plan in every send block or once,
    // payload expanded or left in the regions, receive beside or after the send).
    const Payload p = ran % 2 ? Payload::kBF16 : Payload::kFP8;
    DeviceEpOptions opt;
    opt.low_latency = false;  // masked cases: the normal kernels (the low-latency ones have none)
    opt.num_blocks = ran % 3 == 0 ? 64 : 5;
    // A combine send grid of its own: forward combines and backwards count their send blocks in
    // one counter, so both must take it.
    opt.combine_blocks = ran % 4 == 2 ? 3 : 0;
    opt.recv_blocks = ran % 4 == 1 ? 3 : 0;
    opt.plan_once = (ran / 2) % 2 == 0;
    opt.expand_payload = ran % 5 != 0;
    opt.overlap_recv = ran % 4 != 3;
    // The forward combines' chunk flags and acknowledgements (which the backward's send waits
    // for) by release stores alone (the default since session 9) in half of the cases, after a
    // full system fence in the other half (both payloads, both plans).
    opt.combine_release_only = (ran + 1) % 4 < 2;
    const std::string what =
        std::string(c.name) + " " + payload_name(p) + " on " + std::to_string(gpus) +
        " GPU(s), send blocks " + std::to_string(opt.num_blocks) + ", combine blocks " +
        std::to_string(opt.combine_blocks) + ", recv blocks " + std::to_string(opt.recv_blocks) +
        (opt.plan_once ? ", plan once" : ", plan per block") +
        (opt.expand_payload ? "" : ", payload not expanded") +
        (opt.overlap_recv ? "" : ", no overlap") +
        (opt.combine_release_only ? ", combine_release_only" : "");
    progress("case " + what);
    SCOPED_TRACE(what);
    EpConfig cfg = config(c.R, c.E, c.K, c.H, c.Tmax, p);
    cfg.masked_capacity = c.masked_capacity;
    Harness h(cfg, devices_for(c.R, gpus), c.tokens, c.routing, 60 + ran, opt);
    check_rounds(h);
    if (::testing::Test::HasFatalFailure()) return;
  }
  EXPECT_GT(ran, 0);
}

TEST_F(CombineBackwardGpuTest, MatchesReferenceAllGpus) {
  run_cases(gpu_count());
}
TEST_F(CombineBackwardGpuTest, MatchesReferenceOneGpuManyRanks) {
  run_cases(1);
}

// dispatch, combine and combine backward captured in one CUDA graph per rank, replayed with the
// outputs poisoned before each replay.
void graph_round(int R, int gpus) {
  EpConfig cfg = config(R, 16 * R, 8, 1024, 128, Payload::kFP8);
  std::vector<int64_t> tokens(R, 128);
  tokens[R - 1] = 90;
  Harness h(cfg, devices_for(R, gpus), tokens, Routing::kHoles, 11);
  const auto disp = dispatch_reference(cfg, batches_of(h.data));
  std::vector<const uint16_t*> y;
  for (int r = 0; r < R; ++r) y.push_back(h.ys[r].data());
  const auto want_out = combine_reference(cfg, disp, y);
  const CombineBackward want = combine_backward_reference(cfg, disp, h.grad_spans(), h.y_spans());
  expect_nontrivial(h, want);
  std::vector<cudaGraphExec_t> execs;
  for (int r = 0; r < R; ++r) {
    FM_CHECK_CUDA(cudaSetDevice(h.buf[r].device));
    FM_CHECK_CUDA(cudaStreamBeginCapture(h.buf[r].stream, cudaStreamCaptureModeThreadLocal));
    auto& ep = h.group->rank(r);
    ep.dispatch_send(h.batch(r), h.buf[r].stream);
    ep.dispatch_recv(h.buf[r].stream);
    ep.combine_send(h.buf[r].y, h.buf[r].stream);
    ep.combine_recv(h.buf[r].out, h.buf[r].stream);
    ep.combine_backward_send(h.buf[r].grad_out, h.buf[r].y, h.buf[r].stream);
    ep.combine_backward_recv(h.buf[r].grad_y, h.buf[r].grad_w, h.buf[r].stream);
    cudaGraph_t graph;
    FM_CHECK_CUDA(cudaStreamEndCapture(h.buf[r].stream, &graph));
    cudaGraphExec_t exec;
    FM_CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    FM_CHECK_CUDA(cudaGraphDestroy(graph));
    execs.push_back(exec);
  }
  for (int replay = 0; replay < 3; ++replay) {
    SCOPED_TRACE("replay " + std::to_string(replay));
    for (int r = 0; r < R; ++r) {
      h.poison_forward(r);
      h.poison_backward(r);
      FM_CHECK_CUDA(cudaGraphLaunch(execs[r], h.buf[r].stream));
    }
    h.sync();
    h.group->check();
    for (int r = 0; r < R; ++r) ASSERT_EQ(h.out(r), want_out[r]) << "combine, rank " << r;
    expect_backward(h, want);
    if (::testing::Test::HasFatalFailure()) break;
  }
  for (auto e : execs) cudaGraphExecDestroy(e);
}

TEST_F(CombineBackwardGpuTest, GraphCapturedRoundReplays) {
  {
    SCOPED_TRACE("2 ranks over all GPUs");
    graph_round(2, gpu_count());
  }
  SCOPED_TRACE("4 ranks on one GPU");
  graph_round(4, 1);
}

TEST_F(CombineBackwardGpuTest, SilentPeerEndsWithErrorNamingRankPeerCounter) {
  EpConfig cfg = config(2, 8, 2, 256, 16, Payload::kBF16);
  cfg.timeout_s = 0.3;
  DeviceEpOptions opt;
  opt.num_blocks = 3;
  Harness h(cfg, devices_for(2, gpu_count()), {16, 16}, Routing::kRandom, 3, opt);
  // Both ranks dispatch; only rank 0 runs the backward, so rank 1's rows never come.
  h.dispatch();
  h.sync();
  h.group->check();
  ASSERT_GT(h.group->rank(0).download().recv.count[1], 0) << "rank 1 must send rank 0 something";
  h.group->rank(0).combine_backward_send(h.buf[0].grad_out, h.buf[0].y, h.buf[0].stream);
  h.group->rank(0).combine_backward_recv(h.buf[0].grad_y, h.buf[0].grad_w, h.buf[0].stream);
  h.sync();
  try {
    h.group->rank(0).check();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string m = e.message();
    EXPECT_NE(m.find("rank 0: peer 1 did not answer within 0.3 s"), std::string::npos) << m;
    EXPECT_NE(m.find("combine_bwd.rows[rank=0][src=1], expected >= 1, seen 0"), std::string::npos)
        << m;
  }
}

// An overflowed dispatch has no combine backward (the reference refuses it): check() reports the
// overflow, and nothing but zeros is written.
TEST_F(CombineBackwardGpuTest, OverflowIsReportedAndWritesZeros) {
  EpConfig cfg = config(2, 4, 2, 256, 200, Payload::kBF16);
  cfg.max_rows = 256;
  Harness h(cfg, devices_for(2, gpu_count()), {200, 200}, Routing::kRandom, 5);
  const auto disp = dispatch_reference(cfg, batches_of(h.data));
  ASSERT_TRUE(disp[0].grouped.overflow || disp[1].grouped.overflow);
  EXPECT_THROW(combine_backward_reference(cfg, disp, h.grad_spans(), h.y_spans()), Error);
  h.dispatch();
  h.backward();
  h.sync();
  for (int r = 0; r < 2; ++r) {
    if (!disp[r].grouped.overflow) continue;
    SCOPED_TRACE("rank " + std::to_string(r));
    try {
      h.group->rank(r).check();
      ADD_FAILURE() << "overflow not reported";
    } catch (const Error& e) {
      EXPECT_NE(e.message().find("overflowed its row bound"), std::string::npos) << e.message();
    }
    for (uint16_t v : h.grad_y(r)) ASSERT_EQ(v, 0) << "grad_y of an overflowed dispatch";
  }
  // Every token's slots owned by an overflowed rank read +0 at its source.
  for (int s = 0; s < 2; ++s) {
    const auto gw = h.grad_w_bits(s);
    for (int64_t t = 0; t < h.data[s].tokens; ++t)
      for (int k = 0; k < cfg.top_k; ++k) {
        const int32_t e = h.data[s].idx[t * cfg.top_k + k];
        if (e >= 0 && disp[e / cfg.experts_per_rank()].grouped.overflow)
          ASSERT_EQ(gw[t * cfg.top_k + k], 0u) << "source " << s << " token " << t << " k " << k;
      }
  }
}

void expect_invalid(const std::function<void()>& call, const std::string& part) {
  try {
    call();
    ADD_FAILURE() << "expected kInvalidArgument naming \"" << part << "\"";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument) << e.message();
    EXPECT_NE(e.message().find(part), std::string::npos) << e.message();
  }
}

TEST_F(CombineBackwardGpuTest, UnsupportedConfigurationsSaySo) {
  const int gpus = gpu_count();
  {
    SCOPED_TRACE("low-latency kernels");
    EpConfig cfg = config(2, 8, 2, 256, 16, Payload::kFP8);
    cfg.masked_capacity = 32;
    Harness h(cfg, devices_for(2, gpus), {16, 16}, Routing::kRandom, 3);
    expect_invalid(
        [&] {
          h.group->rank(0).combine_backward_send(h.buf[0].grad_out, h.buf[0].y, h.buf[0].stream);
        },
        "low-latency kernels");
  }
  {
    SCOPED_TRACE("two-stage route");
    EpConfig cfg = testing::config(4, 2, 8, 2, 256, 16, Payload::kBF16);
    Harness h(cfg, devices_for(4, gpus), {16, 16, 16, 16}, Routing::kRandom, 3);
    expect_invalid(
        [&] {
          h.group->rank(1).combine_backward_send(h.buf[1].grad_out, h.buf[1].y, h.buf[1].stream);
        },
        "two-stage route");
  }
  {
    SCOPED_TRACE("receive before send");
    EpConfig cfg = config(2, 8, 2, 256, 16, Payload::kBF16);
    Harness h(cfg, devices_for(2, gpus), {16, 16}, Routing::kRandom, 3);
    expect_invalid(
        [&] {
          h.group->rank(0).combine_backward_recv(h.buf[0].grad_y, h.buf[0].grad_w, h.buf[0].stream);
        },
        "without a combine_backward_send");
  }
  if (nccl_available() && gpus >= 2) {
    SCOPED_TRACE("NCCL wire");
    EpConfig cfg = config(2, 8, 2, 256, 16, Payload::kBF16);
    DeviceEpOptions opt;
    opt.wire = Wire::kNccl;
    Harness h(cfg, {0, 1}, {16, 16}, Routing::kRandom, 3, opt);
    expect_invalid(
        [&] {
          h.group->rank(0).combine_backward_send(h.buf[0].grad_out, h.buf[0].y, h.buf[0].stream);
        },
        "Wire::kNccl");
  }
}

}  // namespace
}  // namespace fp8moe::comm
