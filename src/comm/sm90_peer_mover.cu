// The byte movers of peer_mover.h: SM copies (16-byte loads and stores, `unroll` in flight per
// lane, grid-strided or contiguous warp items), TMA bulk copies through shared-memory slots, and
// the staged form (lanes fill a slot, one lane bulk-copies it out). Checked byte for byte against
// the source (random data, poisoned destination and guard) by tests/comm/peer_mover_gpu_test.cu:
// build/tests/test_comm_gpu --gtest_filter='PeerMover*'.
#include "fp8moe/comm/peer_mover.h"
#include "fp8moe/core/cuda_check.h"

namespace fp8moe::comm {
namespace {

// ---- 16-byte global accesses with cache hints ----

template <int kHint>  // LoadHint
__device__ __forceinline__ uint4 load16(const uint4* p) {
  uint4 v;
  if constexpr (kHint == static_cast<int>(LoadHint::kNc))
    asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
  else if constexpr (kHint == static_cast<int>(LoadHint::kCg))
    asm("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
  else if constexpr (kHint == static_cast<int>(LoadHint::kCs))
    asm("ld.global.cs.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
  else
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
  return v;
}

template <int kHint>  // StoreHint
__device__ __forceinline__ void store16(uint4* p, uint4 v) {
  if constexpr (kHint == static_cast<int>(StoreHint::kWb))
    asm volatile("st.global.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z),
                 "r"(v.w));
  else if constexpr (kHint == static_cast<int>(StoreHint::kCs))
    asm volatile("st.global.cs.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z),
                 "r"(v.w));
  else if constexpr (kHint == static_cast<int>(StoreHint::kWt))
    asm volatile("st.global.wt.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z),
                 "r"(v.w));
  else
    asm volatile("st.global.L1::no_allocate.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(p), "r"(v.x),
                 "r"(v.y), "r"(v.z), "r"(v.w));
}

// Vectors [begin, end) with the threads of a group of `width` consecutive threads (rank `me`),
// kUnroll loads issued before their stores.
template <int kUnroll, int kLoad, int kStore>
__device__ __forceinline__ void copy_span(uint4* dst, const uint4* src, int64_t begin, int64_t end,
                                          int64_t me, int64_t width) {
  for (int64_t base = begin + me; base < end; base += width * kUnroll) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * width < end) v[u] = load16<kLoad>(src + base + u * width);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * width < end) store16<kStore>(dst + base + u * width, v[u]);
  }
}

// ---- SM copy (st / ld movers) ----

template <int kUnroll, int kLoad, int kStore>
__global__ void __launch_bounds__(1024)
    k_sm_copy(uint4* dst, const uint4* src, int64_t nvec, int64_t chunk_vec) {
  if (chunk_vec == 0) {
    const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
    copy_span<kUnroll, kLoad, kStore>(
        dst, src, 0, nvec, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, threads);
    return;
  }
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const int64_t items = (nvec + chunk_vec - 1) / chunk_vec;
  for (int64_t item = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; item < items;
       item += warps) {
    const int64_t begin = item * chunk_vec;
    copy_span<kUnroll, kLoad, kStore>(dst, src, begin, min(begin + chunk_vec, nvec),
                                      threadIdx.x & 31, 32);
  }
}

using SmKernel = void (*)(uint4*, const uint4*, int64_t, int64_t);

template <int kUnroll, int kLoad>
SmKernel sm_kernel_store(StoreHint h) {
  switch (h) {
    case StoreHint::kWb:
      return &k_sm_copy<kUnroll, kLoad, 0>;
    case StoreHint::kCs:
      return &k_sm_copy<kUnroll, kLoad, 1>;
    case StoreHint::kWt:
      return &k_sm_copy<kUnroll, kLoad, 2>;
    default:
      return &k_sm_copy<kUnroll, kLoad, 3>;
  }
}

template <int kUnroll>
SmKernel sm_kernel_load(const MoverConfig& c) {
  switch (c.load) {
    case LoadHint::kNc:
      return sm_kernel_store<kUnroll, 0>(c.store);
    case LoadHint::kCg:
      return sm_kernel_store<kUnroll, 1>(c.store);
    case LoadHint::kCs:
      return sm_kernel_store<kUnroll, 2>(c.store);
    default:
      return sm_kernel_store<kUnroll, 3>(c.store);
  }
}

SmKernel sm_kernel(const MoverConfig& c) {
  switch (c.unroll) {
    case 1:
      return sm_kernel_load<1>(c);
    case 2:
      return sm_kernel_load<2>(c);
    case 4:
      return sm_kernel_load<4>(c);
    default:
      return sm_kernel_load<8>(c);
  }
}

// ---- TMA bulk copies ----

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred p;\n"
      "W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra W;\n}" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// Bulk load of `bytes` from global memory (local or a peer's) into a slot, completing on bar.
__device__ __forceinline__ void bulk_load(void* slot, const void* src, uint32_t bytes,
                                          uint64_t* bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(smem_addr(slot)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}

// Bulk store of a slot to global memory (local or a peer's), as one bulk group.
__device__ __forceinline__ void bulk_store(void* dst, const void* slot, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst),
               "r"(smem_addr(slot)), "r"(bytes)
               : "memory");
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

template <int kPending>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kPending) : "memory");
}

// At most `pending` of this thread's bulk groups still read their shared-memory source.
__device__ __forceinline__ void bulk_wait_read(int pending) {
  switch (pending) {
    case 0:
      bulk_wait_read<0>();
      break;
    case 1:
      bulk_wait_read<1>();
      break;
    case 2:
      bulk_wait_read<2>();
      break;
    case 3:
      bulk_wait_read<3>();
      break;
    case 4:
      bulk_wait_read<4>();
      break;
    case 5:
      bulk_wait_read<5>();
      break;
    case 6:
      bulk_wait_read<6>();
      break;
    default:
      bulk_wait_read<7>();
      break;
  }
}

__device__ __forceinline__ void bulk_wait_all() {
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// A warp's ops in order: items w, w + warps, ... of `item` bytes, each cut into ops of `op` bytes.
struct OpCursor {
  int64_t item, off, warps, item_bytes, op, bytes;
  __device__ bool valid() const { return item * item_bytes < bytes; }
  __device__ int64_t pos() const { return item * item_bytes + off; }
  __device__ uint32_t len() const {
    const int64_t end = min((item + 1) * item_bytes, bytes);
    return static_cast<uint32_t>(min(op, end - pos()));
  }
  __device__ void next() {
    off += op;
    if (item * item_bytes + off >= min((item + 1) * item_bytes, bytes)) {
      item += warps;
      off = 0;
    }
  }
};

struct BulkArgs {
  char* dst;
  const char* src;
  int64_t bytes, chunk, op;
  int stages, bar_bytes;
};

__device__ __forceinline__ OpCursor warp_cursor(const BulkArgs& a) {
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  return OpCursor{blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32,
                  0,
                  warps,
                  a.chunk > 0 ? a.chunk : a.op,
                  a.op,
                  a.bytes};
}

// bulkst / bulkld: lane 0 of each warp keeps stages - 1 bulk loads in flight ahead of its bulk
// stores; a slot is refilled once the store that last read it has read it.
__global__ void __launch_bounds__(1024) k_bulk_copy(BulkArgs a) {
  extern __shared__ __align__(128) unsigned char smem[];
  if ((threadIdx.x & 31) != 0) return;
  const int warp = threadIdx.x / 32;
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem) + warp * a.stages;
  unsigned char* slots = smem + a.bar_bytes + static_cast<int64_t>(warp) * a.stages * a.op;
  for (int s = 0; s < a.stages; ++s) mbar_init(bars + s);
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  OpCursor lc = warp_cursor(a), sc = lc;
  for (int s = 0; s < a.stages - 1 && lc.valid(); ++s, lc.next())
    bulk_load(slots + s * a.op, a.src + lc.pos(), lc.len(), bars + s);
  for (int64_t m = 0; sc.valid(); ++m, sc.next()) {
    const int s = static_cast<int>(m % a.stages);
    mbar_wait(bars + s, static_cast<uint32_t>((m / a.stages) & 1));
    bulk_store(a.dst + sc.pos(), slots + s * a.op, sc.len());
    if (lc.valid()) {
      // NOTE: op m + stages - 1 takes the slot of op m - 1, whose store is the older of the
      // two newest groups.
      bulk_wait_read<1>();
      const int t = static_cast<int>((m + a.stages - 1) % a.stages);
      bulk_load(slots + t * a.op, a.src + lc.pos(), lc.len(), bars + t);
      lc.next();
    }
  }
  bulk_wait_all();
}

// stage: the warp's lanes fill slot m % stages with 16-byte loads (kUnroll in flight per lane)
// and shared stores, make them visible to the async proxy, and lane 0 bulk-stores the slot.
template <int kUnroll, int kLoad>
__global__ void __launch_bounds__(1024) k_staged_push(BulkArgs a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  unsigned char* slots = smem + a.bar_bytes + static_cast<int64_t>(warp) * a.stages * a.op;
  OpCursor sc = warp_cursor(a);
  for (int64_t m = 0; sc.valid(); ++m, sc.next()) {
    const int s = static_cast<int>(m % a.stages);
    if (m >= a.stages) {
      if (lane == 0) bulk_wait_read(a.stages - 1);  // the store of op m - stages has read slot s
      __syncwarp();
    }
    const uint4* src = reinterpret_cast<const uint4*>(a.src + sc.pos());
    uint4* slot = reinterpret_cast<uint4*>(slots + s * a.op);
    const int n = static_cast<int>(sc.len() / 16);
    for (int base = lane; base < n; base += 32 * kUnroll) {
      uint4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (base + u * 32 < n) v[u] = load16<kLoad>(src + base + u * 32);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (base + u * 32 < n) slot[base + u * 32] = v[u];
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncwarp();
    if (lane == 0) bulk_store(a.dst + sc.pos(), slot, sc.len());
  }
  if (lane == 0) bulk_wait_all();
}

using StagedKernel = void (*)(BulkArgs);

template <int kUnroll>
StagedKernel staged_kernel_load(LoadHint h) {
  switch (h) {
    case LoadHint::kNc:
      return &k_staged_push<kUnroll, 0>;
    case LoadHint::kCg:
      return &k_staged_push<kUnroll, 1>;
    case LoadHint::kCs:
      return &k_staged_push<kUnroll, 2>;
    default:
      return &k_staged_push<kUnroll, 3>;
  }
}

StagedKernel staged_kernel(const MoverConfig& c) {
  switch (c.unroll) {
    case 1:
      return staged_kernel_load<1>(c.load);
    case 2:
      return staged_kernel_load<2>(c.load);
    case 4:
      return staged_kernel_load<4>(c.load);
    default:
      return staged_kernel_load<8>(c.load);
  }
}

}  // namespace

void launch_mover(const MoverConfig& c, void* dst, const void* src, int64_t bytes,
                  cudaStream_t stream) {
  validate_mover(c, bytes);
  if (bytes == 0) return;
  FM_CHECK_ARG(
      reinterpret_cast<uintptr_t>(dst) % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0,
      "mover ", mover_name(c), ": pointers must be 16-byte aligned");
  const int threads = c.warps * 32;
  switch (c.kind) {
    case MoverKind::kCopyEngine:
      FM_CHECK_CUDA(
          cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyDefault, stream));
      return;
    case MoverKind::kSmPush:
    case MoverKind::kSmPull:
      sm_kernel(c)<<<c.blocks, threads, 0, stream>>>(
          static_cast<uint4*>(dst), static_cast<const uint4*>(src), bytes / 16, c.chunk / 16);
      FM_CHECK_LAUNCH();
      return;
    case MoverKind::kBulkPush:
    case MoverKind::kBulkPull:
    case MoverKind::kStagedPush: {
      const int64_t smem = mover_smem_bytes(c);
      const BulkArgs a{
          static_cast<char*>(dst),
          static_cast<const char*>(src),
          bytes,
          c.chunk,
          c.op_bytes,
          c.stages,
          static_cast<int>(smem - static_cast<int64_t>(c.warps) * c.stages * c.op_bytes)};
      const StagedKernel k = c.kind == MoverKind::kStagedPush ? staged_kernel(c) : &k_bulk_copy;
      FM_CHECK_CUDA(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem)));
      k<<<c.blocks, threads, static_cast<size_t>(smem), stream>>>(a);
      FM_CHECK_LAUNCH();
      return;
    }
  }
}

}  // namespace fp8moe::comm
