// Internal to the comm module: the low-latency NVLink kernels (sm90_device_ep_ll.cu) that
// DeviceEpRank (sm90_device_ep.cu) runs for masked configs. They fill the same workspace fields
// as the normal kernels (records, layout, handle), so view(), download() and check() read their
// results unchanged; only their counters are their own (a region of the workspace, `ll`).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace fp8moe::comm::ll {

// Batches longer than this take the normal kernels (every send block plans the whole batch).
inline constexpr int64_t kMaxTokens = 1024;

// Error-record counter ids, after the FlagGroup values of sm90_device_ep_kernels.cuh.
enum Counter : int {
  kDispatchData = 16,  // [rank][src]: send blocks of src that finished writing into rank
  kDispatchAck = 17,   // [rank][src]: receive blocks of src done with rank's records
  kCombineData = 18,
  kCombineAck = 19,
  kDispatchNotify = 20,  // [rank][src]: src's per-expert counts are in (ll_early_notify)
  kDispatchToken = 21,   // [rank][src]: a 1024-column step of one of src's records (token_flags)
  kDispatchIds = 22,     // [rank][src]: src's T, expert ids and weights are in (recv_plan)
};
// "ll_dispatch.data" etc., nullptr for other ids.
const char* counter_name(int counter);

// The error record of the workspace (layout checked against DevErr, sm90_device_ep_kernels.cuh).
struct ErrRecord {
  int code;
  int rank;
  int peer;
  int counter;
  unsigned long long expected;
  unsigned long long seen;
  long long detail;
};
inline constexpr int kErrTimeout = 1;
inline constexpr int kErrBadExpert = 3;

// Byte offsets of the workspace fields these kernels use (identical on every rank).
struct Fields {
  size_t stage, src_token, topk_local, topk_pos, weight, recv_count, notify, comb_stage;
  size_t peer_table, slot, status, recv_offset, expert_counts, expert_offsets, m_indices, row_src,
      row_weight, token_rows, gx, gscales;
  size_t ll;  // region_bytes(R, L, Tmax, K)
};
// The counters and per-expert bookkeeping of the low-latency path (hidden: the per-step flags
// of ll_token_flags).
size_t region_bytes(int num_ranks, int experts_per_rank, int64_t max_tokens_per_rank, int top_k,
                    int64_t hidden);

struct Params {
  Fields f;
  char* my = nullptr;  // this rank's workspace
  ErrRecord* err = nullptr;
  int rank = 0, R = 0, K = 0, L = 0, E = 0;
  int64_t H = 0, SC = 0, Tmax = 0, P = 0, cap = 0;
  int NS = 0;  // ints of one source's notify block: T, then L expert counts
  bool fp8 = false;
  bool expand = true;
  int send_blocks = 1, recv_blocks = 1;
  unsigned long long timeout_ns = 0;
  int st_rows_needed = 0, st_overflow = 0, st_num_recv = 0;  // status[] slots
  // per call
  int64_t T = 0;
  const uint16_t* x = nullptr;
  const int32_t* idx = nullptr;
  const float* w = nullptr;
  const uint16_t* y = nullptr;
  uint16_t* out = nullptr;
  bool weighted = true;
  // Session 16 (DeviceEpOptions::ll_defer_acks, ll_deferred_ack_first_block; docs/comm/README.md
  // "Session 16: LL acknowledgements on the next kernel (ll2)"): kAcksDispatch, the dispatch
  // receive ends without its acknowledgement (k_dispatch_recv<true>) and the rank's next
  // low-latency send kernel, dispatch or combine, gives it; kAcksCombine, the same for the combine
  // receive (k_combine_recv<*, *, true>); kAcksFirstBlock, the adds from warp 0 of block 0
  // instead of the last warp of the last block. One byte, in the padding after `weighted`: the
  // other kernels' parameter block keeps its size and layout.
  uint8_t acks = 0;
  // Session 17 (DeviceEpOptions::ll_recv_plan; docs/comm/README.md "Session 17: the low-latency
  // dispatch planned by the receiver, prepared (ll3)"): the dispatch send plans nothing: block 0
  // stores the rank's T, expert ids and weights at every destination (one counter per source,
  // st.release of (round << 32) | T), every warp stores its tokens' payload at slot t (the token
  // index) of its region at each destination and releases the step flags; the receive plans its
  // local experts from the sources' ids (k_dispatch_send_rp, k_dispatch_recv_rp); the combine send
  // maps each record's compact index to its token slot (k_combine_send<*, true>). One byte, in the
  // padding after acks: the other kernels' parameter block keeps its size. Bits: kRecvPlan (V),
  // kRecvPlanIdsBlock (session 17 late, ll5; docs/comm/README.md "Session 17 late: V's ids from a
  // block of their own, prepared (ll5)"): the send runs one block more, whose only job is to store
  // every token's local expert indices (u8) at each destination as 8-byte words tagged with the
  // round, first thing (double-buffered by round parity; no release, no gate); the other blocks
  // store the payload as V's do, with the weights beside each record's first step; the receive
  // polls the words (no counter) and plans every source's Tmax slots (ll4's receive).
  uint8_t recv_plan = 0;
  // Diagnostics (FP8MOE_EP_LL_TRACE=1): per-phase %globaltimer stamps of the last round.
  unsigned long long* trace = nullptr;
  // A system-scope fence before each arrival's release add (FP8MOE_EP_LL_FENCE=1, experiment:
  // the release alone orders the block's writes, measured 1.8-2.7 us faster per direction).
  bool fence = false;
  // Options of session 5 (DeviceEpOptions::ll_*; docs/comm/README.md "Session 5: low latency"),
  // all off = the session-4 kernels.
  // early_notify: block 0 of the dispatch send releases the per-expert counts on a counter of
  // their own, so the receive derives the masked layout while the payload is still in flight.
  bool early_notify = false;
  // spread: the combine send deals its items to warps so that every block holds items of every
  // source (before, warps in order: the blocks serving the peers' records did all remote stores).
  bool spread = false;
  // own_recv: the combine receive computes the rank's own partial from its expert rows (before
  // it waits for the peers) and the combine send skips the rank's own records.
  bool own_recv = false;
  // token_flags (implies early_notify): the dispatch send releases a flag per record and
  // 1024-column step (the round number) right after that step's stores, instead of one arrival
  // per block at its end; the receive copies each step as soon as its flag is in, so its row
  // copies overlap the transfer. The receive (not the send) turns the previous round's rows that
  // this round does not rewrite back into padding.
  bool token_flags = false;
  // Session 9 (DeviceEpOptions::ll_combine_own_narrow; docs/comm/README.md "Session 9: low
  // latency (ep11)"), with own_recv: the combine receive's own partials keep one 256-column piece
  // of the rows in flight at a time instead of two (k_combine_recv<true, true>: no spill).
  bool own_narrow = false;
  // Session 14 (DeviceEpOptions::ll_dispatch_rotate; docs/comm/README.md "Session 14: the
  // low-latency payload at 4 ranks (ep23)"): the order in which the dispatch send's warps visit a
  // token's destinations (k_dispatch_send<true>): 0 ascending ranks (the default kernel), 1 the
  // peers from rank + 1 on and the rank itself last, 2 the same with each item's start moved by
  // its index over the peers. One byte, in the padding after own_narrow: the default kernels'
  // parameter block keeps its size.
  uint8_t dest_order = 0;
  // Session 15 late (DeviceEpOptions::ll_defer_dispatch_ack; docs/comm/README.md "Session 15 late:
  // the low-latency dispatch at 2 ranks, prepared (ll1)"): the dispatch receive does not
  // acknowledge its sources at its end (k_dispatch_recv<true>); the rank's next dispatch send
  // acknowledges every receive of the rank that none has yet (k_dispatch_send<*, true>), so the
  // receive's last instructions store nothing to a peer. One byte, in the padding after
  // dest_order: the default kernels' parameter block keeps its size.
  bool defer_ack = false;
};

// Params::acks bits.
inline constexpr uint8_t kAcksDispatch = 1;
inline constexpr uint8_t kAcksCombine = 2;
inline constexpr uint8_t kAcksFirstBlock = 4;
// Params::recv_plan bits.
inline constexpr uint8_t kRecvPlan = 1;
inline constexpr uint8_t kRecvPlanIdsBlock = 2;

// Loads every kernel and sets its shared-memory limit; kInvalidArgument if the send plan does
// not fit a block.
void prepare(const Params& p);
// recv_plan: whether the receive's plan (shared memory, every source's tokens) fits a block;
// where it does not, the rank runs the default kernels (the same answer on every rank).
bool recv_plan_fits(int num_ranks, int experts_per_rank, int64_t max_tokens_per_rank, int top_k);
void dispatch_send(const Params& p, cudaStream_t stream);
void dispatch_recv(const Params& p, cudaStream_t stream, bool dependent);
void combine_send(const Params& p, cudaStream_t stream);
void combine_recv(const Params& p, cudaStream_t stream, bool dependent);

// Diagnostics: kTraceSlots stamps per rank; print_trace writes the last round's phases (us after
// each direction's first send block started) to stderr.
inline constexpr int kTraceSlots = 32;
void print_trace(const unsigned long long* trace_dev, int rank);

}  // namespace fp8moe::comm::ll
