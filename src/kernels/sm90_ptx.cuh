// Small inline-PTX wrappers for Hopper (sm_90a): mbarriers, TMA tile loads, wgmma fences and
// shared-memory matrix descriptors, setmaxnreg. Used by the FP8 GEMM kernels; checked through
// their tests (tests/kernels/fp8_gemm_gpu_test.cu, `build-device/tests/test_kernels_gpu`).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fp8moe::kernels::sm90 {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mbarrier ----
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}
// Posts `bytes` more expected transaction bytes on the barrier's current phase without arriving.
// The caller must still owe the phase an arrival (so the phase cannot complete before the bytes
// are posted) and post before it issues the load that carries them.
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
// Without a branch: where `local` holds, arrive on this CTA's barrier; where `pair` holds, on
// the barrier at the same offset in both CTAs of the cluster (default semantics, see
// mbar_arrive_cluster).
__device__ __forceinline__ void mbar_release(uint64_t* bar, bool local, bool pair) {
  asm volatile(
      "{\n"
      ".reg .pred pl, pp;\n"
      ".reg .b32 r0, r1;\n"
      "setp.ne.u32 pl, %1, 0;\n"
      "setp.ne.u32 pp, %2, 0;\n"
      "@pl mbarrier.arrive.shared::cta.b64 _, [%0];\n"
      "@pp mapa.shared::cluster.u32 r0, %0, 0;\n"
      "@pp mapa.shared::cluster.u32 r1, %0, 1;\n"
      "@pp mbarrier.arrive.shared::cluster.b64 _, [r0];\n"
      "@pp mbarrier.arrive.shared::cluster.b64 _, [r1];\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(static_cast<uint32_t>(local)), "r"(static_cast<uint32_t>(pair))
      : "memory");
}
// mbar_release with the peer addresses defined on both paths (0 where `pair` is off). With the
// mapa predicated, a kernel that keeps the release in a loop holds every call site's two address
// registers across the loop (the compiler keeps their old values where the predicate is off):
// 30 registers and the 120 bytes of spill of the 128x128 weight-gradient kernel.
__device__ __forceinline__ void mbar_release_defined(uint64_t* bar, bool local, bool pair) {
  asm volatile(
      "{\n"
      ".reg .pred pl, pp;\n"
      ".reg .b32 r0, r1;\n"
      "setp.ne.u32 pl, %1, 0;\n"
      "setp.ne.u32 pp, %2, 0;\n"
      "@pl mbarrier.arrive.shared::cta.b64 _, [%0];\n"
      "mov.u32 r0, 0;\n"
      "mov.u32 r1, 0;\n"
      "@pp mapa.shared::cluster.u32 r0, %0, 0;\n"
      "@pp mapa.shared::cluster.u32 r1, %0, 1;\n"
      "@pp mbarrier.arrive.shared::cluster.b64 _, [r0];\n"
      "@pp mbarrier.arrive.shared::cluster.b64 _, [r1];\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(static_cast<uint32_t>(local)), "r"(static_cast<uint32_t>(pair))
      : "memory");
}
// Spin until the phase with the given parity has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// ---- clusters ----
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
// Every thread of every CTA in the cluster (barrier init visible cluster-wide, or no CTA exits
// while a peer may still write into its shared memory or barriers).
__device__ __forceinline__ void cluster_sync() {
  asm volatile(
      "barrier.cluster.arrive.release.aligned;\n"
      "barrier.cluster.wait.acquire.aligned;" ::
          : "memory");
}
// Arrive on the mbarrier at the same shared-memory offset in CTA `cta` of the cluster.
// NOTE: default semantics (release at CTA scope), as CUTLASS does; v3 asked for
// .release.cluster here and CTA pairs ran 2x slower.
__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* bar, uint32_t cta) {
  asm volatile(
      "{\n"
      ".reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(cta)
      : "memory");
}

// Brings the 128-byte line holding `ptr` into L2 (a hint: no result, no wait).
__device__ __forceinline__ void prefetch_l2(const void* ptr) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(reinterpret_cast<uint64_t>(ptr)));
}

// ---- cp.async (16-byte asynchronous copies global -> shared) ----
// src_bytes 0: the 16 bytes are zero-filled and nothing is read.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)),
               "l"(reinterpret_cast<uint64_t>(src)), "r"(src_bytes)
               : "memory");
}
// cp_async_16 from col + off16 * 16 (dst a shared-memory address). The multiply-add sits inside
// the asm so that ptxas keeps col as one 64-bit register: written in C++ the compiler split it
// into a uniform base and a 32-bit lane offset again, and each copy cost an IMAD.WIDE and a
// 64-bit add instead of two LEAs (dev/gemm/NOTES.md, session 11 late).
__device__ __forceinline__ void cp_async_16_row(uint32_t dst, const uint8_t* col, uint32_t off16,
                                                uint32_t src_bytes) {
  asm volatile(
      "{\n"
      ".reg .b64 src;\n"
      "mad.wide.u32 src, %1, 16, %2;\n"
      "cp.async.cg.shared.global [%0], [src], 16, %3;\n"
      "}\n" ::"r"(dst),
      "r"(off16), "l"(reinterpret_cast<uint64_t>(col)), "r"(src_bytes)
      : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

// ---- TMA (bulk tensor copy engine) ----
__device__ __forceinline__ void tma_prefetch_desc(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
// 2D tile load global -> shared, completing on `bar` (which must expect the bytes).
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar,
                                            int32_t c0, int32_t c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1)
      : "memory");
}

// 2D tile store shared -> global (bulk async group of the issuing thread).
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, const void* src, int32_t c0,
                                             int32_t c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(smem_addr(src)), "r"(c0), "r"(c1)
               : "memory");
}
// 2D tile reduction shared -> global: D[box] += the staged tile, element by element in L2 (the
// element type is the map's, FP32 here), in the issuing thread's bulk async group.
__device__ __forceinline__ void tma_reduce_add_2d(const CUtensorMap* map, const void* src,
                                                  int32_t c0, int32_t c1) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3}], "
      "[%1];" ::"l"(reinterpret_cast<uint64_t>(map)),
      "r"(smem_addr(src)), "r"(c0), "r"(c1)
      : "memory");
}
__device__ __forceinline__ void tma_store_commit() {
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
// Wait until the committed stores have finished reading shared memory.
__device__ __forceinline__ void tma_store_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
}
__device__ __forceinline__ void tma_store_wait_all() {
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}
// Named barrier over `count` threads (ids 1.. leave 0 to __syncthreads).
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
}

// The same tile written to the same offset of every CTA in `mask`, completing on each one's
// mbarrier at `bar`'s offset.
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const CUtensorMap* map,
                                                      uint64_t* bar, int32_t c0, int32_t c1,
                                                      uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "h"(mask)
      : "memory");
}

// ---- wgmma ----
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving reads of wgmma accumulators above the wait.
__device__ __forceinline__ void fence_operand(float& r) {
  asm volatile("" : "+f"(r)::"memory");
}

// Descriptor of a K-major tile whose rows are 128 bytes, stored with the 128-byte swizzle that
// TMA writes (8-row atoms of 1024 bytes). Advancing K by 32 bytes adds 2 to the start field.
__device__ __forceinline__ uint64_t make_desc_kmajor_sw128(const void* tile) {
  const uint64_t addr = smem_addr(tile);
  uint64_t desc = 0;
  desc |= (addr & 0x3FFFFull) >> 4;                // start address
  desc |= static_cast<uint64_t>(1) << 16;          // leading byte offset (unused when swizzled)
  desc |= static_cast<uint64_t>(1024 >> 4) << 32;  // stride byte offset: one 8-row atom
  desc |= static_cast<uint64_t>(1) << 62;          // 128-byte swizzle
  return desc;
}

// ---- programmatic dependent launch (cudaLaunchAttributeProgrammaticStreamSerialization) ----
// Blocks until the grids this one depends on (the previous kernel of the stream) have completed
// and their memory operations are visible; returns at once in a launch without the attribute.
__device__ __forceinline__ void griddep_wait() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
}
// Lets the next grid of the stream (if launched with the attribute) be scheduled once every CTA
// of this grid has issued it or exited.
__device__ __forceinline__ void griddep_launch_dependents() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// ---- register reallocation between warpgroups ----
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegs));
}

}  // namespace fp8moe::kernels::sm90
