// RMSNorm on the GPU, forward and backward, BF16 activations with the FP32 norm weight, and a
// forward fused with the 1x128 FP8 quantisation the next GEMM reads (every RMSNorm of the
// V3-architecture model feeds an FP8 GEMM: attention's q_a / kv_a projections, the FFN's up
// projection, the head). Meaning: model/ops.h's rmsnorm_forward / rmsnorm_backward; those sum in
// double, these in FP32 in a FIXED order (below), so the GPU is bit-reproducible run to run and
// equal bit for bit to the CPU references here, which follow that order operation for operation.
//
// Weight: FP32, the master weight itself. The model's norm weights are FP32 Parameters (no weight
// decay, [dim] each: 28 KB at dim 7168, read from L1/L2 by every row), so reading the master costs
// nothing measurable and the forward uses exactly the weight the optimizer wrote: a BF16 copy
// would add a rounding of w that the CPU model does not have, and an extra copy to keep in sync.
//
// Arithmetic, FP32 with IEEE round-to-nearest operations, no FMA contraction:
//   row sums (ss of the forward, dot of the backward): thread t of the row's block (RmsNormPlan::
//     threads threads, t = 0..threads-1) owns the 8-element vectors v = t + k * threads, k = 0..3,
//     v < dim / 8; it adds its terms in order of k then element (acc = acc + term, acc from 0);
//     each warp combines its 32 lanes by a butterfly (s = s + shfl_xor(s, o), o = 16, 8, 4, 2, 1);
//     the row sum is ((0 + warp_0) + warp_1) + ... in warp order.
//   forward:  ss of x*x; rstd = 1 / sqrt(ss / dim + float(eps)); y = bf16((x * rstd) * w).
//   fused:    codes and scales of y's BF16 values exactly as kernels::quantize_1x128 of y gives
//             them (scale = amax / 448 floored at FLT_MIN, 1 for a zero tile, power of two with
//             pow2_scales; e4m3(y / scale) RN, saturating): fused == forward + quantize_1x128.
//   backward: dot of (dy * w) * x; coef = (((dot * rstd) * rstd) * rstd) / dim;
//             dx = bf16((rstd * dy) * w - coef * x);
//             dw: rows are cut into RmsNormPlan::chunks chunks of chunk_rows consecutive rows;
//             stage 1 writes partial[p][c] = sum over the chunk's rows in order of
//             (dy * x) * rstd (acc from 0) into the workspace; stage 2 sums, per column, the
//             partials of kDwGroups consecutive groups (group j: chunks [j * G, (j + 1) * G),
//             G = ceil(chunks / kDwGroups)) each in order, then the group sums in order j = 0..;
//             dw[c] = accumulate ? dw[c] + total : total. No atomics: bit-reproducible.
// Non-finite inputs follow IEEE: a NaN or inf in a row of x makes that row's y, rstd (and in the
// backward dx and every dw column it meets) NaN or inf; the fused form can also count them into
// a NonFiniteReport (quantize.h; positions of x), its codes for such rows are then meaningless.
// Shapes: dim a positive multiple of 8 up to 16384 (the fused form: a multiple of 128); rows >= 0
// up to 2^31 - 1; leading dimensions >= dim and multiples of 8; x, dy, y, dx and w 16-byte
// aligned, codes 8-byte aligned. Other shapes are thrown (kInvalidArgument) before any launch.
// Device pointers; stream-ordered, allocation-free, CUDA-graph capturable.
// Run the tests: test_kernels_gpu --gtest_filter='RmsNormGpu*'; test_kernels
// --gtest_filter='RmsNorm*'
#pragma once

#include "fp8moe/core/cuda_stream.h"

#include <cstdint>

#include "fp8moe/core/dtypes.h"
#include "fp8moe/kernels/quantize.h"

namespace fp8moe::kernels {

// The launch shape that fixes the summation order (a function of rows and dim only, never of the
// GPU, so every H100 or H200 gives the same bits).
struct RmsNormPlan {
  static constexpr int kVecPerThread = 4;  // 8-element vectors a thread owns in a row
  static constexpr int kDwChunksTarget = 512;
  static constexpr int kDwGroups = 8;
  int threads = 0;           // threads of a row's block: ceil(dim / 8 / 4) rounded up to 32
  int64_t chunk_rows = 0;    // backward: rows per dw chunk, ceil(rows / 512) (>= 1)
  int64_t chunks = 0;        // backward: ceil(rows / chunk_rows)
  int64_t workspace_floats;  // backward: chunks * dim
};
RmsNormPlan rmsnorm_plan(int64_t rows, int64_t dim);

// x [rows, ld_x] BF16 -> y [rows, ld_y] BF16, rstd [rows] FP32 (null: not written).
void rmsnorm_forward(const bf16* x, int64_t ld_x, const float* w, int64_t rows, int64_t dim,
                     double eps, bf16* y, int64_t ld_y, float* rstd, cudaStream_t stream);

// The same, and y quantised 1x128: codes [rows, ld_codes] E4M3, scales in `layout` (kMnMajor:
// [dim / 128][padded_rows(rows)], padding entries 0: what fp8_gemm's A scales want). y null: the
// BF16 y is not written (only the FP8 copy); rstd null: not written.
void rmsnorm_forward_quantize_1x128(const bf16* x, int64_t ld_x, const float* w, int64_t rows,
                                    int64_t dim, double eps, bf16* y, int64_t ld_y, float* rstd,
                                    bool pow2_scales, uint8_t* codes, int64_t ld_codes,
                                    float* scales, ScaleLayout layout, cudaStream_t stream,
                                    NonFiniteReport* nonfinite = nullptr);

// dy, x [rows, ld] BF16, w [dim], rstd [rows] (the forward's) -> dx [rows, ld_dx] BF16 (may alias
// dy when ld_dx == ld_dy: each row is read whole before it is written), dw [dim] FP32 (added to
// when `accumulate`, else overwritten). workspace: rmsnorm_plan(rows, dim).workspace_floats
// floats of device memory (contents on entry ignored).
void rmsnorm_backward(const bf16* dy, int64_t ld_dy, const bf16* x, int64_t ld_x, const float* w,
                      const float* rstd, int64_t rows, int64_t dim, bf16* dx, int64_t ld_dx,
                      float* dw, bool accumulate, float* workspace, cudaStream_t stream);

// CPU references with the GPU's order of operations (host pointers): equal bit for bit.
void rmsnorm_forward_reference(const bf16* x, int64_t ld_x, const float* w, int64_t rows,
                               int64_t dim, double eps, bf16* y, int64_t ld_y, float* rstd);
void rmsnorm_forward_quantize_1x128_reference(const bf16* x, int64_t ld_x, const float* w,
                                              int64_t rows, int64_t dim, double eps, bf16* y,
                                              int64_t ld_y, float* rstd, bool pow2_scales,
                                              uint8_t* codes, int64_t ld_codes, float* scales,
                                              ScaleLayout layout);
void rmsnorm_backward_reference(const bf16* dy, int64_t ld_dy, const bf16* x, int64_t ld_x,
                                const float* w, const float* rstd, int64_t rows, int64_t dim,
                                bf16* dx, int64_t ld_dx, float* dw, bool accumulate);

// The shape checks every entry point makes (thrown as kInvalidArgument, naming the call).
void check_rmsnorm_shape(const char* what, int64_t rows, int64_t dim, bool fused);

}  // namespace fp8moe::kernels
