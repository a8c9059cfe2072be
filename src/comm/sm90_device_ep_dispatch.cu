// Expert-parallel dispatch over peer-mapped NVLink buffers (fp8moe/comm/device_ep.h): the plan,
// send and receive kernels of the normal path (DeviceEpRank, sm90_device_ep.cu, launches them).
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
// flight. Acks from the consumer make every buffer reusable without a host round trip.
// Dispatch with DeviceEpOptions::dispatch_direct_rows (default): every source also broadcasts its
// per-expert counts with its notify, so each send block lays out every destination itself and
// writes a token's payload straight into its lowest-k grouped row there (dispatch_self_rows:
// every row of the rank's own tokens); the receive then copies only the remaining rows. The plan
// kernel counts its tiles with shared-memory atomics (DeviceEpOptions::plan_fast_count, session 5)
// and the send blocks lay the destinations out with all their count loads in flight at once.
// Session 8 (off): the plan's prefixes by per-block scans and a look-back over the blocks'
// published sums (plan_block_scan), those sums stored straight into every rank as (round, count)
// words that the send blocks add up instead of waiting for the notify (dispatch_plan_counts),
// and flags raised by a release store alone (dispatch_release_only; the receive's acknowledgements
// with combine_release_only, ep10). Session 13 late (ep21; a default since session 14): the
// receive's row copies by bulk copies through a shared-memory slot per warp
// (dispatch_recv_bulk_rows). Session 14 (ep22, a default): the source-region send stores each
// record at its token's index (layout_token_slots), so its payload leaves before the plan kernel
// ends; only the metadata, chunk counts and notify wait. Session 15 (ep25, off): with token slots
// and without the expansion, the payload claimed per warp in units of a few 1024-column steps
// from one counter, with no block barrier, and published by one release add per block and
// destination that the receive's last block waits for (layout_payload_claims).
// Reference: dispatch_reference / combine_reference (src/comm/ep_reference.cpp), bit for bit.
// Test: build-comm-dev/test_comm_gpu or build-device/tests/test_comm_gpu
// (tests/comm/device_ep_gpu_test.cu).
#include <cstdint>

#include "../kernels/sm90_ptx.cuh"
#include "sm90_device_ep_kernels.cuh"

namespace fp8moe::comm::normal {

namespace {

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

// The count of a published word once its round is n (polled like wait_geq); -1 on timeout, the
// error recorded with the round seen.
__device__ long long wait_round_word(const unsigned long long* p, unsigned long long n,
                                     const Args& a, int peer, int counter, long long detail) {
  const unsigned want = static_cast<unsigned>(n);
  unsigned long long v = ld_relaxed_sys(p);
  if (static_cast<unsigned>(v >> 32) == want) return static_cast<long long>(v & 0xFFFFFFFFull);
  const unsigned long long t0 = globaltimer();
  const long long c0 = clock64();
  const long long max_cycles = static_cast<long long>(a.timeout_ns) * 3;
  for (;;) {
    __nanosleep(32);
    v = ld_relaxed_sys(p);
    if (static_cast<unsigned>(v >> 32) == want) return static_cast<long long>(v & 0xFFFFFFFFull);
    if (*reinterpret_cast<volatile int*>(&a.err->code) == kErrTimeout) return -1;
    if (globaltimer() - t0 > a.timeout_ns || clock64() - c0 > max_cycles) {
      record_error(a.err, kErrTimeout, a.rank, peer, counter, n, v >> 32, detail);
      return -1;
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
// treated as none, as the reference rejects it. kBatched (plan_fast_count): all K ids are loaded
// before the first is checked (the checks' error path holds a fence; the phase stamps put the
// plan's id loads at ~2 µs either way, so this was not the plan's cost).
template <bool kBatched = false>
__device__ __forceinline__ void load_experts(const Args& a, int64_t t, bool valid, int* ev,
                                             bool report) {
  const Geometry& g = a.g;
  if constexpr (kBatched) {
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k) ev[k] = (valid && k < g.K) ? __ldg(a.idx + t * g.K + k) : -1;
  }
#pragma unroll
  for (int k = 0; k < kMaxTopK; ++k) {
    int e = kBatched ? ev[k] : (valid && k < g.K) ? __ldg(a.idx + t * g.K + k) : -1;
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
// kTokenSlots (layout_token_slots): the record goes to slot t at every destination, which the
// token's own expert ids name, so the plan is not read.
template <bool kPrefetch, bool kTokenSlots = false>
__device__ __forceinline__ void push_payload(const Args& a, const Plan& p, int64_t t, int64_t first,
                                             int64_t last) {
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31;
  // Lane d < R holds the token's slot at destination d (-1: not sent there).
  int jl = -1;
  unsigned mask;
  if constexpr (kTokenSlots) {
    // An id out of range counts as none, as in the plan (which reports it).
    const int e = lane < g.K ? __ldg(a.idx + t * g.K + lane) : -1;
    mask = __reduce_or_sync(kFull, e >= 0 && e < g.E ? 1u << (e / g.L) : 0u);
  } else {
    if (lane < g.R) {
      const int tile = static_cast<int>(t / kTile);
      const uint32_t b = p.dball[lane * g.NT + tile];
      if ((b >> (t % kTile)) & 1u) jl = p.dc(lane, tile) + __popc(b & ((1u << (t % kTile)) - 1u));
    }
    mask = __ballot_sync(kFull, jl >= 0);
  }
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
        char* rec =
            record_of(a, peer(a, d), out_region(a, d), kTokenSlots ? t : __shfl_sync(kFull, jl, d));
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
      char* rec =
          record_of(a, peer(a, d), out_region(a, d), kTokenSlots ? t : __shfl_sync(kFull, jl, d));
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

// direct_layout with plan_fast_count: one thread per (destination, expert) sums the sources'
// counts (all its loads issued together: one L2 round trip for the block instead of one per
// 32 experts in each warp), then one warp per destination scans the block sizes in shared memory.
// `scratch`: E ints of shared memory that are zero before and after (the send's lane masks).
__device__ void direct_layout_fast(const Args& a, int* rowbase, unsigned* ovf, int* scratch) {
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int32_t* cnt = at<int32_t>(a.my, a.lay.all_counts);
  constexpr int kBatch = 8;
  for (int i = threadIdx.x; i < g.E; i += blockDim.x) {  // i = d * L + e
    int tot = 0, below = 0;
    for (int s0 = 0; s0 < g.R; s0 += kBatch) {
      int c[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) c[u] = s0 + u < g.R ? __ldcg(cnt + (s0 + u) * g.E + i) : 0;
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        tot += c[u];
        below += s0 + u < a.rank ? c[u] : 0;
      }
    }
    scratch[i] = (tot + 127) / 128 * 128;
    rowbase[i] = below;
  }
  __syncthreads();
  for (int d = warp; d < g.R; d += kWarps) {
    int run = 0;
    for (int e0 = 0; e0 < g.L; e0 += 32) {
      const int e = e0 + lane;
      const int size = e < g.L ? scratch[d * g.L + e] : 0;
      const int incl = warp_inclusive_sum(size);
      if (e < g.L) rowbase[d * g.L + e] += run + incl - size;
      run += __shfl_sync(kFull, incl, 31);
    }
    if (lane == 0 && run > g.bound) atomicOr(ovf, 1u << d);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < g.E; i += blockDim.x) scratch[i] = 0;
}

// direct_layout_fast from the plan blocks' published counts (dispatch_plan_counts): each
// source's count of an expert is the sum of its plan blocks' (round, count) words, every word
// waited for until its round is n (all of a thread's loads issued together: one L2 round trip
// once they have landed). False in the threads that timed out (the error is recorded, counter
// dispatch.notify: these words stand in for the source's notify).
__device__ bool direct_layout_parts(const Args& a, int* rowbase, unsigned* ovf, int* scratch,
                                    unsigned long long n) {
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nb = plan_blocks(g), pieces = g.R * nb;
  constexpr int kBatch = 16;
  bool ok = true;
  for (int i = threadIdx.x; i < g.E; i += blockDim.x) {  // i = d * L + e
    int tot = 0, below = 0;
    for (int q0 = 0; q0 < pieces; q0 += kBatch) {
      unsigned long long v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        v[u] = q0 + u < pieces
                   ? ld_relaxed_sys(plan_part(a.my, a, n, (q0 + u) / nb, (q0 + u) % nb) + i)
                   : 0;
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (q0 + u >= pieces) continue;
        const int s = (q0 + u) / nb;
        long long c = static_cast<unsigned>(v[u] >> 32) == static_cast<unsigned>(n)
                          ? static_cast<long long>(v[u] & 0xFFFFFFFFull)
                          : -1;
        if (c < 0 && ok)
          c = wait_round_word(plan_part(a.my, a, n, s, (q0 + u) % nb) + i, n, a, s, kDispatchNotify,
                              -1);
        if (c < 0) {
          ok = false;
          continue;
        }
        tot += static_cast<int>(c);
        below += s < a.rank ? static_cast<int>(c) : 0;
      }
    }
    scratch[i] = (tot + 127) / 128 * 128;
    rowbase[i] = below;
  }
  __syncthreads();
  for (int d = warp; d < g.R; d += kWarps) {
    int run = 0;
    for (int e0 = 0; e0 < g.L; e0 += 32) {
      const int e = e0 + lane;
      const int size = e < g.L ? scratch[d * g.L + e] : 0;
      const int incl = warp_inclusive_sum(size);
      if (e < g.L) rowbase[d * g.L + e] += run + incl - size;
      run += __shfl_sync(kFull, incl, 31);
    }
    if (lane == 0 && run > g.bound) atomicOr(ovf, 1u << d);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < g.E; i += blockDim.x) scratch[i] = 0;
  return ok;
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
    if (over) {
      char* rec = record_of(a, base, out_region(a, dk), jd);
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
        const int k = __ffs(m) - 1;
        char* dst = reinterpret_cast<char*>(__shfl_sync(kFull, code, k));
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

// Bits of the send kernel's kPro: sm90_device_ep_kernels.cuh (kProCounts, kProRelease, kProClaim).

// The notify of this rank to every destination (T, the destination's per-local-expert counts,
// its token count; with direct rows every expert's count), then one release flag each, by send
// block 0 from the plan's totals (etot: [E] expert counts, dtot: [R] destination counts). The
// caller waited for every destination's acknowledgement of the previous dispatch (its notify
// fields are free again). kPro & kProCounts: the experts' counts went with the plan's words.
template <int kPro = 0>
__device__ __forceinline__ void write_notify(const Args& a, const int* etot, const int* dtot,
                                             unsigned long long n) {
  const Geometry& g = a.g;
  for (int i = threadIdx.x; i < g.R * (g.L + 1); i += blockDim.x) {
    const int d = i / (g.L + 1), q = i % (g.L + 1);
    notify_of(peer(a, d), a, out_region(a, d))[q] =
        q == 0 ? static_cast<int32_t>(a.T) : etot[d * g.L + q - 1];
  }
  if (threadIdx.x < g.R)
    at<int32_t>(peer(a, threadIdx.x), a.lay.recv_count)[out_region(a, threadIdx.x)] =
        dtot[threadIdx.x];
  if (a.direct && !(kPro & kProCounts))  // every expert's count: each source lays out every
    for (int i = threadIdx.x; i < g.R * g.E; i += blockDim.x)  // destination
      at<int32_t>(peer(a, i / g.E), a.lay.all_counts)[a.rank * g.E + i % g.E] = etot[i % g.E];
  __syncthreads();
  if (!a.nccl && threadIdx.x < g.R)
    publish<(kPro & kProRelease) != 0>(flag(peer(a, threadIdx.x), a, kDispatchNotify, a.rank), n);
}

// ---- dispatch plan (plan_once): the plan of the whole batch once, in the workspace ----
// One warp per 32-token tile counts it as plan_batch does, into row `tile` of the [NT][W] table
// (E expert columns, then R destination columns) and the destination ballots; the last block to
// finish turns every column into its exclusive prefix over the tiles, with one thread per column
// (the table is tile-major, so neighbouring threads read neighbouring counts).
// kFast (plan_fast_count): the ids loaded together, and each tile counted with shared-memory
// atomics on 32-bit counters instead of one match.any per k (the stamps put ~5.7 of the 9 µs of
// counting in that loop: match.any takes longer the more distinct values a warp holds, and a
// tile's 32 tokens hold up to 32 distinct experts per k).
// Counts tile `tile` (one warp) into the warp's shared row (E expert columns, then R
// destinations; row32: 32-bit counters with kFast, row: 16-bit) and its destination ballots.
template <bool kFast>
__device__ __forceinline__ void plan_count_tile(const Args& a, int tile, uint16_t* row,
                                                unsigned* row32, uint32_t* dball) {
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31;
  if constexpr (kFast)
    for (int i = lane; i < g.W; i += 32) row32[i] = 0;
  else
    for (int i = lane; i < g.W; i += 32) row[i] = 0;
  __syncwarp();
  const int64_t t = static_cast<int64_t>(tile) * kTile + lane;
  int ev[kMaxTopK];
  load_experts<kFast>(a, t, t < a.T, ev, true);
  if (a.trace) {  // diagnostics: a use of every id, so that the stamp follows the loads
    int any = 0;
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k) any |= ev[k];
    if (__any_sync(kFull, any == -2) || lane == 0) stamp(a, kTrPlanLoaded, 1);
  }
  uint32_t m = 0;
#pragma unroll
  for (int k = 0; k < kMaxTopK; ++k)
    if (ev[k] >= 0) m |= 1u << (ev[k] / g.L);
  for (int d = 0; d < g.R; ++d) {
    const uint32_t b = __ballot_sync(kFull, (m >> d) & 1u);
    if (lane == 0) {
      dball[d * g.NT + tile] = b;
      if constexpr (kFast)
        row32[g.E + d] = static_cast<unsigned>(__popc(b));
      else
        row[g.E + d] = static_cast<uint16_t>(__popc(b));
    }
  }
  if constexpr (kFast) {
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k)
      if (ev[k] >= 0) atomicAdd(row32 + ev[k], 1u);
  } else {
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k) {
      if (k >= g.K) break;
      const unsigned peers = __match_any_sync(kFull, ev[k]);
      if (ev[k] >= 0 && lane == __ffs(peers) - 1)
        row[ev[k]] += static_cast<uint16_t>(__popc(peers));
      __syncwarp();
    }
  }
  __syncwarp();
  if (lane == 0) stamp(a, kTrPlanMatched, 1);
}

// The last plan block to finish counting turns every column of the [ntiles][W] count table into
// its exclusive prefix over the tiles, with one thread per column (the table is tile-major, so
// neighbouring threads read neighbouring counts), and writes the totals. `smem`: the table's
// size in shared memory; `last_block`: a shared int.
template <bool kFast>
__device__ __forceinline__ void plan_scan_last(const Args& a, int ntiles, uint16_t* table,
                                               uint4* smem, int* last_block) {
  const Geometry& g = a.g;
  __syncthreads();
  unsigned long long* status = at<unsigned long long>(a.my, a.lay.status);
  if (threadIdx.x == 0) {
    stamp(a, kTrPlanCounted, 1);
    __threadfence();
    *last_block = atomicAdd(status + kPlanDone, 1ull) == gridDim.x - 1;
  }
  __syncthreads();
  if (!*last_block) return;
  __threadfence();
  if (threadIdx.x == 0) stamp(a, kTrPlanLast, 0);
  const int64_t vecs = (static_cast<int64_t>(ntiles) * g.W * 2 + 15) / 16;
  // NOTE: eight loads in flight per thread before any is stored (a load-store loop waits for
  // each L2 round trip in turn: ~8 of them for the V3 table of 66 KB, on the critical path);
  // kFast: twelve, so that the V3 table (4128 vectors) takes one round trip, not two.
  constexpr int kLoads = kFast ? 12 : 8;
  for (int64_t i0 = threadIdx.x; i0 < vecs; i0 += kLoads * blockDim.x) {
    uint4 v[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u)
      if (i0 + u * blockDim.x < vecs)
        v[u] = __ldcg(reinterpret_cast<const uint4*>(table) + i0 + u * blockDim.x);
#pragma unroll
    for (int u = 0; u < kLoads; ++u)
      if (i0 + u * blockDim.x < vecs) smem[i0 + u * blockDim.x] = v[u];
  }
  __syncthreads();
  uint16_t* s = reinterpret_cast<uint16_t*>(smem);
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
    reinterpret_cast<uint4*>(table)[i] = smem[i];
  if (threadIdx.x == 0) {
    status[kPlanDone] = 0;
    stamp(a, kTrPlanEnd, 0);
  }
}

// Phase stamps at the plan kernel's start (FP8MOE_EP_TRACE=1), before any block of its
// dependents can start: block 0 resets the minima of the send and receive stamps.
__device__ __forceinline__ void plan_trace_start(const Args& a) {
  if (a.trace) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      stamp(a, kTrPlanStart, 0);
      a.trace[kTrSendStart] = a.trace[kTrRecvStart] = a.trace[kTrSendPlanned] = ~0ull;
      __threadfence();
    }
    if (threadIdx.x == 0) stamp(a, kTrPlanBlocksIn, 1);
    __syncthreads();
  }
}

template <bool kFast>
__global__ void __launch_bounds__(kSendThreads) k_dispatch_plan(Args a) {
  extern __shared__ uint4 plan_raw[];
  __shared__ int last_block;
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int ntiles = static_cast<int>((a.T + kTile - 1) / kTile);
  uint16_t* table = at<uint16_t>(a.my, a.lay.plan_cnt);
  uint32_t* dball = at<uint32_t>(a.my, a.lay.plan_dball);
  plan_trace_start(a);
  // The send kernel may start now: it waits for this whole grid before reading the plan.
  allow_dependent_launch();
  // Counting: the warp's tile into its own row of shared memory, then into the table.
  uint16_t* row = reinterpret_cast<uint16_t*>(plan_raw) + warp * ((g.W + 1) / 2 * 2);
  unsigned* row32 = reinterpret_cast<unsigned*>(plan_raw) + warp * ((g.W + 3) / 4 * 4);
  for (int tile = blockIdx.x * kWarps + warp; tile < ntiles; tile += gridDim.x * kWarps) {
    plan_count_tile<kFast>(a, tile, row, row32, dball);
    if constexpr (kFast)
      for (int i = lane; i < g.W; i += 32)
        table[static_cast<int64_t>(tile) * g.W + i] = static_cast<uint16_t>(row32[i]);
    else
      for (int i = lane; i < g.W; i += 32) table[static_cast<int64_t>(tile) * g.W + i] = row[i];
    __syncwarp();
  }
  plan_scan_last<kFast>(a, ntiles, table, plan_raw, &last_block);
}

// ---- dispatch plan, session 8 (kMode: bit 0 dispatch_plan_counts, bit 1 plan_block_scan) ----
// A fixed grid of plan_blocks(g) blocks; block b counts tiles 16 b .. 16 b + 15, one per warp
// (as k_dispatch_plan<true>), then sums each column (E experts, R destinations) over its tiles
// and publishes the sums as (round, count) words (plan_part): with kCounts the expert columns to
// every rank, whose send blocks add them up into the destinations' layouts long before this
// grid ends; with kScan all columns to itself. kScan: the block's tiles' counts become prefixes
// within the block, to which the block adds the published sums of every earlier block (blocks
// ordered by a ticket taken at their start, so that a block waits only for blocks that run) and
// writes its rows of the final table; the last block writes the totals. Without kScan the last
// block to finish scans the table (plan_scan_last). Same plan as k_dispatch_plan, bit for bit.
template <int kMode>
__global__ void __launch_bounds__(kSendThreads) k_dispatch_plan_blocks(Args a) {
  constexpr bool kCounts = (kMode & 1) != 0, kScan = (kMode & 2) != 0;
  extern __shared__ uint4 plan_raw[];
  __shared__ int last_block, blk_s, abort_flag;
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int ntiles = static_cast<int>((a.T + kTile - 1) / kTile);
  uint16_t* table = at<uint16_t>(a.my, a.lay.plan_cnt);
  uint32_t* dball = at<uint32_t>(a.my, a.lay.plan_dball);
  unsigned long long* status = at<unsigned long long>(a.my, a.lay.status);
  // NOTE: the receive kernel of the previous dispatch advanced it before this grid started.
  const unsigned long long n = status[kSeqDispatch] + 1;
  plan_trace_start(a);
  allow_dependent_launch();
  if (threadIdx.x == 0) {
    blk_s = kScan ? static_cast<int>(atomicAdd(status + kPlanTicket, 1ull) % gridDim.x)
                  : static_cast<int>(blockIdx.x);
    abort_flag = 0;
  }
  const int wp = (g.W + 3) / 4 * 4;
  unsigned* rows = reinterpret_cast<unsigned*>(plan_raw);
  unsigned* row32 = rows + warp * wp;
  for (int i = lane; i < g.W; i += 32) row32[i] = 0;
  __syncthreads();
  const int blk = blk_s;
  const int tile = blk * kWarps + warp;
  if (tile < ntiles) plan_count_tile<true>(a, tile, nullptr, row32, dball);
  __syncthreads();
  // Column sums over the block's tiles (kScan: the rows become prefixes within the block), then
  // published; kScan: the earlier blocks' sums added to the rows.
  const unsigned long long tag = n << 32;
  for (int c = threadIdx.x; c < g.W; c += blockDim.x) {
    unsigned run = 0;
    for (int w = 0; w < kWarps; ++w) {
      const unsigned v = rows[w * wp + c];
      if (kScan) rows[w * wp + c] = run;
      run += v;
    }
    if (kCounts && c < g.E)
      for (int d = 0; d < g.R; ++d)
        st_relaxed_sys(plan_part(d == a.rank ? a.my : peer(a, d), a, n, a.rank, blk) + c,
                       tag | run);
    else if (kScan)
      st_relaxed_sys(plan_part(a.my, a, n, a.rank, blk) + c, tag | run);
    if (threadIdx.x == 0) stamp(a, kTrPlanPublished, 1);
    if constexpr (kScan) {
      unsigned off = 0;
      constexpr int kBatch = 8;
      for (int b0 = 0; b0 < blk; b0 += kBatch) {
        unsigned long long v[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u)
          v[u] = b0 + u < blk ? ld_relaxed_sys(plan_part(a.my, a, n, a.rank, b0 + u) + c) : tag;
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          if (b0 + u >= blk) continue;
          long long x = static_cast<unsigned>(v[u] >> 32) == static_cast<unsigned>(n)
                            ? static_cast<long long>(v[u] & 0xFFFFFFFFull)
                            : -1;
          if (x < 0)
            x = wait_round_word(plan_part(a.my, a, n, a.rank, b0 + u) + c, n, a, a.rank,
                                kPlanBlocks, b0 + u);
          if (x < 0) abort_flag = 1;
          off += static_cast<unsigned>(x);
        }
      }
      for (int w = 0; w < kWarps; ++w) rows[w * wp + c] += off;
      if (blk == static_cast<int>(gridDim.x) - 1) at<int>(a.my, a.lay.plan_tot)[c] = off + run;
    }
  }
  if constexpr (kScan) {
    __syncthreads();
    if (threadIdx.x == 0) stamp(a, kTrPlanLast, 1);
    if (abort_flag) return;  // recorded; check() reports it
    if (tile < ntiles)
      for (int i = lane; i < g.W; i += 32)
        table[static_cast<int64_t>(tile) * g.W + i] = static_cast<uint16_t>(row32[i]);
    __syncthreads();
    if (threadIdx.x == 0) stamp(a, kTrPlanEnd, 1);
  } else {
    if (tile < ntiles)
      for (int i = lane; i < g.W; i += 32)
        table[static_cast<int64_t>(tile) * g.W + i] = static_cast<uint16_t>(row32[i]);
    __syncwarp();
    plan_scan_last<true>(a, ntiles, table, plan_raw, &last_block);
  }
}

// kPlanOnce: the plan is the workspace's (k_dispatch_plan); a compile-time switch so that each
// path's plan pointers have a known address space (shared or global). kPrefetch:
// prefetch_payload. kDirect: dispatch_direct_rows (Args::direct; an instance of its own, so the
// other paths compile as before). kPro (with kDirect): kProCounts, kProRelease (session 8).
template <bool kPlanOnce, bool kPrefetch, bool kDirect, int kPro = 0>
__device__ __forceinline__ void dispatch_send_block(const Args& a, char* smem) {
  static_assert(kPro == 0 || (kPlanOnce && kDirect) ||
                    (kPlanOnce && kPrefetch && !kDirect && (kPro & kProCounts) == 0),
                "session-8 send options need direct rows; session 11's need plan_once, prefetch");
  static_assert(!kDirect || (kPro & (kProClaim | kProTokenSlots)) == 0,
                "layout_claim_chunks, layout_token_slots: source regions only");
  constexpr bool kCounts = (kPro & kProCounts) != 0, kRelease = (kPro & kProRelease) != 0;
  constexpr bool kClaim = (kPro & kProClaim) != 0;
  // layout_token_slots: the payload goes out before the plan is complete; each block waits for
  // it only before its first chunk's metadata (block 0: before the notify).
  constexpr bool kTokenSlots = (kPro & kProTokenSlots) != 0;
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
    if constexpr (!kTokenSlots) {
      asm volatile("griddepcontrol.wait;" ::: "memory");
      if (threadIdx.x == 0) stamp(a, kTrSendPlanned, 2);
    }
  } else {
    plan_batch(a, smem, p);
  }
  __shared__ unsigned ovf_mask;
  int* rowbase = reinterpret_cast<int*>(smem + a.ps.rowbase);
  if constexpr (kCounts) {
    // dispatch_plan_counts: the destinations' layouts from the plan blocks' published counts,
    // while the last warp waits for the previous round's acknowledgements (then the chunks may
    // overwrite the regions). Block 0 first waits for them and notifies, for the receive
    // kernels: so this rank's own receive never waits on a peer's counts for its own notify
    // (session 8, call 1: with the notify after the layout, a silent peer was reported as this
    // rank's own notify timing out).
    if (threadIdx.x == 0) ovf_mask = 0;
    const int q = blockIdx.x == 0
                      ? static_cast<int>(threadIdx.x)
                      : static_cast<int>(threadIdx.x) - static_cast<int>(blockDim.x - 32);
    if (q >= 0 && q < g.R &&
        !wait_geq(flag(a.my, a, kDispatchAck, q), n - 1, a.err, a.rank, q, kDispatchAck, -1,
                  a.timeout_ns))
      abort_flag = 1;
    if (blockIdx.x == 0) {
      __syncthreads();
      if (abort_flag) return;
      write_notify<kPro>(a, p.etot, p.dtot, n);
      if (threadIdx.x == 0) stamp(a, kTrSendNotified, 0);
    }
    if (!direct_layout_parts(a, rowbase, &ovf_mask, reinterpret_cast<int*>(p.emask), n))
      abort_flag = 1;
    __syncthreads();
    if (abort_flag) return;
    if (threadIdx.x == 0) stamp(a, kTrSendCounts, 1);
  } else {
    // A destination's region of mine is free once it acknowledged the previous dispatch.
    if (!a.nccl && threadIdx.x < g.R &&
        !wait_geq(flag(a.my, a, kDispatchAck, threadIdx.x), n - 1, a.err, a.rank, threadIdx.x,
                  kDispatchAck, -1, a.timeout_ns))
      abort_flag = 1;
    __syncthreads();
    if (abort_flag) return;
    if (threadIdx.x == 0) stamp(a, kTrSendAcked, 1);
    if constexpr (kTokenSlots) {
      if (blockIdx.x == 0) {
        asm volatile("griddepcontrol.wait;" ::: "memory");
        if (threadIdx.x == 0) stamp(a, kTrSendPlanned, 2);
      }
    }
    // Notify (block 0): T and the per-local-expert counts of every destination, then its flag.
    if (blockIdx.x == 0) write_notify<kPro>(a, p.etot, p.dtot, n);
    if (blockIdx.x == 0 && threadIdx.x == 0) stamp(a, kTrSendNotified, 0);
    // dispatch_direct_rows: once every source's counts are in (its notify flag), the rows of this
    // source's tokens at every destination are known.
    if (kDirect) {
      if (threadIdx.x == 0) ovf_mask = 0;
      if (threadIdx.x < g.R && !wait_geq(flag(a.my, a, kDispatchNotify, threadIdx.x), n, a.err,
                                         a.rank, threadIdx.x, kDispatchNotify, -1, a.timeout_ns))
        abort_flag = 1;
      __syncthreads();
      if (abort_flag) return;
      if (threadIdx.x == 0) stamp(a, kTrSendFlags, 1);
      if (a.fast_plan)
        direct_layout_fast(a, rowbase, &ovf_mask, reinterpret_cast<int*>(p.emask));
      else
        direct_layout(a, rowbase, &ovf_mask);
      __syncthreads();
      if (threadIdx.x == 0) stamp(a, kTrSendCounts, 1);
    }
  }
  // Chunks of C tokens, one block each; every chunk published with its own flag.
  const int warp = threadIdx.x >> 5;
  const int64_t nchunks = (a.T + g.C - 1) / g.C;
  const int64_t steps = (g.H + 1023) / 1024;
  [[maybe_unused]] bool planned = !kTokenSlots || blockIdx.x == 0;  // past griddepcontrol.wait
  auto push_chunk = [&](int64_t c) {
    const int64_t c0 = c * g.C, c1 = min(a.T, c0 + g.C);
    if constexpr (kTokenSlots) {
      // The payload first (slot t needs no plan), then the plan for the metadata and counts.
      const Split sp = split_work(c1 - c0, steps, kWarps);
      for (int64_t item = warp; item < sp.items; item += kWarps)
        push_payload<kPrefetch, true>(a, p, c0 + sp.token(item), sp.first(item), sp.last(item));
      if (!planned) {
        asm volatile("griddepcontrol.wait;" ::: "memory");
        planned = true;
        if (threadIdx.x == 0) stamp(a, kTrSendPlanned, 2);
      }
    }
    if (threadIdx.x < g.R) {
      const int d = threadIdx.x;
      const int b = slot_prefix(a, p, d, c0), e = slot_prefix(a, p, d, c1);
      int32_t* info = notify_of(peer(a, d), a, out_region(a, d)) + 1 + g.L + 2 * c;
      info[0] = b;
      info[1] = e - b;
    }
    const int tile0 = static_cast<int>(c0 / kTile), tile1 = static_cast<int>((c1 - 1) / kTile);
    for (int tile = tile0 + warp; tile <= tile1; tile += kWarps) push_metadata(a, p, tile, c0, c1);
    if constexpr (!kTokenSlots) {
      const Split sp = split_work(c1 - c0, steps, kWarps);
      for (int64_t item = warp; item < sp.items; item += kWarps) {
        if constexpr (kDirect)
          push_payload_direct<kPrefetch>(a, p, c0 + sp.token(item), sp.first(item), sp.last(item),
                                         rowbase, ovf_mask);
        else
          push_payload<kPrefetch>(a, p, c0 + sp.token(item), sp.first(item), sp.last(item));
      }
    }
    __syncthreads();
    if (!a.nccl && threadIdx.x < g.R)
      publish<kRelease>(
          chunk_flag(peer(a, threadIdx.x), a, kDispatchChunk, a.rank, static_cast<int>(c)), n);
  };
  if constexpr (kClaim) {
    // layout_claim_chunks: each block claims its next chunk in order across the grid (a static
    // split left blocks idle for up to ~20 us before the last one ended: session 11, call 1's
    // stamps), then the last block to finish claiming resets the counters for the next dispatch
    // (every claim of this one is made by then; the next send starts after this grid ends).
    int64_t* status = at<int64_t>(a.my, a.lay.status);
    __shared__ long long claimed;
    for (int64_t c = claim_item(status + kSendItem, &claimed); c < nchunks;
         c = claim_item(status + kSendItem, &claimed))
      push_chunk(c);
    __syncthreads();  // as measured (session 11, call 3); thread 0 made this block's claims
    if (threadIdx.x == 0) {
      __threadfence();
      auto* done = reinterpret_cast<unsigned long long*>(status + kSendClaimers);
      if (atomicAdd(done, 1ull) == gridDim.x - 1) {
        __threadfence();  // every block's claims (counted before its add) precede the reset
        status[kSendItem] = 0;
        *done = 0;
      }
    }
  } else {
    for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) push_chunk(c);
  }
}

// ---- dispatch send, layout_payload_claims (session 15, ep25): the payload claimed per warp ----
// With token slots a record's place needs no plan, and with expand_payload off no receive reads
// a payload before the dispatch ends, so the payload no longer needs the chunks: every warp of
// the grid claims units (`unit` 1024-column steps of one token, token-major) from one counter and
// pushes them with no block barrier, so the warps, and with them the blocks, run out of work
// within about a unit of each other (with chunks, a block ended with its chunk's slowest token).
// A warp holds one claimed unit in reserve, claimed when it starts a unit, so the claim's round
// trip hides under that unit and the next unit's first step is loaded during this one's last.
// Payload stores are weak; the block's barrier and one release add per destination at its end
// (send_payload_claims) publish them to the receive's last block (k_dispatch_recv<..., true>).
__device__ void push_payload_units(const Args& a, int64_t* counter) {
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31;
  const int64_t steps = (g.H + 1023) / 1024;
  const int64_t unit = a.tile < 1 ? 1 : (a.tile > steps ? steps : a.tile);
  const int64_t parts = (steps + unit - 1) / unit;
  const int64_t total = a.T * parts;
  auto* ctr = reinterpret_cast<unsigned long long*>(counter);
  // The first unit and the reserve by one claim of two.
  long long u = 0;
  if (lane == 0) u = static_cast<long long>(atomicAdd(ctr, 2ull));
  u = __shfl_sync(kFull, u, 0);
  if (u >= total) return;
  long long u_next = u + 1;
  auto token_of = [&](long long x) { return static_cast<int64_t>(x / parts); };
  auto first_of = [&](long long x) { return static_cast<int64_t>(x % parts) * unit; };
  auto last_of = [&](long long x) { return min(steps, first_of(x) + unit); };
  // A step's 1024 columns: FP8, two 512-column halves of two 16-byte loads per lane; BF16, four
  // 256-column quarters of one each.
  auto load_step = [&](int64_t t, int64_t step, uint4* v) {
    const uint16_t* xt = a.x + t * g.H;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t c = g.fp8 ? step * 1024 + (q >> 1) * 512 + lane * 16 + (q & 1) * 8
                              : step * 1024 + q * 256 + lane * 8;
      v[q] = make_uint4(0, 0, 0, 0);
      if (c < g.H) v[q] = __ldg(reinterpret_cast<const uint4*>(xt + c));
    }
  };
  // An id out of range counts as none, as in the plan (which reports it).
  auto expert = [&](int64_t t) { return lane < g.K ? __ldg(a.idx + t * g.K + lane) : -1; };
  int64_t t = token_of(u), first = first_of(u), last = last_of(u);
  int e = expert(t);
  uint4 next[4];
  load_step(t, first, next);
  for (;;) {
    long long claimed = 0;  // the reserve after u_next, used once this unit is pushed
    if (lane == 0) claimed = static_cast<long long>(atomicAdd(ctr, 1ull));
    const unsigned mask = __reduce_or_sync(kFull, e >= 0 && e < g.E ? 1u << (e / g.L) : 0u);
    const bool more = u_next < total;
    const int64_t tn = more ? token_of(u_next) : 0, fn = more ? first_of(u_next) : 0;
    int en = -1;
    for (int64_t step = first; step < last; ++step) {
      uint4 v[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) v[q] = next[q];
      if (step + 1 < last) {
        load_step(t, step + 1, next);
      } else if (more) {
        load_step(tn, fn, next);
        en = expert(tn);
      }
      if (g.fp8) {
        uint4 codes[2];
        float scale[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) quantize16(v[2 * h], v[2 * h + 1], codes[h], scale[h]);
        for (unsigned m = mask; m; m &= m - 1) {
          const int d = __ffs(m) - 1;
          char* rec = record_of(a, peer(a, d), out_region(a, d), t);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t c = step * 1024 + h * 512 + lane * 16;
            if (c >= g.H) continue;  // whole 8-lane groups (H % 128 == 0)
            *reinterpret_cast<uint4*>(rec + c) = codes[h];
            if ((lane & 7) == 0) *reinterpret_cast<float*>(rec + g.H + (c / 128) * 4) = scale[h];
          }
        }
      } else {
        for (unsigned m = mask; m; m &= m - 1) {
          const int d = __ffs(m) - 1;
          char* rec = record_of(a, peer(a, d), out_region(a, d), t);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int64_t c = step * 1024 + q * 256 + lane * 8;
            if (c < g.H) *reinterpret_cast<uint4*>(rec + c * 2) = v[q];
          }
        }
      }
    }
    if (!more) {
      // NOTE: the reserve's claim, unused here, precedes the block's barrier in program order like
      // every claim, so the last block's reset of the counter (after every block's count,
      // send_payload_claims) follows it in causality order, as publish() argues; the asm keeps
      // its result live on this path too (an atom with a result, as the other claims).
      asm volatile("" ::"l"(claimed));
      return;
    }
    u = u_next;
    t = tn;
    first = fn;
    last = last_of(u);
    e = en;
    u_next = __shfl_sync(kFull, claimed, 0);
  }
}

// The notify (write_notify's fields, source regions) by one warp, then its flags (lanes < R);
// the warp's barrier orders its lanes' stores before each release (as the block's barrier does
// in write_notify: bar.warp.sync orders memory among the lanes it synchronises).
template <bool kRelease>
__device__ __forceinline__ void write_notify_warp(const Args& a, const int* etot, const int* dtot,
                                                  unsigned long long n) {
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31;
  for (int i = lane; i < g.R * (g.L + 1); i += 32) {
    const int d = i / (g.L + 1), q = i % (g.L + 1);
    notify_of(peer(a, d), a, out_region(a, d))[q] =
        q == 0 ? static_cast<int32_t>(a.T) : etot[d * g.L + q - 1];
  }
  if (lane < g.R) at<int32_t>(peer(a, lane), a.lay.recv_count)[out_region(a, lane)] = dtot[lane];
  __syncwarp();
  if (lane < g.R) publish<kRelease>(flag(peer(a, lane), a, kDispatchNotify, a.rank), n);
}

// Chunk c's counts and metadata at every destination by one warp, then its flags (lanes < R).
template <bool kRelease>
__device__ __forceinline__ void push_chunk_metadata(const Args& a, const Plan& p, int64_t c,
                                                    unsigned long long n) {
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31;
  const int64_t c0 = c * g.C, c1 = min(a.T, c0 + g.C);
  if (lane < g.R) {
    const int b = slot_prefix(a, p, lane, c0), e = slot_prefix(a, p, lane, c1);
    int32_t* info = notify_of(peer(a, lane), a, out_region(a, lane)) + 1 + g.L + 2 * c;
    info[0] = b;
    info[1] = e - b;
  }
  const int tile0 = static_cast<int>(c0 / kTile), tile1 = static_cast<int>((c1 - 1) / kTile);
  for (int tile = tile0; tile <= tile1; ++tile) push_metadata(a, p, tile, c0, c1);
  __syncwarp();
  if (lane < g.R)
    publish<kRelease>(chunk_flag(peer(a, lane), a, kDispatchChunk, a.rank, static_cast<int>(c)), n);
}

__device__ __forceinline__ void red_release_sys_add(unsigned long long* p, unsigned long long v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// The send of layout_payload_claims (plan_once, prefetch_payload, token slots, NVLink). Every
// block waits for the previous round's acknowledgements (its regions at every destination are
// free again); its last warp then waits for the plan (griddepcontrol.wait), writes the notify
// (block 0) and claims chunks' metadata until none is left, then joins the payload, which the
// other warps claim from the start (push_payload_units). NOTE: why one release add per block and
// destination publishes the payload: every warp's stores precede the block's barrier in program
// order, the barrier synchronises them with threads 0..R-1 at CTA scope, and each thread's add is
// a release at system scope (kRelease; else after a full system fence), so the receive's acquire
// load that reads a count including it (wait_geq) sees every payload byte of the block; the adds
// of the grid's blocks form one chain of read-modify-writes, each a release, so the count
// n * grid covers every block.
template <bool kRelease>
__device__ void send_payload_claims(const Args& a, char* smem) {
  __shared__ int abort_flag;
  const Geometry& g = a.g;
  int64_t* status = at<int64_t>(a.my, a.lay.status);
  const unsigned long long n = static_cast<unsigned long long>(status[kSeqDispatch]) + 1;
  if (threadIdx.x == 0) abort_flag = 0;
  __syncthreads();
  // NOTE: after every thread read n: the receive kernel ends the call by advancing it.
  if (threadIdx.x == 0) stamp(a, kTrSendStart, 2);
  allow_dependent_launch();
  const Plan p = plan_global_view(a, smem);
  for (int i = threadIdx.x; i < kWarps * g.E; i += blockDim.x) p.emask[i] = 0;
  if (threadIdx.x < g.R && !wait_geq(flag(a.my, a, kDispatchAck, threadIdx.x), n - 1, a.err, a.rank,
                                     threadIdx.x, kDispatchAck, -1, a.timeout_ns))
    abort_flag = 1;
  __syncthreads();
  if (abort_flag) return;
  if (threadIdx.x == 0) stamp(a, kTrSendAcked, 1);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (warp == kWarps - 1) {
    // NOTE: launched as the plan kernel's programmatic dependent: its plan is complete and
    // visible only after this wait (per thread: the other warps push payload meanwhile).
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if (lane == 0) stamp(a, kTrSendPlanned, 2);
    if (blockIdx.x == 0) {
      write_notify_warp<kRelease>(a, p.etot, p.dtot, n);
      if (lane == 0) stamp(a, kTrSendNotified, 0);
    }
    const int64_t nchunks = (a.T + g.C - 1) / g.C;
    auto* meta = reinterpret_cast<unsigned long long*>(status + kSendMetaItem);
    for (;;) {
      long long c = 0;
      if (lane == 0) c = static_cast<long long>(atomicAdd(meta, 1ull));
      c = __shfl_sync(kFull, c, 0);
      if (c >= nchunks) break;
      push_chunk_metadata<kRelease>(a, p, c, n);
    }
  }
  push_payload_units(a, status + kSendItem);
  __syncthreads();
  if (threadIdx.x < g.R) {
    if constexpr (!kRelease) __threadfence_system();
    red_release_sys_add(payload_counter(peer(a, threadIdx.x), a, a.rank), 1ull);
  }
  // The last block done claiming resets the counters for the next dispatch (every claim of this
  // one precedes its block's count; the next send starts after this grid).
  if (threadIdx.x == 0) {
    __threadfence();
    auto* done = reinterpret_cast<unsigned long long*>(status + kSendClaimers);
    if (atomicAdd(done, 1ull) == gridDim.x - 1) {
      __threadfence();
      status[kSendItem] = 0;
      status[kSendMetaItem] = 0;
      *done = 0;
    }
  }
}

template <bool kPlanOnce, bool kPrefetch, bool kDirect, int kPro = 0>
__global__ void __launch_bounds__(kSendThreads, 1) k_dispatch_send(Args a) {
  extern __shared__ uint4 smem_raw[];
  if constexpr ((kPro & kProPayloadClaims) != 0)
    send_payload_claims<(kPro & kProRelease) != 0>(a, reinterpret_cast<char*>(smem_raw));
  else
    dispatch_send_block<kPlanOnce, kPrefetch, kDirect, kPro>(a, reinterpret_cast<char*>(smem_raw));
  count_send_block(a.my, a.lay.status, kDispatchSent);
  if (threadIdx.x == 0) stamp(a, kTrSendEnd, 1);
  // Session 11's source-region instances: the spread of the blocks' ends (the other instances keep
  // their PTX).
  if constexpr (!kDirect && kPro != 0)
    if (threadIdx.x == 0) stamp(a, kTrSendFirstEnd, 2);
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
// dispatch_recv_bulk_rows: the warp's slot of kRecvBulkSlot bytes, its mbarrier and the parity
// of the barrier's next phase.
struct RecvBulkSlot {
  char* slot;
  uint64_t* bar;
  uint32_t phase;
};

// Generic-proxy writes (the source's payload, acquired through its chunk flag) before async-proxy
// reads of the same bytes; and this thread's completed bulk writes before later generic accesses.
__device__ __forceinline__ void fence_proxy_async_global() {
  asm volatile("fence.proxy.async.global;" ::: "memory");
}
// cp.async.bulk global -> shared of `bytes` (a multiple of 16, 16-byte aligned), on `bar`.
__device__ __forceinline__ void bulk_load_row(void* dst, const void* src, uint32_t bytes,
                                              uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(kernels::sm90::smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(kernels::sm90::smem_addr(bar))
      : "memory");
}
// cp.async.bulk shared -> global of `bytes`, in the issuing thread's bulk async group.
__device__ __forceinline__ void bulk_store_row(void* dst, const void* src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst),
               "r"(kernels::sm90::smem_addr(src)), "r"(bytes)
               : "memory");
}

// A record's FP8 scales (one float per 128 columns) into the grouped scales of each of its rows but
// row kf (the sender's; -1: none), one warp.
__device__ __forceinline__ void copy_row_scales(const Args& a, const float* rec_scales,
                                                const int (&rows)[kMaxTopK], int kf, int lane) {
  const Geometry& g = a.g;
  float* gs = at<float>(a.my, a.lay.gscales);
  for (int64_t c = lane; c < g.SC; c += 32) {
    const float sc = __ldcg(rec_scales + c);
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k)
      if (k < g.K && rows[k] >= 0 && k != kf) gs[rows[k] * g.SC + c] = sc;
  }
}

// kTokenSlots (layout_token_slots): the payload of the j-th record sits at the slot of its token
// (src_token), the metadata at slot j as without.
template <bool kBulk = false, bool kTokenSlots = false>
__device__ void scatter_record(const Args& a, const RecvLayout& r, int s, int64_t j, bool overflow,
                               RecvBulkSlot* bs = nullptr) {
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31;
  const int64_t slot = static_cast<int64_t>(s) * g.Tmax + j;
  const int64_t i = r.roff[s] + j;
  int64_t payload_j = j;
  if constexpr (kTokenSlots) payload_j = __ldcg(at<int32_t>(a.my, a.lay.src_token) + slot);
  int row = -1;
  if (lane < g.K) {
    const int e = __ldcg(at<int32_t>(a.my, a.lay.topk_local) + slot * g.K + lane);
    if (e >= 0 && !overflow) {
      row = r.offs[e] + r.base[s * g.L + e] +
            __ldcg(at<int32_t>(a.my, a.lay.topk_pos) + slot * g.K + lane);
      at<int32_t>(a.my, a.lay.m_indices)[row] = e;
      at<int32_t>(a.my, a.lay.row_src)[row] = static_cast<int32_t>(i * g.K + lane);
      // Only the layout-only dispatch exposes row_record (the expanding one pays nothing for it).
      if (!a.expand)
        at<int32_t>(a.my, row_record_offset(a.lay))[row] =
            static_cast<int32_t>(kTokenSlots ? s * g.Tmax + payload_j : slot);
      at<float>(a.my, a.lay.row_weight)[row] =
          __ldcg(at<float>(a.my, a.lay.weight) + slot * g.K + lane);
    }
    at<int32_t>(a.my, a.lay.token_rows)[slot * g.K + lane] = row;
  }
  if (!a.expand || overflow) return;
  int rows[kMaxTopK];
#pragma unroll
  for (int k = 0; k < kMaxTopK; ++k) rows[k] = __shfl_sync(kFull, row, k < g.K ? k : 0);
  const char* rec = record_of(a, a.my, s, payload_j);
  const float* rec_scales = reinterpret_cast<const float*>(rec + g.H);
  char* gx = a.my + a.lay.gx;
  const int64_t row_bytes = g.fp8 ? g.H : g.H * 2;
  // dispatch_direct_rows: the sender wrote the row of the lowest k (self_rows: all rows of the
  // rank's own tokens); the others are copied from it.
  int kf = -1;
  if (a.direct) {
    if (a.self_rows && s == a.rank) return;
    kf = __ffs(__ballot_sync(kFull, row >= 0)) - 1;
    if (kf < 0) return;
    rec = gx + static_cast<int64_t>(rows[kf]) * row_bytes;
    rec_scales = at<float>(a.my, a.lay.gscales) + static_cast<int64_t>(rows[kf]) * g.SC;
  }
  if constexpr (kBulk) {
    // dispatch_recv_bulk_rows: the payload through the warp's slot, piece by piece: lane 0 loads
    // a piece by one bulk copy, then each lane k whose row takes a copy stores it by one bulk copy.
    // The scales by the lanes as below, issued under the first piece's load.
    const bool mine = lane < g.K && row >= 0 && lane != kf;
    for (int64_t p0 = 0; p0 < row_bytes; p0 += kRecvBulkSlot) {
      const uint32_t bytes = static_cast<uint32_t>(min(kRecvBulkSlot, row_bytes - p0));
      // The slot is free once this warp's stores of the previous piece (or record) have read it.
      kernels::sm90::tma_store_wait_read();
      __syncwarp();
      if (lane == 0) {
        // The chunk flag was acquired by thread 0 before the block barrier: this thread's view of
        // the source's bytes, handed to the async proxy that reads them.
        fence_proxy_async_global();
        kernels::sm90::mbar_arrive_expect_tx(bs->bar, bytes);
        bulk_load_row(bs->slot, rec + p0, bytes, bs->bar);
      }
      if (p0 == 0 && g.fp8) copy_row_scales(a, rec_scales, rows, kf, lane);
      kernels::sm90::mbar_wait(bs->bar, bs->phase);
      bs->phase ^= 1u;
      if (mine) {
        bulk_store_row(gx + static_cast<int64_t>(row) * row_bytes + p0, bs->slot, bytes);
        kernels::sm90::tma_store_commit();
      }
    }
    return;
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
  if (g.fp8) copy_row_scales(a, rec_scales, rows, kf, lane);
}

// Dispatch receive: layout as soon as every source notified, then every chunk expanded as soon
// as it landed (chunk-major order, the order senders publish in); the last block acknowledges.
// kRelease (combine_release_only): the acknowledgements by release stores alone (publish).
// kBulk (dispatch_recv_bulk_rows, with expand_payload): the row copies by bulk copies through a
// slot of shared memory per warp (scatter_record); every bulk store has completed (wait_group 0,
// then a proxy fence) before the block counts itself done, so the rows are written when the
// acknowledgements let the sources reuse them and when the kernel ends.
// kTokenSlots: layout_token_slots' records (scatter_record).
// kPayload (layout_payload_claims, with kTokenSlots and expand_payload off): the chunk flags
// cover the metadata only, so the last block waits for every source's payload counter (every
// send block of it done writing here, payload_counter) before it acknowledges and ends the call.
template <bool kRelease = false, bool kBulk = false, bool kTokenSlots = false,
          bool kPayload = false>
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
  RecvBulkSlot bs{nullptr, nullptr, 0};
  if constexpr (kBulk) {
    // After the layout's ints (recv_smem_bytes): one mbarrier per warp, then the slots.
    const size_t layout = (static_cast<size_t>(g.R) * g.L + (g.L + 1) + g.L + (g.R + 1) + g.R) * 4;
    char* base = reinterpret_cast<char*>(rsm);
    const int warp = threadIdx.x >> 5;
    bs.bar = reinterpret_cast<uint64_t*>(base + dispatch_recv_bulk_bars(layout)) + warp;
    bs.slot = base + dispatch_recv_bulk_slots(layout) + warp * kRecvBulkSlot;
    if ((threadIdx.x & 31) == 0) kernels::sm90::mbar_init(bs.bar, 1);
    kernels::sm90::fence_barrier_init();
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
    int32_t* row_record = at<int32_t>(a.my, row_record_offset(a.lay));
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
          if (!a.expand) row_record[row] = -1;
        }
      }
    }
    for (int64_t row = (ovf ? 0 : rows_needed) + tid; row < min(prev_rows, g.bound);
         row += nthreads) {
      m_indices[row] = -1;
      row_src[row] = -1;
      if (!a.expand) row_record[row] = -1;
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
      if (abort_flag) {
        if constexpr (kBulk) kernels::sm90::tma_store_wait_all();  // no copy outlives the block
        return;
      }
    }
    const int32_t* info = notify_of(a.my, a, s) + 1 + g.L + 2 * c;
    const int begin = __ldcg(info), count = __ldcg(info + 1);
    for (int q = warp; q < count; q += kWarps)
      scatter_record<kBulk, kTokenSlots>(a, r, s, begin + q, ovf, &bs);
  }
  if constexpr (kBulk) {
    kernels::sm90::tma_store_wait_all();
    fence_proxy_async_global();
  }
  // The last block to finish acknowledges every source: its regions of mine are free again.
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned long long done =
        atomicAdd(reinterpret_cast<unsigned long long*>(status + kRecvDone), 1ull);
    last_block = done == gridDim.x - 1;
    last_block_acquire<kRelease>(last_block);
  }
  __syncthreads();
  if (!last_block) return;
  // NOTE: the call ends only once this rank's send blocks all ended too (a programmatic
  // dependent may finish before its primary; the stream's next work must not overlap either).
  if (threadIdx.x == 0)
    wait_geq(reinterpret_cast<unsigned long long*>(status) + kDispatchSent, n * a.send_blocks,
             a.err, a.rank, a.rank, kLocalSent, -1, a.timeout_ns);
  // Every rank's send grid is a.send_blocks (same options), each block counting once per round.
  if constexpr (kPayload)
    if (!a.nccl && threadIdx.x < g.R)
      wait_geq(payload_counter(a.my, a, threadIdx.x), n * a.send_blocks, a.err, a.rank, threadIdx.x,
               kDispatchPayload, -1, a.timeout_ns);
  __syncthreads();
  if (!a.nccl && threadIdx.x < g.R)
    publish<kRelease>([&] { return flag(peer(a, threadIdx.x), a, kDispatchAck, a.rank); }, n);
  if (threadIdx.x == 0) {
    status[kRecvDone] = 0;
    status[kRecvItem] = 0;
    status[kPrevRows] = ovf ? 0 : min(static_cast<int64_t>(rows_needed), g.bound);
    status[kSeqDispatch] = static_cast<int64_t>(n);
    stamp(a, kTrRecvEnd, 0);
  }
}

}  // namespace

KernelFn dispatch_plan_kernel(bool fast, int mode) {
  if (fast && mode == 1) return k_dispatch_plan_blocks<1>;
  if (fast && mode == 2) return k_dispatch_plan_blocks<2>;
  if (fast && mode == 3) return k_dispatch_plan_blocks<3>;
  return fast ? k_dispatch_plan<true> : k_dispatch_plan<false>;
}

KernelFn dispatch_recv_kernel(const DeviceEpOptions& o, bool token_slots, bool payload_claims) {
  // payload_claims implies token_slots and expand_payload off (so no bulk row copies).
  if (payload_claims)
    return o.combine_release_only ? k_dispatch_recv<true, false, true, true>
                                  : k_dispatch_recv<false, false, true, true>;
  if (o.dispatch_recv_bulk_rows && o.expand_payload) {
    if (token_slots)
      return o.combine_release_only ? k_dispatch_recv<true, true, true>
                                    : k_dispatch_recv<false, true, true>;
    return o.combine_release_only ? k_dispatch_recv<true, true> : k_dispatch_recv<false, true>;
  }
  if (token_slots)
    return o.combine_release_only ? k_dispatch_recv<true, false, true>
                                  : k_dispatch_recv<false, false, true>;
  return o.combine_release_only ? k_dispatch_recv<true> : k_dispatch_recv<false>;
}

// The kernel variants the options select (DeviceEpOptions: plan_once, prefetch_payload; direct:
// dispatch_direct_rows where it applies, Impl::direct, which implies plan_once; plan_counts:
// dispatch_plan_counts where it applies, Impl::plan_counts; dispatch_release_only with direct and
// prefetch_payload).
KernelFn dispatch_send_kernel(const DeviceEpOptions& o, bool direct, bool plan_counts) {
  if (direct && o.prefetch_payload) {
    const int pro = (plan_counts ? kProCounts : 0) | (o.dispatch_release_only ? kProRelease : 0);
    if (pro == kProCounts) return k_dispatch_send<true, true, true, kProCounts>;
    if (pro == kProRelease) return k_dispatch_send<true, true, true, kProRelease>;
    if (pro == (kProCounts | kProRelease))
      return k_dispatch_send<true, true, true, kProCounts | kProRelease>;
    return k_dispatch_send<true, true, true>;
  }
  if (direct) return k_dispatch_send<true, false, true>;
  if (o.plan_once && o.prefetch_payload) {
    switch (layout_send_pro(o, direct)) {
      case 0:
        return k_dispatch_send<true, true, false>;
      case kProRelease:
        return k_dispatch_send<true, true, false, kProRelease>;
      case kProClaim:
        return k_dispatch_send<true, true, false, kProClaim>;
      case kProRelease | kProClaim:
        return k_dispatch_send<true, true, false, kProRelease | kProClaim>;
      case kProTokenSlots:
        return k_dispatch_send<true, true, false, kProTokenSlots>;
      case kProRelease | kProTokenSlots:
        return k_dispatch_send<true, true, false, kProRelease | kProTokenSlots>;
      case kProClaim | kProTokenSlots:
        return k_dispatch_send<true, true, false, kProClaim | kProTokenSlots>;
      case kProTokenSlots | kProPayloadClaims:
        return k_dispatch_send<true, true, false, kProTokenSlots | kProPayloadClaims>;
      case kProRelease | kProTokenSlots | kProPayloadClaims:
        return k_dispatch_send<true, true, false, kProRelease | kProTokenSlots | kProPayloadClaims>;
      default:
        return k_dispatch_send<true, true, false, kProRelease | kProClaim | kProTokenSlots>;
    }
  }
  if (o.plan_once)
    return o.prefetch_payload ? k_dispatch_send<true, true, false>
                              : k_dispatch_send<true, false, false>;
  return o.prefetch_payload ? k_dispatch_send<false, true, false>
                            : k_dispatch_send<false, false, false>;
}

}  // namespace fp8moe::comm::normal
