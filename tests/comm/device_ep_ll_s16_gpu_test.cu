// The low-latency acknowledgements given by the rank's next low-latency send kernel
// (DeviceEpOptions::ll_defer_acks, session 16, ll2): the dispatch receive (F, bit 1) and / or the
// combine receive (G, bit 2) end without adding to their sources' acknowledgement counters, and
// the rank's next dispatch or combine send adds one round per receive not yet acknowledged (Z:
// from warp 0 of block 0 instead of the last warp of the last block). Checked bit for bit against
// dispatch_reference / combine_reference / combine_tokens_reference over the masked cases, FP8 and
// BF16, on all GPUs and with all ranks on one GPU (where the option falls back to the receives'
// acknowledgements); sequences dispatch, combine; dispatch, dispatch, combine; combines repeated;
// rows that change between rounds; CUDA graph replays (one or two dispatches, one or two
// combines a graph); rounds back to back without a host synchronisation; silent peers; a peer
// whose next kernel never comes (named: ll_dispatch.ack / ll_combine.ack where the deferral is
// in effect, completing where it falls back or where another kernel gave the acknowledgement).
// Test: test_comm_gpu --gtest_filter='LowLatencyNextKernelAck*'
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "device_copy.h"
#include "ep_test_util.h"
#include "fp8moe/comm/device_ep.h"
#include "fp8moe/comm/ep.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"

namespace fp8moe::comm {
namespace {

using testing::batches_of;
using testing::expect_same_dispatch;
using testing::gpu_count;
using testing::make_inputs;
using testing::RankData;
using testing::Routing;
using testing::to_device;
using testing::to_host;

void progress(const std::string& what) {
  std::fprintf(stderr, "  .. %s\n", what.c_str());
}

class LowLatencyNextKernelAck : public ::testing::Test {
 protected:
  void SetUp() override {
    if (gpu_count() == 0) GTEST_SKIP() << "no GPU";
  }
};

std::vector<int> devices_for(int R, int gpus) {
  std::vector<int> d(R);
  for (int r = 0; r < R; ++r) d[r] = r % gpus;
  return d;
}

// One node, masked layout; a short timeout (a hung case should fail fast).
EpConfig config(int R, int E, int K, int64_t H, int64_t Tmax, Payload p, int64_t cap) {
  EpConfig c = testing::config(R, 0, E, K, H, Tmax, p);
  c.timeout_s = 5.0;
  c.masked_capacity = cap;
  return c;
}

// Letters as ep_bench's --ll-variants: F / G ll_defer_acks bits 1 / 2, Z
// ll_deferred_ack_first_block, D ll_defer_dispatch_ack, 0 the session-4 kernels (session 5's
// N X O T off), A the ascending destination order, H ll_combine_own_narrow.
DeviceEpOptions options(const std::string& letters) {
  DeviceEpOptions o;
  o.ll_defer_acks = 0;  // the letters say which deferral runs (the default defers both since s16)
  for (char c : letters) {
    if (c == 'F') o.ll_defer_acks |= 1;
    if (c == 'G') o.ll_defer_acks |= 2;
    if (c == 'Z') o.ll_deferred_ack_first_block = true;
    if (c == 'D') o.ll_defer_dispatch_ack = true;
    if (c == '0')
      o.ll_early_notify = o.ll_combine_spread = o.ll_combine_own_recv = o.ll_token_flags = false;
    if (c == 'A') o.ll_dispatch_rotate = 0;
    if (c == 'H') o.ll_combine_own_narrow = true;
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
      ys.push_back(testing::expert_outputs(cfg, r, seed));
      EpConfig rows_cfg = cfg;  // one row per received slot
      rows_cfg.masked_capacity = 0;
      rows_cfg.max_rows = (cfg.max_recv_tokens() + 127) / 128 * 128;
      grads.push_back(testing::expert_outputs(rows_cfg, r, seed + 1));
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

// `rounds` rounds against the reference: round 0 dispatch, combine, combine_tokens, combine;
// rounds 1 and on dispatch twice in a row first (the first of them checked too). The combines
// in a row make a combine send follow a combine receive (G: that send gives its acknowledgement);
// two dispatches in a row, a dispatch send follow a dispatch receive (F: that send gives it).
void check_rounds(Harness& h, int rounds) {
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
  auto check_combine = [&](bool weighted, const char* what) {
    h.combine(weighted);
    h.sync();
    check();
    for (int r = 0; r < cfg.num_ranks; ++r)
      ASSERT_EQ(h.output(r), weighted ? want_out[r] : want_back[r]) << what << ", rank " << r;
  };
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    if (round > 0) {
      h.dispatch();
      check_dispatch();
    }
    h.dispatch();
    check_dispatch();
    check_combine(true, "combine");
    check_combine(false, "combine_tokens");
    check_combine(true, "combine again");
  }
}

struct Case {
  const char* name;
  int R, E, K;
  int64_t H, Tmax;
  std::vector<int64_t> tokens;
  Routing routing;
  int64_t cap;
};

// The low-latency cases (the 3- and 4-rank ones share GPUs on 2 GPUs, where the option falls
// back), and each routing again at 2 ranks, where it is on whenever 2 GPUs are.
std::vector<Case> cases() {
  return {
      {"ll_random", 2, 16, 4, 512, 96, {96, 70}, Routing::kRandom, 256},
      {"ll_t0", 3, 12, 3, 256, 32, {0, 32, 0}, Routing::kRandom, 128},
      {"ll_all_t0", 2, 8, 2, 256, 16, {0, 0}, Routing::kRandom, 16},
      {"ll_k1", 2, 8, 1, 256, 200, {200, 150}, Routing::kRandom, 128},
      {"ll_k8_v3", 2, 256, 8, 7168, 128, {128, 117}, Routing::kRandom, 256},
      {"ll_skewed", 4, 32, 4, 256, 64, {64, 64, 50, 64}, Routing::kSkewed, 256},
      {"ll_one_rank", 4, 16, 4, 384, 48, {48, 1, 30, 48}, Routing::kOneRank, 192},
      {"ll_none_to_last", 4, 16, 2, 256, 40, {40, 40, 40, 40}, Routing::kNoneToLastRank, 64},
      {"ll_holes", 4, 32, 8, 256, 40, {40, 12, 40, 40}, Routing::kHoles, 64},
      {"ll_overflow", 2, 4, 2, 256, 200, {200, 200}, Routing::kRandom, 64},
      {"ll_1024_tokens", 2, 64, 8, 256, 1024, {1024, 1000}, Routing::kRandom, 512},
      {"ll2_t0_one", 2, 16, 4, 256, 32, {0, 32}, Routing::kRandom, 128},
      {"ll2_skewed", 2, 32, 4, 256, 64, {64, 50}, Routing::kSkewed, 256},
      {"ll2_one_rank", 2, 16, 4, 384, 48, {48, 30}, Routing::kOneRank, 192},
      {"ll2_none_to_last", 2, 16, 2, 256, 40, {40, 40}, Routing::kNoneToLastRank, 128},
      {"ll2_holes", 2, 32, 8, 1024, 40, {40, 12}, Routing::kHoles, 64},
  };
}

// Every case with FG (3 rounds), then with one of the other sets in turn (2 rounds): F and G
// alone (the other receive acknowledging as before), Z (block 0's warp 0), the session-4 kernels
// (0: the per-block arrival), the ascending order (A: k_dispatch_send<false, false, *>), DG
// (ll_defer_dispatch_ack with G: F's path), FGH; send grids of 5, 1 and 64 blocks (1: the acking
// warp is block 0's last warp; 64: at the V3 shape the last block has no item), receive grids of
// 3 or automatic, receive beside or after the send. `others` false: FG only, 2 rounds (all ranks
// on one GPU, where every set falls back to the receives' acknowledgements).
void run_cases(Payload p, int gpus, bool others) {
  constexpr const char* kLetters[] = {"F", "G", "FGZ", "0FG", "AFG", "DG", "FGH", "0FZ"};
  constexpr int kBlocks[] = {5, 1, 64};
  int ran = 0;
  for (const Case& c : cases()) {
    ++ran;
    for (const std::string& letters : {std::string("FG"), std::string(kLetters[ran % 8])}) {
      if (!others && letters != "FG") continue;
      DeviceEpOptions opt = options(letters);
      opt.num_blocks = kBlocks[(ran + letters.size()) % 3];
      opt.recv_blocks = ran % 4 == 1 ? 3 : 0;
      opt.overlap_recv = ran % 5 != 0;
      const std::string what = std::string(c.name) + " " + payload_name(p) + " on " +
                               std::to_string(gpus) + " GPU(s), options " + letters + ", " +
                               std::to_string(opt.num_blocks) + " send blocks";
      progress(what);
      SCOPED_TRACE(what);
      Harness h(config(c.R, c.E, c.K, c.H, c.Tmax, p, c.cap), devices_for(c.R, gpus), c.tokens,
                c.routing, 70 + c.R, opt);
      check_rounds(h, letters == "FG" && others ? 3 : 2);
    }
  }
  EXPECT_GT(ran, 0);
}

TEST_F(LowLatencyNextKernelAck, MatchesReferenceFp8AllGpus) {
  run_cases(Payload::kFP8, gpu_count(), true);
}
TEST_F(LowLatencyNextKernelAck, MatchesReferenceBf16AllGpus) {
  run_cases(Payload::kBF16, gpu_count(), true);
}
TEST_F(LowLatencyNextKernelAck, MatchesReferenceFp8OneGpuManyRanks) {
  run_cases(Payload::kFP8, 1, false);
}

// Rounds whose row counts grow, overflow (capacity 64) and shrink through the same buffers.
TEST_F(LowLatencyNextKernelAck, RowsChangeBetweenRounds) {
  for (const char* letters : {"FG", "0FG"}) {
    SCOPED_TRACE(std::string("options ") + letters);
    Harness h(config(2, 8, 2, 256, 200, Payload::kFP8, 64), devices_for(2, gpu_count()), {200, 200},
              Routing::kRandom, 21, options(letters));
    for (int64_t tokens : {60, 200, 20, 90}) {
      SCOPED_TRACE("tokens " + std::to_string(tokens));
      for (auto& d : h.data) d.tokens = tokens;
      check_rounds(h, 1);
    }
  }
}

// Each rank's whole round in one CUDA graph, replayed 4 times: `dispatches` dispatches, then
// `combines` combines. The sends of each replay acknowledge the receives before them (counted on
// the device, not captured): F the combine send gives the dispatch receive's, G the dispatch send
// the combine receive's (the next combine send where two combines follow each other).
void graph_replays(int R, int gpus, const std::string& letters, int dispatches, int combines) {
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

TEST_F(LowLatencyNextKernelAck, GraphCapturedRoundReplays) {
  graph_replays(2, gpu_count(), "FG", 1, 1);
  graph_replays(2, gpu_count(), "FG", 2, 1);
  graph_replays(2, gpu_count(), "FG", 1, 2);
  graph_replays(2, gpu_count(), "F", 1, 1);
  graph_replays(2, gpu_count(), "G", 1, 1);
  graph_replays(2, gpu_count(), "0FGZ", 1, 1);
  graph_replays(4, gpu_count(), "FG", 1, 1);
  graph_replays(4, 1, "FG", 2, 1);
}

// Rounds back to back with no host synchronisation: round r dispatches batch r % 3 (routings,
// token counts and payloads differ), copies its expanded rows and layout on the stream right
// after dispatch_recv, and only rounds 3, 6 and 9 combine; so two or three dispatches run in a
// row, ordered only by the acknowledgements. Every copy against the reference of its batch.
void back_to_back(int R, int gpus, Payload p, const std::string& letters, int blocks) {
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
    for (int s = 0; s < R; ++s) ys[r].push_back(testing::expert_outputs(cfg, s, 600 + r));
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

TEST_F(LowLatencyNextKernelAck, RoundsBackToBackWithoutHostSync) {
  back_to_back(2, gpu_count(), Payload::kFP8, "FG", 5);
  back_to_back(2, gpu_count(), Payload::kFP8, "F", 1);
  back_to_back(2, gpu_count(), Payload::kBF16, "G", 64);
  back_to_back(2, gpu_count(), Payload::kFP8, "0FG", 64);
  back_to_back(2, gpu_count(), Payload::kFP8, "FGZ", 64);
  back_to_back(2, gpu_count(), Payload::kFP8, "DG", 64);
  back_to_back(4, gpu_count(), Payload::kFP8, "FG", 64);
  back_to_back(2, 1, Payload::kFP8, "FG", 5);
}

// `rank`'s check() must fail naming `counter` (waited for by rank 0, from rank 1) and the rounds.
void expect_timeout(Harness& h, int rank, const std::string& counter,
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

EpConfig short_config() {
  EpConfig cfg = config(2, 8, 2, 256, 16, Payload::kFP8, 32);
  cfg.timeout_s = 0.3;
  return cfg;
}

// Rank 1 never sends: rank 0's dispatch receive ends with an error naming the counts it waited
// for; rank 1 never combines: rank 0's combine receive names ll_combine.data.
TEST_F(LowLatencyNextKernelAck, SilentPeerEndsWithErrorNamingRankPeerCounter) {
  for (const char* letters : {"FG", "0FG", "FGZ"}) {
    SCOPED_TRACE(std::string("options ") + letters);
    {
      Harness h(short_config(), devices_for(2, gpu_count()), {16, 16}, Routing::kRandom, 3,
                options(letters));
      h.group->rank(0).dispatch_send(h.batch(0), h.streams[0]);
      h.group->rank(0).dispatch_recv(h.streams[0]);
      h.sync();
      expect_timeout(h, 0, letters[0] == '0' ? "ll_dispatch.data" : "ll_dispatch.notify");
    }
    {
      Harness h(short_config(), devices_for(2, gpu_count()), {16, 16}, Routing::kRandom, 3,
                options(letters));
      h.dispatch();
      h.sync();
      h.group->check();
      h.group->rank(0).combine_send(h.y[0], h.streams[0]);
      h.group->rank(0).combine_recv(h.out[0], h.streams[0]);
      h.sync();
      expect_timeout(h, 0, "ll_combine.data");
    }
  }
}

// A peer whose next kernel never comes. After `before` (both ranks: "d" a dispatch, "c" a
// combine), only rank 0 runs `then` ("d": a dispatch send, "c": a combine send). Rank 0's send
// waits for rank 1's acknowledgement of the last receive of that kind: it times out naming
// `named` where rank 1 deferred it to a kernel that never came, and completes where rank 1's
// receive acknowledged (option off, or ranks on one GPU: the fallback) or where a later kernel of
// rank 1 gave it (F: its combine send gives the dispatch receive's; G: its dispatch send gives
// the combine receive's).
struct Lonely {
  const char* letters;
  const char* before;
  char then;
  const char* named;   // on 2 GPUs; nullptr: completes
  const char* rounds;  // the wait's rounds in the message
};
TEST_F(LowLatencyNextKernelAck, PeerWithoutNextKernelIsNamedOnTheAcknowledgement) {
  constexpr const char* k1 = "expected >= 1, seen 0";
  const Lonely kCases[] = {
      {"F", "d", 'd', "ll_dispatch.ack", k1},   // the dispatch receive's: no kernel after it
      {"FG", "d", 'd', "ll_dispatch.ack", k1},  //
      {"G", "d", 'd', nullptr, k1},             // the receive acknowledged
      {"F", "dc", 'd', nullptr, k1},            // rank 1's combine send gave it
      {"D", "dc", 'd', "ll_dispatch.ack", k1},  // ll1's: only a dispatch send gives it
      {"FG", "dc", 'c', "ll_combine.ack", k1},  // the combine receive's: no kernel after it
      {"G", "dc", 'c', "ll_combine.ack", k1},   //
      {"F", "dc", 'c', nullptr, k1},            // the receive acknowledged
      {"FG", "dcd", 'c', nullptr, k1},          // rank 1's dispatch send gave it
      {"GZ", "dcc", 'c', "ll_combine.ack", "expected >= 2, seen 1"},  // the second receive's
      {"FGZ", "dcc", 'd', nullptr, k1},  // F: rank 1's combine sends gave it
      {"", "dc", 'c', nullptr, k1},      // off
  };

  for (int gpus : {gpu_count(), 1}) {
    for (const Lonely& c : kCases) {
      const bool named = c.named != nullptr && gpus > 1;
      SCOPED_TRACE(std::string("options '") + c.letters + "', both " + c.before + ", then rank 0 " +
                   c.then + " on " + std::to_string(gpus) + " GPU(s)");
      Harness h(short_config(), devices_for(2, gpus), {16, 16}, Routing::kRandom, 3,
                options(c.letters));
      for (const char* s = c.before; *s; ++s) {
        if (*s == 'd') h.dispatch();
        if (*s == 'c') h.combine(true);
      }
      h.sync();
      h.group->check();
      if (c.then == 'd')
        h.group->rank(0).dispatch_send(h.batch(0), h.streams[0]);  // rank 1 runs nothing more
      else
        h.group->rank(0).combine_send(h.y[0], h.streams[0]);
      h.sync();
      if (named)
        expect_timeout(h, 0, c.named, c.rounds);
      else
        h.group->rank(0).check();
    }
  }
}

// The defaults defer both acknowledgements (session 16's final): a default group behaves as FG
// above, and a rank's sends in the decoding flow (dispatch, combine, dispatch) never wait for a
// kernel its peer has not run.
TEST_F(LowLatencyNextKernelAck, DefaultsDeferBothAcknowledgements) {
  EXPECT_EQ(DeviceEpOptions{}.ll_defer_acks, 3);
  struct Step {
    const char* before;
    char then;
    const char* named;  // on 2 GPUs; nullptr: completes
  };
  const Step kSteps[] = {
      {"d", 'd', "ll_dispatch.ack"},
      {"dc", 'c', "ll_combine.ack"},
      {"dc", 'd', nullptr},
      {"dcd", 'c', nullptr},
  };
  for (int gpus : {gpu_count(), 1}) {
    for (const Step& st : kSteps) {
      SCOPED_TRACE(std::string("defaults, both ") + st.before + ", then rank 0 " + st.then +
                   " on " + std::to_string(gpus) + " GPU(s)");
      Harness h(short_config(), devices_for(2, gpus), {16, 16}, Routing::kRandom, 3,
                DeviceEpOptions{});
      for (const char* s = st.before; *s; ++s) {
        if (*s == 'd') h.dispatch();
        if (*s == 'c') h.combine(true);
      }
      h.sync();
      h.group->check();
      if (st.then == 'd')
        h.group->rank(0).dispatch_send(h.batch(0), h.streams[0]);
      else
        h.group->rank(0).combine_send(h.y[0], h.streams[0]);
      h.sync();
      if (st.named != nullptr && gpus > 1)
        expect_timeout(h, 0, st.named);
      else
        h.group->rank(0).check();
    }
  }
}

// An expert id out of range is reported with the rank and the token.
TEST_F(LowLatencyNextKernelAck, BadExpertIdIsReported) {
  for (const char* letters : {"FG", "0FG", "AFG"}) {
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

// ll_defer_acks outside 0..3 is rejected.
TEST_F(LowLatencyNextKernelAck, BadOptionIsRejected) {
  DeviceEpOptions opt;
  opt.ll_defer_acks = 4;
  try {
    DeviceEpGroup group(short_config(), devices_for(2, gpu_count()), opt);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("ll_defer_acks=4"), std::string::npos) << e.message();
  }
}

}  // namespace
}  // namespace fp8moe::comm
