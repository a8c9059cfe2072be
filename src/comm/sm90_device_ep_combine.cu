// Expert-parallel combine over peer-mapped NVLink buffers (fp8moe/comm/device_ep.h): the send and
// receive kernels of the normal path (DeviceEpRank, sm90_device_ep.cu, launches them).
// Algorithm. Combine send: the expert rows of each received chunk are summed with the gate weights
// and pushed back, one flag per chunk; combine receive sums a token's partials in rank order as
// soon as its chunks landed, computing the partial of the rank itself from the local expert rows.
// The weighted sums read the expert rows two 256-column steps per pass (combine_two_steps); the
// send's blocks are dealt to the peers, each serving one (combine_peer_blocks); combine_stream_rows
// (session 5) loads the expert rows evict-first so that the staged partials stay in L2. Session 7
// (defaults): the receive's warps claim their own (token, column part) items and wait for their
// own token's chunks (combine_recv_warp_items / _warp_wait), the staged partial is loaded beside
// the own rows (combine_recv_early_stage), and a token's (a send record's) columns are shared by
// 4 (2) warps (combine_send_parts), so that fewer distinct expert rows are read at once.
// Acks from the consumer make every buffer reusable without a host round trip.
// combine_release_only (ep10, off): chunk flags and acknowledgements raised by release stores
// alone, without a system fence (the argument: publish() in sm90_device_ep_kernels.cuh).
// Reference: dispatch_reference / combine_reference (src/comm/ep_reference.cpp), bit for bit.
// Test: build-comm-dev/test_comm_gpu or build-device/tests/test_comm_gpu
// (tests/comm/device_ep_gpu_test.cu).
#include <cstdint>

#include "../kernels/sm90_ptx.cuh"
#include "fp8moe/fp8/codec.h"
#include "sm90_device_ep_kernels.cuh"

namespace fp8moe::comm::normal {

namespace {

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
// kEvict (combine_stream_rows): the rows are loaded with an L2 evict-first policy (each is read
// once), so that the partials landing in the stage stay in L2 until the receive reads them.
template <int kU, bool kEvict = false>
__device__ __forceinline__ void weighted_rows_u(const uint16_t* y, int64_t H, const RowSet& rs,
                                                int64_t c, const bool* valid, float (*acc)[8]) {
  const unsigned long long pol = kEvict ? evict_first_policy() : 0ull;
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
          if (g0 + i < rs.n && valid[u]) {
            const uint16_t* src = y + static_cast<int64_t>(rs.row[g0 + i]) * H + c + u * 256;
            v[u][i] =
                kEvict ? ld_evict_first(src, pol) : __ldg(reinterpret_cast<const uint4*>(src));
          }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (g0 + i >= rs.n) break;
        const float wk = rs.w[g0 + i];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          if (!valid[u]) continue;
          add_weighted_bf16x8(acc[u], wk, v[u][i]);
        }
      }
    }
  }
}

// The rows of a token compacted into shared memory (one slot per warp; session 7): the same
// sums as weighted_rows_u, the row indices and weights read back per group (volatile, so that they
// are not held in registers across the column loop: 16 registers freed for loads in flight).
struct SmemRows {
  volatile int* row;
  volatile float* w;
  int n;
};
// Lane k < K's row (-1: none) and weight into the warp's slot, compacted in ascending k.
__device__ __forceinline__ SmemRows compact_rows_smem(int row, float wt, int* srow, float* sw) {
  const int lane = threadIdx.x & 31;
  const unsigned m = __ballot_sync(kFull, row >= 0);
  __syncwarp();  // the warp's previous token is done reading the slot
  if (row >= 0) {
    const int i = __popc(m & ((1u << lane) - 1u));
    srow[i] = row;
    sw[i] = wt;
  }
  __syncwarp();
  return {srow, sw, __popc(m)};
}
template <int kU, bool kEvict = false>
__device__ __forceinline__ void weighted_rows_smem(const uint16_t* y, int64_t H, const SmemRows& rs,
                                                   int64_t c, const bool* valid, float (*acc)[8]) {
  const unsigned long long pol = kEvict ? evict_first_policy() : 0ull;
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
        if (g0 + i < rs.n) {
          const uint16_t* src = y + static_cast<int64_t>(rs.row[g0 + i]) * H + c;
#pragma unroll
          for (int u = 0; u < kU; ++u)
            if (valid[u])
              v[u][i] = kEvict ? ld_evict_first(src + u * 256, pol)
                               : __ldg(reinterpret_cast<const uint4*>(src + u * 256));
        }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (g0 + i >= rs.n) break;
        const float wk = rs.w[g0 + i];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          if (!valid[u]) continue;
          add_weighted_bf16x8(acc[u], wk, v[u][i]);
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
    add_weighted_bf16x8(acc, ws[k], v[k]);
  }
}

// ---- combine send: per chunk of received records, one BF16 row per record pushed back ----
// NVLink: records of this rank's own tokens are skipped; combine_recv sums them from the local
// expert rows directly (no staging round trip through memory).
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
// One record's row [c_begin, c_end) (lane offset included) to dst: the weighted sum of its expert
// rows `rs`, kU column steps per pass (combine_two_steps: 2), or the given row.
template <int kU, bool kEvict = false>
__device__ __forceinline__ void combine_record_rows(const Args& a, const RowSet& rs, int64_t slot,
                                                    int64_t c_begin, int64_t c_end, uint16_t* dst) {
  const Geometry& g = a.g;
  for (int64_t col = c_begin; col < c_end; col += kU * 256) {
    bool valid[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) valid[u] = col + u * 256 < c_end;
    if (a.weighted) {
      float acc[kU][8];
      weighted_rows_u<kU, kEvict>(a.y, g.H, rs, col, valid, acc);
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
// The same for record `slot`, its rows compacted.
template <int kU, bool kEvict = false>
__device__ __forceinline__ void combine_record(const Args& a, int64_t slot, int64_t c_begin,
                                               int64_t c_end, uint16_t* dst) {
  int row;
  float wt;
  record_row(a, slot, &row, &wt);
  combine_record_rows<kU, kEvict>(a, compact_rows(row, wt), slot, c_begin, c_end, dst);
}

// kU: column steps per pass of the weighted sums (combine_two_steps: 2); kEvict:
// combine_stream_rows; kParts (combine_send_parts, session 7): each record's columns split over
// kParts warps at least (a chunk's items split as if the block had kParts times its warps), so
// that fewer distinct expert rows are read at once. kRelease (combine_release_only): the chunk
// flags by a release store alone (publish).
template <int kU, bool kEvict, int kParts = 1, bool kRelease = false>
__device__ void combine_send_block(const Args& a) {
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
    const Split sp = split_work(j1 - j0, (g.H + 255) / 256, kWarps * kParts);
    for (int64_t it = warp; it < sp.items; it += kWarps) {
      const int64_t j = j0 + sp.token(it);
      const int64_t slot = static_cast<int64_t>(s) * g.Tmax + j;
      const int64_t c_begin = sp.first(it) * 256 + lane * 8, c_end = min(g.H, sp.last(it) * 256);
      uint16_t* dst = dst_of(j);
      if (kU > 1) {
        combine_record<kU, kEvict>(a, slot, c_begin, c_end, dst);
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
    __syncthreads();
    if (!a.nccl && threadIdx.x == 0)
      publish<kRelease>([&] { return chunk_flag(peer(a, s), a, kCombineChunk, a.rank, c); }, n);
  };
  // Sources: over NVLink the rank's own records are summed by combine_recv, so with
  // combine_peer_blocks the sources are the peers (index q -> rank).
  const bool peers_only = !a.nccl && a.peer_blocks;
  const int nsrc = peers_only ? g.R - 1 : g.R;
  if (nsrc == 0) return;
  const int grid = static_cast<int>(gridDim.x), b = static_cast<int>(blockIdx.x);
  // Items: (chunk c, source index q).
  // combine_peer_blocks: blocks dealt to the sources, block b serving source b % N, its chunks
  // b / N + i * G_q (G_q the blocks with that residue); with fewer blocks than sources, sources
  // b, b + G, ... whole.
  // Otherwise (chunk, source) pairs, chunk-major, block b taking pairs b, b + G, ...; the rank's
  // own source is in the enumeration and skipped (v5), which idles every block b with
  // b % R == rank whenever G % R == 0 (half of them, 2 ranks).
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

template <int kU, bool kEvict = false, int kParts = 1, bool kRelease = false>
__global__ void __launch_bounds__(kSendThreads) k_combine_send(Args a) {
  if (threadIdx.x == 0) stamp(a, kTrCombSendStart, 2);
  combine_send_block<kU, kEvict, kParts, kRelease>(a);
  count_send_block(a.my, a.lay.status, kCombineSent);
  if (threadIdx.x == 0 && a.trace) {
    stamp(a, kTrCombSendFirstEnd, 2);
    stamp(a, kTrCombSendEnd, 1);
  }
}

// ---- combine send fed by bulk copies (combine_bulk_rows, session 13, ep19) ----
// The record sums of k_combine_send with the expert rows read through shared memory: warp 0 of
// each block (the producer) issues each row's column piece by cp.async.bulk into a ring of
// kBulkStages stages on the stage's mbarrier (complete_tx), the other warps (kBulkTeams consumer
// teams taking alternate items) sum a stage's rows from shared memory in ascending k and store the
// BF16 row to the peer's stage. Same arithmetic, order and rounding as combine_record_rows; the
// chunk flags as k_combine_send's (a named barrier over the consumer warps, then one consumer
// thread publishes), so the receive is unchanged. Shape from ep17's bench (combine_rows_bench,
// docs/comm/README.md "Session 13: a TMA-fed row reduction"): whole 7168-column rows as items, two
// stages, two teams of 7 warps (p7168:s2:t480:m2, the best shape at 64 blocks there: 238-241 us
// against the register path's 300 on one H200); 8 row slots x 2 stages x 14 KB = 224 KB of the
// 227 KB a block may have, so the ring cannot take more stages at that piece.
// An item = one record's piece of at most kBulkPiece columns; a stage holds its up to kMaxTopK
// rows, their count and weights.
constexpr int64_t kBulkPiece = 7168;
constexpr int kBulkStages = 2;
constexpr int kBulkTeams = 2;
constexpr int kBulkTeamWarps = (kWarps - 1) / kBulkTeams;  // 7; the last consumer warp idles
constexpr int kBulkConsumers = (kWarps - 1) * 32;          // the consumer warps' named barrier
constexpr int kBulkGroups = 4;  // 16-byte column groups per consumer thread and item
static_assert(kBulkPiece / 8 <= kBulkGroups * kBulkTeamWarps * 32,
              "a piece's 16-byte groups must fit one pass of a consumer team");
static_assert(kBulkStages % kBulkTeams == 0, "teams must divide the stages (one parity per use)");

// Columns per piece for hidden size H (a multiple of 8): H in ceil(H / kBulkPiece) pieces of
// whole 16-byte groups, the last one shorter.
__host__ __device__ inline int64_t bulk_piece(int64_t H) {
  const int64_t np = (H + kBulkPiece - 1) / kBulkPiece;
  return ((H + np - 1) / np + 7) / 8 * 8;
}

struct BulkRing {
  uint8_t* data;  // kBulkStages x kMaxTopK row pieces of piece_bytes
  uint64_t* full;
  uint64_t* empty;
  int* n;
  float (*w)[kMaxTopK];
};

// cp.async.bulk global -> shared of `bytes` (a multiple of 16, both addresses 16-byte aligned),
// completing on `bar`; L2 evict-first (combine_stream_rows: each expert row is read once).
__device__ __forceinline__ void bulk_row_load(void* dst, const void* src, uint32_t bytes,
                                              uint64_t* bar, unsigned long long pol) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1], %2, [%3], %4;" ::"r"(kernels::sm90::smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(kernels::sm90::smem_addr(bar)), "l"(pol)
      : "memory");
}

// The (chunk, source) pairs a send block serves, in k_combine_send's order (combine_send_block's
// loop as a generator, so that the producer and the consumers walk the same sequence).
struct ChunkWalk {
  const int* roff;
  int64_t item, flat_items;
  int grid, nsrc, q, c, q_step, c_first, c_step, rank, C;
  bool peer_blocks, peers_only, nccl;
  __device__ ChunkWalk(const Args& a, const int* ro) : roff(ro) {
    const Geometry& g = a.g;
    C = g.C;
    rank = a.rank;
    nccl = a.nccl;
    peer_blocks = a.peer_blocks;
    peers_only = !a.nccl && a.peer_blocks;
    nsrc = peers_only ? g.R - 1 : g.R;
    grid = static_cast<int>(gridDim.x);
    const int b = static_cast<int>(blockIdx.x);
    const bool dealt = a.peer_blocks && grid >= nsrc && nsrc > 0;
    q_step = !a.peer_blocks ? 0 : dealt ? nsrc : grid;
    c_first = dealt ? b / nsrc : 0;
    c_step = dealt ? (grid - b % nsrc + nsrc - 1) / nsrc : 1;
    int most = 0;
    for (int s = 0; s < g.R; ++s) most = max(most, roff[s + 1] - roff[s]);
    flat_items = (static_cast<int64_t>(most) + g.C - 1) / g.C * nsrc;
    q = a.peer_blocks ? (dealt ? b % nsrc : b) : 0;
    c = c_first;
    item = b;
    if (nsrc == 0) q = 0, flat_items = 0, peer_blocks = false;
  }
  // The next chunk c of source s with records to send; false when the block is done.
  __device__ bool next(int* c_out, int* s_out) {
    for (;;) {
      if (!peer_blocks) {
        if (item >= flat_items) return false;
        c = static_cast<int>(item / nsrc);
        q = static_cast<int>(item % nsrc);
      } else if (q >= nsrc) {
        return false;
      }
      const int s = peers_only && q >= rank ? q + 1 : q;
      const int count = roff[s + 1] - roff[s];
      item += grid;
      if (peer_blocks && c * C >= count) {
        q += q_step;
        c = c_first;
        continue;
      }
      const int c_now = c;
      c += c_step;
      if ((nccl || s != rank) && c_now * C < count) {
        *c_out = c_now;
        *s_out = s;
        return true;
      }
    }
  }
};

// The block's records in send order (the chunks' records ascending), one group of up to 4 at a
// time: slots s * Tmax + j.
struct RecordGroup {
  int slot[4];
  int cnt;
};
struct RecordStream {
  ChunkWalk walk;
  int j = 0, j1 = 0, base = 0;
  bool done = false;
  __device__ RecordStream(const Args& a, const int* roff) : walk(a, roff) { next_chunk(a); }
  __device__ void next_chunk(const Args& a) {
    int c, s;
    if (!walk.next(&c, &s)) {
      done = true;
      return;
    }
    const int count = walk.roff[s + 1] - walk.roff[s];
    j = c * a.g.C;
    j1 = min(count, j + a.g.C);
    base = s * static_cast<int>(a.g.Tmax);
  }
  __device__ RecordGroup take(const Args& a) {
    RecordGroup r;
    r.cnt = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      r.slot[i] = 0;
      if (done) continue;
      r.slot[i] = static_cast<int>(base + j);
      ++r.cnt;
      if (++j >= j1) next_chunk(a);
    }
    return r;
  }
};

// Lane l's entry of a group: record l / 8's row k = l % 8 (-1: none); without weights (combine
// tokens) the record's own row y[slot] as its only row.
__device__ __forceinline__ int group_row(const Args& a, const RecordGroup& grp) {
  const int lane = threadIdx.x & 31, i = lane / 8, k = lane % 8;
  int slot = grp.slot[0];
#pragma unroll
  for (int x = 1; x < 4; ++x)
    if (i == x) slot = grp.slot[x];
  if (i >= grp.cnt) return -1;
  if (!a.weighted) return k == 0 ? slot : -1;
  return k < a.g.K ? at<int32_t>(a.my, a.lay.token_rows)[static_cast<int64_t>(slot) * a.g.K + k]
                   : -1;
}

// Producer warp: per item wait for the stage to be empty, write the row count and weights, post
// the bytes to expect, and lane i < n issues row i's piece. A group's row indices are loaded two
// groups ahead and their weights one group ahead (two dependent round trips off the issue path).
__device__ void bulk_produce(const Args& a, const int* roff, const BulkRing& r) {
  using namespace kernels::sm90;
  const int lane = threadIdx.x & 31;
  const Geometry& g = a.g;
  const unsigned long long pol = evict_first_policy();
  const float* row_weight = at<float>(a.my, a.lay.row_weight);
  const int64_t piece = bulk_piece(g.H), piece_bytes = piece * 2;
  // Of each group only its record count and lane's row are kept (registers: the group's slots
  // are dropped once its rows are loaded).
  RecordStream ahead(a, roff);
  RecordGroup grp = ahead.take(a);
  int cnt_cur = grp.cnt, row_cur = group_row(a, grp);
  float w_cur = a.weighted && row_cur >= 0 ? row_weight[row_cur] : 1.0f;
  grp = ahead.take(a);
  int cnt_nxt = grp.cnt, row_nxt = group_row(a, grp);
  int s = 0;
  uint32_t ph = 0;
  while (cnt_cur > 0) {
    const float w_nxt = a.weighted && row_nxt >= 0 ? row_weight[row_nxt] : 1.0f;
    grp = ahead.take(a);
    const int cnt_after = grp.cnt, row_after = group_row(a, grp);
    const unsigned m_all = __ballot_sync(kFull, row_cur >= 0);
    for (int q = 0; q < cnt_cur; ++q) {
      const unsigned m = (m_all >> (q * 8)) & 0xFFu;
      const int n = __popc(m);
      const int src = lane < n ? q * 8 + static_cast<int>(__fns(m, 0, lane + 1)) : 0;
      const int row = __shfl_sync(kFull, row_cur, src);
      const float w = __shfl_sync(kFull, w_cur, src);
      for (int64_t c0 = 0; c0 < g.H; c0 += piece) {
        const uint32_t bytes = static_cast<uint32_t>(min(piece, g.H - c0) * 2);
        mbar_wait(&r.empty[s], ph ^ 1u);
        if (lane < n) r.w[s][lane] = w;
        if (lane == 0) r.n[s] = n;
        __syncwarp();
        if (lane == 0) mbar_arrive_expect_tx(&r.full[s], n * bytes);
        __syncwarp();
        if (lane < n)
          bulk_row_load(r.data + (static_cast<int64_t>(s) * kMaxTopK + lane) * piece_bytes,
                        a.y + static_cast<int64_t>(row) * g.H + c0, bytes, &r.full[s], pol);
        if (++s == kBulkStages) s = 0, ph ^= 1u;
      }
    }
    cnt_cur = cnt_nxt;
    row_cur = row_nxt;
    w_cur = w_nxt;
    cnt_nxt = cnt_after;
    row_nxt = row_after;
  }
}

// 8 columns of one item: the stage's n rows summed with their weights in ascending k from +0
// (__fmul_rn then __fadd_rn: weighted_rows_u's arithmetic), or the single row as it is (combine
// tokens).
__device__ __forceinline__ uint4 bulk_sum_cols(const uint8_t* stage, int64_t piece_bytes, int n,
                                               const float* w, int64_t g16, bool weighted) {
  if (!weighted) return *reinterpret_cast<const uint4*>(stage + g16 * 16);
  uint4 v[kMaxTopK];
#pragma unroll
  for (int k = 0; k < kMaxTopK; ++k)
    if (k < n) v[k] = *reinterpret_cast<const uint4*>(stage + k * piece_bytes + g16 * 16);
  float acc[8];
#pragma unroll
  for (int x = 0; x < 8; ++x) acc[x] = 0.0f;
#pragma unroll
  for (int k = 0; k < kMaxTopK; ++k) {
    if (k >= n) break;
    const float wk = w[k];
    add_weighted_bf16x8(acc, wk, v[k]);
  }
  return pack_bf16(acc);
}

// Consumer warps (warps 1..15): team t of kBulkTeamWarps warps takes the items i with
// i % kBulkTeams == t, in the producer's order; per item wait for the stage, sum its 16-byte column
// groups (strided over the team's threads) into registers, store them to the peer's stage, release
// the stage. After each chunk every consumer warp (the idle one too) meets at named barrier 1, and
// the first consumer thread raises the chunk's flag (publish: the barrier orders every consumer's
// stores before it, as k_combine_send's __syncthreads does).
template <bool kRelease>
__device__ void bulk_consume(const Args& a, const int* roff, const BulkRing& r,
                             unsigned long long n_round) {
  using namespace kernels::sm90;
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31, cw = (threadIdx.x >> 5) - 1;
  const int team = cw / kBulkTeamWarps;  // kBulkTeams: the idle warp
  const int ti = (cw % kBulkTeamWarps) * 32 + lane;
  constexpr int kTeamThreads = kBulkTeamWarps * 32;
  const int64_t piece = bulk_piece(g.H), piece_bytes = piece * 2;
  ChunkWalk walk(a, roff);
  int s = 0, turn = 0;
  uint32_t ph = 0;
  int c, src;
  while (walk.next(&c, &src)) {
    const int64_t count = roff[src + 1] - roff[src];
    const int64_t j0 = static_cast<int64_t>(c) * g.C, j1 = min(count, j0 + g.C);
    uint16_t* region = at<uint16_t>(peer(a, src), a.lay.comb_stage) +
                       static_cast<int64_t>(out_region(a, src)) * g.Tmax * g.H;
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t c0 = 0; c0 < g.H; c0 += piece) {
        if (turn == team) {
          mbar_wait(&r.full[s], ph);
          const int n = r.n[s];
          float w[kMaxTopK];
#pragma unroll
          for (int k = 0; k < kMaxTopK; ++k) w[k] = k < n ? r.w[s][k] : 0.0f;
          const uint8_t* stage = r.data + static_cast<int64_t>(s) * kMaxTopK * piece_bytes;
          const int64_t groups = min(piece, g.H - c0) / 8;
          uint16_t* dst = region + j * g.H + c0;
          // NOTE: two groups at a time (16 LDS in flight): fully unrolled, ptxas spilled 92-108
          // bytes at the 128-register bound of 512 threads; two at a time, 113 registers, none.
#pragma unroll 2
          for (int x = 0; x < kBulkGroups; ++x)
            if (ti + x * kTeamThreads < groups)
              *reinterpret_cast<uint4*>(dst + (ti + x * kTeamThreads) * 8) =
                  bulk_sum_cols(stage, piece_bytes, n, w, ti + x * kTeamThreads, a.weighted);
          __syncwarp();
          if (lane == 0) mbar_arrive(&r.empty[s]);
        }
        if (++s == kBulkStages) s = 0, ph ^= 1u;
        if (++turn == kBulkTeams) turn = 0;
      }
    asm volatile("bar.sync 1, %0;" ::"n"(kBulkConsumers) : "memory");
    if (!a.nccl && threadIdx.x == 32)
      publish<kRelease>([&] { return chunk_flag(peer(a, src), a, kCombineChunk, a.rank, c); },
                        n_round);
  }
}

template <bool kRelease>
__global__ void __launch_bounds__(kSendThreads) k_combine_send_bulk(Args a) {
  extern __shared__ __align__(128) uint8_t bulk_ring[];
  __shared__ int roff[kMaxRanks + 1];
  __shared__ int abort_flag;
  __shared__ uint64_t full[kBulkStages], empty[kBulkStages];
  __shared__ int n_rows[kBulkStages];
  __shared__ float weights[kBulkStages][kMaxTopK];
  if (threadIdx.x == 0) stamp(a, kTrCombSendStart, 2);
  const Geometry& g = a.g;
  int64_t* status = at<int64_t>(a.my, a.lay.status);
  const unsigned long long n = static_cast<unsigned long long>(status[kSeqCombine]) + 1;
  if (threadIdx.x == 0) {
    abort_flag = 0;
    for (int s = 0; s < kBulkStages; ++s) {
      kernels::sm90::mbar_init(&full[s], 1);
      kernels::sm90::mbar_init(&empty[s], kBulkTeamWarps);
    }
    kernels::sm90::fence_barrier_init();
  }
  if (threadIdx.x <= g.R) roff[threadIdx.x] = at<int32_t>(a.my, a.lay.recv_offset)[threadIdx.x];
  __syncthreads();
  if (!a.nccl) allow_dependent_launch();
  // The previous round's acknowledgements before any store into a peer's stage (as
  // k_combine_send; the producer waits too: it is cheap, and the loop below is then one shape).
  if (!a.nccl && threadIdx.x < g.R && threadIdx.x != a.rank &&
      !wait_geq(flag(a.my, a, kCombineAck, threadIdx.x), n - 1, a.err, a.rank, threadIdx.x,
                kCombineAck, -1, a.timeout_ns))
    abort_flag = 1;
  __syncthreads();
  if (!abort_flag) {
    const BulkRing r{bulk_ring, full, empty, n_rows, weights};
    if (threadIdx.x < 32)
      bulk_produce(a, roff, r);
    else
      bulk_consume<kRelease>(a, roff, r, n);
  }
  count_send_block(a.my, a.lay.status, kCombineSent);
  if (threadIdx.x == 0 && a.trace) {
    stamp(a, kTrCombSendFirstEnd, 2);
    stamp(a, kTrCombSendEnd, 1);
  }
}

// ---- combine receive: per tile of tokens, wait for the chunks holding their partials, then sum
// the partials in rank order (the rank's own computed here from its expert rows) ----
// One token's sum over ranks, columns [c_lo, c_hi) (whole 256-column steps), two steps per pass:
// the rank's own partial from its expert rows `rs` (rounded to BF16 like a staged one), the
// others' from the stage, added in rank order. Lane d < R holds the token's slot at d.
// kEvict (combine_stream_rows): the own rows are loaded evict-first and the staged partials
// (read once, here) are streaming loads.
// kEarly (combine_recv_early_stage, session 7): the staged partial of the first other rank in
// rank order (d_e) is loaded at the start of each pass, beside the own rows, instead of after the
// own partial is summed: one dependent load round trip fewer per pass; the same sums in the same
// order.
// With kEarly the rows come from shared memory (SmemRows: registers for the early loads).
template <bool kEvict = false, bool kEarly = false, class Rows = RowSet>
__device__ __forceinline__ void combine_recv_token2(const Args& a, int64_t t, int64_t c_lo,
                                                    int64_t c_hi, int my_slot, int js_self,
                                                    const Rows& rs, const uint16_t* stage) {
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31;
  const bool self_local = !a.nccl;
  const int64_t self_slot = static_cast<int64_t>(a.rank) * g.Tmax + js_self;
  const int d_e = self_local && a.rank == 0 ? 1 : 0;
  const int js_e = kEarly ? __shfl_sync(kFull, my_slot, d_e & 31) : -1;
  const bool early = kEarly && d_e < g.R && js_e >= 0;
  // NOTE: the column loop is warp-uniform (shuffles inside); lanes past H only skip memory.
  for (int64_t c0 = c_lo; c0 < c_hi; c0 += 512) {
    const int64_t c = c0 + lane * 8;
    const bool valid[2] = {c < g.H, c0 + 256 < c_hi && c + 256 < g.H};
    uint4 ve[2];
    if (early) {
      const uint16_t* src = stage + (static_cast<int64_t>(d_e) * g.Tmax + js_e) * g.H + c;
#pragma unroll
      for (int u = 0; u < 2; ++u)
        if (valid[u])
          ve[u] = kEvict ? __ldcs(reinterpret_cast<const uint4*>(src + u * 256))
                         : __ldcg(reinterpret_cast<const uint4*>(src + u * 256));
    }
    // The staged rows of ranks d0 and d0 + 1 (js -1: none, or the own partial).
    auto load_pair = [&](int d0, uint4(&v)[2][2], int(&js)[2]) {
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        js[q] = __shfl_sync(kFull, my_slot, (d0 + q) & 31);
        if (d0 + q >= g.R) js[q] = -1;
        if (js[q] >= 0 && !(self_local && d0 + q == a.rank) && !(kEarly && d0 + q == d_e)) {
          const uint16_t* src = stage + (static_cast<int64_t>(d0 + q) * g.Tmax + js[q]) * g.H + c;
#pragma unroll
          for (int u = 0; u < 2; ++u)
            if (valid[u])
              v[u][q] = kEvict ? __ldcs(reinterpret_cast<const uint4*>(src + u * 256))
                               : __ldcg(reinterpret_cast<const uint4*>(src + u * 256));
        }
      }
    };
    float self[2][8];
    if (self_local && js_self >= 0) {
      if (a.weighted) {
        if constexpr (kEarly)
          weighted_rows_smem<2, kEvict>(a.y, g.H, rs, c, valid, self);
        else
          weighted_rows_u<2, kEvict>(a.y, g.H, rs, c, valid, self);
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
          const uint4* vp = &v[u][q];
          uint4 vq;
          if constexpr (kEarly) {
            vq = d0 + q == d_e ? ve[u] : v[u][q];
            vp = &vq;
          }
          const uint32_t* vw = reinterpret_cast<const uint32_t*>(vp);
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            acc[u][2 * x] = __fadd_rn(acc[u][2 * x], __uint_as_float(vw[x] << 16));
            acc[u][2 * x + 1] = __fadd_rn(acc[u][2 * x + 1], __uint_as_float(vw[x] & 0xFFFF0000u));
          }
        }
      }
    };
    for (int d0 = 0; d0 < g.R; d0 += 2) {
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

// kU = 2 (combine_two_steps): two column steps per pass (the self rows compacted).
// NOTE: kU = 2 leaves the v5 column loop after its `continue` unreachable (diagnostic 128).
#pragma nv_diag_suppress 128
// combine_recv_warp_items (session 7, with combine_recv_warp_wait): each warp claims its own
// (token, column part) items from the receive's item counter, one claim ahead, and waits for that
// token's chunks itself: no block barrier between items, so no warp idles behind the slowest
// token of a tile. Parts per token as the block tiles would give (kWarps / tile, at least 1);
// items in token order, so that claims still follow the chunks' arrival. A wait that times out
// records the error and sets abort_flag, which every warp of the block then sees.
template <bool kEvict, bool kEarly>
__device__ __forceinline__ void combine_recv_warp_items(const Args& a, unsigned long long n,
                                                        volatile int* abort_flag, int* early_rows,
                                                        float* early_w) {
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31;
  int64_t* status = at<int64_t>(a.my, a.lay.status);
  const int32_t* slot = at<int32_t>(a.my, a.lay.slot);
  const uint16_t* stage = at<uint16_t>(a.my, a.lay.comb_stage);
  const int32_t* token_rows = at<int32_t>(a.my, a.lay.token_rows);
  const float* row_weight = at<float>(a.my, a.lay.row_weight);
  const bool self_local = !a.nccl;
  const int64_t steps = (g.H + 255) / 256;
  const int64_t parts = max(int64_t{1}, min(steps, static_cast<int64_t>(kWarps / a.tile)));
  const int64_t items = a.T * parts;
  unsigned long long* counter = reinterpret_cast<unsigned long long*>(status + kCombineItem);
  auto claim = [&] {
    unsigned long long v = 0;
    if (lane == 0) v = atomicAdd(counter, 1ull);
    return static_cast<int64_t>(__shfl_sync(kFull, v, 0));
  };
  int64_t item = claim();
  while (item < items && !*abort_flag) {
    const int64_t next = claim();  // in flight while this item runs
    const int64_t t = item / parts, part = item % parts;
    const int64_t c_lo = part * steps / parts * 256, c_hi = (part + 1) * steps / parts * 256;
    item = next;
    const int my_slot = lane < g.R ? slot[t * g.R + lane] : -1;
    const int js_self = __shfl_sync(kFull, my_slot, a.rank);
    const int64_t self_slot = static_cast<int64_t>(a.rank) * g.Tmax + js_self;
    int row = -1;
    float wt = 0.0f;
    if (self_local && js_self >= 0 && a.weighted && lane < g.K)
      row = token_rows[self_slot * g.K + lane];
    if (!a.nccl) {
      bool ok = true;
      if (lane < g.R && lane != a.rank && my_slot >= 0) {
        const unsigned long long* f = chunk_flag(a.my, a, kCombineChunk, lane, my_slot / g.C);
        if (ld_acquire_sys(f) < n)
          ok = wait_geq(f, n, a.err, a.rank, lane, kCombineChunk, my_slot / g.C, a.timeout_ns);
      }
      if (__any_sync(kFull, !ok)) {
        *abort_flag = 1;
        break;
      }
      __syncwarp();  // orders lane d's acquire before every lane's loads of the partials
    }
    if (row >= 0) wt = row_weight[row];
    if constexpr (kEarly)
      combine_recv_token2<kEvict, true>(a, t, c_lo, c_hi, my_slot, js_self,
                                        compact_rows_smem(row, wt, early_rows, early_w), stage);
    else
      combine_recv_token2<kEvict>(a, t, c_lo, c_hi, my_slot, js_self, compact_rows(row, wt), stage);
  }
  __syncthreads();  // every warp done (and abort_flag final) before the block counts itself
}

// kEarly: combine_recv_token2's. kWarpWait (combine_recv_warp_wait, session 7): each warp
// waits for the chunks holding its own token's partials (lane d polls source d's chunk), between
// its loads of the token's rows and of their weights, instead of one thread per source waiting for
// the whole tile's chunks behind a block barrier before any warp starts its token: the flag's
// round trip overlaps the token's own index loads, and no warp waits for another's chunks.
// kWarpItems: combine_recv_warp_items (with kWarpWait). kRelease (combine_release_only): the
// acknowledgements by release stores alone (publish).
template <int kU, bool kEvict = false, bool kEarly = false, bool kWarpWait = false,
          bool kWarpItems = false, bool kRelease = false>
__global__ void __launch_bounds__(kSendThreads) k_combine_recv(Args a) {
  __shared__ int abort_flag;
  __shared__ int last_block;
  __shared__ int early_rows[kEarly ? kWarps : 1][kMaxTopK];
  __shared__ float early_w[kEarly ? kWarps : 1][kMaxTopK];
  static_assert(!kWarpItems || kWarpWait, "combine_recv_warp_items waits per warp");
  if (threadIdx.x == 0) stamp(a, kTrCombRecvStart, 2);
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
  if constexpr (kWarpItems)
    combine_recv_warp_items<kEvict, kEarly>(a, n, &abort_flag, early_rows[warp], early_w[warp]);
  else
    for (int64_t item = claim_item(status + kCombineItem, &claimed); item < items;
         item = claim_item(status + kCombineItem, &claimed)) {
      if (kWarpWait && abort_flag) return;  // a warp's wait timed out (set before claim's barrier)
      const int64_t t0 = item * a.tile, t1 = min(a.T, t0 + a.tile);
      if (!a.nccl && !kWarpWait) {
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
      // One token's columns [c_lo, c_hi) (whole steps).
      // NOTE: as a lambda called from the item loop (session 6) k_combine_recv<2, true> spills 20 B
      // (stores), not 32 as with the body inline in the loop; the session-6 build with this form
      // read 292.6 us where the session-5 head build read 349.2 in the same call (2 x H100); which
      // difference of the two builds made that was not isolated (docs/comm/README.md, "Session 6").
      auto token_cols = [&](int64_t t, int64_t c_lo, int64_t c_hi) {
        const int my_slot = lane < g.R ? slot[t * g.R + lane] : -1;
        const int js_self = __shfl_sync(kFull, my_slot, a.rank);
        const int64_t self_slot = static_cast<int64_t>(a.rank) * g.Tmax + js_self;
        int row = -1;
        float wt = 0.0f;
        if constexpr (kWarpWait) {
          if (self_local && js_self >= 0 && a.weighted && lane < g.K)
            row = token_rows[self_slot * g.K + lane];
          if (!a.nccl) {
            // Lane d: the chunk of source d holding this token's partial (its flag's first load
            // in line; wait_geq only when it is not there yet).
            bool ok = true;
            if (lane < g.R && lane != a.rank && my_slot >= 0) {
              const unsigned long long* f = chunk_flag(a.my, a, kCombineChunk, lane, my_slot / g.C);
              if (ld_acquire_sys(f) < n)
                ok =
                    wait_geq(f, n, a.err, a.rank, lane, kCombineChunk, my_slot / g.C, a.timeout_ns);
            }
            if (__any_sync(kFull, !ok)) {
              abort_flag = 1;
              return;
            }
            __syncwarp();  // orders lane d's acquire before every lane's loads of the partials
          }
          if (row >= 0) wt = row_weight[row];
        } else if (self_local && js_self >= 0 && a.weighted && lane < g.K) {
          row = token_rows[self_slot * g.K + lane];
          if (row >= 0) wt = row_weight[row];
        }
        if constexpr (kU == 2 && kEarly) {
          combine_recv_token2<kEvict, true>(
              a, t, c_lo, c_hi, my_slot, js_self,
              compact_rows_smem(row, wt, early_rows[warp], early_w[warp]), stage);
          return;
        } else if constexpr (kU == 2) {
          combine_recv_token2<kEvict>(a, t, c_lo, c_hi, my_slot, js_self, compact_rows(row, wt),
                                      stage);
          return;
        }
        int rows[kMaxTopK];
        float ws[kMaxTopK];
#pragma unroll
        for (int k = 0; k < kMaxTopK; ++k) {
          rows[k] = __shfl_sync(kFull, row, k < g.K ? k : 0);
          ws[k] = __shfl_sync(kFull, wt, k < g.K ? k : 0);
        }
        // NOTE: the column loop is warp-uniform (shuffles inside); lanes past H only skip memory.
        for (int64_t c0 = c_lo; c0 < c_hi; c0 += 256) {
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
      };
      const Split sp = split_work(t1 - t0, (g.H + 255) / 256, kWarps);
      for (int64_t it = warp; it < sp.items; it += kWarps)
        token_cols(t0 + sp.token(it), sp.first(it) * 256, sp.last(it) * 256);
    }
  // Read after claim_item's (or combine_recv_warp_items') barriers, like the item loop's.
  if ((kWarpWait || kWarpItems) && abort_flag) return;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned long long done =
        atomicAdd(reinterpret_cast<unsigned long long*>(status + kCombineDone), 1ull);
    last_block = done == gridDim.x - 1;
    last_block_acquire<kRelease>(last_block);
  }
  __syncthreads();
  if (!last_block) return;
  if (threadIdx.x == 0)
    wait_geq(reinterpret_cast<unsigned long long*>(status) + kCombineSent, n * a.send_blocks, a.err,
             a.rank, a.rank, kLocalSent, -1, a.timeout_ns);
  __syncthreads();
  if (!a.nccl && threadIdx.x < g.R)
    publish<kRelease>([&] { return flag(peer(a, threadIdx.x), a, kCombineAck, a.rank); }, n);
  if (threadIdx.x == 0) {
    status[kCombineDone] = 0;
    status[kCombineItem] = 0;
    status[kSeqCombine] = static_cast<int64_t>(n);
    stamp(a, kTrCombRecvEnd, 0);
  }
}

#pragma nv_diag_default 128

// combine_stream_rows applies to the two-step sums.
bool stream_rows(const DeviceEpOptions& o) {
  return o.combine_stream_rows && o.combine_two_steps;
}

// combine_bulk_rows applies with combine_stream_rows (the record sums' evict-first reads).
bool combine_bulk(const DeviceEpOptions& o) {
  return o.combine_bulk_rows && stream_rows(o);
}

}  // namespace

// Dynamic shared memory of the combine send: combine_bulk_rows' ring, else none.
size_t combine_send_smem(const DeviceEpOptions& o, const Geometry& g) {
  if (!combine_bulk(o)) return 0;
  return static_cast<size_t>(kBulkStages) * kMaxTopK * bulk_piece(g.H) * 2;
}

// The kernel variants the options select (DeviceEpOptions: combine_two_steps, combine_stream_rows;
// combine_release_only with both of them, and for the receive with combine_recv_warp_items).
KernelFn combine_send_kernel(const DeviceEpOptions& o) {
  if (combine_bulk(o))
    return o.combine_release_only ? k_combine_send_bulk<true> : k_combine_send_bulk<false>;
  if (stream_rows(o) && o.combine_release_only)
    return o.combine_send_parts == 4   ? k_combine_send<2, true, 4, true>
           : o.combine_send_parts == 2 ? k_combine_send<2, true, 2, true>
                                       : k_combine_send<2, true, 1, true>;
  if (stream_rows(o))
    return o.combine_send_parts == 4   ? k_combine_send<2, true, 4>
           : o.combine_send_parts == 2 ? k_combine_send<2, true, 2>
                                       : k_combine_send<2, true>;
  return o.combine_two_steps ? k_combine_send<2> : k_combine_send<1>;
}
KernelFn combine_recv_kernel(const DeviceEpOptions& o) {
  if (stream_rows(o) && o.combine_recv_warp_items && o.combine_release_only)
    return o.combine_recv_early_stage ? k_combine_recv<2, true, true, true, true, true>
                                      : k_combine_recv<2, true, false, true, true, true>;
  if (stream_rows(o)) {
    if (o.combine_recv_warp_items)
      return o.combine_recv_early_stage ? k_combine_recv<2, true, true, true, true>
                                        : k_combine_recv<2, true, false, true, true>;
    if (o.combine_recv_early_stage && o.combine_recv_warp_wait)
      return k_combine_recv<2, true, true, true>;
    if (o.combine_recv_early_stage) return k_combine_recv<2, true, true>;
    if (o.combine_recv_warp_wait) return k_combine_recv<2, true, false, true>;
    return k_combine_recv<2, true>;
  }
  return o.combine_two_steps ? k_combine_recv<2> : k_combine_recv<1>;
}

}  // namespace fp8moe::comm::normal
