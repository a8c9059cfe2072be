// Reference FP8 GEMM:  D[M,N] = sum_k (A[m,k] * sa) * (B[n,k] * sb)   (+ D when accumulating)
// A is [M,K] (rows = tokens, K contiguous), B is [N,K] (K contiguous, i.e. D = A * B^T). Scales
// come with the operands (Fp8MatrixRef): A 1x128; B 128x128 for Fprop/Dgrad or 1x128 for the
// weight gradient; per-tensor for comparison. Any granularity pairing is accepted.
//
// The accumulator is emulated (AccumulatorModel) to study what tensor cores do:
//
// * The K axis is cut into promotion windows of `promotion_interval` elements (0 = one window
//   spanning all of K). Inside a window the running sum lives in a LIMITED accumulator; at the
//   end of the window it is added into an FP32 accumulator (an IEEE float add, round to
//   nearest even): that is "promotion to CUDA cores" as the DeepSeek-V3 report describes.
// * Products a*b of two E4M3 values are exact (at most 8 significant bits). The limited
//   accumulator adds `group` products per step (the tensor cores add several products and the
//   running sum in one multi-operand adder) and keeps `mantissa_bits` fraction bits (a float
//   keeps 23). How bits are lost (AccumRounding):
//   - kTruncate (the hardware model): the running sum and the group's products are aligned to
//     the largest exponent e among them; every addend is truncated toward zero to a multiple
//     of 2^(e - mantissa_bits) (the bits shifted out of a fixed-width adder are dropped), the
//     truncated addends are summed exactly, and a carry into a higher exponent truncates the
//     result once more to mantissa_bits. This is how NVIDIA tensor cores were found to add
//     (Fasi, Higham, Mikaitis, Pranesh, "Numerical behavior of NVIDIA tensor cores", 2021).
//     Same-sign inputs lose magnitude at every step (error linear in K); mixed signs lose bits
//     of both signs (error grows like sqrt(K)): shared/ANCHORS.md measured both on an H100.
//   - kTruncateSum: the exact sum of a step is chopped toward zero to mantissa_bits (a simpler
//     model, kept for comparison: it pulls the running sum toward zero whatever the signs and
//     so overstates the error of mixed-sign inputs).
//   - kNearestEven: the exact sum of a step is rounded to nearest, ties to even.
//   Exponent range is unlimited (no overflow or subnormals inside the model).
// * Scales: when a window lies inside one 128-column scale tile of both operands (interval a
//   divisor of 128, the GPU case), the window sums UNSCALED products and promotion computes
//   acc = fmaf(partial, sa*sb, acc) in float, exactly as the GPU kernels' FFMA does. Otherwise
//   (interval 0 or larger than 128 with fine-grained scales) each product is scaled (in double)
//   before it enters the limited accumulator.
// * Fast path: mantissa_bits == 23 with kNearestEven and a window inside one scale tile is
//   computed in plain float arithmetic: each window's products are summed in 8 interleaved
//   lanes (k mod 8), and the lanes pairwise ((0+4)+(2+6))+((1+5)+(3+7)), as a SIMD unit would,
//   then promoted as above. This is the default model (AccumulatorModel{}), used by the CPU
//   training path and as the reference for the GPU kernels. It runs on operands decoded once
//   into zero-padded panels, with a portable or an AVX2 kernel chosen at run time (FastSimd
//   below); every kernel adds in this order and multiplies before adding (the products of two
//   E4M3 values are exact in float), so all give the same bits (tests/fp8).
#pragma once

#include <cstdint>

#include "fp8moe/core/dtypes.h"
#include "fp8moe/fp8/quantize.h"

namespace fp8moe {

enum class AccumRounding { kTruncate, kTruncateSum, kNearestEven };
const char* accum_rounding_name(AccumRounding r);

struct AccumulatorModel {
  int mantissa_bits = 23;  // fraction bits kept by the limited accumulator (1..52)
  AccumRounding rounding = AccumRounding::kNearestEven;
  int promotion_interval = 128;  // K elements per promotion window; 0 = never promote
  int group = 1;                 // products added per accumulator step (1..64)

  // What the report says Hopper's tensor cores keep (~14 bits), truncating.
  static AccumulatorModel hopper_tensor_core(int interval) {
    return AccumulatorModel{14, AccumRounding::kTruncate, interval, 1};
  }
};

// Validate shapes and options; throws kInvalidArgument naming the problem.
void check_gemm_operands(const Fp8MatrixRef& a, const Fp8MatrixRef& b,
                         const AccumulatorModel& model);

// D (FP32, row-major, leading dimension ldd). accumulate = true adds into the existing D (the
// weight-gradient form: D += A * B^T). Multi-threaded over rows when `threads` > 1.
void gemm_fp8_reference(const Fp8MatrixRef& a, const Fp8MatrixRef& b, float* d, int64_t ldd,
                        const AccumulatorModel& model = {}, bool accumulate = false,
                        int threads = 1);

// The same with a BF16 output: D is computed in FP32 and rounded once to BF16.
void gemm_fp8_reference_bf16(const Fp8MatrixRef& a, const Fp8MatrixRef& b, bf16* d, int64_t ldd,
                             const AccumulatorModel& model = {}, int threads = 1);

// The SIMD code that runs the fast model: kGeneric (portable vector code at the baseline ISA) or
// kAvx2 (AVX2 + FMA, picked at run time where the CPU has both). They give the same bits
// (tests/fp8 compares them); the setter exists so that tests and benchmarks can run either. It
// returns false, changing nothing, when this CPU or build cannot run the requested code; do not
// call it while a GEMM is running.
enum class FastSimd { kGeneric, kAvx2 };
const char* fast_simd_name(FastSimd s);
FastSimd gemm_fp8_reference_simd();
bool set_gemm_fp8_reference_simd(FastSimd s);

// Round a double to `bits` fraction bits, toward zero (kTruncate, kTruncateSum) or to nearest.
double round_to_mantissa_bits(double x, int bits, AccumRounding rounding);

// One step of the limited accumulator: acc + p[0] + ... + p[count-1] under the model above.
double accumulate_step(double acc, const double* p, int count, int bits, AccumRounding rounding);

}  // namespace fp8moe
