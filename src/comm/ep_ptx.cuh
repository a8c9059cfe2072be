// Small PTX wrappers, the error-record writer and the launch helper shared by the EP kernel files
// (one-stage, low-latency, two-stage, backward): the memory-ordering primitives of their flag
// protocols exist once.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "fp8moe/core/cuda_check.h"

namespace fp8moe::comm::detail {

__device__ __forceinline__ unsigned long long ld_acquire_sys(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void allow_dependent_launch() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

// A launch, optionally as a programmatic dependent of the previous kernel on the stream (it may
// start once that kernel's blocks all allowed it; the EP kernels synchronise through flags only).
template <typename Params>
void launch_kernel(void (*kernel)(Params), int grid, int block, size_t smem, cudaStream_t stream,
                   bool dependent, const Params& p) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(grid));
  cfg.blockDim = dim3(static_cast<unsigned>(block));
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = dependent ? attr : nullptr;
  cfg.numAttrs = dependent ? 1 : 0;
  FM_CHECK_CUDA(cudaLaunchKernelEx(&cfg, kernel, p));
}

// A rank's error record (the normal kernels', the two-stage route's and the low-latency kernels'
// records share one layout): the first error wins it (code 0 -> -1 while its fields are filled),
// and its code is published last, after a system fence, so that the host's check() reads every
// field of it.
template <class Record>
__device__ void record_error(Record* err, int code, int rank, int peer, int counter,
                             unsigned long long expected, unsigned long long seen,
                             long long detail = -1) {
  if (atomicCAS(&err->code, 0, -1) != 0) return;  // first error wins
  err->rank = rank;
  err->peer = peer;
  err->counter = counter;
  err->expected = expected;
  err->seen = seen;
  err->detail = detail;
  __threadfence_system();
  atomicExch(&err->code, code);
}

// Reads of data used once (combine_stream_rows: the expert rows): an L2 evict-first policy and a
// read-only 16-byte load under it, so that data read again soon (the partials landing from peers)
// keeps its place in L2.
__device__ __forceinline__ unsigned long long evict_first_policy() {
  unsigned long long pol;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  return pol;
}
__device__ __forceinline__ uint4 ld_evict_first(const void* ptr, unsigned long long pol) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr), "l"(pol));
  return v;
}

}  // namespace fp8moe::comm::detail
