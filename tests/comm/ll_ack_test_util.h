// What the low-latency acknowledgement tests share (device_ep_ll_s15_gpu_test.cu, ll1:
// ll_defer_dispatch_ack; device_ep_ll_s16_gpu_test.cu, ll2: ll_defer_acks): the options of
// ep_bench's --ll-variants letters, a harness of R ranks with their inputs and buffers, the rounds
// checked bit for bit against dispatch_reference / combine_reference / combine_tokens_reference,
// the masked cases, CUDA graph replays, rounds back to back without a host synchronisation, and
// the timeouts of a silent peer or of a peer whose next kernel never comes. Each test file keeps
// its letters, its sequences and its TEST_Fs.
#pragma once

#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "device_copy.h"
#include "ep_test_util.h"
#include "fp8moe/comm/device_ep.h"
#include "fp8moe/comm/ep.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"

namespace fp8moe::comm::testing::ll_ack {

inline void progress(const std::string& what) {
  std::fprintf(stderr, "  .. %s\n", what.c_str());
}

// The fixture: every test needs a GPU.
class NeedsGpu : public ::testing::Test {
 protected:
  void SetUp() override {
    if (gpu_count() == 0) GTEST_SKIP() << "no GPU";
  }
};

inline std::vector<int> devices_for(int R, int gpus) {
  std::vector<int> d(R);
  for (int r = 0; r < R; ++r) d[r] = r % gpus;
  return d;
}

// One node, masked layout; a short timeout (a hung case should fail fast).
inline EpConfig config(int R, int E, int K, int64_t H, int64_t Tmax, Payload p, int64_t cap) {
  EpConfig c = testing::config(R, 0, E, K, H, Tmax, p);
  c.timeout_s = 5.0;
  c.masked_capacity = cap;
  return c;
}

// The timeout tests' shape: 2 ranks, 16 tokens, a timeout of 0.3 s.
inline EpConfig short_config() {
  EpConfig cfg = config(2, 8, 2, 256, 16, Payload::kFP8, 32);
  cfg.timeout_s = 0.3;
  return cfg;
}

// Letters as ep_bench's --ll-variants: F / G ll_defer_acks bits 1 / 2, Z
// ll_deferred_ack_first_block, D ll_defer_dispatch_ack, 0 the session-4 kernels (session 5's
// N X O T off), A the ascending destination order (ll_dispatch_rotate 0), H
// ll_combine_own_narrow, V ll_recv_plan (session 17), I ll_recv_plan + ll_recv_plan_ids_block
// (session 17 late, ll5).
inline DeviceEpOptions options(const std::string& letters) {
  DeviceEpOptions o;
  o.ll_defer_acks = 0;  // the letters say which deferral runs (the default defers both since s16)
  o.ll_recv_plan = false;            // and whether the receive plans (the default since session 17)
  o.ll_recv_plan_ids_block = false;  // and where its ids come from (the default since session 18)
  for (char c : letters) {
    if (c == 'F') o.ll_defer_acks |= 1;
    if (c == 'G') o.ll_defer_acks |= 2;
    if (c == 'Z') o.ll_deferred_ack_first_block = true;
    if (c == 'D') o.ll_defer_dispatch_ack = true;
    if (c == '0')
      o.ll_early_notify = o.ll_combine_spread = o.ll_combine_own_recv = o.ll_token_flags = false;
    if (c == 'A') o.ll_dispatch_rotate = 0;
    if (c == 'H') o.ll_combine_own_narrow = true;
    if (c == 'V') o.ll_recv_plan = true;
    if (c == 'I') o.ll_recv_plan = o.ll_recv_plan_ids_block = true;
  }
  return o;
}

struct Harness {
  EpConfig cfg;
  std::vector<RankData> data;
  std::vector<std::vector<uint16_t>> ys, grads;
  std::vector<int> devices;
  std::vector<cudaStream_t> streams;
  std::vector<uint16_t*> x, y, rows, out;
  std::vector<int32_t*> idx;
  std::vector<float*> w;
  std::unique_ptr<DeviceEpGroup> group;

  Harness(const EpConfig& c, const std::vector<int>& devs, const std::vector<int64_t>& tokens,
          Routing routing, uint64_t seed, const DeviceEpOptions& opt)
      : cfg(c), devices(devs) {
    data = make_inputs(cfg, tokens, routing, seed);
    group = std::make_unique<DeviceEpGroup>(cfg, devices, opt);
    for (int r = 0; r < cfg.num_ranks; ++r) {
      ys.push_back(expert_outputs(cfg, r, seed));
      EpConfig rows_cfg = cfg;  // one row per received slot
      rows_cfg.masked_capacity = 0;
      rows_cfg.max_rows = (cfg.max_recv_tokens() + 127) / 128 * 128;
      grads.push_back(expert_outputs(rows_cfg, r, seed + 1));
      FM_CHECK_CUDA(cudaSetDevice(devices[r]));
      cudaStream_t s;
      FM_CHECK_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
      streams.push_back(s);
      x.push_back(to_device(devices[r], data[r].x));
      idx.push_back(to_device(devices[r], data[r].idx));
      w.push_back(to_device(devices[r], data[r].w));
      y.push_back(to_device(devices[r], ys[r]));
      rows.push_back(to_device(devices[r], grads[r]));
      out.push_back(to_device(
          devices[r],
          std::vector<uint16_t>(std::max<int64_t>(1, data[r].tokens) * cfg.hidden, 0xFFFF)));
    }
  }
  ~Harness() {
    for (int r = 0; r < cfg.num_ranks; ++r) {
      cudaSetDevice(devices[r]);
      cudaStreamSynchronize(streams[r]);
      for (void* p :
           {static_cast<void*>(x[r]), static_cast<void*>(idx[r]), static_cast<void*>(w[r]),
            static_cast<void*>(y[r]), static_cast<void*>(rows[r]), static_cast<void*>(out[r])})
        cudaFree(p);
      cudaStreamDestroy(streams[r]);
    }
  }
  DeviceBatch batch(int r) const { return {data[r].tokens, x[r], idx[r], w[r]}; }
  void sync() {
    for (int r = 0; r < cfg.num_ranks; ++r) {
      FM_CHECK_CUDA(cudaSetDevice(devices[r]));
      FM_CHECK_CUDA(cudaStreamSynchronize(streams[r]));
    }
  }
  void dispatch() {
    for (int r = 0; r < cfg.num_ranks; ++r) group->rank(r).dispatch_send(batch(r), streams[r]);
    for (int r = 0; r < cfg.num_ranks; ++r) group->rank(r).dispatch_recv(streams[r]);
  }
  void combine(bool weighted) {
    for (int r = 0; r < cfg.num_ranks; ++r) {
      FM_CHECK_CUDA(cudaSetDevice(devices[r]));
      FM_CHECK_CUDA(cudaMemsetAsync(out[r], 0xFF, data[r].tokens * cfg.hidden * 2, streams[r]));
      if (weighted)
        group->rank(r).combine_send(y[r], streams[r]);
      else
        group->rank(r).combine_tokens_send(rows[r], streams[r]);
    }
    for (int r = 0; r < cfg.num_ranks; ++r) group->rank(r).combine_recv(out[r], streams[r]);
  }
  std::vector<uint16_t> output(int r) {
    return to_host(devices[r], out[r], data[r].tokens * cfg.hidden);
  }
};

// One combine of a round: weighted (combine_send) or not (combine_tokens_send), and its name in
// the failure message.
struct Combine {
  bool weighted;
  const char* what;
};

// `rounds` rounds against the reference: each round dispatches, then runs `combines` in order
// (each against its reference, the first failing one ends the check); rounds 1 and on dispatch
// twice in a row first (the first of them checked too), so a send that wrote into a region before
// its receive had read it shows.
inline void check_rounds(Harness& h, int rounds, const std::vector<Combine>& combines) {
  const EpConfig& cfg = h.cfg;
  const auto want = dispatch_reference(cfg, batches_of(h.data));
  std::vector<const uint16_t*> y, g;
  for (int r = 0; r < cfg.num_ranks; ++r) {
    y.push_back(h.ys[r].data());
    g.push_back(h.grads[r].data());
  }
  bool overflow = false;
  for (const auto& wr : want) overflow = overflow || wr.grouped.overflow;
  std::vector<std::vector<uint16_t>> want_out, want_back;
  if (overflow) {  // every layout row is dropped: the expert step sums nothing
    for (int r = 0; r < cfg.num_ranks; ++r) want_out.emplace_back(h.data[r].tokens * cfg.hidden, 0);
    want_back = combine_tokens_reference(cfg, want, g);
  } else {
    want_out = combine_reference(cfg, want, y);
    want_back = combine_tokens_reference(cfg, want, g);
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
  auto check_dispatch = [&] {
    h.sync();
    check();
    for (int r = 0; r < cfg.num_ranks; ++r) {
      const DispatchResult got = h.group->rank(r).download();
      expect_same_dispatch(cfg, want[r], got, r);
      ASSERT_EQ(got.handle.slot, want[r].handle.slot) << "rank " << r;
    }
  };
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    if (round > 0) {
      h.dispatch();
      check_dispatch();
    }
    h.dispatch();
    check_dispatch();
    for (const Combine& c : combines) {
      h.combine(c.weighted);
      h.sync();
      check();
      for (int r = 0; r < cfg.num_ranks; ++r)
        ASSERT_EQ(h.output(r), c.weighted ? want_out[r] : want_back[r]) << c.what << ", rank " << r;
    }
  }
}

// One node (G = 0), masked layout (masked_capacity the capacity).
using Case = EpCase;

// The low-latency cases (the 3- and 4-rank ones share GPUs on 2 GPUs, where a deferral falls
// back), and each routing again at 2 ranks, where it is on whenever 2 GPUs are.
inline std::vector<Case> cases() {
  return {
      {"ll_random", 2, 0, 16, 4, 512, 96, {96, 70}, Routing::kRandom, 256},
      {"ll_t0", 3, 0, 12, 3, 256, 32, {0, 32, 0}, Routing::kRandom, 128},
      {"ll_all_t0", 2, 0, 8, 2, 256, 16, {0, 0}, Routing::kRandom, 16},
      {"ll_k1", 2, 0, 8, 1, 256, 200, {200, 150}, Routing::kRandom, 128},
      {"ll_k8_v3", 2, 0, 256, 8, 7168, 128, {128, 117}, Routing::kRandom, 256},
      {"ll_skewed", 4, 0, 32, 4, 256, 64, {64, 64, 50, 64}, Routing::kSkewed, 256},
      {"ll_one_rank", 4, 0, 16, 4, 384, 48, {48, 1, 30, 48}, Routing::kOneRank, 192},
      {"ll_none_to_last", 4, 0, 16, 2, 256, 40, {40, 40, 40, 40}, Routing::kNoneToLastRank, 64},
      {"ll_holes", 4, 0, 32, 8, 256, 40, {40, 12, 40, 40}, Routing::kHoles, 64},
      {"ll_overflow", 2, 0, 4, 2, 256, 200, {200, 200}, Routing::kRandom, 64},
      {"ll_1024_tokens", 2, 0, 64, 8, 256, 1024, {1024, 1000}, Routing::kRandom, 512},
      {"ll2_t0_one", 2, 0, 16, 4, 256, 32, {0, 32}, Routing::kRandom, 128},
      {"ll2_skewed", 2, 0, 32, 4, 256, 64, {64, 50}, Routing::kSkewed, 256},
      {"ll2_one_rank", 2, 0, 16, 4, 384, 48, {48, 30}, Routing::kOneRank, 192},
      {"ll2_none_to_last", 2, 0, 16, 2, 256, 40, {40, 40}, Routing::kNoneToLastRank, 128},
      {"ll2_holes", 2, 0, 32, 8, 1024, 40, {40, 12}, Routing::kHoles, 64},
  };
}

// Case `c` (the `ran`-th of its loop, which picks the receive grid, 3 or automatic, and whether
// the receive runs beside the send) with `letters` and a send grid of `blocks`, `rounds` rounds.
inline void check_case(const Case& c, Payload p, int gpus, const std::string& letters, int blocks,
                       int ran, int rounds, const std::vector<Combine>& combines) {
  DeviceEpOptions opt = options(letters);
  opt.num_blocks = blocks;
  opt.recv_blocks = ran % 4 == 1 ? 3 : 0;
  opt.overlap_recv = ran % 5 != 0;
  const std::string what = std::string(c.name) + " " + payload_name(p) + " on " +
                           std::to_string(gpus) + " GPU(s), options " + letters + ", " +
                           std::to_string(opt.num_blocks) + " send blocks";
  progress(what);
  SCOPED_TRACE(what);
  Harness h(config(c.R, c.E, c.K, c.H, c.Tmax, p, c.masked_capacity), devices_for(c.R, gpus),
            c.tokens, c.routing, 70 + c.R, opt);
  check_rounds(h, rounds, combines);
}

// Rounds whose row counts grow, overflow (capacity 64) and shrink through the same buffers.
inline void rows_change_between_rounds(const std::vector<const char*>& letter_sets,
                                       const std::vector<Combine>& combines) {
  for (const char* letters : letter_sets) {
    SCOPED_TRACE(std::string("options ") + letters);
    Harness h(config(2, 8, 2, 256, 200, Payload::kFP8, 64), devices_for(2, gpu_count()), {200, 200},
              Routing::kRandom, 21, options(letters));
    for (int64_t tokens : {60, 200, 20, 90}) {
      SCOPED_TRACE("tokens " + std::to_string(tokens));
      for (auto& d : h.data) d.tokens = tokens;
      check_rounds(h, 1, combines);
    }
  }
}

// Each rank's whole round in one CUDA graph, replayed 4 times: `dispatches` dispatches, then
// `combines` combines. The sends of each replay acknowledge the receives before them (counted on
// the device, not captured).
inline void graph_replays(int R, int gpus, const std::string& letters, int dispatches,
                          int combines) {
  SCOPED_TRACE(std::to_string(R) + " ranks on " + std::to_string(gpus) + " GPU(s), options " +
               letters + ", " + std::to_string(dispatches) + " dispatches and " +
               std::to_string(combines) + " combines a graph");
  EpConfig cfg = config(R, 16 * R, 8, 1024, 128, Payload::kFP8, 512);
  std::vector<int64_t> tokens(R, 128);
  tokens[R - 1] = 90;
  Harness h(cfg, devices_for(R, gpus), tokens, Routing::kRandom, 9, options(letters));
  const auto want = dispatch_reference(cfg, batches_of(h.data));
  std::vector<const uint16_t*> y;
  for (int r = 0; r < R; ++r) y.push_back(h.ys[r].data());
  const auto want_out = combine_reference(cfg, want, y);
  // One eager round first: the first replay's sends acknowledge its receives.
  h.dispatch();
  h.combine(true);
  h.sync();
  h.group->check();
  std::vector<cudaGraphExec_t> execs;
  for (int r = 0; r < R; ++r) {
    FM_CHECK_CUDA(cudaSetDevice(h.devices[r]));
    FM_CHECK_CUDA(cudaStreamBeginCapture(h.streams[r], cudaStreamCaptureModeThreadLocal));
    auto& ep = h.group->rank(r);
    for (int i = 0; i < dispatches; ++i) {
      ep.dispatch_send(h.batch(r), h.streams[r]);
      ep.dispatch_recv(h.streams[r]);
    }
    for (int i = 0; i < combines; ++i) {
      ep.combine_send(h.y[r], h.streams[r]);
      ep.combine_recv(h.out[r], h.streams[r]);
    }
    cudaGraph_t graph;
    FM_CHECK_CUDA(cudaStreamEndCapture(h.streams[r], &graph));
    cudaGraphExec_t exec;
    FM_CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    FM_CHECK_CUDA(cudaGraphDestroy(graph));
    execs.push_back(exec);
  }
  for (int replay = 0; replay < 4; ++replay) {
    for (int r = 0; r < R; ++r) {
      FM_CHECK_CUDA(cudaSetDevice(h.devices[r]));
      FM_CHECK_CUDA(
          cudaMemsetAsync(h.out[r], 0xFF, h.data[r].tokens * cfg.hidden * 2, h.streams[r]));
      FM_CHECK_CUDA(cudaGraphLaunch(execs[r], h.streams[r]));
    }
    h.sync();
    h.group->check();
    for (int r = 0; r < R; ++r) {
      ASSERT_EQ(h.output(r), want_out[r]) << "replay " << replay << " rank " << r;
      expect_same_dispatch(cfg, want[r], h.group->rank(r).download(), r);
    }
  }
  for (auto e : execs) cudaGraphExecDestroy(e);
}

// Rounds back to back with no host synchronisation: round r dispatches batch r % 3 (routings,
// token counts and payloads differ), copies its expanded rows and layout on the stream right
// after dispatch_recv, and only rounds 3, 6 and 9 combine; so two or three dispatches run in a
// row, ordered only by the acknowledgements. Every copy against the reference of its batch.
inline void back_to_back(int R, int gpus, Payload p, const std::string& letters, int blocks) {
  SCOPED_TRACE(std::to_string(R) + " ranks on " + std::to_string(gpus) + " GPU(s), " +
               payload_name(p) + ", options " + letters + ", " + std::to_string(blocks) +
               " send blocks");
  constexpr int kBatches = 3, kRounds = 10;
  constexpr Routing kRouting[kBatches] = {Routing::kRandom, Routing::kSkewed, Routing::kHoles};
  const EpConfig cfg = config(R, 8 * R, 4, 1024, 64, p, 64 * R);
  DeviceEpOptions opt = options(letters);
  opt.num_blocks = blocks;
  const int L = cfg.experts_per_rank();
  const int64_t H = cfg.hidden, SC = cfg.scale_cols(), bound = cfg.row_bound();
  const bool fp8 = p == Payload::kFP8;
  const int64_t row_bytes = fp8 ? H : 2 * H;
  const std::vector<int> devices = devices_for(R, gpus);
  std::vector<std::vector<RankData>> data;
  std::vector<std::vector<DispatchResult>> want;
  for (int b = 0; b < kBatches; ++b) {
    std::vector<int64_t> tokens(R);
    for (int s = 0; s < R; ++s) tokens[s] = b == 2 && s == 0 ? 0 : 64 - 7 * b - 3 * s;
    data.push_back(make_inputs(cfg, tokens, kRouting[b], 500 + b));
    want.push_back(dispatch_reference(cfg, batches_of(data.back())));
  }
  auto combines = [](int r) { return r % 3 == 0 && r > 0; };
  std::vector<std::vector<std::vector<uint16_t>>> want_out(kRounds);
  std::vector<std::vector<std::vector<uint16_t>>> ys(kRounds);
  for (int r = 0; r < kRounds; ++r) {
    if (!combines(r)) continue;
    std::vector<const uint16_t*> yp;
    for (int s = 0; s < R; ++s) ys[r].push_back(expert_outputs(cfg, s, 600 + r));
    for (int s = 0; s < R; ++s) yp.push_back(ys[r][s].data());
    want_out[r] = combine_reference(cfg, want[r % kBatches], yp);
  }
  DeviceEpGroup group(cfg, devices, opt);
  std::vector<std::pair<int, void*>> owned;
  auto upload = [&](int d, const auto& v) {
    auto* q = to_device(d, v);
    owned.emplace_back(d, q);
    return q;
  };
  auto alloc = [&](int d, size_t bytes, int poison) {
    FM_CHECK_CUDA(cudaSetDevice(d));
    void* q = nullptr;
    FM_CHECK_CUDA(cudaMalloc(&q, std::max<size_t>(1, bytes)));
    FM_CHECK_CUDA(cudaMemset(q, poison, std::max<size_t>(1, bytes)));
    owned.emplace_back(d, q);
    return q;
  };
  std::vector<cudaStream_t> streams(R);
  std::vector<std::vector<DeviceBatch>> batch(kBatches, std::vector<DeviceBatch>(R));
  for (int s = 0; s < R; ++s) {
    FM_CHECK_CUDA(cudaSetDevice(devices[s]));
    FM_CHECK_CUDA(cudaStreamCreateWithFlags(&streams[s], cudaStreamNonBlocking));
    for (int b = 0; b < kBatches; ++b)
      batch[b][s] = {data[b][s].tokens, upload(devices[s], data[b][s].x),
                     upload(devices[s], data[b][s].idx), upload(devices[s], data[b][s].w)};
  }
  struct Copy {
    int32_t *counts = nullptr, *m_indices = nullptr, *row_src = nullptr;
    uint8_t* x = nullptr;
    float* scales = nullptr;
    uint16_t *y = nullptr, *out = nullptr;
  };
  std::vector<std::vector<Copy>> copies(kRounds, std::vector<Copy>(R));
  for (int r = 0; r < kRounds; ++r)
    for (int s = 0; s < R; ++s) {
      const int d = devices[s];
      Copy& c = copies[r][s];
      c.counts = static_cast<int32_t*>(alloc(d, L * 4, 0xA5));
      c.m_indices = static_cast<int32_t*>(alloc(d, bound * 4, 0xA5));
      c.row_src = static_cast<int32_t*>(alloc(d, bound * 4, 0xA5));
      c.x = static_cast<uint8_t*>(alloc(d, bound * row_bytes, 0xA5));
      c.scales = static_cast<float*>(alloc(d, bound * SC * 4, 0xA5));
      if (combines(r)) {
        c.y = upload(d, ys[r][s]);
        c.out = static_cast<uint16_t*>(alloc(d, data[r % kBatches][s].tokens * H * 2, 0xFF));
      }
    }
  for (int r = 0; r < kRounds; ++r) {
    for (int s = 0; s < R; ++s) group.rank(s).dispatch_send(batch[r % kBatches][s], streams[s]);
    for (int s = 0; s < R; ++s) {
      group.rank(s).dispatch_recv(streams[s]);
      const DeviceRecvView v = group.rank(s).view();
      const Copy& c = copies[r][s];
      FM_CHECK_CUDA(cudaSetDevice(devices[s]));
      const auto copy = [&](void* dst, const void* src, size_t bytes) {
        FM_CHECK_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, streams[s]));
      };
      copy(c.counts, v.expert_counts, L * 4);
      copy(c.m_indices, v.m_indices, bound * 4);
      copy(c.row_src, v.row_src, bound * 4);
      copy(c.x, v.x, bound * row_bytes);
      if (fp8) copy(c.scales, v.x_scales, bound * SC * 4);
    }
    if (!combines(r)) continue;
    for (int s = 0; s < R; ++s) group.rank(s).combine_send(copies[r][s].y, streams[s]);
    for (int s = 0; s < R; ++s) group.rank(s).combine_recv(copies[r][s].out, streams[s]);
  }
  for (int s = 0; s < R; ++s) {
    FM_CHECK_CUDA(cudaSetDevice(devices[s]));
    FM_CHECK_CUDA(cudaStreamSynchronize(streams[s]));
  }
  group.check();
  for (int r = 0; r < kRounds; ++r)
    for (int s = 0; s < R; ++s) {
      SCOPED_TRACE("round " + std::to_string(r) + " rank " + std::to_string(s));
      const GroupedRecv& g = want[r % kBatches][s].grouped;
      ASSERT_FALSE(g.overflow) << "the cases are sized not to overflow";
      const Copy& c = copies[r][s];
      const int d = devices[s];
      EXPECT_EQ(to_host(d, c.counts, L), g.expert_counts) << "expert_counts";
      EXPECT_EQ(to_host(d, c.m_indices, bound), g.m_indices) << "m_indices";
      const std::vector<int32_t> row_src = to_host(d, c.row_src, bound);
      const std::vector<uint8_t> x = to_host(d, c.x, bound * row_bytes);
      const std::vector<float> sc = fp8 ? to_host(d, c.scales, bound * SC) : std::vector<float>();
      const uint8_t* want_x =
          fp8 ? g.x_fp8.data() : reinterpret_cast<const uint8_t*>(g.x_bf16.data());
      for (int64_t row = 0; row < g.num_rows; ++row) {
        ASSERT_EQ(row_src[row], g.row_src[row]) << "row_src, row " << row;
        if (g.row_src[row] < 0) continue;
        ASSERT_TRUE(std::equal(&x[row * row_bytes], &x[row * row_bytes] + row_bytes,
                               want_x + row * row_bytes))
            << "payload, row " << row;
        for (int64_t q = 0; q < (fp8 ? SC : 0); ++q)
          ASSERT_EQ(float_to_bits(sc[row * SC + q]), float_to_bits(g.x_scales[row * SC + q]))
              << "scale, row " << row << " column block " << q;
      }
      if (combines(r))
        ASSERT_EQ(to_host(d, c.out, data[r % kBatches][s].tokens * H), want_out[r][s]) << "combine";
    }
  for (const auto& [d, q] : owned) {
    cudaSetDevice(d);
    cudaFree(q);
  }
  for (int s = 0; s < R; ++s) {
    cudaSetDevice(devices[s]);
    cudaStreamDestroy(streams[s]);
  }
}

// `rank`'s check() must fail naming `counter` (waited for by rank 0, from rank 1) and the rounds.
inline void expect_timeout(Harness& h, int rank, const std::string& counter,
                           const std::string& rounds = "expected >= 1, seen 0") {
  try {
    h.group->rank(rank).check();
    ADD_FAILURE() << "expected an error naming " << counter;
  } catch (const Error& e) {
    const std::string m = e.message();
    EXPECT_NE(m.find("rank 0: peer 1 did not answer within 0.3 s"), std::string::npos) << m;
    EXPECT_NE(m.find(counter + "[rank=0][src=1], " + rounds), std::string::npos) << m;
  }
}

// Rank 1 never sends: rank 0's dispatch receive ends with an error naming the count it waited
// for (ll_dispatch.data on the session-4 kernels, ll_dispatch.notify otherwise).
inline void silent_dispatch_peer(const char* letters) {
  Harness h(short_config(), devices_for(2, gpu_count()), {16, 16}, Routing::kRandom, 3,
            options(letters));
  h.group->rank(0).dispatch_send(h.batch(0), h.streams[0]);
  h.group->rank(0).dispatch_recv(h.streams[0]);
  h.sync();
  expect_timeout(h, 0, letters[0] == '0' ? "ll_dispatch.data" : "ll_dispatch.notify");
}

// A peer whose next kernel never comes: after `before` (both ranks: "d" a dispatch, "c" a
// combine), only rank 0 runs `then` ("d": a dispatch send, "c": a combine send). Rank 0's check
// must fail naming `named` with `rounds` where `named` is not nullptr, and pass otherwise. The
// caller names the step in a SCOPED_TRACE.
inline void next_kernel_never_comes(const DeviceEpOptions& opt, int gpus, const char* before,
                                    char then, const char* named,
                                    const std::string& rounds = "expected >= 1, seen 0") {
  Harness h(short_config(), devices_for(2, gpus), {16, 16}, Routing::kRandom, 3, opt);
  for (const char* s = before; *s; ++s) {
    if (*s == 'd') h.dispatch();
    if (*s == 'c') h.combine(true);
  }
  h.sync();
  h.group->check();
  if (then == 'd')
    h.group->rank(0).dispatch_send(h.batch(0), h.streams[0]);  // rank 1 runs nothing more
  else
    h.group->rank(0).combine_send(h.y[0], h.streams[0]);
  h.sync();
  if (named != nullptr)
    expect_timeout(h, 0, named, rounds);
  else
    h.group->rank(0).check();
}

// An expert id out of range is reported with the rank and the token.
inline void bad_expert_id_is_reported(const std::vector<const char*>& letter_sets) {
  for (const char* letters : letter_sets) {
    SCOPED_TRACE(std::string("options ") + letters);
    EpConfig cfg = config(2, 8, 2, 256, 16, Payload::kFP8, 32);
    Harness h(cfg, devices_for(2, gpu_count()), {16, 16}, Routing::kRandom, 3, options(letters));
    h.data[1].idx[5] = 99;
    FM_CHECK_CUDA(cudaSetDevice(h.devices[1]));
    FM_CHECK_CUDA(cudaMemcpy(h.idx[1], h.data[1].idx.data(), h.data[1].idx.size() * 4,
                             cudaMemcpyHostToDevice));
    h.dispatch();
    h.sync();
    try {
      h.group->rank(1).check();
      FAIL() << "expected an error";
    } catch (const Error& e) {
      EXPECT_NE(e.message().find("rank 1 token 2: expert id 99"), std::string::npos) << e.message();
    }
  }
}

}  // namespace fp8moe::comm::testing::ll_ack
