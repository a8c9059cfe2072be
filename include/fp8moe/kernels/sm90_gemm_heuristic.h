// Tile selection for the sm_90a FP8 GEMMs: list the tile shapes the kernels are built for, drop
// those that do not fit shared memory, rank the rest by a small cost model (waves of tiles over
// the multiprocessors, per-tile tensor-core time against per-tile L2 traffic, and the DRAM floor
// of reading both operands once). Plain C++, unit-tested on the CPU
// (tests/kernels/sm90_gemm_heuristic_test.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "fp8moe/kernels/gemm_config.h"

namespace fp8moe::kernels {

enum class GemmKind { kDense, kGroupedContiguous, kGroupedMasked, kWgrad, kKGroupedWgrad };
const char* gemm_kind_name(GemmKind kind);

struct GemmShape {
  GemmKind kind = GemmKind::kDense;
  int64_t m = 0;           // rows of one problem (masked: the expected rows per group)
  int64_t n = 0, k = 0;    // k: the reduction length of one problem (k-grouped: the average)
  int64_t num_groups = 1;  // problems that run side by side (contiguous: 1, m counts all rows)
  int max_split_k = 1;     // dense with a workspace: K may be cut into up to this many slices
};

// Split-K (dense): largest slice count the kernels take, and the workspace a split launch needs:
// a fixed region of arrival counters (one per 16-row strip of each tile; fixed so that calls of
// different shapes sharing one workspace never write partials over another layout's counters),
// then the FP32 partials of every (tile, slice), block_m x block_n floats each.
inline constexpr int kMaxSplitK = 16;
inline constexpr int64_t kSplitKMaxStrips = 16384;
inline constexpr int64_t kSplitKCounterBytes = kSplitKMaxStrips * 4;
// 16-row strips of a launch (must be <= kSplitKMaxStrips to split).
int64_t gemm_split_k_strips(int64_t m, int64_t n, int block_m, int block_n);
int64_t gemm_split_k_workspace_bytes(int64_t m, int64_t n, int block_m, int block_n, int split_k);

// Tail split (dense, GemmTileConfig::tail_split; stream-K of the last partial wave): with `grid`
// persistent CTAs, the first full_units = (tiles / grid) * grid tiles run whole, one unit each;
// the tail_tiles = tiles % grid left over are each cut into `slices` K slices (unit
// full_units + i * slices + s is slice s of tail tile i), as many as the grid has CTAs for, at most
// `requested` and at most one per K block. slices == 1: no tail split (less than one full wave,
// no tail, or no room for two slices a tile).
struct TailSplitPlan {
  int64_t full_units = 0, tail_tiles = 0;
  int slices = 1;
};
TailSplitPlan gemm_tail_split_plan(int64_t tiles, int64_t grid, int64_t k_blocks, int requested);
// Workspace of a tail-split launch: the split-K counter region, then the FP32 partials of every
// (tail tile, slice), block_m x block_n floats each (0 without a split).
int64_t gemm_tail_split_workspace_bytes(const TailSplitPlan& plan, int block_m, int block_n);

// Dense shapes of at least this many rows may take 256x128 tiles (two math warpgroups with two
// 64-row slabs each), and stage their output through shared memory (TMA store) at every K.
inline constexpr int64_t kWideMinM = 1024;

// 256-row tiles over a last tile column holding at most 64 valid columns (N % 128 in (0, 64],
// e.g. N = 2112) may run that column as 64-wide half tiles, two to a unit of work (dense launch
// of 256x128 tiles without a tail split, c.num_sms CTAs): gemm_half_column says whether a launch
// does, which is where it shortens it (the most loaded CTA's work, a pair counted as 1.25 full
// tiles, below the padded launch's waves). Units of such a launch: the full tiles, then one per
// pair of half tiles.
bool gemm_half_column(GemmKind kind, int64_t m, int64_t n, const GemmTileConfig& c);
int64_t gemm_half_column_units(int64_t m, int64_t n, const GemmTileConfig& c);
double gemm_half_column_load(int64_t m, int64_t n, const GemmTileConfig& c);

// GemmTileConfig::scale_prefetch = 0 resolved (c: the configuration with tile, split_k and
// tail_split filled in): kGemmDefaultScalePrefetch for dense launches of at most
// kScalePrefetchMaxM rows with 128x128 tiles or split-K, else 1 (off). Measured on H100
// (dev/gemm/NOTES.md session 7): 128x32768x512 10.4 -> 10.0-10.1 us, the 64x64 split picks
// 0.1-0.2 us faster; the 64x128 / 64x64 picks without split-K read the same or up to 1% slower
// with it (128x7168x16384 64x128: +0.45 us on average of 8 runs), and M > 128 was not measured.
inline constexpr int64_t kScalePrefetchMaxM = 128;
int gemm_default_scale_prefetch(const GemmShape& shape, const GemmTileConfig& c);

struct TileCandidate {
  int block_m, block_n;
};
// The tile shapes the heuristic chooses among for a kind (the 1x128 x 1x128 weight-gradient
// kernel has fewer).
std::vector<TileCandidate> gemm_tile_candidates(GemmKind kind);
// Whether a forced configuration may name the tile for the kind: the candidates, plus the tiles
// compiled for forced configurations only (never a candidate): 128x64 for the dense form (two math
// warpgroups of m64n64; plain, B-scale prefetch and split-K kernels, no tail split, no CTA pairs;
// dev/gemm/NOTES.md session 17, gemm28).
bool gemm_tile_compiled(GemmKind kind, int block_m, int block_n);

// Shared memory one pipeline stage takes, and the stages that fit in `smem_limit` bytes.
int64_t gemm_stage_bytes(GemmKind kind, int block_m, int block_n);
// Dynamic shared memory of a launch: output staging, the stages, alignment slack.
// `tma_store`: the BF16 output is staged in shared memory (block_m x block_n x 2 bytes).
int64_t gemm_smem_bytes(GemmKind kind, int block_m, int block_n, int num_stages, bool tma_store);
int gemm_max_stages(GemmKind kind, int block_m, int block_n, int64_t smem_limit, bool tma_store);
// The epilogue the heuristic picks (GemmTileConfig::epilogue): BF16 output through shared memory
// and TMA stores; the FP32 accumulate of the weight gradient stores from registers.
int gemm_choose_epilogue(const GemmShape& shape, int block_n);

// The DRAM rate (bytes/s) the cost model's floor uses: what a stream of reads sustains, taken as
// 0.9 x the peak of the device's memory clock and bus width (double data rate). The default is
// the H100 SXM's (2619 MHz x 5120 bits: 3.35 TB/s peak), the figure the model was tuned with;
// the host passes the current device's (H200: 3201 MHz x 6144 bits, 4.92 TB/s peak).
inline constexpr double kDefaultDramBytesPerS = 3.0e12;
double gemm_dram_bytes_per_s(int64_t memory_clock_khz, int bus_width_bits);

// Estimated time (arbitrary units, comparable between candidates of one shape); split_k > 1: K cut
// into that many slices per tile, each slice a unit of work, plus the fix-up tail (one SM writes
// its partial tile and reads all split_k back).
double gemm_tile_cost(const GemmShape& shape, const TileCandidate& tile, int num_sms,
                      int split_k = 1, double dram_bytes_per_s = kDefaultDramBytesPerS);

// Estimated time of a tail-split launch (same units as gemm_tile_cost): the full waves, then
// one slice of a tail tile, then its fix-up (one SM writes its partial and reads `slices` back).
double gemm_tail_split_cost(const GemmShape& shape, const TileCandidate& tile, int num_sms,
                            int slices, double dram_bytes_per_s = kDefaultDramBytesPerS);

// The best candidate for the shape, with num_stages, num_sms, split_k and tail_split filled in.
// Split-K is considered only for dense shapes with max_split_k > 1 and M <= 128, when every unit
// (tiles x slices) fits in one wave, with >= 4 K blocks a slice, and where the model gains 15% over
// the best unsplit tile (measured on H200: dev/gemm/NOTES.md session 2b). The tail split only for
// dense shapes with max_split_k > 1 (a workspace) and M > 128, tiles up to 128 wide, a last wave
// of at most a quarter of the SMs, >= 4 K blocks a slice, where the model gains 5%
// (dev/gemm/NOTES.md session 4). 256x128 tiles (TMA store, with their own tail split) for dense
// shapes of >= kWideMinM rows where the model prefers them to the pick above (session 5).
// 128x256 tiles (TMA store) for the grouped forms where the pick is 128x128 and the model, with
// the measured shared-memory advantage of the wider tile, prefers them (session 5b).
// 128x192 tiles only at
// 64 < M <= 128 where they fit one wave and 128x128 tiles do not (measured faster there, session
// 2b and 3; slower at every M = 4096 shape, v11).
GemmTileConfig choose_gemm_tile(const GemmShape& shape, int num_sms, int64_t smem_limit,
                                double dram_bytes_per_s = kDefaultDramBytesPerS);

// The tile of the gathered contiguous form (fp8_gemm_nt_grouped_contiguous_gathered), whose
// kernels exist for 128x256 and 128x128 only: the contiguous pick for `shape` (a
// kGroupedContiguous shape) where it is one of them (the grouped pick is 128x256 where the
// model prefers it), else 128x128 with its epilogue and stages filled in as the pick's are.
GemmTileConfig gemm_gathered_tile(const GemmShape& shape, int num_sms, int64_t smem_limit,
                                  double dram_bytes_per_s = kDefaultDramBytesPerS);

// The rows a group's tiles are chosen for in the masked form, given the caller's expected_m (the
// mean rows a group holds; 0: none given, max_m): the mean plus two standard deviations of a
// Poisson count (ceil(2 sqrt(mean))), at most max_m. Decoding's groups scatter around their mean
// (uniform routing makes an expert's count binomial), so tiles fitted to the mean itself leave
// about half of the groups a second, mostly empty row tile, which streams the expert's weights
// again: at a mean of 64 rows the 64-row tiles ran the V3-width layer 0.97x the grouped path's
// 128-row tiles (docs/results/moe-decode-2026-11-27-2xh200.md).
int64_t gemm_masked_plan_rows(int64_t expected_m, int64_t max_m);

}  // namespace fp8moe::kernels
