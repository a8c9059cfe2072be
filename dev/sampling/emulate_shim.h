// A host emulation of the CUDA features src/kernels/sampling.cu uses, for dev/sampling/emulate.sh:
// a block = kThreads std::threads, __syncthreads = a std::barrier, warp collectives = per-warp
// slots between two warp barriers, __shared__ = a function static (blocks run one at a time).
// Checks the kernel's logic (indices, tie cut, picks) against the reference without a GPU; the
// float operations are the host ones (sampling_math.h's host branch), as in the reference.
#pragma once

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>

struct uint4 {
  uint32_t x, y, z, w;
};
struct EmuDim {
  unsigned x = 0;
};
inline thread_local EmuDim threadIdx, blockIdx;

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static

inline uint4 __ldg(const uint4* p) {
  return *p;
}
using std::min;

namespace emu {
inline std::unique_ptr<std::barrier<>> block_bar;
inline std::unique_ptr<std::barrier<>> warp_bar[32];
inline uint64_t slots[32][32];
inline int lane() {
  return static_cast<int>(threadIdx.x % 32);
}
inline int warp() {
  return static_cast<int>(threadIdx.x / 32);
}
inline void reset(int threads) {
  block_bar = std::make_unique<std::barrier<>>(threads);
  for (int w = 0; w < threads / 32; ++w) warp_bar[w] = std::make_unique<std::barrier<>>(32);
}
template <typename T>
T gather(T v, int src) {
  static_assert(sizeof(T) <= 8);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  slots[warp()][lane()] = bits;
  warp_bar[warp()]->arrive_and_wait();
  const uint64_t got = slots[warp()][src];
  warp_bar[warp()]->arrive_and_wait();
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}
}  // namespace emu

inline void __syncthreads() {
  emu::block_bar->arrive_and_wait();
}
inline void __syncwarp(unsigned = 0xFFFFFFFFu) {
  emu::warp_bar[emu::warp()]->arrive_and_wait();
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int off) {
  return emu::gather(v, emu::lane() ^ off);
}
template <typename T>
T __shfl_up_sync(unsigned, T v, int off) {
  return emu::gather(v, emu::lane() >= off ? emu::lane() - off : emu::lane());
}
template <typename T>
T __shfl_sync(unsigned, T v, int src) {
  return emu::gather(v, src);
}
inline unsigned __ballot_sync(unsigned, int pred) {
  unsigned out = 0;
  for (int l = 0; l < 32; ++l) {
    // One gather a lane keeps it simple: every lane reads lane l's predicate.
    const int p = emu::gather(pred ? 1 : 0, l);
    out |= static_cast<unsigned>(p) << l;
  }
  return out;
}
inline bool __any_sync(unsigned m, int pred) {
  return __ballot_sync(m, pred) != 0;
}
inline int __reduce_add_sync(unsigned, int v) {
  int s = 0;
  for (int l = 0; l < 32; ++l) s += emu::gather(v, l);
  return s;
}
inline int __ffs(unsigned x) {
  return __builtin_ffs(static_cast<int>(x));
}
