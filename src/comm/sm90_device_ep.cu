// Expert-parallel dispatch/combine over peer-mapped NVLink buffers (fp8moe/comm/device_ep.h).
// Algorithm. Dispatch send: every send block plans the whole batch in shared memory (per 32-token
// tile: destination ballots and per-expert counts, prefix-summed over tiles, so a token's slot at
// each destination and its rank among the tokens of each of its experts are O(1)); block 0
// notifies every destination of its per-expert counts (release flag); then chunks of tokens are
// pushed (one warp per token or per part of one, FP8 quantised in the same pass, 16-byte stores)
// and each chunk is published with a release store of its own flag (DeviceEpOptions::plan_once:
// the plan is made once, by k_dispatch_plan before the send, into the workspace). Dispatch
// receive (launched as a programmatic dependent, so it runs beside the send): as soon as every
// notify is in, the grouped offsets are known; each arrived chunk's records are then copied into
// their grouped rows (row = expert base + source prefix + rank) while later chunks are in
// flight. Combine send: the expert rows of each received chunk are summed with the gate weights
// and pushed back, one flag per chunk; combine receive sums a token's partials in rank order as
// soon as its chunks landed, computing the partial of the rank itself from the local expert rows.
// The weighted sums read the expert rows two 256-column steps per pass (combine_two_steps), or,
// in the send, through a cp.async ring in shared memory (combine_async_rows); the send's blocks
// are dealt to the peers, each serving one (combine_peer_blocks), and combine_even_steps deals
// both kernels' sums out as (row, column pair) items claimed by the warps.
// Acks from the consumer make every buffer reusable without a host round trip.
// Dispatch with DeviceEpOptions::dispatch_direct_rows (default): every source also broadcasts its
// per-expert counts with its notify, so each send block lays out every destination itself and
// writes a token's payload straight into its lowest-k grouped row there (dispatch_self_rows:
// every row of the rank's own tokens); the receive then copies only the remaining rows.
// Reference: dispatch_reference / combine_reference (src/comm/ep_reference.cpp), bit for bit.
// Test: build-comm-dev/test_comm_gpu or build-device/tests/test_comm_gpu
// (tests/comm/device_ep_gpu_test.cu).
#include <algorithm>
#include <cfloat>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "device_ep_forward.h"
#include "ep_ptx.cuh"
#include "ep_row_math.cuh"
#include "fp8moe/comm/device_ep.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "sm90_device_ep_backward.h"
#include "sm90_device_ep_ll.h"

#if defined(FP8MOE_HAVE_NCCL)
#include <nccl.h>
#define FM_CHECK_NCCL(call)                                                                  \
  do {                                                                                       \
    const ncclResult_t fm_nccl_ = (call);                                                    \
    if (fm_nccl_ != ncclSuccess) [[unlikely]]                                                \
      FM_THROW(::fp8moe::ErrorKind::kNccl, #call " failed: ", ncclGetErrorString(fm_nccl_)); \
  } while (0)
#endif

namespace fp8moe::comm {

namespace {

constexpr int kMaxRanks = 32;  // destination masks are 32-bit
constexpr int kMaxTopK = 8;
constexpr int kSendThreads = 512;  // threads of every kernel's blocks
constexpr int kWarps = kSendThreads / 32;
constexpr int kTile = 32;  // plan granularity: the tokens of one warp
constexpr unsigned kFull = 0xFFFFFFFFu;
using detail::allow_dependent_launch;
using detail::globaltimer;
using detail::lanemask_lt;
using detail::ld_acquire_sys;
using detail::pack_bf16;
using detail::quantize16;
using detail::st_release_sys;

// status[] slots (int64 / u64) of a workspace.
enum Status : int {
  kRowsNeeded = 0,
  kOverflow = 1,
  kNumRecv = 2,
  kSeqDispatch = 3,
  kSeqCombine = 4,
  kPrevRows = 5,
  kRecvDone = 6,
  kCombineDone = 7,
  kDispatchSent = 8,  // send blocks that finished, ever (receive kernels end after all of them)
  kCombineSent = 9,
  kRecvItem = 10,  // next work item of the receive kernels (claimed in order)
  kCombineItem = 11,
  kPlanDone = 12,  // plan kernel blocks that counted their tiles (the last one scans)
  kStatusSlots = 16,
};
// flags[] groups: R counters each, then R * max_chunks for the chunk groups.
enum FlagGroup : int {
  kDispatchNotify = 0,
  kDispatchAck = 1,
  kCombineAck = 2,
  kDispatchChunk = 3,
  kCombineChunk = 4,
  kLocalSent = 5,  // error reports only: the local send blocks (status kDispatchSent/kCombineSent)
};
const char* counter_name(int c) {
  switch (c) {
    case kDispatchNotify:
      return "dispatch.notify";
    case kDispatchAck:
      return "dispatch.ack";
    case kCombineAck:
      return "combine.ack";
    case kDispatchChunk:
      return "dispatch.chunk";
    case kCombineChunk:
      return "combine.chunk";
    case kLocalSent:
      return "send_blocks_done";
    default: {
      const char* ll_name = ll::counter_name(c);
      const char* bwd_name = bwd::counter_name(c);
      return ll_name ? ll_name : bwd_name ? bwd_name : "?";
    }
  }
}

enum ErrCode : int { kErrNone = 0, kErrTimeout = 1, kErrBadExpert = 3 };
struct DevErr {
  int code;
  int rank;
  int peer;
  int counter;
  unsigned long long expected;
  unsigned long long seen;
  long long detail;  // bad expert: the token; chunk counters: the chunk
};
// The low-latency kernels (sm90_device_ep_ll.cu) record their errors in the same record.
static_assert(sizeof(DevErr) == sizeof(ll::ErrRecord) &&
                  offsetof(DevErr, counter) == offsetof(ll::ErrRecord, counter) &&
                  offsetof(DevErr, detail) == offsetof(ll::ErrRecord, detail) &&
                  kErrTimeout == ll::kErrTimeout && kErrBadExpert == ll::kErrBadExpert,
              "DevErr and ll::ErrRecord must agree");

struct Geometry {
  int R, K, L, E;
  int64_t H, SC, Tmax, P, bound, cap;
  int NT;  // plan tiles of Tmax tokens
  int C;   // chunk: tokens (dispatch) or received records (combine)
  int NC;  // chunks of a region, at most
  int NS;  // ints of one source's notify block: T, L counts, then (begin, count) per chunk
  int W;   // columns of the global plan: E expert counts, then R destination counts
  bool fp8;
};

// Byte offsets inside a workspace; identical on every rank, so a peer's field is base + offset.
struct WsLayout {
  // written by peers
  size_t stage, src_token, topk_local, topk_pos, weight, recv_count, notify, flags, comb_stage;
  size_t all_counts;  // dispatch_direct_rows: [R][E] per-expert token counts of every source
  size_t bwd_gw, bwd_mask, bwd;  // combine backward (sm90_device_ep_backward.cu)
  // local
  size_t peer_table, err, slot, status, recv_offset, expert_counts, expert_offsets, m_indices,
      row_src, row_weight, token_rows, gx, gscales, plan_cnt, plan_dball, plan_tot, total;
  size_t ll;  // counters of the low-latency kernels (sm90_device_ep_ll.cu)
};

size_t align_up(size_t v, size_t a) {
  return (v + a - 1) / a * a;
}

Geometry make_geometry(const EpConfig& c, const DeviceEpOptions& o) {
  Geometry g{};
  g.R = c.num_ranks;
  g.K = c.top_k;
  g.L = c.experts_per_rank();
  g.E = c.num_experts;
  g.H = c.hidden;
  g.SC = c.payload == Payload::kFP8 ? c.scale_cols() : 0;
  g.Tmax = c.max_tokens_per_rank;
  g.fp8 = c.payload == Payload::kFP8;
  g.P = g.fp8 ? static_cast<int64_t>(align_up(g.H + g.SC * 4, 16)) : g.H * 2;
  g.bound = c.row_bound();
  g.cap = c.masked_capacity;
  g.NT = static_cast<int>((g.Tmax + kTile - 1) / kTile);
  g.C = o.chunk_tokens > 0 ? o.chunk_tokens : (g.Tmax <= 512 ? 4 : 16);
  g.NC = static_cast<int>(std::max<int64_t>(1, (g.Tmax + g.C - 1) / g.C));
  g.NS = 1 + g.L + 2 * g.NC;
  g.W = g.E + g.R;
  return g;
}

size_t flag_count(const Geometry& g) {
  return 3 * static_cast<size_t>(g.R) + 2 * static_cast<size_t>(g.R) * g.NC;
}

WsLayout make_layout(const Geometry& g) {
  WsLayout l{};
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t o = at;
    at = align_up(at + bytes, 256);
    return o;
  };
  const size_t slots = static_cast<size_t>(g.R) * g.Tmax;
  l.stage = take(slots * g.P);
  l.src_token = take(slots * 4);
  l.topk_local = take(slots * g.K * 4);
  l.topk_pos = take(slots * g.K * 4);
  l.weight = take(slots * g.K * 4);
  l.recv_count = take(g.R * 4);
  l.notify = take(static_cast<size_t>(g.R) * g.NS * 4);
  l.all_counts = take(static_cast<size_t>(g.R) * g.E * 4);
  l.flags = take(flag_count(g) * 8);
  l.comb_stage = take(slots * g.H * 2);
  l.bwd_gw = take(slots * g.K * 4);
  l.bwd_mask = take(slots * 4);
  l.bwd = take(bwd::region_bytes(g.R));
  l.peer_table = take(g.R * sizeof(void*));
  l.err = take(sizeof(DevErr));
  l.slot = take(slots * 4);
  l.status = take(kStatusSlots * 8);
  l.recv_offset = take((g.R + 1) * 4);
  l.expert_counts = take(g.L * 4);
  l.expert_offsets = take((g.L + 1) * 4);
  l.m_indices = take(g.bound * 4);
  l.row_src = take(g.bound * 4);
  l.row_weight = take(g.bound * 4);
  l.token_rows = take(slots * g.K * 4);
  l.gx = take(g.bound * g.H * (g.fp8 ? 1 : 2));
  l.gscales = take(g.bound * g.SC * 4);
  // Plan once (DeviceEpOptions::plan_once): [NT][W] u16 counts, then exclusive prefixes over the
  // tiles; [R][NT] destination ballots; [W] totals.
  l.plan_cnt = take(static_cast<size_t>(g.NT) * g.W * 2);
  l.plan_dball = take(static_cast<size_t>(g.R) * g.NT * 4);
  l.plan_tot = take(static_cast<size_t>(g.W) * 4);
  l.ll = take(ll::region_bytes(g.R, g.L, g.Tmax, g.K));
  l.total = at;
  return l;
}

// Dynamic shared memory of the send plan: per-expert and per-destination tile counts (u16, then
// exclusive prefixes), destination ballots per tile, per-warp expert lane masks, expert totals.
struct PlanSmem {
  size_t ecnt, dcnt, dball, emask, etot, rowbase, total;
};
PlanSmem plan_smem(const Geometry& g) {
  PlanSmem p{};
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t o = at;
    at = align_up(at + bytes, 16);
    return o;
  };
  p.ecnt = take(static_cast<size_t>(g.E) * g.NT * 2);
  p.dcnt = take(static_cast<size_t>(g.R) * g.NT * 2);
  p.dball = take(static_cast<size_t>(g.R) * g.NT * 4);
  p.emask = take(static_cast<size_t>(kWarps) * g.E * 4);
  p.etot = take(static_cast<size_t>(g.E) * 4);
  p.rowbase = take(static_cast<size_t>(g.E) * 4);  // dispatch_direct_rows (direct_layout)
  p.total = at;
  return p;
}
// Plan kernel: per-warp count rows while counting; the last block then holds the whole [NT][W]
// count table (rounded to 16 bytes for vector copies).
size_t plan_kernel_smem(const Geometry& g) {
  const size_t rows = static_cast<size_t>(kWarps) * align_up(g.W, 2) * 2;
  const size_t table = align_up(static_cast<size_t>(g.NT) * g.W * 2, 16);
  return std::max(rows, table);
}
// Receive kernels: per-(source, expert) row bases, expert offsets, region offsets, source T.
size_t recv_smem_bytes(const Geometry& g) {
  return (static_cast<size_t>(g.R) * g.L + (g.L + 1) + g.L + (g.R + 1) + g.R) * 4;
}

__device__ void record_error(DevErr* err, int code, int rank, int peer, int counter,
                             unsigned long long expected, unsigned long long seen,
                             long long detail) {
  if (atomicCAS(&err->code, 0, -1) != 0) return;  // first error wins
  err->rank = rank;
  err->peer = peer;
  err->counter = counter;
  err->expected = expected;
  err->seen = seen;
  err->detail = detail;
  __threadfence_system();
  atomicExch(&err->code, code);
}

// Bounded acquire-poll; false (error recorded) on timeout or when this rank already timed out.
__device__ bool wait_geq(const unsigned long long* p, unsigned long long expected, DevErr* err,
                         int rank, int peer, int counter, long long detail,
                         unsigned long long timeout_ns) {
  unsigned long long v = ld_acquire_sys(p);
  if (v >= expected) return true;
  const unsigned long long t0 = globaltimer();
  const long long c0 = clock64();
  // NOTE: the SM clock bounds the wait too (3 GHz is above any clock of these parts), so a
  // global timer that does not advance can never turn a timeout into a hang.
  const long long max_cycles = static_cast<long long>(timeout_ns) * 3;
  for (;;) {
    __nanosleep(32);  // many blocks poll: keep their traffic off the memory system
    v = ld_acquire_sys(p);
    if (v >= expected) return true;
    if (*reinterpret_cast<volatile int*>(&err->code) == kErrTimeout) return false;
    if (globaltimer() - t0 > timeout_ns || clock64() - c0 > max_cycles) {
      record_error(err, kErrTimeout, rank, peer, counter, expected, v, detail);
      return false;
    }
  }
}

template <typename T>
__device__ __forceinline__ T* at(char* base, size_t off) {
  return reinterpret_cast<T*>(base + off);
}

// The next work item for this block, claimed in order across the grid, so that items are taken
// in the order their data arrives (a static split would park blocks on late chunks).
__device__ __forceinline__ int64_t claim_item(int64_t* counter, long long* claimed) {
  __syncthreads();  // every thread is done with the previous claim
  if (threadIdx.x == 0)
    *claimed =
        static_cast<long long>(atomicAdd(reinterpret_cast<unsigned long long*>(counter), 1ull));
  __syncthreads();
  return *claimed;
}

// A send block is done: count it in the local status slot (after its other writes).
__device__ __forceinline__ void count_send_block(char* my, size_t status_off, int slot) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(reinterpret_cast<unsigned long long*>(my + status_off) + slot, 1ull);
  }
}

struct Args {
  Geometry g;
  WsLayout lay;
  PlanSmem ps;
  char* my;
  DevErr* err;
  int rank;
  int send_blocks;
  unsigned long long timeout_ns;
  // per call
  int64_t T;
  int tile;  // combine receive: tokens per block item
  const uint16_t* x;
  const int32_t* idx;
  const float* w;
  const uint16_t* y;  // combine input (grouped rows or per-slot rows)
  uint16_t* out;
  bool weighted;
  bool peer_items;   // DeviceEpOptions::combine_peer_items
  bool peer_blocks;  // DeviceEpOptions::combine_peer_blocks
  bool expand;
  bool nccl;  // Wire::kNccl: "peers" are this rank's send buffer, regions by destination; the
              // exchange and its ordering are NCCL's, so no flags are waited on or raised

  bool direct;     // DeviceEpOptions::dispatch_direct_rows, where it applies (Impl::direct)
  bool self_rows;  // DeviceEpOptions::dispatch_self_rows (with direct)
  bool pull;       // DeviceEpOptions::dispatch_pull (with direct)
  unsigned long long* trace;  // FP8MOE_EP_TRACE=1: dispatch phase stamps (diagnostics), else null
};

// Dispatch phase stamps (%globaltimer, ns) of the last dispatch, FP8MOE_EP_TRACE=1: printed by
// check(). Minima are reset by the plan kernel's block 0 before its dependents can start.
enum TraceSlot : int {
  kTrPlanStart = 0,
  kTrPlanEnd = 1,
  kTrSendStart = 2,     // first send block (min)
  kTrSendCounts = 3,    // direct rows: the last send block that had every source's counts (max)
  kTrSendEnd = 4,       // last send block done (max)
  kTrRecvStart = 5,     // first receive block (min)
  kTrRecvLayout = 6,    // last receive block with its layout (max)
  kTrRecvLastFlag = 7,  // the last chunk flag a receive block saw (max)
  kTrRecvEnd = 8,       // the acknowledging block, done
  kTrSlots = 9,
};
__device__ __forceinline__ void stamp(const Args& a, int slot, int how) {  // 0 set, 1 max, 2 min
  if (!a.trace) return;
  const unsigned long long t = globaltimer();
  if (how == 0)
    a.trace[slot] = t;
  else if (how == 1)
    atomicMax(a.trace + slot, t);
  else
    atomicMin(a.trace + slot, t);
}

__device__ __forceinline__ char* peer(const Args& a, int r) {
  return reinterpret_cast<char* const*>(a.my + a.lay.peer_table)[r];
}
// Region of my records in destination d's buffer (NVLink), or of d's records in my send buffer.
__device__ __forceinline__ int out_region(const Args& a, int d) {
  return a.nccl ? d : a.rank;
}
__device__ __forceinline__ unsigned long long* flag(char* base, const Args& a, int group, int r) {
  unsigned long long* f = at<unsigned long long>(base, a.lay.flags);
  return group < kDispatchChunk ? f + group * a.g.R + r
                                : f + 3 * a.g.R + (group - kDispatchChunk) * a.g.R * a.g.NC + r;
}
// Chunk c of source r: flag index r * NC + c of its group.
__device__ __forceinline__ unsigned long long* chunk_flag(char* base, const Args& a, int group,
                                                          int r, int c) {
  return flag(base, a, group, r * a.g.NC + c);
}
__device__ __forceinline__ int32_t* notify_of(char* base, const Args& a, int src) {
  return at<int32_t>(base, a.lay.notify) + static_cast<int64_t>(src) * a.g.NS;
}
__device__ __forceinline__ char* record_of(const Args& a, char* base, int src, int64_t j) {
  return base + a.lay.stage + (static_cast<int64_t>(src) * a.g.Tmax + j) * a.g.P;
}
__device__ __forceinline__ int warp_inclusive_sum(int v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int m = 1; m < 32; m <<= 1) {
    const int o = __shfl_up_sync(kFull, v, m);
    if (lane >= m) v += o;
  }
  return v;
}

// Work items: `tokens` rows in `parts` column ranges of whole steps, so that a short batch still
// occupies every warp while a long one keeps one warp per row. Warp-uniform.
struct Split {
  int64_t items;
  int64_t parts;
  int64_t steps;
  __device__ __forceinline__ int64_t token(int64_t item) const { return item / parts; }
  __device__ __forceinline__ int64_t part(int64_t item) const { return item % parts; }
  __device__ __forceinline__ int64_t first(int64_t item) const {
    return part(item) * steps / parts;
  }
  __device__ __forceinline__ int64_t last(int64_t item) const {
    return (part(item) + 1) * steps / parts;
  }
};
__device__ __forceinline__ Split split_work(int64_t tokens, int64_t steps, int64_t warps) {
  int64_t parts = tokens > 0 ? warps / tokens : 1;
  parts = parts < 1 ? 1 : (parts > steps ? steps : parts);
  return {tokens * parts, parts, steps};
}

// The expert rows of a record or token, lane k < K holding row k (-1: none) and its weight:
// the present rows in ascending k, in every lane (so that loads of several rows and column
// steps can be issued together without run-time register indexing).
struct RowSet {
  int row[kMaxTopK];
  float w[kMaxTopK];
  int n;
};
__device__ __forceinline__ RowSet compact_rows(int row, float wt) {
  RowSet r;
  const unsigned m = __ballot_sync(kFull, row >= 0);
  r.n = __popc(m);
#pragma unroll
  for (int i = 0; i < kMaxTopK; ++i) {
    const int src = i < r.n ? static_cast<int>(__fns(m, 0, i + 1)) : 0;
    r.row[i] = __shfl_sync(kFull, row, src);
    r.w[i] = __shfl_sync(kFull, wt, src);
  }
  return r;
}
// kU column steps of 256 (8 columns per lane at c + u * 256, where valid[u]): acc[u] = the gate-
// weighted sum of the rows in ascending k from +0, no FMA (the reference's order). Rows in groups
// of four, each group's kU x 4 loads in flight together.
// Rows: RowSet, or SharedRows (combine_even_steps: read from shared memory where used).
template <int kU, class Rows>
__device__ __forceinline__ void weighted_rows_u(const uint16_t* y, int64_t H, const Rows& rs,
                                                int64_t c, const bool* valid, float (*acc)[8]) {
#pragma unroll
  for (int u = 0; u < kU; ++u)
#pragma unroll
    for (int x = 0; x < 8; ++x) acc[u][x] = 0.0f;
#pragma unroll
  for (int g0 = 0; g0 < kMaxTopK; g0 += 4) {
    if (g0 < rs.n) {
      uint4 v[kU][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int u = 0; u < kU; ++u)
          if (g0 + i < rs.n && valid[u])
            v[u][i] = __ldg(reinterpret_cast<const uint4*>(
                y + static_cast<int64_t>(rs.row[g0 + i]) * H + c + u * 256));
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (g0 + i >= rs.n) break;
        const float wk = rs.w[g0 + i];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          if (!valid[u]) continue;
          const uint32_t* vw = reinterpret_cast<const uint32_t*>(&v[u][i]);
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            acc[u][2 * x] = __fadd_rn(acc[u][2 * x], __fmul_rn(wk, __uint_as_float(vw[x] << 16)));
            acc[u][2 * x + 1] =
                __fadd_rn(acc[u][2 * x + 1], __fmul_rn(wk, __uint_as_float(vw[x] & 0xFFFF0000u)));
          }
        }
      }
    }
  }
}

// Sum of 8 BF16 columns of K expert rows with their gate weights (ascending k, no FMA).
__device__ __forceinline__ void weighted_rows(const uint16_t* y, int64_t H, const int* rows,
                                              const float* ws, int K, int64_t c, float* acc) {
  uint4 v[kMaxTopK];
#pragma unroll
  for (int k = 0; k < kMaxTopK; ++k)
    if (k < K && rows[k] >= 0)
      v[k] = __ldg(reinterpret_cast<const uint4*>(y + static_cast<int64_t>(rows[k]) * H + c));
#pragma unroll
  for (int x = 0; x < 8; ++x) acc[x] = 0.0f;
#pragma unroll
  for (int k = 0; k < kMaxTopK; ++k) {
    if (k >= K || rows[k] < 0) continue;
    const uint32_t* vw = reinterpret_cast<const uint32_t*>(&v[k]);
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      acc[2 * x] = __fadd_rn(acc[2 * x], __fmul_rn(ws[k], __uint_as_float(vw[x] << 16)));
      acc[2 * x + 1] =
          __fadd_rn(acc[2 * x + 1], __fmul_rn(ws[k], __uint_as_float(vw[x] & 0xFFFF0000u)));
    }
  }
}

// ---- dispatch send 1: the plan of the whole batch, in shared memory of every send block (v5)
// or once per dispatch in the workspace (plan_once, k_dispatch_plan) ----
struct Plan {
  // Tokens of tile t with expert e (destination d), then the exclusive prefix over the tiles, at
  // e * cs + t * ts. Shared memory: [E][NT] and [R][NT]; workspace: columns of one [NT][W] table.
  uint16_t* ecnt;
  uint16_t* dcnt;
  uint32_t* dball;  // [R][NT] lanes of each tile going to d
  uint32_t* emask;  // [kWarps][E] scratch lane masks (zero between uses), shared memory
  int* etot;        // [E] tokens with expert e
  int* dtot;        // [R] tokens going to d
  int ntiles;
  int cs, ts;
  __device__ __forceinline__ int ec(int e, int tile) const { return ecnt[e * cs + tile * ts]; }
  __device__ __forceinline__ int dc(int d, int tile) const { return dcnt[d * cs + tile * ts]; }
};

__device__ __forceinline__ Plan plan_view(const Args& a, char* smem, int* dtot) {
  Plan p;
  p.ecnt = reinterpret_cast<uint16_t*>(smem + a.ps.ecnt);
  p.dcnt = reinterpret_cast<uint16_t*>(smem + a.ps.dcnt);
  p.dball = reinterpret_cast<uint32_t*>(smem + a.ps.dball);
  p.emask = reinterpret_cast<uint32_t*>(smem + a.ps.emask);
  p.etot = reinterpret_cast<int*>(smem + a.ps.etot);
  p.dtot = dtot;
  p.ntiles = static_cast<int>((a.T + kTile - 1) / kTile);
  p.cs = a.g.NT;
  p.ts = 1;
  return p;
}

// The plan k_dispatch_plan left in the workspace (only the lane masks are shared memory).
__device__ __forceinline__ Plan plan_global_view(const Args& a, char* smem) {
  Plan p;
  p.ecnt = at<uint16_t>(a.my, a.lay.plan_cnt);
  p.dcnt = p.ecnt + a.g.E;
  p.dball = at<uint32_t>(a.my, a.lay.plan_dball);
  p.emask = reinterpret_cast<uint32_t*>(smem + a.ps.emask);
  p.etot = at<int>(a.my, a.lay.plan_tot);
  p.dtot = p.etot + a.g.E;
  p.ntiles = static_cast<int>((a.T + kTile - 1) / kTile);
  p.cs = 1;
  p.ts = a.g.W;
  return p;
}

// Expert ids of token t (lane), -1 for none; an id out of range is reported (block 0) and
// treated as none, as the reference rejects it.
__device__ __forceinline__ void load_experts(const Args& a, int64_t t, bool valid, int* ev,
                                             bool report) {
  const Geometry& g = a.g;
#pragma unroll
  for (int k = 0; k < kMaxTopK; ++k) {
    int e = (valid && k < g.K) ? __ldg(a.idx + t * g.K + k) : -1;
    if (e < -1 || e >= g.E) {
      if (report) record_error(a.err, kErrBadExpert, a.rank, -1, -1, 0, e, t);
      e = -1;
    }
    ev[k] = e;
  }
}

__device__ void plan_batch(const Args& a, char* smem, const Plan& p) {
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (size_t i = threadIdx.x; i < a.ps.etot / 4; i += blockDim.x)
    reinterpret_cast<uint32_t*>(smem)[i] = 0;
  __syncthreads();
  // Counts per tile: destination ballots, and per expert one leader lane per group of equal ids.
  for (int tile = warp; tile < p.ntiles; tile += kWarps) {
    const int64_t t = static_cast<int64_t>(tile) * kTile + lane;
    int ev[kMaxTopK];
    load_experts(a, t, t < a.T, ev, blockIdx.x == 0);
    uint32_t m = 0;
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k)
      if (ev[k] >= 0) m |= 1u << (ev[k] / g.L);
    for (int d = 0; d < g.R; ++d) {
      const uint32_t b = __ballot_sync(kFull, (m >> d) & 1u);
      if (lane == 0) {
        p.dball[d * g.NT + tile] = b;
        p.dcnt[d * g.NT + tile] = static_cast<uint16_t>(__popc(b));
      }
    }
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k) {
      if (k >= g.K) break;
      const unsigned peers = __match_any_sync(kFull, ev[k]);
      if (ev[k] >= 0 && lane == __ffs(peers) - 1)
        p.ecnt[ev[k] * g.NT + tile] += static_cast<uint16_t>(__popc(peers));
      __syncwarp();
    }
  }
  __syncthreads();
  // Exclusive prefixes over the tiles: one warp per expert, then per destination.
  for (int row = warp; row < g.E + g.R; row += kWarps) {
    uint16_t* c = row < g.E ? p.ecnt + row * g.NT : p.dcnt + (row - g.E) * g.NT;
    int run = 0;
    for (int t0 = 0; t0 < p.ntiles; t0 += 32) {
      const bool in = t0 + lane < p.ntiles;
      const int v = in ? c[t0 + lane] : 0;
      const int incl = warp_inclusive_sum(v);
      if (in) c[t0 + lane] = static_cast<uint16_t>(run + incl - v);
      run += __shfl_sync(kFull, incl, 31);
    }
    if (lane == 0) (row < g.E ? p.etot[row] : p.dtot[row - g.E]) = run;
  }
  __syncthreads();
}

// Slot at destination d of token x (= tokens before x going to d); x may be T.
__device__ __forceinline__ int slot_prefix(const Args& a, const Plan& p, int d, int64_t x) {
  const int tile = static_cast<int>(x / kTile);
  if (tile >= p.ntiles) return p.dtot[d];
  const uint32_t below = (1u << (x % kTile)) - 1u;
  return p.dc(d, tile) + __popc(p.dball[d * a.g.NT + tile] & below);
}

// ---- dispatch send 2: metadata of the tokens of one tile inside [c0, c1) (one warp) ----
// Each record carries, per k, the local expert id and the token's rank among this source's
// tokens of that expert, so the receiver places rows without scanning anything.
__device__ __forceinline__ void push_metadata(const Args& a, const Plan& p, int tile, int64_t c0,
                                              int64_t c1) {
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t t = static_cast<int64_t>(tile) * kTile + lane;
  const bool valid = t < a.T, mine = valid && t >= c0 && t < c1;
  int ev[kMaxTopK];
  float wt[kMaxTopK];
  load_experts(a, t, valid, ev, false);
#pragma unroll
  for (int k = 0; k < kMaxTopK; ++k) wt[k] = (valid && k < g.K) ? __ldg(a.w + t * g.K + k) : 0.0f;
  // Rank among the tile's earlier lanes with the same expert (ids of a token are distinct).
  uint32_t* em = p.emask + warp * g.E;
#pragma unroll
  for (int k = 0; k < kMaxTopK; ++k)
    if (ev[k] >= 0) atomicOr(em + ev[k], 1u << lane);
  __syncwarp();
  int pos[kMaxTopK];
#pragma unroll
  for (int k = 0; k < kMaxTopK; ++k)
    pos[k] = ev[k] >= 0 ? p.ec(ev[k], tile) + __popc(em[ev[k]] & lanemask_lt()) : -1;
  __syncwarp();
#pragma unroll
  for (int k = 0; k < kMaxTopK; ++k)
    if (ev[k] >= 0) em[ev[k]] = 0;
  __syncwarp();
  int32_t* handle = at<int32_t>(a.my, a.lay.slot);
  for (int d = 0; d < g.R; ++d) {
    const uint32_t b = p.dball[d * g.NT + tile];
    const bool sent = (b >> lane) & 1u;
    const int j = p.dc(d, tile) + __popc(b & lanemask_lt());
    if (!mine) continue;
    handle[t * g.R + d] = sent ? j : -1;
    if (!sent) continue;
    char* base = peer(a, d);
    const int64_t s = static_cast<int64_t>(out_region(a, d)) * g.Tmax + j;
    at<int32_t>(base, a.lay.src_token)[s] = static_cast<int32_t>(t);
    int32_t* tl = at<int32_t>(base, a.lay.topk_local) + s * g.K;
    int32_t* tp = at<int32_t>(base, a.lay.topk_pos) + s * g.K;
    float* tw = at<float>(base, a.lay.weight) + s * g.K;
    int loc[kMaxTopK], lp[kMaxTopK];
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k) {
      const bool here = ev[k] >= d * g.L && ev[k] < (d + 1) * g.L;
      loc[k] = here ? ev[k] - d * g.L : -1;
      lp[k] = here ? pos[k] : -1;
    }
    if (g.K == kMaxTopK) {  // 16-byte stores (s * K * 4 is a multiple of 32)
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        reinterpret_cast<int4*>(tl)[q] =
            make_int4(loc[4 * q], loc[4 * q + 1], loc[4 * q + 2], loc[4 * q + 3]);
        reinterpret_cast<int4*>(tp)[q] =
            make_int4(lp[4 * q], lp[4 * q + 1], lp[4 * q + 2], lp[4 * q + 3]);
        reinterpret_cast<float4*>(tw)[q] =
            make_float4(wt[4 * q], wt[4 * q + 1], wt[4 * q + 2], wt[4 * q + 3]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k)
        if (k < g.K) {
          tl[k] = loc[k];
          tp[k] = lp[k];
          tw[k] = wt[k];
        }
    }
  }
}

// ---- dispatch send 3: the payload of columns [first, last) steps of token t (one warp) ----
// kPrefetch (prefetch_payload): the FP8 loop loads step s + 1 before it quantises step s.
template <bool kPrefetch>
__device__ __forceinline__ void push_payload(const Args& a, const Plan& p, int64_t t, int64_t first,
                                             int64_t last) {
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31;
  // Lane d < R holds the token's slot at destination d (-1: not sent there).
  int jl = -1;
  if (lane < g.R) {
    const int tile = static_cast<int>(t / kTile);
    const uint32_t b = p.dball[lane * g.NT + tile];
    if ((b >> (t % kTile)) & 1u) jl = p.dc(lane, tile) + __popc(b & ((1u << (t % kTile)) - 1u));
  }
  const unsigned mask = __ballot_sync(kFull, jl >= 0);
  const uint16_t* xt = a.x + t * g.H;
  if (!g.fp8) {
    // BF16: 16-byte vectors, four in flight per lane.
    for (int64_t step = first; step < last; ++step) {
      const int64_t c0 = step * 1024;
      uint4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int64_t c = c0 + u * 256 + lane * 8;
        if (c < g.H) v[u] = __ldg(reinterpret_cast<const uint4*>(xt + c));
      }
      for (unsigned m = mask; m; m &= m - 1) {
        const int d = __ffs(m) - 1;
        char* rec = record_of(a, peer(a, d), out_region(a, d), __shfl_sync(kFull, jl, d));
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int64_t c = c0 + u * 256 + lane * 8;
          if (c < g.H) *reinterpret_cast<uint4*>(rec + c * 2) = v[u];
        }
      }
    }
    return;
  }
  // FP8: codes then the H/128 scales of the record, quantised once for all destinations.
  // Two 512-column chunks per step so that four loads are in flight per lane (eight with
  // kPrefetch: the next step's while this one is quantised).
  auto load_step = [&](int64_t step, uint4* v) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int64_t c = step * 1024 + u * 512 + lane * 16;
      v[2 * u] = v[2 * u + 1] = make_uint4(0, 0, 0, 0);
      if (c < g.H) {
        v[2 * u] = __ldg(reinterpret_cast<const uint4*>(xt + c));
        v[2 * u + 1] = __ldg(reinterpret_cast<const uint4*>(xt + c + 8));
      }
    }
  };
  uint4 next[4];
  if (kPrefetch && first < last) load_step(first, next);
  for (int64_t step = first; step < last; ++step) {
    const int64_t c0 = step * 1024;
    uint4 v[4];
    bool valid[2];
#pragma unroll
    for (int u = 0; u < 2; ++u)
      valid[u] = c0 + u * 512 + lane * 16 < g.H;  // whole 8-lane groups (H % 128 == 0)
    if constexpr (kPrefetch) {
#pragma unroll
      for (int u = 0; u < 4; ++u) v[u] = next[u];
      if (step + 1 < last) load_step(step + 1, next);
    } else {
      load_step(step, v);
    }
    uint4 codes[2];
    float scale[2];
#pragma unroll
    for (int u = 0; u < 2; ++u) quantize16(v[2 * u], v[2 * u + 1], codes[u], scale[u]);
    for (unsigned m = mask; m; m &= m - 1) {
      const int d = __ffs(m) - 1;
      char* rec = record_of(a, peer(a, d), out_region(a, d), __shfl_sync(kFull, jl, d));
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int64_t c = c0 + u * 512 + lane * 16;
        if (!valid[u]) continue;
        *reinterpret_cast<uint4*>(rec + c) = codes[u];
        if ((lane & 7) == 0) *reinterpret_cast<float*>(rec + g.H + (c / 128) * 4) = scale[u];
      }
    }
  }
}

// ---- dispatch send, dispatch_direct_rows: the destinations' layouts, then rows written ----
// Every destination's grouped layout from the per-expert counts all sources
// broadcast with their notify, by recv_layout's formulas: rowbase[d * L + e] = the first row of
// this source's tokens of d's expert e (expert block + earlier sources' counts), and bit d of
// *ovf when d's rows overflow (its receive writes no rows then). One warp per destination.
__device__ void direct_layout(const Args& a, int* rowbase, unsigned* ovf) {
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int32_t* cnt = at<int32_t>(a.my, a.lay.all_counts);
  for (int d = warp; d < g.R; d += kWarps) {
    int run = 0;
    for (int e0 = 0; e0 < g.L; e0 += 32) {
      const int e = e0 + lane;
      int tot = 0, below = 0;
      if (e < g.L)
        for (int s = 0; s < g.R; ++s) {
          const int c = __ldcg(cnt + s * g.E + d * g.L + e);
          tot += c;
          below += s < a.rank ? c : 0;
        }
      const int size = e < g.L ? (tot + 127) / 128 * 128 : 0;
      const int incl = warp_inclusive_sum(size);
      if (e < g.L) rowbase[d * g.L + e] = run + incl - size + below;
      run += __shfl_sync(kFull, incl, 31);
    }
    if (lane == 0 && run > g.bound) atomicOr(ovf, 1u << d);
  }
}

// The payload of token t, columns [first, last) steps, into its rows (one warp). Lane k < K holds
// the token's k-th expert and is a target if it is the token's lowest k at that destination (the
// row the receive copies the others from) or, with self_rows, any k on this rank. A destination
// that overflows gets the source-region record instead (download() reads it from there).
template <bool kPrefetch>
__device__ __forceinline__ void push_payload_direct(const Args& a, const Plan& p, int64_t t,
                                                    int64_t first, int64_t last, const int* rowbase,
                                                    unsigned ovf) {
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31;
  const int tile = static_cast<int>(t / kTile), tl = static_cast<int>(t % kTile);
  int ek = -1;
  if (lane < g.K) {
    ek = __ldg(a.idx + t * g.K + lane);
    if (ek < -1 || ek >= g.E) ek = -1;  // as load_experts (block 0 of the plan reported it)
  }
  // Rank of t among this source's tokens of expert ek: the plan's prefix over earlier tiles plus
  // the earlier lanes of its tile holding ek (push_metadata's pos, without shared memory).
  int ids[kMaxTopK];
#pragma unroll
  for (int k = 0; k < kMaxTopK; ++k)
    ids[k] = (lane < tl && k < g.K) ? __ldg(a.idx + (t - tl + lane) * g.K + k) : -1;
  int pos = 0;
  for (int k = 0; k < g.K; ++k) {
    const int e = __shfl_sync(kFull, ek, k);
    bool hit = false;
#pragma unroll
    for (int q = 0; q < kMaxTopK; ++q) hit = hit || ids[q] == e;
    const int c = __popc(__ballot_sync(kFull, hit && e >= 0));
    if (lane == k) pos = c;
  }
  const int dk = ek >= 0 ? ek / g.L : -1;
  const unsigned same = __match_any_sync(kFull, dk);
  const bool over = dk >= 0 && ((ovf >> dk) & 1u);
  const bool target =
      ek >= 0 && (lane == __ffs(same) - 1 || (a.self_rows && dk == a.rank && !over));
  const unsigned targets = __ballot_sync(kFull, target);
  // Lane d < R: the token's slot at destination d (the source-region record, on overflow).
  int jl = -1;
  if (lane < g.R) {
    const uint32_t b = p.dball[lane * g.NT + tile];
    if ((b >> tl) & 1u) jl = p.dc(lane, tile) + __popc(b & ((1u << tl) - 1u));
  }
  const int jd = __shfl_sync(kFull, jl, dk >= 0 ? dk : 0);
  const int64_t row_bytes = g.fp8 ? g.H : g.H * 2;
  unsigned long long code = 0, scales = 0;  // lane k's row (or record): payload, scales
  if (target) {
    char* base = peer(a, dk);
    // dispatch_pull: a peer's record stays here, in its region of this workspace.
    const bool pulled = a.pull && dk != a.rank;
    if (over || pulled) {
      char* rec = pulled ? record_of(a, a.my, dk, jd) : record_of(a, base, out_region(a, dk), jd);
      code = reinterpret_cast<unsigned long long>(rec);
      scales = reinterpret_cast<unsigned long long>(rec + g.H);
    } else {
      const int64_t row = rowbase[ek] + p.ec(ek, tile) + pos;
      code = reinterpret_cast<unsigned long long>(base + a.lay.gx + row * row_bytes);
      scales = reinterpret_cast<unsigned long long>(base + a.lay.gscales + row * g.SC * 4);
    }
  }
  const uint16_t* xt = a.x + t * g.H;
  if (!g.fp8) {
    for (int64_t step = first; step < last; ++step) {
      const int64_t c0 = step * 1024;
      uint4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int64_t c = c0 + u * 256 + lane * 8;
        if (c < g.H) v[u] = __ldg(reinterpret_cast<const uint4*>(xt + c));
      }
      for (unsigned m = targets; m; m &= m - 1) {
        char* dst = reinterpret_cast<char*>(__shfl_sync(kFull, code, __ffs(m) - 1));
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int64_t c = c0 + u * 256 + lane * 8;
          if (c < g.H) *reinterpret_cast<uint4*>(dst + c * 2) = v[u];
        }
      }
    }
    return;
  }
  auto load_step = [&](int64_t step, uint4* v) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int64_t c = step * 1024 + u * 512 + lane * 16;
      v[2 * u] = v[2 * u + 1] = make_uint4(0, 0, 0, 0);
      if (c < g.H) {
        v[2 * u] = __ldg(reinterpret_cast<const uint4*>(xt + c));
        v[2 * u + 1] = __ldg(reinterpret_cast<const uint4*>(xt + c + 8));
      }
    }
  };
  uint4 next[4];
  if (kPrefetch && first < last) load_step(first, next);
  for (int64_t step = first; step < last; ++step) {
    const int64_t c0 = step * 1024;
    uint4 v[4];
    bool valid[2];
#pragma unroll
    for (int u = 0; u < 2; ++u) valid[u] = c0 + u * 512 + lane * 16 < g.H;
    if constexpr (kPrefetch) {
#pragma unroll
      for (int u = 0; u < 4; ++u) v[u] = next[u];
      if (step + 1 < last) load_step(step + 1, next);
    } else {
      load_step(step, v);
    }
    uint4 codes[2];
    float scale[2];
#pragma unroll
    for (int u = 0; u < 2; ++u) quantize16(v[2 * u], v[2 * u + 1], codes[u], scale[u]);
    for (unsigned m = targets; m; m &= m - 1) {
      const int k = __ffs(m) - 1;
      char* dst = reinterpret_cast<char*>(__shfl_sync(kFull, code, k));
      char* sdst = reinterpret_cast<char*>(__shfl_sync(kFull, scales, k));
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int64_t c = c0 + u * 512 + lane * 16;
        if (!valid[u]) continue;
        *reinterpret_cast<uint4*>(dst + c) = codes[u];
        if ((lane & 7) == 0) *reinterpret_cast<float*>(sdst + (c / 128) * 4) = scale[u];
      }
    }
  }
}

// ---- dispatch plan (plan_once): the plan of the whole batch once, in the workspace ----
// One warp per 32-token tile counts it as plan_batch does, into row `tile` of the [NT][W] table
// (E expert columns, then R destination columns) and the destination ballots; the last block to
// finish turns every column into its exclusive prefix over the tiles, with one thread per column
// (the table is tile-major, so neighbouring threads read neighbouring counts).
__global__ void __launch_bounds__(kSendThreads) k_dispatch_plan(Args a) {
  extern __shared__ uint4 plan_raw[];
  __shared__ int last_block;
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int ntiles = static_cast<int>((a.T + kTile - 1) / kTile);
  uint16_t* table = at<uint16_t>(a.my, a.lay.plan_cnt);
  uint32_t* dball = at<uint32_t>(a.my, a.lay.plan_dball);
  if (a.trace) {  // before any block of the dependents can start
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      stamp(a, kTrPlanStart, 0);
      a.trace[kTrSendStart] = a.trace[kTrRecvStart] = ~0ull;
      __threadfence();
    }
    __syncthreads();
  }
  // The send kernel may start now: it waits for this whole grid before reading the plan.
  allow_dependent_launch();
  // Counting: the warp's tile into its own row of shared memory, then into the table.
  uint16_t* row = reinterpret_cast<uint16_t*>(plan_raw) + warp * ((g.W + 1) / 2 * 2);
  for (int tile = blockIdx.x * kWarps + warp; tile < ntiles; tile += gridDim.x * kWarps) {
    for (int i = lane; i < g.W; i += 32) row[i] = 0;
    __syncwarp();
    const int64_t t = static_cast<int64_t>(tile) * kTile + lane;
    int ev[kMaxTopK];
    load_experts(a, t, t < a.T, ev, true);
    uint32_t m = 0;
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k)
      if (ev[k] >= 0) m |= 1u << (ev[k] / g.L);
    for (int d = 0; d < g.R; ++d) {
      const uint32_t b = __ballot_sync(kFull, (m >> d) & 1u);
      if (lane == 0) {
        dball[d * g.NT + tile] = b;
        row[g.E + d] = static_cast<uint16_t>(__popc(b));
      }
    }
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k) {
      if (k >= g.K) break;
      const unsigned peers = __match_any_sync(kFull, ev[k]);
      if (ev[k] >= 0 && lane == __ffs(peers) - 1)
        row[ev[k]] += static_cast<uint16_t>(__popc(peers));
      __syncwarp();
    }
    for (int i = lane; i < g.W; i += 32) table[static_cast<int64_t>(tile) * g.W + i] = row[i];
    __syncwarp();
  }
  // The last block to finish counting scans the columns.
  __syncthreads();
  unsigned long long* status = at<unsigned long long>(a.my, a.lay.status);
  if (threadIdx.x == 0) {
    __threadfence();
    last_block = atomicAdd(status + kPlanDone, 1ull) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  const int64_t vecs = (static_cast<int64_t>(ntiles) * g.W * 2 + 15) / 16;
  // NOTE: eight loads in flight per thread before any is stored (a load-store loop waits for
  // each L2 round trip in turn: ~8 of them for the V3 table of 66 KB, on the critical path).
  constexpr int kLoads = 8;
  for (int64_t i0 = threadIdx.x; i0 < vecs; i0 += kLoads * blockDim.x) {
    uint4 v[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u)
      if (i0 + u * blockDim.x < vecs)
        v[u] = __ldcg(reinterpret_cast<const uint4*>(table) + i0 + u * blockDim.x);
#pragma unroll
    for (int u = 0; u < kLoads; ++u)
      if (i0 + u * blockDim.x < vecs) plan_raw[i0 + u * blockDim.x] = v[u];
  }
  __syncthreads();
  uint16_t* s = reinterpret_cast<uint16_t*>(plan_raw);
  for (int c = threadIdx.x; c < g.W; c += blockDim.x) {
    int run = 0, tile = 0;
    // Eight counts loaded before they are rewritten, so the loads overlap.
    for (; tile + 8 <= ntiles; tile += 8) {
      int v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) v[u] = s[(tile + u) * g.W + c];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        s[(tile + u) * g.W + c] = static_cast<uint16_t>(run);
        run += v[u];
      }
    }
    for (; tile < ntiles; ++tile) {
      const int v = s[tile * g.W + c];
      s[tile * g.W + c] = static_cast<uint16_t>(run);
      run += v;
    }
    at<int>(a.my, a.lay.plan_tot)[c] = run;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < vecs; i += blockDim.x)
    reinterpret_cast<uint4*>(table)[i] = plan_raw[i];
  if (threadIdx.x == 0) {
    status[kPlanDone] = 0;
    stamp(a, kTrPlanEnd, 0);
  }
}

// kPlanOnce: the plan is the workspace's (k_dispatch_plan); a compile-time switch so that each
// path's plan pointers have a known address space (shared or global). kPrefetch:
// prefetch_payload. kDirect: dispatch_direct_rows (Args::direct; an instance of its own, so the
// other paths compile as before).
template <bool kPlanOnce, bool kPrefetch, bool kDirect>
__device__ __forceinline__ void dispatch_send_block(const Args& a, char* smem) {
  __shared__ int abort_flag;
  __shared__ int dtot[kMaxRanks];
  const Geometry& g = a.g;
  const unsigned long long n = at<unsigned long long>(a.my, a.lay.status)[kSeqDispatch] + 1;
  if (threadIdx.x == 0) abort_flag = 0;
  __syncthreads();
  // NOTE: after every thread read n: the receive kernel ends the call by advancing it.
  if (threadIdx.x == 0 && kPlanOnce) stamp(a, kTrSendStart, 2);
  if (!a.nccl) allow_dependent_launch();
  const Plan p = kPlanOnce ? plan_global_view(a, smem) : plan_view(a, smem, dtot);
  if constexpr (kPlanOnce) {
    for (int i = threadIdx.x; i < kWarps * g.E; i += blockDim.x) p.emask[i] = 0;
    // NOTE: launched as the plan kernel's programmatic dependent: its plan is complete and
    // visible only after this wait.
    asm volatile("griddepcontrol.wait;" ::: "memory");
    __syncthreads();
  } else {
    plan_batch(a, smem, p);
  }
  // A destination's region of mine is free once it acknowledged the previous dispatch.
  if (!a.nccl && threadIdx.x < g.R &&
      !wait_geq(flag(a.my, a, kDispatchAck, threadIdx.x), n - 1, a.err, a.rank, threadIdx.x,
                kDispatchAck, -1, a.timeout_ns))
    abort_flag = 1;
  __syncthreads();
  if (abort_flag) return;
  // Notify (block 0): T and the per-local-expert counts of every destination, then its flag.
  if (blockIdx.x == 0) {
    for (int i = threadIdx.x; i < g.R * (g.L + 1); i += blockDim.x) {
      const int d = i / (g.L + 1), q = i % (g.L + 1);
      notify_of(peer(a, d), a, out_region(a, d))[q] =
          q == 0 ? static_cast<int32_t>(a.T) : p.etot[d * g.L + q - 1];
    }
    if (threadIdx.x < g.R)
      at<int32_t>(peer(a, threadIdx.x), a.lay.recv_count)[out_region(a, threadIdx.x)] =
          p.dtot[threadIdx.x];
    if (kDirect)  // every expert's count, so that each source can lay out every destination
      for (int i = threadIdx.x; i < g.R * g.E; i += blockDim.x)
        at<int32_t>(peer(a, i / g.E), a.lay.all_counts)[a.rank * g.E + i % g.E] = p.etot[i % g.E];
    __syncthreads();
    if (!a.nccl && threadIdx.x < g.R) {
      __threadfence_system();
      st_release_sys(flag(peer(a, threadIdx.x), a, kDispatchNotify, a.rank), n);
    }
  }
  // dispatch_direct_rows: once every source's counts are in (its notify flag), the rows of this
  // source's tokens at every destination are known.
  __shared__ unsigned ovf_mask;
  int* rowbase = reinterpret_cast<int*>(smem + a.ps.rowbase);
  if (kDirect) {
    if (threadIdx.x == 0) ovf_mask = 0;
    if (threadIdx.x < g.R && !wait_geq(flag(a.my, a, kDispatchNotify, threadIdx.x), n, a.err,
                                       a.rank, threadIdx.x, kDispatchNotify, -1, a.timeout_ns))
      abort_flag = 1;
    __syncthreads();
    if (abort_flag) return;
    direct_layout(a, rowbase, &ovf_mask);
    __syncthreads();
    if (threadIdx.x == 0) stamp(a, kTrSendCounts, 1);
  }
  // Chunks of C tokens, one block each; every chunk published with its own flag.
  const int warp = threadIdx.x >> 5;
  const int64_t nchunks = (a.T + g.C - 1) / g.C;
  const int64_t steps = (g.H + 1023) / 1024;
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const int64_t c0 = c * g.C, c1 = min(a.T, c0 + g.C);
    if (threadIdx.x < g.R) {
      const int d = threadIdx.x;
      const int b = slot_prefix(a, p, d, c0), e = slot_prefix(a, p, d, c1);
      int32_t* info = notify_of(peer(a, d), a, out_region(a, d)) + 1 + g.L + 2 * c;
      info[0] = b;
      info[1] = e - b;
    }
    const int tile0 = static_cast<int>(c0 / kTile), tile1 = static_cast<int>((c1 - 1) / kTile);
    for (int tile = tile0 + warp; tile <= tile1; tile += kWarps) push_metadata(a, p, tile, c0, c1);
    const Split sp = split_work(c1 - c0, steps, kWarps);
    for (int64_t item = warp; item < sp.items; item += kWarps) {
      if constexpr (kDirect)
        push_payload_direct<kPrefetch>(a, p, c0 + sp.token(item), sp.first(item), sp.last(item),
                                       rowbase, ovf_mask);
      else
        push_payload<kPrefetch>(a, p, c0 + sp.token(item), sp.first(item), sp.last(item));
    }
    __syncthreads();
    if (!a.nccl && threadIdx.x < g.R) {
      __threadfence_system();
      st_release_sys(
          chunk_flag(peer(a, threadIdx.x), a, kDispatchChunk, a.rank, static_cast<int>(c)), n);
    }
  }
}

template <bool kPlanOnce, bool kPrefetch, bool kDirect>
__global__ void __launch_bounds__(kSendThreads, 1) k_dispatch_send(Args a) {
  extern __shared__ uint4 smem_raw[];
  dispatch_send_block<kPlanOnce, kPrefetch, kDirect>(a, reinterpret_cast<char*>(smem_raw));
  count_send_block(a.my, a.lay.status, kDispatchSent);
  if (threadIdx.x == 0) stamp(a, kTrSendEnd, 1);
}

// ---- dispatch receive 1: the layout from the notified counts (every block, shared memory) ----
struct RecvLayout {
  int* base;  // [R][L] first row of (source, expert) relative to the expert's block
  int* offs;  // [L + 1] expert blocks
  int* tot;   // [L] rows of each expert
  int* roff;  // [R + 1] compact index of each source region's first token
  int* ntok;  // [R] tokens of each source
};

__device__ void recv_layout(const Args& a, const RecvLayout& r, long long* rows_needed,
                            int* overflow, int* max_tokens) {
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = threadIdx.x; i < g.R * g.L; i += blockDim.x)
    r.base[i] = __ldcg(notify_of(a.my, a, i / g.L) + 1 + i % g.L);
  if (threadIdx.x < g.R) r.ntok[threadIdx.x] = __ldcg(notify_of(a.my, a, threadIdx.x));
  __syncthreads();
  for (int e = threadIdx.x; e < g.L; e += blockDim.x) {
    int run = 0;
    for (int s = 0; s < g.R; ++s) {
      const int c = r.base[s * g.L + e];
      r.base[s * g.L + e] = run;
      run += c;
    }
    r.tot[e] = run;
  }
  if (warp == 1 && lane == 0) {
    const int32_t* rc = at<int32_t>(a.my, a.lay.recv_count);
    r.roff[0] = 0;
    int most = 0;
    for (int s = 0; s < g.R; ++s) {
      r.roff[s + 1] = r.roff[s] + __ldcg(rc + s);
      most = max(most, r.ntok[s]);
    }
    *max_tokens = most;
  }
  __syncthreads();
  // Block offsets: one warp scans the (aligned or fixed) block sizes 32 experts at a time.
  if (warp == 0) {
    if (lane == 0) r.offs[0] = 0;
    int run = 0, largest = 0;
    for (int e0 = 0; e0 < g.L; e0 += 32) {
      const int e = e0 + lane;
      const int c = e < g.L ? r.tot[e] : 0;
      const int size = e < g.L ? (g.cap > 0 ? static_cast<int>(g.cap) : (c + 127) / 128 * 128) : 0;
      const int incl = warp_inclusive_sum(size);
      if (e < g.L) r.offs[e + 1] = run + incl;
      run += __shfl_sync(kFull, incl, 31);
      largest = max(largest, c);
    }
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) largest = max(largest, __shfl_xor_sync(kFull, largest, m));
    if (lane == 0) {
      if (g.cap > 0) {
        *overflow = largest > g.cap;
        *rows_needed = largest > g.cap ? largest : g.bound;
      } else {
        *rows_needed = run;
        *overflow = run > g.bound;
      }
    }
  }
  __syncthreads();
}

// ---- dispatch receive 2: one record's layout rows and payload copy (one warp) ----
__device__ void scatter_record(const Args& a, const RecvLayout& r, int s, int64_t j,
                               bool overflow) {
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31;
  const int64_t slot = static_cast<int64_t>(s) * g.Tmax + j;
  const int64_t i = r.roff[s] + j;
  int row = -1;
  if (lane < g.K) {
    const int e = __ldcg(at<int32_t>(a.my, a.lay.topk_local) + slot * g.K + lane);
    if (e >= 0 && !overflow) {
      row = r.offs[e] + r.base[s * g.L + e] +
            __ldcg(at<int32_t>(a.my, a.lay.topk_pos) + slot * g.K + lane);
      at<int32_t>(a.my, a.lay.m_indices)[row] = e;
      at<int32_t>(a.my, a.lay.row_src)[row] = static_cast<int32_t>(i * g.K + lane);
      at<float>(a.my, a.lay.row_weight)[row] =
          __ldcg(at<float>(a.my, a.lay.weight) + slot * g.K + lane);
    }
    at<int32_t>(a.my, a.lay.token_rows)[slot * g.K + lane] = row;
  }
  if (!a.expand || overflow) return;
  int rows[kMaxTopK];
#pragma unroll
  for (int k = 0; k < kMaxTopK; ++k) rows[k] = __shfl_sync(kFull, row, k < g.K ? k : 0);
  const char* rec = record_of(a, a.my, s, j);
  const float* rec_scales = reinterpret_cast<const float*>(rec + g.H);
  char* gx = a.my + a.lay.gx;
  const int64_t row_bytes = g.fp8 ? g.H : g.H * 2;
  // dispatch_direct_rows: the sender wrote the row of the lowest k (self_rows: all rows of the
  // rank's own tokens); the others are copied from it.
  int kf = -1;
  if (a.direct && a.pull && s != a.rank) {
    rec = record_of(a, peer(a, s), a.rank, j);  // dispatch_pull: read over NVLink, every row
    rec_scales = reinterpret_cast<const float*>(rec + g.H);
  } else if (a.direct) {
    if (a.self_rows && s == a.rank) return;
    kf = __ffs(__ballot_sync(kFull, row >= 0)) - 1;
    if (kf < 0) return;
    rec = gx + static_cast<int64_t>(rows[kf]) * row_bytes;
    rec_scales = at<float>(a.my, a.lay.gscales) + static_cast<int64_t>(rows[kf]) * g.SC;
  }
  // Eight 16-byte loads in flight per lane (4 KB per warp), then stored to every row of the
  // token. NOTE: the expansion is load-latency bound beside the transport (v5: 4 in flight).
  constexpr int kInFlight = 8;
  for (int64_t c0 = lane * 16; c0 < row_bytes; c0 += kInFlight * 32 * 16) {
    uint4 v[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u)
      if (c0 + u * 512 < row_bytes)
        v[u] = __ldcg(reinterpret_cast<const uint4*>(rec + c0 + u * 512));
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k) {
      if (k >= g.K || rows[k] < 0 || k == kf) continue;
      char* dst = gx + static_cast<int64_t>(rows[k]) * row_bytes + c0;
#pragma unroll
      for (int u = 0; u < kInFlight; ++u)
        if (c0 + u * 512 < row_bytes) *reinterpret_cast<uint4*>(dst + u * 512) = v[u];
    }
  }
  if (g.fp8) {
    float* gs = at<float>(a.my, a.lay.gscales);
    for (int64_t c = lane; c < g.SC; c += 32) {
      const float sc = __ldcg(rec_scales + c);
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k)
        if (k < g.K && rows[k] >= 0 && k != kf) gs[rows[k] * g.SC + c] = sc;
    }
  }
}

// Dispatch receive: layout as soon as every source notified, then every chunk expanded as soon
// as it landed (chunk-major order, the order senders publish in); the last block acknowledges.
__global__ void __launch_bounds__(kSendThreads) k_dispatch_recv(Args a) {
  extern __shared__ int rsm[];
  __shared__ int abort_flag, last_block, overflow, max_tokens;
  __shared__ long long rows_needed;
  const Geometry& g = a.g;
  RecvLayout r;
  r.base = rsm;
  r.offs = r.base + g.R * g.L;
  r.tot = r.offs + g.L + 1;
  r.roff = r.tot + g.L;
  r.ntok = r.roff + g.R + 1;
  int64_t* status = at<int64_t>(a.my, a.lay.status);
  const unsigned long long n = static_cast<unsigned long long>(status[kSeqDispatch]) + 1;
  const int64_t prev_rows = status[kPrevRows];
  if (threadIdx.x == 0) {
    abort_flag = 0;
    stamp(a, kTrRecvStart, 2);
  }
  __syncthreads();
  if (!a.nccl && threadIdx.x < g.R &&
      !wait_geq(flag(a.my, a, kDispatchNotify, threadIdx.x), n, a.err, a.rank, threadIdx.x,
                kDispatchNotify, -1, a.timeout_ns))
    abort_flag = 1;
  __syncthreads();
  if (abort_flag) return;  // the error is recorded; check() reports it
  recv_layout(a, r, &rows_needed, &overflow, &max_tokens);
  const bool ovf = overflow != 0;
  if (threadIdx.x == 0) stamp(a, kTrRecvLayout, 1);
  if (blockIdx.x == 0) {
    for (int e = threadIdx.x; e < g.L; e += blockDim.x) {
      at<int32_t>(a.my, a.lay.expert_counts)[e] = r.tot[e];
      at<int32_t>(a.my, a.lay.expert_offsets)[e + 1] = r.offs[e + 1];
    }
    if (threadIdx.x <= g.R) at<int32_t>(a.my, a.lay.recv_offset)[threadIdx.x] = r.roff[threadIdx.x];
    if (threadIdx.x == 0) {
      at<int32_t>(a.my, a.lay.expert_offsets)[0] = 0;
      status[kRowsNeeded] = rows_needed;
      status[kOverflow] = overflow;
      status[kNumRecv] = r.roff[g.R];
    }
  }
  // Padding rows of each block, and rows the previous dispatch used beyond this one's.
  {
    int32_t* m_indices = at<int32_t>(a.my, a.lay.m_indices);
    int32_t* row_src = at<int32_t>(a.my, a.lay.row_src);
    const int64_t pad = g.cap > 0 ? g.cap : 128;
    const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
    if (!ovf) {
      for (int64_t q = tid; q < g.L * pad; q += nthreads) {
        const int e = static_cast<int>(q / pad);
        const int64_t row = r.offs[e] + r.tot[e] + q % pad;
        if (row < r.offs[e + 1]) {
          m_indices[row] = -1;
          row_src[row] = -1;
        }
      }
    }
    for (int64_t row = (ovf ? 0 : rows_needed) + tid; row < min(prev_rows, g.bound);
         row += nthreads) {
      m_indices[row] = -1;
      row_src[row] = -1;
    }
  }
  const int warp = threadIdx.x >> 5;
  const int64_t items = (static_cast<int64_t>(max_tokens) + g.C - 1) / g.C * g.R;
  __shared__ long long claimed;
  for (int64_t item = claim_item(status + kRecvItem, &claimed); item < items;
       item = claim_item(status + kRecvItem, &claimed)) {
    const int c = static_cast<int>(item / g.R), s = static_cast<int>(item % g.R);
    if (static_cast<int64_t>(c) * g.C >= r.ntok[s]) continue;
    if (!a.nccl) {
      if (threadIdx.x == 0 && !wait_geq(chunk_flag(a.my, a, kDispatchChunk, s, c), n, a.err, a.rank,
                                        s, kDispatchChunk, c, a.timeout_ns))
        abort_flag = 1;
      if (threadIdx.x == 0) stamp(a, kTrRecvLastFlag, 1);
      __syncthreads();
      if (abort_flag) return;
    }
    const int32_t* info = notify_of(a.my, a, s) + 1 + g.L + 2 * c;
    const int begin = __ldcg(info), count = __ldcg(info + 1);
    for (int q = warp; q < count; q += kWarps) scatter_record(a, r, s, begin + q, ovf);
  }
  // The last block to finish acknowledges every source: its regions of mine are free again.
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned long long done =
        atomicAdd(reinterpret_cast<unsigned long long*>(status + kRecvDone), 1ull);
    last_block = done == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  // NOTE: the call ends only once this rank's send blocks all ended too (a programmatic
  // dependent may finish before its primary; the stream's next work must not overlap either).
  if (threadIdx.x == 0)
    wait_geq(reinterpret_cast<unsigned long long*>(status) + kDispatchSent, n * a.send_blocks,
             a.err, a.rank, a.rank, kLocalSent, -1, a.timeout_ns);
  __syncthreads();
  if (!a.nccl && threadIdx.x < g.R) {
    __threadfence_system();
    st_release_sys(flag(peer(a, threadIdx.x), a, kDispatchAck, a.rank), n);
  }
  if (threadIdx.x == 0) {
    status[kRecvDone] = 0;
    status[kRecvItem] = 0;
    status[kPrevRows] = ovf ? 0 : min(static_cast<int64_t>(rows_needed), g.bound);
    status[kSeqDispatch] = static_cast<int64_t>(n);
    stamp(a, kTrRecvEnd, 0);
  }
}

// ---- combine send: per chunk of received records, one BF16 row per record pushed back ----
// NVLink: records of this rank's own tokens are skipped; combine_recv sums them from the local
// expert rows directly (no staging round trip through memory).
// One record's row [c_begin, c_end) (lane offset included) to dst: the weighted sum of its expert
// rows, compacted, kU column steps per pass (combine_two_steps: 2), or the given row.
// The record's rows (lane k < K: row k or -1, and its weight), or -1 for combine_tokens.
__device__ __forceinline__ void record_row(const Args& a, int64_t slot, int* row, float* wt) {
  const int lane = threadIdx.x & 31;
  *row = -1;
  *wt = 0.0f;
  if (a.weighted && lane < a.g.K) {
    *row = at<int32_t>(a.my, a.lay.token_rows)[slot * a.g.K + lane];
    if (*row >= 0) *wt = at<float>(a.my, a.lay.row_weight)[*row];
  }
}
template <int kU, class Rows>
__device__ __forceinline__ void combine_record_rows(const Args& a, const Rows& rs, int64_t slot,
                                                    int64_t c_begin, int64_t c_end, uint16_t* dst);
template <int kU>
__device__ __forceinline__ void combine_record(const Args& a, int64_t slot, int64_t c_begin,
                                               int64_t c_end, uint16_t* dst) {
  int row;
  float wt;
  record_row(a, slot, &row, &wt);
  combine_record_rows<kU>(a, compact_rows(row, wt), slot, c_begin, c_end, dst);
}
template <int kU, class Rows>
__device__ __forceinline__ void combine_record_rows(const Args& a, const Rows& rs, int64_t slot,
                                                    int64_t c_begin, int64_t c_end, uint16_t* dst) {
  const Geometry& g = a.g;
  for (int64_t col = c_begin; col < c_end; col += kU * 256) {
    bool valid[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) valid[u] = col + u * 256 < c_end;
    if (a.weighted) {
      float acc[kU][8];
      weighted_rows_u<kU>(a.y, g.H, rs, col, valid, acc);
#pragma unroll
      for (int u = 0; u < kU; ++u)
        if (valid[u]) *reinterpret_cast<uint4*>(dst + col + u * 256) = pack_bf16(acc[u]);
    } else {
      uint4 v[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u)
        if (valid[u])
          v[u] = __ldg(reinterpret_cast<const uint4*>(a.y + slot * g.H + col + u * 256));
#pragma unroll
      for (int u = 0; u < kU; ++u)
        if (valid[u]) *reinterpret_cast<uint4*>(dst + col + u * 256) = v[u];
    }
  }
}

// combine_async_rows: the expert rows of a record stream through a ring of shared-memory slots
// with cp.async, kRingSlots 16-byte slots per thread (slot q of thread x at q * blockDim + x, so
// a warp's accesses are contiguous), up to kRingSlots / n column steps of a record's n rows in
// flight per lane without holding registers (combine_two_steps: 8 loads in registers).
constexpr int kRingSlots = 24;
constexpr size_t kRingBytes = static_cast<size_t>(kRingSlots) * kSendThreads * 16;

__device__ __forceinline__ void cp_async16(uint4* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(
                   static_cast<unsigned>(__cvta_generic_to_shared(smem))),
               "l"(gmem)
               : "memory");
}
// Wait until at most `pending` of this thread's committed cp.async groups are in flight (a
// larger count waits for more, which is safe).
__device__ __forceinline__ void cp_async_wait(int pending) {
#define FM_CP_ASYNC_WAIT(N)                                   \
  case N:                                                     \
    asm volatile("cp.async.wait_group " #N ";" ::: "memory"); \
    return;
  switch (pending) {
    FM_CP_ASYNC_WAIT(0)
    FM_CP_ASYNC_WAIT(1)
    FM_CP_ASYNC_WAIT(2)
    FM_CP_ASYNC_WAIT(3)
    FM_CP_ASYNC_WAIT(4)
    FM_CP_ASYNC_WAIT(5)
    FM_CP_ASYNC_WAIT(6)
    default:
      asm volatile("cp.async.wait_group 7;" ::: "memory");
  }
#undef FM_CP_ASYNC_WAIT
}

// combine_record's weighted sum through the ring: per lane, column step k of row i lands in
// slot (k * n + i) % kRingSlots; step k is summed (ascending i, no FMA, as the reference) once
// its group landed, then step k + D is issued into the slots it freed (D = kRingSlots / n).
// Given rows (combine_tokens) and records without rows here take combine_record.
__device__ __forceinline__ void combine_record_async(const Args& a, int64_t slot, int64_t c_begin,
                                                     int64_t c_end, uint16_t* dst, uint4* ring) {
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31;
  int row = -1;
  float wt = 0.0f;
  if (a.weighted && lane < g.K) {
    row = at<int32_t>(a.my, a.lay.token_rows)[slot * g.K + lane];
    if (row >= 0) wt = at<float>(a.my, a.lay.row_weight)[row];
  }
  const RowSet rs = compact_rows(row, wt);
  if (!a.weighted || rs.n == 0) {
    combine_record<1>(a, slot, c_begin, c_end, dst);
    return;
  }
  const int n = rs.n;
  const int depth = kRingSlots / n;
  const int steps = c_begin < c_end ? static_cast<int>((c_end - c_begin + 255) / 256) : 0;
  uint4* mine = ring + threadIdx.x;
  // Slot cursors of the issuing and the summing side: both walk the units in the same order.
  int put = 0, get = 0;
  auto next = [](int q) { return q + 1 == kRingSlots ? 0 : q + 1; };
  auto issue = [&](int k) {
    const uint16_t* col = a.y + c_begin + static_cast<int64_t>(k) * 256;
#pragma unroll
    for (int i = 0; i < kMaxTopK; ++i)
      if (i < n) {
        cp_async16(mine + put * blockDim.x, col + static_cast<int64_t>(rs.row[i]) * g.H);
        put = next(put);
      }
    asm volatile("cp.async.commit_group;" ::: "memory");
  };
  int issued = 0;
  for (; issued < steps && issued < depth; ++issued) issue(issued);
  for (int k = 0; k < steps; ++k) {
    cp_async_wait(issued - k - 1);
    float acc[8];
#pragma unroll
    for (int x = 0; x < 8; ++x) acc[x] = 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxTopK; ++i) {
      if (i >= n) break;
      const uint4 v = mine[get * blockDim.x];
      get = next(get);
      const uint32_t* vw = reinterpret_cast<const uint32_t*>(&v);
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        acc[2 * x] = __fadd_rn(acc[2 * x], __fmul_rn(rs.w[i], __uint_as_float(vw[x] << 16)));
        acc[2 * x + 1] =
            __fadd_rn(acc[2 * x + 1], __fmul_rn(rs.w[i], __uint_as_float(vw[x] & 0xFFFF0000u)));
      }
    }
    *reinterpret_cast<uint4*>(dst + c_begin + static_cast<int64_t>(k) * 256) = pack_bf16(acc);
    if (issued < steps) issue(issued++);
  }
}

// combine_even_steps: a record's compacted rows, as the block shares them.
struct SharedRows {
  int n;
  int row[kMaxTopK];
  float w[kMaxTopK];
};
__device__ __forceinline__ void put_rows(SharedRows* dst, const RowSet& rs) {
  if ((threadIdx.x & 31) != 0) return;
  dst->n = rs.n;
#pragma unroll
  for (int i = 0; i < kMaxTopK; ++i) {
    dst->row[i] = rs.row[i];
    dst->w[i] = rs.w[i];
  }
}
constexpr int kEvenRecords = 32;  // records (send) or tokens (receive) whose rows a block shares
constexpr int kPairCols = 512;    // columns of one item: two 256-column steps

// Named barriers of combine_even_steps' send (0 is __syncthreads): kBarFill joins the warps that
// fill the shared rows, kBarRowsReady hands them to warp 0, which may still be publishing the
// previous chunk's flag.
constexpr int kBarFill = 1, kBarRowsReady = 2;
__device__ __forceinline__ void bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
// The next item of a block's shared counter, for the whole warp.
__device__ __forceinline__ int claim_warp_item(int* counter) {
  int it = 0;
  if ((threadIdx.x & 31) == 0) it = atomicAdd(counter, 1);
  return __shfl_sync(kFull, it, 0);
}

// combine_even_steps, send: records [j0, j1) of source s (weighted), kEvenRecords at a time: warps
// 1.. compact the records' rows into shared memory, then every warp claims (record, column pair)
// items from a shared counter, so each warp's share of rows is about the chunk's mean and the
// chunk no longer waits for its record with the most rows. NOTE: warp 0 does not fill: its lane
// 0 publishes the previous chunk (a system fence, which waits for that chunk's NVLink writes)
// and it joins through kBarRowsReady, taking fewer items. dst0: record 0's row.
__device__ void combine_chunk_even(const Args& a, int s, int64_t j0, int64_t j1, uint16_t* dst0) {
  static_assert(kWarps >= 2, "combine_even_steps needs a warp besides the publishing one");
  __shared__ SharedRows rec[kEvenRecords];
  __shared__ int next_item;
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t pairs = (g.H + kPairCols - 1) / kPairCols;
  __syncwarp();  // warp 0: lane 0 may come from publishing the previous chunk
  for (int64_t r0 = j0; r0 < j1; r0 += kEvenRecords) {
    if (r0 > j0) __syncthreads();  // every item of the previous records is done with rec[]
    const int nrec = static_cast<int>(min(static_cast<int64_t>(kEvenRecords), j1 - r0));
    if (warp > 0) {
      for (int r = warp - 1; r < nrec; r += kWarps - 1) {
        int row;
        float wt;
        record_row(a, static_cast<int64_t>(s) * g.Tmax + r0 + r, &row, &wt);
        put_rows(&rec[r], compact_rows(row, wt));
      }
      if (threadIdx.x == 32) next_item = 0;
      bar_sync(kBarFill, kSendThreads - 32);
      bar_arrive(kBarRowsReady, kSendThreads);
    } else {
      bar_sync(kBarRowsReady, kSendThreads);
    }
    const int items = nrec * static_cast<int>(pairs);
    for (int it = claim_warp_item(&next_item); it < items; it = claim_warp_item(&next_item)) {
      const int r = it / static_cast<int>(pairs);
      const int64_t p = it % pairs;
      const int64_t j = r0 + r;
      combine_record_rows<2>(a, rec[r], static_cast<int64_t>(s) * g.Tmax + j,
                             p * kPairCols + lane * 8, min(g.H, (p + 1) * kPairCols),
                             dst0 + j * g.H);
    }
  }
}

// kU: column steps per pass of the weighted sums (combine_two_steps: 2); kAsync:
// combine_async_rows (ring: the block's dynamic shared memory).
template <int kU, bool kAsync, bool kEven>
__device__ void combine_send_block(const Args& a, uint4* ring) {
  __shared__ int roff[kMaxRanks + 1];
  __shared__ int abort_flag;
  const Geometry& g = a.g;
  int64_t* status = at<int64_t>(a.my, a.lay.status);
  const unsigned long long n = static_cast<unsigned long long>(status[kSeqCombine]) + 1;
  if (threadIdx.x == 0) abort_flag = 0;
  if (threadIdx.x <= g.R) roff[threadIdx.x] = at<int32_t>(a.my, a.lay.recv_offset)[threadIdx.x];
  __syncthreads();
  if (!a.nccl) allow_dependent_launch();
  if (!a.nccl && threadIdx.x < g.R && threadIdx.x != a.rank &&
      !wait_geq(flag(a.my, a, kCombineAck, threadIdx.x), n - 1, a.err, a.rank, threadIdx.x,
                kCombineAck, -1, a.timeout_ns))
    abort_flag = 1;
  __syncthreads();
  if (abort_flag) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int32_t* token_rows = at<int32_t>(a.my, a.lay.token_rows);
  const float* row_weight = at<float>(a.my, a.lay.row_weight);
  // One chunk of source s: every record's row pushed back, then the chunk's flag.
  auto send_chunk = [&](int c, int s) {
    const int64_t count = roff[s + 1] - roff[s];
    const int64_t j0 = static_cast<int64_t>(c) * g.C, j1 = min(count, j0 + g.C);
    auto dst_of = [&](int64_t j) {
      return at<uint16_t>(peer(a, s), a.lay.comb_stage) +
             (static_cast<int64_t>(out_region(a, s)) * g.Tmax + j) * g.H;
    };
    if (kEven && a.weighted) {
      combine_chunk_even(a, s, j0, j1, dst_of(0));
    } else {
      const Split sp = split_work(j1 - j0, (g.H + 255) / 256, kWarps);
      for (int64_t it = warp; it < sp.items; it += kWarps) {
        const int64_t j = j0 + sp.token(it);
        const int64_t slot = static_cast<int64_t>(s) * g.Tmax + j;
        const int64_t c_begin = sp.first(it) * 256 + lane * 8, c_end = min(g.H, sp.last(it) * 256);
        uint16_t* dst = dst_of(j);
        if (kAsync) {
          combine_record_async(a, slot, c_begin, c_end, dst, ring);
          continue;
        }
        if (kU > 1) {
          combine_record<kU>(a, slot, c_begin, c_end, dst);
          continue;
        }
        int row = -1;
        float wt = 0.0f;
        if (a.weighted && lane < g.K) {
          row = token_rows[slot * g.K + lane];
          if (row >= 0) wt = row_weight[row];
        }
        int rows[kMaxTopK];
        float ws[kMaxTopK];
#pragma unroll
        for (int k = 0; k < kMaxTopK; ++k) {
          rows[k] = __shfl_sync(kFull, row, k < g.K ? k : 0);
          ws[k] = __shfl_sync(kFull, wt, k < g.K ? k : 0);
        }
        // One 256-column step of the row: the weighted sum (or the given row).
        auto step_value = [&](int64_t col) {
          if (!a.weighted) return __ldg(reinterpret_cast<const uint4*>(a.y + slot * g.H + col));
          float acc[8];
          weighted_rows(a.y, g.H, rows, ws, g.K, col, acc);
          return pack_bf16(acc);
        };
        for (int64_t col = c_begin; col < c_end; col += 256)
          *reinterpret_cast<uint4*>(dst + col) = step_value(col);
      }
    }
    __syncthreads();
    if (!a.nccl && threadIdx.x == 0) {
      __threadfence_system();
      st_release_sys(chunk_flag(peer(a, s), a, kCombineChunk, a.rank, c), n);
    }
  };
  // Sources: over NVLink the rank's own records are summed by combine_recv, so with
  // combine_peer_items / combine_peer_blocks the sources are the peers (index q -> rank).
  const bool peers_only = !a.nccl && (a.peer_items || a.peer_blocks);
  const int nsrc = peers_only ? g.R - 1 : g.R;
  if (nsrc == 0) return;
  const int grid = static_cast<int>(gridDim.x), b = static_cast<int>(blockIdx.x);
  // Items: (chunk c, source index q).
  // combine_peer_blocks: blocks dealt to the sources, block b serving source b % N, its chunks
  // b / N + i * G_q (G_q the blocks with that residue); with fewer blocks than sources, sources
  // b, b + G, ... whole.
  // Otherwise (chunk, source) pairs, chunk-major, block b taking pairs b, b + G, ...; without
  // combine_peer_items the rank's own source is in the enumeration and skipped (v5), which idles
  // every block b with b % R == rank whenever G % R == 0 (half of them, 2 ranks).
  const bool dealt = a.peer_blocks && grid >= nsrc;
  const int q_step = !a.peer_blocks ? 0 : dealt ? nsrc : grid;
  const int c_first = dealt ? b / nsrc : 0;
  const int c_step = dealt ? (grid - b % nsrc + nsrc - 1) / nsrc : 1;
  int most = 0;
  for (int s = 0; s < g.R; ++s) most = max(most, roff[s + 1] - roff[s]);
  const int64_t flat_items = (static_cast<int64_t>(most) + g.C - 1) / g.C * nsrc;
  int q = a.peer_blocks ? (dealt ? b % nsrc : b) : 0;
  int c = c_first;
  for (int64_t item = b;; item += grid) {
    if (!a.peer_blocks) {
      if (item >= flat_items) break;
      c = static_cast<int>(item / nsrc);
      q = static_cast<int>(item % nsrc);
    } else if (q >= nsrc) {
      break;
    }
    const int s = peers_only && q >= a.rank ? q + 1 : q;
    const int count = roff[s + 1] - roff[s];
    if (a.peer_blocks && c * g.C >= count) {  // next source of this block
      q += q_step;
      c = c_first;
      continue;
    }
    if ((a.nccl || s != a.rank) && c * g.C < count) send_chunk(c, s);
    c += c_step;
  }
}

template <int kU, bool kAsync, bool kEven>
__global__ void __launch_bounds__(kSendThreads) k_combine_send(Args a) {
  static_assert(!kEven || (kU == 2 && !kAsync), "combine_even_steps sums two steps per pass");
  extern __shared__ uint4 comb_ring[];
  combine_send_block<kU, kAsync, kEven>(a, comb_ring);
  count_send_block(a.my, a.lay.status, kCombineSent);
}

// ---- combine receive: per tile of tokens, wait for the chunks holding their partials, then sum
// the partials in rank order (the rank's own computed here from its expert rows) ----
// One token's sum over ranks, columns [c_lo, c_hi) (whole 256-column steps), two steps per pass:
// the rank's own partial from its expert rows `rs` (rounded to BF16 like a staged one), the
// others' from the stage, added in rank order. Lane d < R holds the token's slot at d.
// kEarly (combine_even_steps): the first pair of ranks' staged rows are loaded before the own
// partial, so their latency overlaps the own rows' (same additions in the same order).
template <bool kEarly = false, class Rows>
__device__ __forceinline__ void combine_recv_token2(const Args& a, int64_t t, int64_t c_lo,
                                                    int64_t c_hi, int my_slot, int js_self,
                                                    const Rows& rs, const uint16_t* stage) {
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31;
  const bool self_local = !a.nccl;
  const int64_t self_slot = static_cast<int64_t>(a.rank) * g.Tmax + js_self;
  // NOTE: the column loop is warp-uniform (shuffles inside); lanes past H only skip memory.
  for (int64_t c0 = c_lo; c0 < c_hi; c0 += 512) {
    const int64_t c = c0 + lane * 8;
    const bool valid[2] = {c < g.H, c0 + 256 < c_hi && c + 256 < g.H};
    // The staged rows of ranks d0 and d0 + 1 (js -1: none, or the own partial).
    auto load_pair = [&](int d0, uint4(&v)[2][2], int(&js)[2]) {
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        js[q] = __shfl_sync(kFull, my_slot, (d0 + q) & 31);
        if (d0 + q >= g.R) js[q] = -1;
        if (js[q] >= 0 && !(self_local && d0 + q == a.rank)) {
          const uint16_t* src = stage + (static_cast<int64_t>(d0 + q) * g.Tmax + js[q]) * g.H + c;
#pragma unroll
          for (int u = 0; u < 2; ++u)
            if (valid[u]) v[u][q] = __ldcg(reinterpret_cast<const uint4*>(src + u * 256));
        }
      }
    };
    uint4 v_first[2][2];
    int js_first[2];
    if constexpr (kEarly) load_pair(0, v_first, js_first);
    float self[2][8];
    if (self_local && js_self >= 0) {
      if (a.weighted) {
        weighted_rows_u<2>(a.y, g.H, rs, c, valid, self);
      } else {
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          if (!valid[u]) continue;
          const uint4 v =
              __ldg(reinterpret_cast<const uint4*>(a.y + self_slot * g.H + c + u * 256));
          const uint32_t* vw = reinterpret_cast<const uint32_t*>(&v);
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            self[u][2 * x] = __uint_as_float(vw[x] << 16);
            self[u][2 * x + 1] = __uint_as_float(vw[x] & 0xFFFF0000u);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < 2; ++u)
#pragma unroll
        for (int x = 0; x < 8; ++x) self[u][x] = bf16_bits_to_float(float_to_bf16_bits(self[u][x]));
    }
    float acc[2][8];
#pragma unroll
    for (int u = 0; u < 2; ++u)
#pragma unroll
      for (int x = 0; x < 8; ++x) acc[u][x] = 0.0f;
    // Ranks in pairs: their rows of both steps loaded together, summed in rank order.
    auto sum_pair = [&](int d0, const uint4(&v)[2][2], const int(&js)[2]) {
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        if (js[q] < 0) continue;
        const bool own = self_local && d0 + q == a.rank;
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          if (!valid[u]) continue;
          if (own) {
#pragma unroll
            for (int x = 0; x < 8; ++x) acc[u][x] = __fadd_rn(acc[u][x], self[u][x]);
            continue;
          }
          const uint32_t* vw = reinterpret_cast<const uint32_t*>(&v[u][q]);
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            acc[u][2 * x] = __fadd_rn(acc[u][2 * x], __uint_as_float(vw[x] << 16));
            acc[u][2 * x + 1] = __fadd_rn(acc[u][2 * x + 1], __uint_as_float(vw[x] & 0xFFFF0000u));
          }
        }
      }
    };
    int d_first = 0;
    if constexpr (kEarly) {
      sum_pair(0, v_first, js_first);
      d_first = 2;
    }
    for (int d0 = d_first; d0 < g.R; d0 += 2) {
      uint4 v[2][2];
      int js[2];
      load_pair(d0, v, js);
      sum_pair(d0, v, js);
    }
#pragma unroll
    for (int u = 0; u < 2; ++u)
      if (valid[u]) *reinterpret_cast<uint4*>(a.out + t * g.H + c + u * 256) = pack_bf16(acc[u]);
  }
}

// combine_even_steps, receive: tokens [t0, t1) of a tile. Warp d waits for the chunks of peer d
// holding the tile's slots (the tile's slots at d loaded by its lanes together), the tokens' slots
// and own rows go to shared memory, then the warps claim (token, column pair) items from a shared
// counter.
// False when a wait failed (error recorded).
__device__ bool recv_tile_even(const Args& a, int64_t t0, int64_t t1, unsigned long long n,
                               const uint16_t* stage, int* abort_flag) {
  __shared__ int tok_slot[kEvenRecords][kMaxRanks];
  __shared__ SharedRows tok_rows[kEvenRecords];
  __shared__ int next_item;
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int32_t* slot = at<int32_t>(a.my, a.lay.slot);
  const int ntok = static_cast<int>(t1 - t0);
  if (!a.nccl) {
    for (int d = warp; d < g.R; d += kWarps) {
      if (d == a.rank) continue;
      int lo = -1, hi = -1;
      for (int b0 = 0; b0 < ntok; b0 += 32) {
        const int j = b0 + lane < ntok ? slot[(t0 + b0 + lane) * g.R + d] : -1;
        const unsigned m = __ballot_sync(kFull, j >= 0);
        if (m == 0) continue;
        const int first = __shfl_sync(kFull, j, __ffs(m) - 1);
        hi = __shfl_sync(kFull, j, 31 - __clz(m));
        if (lo < 0) lo = first;
      }
      if (lane == 0 && lo >= 0)
        for (int c = lo / g.C; c <= hi / g.C; ++c)
          if (!wait_geq(chunk_flag(a.my, a, kCombineChunk, d, c), n, a.err, a.rank, d,
                        kCombineChunk, c, a.timeout_ns)) {
            *abort_flag = 1;
            break;
          }
    }
    __syncthreads();
    if (*abort_flag) return false;
  }
  const int64_t pairs = (g.H + kPairCols - 1) / kPairCols;
  const int64_t col_end = (g.H + 255) / 256 * 256;
  for (int r0 = 0; r0 < ntok; r0 += kEvenRecords) {
    const int nt = min(kEvenRecords, ntok - r0);
    for (int r = warp; r < nt; r += kWarps) {
      const int64_t t = t0 + r0 + r;
      const int my_slot = lane < g.R ? slot[t * g.R + lane] : -1;
      const int js_self = __shfl_sync(kFull, my_slot, a.rank);
      int row = -1;
      float wt = 0.0f;
      if (!a.nccl && js_self >= 0 && a.weighted && lane < g.K) {
        const int64_t self_slot = static_cast<int64_t>(a.rank) * g.Tmax + js_self;
        row = at<int32_t>(a.my, a.lay.token_rows)[self_slot * g.K + lane];
        if (row >= 0) wt = at<float>(a.my, a.lay.row_weight)[row];
      }
      if (lane < g.R) tok_slot[r][lane] = my_slot;
      put_rows(&tok_rows[r], compact_rows(row, wt));
    }
    if (threadIdx.x == 0) next_item = 0;
    __syncthreads();
    const int items = nt * static_cast<int>(pairs);
    for (int it = claim_warp_item(&next_item); it < items; it = claim_warp_item(&next_item)) {
      const int r = it / static_cast<int>(pairs);
      const int64_t p = it % pairs;
      const int my_slot = lane < g.R ? tok_slot[r][lane] : -1;
      combine_recv_token2<true>(a, t0 + r0 + r, p * kPairCols, min(col_end, (p + 1) * kPairCols),
                                my_slot, tok_slot[r][a.rank], tok_rows[r], stage);
    }
    __syncthreads();  // tok_slot / tok_rows are refilled
  }
  return true;
}

// kU = 2 (combine_two_steps): two column steps per pass (the self rows compacted).
// NOTE: kU = 2 leaves the v5 column loop after its `continue` unreachable (diagnostic 128).
#pragma nv_diag_suppress 128
template <int kU, bool kEven>
__global__ void __launch_bounds__(kSendThreads) k_combine_recv(Args a) {
  static_assert(!kEven || kU == 2, "combine_even_steps sums two steps per pass");
  __shared__ int abort_flag;
  __shared__ int last_block;
  const Geometry& g = a.g;
  int64_t* status = at<int64_t>(a.my, a.lay.status);
  const unsigned long long n = static_cast<unsigned long long>(status[kSeqCombine]) + 1;
  if (threadIdx.x == 0) abort_flag = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int32_t* slot = at<int32_t>(a.my, a.lay.slot);
  const uint16_t* stage = at<uint16_t>(a.my, a.lay.comb_stage);
  const int32_t* token_rows = at<int32_t>(a.my, a.lay.token_rows);
  const float* row_weight = at<float>(a.my, a.lay.row_weight);
  const bool self_local = !a.nccl;  // this rank's partial computed here, not staged
  const int64_t items = (a.T + a.tile - 1) / a.tile;
  __shared__ long long claimed;
  for (int64_t item = claim_item(status + kCombineItem, &claimed); item < items;
       item = claim_item(status + kCombineItem, &claimed)) {
    const int64_t t0 = item * a.tile, t1 = min(a.T, t0 + a.tile);
    if constexpr (kEven) {
      if (!recv_tile_even(a, t0, t1, n, stage, &abort_flag)) return;
      continue;
    }
    if (!a.nccl) {
      // Thread d waits for the chunks of d holding the slots of this tile's tokens.
      if (threadIdx.x < g.R && threadIdx.x != a.rank) {
        const int d = threadIdx.x;
        int lo = -1, hi = -1;
        for (int64_t t = t0; t < t1; ++t) {
          const int j = slot[t * g.R + d];
          if (j < 0) continue;
          if (lo < 0) lo = j;
          hi = j;
        }
        if (lo >= 0)
          for (int c = lo / g.C; c <= hi / g.C; ++c)
            if (!wait_geq(chunk_flag(a.my, a, kCombineChunk, d, c), n, a.err, a.rank, d,
                          kCombineChunk, c, a.timeout_ns)) {
              abort_flag = 1;
              break;
            }
      }
      __syncthreads();
      if (abort_flag) return;
    }
    const Split sp = split_work(t1 - t0, (g.H + 255) / 256, kWarps);
    for (int64_t it = warp; it < sp.items; it += kWarps) {
      const int64_t t = t0 + sp.token(it);
      const int my_slot = lane < g.R ? slot[t * g.R + lane] : -1;
      const int js_self = __shfl_sync(kFull, my_slot, a.rank);
      const int64_t self_slot = static_cast<int64_t>(a.rank) * g.Tmax + js_self;
      int row = -1;
      float wt = 0.0f;
      if (self_local && js_self >= 0 && a.weighted && lane < g.K) {
        row = token_rows[self_slot * g.K + lane];
        if (row >= 0) wt = row_weight[row];
      }
      if constexpr (kU == 2) {
        combine_recv_token2(a, t, sp.first(it) * 256, sp.last(it) * 256, my_slot, js_self,
                            compact_rows(row, wt), stage);
        continue;
      }
      int rows[kMaxTopK];
      float ws[kMaxTopK];
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k) {
        rows[k] = __shfl_sync(kFull, row, k < g.K ? k : 0);
        ws[k] = __shfl_sync(kFull, wt, k < g.K ? k : 0);
      }
      // NOTE: the column loop is warp-uniform (shuffles inside); lanes past H only skip memory.
      for (int64_t c0 = sp.first(it) * 256; c0 < sp.last(it) * 256; c0 += 256) {
        const int64_t c = c0 + lane * 8;
        const bool valid = c < g.H;
        float self[8];
        if (self_local && js_self >= 0 && valid) {
          if (a.weighted) {
            weighted_rows(a.y, g.H, rows, ws, g.K, c, self);
          } else {
            const uint4 v = __ldg(reinterpret_cast<const uint4*>(a.y + self_slot * g.H + c));
            const uint32_t* vw = reinterpret_cast<const uint32_t*>(&v);
#pragma unroll
            for (int x = 0; x < 4; ++x) {
              self[2 * x] = __uint_as_float(vw[x] << 16);
              self[2 * x + 1] = __uint_as_float(vw[x] & 0xFFFF0000u);
            }
          }
#pragma unroll
          for (int x = 0; x < 8; ++x) self[x] = bf16_bits_to_float(float_to_bf16_bits(self[x]));
        }
        float acc[8];
#pragma unroll
        for (int x = 0; x < 8; ++x) acc[x] = 0.0f;
        // Ranks in groups of four: their rows are loaded together, then summed in rank order.
        for (int d0 = 0; d0 < g.R; d0 += 4) {
          uint4 v[4];
          int js[4];
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            js[u] = __shfl_sync(kFull, my_slot, (d0 + u) & 31);
            if (d0 + u >= g.R || !valid) js[u] = -1;
            if (js[u] >= 0 && !(self_local && d0 + u == a.rank))
              v[u] = __ldcg(reinterpret_cast<const uint4*>(
                  stage + (static_cast<int64_t>(d0 + u) * g.Tmax + js[u]) * g.H + c));
          }
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            if (js[u] < 0) continue;
            if (self_local && d0 + u == a.rank) {
#pragma unroll
              for (int x = 0; x < 8; ++x) acc[x] = __fadd_rn(acc[x], self[x]);
              continue;
            }
            const uint32_t* vw = reinterpret_cast<const uint32_t*>(&v[u]);
#pragma unroll
            for (int x = 0; x < 4; ++x) {
              acc[2 * x] = __fadd_rn(acc[2 * x], __uint_as_float(vw[x] << 16));
              acc[2 * x + 1] = __fadd_rn(acc[2 * x + 1], __uint_as_float(vw[x] & 0xFFFF0000u));
            }
          }
        }
        if (valid) *reinterpret_cast<uint4*>(a.out + t * g.H + c) = pack_bf16(acc);
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned long long done =
        atomicAdd(reinterpret_cast<unsigned long long*>(status + kCombineDone), 1ull);
    last_block = done == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  if (threadIdx.x == 0)
    wait_geq(reinterpret_cast<unsigned long long*>(status) + kCombineSent, n * a.send_blocks, a.err,
             a.rank, a.rank, kLocalSent, -1, a.timeout_ns);
  __syncthreads();
  if (!a.nccl && threadIdx.x < g.R) {
    __threadfence_system();
    st_release_sys(flag(peer(a, threadIdx.x), a, kCombineAck, a.rank), n);
  }
  if (threadIdx.x == 0) {
    status[kCombineDone] = 0;
    status[kCombineItem] = 0;
    status[kSeqCombine] = static_cast<int64_t>(n);
  }
}

#pragma nv_diag_default 128

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    FM_CHECK_CUDA(cudaGetDevice(&prev_));
    FM_CHECK_CUDA(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(prev_); }

 private:
  int prev_ = 0;
};

using KernelFn = void (*)(Args);

void launch(void (*kernel)(Args), int grid, size_t smem, cudaStream_t stream, bool dependent,
            const Args& a) {
  detail::launch_kernel(kernel, grid, kSendThreads, smem, stream, dependent, a);
}

// The kernel variants the options select (DeviceEpOptions: plan_once, prefetch_payload,
// combine_two_steps; direct: dispatch_direct_rows where it applies, Impl::direct, which
// implies plan_once).
KernelFn dispatch_send_kernel(const DeviceEpOptions& o, bool direct) {
  if (direct)
    return o.prefetch_payload ? k_dispatch_send<true, true, true>
                              : k_dispatch_send<true, false, true>;
  if (o.plan_once)
    return o.prefetch_payload ? k_dispatch_send<true, true, false>
                              : k_dispatch_send<true, false, false>;
  return o.prefetch_payload ? k_dispatch_send<false, true, false>
                            : k_dispatch_send<false, false, false>;
}
// combine_even_steps applies with combine_two_steps and without combine_async_rows.
bool even_steps(const DeviceEpOptions& o) {
  return o.combine_even_steps && o.combine_two_steps && !o.combine_async_rows;
}
KernelFn combine_send_kernel(const DeviceEpOptions& o) {
  if (o.combine_async_rows) return k_combine_send<2, true, false>;
  if (even_steps(o)) return k_combine_send<2, false, true>;
  return o.combine_two_steps ? k_combine_send<2, false, false> : k_combine_send<1, false, false>;
}
size_t combine_send_smem(const DeviceEpOptions& o) {
  return o.combine_async_rows ? kRingBytes : 0;
}
KernelFn combine_recv_kernel(const DeviceEpOptions& o) {
  if (o.combine_two_steps && o.combine_even_steps) return k_combine_recv<2, true>;
  return o.combine_two_steps ? k_combine_recv<2, false> : k_combine_recv<1, false>;
}

}  // namespace

struct DeviceEpRank::Impl {
  EpConfig cfg;
  Geometry g;
  WsLayout lay;
  DeviceEpOptions opt;
  // recv_blocks: dispatch_recv and combine_recv; side_recv_blocks: the low-latency and combine
  // backward receive kernels (DeviceEpOptions::recv_blocks).
  int rank = 0, device = 0, sm_count = 0, recv_blocks = 1, side_recv_blocks = 1;
  PlanSmem ps;
  bool direct = false;  // DeviceEpOptions::dispatch_direct_rows where it applies

  char* ws = nullptr;
  char* send_ws = nullptr;    // Wire::kNccl: records packed per destination
  DevErr* err_dev = nullptr;  // in the workspace
  std::vector<void*> opened;  // IPC mappings to close
  int64_t last_tokens = 0;
  const uint16_t* last_y = nullptr;      // combine input, also read by combine_recv (NVLink)
  const uint16_t* last_bwd_y = nullptr;  // combine backward: y of combine_backward_send
  bool last_weighted = true;
  // Masked configs over NVLink run the low-latency kernels (DeviceEpOptions::low_latency).
  bool ll = false;
  unsigned long long* ll_trace = nullptr;  // FP8MOE_EP_LL_TRACE=1: phase stamps (diagnostics)
  bool ll_fence = false;                   // FP8MOE_EP_LL_FENCE=1 (experiment)
  unsigned long long* trace = nullptr;     // FP8MOE_EP_TRACE=1: dispatch phase stamps

  ll::Params ll_params() const {
    ll::Params p;
    p.f = {lay.stage,
           lay.src_token,
           lay.topk_local,
           lay.topk_pos,
           lay.weight,
           lay.recv_count,
           lay.notify,
           lay.comb_stage,
           lay.peer_table,
           lay.slot,
           lay.status,
           lay.recv_offset,
           lay.expert_counts,
           lay.expert_offsets,
           lay.m_indices,
           lay.row_src,
           lay.row_weight,
           lay.token_rows,
           lay.gx,
           lay.gscales,
           lay.ll};
    p.my = ws;
    p.err = reinterpret_cast<ll::ErrRecord*>(err_dev);
    p.rank = rank;
    p.R = g.R;
    p.K = g.K;
    p.L = g.L;
    p.E = g.E;
    p.H = g.H;
    p.SC = g.SC;
    p.Tmax = g.Tmax;
    p.P = g.P;
    p.cap = g.cap;
    p.NS = g.NS;
    p.fp8 = g.fp8;
    p.expand = opt.expand_payload;
    p.send_blocks = opt.num_blocks;
    p.recv_blocks = side_recv_blocks;
    p.timeout_ns = static_cast<unsigned long long>(cfg.timeout_s * 1e9);
    p.st_rows_needed = kRowsNeeded;
    p.st_overflow = kOverflow;
    p.st_num_recv = kNumRecv;
    p.T = last_tokens;
    p.y = last_y;
    p.weighted = last_weighted;
    p.trace = ll_trace;
    p.fence = ll_fence;
    p.batch_ids = opt.ll_batch_ids;
    p.overlap_flags = opt.ll_overlap_flags;
    p.combine_wide = opt.ll_combine_wide;
    p.combine_pull = opt.ll_combine_pull;
    return p;
  }
  std::unique_ptr<detail::ForwardEpRank> fwd;  // more than one node: the two-stage route

  // Combine backward runs on the normal NVLink kernels of one node; the other configurations
  // have none yet and say so.
  void check_backward_supported() const {
    FM_CHECK_ARG(!fwd, "rank ", rank, ": combine backward on the GPU is not supported on the ",
                 "two-stage route (gpus_per_node=", cfg.gpus_per_node,
                 " < num_ranks=", cfg.num_ranks, "); one node only");
    FM_CHECK_ARG(opt.wire == Wire::kNvlink, "rank ", rank,
                 ": combine backward on the GPU is not supported over Wire::kNccl (NVLink only)");
    FM_CHECK_ARG(!ll, "rank ", rank,
                 ": combine backward is not supported by the low-latency kernels (masked_capacity=",
                 cfg.masked_capacity, "); DeviceEpOptions::low_latency = false runs the ",
                 "masked layout on the normal kernels, which have it");
  }
  bwd::Params bwd_params() const {
    bwd::Params p;
    p.f.comb_stage = lay.comb_stage;
    p.f.ack = lay.flags + static_cast<size_t>(kCombineAck) * g.R * 8;
    p.f.gw = lay.bwd_gw;
    p.f.gw_mask = lay.bwd_mask;
    p.f.bwd = lay.bwd;
    p.f.peer_table = lay.peer_table;
    p.f.slot = lay.slot;
    p.f.status = lay.status;
    p.f.recv_count = lay.recv_count;
    p.f.row_weight = lay.row_weight;
    p.f.token_rows = lay.token_rows;
    p.my = ws;
    p.err = reinterpret_cast<ll::ErrRecord*>(err_dev);
    p.rank = rank;
    p.R = g.R;
    p.K = g.K;
    p.H = g.H;
    p.Tmax = g.Tmax;
    p.bound = g.bound;
    p.send_blocks = combine_grid();
    p.recv_blocks = side_recv_blocks;
    p.timeout_ns = static_cast<unsigned long long>(cfg.timeout_s * 1e9);
    p.st_seq = kSeqCombine;
    p.st_overflow = kOverflow;
    p.st_sent = kCombineSent;
    p.ctr_ack = kCombineAck;
    p.T = last_tokens;
    return p;
  }

  // Grid of combine_send and combine_backward_send (both count into kCombineSent).
  int combine_grid() const { return opt.combine_blocks > 0 ? opt.combine_blocks : opt.num_blocks; }
  Args args() const {
    Args a{};
    a.g = g;
    a.lay = lay;
    a.ps = ps;
    a.my = ws;
    a.err = err_dev;
    a.rank = rank;
    a.send_blocks = opt.num_blocks;
    a.timeout_ns = static_cast<unsigned long long>(cfg.timeout_s * 1e9);
    a.nccl = opt.wire == Wire::kNccl;
    a.direct = direct;
    a.self_rows = direct && opt.dispatch_self_rows;
    a.pull = direct && opt.dispatch_pull;
    a.trace = trace;
    return a;
  }
  // Wire::kNccl: every peer's region of the send buffer goes to it, its region of ours comes
  // back (fields of the given offsets, `bytes` per region each).
  void exchange(const std::vector<std::pair<size_t, size_t>>& fields, cudaStream_t stream) {
#if defined(FP8MOE_HAVE_NCCL)
    auto comm = static_cast<ncclComm_t>(opt.nccl_comm);
    FM_CHECK_NCCL(ncclGroupStart());
    for (int p = 0; p < g.R; ++p)
      for (const auto& [off, bytes] : fields) {
        FM_CHECK_NCCL(ncclSend(send_ws + off + p * bytes, bytes, ncclUint8, p, comm, stream));
        FM_CHECK_NCCL(ncclRecv(ws + off + p * bytes, bytes, ncclUint8, p, comm, stream));
      }
    FM_CHECK_NCCL(ncclGroupEnd());
#else
    (void)fields;
    (void)stream;
    FM_THROW(ErrorKind::kInvalidArgument, "this build has no NCCL back end");
#endif
  }
};

DeviceEpRank::DeviceEpRank(const EpConfig& cfg, int rank, int device, DeviceEpOptions opt)
    : impl_(std::make_unique<Impl>()) {
  validate(cfg);
  FM_CHECK_ARG(cfg.num_ranks <= kMaxRanks, "num_ranks=", cfg.num_ranks, " exceeds ", kMaxRanks);
  FM_CHECK_ARG(cfg.top_k <= kMaxTopK, "top_k=", cfg.top_k, " exceeds ", kMaxTopK);
  FM_CHECK_ARG(rank >= 0 && rank < cfg.num_ranks, "rank ", rank, " out of range");
  FM_CHECK_ARG(opt.wire == Wire::kNvlink || (nccl_available() && opt.nccl_comm),
               "Wire::kNccl needs a build with NCCL and a communicator");
  FM_CHECK_ARG(opt.num_blocks >= 1, "num_blocks=", opt.num_blocks, " must be positive");
  FM_CHECK_ARG(opt.combine_blocks >= 0, "combine_blocks=", opt.combine_blocks,
               " must not be negative");
  FM_CHECK_ARG(opt.chunk_tokens >= 0, "chunk_tokens=", opt.chunk_tokens, " must not be negative");
  FM_CHECK_ARG(opt.recv_blocks >= 0, "recv_blocks=", opt.recv_blocks, " must not be negative");
  FM_CHECK_ARG(cfg.max_tokens_per_rank <= 65535, "max_tokens_per_rank=", cfg.max_tokens_per_rank,
               " exceeds 65535 (the send plan counts tokens in 16 bits)");
  Impl& m = *impl_;
  if (cfg.nodes() > 1) {  // the two-stage route (sm90_device_ep_forward.cu) takes every call
    m.cfg = cfg;
    m.rank = rank;
    m.device = device;
    m.fwd = std::make_unique<detail::ForwardEpRank>(cfg, rank, device, opt);
    return;
  }
  m.cfg = cfg;
  m.g = make_geometry(cfg, opt);
  m.ps = plan_smem(m.g);
  FM_CHECK_ARG(m.ps.total <= 200 * 1024, "max_tokens_per_rank=", cfg.max_tokens_per_rank, " with ",
               cfg.num_experts, " experts and ", cfg.num_ranks,
               " ranks needs more shared memory for the send plan (", m.ps.total,
               " bytes) than a block has");
  FM_CHECK_ARG(plan_kernel_smem(m.g) <= 200 * 1024, "max_tokens_per_rank=", cfg.max_tokens_per_rank,
               " with ", cfg.num_experts, " experts and ", cfg.num_ranks,
               " ranks needs more shared memory for the plan kernel (", plan_kernel_smem(m.g),
               " bytes) than a block has");
  FM_CHECK_ARG(recv_smem_bytes(m.g) <= 200 * 1024, cfg.num_experts, " experts over ", cfg.num_ranks,
               " ranks need more shared memory for the receive layout than a block has");
  m.lay = make_layout(m.g);
  m.opt = opt;
  // The direct rows need every rank's send blocks resident at once (each waits for all
  // notifies) and a peer-mapped destination layout; elsewhere the source-region path runs.
  // With the plan kernel and the grouped layout only (what was tested and measured; the masked
  // layout of the normal kernels keeps the source regions).
  m.direct = opt.dispatch_direct_rows && opt.expand_payload && opt.wire == Wire::kNvlink &&
             opt.ranks_per_device <= 1 && opt.plan_once && cfg.masked_capacity == 0;
  m.rank = rank;
  m.device = device;
  DeviceGuard guard(device);
  FM_CHECK_CUDA(cudaDeviceGetAttribute(&m.sm_count, cudaDevAttrMultiProcessorCount, device));
  {
    // Receive kernels spin on peers: with several ranks on one GPU their grids must leave room
    // for every rank's send kernel (at most half the SMs for all receivers together).
    const int sharing = std::max(1, opt.ranks_per_device);
    int rb = std::max(1, (m.sm_count - opt.num_blocks) / sharing);
    if (sharing > 1) rb = std::min(rb, std::max(1, m.sm_count / (2 * sharing)));
    m.side_recv_blocks = opt.recv_blocks > 0 ? opt.recv_blocks : rb;
    // NOTE: dispatch_recv and combine_recv over every SM when the GPU is this rank's alone: the
    // send kernel is resident before its dependent receive launches, so the receive blocks that
    // find no free SM wait for retiring send blocks instead of holding up the send.
    m.recv_blocks = opt.recv_blocks > 0 ? opt.recv_blocks : sharing > 1 ? rb : m.sm_count;
  }
  FM_CHECK_CUDA(cudaMalloc(&m.ws, m.lay.total));
  FM_CHECK_CUDA(cudaMemset(m.ws, 0, m.lay.total));
  FM_CHECK_CUDA(cudaMemset(m.ws + m.lay.m_indices, 0xFF, m.g.bound * 4));
  FM_CHECK_CUDA(cudaMemset(m.ws + m.lay.row_src, 0xFF, m.g.bound * 4));
  FM_CHECK_CUDA(cudaMemset(m.ws + m.lay.token_rows, 0xFF, m.g.R * m.g.Tmax * m.g.K * 4));
  // NOTE: the error record is device memory: every waiting thread polls it, and polling
  // host-mapped memory over PCIe from many SMs made system-scope fences crawl (v5, first run).
  m.err_dev = reinterpret_cast<DevErr*>(m.ws + m.lay.err);
  // NOTE: load every kernel now: with lazy module loading a first launch can wait for the device,
  // which never drains while a peer's kernel spins on a flag.
  for (const void* k : {reinterpret_cast<const void*>(k_dispatch_plan),
                        reinterpret_cast<const void*>(dispatch_send_kernel(m.opt, m.direct)),
                        reinterpret_cast<const void*>(k_dispatch_recv),
                        reinterpret_cast<const void*>(combine_send_kernel(m.opt)),
                        reinterpret_cast<const void*>(combine_recv_kernel(m.opt))}) {
    cudaFuncAttributes attr;
    FM_CHECK_CUDA(cudaFuncGetAttributes(&attr, k));
  }
  FM_CHECK_CUDA(cudaFuncSetAttribute(combine_send_kernel(m.opt),
                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(combine_send_smem(m.opt))));
  FM_CHECK_CUDA(cudaFuncSetAttribute(dispatch_send_kernel(m.opt, m.direct),
                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(m.ps.total)));
  FM_CHECK_CUDA(cudaFuncSetAttribute(k_dispatch_plan, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(plan_kernel_smem(m.g))));
  FM_CHECK_CUDA(cudaFuncSetAttribute(k_dispatch_recv, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(recv_smem_bytes(m.g))));
  m.ll = opt.low_latency && opt.wire == Wire::kNvlink && cfg.masked_capacity > 0 &&
         cfg.max_tokens_per_rank <= ll::kMaxTokens && cfg.hidden % 128 == 0;
  if (m.ll && std::getenv("FP8MOE_EP_LL_TRACE")) {
    FM_CHECK_CUDA(cudaMalloc(&m.ll_trace, ll::kTraceSlots * 8));
    FM_CHECK_CUDA(cudaMemset(m.ll_trace, 0, ll::kTraceSlots * 8));
  }
  m.ll_fence = std::getenv("FP8MOE_EP_LL_FENCE") != nullptr;
  if (std::getenv("FP8MOE_EP_TRACE")) {
    FM_CHECK_CUDA(cudaMalloc(&m.trace, kTrSlots * 8));
    FM_CHECK_CUDA(cudaMemset(m.trace, 0, kTrSlots * 8));
  }
  if (m.ll) ll::prepare(m.ll_params());
  bwd::prepare();
  if (opt.wire == Wire::kNccl) {
    // The peer-written fields lead the layout, so the send buffer is that prefix.
    FM_CHECK_CUDA(cudaMalloc(&m.send_ws, m.lay.peer_table));
    FM_CHECK_CUDA(cudaMemset(m.send_ws, 0, m.lay.peer_table));
    // Every "peer" of the kernels is the send buffer; connect leaves this table alone.
    const std::vector<void*> bases(m.g.R, m.send_ws);
    FM_CHECK_CUDA(cudaMemcpy(m.ws + m.lay.peer_table, bases.data(), m.g.R * sizeof(void*),
                             cudaMemcpyHostToDevice));
  }
  FM_CHECK_CUDA(cudaDeviceSynchronize());
}

DeviceEpRank::~DeviceEpRank() {
  if (!impl_) return;
  cudaSetDevice(impl_->device);
  for (void* p : impl_->opened) cudaIpcCloseMemHandle(p);
  cudaFree(impl_->ws);
  cudaFree(impl_->send_ws);
  cudaFree(impl_->ll_trace);
  cudaFree(impl_->trace);
}

int DeviceEpRank::rank() const {
  return impl_->rank;
}
int DeviceEpRank::device() const {
  return impl_->device;
}
const EpConfig& DeviceEpRank::config() const {
  return impl_->cfg;
}
void* DeviceEpRank::workspace() const {
  if (impl_->fwd) return impl_->fwd->workspace();
  return impl_->ws;
}

cudaIpcMemHandle_t DeviceEpRank::ipc_handle() const {
  if (impl_->fwd) return impl_->fwd->ipc_handle();
  DeviceGuard guard(impl_->device);
  cudaIpcMemHandle_t h;
  FM_CHECK_CUDA(cudaIpcGetMemHandle(&h, impl_->ws));
  return h;
}

void DeviceEpRank::connect(const std::vector<void*>& bases) {
  if (impl_->fwd) return impl_->fwd->connect(bases);
  Impl& m = *impl_;
  FM_CHECK_ARG(static_cast<int>(bases.size()) == m.g.R, bases.size(), " bases for ", m.g.R,
               " ranks");
  // NOTE: one node over NCCL writes no peer; its table points at the send buffer (constructor),
  // so that a process-per-GPU caller may connect every wire alike.
  if (m.opt.wire == Wire::kNccl) return;
  DeviceGuard guard(m.device);
  FM_CHECK_CUDA(cudaMemcpy(m.ws + m.lay.peer_table, bases.data(), m.g.R * sizeof(void*),
                           cudaMemcpyHostToDevice));
}

void DeviceEpRank::connect_ipc(const std::vector<cudaIpcMemHandle_t>& handles) {
  if (impl_->fwd) return impl_->fwd->connect_ipc(handles);
  Impl& m = *impl_;
  FM_CHECK_ARG(static_cast<int>(handles.size()) == m.g.R, handles.size(), " handles for ", m.g.R,
               " ranks");
  if (m.opt.wire == Wire::kNccl) return;  // no peer is written (see connect)
  DeviceGuard guard(m.device);
  std::vector<void*> bases(m.g.R);
  for (int r = 0; r < m.g.R; ++r) {
    if (r == m.rank) {
      bases[r] = m.ws;
      continue;
    }
    FM_CHECK_CUDA(cudaIpcOpenMemHandle(&bases[r], handles[r], cudaIpcMemLazyEnablePeerAccess));
    m.opened.push_back(bases[r]);
  }
  connect(bases);
}

void DeviceEpRank::dispatch_send(const DeviceBatch& b, cudaStream_t stream) {
  if (impl_->fwd) return impl_->fwd->dispatch_send(b, stream);
  Impl& m = *impl_;
  FM_CHECK_ARG(b.tokens >= 0 && b.tokens <= m.g.Tmax, "rank ", m.rank, ": ", b.tokens,
               " tokens exceed max_tokens_per_rank=", m.g.Tmax);
  DeviceGuard guard(m.device);
  if (m.ll) {
    m.last_tokens = b.tokens;
    ll::Params p = m.ll_params();
    p.x = b.x;
    p.idx = b.topk_idx;
    p.w = b.topk_weight;
    ll::dispatch_send(p, stream);
    return;
  }
  Args a = m.args();
  a.T = b.tokens;
  a.x = b.x;
  a.idx = b.topk_idx;
  a.w = b.topk_weight;
  m.last_tokens = b.tokens;
  if (m.opt.plan_once) {
    const int64_t tiles = (b.tokens + kTile - 1) / kTile;
    const int grid = static_cast<int>(std::max<int64_t>(1, (tiles + kWarps - 1) / kWarps));
    launch(k_dispatch_plan, grid, plan_kernel_smem(m.g), stream, false, a);
  }
  // plan_once: a programmatic dependent of the plan kernel (it waits for the plan in-kernel).
  launch(dispatch_send_kernel(m.opt, m.direct), m.opt.num_blocks, m.ps.total, stream,
         m.opt.plan_once, a);
  if (a.nccl) {
    const size_t T = m.g.Tmax, K = m.g.K;
    m.exchange({{m.lay.stage, T * m.g.P},
                {m.lay.src_token, T * 4},
                {m.lay.topk_local, T * K * 4},
                {m.lay.topk_pos, T * K * 4},
                {m.lay.weight, T * K * 4},
                {m.lay.recv_count, 4},
                {m.lay.notify, static_cast<size_t>(m.g.NS) * 4}},
               stream);
  }
}

void DeviceEpRank::dispatch_recv(cudaStream_t stream) {
  if (impl_->fwd) return impl_->fwd->dispatch_recv(stream);
  Impl& m = *impl_;
  DeviceGuard guard(m.device);
  if (m.ll) return ll::dispatch_recv(m.ll_params(), stream, m.opt.overlap_recv);
  Args a = m.args();
  a.expand = m.opt.expand_payload;
  launch(k_dispatch_recv, m.recv_blocks, recv_smem_bytes(m.g), stream,
         m.opt.overlap_recv && !a.nccl, a);
}

void DeviceEpRank::combine_send(const uint16_t* y, cudaStream_t stream) {
  if (impl_->fwd) return impl_->fwd->combine_send(y, true, stream);
  Impl& m = *impl_;
  DeviceGuard guard(m.device);
  m.last_y = y;
  m.last_weighted = true;
  if (m.ll) return ll::combine_send(m.ll_params(), stream);
  Args a = m.args();
  a.y = y;
  a.weighted = true;
  a.peer_items = m.opt.combine_peer_items;
  a.peer_blocks = m.opt.combine_peer_blocks;
  a.send_blocks = m.combine_grid();
  launch(combine_send_kernel(m.opt), a.send_blocks, combine_send_smem(m.opt), stream, false, a);
  if (a.nccl) m.exchange({{m.lay.comb_stage, m.g.Tmax * m.g.H * 2}}, stream);
}

void DeviceEpRank::combine_tokens_send(const uint16_t* rows, cudaStream_t stream) {
  if (impl_->fwd) return impl_->fwd->combine_send(rows, false, stream);
  Impl& m = *impl_;
  DeviceGuard guard(m.device);
  m.last_y = rows;
  m.last_weighted = false;
  if (m.ll) return ll::combine_send(m.ll_params(), stream);
  Args a = m.args();
  a.y = rows;
  a.weighted = false;
  a.peer_items = m.opt.combine_peer_items;
  a.peer_blocks = m.opt.combine_peer_blocks;
  a.send_blocks = m.combine_grid();
  launch(combine_send_kernel(m.opt), a.send_blocks, combine_send_smem(m.opt), stream, false, a);
  if (a.nccl) m.exchange({{m.lay.comb_stage, m.g.Tmax * m.g.H * 2}}, stream);
}

void DeviceEpRank::combine_recv(uint16_t* out, cudaStream_t stream) {
  if (impl_->fwd) return impl_->fwd->combine_recv(out, stream);
  Impl& m = *impl_;
  DeviceGuard guard(m.device);
  if (m.ll) {
    ll::Params p = m.ll_params();
    p.out = out;
    return ll::combine_recv(p, stream, m.opt.overlap_recv);
  }
  Args a = m.args();
  a.out = out;
  a.T = m.last_tokens;
  a.y = m.last_y;
  a.weighted = m.last_weighted;
  a.send_blocks = m.combine_grid();  // the combine send blocks this receive waits for
  // Tiles of about T / (2 x blocks) tokens (at most 32): two waves, and for a short batch one
  // token per block, its columns split over the block's warps.
  const int64_t per = (a.T + 2 * m.recv_blocks - 1) / std::max(1, 2 * m.recv_blocks);
  a.tile = static_cast<int>(std::clamp<int64_t>(per, 1, 32));
  launch(combine_recv_kernel(m.opt), m.recv_blocks, 0, stream, m.opt.overlap_recv && !a.nccl, a);
}

void DeviceEpRank::combine_backward_send(const uint16_t* grad_out, const uint16_t* y,
                                         cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_backward_supported();
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  FM_CHECK_ARG(aligned(grad_out) && aligned(y) && (grad_out || m.last_tokens == 0) && y, "rank ",
               m.rank, ": combine backward needs grad_out and y on 16-byte boundaries");
  DeviceGuard guard(m.device);
  m.last_bwd_y = y;
  bwd::Params p = m.bwd_params();
  p.grad_out = grad_out;
  bwd::send(p, stream);
}

void DeviceEpRank::combine_backward_recv(uint16_t* grad_y, float* grad_w, cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_backward_supported();
  FM_CHECK_ARG(m.last_bwd_y, "rank ", m.rank,
               ": combine_backward_recv without a combine_backward_send before it");
  FM_CHECK_ARG(
      grad_y && reinterpret_cast<uintptr_t>(grad_y) % 16 == 0 && (grad_w || m.last_tokens == 0),
      "rank ", m.rank, ": combine backward needs grad_y on a 16-byte boundary and grad_w");
  DeviceGuard guard(m.device);
  bwd::Params p = m.bwd_params();
  p.y = m.last_bwd_y;
  p.grad_y = grad_y;
  p.grad_w = grad_w;
  bwd::recv(p, stream);
}

DeviceRecvView DeviceEpRank::view() const {
  if (impl_->fwd) return impl_->fwd->view();
  const Impl& m = *impl_;
  DeviceRecvView v;
  v.recv_count = reinterpret_cast<const int32_t*>(m.ws + m.lay.recv_count);
  v.expert_counts = reinterpret_cast<const int32_t*>(m.ws + m.lay.expert_counts);
  v.expert_offsets = reinterpret_cast<const int32_t*>(m.ws + m.lay.expert_offsets);
  v.m_indices = reinterpret_cast<const int32_t*>(m.ws + m.lay.m_indices);
  v.row_src = reinterpret_cast<const int32_t*>(m.ws + m.lay.row_src);
  v.row_weight = reinterpret_cast<const float*>(m.ws + m.lay.row_weight);
  v.x = m.ws + m.lay.gx;
  v.x_scales = m.g.fp8 ? reinterpret_cast<const float*>(m.ws + m.lay.gscales) : nullptr;
  v.status = reinterpret_cast<const int64_t*>(m.ws + m.lay.status);
  return v;
}

void DeviceEpRank::check() const {
  if (impl_->fwd) return impl_->fwd->check();
  const Impl& m = *impl_;
  DeviceGuard guard(m.device);
  DevErr e;
  FM_CHECK_CUDA(cudaMemcpy(&e, m.err_dev, sizeof(e), cudaMemcpyDeviceToHost));
  if (e.code == kErrTimeout) {
    const bool chunked = e.counter == kDispatchChunk || e.counter == kCombineChunk;
    FM_THROW(ErrorKind::kRuntime, "rank ", e.rank, ": peer ", e.peer, " did not answer within ",
             m.cfg.timeout_s, " s: waited on ", counter_name(e.counter), "[rank=", e.rank,
             "][src=", e.peer, "]",
             chunked ? "[chunk=" + std::to_string(e.detail) + "]" : std::string(),
             ", expected >= ", e.expected, ", seen ", e.seen);
  }
  if (e.code == kErrBadExpert)
    FM_THROW(ErrorKind::kInvalidArgument, "rank ", e.rank, " token ", e.detail, ": expert id ",
             static_cast<long long>(e.seen), " out of range [-1, ", m.cfg.num_experts, ")");

  if (m.ll_trace) ll::print_trace(m.ll_trace, m.rank);
  if (m.trace && !m.ll) {
    unsigned long long t[kTrSlots];
    FM_CHECK_CUDA(cudaMemcpy(t, m.trace, sizeof(t), cudaMemcpyDeviceToHost));
    auto us = [&](int slot) { return (static_cast<double>(t[slot]) - t[kTrPlanStart]) * 1e-3; };
    std::fprintf(stderr,
                 "# ep_trace rank %d (us from plan start): plan_end %.1f send_start %.1f "
                 "send_counts %.1f send_end %.1f recv_start %.1f recv_layout %.1f "
                 "recv_last_flag %.1f recv_end %.1f\n",
                 m.rank, us(kTrPlanEnd), us(kTrSendStart),
                 t[kTrSendCounts] ? us(kTrSendCounts) : 0.0, us(kTrSendEnd), us(kTrRecvStart),
                 us(kTrRecvLayout), us(kTrRecvLastFlag), us(kTrRecvEnd));
  }
  int64_t status[kStatusSlots];
  FM_CHECK_CUDA(cudaMemcpy(status, m.ws + m.lay.status, sizeof(status), cudaMemcpyDeviceToHost));
  if (status[kOverflow])
    FM_THROW(ErrorKind::kRuntime, "rank ", m.rank, ": dispatch overflowed its row bound: ",
             m.cfg.masked_capacity > 0 ? "largest expert count " : "rows needed ",
             status[kRowsNeeded], ", bound ",
             m.cfg.masked_capacity > 0 ? m.cfg.masked_capacity : m.g.bound);
}

DispatchResult DeviceEpRank::download() const {
  if (impl_->fwd) return impl_->fwd->download();
  const Impl& m = *impl_;
  const Geometry& g = m.g;
  DeviceGuard guard(m.device);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  auto get = [&](auto& vec, size_t off, size_t count) {
    vec.resize(count);
    FM_CHECK_CUDA(
        cudaMemcpy(vec.data(), m.ws + off, count * sizeof(vec[0]), cudaMemcpyDeviceToHost));
  };
  DispatchResult r;
  const size_t slots = static_cast<size_t>(g.R) * g.Tmax;
  std::vector<int64_t> status;
  get(status, m.lay.status, kStatusSlots);
  get(r.recv.count, m.lay.recv_count, g.R);
  get(r.recv.src_token, m.lay.src_token, slots);
  get(r.recv.topk_local, m.lay.topk_local, slots * g.K);
  get(r.recv.topk_weight, m.lay.weight, slots * g.K);
  std::vector<uint8_t> stage;
  get(stage, m.lay.stage, slots * g.P);
  if (g.fp8) {
    r.recv.x_fp8.resize(slots * g.H);
    r.recv.x_scales.resize(slots * g.SC);
    for (size_t s = 0; s < slots; ++s) {
      std::memcpy(&r.recv.x_fp8[s * g.H], &stage[s * g.P], g.H);
      std::memcpy(&r.recv.x_scales[s * g.SC], &stage[s * g.P + g.H], g.SC * 4);
    }
  } else {
    r.recv.x_bf16.resize(slots * g.H);
    std::memcpy(r.recv.x_bf16.data(), stage.data(), slots * g.H * 2);
  }
  GroupedRecv& gr = r.grouped;
  gr.overflow = status[kOverflow] != 0;
  gr.rows_needed = status[kRowsNeeded];
  gr.num_rows = gr.overflow ? 0 : gr.rows_needed;
  get(gr.expert_counts, m.lay.expert_counts, g.L);
  get(gr.expert_offsets, m.lay.expert_offsets, g.L + 1);
  get(gr.m_indices, m.lay.m_indices, g.bound);
  get(gr.row_src, m.lay.row_src, g.bound);
  get(gr.token_rows, m.lay.token_rows, slots * g.K);
  if (g.fp8) {
    get(gr.x_fp8, m.lay.gx, g.bound * g.H);
    get(gr.x_scales, m.lay.gscales, g.bound * g.SC);
  } else {
    get(gr.x_bf16, m.lay.gx, g.bound * g.H);
  }
  r.handle.tokens = m.last_tokens;
  get(r.handle.slot, m.lay.slot, m.last_tokens * g.R);
  if (m.direct && m.opt.dispatch_pull && gr.overflow) {
    // dispatch_pull: the records of peers stay in their workspaces (their region of mine).
    std::vector<char*> bases(g.R);
    FM_CHECK_CUDA(cudaMemcpy(bases.data(), m.ws + m.lay.peer_table, g.R * sizeof(char*),
                             cudaMemcpyDeviceToHost));
    for (int s = 0; s < g.R; ++s) {
      if (s == m.rank) continue;
      FM_CHECK_CUDA(cudaMemcpy(stage.data() + static_cast<size_t>(s) * g.Tmax * g.P,
                               bases[s] + m.lay.stage + static_cast<size_t>(m.rank) * g.Tmax * g.P,
                               static_cast<size_t>(g.Tmax) * g.P, cudaMemcpyDefault));
    }
    if (g.fp8) {
      for (size_t s = 0; s < slots; ++s) {
        std::memcpy(&r.recv.x_fp8[s * g.H], &stage[s * g.P], g.H);
        std::memcpy(&r.recv.x_scales[s * g.SC], &stage[s * g.P + g.H], g.SC * 4);
      }
    } else {
      std::memcpy(r.recv.x_bf16.data(), stage.data(), slots * g.H * 2);
    }
  }
  if (m.direct && !gr.overflow) {
    // dispatch_direct_rows: the regions hold no payload; each record's is its lowest-k row.
    for (int s = 0; s < g.R; ++s)
      for (int64_t j = 0; j < r.recv.count[s]; ++j) {
        const size_t slot = static_cast<size_t>(s) * g.Tmax + j;
        int row = -1;
        for (int k = 0; k < g.K && row < 0; ++k) row = gr.token_rows[slot * g.K + k];
        if (row < 0) continue;
        if (g.fp8) {
          std::memcpy(&r.recv.x_fp8[slot * g.H], &gr.x_fp8[row * g.H], g.H);
          std::memcpy(&r.recv.x_scales[slot * g.SC], &gr.x_scales[row * g.SC], g.SC * 4);
        } else {
          std::memcpy(&r.recv.x_bf16[slot * g.H], &gr.x_bf16[row * g.H], g.H * 2);
        }
      }
  }
  return r;
}

DeviceEpGroup::DeviceEpGroup(const EpConfig& cfg, const std::vector<int>& devices,
                             DeviceEpOptions opt) {
  FM_CHECK_ARG(static_cast<int>(devices.size()) == cfg.num_ranks, devices.size(), " devices for ",
               cfg.num_ranks, " ranks");
  if (opt.wire == Wire::kNccl && cfg.nodes() == 1) {
#if defined(FP8MOE_HAVE_NCCL)
    std::vector<ncclComm_t> comms(cfg.num_ranks);
    FM_CHECK_NCCL(ncclCommInitAll(comms.data(), cfg.num_ranks, devices.data()));
    for (int r = 0; r < cfg.num_ranks; ++r) {
      comms_.push_back(comms[r]);
      DeviceEpOptions o = opt;
      o.nccl_comm = comms[r];
      ranks_.push_back(std::make_unique<DeviceEpRank>(cfg, r, devices[r], o));
    }
    return;
#else
    FM_THROW(ErrorKind::kInvalidArgument, "this build has no NCCL back end");
#endif
  }
  if (opt.ranks_per_device == 0)
    for (int d : devices)
      opt.ranks_per_device = std::max(
          opt.ranks_per_device, static_cast<int>(std::count(devices.begin(), devices.end(), d)));
  for (size_t a = 0; a < devices.size(); ++a)
    for (size_t b = 0; b < devices.size(); ++b) {
      if (devices[a] == devices[b]) continue;
      int ok = 0;
      FM_CHECK_CUDA(cudaDeviceCanAccessPeer(&ok, devices[a], devices[b]));
      FM_CHECK_ARG(ok, "device ", devices[a], " cannot access device ", devices[b],
                   " (no peer path for the NVLink back end)");
      DeviceGuard guard(devices[a]);
      const cudaError_t st = cudaDeviceEnablePeerAccess(devices[b], 0);
      if (st == cudaErrorPeerAccessAlreadyEnabled)
        cudaGetLastError();
      else
        FM_CHECK_CUDA(st);
    }
  // Two-stage route over the NCCL wire: one communicator per local index for the network hop;
  // the hop inside a node is peer-mapped like the NVLink wire.
  if (opt.wire == Wire::kNccl) comms_ = detail::forward_network_comms(cfg, devices);
  std::vector<void*> bases;
  for (int r = 0; r < cfg.num_ranks; ++r) {
    DeviceEpOptions o = opt;
    if (!comms_.empty()) o.nccl_comm = comms_[r];
    ranks_.push_back(std::make_unique<DeviceEpRank>(cfg, r, devices[r], o));
    bases.push_back(ranks_.back()->workspace());
  }
  for (auto& r : ranks_) r->connect(bases);
}

DeviceEpGroup::~DeviceEpGroup() {
  ranks_.clear();
#if defined(FP8MOE_HAVE_NCCL)
  for (void* c : comms_) ncclCommDestroy(static_cast<ncclComm_t>(c));
#endif
}

const char* wire_name(Wire w) {
  return w == Wire::kNccl ? "nccl" : "nvlink";
}

#if defined(FP8MOE_HAVE_NCCL)
bool nccl_available() {
  return true;
}
void nccl_group_start() {
  FM_CHECK_NCCL(ncclGroupStart());
}
void nccl_group_end() {
  FM_CHECK_NCCL(ncclGroupEnd());
}
#else
bool nccl_available() {
  return false;
}
void nccl_group_start() {}
void nccl_group_end() {}
#endif

void DeviceEpGroup::check() const {
  for (const auto& r : ranks_) r->check();
}

}  // namespace fp8moe::comm
