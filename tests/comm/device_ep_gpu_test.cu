// The NVLink back end against the CPU reference, bit for bit: received regions, grouped and
// masked layouts, FP8 payloads, combine and combine_tokens, two rounds through the same buffers,
// a whole round captured in CUDA graphs, rounds enqueued back to back with no host
// synchronisation between them, ranks on distinct GPUs and several ranks on one GPU,
// and the failure modes (a silent peer ends in an error naming rank/peer/counter; overflow).
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <string>

#include "device_copy.h"
#include "ep_test_util.h"
#include "fp8moe/comm/device_ep.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "host_case_cache.h"

namespace fp8moe::comm {
namespace {

// Progress on stderr (unbuffered), so that a run cut short still says where it was.
void progress(const std::string& what) {
  std::fprintf(stderr, "  .. %s\n", what.c_str());
}

using testing::batches_of;
using testing::expect_same_dispatch;
using testing::host_cases;
using testing::HostCase;
using testing::make_inputs;
using testing::RankData;
using testing::References;
using testing::Routing;

using testing::gpu_count;
using testing::to_device;
using testing::to_host;

std::vector<int> devices_for(int R, int gpus) {
  std::vector<int> d(R);
  for (int r = 0; r < R; ++r) d[r] = r % gpus;
  return d;
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
  std::shared_ptr<HostCase> host;  // shared with the other variants of the case
  std::vector<RankData> data;      // this harness's copy (tests change tokens and ids in place)
  const std::vector<std::vector<uint16_t>>& ys;
  const std::vector<std::vector<uint16_t>>& grads;
  std::vector<RankBuffers> buf;
  std::unique_ptr<DeviceEpGroup> group;
  bool nccl = false;
  bool expand = true;  // DeviceEpOptions::expand_payload

  Harness(const EpConfig& c, const std::vector<int>& devices, std::vector<int64_t> tokens,
          Routing routing, uint64_t seed, DeviceEpOptions opt = {})
      : cfg(c),
        host(host_cases().get(c, tokens, routing, seed)),
        data(host->data),
        ys(host->ys),
        grads(host->grads),
        nccl(opt.wire == Wire::kNccl),
        expand(opt.expand_payload) {
    group = std::make_unique<DeviceEpGroup>(cfg, devices, opt);
    const int64_t H = cfg.hidden;
    for (int r = 0; r < cfg.num_ranks; ++r) {
      RankBuffers b;
      b.device = devices[r];
      FM_CHECK_CUDA(cudaSetDevice(b.device));
      FM_CHECK_CUDA(cudaStreamCreateWithFlags(&b.stream, cudaStreamNonBlocking));
      b.x = to_device(b.device, data[r].x);
      b.idx = to_device(b.device, data[r].idx);
      b.w = to_device(b.device, data[r].w);
      b.y = to_device(b.device, ys[r]);
      b.rows = to_device(b.device, grads[r]);
      b.out = to_device(b.device,
                        std::vector<uint16_t>(std::max<int64_t>(1, data[r].tokens) * H, 0xFFFF));
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
  void sync() {
    for (auto& b : buf) {
      FM_CHECK_CUDA(cudaSetDevice(b.device));
      FM_CHECK_CUDA(cudaStreamSynchronize(b.stream));
    }
  }
  // One thread drives every NCCL rank: each phase's NCCL calls of all ranks form one group.
  void group_start() {
    if (nccl) nccl_group_start();
  }
  void group_end() {
    if (nccl) nccl_group_end();
  }
  void dispatch() {
    group_start();
    for (int r = 0; r < cfg.num_ranks; ++r) group->rank(r).dispatch_send(batch(r), buf[r].stream);
    group_end();
    for (int r = 0; r < cfg.num_ranks; ++r) group->rank(r).dispatch_recv(buf[r].stream);
  }
  void combine(bool weighted) {
    group_start();
    for (int r = 0; r < cfg.num_ranks; ++r) {
      FM_CHECK_CUDA(cudaSetDevice(buf[r].device));
      FM_CHECK_CUDA(
          cudaMemsetAsync(buf[r].out, 0xFF, data[r].tokens * cfg.hidden * 2, buf[r].stream));
      if (weighted)
        group->rank(r).combine_send(buf[r].y, buf[r].stream);
      else
        group->rank(r).combine_tokens_send(buf[r].rows, buf[r].stream);
    }
    group_end();
    for (int r = 0; r < cfg.num_ranks; ++r) group->rank(r).combine_recv(buf[r].out, buf[r].stream);
  }
  std::vector<uint16_t> out(int r) {
    return to_host(buf[r].device, buf[r].out, data[r].tokens * cfg.hidden);
  }
  // The CPU references of data as it is now (memoised while it is as drawn).
  std::shared_ptr<const References> references() {
    return host_cases().references(cfg, *host, data);
  }
};

// One node; a shorter timeout than the CPU tests' (a hung GPU case should fail fast).
EpConfig config(int R, int E, int K, int64_t H, int64_t Tmax, Payload p) {
  EpConfig c = testing::config(R, 0, E, K, H, Tmax, p);
  c.timeout_s = 5.0;
  return c;
}

// The layout-only dispatch (expand_payload off) leaves the grouped rows unwritten: each row with a
// token is filled here from its record (row_src = (the source's first index + j) * K + k), so
// the comparison covers the records through the layout as with the expansion.
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

void check_against_reference(Harness& h, int rounds) {
  const EpConfig& cfg = h.cfg;
  const auto refs = h.references();
  const auto& want = refs->want;
  const bool overflow = refs->overflow;
  const auto& want_out = refs->want_out;
  auto check = [&] {
    if (!overflow) return h.group->check();
    try {
      h.group->check();
      ADD_FAILURE() << "overflow not reported";
    } catch (const Error& e) {
      EXPECT_NE(e.message().find("overflowed its row bound"), std::string::npos) << e.message();
    }
  };
  const auto& want_back = refs->want_back;
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    progress("round " + std::to_string(round) + ": dispatch");
    h.dispatch();
    h.sync();
    check();
    for (int r = 0; r < cfg.num_ranks; ++r) {
      DispatchResult got = h.group->rank(r).download();
      if (!h.expand) expand_on_host(cfg, got);
      expect_same_dispatch(cfg, want[r], got, r);
      ASSERT_EQ(got.handle.slot, want[r].handle.slot) << "rank " << r;
    }
    progress("combine");
    h.combine(true);
    h.sync();
    check();
    for (int r = 0; r < cfg.num_ranks; ++r)
      ASSERT_EQ(h.out(r), want_out[r]) << "combine, rank " << r;
    progress("combine_tokens");
    h.combine(false);
    h.sync();
    check();
    for (int r = 0; r < cfg.num_ranks; ++r)
      ASSERT_EQ(h.out(r), want_back[r]) << "combine_tokens, rank " << r;
  }
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
      {"k1", 2, 8, 1, 256, 200, {200, 150}, Routing::kRandom},
      {"k8_256_experts", 2, 256, 8, 2048, 160, {160, 129}, Routing::kRandom},
      {"hidden_7168", 2, 16, 8, 7168, 64, {64, 50}, Routing::kRandom},
      {"holes", 4, 32, 8, 256, 40, {40, 12, 40, 40}, Routing::kHoles},
      {"masked", 2, 16, 8, 1024, 128, {128, 100}, Routing::kRandom, 256},
      {"masked_skewed", 4, 32, 4, 256, 64, {64, 64, 50, 64}, Routing::kSkewed, 256},
      // More than one plan kernel block (16 tiles of 32 tokens each): the last one scans.
      {"many_tiles", 2, 64, 8, 256, 1100, {1100, 777}, Routing::kRandom},
  };
}

class NvlinkTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (gpu_count() == 0) GTEST_SKIP() << "no GPU";
  }
};

// Chunks of one tile, inside tiles, across tiles, single tokens.
int chunk_of(int ran) {
  constexpr int kChunks[] = {32, 7, 100, 1};
  return kChunks[ran % 4];
}

// Kernel variants: 0 the plan in every send block (v5), 1 plan_once (v5 + plan-once kernels),
// 2 the defaults (plan_once, prefetch_payload, combine_two_steps, combine_peer_blocks,
// dispatch_direct_rows, dispatch_self_rows, plan_fast_count, combine_stream_rows and session 7's
// combine_recv_early_stage, combine_recv_warp_wait, combine_recv_warp_items, combine_send_parts), 3
// the session-3 options with the per-block plan (chunk-major combine items, source regions). In
// tests of their own (a failure names them): 4 the session-4 defaults without dispatch_self_rows
// (and without the session-5 options), 5 the session-4 defaults with plan_fast_count and
// combine_stream_rows (named, so that it stays that set if the defaults change), 6 the session-6
// defaults (block tiles) with explicit combine receive tiles (combine_recv_tile; run_cases varies
// them), 7 the session-6 defaults with combine_recv_early_stage and combine_recv_warp_wait
// (session 7), 8 with early_stage alone, 9 with warp_wait alone, 10 with early_stage, warp_wait and
// warp_items (the session-7 defaults, explicit tiles), 11 with warp_wait and warp_items (7 to 11:
// run_cases varies the receive tiles and combine_send_parts too). Session 8 (ep9), on the
// defaults: 12 dispatch_plan_counts, 13 plan_block_scan, 14 dispatch_release_only, 15 all three.
// dispatch_release_only and combine_release_only are defaults since session 9, so the kernels
// with the full system fence before each flag keep variants of their own: 16 the defaults with
// both off, 17 with combine_release_only off (16 and 17: run_cases varies the receive tiles,
// combine_send_parts and combine_recv_early_stage, so every fenced combine kernel runs).
// Session 11 (ep14): 18 to 20 the defaults without direct rows (the source-region send, as the
// layout-only dispatch's) with the session-11 options by the bits of v - 17: 1
// layout_release_only, 2 layout_claim_chunks. Session 11 (ep15): 21 the defaults without direct
// rows (the records expanded by the receive) at the record stride that record_align_128 does not
// set: the 128-byte stride until session 12, the 16-byte one since record_align_128 is a default.
constexpr int kVariants = 4;
constexpr int kDefaults = 2, kDirectRows = 4, kFastCount = 5, kSession6 = 6;
constexpr int kSession7 = 7, kEarlyStage = 8, kWarpWait = 9, kWarpItems = 10, kWarpItemsOnly = 11;
constexpr int kPlanCounts = 12, kBlockScan = 13, kReleaseOnly = 14, kPrologue = 15;
constexpr int kFencedFlags = 16, kFencedCombine = 17;
constexpr int kLayoutSend = 17, kLayoutSendAll = kLayoutSend + 3;  // 18 .. 20: kLayoutSend + bits
constexpr int kAlign16 = kLayoutSendAll + 1;                       // 21
// Session 13 (ep19): 22 the defaults with combine_bulk_rows, 23 the same with the fenced combine
// flags (combine_release_only off). combine_bulk_rows is a default since ep19's call: the defaults'
// variant (2) runs it too, and every other variant keeps the register send it was written for
// (combine_bulk_rows off), so that its kernels (combine_send_parts, the fenced flags) stay tested.
constexpr int kBulkRows = kAlign16 + 1, kBulkRowsFenced = kBulkRows + 1;
// Session 13 late (ep21), numbered apart from the variants before (ep20's patch takes 24 to 27):
// the defaults with dispatch_recv_bulk_rows, 40 as they are (direct rows with self rows: the
// receive copies the rows of peer tokens), 41 without self rows (the own tokens' rows too), 42
// without direct rows (every row copied from the record, as the layout of ranks sharing a GPU),
// 43 with the fenced acknowledgement (combine_release_only off: k_dispatch_recv<false, true>).
// A default since session 14's first call (2 x H100: FP8 dispatch -1.6 / -1.7 %).
constexpr int kRecvBulk = 40, kRecvBulkNoSelf = 41, kRecvBulkRegions = 42, kRecvBulkFenced = 43;
// Session 14 (ep22): layout_token_slots (each record at its token's index in the source region) on
// the defaults without direct rows (the source-region send; expand_payload on, so the receive
// expands the records from their token slots and every row is compared), 44 to 47 with the
// session-11 bits v - 44 (1 layout_release_only, 2 layout_claim_chunks; 47 = the defaults'), 48
// with dispatch_recv_bulk_rows (k_dispatch_recv<true, true, true>), 49 the same with the fenced
// acknowledgement (<false, true, true>), 50 the fenced acknowledgement alone (<false, false,
// true>).
constexpr int kTokenSlots = 44, kTokenSlotsAll = kTokenSlots + 3;
constexpr int kTokenSlotsBulk = 48, kTokenSlotsBulkFenced = 49, kTokenSlotsFenced = 50;
// Session 15 (ep25): layout_payload_claims on the defaults with expand_payload off (the
// layout-only dispatch; check_against_reference expands the records on the host) and the send
// grid num_blocks (layout_send_blocks 0, so run_cases' grids apply): 80 units of one step, 81
// whole tokens, 82 units of two steps with the fenced flags and payload adds (layout_release_only
// off), 83 units of three steps with the fenced acknowledgement (combine_release_only off:
// k_dispatch_recv<false, false, true, true>); 84 the option with expand_payload on (ignored: the
// defaults' token-slot send). All with low_latency off: the masked cases run the normal kernels.
constexpr int kPayloadClaims = 80, kPayloadClaimsTokens = 81, kPayloadClaimsFenced = 82;
constexpr int kPayloadClaimsAckFenced = 83, kPayloadClaimsExpanded = 84;
DeviceEpOptions variant_options(int v) {
  DeviceEpOptions o;
  o.plan_once = v != 0 && v != 3;
  o.prefetch_payload = v >= 2;
  o.combine_two_steps = v >= 2;
  o.combine_peer_blocks = v == kDefaults || v >= kDirectRows;
  // The session-2/3 kernels (0, 1, 3) push records into the source regions; the defaults and the
  // variants on top of them write rows directly (session 4).
  o.dispatch_direct_rows = o.plan_once && v != 1;
  o.dispatch_self_rows = o.dispatch_direct_rows && v != kDirectRows;
  // The defaults' variant takes DeviceEpOptions' own plan_fast_count and combine_stream_rows.
  const DeviceEpOptions defaults;
  o.plan_fast_count = v == kDefaults ? defaults.plan_fast_count : v == kFastCount;
  o.combine_stream_rows = v == kDefaults ? defaults.combine_stream_rows : v == kFastCount;
  // Session 7's defaults only where named: the other variants keep the kernels they named.
  auto without_session7 = [](DeviceEpOptions& x) {
    x.combine_recv_early_stage = x.combine_recv_warp_wait = x.combine_recv_warp_items = false;
    x.combine_send_parts = 0;
  };
  if (v != kDefaults) without_session7(o);
  if (v == kSession6) {  // the session-6 defaults (block tiles)
    o = DeviceEpOptions{};
    without_session7(o);
  }
  if (v >= kSession7 && v <= kWarpItemsOnly) {
    o = DeviceEpOptions{};
    o.combine_recv_early_stage = v != kWarpWait && v != kWarpItemsOnly;
    o.combine_recv_warp_wait = v != kEarlyStage;
    o.combine_recv_warp_items = v >= kWarpItems;
  }
  if (v >= kPlanCounts && v <= kPrologue) {
    o = DeviceEpOptions{};
    o.dispatch_plan_counts = v == kPlanCounts || v == kPrologue;
    o.plan_block_scan = v == kBlockScan || v == kPrologue;
    o.dispatch_release_only = v == kReleaseOnly || v == kPrologue;
  }
  if (v == kFencedFlags || v == kFencedCombine) {
    o = DeviceEpOptions{};
    o.combine_release_only = false;
    o.dispatch_release_only = v == kFencedCombine;
  }
  if (v > kLayoutSend && v <= kLayoutSendAll) {
    o = DeviceEpOptions{};
    o.dispatch_direct_rows = o.dispatch_self_rows = false;
    const int bits = v - kLayoutSend;
    o.layout_release_only = (bits & 1) != 0;
    o.layout_claim_chunks = (bits & 2) != 0;
  }
  if (v == kAlign16) {
    o = DeviceEpOptions{};
    o.dispatch_direct_rows = o.dispatch_self_rows = false;
    o.record_align_128 = false;
  }
  if (v == kBulkRows || v == kBulkRowsFenced) {
    o = DeviceEpOptions{};
    o.combine_bulk_rows = true;
    o.combine_release_only = v == kBulkRows;
  }
  if (v != kDefaults && v != kBulkRows && v != kBulkRowsFenced) o.combine_bulk_rows = false;
  // dispatch_recv_bulk_rows is a default since session 14: the defaults' variant runs it, and the
  // others keep the lanes' row copies they were written with, so that path stays tested.
  o.dispatch_recv_bulk_rows = v == kDefaults;
  // layout_token_slots likewise (a default since ep22's call, session 14).
  o.layout_token_slots = v == kDefaults;
  if (v >= kRecvBulk && v <= kRecvBulkFenced) {
    o = DeviceEpOptions{};
    o.dispatch_recv_bulk_rows = true;
    o.dispatch_direct_rows = v != kRecvBulkRegions;
    o.dispatch_self_rows = o.dispatch_direct_rows && v != kRecvBulkNoSelf;
    o.combine_release_only = v != kRecvBulkFenced;
  }
  if (v >= kTokenSlots && v <= kTokenSlotsFenced) {
    o = DeviceEpOptions{};
    o.dispatch_direct_rows = o.dispatch_self_rows = false;
    o.layout_token_slots = true;
    const int bits = v <= kTokenSlotsAll ? v - kTokenSlots : 3;
    o.layout_release_only = (bits & 1) != 0;
    o.layout_claim_chunks = (bits & 2) != 0;
    o.dispatch_recv_bulk_rows = v == kTokenSlotsBulk || v == kTokenSlotsBulkFenced;
    o.combine_release_only = v != kTokenSlotsBulkFenced && v != kTokenSlotsFenced;
  }
  if (v >= kPayloadClaims && v <= kPayloadClaimsExpanded) {
    o = DeviceEpOptions{};
    o.expand_payload = v == kPayloadClaimsExpanded;
    o.low_latency = false;  // the masked cases on the normal kernels too, where the option applies
    o.layout_send_blocks = 0;
    o.layout_payload_claims = v == kPayloadClaimsTokens      ? 1000
                              : v == kPayloadClaimsFenced    ? 2
                              : v == kPayloadClaimsAckFenced ? 3
                                                             : 1;
    o.layout_release_only = v != kPayloadClaimsFenced;
    o.combine_release_only = v != kPayloadClaimsAckFenced;
  }
  return o;
}
std::string variant_name(int v) {
  constexpr const char* kNames[kFencedCombine + 1] = {
      " v5",
      " plan_once",
      " defaults",
      " v5 prefetch+two_steps",
      " defaults without self_rows",
      " defaults+fast_count+combine_stream_rows",
      " session-6 defaults with explicit combine_recv_tile",
      " session-6 defaults+recv_early_stage+recv_warp_wait",
      " session-6 defaults+recv_early_stage",
      " session-6 defaults+recv_warp_wait",
      " session-6 defaults+recv_early_stage+warp_wait+warp_items",
      " session-6 defaults+recv_warp_wait+warp_items",
      " defaults+plan_counts",
      " defaults+block_scan",
      " defaults+release_only",
      " defaults+plan_counts+block_scan+release_only",
      " defaults with fenced flags (no release_only)",
      " defaults with fenced combine flags (no combine_release_only)"};
  if (v > kLayoutSend && v <= kLayoutSendAll) {
    const int bits = v - kLayoutSend;
    return std::string(" defaults without direct rows") +
           ((bits & 1) ? "+layout_release_only" : "") + ((bits & 2) ? "+layout_claim_chunks" : "");
  }
  if (v == kAlign16) return " defaults without direct rows, 16-byte records";
  if (v == kBulkRows) return " defaults+combine_bulk_rows";
  if (v == kBulkRowsFenced) return " defaults+combine_bulk_rows with fenced combine flags";
  if (v == kRecvBulk) return " defaults+dispatch_recv_bulk_rows";
  if (v == kRecvBulkNoSelf) return " defaults+dispatch_recv_bulk_rows without self rows";
  if (v == kRecvBulkRegions) return " defaults+dispatch_recv_bulk_rows without direct rows";
  if (v == kRecvBulkFenced)
    return " defaults+dispatch_recv_bulk_rows with fenced combine flags (no combine_release_only)";
  if (v >= kTokenSlots && v <= kTokenSlotsAll) {
    const int bits = v - kTokenSlots;
    return std::string(" defaults without direct rows+layout_token_slots") +
           ((bits & 1) ? "+layout_release_only" : "") + ((bits & 2) ? "+layout_claim_chunks" : "");
  }
  if (v == kTokenSlotsBulk)
    return " defaults without direct rows+layout_token_slots+dispatch_recv_bulk_rows";
  if (v == kTokenSlotsBulkFenced)
    return " defaults without direct rows+layout_token_slots+dispatch_recv_bulk_rows, fenced acks";
  if (v == kTokenSlotsFenced)
    return " defaults without direct rows+layout_token_slots, fenced acks";
  if (v == kPayloadClaims) return " layout only+layout_payload_claims 1";
  if (v == kPayloadClaimsTokens) return " layout only+layout_payload_claims 1000 (whole tokens)";
  if (v == kPayloadClaimsFenced)
    return " layout only+layout_payload_claims 2, fenced flags (no layout_release_only)";
  if (v == kPayloadClaimsAckFenced)
    return " layout only+layout_payload_claims 3, fenced acks (no combine_release_only)";
  if (v == kPayloadClaimsExpanded) return " defaults+layout_payload_claims 1 (ignored: expanded)";
  return kNames[v];
}

// The combine's own chunks (combine_chunk_tokens, session 15) beside chunk_of's dispatch chunks
// (32, 7, 100, 1 by ran % 4; these by ran % 5, so the pairs rotate): smaller and larger than the
// dispatch's, equal, and 13, which divides none of the cases' token or record counts.
int combine_chunk_of(int ran) {
  constexpr int kChunks[] = {3, 64, 13, 1, 200};
  return kChunks[ran % 5];
}

// only: run every case with this one variant (-1: all of them). send_blocks: the send grids;
// combine_blocks: the combine send's (0: send_blocks). combine_chunk: DeviceEpOptions::
// combine_chunk_tokens (0: unset; -1: combine_chunk_of, varied over the cases).
void run_cases(Payload p, int gpus, Wire wire = Wire::kNvlink, int only = -1, int send_blocks = 5,
               int combine_blocks = 0, int combine_chunk = 0) {
  int ran = 0;
  for (const Case& c : cases()) {
    if (wire == Wire::kNccl && c.R != gpus) continue;  // NCCL: one rank per GPU
    // NVLink: every case with each kernel variant (below); NCCL (slow to set up): they take
    // turns.
    for (int variant = 0; variant < (wire == Wire::kNccl || only >= 0 ? 1 : kVariants); ++variant) {
      ++ran;
      const int v = only >= 0 ? only : wire == Wire::kNccl ? ran % kVariants : variant;
      // The NVLink variants of a case share its chunk size, so each path meets every size.
      const int chunk = chunk_of(wire == Wire::kNccl || only >= 0 ? ran : (ran - 1) / kVariants);
      DeviceEpOptions opt = variant_options(v);
      opt.combine_chunk_tokens = combine_chunk < 0 ? combine_chunk_of(ran) : combine_chunk;
      const std::string path =
          variant_name(v) + (opt.combine_chunk_tokens > 0
                                 ? " combine chunk " + std::to_string(opt.combine_chunk_tokens)
                                 : std::string());
      progress(std::string("case ") + c.name + " " + payload_name(p) + " " + wire_name(wire) +
               " chunk " + std::to_string(chunk) + path);
      SCOPED_TRACE(std::string(c.name) + " " + payload_name(p) + " on " + std::to_string(gpus) +
                   " GPU(s) over " + wire_name(wire) + path);
      EpConfig cfg = config(c.R, c.E, c.K, c.H, c.Tmax, p);
      cfg.masked_capacity = c.masked_capacity;
      opt.num_blocks = send_blocks;  // fewer blocks than tokens: grid-stride paths
      opt.combine_blocks = combine_blocks;
      opt.wire = wire;
      // Receive grids of 3 blocks (grid-stride over chunks) or the automatic size; receive kernels
      // after or beside their send kernels.
      opt.chunk_tokens = chunk;
      opt.recv_blocks = (ran + ran / kVariants) % 3 == 0 ? 3 : 0;
      opt.overlap_recv = ran % 5 != 0;
      if (v == kSession6)  // the rule before session 6 at the V3 shape, one and 3 tokens
        opt.combine_recv_tile = ran % 3 == 0 ? 16 : ran % 3 == 1 ? 1 : 3;
      if (v >= kSession7 && v <= kWarpItemsOnly) {  // automatic; one token; 32 (one part/token)
        opt.combine_recv_tile = ran % 3 == 0 ? 0 : ran % 3 == 1 ? 1 : 32;
        opt.combine_send_parts = ran % 4 == 0 ? 0 : ran % 4 == 1 ? 2 : 4;  // warps per send record
      }
      if (v == kFencedFlags || v == kFencedCombine) {  // every fenced combine kernel
        opt.combine_recv_tile = ran % 3 == 0 ? 0 : ran % 3 == 1 ? 1 : 32;
        opt.combine_send_parts = ran % 4 == 0 ? 0 : ran % 4 == 1 ? 2 : 4;
        opt.combine_recv_early_stage = ran % 2 == 0;
      }
      Harness h(cfg, devices_for(c.R, gpus), c.tokens, c.routing, 40 + c.R, opt);
      check_against_reference(h, 2);
    }
  }
  EXPECT_GT(ran, 0);
}

TEST_F(NvlinkTest, MatchesReferenceBf16AllGpus) {
  run_cases(Payload::kBF16, gpu_count());
}
TEST_F(NvlinkTest, MatchesReferenceFp8AllGpus) {
  run_cases(Payload::kFP8, gpu_count());
}
TEST_F(NvlinkTest, MatchesReferenceFp8OneGpuManyRanks) {
  run_cases(Payload::kFP8, 1);
}
TEST_F(NvlinkTest, UnmeasuredCombineOptionsMatchReference) {
  // Send blocks dealt to the peers (the defaults; 5 blocks: 2/2/1 over 3 peers, 2 blocks: fewer
  // blocks than peers, so a block serves several).
  run_cases(Payload::kBF16, 1, Wire::kNvlink, kDefaults, 2);
  run_cases(Payload::kFP8, 1, Wire::kNvlink, kDefaults, 2);
  // A combine send grid of its own (3 blocks beside dispatch's 5; not a default).
  run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, kDefaults, 5, 3);
}

// Session 4's direct rows without self rows beside the defaults (direct rows with self rows,
// which the kernel-variant tests above run), over every case and GPU (the masked cases run the
// low-latency kernels; with every rank on one GPU the options fall back to the source regions).
TEST_F(NvlinkTest, DispatchDirectRowsMatchReference) {
  run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, kDirectRows);
  run_cases(Payload::kBF16, gpu_count(), Wire::kNvlink, kDirectRows);
}

// Session 5's defaults (plan_fast_count, combine_stream_rows) on the session-4 defaults over
// every case, both payloads, ranks over all GPUs (direct rows) and on one GPU (source regions).
TEST_F(NvlinkTest, Session5OptionsMatchReference) {
  run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, kFastCount);
  run_cases(Payload::kBF16, gpu_count(), Wire::kNvlink, kFastCount);
  run_cases(Payload::kFP8, 1, Wire::kNvlink, kFastCount);
  run_cases(Payload::kBF16, 1, Wire::kNvlink, kFastCount);
}

// Explicit combine receive tiles (combine_recv_tile, session 6) on the defaults, every case, both
// payloads, ranks over all GPUs and on one GPU, and over the NCCL wire.
TEST_F(NvlinkTest, Session6OptionsMatchReference) {
  run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, kSession6);
  run_cases(Payload::kBF16, gpu_count(), Wire::kNvlink, kSession6);
  run_cases(Payload::kFP8, 1, Wire::kNvlink, kSession6);
  run_cases(Payload::kBF16, 1, Wire::kNvlink, kSession6);
  if (gpu_count() >= 2 && nccl_available()) run_cases(Payload::kFP8, 2, Wire::kNccl, kSession6);
}

// Session 7's combine receive options (each alone and together) on the session-6 defaults, with
// explicit receive tiles and send parts, every case, both payloads, ranks over all GPUs and on one
// GPU, and over the NCCL wire (no waits there; the early partial is rank 0's staged one).
TEST_F(NvlinkTest, Session7OptionsMatchReference) {
  run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, kSession7);
  run_cases(Payload::kBF16, gpu_count(), Wire::kNvlink, kSession7);
  run_cases(Payload::kFP8, 1, Wire::kNvlink, kSession7);
  run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, kEarlyStage);
  run_cases(Payload::kBF16, 1, Wire::kNvlink, kEarlyStage);
  run_cases(Payload::kBF16, gpu_count(), Wire::kNvlink, kWarpWait);
  run_cases(Payload::kFP8, 1, Wire::kNvlink, kWarpWait);
  run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, kWarpItems);
  run_cases(Payload::kBF16, gpu_count(), Wire::kNvlink, kWarpItems);
  run_cases(Payload::kFP8, 1, Wire::kNvlink, kWarpItems);
  run_cases(Payload::kBF16, gpu_count(), Wire::kNvlink, kWarpItemsOnly);
  run_cases(Payload::kBF16, 1, Wire::kNvlink, kWarpItemsOnly);
  if (gpu_count() >= 2 && nccl_available()) {
    run_cases(Payload::kFP8, 2, Wire::kNccl, kSession7);
    run_cases(Payload::kBF16, 2, Wire::kNccl, kWarpItems);
  }
}

// Session 8's prologue options (ep9) on the defaults, each alone and all three, over every case,
// both payloads, ranks over all GPUs (direct rows: plan counts and release-only apply) and on one
// GPU (source regions: the block scan alone applies), and the block scan over the NCCL wire. The
// plan kernel then runs one block per 16 tiles of max_tokens_per_rank: "many_tiles" has three.
TEST_F(NvlinkTest, Session8PrologueOptionsMatchReference) {
  for (int v : {kPrologue, kPlanCounts, kBlockScan, kReleaseOnly}) {
    run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, v);
    if (v == kPrologue || v == kBlockScan) run_cases(Payload::kFP8, 1, Wire::kNvlink, v);
  }
  run_cases(Payload::kBF16, gpu_count(), Wire::kNvlink, kPrologue);
  run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, kPrologue, 64);  // the V3 send grid
  if (gpu_count() >= 2 && nccl_available()) run_cases(Payload::kFP8, 2, Wire::kNccl, kBlockScan);
}

// The flags raised after a full system fence (dispatch_release_only and combine_release_only
// off: the defaults before session 9, still selectable), both off and the combine's alone, over
// every case, both payloads, ranks over all GPUs and on one GPU, the V3 send grid of 64 blocks,
// and over the NCCL wire. Two rounds through the same buffers. The release-only kernels are the
// defaults and run in every default test.
TEST_F(NvlinkTest, FencedFlagsMatchReference) {
  for (int v : {kFencedFlags, kFencedCombine}) {
    run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, v);
    run_cases(Payload::kBF16, gpu_count(), Wire::kNvlink, v);
    run_cases(Payload::kFP8, 1, Wire::kNvlink, v);
  }
  run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, kFencedFlags, 64);  // the V3 send grid
  if (gpu_count() >= 2 && nccl_available()) run_cases(Payload::kFP8, 2, Wire::kNccl, kFencedFlags);
}

// Session 11's options of the source-region send (the layout-only dispatch's), every combination
// over every case with FP8 over all GPUs (two rounds each, so the chunk claims' counters must
// reset), both with BF16, with every rank on one GPU, with the V3 send grid of 64 blocks and over
// the NCCL wire.
TEST_F(NvlinkTest, Session11LayoutSendOptionsMatchReference) {
  for (int v = kLayoutSend + 1; v <= kLayoutSendAll; ++v)
    run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, v);
  run_cases(Payload::kBF16, gpu_count(), Wire::kNvlink, kLayoutSendAll);
  run_cases(Payload::kFP8, 1, Wire::kNvlink, kLayoutSendAll);
  run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, kLayoutSendAll, 64);
  if (gpu_count() >= 2 && nccl_available())
    run_cases(Payload::kFP8, 2, Wire::kNccl, kLayoutSendAll);
}

// Session 11 (ep15): the records on 128-byte lines (record_align_128), bit for bit against the
// reference over every case (two rounds each), on all GPUs, with every rank on one GPU and over
// the NCCL wire. Since session 12 record_align_128 is a default (every defaults case runs it), so
// this test runs the 16-byte stride, the option's other value. (Session 11's call 1 ran it as
// Session11TailPiecesAndAlignedRecordsMatchReference with the tail parts, since removed:
// docs/comm/runs/ep-s11-ep15-call1-pqa.patch.)
TEST_F(NvlinkTest, Session11AlignedRecordsMatchReference) {
  run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, kAlign16);
  run_cases(Payload::kFP8, 1, Wire::kNvlink, kAlign16);
  if (gpu_count() >= 2 && nccl_available()) run_cases(Payload::kFP8, 2, Wire::kNccl, kAlign16);
}

// More send blocks than the GPU has SMs: the direct rows need every send block resident (block
// 0 notifies, the others wait for every rank's notify), so they fall back to the source regions;
// the results stay the reference's (review of session 4).
TEST_F(NvlinkTest, MoreSendBlocksThanSmsFallBackAndMatchReference) {
  int sms = 0;
  FM_CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  for (Payload p : {Payload::kFP8, Payload::kBF16}) {
    SCOPED_TRACE(payload_name(p));
    EpConfig cfg = config(2, 32, 8, 1024, 256, p);
    DeviceEpOptions opt = variant_options(kDefaults);
    opt.num_blocks = sms + 8;
    Harness h(cfg, devices_for(2, gpu_count()), {256, 200}, Routing::kRandom, 11, opt);
    check_against_reference(h, 2);
  }
}

// An explicit ranks_per_device below the real sharing would size receive grids that starve a
// co-resident rank's send: rejected with a message naming both numbers.
TEST_F(NvlinkTest, RanksPerDeviceBelowSharingIsRejected) {
  EpConfig cfg = config(2, 8, 2, 256, 16, Payload::kBF16);
  DeviceEpOptions opt;
  opt.ranks_per_device = 1;
  try {
    DeviceEpGroup group(cfg, {0, 0}, opt);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    EXPECT_NE(e.message().find("ranks_per_device=1 but 2 ranks of this group share a device"),
              std::string::npos)
        << e.message();
  }
}

// One round (dispatch and combine) of kernel variant v captured in a CUDA graph per rank,
// replayed three times into poisoned outputs; combine_chunk: DeviceEpOptions::combine_chunk_tokens.
void graph_round_replays(int v, int combine_chunk = 0) {
  {
    SCOPED_TRACE("variant" + variant_name(v) + " combine chunk " + std::to_string(combine_chunk));
    EpConfig cfg = config(2, 32, 8, 1024, 128, Payload::kFP8);
    DeviceEpOptions opt = variant_options(v);
    opt.combine_chunk_tokens = combine_chunk;
    Harness h(cfg, devices_for(2, gpu_count()), {128, 90}, Routing::kRandom, 9, opt);
    const auto refs = h.references();
    std::vector<const uint16_t*> y = {h.ys[0].data(), h.ys[1].data()};
    const auto want_out =
        refs->overflow ? combine_reference(cfg, refs->want, y) : refs->want_combine;
    std::vector<cudaGraphExec_t> execs;
    for (int r = 0; r < 2; ++r) {
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
      for (int r = 0; r < 2; ++r) {
        FM_CHECK_CUDA(cudaSetDevice(h.buf[r].device));
        FM_CHECK_CUDA(cudaMemsetAsync(h.buf[r].out, 0xFF, h.data[r].tokens * cfg.hidden * 2,
                                      h.buf[r].stream));
        FM_CHECK_CUDA(cudaGraphLaunch(execs[r], h.buf[r].stream));
      }
      h.sync();
      h.group->check();
      for (int r = 0; r < 2; ++r) ASSERT_EQ(h.out(r), want_out[r]) << "replay " << replay;
    }
    for (auto e : execs) cudaGraphExecDestroy(e);
  }
}
TEST_F(NvlinkTest, GraphCapturedRoundReplays) {
  for (int v : {0, 1, kDefaults, 3, kDirectRows, kFastCount, kSession7, kWarpItems, kPrologue,
                kFencedFlags})
    graph_round_replays(v);
}

// A peer that never dispatches: rank 0's receive (and, with direct rows, its send) waits for the
// peer's notify and ends with the report naming rank, peer and counter.
void dispatch_silent_peer(DeviceEpOptions opt) {
  EpConfig cfg = config(2, 8, 2, 256, 16, Payload::kBF16);
  cfg.timeout_s = 0.3;
  opt.num_blocks = 3;
  Harness h(cfg, devices_for(2, gpu_count()), {16, 16}, Routing::kRandom, 3, opt);
  h.group->rank(0).dispatch_send(h.batch(0), h.buf[0].stream);  // rank 1 never sends
  h.group->rank(0).dispatch_recv(h.buf[0].stream);
  h.sync();
  try {
    h.group->rank(0).check();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string m = e.message();
    EXPECT_NE(m.find("rank 0: peer 1 did not answer within 0.3 s"), std::string::npos) << m;
    EXPECT_NE(m.find("dispatch.notify[rank=0][src=1], expected >= 1, seen 0"), std::string::npos)
        << m;
  }
}

TEST_F(NvlinkTest, SilentPeerEndsWithErrorNamingRankPeerCounter) {
  // dispatch_direct_rows: the send itself waits for the silent peer's notify (same report);
  // with dispatch_plan_counts for its plan kernel's counts (reported as its notify).
  for (const int mode : {0, 1, 2}) {
    const bool direct = mode >= 1;
    SCOPED_TRACE(mode == 2 ? "dispatch_plan_counts"
                 : direct  ? "dispatch_direct_rows"
                           : "source regions");
    DeviceEpOptions opt;
    opt.dispatch_direct_rows = direct;
    opt.dispatch_plan_counts = opt.plan_block_scan = mode == 2;
    dispatch_silent_peer(opt);
  }
}

// A peer that dispatches but never runs its combine: the receive's wait for its chunks ends with
// the report, whether the block (the session-6 kernels) or each warp (combine_recv_warp_wait, with
// and without warp items: the defaults) waits.
void combine_silent_peer(int v) {
  {
    SCOPED_TRACE("variant" + variant_name(v));
    EpConfig cfg = config(2, 8, 2, 256, 16, Payload::kBF16);
    cfg.timeout_s = 0.3;
    DeviceEpOptions opt = variant_options(v);
    opt.num_blocks = 3;
    Harness h(cfg, devices_for(2, gpu_count()), {16, 16}, Routing::kRandom, 3, opt);
    h.dispatch();
    h.sync();
    h.group->check();
    ASSERT_GT(h.group->rank(0).download().recv.count[1], 0) << "rank 1 must send rank 0 something";
    h.group->rank(0).combine_send(h.buf[0].y, h.buf[0].stream);  // rank 1 never combines
    h.group->rank(0).combine_recv(h.buf[0].out, h.buf[0].stream);
    h.sync();
    try {
      h.group->rank(0).check();
      FAIL() << "expected an error";
    } catch (const Error& e) {
      const std::string m = e.message();
      EXPECT_NE(m.find("rank 0: peer 1 did not answer within 0.3 s"), std::string::npos) << m;
      EXPECT_NE(m.find("combine.chunk[rank=0][src=1][chunk="), std::string::npos) << m;
      EXPECT_NE(m.find("], expected >= 1, seen 0"), std::string::npos) << m;
    }
  }
}
TEST_F(NvlinkTest, CombineSilentPeerEndsWithErrorNamingRankPeerCounter) {
  for (const int v : {kSession6, kSession7, kDefaults, kFencedCombine}) combine_silent_peer(v);
}

// A destination whose rows pass its bound: the layout says overflow, like the reference, and
// combine gives zeros.
void overflow_is_reported(std::initializer_list<int> variants) {
  for (int v : variants) {
    SCOPED_TRACE("variant" + variant_name(v));
    EpConfig cfg = config(2, 4, 2, 256, 200, Payload::kFP8);
    cfg.max_rows = 256;
    Harness h(cfg, devices_for(2, gpu_count()), {200, 200}, Routing::kRandom, 5,
              variant_options(v));
    check_against_reference(h, 1);
  }
}

TEST_F(NvlinkTest, OverflowIsReported) {
  // Source regions (1), direct rows (the defaults, 2): an overflowing destination gets the source
  // regions, which are compared too.
  overflow_is_reported({1, kDefaults, kFastCount, kPrologue, kFencedFlags});
}

TEST_F(NvlinkTest, BadExpertIdIsReported) {
  // The plan kernel's two counting paths report the id the same way (plan_fast_count loads a
  // tile's ids before it checks them).
  // Mode 3: session 8's plan kernel (plan_block_scan, dispatch_plan_counts).
  for (int mode = 0; mode < 4; ++mode) {
    const bool plan_once = mode >= 1;
    SCOPED_TRACE(mode == 3   ? "plan_block_scan + dispatch_plan_counts"
                 : mode == 2 ? "plan_once without plan_fast_count"
                 : plan_once ? "plan_once"
                             : "plan in every send block");
    EpConfig cfg = config(2, 8, 2, 256, 16, Payload::kBF16);
    DeviceEpOptions opt;
    opt.plan_once = plan_once;
    opt.plan_fast_count = mode != 2;
    opt.plan_block_scan = opt.dispatch_plan_counts = mode == 3;
    Harness h(cfg, devices_for(2, gpu_count()), {16, 16}, Routing::kRandom, 3, opt);
    h.data[1].idx[5] = 99;
    FM_CHECK_CUDA(cudaSetDevice(h.buf[1].device));
    FM_CHECK_CUDA(cudaMemcpy(h.buf[1].idx, h.data[1].idx.data(), h.data[1].idx.size() * 4,
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

// ---- Session 13 (ep19): the combine send fed by bulk copies (combine_bulk_rows) ----
// Every case (random, skewed, all on one rank, nobody to a rank, T = 0, k = 1, k = 8 of 256,
// hidden 7168, holes; two rounds through the same buffers, combine and combine_tokens) bit for bit
// against the reference: FP8 and BF16 over all GPUs, every rank on one GPU, the V3 send grid of 64
// blocks, 2 send blocks (fewer than the peers: a block serves several), the fenced combine flags,
// and over the NCCL wire.
TEST_F(NvlinkTest, Session13BulkRowsMatchReference) {
  run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, kBulkRows);
  run_cases(Payload::kBF16, gpu_count(), Wire::kNvlink, kBulkRows);
  run_cases(Payload::kFP8, 1, Wire::kNvlink, kBulkRows);
  run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, kBulkRows, 64);
  run_cases(Payload::kBF16, 1, Wire::kNvlink, kBulkRows, 2);
  run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, kBulkRowsFenced);
  if (gpu_count() >= 2 && nccl_available()) run_cases(Payload::kFP8, 2, Wire::kNccl, kBulkRows);
}

// Rows longer than one bulk piece (7168 columns): 7296 in two pieces of 3648, 14336 in two of
// 7168, 7680 in two of 3840; over all GPUs and with both ranks on one GPU.
TEST_F(NvlinkTest, Session13BulkRowsInPiecesMatchReference) {
  for (int64_t H : {7296, 14336, 7680})
    for (int gpus : {gpu_count(), 1}) {
      SCOPED_TRACE("hidden " + std::to_string(H) + " on " + std::to_string(gpus) + " GPU(s)");
      progress("bulk rows in pieces, hidden " + std::to_string(H));
      EpConfig cfg = config(2, 16, 8, H, 48, Payload::kFP8);
      DeviceEpOptions opt = variant_options(kBulkRows);
      opt.num_blocks = 3;
      opt.chunk_tokens = 5;
      Harness h(cfg, devices_for(2, gpus), {48, 33}, Routing::kRandom, 17, opt);
      check_against_reference(h, 2);
    }
}

// Identity experts: the expert outputs are the dispatched BF16 rows themselves (the grouped
// layout downloaded and passed back as y), so the combine returns x times the sum of the token's
// weights (exact: small integer payloads, dyadic weights) and the reference's bits.
TEST_F(NvlinkTest, Session13BulkRowsIdentityExpertsRoundTrip) {
  for (const bool bulk : {false, true}) {
    SCOPED_TRACE(bulk ? "combine_bulk_rows" : "register send");
    EpConfig cfg = config(4, 32, 8, 1024, 40, Payload::kBF16);
    DeviceEpOptions opt;
    opt.combine_bulk_rows = bulk;
    Harness h(cfg, devices_for(4, gpu_count()), {40, 7, 0, 33}, Routing::kExact, 23, opt);
    const auto want = dispatch_reference(cfg, batches_of(h.data));
    h.dispatch();
    h.sync();
    h.group->check();
    std::vector<const uint16_t*> y;
    for (int r = 0; r < cfg.num_ranks; ++r) {
      const DispatchResult got = h.group->rank(r).download();
      ASSERT_EQ(got.grouped.num_rows, want[r].grouped.num_rows) << "rank " << r;
      const size_t n = static_cast<size_t>(got.grouped.num_rows * cfg.hidden);
      ASSERT_TRUE(std::equal(got.grouped.x_bf16.begin(), got.grouped.x_bf16.begin() + n,
                             want[r].grouped.x_bf16.begin()))
          << "rank " << r;
      FM_CHECK_CUDA(
          cudaMemcpy(h.buf[r].y, want[r].grouped.x_bf16.data(), n * 2, cudaMemcpyHostToDevice));
      y.push_back(want[r].grouped.x_bf16.data());
    }
    const auto want_out = combine_reference(cfg, want, y);
    h.combine(true);
    h.sync();
    h.group->check();
    for (int r = 0; r < cfg.num_ranks; ++r) {
      const auto out = h.out(r);
      ASSERT_EQ(out, want_out[r]) << "rank " << r;
      for (int64_t t = 0; t < h.data[r].tokens; ++t) {
        float wsum = 0;
        for (int k = 0; k < cfg.top_k; ++k) wsum += h.data[r].w[t * cfg.top_k + k];
        for (int64_t c = 3; c < cfg.hidden; ++c)  // as EpReference's test: past the id columns
          ASSERT_EQ(bf16_bits_to_float(out[t * cfg.hidden + c]),
                    bf16_bits_to_float(h.data[r].x[t * cfg.hidden + c]) * wsum)
              << "rank " << r << " token " << t << " column " << c;
      }
    }
  }
}

TEST_F(NvlinkTest, Session13BulkRowsGraphCapturedRoundReplays) {
  graph_round_replays(kBulkRows);
  graph_round_replays(kBulkRowsFenced);
}

// Session 13 late (ep21): the dispatch receive's row copies by bulk copies
// (dispatch_recv_bulk_rows). Every case (random, skewed, all on one rank, nobody to a rank,
// T = 0, k = 1, k = 8 of 256, hidden 7168, holes, many tiles; two rounds through the same
// buffers, rows, scales, layout, combine and combine_tokens) bit for bit against the reference:
// FP8 and BF16 over all GPUs and with every rank on one GPU (the source regions), the V3 send
// grid, without self rows, without direct rows, the fenced acknowledgement, the NCCL wire.
TEST_F(NvlinkTest, Session13LateRecvBulkMatchReference) {
  for (const Payload p : {Payload::kFP8, Payload::kBF16}) {
    run_cases(p, gpu_count(), Wire::kNvlink, kRecvBulk);
    run_cases(p, 1, Wire::kNvlink, kRecvBulk);
    run_cases(p, gpu_count(), Wire::kNvlink, kRecvBulkNoSelf);
    run_cases(p, gpu_count(), Wire::kNvlink, kRecvBulkRegions);
  }
  run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, kRecvBulk, 64);
  run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, kRecvBulkFenced);
  if (gpu_count() >= 2 && nccl_available()) run_cases(Payload::kFP8, 2, Wire::kNccl, kRecvBulk);
}

// Rows longer than one slot (kRecvBulkSlot = 8 KB): BF16 7168 (14336 bytes: 8192 + 6144), 7296
// (14592) and 14336 (four pieces), FP8 14336 (two) beside FP8 7168 and 7296 (one piece; 57 scale
// columns, a row of scales not a multiple of 16 bytes); direct rows, with and without self rows,
// and the source regions (both ranks on one GPU).
TEST_F(NvlinkTest, Session13LateRecvBulkInPiecesMatchReference) {
  for (const Payload p : {Payload::kFP8, Payload::kBF16})
    for (int64_t H : {7168, 7296, 14336})
      for (const int v : {kRecvBulk, kRecvBulkNoSelf})
        for (int gpus : {gpu_count(), 1}) {
          SCOPED_TRACE(std::string(payload_name(p)) + " hidden " + std::to_string(H) + " on " +
                       std::to_string(gpus) + " GPU(s)" + variant_name(v));
          progress("dispatch_recv_bulk_rows in pieces, hidden " + std::to_string(H));
          EpConfig cfg = config(2, 16, 8, H, 48, p);
          DeviceEpOptions opt = variant_options(v);
          opt.num_blocks = 3;
          opt.chunk_tokens = 5;
          Harness h(cfg, devices_for(2, gpus), {48, 33}, Routing::kRandom, 19, opt);
          check_against_reference(h, 2);
        }
}

TEST_F(NvlinkTest, Session13LateRecvBulkGraphCapturedRoundReplays) {
  graph_round_replays(kRecvBulk);
  graph_round_replays(kRecvBulkRegions);
  graph_round_replays(kRecvBulkFenced);
}

TEST_F(NvlinkTest, Session13LateRecvBulkOverflowIsReported) {
  overflow_is_reported({kRecvBulk, kRecvBulkRegions});
}

// A silent peer: the receive of the source regions (its notify wait) and the direct send (its
// wait for every notify) report it with the bulk receive as without.
TEST_F(NvlinkTest, Session13LateRecvBulkSilentPeerEndsWithError) {
  for (const bool direct : {false, true}) {
    SCOPED_TRACE(direct ? "dispatch_direct_rows" : "source regions");
    dispatch_silent_peer(variant_options(direct ? kRecvBulk : kRecvBulkRegions));
  }
}

TEST_F(NvlinkTest, Session13BulkRowsCombineSilentPeerEndsWithError) {
  combine_silent_peer(kBulkRows);
}

// Session 14 (ep22): layout_token_slots, every case (random, skewed, all on one rank, nobody to a
// rank, T = 0, k = 1, k = 8 of 256, hidden 7168, holes, many tiles; two rounds through the same
// buffers: records, rows, scales, layout, handle, combine and combine_tokens) bit for bit against
// the reference: every combination of the session-11 bits with FP8 over all GPUs, BF16, every
// rank on one GPU, the V3 send grid of 64 blocks, the bulk receive, the fenced acknowledgements,
// and over the NCCL wire (where the option does not apply: the usual slots).
TEST_F(NvlinkTest, Session14TokenSlotsMatchReference) {
  for (int v = kTokenSlots; v <= kTokenSlotsAll; ++v)
    run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, v);
  run_cases(Payload::kBF16, gpu_count(), Wire::kNvlink, kTokenSlotsAll);
  run_cases(Payload::kFP8, 1, Wire::kNvlink, kTokenSlotsAll);
  run_cases(Payload::kBF16, 1, Wire::kNvlink, kTokenSlots);
  run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, kTokenSlotsAll, 64);
  for (int v : {kTokenSlotsBulk, kTokenSlotsBulkFenced, kTokenSlotsFenced})
    run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, v);
  if (gpu_count() >= 2 && nccl_available())
    run_cases(Payload::kFP8, 2, Wire::kNccl, kTokenSlotsAll);
}

TEST_F(NvlinkTest, Session14TokenSlotsGraphCapturedRoundReplays) {
  graph_round_replays(kTokenSlotsAll);
  graph_round_replays(kTokenSlots);
}

TEST_F(NvlinkTest, Session14TokenSlotsOverflowIsReported) {
  overflow_is_reported({kTokenSlotsAll, kTokenSlotsBulk});
}

// A silent peer: the payload goes out before the plan, but the receive still waits for the
// peer's notify and reports it as without the option.
TEST_F(NvlinkTest, Session14TokenSlotsSilentPeerEndsWithError) {
  dispatch_silent_peer(variant_options(kTokenSlotsAll));
}

// Session 15 (ep25): layout_payload_claims (the layout-only send's payload claimed per warp, the
// receive's last block waiting for every source's payload counter) over every case: FP8 with
// each unit and flag variant over all GPUs, BF16, every rank on one GPU, the layout-only send grid
// of 96 blocks, the option ignored with the expansion and over the NCCL wire; two rounds through
// the same buffers each (the claim counters must reset, the payload counters count on).
TEST_F(NvlinkTest, Session15PayloadClaimsMatchReference) {
  for (int v = kPayloadClaims; v <= kPayloadClaimsExpanded; ++v)
    run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, v);
  run_cases(Payload::kBF16, gpu_count(), Wire::kNvlink, kPayloadClaims);
  run_cases(Payload::kBF16, gpu_count(), Wire::kNvlink, kPayloadClaimsFenced);
  run_cases(Payload::kFP8, 1, Wire::kNvlink, kPayloadClaims);
  run_cases(Payload::kBF16, 1, Wire::kNvlink, kPayloadClaimsTokens);
  run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, kPayloadClaims, 96);
  if (gpu_count() >= 2 && nccl_available())
    run_cases(Payload::kFP8, 2, Wire::kNccl, kPayloadClaims);
}

// Graph replays: the payload counters are monotonic (round n waits for n * grid), so a replayed
// round needs no host reset.
TEST_F(NvlinkTest, Session15PayloadClaimsGraphCapturedRoundReplays) {
  graph_round_replays(kPayloadClaims);
  graph_round_replays(kPayloadClaimsFenced);
}

TEST_F(NvlinkTest, Session15PayloadClaimsOverflowIsReported) {
  overflow_is_reported({kPayloadClaims, kPayloadClaimsAckFenced});
}

// A silent peer: the receive waits for the peer's notify first and reports it as without the
// option (the payload counter's wait comes last, in the receive's last block).
TEST_F(NvlinkTest, Session15PayloadClaimsSilentPeerEndsWithError) {
  dispatch_silent_peer(variant_options(kPayloadClaims));
}

// ---- low-latency kernels (DeviceEpOptions::low_latency, masked configs over NVLink) ----

// ---- Session 15 (ep26): the combine's own chunk (DeviceEpOptions::combine_chunk_tokens) ----
// Every case (random, skewed, all on one rank, nobody to a rank, T = 0, k = 1, k = 8 of 256,
// hidden 7168, holes, masked (low-latency kernels over NVLink: not chunked), many tiles; two rounds
// through the same buffers, combine and combine_tokens) bit for bit against the reference, with
// combine chunks of 3, 64, 13, 1 and 200 records beside dispatch chunks of 32, 7, 100 and 1 tokens
// (smaller, larger, equal, dividing nothing): FP8 and BF16 over all GPUs, every rank on one GPU,
// the V3 send grid, the defaults' bulk send and the register send (its combine_send_parts, receive
// tiles and fenced flags: kFencedCombine; kWarpItems with 2 send blocks), and over the NCCL wire.
TEST_F(NvlinkTest, Session15CombineChunkMatchesReference) {
  run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, kDefaults, 5, 0, -1);
  run_cases(Payload::kBF16, gpu_count(), Wire::kNvlink, kDefaults, 5, 0, -1);
  run_cases(Payload::kFP8, 1, Wire::kNvlink, kDefaults, 5, 0, -1);
  run_cases(Payload::kBF16, gpu_count(), Wire::kNvlink, kDefaults, 64, 0, -1);
  run_cases(Payload::kFP8, gpu_count(), Wire::kNvlink, kFencedCombine, 5, 0, -1);
  run_cases(Payload::kBF16, 1, Wire::kNvlink, kWarpItems, 2, 0, -1);
  if (gpu_count() >= 2 && nccl_available())
    run_cases(Payload::kFP8, 2, Wire::kNccl, kDefaults, 5, 0, -1);
}

// A round captured in a graph per rank and replayed, at the graph test's shape (dispatch chunk 4
// at max_tokens 128) with combine chunks of 3 (more chunk flags than the dispatch's) and 48
// (fewer; 128 % 48 != 0); the bulk send (defaults) and the register send with fenced flags.
TEST_F(NvlinkTest, Session15CombineChunkGraphCapturedRoundReplays) {
  for (const int m : {3, 48}) {
    graph_round_replays(kDefaults, m);
    graph_round_replays(kFencedCombine, m);
  }
}

// A peer that dispatches but never combines: the report names the combine's chunk index. Dispatch
// chunks of 1 token and a combine chunk of 16 records (max_tokens 16): every record is in combine
// chunk 0, so the report must say chunk=0 (the dispatch's index would be the record's). The other
// way round (dispatch 16, combine 1), the index is the record's, below the records sent there.
// The block's wait (session 6) and the warps' (the defaults).
TEST_F(NvlinkTest, Session15CombineChunkSilentPeerNamesCombineChunk) {
  for (const int v : {kSession6, kDefaults})
    for (const bool one_combine_chunk : {true, false}) {
      SCOPED_TRACE("variant" + variant_name(v) +
                   (one_combine_chunk ? " dispatch chunk 1, combine chunk 16"
                                      : " dispatch chunk 16, combine chunk 1"));
      EpConfig cfg = config(2, 8, 2, 256, 16, Payload::kBF16);
      cfg.timeout_s = 0.3;
      DeviceEpOptions opt = variant_options(v);
      opt.num_blocks = 3;
      opt.chunk_tokens = one_combine_chunk ? 1 : 16;
      opt.combine_chunk_tokens = one_combine_chunk ? 16 : 1;
      Harness h(cfg, devices_for(2, gpu_count()), {16, 16}, Routing::kRandom, 3, opt);
      h.dispatch();
      h.sync();
      h.group->check();
      // Rank 0 waits for the partials of its records at rank 1.
      const int64_t sent = h.group->rank(1).download().recv.count[0];
      ASSERT_GT(sent, 1) << "rank 0 must send rank 1 more than one record";
      h.group->rank(0).combine_send(h.buf[0].y, h.buf[0].stream);  // rank 1 never combines
      h.group->rank(0).combine_recv(h.buf[0].out, h.buf[0].stream);
      h.sync();
      try {
        h.group->rank(0).check();
        FAIL() << "expected an error";
      } catch (const Error& e) {
        const std::string m = e.message();
        EXPECT_NE(m.find("rank 0: peer 1 did not answer within 0.3 s"), std::string::npos) << m;
        const std::string key = "combine.chunk[rank=0][src=1][chunk=";
        const size_t at = m.find(key);
        ASSERT_NE(at, std::string::npos) << m;
        const long chunk = std::strtol(m.c_str() + at + key.size(), nullptr, 10);
        if (one_combine_chunk)
          EXPECT_EQ(chunk, 0) << m;
        else
          EXPECT_TRUE(chunk >= 0 && chunk < sent) << m;
        EXPECT_NE(m.find("], expected >= 1, seen 0"), std::string::npos) << m;
      }
    }
}

// A negative combine chunk is rejected with a message naming it.
TEST_F(NvlinkTest, Session15NegativeCombineChunkIsRejected) {
  EpConfig cfg = config(2, 8, 2, 256, 16, Payload::kBF16);
  DeviceEpOptions opt;
  opt.combine_chunk_tokens = -4;
  try {
    DeviceEpGroup group(cfg, devices_for(2, gpu_count()), opt);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    EXPECT_NE(e.message().find("combine_chunk_tokens=-4 must not be negative"), std::string::npos)
        << e.message();
  }
}

std::vector<Case> ll_cases() {
  return {
      {"ll_random", 2, 16, 4, 512, 96, {96, 70}, Routing::kRandom, 256},
      {"ll_t0", 3, 12, 3, 256, 32, {0, 32, 0}, Routing::kRandom, 128},
      {"ll_all_t0", 2, 8, 2, 256, 16, {0, 0}, Routing::kRandom, 16},
      {"ll_k1", 2, 8, 1, 256, 200, {200, 150}, Routing::kRandom, 128},
      // The decoding shape of DeepSeek-V3 (top-8 of 256 experts, hidden 7168).
      {"ll_k8_v3", 2, 256, 8, 7168, 128, {128, 117}, Routing::kRandom, 256},
      {"ll_skewed", 4, 32, 4, 256, 64, {64, 64, 50, 64}, Routing::kSkewed, 256},
      {"ll_one_rank", 4, 16, 4, 384, 48, {48, 1, 30, 48}, Routing::kOneRank, 192},
      {"ll_none_to_last", 4, 16, 2, 256, 40, {40, 40, 40, 40}, Routing::kNoneToLastRank, 64},
      {"ll_holes", 4, 32, 8, 256, 40, {40, 12, 40, 40}, Routing::kHoles, 64},
      // Capacity overflow (about 100 slots per expert, capacity 64): reported, combine gives +0.
      {"ll_overflow", 2, 4, 2, 256, 200, {200, 200}, Routing::kRandom, 64},
      // The largest batch the kernels take (32 plan tiles).
      {"ll_1024_tokens", 2, 64, 8, 256, 1024, {1024, 1000}, Routing::kRandom, 512},
  };
}

// Every case on the low-latency kernels against the reference, with send grids of 1 block (one
// warp per token in turn), 5 and 64 blocks (columns split across warps), receive grids of 3
// blocks or automatic, receive kernels beside or after their sends; the normal kernels with the
// masked layout run each case too, so both paths stay covered.
void run_ll_cases(Payload p, int gpus) {
  int ran = 0;
  for (const Case& c : ll_cases()) {
    for (bool low_latency : {true, false}) {
      ++ran;
      constexpr int kBlocks[] = {5, 1, 64};
      DeviceEpOptions opt;
      opt.low_latency = low_latency;
      opt.num_blocks = kBlocks[ran % 3];
      opt.recv_blocks = ran % 4 == 1 ? 3 : 0;
      opt.overlap_recv = ran % 5 != 0;
      progress(std::string("case ") + c.name + " " + payload_name(p) +
               (low_latency ? " low_latency" : " normal kernels") + " blocks " +
               std::to_string(opt.num_blocks));
      SCOPED_TRACE(std::string(c.name) + " " + payload_name(p) + " on " + std::to_string(gpus) +
                   " GPU(s), " + (low_latency ? "low-latency" : "normal") + " kernels, " +
                   std::to_string(opt.num_blocks) + " send blocks");
      EpConfig cfg = config(c.R, c.E, c.K, c.H, c.Tmax, p);
      cfg.masked_capacity = c.masked_capacity;
      Harness h(cfg, devices_for(c.R, gpus), c.tokens, c.routing, 70 + c.R, opt);
      check_against_reference(h, 2);
    }
  }
  EXPECT_GT(ran, 0);
}

// The low-latency options of session 5 (N ll_early_notify, X ll_combine_spread, O
// ll_combine_own_recv, T ll_token_flags; all on by default). Letters turn options on over the
// defaults; "0" first turns all four off, i.e. the session-4 kernels.
DeviceEpOptions ll_option_set(const std::string& letters) {
  DeviceEpOptions o;
  if (letters.find('0') != std::string::npos)
    o.ll_early_notify = o.ll_combine_spread = o.ll_combine_own_recv = o.ll_token_flags = false;
  for (char c : letters) {
    o.ll_early_notify = o.ll_early_notify || c == 'N';
    o.ll_combine_spread = o.ll_combine_spread || c == 'X';
    o.ll_combine_own_recv = o.ll_combine_own_recv || c == 'O';
    o.ll_token_flags = o.ll_token_flags || c == 'T';
    // Session 9 (off by default; "0" leaves it): H ll_combine_own_narrow (with O).
    o.ll_combine_own_narrow = o.ll_combine_own_narrow || c == 'H';
    // Session 14 ("0" leaves it): R / W ll_dispatch_rotate 1 / 2 (R the default since ep24's
    // call), A 0 (ascending ranks, the order before session 14).
    if (c == 'R' || c == 'W') o.ll_dispatch_rotate = c == 'R' ? 1 : 2;
    if (c == 'A') o.ll_dispatch_rotate = 0;
    // F: the normal kernels' flags and acknowledgements after a full system fence (the defaults
    // before session 9 raise them by release stores alone).
    o.dispatch_release_only = o.dispatch_release_only && c != 'F';
    o.combine_release_only = o.combine_release_only && c != 'F';
  }
  return o;
}

// One low-latency case with the options of `letters` (ll_option_set); `ran` (the cases run so far,
// this one included) picks the send grid (5, 1 or 64 blocks), the receive grid (3 or automatic)
// and whether the receive runs beside the send. Two rounds against the reference, bit for bit.
void check_ll_option_case(const Case& c, Payload p, int gpus, const std::string& letters, int ran) {
  constexpr int kBlocks[] = {5, 1, 64};
  DeviceEpOptions opt = ll_option_set(letters);
  opt.num_blocks = kBlocks[ran % 3];
  opt.recv_blocks = ran % 4 == 1 ? 3 : 0;
  opt.overlap_recv = ran % 5 != 0;
  progress(std::string("case ") + c.name + " " + payload_name(p) + " low_latency options " +
           letters + " blocks " + std::to_string(opt.num_blocks));
  SCOPED_TRACE(std::string(c.name) + " " + payload_name(p) + " on " + std::to_string(gpus) +
               " GPU(s), low-latency options " + letters + ", " + std::to_string(opt.num_blocks) +
               " send blocks");
  EpConfig cfg = config(c.R, c.E, c.K, c.H, c.Tmax, p);
  cfg.masked_capacity = c.masked_capacity;
  Harness h(cfg, devices_for(c.R, gpus), c.tokens, c.routing, 70 + c.R, opt);
  check_against_reference(h, 2);
}

// Every case with the four options off ("0", the session-4 kernels) and, in turn, with each
// alone, with N X O and with X O (run_ll_cases runs the defaults), on send grids of 5, 1 and 64
// blocks, two rounds each against the reference bit for bit. N changes which counter the
// receive waits on before it derives the layout (a layout of a round whose counts are not in
// misplaces rows); X which warp serves which record and O who computes the rank's own partial
// (combine and combine_tokens outputs compared); T what a receive step waits for before it reads
// a record (a step read before its data is in differs from the reference) and which rows the
// receive turns back into padding.
void run_ll_s5_option_cases(Payload p, int gpus) {
  constexpr const char* kTurn[] = {"0N", "0X", "0O", "0T", "0NXO", "0XO"};
  int ran = 0;
  for (const Case& c : ll_cases()) {
    for (const std::string& letters : {std::string("0"), std::string(kTurn[ran / 2 % 6])})
      check_ll_option_case(c, p, gpus, letters, ++ran);
  }
  EXPECT_GT(ran, 0);
}

TEST_F(NvlinkTest, LowLatencySession5OptionsMatchReferenceFp8AllGpus) {
  run_ll_s5_option_cases(Payload::kFP8, gpu_count());
}
TEST_F(NvlinkTest, LowLatencySession5OptionsMatchReferenceBf16AllGpus) {
  run_ll_s5_option_cases(Payload::kBF16, gpu_count());
}
TEST_F(NvlinkTest, LowLatencySession5OptionsMatchReferenceFp8OneGpuManyRanks) {
  run_ll_s5_option_cases(Payload::kFP8, 1);
}

// Session 9's H over every case: on the defaults, and with the session-4 kernels plus O
// ("0OH": the own partial of the per-block arrival path) in turn; send grids of 5, 1 and 64
// blocks, receive grids of 3 or automatic, receive beside or after the send; two rounds each
// against the reference bit for bit. H changes how many of the own partial's loads are in flight
// and so the code that sums them (combine and combine_tokens compared; the cases hold tokens with
// 0 to 8 rows here, overflowed rounds and hidden sizes that end inside a 1024-column step).
void run_ll_s9_option_cases(Payload p, int gpus) {
  constexpr const char* kTurn[] = {"H", "0OH"};
  int ran = 0;
  for (const Case& c : ll_cases()) {
    const std::string letters = kTurn[ran % 2];
    check_ll_option_case(c, p, gpus, letters, ++ran);
  }
  EXPECT_GT(ran, 0);
}

TEST_F(NvlinkTest, LowLatencySession9OptionsMatchReferenceFp8AllGpus) {
  run_ll_s9_option_cases(Payload::kFP8, gpu_count());
}
TEST_F(NvlinkTest, LowLatencySession9OptionsMatchReferenceBf16AllGpus) {
  run_ll_s9_option_cases(Payload::kBF16, gpu_count());
}
TEST_F(NvlinkTest, LowLatencySession9OptionsMatchReferenceFp8OneGpuManyRanks) {
  run_ll_s9_option_cases(Payload::kFP8, 1);
}

// Session 14's R and W (ll_dispatch_rotate 1 and 2: the order in which the dispatch send's warps
// visit a token's destinations) over every case, two sets a case: on the defaults (the per-step
// flags) and with the session-4 kernels ("0A", "0W": the per-block arrival), A (the ascending
// order before R became the default, which every other LL test runs) and W in turn;
// send grids of 5, 1 and 64 blocks, receive grids of 3 or automatic, receive beside or after the
// send; two rounds each against the reference bit for bit. The order decides which slot of which
// destination a warp's stores and metadata reach, so a rotated rank or slot lands a record
// (payload, scales, ids, weights) in another record's place; the cases hold 2, 3 and 4 ranks,
// tokens that skip destinations (holes, one rank, none to the last) and ranks with no tokens.
void run_ll_s14_option_cases(Payload p, int gpus) {
  int ran = 0, cases = 0;
  for (const Case& c : ll_cases()) {
    const bool odd = cases++ % 2 != 0;
    for (const std::string& letters :
         {std::string(odd ? "A" : "W"), std::string(odd ? "0W" : "0A")})
      check_ll_option_case(c, p, gpus, letters, ++ran);
  }
  EXPECT_GT(ran, 0);
}

TEST_F(NvlinkTest, LowLatencyRotateMatchesReferenceFp8AllGpus) {
  run_ll_s14_option_cases(Payload::kFP8, gpu_count());
}
TEST_F(NvlinkTest, LowLatencyRotateMatchesReferenceBf16AllGpus) {
  run_ll_s14_option_cases(Payload::kBF16, gpu_count());
}
TEST_F(NvlinkTest, LowLatencyRotateMatchesReferenceFp8OneGpuManyRanks) {
  run_ll_s14_option_cases(Payload::kFP8, 1);
}

TEST_F(NvlinkTest, LowLatencyMatchesReferenceFp8AllGpus) {
  run_ll_cases(Payload::kFP8, gpu_count());
}
TEST_F(NvlinkTest, LowLatencyMatchesReferenceBf16AllGpus) {
  run_ll_cases(Payload::kBF16, gpu_count());
}
TEST_F(NvlinkTest, LowLatencyMatchesReferenceFp8OneGpuManyRanks) {
  run_ll_cases(Payload::kFP8, 1);
}

// Rounds whose row counts grow, overflow and shrink through the same buffers: rows a previous
// round used must turn back into padding (m_indices and row_src -1). R ranks on all GPUs, 4
// experts each (8 at 2 ranks, as before session 14).
void ll_rows_change(const std::string& letters, int R) {
  SCOPED_TRACE("low-latency options '" + letters + "', " + std::to_string(R) + " ranks");
  EpConfig cfg = config(R, 4 * R, 2, 256, 200, Payload::kFP8);
  cfg.masked_capacity = 64;
  Harness h(cfg, devices_for(R, gpu_count()), std::vector<int64_t>(R, 200), Routing::kRandom, 21,
            ll_option_set(letters));
  for (int64_t tokens : {60, 200, 20, 90}) {
    SCOPED_TRACE("tokens " + std::to_string(tokens));
    for (auto& d : h.data) d.tokens = tokens;
    check_against_reference(h, 1);
  }
}

TEST_F(NvlinkTest, LowLatencyRowsChangeBetweenRounds) {
  for (const std::string& letters :
       {std::string("0"), std::string("0NXO"), std::string(), std::string("H")})
    ll_rows_change(letters, 2);
}
// Session 14's R and W (ll_dispatch_rotate), at 2 ranks and at 4 (where the order matters most).
TEST_F(NvlinkTest, LowLatencyRotateRowsChangeBetweenRounds) {
  ll_rows_change("A", 2);
  ll_rows_change("W", 4);
  ll_rows_change("R", 4);
  ll_rows_change("0A", 4);
}

// The whole round (dispatch and combine) captured in one CUDA graph per rank, replayed.
void graph_round(int R, int gpus, bool low_latency, const std::string& ll_letters = "") {
  EpConfig cfg = config(R, 16 * R, 8, 1024, 128, Payload::kFP8);
  cfg.masked_capacity = 512;
  DeviceEpOptions opt = ll_option_set(ll_letters);
  opt.low_latency = low_latency;
  std::vector<int64_t> tokens(R, 128);
  tokens[R - 1] = 90;
  Harness h(cfg, devices_for(R, gpus), tokens, Routing::kRandom, 9, opt);
  const auto refs = h.references();
  const auto& want = refs->want;
  std::vector<const uint16_t*> y;
  for (int r = 0; r < R; ++r) y.push_back(h.ys[r].data());
  const auto want_out = refs->overflow ? combine_reference(cfg, refs->want, y) : refs->want_combine;
  std::vector<cudaGraphExec_t> execs;
  for (int r = 0; r < R; ++r) {
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
  for (int replay = 0; replay < 4; ++replay) {
    for (int r = 0; r < R; ++r) {
      FM_CHECK_CUDA(cudaSetDevice(h.buf[r].device));
      FM_CHECK_CUDA(
          cudaMemsetAsync(h.buf[r].out, 0xFF, h.data[r].tokens * cfg.hidden * 2, h.buf[r].stream));
      FM_CHECK_CUDA(cudaGraphLaunch(execs[r], h.buf[r].stream));
    }
    h.sync();
    h.group->check();
    for (int r = 0; r < R; ++r) {
      ASSERT_EQ(h.out(r), want_out[r]) << "replay " << replay << " rank " << r;
      expect_same_dispatch(cfg, want[r], h.group->rank(r).download(), r);
    }
  }
  for (auto e : execs) cudaGraphExecDestroy(e);
}

TEST_F(NvlinkTest, LowLatencyGraphCapturedRoundReplays) {
  for (bool low_latency : {true, false}) {
    SCOPED_TRACE(low_latency ? "low-latency kernels" : "normal kernels");
    graph_round(2, gpu_count(), low_latency);
  }
  {
    SCOPED_TRACE("4 ranks on one GPU");
    graph_round(4, 1, true);
  }
  SCOPED_TRACE("low-latency options 0NXO");
  graph_round(2, gpu_count(), true, "0NXO");
  graph_round(4, 1, true, "0NXO");
  SCOPED_TRACE("low-latency options 0 (session 4)");
  graph_round(2, gpu_count(), true, "0");
  graph_round(4, 1, true, "0");
  SCOPED_TRACE("low-latency option H (session 9)");
  graph_round(2, gpu_count(), true, "H");
  graph_round(4, 1, true, "H");
}

// Session 14's R and W (ll_dispatch_rotate): 2 ranks on all GPUs, 4 ranks on all GPUs and on one.
TEST_F(NvlinkTest, LowLatencyGraphCapturedRoundReplaysRotated) {
  for (const std::string& letters : {std::string("R"), std::string("W"), std::string("0W")}) {
    SCOPED_TRACE("low-latency options '" + letters + "'");
    graph_round(2, gpu_count(), true, letters);
    graph_round(4, gpu_count(), true, letters);
    graph_round(4, 1, true, letters);
  }
}

// Rank 1 never sends: rank 0's receive ends with an error naming rank, peer and counter.
// N and T (which implies N) wait for the peer's counts first (their own counter):
// ll_dispatch.notify; the receiver's plan (ll_recv_plan, the default since session 17) for the
// peer's ids: ll_dispatch.ids.
void ll_silent_peer(const std::vector<std::string>& letter_sets) {
  for (const std::string& letters : letter_sets) {
    const DeviceEpOptions o = ll_option_set(letters);
    const bool early = o.ll_early_notify || o.ll_token_flags;
    SCOPED_TRACE("low-latency options '" + letters + "'");
    EpConfig cfg = config(2, 8, 2, 256, 16, Payload::kFP8);
    cfg.masked_capacity = 32;
    cfg.timeout_s = 0.3;
    Harness h(cfg, devices_for(2, gpu_count()), {16, 16}, Routing::kRandom, 3,
              ll_option_set(letters));
    h.group->rank(0).dispatch_send(h.batch(0), h.buf[0].stream);  // rank 1 never sends
    h.group->rank(0).dispatch_recv(h.buf[0].stream);
    h.sync();
    try {
      h.group->rank(0).check();
      FAIL() << "expected an error";
    } catch (const Error& e) {
      const std::string m = e.message();
      EXPECT_NE(m.find("rank 0: peer 1 did not answer within 0.3 s"), std::string::npos) << m;
      const char* counter = o.ll_recv_plan ? "ll_dispatch.ids"
                            : early        ? "ll_dispatch.notify"
                                           : "ll_dispatch.data";
      EXPECT_NE(m.find(std::string(counter) + "[rank=0][src=1], expected >= 1, seen 0"),
                std::string::npos)
          << m;
    }
  }
}

TEST_F(NvlinkTest, LowLatencySilentPeerEndsWithErrorNamingRankPeerCounter) {
  ll_silent_peer({"0", "", "0N", "0T", "0NXO"});
}
// Session 14's R and W (ll_dispatch_rotate), on the flagged path and on the session-4 kernels.
TEST_F(NvlinkTest, LowLatencyRotateSilentPeerEndsWithErrorNamingRankPeerCounter) {
  ll_silent_peer({"R", "W", "0W"});
}

// An expert id out of range is reported with the rank and the token.
void ll_bad_expert(const std::vector<std::string>& letter_sets) {
  for (const std::string& letters : letter_sets) {
    SCOPED_TRACE("low-latency options '" + letters + "'");
    EpConfig cfg = config(2, 8, 2, 256, 16, Payload::kFP8);
    cfg.masked_capacity = 32;
    Harness h(cfg, devices_for(2, gpu_count()), {16, 16}, Routing::kRandom, 3,
              ll_option_set(letters));
    h.data[1].idx[5] = 99;
    FM_CHECK_CUDA(cudaSetDevice(h.buf[1].device));
    FM_CHECK_CUDA(cudaMemcpy(h.buf[1].idx, h.data[1].idx.data(), h.data[1].idx.size() * 4,
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

TEST_F(NvlinkTest, LowLatencyBadExpertIdIsReported) {
  ll_bad_expert({"", "0", "0NXO"});
}
// Session 14's R and W (ll_dispatch_rotate).
TEST_F(NvlinkTest, LowLatencyRotateBadExpertIdIsReported) {
  ll_bad_expert({"A", "W", "0R"});
}
// An order that does not exist is rejected before any kernel runs, naming the option.
TEST_F(NvlinkTest, LowLatencyRotateOutOfRangeIsRejected) {
  EpConfig cfg = config(2, 8, 2, 256, 16, Payload::kFP8);
  cfg.masked_capacity = 32;
  for (int bad : {-1, 3}) {
    DeviceEpOptions opt;
    opt.ll_dispatch_rotate = bad;
    try {
      DeviceEpGroup group(cfg, {0, 0}, opt);
      FAIL() << "expected an error for ll_dispatch_rotate=" << bad;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
      EXPECT_NE(
          e.message().find("ll_dispatch_rotate=" + std::to_string(bad) + " must be 0, 1 or 2"),
          std::string::npos)
          << e.message();
    }
  }
}

// ---- rounds back to back: no host synchronisation between phases or rounds ----
// Every test above synchronises the host after each phase, so a kernel that skipped a wait for
// the previous round's acknowledgement, or overwrote a region a peer still reads for the previous
// round, would be caught only by a hang. Here every rank's stream gets several rounds in a row
// (ranks concurrent, one synchronisation at the end): round r dispatches batch r % 3 (routing,
// token counts and payloads differ between batches) and copies its receive view on the stream
// right after dispatch_recv; most rounds then combine expert outputs y_r and combine_tokens rows_r
// (new values every round; two combines in a row exercise the combine acknowledgement) and copy
// the view again, but some only dispatch: in a dispatch + combine round the combine's own data
// dependencies already order the next dispatch after every peer's dispatch_recv, so only
// dispatches in a row exercise the dispatch acknowledgement. Every output has a buffer of its own,
// poisoned first. So a round that read any of the previous round's inputs, layout, records or
// partials, or whose data was overwritten by a peer's next round, differs from the reference
// somewhere.

// One rank's copy of its DeviceRecvView after one round's dispatch (device memory).
struct ViewCopy {
  int32_t* recv_count = nullptr;      // [R] (nullptr: not copied)
  int32_t* expert_counts = nullptr;   // [L]
  int32_t* expert_offsets = nullptr;  // [L + 1]
  int32_t* m_indices = nullptr;       // [row bound]
  int32_t* row_src = nullptr;         // [row bound]
  float* row_weight = nullptr;        // [row bound]
  uint8_t* x = nullptr;               // [row bound, row bytes]
  float* x_scales = nullptr;          // [row bound, H / 128] (FP8)
  int64_t* status = nullptr;          // [3]
};

// Device allocations of several GPUs, freed together.
class DeviceAllocs {
 public:
  DeviceAllocs() = default;
  DeviceAllocs(const DeviceAllocs&) = delete;
  DeviceAllocs& operator=(const DeviceAllocs&) = delete;
  ~DeviceAllocs() {
    for (const auto& [device, p] : ptrs_) {
      cudaSetDevice(device);
      cudaFree(p);
    }
  }
  // n elements, every byte `poison`.
  template <typename T>
  T* alloc(int device, int64_t n, int poison) {
    FM_CHECK_CUDA(cudaSetDevice(device));
    const size_t bytes = std::max<size_t>(1, static_cast<size_t>(n)) * sizeof(T);
    void* p = nullptr;
    FM_CHECK_CUDA(cudaMalloc(&p, bytes));
    ptrs_.emplace_back(device, p);
    FM_CHECK_CUDA(cudaMemset(p, poison, bytes));
    return static_cast<T*>(p);
  }
  template <typename T>
  T* upload(int device, const std::vector<T>& v) {
    T* p = to_device(device, v);
    ptrs_.emplace_back(device, p);
    return p;
  }

 private:
  std::vector<std::pair<int, void*>> ptrs_;
};

template <typename T>
void copy_on_stream(T* dst, const T* src, int64_t n, cudaStream_t stream) {
  if (dst && n > 0)
    FM_CHECK_CUDA(cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * sizeof(T),
                                  cudaMemcpyDeviceToDevice, stream));
}

void copy_view(const EpConfig& cfg, const DeviceRecvView& v, const ViewCopy& to,
               cudaStream_t stream) {
  const int L = cfg.experts_per_rank();
  const int64_t bound = cfg.row_bound(), SC = cfg.scale_cols();
  const int64_t row_bytes = cfg.payload == Payload::kFP8 ? cfg.hidden : 2 * cfg.hidden;
  copy_on_stream(to.recv_count, v.recv_count, cfg.num_ranks, stream);
  copy_on_stream(to.expert_counts, v.expert_counts, L, stream);
  copy_on_stream(to.expert_offsets, v.expert_offsets, L + 1, stream);
  copy_on_stream(to.m_indices, v.m_indices, bound, stream);
  copy_on_stream(to.row_src, v.row_src, bound, stream);
  copy_on_stream(to.row_weight, v.row_weight, bound, stream);
  copy_on_stream(to.x, static_cast<const uint8_t*>(v.x), bound * row_bytes, stream);
  copy_on_stream(to.x_scales, v.x_scales, bound * SC, stream);
  copy_on_stream(to.status, v.status, 3, stream);
}

struct BackToBackCase {
  const char* name;
  int R, E, K;
  int64_t H, Tmax;
  int64_t masked_capacity;  // 0: grouped layout (normal kernels)
  Payload payload;
  const char* ll_letters;  // options by ll_option_set letters (low-latency ones, or R)
  int num_blocks, chunk_tokens;
  bool overlap_recv;
};

// Round r's view copy of rank s against the reference of its batch.
void expect_view_copy(const EpConfig& cfg, int device, const ViewCopy& v,
                      const DispatchResult& want) {
  const int R = cfg.num_ranks, K = cfg.top_k, L = cfg.experts_per_rank();
  const int64_t H = cfg.hidden, SC = cfg.scale_cols(), bound = cfg.row_bound(),
                Tmax = cfg.max_tokens_per_rank;
  const bool fp8 = cfg.payload == Payload::kFP8;
  const int64_t row_bytes = fp8 ? H : 2 * H;
  const GroupedRecv& g = want.grouped;
  ASSERT_FALSE(g.overflow) << "the cases are sized not to overflow";
  if (v.recv_count) EXPECT_EQ(to_host(device, v.recv_count, R), want.recv.count) << "recv_count";
  const std::vector<int64_t> status = to_host(device, v.status, 3);
  EXPECT_EQ(status[0], g.rows_needed) << "status rows_needed";
  EXPECT_EQ(status[1], 0) << "status overflow";
  EXPECT_EQ(status[2], want.recv.total()) << "status tokens received";
  EXPECT_EQ(to_host(device, v.expert_counts, L), g.expert_counts) << "expert_counts";
  EXPECT_EQ(to_host(device, v.expert_offsets, L + 1), g.expert_offsets) << "expert_offsets";
  EXPECT_EQ(to_host(device, v.m_indices, bound), g.m_indices) << "m_indices";
  const std::vector<int32_t> row_src = to_host(device, v.row_src, bound);
  const std::vector<float> row_weight = to_host(device, v.row_weight, bound);
  const std::vector<uint8_t> x = to_host(device, v.x, bound * row_bytes);
  const std::vector<float> scales =
      fp8 ? to_host(device, v.x_scales, bound * SC) : std::vector<float>();
  const uint8_t* want_x = fp8 ? g.x_fp8.data() : reinterpret_cast<const uint8_t*>(g.x_bf16.data());
  for (int64_t row = 0; row < g.num_rows; ++row) {
    ASSERT_EQ(row_src[row], g.row_src[row]) << "row_src, row " << row;
    if (g.row_src[row] < 0) continue;
    // The gate weight of the row's (received token i, k): region s, slot i - offset(s).
    const int64_t i = g.row_src[row] / K, k = g.row_src[row] % K;
    int s = 0;
    while (s + 1 < R && want.recv.offset(s + 1) <= i) ++s;
    const int64_t at = s * Tmax + (i - want.recv.offset(s));
    ASSERT_EQ(float_to_bits(row_weight[row]), float_to_bits(want.recv.topk_weight[at * K + k]))
        << "row_weight, row " << row;
    ASSERT_TRUE(
        std::equal(&x[row * row_bytes], &x[row * row_bytes] + row_bytes, want_x + row * row_bytes))
        << "payload, row " << row;
    for (int64_t c = 0; c < (fp8 ? SC : 0); ++c)
      ASSERT_EQ(float_to_bits(scales[row * SC + c]), float_to_bits(g.x_scales[row * SC + c]))
          << "scale, row " << row << " column block " << c;
  }
}

void run_back_to_back(const BackToBackCase& c, int gpus, int rounds) {
  constexpr int kBatches = 3;
  constexpr Routing kRouting[kBatches] = {Routing::kRandom, Routing::kSkewed, Routing::kHoles};
  EpConfig cfg = config(c.R, c.E, c.K, c.H, c.Tmax, c.payload);
  cfg.masked_capacity = c.masked_capacity;
  DeviceEpOptions opt = ll_option_set(c.ll_letters);
  opt.num_blocks = c.num_blocks;
  opt.chunk_tokens = c.chunk_tokens;
  opt.overlap_recv = c.overlap_recv;
  const int R = c.R, L = cfg.experts_per_rank();
  const int64_t H = cfg.hidden, SC = cfg.scale_cols(), bound = cfg.row_bound();
  const bool fp8 = c.payload == Payload::kFP8;
  const int64_t row_bytes = fp8 ? H : 2 * H;
  const std::vector<int> devices = devices_for(R, gpus);
  // combine_tokens: one row per received slot (as Harness draws them).
  EpConfig rows_cfg = cfg;
  rows_cfg.masked_capacity = 0;
  rows_cfg.max_rows = (cfg.max_recv_tokens() + 127) / 128 * 128;

  // Inputs and their references: batches, then every round's y and rows.
  std::vector<std::vector<RankData>> data;
  std::vector<std::vector<DispatchResult>> want;
  for (int b = 0; b < kBatches; ++b) {
    std::vector<int64_t> tokens(R);
    for (int s = 0; s < R; ++s)
      tokens[s] = b == 0   ? (s == R - 1 ? c.Tmax - 13 : c.Tmax)
                  : b == 1 ? c.Tmax / 2 + 3 * s
                           : (s == 0 ? 0 : c.Tmax - 5 * s);
    data.push_back(make_inputs(cfg, tokens, kRouting[b], 200 + 10 * b));
    want.push_back(dispatch_reference(cfg, batches_of(data.back())));
  }
  // Of 10 rounds, 1, 2, 6 and 7 only dispatch (three dispatches in a row, twice); every batch
  // is combined and dispatched alone at least once, and rounds 3-5 combine one after the other.
  auto combines = [](int r) { return r % 5 == 0 || r % 5 >= 3; };
  std::vector<std::vector<std::vector<uint16_t>>> ys(rounds), rows(rounds), want_out(rounds),
      want_back(rounds);
  for (int r = 0; r < rounds; ++r) {
    if (!combines(r)) continue;
    std::vector<const uint16_t*> yp, rp;
    for (int s = 0; s < R; ++s) {
      ys[r].push_back(testing::expert_outputs(cfg, s, 300 + r));
      rows[r].push_back(testing::expert_outputs(rows_cfg, s, 400 + r));
      yp.push_back(ys[r][s].data());
      rp.push_back(rows[r][s].data());
    }
    want_out[r] = combine_reference(cfg, want[r % kBatches], yp);
    want_back[r] = combine_tokens_reference(cfg, want[r % kBatches], rp);
  }

  DeviceAllocs mem;
  std::vector<std::vector<DeviceBatch>> batch(kBatches);
  for (int b = 0; b < kBatches; ++b)
    for (int s = 0; s < R; ++s)
      batch[b].push_back({data[b][s].tokens, mem.upload(devices[s], data[b][s].x),
                          mem.upload(devices[s], data[b][s].idx),
                          mem.upload(devices[s], data[b][s].w)});
  // early: the view right after dispatch_recv; late: after the round's combines, just before
  // the next dispatch (the fields this rank writes itself; recv_count is the sources', below,
  // so it is copied only early and only in rounds that combine).
  struct RoundBuffers {
    const uint16_t *y = nullptr, *rows = nullptr;
    uint16_t *out = nullptr, *back = nullptr;
    ViewCopy early, late;
  };
  std::vector<std::vector<RoundBuffers>> rb(rounds, std::vector<RoundBuffers>(R));
  constexpr int kPoison = 0xA5;  // not -1 (padding), +0 or a small integer: a missed write shows
  for (int r = 0; r < rounds; ++r)
    for (int s = 0; s < R; ++s) {
      const int d = devices[s];
      RoundBuffers& q = rb[r][s];
      if (combines(r)) {
        q.y = mem.upload(d, ys[r][s]);
        q.rows = mem.upload(d, rows[r][s]);
        const int64_t T = data[r % kBatches][s].tokens;
        q.out = mem.alloc<uint16_t>(d, T * H, 0xFF);
        q.back = mem.alloc<uint16_t>(d, T * H, 0xFF);
      }
      for (ViewCopy* v : {&q.early, &q.late}) {
        if (v == &q.late && !combines(r)) continue;
        v->recv_count = v == &q.early && combines(r) ? mem.alloc<int32_t>(d, R, kPoison) : nullptr;
        v->expert_counts = mem.alloc<int32_t>(d, L, kPoison);
        v->expert_offsets = mem.alloc<int32_t>(d, L + 1, kPoison);
        v->m_indices = mem.alloc<int32_t>(d, bound, kPoison);
        v->row_src = mem.alloc<int32_t>(d, bound, kPoison);
        v->row_weight = mem.alloc<float>(d, bound, kPoison);
        v->x = mem.alloc<uint8_t>(d, bound * row_bytes, kPoison);
        if (fp8) v->x_scales = mem.alloc<float>(d, bound * SC, kPoison);
        v->status = mem.alloc<int64_t>(d, 3, kPoison);
      }
    }

  DeviceEpGroup group(cfg, devices, opt);
  // Destroyed before the group and the buffers: the streams are drained first.
  struct Streams {
    const std::vector<int>& devices;
    std::vector<cudaStream_t> s;
    ~Streams() {
      for (size_t r = 0; r < s.size(); ++r) {
        if (!s[r]) continue;
        cudaSetDevice(devices[r]);
        cudaStreamSynchronize(s[r]);
        cudaStreamDestroy(s[r]);
      }
    }
  } owned{devices, std::vector<cudaStream_t>(R, nullptr)};
  std::vector<cudaStream_t>& streams = owned.s;
  for (int s = 0; s < R; ++s) {
    FM_CHECK_CUDA(cudaSetDevice(devices[s]));
    FM_CHECK_CUDA(cudaStreamCreateWithFlags(&streams[s], cudaStreamNonBlocking));
  }
  for (int d : devices) {  // the poison and uploads are in place before the first round
    FM_CHECK_CUDA(cudaSetDevice(d));
    FM_CHECK_CUDA(cudaDeviceSynchronize());
  }

  for (int r = 0; r < rounds; ++r) {
    const int b = r % kBatches;
    for (int s = 0; s < R; ++s) group.rank(s).dispatch_send(batch[b][s], streams[s]);
    for (int s = 0; s < R; ++s) {
      DeviceEpRank& ep = group.rank(s);
      ep.dispatch_recv(streams[s]);
      // recv_count is written by the sources' next dispatch_send, which may start as soon as
      // this rank's dispatch_recv acknowledged them and (in a round that combines) its last
      // combine_send of the round let their combine_recv end: copied before combine_send, and not
      // at all in a dispatch-only round (the sources' next dispatch may already have rewritten it).
      FM_CHECK_CUDA(cudaSetDevice(devices[s]));
      copy_view(cfg, ep.view(), rb[r][s].early, streams[s]);
    }
    if (!combines(r)) continue;
    for (int s = 0; s < R; ++s) group.rank(s).combine_send(rb[r][s].y, streams[s]);
    for (int s = 0; s < R; ++s) group.rank(s).combine_recv(rb[r][s].out, streams[s]);
    for (int s = 0; s < R; ++s) group.rank(s).combine_tokens_send(rb[r][s].rows, streams[s]);
    for (int s = 0; s < R; ++s) {
      group.rank(s).combine_recv(rb[r][s].back, streams[s]);
      FM_CHECK_CUDA(cudaSetDevice(devices[s]));
      copy_view(cfg, group.rank(s).view(), rb[r][s].late, streams[s]);
    }
  }
  for (int s = 0; s < R; ++s) {
    FM_CHECK_CUDA(cudaSetDevice(devices[s]));
    FM_CHECK_CUDA(cudaStreamSynchronize(streams[s]));
  }
  group.check();

  for (int r = 0; r < rounds; ++r)
    for (int s = 0; s < R; ++s) {
      SCOPED_TRACE("round " + std::to_string(r) + " (batch " + std::to_string(r % kBatches) +
                   (combines(r) ? ", combines" : ", dispatch only") + "), rank " +
                   std::to_string(s));
      const int d = devices[s];
      const int64_t T = data[r % kBatches][s].tokens;
      {
        SCOPED_TRACE("view copied right after dispatch_recv");
        expect_view_copy(cfg, d, rb[r][s].early, want[r % kBatches][s]);
      }
      if (::testing::Test::HasFatalFailure()) return;
      if (!combines(r)) continue;
      {
        SCOPED_TRACE("view copied after the round's combines (valid until the next dispatch)");
        expect_view_copy(cfg, d, rb[r][s].late, want[r % kBatches][s]);
      }
      if (::testing::Test::HasFatalFailure()) return;
      ASSERT_EQ(to_host(d, rb[r][s].out, T * H), want_out[r][s]) << "combine";
      ASSERT_EQ(to_host(d, rb[r][s].back, T * H), want_back[r][s]) << "combine_tokens";
    }
}

// Normal kernels (grouped layout, FP8 and BF16) and the low-latency kernels (masked FP8) with
// the defaults, with session 5's options off ("0", the session-4 kernels) and with N X O (the
// per-block arrival of session 4 with early notify and both combine options), with session 9's H
// (ll_combine_own_narrow), at 2 and 4 ranks
// and send grids of 1, 5 and 64 blocks; the normal kernels also with "F" (dispatch_release_only
// and combine_release_only off: the flags and acknowledgements after a full system fence; the
// defaults reuse every round's buffers after release-only acknowledgements).
// Masked capacities hold R * Tmax, so no batch overflows.
TEST_F(NvlinkTest, RoundsBackToBackWithoutHostSyncMatchReference) {
  const BackToBackCase cases[] = {
      {"normal_fp8", 2, 16, 4, 512, 96, 0, Payload::kFP8, "", 5, 7, true},
      {"normal_bf16_4_ranks", 4, 32, 4, 256, 64, 0, Payload::kBF16, "", 8, 4, false},
      {"normal_fp8_fenced", 2, 16, 4, 512, 96, 0, Payload::kFP8, "F", 5, 7, true},
      {"normal_bf16_4_ranks_fenced", 4, 32, 4, 256, 64, 0, Payload::kBF16, "F", 8, 4, false},
      {"normal_fp8_fenced_64_blocks", 2, 16, 4, 512, 96, 0, Payload::kFP8, "F", 64, 16, true},
      {"ll_fp8", 2, 16, 4, 512, 96, 256, Payload::kFP8, "", 5, 0, true},
      {"ll_fp8_1_block", 2, 16, 4, 512, 96, 256, Payload::kFP8, "", 1, 0, true},
      {"ll_fp8_4_ranks", 4, 32, 8, 256, 64, 256, Payload::kFP8, "", 64, 0, false},
      {"ll_fp8_nxo", 2, 16, 4, 512, 96, 256, Payload::kFP8, "0NXO", 5, 0, true},
      {"ll_fp8_nxo_4_ranks", 4, 32, 8, 256, 64, 256, Payload::kFP8, "0NXO", 64, 0, false},
      {"ll_fp8_session4", 2, 16, 4, 512, 96, 256, Payload::kFP8, "0", 5, 0, true},
      {"ll_fp8_session4_1_block", 2, 16, 4, 512, 96, 256, Payload::kFP8, "0", 1, 0, true},
      {"ll_fp8_session4_4_ranks", 4, 32, 8, 256, 64, 256, Payload::kFP8, "0", 5, 0, false},
      {"ll_fp8_own_narrow", 2, 16, 4, 512, 96, 256, Payload::kFP8, "H", 5, 0, true},
      {"ll_fp8_own_narrow_1_block", 2, 16, 4, 512, 96, 256, Payload::kFP8, "H", 1, 0, true},
      {"ll_fp8_own_narrow_4_ranks", 4, 32, 8, 256, 64, 256, Payload::kFP8, "H", 64, 0, false},
  };
  for (const BackToBackCase& c : cases) {
    progress(std::string("back-to-back case ") + c.name);
    SCOPED_TRACE(std::string(c.name) + " on " + std::to_string(gpu_count()) + " GPU(s)");
    run_back_to_back(c, gpu_count(), 10);
    if (HasFatalFailure()) return;
  }
}

// Session 14's R and W (ll_dispatch_rotate) back to back: at 2 ranks on 5 and 1 send blocks, at
// 4 ranks on 64 (FP8 and BF16) and with the session-4 kernels on 5.
TEST_F(NvlinkTest, LowLatencyRotateRoundsBackToBackWithoutHostSync) {
  const BackToBackCase cases[] = {
      {"ll_fp8_rotate", 2, 16, 4, 512, 96, 256, Payload::kFP8, "W", 5, 0, true},
      {"ll_fp8_rotate_1_block", 2, 16, 4, 512, 96, 256, Payload::kFP8, "A", 1, 0, true},
      {"ll_fp8_rotate_4_ranks", 4, 32, 8, 256, 64, 256, Payload::kFP8, "W", 64, 0, false},
      {"ll_fp8_rotate_rank_4_ranks", 4, 32, 8, 256, 64, 256, Payload::kFP8, "R", 64, 0, true},
      {"ll_bf16_rotate_4_ranks", 4, 32, 8, 256, 64, 256, Payload::kBF16, "W", 64, 0, false},
      {"ll_fp8_session4_rotate_4_ranks", 4, 32, 8, 256, 64, 256, Payload::kFP8, "0W", 5, 0, false},
  };
  for (const BackToBackCase& c : cases) {
    progress(std::string("back-to-back case ") + c.name);
    SCOPED_TRACE(std::string(c.name) + " on " + std::to_string(gpu_count()) + " GPU(s)");
    run_back_to_back(c, gpu_count(), 10);
    if (HasFatalFailure()) return;
  }
}

TEST_F(NvlinkTest, NcclWireMatchesReference) {
  if (!nccl_available()) GTEST_SKIP() << "built without NCCL";
  if (gpu_count() < 2) GTEST_SKIP() << "NCCL needs one GPU per rank";
  run_cases(Payload::kFP8, 2, Wire::kNccl);
  run_cases(Payload::kBF16, 2, Wire::kNccl);
  // Every case with the defaults' combine over the NCCL wire (its send blocks dealt to every rank
  // as a source, the own partial staged); the runs above take the variants in turn.
  run_cases(Payload::kFP8, 2, Wire::kNccl, kDefaults);
}

}  // namespace
}  // namespace fp8moe::comm
