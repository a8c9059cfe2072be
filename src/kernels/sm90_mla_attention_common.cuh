// Internal: what the MLA attention kernels of sm90_mla_attention.cu (mma.sync forward and backward,
// wgmma backward) and sm90_mla_attention_fwd_wgmma.cu (wgmma forward) share: MLA's head widths,
// the quad reductions of the m16n8 accumulator layout, the forward's online softmax and epilogue,
// the wgmma shared-memory descriptors (128-byte swizzle) and register fences.
// Tested through their kernels: test_kernels_gpu --gtest_filter='MlaAttentionGpu*'
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "bf16_vector.cuh"
#include "fp8moe/core/dtypes.h"
#include "sm90_ptx.cuh"
#include "sm90_wgmma_bf16.cuh"

namespace fp8moe::kernels::mla {

constexpr int kDn = 128, kDr = 64, kDv = 128, kDq = 192, kDkv = 256;
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

// ---- accumulators in the m16n8 C layout: a thread holds rows lane / 4 and lane / 4 + 8 ----
template <int kN>
__device__ __forceinline__ void zero(float (&acc)[kN][4]) {
#pragma unroll
  for (int j = 0; j < kN; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
}

// Max / sum over the 4 lanes that share a row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xFFFFFFFFu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xFFFFFFFFu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xFFFFFFFFu, x, 1);
  return x + __shfl_xor_sync(0xFFFFFFFFu, x, 2);
}

// The A fragment of k-step kk (16 columns) of a warp's FP32 accumulator rows, rounded to BF16
// (the C layout of two n-tiles is the A layout of one k-step).
template <int kN>
__device__ __forceinline__ void pack_a(uint32_t (&a)[4], const float (&p)[kN][4], int kk) {
  a[0] = pack_bf16x2(p[2 * kk][0], p[2 * kk][1]);
  a[1] = pack_bf16x2(p[2 * kk][2], p[2 * kk][3]);
  a[2] = pack_bf16x2(p[2 * kk + 1][0], p[2 * kk + 1][1]);
  a[3] = pack_bf16x2(p[2 * kk + 1][2], p[2 * kk + 1][3]);
}

// ---- shared-memory tiles and loads ----
// The wgmma kernels' tiles (and sm90_mla_decode.cu's): panels of 64 columns (128-byte rows,
// 128-byte swizzle: chunk c of row r at c ^ (r & 7)); byte offset of 16-byte chunk `chunk` (over
// the whole row) of row `row` in a panel tile of kRows.
template <int kRows>
__device__ __forceinline__ uint32_t panel_off(int row, int chunk) {
  static_assert(kRows % 8 == 0, "a panel is whole 8-row swizzle atoms");
  return static_cast<uint32_t>((chunk / 8) * kRows * 128 + row * 128 +
                               ((chunk % 8) ^ (row & 7)) * 16);
}

// 4 8x8 BF16 matrices from shared memory (ldmatrix): the mma.sync A / B fragment loads.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// ---- forward: online softmax over key blocks, in log2 units ----
// Scores of a key block (the warp's 16 query rows q_row + {0, 8} x 8 kNt keys from n0) to log2
// units; where `edge` (the block reaches the diagonal or the sequence end), keys after the query
// or past the sequence get -inf. NOTE: `lane` is the caller's (threadIdx.x % 32): recomputed
// here, mla_fwd_kernel's machine code changed.
template <int kNt>
__device__ __forceinline__ void scale_and_mask(float (&s)[kNt][4], int lane, int q_row, int n0,
                                               bool edge, int seq, float scale_log2) {
#pragma unroll
  for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = n0 + nt * 8 + (lane % 4) * 2 + (e & 1), row = q_row + (e >> 1) * 8;
      s[nt][e] *= scale_log2;
      if (edge && (key > row || key >= seq)) s[nt][e] = -INFINITY;
    }
}

// Row r (q_row + 8 r) of a block: the new running max, P = exp2(s - max) in place, row_sum
// rescaled and the block's P added; alpha = exp2(old max - new max), O's rescale. NOTE: alpha
// is an out-parameter: returned, its exp2 moved in the wgmma forward's machine code.
template <int kNt>
__device__ __forceinline__ void softmax_row(float (&s)[kNt][4], int r, float& row_max,
                                            float& row_sum, float& alpha) {
  float mx = row_max;
#pragma unroll
  for (int nt = 0; nt < kNt; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
  mx = quad_max(mx);
  // NOTE: a row with every key so far masked keeps -inf; exp2 must not see -inf - -inf.
  const float base = mx == -INFINITY ? 0.0f : mx;
  alpha = exp2f(row_max - base);
  row_max = mx;
  float sum = 0.0f;
#pragma unroll
  for (int nt = 0; nt < kNt; ++nt) {
    s[nt][2 * r] = exp2f(s[nt][2 * r] - base);
    s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - base);
    sum += s[nt][2 * r] + s[nt][2 * r + 1];
  }
  row_sum = row_sum * alpha + sum;
}

// Epilogue: O / l to BF16 (out [T, H, 128]), lse = ln 2 * (max + log2 l) ([H, T]); rows past the
// sequence are skipped. Params: either kernel's (o, lse, seq, heads, tokens); lane as above.
template <class Params>
__device__ __forceinline__ void store_out_lse(const Params& p, const float (&o)[kDv / 8][4],
                                              const float (&row_max)[2], const float (&row_sum)[2],
                                              int lane, int q_row, int b, int h) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = q_row + r * 8;
    const float l = quad_sum(row_sum[r]);
    if (row >= p.seq) continue;
    const float inv = 1.0f / l;
    const int64_t t = static_cast<int64_t>(b) * p.seq + row;
    bf16* dst = p.o + (t * p.heads + h) * kDv + (lane % 4) * 2;
#pragma unroll
    for (int dt = 0; dt < kDv / 8; ++dt)
      *reinterpret_cast<uint32_t*>(dst + dt * 8) =
          pack_bf16x2(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    if (lane % 4 == 0)
      p.lse[static_cast<int64_t>(h) * p.tokens + t] = (row_max[r] + log2f(l)) * kLn2;
  }
}

// ---- wgmma operands ----
// Shared-memory descriptor, 128-byte swizzle (PTX ISA "matrix descriptor"): start address,
// leading byte offset (N-major: the stride between 64-column panels; K-major: unused), stride
// byte offset (the stride between 8-row groups: 1024 in a panel).
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr, uint32_t lbo) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | static_cast<uint64_t>(lbo >> 4) << 16 |
         static_cast<uint64_t>(1024 >> 4) << 32 | static_cast<uint64_t>(1) << 62;
}
// K-major operand: rows [row0, row0 + 64 or N) of a panel tile of kRows, k-step kk (columns
// 16 kk .. 16 kk + 15: panel kk / 4, 32 bytes a step inside the 128-byte row).
template <int kRows>
__device__ __forceinline__ uint64_t desc_k(uint32_t tile, int row0, int kk) {
  return desc_sw128(tile + (kk / 4) * kRows * 128 + row0 * 128 + (kk % 4) * 32, 16);
}
// N-major B operand: the tile's rows 16 kk .. 16 kk + 15 are the k index, its columns the n index
// (64 a panel, panels kRows * 128 bytes apart).
template <int kRows>
__device__ __forceinline__ uint64_t desc_n(uint32_t tile, int kk) {
  return desc_sw128(tile + kk * 16 * 128, kRows * 128);
}

// acc (m64 x 8 kNt) = A B^T, kK k-steps, one commit group: A = rows [row0, row0 + 64) of a
// K-major panel tile of kRowsA rows, B = a K-major panel tile of 8 kNt rows (both in shared
// memory). The caller fences (wgmma_fence) before the first group that reads new registers.
template <int kRowsA, int kK, int kNt>
__device__ __forceinline__ void wgmma_ss(float (&acc)[kNt][4], uint32_t tile_a, int row0,
                                         uint32_t tile_b) {
#pragma unroll
  for (int kk = 0; kk < kK; ++kk)
    sm90::WgmmaBf16Ss<kNt * 8>::mma(acc, desc_k<kRowsA>(tile_a, row0, kk),
                                    desc_k<kNt * 8>(tile_b, 0, kk), kk > 0);
  sm90::wgmma_commit();
}
// acc (m64 x 8 kNt) += A B, kK k-steps, one commit group: A from registers (BF16 A fragments,
// e.g. pack_a's), B = an N-major panel tile of 16 kK rows (the k index) in shared memory.
template <int kK, int kNt>
__device__ __forceinline__ void wgmma_rs(float (&acc)[kNt][4], const uint32_t (&a)[kK][4],
                                         uint32_t tile_b) {
#pragma unroll
  for (int kk = 0; kk < kK; ++kk)
    sm90::WgmmaBf16RsT<kNt * 8>::mma(acc, a[kk], desc_n<kK * 16>(tile_b, kk), true);
  sm90::wgmma_commit();
}

// Register fences around the asynchronous MMAs: accumulators, and A fragments from registers.
template <int kN>
__device__ __forceinline__ void fence_acc(float (&acc)[kN][4]) {
#pragma unroll
  for (int j = 0; j < kN; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) sm90::fence_operand(acc[j][e]);
}
template <int kK>
__device__ __forceinline__ void fence_frag(uint32_t (&a)[kK][4]) {
#pragma unroll
  for (int j = 0; j < kK; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[j][e])::"memory");
}

}  // namespace fp8moe::kernels::mla
