// Internal to the comm module: what the normal (not low-latency) expert-parallel kernels
// (sm90_device_ep_dispatch.cu, sm90_device_ep_combine.cu) and their host side DeviceEpRank
// (sm90_device_ep.cu) share: the workspace geometry and layout, the kernel arguments, the status,
// flag, error and trace slots, the kernel variants the options select, and the device helpers of
// both kernel files (bounded waits, flags, work claims, work splits).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "ep_ptx.cuh"
#include "ep_row_math.cuh"
#include "fp8moe/comm/device_ep.h"
#include "sm90_device_ep_ll.h"

namespace fp8moe::comm::normal {

constexpr int kMaxRanks = 32;  // destination masks are 32-bit
constexpr int kMaxTopK = 8;
constexpr int kSendThreads = 512;  // threads of every kernel's blocks
constexpr int kWarps = kSendThreads / 32;
constexpr int kTile = 32;  // plan granularity: the tokens of one warp
constexpr unsigned kFull = 0xFFFFFFFFu;
using detail::add_weighted_bf16x8;
using detail::allow_dependent_launch;
using detail::evict_first_policy;
using detail::globaltimer;
using detail::lanemask_lt;
using detail::ld_acquire_sys;
using detail::ld_evict_first;
using detail::pack_bf16;
using detail::quantize16;
using detail::record_error;
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
  kPlanTicket =
      13,          // plan_block_scan: plan kernel blocks ever started (their order: ticket % grid)
  kSendItem = 14,  // layout_claim_chunks: the next chunk of the dispatch send (claimed in order)
  kSendClaimers = 15,  // layout_claim_chunks: send blocks done claiming (the last one resets both)
  // Session 15 (ep25), layout_payload_claims: kSendItem counts the payload's units (claimed per
  // warp), kSendMetaItem the chunks whose metadata the blocks' last warps write, kSendClaimers the
  // blocks done (the last one resets the three).
  kSendMetaItem = 16,
  kStatusSlots = 17,  // the region keeps its 256 bytes (make_layout): no later field moves
};
// flags[] groups: R counters each, then R * max_chunks for the chunk groups.
enum FlagGroup : int {
  kDispatchNotify = 0,
  kDispatchAck = 1,
  kCombineAck = 2,
  kDispatchChunk = 3,
  kCombineChunk = 4,
  kLocalSent = 5,   // error reports only: the local send blocks (status kDispatchSent/kCombineSent)
  kPlanBlocks = 6,  // error reports only: plan_block_scan's wait for an earlier plan block's sums
  // layout_payload_claims (session 15): [R] u64 after the chunk groups, the send blocks of source
  // r whose payload is written here (payload_counter; monotonic: round n expects n * send grid).
  kDispatchPayload = 7,
};

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
  size_t all_counts;  // dispatch_direct_rows: [R][E] per-expert token counts of every source,
                      // then the plan blocks' published sums (plan_part)
  size_t bwd_gw, bwd_mask, bwd;  // combine backward (sm90_device_ep_backward.cu)
  // local
  size_t peer_table, err, slot, status, recv_offset, expert_counts, expert_offsets, m_indices,
      row_src, row_weight, token_rows, gx, gscales, plan_cnt, plan_dball, plan_tot, total;
  size_t ll;  // counters of the low-latency kernels (sm90_device_ep_ll.cu)
};
// The row_record table ([bound] int32, DeviceRecvView::row_record) follows the layout at `total`
// instead of having a field here: a field would move every later member of Args, so every
// kernel's parameter loads, and the kernels other than the dispatch receive keep their PTX.
__host__ __device__ inline size_t row_record_offset(const WsLayout& l) {
  return l.total;
}
__host__ __device__ inline size_t workspace_bytes(const Geometry& g, const WsLayout& l) {
  return row_record_offset(l) + (static_cast<size_t>(g.bound) * 4 + 255) / 256 * 256;
}

// Dynamic shared memory of the send plan: per-expert and per-destination tile counts (u16, then
// exclusive prefixes), destination ballots per tile, per-warp expert lane masks, expert totals.
struct PlanSmem {
  size_t ecnt, dcnt, dball, emask, etot, rowbase, total;
};

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
  int tile;  // combine receive: tokens per block item; the dispatch send with
             // layout_payload_claims: its claim unit in 1024-column steps
  const uint16_t* x;
  const int32_t* idx;
  const float* w;
  const uint16_t* y;  // combine input (grouped rows or per-slot rows)
  uint16_t* out;
  // NOTE: the order of these flags moves ptxas's spills in k_combine_recv (with nccl at an odd
  // offset its two-step instances spilled 36 bytes, not 20, or 32 with combine_stream_rows).
  bool weighted;
  bool peer_blocks;  // DeviceEpOptions::combine_peer_blocks
  bool expand;
  bool direct;     // DeviceEpOptions::dispatch_direct_rows, where it applies (Impl::direct)
  bool nccl;       // Wire::kNccl: "peers" are this rank's send buffer, regions by destination; the
                   // exchange and its ordering are NCCL's, so no flags are waited on or raised
  bool self_rows;  // DeviceEpOptions::dispatch_self_rows (with direct)
  bool fast_plan;  // DeviceEpOptions::plan_fast_count (with plan_once)
  unsigned long long* trace;  // FP8MOE_EP_TRACE=1: dispatch and combine phase stamps, else null
};

// Phase stamps (%globaltimer, ns) of the last dispatch and combine, FP8MOE_EP_TRACE=1: printed by
// check(). Minima are reset by the plan kernel's block 0 before its dependents can start.
enum TraceSlot : int {
  kTrPlanStart = 0,
  kTrPlanEnd = 1,
  kTrSendStart = 2,      // first send block (min)
  kTrSendCounts = 3,     // direct rows: the last send block that had every source's counts (max)
  kTrSendEnd = 4,        // last send block done (max)
  kTrRecvStart = 5,      // first receive block (min)
  kTrRecvLayout = 6,     // last receive block with its layout (max)
  kTrRecvLastFlag = 7,   // the last chunk flag a receive block saw (max)
  kTrRecvEnd = 8,        // the acknowledging block, done
  kTrPlanLast = 9,       // the plan kernel's last block starts its scan (every tile counted);
                         // plan_block_scan: the last block with its earlier blocks' sums (max)
  kTrSendAcked = 10,     // the last send block past its wait for the previous round's acks (max)
  kTrPlanBlocksIn = 11,  // the last plan kernel block to start (max)
  kTrPlanCounted = 12,   // the last plan kernel block done counting (max)
  kTrSendPlanned = 13,   // the first send block past its wait for the plan (min)
  kTrPlanLoaded = 14,    // the last plan warp with its tile's expert ids (max)
  kTrPlanMatched = 15,   // the last plan warp done counting its tile in shared memory (max)
  // Combine stamps of the last combine, minima then maxima (combine_send's host side resets
  // them; check() prints them relative to kTrCombSendStart). Outside the kernels' loops: a
  // stamp per tile moved combine_recv's spills.
  kTrCombSendStart = 16,     // first combine send block (min)
  kTrCombSendFirstEnd = 17,  // first combine send block done (min)
  kTrCombRecvStart = 18,     // first combine receive block (min)
  kTrCombSendEnd = 19,       // last combine send block done (max)
  kTrCombRecvEnd = 20,       // the acknowledging block, done
  // Session 8 (ep9): the send prologue split further.
  kTrSendNotified = 21,   // send block 0 released its notify (flag stored)
  kTrSendFlags = 22,      // direct rows: the last send block with every source's notify flag (max)
  kTrPlanPublished = 23,  // the last plan block with its column sums published (plan_block_scan,
                          // dispatch_plan_counts; max)
  // Session 11 (ep14), the source-region send instances with session-11 bits only: the first send
  // block done (min; reset by dispatch_send's host side).
  kTrSendFirstEnd = 24,
  kTrSlots = 25,
};
constexpr int kTrCombMins = kTrCombSendStart, kTrCombMaxes = kTrCombSendEnd;

using KernelFn = void (*)(Args);

// Defined by the kernel files: sm90_device_ep_dispatch.cu (dispatch_*) and
// sm90_device_ep_combine.cu (combine_*).
// mode (with fast): bit 0 dispatch_plan_counts (where it applies: Impl::plan_counts), bit 1
// plan_block_scan; nonzero = k_dispatch_plan_blocks over plan_blocks(g) blocks.
KernelFn dispatch_plan_kernel(bool fast, int mode = 0);
KernelFn dispatch_send_kernel(const DeviceEpOptions& o, bool direct, bool plan_counts = false);

// Bits of the dispatch send kernel's instance (kPro). Session 8, with direct rows: kProCounts
// (Impl::plan_counts), kProRelease (dispatch_release_only). Session 11, the source-region send
// (the layout-only dispatch's; with plan_once and prefetch_payload): kProRelease
// (layout_release_only), kProClaim (layout_claim_chunks).
constexpr int kProCounts = 1;
constexpr int kProRelease = 4;
constexpr int kProClaim = 8;
// Session 14 (ep22), the source-region send over NVLink: kProTokenSlots (layout_token_slots).
constexpr int kProTokenSlots = 16;
// Session 15 (ep25), with kProTokenSlots and expand_payload off: kProPayloadClaims
// (layout_payload_claims). 64, not 32: ep24's kProRotate (runs/ep-s14-ep24-send-rotate.patch).
constexpr int kProPayloadClaims = 64;
// layout_token_slots where it applies: the source-region send with plan_once and prefetch_payload
// over the NVLink wire (the NCCL wire's exchange follows the send kernel, so nothing overlaps).
inline bool layout_token_slots(const DeviceEpOptions& o, bool direct) {
  return o.layout_token_slots && !direct && o.plan_once && o.prefetch_payload &&
         o.wire == Wire::kNvlink;
}
// layout_payload_claims where it applies: with layout_token_slots, for the layout-only dispatch
// (expand_payload off: no receive reads a record's payload before the dispatch ends, so the
// chunk flags need not cover it; the receive's last block waits for the payload counters).
inline bool layout_payload_claims(const DeviceEpOptions& o, bool direct) {
  return o.layout_payload_claims > 0 && layout_token_slots(o, direct) && !o.expand_payload;
}
// Session 11's bits of the source-region send (0 where they do not apply: direct rows, or without
// plan_once and prefetch_payload), and session 14's and 15's (with layout_payload_claims the
// chunks' metadata is claimed per warp, so layout_claim_chunks does not apply).
inline int layout_send_pro(const DeviceEpOptions& o, bool direct) {
  if (direct || !o.plan_once || !o.prefetch_payload) return 0;
  if (layout_payload_claims(o, direct))
    return (o.layout_release_only ? kProRelease : 0) | kProTokenSlots | kProPayloadClaims;
  return (o.layout_release_only ? kProRelease : 0) | (o.layout_claim_chunks ? kProClaim : 0) |
         (layout_token_slots(o, direct) ? kProTokenSlots : 0);
}
// Blocks of the dispatch send: layout_send_blocks for the layout-only dispatch with one rank per
// GPU, else num_blocks.
inline int dispatch_send_grid(const DeviceEpOptions& o) {
  return !o.expand_payload && o.ranks_per_device <= 1 && o.layout_send_blocks > 0
             ? o.layout_send_blocks
             : o.num_blocks;
}

// Blocks of the plan kernel with plan_block_scan or dispatch_plan_counts (a fixed grid: the
// published sums are laid out per block), one 32-token tile per warp.
__host__ __device__ inline int plan_blocks(const Geometry& g) {
  return (g.NT + kWarps - 1) / kWarps;
}
// Bytes of the all_counts field: the [R][E] counts, then [2][R][plan_blocks][W] published words.
__host__ __device__ inline size_t plan_counts_offset(const Geometry& g) {
  return (static_cast<size_t>(g.R) * g.E * 4 + 255) / 256 * 256;
}
__host__ __device__ inline size_t all_counts_bytes(const Geometry& g) {
  return plan_counts_offset(g) + 2ull * g.R * plan_blocks(g) * g.W * 8;
}
// combine_release_only: the acknowledgement by a release store alone (k_dispatch_recv<true>);
// dispatch_recv_bulk_rows with expand_payload: the copies by bulk copies (k_dispatch_recv<*,
// true>); token_slots (layout_token_slots where it applies): each record at its token's index
// (k_dispatch_recv<*, *, true>).
// payload_claims (layout_payload_claims where it applies): the last block waits for every
// source's payload counter before it acknowledges (k_dispatch_recv<*, false, true, true>).
KernelFn dispatch_recv_kernel(const DeviceEpOptions& o, bool token_slots = false,
                              bool payload_claims = false);
// dispatch_recv_bulk_rows' per-warp slot (a record's payload in pieces of at most this many bytes).
constexpr int64_t kRecvBulkSlot = 8192;
// Dynamic shared memory of dispatch_recv_kernel(o) at geometry g: the layout's `layout` bytes,
// then with dispatch_recv_bulk_rows (and expand_payload) one mbarrier and one slot per warp.
__host__ __device__ inline size_t dispatch_recv_bulk_bars(size_t layout) {
  return (layout + 15) / 16 * 16;
}
__host__ __device__ inline size_t dispatch_recv_bulk_slots(size_t layout) {
  return (dispatch_recv_bulk_bars(layout) + kWarps * 8 + 127) / 128 * 128;
}
inline size_t dispatch_recv_smem(const DeviceEpOptions& o, size_t layout) {
  if (!o.dispatch_recv_bulk_rows || !o.expand_payload) return layout;
  return dispatch_recv_bulk_slots(layout) + kWarps * kRecvBulkSlot;
}
KernelFn combine_send_kernel(const DeviceEpOptions& o);
// Dynamic shared memory of combine_send_kernel(o) at geometry g (combine_bulk_rows' ring, else 0).
size_t combine_send_smem(const DeviceEpOptions& o, const Geometry& g);
KernelFn combine_recv_kernel(const DeviceEpOptions& o);

namespace {

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

// A phase stamp (TraceSlot, FP8MOE_EP_TRACE=1).
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

template <typename T>
__device__ __forceinline__ T* at(char* base, size_t off) {
  return reinterpret_cast<T*>(base + off);
}

// Words whose every value is whole on its own (a (round, count) pair): strong relaxed 64-bit
// accesses at system scope, so a reader on another GPU sees the old word or the new, never a mix.
__device__ __forceinline__ unsigned long long ld_relaxed_sys(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_relaxed_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
// The published column sums of plan block `blk` of source `src` for the round n (its parity
// picks one of two buffers, so a source may write round n while round n - 1's are still read):
// W words, (n mod 2^32) << 32 | count.
__device__ __forceinline__ unsigned long long* plan_part(char* base, const Args& a,
                                                         unsigned long long n, int src, int blk) {
  const size_t i = ((static_cast<size_t>(n & 1) * a.g.R + src) * plan_blocks(a.g) + blk) * a.g.W;
  return at<unsigned long long>(base, a.lay.all_counts + plan_counts_offset(a.g)) + i;
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

// Threads raise a flag (of a peer) to n after the block's accesses, the caller having passed a
// __syncthreads after them: a chunk flag publishes the block's writes, an acknowledgement frees
// the buffers the grid read. kRelease (dispatch_release_only: the dispatch send's notify and
// chunk flags; combine_release_only: the combine send's chunk flags and both receives'
// acknowledgements): by the release store alone. NOTE: why that suffices (PTX memory model): the
// other threads' accesses precede their arrival at the barrier in program order, the barrier
// synchronises them with this thread at CTA scope (bar.sync is morally strong among the CTA's
// threads), and the release store follows it in program order; causality order is transitive
// across scopes, and a release pattern makes every access that precedes it in causality order
// visible to (for a read: ordered before) the accesses after the acquire load (ld.acquire.sys:
// wait_geq) that reads the stored value, on any GPU of the system. The full fence (fence.sc.sys)
// before it orders this thread's operations with every other SC fence as well, which no reader
// here relies on. An acknowledgement is raised by the last block of the receive grid, so it must
// cover the other blocks' reads too: each block's thread 0 counts the block by a fence and an
// atomic add after the block's barrier (a release pattern at GPU scope), and the last one's
// thread 0 takes last_block_acquire (below) before the barrier that precedes the release.
// `flag`: the flag's address, or a callable that gives it after the fence (the combine's flags and
// the acknowledgements computed their address there, so their fenced kernels keep their PTX).
template <bool kRelease, typename Flag>
__device__ __forceinline__ void publish(Flag flag, unsigned long long n) {
  if constexpr (!kRelease) __threadfence_system();
  if constexpr (std::is_invocable_v<Flag>)
    st_release_sys(flag(), n);
  else
    st_release_sys(flag, n);
}
// kRelease: thread 0 of the block whose count was the grid's last (`last`) follows its atomic add
// with fence.acq_rel.gpu, an acquire pattern that observes every other block's count (through the
// chain of read-modify-writes on the counter) and so synchronises with each block's release
// pattern; the release store of its acknowledgement (publish) then covers every block's reads.
// Without kRelease nothing is added: the acknowledgements keep their full system fences.
template <bool kRelease>
__device__ __forceinline__ void last_block_acquire(bool last) {
  if constexpr (kRelease)
    if (last) asm volatile("fence.acq_rel.gpu;" ::: "memory");
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
// layout_payload_claims: source src's send blocks done writing their payload into `base`'s rank.
__device__ __forceinline__ unsigned long long* payload_counter(char* base, const Args& a, int src) {
  return at<unsigned long long>(base, a.lay.flags) + 3 * a.g.R + 2 * a.g.R * a.g.NC + src;
}
// Chunk c of source r: flag index r * NC + c of its group.
__device__ __forceinline__ unsigned long long* chunk_flag(char* base, const Args& a, int group,
                                                          int r, int c) {
  return flag(base, a, group, r * a.g.NC + c);
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

}  // namespace

}  // namespace fp8moe::comm::normal
