// Storage types of fp8moe. Each is a plain byte wrapper (no arithmetic): values are converted
// explicitly through the codecs in fp8moe/fp8/codec.h, so that every rounding is visible.
//   e4m3  OCP FP8 E4M3 "fn": bias 7, max 448, no infinities, NaN = 0x7F / 0xFF.
//   e5m2  OCP FP8 E5M2: bias 15, max 57344, infinities 0x7C / 0xFC, NaN 0x7D..0x7F.
//   bf16  bfloat16: the upper half of an IEEE float.
//   ue8m0 unsigned power-of-two scale 2^(bits-127); 0xFF is NaN (as in the OCP MX formats).
#pragma once

#include <bit>
#include <cstdint>

#include "fp8moe/core/host_device.h"

namespace fp8moe {

struct e4m3 {
  uint8_t bits;
};
struct e5m2 {
  uint8_t bits;
};
struct bf16 {
  uint16_t bits;
};
struct ue8m0 {
  uint8_t bits;
};
static_assert(sizeof(e4m3) == 1 && sizeof(e5m2) == 1 && sizeof(bf16) == 2 && sizeof(ue8m0) == 1);

enum class DType { kF32, kF64, kBF16, kE4M3, kE5M2, kUE8M0, kI32, kI64 };

constexpr int dtype_size(DType t) {
  switch (t) {
    case DType::kF64:
    case DType::kI64:
      return 8;
    case DType::kF32:
    case DType::kI32:
      return 4;
    case DType::kBF16:
      return 2;
    default:
      return 1;
  }
}
const char* dtype_name(DType t);

inline constexpr float kE4M3Max = 448.0f;
inline constexpr float kE5M2Max = 57344.0f;

FM_HD_INLINE uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return std::bit_cast<uint32_t>(f);
#endif
}
FM_HD_INLINE float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return std::bit_cast<float>(u);
#endif
}

}  // namespace fp8moe
