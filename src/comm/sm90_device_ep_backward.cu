// Combine backward over peer-mapped NVLink buffers (DeviceEpRank::combine_backward_send / _recv):
// grad_y[row(t,k)] = bf16(w[t,k] * grad_out[t]) at the expert's rank, grad_w[t,k] = sum over h
// ascending of grad_out[t,h] * y[row(t,k),h] back at the source (fp8moe/comm/ep.h).
// Algorithm. Send: after the previous combine epoch's acknowledgements, one warp per token copies
// its grad_out row into the combine stage of every rank that received it, at the slot of the last
// dispatch's handle (the rank's own copy too); the last block to finish raises one row flag per
// destination (release). Receive: grad_y is zeroed; then one warp per received slot waits for its
// source's row flag (acquire), writes each of the slot's grad_y rows (element-wise products), and
// lane k alone sums the slot-k dot product in h order (multiply, then add, both rounded: no FMA,
// so the bits are the reference's); the K sums and an ownership mask go to the source's gradient
// region; the last block raises a gradient flag at every source and acknowledges the combine
// stage. A gather kernel then takes grad_w[t,k] from the one rank whose mask owns slot k (+0 for a
// dropped slot) and closes the combine epoch.
// Reference: combine_backward_reference (src/comm/ep_reference.cpp), bit for bit.
// Test: test_comm_gpu --gtest_filter='*CombineBackward*'
// (tests/comm/device_ep_backward_gpu_test.cu).
#include <algorithm>

#include "ep_ptx.cuh"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/fp8/codec.h"
#include "sm90_device_ep_backward.h"

namespace fp8moe::comm::bwd {

const char* counter_name(int counter) {
  switch (counter) {
    case kRows:
      return "combine_bwd.rows";
    case kGradW:
      return "combine_bwd.w";
    default:
      return nullptr;
  }
}

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxTopK = 8;
constexpr int kDotVecs = 4;  // 8-column groups of a dot product loaded together
constexpr unsigned kFull = 0xFFFFFFFFu;
using detail::globaltimer;
using detail::ld_acquire_sys;
using detail::record_error;
using detail::st_release_sys;

// u64 slots of the `bwd` region.
constexpr int kBlockCounters = 3;
enum BlockCounter : int { kSendDone = 0, kExpertDone = 1, kGatherDone = 2 };

// Bounded acquire-poll; false (error recorded) on timeout or when this rank already timed out.
__device__ bool wait_geq(const unsigned long long* c, unsigned long long expected, const Params& p,
                         int peer_rank, int counter) {
  unsigned long long v = ld_acquire_sys(c);
  if (v >= expected) return true;
  const unsigned long long t0 = globaltimer();
  const long long c0 = clock64();
  // NOTE: the SM clock bounds the wait too, so a global timer that stops cannot hang it.
  const long long max_cycles = static_cast<long long>(p.timeout_ns) * 3;
  for (;;) {
    __nanosleep(32);
    v = ld_acquire_sys(c);
    if (v >= expected) return true;
    if (*reinterpret_cast<volatile int*>(&p.err->code) == ll::kErrTimeout) return false;
    if (globaltimer() - t0 > p.timeout_ns || clock64() - c0 > max_cycles) {
      record_error(p.err, ll::kErrTimeout, p.rank, peer_rank, counter, expected, v);
      return false;
    }
  }
}

template <typename T>
__device__ __forceinline__ T* at(char* base, size_t off) {
  return reinterpret_cast<T*>(base + off);
}
__device__ __forceinline__ char* peer(const Params& p, int r) {
  return reinterpret_cast<char* const*>(p.my + p.f.peer_table)[r];
}
// Flags of the `bwd` region of `base`: rows staged by src, gradients returned by src.
__device__ __forceinline__ unsigned long long* rows_flag(char* base, const Params& p, int src) {
  return at<unsigned long long>(base, p.f.bwd) + src;
}
__device__ __forceinline__ unsigned long long* gw_flag(char* base, const Params& p, int src) {
  return at<unsigned long long>(base, p.f.bwd) + p.R + src;
}
__device__ __forceinline__ unsigned long long* block_counter(const Params& p, int c) {
  return at<unsigned long long>(p.my, p.f.bwd) + 2 * p.R + c;
}
// The forward's combine acknowledgement of source `src` in the workspace at `base`.
__device__ __forceinline__ unsigned long long* ack_flag(char* base, const Params& p, int src) {
  return at<unsigned long long>(base, p.f.ack) + src;
}
__device__ __forceinline__ unsigned long long epoch(const Params& p) {
  return static_cast<unsigned long long>(at<int64_t>(p.my, p.f.status)[p.st_seq]) + 1;
}

// Every block calls it once at its end: true in the last block to finish, which then sees the
// other blocks' writes (each fenced them before counting) and resets the counter for the next call.
__device__ bool last_block(const Params& p, int counter) {
  __shared__ int last;
  __threadfence_system();  // this thread's writes (peer stores included) before the count
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long* c = block_counter(p, counter);
    last = atomicAdd(c, 1ull) == gridDim.x - 1;
    if (last) {
      __threadfence_system();
      *c = 0;  // no other block of this grid counts any more; the next launch is stream-ordered
    }
  }
  __syncthreads();
  return last != 0;
}

__device__ __forceinline__ float lo_bf16(uint32_t w) {
  return __uint_as_float(w << 16);
}
__device__ __forceinline__ float hi_bf16(uint32_t w) {
  return __uint_as_float(w & 0xFFFF0000u);
}

// ---- send: grad_out rows into the combine stage of each destination ----
__global__ void __launch_bounds__(kThreads) k_bwd_send(Params p) {
  __shared__ int abort_flag;
  const unsigned long long n = epoch(p);
  if (threadIdx.x == 0) abort_flag = 0;
  __syncthreads();
  // The stage of every peer is free once it acknowledged the previous combine epoch.
  if (threadIdx.x < p.R && threadIdx.x != p.rank &&
      !wait_geq(ack_flag(p.my, p, threadIdx.x), n - 1, p, threadIdx.x, p.ctr_ack))
    abort_flag = 1;
  __syncthreads();
  if (abort_flag) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int32_t* slot = at<int32_t>(p.my, p.f.slot);
  const int64_t vecs = p.H / 8;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp; t < p.T;
       t += static_cast<int64_t>(gridDim.x) * kWarps) {
    const uint4* src = reinterpret_cast<const uint4*>(p.grad_out + t * p.H);
    for (int d = 0; d < p.R; ++d) {
      const int j = slot[t * p.R + d];
      if (j < 0) continue;
      uint4* dst = reinterpret_cast<uint4*>(at<uint16_t>(peer(p, d), p.f.comb_stage) +
                                            (static_cast<int64_t>(p.rank) * p.Tmax + j) * p.H);
      for (int64_t v = lane; v < vecs; v += 32) dst[v] = __ldg(src + v);
    }
  }
  const bool last = last_block(p, kSendDone);
  if (threadIdx.x == 0)
    atomicAdd(reinterpret_cast<unsigned long long*>(at<int64_t>(p.my, p.f.status) + p.st_sent),
              1ull);
  if (last && threadIdx.x < p.R) st_release_sys(rows_flag(peer(p, threadIdx.x), p, p.rank), n);
}

// ---- receive 1, at the expert's rank: grad_y rows and the slot's K dot products ----
// Lane k < K of the warp holds slot k's row here (-1: none) and gate weight.
__device__ void expert_slot(const Params& p, int s, int64_t j, bool overflow) {
  const int lane = threadIdx.x & 31;
  const int64_t rec = static_cast<int64_t>(s) * p.Tmax + j;
  int row = -1;
  float wt = 0.0f;
  if (lane < p.K && !overflow) {
    row = at<int32_t>(p.my, p.f.token_rows)[rec * p.K + lane];
    if (row >= p.bound) row = -1;  // never past the bound (a layout without overflow has none)
    if (row >= 0) wt = at<float>(p.my, p.f.row_weight)[row];
  }
  const uint4* g = reinterpret_cast<const uint4*>(at<uint16_t>(p.my, p.f.comb_stage) + rec * p.H);
  const int64_t vecs = p.H / 8;
  // grad_y rows: element-wise, one float multiply rounded to BF16 (the order does not matter).
  for (int k = 0; k < p.K; ++k) {
    const int r = __shfl_sync(kFull, row, k);
    const float w = __shfl_sync(kFull, wt, k);
    if (r < 0) continue;
    uint4* dst = reinterpret_cast<uint4*>(p.grad_y + static_cast<int64_t>(r) * p.H);
    for (int64_t v = lane; v < vecs; v += 32) {
      const uint4 gv = __ldcg(g + v);
      const uint32_t* gw = reinterpret_cast<const uint32_t*>(&gv);
      uint4 o;
      uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
      for (int x = 0; x < 4; ++x)
        ow[x] = static_cast<uint32_t>(float_to_bf16_bits(__fmul_rn(w, lo_bf16(gw[x])))) |
                (static_cast<uint32_t>(float_to_bf16_bits(__fmul_rn(w, hi_bf16(gw[x])))) << 16);
      dst[v] = o;
    }
  }
  // grad_w: lane k alone runs the whole sum in ascending h, multiply and add each rounded (no
  // FMA), from +0.0f: exactly the reference's sequence of float operations.
  // The loads of kDotVecs 8-column groups are issued together, then summed in column order.
  float dot = 0.0f;
  if (row >= 0) {
    const uint4* yr = reinterpret_cast<const uint4*>(p.y + static_cast<int64_t>(row) * p.H);
    for (int64_t v0 = 0; v0 < vecs; v0 += kDotVecs) {
      uint4 gv[kDotVecs], yv[kDotVecs];
#pragma unroll
      for (int u = 0; u < kDotVecs; ++u)
        if (v0 + u < vecs) {
          gv[u] = __ldcg(g + v0 + u);
          yv[u] = __ldg(yr + v0 + u);
        }
#pragma unroll
      for (int u = 0; u < kDotVecs; ++u) {
        if (v0 + u >= vecs) continue;
        const uint32_t* gw = reinterpret_cast<const uint32_t*>(&gv[u]);
        const uint32_t* yw = reinterpret_cast<const uint32_t*>(&yv[u]);
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          dot = __fadd_rn(dot, __fmul_rn(lo_bf16(gw[x]), lo_bf16(yw[x])));
          dot = __fadd_rn(dot, __fmul_rn(hi_bf16(gw[x]), hi_bf16(yw[x])));
        }
      }
    }
  }
  // To the source: the K values (+0 where the slot's expert lives elsewhere) and which are ours.
  char* dst_ws = peer(p, s);
  const int64_t out = static_cast<int64_t>(p.rank) * p.Tmax + j;
  const unsigned mine = __ballot_sync(kFull, row >= 0);
  if (lane < p.K) at<float>(dst_ws, p.f.gw)[out * p.K + lane] = row >= 0 ? dot : 0.0f;
  if (lane == 0) at<uint32_t>(dst_ws, p.f.gw_mask)[out] = mine;
}

__global__ void __launch_bounds__(kThreads) k_bwd_expert(Params p) {
  const unsigned long long n = epoch(p);
  const bool overflow = at<int64_t>(p.my, p.f.status)[p.st_overflow] != 0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int32_t* recv_count = at<int32_t>(p.my, p.f.recv_count);
  const int64_t items = static_cast<int64_t>(p.R) * p.Tmax;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kWarps + warp; q < items;
       q += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int s = static_cast<int>(q / p.Tmax);
    const int64_t j = q % p.Tmax;
    if (j >= __ldcg(recv_count + s)) continue;  // warp-uniform
    int ok = 1;
    if (lane == 0) ok = wait_geq(rows_flag(p.my, p, s), n, p, s, kRows);
    if (!__shfl_sync(kFull, ok, 0)) continue;  // error recorded; the remaining waits end at once
    // NOTE: a shuffle orders no memory; the warp barrier extends lane 0's acquire to the other
    // lanes' stage loads and gradient stores (the forward's waits use __syncthreads alike).
    __syncwarp();
    expert_slot(p, s, j, overflow);
  }
  if (!last_block(p, kExpertDone)) return;
  // NOTE: after a timeout some slots were skipped: no flag is raised, so the sources time out too
  // (an error at every rank) instead of reading stale gradients.
  if (*reinterpret_cast<volatile int*>(&p.err->code) == ll::kErrTimeout) return;
  // Every slot's gradients are at their sources, and this rank's combine stage is read: peers may
  // write it again (their next combine or combine backward waits on this acknowledgement).
  if (threadIdx.x < p.R) {
    st_release_sys(gw_flag(peer(p, threadIdx.x), p, p.rank), n);
    st_release_sys(ack_flag(peer(p, threadIdx.x), p, p.rank), n);
  }
}

// ---- receive 2, at the source: grad_w [T, K] from the rank that owns each slot ----
__global__ void __launch_bounds__(kThreads) k_bwd_gather(Params p) {
  __shared__ int abort_flag;
  const unsigned long long n = epoch(p);
  if (threadIdx.x == 0) abort_flag = 0;
  __syncthreads();
  if (threadIdx.x < p.R && !wait_geq(gw_flag(p.my, p, threadIdx.x), n, p, threadIdx.x, kGradW))
    abort_flag = 1;
  __syncthreads();
  if (abort_flag) return;
  const int32_t* slot = at<int32_t>(p.my, p.f.slot);
  const float* gw = at<float>(p.my, p.f.gw);
  const uint32_t* mask = at<uint32_t>(p.my, p.f.gw_mask);
  const int64_t total = p.T * p.K;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t t = i / p.K;
    const int k = static_cast<int>(i % p.K);
    float v = 0.0f;  // a dropped slot (expert -1) is owned by no rank
    for (int d = 0; d < p.R; ++d) {
      const int j = slot[t * p.R + d];
      if (j < 0) continue;
      const int64_t at_d = static_cast<int64_t>(d) * p.Tmax + j;
      if ((__ldcg(mask + at_d) >> k) & 1u) v = __ldcg(gw + at_d * p.K + k);
    }
    p.grad_w[i] = v;
  }
  if (!last_block(p, kGatherDone)) return;
  if (threadIdx.x == 0) at<int64_t>(p.my, p.f.status)[p.st_seq] = static_cast<int64_t>(n);
}

void launch(void (*kernel)(Params), int grid, const Params& p, cudaStream_t stream) {
  kernel<<<grid, kThreads, 0, stream>>>(p);
  FM_CHECK_LAUNCH();
}

}  // namespace

size_t region_bytes(int num_ranks) {
  return (2 * static_cast<size_t>(num_ranks) + kBlockCounters) * 8;
}

void prepare() {
  for (const void* k :
       {reinterpret_cast<const void*>(k_bwd_send), reinterpret_cast<const void*>(k_bwd_expert),
        reinterpret_cast<const void*>(k_bwd_gather)}) {
    cudaFuncAttributes attr;
    FM_CHECK_CUDA(cudaFuncGetAttributes(&attr, k));
  }
}

void send(const Params& p, cudaStream_t stream) {
  static_assert(kMaxTopK <= 32, "one lane per top-k slot");
  launch(k_bwd_send, p.send_blocks, p, stream);
}

void recv(const Params& p, cudaStream_t stream) {
  // Padding and unused rows are +0; every used row is written once by its slot's warp.
  FM_CHECK_CUDA(cudaMemsetAsync(p.grad_y, 0, static_cast<size_t>(p.bound * p.H) * 2, stream));
  launch(k_bwd_expert, p.recv_blocks, p, stream);
  const int64_t gather_blocks = (p.T * p.K + kThreads - 1) / kThreads;
  launch(k_bwd_gather,
         static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(p.recv_blocks, gather_blocks))), p,
         stream);
}

}  // namespace fp8moe::comm::bwd
