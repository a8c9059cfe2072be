// The two-stage (cross-node) route of expert-parallel dispatch/combine on the GPU: a token crosses
// to each remote node it needs once, to the rank there with the sender's local index (the
// forwarder), which passes it on over NVLink to the ranks of its node; combine sums the partials
// of a node at that forwarder (node_n of fp8moe/comm/ep.h) and sends one row back, and the source
// sums the node rows in node order. The network hop is NCCL grouped send/recv among the ranks of
// one local index (Wire::kNccl: what a multi-node job uses) or our NVLink stores standing in for
// it when the "nodes" share a host (Wire::kNvlink); the hop inside a node is always NVLink stores
// into peer-mapped workspaces, published with release flags and freed by acquire-polled acks, so
// nothing waits on the host (counts stay on the device, bounds are EpConfig's).
// Reference: dispatch_reference / combine_reference / combine_tokens_reference (ep_reference.cpp),
// bit for bit; the CPU back end (cpu_transport.cpp) runs the same route.
// Test: test_comm_gpu --gtest_filter='Forward*' (tests/comm/device_ep_forward_gpu_test.cu).
#include <algorithm>
#include <cfloat>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>

#include "device_ep_forward.h"
#include "ep_ptx.cuh"
#include "ep_row_math.cuh"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"

#if defined(FP8MOE_HAVE_NCCL)
#include <nccl.h>
#define FM_FWD_CHECK_NCCL(call)                                                              \
  do {                                                                                       \
    const ncclResult_t fm_nccl_ = (call);                                                    \
    if (fm_nccl_ != ncclSuccess) [[unlikely]]                                                \
      FM_THROW(::fp8moe::ErrorKind::kNccl, #call " failed: ", ncclGetErrorString(fm_nccl_)); \
  } while (0)
#endif

namespace fp8moe::comm::detail {

namespace {

constexpr int kMaxRanks = 32;  // masks and flag groups are 32 wide
constexpr int kMaxTopK = 8;
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;
constexpr unsigned kFull = 0xFFFFFFFFu;

// status[] slots (int64). The first three are DeviceRecvView::status's.
enum Status : int {
  kRowsNeeded = 0,
  kOverflow = 1,
  kNumRecv = 2,
  kSeqDispatch = 3,
  kSeqCombine = 4,
  kDoneSend = 5,  // blocks of each kernel that finished (the last one publishes)
  kDoneForward = 6,
  kDoneRecv = 7,
  kDoneGather = 8,
  kDoneReduce = 9,
  kDoneReturn = 10,
  kStatusSlots = 16,
};
// Flag groups of kMaxRanks u64 counters each (epochs), indexed by the peer that writes them.
enum Flag : int {
  kFwdArrived = 0,     // forwarder: stage-1 records of source node ms are in
  kFwdAck = 1,         // source: forwarder of node m consumed my stage-1 records
  kRecvArrived = 2,    // receiver: records of source s are in (written by its forwarder here)
  kRecvAck = 3,        // forwarder: receiver dl consumed what I forwarded
  kGatherArrived = 4,  // forwarder: partials of receiver dl are in
  kGatherAck = 5,      // receiver: forwarder fl consumed my partials
  kReturnArrived = 6,  // source: node rows of forwarder node m are in
  kReturnAck = 7,      // forwarder: source node ms consumed my node rows
  kFlagGroups = 8,
  kLocalBlocks = 9,  // error reports only
};
const char* flag_name(int f) {
  switch (f) {
    case kFwdArrived:
      return "dispatch.forward.arrived";
    case kFwdAck:
      return "dispatch.forward.consumed";
    case kRecvArrived:
      return "dispatch.recv.arrived";
    case kRecvAck:
      return "dispatch.recv.consumed";
    case kGatherArrived:
      return "combine.gather.arrived";
    case kGatherAck:
      return "combine.gather.consumed";
    case kReturnArrived:
      return "combine.return.arrived";
    case kReturnAck:
      return "combine.return.consumed";
    default:
      return "?";
  }
}

enum ErrCode : int { kErrNone = 0, kErrTimeout = 1, kErrBadExpert = 3, kErrNodeLimit = 4 };
struct DevErr {
  int code;
  int rank;
  int peer;
  int counter;
  unsigned long long expected;
  unsigned long long seen;
  long long detail;  // bad expert / node limit: the token
};

struct Geo {
  int R, G, N, K, L, E, W;  // W: plan columns (E experts, R destinations, N nodes)
  int rank, node, local;
  int64_t H, SC, Tmax, P, bound, cap, NT, NSZ;  // NSZ: ints of one stage-1 notify
  int max_nodes;
  bool fp8;
};

// Byte offsets of a workspace, identical on every rank. The network hop's fields lead, so that
// the NCCL wire's send buffer is that prefix.
struct Lay {
  size_t n_rec, n_src, n_idx, n_w, n_pos, n_j, n_notify, cr, net_end;
  size_t r_rec, r_src, r_loc, r_pos, r_w, r_notify, cg, flags;
  size_t peers, net, err, status, plan_cnt, plan_dball, plan_nball, plan_tot, slot, node_slot, pos,
      fslot, fcount, rcount, roff, expert_counts, expert_offsets, m_indices, row_src, row_weight,
      token_rows, gx, gscales, total;
};

size_t align_up(size_t v, size_t a) {
  return (v + a - 1) / a * a;
}

Geo make_geo(const EpConfig& c, int rank) {
  Geo g{};
  g.R = c.num_ranks;
  g.G = c.ranks_per_node();
  g.N = c.nodes();
  g.K = c.top_k;
  g.L = c.experts_per_rank();
  g.E = c.num_experts;
  g.W = g.E + g.R + g.N;
  g.rank = rank;
  g.node = c.node_of(rank);
  g.local = c.local_of(rank);
  g.H = c.hidden;
  g.fp8 = c.payload == Payload::kFP8;
  g.SC = g.fp8 ? c.scale_cols() : 0;
  g.Tmax = c.max_tokens_per_rank;
  g.P = g.fp8 ? static_cast<int64_t>(align_up(g.H + g.SC * 4, 16)) : g.H * 2;
  g.bound = c.row_bound();
  g.cap = c.masked_capacity;
  g.NT = (g.Tmax + kTile - 1) / kTile;
  g.NSZ = 2 + g.G + static_cast<int64_t>(g.G) * g.L;
  g.max_nodes = c.max_nodes_per_token;
  return g;
}

Lay make_lay(const Geo& g) {
  Lay l{};
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t o = at;
    at = align_up(at + bytes, 256);
    return o;
  };
  const size_t T = g.Tmax, N = g.N, R = g.R, G = g.G, K = g.K, H = g.H;
  l.n_rec = take(N * T * g.P);
  l.n_src = take(N * T * 4);
  l.n_idx = take(N * T * K * 4);
  l.n_w = take(N * T * K * 4);
  l.n_pos = take(N * T * K * 4);
  l.n_j = take(N * T * G * 4);
  l.n_notify = take(N * g.NSZ * 4);
  l.cr = take(N * T * H * 2);
  l.net_end = at;
  l.r_rec = take(R * T * g.P);
  l.r_src = take(R * T * 4);
  l.r_loc = take(R * T * K * 4);
  l.r_pos = take(R * T * K * 4);
  l.r_w = take(R * T * K * 4);
  l.r_notify = take(R * (1 + g.L) * 4);
  l.cg = take(R * G * T * H * 2);
  l.flags = take(kFlagGroups * kMaxRanks * 8);
  l.peers = take(R * sizeof(void*));
  l.net = take(N * sizeof(void*));
  l.err = take(sizeof(DevErr));
  l.status = take(kStatusSlots * 8);
  l.plan_cnt = take(static_cast<size_t>(g.NT) * g.W * 4);
  l.plan_dball = take(R * g.NT * 4);
  l.plan_nball = take(N * g.NT * 4);
  l.plan_tot = take(g.W * 4);
  l.slot = take(T * R * 4);
  l.node_slot = take(T * N * 4);
  l.pos = take(T * K * 4);
  l.fslot = take(R * T * G * 4);
  l.fcount = take(R * 4);
  l.rcount = take(R * 4);
  l.roff = take((R + 1) * 4);
  l.expert_counts = take(g.L * 4);
  l.expert_offsets = take((g.L + 1) * 4);
  l.m_indices = take(g.bound * 4);
  l.row_src = take(g.bound * 4);
  l.row_weight = take(g.bound * 4);
  l.token_rows = take(R * T * K * 4);
  l.gx = take(g.bound * H * (g.fp8 ? 1 : 2));
  l.gscales = take(g.bound * g.SC * 4);
  l.total = at;
  return l;
}
// The row_record table ([bound] int32, DeviceRecvView::row_record) follows the layout at `total`
// rather than being a Lay field, which would move every later member of Args and so every
// kernel's parameter loads (the single-node layout does the same: row_record_offset).
__host__ __device__ inline size_t fwd_row_record_offset(const Lay& l) {
  return l.total;
}
inline size_t fwd_workspace_bytes(const Geo& g, const Lay& l) {
  return fwd_row_record_offset(l) + (static_cast<size_t>(g.bound) * 4 + 255) / 256 * 256;
}

struct Args {
  Geo g;
  Lay l;
  char* my;
  DevErr* err;
  unsigned long long timeout_ns;
  bool nccl;  // network hop over NCCL: stage-1 records and node rows go to my send buffer
  // per call
  int64_t T;
  const uint16_t* x;
  const int32_t* idx;
  const float* w;
  const uint16_t* y;
  uint16_t* out;
  bool weighted, expand;
};

template <typename T>
__device__ __forceinline__ T* at(char* base, size_t off) {
  return reinterpret_cast<T*>(base + off);
}
__device__ __forceinline__ char* peer(const Args& a, int r) {
  return reinterpret_cast<char* const*>(a.my + a.l.peers)[r];
}
// Where the network hop's records for node m go: the forwarder's workspace (NVLink stand-in,
// region = my node) or my send buffer (NCCL, region = m).
__device__ __forceinline__ char* net(const Args& a, int m) {
  return reinterpret_cast<char* const*>(a.my + a.l.net)[m];
}
__device__ __forceinline__ int net_region(const Args& a, int m) {
  return a.nccl ? m : a.g.node;
}
__device__ __forceinline__ unsigned long long* flag(char* base, const Args& a, int group, int i) {
  return at<unsigned long long>(base, a.l.flags) + group * kMaxRanks + i;
}
__device__ __forceinline__ int rank_at(const Geo& g, int node, int local) {
  return node * g.G + local;
}

// Bounded acquire-poll of flag `group`[i] of my workspace; false (error recorded) on timeout or
// once this rank timed out elsewhere.
__device__ bool wait_flag(const Args& a, int group, int i, unsigned long long expected, int from) {
  const unsigned long long* p = flag(a.my, a, group, i);
  unsigned long long v = ld_acquire_sys(p);
  if (v >= expected) return true;
  const unsigned long long t0 = globaltimer();
  const long long c0 = clock64();
  // NOTE: the SM clock bounds the wait too, so a global timer that stands still cannot hang it.
  const long long max_cycles = static_cast<long long>(a.timeout_ns) * 3;
  for (;;) {
    __nanosleep(64);
    v = ld_acquire_sys(p);
    if (v >= expected) return true;
    if (*reinterpret_cast<volatile int*>(&a.err->code) == kErrTimeout) return false;
    if (globaltimer() - t0 > a.timeout_ns || clock64() - c0 > max_cycles) {
      record_error(a.err, kErrTimeout, a.g.rank, from, group, expected, v, i);
      return false;
    }
  }
}
__device__ __forceinline__ void release(char* base, const Args& a, int group, int i,
                                        unsigned long long v) {
  __threadfence_system();
  st_release_sys(flag(base, a, group, i), v);
}

// The end of a kernel: true in the one block that finishes last (after every block's writes);
// it resets the counter for the next call.
__device__ bool last_block(const Args& a, int slot) {
  __shared__ int is_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    unsigned long long* c = at<unsigned long long>(a.my, a.l.status) + slot;
    is_last = atomicAdd(c, 1ull) == gridDim.x - 1;
    if (is_last) *c = 0;
  }
  __syncthreads();
  if (is_last) __threadfence();
  return is_last;
}

__device__ __forceinline__ int64_t warp_id() {
  return static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
}
__device__ __forceinline__ int64_t warp_count() {
  return static_cast<int64_t>(gridDim.x) * kWarps;
}

// Expert ids of token t (lane), -1 for none; out-of-range ids reported when `report`.
__device__ __forceinline__ void load_experts(const Args& a, int64_t t, bool valid, int* ev,
                                             bool report) {
#pragma unroll
  for (int k = 0; k < kMaxTopK; ++k) {
    int e = (valid && k < a.g.K) ? __ldg(a.idx + t * a.g.K + k) : -1;
    if (e < -1 || e >= a.g.E) {
      if (report) record_error(a.err, kErrBadExpert, a.g.rank, -1, -1, 0, e, t);
      e = -1;
    }
    ev[k] = e;
  }
}

// ---- dispatch 1 (one block): the plan of the batch ----
// Per 32-token tile (one warp): expert counts (lane masks per expert in shared memory),
// destination and node ballots; exclusive prefixes over the tiles per column; then per token its
// slot at every destination (tokens before it going there), its index among the tokens sent to
// each node's forwarder, and per k its rank among this rank's tokens of that expert.
__global__ void __launch_bounds__(kThreads) k_fwd_plan(Args a) {
  extern __shared__ uint32_t emask_all[];  // [kWarps][E]
  const Geo& g = a.g;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int ntiles = static_cast<int>((a.T + kTile - 1) / kTile);
  int* cnt = at<int>(a.my, a.l.plan_cnt);
  uint32_t* dball = at<uint32_t>(a.my, a.l.plan_dball);
  uint32_t* nball = at<uint32_t>(a.my, a.l.plan_nball);
  uint32_t* em = emask_all + warp * g.E;
  for (int i = threadIdx.x; i < kWarps * g.E; i += blockDim.x) emask_all[i] = 0;
  __syncthreads();
  for (int tile = warp; tile < ntiles; tile += kWarps) {
    const int64_t t = static_cast<int64_t>(tile) * kTile + lane;
    const bool valid = t < a.T;
    int ev[kMaxTopK];
    load_experts(a, t, valid, ev, true);
    uint32_t dmask = 0, nmask = 0;
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k)
      if (ev[k] >= 0) {
        dmask |= 1u << (ev[k] / g.L);
        nmask |= 1u << (ev[k] / g.L / g.G);
      }
    if (valid && g.max_nodes > 0 && __popc(nmask) > g.max_nodes)
      record_error(a.err, kErrNodeLimit, g.rank, -1, -1, g.max_nodes, __popc(nmask), t);
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k)
      if (ev[k] >= 0) atomicOr(em + ev[k], 1u << lane);
    __syncwarp();
    for (int e = lane; e < g.E; e += 32) cnt[tile * g.W + e] = __popc(em[e]);
    __syncwarp();
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k)
      if (ev[k] >= 0) em[ev[k]] = 0;
    __syncwarp();
    for (int d = 0; d < g.R; ++d) {
      const uint32_t b = __ballot_sync(kFull, (dmask >> d) & 1u);
      if (lane == 0) {
        dball[d * g.NT + tile] = b;
        cnt[tile * g.W + g.E + d] = __popc(b);
      }
    }
    for (int m = 0; m < g.N; ++m) {
      const uint32_t b = __ballot_sync(kFull, (nmask >> m) & 1u);
      if (lane == 0) {
        nball[m * g.NT + tile] = b;
        cnt[tile * g.W + g.E + g.R + m] = __popc(b);
      }
    }
  }
  __syncthreads();
  // Exclusive prefixes over the tiles, one thread per column (eight loads in flight).
  for (int c = threadIdx.x; c < g.W; c += blockDim.x) {
    int run = 0, tile = 0;
    for (; tile + 8 <= ntiles; tile += 8) {
      int v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) v[u] = cnt[(tile + u) * g.W + c];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        cnt[(tile + u) * g.W + c] = run;
        run += v[u];
      }
    }
    for (; tile < ntiles; ++tile) {
      const int v = cnt[tile * g.W + c];
      cnt[tile * g.W + c] = run;
      run += v;
    }
    at<int>(a.my, a.l.plan_tot)[c] = run;
  }
  __syncthreads();
  int32_t* slot = at<int32_t>(a.my, a.l.slot);
  int32_t* node_slot = at<int32_t>(a.my, a.l.node_slot);
  int32_t* pos = at<int32_t>(a.my, a.l.pos);
  for (int tile = warp; tile < ntiles; tile += kWarps) {
    const int64_t t = static_cast<int64_t>(tile) * kTile + lane;
    const bool valid = t < a.T;
    const unsigned below = lanemask_lt();
    int ev[kMaxTopK];
    load_experts(a, t, valid, ev, false);
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k)
      if (ev[k] >= 0) atomicOr(em + ev[k], 1u << lane);
    __syncwarp();
    if (valid)
      for (int k = 0; k < g.K; ++k)
        pos[t * g.K + k] = ev[k] >= 0 ? cnt[tile * g.W + ev[k]] + __popc(em[ev[k]] & below) : -1;
    __syncwarp();
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k)
      if (ev[k] >= 0) em[ev[k]] = 0;
    __syncwarp();
    if (!valid) continue;
    for (int d = 0; d < g.R; ++d) {
      const uint32_t b = dball[d * g.NT + tile];
      slot[t * g.R + d] = (b >> lane) & 1u ? cnt[tile * g.W + g.E + d] + __popc(b & below) : -1;
    }
    for (int m = 0; m < g.N; ++m) {
      const uint32_t b = nball[m * g.NT + tile];
      node_slot[t * g.N + m] =
          (b >> lane) & 1u ? cnt[tile * g.W + g.E + g.R + m] + __popc(b & below) : -1;
    }
  }
}

// ---- dispatch 2 (send): each token once to the forwarder of every node it touches ----
// A stage-1 record: the payload (quantised once), the source token, the K global expert ids,
// weights and per-expert ranks, and the token's slot at each rank of that node (so the forwarder
// needs no scan). Block 0 writes each forwarder's notify: T, the record count, per rank of the
// node its token count and per-local-expert counts.
__global__ void __launch_bounds__(kThreads) k_fwd_send(Args a) {
  __shared__ int abort_flag;
  const Geo& g = a.g;
  const int lane = threadIdx.x & 31;
  const unsigned long long n = at<unsigned long long>(a.my, a.l.status)[kSeqDispatch] + 1;
  if (threadIdx.x == 0) abort_flag = 0;
  __syncthreads();
  // My region at each forwarder is free once it forwarded the previous dispatch.
  if (!a.nccl && threadIdx.x < g.N &&
      !wait_flag(a, kFwdAck, threadIdx.x, n - 1, rank_at(g, threadIdx.x, g.local)))
    abort_flag = 1;
  __syncthreads();
  if (abort_flag) return;
  const int* tot = at<int>(a.my, a.l.plan_tot);
  if (blockIdx.x == 0)
    for (int m = 0; m < g.N; ++m) {
      int32_t* nt = at<int32_t>(net(a, m), a.l.n_notify) + net_region(a, m) * g.NSZ;
      for (int i = threadIdx.x; i < g.NSZ; i += blockDim.x) {
        int v;
        if (i == 0)
          v = static_cast<int>(a.T);
        else if (i == 1)
          v = tot[g.E + g.R + m];
        else if (i < 2 + g.G)
          v = tot[g.E + rank_at(g, m, i - 2)];
        else
          v = tot[(m * g.G) * g.L + (i - 2 - g.G)];  // node m's experts are contiguous
        nt[i] = v;
      }
    }
  const int32_t* node_slot = at<int32_t>(a.my, a.l.node_slot);
  const int32_t* slot = at<int32_t>(a.my, a.l.slot);
  const int32_t* pos = at<int32_t>(a.my, a.l.pos);
  for (int64_t t = warp_id(); t < a.T; t += warp_count()) {
    const int q = lane < g.N ? node_slot[t * g.N + lane] : -1;
    const unsigned nodes = __ballot_sync(kFull, q >= 0);
    // Metadata of every copy.
    for (unsigned mm = nodes; mm; mm &= mm - 1) {
      const int m = __ffs(mm) - 1;
      const int64_t r = static_cast<int64_t>(net_region(a, m)) * g.Tmax + __shfl_sync(kFull, q, m);
      char* base = net(a, m);
      if (lane == 0) at<int32_t>(base, a.l.n_src)[r] = static_cast<int32_t>(t);
      if (lane < g.K) {
        at<int32_t>(base, a.l.n_idx)[r * g.K + lane] = __ldg(a.idx + t * g.K + lane);
        at<float>(base, a.l.n_w)[r * g.K + lane] = __ldg(a.w + t * g.K + lane);
        at<int32_t>(base, a.l.n_pos)[r * g.K + lane] = pos[t * g.K + lane];
      }
      if (lane < g.G) at<int32_t>(base, a.l.n_j)[r * g.G + lane] = slot[t * g.R + m * g.G + lane];
    }
    // Payload: 1024 columns per step.
    const uint16_t* xt = a.x + t * g.H;
    for (int64_t c0 = 0; c0 < g.H; c0 += 1024) {
      if (!g.fp8) {
        uint4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int64_t c = c0 + u * 256 + lane * 8;
          if (c < g.H) v[u] = __ldg(reinterpret_cast<const uint4*>(xt + c));
        }
        for (unsigned mm = nodes; mm; mm &= mm - 1) {
          const int m = __ffs(mm) - 1;
          const int64_t r =
              static_cast<int64_t>(net_region(a, m)) * g.Tmax + __shfl_sync(kFull, q, m);
          char* rec = net(a, m) + a.l.n_rec + r * g.P;
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int64_t c = c0 + u * 256 + lane * 8;
            if (c < g.H) *reinterpret_cast<uint4*>(rec + c * 2) = v[u];
          }
        }
      } else {
        uint4 v[4], codes[2];
        float scale[2];
        bool valid[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int64_t c = c0 + u * 512 + lane * 16;
          valid[u] = c < g.H;  // whole 8-lane groups (H % 128 == 0)
          v[2 * u] = v[2 * u + 1] = make_uint4(0, 0, 0, 0);
          if (valid[u]) {
            v[2 * u] = __ldg(reinterpret_cast<const uint4*>(xt + c));
            v[2 * u + 1] = __ldg(reinterpret_cast<const uint4*>(xt + c + 8));
          }
        }
#pragma unroll
        for (int u = 0; u < 2; ++u) quantize16(v[2 * u], v[2 * u + 1], codes[u], scale[u]);
        for (unsigned mm = nodes; mm; mm &= mm - 1) {
          const int m = __ffs(mm) - 1;
          const int64_t r =
              static_cast<int64_t>(net_region(a, m)) * g.Tmax + __shfl_sync(kFull, q, m);
          char* rec = net(a, m) + a.l.n_rec + r * g.P;
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
  }
  if (!last_block(a, kDoneSend)) return;
  if (!a.nccl && threadIdx.x < g.N) release(net(a, threadIdx.x), a, kFwdArrived, g.node, n);
}

// ---- dispatch 3 (forwarder): stage-1 records of every source with my local index on to the
// ranks of my node, into source region s at the slot the sender computed ----
__global__ void __launch_bounds__(kThreads) k_fwd_forward(Args a) {
  __shared__ int abort_flag;
  const Geo& g = a.g;
  const int lane = threadIdx.x & 31;
  const unsigned long long n = at<unsigned long long>(a.my, a.l.status)[kSeqDispatch] + 1;
  if (threadIdx.x == 0) abort_flag = 0;
  __syncthreads();
  if (!a.nccl && threadIdx.x < g.N &&
      !wait_flag(a, kFwdArrived, threadIdx.x, n, rank_at(g, threadIdx.x, g.local)))
    abort_flag = 1;
  if (threadIdx.x >= 32 && threadIdx.x < 32 + g.G &&
      !wait_flag(a, kRecvAck, threadIdx.x - 32, n - 1, rank_at(g, g.node, threadIdx.x - 32)))
    abort_flag = 1;
  __syncthreads();
  if (abort_flag) return;
  const int32_t* nt = at<int32_t>(a.my, a.l.n_notify);
  if (blockIdx.x == 0) {
    for (int i = threadIdx.x; i < g.N * g.G * (1 + g.L); i += blockDim.x) {
      const int ms = i / (g.G * (1 + g.L)), dl = i / (1 + g.L) % g.G, e = i % (1 + g.L);
      const int s = rank_at(g, ms, g.local), d = rank_at(g, g.node, dl);
      const int32_t* src = nt + ms * g.NSZ;
      at<int32_t>(peer(a, d), a.l.r_notify)[s * (1 + g.L) + e] =
          e == 0 ? __ldcg(src + 2 + dl) : __ldcg(src + 2 + g.G + dl * g.L + e - 1);
    }
    if (threadIdx.x < g.N)
      at<int32_t>(a.my, a.l.fcount)[rank_at(g, threadIdx.x, g.local)] =
          __ldcg(nt + threadIdx.x * g.NSZ + 1);
  }
  int32_t* fslot = at<int32_t>(a.my, a.l.fslot);
  for (int ms = 0; ms < g.N; ++ms) {
    const int s = rank_at(g, ms, g.local);
    const int count = __ldcg(nt + ms * g.NSZ + 1);
    for (int64_t q = warp_id(); q < count; q += warp_count()) {
      const int64_t r = static_cast<int64_t>(ms) * g.Tmax + q;
      const int j = lane < g.G ? __ldcg(at<int32_t>(a.my, a.l.n_j) + r * g.G + lane) : -1;
      if (lane < g.G) fslot[(static_cast<int64_t>(s) * g.Tmax + q) * g.G + lane] = j;
      const unsigned dests = __ballot_sync(kFull, j >= 0);
      int e = -1, p = -1;
      float w = 0.0f;
      if (lane < g.K) {
        e = __ldcg(at<int32_t>(a.my, a.l.n_idx) + r * g.K + lane);
        p = __ldcg(at<int32_t>(a.my, a.l.n_pos) + r * g.K + lane);
        w = __ldcg(at<float>(a.my, a.l.n_w) + r * g.K + lane);
      }
      const int src_token = __ldcg(at<int32_t>(a.my, a.l.n_src) + r);
      for (unsigned dd = dests; dd; dd &= dd - 1) {
        const int dl = __ffs(dd) - 1, d = rank_at(g, g.node, dl);
        const int64_t o = static_cast<int64_t>(s) * g.Tmax + __shfl_sync(kFull, j, dl);
        char* base = peer(a, d);
        if (lane == 0) at<int32_t>(base, a.l.r_src)[o] = src_token;
        if (lane < g.K) {
          const bool here = e >= d * g.L && e < (d + 1) * g.L;
          at<int32_t>(base, a.l.r_loc)[o * g.K + lane] = here ? e - d * g.L : -1;
          at<int32_t>(base, a.l.r_pos)[o * g.K + lane] = here ? p : -1;
          at<float>(base, a.l.r_w)[o * g.K + lane] = w;
        }
      }
      // Payload: eight 16-byte loads in flight per lane, stored to every destination.
      // NOTE: the step loop is warp-uniform (a shuffle inside); lanes past the record only skip
      // memory (a lane-dependent bound hung the warp on records under 512 bytes).
      const char* rec = a.my + a.l.n_rec + r * g.P;
      for (int64_t step = 0; step < g.P; step += 8 * 512) {
        const int64_t c0 = step + lane * 16;
        uint4 v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u)
          if (c0 + u * 512 < g.P) v[u] = __ldcg(reinterpret_cast<const uint4*>(rec + c0 + u * 512));
        for (unsigned dd = dests; dd; dd &= dd - 1) {
          const int dl = __ffs(dd) - 1;
          const int64_t o = static_cast<int64_t>(s) * g.Tmax + __shfl_sync(kFull, j, dl);
          char* dst = peer(a, rank_at(g, g.node, dl)) + a.l.r_rec + o * g.P;
#pragma unroll
          for (int u = 0; u < 8; ++u)
            if (c0 + u * 512 < g.P) *reinterpret_cast<uint4*>(dst + c0 + u * 512) = v[u];
        }
      }
    }
  }
  if (!last_block(a, kDoneForward)) return;
  for (int i = threadIdx.x; i < g.N * g.G; i += blockDim.x) {
    const int ms = i / g.G, dl = i % g.G;
    release(peer(a, rank_at(g, g.node, dl)), a, kRecvArrived, rank_at(g, ms, g.local), n);
  }
  if (!a.nccl && threadIdx.x < g.N)
    release(peer(a, rank_at(g, threadIdx.x, g.local)), a, kFwdAck, g.node, n);
}

// ---- dispatch 4 (receiver): the grouped (or masked) layout and the payload rows ----
// Every block derives the layout from the forwarded counts (row = expert block + rows of the
// earlier sources for that expert + the rank the sender computed); one warp per received record.
// m_indices / row_src / token_rows were set to -1 before this kernel.
__global__ void __launch_bounds__(kThreads) k_fwd_recv(Args a) {
  extern __shared__ int rsm[];
  __shared__ int abort_flag, overflow;
  __shared__ long long rows_needed;
  const Geo& g = a.g;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int* base = rsm;               // [R][L]
  int* offs = base + g.R * g.L;  // [L + 1]
  int* tot = offs + g.L + 1;     // [L]
  int* roff = tot + g.L;         // [R + 1]
  int64_t* status = at<int64_t>(a.my, a.l.status);
  const unsigned long long n = static_cast<unsigned long long>(status[kSeqDispatch]) + 1;
  if (threadIdx.x == 0) abort_flag = 0;
  __syncthreads();
  if (threadIdx.x < g.R &&
      !wait_flag(a, kRecvArrived, threadIdx.x, n, rank_at(g, g.node, threadIdx.x % g.G)))
    abort_flag = 1;
  __syncthreads();
  if (abort_flag) return;
  const int32_t* rn = at<int32_t>(a.my, a.l.r_notify);
  for (int i = threadIdx.x; i < g.R * g.L; i += blockDim.x)
    base[i] = __ldcg(rn + (i / g.L) * (1 + g.L) + 1 + i % g.L);
  __syncthreads();
  for (int e = threadIdx.x; e < g.L; e += blockDim.x) {
    int run = 0;
    for (int s = 0; s < g.R; ++s) {
      const int c = base[s * g.L + e];
      base[s * g.L + e] = run;
      run += c;
    }
    tot[e] = run;
  }
  if (threadIdx.x == 32) {
    roff[0] = 0;
    for (int s = 0; s < g.R; ++s) roff[s + 1] = roff[s] + __ldcg(rn + s * (1 + g.L));
  }
  __syncthreads();
  if (warp == 0) {
    if (lane == 0) offs[0] = 0;
    int run = 0, largest = 0;
    for (int e0 = 0; e0 < g.L; e0 += 32) {
      const int e = e0 + lane;
      const int c = e < g.L ? tot[e] : 0;
      const int size = e < g.L ? (g.cap > 0 ? static_cast<int>(g.cap) : (c + 127) / 128 * 128) : 0;
      int incl = size;
#pragma unroll
      for (int m = 1; m < 32; m <<= 1) {
        const int o = __shfl_up_sync(kFull, incl, m);
        if (lane >= m) incl += o;
      }
      if (e < g.L) offs[e + 1] = run + incl;
      run += __shfl_sync(kFull, incl, 31);
      largest = max(largest, c);
    }
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) largest = max(largest, __shfl_xor_sync(kFull, largest, m));
    if (lane == 0) {
      if (g.cap > 0) {
        overflow = largest > g.cap;
        rows_needed = largest > g.cap ? largest : g.bound;
      } else {
        overflow = run > g.bound;
        rows_needed = run;
      }
    }
  }
  __syncthreads();
  const bool ovf = overflow != 0;
  if (blockIdx.x == 0) {
    for (int e = threadIdx.x; e < g.L; e += blockDim.x) {
      at<int32_t>(a.my, a.l.expert_counts)[e] = tot[e];
      at<int32_t>(a.my, a.l.expert_offsets)[e + 1] = offs[e + 1];
    }
    if (threadIdx.x < g.R)
      at<int32_t>(a.my, a.l.rcount)[threadIdx.x] = roff[threadIdx.x + 1] - roff[threadIdx.x];
    if (threadIdx.x <= g.R) at<int32_t>(a.my, a.l.roff)[threadIdx.x] = roff[threadIdx.x];
    if (threadIdx.x == 0) {
      at<int32_t>(a.my, a.l.expert_offsets)[0] = 0;
      status[kRowsNeeded] = rows_needed;
      status[kOverflow] = overflow;
      status[kNumRecv] = roff[g.R];
    }
  }
  const int64_t total = roff[g.R];
  const int64_t row_bytes = g.fp8 ? g.H : g.H * 2;
  for (int64_t i = warp_id(); i < total; i += warp_count()) {
    int s = 0;
    while (roff[s + 1] <= i) ++s;
    const int64_t slot = static_cast<int64_t>(s) * g.Tmax + (i - roff[s]);
    int row = -1;
    if (lane < g.K && !ovf) {
      const int e = __ldcg(at<int32_t>(a.my, a.l.r_loc) + slot * g.K + lane);
      if (e >= 0) {
        row =
            offs[e] + base[s * g.L + e] + __ldcg(at<int32_t>(a.my, a.l.r_pos) + slot * g.K + lane);
        at<int32_t>(a.my, a.l.m_indices)[row] = e;
        at<int32_t>(a.my, a.l.row_src)[row] = static_cast<int32_t>(i * g.K + lane);
        if (!a.expand)
          at<int32_t>(a.my, fwd_row_record_offset(a.l))[row] = static_cast<int32_t>(slot);
        at<float>(a.my, a.l.row_weight)[row] = __ldcg(at<float>(a.my, a.l.r_w) + slot * g.K + lane);
        at<int32_t>(a.my, a.l.token_rows)[slot * g.K + lane] = row;
      }
    }
    if (!a.expand || ovf) continue;
    int rows[kMaxTopK];
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k) rows[k] = __shfl_sync(kFull, row, k < g.K ? k : 0);
    const char* rec = a.my + a.l.r_rec + slot * g.P;
    char* gx = a.my + a.l.gx;
    for (int64_t c0 = lane * 16; c0 < row_bytes; c0 += 8 * 512) {
      uint4 v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u)
        if (c0 + u * 512 < row_bytes)
          v[u] = __ldcg(reinterpret_cast<const uint4*>(rec + c0 + u * 512));
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k) {
        if (k >= g.K || rows[k] < 0) continue;
        char* dst = gx + static_cast<int64_t>(rows[k]) * row_bytes + c0;
#pragma unroll
        for (int u = 0; u < 8; ++u)
          if (c0 + u * 512 < row_bytes) *reinterpret_cast<uint4*>(dst + u * 512) = v[u];
      }
    }
    if (g.fp8) {
      float* gs = at<float>(a.my, a.l.gscales);
      for (int64_t c = lane; c < g.SC; c += 32) {
        const float sc = __ldcg(reinterpret_cast<const float*>(rec + g.H) + c);
#pragma unroll
        for (int k = 0; k < kMaxTopK; ++k)
          if (k < g.K && rows[k] >= 0) gs[rows[k] * g.SC + c] = sc;
      }
    }
  }
  if (!last_block(a, kDoneRecv)) return;
  // My regions of every source are free again: tell the forwarders of my node.
  if (threadIdx.x < g.G) release(peer(a, rank_at(g, g.node, threadIdx.x)), a, kRecvAck, g.local, n);
  if (threadIdx.x == 0) status[kSeqDispatch] = static_cast<int64_t>(n);
}

// ---- combine 1 (receiver): one partial per received token, to its forwarder in my node ----
// partial = bf16(sum over k ascending with a row here of w[k] * y[row]), no FMA; or the given
// row (combine_tokens).
__global__ void __launch_bounds__(kThreads) k_fwd_gather(Args a) {
  __shared__ int abort_flag;
  const Geo& g = a.g;
  const int lane = threadIdx.x & 31;
  const int64_t* status = at<int64_t>(a.my, a.l.status);
  const unsigned long long c = static_cast<unsigned long long>(status[kSeqCombine]) + 1;
  if (threadIdx.x == 0) abort_flag = 0;
  __syncthreads();
  if (threadIdx.x < g.G &&
      !wait_flag(a, kGatherAck, threadIdx.x, c - 1, rank_at(g, g.node, threadIdx.x)))
    abort_flag = 1;
  __syncthreads();
  if (abort_flag) return;
  const int32_t* roff = at<int32_t>(a.my, a.l.roff);
  const int32_t* token_rows = at<int32_t>(a.my, a.l.token_rows);
  const float* row_weight = at<float>(a.my, a.l.row_weight);
  const int64_t total = roff[g.R];
  for (int64_t i = warp_id(); i < total; i += warp_count()) {
    int s = 0;
    while (roff[s + 1] <= i) ++s;
    const int64_t j = i - roff[s], slot = static_cast<int64_t>(s) * g.Tmax + j;
    uint16_t* dst = at<uint16_t>(peer(a, rank_at(g, g.node, s % g.G)), a.l.cg) +
                    ((static_cast<int64_t>(s) * g.G + g.local) * g.Tmax + j) * g.H;
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
    for (int64_t col = lane * 8; col < g.H; col += 256) {
      if (!a.weighted) {
        *reinterpret_cast<uint4*>(dst + col) =
            __ldg(reinterpret_cast<const uint4*>(a.y + slot * g.H + col));
        continue;
      }
      uint4 v[kMaxTopK];
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k)
        if (k < g.K && rows[k] >= 0)
          v[k] = __ldg(
              reinterpret_cast<const uint4*>(a.y + static_cast<int64_t>(rows[k]) * g.H + col));
      float acc[8];
#pragma unroll
      for (int x = 0; x < 8; ++x) acc[x] = 0.0f;
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k) {
        if (k >= g.K || rows[k] < 0) continue;
        add_weighted_bf16x8(acc, ws[k], v[k]);
      }
      *reinterpret_cast<uint4*>(dst + col) = pack_bf16(acc);
    }
  }
  if (!last_block(a, kDoneGather)) return;
  if (threadIdx.x < g.G)
    release(peer(a, rank_at(g, g.node, threadIdx.x)), a, kGatherArrived, g.local, c);
}

// ---- combine 2 (forwarder): node sums, one row per forwarded token back to its source ----
// node_n = bf16(sum over the ranks of my node ascending of their partials).
__global__ void __launch_bounds__(kThreads) k_fwd_reduce(Args a) {
  __shared__ int abort_flag;
  const Geo& g = a.g;
  const int lane = threadIdx.x & 31;
  const int64_t* status = at<int64_t>(a.my, a.l.status);
  const unsigned long long c = static_cast<unsigned long long>(status[kSeqCombine]) + 1;
  if (threadIdx.x == 0) abort_flag = 0;
  __syncthreads();
  if (threadIdx.x < g.G &&
      !wait_flag(a, kGatherArrived, threadIdx.x, c, rank_at(g, g.node, threadIdx.x)))
    abort_flag = 1;
  if (!a.nccl && threadIdx.x >= 32 && threadIdx.x < 32 + g.N &&
      !wait_flag(a, kReturnAck, threadIdx.x - 32, c - 1, rank_at(g, threadIdx.x - 32, g.local)))
    abort_flag = 1;
  __syncthreads();
  if (abort_flag) return;
  const int32_t* fslot = at<int32_t>(a.my, a.l.fslot);
  const int32_t* fcount = at<int32_t>(a.my, a.l.fcount);
  const uint16_t* cg = at<uint16_t>(a.my, a.l.cg);
  for (int ms = 0; ms < g.N; ++ms) {
    const int s = rank_at(g, ms, g.local);
    const int64_t count = fcount[s];
    // NCCL: my send buffer's region of source node ms; NVLink: the source's region of my node.
    uint16_t* out = at<uint16_t>(a.nccl ? net(a, ms) : peer(a, s), a.l.cr) +
                    static_cast<int64_t>(a.nccl ? ms : g.node) * g.Tmax * g.H;
    for (int64_t q = warp_id(); q < count; q += warp_count()) {
      const int j = lane < g.G ? fslot[(static_cast<int64_t>(s) * g.Tmax + q) * g.G + lane] : -1;
      int js[kMaxRanks];
      for (int dl = 0; dl < g.G; ++dl) js[dl] = __shfl_sync(kFull, j, dl);
      for (int64_t col = lane * 8; col < g.H; col += 256) {
        float acc[8];
#pragma unroll
        for (int x = 0; x < 8; ++x) acc[x] = 0.0f;
        for (int dl = 0; dl < g.G; ++dl) {
          if (js[dl] < 0) continue;
          add_bf16x8(
              acc, __ldcg(reinterpret_cast<const uint4*>(
                       cg + ((static_cast<int64_t>(s) * g.G + dl) * g.Tmax + js[dl]) * g.H + col)));
        }
        *reinterpret_cast<uint4*>(out + q * g.H + col) = pack_bf16(acc);
      }
    }
  }
  if (!last_block(a, kDoneReduce)) return;
  if (!a.nccl && threadIdx.x < g.N)
    release(peer(a, rank_at(g, threadIdx.x, g.local)), a, kReturnArrived, g.node, c);
  if (threadIdx.x >= 32 && threadIdx.x < 32 + g.G)
    release(peer(a, rank_at(g, g.node, threadIdx.x - 32)), a, kGatherAck, g.local, c);
}

// ---- combine 3 (source): out[t] = bf16(sum over nodes ascending of the node rows) ----
__global__ void __launch_bounds__(kThreads) k_fwd_return(Args a) {
  __shared__ int abort_flag;
  const Geo& g = a.g;
  const int lane = threadIdx.x & 31;
  int64_t* status = at<int64_t>(a.my, a.l.status);
  const unsigned long long c = static_cast<unsigned long long>(status[kSeqCombine]) + 1;
  if (threadIdx.x == 0) abort_flag = 0;
  __syncthreads();
  if (!a.nccl && threadIdx.x < g.N &&
      !wait_flag(a, kReturnArrived, threadIdx.x, c, rank_at(g, threadIdx.x, g.local)))
    abort_flag = 1;
  __syncthreads();
  if (abort_flag) return;
  const int32_t* node_slot = at<int32_t>(a.my, a.l.node_slot);
  const uint16_t* cr = at<uint16_t>(a.my, a.l.cr);
  for (int64_t t = warp_id(); t < a.T; t += warp_count()) {
    const int q = lane < g.N ? node_slot[t * g.N + lane] : -1;
    int qs[kMaxRanks];
    for (int m = 0; m < g.N; ++m) qs[m] = __shfl_sync(kFull, q, m);
    for (int64_t col = lane * 8; col < g.H; col += 256) {
      float acc[8];
#pragma unroll
      for (int x = 0; x < 8; ++x) acc[x] = 0.0f;
      for (int m = 0; m < g.N; ++m) {
        if (qs[m] < 0) continue;
        add_bf16x8(acc, __ldcg(reinterpret_cast<const uint4*>(
                            cr + (static_cast<int64_t>(m) * g.Tmax + qs[m]) * g.H + col)));
      }
      *reinterpret_cast<uint4*>(a.out + t * g.H + col) = pack_bf16(acc);
    }
  }
  if (!last_block(a, kDoneReturn)) return;
  if (!a.nccl && threadIdx.x < g.N)
    release(peer(a, rank_at(g, threadIdx.x, g.local)), a, kReturnAck, g.node, c);
  if (threadIdx.x == 0) status[kSeqCombine] = static_cast<int64_t>(c);
}

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

size_t recv_smem(const Geo& g) {
  return (static_cast<size_t>(g.R) * g.L + (g.L + 1) + g.L + (g.R + 1)) * 4;
}

}  // namespace

struct ForwardEpRank::Impl {
  EpConfig cfg;
  Geo g;
  Lay l;
  DeviceEpOptions opt;
  int device = 0, blocks = 1, wide = 1;  // grids: the send kernel, the others
  char* ws = nullptr;
  char* send_ws = nullptr;  // NCCL wire: the network fields by destination (or source) node
  std::vector<void*> opened;
  int64_t last_tokens = 0;
  bool connected = false;

  // The ranks whose workspaces this rank writes: its node's, and over the NVLink stand-in for
  // the network the forwarders of the other nodes (the rank of its local index there).
  bool writes_to(int r) const {
    return r / g.G == g.node || (opt.wire == Wire::kNvlink && r % g.G == g.local);
  }
  void check_connected(const char* call) const {
    FM_CHECK_ARG(connected, "rank ", g.rank, ": ", call,
                 " before connect() / connect_ipc(): the two-stage route writes into the "
                 "workspaces of its node's ranks");
  }

  Args args() const {
    Args a{};
    a.g = g;
    a.l = l;
    a.my = ws;
    a.err = reinterpret_cast<DevErr*>(ws + l.err);
    a.timeout_ns = static_cast<unsigned long long>(cfg.timeout_s * 1e9);
    a.nccl = opt.wire == Wire::kNccl;
    return a;
  }
  void launch(void (*kernel)(Args), int grid, size_t smem, cudaStream_t stream, const Args& a) {
    kernel<<<grid, kThreads, smem, stream>>>(a);
    FM_CHECK_LAUNCH();
  }
  // NCCL wire: region m of each field in my send buffer goes to node m's rank of my local index
  // (comm rank m), and its region for me lands in my workspace's region m.
  void exchange(const std::vector<std::pair<size_t, size_t>>& fields, cudaStream_t stream) {
#if defined(FP8MOE_HAVE_NCCL)
    auto comm = static_cast<ncclComm_t>(opt.nccl_comm);
    FM_FWD_CHECK_NCCL(ncclGroupStart());
    for (int m = 0; m < g.N; ++m)
      for (const auto& [off, bytes] : fields) {
        FM_FWD_CHECK_NCCL(ncclSend(send_ws + off + m * bytes, bytes, ncclUint8, m, comm, stream));
        FM_FWD_CHECK_NCCL(ncclRecv(ws + off + m * bytes, bytes, ncclUint8, m, comm, stream));
      }
    FM_FWD_CHECK_NCCL(ncclGroupEnd());
#else
    (void)fields;
    (void)stream;
    FM_THROW(ErrorKind::kInvalidArgument, "this build has no NCCL back end");
#endif
  }
};

ForwardEpRank::ForwardEpRank(const EpConfig& cfg, int rank, int device, const DeviceEpOptions& opt)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.cfg = cfg;
  m.g = make_geo(cfg, rank);
  m.l = make_lay(m.g);
  m.opt = opt;
  m.device = device;
  FM_CHECK_ARG(cfg.top_k <= kMaxTopK, "top_k=", cfg.top_k, " exceeds ", kMaxTopK);
  FM_CHECK_ARG(cfg.num_ranks <= kMaxRanks, "num_ranks=", cfg.num_ranks, " exceeds ", kMaxRanks);
  FM_CHECK_ARG(m.g.E * kWarps * 4 <= 160 * 1024, cfg.num_experts,
               " experts need more shared memory for the two-stage send plan than a block has");
  FM_CHECK_ARG(recv_smem(m.g) <= 160 * 1024, cfg.num_experts, " experts over ", cfg.num_ranks,
               " ranks need more shared memory for the receive layout than a block has");
  FM_CHECK_ARG(opt.num_blocks >= 1, "num_blocks=", opt.num_blocks, " must be positive");
  DeviceGuard guard(device);
  int sms = 0;
  FM_CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // NOTE: kernels poll peers; with several ranks on one GPU every rank's current kernel must be
  // resident at once, so each grid takes at most its share of half the SMs.
  const int sharing = std::max(1, opt.ranks_per_device);
  const int cap = std::max(1, sms / (2 * sharing));
  m.blocks = sharing > 1 ? std::min(opt.num_blocks, cap) : std::min(opt.num_blocks, sms);
  m.wide = sharing > 1 ? cap : sms;
  if (opt.recv_blocks > 0) m.wide = std::min(opt.recv_blocks, m.wide);
  FM_CHECK_CUDA(cudaMalloc(&m.ws, fwd_workspace_bytes(m.g, m.l)));
  FM_CHECK_CUDA(cudaMemset(m.ws, 0, fwd_workspace_bytes(m.g, m.l)));
  FM_CHECK_CUDA(cudaMemset(m.ws + fwd_row_record_offset(m.l), 0xFF, m.g.bound * 4));
  if (opt.wire == Wire::kNccl) {
    FM_CHECK_CUDA(cudaMalloc(&m.send_ws, m.l.net_end));
    FM_CHECK_CUDA(cudaMemset(m.send_ws, 0, m.l.net_end));
  }
  // NOTE: load every kernel now: a lazily loaded module can wait for the device, which never
  // drains while a peer's kernel polls a flag.
  for (const void* k :
       {reinterpret_cast<const void*>(k_fwd_plan), reinterpret_cast<const void*>(k_fwd_send),
        reinterpret_cast<const void*>(k_fwd_forward), reinterpret_cast<const void*>(k_fwd_recv),
        reinterpret_cast<const void*>(k_fwd_gather), reinterpret_cast<const void*>(k_fwd_reduce),
        reinterpret_cast<const void*>(k_fwd_return)}) {
    cudaFuncAttributes attr;
    FM_CHECK_CUDA(cudaFuncGetAttributes(&attr, k));
  }
  FM_CHECK_CUDA(cudaFuncSetAttribute(k_fwd_plan, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(m.g.E * kWarps * 4)));
  FM_CHECK_CUDA(cudaFuncSetAttribute(k_fwd_recv, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(recv_smem(m.g))));
  FM_CHECK_CUDA(cudaDeviceSynchronize());
}

ForwardEpRank::~ForwardEpRank() {
  if (!impl_) return;
  cudaSetDevice(impl_->device);
  for (void* p : impl_->opened) cudaIpcCloseMemHandle(p);
  cudaFree(impl_->ws);
  cudaFree(impl_->send_ws);
}

void* ForwardEpRank::workspace() const {
  return impl_->ws;
}

cudaIpcMemHandle_t ForwardEpRank::ipc_handle() const {
  DeviceGuard guard(impl_->device);
  cudaIpcMemHandle_t h;
  FM_CHECK_CUDA(cudaIpcGetMemHandle(&h, impl_->ws));
  return h;
}

void ForwardEpRank::connect(const std::vector<void*>& bases) {
  Impl& m = *impl_;
  FM_CHECK_ARG(static_cast<int>(bases.size()) == m.g.R, bases.size(), " bases for ", m.g.R,
               " ranks");
  for (int r = 0; r < m.g.R; ++r) {
    if (!m.writes_to(r) || bases[r]) continue;
    FM_THROW(ErrorKind::kInvalidArgument, "rank ", m.g.rank,
             ": connect without the workspace of rank ", r, ", which the two-stage route writes (",
             r / m.g.G == m.g.node ? std::string("a rank of its node")
                                   : "the forwarder of node " + std::to_string(r / m.g.G),
             ")");
  }
  std::vector<void*> net(m.g.N);
  for (int n = 0; n < m.g.N; ++n)
    net[n] = m.opt.wire == Wire::kNccl ? m.send_ws : bases[n * m.g.G + m.g.local];
  DeviceGuard guard(m.device);
  FM_CHECK_CUDA(
      cudaMemcpy(m.ws + m.l.peers, bases.data(), m.g.R * sizeof(void*), cudaMemcpyHostToDevice));
  FM_CHECK_CUDA(
      cudaMemcpy(m.ws + m.l.net, net.data(), m.g.N * sizeof(void*), cudaMemcpyHostToDevice));
  m.connected = true;
}

void ForwardEpRank::connect_ipc(const std::vector<cudaIpcMemHandle_t>& handles) {
  Impl& m = *impl_;
  FM_CHECK_ARG(static_cast<int>(handles.size()) == m.g.R, handles.size(), " handles for ", m.g.R,
               " ranks");
  DeviceGuard guard(m.device);
  std::vector<void*> bases(m.g.R, nullptr);
  for (int r = 0; r < m.g.R; ++r) {
    if (r == m.g.rank) {
      bases[r] = m.ws;
      continue;
    }
    if (!m.writes_to(r)) continue;  // e.g. other nodes' ranks when NCCL carries the hop
    FM_CHECK_CUDA(cudaIpcOpenMemHandle(&bases[r], handles[r], cudaIpcMemLazyEnablePeerAccess));
    m.opened.push_back(bases[r]);
  }
  connect(bases);
}

void ForwardEpRank::dispatch_send(const DeviceBatch& b, cudaStream_t stream) {
  Impl& m = *impl_;
  FM_CHECK_ARG(b.tokens >= 0 && b.tokens <= m.g.Tmax, "rank ", m.g.rank, ": ", b.tokens,
               " tokens exceed max_tokens_per_rank=", m.g.Tmax);
  m.check_connected("dispatch_send");
  DeviceGuard guard(m.device);
  Args a = m.args();
  a.T = b.tokens;
  a.x = b.x;
  a.idx = b.topk_idx;
  a.w = b.topk_weight;
  m.last_tokens = b.tokens;
  m.launch(k_fwd_plan, 1, static_cast<size_t>(m.g.E) * kWarps * 4, stream, a);
  m.launch(k_fwd_send, m.blocks, 0, stream, a);
  if (a.nccl) {
    const size_t T = m.g.Tmax, K = m.g.K, G = m.g.G;
    m.exchange({{m.l.n_rec, T * m.g.P},
                {m.l.n_src, T * 4},
                {m.l.n_idx, T * K * 4},
                {m.l.n_w, T * K * 4},
                {m.l.n_pos, T * K * 4},
                {m.l.n_j, T * G * 4},
                {m.l.n_notify, static_cast<size_t>(m.g.NSZ) * 4}},
               stream);
  }
}

void ForwardEpRank::dispatch_recv(cudaStream_t stream) {
  Impl& m = *impl_;
  DeviceGuard guard(m.device);
  Args a = m.args();
  a.expand = m.opt.expand_payload;
  m.launch(k_fwd_forward, m.wide, 0, stream, a);
  FM_CHECK_CUDA(cudaMemsetAsync(m.ws + m.l.m_indices, 0xFF, m.g.bound * 4, stream));
  FM_CHECK_CUDA(cudaMemsetAsync(m.ws + m.l.row_src, 0xFF, m.g.bound * 4, stream));
  if (!m.opt.expand_payload)  // row_record is exposed (and written) only without the expansion
    FM_CHECK_CUDA(cudaMemsetAsync(m.ws + fwd_row_record_offset(m.l), 0xFF, m.g.bound * 4, stream));
  FM_CHECK_CUDA(cudaMemsetAsync(m.ws + m.l.token_rows, 0xFF,
                                static_cast<size_t>(m.g.R) * m.g.Tmax * m.g.K * 4, stream));
  m.launch(k_fwd_recv, m.wide, recv_smem(m.g), stream, a);
}

void ForwardEpRank::combine_send(const uint16_t* y, bool weighted, cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_connected(weighted ? "combine_send" : "combine_tokens_send");
  DeviceGuard guard(m.device);
  Args a = m.args();
  a.y = y;
  a.weighted = weighted;
  m.launch(k_fwd_gather, m.wide, 0, stream, a);
  m.launch(k_fwd_reduce, m.wide, 0, stream, a);
  if (a.nccl) m.exchange({{m.l.cr, static_cast<size_t>(m.g.Tmax) * m.g.H * 2}}, stream);
}

void ForwardEpRank::combine_recv(uint16_t* out, cudaStream_t stream) {
  Impl& m = *impl_;
  DeviceGuard guard(m.device);
  Args a = m.args();
  a.out = out;
  a.T = m.last_tokens;
  m.launch(k_fwd_return, m.wide, 0, stream, a);
}

DeviceRecvView ForwardEpRank::view() const {
  const Impl& m = *impl_;
  DeviceRecvView v;
  v.recv_count = reinterpret_cast<const int32_t*>(m.ws + m.l.rcount);
  v.expert_counts = reinterpret_cast<const int32_t*>(m.ws + m.l.expert_counts);
  v.expert_offsets = reinterpret_cast<const int32_t*>(m.ws + m.l.expert_offsets);
  v.m_indices = reinterpret_cast<const int32_t*>(m.ws + m.l.m_indices);
  v.row_src = reinterpret_cast<const int32_t*>(m.ws + m.l.row_src);
  v.row_weight = reinterpret_cast<const float*>(m.ws + m.l.row_weight);
  v.x = m.ws + m.l.gx;
  v.x_scales = m.g.fp8 ? reinterpret_cast<const float*>(m.ws + m.l.gscales) : nullptr;
  v.status = reinterpret_cast<const int64_t*>(m.ws + m.l.status);
  // The records reach their final rank in r_rec, in the single-node slot order s * Tmax + j.
  if (!m.opt.expand_payload) {
    v.records = reinterpret_cast<const uint8_t*>(m.ws + m.l.r_rec);
    v.record_stride = m.g.P;
    v.record_rows = static_cast<int64_t>(m.g.R) * m.g.Tmax;
    v.row_record = reinterpret_cast<const int32_t*>(m.ws + fwd_row_record_offset(m.l));
  }
  return v;
}

void ForwardEpRank::check() const {
  const Impl& m = *impl_;
  DeviceGuard guard(m.device);
  DevErr e;
  FM_CHECK_CUDA(cudaMemcpy(&e, m.ws + m.l.err, sizeof(e), cudaMemcpyDeviceToHost));
  if (e.code == kErrTimeout)
    FM_THROW(ErrorKind::kRuntime, "rank ", e.rank, ": peer ", e.peer, " did not answer within ",
             m.cfg.timeout_s, " s: waited on ", flag_name(e.counter), "[rank=", e.rank,
             "][src=", e.peer, "], expected >= ", e.expected, ", seen ", e.seen);
  if (e.code == kErrBadExpert)
    FM_THROW(ErrorKind::kInvalidArgument, "rank ", e.rank, " token ", e.detail, ": expert id ",
             static_cast<long long>(e.seen), " out of range [-1, ", m.cfg.num_experts, ")");
  if (e.code == kErrNodeLimit)
    FM_THROW(ErrorKind::kInvalidArgument, "rank ", e.rank, " token ", e.detail,
             ": its experts span ", e.seen, " nodes, more than max_nodes_per_token=", e.expected);
  int64_t status[kStatusSlots];
  FM_CHECK_CUDA(cudaMemcpy(status, m.ws + m.l.status, sizeof(status), cudaMemcpyDeviceToHost));
  if (status[kOverflow])
    FM_THROW(ErrorKind::kRuntime, "rank ", m.g.rank, ": dispatch overflowed its row bound: ",
             m.cfg.masked_capacity > 0 ? "largest expert count " : "rows needed ",
             status[kRowsNeeded], ", bound ",
             m.cfg.masked_capacity > 0 ? m.cfg.masked_capacity : m.g.bound);
}

DispatchResult ForwardEpRank::download() const {
  const Impl& m = *impl_;
  const Geo& g = m.g;
  DeviceGuard guard(m.device);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  auto get = [&](auto& vec, size_t off, size_t count) {
    vec.resize(count);
    if (count > 0)
      FM_CHECK_CUDA(
          cudaMemcpy(vec.data(), m.ws + off, count * sizeof(vec[0]), cudaMemcpyDeviceToHost));
  };
  DispatchResult r;
  const size_t slots = static_cast<size_t>(g.R) * g.Tmax;
  std::vector<int64_t> status;
  get(status, m.l.status, kStatusSlots);
  get(r.recv.count, m.l.rcount, g.R);
  get(r.recv.src_token, m.l.r_src, slots);
  get(r.recv.topk_local, m.l.r_loc, slots * g.K);
  get(r.recv.topk_weight, m.l.r_w, slots * g.K);
  std::vector<uint8_t> stage;
  get(stage, m.l.r_rec, slots * g.P);
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
  get(gr.expert_counts, m.l.expert_counts, g.L);
  get(gr.expert_offsets, m.l.expert_offsets, g.L + 1);
  get(gr.m_indices, m.l.m_indices, g.bound);
  get(gr.row_src, m.l.row_src, g.bound);
  get(gr.token_rows, m.l.token_rows, slots * g.K);
  if (g.fp8) {
    get(gr.x_fp8, m.l.gx, g.bound * g.H);
    get(gr.x_scales, m.l.gscales, g.bound * g.SC);
  } else {
    get(gr.x_bf16, m.l.gx, g.bound * g.H);
  }
  r.handle.tokens = m.last_tokens;
  get(r.handle.slot, m.l.slot, m.last_tokens * g.R);
  get(r.handle.node_slot, m.l.node_slot, m.last_tokens * g.N);
  get(r.forward.count, m.l.fcount, g.R);
  get(r.forward.slot, m.l.fslot, slots * g.G);
  // Entries past each source's forwarded count are left from earlier calls: -1, as the CPU's.
  for (int s = 0; s < g.R; ++s)
    for (int64_t q = r.forward.count[s]; q < g.Tmax; ++q)
      std::fill_n(&r.forward.slot[(s * g.Tmax + q) * g.G], g.G, -1);
  return r;
}

std::string forward_debug_state(const EpConfig& cfg, int rank, int device, const void* ws) {
  const Geo g = make_geo(cfg, rank);
  const Lay l = make_lay(g);
  DeviceGuard guard(device);
  cudaStream_t st = nullptr;
  if (cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking) != cudaSuccess) return "no stream";
  std::vector<int64_t> status(kStatusSlots, -1);
  std::vector<unsigned long long> flags(kFlagGroups * kMaxRanks, ~0ull);
  DevErr err{};
  const char* p = static_cast<const char*>(ws);
  cudaMemcpyAsync(status.data(), p + l.status, status.size() * 8, cudaMemcpyDeviceToHost, st);
  cudaMemcpyAsync(flags.data(), p + l.flags, flags.size() * 8, cudaMemcpyDeviceToHost, st);
  cudaMemcpyAsync(&err, p + l.err, sizeof(err), cudaMemcpyDeviceToHost, st);
  std::string out = "rank " + std::to_string(rank) + ":";
  cudaError_t e = cudaErrorNotReady;
  for (int i = 0; i < 2000 && e == cudaErrorNotReady; ++i) {
    e = cudaStreamQuery(st);
    if (e == cudaErrorNotReady) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (e != cudaSuccess) return out + " copy: " + cudaGetErrorString(e);
  cudaStreamDestroy(st);
  out += " status";
  for (int i = 0; i < 11; ++i) out += " " + std::to_string(status[i]);
  for (int f = 0; f < kFlagGroups; ++f) {
    out += std::string(" ") + flag_name(f) + "=";
    for (int i = 0; i < g.R; ++i) out += (i ? "," : "") + std::to_string(flags[f * kMaxRanks + i]);
  }
  out += " err " + std::to_string(err.code) + " peer " + std::to_string(err.peer) + " counter " +
         std::to_string(err.counter) + " expected " + std::to_string(err.expected) + " seen " +
         std::to_string(err.seen);
  return out;
}

std::vector<void*> forward_network_comms(const EpConfig& cfg, const std::vector<int>& devices) {
#if defined(FP8MOE_HAVE_NCCL)
  const int G = cfg.ranks_per_node(), N = cfg.nodes();
  std::vector<void*> out(cfg.num_ranks, nullptr);
  for (int l = 0; l < G; ++l) {
    std::vector<int> devs;
    for (int n = 0; n < N; ++n) {
      const int r = cfg.rank_at(n, l);
      for (int n2 = 0; n2 < n; ++n2)
        FM_CHECK_ARG(devices[cfg.rank_at(n2, l)] != devices[r], "Wire::kNccl across nodes: ranks ",
                     cfg.rank_at(n2, l), " and ", r, " (local index ", l, ") share device ",
                     devices[r], "; NCCL takes one rank per GPU");
      devs.push_back(devices[r]);
    }
    std::vector<ncclComm_t> comms(N);
    FM_FWD_CHECK_NCCL(ncclCommInitAll(comms.data(), N, devs.data()));
    for (int n = 0; n < N; ++n) out[cfg.rank_at(n, l)] = comms[n];
  }
  return out;
#else
  (void)cfg;
  (void)devices;
  FM_THROW(ErrorKind::kInvalidArgument, "this build has no NCCL back end");
#endif
}

}  // namespace fp8moe::comm::detail
