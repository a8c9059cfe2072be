// Expert-parallel dispatch/combine over peer-mapped NVLink buffers (fp8moe/comm/device_ep.h).
// Algorithm: plan (slot of every token at every destination, one block scan per destination),
// push (one warp per token writes its record, BF16 or FP8 quantised in the same pass, into each
// destination's source region; per-block release-add on the destination's arrival counter),
// receive (acquire-poll the counters, per-expert membership bitmaps by warp ballots, word-level
// prefix sums, then one warp per received token writes its layout rows and copies its payload),
// combine (one warp per received token sums its expert rows with the gate weights and pushes one
// BF16 row back; the source sums the rows of its ranks in rank order). Acks from the consumer
// make every buffer reusable without a host round trip.
// Reference: dispatch_reference / combine_reference (src/comm/ep_reference.cpp), bit for bit.
// Test: build-comm-dev/test_comm_gpu or build-device/tests/test_comm_gpu
// (tests/comm/device_ep_gpu_test.cu).
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cfloat>
#include <cstring>
#include <string>

#include "fp8moe/comm/device_ep.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"

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
constexpr int kSendThreads = 512;  // threads of the send and combine blocks
constexpr unsigned kFull = 0xFFFFFFFFu;

// status[] slots (int64 / u64) of a workspace.
enum Status : int {
  kRowsNeeded = 0,
  kOverflow = 1,
  kNumRecv = 2,
  kSeqDispatch = 3,
  kSeqCombine = 4,
  kPrevRows = 5,
  kScatterDone = 6,
  kCombineDone = 7,
  kLayoutDone = 8,
  kStatusSlots = 16,
};
// flags[] groups of R counters.
enum FlagGroup : int {
  kDispatchArrived = 0,
  kDispatchAck = 1,
  kCombineArrived = 2,
  kCombineAck = 3
};
const char* counter_name(int c) {
  switch (c) {
    case kDispatchArrived:
      return "dispatch.arrived";
    case kDispatchAck:
      return "dispatch.ack";
    case kCombineArrived:
      return "combine.arrived";
    case kCombineAck:
      return "combine.ack";
    default:
      return "?";
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
  long long detail;
};

struct Geometry {
  int R, K, L, E;
  int64_t H, SC, Tmax, P, bound, W, cap;
  bool fp8;
};

// Byte offsets inside a workspace; identical on every rank, so a peer's field is base + offset.
struct WsLayout {
  // written by peers
  size_t stage, src_token, topk_local, weight, recv_count, flags, comb_stage;
  // local
  size_t peer_table, slot, send_count, status, recv_offset, expert_counts, expert_offsets, bits,
      pre, m_indices, row_src, row_weight, token_rows, gx, gscales, total;
};

size_t align_up(size_t v, size_t a) {
  return (v + a - 1) / a * a;
}

Geometry make_geometry(const EpConfig& c) {
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
  g.W = (g.R * g.Tmax + 31) / 32;
  g.cap = c.masked_capacity;
  return g;
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
  l.weight = take(slots * g.K * 4);
  l.recv_count = take(g.R * 4);
  l.flags = take(4 * g.R * 8);
  l.comb_stage = take(slots * g.H * 2);
  l.peer_table = take(g.R * sizeof(void*));
  l.slot = take(slots * 4);
  l.send_count = take(g.R * 4);
  l.status = take(kStatusSlots * 8);
  l.recv_offset = take((g.R + 1) * 4);
  l.expert_counts = take(g.L * 4);
  l.expert_offsets = take((g.L + 1) * 4);
  l.bits = take(static_cast<size_t>(g.L) * g.W * 4);
  l.pre = take(static_cast<size_t>(g.L) * g.W * 4);
  l.m_indices = take(g.bound * 4);
  l.row_src = take(g.bound * 4);
  l.row_weight = take(g.bound * 4);
  l.token_rows = take(slots * g.K * 4);
  l.gx = take(g.bound * g.H * (g.fp8 ? 1 : 2));
  l.gscales = take(g.bound * g.SC * 4);
  l.total = at;
  return l;
}

// ---- memory-model helpers ----
__device__ __forceinline__ unsigned long long ld_acquire_sys(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void red_release_sys_add(unsigned long long* p, unsigned long long v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void st_release_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
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
                         int rank, int peer, int counter, unsigned long long timeout_ns) {
  const unsigned long long t0 = globaltimer();
  const long long c0 = clock64();
  // NOTE: the SM clock bounds the wait too (3 GHz is above any clock of these parts), so a
  // global timer that does not advance can never turn a timeout into a hang.
  const long long max_cycles = static_cast<long long>(timeout_ns) * 3;
  for (;;) {
    const unsigned long long v = ld_acquire_sys(p);
    if (v >= expected) return true;
    if (*reinterpret_cast<volatile int*>(&err->code) == kErrTimeout) return false;
    if (globaltimer() - t0 > timeout_ns || clock64() - c0 > max_cycles) {
      record_error(err, kErrTimeout, rank, peer, counter, expected, v, 0);
      return false;
    }
  }
}

template <typename T>
__device__ __forceinline__ T* at(char* base, size_t off) {
  return reinterpret_cast<T*>(base + off);
}

struct Args {
  Geometry g;
  WsLayout lay;
  char* my;
  DevErr* err;
  int rank;
  int send_blocks;
  unsigned long long timeout_ns;
  // per call
  int64_t T;
  const uint16_t* x;
  const int32_t* idx;
  const float* w;
  const uint16_t* y;  // combine input (grouped rows or per-slot rows)
  uint16_t* out;
  bool weighted;
  bool expand;
  bool nccl;  // Wire::kNccl: "peers" are this rank's send buffer, regions by destination; the
              // exchange and its ordering are NCCL's, so no flags are waited on or raised
};

__device__ __forceinline__ char* peer(const Args& a, int r) {
  return reinterpret_cast<char* const*>(a.my + a.lay.peer_table)[r];
}
// Region of my records in destination d's buffer (NVLink), or of d's records in my send buffer.
__device__ __forceinline__ int out_region(const Args& a, int d) {
  return a.nccl ? d : a.rank;
}
__device__ __forceinline__ unsigned long long* flag(char* base, const Args& a, int group, int r) {
  return at<unsigned long long>(base, a.lay.flags) + group * a.g.R + r;
}

// ---- plan (inside every send block): destination mask and slot of every token ----
// Shared memory: masks [Tmax] u32, then slots [Tmax * R] u16 (0xFFFF = not sent).
size_t plan_smem_bytes(const Geometry& g) {
  return static_cast<size_t>(g.Tmax) * 4 + static_cast<size_t>(g.Tmax) * g.R * 2;
}

__device__ void plan_tokens(const Args& a, uint32_t* tmask, uint16_t* tslot, int* totals) {
  using Scan = cub::BlockScan<int, kSendThreads>;
  __shared__ typename Scan::TempStorage temp;
  const Geometry& g = a.g;
  for (int64_t t = threadIdx.x; t < a.T; t += kSendThreads) {
    uint32_t m = 0;
    int ev[kMaxTopK];
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k) ev[k] = k < g.K ? __ldg(a.idx + t * g.K + k) : -1;
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k) {
      const int e = ev[k];
      if (e >= 0 && e < g.E)
        m |= 1u << (e / g.L);
      else if (e != -1 && blockIdx.x == 0)
        record_error(a.err, kErrBadExpert, a.rank, -1, -1, 0, e, t);
    }
    tmask[t] = m;
  }
  __syncthreads();
  const int64_t per = (a.T + kSendThreads - 1) / kSendThreads;
  const int64_t t0 = threadIdx.x * per, t1 = min(a.T, t0 + per);
  for (int d = 0; d < g.R; ++d) {
    int local = 0;
    for (int64_t t = t0; t < t1; ++t) local += (tmask[t] >> d) & 1;
    int base, total;
    Scan(temp).ExclusiveSum(local, base, total);
    for (int64_t t = t0; t < t1; ++t)
      tslot[t * g.R + d] = ((tmask[t] >> d) & 1) ? static_cast<uint16_t>(base++) : 0xFFFFu;
    if (threadIdx.x == 0) totals[d] = total;
    __syncthreads();
  }
  // Block 0 keeps the plan for combine (the handle) and the counts.
  if (blockIdx.x == 0) {
    int32_t* slot = at<int32_t>(a.my, a.lay.slot);
    for (int64_t i = threadIdx.x; i < a.T * g.R; i += kSendThreads)
      slot[i] = tslot[i] == 0xFFFFu ? -1 : tslot[i];
    for (int d = threadIdx.x; d < g.R; d += kSendThreads)
      at<int32_t>(a.my, a.lay.send_count)[d] = totals[d];
  }
}

// ---- push: FP8 quantisation of one 512-column chunk (16 values per lane, 8 lanes a scale) ----
__device__ __forceinline__ void quantize16(const uint4 v0, const uint4 v1, uint4& codes,
                                           float& scale) {
  float f[16];
  const uint32_t* w0 = reinterpret_cast<const uint32_t*>(&v0);
  const uint32_t* w1 = reinterpret_cast<const uint32_t*>(&v1);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w0[i] << 16);
    f[2 * i + 1] = __uint_as_float(w0[i] & 0xFFFF0000u);
    f[8 + 2 * i] = __uint_as_float(w1[i] << 16);
    f[8 + 2 * i + 1] = __uint_as_float(w1[i] & 0xFFFF0000u);
  }
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(f[i]));
#pragma unroll
  for (int m = 1; m < 8; m <<= 1) amax = fmaxf(amax, __shfl_xor_sync(kFull, amax, m));
  // NOTE: fp8/quantize.h's formula with IEEE division, so codes match the CPU bit for bit;
  // cvt.rn.satfinite is the codec's round-to-nearest-even with saturation.
  scale = amax == 0.0f ? 1.0f : fmaxf(__fdiv_rn(amax, kE4M3Max), FLT_MIN);
  uint32_t* c = reinterpret_cast<uint32_t*>(&codes);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %2, %1;"
        : "=h"(lo)
        : "f"(__fdiv_rn(f[4 * i], scale)), "f"(__fdiv_rn(f[4 * i + 1], scale)));
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %2, %1;"
        : "=h"(hi)
        : "f"(__fdiv_rn(f[4 * i + 2], scale)), "f"(__fdiv_rn(f[4 * i + 3], scale)));
    c[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}

// Work items: a token's columns in `parts` ranges of whole steps, so that a short batch (decoding)
// still occupies every warp while a long one keeps one warp per token. Warp-uniform.
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
__device__ __forceinline__ Split split_work(int64_t tokens, int64_t steps) {
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  int64_t parts = tokens > 0 ? warps / tokens : 1;
  parts = parts < 1 ? 1 : (parts > steps ? steps : parts);
  if (parts < 1) parts = 1;
  return {tokens * parts, parts, steps};
}

__device__ __forceinline__ char* record_of(const Args& a, char* base, int src, int32_t j) {
  return base + a.lay.stage + (static_cast<int64_t>(src) * a.g.Tmax + j) * a.g.P;
}

__global__ void __launch_bounds__(kSendThreads) k_dispatch_send(Args a) {
  extern __shared__ uint4 smem_raw[];
  __shared__ int abort_flag;
  __shared__ int totals[kMaxRanks];
  const Geometry& g = a.g;
  uint32_t* tmask = reinterpret_cast<uint32_t*>(smem_raw);
  uint16_t* tslot = reinterpret_cast<uint16_t*>(tmask + g.Tmax);
  const unsigned long long n = at<unsigned long long>(a.my, a.lay.status)[kSeqDispatch] + 1;
  if (threadIdx.x == 0) abort_flag = 0;
  plan_tokens(a, tmask, tslot, totals);
  // A destination's region of mine is free once it acknowledged the previous dispatch.
  if (!a.nccl && threadIdx.x < g.R &&
      !wait_geq(flag(a.my, a, kDispatchAck, threadIdx.x), n - 1, a.err, a.rank, threadIdx.x,
                kDispatchAck, a.timeout_ns))
    abort_flag = 1;
  __syncthreads();
  if (abort_flag) return;
  if (blockIdx.x == 0 && threadIdx.x < g.R)
    at<int32_t>(peer(a, threadIdx.x), a.lay.recv_count)[out_region(a, threadIdx.x)] =
        totals[threadIdx.x];
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  const int64_t unit = g.fp8 ? 1024 : 4 * 256;  // columns of one step
  const Split sp = split_work(a.T, (g.H + unit - 1) / unit);
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * warps + (threadIdx.x >> 5);
       item < sp.items; item += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t t = sp.token(item);
    int e = lane < g.K ? a.idx[t * g.K + lane] : -1;
    if (e >= g.E) e = -1;
    const float wt = lane < g.K ? a.w[t * g.K + lane] : 0.0f;
    const unsigned mask = tmask[t];
    // Metadata of the record at every destination (by the token's first part).
    for (unsigned m = sp.part(item) == 0 ? mask : 0u; m; m &= m - 1) {
      const int d = __ffs(m) - 1;
      const int64_t s = static_cast<int64_t>(out_region(a, d)) * g.Tmax + tslot[t * g.R + d];
      char* base = peer(a, d);
      if (lane == 0) at<int32_t>(base, a.lay.src_token)[s] = static_cast<int32_t>(t);
      if (lane < g.K) {
        at<int32_t>(base, a.lay.topk_local)[s * g.K + lane] =
            (e >= d * g.L && e < (d + 1) * g.L) ? e - d * g.L : -1;
        at<float>(base, a.lay.weight)[s * g.K + lane] = wt;
      }
    }
    const uint16_t* xt = a.x + t * g.H;
    if (!g.fp8) {
      // BF16: 16-byte vectors, four in flight per lane.
      for (int64_t step = sp.first(item); step < sp.last(item); ++step) {
        const int64_t c0 = step * unit;
        uint4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int64_t c = c0 + u * 256 + lane * 8;
          if (c < g.H) v[u] = __ldg(reinterpret_cast<const uint4*>(xt + c));
        }
        for (unsigned m = mask; m; m &= m - 1) {
          const int d = __ffs(m) - 1;
          char* rec = record_of(a, peer(a, d), out_region(a, d), tslot[t * g.R + d]);
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int64_t c = c0 + u * 256 + lane * 8;
            if (c < g.H) *reinterpret_cast<uint4*>(rec + c * 2) = v[u];
          }
        }
      }
    } else {
      // FP8: codes then the H/128 scales of the record, quantised once for all destinations.
      // Two 512-column chunks per step so that four loads are in flight per lane.
      for (int64_t step = sp.first(item); step < sp.last(item); ++step) {
        const int64_t c0 = step * unit;
        uint4 v[4];
        bool valid[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int64_t c = c0 + u * 512 + lane * 16;
          valid[u] = c < g.H;  // whole 8-lane groups are valid or not (H % 128 == 0)
          v[2 * u] = v[2 * u + 1] = make_uint4(0, 0, 0, 0);
          if (valid[u]) {
            v[2 * u] = __ldg(reinterpret_cast<const uint4*>(xt + c));
            v[2 * u + 1] = __ldg(reinterpret_cast<const uint4*>(xt + c + 8));
          }
        }
        uint4 codes[2];
        float scale[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) quantize16(v[2 * u], v[2 * u + 1], codes[u], scale[u]);
        for (unsigned m = mask; m; m &= m - 1) {
          const int d = __ffs(m) - 1;
          char* rec = record_of(a, peer(a, d), out_region(a, d), tslot[t * g.R + d]);
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
  // Publish: every block adds one to every destination's counter for this source.
  __syncthreads();
  if (!a.nccl && threadIdx.x < g.R) {
    __threadfence_system();
    red_release_sys_add(flag(peer(a, threadIdx.x), a, kDispatchArrived, a.rank), 1);
  }
}

// ---- receive 1: wait for all sources, membership bitmaps bits[e][w] (bit = token 32w+lane) ----
__device__ bool wait_sources(const Args& a, int group, unsigned long long expected, int* offsets,
                             int* abort_flag) {
  const Geometry& g = a.g;
  if (threadIdx.x == 0) *abort_flag = 0;
  __syncthreads();
  if (!a.nccl && threadIdx.x < g.R &&
      !wait_geq(flag(a.my, a, group, threadIdx.x), expected, a.err, a.rank, threadIdx.x, group,
                a.timeout_ns))
    *abort_flag = 1;
  __syncthreads();
  if (*abort_flag) return false;
  if (threadIdx.x == 0 && offsets) {
    offsets[0] = 0;
    const volatile int32_t* rc = at<int32_t>(a.my, a.lay.recv_count);
    for (int s = 0; s < g.R; ++s) offsets[s + 1] = offsets[s] + rc[s];
  }
  __syncthreads();
  return true;
}

__device__ __forceinline__ void split_index(const int* offsets, int R, int64_t i, int& s,
                                            int64_t& j) {
  s = 0;
  while (s + 1 < R && i >= offsets[s + 1]) ++s;
  j = i - offsets[s];
}

__device__ void scan_experts(const Args& a, int64_t total);

// Receive 1+2: bitmaps in every block; the last block to finish does the per-expert scan.
__global__ void __launch_bounds__(1024) k_recv_layout(Args a) {
  __shared__ int offsets[kMaxRanks + 1];
  __shared__ int abort_flag;
  __shared__ int last_block;
  const Geometry& g = a.g;
  const unsigned long long n = at<unsigned long long>(a.my, a.lay.status)[kSeqDispatch] + 1;
  if (!wait_sources(a, kDispatchArrived, n * a.send_blocks, offsets, &abort_flag)) {
    // NOTE: the error is recorded; an empty layout keeps the later kernels of this call bounded.
    if (threadIdx.x <= g.R) offsets[threadIdx.x] = 0;
    __syncthreads();
  }
  const int total = offsets[g.R];
  if (blockIdx.x == 0 && threadIdx.x <= g.R) {
    at<int32_t>(a.my, a.lay.recv_offset)[threadIdx.x] = offsets[threadIdx.x];
    if (threadIdx.x == 0) at<int64_t>(a.my, a.lay.status)[kNumRecv] = total;
  }
  // NOTE: the other blocks' words are read by the last block through L2 (__ldcg) only.
  const int W = (total + 31) / 32;
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  uint32_t* bits = at<uint32_t>(a.my, a.lay.bits);
  const int32_t* topk = at<int32_t>(a.my, a.lay.topk_local);
  for (int w = blockIdx.x * warps + (threadIdx.x >> 5); w < W; w += gridDim.x * warps) {
    const int64_t i = static_cast<int64_t>(w) * 32 + lane;
    int ek[kMaxTopK];
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k) ek[k] = -1;
    if (i < total) {
      int s;
      int64_t j;
      split_index(offsets, g.R, i, s, j);
      const int32_t* tk = topk + (s * g.Tmax + j) * g.K;
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k)
        if (k < g.K) ek[k] = __ldcg(tk + k);
    }
    for (int e0 = 0; e0 < g.L; e0 += 32) {
      uint32_t mine = 0;  // lane l keeps the word of expert e0 + l
      for (int e = e0; e < min(g.L, e0 + 32); ++e) {
        bool has = false;
#pragma unroll
        for (int k = 0; k < kMaxTopK; ++k) has = has || ek[k] == e;
        const uint32_t b = __ballot_sync(kFull, has);
        if (lane == e - e0) mine = b;
      }
      if (e0 + lane < g.L) bits[static_cast<int64_t>(e0 + lane) * g.W + w] = mine;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned long long done = atomicAdd(
        reinterpret_cast<unsigned long long*>(at<int64_t>(a.my, a.lay.status) + kLayoutDone), 1ull);
    last_block = done == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  if (threadIdx.x == 0) at<int64_t>(a.my, a.lay.status)[kLayoutDone] = 0;
  scan_experts(a, total);
}

// ---- receive 2: per-expert prefix counts over the words, block offsets, overflow ----
__device__ void scan_experts(const Args& a, int64_t total) {
  const Geometry& g = a.g;
  int64_t* status = at<int64_t>(a.my, a.lay.status);
  const int W = static_cast<int>((total + 31) / 32);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const uint32_t* bits = at<uint32_t>(a.my, a.lay.bits);
  int32_t* pre = at<int32_t>(a.my, a.lay.pre);
  int32_t* counts = at<int32_t>(a.my, a.lay.expert_counts);
  // One warp per expert; eight 32-word chunks are loaded before any is scanned (one memory
  // latency per eight chunks, not one per chunk).
  constexpr int kChunks = 8;
  for (int e = warp; e < g.L; e += warps) {
    int run = 0;
    const uint32_t* be = bits + static_cast<int64_t>(e) * g.W;
    int32_t* pe = pre + static_cast<int64_t>(e) * g.W;
    for (int w0 = 0; w0 < W; w0 += 32 * kChunks) {
      int v[kChunks];
#pragma unroll
      for (int u = 0; u < kChunks; ++u) {
        const int w = w0 + u * 32 + lane;
        v[u] = w < W ? __popc(__ldcg(be + w)) : 0;
      }
#pragma unroll
      for (int u = 0; u < kChunks; ++u) {
        int incl = v[u];
#pragma unroll
        for (int m = 1; m < 32; m <<= 1) {
          const int o = __shfl_up_sync(kFull, incl, m);
          if (lane >= m) incl += o;
        }
        const int w = w0 + u * 32 + lane;
        if (w < W) pe[w] = run + incl - v[u];
        run += __shfl_sync(kFull, incl, 31);
      }
    }
    if (lane == 0) counts[e] = run;
  }
  __syncthreads();
  // Block offsets: one warp scans the (aligned or fixed) block sizes 32 experts at a time.
  if (warp == 0) {
    int32_t* offs = at<int32_t>(a.my, a.lay.expert_offsets);
    if (lane == 0) offs[0] = 0;
    int run = 0, largest = 0;
    for (int e0 = 0; e0 < g.L; e0 += 32) {
      const int e = e0 + lane;
      const int c = e < g.L ? counts[e] : 0;
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
        status[kOverflow] = largest > g.cap;
        status[kRowsNeeded] = largest > g.cap ? largest : g.bound;
      } else {
        status[kRowsNeeded] = run;
        status[kOverflow] = run > g.bound;
      }
    }
  }
}

// ---- receive 3: layout rows and payload of every received token, then acknowledge ----
__global__ void k_recv_scatter(Args a) {
  __shared__ int offsets[kMaxRanks + 1];
  __shared__ int last_block;
  const Geometry& g = a.g;
  int64_t* status = at<int64_t>(a.my, a.lay.status);
  const unsigned long long n = static_cast<unsigned long long>(status[kSeqDispatch]) + 1;
  const int64_t total = status[kNumRecv];
  const bool overflow = status[kOverflow] != 0;
  const int64_t rows_needed = status[kRowsNeeded], prev_rows = status[kPrevRows];
  if (threadIdx.x <= g.R) offsets[threadIdx.x] = at<int32_t>(a.my, a.lay.recv_offset)[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int64_t gwarp = static_cast<int64_t>(blockIdx.x) * warps + (threadIdx.x >> 5);
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * warps;
  const int32_t* offs = at<int32_t>(a.my, a.lay.expert_offsets);
  const int32_t* counts = at<int32_t>(a.my, a.lay.expert_counts);
  const uint32_t* bits = at<uint32_t>(a.my, a.lay.bits);
  const int32_t* pre = at<int32_t>(a.my, a.lay.pre);
  int32_t* m_indices = at<int32_t>(a.my, a.lay.m_indices);
  int32_t* row_src = at<int32_t>(a.my, a.lay.row_src);
  float* row_weight = at<float>(a.my, a.lay.row_weight);
  int32_t* token_rows = at<int32_t>(a.my, a.lay.token_rows);
  const int64_t row_bytes = g.fp8 ? g.H : g.H * 2;

  for (int64_t i = gwarp; i < total; i += nwarps) {
    int s;
    int64_t j;
    split_index(offsets, g.R, i, s, j);
    const int64_t slot = static_cast<int64_t>(s) * g.Tmax + j;
    int row = -1;
    if (lane < g.K) {
      const int e = __ldcg(at<int32_t>(a.my, a.lay.topk_local) + slot * g.K + lane);
      if (e >= 0 && !overflow) {
        const int64_t w = i / 32;
        const uint32_t word = bits[static_cast<int64_t>(e) * g.W + w];
        row = offs[e] + pre[static_cast<int64_t>(e) * g.W + w] +
              __popc(word & ((1u << (i % 32)) - 1u));
        m_indices[row] = e;
        row_src[row] = static_cast<int32_t>(i * g.K + lane);
        row_weight[row] = __ldcg(at<float>(a.my, a.lay.weight) + slot * g.K + lane);
      }
      token_rows[slot * g.K + lane] = row;
    }
    if (!a.expand || overflow) continue;
    int rows[kMaxTopK];
#pragma unroll
    for (int k = 0; k < kMaxTopK; ++k) rows[k] = __shfl_sync(kFull, row, k < g.K ? k : 0);
    const char* rec = record_of(a, a.my, s, static_cast<int32_t>(j));
    char* gx = a.my + a.lay.gx;
    for (int64_t c0 = lane * 16; c0 < row_bytes; c0 += 2 * 32 * 16) {
      uint4 v[2];
#pragma unroll
      for (int u = 0; u < 2; ++u)
        if (c0 + u * 512 < row_bytes)
          v[u] = __ldcg(reinterpret_cast<const uint4*>(rec + c0 + u * 512));
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k) {
        if (k >= g.K || rows[k] < 0) continue;
#pragma unroll
        for (int u = 0; u < 2; ++u)
          if (c0 + u * 512 < row_bytes)
            *reinterpret_cast<uint4*>(gx + static_cast<int64_t>(rows[k]) * row_bytes + c0 +
                                      u * 512) = v[u];
      }
    }
    if (g.fp8) {
      float* gs = at<float>(a.my, a.lay.gscales);
      for (int64_t c = lane; c < g.SC; c += 32) {
        const float sc = __ldcg(reinterpret_cast<const float*>(rec + g.H) + c);
#pragma unroll
        for (int k = 0; k < kMaxTopK; ++k)
          if (k < g.K && rows[k] >= 0) gs[rows[k] * g.SC + c] = sc;
      }
    }
  }
  // Padding rows of each block, and rows the previous dispatch used beyond this one's.
  const int64_t pad = g.cap > 0 ? g.cap : 128;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (!overflow) {
    for (int64_t q = tid; q < g.L * pad; q += nthreads) {
      const int e = static_cast<int>(q / pad);
      const int64_t row = offs[e] + counts[e] + q % pad;
      if (row < offs[e + 1]) {
        m_indices[row] = -1;
        row_src[row] = -1;
      }
    }
  }
  for (int64_t row = (overflow ? 0 : rows_needed) + tid; row < min(prev_rows, g.bound);
       row += nthreads) {
    m_indices[row] = -1;
    row_src[row] = -1;
  }
  // The last block to finish acknowledges every source: its region of mine is free again.
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned long long done =
        atomicAdd(reinterpret_cast<unsigned long long*>(status + kScatterDone), 1ull);
    last_block = done == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  if (!a.nccl && threadIdx.x < g.R) {
    __threadfence_system();
    st_release_sys(flag(peer(a, threadIdx.x), a, kDispatchAck, a.rank), n);
  }
  if (threadIdx.x == 0) {
    status[kScatterDone] = 0;
    status[kPrevRows] = overflow ? 0 : min(rows_needed, g.bound);
    status[kSeqDispatch] = static_cast<int64_t>(n);
  }
}

// ---- combine 1: one BF16 row per received token, pushed back to its source ----
__global__ void __launch_bounds__(kSendThreads, 2) k_combine_send(Args a) {
  __shared__ int offsets[kMaxRanks + 1];
  __shared__ int abort_flag;
  const Geometry& g = a.g;
  int64_t* status = at<int64_t>(a.my, a.lay.status);
  const unsigned long long n = static_cast<unsigned long long>(status[kSeqCombine]) + 1;
  if (threadIdx.x == 0) abort_flag = 0;
  if (threadIdx.x <= g.R) offsets[threadIdx.x] = at<int32_t>(a.my, a.lay.recv_offset)[threadIdx.x];
  __syncthreads();
  if (!a.nccl && threadIdx.x < g.R &&
      !wait_geq(flag(a.my, a, kCombineAck, threadIdx.x), n - 1, a.err, a.rank, threadIdx.x,
                kCombineAck, a.timeout_ns))
    abort_flag = 1;
  __syncthreads();
  if (abort_flag) return;
  const int64_t total = status[kNumRecv];
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int32_t* token_rows = at<int32_t>(a.my, a.lay.token_rows);
  const float* row_weight = at<float>(a.my, a.lay.row_weight);
  const Split sp = split_work(total, (g.H + 255) / 256);
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * warps + (threadIdx.x >> 5);
       item < sp.items; item += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t i = sp.token(item);
    const int64_t c_begin = sp.first(item) * 256 + lane * 8, c_end = min(g.H, sp.last(item) * 256);
    int s;
    int64_t j;
    split_index(offsets, g.R, i, s, j);
    const int64_t slot = static_cast<int64_t>(s) * g.Tmax + j;
    int row = -1;
    float wt = 0.0f;
    if (lane < g.K) {
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
    uint16_t* dst = at<uint16_t>(peer(a, s), a.lay.comb_stage) +
                    (static_cast<int64_t>(out_region(a, s)) * g.Tmax + j) * g.H;
    if (!a.weighted) {
      for (int64_t c = c_begin; c < c_end; c += 256)
        *reinterpret_cast<uint4*>(dst + c) =
            __ldg(reinterpret_cast<const uint4*>(a.y + slot * g.H + c));
      continue;
    }
    // All expert rows of a chunk are loaded before any is summed (loads in flight, not in turn);
    // the sum still runs in ascending k.
    for (int64_t c = c_begin; c < c_end; c += 256) {
      uint4 v[kMaxTopK];
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k)
        if (k < g.K && rows[k] >= 0)
          v[k] =
              __ldg(reinterpret_cast<const uint4*>(a.y + static_cast<int64_t>(rows[k]) * g.H + c));
      float acc[8];
#pragma unroll
      for (int x = 0; x < 8; ++x) acc[x] = 0.0f;
#pragma unroll
      for (int k = 0; k < kMaxTopK; ++k) {
        if (k >= g.K || rows[k] < 0) continue;
        const uint32_t* vw = reinterpret_cast<const uint32_t*>(&v[k]);
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          acc[2 * x] = __fadd_rn(acc[2 * x], __fmul_rn(ws[k], __uint_as_float(vw[x] << 16)));
          acc[2 * x + 1] =
              __fadd_rn(acc[2 * x + 1], __fmul_rn(ws[k], __uint_as_float(vw[x] & 0xFFFF0000u)));
        }
      }
      uint4 o;
      uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
      for (int x = 0; x < 4; ++x)
        ow[x] = static_cast<uint32_t>(float_to_bf16_bits(acc[2 * x])) |
                (static_cast<uint32_t>(float_to_bf16_bits(acc[2 * x + 1])) << 16);
      *reinterpret_cast<uint4*>(dst + c) = o;
    }
  }
  __syncthreads();
  if (!a.nccl && threadIdx.x < g.R) {
    __threadfence_system();
    red_release_sys_add(flag(peer(a, threadIdx.x), a, kCombineArrived, a.rank), 1);
  }
}

// ---- combine 2: sum the rows of every rank a token went to, in rank order ----
__global__ void __launch_bounds__(kSendThreads, 2) k_combine_recv(Args a) {
  __shared__ int abort_flag;
  __shared__ int last_block;
  const Geometry& g = a.g;
  int64_t* status = at<int64_t>(a.my, a.lay.status);
  const unsigned long long n = static_cast<unsigned long long>(status[kSeqCombine]) + 1;
  if (!wait_sources(a, kCombineArrived, n * a.send_blocks, nullptr, &abort_flag)) return;
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int32_t* slot = at<int32_t>(a.my, a.lay.slot);
  const uint16_t* stage = at<uint16_t>(a.my, a.lay.comb_stage);
  const Split sp = split_work(a.T, (g.H + 255) / 256);
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * warps + (threadIdx.x >> 5);
       item < sp.items; item += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t t = sp.token(item);
    const int my_slot = lane < g.R ? slot[t * g.R + lane] : -1;
    // NOTE: the chunk loop is warp-uniform (shuffles inside); lanes past H only skip memory.
    for (int64_t c0 = sp.first(item) * 256; c0 < sp.last(item) * 256; c0 += 256) {
      const int64_t c = c0 + lane * 8;
      const bool valid = c < g.H;
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
          if (js[u] >= 0)
            v[u] = __ldcg(reinterpret_cast<const uint4*>(
                stage + (static_cast<int64_t>(d0 + u) * g.Tmax + js[u]) * g.H + c));
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          if (js[u] < 0) continue;
          const uint32_t* vw = reinterpret_cast<const uint32_t*>(&v[u]);
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            acc[2 * x] = __fadd_rn(acc[2 * x], __uint_as_float(vw[x] << 16));
            acc[2 * x + 1] = __fadd_rn(acc[2 * x + 1], __uint_as_float(vw[x] & 0xFFFF0000u));
          }
        }
      }
      uint4 o;
      uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
      for (int x = 0; x < 4; ++x)
        ow[x] = static_cast<uint32_t>(float_to_bf16_bits(acc[2 * x])) |
                (static_cast<uint32_t>(float_to_bf16_bits(acc[2 * x + 1])) << 16);
      if (valid) *reinterpret_cast<uint4*>(a.out + t * g.H + c) = o;
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
  if (!a.nccl && threadIdx.x < g.R) {
    __threadfence_system();
    st_release_sys(flag(peer(a, threadIdx.x), a, kCombineAck, a.rank), n);
  }
  if (threadIdx.x == 0) {
    status[kCombineDone] = 0;
    status[kSeqCombine] = static_cast<int64_t>(n);
  }
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

}  // namespace

struct DeviceEpRank::Impl {
  EpConfig cfg;
  Geometry g;
  WsLayout lay;
  DeviceEpOptions opt;
  int rank = 0, device = 0, sm_count = 0;
  char* ws = nullptr;
  char* send_ws = nullptr;  // Wire::kNccl: records packed per destination
  DevErr* err_host = nullptr;
  DevErr* err_dev = nullptr;
  std::vector<void*> opened;  // IPC mappings to close
  int64_t last_tokens = 0;

  Args args() const {
    Args a{};
    a.g = g;
    a.lay = lay;
    a.my = ws;
    a.err = err_dev;
    a.rank = rank;
    a.send_blocks = opt.num_blocks;
    a.timeout_ns = static_cast<unsigned long long>(cfg.timeout_s * 1e9);
    a.nccl = opt.wire == Wire::kNccl;
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
  FM_CHECK_ARG(cfg.ranks_per_node() == cfg.num_ranks,
               "the NVLink back end runs one node: ", "gpus_per_node=", cfg.gpus_per_node, " with ",
               cfg.num_ranks, " ranks");
  FM_CHECK_ARG(cfg.num_ranks <= kMaxRanks, "num_ranks=", cfg.num_ranks, " exceeds ", kMaxRanks);
  FM_CHECK_ARG(cfg.top_k <= kMaxTopK, "top_k=", cfg.top_k, " exceeds ", kMaxTopK);
  FM_CHECK_ARG(rank >= 0 && rank < cfg.num_ranks, "rank ", rank, " out of range");
  FM_CHECK_ARG(opt.wire == Wire::kNvlink || (nccl_available() && opt.nccl_comm),
               "Wire::kNccl needs a build with NCCL and a communicator");
  FM_CHECK_ARG(opt.num_blocks >= 1, "num_blocks=", opt.num_blocks, " must be positive");
  FM_CHECK_ARG(plan_smem_bytes(make_geometry(cfg)) <= 200 * 1024,
               "max_tokens_per_rank=", cfg.max_tokens_per_rank, " with ", cfg.num_ranks,
               " ranks needs more shared memory for the send plan than a block has");
  Impl& m = *impl_;
  m.cfg = cfg;
  m.g = make_geometry(cfg);
  m.lay = make_layout(m.g);
  m.opt = opt;
  m.rank = rank;
  m.device = device;
  DeviceGuard guard(device);
  FM_CHECK_CUDA(cudaDeviceGetAttribute(&m.sm_count, cudaDevAttrMultiProcessorCount, device));
  FM_CHECK_CUDA(cudaMalloc(&m.ws, m.lay.total));
  FM_CHECK_CUDA(cudaMemset(m.ws, 0, m.lay.total));
  FM_CHECK_CUDA(cudaMemset(m.ws + m.lay.m_indices, 0xFF, m.g.bound * 4));
  FM_CHECK_CUDA(cudaMemset(m.ws + m.lay.row_src, 0xFF, m.g.bound * 4));
  FM_CHECK_CUDA(cudaMemset(m.ws + m.lay.token_rows, 0xFF, m.g.R * m.g.Tmax * m.g.K * 4));
  FM_CHECK_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&m.err_host), sizeof(DevErr),
                              cudaHostAllocMapped | cudaHostAllocPortable));
  std::memset(m.err_host, 0, sizeof(DevErr));
  FM_CHECK_CUDA(cudaHostGetDevicePointer(reinterpret_cast<void**>(&m.err_dev), m.err_host, 0));
  // NOTE: load every kernel now: with lazy module loading a first launch can wait for the device,
  // which never drains while a peer's kernel spins on a flag.
  for (const void* k :
       {reinterpret_cast<const void*>(k_dispatch_send),
        reinterpret_cast<const void*>(k_recv_layout), reinterpret_cast<const void*>(k_recv_scatter),
        reinterpret_cast<const void*>(k_combine_send),
        reinterpret_cast<const void*>(k_combine_recv)}) {
    cudaFuncAttributes attr;
    FM_CHECK_CUDA(cudaFuncGetAttributes(&attr, k));
  }
  FM_CHECK_CUDA(cudaFuncSetAttribute(k_dispatch_send, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(plan_smem_bytes(m.g))));
  if (opt.wire == Wire::kNccl) {
    // The peer-written fields lead the layout, so the send buffer is that prefix.
    FM_CHECK_CUDA(cudaMalloc(&m.send_ws, m.lay.peer_table));
    FM_CHECK_CUDA(cudaMemset(m.send_ws, 0, m.lay.peer_table));
    connect(std::vector<void*>(m.g.R, m.send_ws));
  }
  FM_CHECK_CUDA(cudaDeviceSynchronize());
}

DeviceEpRank::~DeviceEpRank() {
  if (!impl_) return;
  cudaSetDevice(impl_->device);
  for (void* p : impl_->opened) cudaIpcCloseMemHandle(p);
  cudaFree(impl_->ws);
  cudaFree(impl_->send_ws);
  cudaFreeHost(impl_->err_host);
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
  return impl_->ws;
}

cudaIpcMemHandle_t DeviceEpRank::ipc_handle() const {
  DeviceGuard guard(impl_->device);
  cudaIpcMemHandle_t h;
  FM_CHECK_CUDA(cudaIpcGetMemHandle(&h, impl_->ws));
  return h;
}

void DeviceEpRank::connect(const std::vector<void*>& bases) {
  Impl& m = *impl_;
  FM_CHECK_ARG(static_cast<int>(bases.size()) == m.g.R, bases.size(), " bases for ", m.g.R,
               " ranks");
  DeviceGuard guard(m.device);
  FM_CHECK_CUDA(cudaMemcpy(m.ws + m.lay.peer_table, bases.data(), m.g.R * sizeof(void*),
                           cudaMemcpyHostToDevice));
}

void DeviceEpRank::connect_ipc(const std::vector<cudaIpcMemHandle_t>& handles) {
  Impl& m = *impl_;
  FM_CHECK_ARG(static_cast<int>(handles.size()) == m.g.R, handles.size(), " handles for ", m.g.R,
               " ranks");
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
  Impl& m = *impl_;
  FM_CHECK_ARG(b.tokens >= 0 && b.tokens <= m.g.Tmax, "rank ", m.rank, ": ", b.tokens,
               " tokens exceed max_tokens_per_rank=", m.g.Tmax);
  DeviceGuard guard(m.device);
  Args a = m.args();
  a.T = b.tokens;
  a.x = b.x;
  a.idx = b.topk_idx;
  a.w = b.topk_weight;
  m.last_tokens = b.tokens;
  k_dispatch_send<<<m.opt.num_blocks, kSendThreads, plan_smem_bytes(m.g), stream>>>(a);
  FM_CHECK_LAUNCH();
  if (a.nccl) {
    const size_t T = m.g.Tmax, K = m.g.K;
    m.exchange({{m.lay.stage, T * m.g.P},
                {m.lay.src_token, T * 4},
                {m.lay.topk_local, T * K * 4},
                {m.lay.weight, T * K * 4},
                {m.lay.recv_count, 4}},
               stream);
  }
}

void DeviceEpRank::dispatch_recv(cudaStream_t stream) {
  Impl& m = *impl_;
  DeviceGuard guard(m.device);
  Args a = m.args();
  a.expand = m.opt.expand_payload;
  const int bits_blocks = static_cast<int>(std::max<int64_t>(1, (m.g.W + 31) / 32));
  k_recv_layout<<<bits_blocks, 1024, 0, stream>>>(a);
  FM_CHECK_LAUNCH();
  k_recv_scatter<<<2 * m.sm_count, 512, 0, stream>>>(a);
  FM_CHECK_LAUNCH();
}

void DeviceEpRank::combine_send(const uint16_t* y, cudaStream_t stream) {
  Impl& m = *impl_;
  DeviceGuard guard(m.device);
  Args a = m.args();
  a.y = y;
  a.weighted = true;
  k_combine_send<<<m.opt.num_blocks, kSendThreads, 0, stream>>>(a);
  FM_CHECK_LAUNCH();
  if (a.nccl) m.exchange({{m.lay.comb_stage, m.g.Tmax * m.g.H * 2}}, stream);
}

void DeviceEpRank::combine_tokens_send(const uint16_t* rows, cudaStream_t stream) {
  Impl& m = *impl_;
  DeviceGuard guard(m.device);
  Args a = m.args();
  a.y = rows;
  a.weighted = false;
  k_combine_send<<<m.opt.num_blocks, kSendThreads, 0, stream>>>(a);
  FM_CHECK_LAUNCH();
  if (a.nccl) m.exchange({{m.lay.comb_stage, m.g.Tmax * m.g.H * 2}}, stream);
}

void DeviceEpRank::combine_recv(uint16_t* out, cudaStream_t stream) {
  Impl& m = *impl_;
  DeviceGuard guard(m.device);
  Args a = m.args();
  a.out = out;
  a.T = m.last_tokens;
  k_combine_recv<<<m.opt.num_blocks, kSendThreads, 0, stream>>>(a);
  FM_CHECK_LAUNCH();
}

DeviceRecvView DeviceEpRank::view() const {
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
  const Impl& m = *impl_;
  DevErr e;
  std::memcpy(&e, m.err_host, sizeof(e));  // read after the caller synchronised
  if (e.code == kErrTimeout)
    FM_THROW(ErrorKind::kRuntime, "rank ", e.rank, ": peer ", e.peer, " did not answer within ",
             m.cfg.timeout_s, " s: waited on ", counter_name(e.counter), "[rank=", e.rank,
             "][src=", e.peer, "], expected >= ", e.expected, ", seen ", e.seen);
  if (e.code == kErrBadExpert)
    FM_THROW(ErrorKind::kInvalidArgument, "rank ", e.rank, " token ", e.detail, ": expert id ",
             static_cast<long long>(e.seen), " out of range [-1, ", m.cfg.num_experts, ")");
  DeviceGuard guard(m.device);
  int64_t status[kStatusSlots];
  FM_CHECK_CUDA(cudaMemcpy(status, m.ws + m.lay.status, sizeof(status), cudaMemcpyDeviceToHost));
  if (status[kOverflow])
    FM_THROW(ErrorKind::kRuntime, "rank ", m.rank, ": dispatch overflowed its row bound: ",
             m.cfg.masked_capacity > 0 ? "largest expert count " : "rows needed ",
             status[kRowsNeeded], ", bound ",
             m.cfg.masked_capacity > 0 ? m.cfg.masked_capacity : m.g.bound);
}

DispatchResult DeviceEpRank::download() const {
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
  return r;
}

DeviceEpGroup::DeviceEpGroup(const EpConfig& cfg, const std::vector<int>& devices,
                             DeviceEpOptions opt) {
  FM_CHECK_ARG(static_cast<int>(devices.size()) == cfg.num_ranks, devices.size(), " devices for ",
               cfg.num_ranks, " ranks");
  if (opt.wire == Wire::kNccl) {
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
  std::vector<void*> bases;
  for (int r = 0; r < cfg.num_ranks; ++r) {
    ranks_.push_back(std::make_unique<DeviceEpRank>(cfg, r, devices[r], opt));
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
