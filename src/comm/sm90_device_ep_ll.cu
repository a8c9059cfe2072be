// Low-latency expert-parallel dispatch/combine over peer-mapped NVLink buffers: the masked layout
// (EpConfig::masked_capacity > 0) for decoding batches, in one pass per direction and side.
// Algorithm. Dispatch send: each warp first loads what needs no plan (its tile's expert ids, the
// x of its first token step, its ids and weights), each block turns the previous round's rows
// back into padding, then every block plans the (short) batch in shared memory (per 32-token
// tile: destination ballots, per-expert counts and each slot's rank inside the tile; prefixes over
// the tiles); each warp then quantises its token (or column range of one; FP8, 1x128) and pushes
// its record straight into its slot of the source region at every destination rank, with the
// record's local expert ids and per-expert ranks; block 0 adds the per-expert counts. Each block
// then adds to one arrival counter per destination (release): a round is complete when the
// blocks' adds sum to 2^32, whatever the grid. Dispatch receive (a programmatic dependent, beside
// the send): one acquire wait per source, then the masked rows are known in place (expert base +
// per-source prefix + rank) and each record is copied into its rows, its loads issued together;
// every block acknowledges to every source the same way (relaxed: only reads are covered).
// Combine send: the weighted partial of each received token (fixed order) goes back to its
// source's staging row, the rank's own too; combine receive sums a token's partials in rank
// order. No step waits on the host; the only cross-rank waits are one arrival per direction and
// the previous round's acknowledgement.
// Defaults since session 5 (Params early_notify, token_flags, spread, own_recv): block 0 releases
// the counts on a counter of their own and the receive derives the layout while the payload is
// in flight; instead of the per-block arrival each warp releases a flag per record and 1024-column
// step after its stores and the receive copies each step once its flag is in (the receive, not
// the send, turns stale rows back into padding); the combine send deals items across blocks and
// skips the rank's own records, whose partials the combine receive computes before it waits.
// Eight more variants measured no faster and were removed (docs/comm/README.md, "Low-latency
// kernels" and "Session 5: low latency"; the code: commit da8048a). Session 9 (ep11): own_narrow
// (the own partials with half the loads in flight, no spill), off by default; its J, M and E
// measured no faster (the README's "Session 9: low latency (ep11)"; runs/ep-s9-ll-JMEH.patch).
// Session 14 (ep23): ll_dispatch_rotate (k_dispatch_send<true>: the order of a token's
// destinations rotated by rank, the rank itself last), the default since ep24's second call.
// Session 15 late (ll1): ll_defer_dispatch_ack (k_dispatch_recv<true> ends without its remote
// acknowledgement, the rank's next dispatch send gives it: k_dispatch_send<*, true>), off.
// Session 16 (ll2): ll_defer_acks (Params::acks; the dispatch and / or combine receive end without
// their remote acknowledgement, the rank's next send kernel, dispatch or combine, gives them:
// give_acks in k_dispatch_send<*, false, kAcks> and k_combine_send<kAcks>), off.
// Reference: dispatch_reference / combine_reference (src/comm/ep_reference.cpp), bit for bit.
// Test: test_comm_gpu --gtest_filter='*LowLatency*' (tests/comm/device_ep_gpu_test.cu).
#include <algorithm>
#include <cfloat>
#include <cstdio>
#include <type_traits>

#include "ep_ptx.cuh"
#include "ep_row_math.cuh"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/dtypes.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "sm90_device_ep_ll.h"

namespace fp8moe::comm::ll {

const char* counter_name(int counter) {
  switch (counter) {
    case kDispatchData:
      return "ll_dispatch.data";
    case kDispatchAck:
      return "ll_dispatch.ack";
    case kCombineData:
      return "ll_combine.data";
    case kCombineAck:
      return "ll_combine.ack";
    case kDispatchNotify:
      return "ll_dispatch.notify";
    case kDispatchToken:
      return "ll_dispatch.token";
    case kDispatchIds:
      return "ll_dispatch.ids";
    default:
      return nullptr;
  }
}

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;
constexpr int kMaxTopK = 8;
constexpr int kMaxRanks = 32;
constexpr unsigned kFull = 0xFFFFFFFFu;
using detail::add_bf16x8;
using detail::add_weighted_bf16x8;
using detail::allow_dependent_launch;
using detail::globaltimer;
using detail::lanemask_lt;
using detail::ld_acquire_sys;
using detail::pack_bf16;
using detail::quantize16;
using detail::record_error;
// A round of a counter: the adds of one grid sum to this, whatever its size.
constexpr unsigned long long kRound = 1ull << 32;

// Counter groups of the region: [group][R] u64, then the kernels' done counts, then the rows
// each expert used in the previous dispatch, then the per-slot weight copy (slot_weight).
// kNotifyD: one round per dispatch, added by the source's block 0 after its counts (early_notify).
enum Group : int { kDataD = 0, kAckD = 1, kDataC = 2, kAckC = 3, kNotifyD = 4 };
constexpr int kGroups = 5;
enum Done : int {
  kDoneDispatchSend = 0,
  kDoneDispatchRecv = 1,
  kDoneCombineSend = 2,
  kDoneCombineRecv = 3
};

// Shared memory of the send plan: per-expert and per-destination tile counts (u16, then
// exclusive prefixes), destination ballots, per-warp lane masks, in-tile ranks of every slot.
struct PlanSmem {
  size_t ecnt, dcnt, dball, emask, tpos, etot, dtot, total;
};
__host__ __device__ inline size_t align16(size_t v) {
  return (v + 15) / 16 * 16;
}
__host__ __device__ inline PlanSmem plan_smem(int E, int R, int K, int64_t Tmax) {
  const size_t nt = static_cast<size_t>((Tmax + kTile - 1) / kTile);
  PlanSmem s{};
  size_t at = 0;
  s.ecnt = at;
  at = align16(at + E * nt * 2);
  s.dcnt = at;
  at = align16(at + R * nt * 2);
  s.dball = at;
  at = align16(at + R * nt * 4);
  s.emask = at;  // zeroed with the counts: [ecnt, tpos) is cleared at the start
  at = align16(at + static_cast<size_t>(kWarps) * E * 4);
  s.tpos = at;
  at = align16(at + static_cast<size_t>(Tmax) * K * 2);
  s.etot = at;
  at = align16(at + E * 4);
  s.dtot = at;
  at = align16(at + R * 4);
  s.total = at;
  return s;
}
size_t recv_smem(const Params& p) {
  return (static_cast<size_t>(p.R) * p.L + p.L + p.R + 1) * 4;
}

__device__ __forceinline__ void red_release_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
// NOTE: acknowledgements only say "my reads of your buffer are done"; a load whose value was
// used (stored elsewhere) before the block's barrier has completed, so no release (which would
// wait for this block's local writes) is needed.
__device__ __forceinline__ void red_relaxed_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("red.relaxed.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

template <typename T>
__device__ __forceinline__ T* at(char* base, size_t off) {
  return reinterpret_cast<T*>(base + off);
}
__device__ __forceinline__ char* peer(const Params& p, int r) {
  return reinterpret_cast<char* const*>(p.my + p.f.peer_table)[r];
}
// Counter `idx` of group g in the workspace at `base`.
__device__ __forceinline__ unsigned long long* ctr(char* base, const Params& p, int g, int idx) {
  return at<unsigned long long>(base, p.f.ll) + g * p.R + idx;
}
__device__ __forceinline__ unsigned long long* done(const Params& p, int which) {
  return at<unsigned long long>(p.my, p.f.ll) + kGroups * p.R + which;
}
__device__ __forceinline__ int* prev_rows(const Params& p) {
  return reinterpret_cast<int*>(at<unsigned long long>(p.my, p.f.ll) + kGroups * p.R + 4);
}
// [R * Tmax][K] gate weight of each received (slot, k) with a row here (else 0): a local copy
// (the record's own field may be overwritten by the source's next dispatch during combine), read
// by combine beside token_rows instead of after it (row_weight[row] is a dependent load).
__device__ __forceinline__ float* slot_weight(const Params& p) {
  return reinterpret_cast<float*>(prev_rows(p) + p.L);
}
// token_flags: [2][L] rows each expert used in the rounds of each parity (the receive resets the
// previous round's rows that this one does not rewrite), then [R][Tmax][steps] u32 flags: the
// round whose 1024-column step of the record (source, slot) is in.
__host__ __device__ inline size_t flag_offset(int R, int L, int64_t Tmax, int K) {
  return (kGroups * static_cast<size_t>(R) + 4) * 8 + static_cast<size_t>(L) * 4 +
         static_cast<size_t>(R) * Tmax * K * 4 + 2 * static_cast<size_t>(L) * 4;
}
// defer_ack: [1] u64 after the flags, the receive rounds of this rank acknowledged so far (by its
// dispatch sends); host-side layout only, so the other kernels' code does not change with it.
__host__ __device__ inline size_t acked_offset(int R, int L, int64_t Tmax, int K, int64_t H) {
  const size_t end =
      flag_offset(R, L, Tmax, K) + static_cast<size_t>(R) * Tmax * ((H + 1023) / 1024) * 4;
  return (end + 7) / 8 * 8;
}
// ll_defer_acks (Params::acks & kAcksCombine): the next u64, the combine receive rounds of this
// rank acknowledged so far (by its send kernels); host-side layout only as well.
__host__ __device__ inline size_t combine_acked_offset(int R, int L, int64_t Tmax, int K,
                                                       int64_t H) {
  return acked_offset(R, L, Tmax, K, H) + 8;
}
// recv_plan (session 17, ll3): after the combine count, [R] u64 per-source counters ((round <<
// 32) | T, st.release by the source's send), then [R][Tmax][K] i32 expert ids (checked, -1 for
// none) and [R][Tmax][K] f32 gate weights, each source's whole batch; host-side layout only.
__host__ __device__ inline size_t rp_offset(int R, int L, int64_t Tmax, int K, int64_t H) {
  return combine_acked_offset(R, L, Tmax, K, H) + 8;
}
__host__ __device__ inline size_t rp_bytes(int R, int64_t Tmax, int K) {
  return static_cast<size_t>(R) * 8 + 2 * static_cast<size_t>(R) * Tmax * K * 4;
}
__device__ __forceinline__ unsigned long long* rp_ctr(char* base, const Params& p) {
  return reinterpret_cast<unsigned long long*>(base + p.f.ll +
                                               rp_offset(p.R, p.L, p.Tmax, p.K, p.H));
}
__device__ __forceinline__ int32_t* rp_ids(char* base, const Params& p) {
  return reinterpret_cast<int32_t*>(rp_ctr(base, p) + p.R);
}
__device__ __forceinline__ float* rp_wts(char* base, const Params& p) {
  return reinterpret_cast<float*>(rp_ids(base, p) + static_cast<int64_t>(p.R) * p.Tmax * p.K);
}
// recv_plan ids block (session 17 late, ll5; ll4's words): after V's area, [2][R][Tmax][2] u64
// words (round parity, source, token): word w holds the local expert indices (u8, 0xFF none) of
// the token's ids 4w .. 4w + 3 in its low half and the round (u32) in its high half. Host-side
// layout only.
__host__ __device__ inline size_t rpe_offset(int R, int L, int64_t Tmax, int K, int64_t H) {
  return rp_offset(R, L, Tmax, K, H) + rp_bytes(R, Tmax, K);
}
__host__ __device__ inline size_t rpe_bytes(int R, int64_t Tmax) {
  return 2 * static_cast<size_t>(R) * Tmax * 16;
}
// The two words of token t of source s in the buffer of round n.
__device__ __forceinline__ unsigned long long* rpe_words(char* base, const Params& p,
                                                         unsigned long long n, int s, int64_t t) {
  return reinterpret_cast<unsigned long long*>(base + p.f.ll +
                                               rpe_offset(p.R, p.L, p.Tmax, p.K, p.H)) +
         ((static_cast<int64_t>(n & 1) * p.R + s) * p.Tmax + t) * 2;
}
__device__ __forceinline__ void st_relaxed_sys_u64(unsigned long long* a, unsigned long long v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(a), "l"(v) : "memory");
}
__device__ __forceinline__ unsigned long long ld_relaxed_sys_u64(const unsigned long long* a) {
  unsigned long long v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(a) : "memory");
  return v;
}
__device__ __forceinline__ int* prev_rows2(const Params& p) {
  return reinterpret_cast<int*>(slot_weight(p) + static_cast<int64_t>(p.R) * p.Tmax * p.K);
}
__device__ __forceinline__ unsigned* dflag(char* base, const Params& p) {
  return reinterpret_cast<unsigned*>(base + p.f.ll + flag_offset(p.R, p.L, p.Tmax, p.K));
}
__device__ __forceinline__ int64_t col_steps(const Params& p) {
  return (p.H + 1023) / 1024;
}
__device__ __forceinline__ unsigned ld_acquire_sys_u32(const unsigned* f) {
  unsigned v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(f) : "memory");
  return v;
}
__device__ __forceinline__ void st_release_sys_u32(unsigned* f, unsigned v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(f), "r"(v) : "memory");
}

// defer_ack (one warp of the dispatch send, before the grid allows its receive to start): the
// receive rounds of this rank that have ended (this kernel is not a programmatic dependent, so
// every earlier receive has completed, its loads of the peers' records included) and that no
// dispatch send has acknowledged yet are acknowledged to every source at once. Relaxed, as the
// receive's own acknowledgement was: only reads of completed kernels are covered.
__device__ __forceinline__ void ack_deferred(const Params& p) {
  const int lane = threadIdx.x & 31;
  unsigned long long pending = 0;
  if (lane == 0) {
    const unsigned long long rounds =
        *reinterpret_cast<volatile unsigned long long*>(done(p, kDoneDispatchRecv)) /
        static_cast<unsigned>(p.recv_blocks);
    auto* acked = reinterpret_cast<volatile unsigned long long*>(
        p.my + p.f.ll + acked_offset(p.R, p.L, p.Tmax, p.K, p.H));
    pending = rounds - *acked;
    if (pending != 0) *acked = rounds;
  }
  pending = __shfl_sync(kFull, pending, 0);
  if (pending != 0 && lane < p.R)
    red_relaxed_sys(ctr(peer(p, lane), p, kAckD, p.rank), pending * kRound);
}

// ll_defer_acks (one warp of a send kernel, dispatch or combine, before it waits for anything):
// kAcks & kAcksDispatch, the dispatch receive rounds of this rank that have ended and that no send
// has acknowledged yet; kAcksCombine, the same for the combine receive. A send kernel is never a
// programmatic dependent, so every earlier receive of the rank has completed (its loads of the
// peers' records or partials included); this launch's own receive cannot have counted itself done
// (it waits for this grid's data, released after this warp's block is through). Relaxed, as the
// receives' own adds were. The four counts are loaded together with the peers' addresses.
template <int kAcks>
__device__ __forceinline__ void give_acks(const Params& p) {
  const int lane = threadIdx.x & 31;
  char* const to = lane < p.R ? peer(p, lane) : nullptr;
  auto* acked = reinterpret_cast<volatile unsigned long long*>(
      p.my + p.f.ll + acked_offset(p.R, p.L, p.Tmax, p.K, p.H));
  unsigned long long pd = 0, pc = 0;
  if (lane == 0) {
    unsigned long long dd = 0, ad = 0, dc = 0, ac = 0;
    if constexpr ((kAcks & kAcksDispatch) != 0) {
      dd = *reinterpret_cast<volatile unsigned long long*>(done(p, kDoneDispatchRecv));
      ad = acked[0];
    }
    if constexpr ((kAcks & kAcksCombine) != 0) {
      dc = *reinterpret_cast<volatile unsigned long long*>(done(p, kDoneCombineRecv));
      ac = acked[1];
    }
    const unsigned blocks = static_cast<unsigned>(p.recv_blocks);
    if constexpr ((kAcks & kAcksDispatch) != 0) {
      pd = dd / blocks - ad;
      if (pd != 0) acked[0] = dd / blocks;
    }
    if constexpr ((kAcks & kAcksCombine) != 0) {
      pc = dc / blocks - ac;
      if (pc != 0) acked[1] = dc / blocks;
    }
  }
  pd = __shfl_sync(kFull, pd, 0);
  pc = __shfl_sync(kFull, pc, 0);
  if (lane < p.R) {
    if (pd != 0) red_relaxed_sys(ctr(to, p, kAckD, p.rank), pd * kRound);
    if (pc != 0) red_relaxed_sys(ctr(to, p, kAckC, p.rank), pc * kRound);
  }
}
// The warp that gives them: the last warp of the last block (the last to get a work item in
// either numbering, global_warp or spread_warp: no item at the V3 decoding shape), or with
// kAcksFirstBlock warp 0 of block 0 (ll1's place).
__device__ __forceinline__ bool acking_warp(const Params& p) {
  return (p.acks & kAcksFirstBlock) != 0
             ? blockIdx.x == 0 && threadIdx.x < 32
             : blockIdx.x == gridDim.x - 1 && (threadIdx.x >> 5) == kWarps - 1;
}

// Diagnostics: block 0's stamp (first-block proxy) and the latest block's stamp of a phase.
__device__ __forceinline__ void stamp_first(const Params& p, int slot) {
  if (p.trace && blockIdx.x == 0 && threadIdx.x == 0) p.trace[slot] = globaltimer();
}
__device__ __forceinline__ void stamp_last(const Params& p, int slot) {
  if (p.trace && threadIdx.x == 0) atomicMax(p.trace + slot, globaltimer());
}

// This launch's round: a kernel's blocks each count themselves done at their very end, and the
// previous launch of the same kernel has ended (stream order), so every block of this one sees
// between (n - 1) * grid and n * grid - 1 of them. Read by thread 0 into *n.
__device__ __forceinline__ void read_round(const Params& p, int which, unsigned long long* n) {
  if (threadIdx.x == 0)
    *n = *reinterpret_cast<volatile unsigned long long*>(done(p, which)) / gridDim.x + 1;
}
__device__ __forceinline__ void count_done(const Params& p, int which) {
  if (threadIdx.x == 0) atomicAdd(done(p, which), 1ull);
}
// This block's share of a round: block 0 adds 2^32 - (grid - 1), every other block 1.
__device__ __forceinline__ unsigned long long round_share() {
  return blockIdx.x == 0 ? kRound - (gridDim.x - 1) : 1ull;
}

// Bounded acquire-poll until counter c holds n whole rounds; false (error recorded, in rounds)
// on timeout or when this rank already timed out.
__device__ bool wait_rounds(const unsigned long long* c, unsigned long long n, const Params& p,
                            int peer_rank, int counter) {
  const unsigned long long want = n * kRound;
  unsigned long long v = ld_acquire_sys(c);
  if (v >= want) return true;
  const unsigned long long t0 = globaltimer();
  const long long c0 = clock64();
  // NOTE: the SM clock bounds the wait too, so a global timer that stops cannot hang it.
  const long long max_cycles = static_cast<long long>(p.timeout_ns) * 3;
  for (;;) {
    v = ld_acquire_sys(c);
    if (v >= want) return true;
    if (*reinterpret_cast<volatile int*>(&p.err->code) == kErrTimeout) return false;
    if (globaltimer() - t0 > p.timeout_ns || clock64() - c0 > max_cycles) {
      record_error(p.err, kErrTimeout, p.rank, peer_rank, counter, n, v / kRound, -1);
      return false;
    }
    __nanosleep(32);
  }
}

// token_flags: bounded acquire-poll (one lane) until flag f holds round n or later; false (error
// recorded) on timeout or when this rank already timed out.
__device__ bool wait_flag(const unsigned* f, unsigned n, const Params& p, int peer_rank) {
  unsigned v = ld_acquire_sys_u32(f);
  if (v >= n) return true;
  const unsigned long long t0 = globaltimer();
  const long long c0 = clock64();
  const long long max_cycles = static_cast<long long>(p.timeout_ns) * 3;
  for (;;) {
    v = ld_acquire_sys_u32(f);
    if (v >= n) return true;
    if (*reinterpret_cast<volatile int*>(&p.err->code) == kErrTimeout) return false;
    if (globaltimer() - t0 > p.timeout_ns || clock64() - c0 > max_cycles) {
      record_error(p.err, kErrTimeout, p.rank, peer_rank, kDispatchToken, n, v, -1);
      return false;
    }
    __nanosleep(32);
  }
}

// recv_plan ids block: bounded relaxed poll (one lane) until word w carries round n (its high half,
// u32) or later; the word in *v; false (error recorded under ll_dispatch.ids) on timeout or when
// this rank already timed out. The word's data and its round are one 8-byte store: no fence.
__device__ bool wait_word(const unsigned long long* w, unsigned long long n, const Params& p,
                          int peer_rank, unsigned long long* v) {
  const unsigned want = static_cast<unsigned>(n);
  *v = ld_relaxed_sys_u64(w);
  if (static_cast<unsigned>(*v >> 32) >= want) return true;
  const unsigned long long t0 = globaltimer();
  const long long c0 = clock64();
  const long long max_cycles = static_cast<long long>(p.timeout_ns) * 3;
  for (;;) {
    *v = ld_relaxed_sys_u64(w);
    if (static_cast<unsigned>(*v >> 32) >= want) return true;
    if (*reinterpret_cast<volatile int*>(&p.err->code) == kErrTimeout) return false;
    if (globaltimer() - t0 > p.timeout_ns || clock64() - c0 > max_cycles) {
      record_error(p.err, kErrTimeout, p.rank, peer_rank, kDispatchIds, n, *v >> 32, -1);
      return false;
    }
    __nanosleep(32);
  }
}

// Expert id e of token t checked: -1 for none or out of range (reported once, by block 0's plan).
__device__ __forceinline__ int checked_expert(const Params& p, int64_t t, int e, bool report) {
  if (e < -1 || e >= p.E) {
    if (report) record_error(p.err, kErrBadExpert, p.rank, -1, -1, 0, e, t);
    e = -1;
  }
  return e;
}
__device__ __forceinline__ int expert_of(const Params& p, int64_t t, int k, bool report) {
  return checked_expert(p, t, __ldg(p.idx + t * p.K + k), report);
}

// Work items: `n` rows in `parts` ranges of whole steps (a short batch keeps every warp busy).
struct Split {
  int64_t items, parts, steps;
  __device__ __forceinline__ int64_t row(int64_t item) const { return item / parts; }
  __device__ __forceinline__ int64_t first(int64_t item) const {
    return item % parts * steps / parts;
  }
  __device__ __forceinline__ int64_t last(int64_t item) const {
    return (item % parts + 1) * steps / parts;
  }
};
__device__ __forceinline__ Split split(int64_t n, int64_t steps) {
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  int64_t parts = n > 0 ? warps / n : 1;
  parts = parts < 1 ? 1 : (parts > steps ? steps : parts);
  return {n * parts, parts, steps};
}
// The same over the first `blocks` blocks of the grid (recv_plan ids block: the last block stores
// no payload).
__device__ __forceinline__ Split split_blocks(int64_t n, int64_t steps, int blocks) {
  const int64_t warps = static_cast<int64_t>(blocks) * kWarps;
  int64_t parts = n > 0 ? warps / n : 1;
  parts = parts < 1 ? 1 : (parts > steps ? steps : parts);
  return {n * parts, parts, steps};
}
__device__ __forceinline__ int64_t global_warp() {
  return static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
}
// The same warps numbered across blocks first (spread): consecutive items land in different
// blocks, so every block holds items of every part of the item range.
__device__ __forceinline__ int64_t spread_warp() {
  return static_cast<int64_t>(threadIdx.x >> 5) * gridDim.x + blockIdx.x;
}

// ---- dispatch send 1: the plan of the batch in shared memory ----
struct Plan {
  uint16_t* ecnt;   // [E][NT] tokens of tile with expert e, then the prefix over tiles
  uint16_t* dcnt;   // [R][NT] tokens of tile going to d, then the prefix
  uint32_t* dball;  // [R][NT] lanes of each tile going to d
  uint32_t* emask;  // [kWarps][E] lane masks (zero between uses)
  uint16_t* tpos;   // [Tmax][K] rank of (t, k) among the tile's lanes with the same expert
  int* etot;        // [E]
  int* dtot;        // [R]
  int NT;           // tile stride (tiles of Tmax)
};

// Expert ids of the tile's tokens (lane = token), -1 past T.
// NOTE: each check's error path (record_error: an atomic and a system fence) sits between one
// id's load and the next, so a lane's K loads are likely K round trips; issuing them together
// and checking after (ll_batch_ids, session 3) measured no faster, so it was removed.
__device__ __forceinline__ void load_tile_ids(const Params& p, int tile, int* ev) {
  const int64_t t = static_cast<int64_t>(tile) * kTile + (threadIdx.x & 31);
  const bool report = blockIdx.x == 0;
#pragma unroll
  for (int k = 0; k < kMaxTopK; ++k) ev[k] = (t < p.T && k < p.K) ? expert_of(p, t, k, report) : -1;
}

// ev0: the ids of tile `warp`, loaded before the shared memory was cleared.
__device__ void plan_batch(const Params& p, const Plan& pl, const int* ev0) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int ntiles = static_cast<int>((p.T + kTile - 1) / kTile);
  uint32_t* em = pl.emask + warp * p.E;
  for (int tile = warp; tile < ntiles; tile += kWarps) {
    const int64_t t = static_cast<int64_t>(tile) * kTile + lane;
    int ev[kMaxTopK];
    if (tile == warp) {
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k) ev[k] = ev0[k];
    } else {
      load_tile_ids(p, tile, ev);
    }
    uint32_t m = 0;
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k)
      if (ev[k] >= 0) m |= 1u << (ev[k] / p.L);
    for (int d = 0; d < p.R; ++d) {
      const uint32_t b = __ballot_sync(kFull, (m >> d) & 1u);
      if (lane == 0) {
        pl.dball[d * pl.NT + tile] = b;
        pl.dcnt[d * pl.NT + tile] = static_cast<uint16_t>(__popc(b));
      }
    }
    // NOTE: the ids of a token are distinct, so one lane holds an expert at most once.
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k)
      if (ev[k] >= 0) atomicOr(em + ev[k], 1u << lane);
    __syncwarp();
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k) {
      if (ev[k] < 0) continue;
      const uint32_t mm = em[ev[k]];
      pl.tpos[t * p.K + k] = static_cast<uint16_t>(__popc(mm & lanemask_lt()));
      if (lane == __ffs(mm) - 1) pl.ecnt[ev[k] * pl.NT + tile] = static_cast<uint16_t>(__popc(mm));
    }
    __syncwarp();
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k)
      if (ev[k] >= 0) em[ev[k]] = 0;
    __syncwarp();
  }
  __syncthreads();
  stamp_last(p, 23);
  // Exclusive prefixes over the tiles, one thread per column (experts, then destinations).
  for (int c = threadIdx.x; c < p.E + p.R; c += blockDim.x) {
    uint16_t* col = c < p.E ? pl.ecnt + c * pl.NT : pl.dcnt + (c - p.E) * pl.NT;
    int run = 0;
    for (int tile = 0; tile < ntiles; ++tile) {
      const int v = col[tile];
      col[tile] = static_cast<uint16_t>(run);
      run += v;
    }
    (c < p.E ? pl.etot[c] : pl.dtot[c - p.E]) = run;
  }
  __syncthreads();
}

// ll_dispatch_rotate (k_dispatch_send<true>): the order in which a warp visits its token's
// destinations. The default visits them by ascending rank, so every warp of every rank stores its
// first bytes to the lowest rank it reaches (at 4 ranks three senders on rank 0's links while the
// others' are idle, then on rank 1's, ...). Rotated: the peers from rank + 1 + off on, cyclically,
// the rank itself (local memory) last; off = 0 makes every step of the order a permutation of the
// ranks (the all-to-all schedule), off = the item's index over the peers (dest_order 2) spreads
// each moment's stores of a rank over all its peers whether or not the warps keep in step.
// Session 14: LL dispatch at 4 ranks 32.0 -> 29.5 us (4 x H200) and 32.9 -> 30.3 (4 x H100), 2
// ranks unchanged.
struct DestOrder {
  int rank, R, off;
  // The i-th destination, i < R.
  __device__ __forceinline__ int at(int i) const {
    if (i == R - 1) return rank;
    int j = i + off;
    if (j >= R - 1) j -= R - 1;
    const int d = rank + 1 + j;
    return d >= R ? d - R : d;
  }
  // mask (bit d: destination d) with bit i set for the i-th destination.
  __device__ __forceinline__ unsigned places(unsigned mask) const {
    unsigned r = 0;
    for (int i = 0; i < R; ++i) r |= ((mask >> at(i)) & 1u) << i;
    return r;
  }
};
// The default order: ascending ranks.
struct Ascending {
  __device__ __forceinline__ int at(int i) const { return i; }
  __device__ __forceinline__ unsigned places(unsigned mask) const { return mask; }
};
__device__ __forceinline__ DestOrder dest_order(const Params& p, int64_t item) {
  // NOTE: a batch has at most max(T, send warps) items (split), so the index fits an int.
  return {p.rank, p.R, p.dest_order == 2 && p.R > 2 ? static_cast<int>(item) % (p.R - 1) : 0};
}

// ---- dispatch send 2: token t's record metadata at every destination in `mask` (one warp) ----
// Lane k < K: the token's expert id and gate weight.
__device__ __forceinline__ void load_meta(const Params& p, int64_t t, int& e, float& wt) {
  const int lane = threadIdx.x & 31;
  e = -1;
  wt = 0.0f;
  if (lane < p.K) {
    e = expert_of(p, t, lane, false);
    wt = __ldg(p.w + t * p.K + lane);
  }
}
template <typename Order = Ascending>
__device__ __forceinline__ void push_metadata(const Params& p, const Plan& pl, int64_t t, int jl,
                                              unsigned mask, int e, float wt, Order order = {}) {
  const int lane = threadIdx.x & 31;
  const int tile = static_cast<int>(t / kTile);
  if (lane < p.R) at<int32_t>(p.my, p.f.slot)[t * p.R + lane] = jl;
  int pos = -1;
  if (lane < p.K && e >= 0) pos = pl.ecnt[e * pl.NT + tile] + pl.tpos[t * p.K + lane];
  for (unsigned m = order.places(mask); m; m &= m - 1) {
    const int d = order.at(__ffs(m) - 1);
    const int j = __shfl_sync(kFull, jl, d);
    char* base = peer(p, d);
    const int64_t s = static_cast<int64_t>(p.rank) * p.Tmax + j;
    if (lane == 0) at<int32_t>(base, p.f.src_token)[s] = static_cast<int32_t>(t);
    if (lane < p.K) {
      const bool here = e >= d * p.L && e < (d + 1) * p.L;
      at<int32_t>(base, p.f.topk_local)[s * p.K + lane] = here ? e - d * p.L : -1;
      at<int32_t>(base, p.f.topk_pos)[s * p.K + lane] = here ? pos : -1;
      at<float>(base, p.f.weight)[s * p.K + lane] = wt;
    }
  }
}

// ---- dispatch send 3: the payload of token t, one 1024-column step (one warp) ----
// BF16: four 256-column pieces; FP8: two 512-column chunks (16 values a lane, 8 lanes a scale).
__device__ __forceinline__ void load_step(const Params& p, int64_t t, int64_t step, uint4* v) {
  const int lane = threadIdx.x & 31;
  const uint16_t* xt = p.x + t * p.H;
  const int64_t c0 = step * 1024;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t c =
        p.fp8 ? c0 + (u / 2) * 512 + lane * 16 + (u % 2) * 8 : c0 + u * 256 + lane * 8;
    // FP8: whole 8-lane scale groups are in or out (H % 128 == 0).
    v[u] = c < p.H ? __ldg(reinterpret_cast<const uint4*>(xt + c)) : make_uint4(0, 0, 0, 0);
  }
}
template <typename Order = Ascending>
__device__ __forceinline__ void store_step(const Params& p, int64_t step, const uint4* v, int jl,
                                           unsigned mask, Order order = {}) {
  const int lane = threadIdx.x & 31;
  const int64_t region = static_cast<int64_t>(p.rank) * p.Tmax;
  const int64_t c0 = step * 1024;
  // Bit i of `places`: the i-th destination of `order`.
  const unsigned places = order.places(mask);
  if (!p.fp8) {
    for (unsigned m = places; m; m &= m - 1) {
      const int d = order.at(__ffs(m) - 1);
      char* rec = peer(p, d) + p.f.stage + (region + __shfl_sync(kFull, jl, d)) * p.P;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int64_t c = c0 + u * 256 + lane * 8;
        if (c < p.H) *reinterpret_cast<uint4*>(rec + c * 2) = v[u];
      }
    }
    return;
  }
  // Quantised once for all destinations.
  uint4 codes[2];
  float scale[2];
#pragma unroll
  for (int u = 0; u < 2; ++u) quantize16(v[2 * u], v[2 * u + 1], codes[u], scale[u]);
  for (unsigned m = places; m; m &= m - 1) {
    const int d = order.at(__ffs(m) - 1);
    char* rec = peer(p, d) + p.f.stage + (region + __shfl_sync(kFull, jl, d)) * p.P;
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int64_t c = c0 + u * 512 + lane * 16;
      if (c >= p.H) continue;
      *reinterpret_cast<uint4*>(rec + c) = codes[u];
      if ((lane & 7) == 0) *reinterpret_cast<float*>(rec + p.H + (c / 128) * 4) = scale[u];
    }
  }
}

// The rows the previous dispatch used become padding again (this rank's receive kernel writes
// this round's rows after it saw this grid's arrival, so after these writes).
__device__ __forceinline__ void reset_prev_rows(const Params& p) {
  const int* prev = prev_rows(p);
  int32_t* m_indices = at<int32_t>(p.my, p.f.m_indices);
  int32_t* row_src = at<int32_t>(p.my, p.f.row_src);
  for (int e = blockIdx.x; e < p.L; e += gridDim.x) {
    const int before = __ldcg(prev + e);
    for (int r = threadIdx.x; r < before; r += blockDim.x) {
      m_indices[e * p.cap + r] = -1;
      row_src[e * p.cap + r] = -1;
    }
  }
}

// Lanes d < R wait until destination d's receive blocks all finished round n - 1 (its region of
// this rank is free again); false for the whole block if any wait ended in an error (recorded;
// check() reports it).
__device__ __forceinline__ bool destinations_acked(const Params& p, unsigned long long n,
                                                   int* abort_flag) {
  if (threadIdx.x < p.R &&
      !wait_rounds(ctr(p.my, p, kAckD, threadIdx.x), n - 1, p, threadIdx.x, kDispatchAck))
    *abort_flag = 1;
  __syncthreads();
  return !*abort_flag;
}

// kDeferAck: ll_defer_dispatch_ack (ack_deferred by warp 0 of block 0); kAcks: ll_defer_acks
// (give_acks by acking_warp; kDeferAck is then false).
template <bool kRotate = false, bool kDeferAck = false, int kAcks = 0>
__global__ void __launch_bounds__(kThreads, 1) k_dispatch_send(Params p) {
  extern __shared__ uint4 smem_raw[];
  __shared__ unsigned long long s_n;
  __shared__ int s_abort;
  char* sm = reinterpret_cast<char*>(smem_raw);
  const PlanSmem ps = plan_smem(p.E, p.R, p.K, p.Tmax);
  Plan pl;
  pl.ecnt = reinterpret_cast<uint16_t*>(sm + ps.ecnt);
  pl.dcnt = reinterpret_cast<uint16_t*>(sm + ps.dcnt);
  pl.dball = reinterpret_cast<uint32_t*>(sm + ps.dball);
  pl.emask = reinterpret_cast<uint32_t*>(sm + ps.emask);
  pl.tpos = reinterpret_cast<uint16_t*>(sm + ps.tpos);
  pl.etot = reinterpret_cast<int*>(sm + ps.etot);
  pl.dtot = reinterpret_cast<int*>(sm + ps.dtot);
  pl.NT = static_cast<int>((p.Tmax + kTile - 1) / kTile);
  stamp_first(p, 0);
  stamp_last(p, 1);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // Everything the plan does not decide is loaded first, so that its latency overlaps the plan:
  // this launch's done count, the ids of the warp's tile, the x of the warp's first item.
  unsigned long long done_before = 0;
  if (threadIdx.x == 0)
    done_before = *reinterpret_cast<volatile unsigned long long*>(done(p, kDoneDispatchSend));
  int ev0[kMaxTopK];
  load_tile_ids(p, warp, ev0);
  const Split sp = split(p.T, (p.H + 1023) / 1024);
  const int64_t first_item = global_warp();
  uint4 xv[4];
  int first_e = -1;
  float first_wt = 0.0f;
  if (first_item < sp.items) {
    load_step(p, sp.row(first_item), sp.first(first_item), xv);
    if (sp.first(first_item) == 0) load_meta(p, sp.row(first_item), first_e, first_wt);
  }
  if constexpr (kDeferAck)
    if (blockIdx.x == 0 && warp == 0) ack_deferred(p);
  if constexpr (kAcks != 0)
    if (acking_warp(p)) give_acks<kAcks>(p);
  if (!p.token_flags) reset_prev_rows(p);
  if (threadIdx.x == 0) s_abort = 0;
  for (size_t i = threadIdx.x; i < ps.tpos / 4; i += blockDim.x)
    reinterpret_cast<uint32_t*>(sm)[i] = 0;
  __syncthreads();
  // The receive kernel may start now: it synchronises with this grid through counters only.
  allow_dependent_launch();
  stamp_last(p, 22);
  plan_batch(p, pl, ev0);
  stamp_last(p, 2);
  if (threadIdx.x == 0) s_n = done_before / gridDim.x + 1;  // see read_round
  __syncthreads();
  const unsigned long long n = s_n;
  // Destination d's region of mine is free once d's receive blocks all finished the last round.
  if (!destinations_acked(p, n, &s_abort)) return;
  stamp_last(p, 3);
  if (blockIdx.x == 0) {
    // Per destination: T, its local experts' counts, the tokens it gets from me.
    for (int i = threadIdx.x; i < p.R * (p.L + 1); i += blockDim.x) {
      const int d = i / (p.L + 1), q = i % (p.L + 1);
      at<int32_t>(peer(p, d), p.f.notify)[p.rank * p.NS + q] =
          q == 0 ? static_cast<int32_t>(p.T) : pl.etot[d * p.L + q - 1];
    }
    if (threadIdx.x < p.R)
      at<int32_t>(peer(p, threadIdx.x), p.f.recv_count)[p.rank] = pl.dtot[threadIdx.x];
    if (p.early_notify) {
      // NOTE: the last warp releases, so warp 0's first items are not held up by the fence.
      __syncthreads();
      if (warp == kWarps - 1 && lane < p.R)
        red_release_sys(ctr(peer(p, lane), p, kNotifyD, p.rank), kRound);
    }
  }
  for (int64_t item = first_item; item < sp.items;
       item += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t t = sp.row(item);
    const int tile = static_cast<int>(t / kTile), bit = static_cast<int>(t % kTile);
    // Lane d < R: the token's slot at destination d, -1 if it does not go there.
    int jl = -1;
    if (lane < p.R) {
      const uint32_t b = pl.dball[lane * pl.NT + tile];
      if ((b >> bit) & 1u) jl = pl.dcnt[lane * pl.NT + tile] + __popc(b & ((1u << bit) - 1u));
    }
    const unsigned mask = __ballot_sync(kFull, jl >= 0);
    if (sp.first(item) == 0) {
      int e = first_e;
      float wt = first_wt;
      if (item != first_item) load_meta(p, t, e, wt);
      if constexpr (kRotate)
        push_metadata(p, pl, t, jl, mask, e, wt, dest_order(p, item));
      else
        push_metadata(p, pl, t, jl, mask, e, wt);
    }
    for (int64_t step = sp.first(item); step < sp.last(item); ++step) {
      if (item != first_item || step != sp.first(item)) load_step(p, t, step, xv);
      if constexpr (kRotate)
        store_step(p, step, xv, jl, mask, dest_order(p, item));
      else
        store_step(p, step, xv, jl, mask);
    }
    if (p.token_flags) {
      // Lane d releases this item's steps at destination d (the warp's stores, the metadata
      // included, are ordered before by the warp barrier; the release is cumulative).
      __syncwarp();
      if (lane < p.R && ((mask >> lane) & 1u)) {
        unsigned* f =
            dflag(peer(p, lane), p) + (static_cast<int64_t>(p.rank) * p.Tmax + jl) * col_steps(p);
        for (int64_t step = sp.first(item); step < sp.last(item); ++step)
          st_release_sys_u32(f + step, static_cast<unsigned>(n));
      }
    }
  }
  // Arrival: this block's share of the round at every destination, after all its writes.
  __syncthreads();
  stamp_last(p, 4);
  count_done(p, kDoneDispatchSend);
  __syncthreads();
  if (threadIdx.x < p.R && !p.token_flags) {
    if (p.fence) __threadfence_system();
    red_release_sys(ctr(peer(p, threadIdx.x), p, kDataD, p.rank), round_share());
  }
  stamp_last(p, 5);
}

// acc = sum over k ascending of ws[k] * (the BF16 row piece v[k]), rows[k] < 0 skipped; products
// and sums unfused, from +0 (the reference's order).
__device__ __forceinline__ void weighted_sum(const uint4 (&v)[kMaxTopK],
                                             const int (&rows)[kMaxTopK],
                                             const float (&ws)[kMaxTopK], float (&acc)[8]) {
#pragma unroll
  for (int x = 0; x < 8; ++x) acc[x] = 0.0f;
#pragma unroll
  for (int k = 0; k < kMaxTopK; ++k) {
    if (rows[k] < 0) continue;
    add_weighted_bf16x8(acc, ws[k], v[k]);
  }
}

// 4 x 16 bytes of a record from byte c0 (a lane's part of a 2 KB step).
__device__ __forceinline__ void load_rec(const char* rec, int64_t c0, int64_t row_bytes,
                                         uint4 (&v)[4]) {
#pragma unroll
  for (int u = 0; u < 4; ++u)
    if (c0 + u * 512 < row_bytes) v[u] = __ldcg(reinterpret_cast<const uint4*>(rec + c0 + u * 512));
}

// Lane k < K of a warp: the masked row of record `slot`'s k-th expert (-1: none, or the expert
// overflowed), written into the layout (m_indices, row_src, row_weight, token_rows, the slot's
// weight copy) when `meta` (the item that holds the record's step 0). Record i of the compact
// order, from source s.
__device__ __forceinline__ int place_record(const Params& p, const int* base, bool ovf, int s,
                                            int64_t i, int64_t slot, bool meta, int32_t* m_indices,
                                            int32_t* row_src) {
  const int lane = threadIdx.x & 31;
  int e = -1, pos = 0;
  float wt = 0.0f;
  if (lane < p.K) {
    e = __ldcg(at<int32_t>(p.my, p.f.topk_local) + slot * p.K + lane);
    pos = __ldcg(at<int32_t>(p.my, p.f.topk_pos) + slot * p.K + lane);
    if (meta) wt = __ldcg(at<float>(p.my, p.f.weight) + slot * p.K + lane);
  }
  int row = -1;
  if (lane < p.K) {
    if (e >= 0 && !ovf) {
      row = static_cast<int>(e * p.cap) + base[s * p.L + e] + pos;
      if (meta) {
        m_indices[row] = e;
        row_src[row] = static_cast<int32_t>(i * p.K + lane);
        at<float>(p.my, p.f.row_weight)[row] = wt;
      }
    }
    if (meta) {
      at<int32_t>(p.my, p.f.token_rows)[slot * p.K + lane] = row;
      slot_weight(p)[slot * p.K + lane] = row >= 0 ? wt : 0.0f;
    }
  }
  return row;
}

// Per local expert e, the sources' row counts base[s * L + e] become exclusive prefixes in rank
// order (each source's first row of e); tot[e] the expert's rows, *largest their maximum.
__device__ __forceinline__ void sources_prefix_per_expert(const Params& p, int* base, int* tot,
                                                          int* largest) {
  for (int e = threadIdx.x; e < p.L; e += blockDim.x) {
    int run = 0;
    for (int s = 0; s < p.R; ++s) {
      const int c = base[s * p.L + e];
      base[s * p.L + e] = run;
      run += c;
    }
    tot[e] = run;
    atomicMax(largest, run);
  }
}

// The previous round's rows that round n does not rewrite become padding again (rows below
// tot[e] all get round n's entries: no two writers of a row). Rows per round are kept by
// parity, so no block reads what block 0 writes.
__device__ __forceinline__ void reset_stale_rows(const Params& p, const int* tot, bool ovf,
                                                 unsigned long long n, int32_t* m_indices,
                                                 int32_t* row_src) {
  const int* before = prev_rows2(p) + ((n - 1) & 1) * p.L;
  for (int e = blockIdx.x; e < p.L; e += gridDim.x) {
    const int to = __ldcg(before + e);
    for (int r = (ovf ? 0 : tot[e]) + threadIdx.x; r < to; r += blockDim.x) {
      m_indices[e * p.cap + r] = -1;
      row_src[e * p.cap + r] = -1;
    }
  }
  if (blockIdx.x == 0)
    for (int e = threadIdx.x; e < p.L; e += blockDim.x)
      prev_rows2(p)[(n & 1) * p.L + e] = ovf ? 0 : tot[e];
}

// Block 0 of a dispatch receive publishes the round's masked layout: every local expert's row
// count (tot) and offset, the sources' record offsets (roff) and the status words (rows needed,
// overflow when the largest expert passes the capacity, records received).
__device__ __forceinline__ void publish_layout(const Params& p, const int* tot, const int* roff,
                                               int largest, bool ovf) {
  int64_t* status = at<int64_t>(p.my, p.f.status);
  if (blockIdx.x == 0) {
    for (int e = threadIdx.x; e <= p.L; e += blockDim.x) {
      if (e < p.L) at<int32_t>(p.my, p.f.expert_counts)[e] = tot[e];
      at<int32_t>(p.my, p.f.expert_offsets)[e] = static_cast<int32_t>(e * p.cap);
    }
    if (threadIdx.x <= p.R) at<int32_t>(p.my, p.f.recv_offset)[threadIdx.x] = roff[threadIdx.x];
    if (threadIdx.x == 0) {
      status[p.st_rows_needed] = ovf ? largest : p.L * p.cap;
      status[p.st_overflow] = ovf;
      status[p.st_num_recv] = roff[p.R];
    }
  }
}

// The steps [first, last) of a received record into every row of its token (lane k < K holds
// the k-th expert's row in `row`, -1: none): FP8 1 KB and 8 scales a step, BF16 2 KB.
__device__ __forceinline__ void copy_record_steps(const Params& p, const char* rec, char* gx,
                                                  float* gs, int row, int64_t first, int64_t last) {
  const int lane = threadIdx.x & 31;
  const int64_t es = p.fp8 ? 1 : 2;
  const int64_t row_bytes = p.H * es;
  int rows[kMaxTopK];
#pragma unroll
  for (int k = 0; k < kMaxTopK; ++k) rows[k] = __shfl_sync(kFull, row, k < p.K ? k : 0);
  for (int64_t step = first; step < last; ++step) {
    const int64_t b0 = step * 1024 * es + lane * 16;
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (u < 2 * es && b0 + u * 512 < row_bytes)
        v[u] = __ldcg(reinterpret_cast<const uint4*>(rec + b0 + u * 512));
    const int64_t si = step * 8 + lane;  // lanes 0-7: the step's scales
    const bool sl = p.fp8 && lane < 8 && si < p.SC;
    const float sc = sl ? __ldcg(reinterpret_cast<const float*>(rec + p.H) + si) : 0.0f;
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k) {
      if (k >= p.K || rows[k] < 0) continue;
      char* dst = gx + static_cast<int64_t>(rows[k]) * row_bytes + b0;
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (u < 2 * es && b0 + u * 512 < row_bytes) *reinterpret_cast<uint4*>(dst + u * 512) = v[u];
      if (sl) gs[static_cast<int64_t>(rows[k]) * p.SC + si] = sc;
    }
  }
}

// ---- dispatch receive, token_flags: every record step copied as soon as its flag is in ----
// Items (record, range of 1024-column steps), the sender's steps: the item's lanes wait for the
// flags of step 0 (the metadata) and of its steps, then write the layout entries (step-0 items)
// and copy the steps into every row of the token (FP8: 1 KB and 8 scales a step; BF16: 2 KB).
__device__ void recv_flagged(const Params& p, const int* base, const int* roff, bool ovf,
                             unsigned n) {
  const int lane = threadIdx.x & 31;
  const int64_t S = col_steps(p);
  const bool copy = p.expand && !ovf;
  const Split sp = split(roff[p.R], S);
  int32_t* m_indices = at<int32_t>(p.my, p.f.m_indices);
  int32_t* row_src = at<int32_t>(p.my, p.f.row_src);
  char* gx = p.my + p.f.gx;
  float* gs = at<float>(p.my, p.f.gscales);
  const unsigned* flags = dflag(p.my, p);
  for (int64_t item = global_warp(); item < sp.items;
       item += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t i = sp.row(item);
    int s = 0;
    while (roff[s + 1] <= i) ++s;
    const int64_t slot = static_cast<int64_t>(s) * p.Tmax + (i - roff[s]);
    const char* rec = p.my + p.f.stage + slot * p.P;
    const unsigned* f = flags + slot * S;
    const int64_t first = sp.first(item), last = sp.last(item);
    // Lane 0: step 0 (the metadata); lane q > 0: step first + q - 1 (and every 32nd after).
    bool ok = true;
    for (int64_t q = lane; q <= last - first && ok; q += 32)
      ok = wait_flag(q == 0 ? f : f + first + q - 1, n, p, s);
    if (__any_sync(kFull, !ok)) return;  // recorded; check() reports it
    __syncwarp();
    const bool meta = first == 0;
    const int row = place_record(p, base, ovf, s, i, slot, meta, m_indices, row_src);
    if (!copy) continue;
    copy_record_steps(p, rec, gx, gs, row, first, last);
  }
}

// ---- dispatch receive: masked rows of every record as soon as all sources arrived ----
// kDeferAck (ll_defer_dispatch_ack): no acknowledgement at the end; the next dispatch send of
// this rank gives it (ack_deferred).
template <bool kDeferAck = false>
__global__ void __launch_bounds__(kThreads) k_dispatch_recv(Params p) {
  extern __shared__ int rsm[];
  __shared__ unsigned long long s_n;
  __shared__ int s_abort, s_largest;
  int* base = rsm;              // [R][L] first row of (source, expert) inside the expert's block
  int* tot = base + p.R * p.L;  // [L]
  int* roff = tot + p.L;        // [R + 1] compact index of each source region's first token
  stamp_first(p, 6);
  stamp_last(p, 7);
  read_round(p, kDoneDispatchRecv, &s_n);
  if (threadIdx.x == 0) {
    s_abort = 0;
    s_largest = 0;
  }
  __syncthreads();
  const unsigned long long n = s_n;
  // early_notify: the counts have a counter of their own, so the layout below is derived while
  // the payload is still in flight; otherwise they come with the data.
  const bool early = p.early_notify;
  if (threadIdx.x < p.R && !wait_rounds(ctr(p.my, p, early ? kNotifyD : kDataD, threadIdx.x), n, p,
                                        threadIdx.x, early ? kDispatchNotify : kDispatchData))
    s_abort = 1;
  __syncthreads();
  if (s_abort) return;  // the error is recorded; check() reports it
  stamp_last(p, early ? 26 : 8);
  // Layout: per expert, the sources' counts in rank order (rows ascend in compact index).
  const int32_t* notify = at<int32_t>(p.my, p.f.notify);
  for (int i = threadIdx.x; i < p.R * p.L; i += blockDim.x)
    base[i] = __ldcg(notify + (i / p.L) * p.NS + 1 + i % p.L);
  if (threadIdx.x == 0) {
    roff[0] = 0;
    for (int s = 0; s < p.R; ++s)
      roff[s + 1] = roff[s] + __ldcg(at<int32_t>(p.my, p.f.recv_count) + s);
  }
  __syncthreads();
  sources_prefix_per_expert(p, base, tot, &s_largest);
  __syncthreads();
  if (early && !p.token_flags) {
    if (threadIdx.x < p.R &&
        !wait_rounds(ctr(p.my, p, kDataD, threadIdx.x), n, p, threadIdx.x, kDispatchData))
      s_abort = 1;
    __syncthreads();
    if (s_abort) return;
    stamp_last(p, 8);
  }
  const bool ovf = s_largest > p.cap;
  publish_layout(p, tot, roff, s_largest, ovf);
  // The rows this round uses (the next dispatch_send turns them back into padding).
  if (blockIdx.x == 0 && !p.token_flags)
    for (int e = threadIdx.x; e < p.L; e += blockDim.x) prev_rows(p)[e] = ovf ? 0 : tot[e];
  int32_t* m_indices = at<int32_t>(p.my, p.f.m_indices);
  int32_t* row_src = at<int32_t>(p.my, p.f.row_src);
  if (p.token_flags) reset_stale_rows(p, tot, ovf, n, m_indices, row_src);
  stamp_last(p, 9);
  // Records: per (record, byte range) one warp writes the rows' layout entries and copies the
  // payload (4 x 16 bytes a lane per 2 KB step) into every row of the token. Every load of an
  // item (payload, scales, metadata) is issued before the first use, so the item waits once.
  const int lane = threadIdx.x & 31;
  const int64_t row_bytes = p.fp8 ? p.H : p.H * 2;
  const int64_t records = roff[p.R];
  const Split sp = split(records, (row_bytes + 2047) / 2048);
  const bool copy = p.expand && !ovf;
  char* gx = p.my + p.f.gx;
  float* gs = at<float>(p.my, p.f.gscales);
  if (p.token_flags)
    recv_flagged(p, base, roff, ovf, static_cast<unsigned>(n));
  else
    for (int64_t item = global_warp(); item < sp.items;
         item += static_cast<int64_t>(gridDim.x) * kWarps) {
      const int64_t i = sp.row(item);
      int s = 0;
      while (roff[s + 1] <= i) ++s;
      const int64_t slot = static_cast<int64_t>(s) * p.Tmax + (i - roff[s]);
      const char* rec = p.my + p.f.stage + slot * p.P;
      const bool meta = sp.first(item) == 0;  // the item that writes the layout entries and scales
      int64_t step = sp.first(item);
      uint4 v[4];
      if (copy) load_rec(rec, step * 2048 + lane * 16, row_bytes, v);
      float sc[2] = {0.0f, 0.0f};  // scales lane and lane + 32
      if (copy && meta && p.fp8)
#pragma unroll
        for (int q = 0; q < 2; ++q)
          if (lane + 32 * q < p.SC)
            sc[q] = __ldcg(reinterpret_cast<const float*>(rec + p.H) + lane + 32 * q);
      const int row = place_record(p, base, ovf, s, i, slot, meta, m_indices, row_src);
      if (!copy) continue;
      int rows[kMaxTopK];
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k) rows[k] = __shfl_sync(kFull, row, k < p.K ? k : 0);
      for (; step < sp.last(item); ++step) {
        const int64_t c0 = step * 2048 + lane * 16;
        if (step != sp.first(item)) load_rec(rec, c0, row_bytes, v);
#pragma unroll
        for (int k = 0; k < kMaxTopK; ++k) {
          if (k >= p.K || rows[k] < 0) continue;
          char* dst = gx + static_cast<int64_t>(rows[k]) * row_bytes + c0;
#pragma unroll
          for (int u = 0; u < 4; ++u)
            if (c0 + u * 512 < row_bytes) *reinterpret_cast<uint4*>(dst + u * 512) = v[u];
        }
      }
      if (meta && p.fp8) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          if (lane + 32 * q >= p.SC) continue;
#pragma unroll
          for (int k = 0; k < kMaxTopK; ++k)
            if (k < p.K && rows[k] >= 0) gs[rows[k] * p.SC + lane + 32 * q] = sc[q];
        }
        for (int64_t c = lane + 64; c < p.SC; c += 32) {
          const float x = __ldcg(reinterpret_cast<const float*>(rec + p.H) + c);
#pragma unroll
          for (int k = 0; k < kMaxTopK; ++k)
            if (k < p.K && rows[k] >= 0) gs[rows[k] * p.SC + c] = x;
        }
      }
    }
  // Acknowledge every source (its region of mine is free), then count this block done.
  __syncthreads();
  stamp_last(p, 10);
  if (!kDeferAck && threadIdx.x < p.R)
    red_relaxed_sys(ctr(peer(p, threadIdx.x), p, kAckD, p.rank), round_share());
  count_done(p, kDoneDispatchRecv);
  stamp_last(p, 11);
}

// ---- recv_plan (session 17, ll3): the dispatch planned by the receive ----
// recv_plan ids block (session 17 late, ll5): the last block of k_dispatch_send_rp<*, true>. Its
// threads take the (destination d, token slot t) pairs, t fastest (a warp's stores are 32
// consecutive slots of one destination): each reads this launch's round (see read_round: every
// block of this grid counts itself done at its end, this one included), loads token t's ids
// (checked: -1 for none or out of range, reported by the d = 0 pairs) and stores the slot's two
// words at d (d's local expert indices, the round in the high half; slots t >= T none), in the
// buffer of the round's parity: that buffer was last read by d's receive of round n - 2, which
// every payload block of this rank's send n - 1 (a completed kernel: sends are never
// programmatic dependents) saw acknowledged before it stored anything. One 8-byte store is its
// own flag (no release). The acknowledging warp (acking_warp: the last warp of the last block)
// gives the deferred acknowledgements first, as in the other sends.
template <int kAcks>
__device__ __forceinline__ void dispatch_ids_block(const Params& p) {
  if constexpr (kAcks != 0) {
    if (acking_warp(p)) give_acks<kAcks>(p);
  }
  // The receive may start once every block allowed it: this one holds nothing back.
  allow_dependent_launch();
  const int64_t pairs = static_cast<int64_t>(p.R) * p.Tmax;
  if (threadIdx.x < pairs) {
    const unsigned long long n =
        *reinterpret_cast<volatile unsigned long long*>(done(p, kDoneDispatchSend)) / gridDim.x + 1;
    const unsigned long long tag = (n & 0xFFFFFFFFull) << 32;
    for (int64_t i = threadIdx.x; i < pairs; i += blockDim.x) {
      const int d = static_cast<int>(i / p.Tmax);
      const int64_t t = i % p.Tmax;
      int ev[kMaxTopK];
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k)
        ev[k] = t < p.T && k < p.K ? __ldg(p.idx + t * p.K + k) : -1;
      unsigned long long w[2] = {tag, tag};
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k) {
        const int e = t < p.T && k < p.K ? checked_expert(p, t, ev[k], d == 0) : -1;
        const unsigned b = e >= 0 && e / p.L == d ? static_cast<unsigned>(e % p.L) : 0xFFu;
        w[k / 4] |= static_cast<unsigned long long>(b) << (8 * (k % 4));
      }
      unsigned long long* dst = rpe_words(peer(p, d), p, n, p.rank, t);
      st_relaxed_sys_u64(dst, w[0]);
      st_relaxed_sys_u64(dst + 1, w[1]);
    }
  }
  __syncthreads();
  stamp_last(p, 2);  // the ids issued
  count_done(p, kDoneDispatchSend);
}

// Send: no plan. Once every destination acknowledged the previous round, block 0 stores the
// rank's expert ids (checked: -1 for none or out of range, reported here) and gate weights at
// every destination (rp_ids / rp_wts, the rank's source area) and releases one word per
// destination, (round << 32) | T; meanwhile and after, every warp takes its items (token, range
// of 1024-column steps), finds the token's destinations from its own ids (lanes k < K),
// quantises and stores each step at slot t (the token index) of its region at each destination
// (store_step with the token index as slot) and releases that (slot, step) flag (the round).
// The send writes its own handle (slot[t][d] = t or -1); the combine receive reads partials at
// slot t accordingly.
// kIds (session 17 late, ll5; Params::kRecvPlanIdsBlock): the grid has one block more, the last,
// which stores no payload: its job is the ids (dispatch_ids_block, first thing: no barrier, no
// acknowledgement's wait, no gate), as round-tagged 8-byte words (ll4's), the other blocks' items
// are split over gridDim.x - 1 blocks and start as V's do; block 0 stores no ids, each token's
// first-step warp stores its K gate weights at each destination of the token before its step
// flags' release.
template <int kAcks = 0, bool kIds = false>
__global__ void __launch_bounds__(kThreads, 1) k_dispatch_send_rp(Params p) {
  __shared__ unsigned long long s_n;
  __shared__ int s_abort;
  stamp_first(p, 0);
  stamp_last(p, 1);
  if constexpr (kIds) {
    if (blockIdx.x == gridDim.x - 1) {
      dispatch_ids_block<kAcks>(p);
      return;
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned long long done_before = 0;
  if (threadIdx.x == 0)
    done_before = *reinterpret_cast<volatile unsigned long long*>(done(p, kDoneDispatchSend));
  const int64_t S = col_steps(p);
  const Split sp = kIds ? split_blocks(p.T, S, gridDim.x - 1) : split(p.T, S);
  const int64_t first_item = global_warp();
  uint4 xv[4];
  int first_e = -1;
  if (first_item < sp.items) {
    load_step(p, sp.row(first_item), sp.first(first_item), xv);
    if (lane < p.K) first_e = expert_of(p, sp.row(first_item), lane, false);
  }
  if constexpr (kAcks != 0) {
    if (acking_warp(p)) give_acks<kAcks>(p);
  } else {
    if (p.defer_ack && blockIdx.x == 0 && warp == 0) ack_deferred(p);
  }
  if (threadIdx.x == 0) {
    s_abort = 0;
    s_n = done_before / gridDim.x + 1;  // see read_round
  }
  __syncthreads();
  // The receive kernel may start now: it synchronises with this grid through counters only.
  allow_dependent_launch();
  stamp_last(p, 22);
  const unsigned long long n = s_n;
  // Destination d's region of mine (ids and payload) is free once d's receive blocks all finished
  // the last round.
  if (!destinations_acked(p, n, &s_abort)) return;
  stamp_last(p, 3);
  if (!kIds && blockIdx.x == 0) {
    const int64_t total = p.T * p.K;
    const int64_t area = static_cast<int64_t>(p.rank) * p.Tmax * p.K;
    for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
      const int e = checked_expert(p, i / p.K, __ldg(p.idx + i), true);
      const float wt = __ldg(p.w + i);
      for (int d = 0; d < p.R; ++d) {
        char* base = peer(p, d);
        rp_ids(base, p)[area + i] = e;
        rp_wts(base, p)[area + i] = wt;
      }
    }
    __syncthreads();
    if (threadIdx.x < p.R) {
      const unsigned long long v = (n << 32) | static_cast<unsigned long long>(p.T);
      asm volatile(
          "st.release.sys.global.u64 [%0], %1;" ::"l"(rp_ctr(peer(p, threadIdx.x), p) + p.rank),
          "l"(v)
          : "memory");
    }
    stamp_last(p, 2);
  }
  int32_t* handle = at<int32_t>(p.my, p.f.slot);
  for (int64_t item = first_item; item < sp.items;
       item += static_cast<int64_t>(kIds ? gridDim.x - 1 : gridDim.x) * kWarps) {
    const int64_t t = sp.row(item);
    int e = first_e;
    if (item != first_item) e = lane < p.K ? expert_of(p, t, lane, false) : -1;
    const unsigned mask = __reduce_or_sync(kFull, e >= 0 ? 1u << (e / p.L) : 0u);
    if (sp.first(item) == 0 && lane < p.R)
      handle[t * p.R + lane] = (mask >> lane) & 1u ? static_cast<int32_t>(t) : -1;
    if constexpr (kIds) {
      // The token's gate weights at each of its destinations, released with its first step.
      if (sp.first(item) == 0 && lane < p.K) {
        const float wt = __ldg(p.w + t * p.K + lane);
        const int64_t at_w = (static_cast<int64_t>(p.rank) * p.Tmax + t) * p.K + lane;
        for (int d = 0; d < p.R; ++d)
          if ((mask >> d) & 1u) rp_wts(peer(p, d), p)[at_w] = wt;
      }
    }
    for (int64_t step = sp.first(item); step < sp.last(item); ++step) {
      if (item != first_item || step != sp.first(item)) load_step(p, t, step, xv);
      if (p.dest_order != 0)
        store_step(p, step, xv, static_cast<int>(t), mask, dest_order(p, item));
      else
        store_step(p, step, xv, static_cast<int>(t), mask);
    }
    // Lane d releases this item's steps at destination d (the warp's stores are ordered before
    // by the warp barrier; the release is cumulative).
    __syncwarp();
    if (lane < p.R && ((mask >> lane) & 1u)) {
      unsigned* f = dflag(peer(p, lane), p) + (static_cast<int64_t>(p.rank) * p.Tmax + t) * S;
      for (int64_t step = sp.first(item); step < sp.last(item); ++step)
        st_release_sys_u32(f + step, static_cast<unsigned>(n));
    }
  }
  __syncthreads();
  stamp_last(p, 4);
  count_done(p, kDoneDispatchSend);
  stamp_last(p, 5);
}

// The receive plan's shared memory: per (source, local expert, 32-token tile) counts (u16, then
// exclusive prefixes over the source's tiles), per-warp lane masks of the experts, per (source,
// tile) the lanes whose token has a local expert and their count (then its prefix), each
// (source, token, k)'s rank among the tile's lanes with that expert, then the per-(source,
// expert) counts (then the expert's first row of the source), the experts' totals, the compact
// offsets of the sources' records, the sources' T and their prefix.
struct RecvPlanSmem {
  size_t ecnt, emask, rcnt, rball, tpos, base, tot, roff, ts, toff, total;
};
__host__ __device__ inline RecvPlanSmem recv_plan_smem(int R, int L, int K, int64_t Tmax) {
  const size_t nt = static_cast<size_t>((Tmax + kTile - 1) / kTile);
  RecvPlanSmem s{};
  size_t at = 0;
  s.ecnt = at;
  at = align16(at + static_cast<size_t>(R) * L * nt * 2);
  s.emask = at;  // [ecnt, rcnt) is cleared at the start
  at = align16(at + static_cast<size_t>(kWarps) * L * 4);
  s.rcnt = at;
  at = align16(at + static_cast<size_t>(R) * nt * 2);
  s.rball = at;
  at = align16(at + static_cast<size_t>(R) * nt * 4);
  s.tpos = at;
  at = align16(at + static_cast<size_t>(R) * Tmax * K * 2);
  s.base = at;
  at = align16(at + static_cast<size_t>(R) * L * 4);
  s.tot = at;
  at = align16(at + static_cast<size_t>(L) * 4);
  s.roff = at;
  at = align16(at + static_cast<size_t>(R + 1) * 4);
  s.ts = at;
  at = align16(at + static_cast<size_t>(R) * 4);
  s.toff = at;
  at = align16(at + static_cast<size_t>(R + 1) * 4);
  s.total = at;
  return s;
}

// Receive: per source, one thread waits for the ids word and reads T; every block plans the
// local experts of every source's tokens in shared memory (per 32-token tile: the ballot of the
// tokens with a local expert, per-expert lane masks and each (t, k)'s rank among them; prefixes
// over the tiles, then over the sources in rank order: rows of an expert ascend by (source,
// token), the reference's order) and block 0 writes the counts and the layout as the other
// receives do. Items are (source token, range of steps) over every source's T tokens; an item
// whose token has no local expert ends at once; the others wait for their steps' flags, write
// the layout entries (step-0 items: m_indices, row_src, row_weight, token_rows and the slot's
// weight at the token slot s * Tmax + t, and the record's src_token, topk_local, topk_pos and
// weight at its compact slot s * Tmax + j, which download() and the combine send read) and copy
// the steps from slot t into every row of the token.
// kWords (session 17 late, ll5, ll4's receive; k_dispatch_send_rp<*, true>): no ids counter;
// every source's T is taken as Tmax (the sender's slots t >= T carry no expert), and each lane of
// a tile job polls its token's two words of round n instead of loading the 32-bit ids: one
// 16-byte read a lane. The trace's slot 27 ("ids seen"): the last warp's words all in.
template <bool kDeferAck = false, bool kWords = false>
__global__ void __launch_bounds__(kThreads) k_dispatch_recv_rp(Params p) {
  extern __shared__ uint4 smem_raw[];
  __shared__ unsigned long long s_n;
  __shared__ int s_abort, s_largest;
  char* sm = reinterpret_cast<char*>(smem_raw);
  const RecvPlanSmem ps = recv_plan_smem(p.R, p.L, p.K, p.Tmax);
  uint16_t* ecnt = reinterpret_cast<uint16_t*>(sm + ps.ecnt);
  uint32_t* emask = reinterpret_cast<uint32_t*>(sm + ps.emask);
  uint16_t* rcnt = reinterpret_cast<uint16_t*>(sm + ps.rcnt);
  uint32_t* rball = reinterpret_cast<uint32_t*>(sm + ps.rball);
  uint16_t* tpos = reinterpret_cast<uint16_t*>(sm + ps.tpos);
  int* base = reinterpret_cast<int*>(sm + ps.base);
  int* tot = reinterpret_cast<int*>(sm + ps.tot);
  int* roff = reinterpret_cast<int*>(sm + ps.roff);
  int* ts = reinterpret_cast<int*>(sm + ps.ts);
  int* toff = reinterpret_cast<int*>(sm + ps.toff);
  const int NT = static_cast<int>((p.Tmax + kTile - 1) / kTile);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  stamp_first(p, 6);
  stamp_last(p, 7);
  read_round(p, kDoneDispatchRecv, &s_n);
  if (threadIdx.x == 0) {
    s_abort = 0;
    s_largest = 0;
  }
  for (size_t i = threadIdx.x; i < ps.rcnt / 4; i += blockDim.x)
    reinterpret_cast<uint32_t*>(sm)[i] = 0;
  __syncthreads();
  const unsigned long long n = s_n;
  if constexpr (kWords) {
    if (threadIdx.x < p.R) ts[threadIdx.x] = static_cast<int>(p.Tmax);
  } else {
    if (threadIdx.x < p.R) {
      unsigned long long* c = rp_ctr(p.my, p) + threadIdx.x;
      if (wait_rounds(c, n, p, threadIdx.x, kDispatchIds))
        ts[threadIdx.x] =
            static_cast<int>(*reinterpret_cast<volatile unsigned long long*>(c) & 0xFFFFFFFFull);
      else
        s_abort = 1;
    }
  }
  __syncthreads();
  if (s_abort) return;  // the error is recorded; check() reports it
  if constexpr (!kWords) stamp_last(p, 26);
  if (threadIdx.x == 0) {
    toff[0] = 0;
    for (int s = 0; s < p.R; ++s) toff[s + 1] = toff[s] + ts[s];
  }
  // Plan: (source, tile) jobs dealt to the warps.
  const int32_t* ids = rp_ids(p.my, p);
  const int lo = p.rank * p.L;
  uint32_t* em = emask + warp * p.L;
  {
    int s = 0, tile = warp;
    for (;;) {
      while (s < p.R && tile >= (ts[s] + kTile - 1) / kTile) {
        tile -= (ts[s] + kTile - 1) / kTile;
        ++s;
      }
      if (s >= p.R) break;
      const int64_t t = static_cast<int64_t>(tile) * kTile + lane;
      const int64_t slot = static_cast<int64_t>(s) * p.Tmax + t;
      int le[kMaxTopK];
      if constexpr (kWords) {
        unsigned long long w[2] = {~0ull, ~0ull};
        if (t < ts[s]) {
          const unsigned long long* a = rpe_words(p.my, p, n, s, t);
          if (!wait_word(a, n, p, s, &w[0]) || !wait_word(a + 1, n, p, s, &w[1])) {
            s_abort = 1;
            w[0] = w[1] = ~0ull;
          }
        }
#pragma unroll
        for (int k = 0; k < kMaxTopK; ++k) {
          const unsigned b = static_cast<unsigned>(w[k / 4] >> (8 * (k % 4))) & 0xFFu;
          le[k] = k < p.K && b != 0xFFu ? static_cast<int>(b) : -1;
        }
      } else {
#pragma unroll
        for (int k = 0; k < kMaxTopK; ++k) {
          const int e = t < ts[s] && k < p.K ? __ldcg(ids + slot * p.K + k) : -1;
          le[k] = e >= lo && e < lo + p.L ? e - lo : -1;
        }
      }
      bool here = false;
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k) here = here || le[k] >= 0;
      const uint32_t b = __ballot_sync(kFull, here);
      if constexpr (kWords) {
        if (p.trace && lane == 0) atomicMax(p.trace + 27, globaltimer());  // the words all in
      }
      if (lane == 0) {
        rball[s * NT + tile] = b;
        rcnt[s * NT + tile] = static_cast<uint16_t>(__popc(b));
      }
      // NOTE: the ids of a token are distinct, so one lane holds an expert at most once.
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k)
        if (le[k] >= 0) atomicOr(em + le[k], 1u << lane);
      __syncwarp();
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k) {
        if (le[k] < 0) continue;
        const uint32_t mm = em[le[k]];
        tpos[slot * p.K + k] = static_cast<uint16_t>(__popc(mm & lanemask_lt()));
        if (lane == __ffs(mm) - 1)
          ecnt[(s * p.L + le[k]) * NT + tile] = static_cast<uint16_t>(__popc(mm));
      }
      __syncwarp();
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k)
        if (le[k] >= 0) em[le[k]] = 0;
      __syncwarp();
      tile += kWarps;
    }
  }
  __syncthreads();
  if constexpr (kWords) {
    if (s_abort) return;  // the error is recorded; check() reports it
    stamp_last(p, 26);    // every source's ids seen and planned per tile
  }
  // Exclusive prefixes over each source's tiles: per (source, expert), then per source.
  for (int c = threadIdx.x; c < p.R * p.L + p.R; c += blockDim.x) {
    const int s = c < p.R * p.L ? c / p.L : c - p.R * p.L;
    uint16_t* col = c < p.R * p.L ? ecnt + c * NT : rcnt + s * NT;
    const int ntiles = (ts[s] + kTile - 1) / kTile;
    int run = 0;
    for (int tile = 0; tile < ntiles; ++tile) {
      const int v = col[tile];
      col[tile] = static_cast<uint16_t>(run);
      run += v;
    }
    if (c < p.R * p.L)
      base[c] = run;
    else
      roff[s + 1] = run;  // the source's records; made a prefix below
  }
  __syncthreads();
  sources_prefix_per_expert(p, base, tot, &s_largest);
  int32_t* recv_count = at<int32_t>(p.my, p.f.recv_count);
  if (threadIdx.x == 32) {
    roff[0] = 0;
    for (int s = 0; s < p.R; ++s) {
      if (blockIdx.x == 0) recv_count[s] = roff[s + 1];
      roff[s + 1] += roff[s];
    }
  }
  __syncthreads();
  stamp_last(p, 8);
  const bool ovf = s_largest > p.cap;
  publish_layout(p, tot, roff, s_largest, ovf);
  int32_t* m_indices = at<int32_t>(p.my, p.f.m_indices);
  int32_t* row_src = at<int32_t>(p.my, p.f.row_src);
  reset_stale_rows(p, tot, ovf, n, m_indices, row_src);
  stamp_last(p, 9);
  const bool copy = p.expand && !ovf;
  const int64_t S = col_steps(p);
  const Split sp = split(toff[p.R], S);
  char* gx = p.my + p.f.gx;
  float* gs = at<float>(p.my, p.f.gscales);
  const unsigned* flags = dflag(p.my, p);
  const float* wts = rp_wts(p.my, p);
  for (int64_t item = global_warp(); item < sp.items;
       item += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t i = sp.row(item);
    int s = 0;
    while (toff[s + 1] <= i) ++s;
    const int64_t t = i - toff[s];
    const int tile = static_cast<int>(t / kTile), bit = static_cast<int>(t % kTile);
    const uint32_t b = rball[s * NT + tile];
    if (((b >> bit) & 1u) == 0) continue;  // no local expert: not a record here
    const int64_t j = rcnt[s * NT + tile] + __popc(b & ((1u << bit) - 1u));
    const int64_t slot = static_cast<int64_t>(s) * p.Tmax + t;
    const char* rec = p.my + p.f.stage + slot * p.P;
    const unsigned* f = flags + slot * S;
    const int64_t first = sp.first(item), last = sp.last(item);
    bool ok = true;
    for (int64_t q = lane; q < last - first && ok; q += 32)
      ok = wait_flag(f + first + q, static_cast<unsigned>(n), p, s);
    if (__any_sync(kFull, !ok)) return;  // recorded; check() reports it
    __syncwarp();
    const bool meta = first == 0;
    int row = -1;
    if (lane < p.K) {
      int le;
      if constexpr (kWords) {
        // Seen with round n by this block's plan.
        const unsigned long long w = __ldcg(rpe_words(p.my, p, n, s, t) + lane / 4);
        const unsigned b = static_cast<unsigned>(w >> (8 * (lane % 4))) & 0xFFu;
        le = b != 0xFFu ? static_cast<int>(b) : -1;
      } else {
        const int e = __ldcg(ids + slot * p.K + lane);
        le = e >= lo && e < lo + p.L ? e - lo : -1;
      }
      const int pos = le >= 0 ? ecnt[(s * p.L + le) * NT + tile] + tpos[slot * p.K + lane] : -1;
      if (le >= 0 && !ovf) row = static_cast<int>(le * p.cap) + base[s * p.L + le] + pos;
      if (meta) {
        const float wt = __ldcg(wts + slot * p.K + lane);
        if (row >= 0) {
          m_indices[row] = le;
          row_src[row] = static_cast<int32_t>((roff[s] + j) * p.K + lane);
          at<float>(p.my, p.f.row_weight)[row] = wt;
        }
        at<int32_t>(p.my, p.f.token_rows)[slot * p.K + lane] = row;
        slot_weight(p)[slot * p.K + lane] = row >= 0 ? wt : 0.0f;
        const int64_t cs = (static_cast<int64_t>(s) * p.Tmax + j) * p.K + lane;
        at<int32_t>(p.my, p.f.topk_local)[cs] = le;
        at<int32_t>(p.my, p.f.topk_pos)[cs] = pos;
        at<float>(p.my, p.f.weight)[cs] = wt;
      }
    }
    if (meta && lane == 0)
      at<int32_t>(p.my, p.f.src_token)[static_cast<int64_t>(s) * p.Tmax + j] =
          static_cast<int32_t>(t);
    if (!copy) continue;
    copy_record_steps(p, rec, gx, gs, row, first, last);
  }
  // Acknowledge every source (its region of mine is free), then count this block done.
  __syncthreads();
  stamp_last(p, 10);
  if (!kDeferAck && threadIdx.x < p.R)
    red_relaxed_sys(ctr(peer(p, threadIdx.x), p, kAckD, p.rank), round_share());
  count_done(p, kDoneDispatchRecv);
  stamp_last(p, 11);
}

// ---- combine send: the weighted partial of every received token back to its source ----
// Two 256-column steps per lane and iteration, so 2K rows' loads are in flight.
// kAcks: ll_defer_acks (give_acks by acking_warp, first thing: where combines follow each other
// the peer's next combine send waits for it at its start). kTokSlot (recv_plan): record j of
// source s is token src_token[s * Tmax + j] of s, whose token_rows, slot weights and staging row
// at s sit at its token slot t (k_dispatch_recv_rp, k_dispatch_send_rp's handle).
template <int kAcks = 0, bool kTokSlot = false>
__global__ void __launch_bounds__(kThreads) k_combine_send(Params p) {
  __shared__ int roff[kMaxRanks + 1];
  // Where the partials of source s go: s's staging rows of this rank. NOTE: byte addresses, kept
  // here: computed in place in BF16 elements, nvcc split each 16-byte partial store into four
  // 4-byte stores and spilled registers (ptxas, CUDA 13.0).
  __shared__ char* s_dst[kMaxRanks];
  __shared__ unsigned long long s_n;
  __shared__ int s_abort;
  stamp_first(p, 12);
  stamp_last(p, 13);
  if constexpr (kAcks != 0)
    if (acking_warp(p)) give_acks<kAcks>(p);
  read_round(p, kDoneCombineSend, &s_n);
  if (threadIdx.x == 0) s_abort = 0;
  if (threadIdx.x <= p.R) roff[threadIdx.x] = at<int32_t>(p.my, p.f.recv_offset)[threadIdx.x];
  if (threadIdx.x < p.R)
    s_dst[threadIdx.x] =
        peer(p, threadIdx.x) + p.f.comb_stage + static_cast<int64_t>(p.rank) * p.Tmax * p.H * 2;
  __syncthreads();
  const unsigned long long n = s_n;
  allow_dependent_launch();
  const int lane = threadIdx.x & 31;
  const int32_t* token_rows = at<int32_t>(p.my, p.f.token_rows);
  const float* weights = slot_weight(p);
  // own_recv: my own records' partials are the receive's; the items skip them.
  const int64_t own = p.own_recv ? roff[p.rank + 1] - roff[p.rank] : 0;
  const Split sp = split(roff[p.R] - own, (p.H + 511) / 512);
  // Lane k: the row and gate weight of (slot of item, k); the first item's loaded while waiting.
  // kTokSlot: j becomes the record's token slot; jc keeps its compact index (the row of y of
  // combine_tokens).
  int64_t jc = 0;
  auto slot_of = [&](int64_t item, int64_t& j) {
    int64_t i = sp.row(item);
    if (i >= roff[p.rank]) i += own;
    int s = 0;
    while (roff[s + 1] <= i) ++s;
    j = i - roff[s];
    if constexpr (kTokSlot) {
      jc = j;
      j = at<int32_t>(p.my, p.f.src_token)[s * p.Tmax + j];
    }
    return s;
  };
  const int64_t first_item = p.spread ? spread_warp() : global_warp();
  int first_row = -1;
  float first_wt = 0.0f;
  if (p.weighted && first_item < sp.items && lane < p.K) {
    int64_t j;
    const int s = slot_of(first_item, j);
    first_row = token_rows[(s * p.Tmax + j) * p.K + lane];
    first_wt = weights[(s * p.Tmax + j) * p.K + lane];
  }
  // My staging region at source s is free once s's receive blocks finished the last round.
  if (threadIdx.x < p.R &&
      !wait_rounds(ctr(p.my, p, kAckC, threadIdx.x), n - 1, p, threadIdx.x, kCombineAck))
    s_abort = 1;
  __syncthreads();
  if (s_abort) return;
  stamp_last(p, 14);
  for (int64_t item = first_item; item < sp.items;
       item += static_cast<int64_t>(gridDim.x) * kWarps) {
    int64_t j;
    const int s = slot_of(item, j);
    const int64_t slot = static_cast<int64_t>(s) * p.Tmax + j;
    int row = first_row;
    float wt = first_wt;
    if (item != first_item && p.weighted && lane < p.K) {
      row = token_rows[slot * p.K + lane];
      wt = weights[slot * p.K + lane];
    }
    int rows[kMaxTopK];
    float ws[kMaxTopK];
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k) {
      rows[k] = __shfl_sync(kFull, row, k < p.K ? k : 0);
      ws[k] = __shfl_sync(kFull, wt, k < p.K ? k : 0);
      if (k >= p.K) rows[k] = -1;
    }
    const int64_t yslot = kTokSlot ? static_cast<int64_t>(s) * p.Tmax + jc : slot;
    uint16_t* dst = reinterpret_cast<uint16_t*>(s_dst[s] + j * p.H * 2);
    for (int64_t step = sp.first(item); step < sp.last(item); ++step) {
      const int64_t c0 = step * 512 + lane * 8;
      if (!p.weighted) {
        uint4 v[2];
#pragma unroll
        for (int u = 0; u < 2; ++u)
          if (c0 + u * 256 < p.H)
            v[u] = __ldg(reinterpret_cast<const uint4*>(p.y + yslot * p.H + c0 + u * 256));
#pragma unroll
        for (int u = 0; u < 2; ++u)
          if (c0 + u * 256 < p.H) *reinterpret_cast<uint4*>(dst + c0 + u * 256) = v[u];
        continue;
      }
      uint4 v[2][kMaxTopK];
#pragma unroll
      for (int u = 0; u < 2; ++u)
#pragma unroll
        for (int k = 0; k < kMaxTopK; ++k)
          if (rows[k] >= 0 && c0 + u * 256 < p.H)
            v[u][k] = __ldg(reinterpret_cast<const uint4*>(
                p.y + static_cast<int64_t>(rows[k]) * p.H + c0 + u * 256));
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        if (c0 + u * 256 >= p.H) continue;
        // partial_d = bf16(sum over k ascending of w_k * y_row), products and sums unfused.
        float acc[8];
        weighted_sum(v[u], rows, ws, acc);
        *reinterpret_cast<uint4*>(dst + c0 + u * 256) = pack_bf16(acc);
      }
    }
  }
  __syncthreads();
  stamp_last(p, 15);
  count_done(p, kDoneCombineSend);
  __syncthreads();
  if (threadIdx.x < p.R) {
    if (p.fence) __threadfence_system();
    red_release_sys(ctr(peer(p, threadIdx.x), p, kDataC, p.rank), round_share());
  }
  stamp_last(p, 16);
}

// ---- own_recv: this rank's partial of its own token (slot j of my region), in the receive ----
// Lane columns c0 + u * 256 (+8), u < 4, stored into my own staging row of the slot (local; the
// sum below reads it back like a peer's). Weighted: bf16(sum over its rows here in ascending k
// of w_k * y_row, unfused, from +0), the combine send's formula; combine_tokens: its row of y.
// kNarrow (ll_combine_own_narrow): one 256-column piece of the K rows in flight at a time instead
// of two (32 registers of loads instead of 64: k_combine_recv<true> spilled 80 bytes).
template <bool kNarrow = false>
__device__ __forceinline__ void own_partial(const Params& p, int64_t j, int64_t c0) {
  const int lane = threadIdx.x & 31;
  if (j < 0) return;  // not mine: never added
  const int64_t slot = static_cast<int64_t>(p.rank) * p.Tmax + j;
  uint16_t* dst = at<uint16_t>(p.my, p.f.comb_stage) + slot * p.H + c0;
  if (!p.weighted) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (c0 + u * 256 < p.H)
        v[u] = __ldg(reinterpret_cast<const uint4*>(p.y + slot * p.H + c0 + u * 256));
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (c0 + u * 256 < p.H) *reinterpret_cast<uint4*>(dst + u * 256) = v[u];
    return;
  }
  int row = -1;
  float wt = 0.0f;
  if (lane < p.K) {
    row = at<int32_t>(p.my, p.f.token_rows)[slot * p.K + lane];
    wt = slot_weight(p)[slot * p.K + lane];
  }
  int rows[kMaxTopK];
  float ws[kMaxTopK];
#pragma unroll
  for (int k = 0; k < kMaxTopK; ++k) {
    rows[k] = __shfl_sync(kFull, row, k < p.K ? k : 0);
    ws[k] = __shfl_sync(kFull, wt, k < p.K ? k : 0);
    if (k >= p.K) rows[k] = -1;
  }
  if constexpr (kNarrow) {
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      if (c0 + u * 256 >= p.H) continue;
      uint4 v[kMaxTopK];
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k)
        if (rows[k] >= 0)
          v[k] = __ldg(reinterpret_cast<const uint4*>(p.y + static_cast<int64_t>(rows[k]) * p.H +
                                                      c0 + u * 256));
      float acc[8];
      weighted_sum(v, rows, ws, acc);
      *reinterpret_cast<uint4*>(dst + u * 256) = pack_bf16(acc);
    }
  } else {
#pragma unroll
    for (int u2 = 0; u2 < 4; u2 += 2) {
      uint4 v[2][kMaxTopK];
#pragma unroll
      for (int u = 0; u < 2; ++u)
#pragma unroll
        for (int k = 0; k < kMaxTopK; ++k)
          if (rows[k] >= 0 && c0 + (u2 + u) * 256 < p.H)
            v[u][k] = __ldg(reinterpret_cast<const uint4*>(
                p.y + static_cast<int64_t>(rows[k]) * p.H + c0 + (u2 + u) * 256));
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        if (c0 + (u2 + u) * 256 >= p.H) continue;
        float acc[8];
        weighted_sum(v[u], rows, ws, acc);
        *reinterpret_cast<uint4*>(dst + (u2 + u) * 256) = pack_bf16(acc);
      }
    }
  }
}

// ---- combine receive: per token, the partials summed in rank order ----
// 1024 columns a step: four 256-column pieces of every rank's partial in flight per lane.
// kOwn: own_recv (my partials of the warp's items computed before the wait, into my own staging
// rows, which the sums then read like a peer's); kNarrow: own_partial<true> (own_narrow);
// kDeferAck: ll_defer_acks & kAcksCombine (no acknowledgement at the end: give_acks).
template <bool kOwn, bool kNarrow = false, bool kDeferAck = false>
__global__ void __launch_bounds__(kThreads) k_combine_recv(Params p) {
  constexpr int kSub = 4;
  __shared__ unsigned long long s_n;
  __shared__ int s_abort;
  stamp_first(p, 17);
  stamp_last(p, 18);
  read_round(p, kDoneCombineRecv, &s_n);
  const int lane = threadIdx.x & 31;
  const int32_t* slot = at<int32_t>(p.my, p.f.slot);
  const uint16_t* stage = at<uint16_t>(p.my, p.f.comb_stage);
  const Split sp = split(p.T, (p.H + 1023) / 1024);
  // The slots of the warp's first token are this rank's own (dispatch_send): loaded while waiting.
  const int64_t first_item = global_warp();
  int first_slot = -1;
  if (first_item < sp.items && lane < p.R) first_slot = slot[sp.row(first_item) * p.R + lane];
  if constexpr (kOwn) {
    // NOTE: each lane reads back only the columns it wrote (same thread: program order).
    for (int64_t item = first_item; item < sp.items;
         item += static_cast<int64_t>(gridDim.x) * kWarps) {
      const int64_t t = sp.row(item);
      const int ms = item == first_item ? first_slot : (lane < p.R ? slot[t * p.R + lane] : -1);
      const int j = __shfl_sync(kFull, ms, p.rank);
      for (int64_t step = sp.first(item); step < sp.last(item); ++step)
        own_partial<kNarrow>(p, j, step * 1024 + lane * 8);
    }
  }
  if (threadIdx.x == 0) s_abort = 0;
  __syncthreads();
  const unsigned long long n = s_n;
  if (threadIdx.x < p.R &&
      !wait_rounds(ctr(p.my, p, kDataC, threadIdx.x), n, p, threadIdx.x, kCombineData))
    s_abort = 1;
  __syncthreads();
  if (s_abort) return;
  stamp_last(p, 19);
  for (int64_t item = first_item; item < sp.items;
       item += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t t = sp.row(item);
    const int my_slot = item == first_item ? first_slot : (lane < p.R ? slot[t * p.R + lane] : -1);
    for (int64_t step = sp.first(item); step < sp.last(item); ++step) {
      const int64_t c0 = step * 1024 + lane * 8;
      float acc[kSub][8];
#pragma unroll
      for (int u = 0; u < kSub; ++u)
#pragma unroll
        for (int x = 0; x < 8; ++x) acc[u][x] = 0.0f;
      // Ranks in pairs: their rows loaded together, then summed in rank order.
      for (int d0 = 0; d0 < p.R; d0 += 2) {
        uint4 v[2][kSub];
        int js[2];
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          js[q] = __shfl_sync(kFull, my_slot, (d0 + q) & 31);
          if (d0 + q >= p.R) js[q] = -1;
#pragma unroll
          for (int u = 0; u < kSub; ++u)
            if (js[q] >= 0 && c0 + u * 256 < p.H)
              v[q][u] = __ldcg(reinterpret_cast<const uint4*>(
                  stage + (static_cast<int64_t>(d0 + q) * p.Tmax + js[q]) * p.H + c0 + u * 256));
        }
#pragma unroll
        for (int q = 0; q < 2; ++q)
#pragma unroll
          for (int u = 0; u < kSub; ++u)
            if (js[q] >= 0 && c0 + u * 256 < p.H) add_bf16x8(acc[u], v[q][u]);
      }
#pragma unroll
      for (int u = 0; u < kSub; ++u)
        if (c0 + u * 256 < p.H)
          *reinterpret_cast<uint4*>(p.out + t * p.H + c0 + u * 256) = pack_bf16(acc[u]);
    }
  }
  __syncthreads();
  stamp_last(p, 20);
  if (!kDeferAck && threadIdx.x < p.R)
    red_relaxed_sys(ctr(peer(p, threadIdx.x), p, kAckC, p.rank), round_share());
  count_done(p, kDoneCombineRecv);
  stamp_last(p, 21);
}

void launch(void (*kernel)(Params), int grid, size_t smem, cudaStream_t stream, bool dependent,
            const Params& a) {
  detail::launch_kernel(kernel, grid, kThreads, smem, stream, dependent, a);
}

// The kernels of each step for p's options. ll_defer_acks (Params::acks) takes its own
// instances; with it, ll_defer_dispatch_ack's kernels are not used (kAcksDispatch covers them).
using Kernel = void (*)(Params);
// The instance of a kernel template for p.acks' two deferral bits: pick(std::integral_constant<int,
// bits>) names it.
template <class Pick>
Kernel by_acks(int acks, Pick pick) {
  switch (acks & (kAcksDispatch | kAcksCombine)) {
    case kAcksDispatch:
      return pick(std::integral_constant<int, kAcksDispatch>{});
    case kAcksCombine:
      return pick(std::integral_constant<int, kAcksCombine>{});
    case kAcksDispatch | kAcksCombine:
      return pick(std::integral_constant<int, kAcksDispatch | kAcksCombine>{});
    default:
      return pick(std::integral_constant<int, 0>{});
  }
}
Kernel dispatch_send_kernel(const Params& p) {
  if ((p.recv_plan & kRecvPlanIdsBlock) != 0)
    return by_acks(p.acks, [](auto a) -> Kernel { return k_dispatch_send_rp<a(), true>; });
  if (p.recv_plan) return by_acks(p.acks, [](auto a) -> Kernel { return k_dispatch_send_rp<a()>; });
  if ((p.acks & (kAcksDispatch | kAcksCombine)) != 0)
    return p.dest_order != 0
               ? by_acks(p.acks, [](auto a) -> Kernel { return k_dispatch_send<true, false, a()>; })
               : by_acks(p.acks,
                         [](auto a) -> Kernel { return k_dispatch_send<false, false, a()>; });
  if (p.defer_ack)
    return p.dest_order != 0 ? k_dispatch_send<true, true> : k_dispatch_send<false, true>;
  return p.dest_order != 0 ? k_dispatch_send<true> : k_dispatch_send<false>;
}
Kernel dispatch_recv_kernel(const Params& p) {
  if ((p.recv_plan & kRecvPlanIdsBlock) != 0)
    return p.defer_ack || (p.acks & kAcksDispatch) != 0 ? k_dispatch_recv_rp<true, true>
                                                        : k_dispatch_recv_rp<false, true>;
  if (p.recv_plan)
    return p.defer_ack || (p.acks & kAcksDispatch) != 0 ? k_dispatch_recv_rp<true>
                                                        : k_dispatch_recv_rp<false>;
  return p.defer_ack || (p.acks & kAcksDispatch) != 0 ? k_dispatch_recv<true>
                                                      : k_dispatch_recv<false>;
}
Kernel combine_send_kernel(const Params& p) {
  if (p.recv_plan)
    return by_acks(p.acks, [](auto a) -> Kernel { return k_combine_send<a(), true>; });
  return by_acks(p.acks, [](auto a) -> Kernel { return k_combine_send<a()>; });
}
Kernel combine_recv_kernel(const Params& p) {
  if ((p.acks & kAcksCombine) != 0)
    return p.own_recv ? (p.own_narrow ? k_combine_recv<true, true, true>
                                      : k_combine_recv<true, false, true>)
                      : k_combine_recv<false, false, true>;
  return p.own_recv ? (p.own_narrow ? k_combine_recv<true, true> : k_combine_recv<true>)
                    : k_combine_recv<false>;
}

}  // namespace

size_t region_bytes(int num_ranks, int experts_per_rank, int64_t max_tokens_per_rank, int top_k,
                    int64_t hidden) {
  return rpe_offset(num_ranks, experts_per_rank, max_tokens_per_rank, top_k, hidden) +
         rpe_bytes(num_ranks, max_tokens_per_rank);
}

bool recv_plan_fits(int num_ranks, int experts_per_rank, int64_t max_tokens_per_rank, int top_k) {
  return recv_plan_smem(num_ranks, experts_per_rank, top_k, max_tokens_per_rank).total <=
         200 * 1024;
}

void prepare(const Params& p) {
  FM_CHECK_ARG(p.Tmax <= kMaxTokens, "max_tokens_per_rank=", p.Tmax,
               " exceeds the low-latency bound ", kMaxTokens);
  FM_CHECK_ARG(p.R <= kMaxRanks && p.K <= kMaxTopK, "low-latency kernels: ", p.R, " ranks, top-",
               p.K);
  const size_t plan = plan_smem(p.E, p.R, p.K, p.Tmax).total;
  FM_CHECK_ARG(plan <= 200 * 1024, "max_tokens_per_rank=", p.Tmax, " with ", p.E,
               " experts needs more shared memory for the low-latency send plan (", plan,
               " bytes) than a block has");
  FM_CHECK_ARG(
      recv_smem(p) <= 200 * 1024, p.E, " experts over ", p.R,
      " ranks need more shared memory for the low-latency receive layout than a block has");
  // NOTE: load every kernel now: with lazy module loading a first launch can wait for the device,
  // which never drains while a peer's kernel spins on a counter.
  for (const void* k : {reinterpret_cast<const void*>(k_dispatch_send<false>),
                        reinterpret_cast<const void*>(k_dispatch_send<true>),
                        reinterpret_cast<const void*>(k_dispatch_send<false, true>),
                        reinterpret_cast<const void*>(k_dispatch_send<true, true>),
                        reinterpret_cast<const void*>(k_dispatch_recv<false>),
                        reinterpret_cast<const void*>(k_dispatch_recv<true>),
                        reinterpret_cast<const void*>(k_combine_send<0>),
                        reinterpret_cast<const void*>(k_combine_recv<false>),
                        reinterpret_cast<const void*>(k_combine_recv<true>),
                        reinterpret_cast<const void*>(k_combine_recv<true, true>)}) {
    cudaFuncAttributes attr;
    FM_CHECK_CUDA(cudaFuncGetAttributes(&attr, k));
  }
  if ((p.acks & (kAcksDispatch | kAcksCombine)) != 0) {
    for (const void* k : {reinterpret_cast<const void*>(dispatch_send_kernel(p)),
                          reinterpret_cast<const void*>(dispatch_recv_kernel(p)),
                          reinterpret_cast<const void*>(combine_send_kernel(p)),
                          reinterpret_cast<const void*>(combine_recv_kernel(p))}) {
      cudaFuncAttributes attr;
      FM_CHECK_CUDA(cudaFuncGetAttributes(&attr, k));
    }
    FM_CHECK_CUDA(cudaFuncSetAttribute(dispatch_send_kernel(p),
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(plan)));
  }
  for (auto* k : {k_dispatch_send<false>, k_dispatch_send<true>, k_dispatch_send<false, true>,
                  k_dispatch_send<true, true>})
    FM_CHECK_CUDA(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(plan)));
  for (auto* k : {k_dispatch_recv<false>, k_dispatch_recv<true>})
    FM_CHECK_CUDA(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(recv_smem(p))));
  if (p.recv_plan) {
    FM_CHECK_ARG(recv_plan_fits(p.R, p.L, p.Tmax, p.K), "ll_recv_plan: the receive plan of ", p.R,
                 " ranks x ", p.Tmax, " tokens does not fit a block");
    for (const void* k : {reinterpret_cast<const void*>(dispatch_send_kernel(p)),
                          reinterpret_cast<const void*>(dispatch_recv_kernel(p)),
                          reinterpret_cast<const void*>(combine_send_kernel(p))}) {
      cudaFuncAttributes attr;
      FM_CHECK_CUDA(cudaFuncGetAttributes(&attr, k));
    }
    FM_CHECK_CUDA(
        cudaFuncSetAttribute(dispatch_recv_kernel(p), cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(recv_plan_smem(p.R, p.L, p.K, p.Tmax).total)));
  }
}

void dispatch_send(const Params& p, cudaStream_t stream) {
  // recv_plan ids block: one block more than send_blocks, the ids' own (k_dispatch_send_rp<*,
  // true>).
  launch(dispatch_send_kernel(p), p.send_blocks + ((p.recv_plan & kRecvPlanIdsBlock) != 0 ? 1 : 0),
         p.recv_plan ? 0 : plan_smem(p.E, p.R, p.K, p.Tmax).total, stream, false, p);
}
void dispatch_recv(const Params& p, cudaStream_t stream, bool dependent) {
  launch(dispatch_recv_kernel(p), p.recv_blocks,
         p.recv_plan ? recv_plan_smem(p.R, p.L, p.K, p.Tmax).total : recv_smem(p), stream,
         dependent, p);
}
void combine_send(const Params& p, cudaStream_t stream) {
  launch(combine_send_kernel(p), p.send_blocks, 0, stream, false, p);
}
void combine_recv(const Params& p, cudaStream_t stream, bool dependent) {
  launch(combine_recv_kernel(p), p.recv_blocks, 0, stream, dependent, p);
}

void print_trace(const unsigned long long* trace_dev, int rank) {
  unsigned long long t[kTraceSlots];
  FM_CHECK_CUDA(cudaMemcpy(t, trace_dev, sizeof(t), cudaMemcpyDeviceToHost));
  auto us = [&](int slot, int base) {
    return t[slot] >= t[base] ? static_cast<double>(t[slot] - t[base]) * 1e-3 : -1.0;
  };
  std::fprintf(stderr,
               "ll_trace rank %d dispatch (us after send block 0 start): send last-start %.2f "
               "plan %.2f ack %.2f payload %.2f end %.2f | recv first-start %.2f last-start %.2f "
               "data %.2f layout %.2f scatter %.2f end %.2f\n",
               rank, us(1, 0), us(2, 0), us(3, 0), us(4, 0), us(5, 0), us(6, 0), us(7, 0), us(8, 0),
               us(9, 0), us(10, 0), us(11, 0));
  // Session 5: the send's start up to the plan, and the early-notify phase (-1 or stale where a
  // variant has no such phase).
  std::fprintf(stderr,
               "ll_trace rank %d dispatch detail: send cleared %.2f plan-tiles %.2f plan %.2f | "
               "recv notify %.2f data %.2f ids-seen %.2f\n",
               rank, us(22, 0), us(23, 0), us(2, 0), us(26, 0), us(8, 0), us(27, 0));
  std::fprintf(stderr,
               "ll_trace rank %d combine (us after send block 0 start): send last-start %.2f "
               "ack %.2f sums %.2f end %.2f | recv first-start %.2f last-start %.2f data %.2f "
               "sums %.2f end %.2f\n",
               rank, us(13, 12), us(14, 12), us(15, 12), us(16, 12), us(17, 12), us(18, 12),
               us(19, 12), us(20, 12), us(21, 12));
}

}  // namespace fp8moe::comm::ll
