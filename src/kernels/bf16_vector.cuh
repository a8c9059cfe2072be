// Eight BF16 values as one 16-byte vector, to and from FP32 registers: the unpack is exact (BF16
// is FP32's top half), the pack rounds to nearest even. Shared by the memory-bound kernels that
// move BF16 rows with 16-byte accesses (SwiGLU, RMSNorm, the quantisers).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace fp8moe::kernels {

__device__ __forceinline__ void unpack_bf16x8(const uint4& v, float* out) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);  // round to nearest even
  return *reinterpret_cast<const uint32_t*>(&p);
}
__device__ __forceinline__ uint4 pack_bf16x8(const float* f) {
  return make_uint4(pack_bf16x2(f[0], f[1]), pack_bf16x2(f[2], f[3]), pack_bf16x2(f[4], f[5]),
                    pack_bf16x2(f[6], f[7]));
}

}  // namespace fp8moe::kernels
