// The IEEE quotient x / s (round to nearest even) without a division per element: the FP8
// quantisers divide every value of a 1x128 block by the block's one scale s, so the block computes
// a Divisor once (a power of two p with s p in [1, 2), and y = RN(1 / (s p))) and each quotient
// takes two multiplies, two FMAs and a sign copy:
//   X = x p (exact),  q0 = RN(X y),  e = RN(q0 (s p) - X) (exact),  q = RN(q0 - e y).
// This is Markstein's correction (q0 is within an ulp of X / (s p) = x / s, the remainder is
// representable, and the FMA rounds q0 + (X - q0 s p) y once). NOTE: without p the remainder
// underflows (is not exact) whenever |x| < ~2^-102, which a block of scale ~FLT_MIN meets with
// quotients up to 448: q would then differ from x / s by an ulp, enough to flip an E4M3 code at a
// tie. With p, q equals x / s bit for bit whenever |x / s| >= 2^-100; below, q may differ in its
// last bits but keeps x's sign, so the E4M3 code (+-0 for anything under 2^-10) is the same.
// Checked against x / s on every BF16 x, tens of millions of FP32 x and thousands of scales by
// tests/fp8/exact_quotient_test.cpp (docs/kernels/quantize.md, "Exact quotient without
// division").
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "fp8moe/core/host_device.h"

namespace fp8moe {

// A quantiser block's scale s, prepared for exact_quotient.
struct Divisor {
  float p;        // 2^(127 - exponent(s)), so s p is in [1, 2); = 1 / s exactly when s is 2^k
  float s_p;      // s p, exact
  float inv_s_p;  // RN(1 / (s p))
};

namespace detail {
FM_HD_INLINE float reciprocal_rn(float s) {
#if defined(__CUDA_ARCH__)
  return __frcp_rn(s);
#else
  return 1.0f / s;
#endif
}
FM_HD_INLINE uint32_t float_bits_of(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
FM_HD_INLINE float float_of_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
FM_HD_INLINE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FM_HD_INLINE float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
// q's magnitude with x's sign.
FM_HD_INLINE float with_sign_of(float q, float x) {
  return float_of_bits((float_bits_of(q) & 0x7FFFFFFFu) | (float_bits_of(x) & 0x80000000u));
}
}  // namespace detail

// The Divisor of a scale s: s in [FLT_MIN, FLT_MAX / 448] (the scales fp8_scale_for_amax gives for
// a finite amax), or s = +inf for exact_quotient_any.
FM_HD_INLINE Divisor make_divisor(float s) {
  uint32_t e = (detail::float_bits_of(s) >> 23) & 0xFFu;
  e = e == 0xFFu ? 127u : e;  // s = inf: p = 1 (x p stays finite, s p = inf, y = 0)
  const float p = detail::float_of_bits((254u - e) << 23);
  const float s_p = detail::mul_rn(s, p);
  return Divisor{p, s_p, detail::reciprocal_rn(s_p)};
}

// make_divisor(448) (kE4M3Max) as a constant: amax / 448, the scale of every quantiser's block.
// NOTE: exact_quotient_any(amax, e4m3_max_divisor()) is amax / 448 bit for bit for every amax >= 0
// (+inf included) whose quotient is >= 2^-100 (checked on every positive float once, and in the
// CPU test on a sample): nothing overflows (amax 2^-8, q0 and q stay finite), and smaller
// quotients are floored at FLT_MIN by the scale formula anyway.
FM_HD_INLINE constexpr Divisor e4m3_max_divisor() {
  return Divisor{0x1p-8f, 1.75f, 0x1.24924ap-1f};
}

// RN(x / s) for a quantiser's operands: d = make_divisor(s), s in [FLT_MIN, FLT_MAX / 448], x
// finite with |x| <= 448 s (1 + 2^-22) (a value of the block whose amax gave s). Bit for bit x / s
// when |x / s| >= 2^-100; below, x's sign and a magnitude under 2^-99 (E4M3 code +-0 either way).
FM_HD_INLINE float exact_quotient(float x, const Divisor& d) {
  const float xp = detail::mul_rn(x, d.p);
  const float q0 = detail::mul_rn(xp, d.inv_s_p);
  const float e = detail::fma_rn(q0, d.s_p, -xp);
  return detail::with_sign_of(detail::fma_rn(-e, d.inv_s_p, q0), x);
}

// exact_quotient, also equal to x / s (NaN for NaN) when x is +-inf or NaN or s = +inf (the scale
// of a block holding an infinity): there the remainder is not finite, and q0 is already x / s
// (+-inf, NaN, or +-0 for finite x and s = inf). One compare and select more.
FM_HD_INLINE float exact_quotient_any(float x, const Divisor& d) {
  const float xp = detail::mul_rn(x, d.p);
  const float q0 = detail::mul_rn(xp, d.inv_s_p);
  const float e = detail::fma_rn(q0, d.s_p, -xp);
  const float q = detail::with_sign_of(detail::fma_rn(-e, d.inv_s_p, q0), x);
#if defined(__CUDA_ARCH__)
  return fabsf(e) <= FLT_MAX ? q : q0;
#else
  return std::fabs(e) <= FLT_MAX ? q : q0;
#endif
}

}  // namespace fp8moe
