// MLA's causal attention core on BF16 tensor cores (mma.sync.m16n8k16, ldmatrix), FlashAttention-2:
// forward = online softmax over key blocks, FP32 accumulators, no [S, S] matrix; backward = P
// recomputed from lse, one kernel for dk/dv (per key block), one for dq (per query block), no
// atomics. MlaBackwardImpl::kWgmma (s21-ab) runs the dk/dv and dq passes on wgmma instead;
// MlaForwardImpl::kWgmma (s21-af) dispatches to sm90_mla_attention_fwd_wgmma.cu.
// Reference: src/kernels/mla_attention_reference.cpp. Test: test_kernels_gpu
// --gtest_filter='MlaAttentionGpu*'
#include <cuda_bf16.h>

#include <cstdint>
#include <initializer_list>
#include <utility>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/kernels/mla_attention.h"
#include "sm90_mla_attention_common.cuh"
#include "sm90_mla_attention_fwd_wgmma.h"
#include "sm90_ptx.cuh"
#include "sm90_wgmma_bf16.cuh"

namespace fp8moe::kernels {
namespace {

using namespace mla;  // NOLINT(build/namespaces): sm90_mla_attention_common.cuh
using sm90::cp_async_16;
using sm90::cp_async_commit;
using sm90::cp_async_wait;
using sm90::smem_addr;

// ---- tiles in shared memory ----
// A tile row of kCols BF16 is kCols / 8 chunks of 16 bytes; chunk c of row r sits at chunk
// c ^ (r & 7) so that ldmatrix's 8 rows of one logical chunk hit 8 different 16-byte bank groups
// (rows are 256 or 384 bytes apart: unswizzled they would all share banks).
template <int kCols>
__device__ __forceinline__ uint32_t tile_off(int row, int chunk) {
  static_assert(kCols % 64 == 0, "swizzle needs rows of whole 8-chunk groups");
  return static_cast<uint32_t>((row * (kCols / 8) + (chunk ^ (row & 7))) * 16);
}

// Rows [0, kRows) of a tile from global rows `row0 + r` (r < rows_valid, else zero-filled);
// column chunks [0, kChunks) of each row from src + row * ld (elements) into tile chunks
// [chunk0, chunk0 + kChunks). kThreads threads share the copies. kPanels: a panel tile (the
// wgmma kernels'), else a tile_off<kCols> one.
template <int kRows, int kCols, int kChunks, int kThreads, bool kPanels = false>
__device__ __forceinline__ void load_rows(uint8_t* tile, int chunk0, const bf16* src, int64_t ld,
                                          int rows_valid) {
  constexpr int kTotal = kRows * kChunks;
#pragma unroll
  for (int i = 0; i < (kTotal + kThreads - 1) / kThreads; ++i) {
    const int idx = i * kThreads + static_cast<int>(threadIdx.x);
    if (kTotal % kThreads != 0 && idx >= kTotal) break;
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = r < rows_valid;
    const bf16* g = src + (valid ? static_cast<int64_t>(r) * ld + c * 8 : 0);
    const uint32_t off = kPanels ? panel_off<kRows>(r, chunk0 + c) : tile_off<kCols>(r, chunk0 + c);
    cp_async_16(tile + off, g, valid ? 16u : 0u);
  }
}

// ---- warp-level MMA pieces ----
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A fragment (16 rows x 16 columns, rows [0, 16) of the warp's slice) of a row-major tile:
// rows row0.., column chunks 2 * kk, 2 * kk + 1.
template <int kCols>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], uint32_t tile, int row0, int kk) {
  const int lane = static_cast<int>(threadIdx.x) & 31, mi = lane >> 3;
  ldsm_x4(a, tile + tile_off<kCols>(row0 + (mi & 1) * 8 + (lane & 7), 2 * kk + (mi >> 1)));
}
// B fragments of two n-tiles (rows n0..n0+15 of the tile are the n index, columns the k index:
// K for Q K^T): b[0], b[1] for n0..n0+7, b[2], b[3] for n0+8..n0+15; k = chunks 2 kk, 2 kk + 1.
template <int kCols>
__device__ __forceinline__ void load_b_rows(uint32_t (&b)[4], uint32_t tile, int n0, int kk) {
  const int lane = static_cast<int>(threadIdx.x) & 31, mi = lane >> 3;
  ldsm_x4(b, tile + tile_off<kCols>(n0 + (mi >> 1) * 8 + (lane & 7), 2 * kk + (mi & 1)));
}
// B fragments where the tile's rows are the k index and its columns the n index (V for P V):
// k = rows k0..k0+15, n = column chunks 2 np (b[0], b[1]) and 2 np + 1 (b[2], b[3]).
template <int kCols>
__device__ __forceinline__ void load_b_cols(uint32_t (&b)[4], uint32_t tile, int k0, int np) {
  const int lane = static_cast<int>(threadIdx.x) & 31, mi = lane >> 3;
  ldsm_x4_trans(b, tile + tile_off<kCols>(k0 + (mi & 1) * 8 + (lane & 7), 2 * np + (mi >> 1)));
}

// acc[16 x 8 kN] += A[16 x 16 kK] B where A comes from the warp's rows of tile_a (row0) and B's
// n index runs over rows [0, 8 kN) of tile_b, its k index over both tiles' columns.
template <int kColsA, int kColsB, int kK, int kN>
__device__ __forceinline__ void mma_rows_rows(float (&acc)[kN][4], uint32_t tile_a, int row0,
                                              uint32_t tile_b) {
  static_assert(kN % 2 == 0, "n-tiles come in pairs");
#pragma unroll
  for (int kk = 0; kk < kK; ++kk) {
    uint32_t a[4];
    load_a<kColsA>(a, tile_a, row0, kk);
#pragma unroll
    for (int np = 0; np < kN / 2; ++np) {
      uint32_t b[4];
      load_b_rows<kColsB>(b, tile_b, np * 16, kk);
      mma_bf16(acc[2 * np], a, b[0], b[1]);
      mma_bf16(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc[16 x 8 kN] += P[16 x 16 kK] B, P the warp's accumulator fragments (FP32, 16 x 16 kK, the
// C layout of two n-tiles is the A layout of one k-step) rounded to BF16, B rows [0, 16 kK) of
// tile_b (the k index) and column chunks [0, kN) (the n index).
template <int kColsB, int kK, int kN>
__device__ __forceinline__ void mma_acc_cols(float (&acc)[kN][4], const float (&p)[2 * kK][4],
                                             uint32_t tile_b) {
  static_assert(kN % 2 == 0, "n-tiles come in pairs");
#pragma unroll
  for (int kk = 0; kk < kK; ++kk) {
    uint32_t a[4];
    pack_a(a, p, kk);
#pragma unroll
    for (int np = 0; np < kN / 2; ++np) {
      uint32_t b[4];
      load_b_cols<kColsB>(b, tile_b, kk * 16, np);
      mma_bf16(acc[2 * np], a, b[0], b[1]);
      mma_bf16(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

struct Params {
  const bf16 *q, *kv, *kpe, *out, *dout;
  bf16 *o, *dq, *dkv;
  float *lse, *dsum, *dkpe_part, *dk_pe;
  const float* lse_in;
  int seq, heads, tokens;
  float scale, scale_log2;
};

// ---- forward: one CTA = 128 queries of one (batch, head); 8 warps x 16 query rows ----
constexpr int kFwdM = 128, kFwdN = 64, kFwdThreads = 256;
constexpr int kFwdSmem = kFwdM * kDq * 2 + 2 * kFwdN * (kDq + kDv) * 2;  // Q + 2 stages of K, V

// K tile rows = keys: k_nope (chunks 0..15) from kv, k_pe (chunks 16..23) from k_pe. V tile: v.
// NOTE: k_pe is one row per token for all heads: CTAs of all heads of a query block run together
// (head is blockIdx.x, the fastest), so each key block's k_pe comes from HBM about once and
// from L2 for the other heads (it is 1/5 of a key block's bytes).
// kPanels: the wgmma kernels' panel tiles (K 3 panels, V 2).
template <int kRows, int kThreads, bool kPanels = false>
__device__ __forceinline__ void load_kv_block(const Params& p, uint8_t* sk, uint8_t* sv, int b,
                                              int h, int n0) {
  const int valid = min(kRows, p.seq - n0);
  const int64_t t0 = static_cast<int64_t>(b) * p.seq + n0;
  const bf16* kv = p.kv + (t0 * p.heads + h) * kDkv;
  load_rows<kRows, kDq, 16, kThreads, kPanels>(sk, 0, kv, static_cast<int64_t>(p.heads) * kDkv,
                                               valid);
  load_rows<kRows, kDq, 8, kThreads, kPanels>(sk, 16, p.kpe + t0 * kDr, kDr, valid);
  // NOTE: sv is never null; the mma.sync kernels' machine code still depends on this test.
  if (kPanels || sv != nullptr)
    load_rows<kRows, kDv, 16, kThreads, kPanels>(sv, 0, kv + kDn,
                                                 static_cast<int64_t>(p.heads) * kDkv, valid);
}

__global__ void __launch_bounds__(kFwdThreads, 1) mla_fwd_kernel(Params p) {
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* sq = smem;
  uint8_t* sk = sq + kFwdM * kDq * 2;
  uint8_t* sv = sk + 2 * kFwdN * kDq * 2;
  const int h = blockIdx.x, b = blockIdx.z;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kFwdM;  // the longest rows first
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n_blocks = (min(m0 + kFwdM, p.seq) + kFwdN - 1) / kFwdN;

  // Prologue: Q and key block 0.
  const int64_t tq0 = static_cast<int64_t>(b) * p.seq + m0;
  load_rows<kFwdM, kDq, 24, kFwdThreads>(sq, 0, p.q + (tq0 * p.heads + h) * kDq,
                                         static_cast<int64_t>(p.heads) * kDq, p.seq - m0);
  load_kv_block<kFwdN, kFwdThreads>(p, sk, sv, b, h, 0);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t qf[kDq / 16][4];
#pragma unroll
  for (int kk = 0; kk < kDq / 16; ++kk) load_a<kDq>(qf[kk], smem_addr(sq), warp * 16, kk);

  float o[kDv / 8][4];
  zero(o);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
  const int q_row = m0 + warp * 16 + lane / 4;  // this thread's rows: q_row, q_row + 8
  for (int j = 0; j < n_blocks; ++j) {
    const int stage = j & 1, n0 = j * kFwdN;
    if (j + 1 < n_blocks)
      load_kv_block<kFwdN, kFwdThreads>(p, sk + (stage ^ 1) * kFwdN * kDq * 2,
                                        sv + (stage ^ 1) * kFwdN * kDv * 2, b, h, n0 + kFwdN);
    cp_async_commit();
    const uint32_t tk = smem_addr(sk + stage * kFwdN * kDq * 2);
    const uint32_t tv = smem_addr(sv + stage * kFwdN * kDv * 2);

    // S = Q K^T (16 x 64 per warp), in log2 units.
    float s[kFwdN / 8][4];
    zero(s);
#pragma unroll
    for (int kk = 0; kk < kDq / 16; ++kk)
#pragma unroll
      for (int np = 0; np < kFwdN / 16; ++np) {
        uint32_t bk[4];
        load_b_rows<kDq>(bk, tk, np * 16, kk);
        mma_bf16(s[2 * np], qf[kk], bk[0], bk[1]);
        mma_bf16(s[2 * np + 1], qf[kk], bk[2], bk[3]);
      }
    // Causal mask (and keys past the sequence) where the block reaches the diagonal or the end.
    const bool edge = n0 + kFwdN - 1 > m0 + warp * 16 || n0 + kFwdN > p.seq;
    scale_and_mask(s, lane, q_row, n0, edge, p.seq, p.scale_log2);
    // Online softmax: new running max, rescale of the sums and of O.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float alpha;
      softmax_row(s, r, row_max[r], row_sum[r], alpha);
#pragma unroll
      for (int dt = 0; dt < kDv / 8; ++dt) {
        o[dt][2 * r] *= alpha;
        o[dt][2 * r + 1] *= alpha;
      }
    }
    // O += P V.
    mma_acc_cols<kDv, kFwdN / 16, kDv / 8>(o, s, tv);
    cp_async_wait<0>();
    __syncthreads();
  }

  // Epilogue: O / l to BF16, lse = ln 2 * (max + log2 l).
  store_out_lse(p, o, row_max, row_sum, lane, q_row, b, h);
}

// ---- backward, step 1: D = rowsum(dout * out) [H, T], one warp per (token, head) ----
__global__ void mla_bwd_dsum_kernel(Params p) {
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (w >= static_cast<int64_t>(p.tokens) * p.heads) return;
  const int64_t t = w / p.heads, h = w % p.heads;
  const uint2 a = *reinterpret_cast<const uint2*>(p.out + w * kDv + lane * 4);
  const uint2 g = *reinterpret_cast<const uint2*>(p.dout + w * kDv + lane * 4);
  const __nv_bfloat162* a2 = reinterpret_cast<const __nv_bfloat162*>(&a);
  const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&g);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float2 x = __bfloat1622float2(a2[i]), y = __bfloat1622float2(g2[i]);
    sum += x.x * y.x + x.y * y.y;
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, off);
  if (lane == 0) p.dsum[h * p.tokens + t] = sum;
}

// P (log2 units in, probabilities out) and dS = P (dP - D) of a 16 x 8 kN warp tile whose rows
// are `row` + {0, 8} and columns col0 + 8 nt + 2 (lane % 4) + {0, 1}; `transposed`: rows are
// keys and columns queries (the dk/dv kernel), else rows are queries. lse2 / dsum are indexed
// by the query; masked entries (key > query, or past the sequence) get P = dS = 0.
template <int kN, bool kTransposed>
__device__ __forceinline__ void probs_and_ds(float (&s)[kN][4], float (&dp)[kN][4], int row,
                                             int col0, const float* lse2, const float* dsum,
                                             int lse_base, int seq, float scale_log2) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
#pragma unroll
  for (int nt = 0; nt < kN; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = row + (e >> 1) * 8, c = col0 + nt * 8 + (lane % 4) * 2 + (e & 1);
      const int query = kTransposed ? c : r, key = kTransposed ? r : c;
      const int qi = (kTransposed ? c - col0 : r - row) + lse_base;  // index into lse2 / dsum
      const bool valid = key <= query && query < seq;
      const float pr = valid ? exp2f(s[nt][e] * scale_log2 - lse2[qi]) : 0.0f;
      s[nt][e] = pr;
      dp[nt][e] = pr * (dp[nt][e] - dsum[qi]);
    }
}

// Query rows [m0, m0 + kRows) of Q and dO (rows past the sequence zero-filled; kPanels: the
// wgmma kernels' panel tiles) and their statistics, 0 past the sequence: stat[r] = lse in log2
// units, stat[kRows + r] = D.
template <int kRows, int kThreads, bool kPanels = false>
__device__ __forceinline__ void load_query_block(const Params& p, uint8_t* sq, uint8_t* sdo,
                                                 float* stat, int64_t tb, int m0, int h) {
  const int valid = min(kRows, p.seq - m0);
  load_rows<kRows, kDq, 24, kThreads, kPanels>(sq, 0, p.q + ((tb + m0) * p.heads + h) * kDq,
                                               static_cast<int64_t>(p.heads) * kDq, valid);
  load_rows<kRows, kDv, 16, kThreads, kPanels>(sdo, 0, p.dout + ((tb + m0) * p.heads + h) * kDv,
                                               static_cast<int64_t>(p.heads) * kDv, valid);
  if (threadIdx.x < kRows) {
    const int r = threadIdx.x;
    const int64_t idx = static_cast<int64_t>(h) * p.tokens + tb + m0 + r;
    stat[r] = r < valid ? p.lse_in[idx] * kLog2e : 0.0f;
    stat[kRows + r] = r < valid ? p.dsum[idx] : 0.0f;
  }
}

// Epilogue of the dk/dv passes: the thread's keys key_row + {0, 8} (rows of the m16n8 C layout)
// of dk_nope, dv to dkv (BF16), of dk_pe of this head to the workspace (FP32); keys past the
// sequence skipped. `lane` is the kernel's (passed, as scale_and_mask's).
__device__ __forceinline__ void store_dkdv(const Params& p, const float (&dk)[kDq / 8][4],
                                           const float (&dv)[kDv / 8][4], int lane, int key_row,
                                           int64_t tb, int h) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key_row + r * 8;
    if (key >= p.seq) continue;
    const int64_t t = tb + key;
    bf16* dst = p.dkv + (t * p.heads + h) * kDkv + (lane % 4) * 2;
    float* part = p.dkpe_part + (static_cast<int64_t>(h) * p.tokens + t) * kDr + (lane % 4) * 2;
#pragma unroll
    for (int nt = 0; nt < kDn / 8; ++nt)
      *reinterpret_cast<uint32_t*>(dst + nt * 8) =
          pack_bf16x2(dk[nt][2 * r] * p.scale, dk[nt][2 * r + 1] * p.scale);
#pragma unroll
    for (int nt = 0; nt < kDv / 8; ++nt)
      *reinterpret_cast<uint32_t*>(dst + kDn + nt * 8) =
          pack_bf16x2(dv[nt][2 * r], dv[nt][2 * r + 1]);
#pragma unroll
    for (int nt = 0; nt < kDr / 8; ++nt)
      *reinterpret_cast<float2*>(part + nt * 8) =
          make_float2(dk[kDn / 8 + nt][2 * r] * p.scale, dk[kDn / 8 + nt][2 * r + 1] * p.scale);
  }
}

// Epilogue of the dq passes: the thread's queries q_row + {0, 8} of dq (BF16).
__device__ __forceinline__ void store_dq(const Params& p, const float (&dq)[kDq / 8][4], int lane,
                                         int q_row, int64_t tb, int h) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = q_row + r * 8;
    if (row >= p.seq) continue;
    bf16* dst = p.dq + ((tb + row) * p.heads + h) * kDq + (lane % 4) * 2;
#pragma unroll
    for (int nt = 0; nt < kDq / 8; ++nt)
      *reinterpret_cast<uint32_t*>(dst + nt * 8) =
          pack_bf16x2(dq[nt][2 * r] * p.scale, dq[nt][2 * r + 1] * p.scale);
  }
}

// ---- backward, step 2: dk, dv per 128 keys of one (batch, head); 8 warps x 16 keys ----
// For each query block (64) at or after the keys: S^T = K Q^T, P^T, dV += P^T dO,
// dP^T = V dO^T, dS^T = P^T (dP^T - D), dK += dS^T Q.
constexpr int kKvN = 128, kKvM = 32,
              kKvThreads = 256;  // 64: 408 B spilled; 16: 8 B, but 1 ldmatrix a MMA
constexpr int kKvSmem = kKvN * (kDq + kDv) * 2 + 2 * kKvM * (kDq + kDv) * 2 + 2 * kKvM * 2 * 4;

__global__ void __launch_bounds__(kKvThreads, 1) mla_bwd_dkdv_kernel(Params p) {
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* sk = smem;
  uint8_t* sv = sk + kKvN * kDq * 2;
  uint8_t* sq = sv + kKvN * kDv * 2;                                  // 2 stages
  uint8_t* sdo = sq + 2 * kKvM * kDq * 2;                             // 2 stages
  float* sstat = reinterpret_cast<float*>(sdo + 2 * kKvM * kDv * 2);  // 2 stages x (lse2, D)
  const int h = blockIdx.x, b = blockIdx.z;
  const int n0 = blockIdx.y * kKvN;  // key block 0 sees the most queries: it goes first
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t tb = static_cast<int64_t>(b) * p.seq;
  const int i_first = n0 / kKvM, i_end = (p.seq + kKvM - 1) / kKvM;

  const auto load_q_block = [&](int i, int stage) {
    load_query_block<kKvM, kKvThreads>(p, sq + stage * kKvM * kDq * 2, sdo + stage * kKvM * kDv * 2,
                                       sstat + stage * 2 * kKvM, tb, i * kKvM, h);
  };
  load_kv_block<kKvN, kKvThreads>(p, sk, sv, b, h, n0);
  load_q_block(i_first, 0);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  float dk[kDq / 8][4], dv[kDv / 8][4];
  zero(dk);
  zero(dv);
  const int key_row = n0 + warp * 16 + lane / 4;
  for (int i = i_first; i < i_end; ++i) {
    const int stage = (i - i_first) & 1, m0 = i * kKvM;
    // NOTE: the other stage was last read in iteration i - 1, which ended with a barrier; its
    // statistics are plain stores, visible after this iteration's closing barrier.
    if (i + 1 < i_end) load_q_block(i + 1, stage ^ 1);
    cp_async_commit();
    const uint32_t tq = smem_addr(sq + stage * kKvM * kDq * 2);
    const uint32_t tdo = smem_addr(sdo + stage * kKvM * kDv * 2);
    const float* lse2 = sstat + stage * 2 * kKvM;
    // Warps whose keys all lie after the block's last query have nothing to add.
    if (n0 + warp * 16 <= m0 + kKvM - 1) {
      float s[kKvM / 8][4], dpt[kKvM / 8][4];
      zero(s);
      zero(dpt);
      mma_rows_rows<kDq, kDq, kDq / 16, kKvM / 8>(s, smem_addr(sk), warp * 16, tq);
      mma_rows_rows<kDv, kDv, kDv / 16, kKvM / 8>(dpt, smem_addr(sv), warp * 16, tdo);
      probs_and_ds<kKvM / 8, true>(s, dpt, key_row, m0, lse2, lse2 + kKvM, 0, p.seq, p.scale_log2);
      mma_acc_cols<kDv, kKvM / 16, kDv / 8>(dv, s, tdo);
      mma_acc_cols<kDq, kKvM / 16, kDq / 8>(dk, dpt, tq);
    }
    cp_async_wait<0>();
    __syncthreads();
  }

  store_dkdv(p, dk, dv, lane, key_row, tb, h);
}

// ---- backward, step 3: dq per 128 queries of one (batch, head); 8 warps x 16 query rows ----
// For each key block (64) up to the diagonal: S = Q K^T, P, dP = dO V^T, dS, dQ += dS K.
constexpr int kQM = 128, kQN = 64, kQThreads = 256;
constexpr int kQSmem = kQM * (kDq + kDv) * 2 + 2 * kQN * (kDq + kDv) * 2 + kQM * 2 * 4;

__global__ void __launch_bounds__(kQThreads, 1) mla_bwd_dq_kernel(Params p) {
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* sq = smem;
  uint8_t* sdo = sq + kQM * kDq * 2;
  uint8_t* sk = sdo + kQM * kDv * 2;  // 2 stages
  uint8_t* sv = sk + 2 * kQN * kDq * 2;
  float* sstat = reinterpret_cast<float*>(sv + 2 * kQN * kDv * 2);  // lse2 [128], D [128]
  const int h = blockIdx.x, b = blockIdx.z;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kQM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t tb = static_cast<int64_t>(b) * p.seq;
  const int n_blocks = (min(m0 + kQM, p.seq) + kQN - 1) / kQN;

  load_query_block<kQM, kQThreads>(p, sq, sdo, sstat, tb, m0, h);
  load_kv_block<kQN, kQThreads>(p, sk, sv, b, h, 0);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  float dq[kDq / 8][4];
  zero(dq);
  const int q_row = m0 + warp * 16 + lane / 4;
  for (int j = 0; j < n_blocks; ++j) {
    const int stage = j & 1, n0 = j * kQN;
    if (j + 1 < n_blocks)
      load_kv_block<kQN, kQThreads>(p, sk + (stage ^ 1) * kQN * kDq * 2,
                                    sv + (stage ^ 1) * kQN * kDv * 2, b, h, n0 + kQN);
    cp_async_commit();
    const uint32_t tk = smem_addr(sk + stage * kQN * kDq * 2);
    const uint32_t tv = smem_addr(sv + stage * kQN * kDv * 2);
    if (n0 <= m0 + warp * 16 + 15) {  // else every key of the block is after the warp's rows
      float s[kQN / 8][4], dp[kQN / 8][4];
      zero(s);
      zero(dp);
      mma_rows_rows<kDq, kDq, kDq / 16, kQN / 8>(s, smem_addr(sq), warp * 16, tk);
      // NOTE: dO's A fragments from shared memory each block: held in registers they spilled.
      mma_rows_rows<kDv, kDv, kDv / 16, kQN / 8>(dp, smem_addr(sdo), warp * 16, tv);
      probs_and_ds<kQN / 8, false>(s, dp, q_row, n0, sstat, sstat + kQM, q_row - m0, p.seq,
                                   p.scale_log2);
      mma_acc_cols<kDq, kQN / 16, kDq / 8>(dq, dp, tk);
    }
    cp_async_wait<0>();
    __syncthreads();
  }

  store_dq(p, dq, lane, q_row, tb, h);
}

// ---- backward, step 4: dk_pe[t] = sum over heads, in head order, of the per-head partials ----
__global__ void mla_bwd_kpe_sum_kernel(Params p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = static_cast<int64_t>(p.tokens) * kDr;
  if (i >= n) return;
  float sum = 0.0f;
  for (int h = 0; h < p.heads; ++h) sum += p.dkpe_part[h * n + i];
  p.dk_pe[i] = sum;
}

// ---- backward, wgmma variant (s21-ab, MlaBackwardImpl::kWgmma; docs/kernels/attention.md) ----
// The same four steps; the dk/dv and dq passes issue warpgroup MMAs (wgmma, sm_90a) instead of
// mma.sync + ldmatrix: a warpgroup (4 warps, 64 rows) reads each shared-memory B operand once for
// its 64 rows where 4 warps read it 4 times, and the operands that the mma.sync form took by
// ldmatrix (K, V, Q, dO, and their transposes) come straight from shared memory. P^T / dS^T /
// dS feed the second products from registers (the accumulator -> A fragment repack as before).
// Tiles: panels of 64 columns (128-byte rows), the 128-byte swizzle wgmma reads (chunk c of row
// r at c ^ (r & 7), each panel 1024-byte aligned); the same bytes serve as a K-major operand
// (rows = M or N, e.g. Q in S^T = K Q^T) and as an N-major B (rows = K, e.g. Q in dK += dS^T Q).
using sm90::fence_proxy_async;
using sm90::wgmma_commit;
using sm90::wgmma_fence;
using sm90::wgmma_wait;

// probs_and_ds in two halves, so that P is computed while dP's wgmma still runs: wg_probs turns
// the scores (log2 units) into P (0 where masked), wg_ds turns dP into dS = P (dP - D).
template <int kN, bool kTransposed>
__device__ __forceinline__ void wg_probs(float (&s)[kN][4], int row, int col0, const float* lse2,
                                         int lse_base, int seq, float scale_log2) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
#pragma unroll
  for (int nt = 0; nt < kN; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = row + (e >> 1) * 8, c = col0 + nt * 8 + (lane % 4) * 2 + (e & 1);
      const int query = kTransposed ? c : r, key = kTransposed ? r : c;
      const int qi = (kTransposed ? c - col0 : r - row) + lse_base;
      const bool valid = key <= query && query < seq;
      s[nt][e] = valid ? exp2f(s[nt][e] * scale_log2 - lse2[qi]) : 0.0f;
    }
}
template <int kN, bool kTransposed>
__device__ __forceinline__ void wg_ds(const float (&pr)[kN][4], float (&dp)[kN][4], int row,
                                      int col0, const float* dsum, int lse_base) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
#pragma unroll
  for (int nt = 0; nt < kN; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = row + (e >> 1) * 8, c = col0 + nt * 8 + (lane % 4) * 2 + (e & 1);
      const int qi = (kTransposed ? c - col0 : r - row) + lse_base;
      dp[nt][e] = pr[nt][e] * (dp[nt][e] - dsum[qi]);
    }
}

// dk/dv: CTA = 128 keys of one (batch, head), 2 warpgroups x 64 keys; query blocks of kWgKvM.
// Per query block and warpgroup: S^T = K Q^T and dP^T = V dO^T (wgmma m64 n kWgKvM, both from
// shared memory), P^T and dS^T in registers, dV += P^T dO (m64n128, A from registers, dO N-major)
// and dK += dS^T Q (m64n192, Q N-major).
constexpr int kWgKvN = 128, kWgKvM = 32, kWgThreads = 256;
constexpr int kWgKvSmem =
    kWgKvN * (kDq + kDv) * 2 + 2 * kWgKvM * (kDq + kDv) * 2 + 2 * kWgKvM * 2 * 4;

__global__ void __launch_bounds__(kWgThreads, 1) mla_bwd_dkdv_wgmma_kernel(Params p) {
  extern __shared__ __align__(1024) uint8_t smem_wg[];
  uint8_t* sk = smem_wg;                                                // 3 panels
  uint8_t* sv = sk + kWgKvN * kDq * 2;                                  // 2 panels
  uint8_t* sq = sv + kWgKvN * kDv * 2;                                  // 2 stages x 3 panels
  uint8_t* sdo = sq + 2 * kWgKvM * kDq * 2;                             // 2 stages x 2 panels
  float* sstat = reinterpret_cast<float*>(sdo + 2 * kWgKvM * kDv * 2);  // 2 x (lse2, D)
  const int h = blockIdx.x, b = blockIdx.z;
  const int n0 = blockIdx.y * kWgKvN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = warp / 4;
  const int64_t tb = static_cast<int64_t>(b) * p.seq;
  const int i_first = n0 / kWgKvM, i_end = (p.seq + kWgKvM - 1) / kWgKvM;

  const auto load_q_block = [&](int i, int stage) {
    load_query_block<kWgKvM, kWgThreads, true>(p, sq + stage * kWgKvM * kDq * 2,
                                               sdo + stage * kWgKvM * kDv * 2,
                                               sstat + stage * 2 * kWgKvM, tb, i * kWgKvM, h);
  };
  load_kv_block<kWgKvN, kWgThreads, true>(p, sk, sv, b, h, n0);
  load_q_block(i_first, 0);
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async();  // cp.async wrote what the tensor cores read next
  __syncthreads();

  float dk[kDq / 8][4], dv[kDv / 8][4];
  zero(dk);
  zero(dv);
  const int key_row = n0 + warp * 16 + lane / 4;
  const uint32_t tk = smem_addr(sk), tv = smem_addr(sv);
  for (int i = i_first; i < i_end; ++i) {
    const int stage = (i - i_first) & 1, m0 = i * kWgKvM;
    if (i + 1 < i_end) load_q_block(i + 1, stage ^ 1);
    cp_async_commit();
    const uint32_t tq = smem_addr(sq + stage * kWgKvM * kDq * 2);
    const uint32_t tdo = smem_addr(sdo + stage * kWgKvM * kDv * 2);
    const float* lse2 = sstat + stage * 2 * kWgKvM;
    // Warpgroups whose keys all lie after the block's last query have nothing to add.
    if (n0 + wg * 64 <= m0 + kWgKvM - 1) {
      float s[kWgKvM / 8][4], dpt[kWgKvM / 8][4];
      wgmma_fence();
      // Groups: S^T, dP^T, dV, dK; P^T is computed while dP^T runs, dS^T while dV runs.
      wgmma_ss<kWgKvN, kDq / 16>(s, tk, wg * 64, tq);
      wgmma_ss<kWgKvN, kDv / 16>(dpt, tv, wg * 64, tdo);
      wgmma_wait<1>();
      fence_acc(s);
      wg_probs<kWgKvM / 8, true>(s, key_row, m0, lse2, 0, p.seq, p.scale_log2);
      uint32_t pa[kWgKvM / 16][4], da[kWgKvM / 16][4];
#pragma unroll
      for (int kk = 0; kk < kWgKvM / 16; ++kk) pack_a(pa[kk], s, kk);
      wgmma_fence();
      wgmma_rs(dv, pa, tdo);
      wgmma_wait<1>();
      fence_acc(dpt);
      wg_ds<kWgKvM / 8, true>(s, dpt, key_row, m0, lse2 + kWgKvM, 0);
#pragma unroll
      for (int kk = 0; kk < kWgKvM / 16; ++kk) pack_a(da[kk], dpt, kk);
      wgmma_fence();
      wgmma_rs(dk, da, tq);
      wgmma_wait<0>();
      fence_frag(pa);
      fence_frag(da);
      fence_acc(dk);
      fence_acc(dv);
    }
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
  }

  store_dkdv(p, dk, dv, lane, key_row, tb, h);
}

// dq: CTA = 128 queries of one (batch, head), 2 warpgroups x 64 queries; key blocks of 64 up to
// the diagonal: S = Q K^T, dP = dO V^T (m64n64, both from shared memory), dS in registers,
// dQ += dS K (m64n192, A from registers, K N-major).
constexpr int kWgQM = 128, kWgQN = 64;
constexpr int kWgQSmem = kWgQM * (kDq + kDv) * 2 + 2 * kWgQN * (kDq + kDv) * 2 + kWgQM * 2 * 4;

__global__ void __launch_bounds__(kWgThreads, 1) mla_bwd_dq_wgmma_kernel(Params p) {
  extern __shared__ __align__(1024) uint8_t smem_wg[];
  uint8_t* sq = smem_wg;
  uint8_t* sdo = sq + kWgQM * kDq * 2;
  uint8_t* sk = sdo + kWgQM * kDv * 2;  // 2 stages
  uint8_t* sv = sk + 2 * kWgQN * kDq * 2;
  float* sstat = reinterpret_cast<float*>(sv + 2 * kWgQN * kDv * 2);  // lse2 [128], D [128]
  const int h = blockIdx.x, b = blockIdx.z;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kWgQM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = warp / 4;
  const int64_t tb = static_cast<int64_t>(b) * p.seq;
  const int n_blocks = (min(m0 + kWgQM, p.seq) + kWgQN - 1) / kWgQN;

  load_query_block<kWgQM, kWgThreads, true>(p, sq, sdo, sstat, tb, m0, h);
  load_kv_block<kWgQN, kWgThreads, true>(p, sk, sv, b, h, 0);
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async();
  __syncthreads();
  float dq[kDq / 8][4];
  zero(dq);
  const int q_row = m0 + warp * 16 + lane / 4;
  const uint32_t tq = smem_addr(sq), tdo = smem_addr(sdo);
  for (int j = 0; j < n_blocks; ++j) {
    const int stage = j & 1, n0 = j * kWgQN;
    if (j + 1 < n_blocks)
      load_kv_block<kWgQN, kWgThreads, true>(p, sk + (stage ^ 1) * kWgQN * kDq * 2,
                                             sv + (stage ^ 1) * kWgQN * kDv * 2, b, h, n0 + kWgQN);
    cp_async_commit();
    const uint32_t tk = smem_addr(sk + stage * kWgQN * kDq * 2);
    const uint32_t tv = smem_addr(sv + stage * kWgQN * kDv * 2);
    if (n0 <= m0 + wg * 64 + 63) {  // else every key of the block is after the warpgroup's rows
      float s[kWgQN / 8][4], dp[kWgQN / 8][4];
      wgmma_fence();
      // NOTE: written out, not wgmma_ss: with it this kernel's machine code changes.
#pragma unroll
      for (int kk = 0; kk < kDq / 16; ++kk)
        sm90::WgmmaBf16Ss<kWgQN>::mma(s, desc_k<kWgQM>(tq, wg * 64, kk), desc_k<kWgQN>(tk, 0, kk),
                                      kk > 0);
      wgmma_commit();
#pragma unroll
      for (int kk = 0; kk < kDv / 16; ++kk)
        sm90::WgmmaBf16Ss<kWgQN>::mma(dp, desc_k<kWgQM>(tdo, wg * 64, kk), desc_k<kWgQN>(tv, 0, kk),
                                      kk > 0);
      wgmma_commit();
      // Groups: S, dP (then dQ); P is computed while dP runs.
      wgmma_wait<1>();
      fence_acc(s);
      wg_probs<kWgQN / 8, false>(s, q_row, n0, sstat, q_row - m0, p.seq, p.scale_log2);
      wgmma_wait<0>();
      fence_acc(dp);
      wg_ds<kWgQN / 8, false>(s, dp, q_row, n0, sstat + kWgQM, q_row - m0);
      uint32_t da[kWgQN / 16][4];
#pragma unroll
      for (int kk = 0; kk < kWgQN / 16; ++kk) pack_a(da[kk], dp, kk);
      wgmma_fence();
      wgmma_rs(dq, da, tk);
      wgmma_wait<0>();
      fence_frag(da);
      fence_acc(dq);
    }
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
  }

  store_dq(p, dq, lane, q_row, tb, h);
}

void check_aligned(const char* who, const char* name, const void* ptr) {
  FM_CHECK_ARG(ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 16 == 0, who, ": ", name,
               " must be a 16-byte aligned device pointer (got ", ptr, ")");
}

// The workspace: D [H, T], then the per-head dk_pe [H, T, 64], 16-byte aligned (its float2
// stores need 8: T x H may be odd).
size_t dsum_floats(MlaAttentionShape shape) {
  return (static_cast<size_t>(shape.tokens() * shape.heads) + 3) / 4 * 4;
}

Params make_params(MlaAttentionShape shape, float scale) {
  Params p{};
  p.seq = static_cast<int>(shape.seq);
  p.heads = static_cast<int>(shape.heads);
  p.tokens = static_cast<int>(shape.tokens());
  p.scale = scale;
  p.scale_log2 = scale * kLog2e;
  return p;
}

}  // namespace

void mla_attention_forward(const bf16* q, const bf16* kv, const bf16* k_pe, MlaAttentionShape shape,
                           float scale, bf16* out, float* lse, cudaStream_t stream) {
  mla_attention_forward(q, kv, k_pe, shape, scale, out, lse, stream,
                        MlaForwardImpl::kWgmmaPingPong);
}

void mla_attention_forward(const bf16* q, const bf16* kv, const bf16* k_pe, MlaAttentionShape shape,
                           float scale, bf16* out, float* lse, cudaStream_t stream,
                           MlaForwardImpl impl) {
  constexpr const char* kWho = "mla_attention_forward";
  mla_attention_check_shape(kWho, shape);
  FM_CHECK_ARG(shape.heads <= 65535 && shape.batch <= 65535, kWho, ": heads=", shape.heads,
               ", batch=", shape.batch, " must be <= 65535 (grid dimensions)");
  check_aligned(kWho, "q", q);
  check_aligned(kWho, "kv", kv);
  check_aligned(kWho, "k_pe", k_pe);
  check_aligned(kWho, "out", out);
  FM_CHECK_ARG(lse != nullptr, kWho, ": lse is null");
  FM_CHECK_ARG(impl == MlaForwardImpl::kMmaSync || impl == MlaForwardImpl::kWgmma ||
                   impl == MlaForwardImpl::kWgmmaPingPong,
               kWho, ": unknown impl ", static_cast<int>(impl));
  if (impl != MlaForwardImpl::kMmaSync) {  // s21-af: sm90_mla_attention_fwd_wgmma.cu
    detail::mla_attention_forward_wgmma(q, kv, k_pe, shape, scale, out, lse,
                                        impl == MlaForwardImpl::kWgmmaPingPong, stream);
    return;
  }
  Params p = make_params(shape, scale);
  p.q = q;
  p.kv = kv;
  p.kpe = k_pe;
  p.o = out;
  p.lse = lse;
  // NOTE: set on every call: the attribute belongs to the current device.
  FM_CHECK_CUDA(
      cudaFuncSetAttribute(mla_fwd_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kFwdSmem));
  const dim3 grid(static_cast<unsigned>(shape.heads),
                  static_cast<unsigned>((shape.seq + kFwdM - 1) / kFwdM),
                  static_cast<unsigned>(shape.batch));
  mla_fwd_kernel<<<grid, kFwdThreads, kFwdSmem, stream>>>(p);
  FM_CHECK_LAUNCH();
}

size_t mla_attention_backward_workspace_bytes(MlaAttentionShape shape) {
  mla_attention_check_shape("mla_attention_backward_workspace_bytes", shape);
  const size_t rows = static_cast<size_t>(shape.tokens() * shape.heads);
  return (dsum_floats(shape) + rows * kDr) * sizeof(float);
}

void mla_attention_backward(const bf16* q, const bf16* kv, const bf16* k_pe, const bf16* out,
                            const bf16* dout, const float* lse, MlaAttentionShape shape,
                            float scale, bf16* dq, bf16* dkv, float* dk_pe, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream) {
  mla_attention_backward(q, kv, k_pe, out, dout, lse, shape, scale, dq, dkv, dk_pe, workspace,
                         workspace_bytes, stream, MlaBackwardImpl::kWgmma);
}

void mla_attention_backward(const bf16* q, const bf16* kv, const bf16* k_pe, const bf16* out,
                            const bf16* dout, const float* lse, MlaAttentionShape shape,
                            float scale, bf16* dq, bf16* dkv, float* dk_pe, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream, MlaBackwardImpl impl) {
  constexpr const char* kWho = "mla_attention_backward";
  mla_attention_check_shape(kWho, shape);
  FM_CHECK_ARG(shape.heads <= 65535 && shape.batch <= 65535, kWho, ": heads=", shape.heads,
               ", batch=", shape.batch, " must be <= 65535 (grid dimensions)");
  for (const auto& [name, ptr] : {std::pair<const char*, const void*>{"q", q},
                                  {"kv", kv},
                                  {"k_pe", k_pe},
                                  {"out", out},
                                  {"dout", dout},
                                  {"lse", lse},
                                  {"dq", dq},
                                  {"dkv", dkv},
                                  {"dk_pe", dk_pe},
                                  {"workspace", workspace}})
    check_aligned(kWho, name, ptr);
  const size_t need = mla_attention_backward_workspace_bytes(shape);
  FM_CHECK_ARG(workspace_bytes >= need, kWho, ": workspace of ", workspace_bytes, " bytes < ", need,
               " needed for batch=", shape.batch, " seq=", shape.seq, " heads=", shape.heads);
  Params p = make_params(shape, scale);
  p.q = q;
  p.kv = kv;
  p.kpe = k_pe;
  p.out = out;
  p.dout = dout;
  p.lse_in = lse;
  p.dq = dq;
  p.dkv = dkv;
  p.dk_pe = dk_pe;
  p.dsum = static_cast<float*>(workspace);
  p.dkpe_part = p.dsum + dsum_floats(shape);
  const bool wgmma = impl == MlaBackwardImpl::kWgmma;
  FM_CHECK_ARG(wgmma || impl == MlaBackwardImpl::kMmaSync, kWho, ": unknown impl ",
               static_cast<int>(impl));
  if (wgmma) {
    FM_CHECK_CUDA(cudaFuncSetAttribute(mla_bwd_dkdv_wgmma_kernel,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, kWgKvSmem));
    FM_CHECK_CUDA(cudaFuncSetAttribute(mla_bwd_dq_wgmma_kernel,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, kWgQSmem));
  } else {
    FM_CHECK_CUDA(cudaFuncSetAttribute(mla_bwd_dkdv_kernel,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, kKvSmem));
    FM_CHECK_CUDA(cudaFuncSetAttribute(mla_bwd_dq_kernel,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, kQSmem));
  }
  const int64_t rows = shape.tokens() * shape.heads;
  mla_bwd_dsum_kernel<<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(p);
  FM_CHECK_LAUNCH();
  const int kv_block = wgmma ? kWgKvN : kKvN, q_block = wgmma ? kWgQM : kQM;
  const dim3 grid_kv(static_cast<unsigned>(shape.heads),
                     static_cast<unsigned>((shape.seq + kv_block - 1) / kv_block),
                     static_cast<unsigned>(shape.batch));
  if (wgmma)
    mla_bwd_dkdv_wgmma_kernel<<<grid_kv, kWgThreads, kWgKvSmem, stream>>>(p);
  else
    mla_bwd_dkdv_kernel<<<grid_kv, kKvThreads, kKvSmem, stream>>>(p);
  FM_CHECK_LAUNCH();
  const dim3 grid_q(static_cast<unsigned>(shape.heads),
                    static_cast<unsigned>((shape.seq + q_block - 1) / q_block),
                    static_cast<unsigned>(shape.batch));
  if (wgmma)
    mla_bwd_dq_wgmma_kernel<<<grid_q, kWgThreads, kWgQSmem, stream>>>(p);
  else
    mla_bwd_dq_kernel<<<grid_q, kQThreads, kQSmem, stream>>>(p);
  FM_CHECK_LAUNCH();
  const int64_t n = shape.tokens() * kDr;
  mla_bwd_kpe_sum_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(p);
  FM_CHECK_LAUNCH();
}

}  // namespace fp8moe::kernels
