// Per-lane row arithmetic shared by the EP kernel files (one-stage, low-latency, two-stage): all
// of them must produce the CPU reference's bits, so each operation exists once.
#pragma once

#include <cfloat>
#include <cstdint>

#include "fp8moe/fp8/codec.h"
#include "fp8moe/fp8/exact_quotient.h"

namespace fp8moe::comm::detail {

// acc[0..8) += the 8 BF16 values of v, one rounded add each (no FMA), ascending column.
__device__ __forceinline__ void add_bf16x8(float* acc, const uint4& v) {
  const uint32_t* vw = reinterpret_cast<const uint32_t*>(&v);
#pragma unroll
  for (int x = 0; x < 4; ++x) {
    acc[2 * x] = __fadd_rn(acc[2 * x], __uint_as_float(vw[x] << 16));
    acc[2 * x + 1] = __fadd_rn(acc[2 * x + 1], __uint_as_float(vw[x] & 0xFFFF0000u));
  }
}

// acc[0..8) += w * the 8 BF16 values of v, the product and the add each rounded (no FMA: the
// reference's gate-weighted sums), ascending column.
__device__ __forceinline__ void add_weighted_bf16x8(float* acc, float w, const uint4& v) {
  const uint32_t* vw = reinterpret_cast<const uint32_t*>(&v);
#pragma unroll
  for (int x = 0; x < 4; ++x) {
    acc[2 * x] = __fadd_rn(acc[2 * x], __fmul_rn(w, __uint_as_float(vw[x] << 16)));
    acc[2 * x + 1] = __fadd_rn(acc[2 * x + 1], __fmul_rn(w, __uint_as_float(vw[x] & 0xFFFF0000u)));
  }
}

// 8 floats -> 8 BF16 (round to nearest even), packed as one 16-byte store.
__device__ __forceinline__ uint4 pack_bf16(const float* acc) {
  uint4 o;
  uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
  for (int x = 0; x < 4; ++x)
    ow[x] = static_cast<uint32_t>(float_to_bf16_bits(acc[2 * x])) |
            (static_cast<uint32_t>(float_to_bf16_bits(acc[2 * x + 1])) << 16);
  return o;
}

// FP8 quantisation of 16 BF16 values per lane, 8 lanes sharing one 128-column scale (a lane
// group covers one 1x128 block).
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
  for (int m = 1; m < 8; m <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, m));
  // NOTE: fp8/quantize.h's formula with the IEEE quotient (formed without a division:
  // exact_quotient.h), so codes match the CPU bit for bit; cvt.rn.satfinite is the codec's
  // round-to-nearest-even with saturation.
  scale = amax == 0.0f ? 1.0f : fmaxf(exact_quotient_any(amax, e4m3_max_divisor()), FLT_MIN);
  const Divisor d = make_divisor(scale);
  uint32_t* c = reinterpret_cast<uint32_t*>(&codes);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %2, %1;"
        : "=h"(lo)
        : "f"(exact_quotient_any(f[4 * i], d)), "f"(exact_quotient_any(f[4 * i + 1], d)));
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %2, %1;"
        : "=h"(hi)
        : "f"(exact_quotient_any(f[4 * i + 2], d)), "f"(exact_quotient_any(f[4 * i + 3], d)));
    c[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}

}  // namespace fp8moe::comm::detail
