// Launch configuration of the sm_90a FP8 GEMMs (fp8_gemm.h), free of CUDA headers so that the
// tile heuristic (sm90_gemm_heuristic.h) builds and is tested on machines without CUDA.
#pragma once

#include <string>

namespace fp8moe::kernels {

// Tile configuration chosen by the heuristic (sm90_gemm_heuristic.h); exposed so benchmarks and
// tests can force one.
struct GemmTileConfig {
  int block_m = 128;   // 64 or 128 (one math warpgroup per 64 rows), or 256 (dense, 128 wide:
                       // two math warpgroups with two 64-row slabs each)
  int block_n = 128;   // 64, 128, 192 or 256 (192, 256: 1x128 x 128x128 kernel only; 256 with
                       // 128 rows: two math warpgroups with two 128-wide column slabs each;
                       // 64 with 128 rows: dense, forced only, gemm_tile_compiled)
  int num_stages = 0;  // 0 = as many as shared memory holds
  int num_sms = 0;     // persistent grid size; 0 = all multiprocessors
  int epilogue = 0;    // BF16 output: 0 = heuristic, 1 = registers to global memory, 2 = through
                       // shared memory and TMA stores (overlaps the next tile; costs a stage)
  int cluster = 1;     // 2: pairs of CTAs on adjacent 128-row blocks share B tiles (TMA
                       // multicast); dense only, needs an even number of M-blocks (else 1 is used)
  int split_k = 0;     // dense fp8_gemm_nt only: K cut into this many slices per output tile
                       // (FP32 partials in the caller's GemmWorkspace); 0 or 1 = no split. The
                       // heuristic fills in its pick (1 when it does not split or has no workspace)
  int tail_split = 0;  // dense fp8_gemm_nt only, tiles up to 128 wide, no CTA pairs: the tiles of
                       // the last partial wave are cut into this many K slices (as many as fit on
                       // the idle multiprocessors, FP32 partials in the GemmWorkspace), the full
                       // waves' tiles are untouched (stream-K of the tail). 0 or 1 = off. Not
                       // combined with split_k.
  int pdl = 0;  // programmatic dependent launch: 0 = kGemmDefaultPdl, 1 = off, 2 = on (the launch
                // may begin, up to its prologue, while the previous kernel of the stream ends;
                // the kernel waits for that kernel's completion before any global memory access)
  int scale_prefetch = 0;  // B scales of the 128x128 / 64x128 / 64x64 dense kernels (with or
                           // without split-K, not the tail split): 0 = the default
                           // (gemm_default_scale_prefetch), 1 = off, 2 = prefetched into L2 at the
                           // start and (without split-K) loaded one K block ahead (other
                           // launches: ignored)
};

// What pdl = 0 means (the heuristic's picks and forced configurations that leave it 0). On: in
// CUDA-graph replays on H100 it took 0.6-1.2 us off every launch at M = 64 / 128 (2.9 -> 2.2 us for
// one tile; 11.6 -> 10.4 us at 128x32768x512), dev/gemm/NOTES.md session 6.
inline constexpr int kGemmDefaultPdl = 2;

// What scale_prefetch = 0 means where gemm_default_scale_prefetch (sm90_gemm_heuristic.h) applies
// it: on (2); elsewhere 0 means off.
inline constexpr int kGemmDefaultScalePrefetch = 2;

// One line naming a configuration (for benchmarks and logs).
std::string describe_tile_config(const GemmTileConfig& c);

}  // namespace fp8moe::kernels
