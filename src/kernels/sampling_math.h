// The arithmetic that sampling.cu and sampling_reference.cpp share (kernels/sampling.h): every
// rounding is one IEEE round-to-nearest operation, spelled as an intrinsic on the device (nvcc
// never contracts __fadd_rn / __fmul_rn into an fma) and as a plain operator on the host (the
// reference is compiled with -ffp-contract=off), so both sides produce the same bits.
#pragma once

#include <cstdint>

#include "fp8moe/core/dtypes.h"
#include "fp8moe/core/host_device.h"

namespace fp8moe::kernels::sampling {

inline constexpr int kThreads = 512;
inline constexpr int kWarps = kThreads / 32;
inline constexpr int kVec = 8;                         // ids a thread owns in a tile
inline constexpr int kTile = kThreads * kVec;          // 4096 ids
inline constexpr int kSegment = 32 * kVec;             // 256 ids: one warp in one tile
inline constexpr int kSegsPerTile = kTile / kSegment;  // 16
inline constexpr int kDigits = 16;                     // radix 16: 4 passes over 16-bit keys
inline constexpr int64_t kMaxVocab = int64_t{1} << 18;
inline constexpr int kMaxTiles = static_cast<int>(kMaxVocab / kTile);  // 64
inline constexpr int kMaxSegs = kMaxTiles * kSegsPerTile;              // 1024
static_assert(kThreads == 512 && kSegsPerTile == kWarps, "a tile is one segment a warp");

FM_HD_INLINE float fl_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FM_HD_INLINE float fl_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FM_HD_INLINE float fl_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FM_HD_INLINE float fl_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FM_HD_INLINE float fl_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

// The order-preserving key of a BF16 logit's bits (-0 counts as +0).
FM_HD_INLINE uint32_t logit_key(uint32_t bits) {
  if (bits == 0x8000u) bits = 0;
  return (bits & 0x8000u) ? (~bits & 0xFFFFu) : (bits | 0x8000u);
}
FM_HD_INLINE float key_value(uint32_t key) {
  const uint32_t bits = (key & 0x8000u) ? (key & 0x7FFFu) : (~key & 0xFFFFu);
  return bits_to_float(bits << 16);
}
FM_HD_INLINE float bf16_bits_value(uint32_t bits) {
  return bits_to_float(bits << 16);
}
// NaN or +inf: the row has no distribution (-inf is a masked token, weight 0).
FM_HD_INLINE bool bad_logit(uint32_t bits) {
  return (bits & 0x7FFFu) > 0x7F80u || bits == 0x7F80u;
}
inline constexpr uint32_t kKeyMinusInf = 0x007Fu;  // logit_key(0xFF80)

// log2(e) / T: the per-row scale of (x - m).
FM_HD_INLINE float weight_scale(float temperature) {
  return fl_div(1.44269504088896341f, temperature);
}

// w = 2^((x - m) * scale) by our own exp2: n = rint(y) (the 1.5 * 2^23 trick: round to nearest
// even), f = y - n in [-0.5, 0.5], 2^f by the degree-7 Taylor polynomial of e^(f ln 2) (error
// below 1e-8 relative on that range), times 2^n built from its bits (n >= -125: no subnormals).
FM_HD_INLINE float weight(float x, float m, float scale) {
  const float d = fl_sub(x, m);
  if (d == 0.0f) return 1.0f;
  const float y = fl_mul(d, scale);
  if (!(y >= -125.0f)) return 0.0f;
  const float n = fl_sub(fl_add(y, 12582912.0f), 12582912.0f);
  const float f = fl_sub(y, n);
  float p = 1.52527338e-05f;
  p = fl_fma(p, f, 1.54035304e-04f);
  p = fl_fma(p, f, 1.33335581e-03f);
  p = fl_fma(p, f, 9.61812911e-03f);
  p = fl_fma(p, f, 5.55041087e-02f);
  p = fl_fma(p, f, 2.40226507e-01f);
  p = fl_fma(p, f, 6.93147181e-01f);
  p = fl_fma(p, f, 1.0f);
  const int ni = static_cast<int>(n);
  return fl_mul(p, bits_to_float(static_cast<uint32_t>(ni + 127) << 23));
}

// How many tokens of the threshold key K* (weight w_star) the nucleus keeps, lowest ids first:
// ceil((target - above) / w_star), at least 1; kAllTied when that cannot be an int.
inline constexpr int32_t kAllTied = 0x7FFFFFFF;
FM_HD_INLINE int32_t tie_keep(float target, float above, float w_star) {
  if (!(w_star > 0.0f)) return kAllTied;
  const float need = fl_sub(target, above);
  if (!(need > 0.0f)) return 1;
  const float q = fl_div(need, w_star);
  if (!(q < 2.0e9f)) return kAllTied;
  const int32_t j = static_cast<int32_t>(q);
  const int32_t c = (static_cast<float>(j) < q) ? j + 1 : j;  // ceil without libm
  return c < 1 ? 1 : c;
}

// A row's nucleus: max value m, scale, and the threshold (all: top_p == 1, every token kept).
struct Nucleus {
  float m = 0, scale = 0;
  bool all = true;
  uint32_t kstar = 0;
  int64_t cut = 0;  // tokens of key K* with id <= cut are kept
  // The kept weight of token `id` with logit bits `bits` (0 outside the nucleus).
  FM_HD_INLINE float wk(uint32_t bits, int64_t id) const {
    const uint32_t k = logit_key(bits);
    const bool kept = all || k > kstar || (k == kstar && id <= cut);
    return kept ? weight(bf16_bits_value(bits), m, scale) : 0.0f;
  }
};

// One level of the draw: the first entry whose running sum (in order, from 0) exceeds r, with r
// minus the sum before it; if none, the last entry of positive mass and r = +inf (so every level
// below takes its last positive entry too); -1 if none is positive.
FM_HD_INLINE int pick(const float* v, int n, float& r) {
  float acc = 0;
  int last = -1;
  for (int i = 0; i < n; ++i) {
    const float next = fl_add(acc, v[i]);
    if (r < next) {
      r = fl_sub(r, acc);
      return i;
    }
    if (v[i] > 0.0f) last = i;
    acc = next;
  }
  r = bits_to_float(0x7F800000u);
  return last;
}

}  // namespace fp8moe::kernels::sampling
