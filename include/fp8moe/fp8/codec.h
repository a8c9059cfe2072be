// Conversions float <-> E4M3 / E5M2 / BF16 / UE8M0, header-only and usable in CUDA device code
// (the GPU kernels use these same functions where the hardware has no conversion instruction,
// so CPU and GPU agree bit for bit).
//
// Rounding is always round-to-nearest-even. On overflow the caller chooses:
//   Overflow::kSaturate  clamp to the largest finite value (what training uses; the same as
//                        PTX cvt.rn.satfinite), infinities included; NaN stays NaN.
//   Overflow::kNonFinite NaN for E4M3 (it has no infinity), infinity for E5M2 and BF16.
// A value overflows when it rounds past the largest finite value: for E4M3 anything above 464
// (the midpoint 464 itself rounds to even, 448); for E5M2 anything at or above 61440 (the tie
// rounds to the even neighbour, which is 2^16, an overflow).
#pragma once

#include <cmath>
#include <cstdint>

#include "fp8moe/core/dtypes.h"

namespace fp8moe {

enum class Overflow { kSaturate, kNonFinite };

namespace detail {

// Round-to-nearest-even of a non-negative float to an integer (exact for the small ranges used).
FM_HD_INLINE uint32_t round_half_even_to_uint(float x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__float2int_rn(x));
#else
  return static_cast<uint32_t>(std::nearbyint(x));  // default rounding mode is to-nearest-even
#endif
}

// Generic minifloat encoder for formats with kExpBits / kManBits, bias 2^(kExpBits-1)-1.
// max_code is the largest finite magnitude code; overflow_code what overflow produces in
// kNonFinite mode. Works on |x|; the sign is put back by the caller.
template <int kExpBits, int kManBits>
FM_HD_INLINE uint32_t encode_magnitude(float ax, uint32_t max_code, uint32_t overflow_code,
                                       Overflow mode) {
  constexpr int kBias = (1 << (kExpBits - 1)) - 1;
  constexpr int kShift = 23 - kManBits;
  const uint32_t u = float_to_bits(ax);
  const int exp_f = static_cast<int>(u >> 23);  // biased float exponent (ax >= 0)
  uint32_t code;
  if (exp_f - 127 < 1 - kBias) {
    // Subnormal range of the target: the code is |x| / 2^(1-bias-man) rounded to an integer;
    // rounding up to 2^man lands exactly on the smallest normal code.
    const float step_inv = static_cast<float>(1u << (kBias - 1 + kManBits));
    code = round_half_even_to_uint(ax * step_inv);
  } else {
    const uint32_t man = u & 0x7FFFFFu;
    code = (static_cast<uint32_t>(exp_f - 127 + kBias) << kManBits) | (man >> kShift);
    const uint32_t rem = man & ((1u << kShift) - 1u);
    const uint32_t half = 1u << (kShift - 1);
    if (rem > half || (rem == half && (code & 1u))) ++code;  // carries into the exponent
  }
  if (code > max_code) code = (mode == Overflow::kSaturate) ? max_code : overflow_code;
  return code;
}

}  // namespace detail

// ---- E4M3 ("fn": no infinities) ----
FM_HD_INLINE uint8_t float_to_e4m3_bits(float x, Overflow mode = Overflow::kSaturate) {
  const uint32_t u = float_to_bits(x);
  const uint32_t sign = (u >> 24) & 0x80u;
  const float ax = bits_to_float(u & 0x7FFFFFFFu);
  if (ax != ax) return static_cast<uint8_t>(sign | 0x7Fu);
  if ((u & 0x7FFFFFFFu) >= 0x43E80000u) {  // >= 464 (also catches infinity) before rounding
    if (mode == Overflow::kSaturate || (u & 0x7FFFFFFFu) == 0x43E80000u)
      return static_cast<uint8_t>(sign | 0x7Eu);  // 464 itself ties to 448 (even)
    return static_cast<uint8_t>(sign | 0x7Fu);
  }
  return static_cast<uint8_t>(sign | detail::encode_magnitude<4, 3>(ax, 0x7Eu, 0x7Fu, mode));
}

// The same as float_to_e4m3_bits(x, Overflow::kSaturate) for every FINITE x (checked on every
// finite float), written without branches so that quantisation loops vectorise. The normal range
// rounds the float's mantissa to 3 bits (ties to even, carrying into the exponent); the
// subnormal range lets the FPU round |x| * 2^9 to an integer by adding 2^23.
FM_HD_INLINE uint8_t float_to_e4m3_bits_finite_sat(float x) {
  const uint32_t u = float_to_bits(x);
  const uint32_t sign = (u >> 24) & 0x80u;
  const uint32_t a = u & 0x7FFFFFFFu;
  const uint32_t normal = ((a + 0x7FFFFu + ((a >> 20) & 1u)) >> 20) - ((127u - 7u) << 3);
  const uint32_t subnormal = float_to_bits(bits_to_float(a) * 512.0f + 8388608.0f) - 0x4B000000u;
  uint32_t code = a < 0x3C800000u ? subnormal : normal;  // 0x3C800000 = 2^-6, the smallest normal
  code = code > 0x7Eu ? 0x7Eu : code;
  return static_cast<uint8_t>(sign | code);
}

FM_HD_INLINE float e4m3_bits_to_float(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t exp = (b >> 3) & 0xFu;
  const uint32_t man = b & 0x7u;
  if (exp == 0xFu && man == 0x7u) return bits_to_float(sign | 0x7FC00000u);
  if (exp == 0) {
    // subnormal: man * 2^-9, exactly representable as a float
    const float mag = static_cast<float>(man) * (1.0f / 512.0f);
    return bits_to_float(sign | float_to_bits(mag));
  }
  return bits_to_float(sign | ((exp - 7 + 127) << 23) | (man << 20));
}

// ---- E5M2 (IEEE-like: infinities and NaNs) ----
FM_HD_INLINE uint8_t float_to_e5m2_bits(float x, Overflow mode = Overflow::kSaturate) {
  const uint32_t u = float_to_bits(x);
  const uint32_t sign = (u >> 24) & 0x80u;
  const uint32_t au = u & 0x7FFFFFFFu;
  if (au > 0x7F800000u) return static_cast<uint8_t>(sign | 0x7Fu);
  if (au == 0x7F800000u)
    return static_cast<uint8_t>(sign | (mode == Overflow::kSaturate ? 0x7Bu : 0x7Cu));
  return static_cast<uint8_t>(
      sign | detail::encode_magnitude<5, 2>(bits_to_float(au), 0x7Bu, 0x7Cu, mode));
}

FM_HD_INLINE float e5m2_bits_to_float(uint8_t b) {
  // E5M2 is the upper byte of an IEEE half: widen through the half layout by hand.
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t exp = (b >> 2) & 0x1Fu;
  const uint32_t man = b & 0x3u;
  if (exp == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (man << 21));  // inf or NaN
  if (exp == 0) {
    const float mag = static_cast<float>(man) * (1.0f / 65536.0f);
    return bits_to_float(sign | float_to_bits(mag));
  }
  return bits_to_float(sign | ((exp - 15 + 127) << 23) | (man << 21));
}

// ---- BF16 ----
FM_HD_INLINE uint16_t float_to_bf16_bits(float x, Overflow mode = Overflow::kNonFinite) {
  const uint32_t u = float_to_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  if (mode == Overflow::kSaturate && (rounded & 0x7FFFu) == 0x7F80u)
    return static_cast<uint16_t>((rounded & 0x8000u) | 0x7F7Fu);
  return static_cast<uint16_t>(rounded);
}
FM_HD_INLINE float bf16_bits_to_float(uint16_t b) {
  return bits_to_float(static_cast<uint32_t>(b) << 16);
}

// ---- UE8M0 power-of-two scales ----
// Smallest power of two >= x (x > 0, finite), as a UE8M0 code. Used for power-of-two scales:
// rounding the scale up means amax / scale never exceeds the format's maximum.
FM_HD_INLINE uint8_t float_to_ue8m0_ceil(float x) {
  const uint32_t u = float_to_bits(x);
  if (x != x || x <= 0.0f) return 0xFFu;
  uint32_t exp = u >> 23;
  const uint32_t man = u & 0x7FFFFFu;
  if (exp == 0) return (u <= 0x00400000u) ? 0 : 1;  // float subnormal: 2^-127 or 2^-126
  if (man != 0) ++exp;
  return exp >= 255 ? 0xFEu : static_cast<uint8_t>(exp);
}
FM_HD_INLINE float ue8m0_to_float(uint8_t b) {
  if (b == 0xFFu) return bits_to_float(0x7FC00000u);
  if (b == 0) return bits_to_float(0x00400000u);  // 2^-127 is a float subnormal
  return bits_to_float(static_cast<uint32_t>(b) << 23);
}
// Round a positive scale up to a power of two (as a float).
FM_HD_INLINE float round_up_pow2(float x) {
  return ue8m0_to_float(float_to_ue8m0_ceil(x));
}

// Typed conveniences.
FM_HD_INLINE e4m3 to_e4m3(float x, Overflow mode = Overflow::kSaturate) {
  return e4m3{float_to_e4m3_bits(x, mode)};
}
FM_HD_INLINE e5m2 to_e5m2(float x, Overflow mode = Overflow::kSaturate) {
  return e5m2{float_to_e5m2_bits(x, mode)};
}
FM_HD_INLINE bf16 to_bf16(float x) {
  return bf16{float_to_bf16_bits(x)};
}
FM_HD_INLINE float to_float(e4m3 v) {
  return e4m3_bits_to_float(v.bits);
}
FM_HD_INLINE float to_float(e5m2 v) {
  return e5m2_bits_to_float(v.bits);
}
FM_HD_INLINE float to_float(bf16 v) {
  return bf16_bits_to_float(v.bits);
}
FM_HD_INLINE float to_float(ue8m0 v) {
  return ue8m0_to_float(v.bits);
}

// Round a float through BF16 and back (the value a BF16 tensor would hold).
FM_HD_INLINE float round_to_bf16(float x) {
  return bf16_bits_to_float(float_to_bf16_bits(x));
}

}  // namespace fp8moe
