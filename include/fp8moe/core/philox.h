// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), the
// counter-based generator cuRAND also uses. Header-only and usable in device code: element i of
// stream s under seed k is a pure function philox_u32(k, s, i), so a GPU thread can produce any
// element of a CPU-generated stream bit for bit, with no state to carry.
//
// Layout: key = (seed low, seed high); counter = (block low, block high, stream low, stream high)
// where block = i / 4; element i is word i % 4 of that block's output.
#pragma once

#include <cmath>
#include <cstdint>

#include "fp8moe/core/host_device.h"

namespace fp8moe {

struct PhiloxBlock {
  uint32_t x[4];
};

namespace detail {
FM_HD_INLINE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}
}  // namespace detail

FM_HD_INLINE PhiloxBlock philox4x32_10(PhiloxBlock ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    detail::philox_mulhilo(kM0, ctr.x[0], hi0, lo0);
    detail::philox_mulhilo(kM1, ctr.x[2], hi1, lo1);
    ctr = PhiloxBlock{{hi1 ^ ctr.x[1] ^ k0, lo1, hi0 ^ ctr.x[3] ^ k1, lo0}};
    k0 += kW0;
    k1 += kW1;
  }
  return ctr;
}

FM_HD_INLINE PhiloxBlock philox_block(uint64_t seed, uint64_t stream, uint64_t block) {
  return philox4x32_10(
      PhiloxBlock{{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                   static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32)}},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

FM_HD_INLINE uint32_t philox_u32(uint64_t seed, uint64_t stream, uint64_t index) {
  return philox_block(seed, stream, index >> 2).x[index & 3];
}

// Uniform in [0, 1) with 24 random bits: exact in float, identical on CPU and GPU.
FM_HD_INLINE float u32_to_uniform(uint32_t u) {
  return static_cast<float>(u >> 8) * (1.0f / 16777216.0f);
}
FM_HD_INLINE float philox_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
  return u32_to_uniform(philox_u32(seed, stream, index));
}

// Standard normal from words 2i and 2i+1 (Box-Muller, computed in double on both sides so the
// result is reproducible to the last bit wherever the libm agrees; the uniforms always do).
FM_HD_INLINE float philox_normal(uint64_t seed, uint64_t stream, uint64_t index) {
  const PhiloxBlock b = philox_block(seed, stream, index >> 1);
  const int half = static_cast<int>(index & 1) * 2;
  const double u1 = (static_cast<double>(b.x[half]) + 1.0) * (1.0 / 4294967296.0);  // (0, 1]
  const double u2 = static_cast<double>(b.x[half + 1]) * (1.0 / 4294967296.0);
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

// A sequential reader over one stream, for host code that just wants "the next number".
class PhiloxStream {
 public:
  PhiloxStream(uint64_t seed, uint64_t stream, uint64_t offset = 0)
      : seed_(seed), stream_(stream), next_(offset) {}
  uint32_t next_u32() { return philox_u32(seed_, stream_, next_++); }
  float uniform() { return u32_to_uniform(next_u32()); }
  float uniform(float lo, float hi) { return lo + (hi - lo) * uniform(); }
  float normal() { return philox_normal(seed_, stream_ + (uint64_t{1} << 63), normal_next_++); }
  uint64_t offset() const { return next_; }
  uint64_t normal_offset() const { return normal_next_; }
  void set_offsets(uint64_t offset, uint64_t normal_offset) {
    next_ = offset;
    normal_next_ = normal_offset;
  }

 private:
  uint64_t seed_, stream_, next_, normal_next_ = 0;
};

}  // namespace fp8moe
