// MLA attention forward on warpgroup MMAs (wgmma, sm_90a): MlaForwardImpl::kWgmma (s21-af),
// FlashAttention-3's scheme for MLA's shapes (q 192 = nope 128 + rope 64, v 128, causal). Same
// contract and rounding points as mla_fwd_kernel (sm90_mla_attention.cu): scores in FP32, online
// softmax in log2 units, P rounded to BF16 for P V, O / l to BF16, lse = ln2 (max + log2 l).
// CTA = 128 queries of one (batch, head) = 2 consumer warpgroups x 64 rows + a producer warpgroup.
//   producer (warp 8, one lane): TMA loads of Q once and of key blocks of 128 (K = k_nope | k_pe,
//     3 panels; V, 2 panels) into 2 stages; K and V have their own full and empty mbarriers, so
//     K_j+2 loads as soon as S_j has read K_j, while V_j is still in use.
//   consumers: S_j = Q K_j^T (SS wgmma m64n128k16 x 12), then, while O += P_j-1 V_j-1 (RS wgmma
//     m64n128k16 x 8, P from registers) runs, the online softmax of S_j (intra-warpgroup overlap,
//     FA3 section 3.2); the two warpgroups run unsynchronised, so one's softmax also runs under
//     the other's MMAs. kPingPong (MlaForwardImpl::kWgmmaPingPong) adds FA3's warpgroup
//     ping-pong: two named barriers make the warpgroups issue their MMAs in turns (S_j and
//     P_j-1 V_j-1 of one, then the other's), so one's softmax runs under the other's MMAs.
// Tiles: 64-column panels of 128-byte rows with the 128-byte swizzle that TMA writes (chunk c of
// row r at c ^ (r & 7), panels 1024-byte aligned): K-major for Q and K, N-major for V (the
// descriptors of the backward's wgmma kernels). 3D tensor maps [batch][seq][columns]: rows past a
// sequence's end are zero-filled by TMA (as the cp.async zero-fill of the mma.sync form), never
// another sequence's. Deterministic: no atomics, a fixed order of blocks.
// Test: test_kernels_gpu --gtest_filter='MlaAttentionGpu.ForwardWgmma*'
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "sm90_mla_attention_common.cuh"
#include "sm90_mla_attention_fwd_wgmma.h"
#include "sm90_ptx.cuh"
#include "sm90_tma_encode.h"
#include "sm90_wgmma_bf16.cuh"

namespace fp8moe::kernels {
namespace {

using namespace mla;  // NOLINT(build/namespaces): sm90_mla_attention_common.cuh
using sm90::fence_barrier_init;
using sm90::mbar_arrive;
using sm90::mbar_arrive_expect_tx;
using sm90::mbar_init;
using sm90::mbar_wait;
using sm90::smem_addr;
using sm90::tma_prefetch_desc;
using sm90::wgmma_fence;
using sm90::wgmma_wait;

constexpr int kM = 128;  // queries a CTA (2 warpgroups x 64)
constexpr int kN = 128;  // keys a block
constexpr int kStages = 2;
// + the producer warpgroup: ptxas budgets registers per warpgroup (a 9th warp would cost as much
// as 4: 168 a thread, spills); setmaxnreg moves them to the consumers (24 + 2 x 240 a thread).
constexpr int kConsumers = 256, kThreads = kConsumers + 128;
constexpr int kProducerRegs = 24, kConsumerRegs = 240;
constexpr int kPanelQ = kM * 128, kPanelK = kN * 128;  // bytes of a 64-column panel
constexpr int kQBytes = 3 * kPanelQ, kKBytes = 3 * kPanelK, kVBytes = 2 * kPanelK;
constexpr int kBars = 1 + 4 * kStages;  // full_q, full_k, full_v, empty_k, empty_v
constexpr int kSmem = kQBytes + kStages * (kKBytes + kVBytes) + kBars * 8;
static_assert(kSmem <= 227 * 1024, "shared memory of one CTA");

struct FwdParams {
  CUtensorMap q_map, kv_map, kpe_map;  // [batch][seq][H * 192], [batch][seq][H * 256], [b][s][64]
  bf16* o;
  float* lse;
  int seq, heads, tokens;
  int q_blocks, head_group;  // the CTA order (see the kernel)
  float scale_log2;
};

// 3D tile load global -> shared (coordinates: column, row in the sequence, batch), completing on
// `bar`; rows past the sequence are zero-filled.
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, uint64_t* bar,
                                            int32_t c0, int32_t c1, int32_t c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5}], [%2];" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

// Named barrier arrival without waiting (ids 1.. ; the waiting side calls named_barrier_sync).
__device__ __forceinline__ void named_barrier_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(count) : "memory");
}

// The online softmax of one key block (mla_fwd_kernel's arithmetic): s (the warp's 16 query rows
// x kN keys, FP32 scores) scaled to log2 units and masked (key > query or past the sequence:
// -inf) where `edge`; new running max, alpha = exp2(old max - new max), P = exp2(s - max) summed
// into row_sum (FP32, after alpha) and rounded to BF16 into pa (the A fragments of P V).
__device__ __forceinline__ void softmax_block(float (&s)[kN / 8][4], uint32_t (&pa)[kN / 16][4],
                                              float (&row_max)[2], float (&row_sum)[2],
                                              float (&alpha)[2], int q_row, int n0, bool edge,
                                              int seq, float scale_log2) {
  scale_and_mask(s, static_cast<int>(threadIdx.x) & 31, q_row, n0, edge, seq, scale_log2);
#pragma unroll
  for (int r = 0; r < 2; ++r) softmax_row(s, r, row_max[r], row_sum[r], alpha[r]);
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) pack_a(pa[kk], s, kk);
}

template <bool kPingPong>
__global__ void __launch_bounds__(kThreads, 1)
    mla_fwd_wgmma_kernel(const __grid_constant__ FwdParams p) {
  extern __shared__ __align__(1024) uint8_t smem_af[];
  uint8_t* sq = smem_af;                 // 3 panels
  uint8_t* sk = sq + kQBytes;            // kStages x 3 panels
  uint8_t* sv = sk + kStages * kKBytes;  // kStages x 2 panels
  uint64_t* full_q = reinterpret_cast<uint64_t*>(sv + kStages * kVBytes);
  uint64_t* full_k = full_q + 1;  // [kStages], one arrival + the tx bytes
  uint64_t* full_v = full_k + kStages;
  uint64_t* empty_k = full_v + kStages;  // [kStages], every consumer thread arrives
  uint64_t* empty_v = empty_k + kStages;
  // CTA order (1D grid): batch, then groups of head_group heads, then query blocks longest first,
  // then the heads of the group. ~128 CTAs (one a SM) of the same few heads run together and read
  // each K / V block at about the same time: HBM serves it once, L2 the other query blocks. (With
  // the heads fastest, as mla_fwd_kernel, a head's K / V is re-read one query-block wave later,
  // after ~270 MB of other heads' at 1 x 4096 x 128: ~4.4 GB from HBM, ~1 ms on H200.)
  int idx = static_cast<int>(blockIdx.x);
  const int per_batch = p.heads * p.q_blocks, per_group = p.head_group * p.q_blocks;
  const int b = idx / per_batch;
  idx -= b * per_batch;
  const int h0 = idx / per_group * p.head_group, group = min(p.head_group, p.heads - h0);
  idx -= h0 * p.q_blocks;
  const int h = h0 + idx % group;
  const int m0 = (p.q_blocks - 1 - idx / group) * kM;  // the longest rows first
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n_blocks = (min(m0 + kM, p.seq) + kN - 1) / kN;

  if (threadIdx.x == 0) {
    mbar_init(full_q, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full_k + s, 1);
      mbar_init(full_v + s, 1);
      mbar_init(empty_k + s, kConsumers);
      mbar_init(empty_v + s, kConsumers);
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (warp >= kConsumers / 32) {  // ---- producer warpgroup: one lane issues the loads ----
    sm90::setmaxnreg_dec<kProducerRegs>();
    if (warp == kConsumers / 32 && lane == 0) {
      tma_prefetch_desc(&p.q_map);
      tma_prefetch_desc(&p.kv_map);
      tma_prefetch_desc(&p.kpe_map);
      mbar_arrive_expect_tx(full_q, kQBytes);
      for (int pn = 0; pn < 3; ++pn)
        tma_load_3d(sq + pn * kPanelQ, &p.q_map, full_q, h * kDq + pn * 64, m0, b);
      // Use u of a stage waits for the consumers' release of use u - 1 (parity (u - 1) & 1; the
      // first use's wait, parity 1, passes at once).
      for (int j = 0; j < n_blocks; ++j) {
        const int s = j % kStages, u = j / kStages, n0 = j * kN;
        uint8_t* tk = sk + s * kKBytes;
        uint8_t* tv = sv + s * kVBytes;
        mbar_wait(empty_k + s, (u & 1) ^ 1);
        mbar_arrive_expect_tx(full_k + s, kKBytes);
        tma_load_3d(tk, &p.kv_map, full_k + s, h * kDkv, n0, b);
        tma_load_3d(tk + kPanelK, &p.kv_map, full_k + s, h * kDkv + 64, n0, b);
        tma_load_3d(tk + 2 * kPanelK, &p.kpe_map, full_k + s, 0, n0, b);
        mbar_wait(empty_v + s, (u & 1) ^ 1);
        mbar_arrive_expect_tx(full_v + s, kVBytes);
        tma_load_3d(tv, &p.kv_map, full_v + s, h * kDkv + kDn, n0, b);
        tma_load_3d(tv + kPanelK, &p.kv_map, full_v + s, h * kDkv + kDn + 64, n0, b);
      }
    }
    return;
  }

  // ---- consumers: warpgroup wg, rows m0 + 64 wg .. + 63; this thread's q_row, q_row + 8 ----
  sm90::setmaxnreg_inc<kConsumerRegs>();
  const int wg = warp / 4;
  const int q_row = m0 + warp * 16 + lane / 4;
  const uint32_t tq = smem_addr(sq);
  float o[kDv / 8][4];
  zero(o);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f}, alpha[2];
  float s[kN / 8][4];
  uint32_t pa[kN / 16][4];  // P of the previous block (A of the P V in flight)
  // The waits for the stages come before a warpgroup's turn (ping-pong), the MMAs inside it.
  const auto wait_k = [&](int j) { mbar_wait(full_k + j % kStages, (j / kStages) & 1); };
  const auto wait_v = [&](int j) { mbar_wait(full_v + j % kStages, (j / kStages) & 1); };
  // Ping-pong: warpgroup wg's turn starts at named barrier 1 + wg (its sync + the other's
  // arrival); warpgroup 1 lets warpgroup 0 go first; warpgroup 1's last arrival has no taker.
  const auto turn_begin = [&] {
    if constexpr (kPingPong) sm90::named_barrier_sync(1 + wg, kConsumers);
  };
  const auto turn_end = [&](bool last) {
    if constexpr (kPingPong)
      if (!(last && wg == 1)) named_barrier_arrive(2 - wg, kConsumers);
  };
  const auto issue_s = [&](int j) {
    const uint32_t tk = smem_addr(sk + (j % kStages) * kKBytes);
    wgmma_fence();
    wgmma_ss<kM, kDq / 16>(s, tq, wg * 64, tk);
  };
  const auto issue_pv = [&](int j) {
    const uint32_t tv = smem_addr(sv + (j % kStages) * kVBytes);
    fence_acc(o);
    fence_frag(pa);
    wgmma_fence();
    wgmma_rs(o, pa, tv);
  };
  // Block j's mask is needed where it reaches the diagonal of the warp's rows or the sequence end.
  const auto edge_of = [&](int n0) { return n0 + kN - 1 > m0 + warp * 16 || n0 + kN > p.seq; };

  if constexpr (kPingPong)
    if (wg == 1) named_barrier_arrive(1, kConsumers);
  mbar_wait(full_q, 0);
  wait_k(0);
  turn_begin();
  issue_s(0);
  turn_end(false);
  wgmma_wait<0>();
  fence_acc(s);
  mbar_arrive(empty_k);  // K_0 read
  softmax_block(s, pa, row_max, row_sum, alpha, q_row, 0, edge_of(0), p.seq, p.scale_log2);
  for (int j = 1; j < n_blocks; ++j) {
    const int n0 = j * kN;
    wait_k(j);
    wait_v(j - 1);
    turn_begin();
    issue_s(j);       // S_j = Q K_j^T
    issue_pv(j - 1);  // O += P_j-1 V_j-1 (O already rescaled to block j-1's max)
    turn_end(false);
    wgmma_wait<1>();  // S_j done (groups complete in order)
    fence_acc(s);
    mbar_arrive(empty_k + j % kStages);
    uint32_t pn[kN / 16][4];
    softmax_block(s, pn, row_max, row_sum, alpha, q_row, n0, edge_of(n0), p.seq, p.scale_log2);
    wgmma_wait<0>();  // P_j-1 V_j-1 done: O and pa are free
    fence_acc(o);
    fence_frag(pa);
    mbar_arrive(empty_v + (j - 1) % kStages);
#pragma unroll
    for (int dt = 0; dt < kDv / 8; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk)
#pragma unroll
      for (int e = 0; e < 4; ++e) pa[kk][e] = pn[kk][e];
  }
  wait_v(n_blocks - 1);
  turn_begin();
  issue_pv(n_blocks - 1);
  turn_end(true);
  wgmma_wait<0>();
  fence_acc(o);
  fence_frag(pa);
  mbar_arrive(empty_v + (n_blocks - 1) % kStages);

  // Epilogue: O / l to BF16, lse = ln 2 * (max + log2 l).
  store_out_lse(p, o, row_max, row_sum, lane, q_row, b, h);
}

// ---- host ----
// BF16 [batch][seq][cols] (rows `cols` elements apart), boxes of 64 columns x `box_rows` rows of
// one sequence, 128-byte swizzle; rows past the sequence read as zeros.
CUtensorMap make_map_3d(const bf16* ptr, int64_t batch, int64_t seq, int64_t cols,
                        uint32_t box_rows) {
  CUtensorMap map{};
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(seq),
                              static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(cols * 2),
                                 static_cast<cuuint64_t>(seq * cols * 2)};
  const cuuint32_t box[3] = {64, box_rows, 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult r = sm90::encode_tiled_fn()(
      &map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<bf16*>(ptr), dims, strides, box,
      elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  FM_CHECK_ARG(r == CUDA_SUCCESS, "mla_attention_forward (wgmma): cuTensorMapEncodeTiled failed (",
               static_cast<int>(r), ") for a [", batch, ",", seq, ",", cols, "] BF16 tensor");
  return map;
}

}  // namespace

namespace detail {

void mla_attention_forward_wgmma(const bf16* q, const bf16* kv, const bf16* k_pe,
                                 MlaAttentionShape shape, float scale, bf16* out, float* lse,
                                 bool ping_pong, cudaStream_t stream) {
  FwdParams p{};
  p.q_map = make_map_3d(q, shape.batch, shape.seq, shape.heads * kDq, kM);
  p.kv_map = make_map_3d(kv, shape.batch, shape.seq, shape.heads * kDkv, kN);
  p.kpe_map = make_map_3d(k_pe, shape.batch, shape.seq, kMlaRopeDim, kN);
  p.o = out;
  p.lse = lse;
  p.seq = static_cast<int>(shape.seq);
  p.heads = static_cast<int>(shape.heads);
  p.tokens = static_cast<int>(shape.tokens());
  p.scale_log2 = scale * kLog2e;
  p.q_blocks = static_cast<int>((shape.seq + kM - 1) / kM);
  p.head_group = static_cast<int>(std::min<int64_t>(shape.heads, std::max(1, 128 / p.q_blocks)));
  // NOTE: set on every call: the attribute belongs to the current device.
  const auto kernel = ping_pong ? mla_fwd_wgmma_kernel<true> : mla_fwd_wgmma_kernel<false>;
  FM_CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  const int64_t ctas = shape.batch * shape.heads * p.q_blocks;  // < T x H < 2^31
  kernel<<<static_cast<unsigned>(ctas), kThreads, kSmem, stream>>>(p);
  FM_CHECK_LAUNCH();
}

}  // namespace detail
}  // namespace fp8moe::kernels
