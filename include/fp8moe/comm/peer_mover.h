// Byte movers between GPUs over NVLink: the ways an SM or the copy engine can move B contiguous
// bytes to (or from) a peer GPU's memory, each with the knobs that set its rate. They exist to
// measure the transport's ceiling apart from the dispatch's other work (bench/gpu/nvlink_bench.cu)
// and to test that each one delivers every byte (tests/comm/peer_mover_gpu_test.cu).
//
// Movers (MoverConfig::kind; the name's first field, parse_mover()):
//   ce      the copy engine: cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault), the anchor
//   st      SM push: the source GPU's SMs load 16-byte vectors of the local source and store them
//           to the peer's destination (st.global.v4), `unroll` vectors in flight per lane
//   ld      SM pull: the same copy run by the destination GPU's SMs: NVLink loads, local stores
//   bulkst  TMA push: one lane per warp streams ops of `op_bytes` through `stages` shared-memory
//           slots: cp.async.bulk global->shared (mbarrier) from the local source, then
//           cp.async.bulk shared->global to the peer (bulk groups)
//   bulkld  TMA pull: the same run by the destination GPU (bulk loads over NVLink, local bulk
//           stores)
//   stage   staged TMA push, the dispatch's case: the warp's lanes load the source into
//           registers and write a shared-memory slot (st.shared), then one lane copies the slot
//           to the peer with cp.async.bulk shared->global
// Work split (SM movers): `chunk` = 0 is grid-strided (consecutive threads take consecutive
// 16-byte vectors); `chunk` > 0 gives each warp whole contiguous items of `chunk` bytes in turn
// (warp w takes items w, w + warps, ...), as the dispatch gives a warp a token row (7 KB).
// TMA movers split each item into ops of `op_bytes` (items are single ops when chunk = 0).
//
// Name grammar: kind[:b<blocks>][:w<warps per block>][:u<unroll 1|2|4|8>][:c<chunk bytes>]
// [:o<op bytes>][:d<stages>][:l<load hint>][:s<store hint>], e.g. "st:b64:w8:u4:c7168:scs",
// "bulkst:b32:w4:o8192:d4". Load hints: nc (default, ld.global.nc), cg, cs (evict first), na
// (L1::no_allocate); store hints: wb (default), cs (streaming), wt, na (L1::no_allocate).
// Limits (validate_mover): byte counts, chunk and op sizes multiples of 16; the TMA movers'
// slots fit a block's shared memory (kMaxMoverSmem).
#pragma once

#include <cstdint>
#include <string>

#if defined(FP8MOE_HAVE_CUDA)
#include <cuda_runtime.h>
#endif

namespace fp8moe::comm {

enum class MoverKind { kCopyEngine, kSmPush, kSmPull, kBulkPush, kBulkPull, kStagedPush };
enum class LoadHint { kNc, kCg, kCs, kNa };
enum class StoreHint { kWb, kCs, kWt, kNa };

// Shared memory a TMA mover block may use (227 KB on sm_90 less its mbarriers' 1 KB).
inline constexpr int64_t kMaxMoverSmem = 226 * 1024;

struct MoverConfig {
  MoverKind kind = MoverKind::kSmPush;
  int blocks = 64;          // grid size (one block per SM at these sizes)
  int warps = 8;            // warps per block
  int unroll = 4;           // SM movers: 16-byte vectors in flight per lane (1, 2, 4, 8)
  int64_t chunk = 0;        // contiguous bytes per warp item; 0: grid-strided (SM) / one op (TMA)
  int64_t op_bytes = 4096;  // TMA movers: bytes per bulk copy
  int stages = 4;           // TMA movers: shared-memory slots (bulk ops in flight) per warp
  LoadHint load = LoadHint::kNc;
  StoreHint store = StoreHint::kWb;
};

// "st:b64:w8:u4" -> MoverConfig; a malformed or unknown field throws kInvalidArgument naming it.
MoverConfig parse_mover(const std::string& name);
// The canonical name: the kind and every field that matters for it (round-trips parse_mover).
std::string mover_name(const MoverConfig& c);
// True for the movers the destination GPU runs (pulls): the caller launches them there.
bool mover_runs_on_destination(const MoverConfig& c);
// Dynamic shared memory of a TMA mover block (slots plus mbarriers); 0 for the others.
int64_t mover_smem_bytes(const MoverConfig& c);
// Throws kInvalidArgument naming the field when c cannot move `bytes` (alignment, unroll, grid,
// shared memory).
void validate_mover(const MoverConfig& c, int64_t bytes);

#if defined(FP8MOE_HAVE_CUDA)
// Enqueues the move of `bytes` from src to dst on `stream`, on the current device, which must be
// the source's GPU for push movers and the destination's for pull movers (the other pointer is a
// peer pointer: cudaDeviceEnablePeerAccess done by the caller) or the same GPU for a local copy.
// Pointers 16-byte aligned. Validates first (validate_mover).
void launch_mover(const MoverConfig& c, void* dst, const void* src, int64_t bytes,
                  cudaStream_t stream);
#endif

}  // namespace fp8moe::comm
