// The sm_90a FP8 GEMM kernel shared by every form (dense, grouped contiguous / masked, wgrad,
// k-grouped wgrad): D = A * B^T with E4M3 operands, one persistent CTA per multiprocessor, a
// producer warpgroup that feeds a ring of shared-memory stages through TMA (mbarrier complete_tx),
// one math warpgroup per 64 rows (256x128 / 128x256 tiles: two, each holding two 64x128 slabs)
// issuing wgmma m64nNk32 over each 128-wide K block and promoting the partial sums into FP32
// registers with the scales (FFMA), then the epilogue (registers, or shared memory and TMA stores).
// Checked against gemm_fp8_reference: tests/kernels/fp8_gemm_gpu_test.cu
// (`build-device/tests/test_kernels_gpu --gtest_filter='Fp8Gemm*'`).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "fp8moe/kernels/fp8_gemm.h"
#include "sm90_ptx.cuh"
#include "sm90_wgmma.cuh"

namespace fp8moe::kernels::sm90 {

enum class Form : int { kDense = 0, kContiguous = 1, kMasked = 2, kKGrouped = 3 };

struct GemmParams {
  Form form;
  int m;     // rows (masked: max_m per group)
  int n, k;  // k: total K (k-grouped: the sum of the groups)
  int num_groups;
  int num_stages;
  int tma_store;  // 1: epilogue through shared memory and TMA (BF16 stores, FP32 reduce-adds)
  int cluster;    // 2: CTA pairs on adjacent M-blocks share each B tile through TMA multicast
  const int32_t*
      grouped_layout;       // contiguous: expert of each row; k-grouped: of each K row, or null
  const int32_t* masked_m;  // masked: valid rows of each group
  const float* sb;          // 1x128 x 128x128: B scales [G][ceil(N/128)][K/128]
  void* d;
  int split_k;      // dense: K slices per tile (1 = no split), each slice a unit of work
  int* counters;    // split-K: arrivals per 16-row strip of each tile (zero between calls)
  float* partials;  // split-K: FP32 partials, [tile][slice][warp][kBlockN / 8][lane][4]
  // Tail split (dense, split_k == 1): units below tail_begin are whole tiles; unit
  // tail_begin + i * tail_split + s is K slice s of tile tail_begin + i (TailSplitPlan). Counters
  // and partials as split-K's, indexed by i. tail_split 1: off.
  int tail_split;
  int tail_begin;
  int k_block_offsets[kMaxKGroups + 1];  // k-grouped: first K block of each group
  // 256-row tiles, dense, no tail split: the last tile column holds at most 64 valid columns and
  // runs as 64-wide half tiles, two to a unit (get_wide_tile).
  int half_col;
  // Weight gradient: 1 = D is overwritten (D = A B^T; groups with no K get zeros), 0 = D += A B^T.
  int overwrite;
};

// Kernel variants beside the template's tile shape (a bit mask; 0 = the plain kernel), separate
// instantiations so that the kernels without them keep their code. kModeScalePrefetch
// (GemmTileConfig::scale_prefetch): at the start the math threads pull the whole B scale array
// into L2 (prefetch, one 128-byte line each, spread over the CTAs), and in the overlapped loop a K
// block's B scale is loaded one block ahead, a tile's first before the tile's first full-barrier
// wait (the other loop already loads one ahead). Without it the overlapped loop issued that load
// after the wait, right before its use: at M = 128 its L2 miss (the scales are cold) went to DRAM
// behind the operand stream and the next block's wgmmas waited for it (dev/gemm/NOTES.md
// session 7).
inline constexpr int kModeScalePrefetch = 1;
// kModeGroupedRows (GemmTileConfig 256x128 on the grouped forms): 256-row tiles for grouped
// contiguous / masked launches (get_grouped_wide_tile), an instantiation of its own so that the
// dense 256x128 kernels keep their code.
inline constexpr int kModeGroupedRows = 2;
// kModeGatherA (fp8_gemm_nt_grouped_contiguous_gathered): the contiguous form's A rows gathered
// through a row index by the producer warpgroup's cp.async (produce_gathered; map_a carries a
// GatherSource instead of a TMA map); the math is the plain kernel's. 128-row tiles, 128 or 256
// wide, at least 3 stages. (16: gemm16's stage-wait variants, not landed, used 4 and 8.)
inline constexpr int kModeGatherA = 16;
// kModeMaskedCursor (the masked form's plain tiles up to 128x128): the producer and the math
// warpgroups look their tiles up from a cursor carried along their increasing tile numbers
// (MaskedCursor) instead of walking every group's row count from group 0 for each tile — a
// decoding step of 128 experts a rank made that walk thousands of cycles a tile. Its own
// instantiations, so that the other forms' kernels keep their code.
inline constexpr int kModeMaskedCursor = 32;

struct Tile {
  int group, m_base, n_base;
  int k_block_begin, num_k_blocks;
  int m_end;  // rows < m_end (in the group's row space) are real
};

// Tiles are numbered linearly; consecutive numbers sweep 16 N-blocks across the M-blocks so that
// the CTAs running at once share A and B tiles in L2.
__device__ __forceinline__ void rasterise(int t, int tiles_m, int tiles_n, int& mb, int& nb) {
  constexpr int kBand = 16;
  const int band = t / (kBand * tiles_m);
  const int in_band = t - band * kBand * tiles_m;
  const int band_n = min(kBand, tiles_n - band * kBand);
  mb = in_band / band_n;
  nb = band * kBand + in_band % band_n;
}

// Returns false when t is past the last tile; `skip` marks tiles with no work (padding tiles of
// the contiguous form, groups with no K).
// The k-grouped form with a device layout (p.grouped_layout set): K block b belongs to group
// layout[128 b] (-1: none), groups in increasing order, -1 blocks only after the last group's;
// returns the first K block of group g or later (a binary search: ~log2(K / 128) cached loads a
// tile, against a tile's K loop of at least one 128-deep block).
__device__ __forceinline__ int first_k_block_of_group(const GemmParams& p, int g) {
  int lo = 0, hi = p.k / 128;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    const int e = __ldg(p.grouped_layout + static_cast<int64_t>(mid) * 128);
    if (e >= 0 && e < g)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// kTail: the tail-split kernels; the others do not carry the tail mapping (it cost the unsplit
// 128x128 kernel 4 bytes of spill). kKLayout: the weight-gradient kernels, which alone may take
// the k-grouped form's device layout (the other kernels keep their code).
// Masked form: where a CTA's previous tile lay (its group and the tiles of the groups before it),
// so that a walk over increasing tile numbers resumes there instead of at group 0 (a decoding
// step of 128 experts a rank made each lookup a chain of dependent loads over every group).
struct MaskedCursor {
  int group = 0, tiles_before = 0;
};

template <int kBlockM, int kBlockN, bool kTail = false, bool kKLayout = false>
__device__ __forceinline__ bool get_tile(const GemmParams& p, int t, Tile& tile, bool& skip,
                                         MaskedCursor* cursor = nullptr) {
  const int tiles_n = (p.n + kBlockN - 1) / kBlockN;
  const int kb_total = p.k / 128;
  skip = false;
  int mb, nb;
  if (p.form == Form::kMasked) {
    // NOTE: a cursor is only ever moved forward: callers pass increasing t.
    int g = cursor != nullptr ? cursor->group : 0;
    int before = cursor != nullptr ? cursor->tiles_before : 0;
    t -= before;
    for (; g < p.num_groups; ++g) {
      const int mg = __ldg(p.masked_m + g);
      const int count = (mg + kBlockM - 1) / kBlockM * tiles_n;
      if (t < count) {
        rasterise(t, (mg + kBlockM - 1) / kBlockM, tiles_n, mb, nb);
        tile = Tile{g, mb * kBlockM, nb * kBlockN, 0, kb_total, mg};
        if (cursor != nullptr) *cursor = MaskedCursor{g, before};
        return true;
      }
      t -= count;
      before += count;
    }
    return false;
  }
  const int tiles_m = (p.m + kBlockM - 1) / kBlockM;
  if (p.cluster == 2) {
    // Dense only (the host checks): t numbers CTA pairs, each pair two adjacent M-blocks.
    if (t >= tiles_m / 2 * tiles_n) return false;
    rasterise(t, tiles_m / 2, tiles_n, mb, nb);
    mb = 2 * mb + static_cast<int>(cluster_ctarank());
    tile = Tile{0, mb * kBlockM, nb * kBlockN, 0, kb_total, p.m};
    return true;
  }
  const int per_group = tiles_m * tiles_n;
  int g = 0, slice = 0, slices = p.split_k;
  if (p.form == Form::kKGrouped) {
    g = t / per_group;
    if (g >= p.num_groups) return false;
    t -= g * per_group;
  } else if (kTail && t >= p.tail_begin) {
    // Tail split: the slices of one tail tile are consecutive units (they run at the same time).
    const int u = t - p.tail_begin;
    if (u >= (per_group - p.tail_begin) * p.tail_split) return false;
    slices = p.tail_split;
    slice = u % slices;
    t = p.tail_begin + u / slices;
  } else if (p.split_k > 1) {
    // Dense split-K: the slices of one tile are consecutive units (they run at the same time).
    if (t >= per_group * p.split_k) return false;
    slice = t % p.split_k;
    t /= p.split_k;
  } else if (t >= per_group) {
    return false;
  }
  rasterise(t, tiles_m, tiles_n, mb, nb);
  tile = Tile{g, mb * kBlockM, nb * kBlockN, 0, kb_total, p.m};
  if (slices > 1) {
    tile.k_block_begin = slice * kb_total / slices;
    tile.num_k_blocks = (slice + 1) * kb_total / slices - tile.k_block_begin;
  }
  if (p.form == Form::kContiguous) {
    tile.group = __ldg(p.grouped_layout + tile.m_base);
    skip = tile.group < 0;
  } else if (p.form == Form::kKGrouped) {
    if (kKLayout && p.grouped_layout != nullptr) {
      tile.k_block_begin = first_k_block_of_group(p, g);
      tile.num_k_blocks = first_k_block_of_group(p, g + 1) - tile.k_block_begin;
    } else {
      tile.k_block_begin = p.k_block_offsets[g];
      tile.num_k_blocks = p.k_block_offsets[g + 1] - tile.k_block_begin;
    }
    // An overwritten D gets its zeros from a tile with no K blocks (the weight gradient only).
    skip = tile.num_k_blocks == 0 && !(kKLayout && p.overwrite);
  }
  return true;
}

// 256-row tiles (dense). With p.half_col (N % 128 in (0, 64]: the last tile column is at most
// half full) units below `full` are the tiles of the other columns in get_tile's order, and unit
// full + q is the pair of 64-wide half tiles at M-blocks 2q and 2q + 1 of the last column, run
// one after the other by the same CTA with 64-wide wgmmas: every unit is one full tile of work,
// so 4096 x 2112 is 256 + 8 units = exactly 2 waves on 132 SMs (padded: 272 tiles, 2.06 waves).
// Without half_col (or in the tail-split kernel) get_tile's units, one tile each.
struct WideCursor {
  int unit, half;  // half: which tile of a pair
};

// 128x256 tiles: get_tile's units (every form), never narrow.
template <int kBlockM, int kBlockN, bool kTail>
__device__ __forceinline__ bool get_wide_tile(const GemmParams& p, const WideCursor& c, Tile& tile,
                                              bool& skip, bool& narrow) {
  narrow = false;
  if constexpr (kBlockM != 256) {
    return get_tile<kBlockM, kBlockN, false>(p, c.unit, tile, skip);
  } else {
    if (kTail || !p.half_col) return get_tile<256, kBlockN, kTail>(p, c.unit, tile, skip);
    const int tiles_m = (p.m + 255) / 256, tiles_n = (p.n + kBlockN - 1) / kBlockN;
    const int full = tiles_m * (tiles_n - 1);
    skip = false;
    if (c.unit < full) {
      int mb, nb;
      rasterise(c.unit, tiles_m, tiles_n - 1, mb, nb);
      tile = Tile{0, mb * 256, nb * kBlockN, 0, p.k / 128, p.m};
      return true;
    }
    // The second tile of the last pair may not exist (odd tile rows); it is that CTA's last unit.
    const int mb = 2 * (c.unit - full) + c.half;
    if (mb >= tiles_m) return false;
    narrow = true;
    tile = Tile{0, mb * 256, (tiles_n - 1) * kBlockN, 0, p.k / 128, p.m};
    return true;
  }
}

// 256x128 tiles of the grouped forms (kModeGroupedRows). Contiguous: unit u is the 256-row tile
// at M-blocks 2q, 2q + 1 of one tile column (rasterise order over 256-row blocks). Where both
// 128-row halves start with the same expert it is one tile (its padding rows are computed, not
// stored); else (an expert boundary at the middle, a padding block, the second half past M) its
// halves run one after the other as 128-row tiles of their own experts (`halves`, c.half), a
// padding half skipped, so that both slabs of a tile always read one expert's B. Masked:
// get_tile's 256-row tiles per group. `rows128`: only the first 128 rows of the tile hold
// anything (a half, or a masked group's last tile of <= 128 rows): slab 1 is neither computed nor
// stored.
__device__ __forceinline__ bool get_grouped_wide_tile(const GemmParams& p, const WideCursor& c,
                                                      Tile& tile, bool& skip, bool& halves,
                                                      bool& rows128) {
  halves = false;
  if (p.form == Form::kMasked) {
    if (!get_tile<256, 128, false>(p, c.unit, tile, skip)) return false;
    rows128 = tile.m_end - tile.m_base <= 128;
    return true;
  }
  const int tiles_m = (p.m + 255) / 256, tiles_n = (p.n + 127) / 128;
  if (c.unit >= tiles_m * tiles_n) return false;
  int mb, nb;
  rasterise(c.unit, tiles_m, tiles_n, mb, nb);
  const int m0 = mb * 256;
  const int g0 = __ldg(p.grouped_layout + m0);
  const int g1 = m0 + 128 < p.m ? __ldg(p.grouped_layout + m0 + 128) : -1;
  tile = Tile{g0, m0, nb * 128, 0, p.k / 128, p.m};
  rows128 = g0 != g1;
  halves = rows128;
  if (halves && c.half == 1) {
    tile.group = g1;
    tile.m_base = m0 + 128;
  }
  skip = tile.group < 0;
  return true;
}

// The tile walk of the wide kernels: get_grouped_wide_tile in the grouped 256-row kernel,
// get_wide_tile in the others (rows128 stays false there).
template <int kBlockM, int kBlockN, bool kTail, bool kGroupedRows>
__device__ __forceinline__ bool next_wide_tile(const GemmParams& p, const WideCursor& c, Tile& tile,
                                               bool& skip, bool& narrow, bool& rows128) {
  if constexpr (kGroupedRows)
    return get_grouped_wide_tile(p, c, tile, skip, narrow, rows128);
  else
    return get_wide_tile<kBlockM, kBlockN, kTail>(p, c, tile, skip, narrow);
}

__device__ __forceinline__ void advance_wide(WideCursor& c, int step, bool narrow) {
  if (narrow && c.half == 0) {
    c.half = 1;
  } else {
    c.unit += step;
    c.half = 0;
  }
}

template <int kBlockM, int kBlockN, bool kWgrad>
struct SmemLayout {
  // Output staging for the TMA store (one 64-row slab per math warpgroup; BF16, or FP32 for the
  // weight gradient's reduce-add), then the stages.
  static constexpr int kDBytes = kBlockM * kBlockN * (kWgrad ? 4 : 2);
  static constexpr int kABytes = kBlockM * 128;
  static constexpr int kBBytes = kBlockN * 128;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kTxBytes = kABytes + kBBytes + kBlockM * 4 + (kWgrad ? kBlockN * 4 : 0);
  static_assert(kDBytes % 1024 == 0 && kABytes % 1024 == 0 && kBBytes % 1024 == 0,
                "128-byte swizzled tiles need 1024-byte alignment");
  uint8_t* base;
  int stages;
  int d_bytes;  // kDBytes with the TMA-store epilogue, 0 without (more stages fit)
  __device__ uint8_t* d() const { return base; }
  __device__ uint8_t* a(int s) const { return base + d_bytes + s * kStageBytes; }
  __device__ uint8_t* b(int s) const { return a(s) + kABytes; }
  __device__ float* sa(int s) const {
    return reinterpret_cast<float*>(base + d_bytes + stages * kStageBytes) + s * kBlockM;
  }
  __device__ float* sb(int s) const {
    return reinterpret_cast<float*>(base + d_bytes + stages * (kStageBytes + kBlockM * 4)) +
           s * kBlockN;
  }
  __device__ uint64_t* full(int s) const {
    return reinterpret_cast<uint64_t*>(
               base + d_bytes + stages * (kStageBytes + kBlockM * 4 + (kWgrad ? kBlockN * 4 : 0))) +
           s;
  }
  __device__ uint64_t* empty(int s) const { return full(stages) + s; }
};

struct PipeState {
  int stage = 0;
  uint32_t phase = 0;
  __device__ void advance(int stages) {
    if (++stage == stages) {
      stage = 0;
      phase ^= 1u;
    }
  }
};

// ---- producer: one thread issues every TMA load ----
template <int kBlockM, int kBlockN, bool kWgrad, bool kTail, int kMode = 0>
__device__ __forceinline__ void produce(const GemmParams& p,
                                        const SmemLayout<kBlockM, kBlockN, kWgrad>& sm,
                                        const CUtensorMap* map_a, const CUtensorMap* map_b,
                                        const CUtensorMap* map_sa, const CUtensorMap* map_sb) {
  using Layout = SmemLayout<kBlockM, kBlockN, kWgrad>;
  const int kb_total = p.k / 128;
  PipeState pipe;
  Tile tile;
  bool skip;
  const int first = blockIdx.x / p.cluster, step = gridDim.x / p.cluster;
  const uint32_t rank = p.cluster == 2 ? cluster_ctarank() : 0;
  if constexpr (kBlockM == 256) {
    // The same loads as below over get_wide_tile's units (the two half tiles of a pair one
    // after the other). NOTE: kept identical to the loop below (a loader without the group and
    // pair cases made ptxas serialise the 256-row kernel's wgmmas: C7511, register resources).
    const auto load_tile = [&](const Tile& tile) {
      const bool per_group_a = p.form == Form::kMasked;
      const bool per_group_b = p.form == Form::kContiguous || p.form == Form::kMasked;
      const int a_row = (per_group_a ? tile.group * p.m : 0) + tile.m_base;
      const int b_row = (per_group_b ? tile.group * p.n : 0) + tile.n_base;
      for (int kb = 0; kb < tile.num_k_blocks; ++kb) {
        const int kbg = tile.k_block_begin + kb;
        mbar_wait(sm.empty(pipe.stage), pipe.phase ^ 1u);
        uint64_t* full = sm.full(pipe.stage);
        mbar_arrive_expect_tx(full, Layout::kTxBytes);
        tma_load_2d(sm.a(pipe.stage), map_a, full, kbg * 128, a_row);
        if (p.cluster == 2) {
          constexpr int kHalf = kBlockN / 2;
          tma_load_2d_multicast(sm.b(pipe.stage) + rank * kHalf * 128, map_b, full, kbg * 128,
                                b_row + static_cast<int>(rank) * kHalf, 0x3);
        } else {
          tma_load_2d(sm.b(pipe.stage), map_b, full, kbg * 128, b_row);
        }
        tma_load_2d(sm.sa(pipe.stage), map_sa, full, tile.m_base,
                    (per_group_a ? tile.group * kb_total : 0) + kbg);
        pipe.advance(sm.stages);
      }
    };
    // (A 128-row tile of the grouped kernel loads the whole 256-row A box from its first row:
    // the rows past it are the next tile's or zero-filled past the end, and never read.)
    bool narrow, rows128 = false;
    for (WideCursor c{first, 0};
         next_wide_tile<256, kBlockN, kTail, (kMode & kModeGroupedRows) != 0>(p, c, tile, skip,
                                                                              narrow, rows128);
         advance_wide(c, step, narrow))
      if (!skip) load_tile(tile);
  } else {
    MaskedCursor cursor;
    MaskedCursor* const cur = (kMode & kModeMaskedCursor) != 0 ? &cursor : nullptr;
    for (int t = first; get_tile<kBlockM, kBlockN, kTail, kWgrad>(p, t, tile, skip, cur);
         t += step) {
      if (skip) continue;
      const bool per_group_a = p.form == Form::kMasked;
      const bool per_group_b = p.form == Form::kContiguous || p.form == Form::kMasked;
      const int a_row = (per_group_a ? tile.group * p.m : 0) + tile.m_base;
      const int b_row = (per_group_b ? tile.group * p.n : 0) + tile.n_base;
      for (int kb = 0; kb < tile.num_k_blocks; ++kb) {
        const int kbg = tile.k_block_begin + kb;
        mbar_wait(sm.empty(pipe.stage), pipe.phase ^ 1u);
        uint64_t* full = sm.full(pipe.stage);
        mbar_arrive_expect_tx(full, Layout::kTxBytes);
        tma_load_2d(sm.a(pipe.stage), map_a, full, kbg * 128, a_row);
        if (p.cluster == 2) {
          // Each CTA of the pair loads half of the B tile into both.
          constexpr int kHalf = kBlockN / 2;
          tma_load_2d_multicast(sm.b(pipe.stage) + rank * kHalf * 128, map_b, full, kbg * 128,
                                b_row + static_cast<int>(rank) * kHalf, 0x3);
        } else {
          tma_load_2d(sm.b(pipe.stage), map_b, full, kbg * 128, b_row);
        }
        tma_load_2d(sm.sa(pipe.stage), map_sa, full, tile.m_base,
                    (per_group_a ? tile.group * kb_total : 0) + kbg);
        if constexpr (kWgrad) tma_load_2d(sm.sb(pipe.stage), map_sb, full, tile.n_base, kbg);
        pipe.advance(sm.stages);
      }
    }
  }
}

// ---- producer of the gathered contiguous form (kModeGatherA): the producer warpgroup ----
// Where A's rows come from: passed in the bytes of map_a (a gathered launch has no TMA map of A).
struct GatherSource {
  const uint8_t* base;   // source row 0
  int64_t stride;        // bytes between source rows
  const int32_t* index;  // [m]: source row of each logical row, < 0 for padding
};
static_assert(sizeof(GatherSource) <= sizeof(CUtensorMap), "the gather source rides in map_a");
// Full-barrier arrivals of a gathered stage: the producer warpgroup's 128 threads' (the two TMA
// issuing lanes post their bytes with mbarrier.expect_tx, which does not arrive).
inline constexpr int kGatherFullArrivals = 128;

// The whole producer warpgroup runs it. B comes by TMA from thread 0, the A scales by TMA from
// lane 0 of warp 1 (below); A by cp.async, 16 bytes a thread: warp w copies tile rows 32w .. 32w +
// 31, instruction i of a K block rows 32w + 4i .. + 3, 8 lanes a row (one 128-byte line each, 4
// whole lines a warp), into the 128-byte swizzled place the TMA box would have used (chunk c of row
// r at r * 128 + (c ^ r % 8) * 16). Per tile each lane reads its row's source index and gathers, by
// shuffle, the 8 source offsets (16-byte units) its copies need. Padding rows (index < 0) are
// zero-filled, nothing read.
// A stage's A rows count as landed once each thread's copies have completed
// (cp.async.wait_group) and it has fenced them for the async proxy that wgmma reads through; then
// each thread arrives on the stage's full barrier. That happens kDepth K blocks late (the copies
// of kDepth + 1 blocks in flight): a stage's arrival waits for the empty barrier of the stage
// kDepth blocks on, which the consumers free only once they hold the block after the one it
// held (the K loops look one full barrier ahead), so kDepth <= stages - 2: 1 with 3 stages, 2 with
// 4 or more (the host asks for at least 3).
// The producer warps share the SM's issue slots with the math warps, so the K loop is kept short
// (session 12, gemm20): one 64-bit column pointer a K block (cp_async_16_row), padding as a bit
// mask, not a select per copy, the depth a template parameter. A tile's first copies wait for no
// global load (session 12, gemm21): the next tile's number, group and row index are loaded at the
// start of the current tile (get_tile's order and skips for this launch: the contiguous form, one
// CTA a cluster, no split-K); loaded at the tile's start, the group and then the index were two
// global loads on the copy path once a tile.
// The TMA issue is split over two warps (session 13, gemm23's gp1): thread 0 issues B only, lane 0
// of warp 1 the A scales, each right after the empty wait and before its warp's copies, each
// posting its own bytes (mbar_expect_tx; both arrive for the stage kDepth blocks later, so the
// phase cannot complete before both have posted). With both loads and the arrive.expect_tx on
// thread 0, warp 0's copies and its arrival came ~25 SASS instructions after the other warps'
// each K block; B itself cannot leave sooner (thread 0 already waits when the stage frees).
// Measured (dev/gemm/NOTES.md sessions 10, 12 and 13, bit-identical every time), gathered /
// contiguous GEMM: one {128 K, 1 row} TMA box per row 4.0x (H100); one producer warp's
// cp.async 2.2-2.5x (H100); this warpgroup as written in session 10 1.15-1.20x at the 128x256 picks
// (H100) and 1.12-1.14x (H200); with the short K loop 1.02-1.07x (H200), 1.02-1.12x (H100); with
// the next tile's loads ahead 1.01-1.04x (H100, H200), 0.93-1.00x the short K loop alone (6 runs);
// with the TMA issue split 0.970-0.993x that (H100, two runs) and 0.987-1.003x (H200, neutral).
template <int kBlockM, int kBlockN, int kDepth>
__device__ __forceinline__ void produce_gathered(const GemmParams& p,
                                                 const SmemLayout<kBlockM, kBlockN, false>& sm,
                                                 const GatherSource& src_rows,
                                                 const CUtensorMap* map_b,
                                                 const CUtensorMap* map_sa) {
  using Layout = SmemLayout<kBlockM, kBlockN, false>;
  static_assert(kBlockM == 128, "gathered: one producer warp per 32 rows");
  static_assert(kDepth == 1 || kDepth == 2, "arrivals 1 (3 stages) or 2 (4 or more) blocks late");
  const int thread = static_cast<int>(threadIdx.x % 128);
  const int warp = thread / 32, lane = thread % 32;
  const int chunk = lane % 8;
  // This lane's places in stage 0 for even and odd copies (rows 4i + lane / 8 have r % 8 =
  // lane / 8 for even i, 4 + lane / 8 for odd i); copy i adds i * 512, stage s s * kStageBytes.
  const uint32_t row0 = smem_addr(sm.a(0)) + static_cast<uint32_t>((32 * warp + lane / 8) * 128);
  const uint32_t dst_even = row0 + static_cast<uint32_t>((chunk ^ (lane / 8)) * 16);
  const uint32_t dst_odd = row0 + static_cast<uint32_t>((chunk ^ (4 + lane / 8)) * 16);
  const uint8_t* const col0 = src_rows.base + chunk * 16;
  const uint32_t stride16 = static_cast<uint32_t>(src_rows.stride / 16);
  PipeState pipe;
  int pending[kDepth];  // stages issued, not yet arrived for (pending[kDepth - 1] the oldest)
#pragma unroll
  for (int j = 0; j < kDepth; ++j) pending[j] = -1;

  // One tile: its rows' offsets by shuffle, then its K blocks.
  const auto run_tile = [&](int row, int group, int m_base, int n_base, int k_blocks) {
    // Source offsets in 16-byte units (the host checks that they fit 32 bits); padding rows get
    // offset 0 (a valid address; nothing is read with src_bytes 0) and a clear bit in `real`.
    const uint32_t mine = row >= 0 ? static_cast<uint32_t>(row) * stride16 : 0xffffffffu;
    uint32_t off[8], real = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      off[i] = __shfl_sync(0xffffffffu, mine, 4 * i + lane / 8);
      if (off[i] != 0xffffffffu)
        real |= 1u << i;
      else
        off[i] = 0;
    }
    const int b_row = group * p.n + n_base;
    for (int kbg = 0; kbg < k_blocks; ++kbg) {
      mbar_wait(sm.empty(pipe.stage), pipe.phase ^ 1u);
      // NOTE: one branch per issuing lane with warp-uniform operands: ptxas keeps them in uniform
      // registers (one call site with lane-dependent operands put 3 R2UR and 5 more instructions
      // before B's TMA, and a spill in the depth-2 loop).
      if (thread == 0) {
        mbar_expect_tx(sm.full(pipe.stage), Layout::kBBytes);
        tma_load_2d(sm.b(pipe.stage), map_b, sm.full(pipe.stage), kbg * 128, b_row);
      } else if (thread == 32) {
        mbar_expect_tx(sm.full(pipe.stage), kBlockM * 4);  // FP32 A scales
        tma_load_2d(sm.sa(pipe.stage), map_sa, sm.full(pipe.stage), m_base, kbg);
      }
      const uint32_t stage_bytes = static_cast<uint32_t>(pipe.stage * Layout::kStageBytes);
      const uint8_t* const col = col0 + static_cast<uint32_t>(kbg) * 128u;
#pragma unroll
      for (int i = 0; i < 8; ++i)
        cp_async_16_row((i % 2 == 0 ? dst_even : dst_odd) + stage_bytes + i * 512, col, off[i],
                        (real >> i & 1u) != 0 ? 16 : 0);
      cp_async_commit();
      if (pending[kDepth - 1] >= 0) {
        cp_async_wait<kDepth>();
        fence_proxy_async();
        mbar_arrive(sm.full(pending[kDepth - 1]));
      }
#pragma unroll
      for (int j = kDepth - 1; j > 0; --j) pending[j] = pending[j - 1];
      pending[0] = pipe.stage;
      pipe.advance(sm.stages);
    }
  };

  // get_tile's tiles for this launch, with tile t + gridDim.x's loads issued before tile t's
  // K blocks (a padding tile's index is read too: it is in bounds, and unused).
  const int tiles_n = (p.n + kBlockN - 1) / kBlockN;
  const int tiles_m = (p.m + kBlockM - 1) / kBlockM;
  const int total = tiles_m * tiles_n;
  int next_m = 0, next_n = 0, next_group = -1, next_row = -1;
  const auto fetch = [&](int u) {
    int mb, nb;
    rasterise(u, tiles_m, tiles_n, mb, nb);
    next_m = mb * kBlockM;
    next_n = nb * kBlockN;
    next_group = __ldg(p.grouped_layout + next_m);
    next_row = __ldg(src_rows.index + next_m + thread);
  };
  const int step = static_cast<int>(gridDim.x);
  if (static_cast<int>(blockIdx.x) < total) fetch(static_cast<int>(blockIdx.x));
  for (int t = static_cast<int>(blockIdx.x); t < total; t += step) {
    const int m_base = next_m, n_base = next_n, group = next_group, row = next_row;
    if (t + step < total) fetch(t + step);
    if (group < 0) continue;
    run_tile(row, group, m_base, n_base, p.k / 128);
  }
  cp_async_wait<0>();
  fence_proxy_async();
#pragma unroll
  for (int j = kDepth - 1; j >= 0; --j)
    if (pending[j] >= 0) mbar_arrive(sm.full(pending[j]));
}

// A stage is free once every consumer warp of every CTA that reads it (both of a pair, whose
// B halves land in each other's shared memory) has arrived.
// Called by every lane; the leader (lane 0) arrives for the warp. Predicated, not branched, in
// both cases: a branch here sits on the math warps' critical path once per K block (v8/v9 in
// dev/gemm/NOTES.md).
__device__ __forceinline__ void release_stage(uint64_t* empty, bool pair, bool leader) {
  mbar_release(empty, leader && !pair, leader && pair);
}
// The same for the weight-gradient kernels: mbar_release_defined holds no peer-address registers
// across the K loop (with mbar_release, ~30 registers and 120 bytes of spill at 128x128).
__device__ __forceinline__ void release_stage_wgrad(uint64_t* empty, bool pair, bool leader) {
  mbar_release_defined(empty, leader && !pair, leader && pair);
}

// ---- math: one warpgroup per 64 rows ----
// One warpgroup's 64 x kBlockN slab of BF16 into the 128-byte swizzled staging layout
// (conflict-free: the 8 rows of a store land in 8 different 16-byte chunks).
template <int kBlockN, int kRegs>
__device__ __forceinline__ void write_slab(const float (&acc)[kRegs], uint8_t* slab) {
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
#pragma unroll
  for (int c = 0; c < kBlockN / 8; ++c) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = warp * 16 + lane / 4 + 8 * i;
      uint8_t* dst =
          slab + (c / 8) * (64 * 128) + r * 128 + (((c % 8) ^ (r % 8)) * 16) + (lane % 4) * 4;
      *reinterpret_cast<__nv_bfloat162*>(dst) =
          __floats2bfloat162_rn(acc[4 * c + 2 * i], acc[4 * c + 2 * i + 1]);
    }
  }
}

// The TMA stores of one staged slab (by the warpgroup's leader), 64-column boxes inside N.
template <int kBlockN>
__device__ __forceinline__ void store_slab_boxes(uint8_t* slab, const CUtensorMap* map_d, int n,
                                                 int n_base, int64_t row) {
#pragma unroll
  for (int box = 0; box < kBlockN / 64; ++box)
    if (n_base + box * 64 < n)
      tma_store_2d(map_d, slab + box * (64 * 128), n_base + box * 64, static_cast<int32_t>(row));
}

// BF16 epilogue through shared memory: the warpgroup writes its 64 x kBlockN slab, one thread
// stores it with TMA in 64-column boxes and the next tile's math starts while it drains.
template <int kBlockN, int kRegs>
__device__ __forceinline__ void store_slab_tma(const float (&acc)[kRegs], uint8_t* slab,
                                               const CUtensorMap* map_d, int n, int n_base,
                                               int64_t row) {
  const bool leader = threadIdx.x % 128 == 0;
  const int bar_id = 1 + static_cast<int>(threadIdx.x / 128);
  if (leader) tma_store_wait_read();  // the previous tile's store has left the buffer
  named_barrier_sync(bar_id, 128);
  write_slab<kBlockN>(acc, slab);
  fence_proxy_async();
  named_barrier_sync(bar_id, 128);
  if (leader) {
    store_slab_boxes<kBlockN>(slab, map_d, n, n_base, row);
    tma_store_commit();
  }
}

// The same for a warpgroup holding two slabs (256-row tiles: two row ranges, 128x256 tiles: two
// column ranges): one wait and one barrier pair for both, so the second slab's writes do not
// wait for the first slab's store to be read.
template <int kBlockN, int kRegs>
__device__ __forceinline__ void store_two_slabs_tma(const float (&acc0)[kRegs],
                                                    const float (&acc1)[kRegs], uint8_t* slab0,
                                                    uint8_t* slab1, const CUtensorMap* map_d, int n,
                                                    int n_base0, int n_base1, int64_t row0,
                                                    int64_t row1) {
  const bool leader = threadIdx.x % 128 == 0;
  const int bar_id = 1 + static_cast<int>(threadIdx.x / 128);
  if (leader) tma_store_wait_read();
  named_barrier_sync(bar_id, 128);
  write_slab<kBlockN>(acc0, slab0);
  write_slab<kBlockN>(acc1, slab1);
  fence_proxy_async();
  named_barrier_sync(bar_id, 128);
  if (leader) {
    store_slab_boxes<kBlockN>(slab0, map_d, n, n_base0, row0);
    store_slab_boxes<kBlockN>(slab1, map_d, n, n_base1, row1);
    tma_store_commit();
  }
}

// Split-K fix-up, one warp (16 rows x kBlockN) at a time: every slice stores its FP32 partials
// and arrives on the strip's counter; the warp that arrives last re-reads all split_k partials
// (its own included) and adds them in slice order 0, 1, ..., so the sum, and the BF16 result,
// do not depend on which slice finished last (bit-reproducible run to run). It resets the
// counter for the next call and returns true: it goes on to store the tile's strip. The others
// return false. Partials are laid out per warp as [kRegs / 4][lane] float4 (coalesced).
// `unit` is the work unit get_tile was given: tile number * split_k + slice (recomputed here
// rather than kept in Tile, whose registers are live across the main loop).
template <int kBlockM, int kRegs>
__device__ __forceinline__ bool split_k_reduce(const GemmParams& p, int unit, float (&acc)[kRegs]) {
  static_assert(kRegs % 4 == 0, "float4 partials");
  constexpr int kWarps = kBlockM / 16;
  constexpr int kVec = kRegs / 4;
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  const int index = unit / p.split_k, slice = unit - index * p.split_k;
  const auto slot = [&](int s) {
    return reinterpret_cast<float4*>(p.partials) +
           ((static_cast<int64_t>(index) * p.split_k + s) * kWarps + warp) * (32 * kVec) + lane;
  };
  float4* mine = slot(slice);
#pragma unroll
  for (int v = 0; v < kVec; ++v)
    __stcg(mine + 32 * v, make_float4(acc[4 * v], acc[4 * v + 1], acc[4 * v + 2], acc[4 * v + 3]));
  // NOTE: each lane's fence orders its own stores before the leader's arrival (the classic
  // last-block pattern); the counter is reset by the last arrival, so it reads 0 at every launch.
  __threadfence();
  __syncwarp();
  int last = 0;
  if (lane == 0) {
    int* counter = p.counters + static_cast<int64_t>(index) * kWarps + warp;
    last = atomicAdd(counter, 1) == p.split_k - 1;
    if (last) atomicExch(counter, 0);
  }
  last = __shfl_sync(0xffffffffu, last, 0);
  if (!last) return false;
  __threadfence();
  // NOTE: a shuffle does not order memory: only lane 0 observed the other slices' arrivals, so
  // the other lanes' partial loads are ordered after its fence by this warp barrier (which does
  // order memory among the lanes). Session 3 saw one non-reproducible split-K result.
  __syncwarp();
  // -0.0f + x == x for every x (+0.0f would turn -0 into +0): the sum starts exactly at slice 0.
#pragma unroll
  for (int i = 0; i < kRegs; ++i) acc[i] = -0.0f;
  // Two slices' loads in flight per step (an L2 round trip each), added in slice order.
  for (int s = 0; s < p.split_k; s += 2) {
    const bool two = s + 1 < p.split_k;
    const float4* src0 = slot(s);
    const float4* src1 = slot(two ? s + 1 : s);
    float4 v0[kVec], v1[kVec];
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      v0[v] = __ldcg(src0 + 32 * v);
      v1[v] = two ? __ldcg(src1 + 32 * v) : make_float4(-0.0f, -0.0f, -0.0f, -0.0f);
    }
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      acc[4 * v + 0] = (acc[4 * v + 0] + v0[v].x) + v1[v].x;
      acc[4 * v + 1] = (acc[4 * v + 1] + v0[v].y) + v1[v].y;
      acc[4 * v + 2] = (acc[4 * v + 2] + v0[v].z) + v1[v].z;
      acc[4 * v + 3] = (acc[4 * v + 3] + v0[v].w) + v1[v].w;
    }
  }
  return true;
}

// Tail-split fix-up (stream-K of the last partial wave), one warp (16 rows x kBlockN) at a time,
// for the units at or past p.tail_begin. Each slice stores its FP32 partials (only the column
// groups inside N: a tail tile of the last tile column may be partly past it) and arrives on the
// strip's counter; the warp that arrives last adds the tail_split partials in slice order
// 0, 1, ... from the workspace, so the sum, and the BF16 result, do not depend on which slice
// finished last. It resets the counter for the next call and returns true: it goes on to
// store the strip. The others return false. Same counter region and partial layout as
// split_k_reduce (a launch uses one or the other), indexed by the tail tile.
// `warp`: the 16-row strip of the tile this warp's acc holds (threadIdx.x / 32, or + 8 for the
// second slab of a 256-row tile).
template <int kBlockM, int kBlockN, int kRegs>
__device__ __forceinline__ bool tail_split_reduce(const GemmParams& p, int unit, int n_base,
                                                  float (&acc)[kRegs], int warp) {
  static_assert(kRegs % 4 == 0 && kRegs / 4 == kBlockN / 8, "float4 = one 8-column group");
  constexpr int kWarps = kBlockM / 16;
  constexpr int kVec = kRegs / 4;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int u = unit - p.tail_begin;
  const int index = u / p.tail_split, slice = u - index * p.tail_split;
  const int live = min(kVec, (p.n - n_base + 7) / 8);  // column groups inside N
  const auto slot = [&](int s) {
    return reinterpret_cast<float4*>(p.partials) +
           ((static_cast<int64_t>(index) * p.tail_split + s) * kWarps + warp) * (32 * kVec) + lane;
  };
  float4* mine = slot(slice);
#pragma unroll
  for (int v = 0; v < kVec; ++v)
    if (v < live)
      __stcg(mine + 32 * v,
             make_float4(acc[4 * v], acc[4 * v + 1], acc[4 * v + 2], acc[4 * v + 3]));
  // NOTE: every lane fences its own stores before the warp barrier and lane 0's arrival; on the
  // last arrival lane 0 fences again and the warp barrier orders the other lanes' loads after it.
  __threadfence();
  __syncwarp();
  int last = 0;
  if (lane == 0) {
    int* counter = p.counters + static_cast<int64_t>(index) * kWarps + warp;
    last = atomicAdd(counter, 1) == p.tail_split - 1;
    if (last) atomicExch(counter, 0);
  }
  last = __shfl_sync(0xffffffffu, last, 0);
  if (!last) return false;
  __threadfence();
  __syncwarp();
  // -0.0f + x == x for every x: the sum starts exactly at slice 0. All slices, this one too, are
  // read back from the workspace: keeping this one in registers beside the sum cost the 128x128
  // kernel 4 more bytes of spill (ptxas -v, then with both fix-ups in one kernel: 16 vs 12).
#pragma unroll
  for (int i = 0; i < kRegs; ++i) acc[i] = -0.0f;
  for (int s = 0; s < p.tail_split; ++s) {
    const float4* src = slot(s);
    float4 v0[kVec];
#pragma unroll
    for (int v = 0; v < kVec; ++v)
      v0[v] = v < live ? __ldcg(src + 32 * v) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      acc[4 * v + 0] += v0[v].x;
      acc[4 * v + 1] += v0[v].y;
      acc[4 * v + 2] += v0[v].z;
      acc[4 * v + 3] += v0[v].w;
    }
  }
  return true;
}

// Weight-gradient epilogue: D (FP32) += the tile (= the tile when p.overwrite). Every load of D is
// issued before the first store. Written as load, add, store per element pair, the loads wait
// behind the stores before them (nothing tells the compiler they do not alias): 32 DRAM round trips
// in a row per tile, which made the 1x128 x 1x128 kernel ~3x slower than the BF16-output one.
template <int kBlockN>
__device__ __forceinline__ void accumulate_fp32(const GemmParams& p, const Tile& tile,
                                                int64_t row_base, int row_in_tile, int col_in_frag,
                                                const float (&acc)[kBlockN / 2]) {
  float* const d = static_cast<float*>(p.d);
  float2 old[2][kBlockN / 8];
  bool row_ok[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row_ok[i] = tile.m_base + row_in_tile + 8 * i < tile.m_end;
    const int64_t grow = row_base + row_in_tile + 8 * i;
#pragma unroll
    for (int c = 0; c < kBlockN / 8; ++c) {
      const int col = tile.n_base + 8 * c + col_in_frag;
      old[i][c] = row_ok[i] && col < p.n && !p.overwrite
                      ? *reinterpret_cast<const float2*>(d + grow * p.n + col)
                      : make_float2(0.0f, 0.0f);
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t grow = row_base + row_in_tile + 8 * i;
#pragma unroll
    for (int c = 0; c < kBlockN / 8; ++c) {
      const int col = tile.n_base + 8 * c + col_in_frag;
      if (!row_ok[i] || col >= p.n) continue;
      *reinterpret_cast<float2*>(d + grow * p.n + col) =
          make_float2(old[i][c].x + acc[4 * c + 2 * i], old[i][c].y + acc[4 * c + 2 * i + 1]);
    }
  }
}

// The same through shared memory: the warpgroup writes its 64 x kBlockN FP32 slab in 32-column
// boxes (128-byte swizzled rows: the 8 rows of a store land in 8 different 16-byte chunks), one
// thread hands each box to TMA as a reduce-add into D (a plain store when D is overwritten), and
// the next tile's math starts while L2 does the additions (no DRAM round trip in the math warps'
// path).
template <int kBlockN>
__device__ __forceinline__ void reduce_slab_tma(const float (&acc)[kBlockN / 2], uint8_t* slab,
                                                const CUtensorMap* map_d, int n, int n_base,
                                                int64_t row, bool overwrite) {
  const bool leader = threadIdx.x % 128 == 0;
  const int bar_id = 1 + static_cast<int>(threadIdx.x / 128);
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  if (leader) tma_store_wait_read();  // the previous tile's reduction has read the buffer
  named_barrier_sync(bar_id, 128);
#pragma unroll
  for (int c = 0; c < kBlockN / 8; ++c) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = warp * 16 + lane / 4 + 8 * i;
      const int chunk = 2 * (c % 4) + (lane % 4) / 2;
      uint8_t* dst =
          slab + (c / 4) * (64 * 128) + r * 128 + ((chunk ^ (r % 8)) * 16) + (lane % 2) * 8;
      *reinterpret_cast<float2*>(dst) = make_float2(acc[4 * c + 2 * i], acc[4 * c + 2 * i + 1]);
    }
  }
  fence_proxy_async();
  named_barrier_sync(bar_id, 128);
  if (leader) {
#pragma unroll
    for (int box = 0; box < kBlockN / 32; ++box)
      if (n_base + box * 32 < n) {
        if (overwrite)
          tma_store_2d(map_d, slab + box * (64 * 128), n_base + box * 32,
                       static_cast<int32_t>(row));
        else
          tma_reduce_add_2d(map_d, slab + box * (64 * 128), n_base + box * 32,
                            static_cast<int32_t>(row));
      }
    tma_store_commit();
  }
}

// The weight-gradient main loop with two partial-sum sets (see kOverlap in compute). H100,
// session 7, same call, TMA reduce-add epilogue: 7168x2048x4096 151-153 us against 168-169
// without, k-grouped 588-607 against 664-667 (dev/gemm/NOTES.md "Session 7"). The registers
// epilogue (partial 64-row slabs of the k-grouped form, or forced) gets slower with it: 219-225 us
// against 175-179 (ptxas: 120 bytes of spill at 128x128).
constexpr bool kWgradOverlap = true;
// Longest straight-line run of K blocks in the weight-gradient loop. Each run ends with a wait for
// all wgmmas and one promotion that nothing overlaps (the tensor pipe drains), and the wgrad
// promotion is twice the BF16 one, so wgrad runs 16 where the BF16 kernels run 8. Session 9, H100,
// same call, medians of 3 alternated rounds (dev/gemm/NOTES.md "Session 9 — wgrad runs of 16"):
// 16 took the pick 2.9 % faster at 7168x2048x4096, 1.9 % at 2048x7168x4096 (every round faster
// than every round of 8) and 1.0 % k-grouped (4 x 4096, within the rounds' spread); 32 was 2.5 %
// slower than 8 at both dense shapes.
constexpr int kWgradRun = 16;

template <int kBlockM, int kBlockN, bool kWgrad, bool kSplitK, bool kTail, int kMode>
__device__ __forceinline__ void compute(const GemmParams& p,
                                        const SmemLayout<kBlockM, kBlockN, kWgrad>& sm,
                                        const CUtensorMap* map_d) {
  using Mma = WgmmaE4M3<kBlockN>;
  constexpr int kRegs = Mma::kRegs;
  using Layout = SmemLayout<kBlockM, kBlockN, kWgrad>;
  // Overlapped promotion needs three register sets (acc + two partial sums): tiles up to 128 wide.
  // NOTE: not in split-K launches. With it, 128x128 split-K gave runs whose output differed from
  // the first in whole 16-row strips (one K slice's contribution off by 10-25 %): 2-35 of 299 runs
  // at split 8 (K = 1280-2560, m = 1 and 128), never at split 6 or without split (n = 2 and 3 block
  // tiles, 1,200 runs each); the same kernels without the overlap: 0 of ~12,000 runs. Cause not
  // found (dev/gemm/NOTES.md "Session 4"); the split launches are small-M, load-bound shapes.
  // The tail-split kernels keep it: their plan gives each CTA at most one tail unit, its last, so
  // no unit ever follows a fix-up there (the failing launches ran many units after fix-ups).
  // The weight gradient overlaps too where kWgradOverlap says so (its promotion reads the B
  // scales from the stage, so it releases the stage after the FMAs, not before).
  constexpr bool kOverlap = (!kWgrad || kWgradOverlap) && kBlockN <= 128 && (!kSplitK || kTail);
  // The overwritten weight gradient runs tiles with no K blocks (groups with no rows get their
  // zeros from them); only the overlapped loop has no unconditional first-block wait.
  static_assert(!kWgrad || kOverlap, "the weight gradient must take the overlapped loop");
  // Warp-uniform (shuffled from lane 0) so that the descriptors below can stay in uniform
  // registers instead of being rebuilt and moved (R2UR) before every wgmma.
  const int wg = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / 128), 0);
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int row_in_tile = wg * 64 + warp * 16 + lane / 4;  // and + 8
  const int col_in_frag = 2 * (lane % 4);
  const int kb_total = p.k / 128;
  const int n_scale_blocks = (p.n + 127) / 128;
  const bool pair = p.cluster == 2;
  const bool leader = lane == 0;
  // Stage s of A / B starts kStageBytes * s after stage 0: its descriptor is stage 0's plus that
  // offset in 16-byte units (addresses stay below 256 KB, so the 14-bit start field holds it).
  const uint64_t desc_a0 = make_desc_kmajor_sw128(sm.a(0) + wg * 64 * 128);
  const uint64_t desc_b0 = make_desc_kmajor_sw128(sm.b(0));
  constexpr uint32_t kStageDesc = Layout::kStageBytes >> 4;

  PipeState pipe;
  Tile tile;
  bool skip;
  float acc[kRegs];
  float part[kRegs];
  const int first = blockIdx.x / p.cluster, step = gridDim.x / p.cluster;
  constexpr bool kScalePrefetch = (kMode & kModeScalePrefetch) != 0;
  if constexpr (kScalePrefetch) {
    const int64_t count = static_cast<int64_t>(p.num_groups) * n_scale_blocks * kb_total;
    constexpr int kThreads = kBlockM / 64 * 128;
    for (int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * 32; i < count;
         i += static_cast<int64_t>(gridDim.x) * kThreads * 32)
      prefetch_l2(p.sb + i);
  }
  MaskedCursor cursor;
  MaskedCursor* const cur = (kMode & kModeMaskedCursor) != 0 ? &cursor : nullptr;
  for (int t = first; get_tile<kBlockM, kBlockN, kTail, kWgrad>(p, t, tile, skip, cur); t += step) {
    if (skip) continue;
#pragma unroll
    for (int i = 0; i < kRegs; ++i) acc[i] = 0.0f;
    const float* sb_ptr = nullptr;
    // A 192-wide tile straddles two 128-wide B scale blocks: columns below `boundary` use the
    // first scale, the others the second.
    int boundary = kBlockN;
    bool has_second = false;
    if constexpr (!kWgrad) {
      sb_ptr = p.sb +
               (static_cast<int64_t>(tile.group) * n_scale_blocks + tile.n_base / 128) * kb_total +
               tile.k_block_begin;
      if constexpr (kBlockN % 128 != 0 && kBlockN > 128) {
        boundary = 128 - tile.n_base % 128;
        has_second = tile.n_base / 128 + 1 < n_scale_blocks;
      }
    }

    // The B scales of block kb were loaded during block kb - 1 (a global load has the whole
    // wgmma to land instead of stalling the promotion).
    float sb_next = 0.0f, sb_next2 = 0.0f;
    const int sb_second = has_second ? kb_total : 0;
    if constexpr (!kWgrad && !kOverlap) {
      sb_next = __ldg(sb_ptr);
      sb_next2 = __ldg(sb_ptr + sb_second);
    }
    if constexpr (kOverlap) {
      // Two partial-sum sets: block b+1's wgmmas are issued before block b is waited for
      // (wait_group 1), so block b's promotion runs while the tensor cores work on b+1. The sets
      // are named arrays indexed by constants only, and between a set's issue and the wait that
      // completes it nothing reads it (dev/gemm/NOTES.md v11).
      float p0[kRegs], p1[kRegs];
      PipeState st0 = pipe, st1 = pipe;
      float x_sa0 = 0.0f, x_sa1 = 0.0f, x_sb = 0.0f, y_sa0 = 0.0f, y_sa1 = 0.0f, y_sb = 0.0f;
      const int n = tile.num_k_blocks;
      int b = 0;
      // kScalePrefetch: block kb's B scale, loaded during block kb - 1 (the first before the wait).
      [[maybe_unused]] float sb_ahead = 0.0f;
      if constexpr (kScalePrefetch) sb_ahead = __ldg(sb_ptr);
      // Waits for the next block's stage, reads its scales and issues its wgmmas into `part`.
      auto issue = [&](float(&part)[kRegs], PipeState& st, float& s_a0, float& s_a1, float& s_b,
                       int kb) {
        mbar_wait(sm.full(pipe.stage), pipe.phase);
        s_a0 = sm.sa(pipe.stage)[row_in_tile];
        s_a1 = sm.sa(pipe.stage)[row_in_tile + 8];
        // (the weight gradient's B scales are per column: `promote` reads them from the stage)
        if constexpr (kScalePrefetch) {
          s_b = sb_ahead;
          sb_ahead = __ldg(sb_ptr + min(kb + 1, n - 1));
        } else if constexpr (!kWgrad) {
          s_b = __ldg(sb_ptr + kb);
        }
        const uint64_t stage_off = static_cast<uint64_t>(pipe.stage) * kStageDesc;
#pragma unroll
        for (int i = 0; i < kRegs; ++i) fence_operand(part[i]);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
          Mma::mma(part, desc_a0 + stage_off + 2 * kk, desc_b0 + stage_off + 2 * kk, kk > 0);
        wgmma_commit();
        st = pipe;
        pipe.advance(sm.stages);
      };
      // After the wait that completed `part`: release its stage, acc += part * (sa * sb).
      auto promote = [&](float(&part)[kRegs], const PipeState& st, float s_a0, float s_a1,
                         float s_b) {
#pragma unroll
        for (int i = 0; i < kRegs; ++i) fence_operand(part[i]);
        if constexpr (kWgrad) {
          // Per-column B scales read from the stage as they are needed (two at a time: a set of
          // 32 would not fit beside three accumulator sets), the same products as below.
          const float* sbs = sm.sb(st.stage);
#pragma unroll
          for (int c = 0; c < kBlockN / 8; ++c) {
            float2 v;
            asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];"
                         : "=f"(v.x), "=f"(v.y)
                         : "r"(smem_addr(sbs + 8 * c + col_in_frag)));
            acc[4 * c + 0] = fmaf(part[4 * c + 0], s_a0 * v.x, acc[4 * c + 0]);
            acc[4 * c + 1] = fmaf(part[4 * c + 1], s_a0 * v.y, acc[4 * c + 1]);
            acc[4 * c + 2] = fmaf(part[4 * c + 2], s_a1 * v.x, acc[4 * c + 2]);
            acc[4 * c + 3] = fmaf(part[4 * c + 3], s_a1 * v.y, acc[4 * c + 3]);
          }
          __syncwarp();
          release_stage_wgrad(sm.empty(st.stage), pair, leader);
        } else {
          __syncwarp();
          release_stage(sm.empty(st.stage), pair, leader);
          const float r0 = s_a0 * s_b, r1 = s_a1 * s_b;
#pragma unroll
          for (int c = 0; c < kBlockN / 8; ++c) {
            acc[4 * c + 0] = fmaf(part[4 * c + 0], r0, acc[4 * c + 0]);
            acc[4 * c + 1] = fmaf(part[4 * c + 1], r0, acc[4 * c + 1]);
            acc[4 * c + 2] = fmaf(part[4 * c + 2], r1, acc[4 * c + 2]);
            acc[4 * c + 3] = fmaf(part[4 * c + 3], r1, acc[4 * c + 3]);
          }
        }
      };
      if (n % 2 != 0) {  // an odd block count: the first block alone, not overlapped
        issue(p0, st0, x_sa0, x_sa1, x_sb, 0);
        wgmma_wait<0>();
        promote(p0, st0, x_sa0, x_sa1, x_sb);
        b = 1;
      }
      // Blocks go in straight-line runs of 8 (the weight gradient: 16 first; then 4, 2): within a
      // run every promotion but the last overlaps the next block's wgmmas. Nothing is in flight
      // across a loop's back edge: ptxas serialises every wgmma otherwise (C7514, dev/gemm/NOTES.md
      // v11).
      auto run = [&](auto run_length) {
        constexpr int kRun = decltype(run_length)::value;
        issue(p0, st0, x_sa0, x_sa1, x_sb, b);
#pragma unroll
        for (int j = 0; j < kRun / 2; ++j) {
          issue(p1, st1, y_sa0, y_sa1, y_sb, b + 2 * j + 1);
          wgmma_wait<1>();
          promote(p0, st0, x_sa0, x_sa1, x_sb);
          if (j + 1 < kRun / 2) {
            issue(p0, st0, x_sa0, x_sa1, x_sb, b + 2 * j + 2);
            wgmma_wait<1>();
          } else {
            wgmma_wait<0>();
          }
          promote(p1, st1, y_sa0, y_sa1, y_sb);
        }
        b += kRun;
      };
      if constexpr (kWgrad)
        while (b + kWgradRun <= n) run(std::integral_constant<int, kWgradRun>{});
      while (b + 8 <= n) run(std::integral_constant<int, 8>{});
      if (b + 4 <= n) run(std::integral_constant<int, 4>{});
      if (b + 2 <= n) run(std::integral_constant<int, 2>{});
    } else {
      // Each block's full barrier is waited for, and its A scales read, while the previous block's
      // wgmmas run; only the first block of a tile waits here.
      mbar_wait(sm.full(pipe.stage), pipe.phase);
      float sa0 = sm.sa(pipe.stage)[row_in_tile], sa1 = sm.sa(pipe.stage)[row_in_tile + 8];
      for (int kb = 0; kb < tile.num_k_blocks; ++kb) {
        float sb_block = 0.0f, sb_block2 = 0.0f;
        if constexpr (!kWgrad) {
          sb_block = sb_next;
          sb_block2 = sb_next2;
          const int kb_next = min(kb + 1, tile.num_k_blocks - 1);
          sb_next = __ldg(sb_ptr + kb_next);
          sb_next2 = __ldg(sb_ptr + sb_second + kb_next);
        }
        const uint64_t stage_off = static_cast<uint64_t>(pipe.stage) * kStageDesc;
        const uint64_t desc_a = desc_a0 + stage_off;
        const uint64_t desc_b = desc_b0 + stage_off;
#pragma unroll
        for (int i = 0; i < kRegs; ++i) fence_operand(part[i]);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) Mma::mma(part, desc_a + 2 * kk, desc_b + 2 * kk, kk > 0);
        wgmma_commit();
        // Look ahead (no branch: on a tile's last block the current stage, whose barrier has
        // completed and which is not released yet, stands in for the next).
        PipeState next = pipe;
        next.advance(sm.stages);
        const bool more = kb + 1 < tile.num_k_blocks;
        const int ahead = more ? next.stage : pipe.stage;
        mbar_wait(sm.full(ahead), more ? next.phase : pipe.phase);
        const float sa0_next = sm.sa(ahead)[row_in_tile], sa1_next = sm.sa(ahead)[row_in_tile + 8];
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < kRegs; ++i) fence_operand(part[i]);

        // Promotion: acc += partial * (sa * sb), the reference's fmaf.
        if constexpr (kWgrad) {
          const float* sbs = sm.sb(pipe.stage);
          float sbv[kRegs / 2];
#pragma unroll
          for (int c = 0; c < kBlockN / 8; ++c) {
            const float2 v = *reinterpret_cast<const float2*>(sbs + 8 * c + col_in_frag);
            sbv[2 * c] = v.x;
            sbv[2 * c + 1] = v.y;
          }
          __syncwarp();
          release_stage_wgrad(sm.empty(pipe.stage), pair, leader);
#pragma unroll
          for (int c = 0; c < kBlockN / 8; ++c) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              acc[4 * c + j] = fmaf(part[4 * c + j], sa0 * sbv[2 * c + j], acc[4 * c + j]);
              acc[4 * c + 2 + j] =
                  fmaf(part[4 * c + 2 + j], sa1 * sbv[2 * c + j], acc[4 * c + 2 + j]);
            }
          }
        } else {
          __syncwarp();
          release_stage(sm.empty(pipe.stage), pair, leader);
          const float s0 = sa0 * sb_block, s1 = sa1 * sb_block;
          const float t0 = sa0 * sb_block2, t1 = sa1 * sb_block2;
#pragma unroll
          for (int c = 0; c < kBlockN / 8; ++c) {
            const bool first = 8 * c < boundary;
            const float r0 = first ? s0 : t0, r1 = first ? s1 : t1;
            acc[4 * c + 0] = fmaf(part[4 * c + 0], r0, acc[4 * c + 0]);
            acc[4 * c + 1] = fmaf(part[4 * c + 1], r0, acc[4 * c + 1]);
            acc[4 * c + 2] = fmaf(part[4 * c + 2], r1, acc[4 * c + 2]);
            acc[4 * c + 3] = fmaf(part[4 * c + 3], r1, acc[4 * c + 3]);
          }
        }
        sa0 = sa0_next;
        sa1 = sa1_next;
        pipe = next;
      }
    }

    // ---- epilogue ----
    bool tail_unit = false;  // stores from registers (only the last slice of a strip goes on)
    if constexpr (kTail) {
      // Tail split: whole tiles store as usual; of a tail tile's slices only the last of each
      // 16-row strip goes on, with the strip's sum.
      tail_unit = t >= p.tail_begin;
      if (tail_unit && !tail_split_reduce<kBlockM, kBlockN>(p, t, tile.n_base, acc,
                                                            static_cast<int>(threadIdx.x / 32)))
        continue;
    } else if constexpr (kSplitK) {
      // Split-K: only the last slice of each 16-row strip goes on, with the strip's full sum
      // (the host has chosen the register epilogue for split launches). A template flag: the
      // fix-up code alone cost the 64x128 kernel 12 bytes of spill (ptxas -v).
      if (!split_k_reduce<kBlockM>(p, t, acc)) continue;
    }
    int64_t row_base = tile.m_base;
    if (p.form == Form::kMasked || p.form == Form::kKGrouped)
      row_base += static_cast<int64_t>(tile.group) * p.m;
    if constexpr (!kWgrad) {
      // TMA store when every row of the warpgroup's slab is real (dense: the descriptor clips
      // rows >= M); otherwise registers straight to global memory with row checks below.
      const int slab_end = tile.m_base + wg * 64 + 64;
      bool slab_full = p.form == Form::kDense;
      if (!slab_full && p.tma_store) {
        slab_full = slab_end <= tile.m_end;
        if (slab_full && p.form == Form::kContiguous)
          slab_full = __ldg(p.grouped_layout + slab_end - 1) >= 0;
      }
      if (slab_full && p.tma_store && !tail_unit) {
        store_slab_tma<kBlockN>(acc, sm.d() + wg * 64 * kBlockN * 2, map_d, p.n, tile.n_base,
                                row_base + wg * 64);
        continue;
      }
    }
    if constexpr (kWgrad) {
      // Through TMA when the warpgroup's 64 rows are all real (dense: the map clips rows >= M;
      // k-grouped: rows past M would land in the next expert's D).
      if (p.tma_store && (p.form == Form::kDense || tile.m_base + wg * 64 + 64 <= tile.m_end)) {
        reduce_slab_tma<kBlockN>(acc, sm.d() + wg * 64 * kBlockN * 4, map_d, p.n, tile.n_base,
                                 row_base + wg * 64, p.overwrite != 0);
      } else {
        accumulate_fp32<kBlockN>(p, tile, row_base, row_in_tile, col_in_frag, acc);
      }
    } else {
      // Registers straight to global memory.
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = tile.m_base + row_in_tile + 8 * i;
        bool row_ok = r < tile.m_end;
        if (row_ok && p.form == Form::kContiguous) row_ok = __ldg(p.grouped_layout + r) >= 0;
        if (!row_ok) continue;
        const int64_t grow = row_base + row_in_tile + 8 * i;
#pragma unroll
        for (int c = 0; c < kBlockN / 8; ++c) {
          const int col = tile.n_base + 8 * c + col_in_frag;
          if (col >= p.n) continue;
          *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(p.d) + grow * p.n + col) =
              __floats2bfloat162_rn(acc[4 * c + 2 * i], acc[4 * c + 2 * i + 1]);
        }
      }
    }
  }
  if (p.tma_store && threadIdx.x % 128 == 0) tma_store_wait_all();
}

// ---- math for the wide tiles: two math warpgroups, each holding two 64 x 128 slabs ----
// 256x128 (dense): slab w of warpgroup wg is rows w * 128 + wg * 64 + [0, 64) of the tile.
// 128x256 (dense, grouped contiguous / masked): slab w of warpgroup wg is rows wg * 64 + [0, 64),
// columns w * 128 + [0, 128), i.e. one 128-wide B scale block each (the second may lie past N: it
// is computed from zero-filled or foreign B rows and never stored). Per K block a warpgroup issues
// slab 0's four wgmmas, waits, promotes, then slab 1's: the other warpgroup's wgmmas keep the
// tensor cores busy during each promotion. acc0 + acc1 + one partial-sum set = 192 registers
// (a second partial-sum set, as the overlapped 128-row loop has, would need 256).
// Why these tiles: per K block a 128x128 tile has its tensor cores read 48 KB of operands from
// shared memory and its TMA write 32 KB (~160 bytes a tensor-core cycle at the FP8 rate, above
// the ~128 B/cycle shared memory gives); a 256x128 or 128x256 tile reads 96 KB and writes 48 KB
// for twice the work (~140 B/cycle), and asks L2 for a quarter less per FLOP (dev/gemm/NOTES.md
// sessions 5 and 5b). 128x256 serves the grouped forms (experts are only 128-row aligned; the
// heuristic takes it there); at dense M = 64 / 128 it measured slower than the picks (session 5b).
// kTail: the tail-split form of 256x128 (get_tile's tail units; their slabs go through
// tail_split_reduce and store from registers, whole tiles as usual).
// kMode & kModeGroupedRows: the grouped 256x128 kernel (get_grouped_wide_tile; its 128-row
// tiles run slab 0 only; padding rows and rows past a masked group are not stored).
template <int kBlockM, int kBlockN, bool kTail, int kMode = 0>
__device__ __forceinline__ void compute_wide(const GemmParams& p,
                                             const SmemLayout<kBlockM, kBlockN, false>& sm,
                                             const CUtensorMap* map_d) {
  // Two column slabs (128x256) instead of two row slabs (256x128).
  constexpr bool kWideN = kBlockN == 256;
  constexpr bool kGroupedRows = (kMode & kModeGroupedRows) != 0;
  static_assert(!kGroupedRows || (kBlockM == 256 && !kTail),
                "grouped 256-row tiles: no tail split");
  static_assert((kBlockM == 256 && kBlockN == 128) || (kBlockM == 128 && kBlockN == 256 && !kTail),
                "wide tiles: 256x128 (with its tail split) or 128x256");
  constexpr int kSlabN = 128;
  using Mma = WgmmaE4M3<kSlabN>;
  constexpr int kRegs = Mma::kRegs;
  using Layout = SmemLayout<kBlockM, kBlockN, false>;
  const int wg = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / 128), 0);
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int row0 = wg * 64 + warp * 16 + lane / 4;  // slab 0 (and + 8); 256x128: slab 1 is + 128
  const int col_in_frag = 2 * (lane % 4);
  const int kb_total = p.k / 128;
  const int n_scale_blocks = (p.n + 127) / 128;
  const bool leader = lane == 0;
  const uint64_t desc_a0 = make_desc_kmajor_sw128(sm.a(0) + wg * 64 * 128);
  const uint64_t desc_b0 = make_desc_kmajor_sw128(sm.b(0));
  // Slab 1's operands: the other 128 rows of A (256x128) or the other 128 rows of B (128x256).
  const uint64_t desc_a1 =
      kWideN ? desc_a0 : make_desc_kmajor_sw128(sm.a(0) + (128 + wg * 64) * 128);
  const uint64_t desc_b1 = kWideN ? make_desc_kmajor_sw128(sm.b(0) + 128 * 128) : desc_b0;
  constexpr uint32_t kStageDesc = Layout::kStageBytes >> 4;

  PipeState pipe;
  Tile tile;
  bool skip;
  float acc0[kRegs], acc1[kRegs], part[kRegs];
  // acc += part * r (row pair r0 / r1), after the wait that completed part; a 64-wide half tile
  // (narrow) only its first 8 column groups (the others hold nothing of it).
  // NOTE: `narrow` is a constant at every call (cicc 13.0 crashed on a generic lambda here).
  const auto promote = [&](float(&acc)[kRegs], float r0, float r1, bool narrow) {
#pragma unroll
    for (int c = 0; c < (narrow ? kSlabN / 16 : kSlabN / 8); ++c) {
      acc[4 * c + 0] = fmaf(part[4 * c + 0], r0, acc[4 * c + 0]);
      acc[4 * c + 1] = fmaf(part[4 * c + 1], r0, acc[4 * c + 1]);
      acc[4 * c + 2] = fmaf(part[4 * c + 2], r1, acc[4 * c + 2]);
      acc[4 * c + 3] = fmaf(part[4 * c + 3], r1, acc[4 * c + 3]);
    }
  };
  // One slab's four wgmmas of a K block (64 wide for a half tile: the first 32 registers of part,
  // the fragment layout's first 64 columns, from the first 64 rows of the B stage).
  const auto issue = [&](auto narrow_c, uint64_t desc_a, uint64_t desc_b) {
#pragma unroll
    for (int i = 0; i < kRegs; ++i) fence_operand(part[i]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      if constexpr (decltype(narrow_c)::value)
        WgmmaE4M3<64>::mma(reinterpret_cast<float(&)[WgmmaE4M3<64>::kRegs]>(part), desc_a + 2 * kk,
                           desc_b + 2 * kk, kk > 0);
      else
        Mma::mma(part, desc_a + 2 * kk, desc_b + 2 * kk, kk > 0);
    }
    wgmma_commit();
  };
  // The K loop of one tile (narrow_c true: a 64-wide half tile). sb_ptr1: slab 1's B scales
  // (128x256; 256x128 reads sb_ptr for both slabs).
  // rows128_c true: a 128-row tile of the grouped kernel, slab 0 only.
  const auto k_loop = [&](auto narrow_c, auto rows128_c, const float* sb_ptr, const float* sb_ptr1,
                          int num_k_blocks) {
    float sb_cur = __ldg(sb_ptr);
    float sb_cur1 = 0.0f;
    if constexpr (kWideN) sb_cur1 = __ldg(sb_ptr1);
    mbar_wait(sm.full(pipe.stage), pipe.phase);
    for (int kb = 0; kb < num_k_blocks; ++kb) {
      // Both slabs' A scales before the stage can be released (it is refilled right after).
      const float* sa = sm.sa(pipe.stage);
      const float a00 = sa[row0], a01 = sa[row0 + 8];
      float a10 = a00, a11 = a01;
      if constexpr (!kWideN && !decltype(rows128_c)::value) {
        a10 = sa[row0 + 128];
        a11 = sa[row0 + 136];
      }
      const uint64_t stage_off = static_cast<uint64_t>(pipe.stage) * kStageDesc;
      issue(narrow_c, desc_a0 + stage_off, desc_b0 + stage_off);
      const int kb_next = min(kb + 1, num_k_blocks - 1);
      const float sb_next = __ldg(sb_ptr + kb_next);
      [[maybe_unused]] float sb_next1 = 0.0f;
      if constexpr (kWideN) sb_next1 = __ldg(sb_ptr1 + kb_next);
      if constexpr (decltype(rows128_c)::value) {
        // Slab 0 only: the next block's barrier while its wgmmas run, then release and promote.
        PipeState next = pipe;
        next.advance(sm.stages);
        const bool more = kb + 1 < num_k_blocks;
        mbar_wait(sm.full(more ? next.stage : pipe.stage), more ? next.phase : pipe.phase);
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < kRegs; ++i) fence_operand(part[i]);
        __syncwarp();
        release_stage(sm.empty(pipe.stage), false, leader);
        promote(acc0, a00 * sb_cur, a01 * sb_cur, false);
        sb_cur = sb_next;
        pipe = next;
      } else {
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < kRegs; ++i) fence_operand(part[i]);
        promote(acc0, a00 * sb_cur, a01 * sb_cur, decltype(narrow_c)::value);
        issue(narrow_c, desc_a1 + stage_off, desc_b1 + stage_off);
        // Look ahead (no branch: on a tile's last block the current stage stands in).
        PipeState next = pipe;
        next.advance(sm.stages);
        const bool more = kb + 1 < num_k_blocks;
        mbar_wait(sm.full(more ? next.stage : pipe.stage), more ? next.phase : pipe.phase);
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < kRegs; ++i) fence_operand(part[i]);
        __syncwarp();
        release_stage(sm.empty(pipe.stage), false, leader);
        const float sb1 = kWideN ? sb_cur1 : sb_cur;
        promote(acc1, a10 * sb1, a11 * sb1, decltype(narrow_c)::value);
        sb_cur = sb_next;
        if constexpr (kWideN) sb_cur1 = sb_next1;
        pipe = next;
      }
    }
  };
  bool narrow, rows128 = false;
  WideCursor cur{static_cast<int>(blockIdx.x), 0};
  for (; next_wide_tile<kBlockM, kBlockN, kTail, kGroupedRows>(p, cur, tile, skip, narrow, rows128);
       advance_wide(cur, static_cast<int>(gridDim.x), narrow)) {
    const int t = cur.unit;
    if (skip) continue;
#pragma unroll
    for (int i = 0; i < kRegs; ++i) acc0[i] = acc1[i] = 0.0f;
    const float* sb_ptr =
        p.sb + (static_cast<int64_t>(tile.group) * n_scale_blocks + tile.n_base / 128) * kb_total +
        tile.k_block_begin;
    // 128x256: slab 1's scale block, or slab 0's where slab 1 lies past N (computed, not stored).
    const float* sb_ptr1 =
        kWideN && tile.n_base / 128 + 1 < n_scale_blocks ? sb_ptr + kb_total : sb_ptr;
    if constexpr (kWideN) {
      k_loop(std::false_type{}, std::false_type{}, sb_ptr, sb_ptr1, tile.num_k_blocks);
    } else if constexpr (kGroupedRows) {
      if (rows128)
        k_loop(std::false_type{}, std::true_type{}, sb_ptr, sb_ptr1, tile.num_k_blocks);
      else
        k_loop(std::false_type{}, std::false_type{}, sb_ptr, sb_ptr1, tile.num_k_blocks);
    } else {
      if (narrow)
        k_loop(std::true_type{}, std::false_type{}, sb_ptr, sb_ptr1, tile.num_k_blocks);
      else
        k_loop(std::false_type{}, std::false_type{}, sb_ptr, sb_ptr1, tile.num_k_blocks);
    }

    // ---- epilogue ----
    int64_t row_base = tile.m_base;
    if ((kWideN || kGroupedRows) && p.form == Form::kMasked)
      row_base += static_cast<int64_t>(tile.group) * p.m;
    // col_off: the slab's first column in the tile (128x256 slab 1: 128).
    const auto store_direct = [&](const float(&acc)[kRegs], int row_in_tile, int col_off) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = tile.m_base + row_in_tile + 8 * i;
        if (r >= tile.m_end) continue;
        if ((kWideN || kGroupedRows) && p.form == Form::kContiguous &&
            __ldg(p.grouped_layout + r) < 0)
          continue;
        const int64_t grow = row_base + row_in_tile + 8 * i;
#pragma unroll
        for (int c = 0; c < kSlabN / 8; ++c) {
          const int col = tile.n_base + col_off + 8 * c + col_in_frag;
          if (col >= p.n) continue;
          *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(p.d) + grow * p.n + col) =
              __floats2bfloat162_rn(acc[4 * c + 2 * i], acc[4 * c + 2 * i + 1]);
        }
      }
    };
    if constexpr (kTail) {
      if (t >= p.tail_begin) {
        // A warp holds one 16-row strip of each slab (strip threadIdx.x / 32, + 8 for slab 1);
        // only the last slice of a strip stores it, with the strip's sum.
        const int strip = static_cast<int>(threadIdx.x / 32);
        if (tail_split_reduce<256, kBlockN>(p, t, tile.n_base, acc0, strip))
          store_direct(acc0, row0, 0);
        if (tail_split_reduce<256, kBlockN>(p, t, tile.n_base, acc1, strip + 8))
          store_direct(acc1, row0 + 128, 0);
        continue;
      }
    }
    if constexpr (kGroupedRows) {
      // Slab w of warpgroup wg: rows w * 128 + wg * 64 + [0, 64). A slab whose 64 rows are all
      // real goes through shared memory (warpgroup-uniform), the others row by row.
      const auto slab_full = [&](int w) {
        const int slab_end = tile.m_base + w * 128 + wg * 64 + 64;
        bool full = slab_end <= tile.m_end;
        if (full && p.form == Form::kContiguous) full = __ldg(p.grouped_layout + slab_end - 1) >= 0;
        return full;
      };
      const bool full0 = p.tma_store && slab_full(0);
      const bool full1 = p.tma_store && !rows128 && slab_full(1);
      uint8_t* const staging0 = sm.d() + wg * 64 * kSlabN * 2;
      uint8_t* const staging1 = sm.d() + (2 + wg) * 64 * kSlabN * 2;
      if (full0 && full1) {
        store_two_slabs_tma<kSlabN>(acc0, acc1, staging0, staging1, map_d, p.n, tile.n_base,
                                    tile.n_base, row_base + wg * 64, row_base + 128 + wg * 64);
        continue;
      }
      if (full0)
        store_slab_tma<kSlabN>(acc0, staging0, map_d, p.n, tile.n_base, row_base + wg * 64);
      else
        store_direct(acc0, row0, 0);
      if (!rows128) {
        if (full1)
          store_slab_tma<kSlabN>(acc1, staging1, map_d, p.n, tile.n_base, row_base + 128 + wg * 64);
        else
          store_direct(acc1, row0 + 128, 0);
      }
      continue;
    }
    // Dense: the descriptor clips rows >= M. Grouped (128x256): only a warpgroup whose 64 rows
    // are all real stores through shared memory (warpgroup-uniform), as in compute().
    bool slab_full = true;
    if constexpr (kWideN) {
      if (p.form != Form::kDense) {
        const int slab_end = tile.m_base + wg * 64 + 64;
        slab_full = slab_end <= tile.m_end;
        if (slab_full && p.form == Form::kContiguous)
          slab_full = __ldg(p.grouped_layout + slab_end - 1) >= 0;
      }
    }
    if (p.tma_store && slab_full) {
      // Staging slab s = 2 * w + wg (64 x 128 BF16 each).
      store_two_slabs_tma<kSlabN>(acc0, acc1, sm.d() + wg * 64 * kSlabN * 2,
                                  sm.d() + (2 + wg) * 64 * kSlabN * 2, map_d, p.n, tile.n_base,
                                  tile.n_base + (kWideN ? 128 : 0), row_base + wg * 64,
                                  row_base + (kWideN ? 0 : 128) + wg * 64);
      continue;
    }
    store_direct(acc0, row0, 0);
    store_direct(acc1, kWideN ? row0 : row0 + 128, kWideN ? 128 : 0);
  }
  if (p.tma_store && threadIdx.x % 128 == 0) tma_store_wait_all();
}

// kSplitK: split-K kernels (split_k_reduce in the epilogue); with kTail the tail-split kernels
// instead (tail_split_reduce; a separate instantiation so that neither fix-up costs the other's
// registers).
// Math warpgroups of a tile: one per 64 rows up to 128 rows; 256-row tiles keep two (each
// holds two 64-row slabs).
constexpr int math_warpgroups(int block_m) {
  return block_m == 64 ? 1 : 2;
}

template <int kBlockM, int kBlockN, bool kWgrad, bool kSplitK, bool kTail = false, int kMode = 0>
__global__ void __launch_bounds__(128 * (math_warpgroups(kBlockM) + 1), 1)
    fp8_gemm_kernel(const __grid_constant__ CUtensorMap map_a,
                    const __grid_constant__ CUtensorMap map_b,
                    const __grid_constant__ CUtensorMap map_sa,
                    const __grid_constant__ CUtensorMap map_sb,
                    const __grid_constant__ CUtensorMap map_d,
                    const __grid_constant__ GemmParams p) {
  static_assert(kBlockM == 64 || kBlockM == 128 || kBlockM == 256,
                "BLOCK_M: one math warpgroup per 64 rows, or two with two slabs each");
  static_assert(kBlockM != 256 || (kBlockN == 128 && !kWgrad && (!kSplitK || kTail)),
                "256-row tiles: 1x128 x 128x128, 128 wide, no split-K (the dense tail split)");
  static_assert(kBlockN != 256 || (kBlockM == 128 && !kWgrad && !kSplitK),
                "256-wide tiles: 128 rows, 1x128 x 128x128, no split-K or tail split");
  static_assert(kBlockN == 64 || kBlockN == 128 || kBlockN == 192 || kBlockN == 256,
                "BLOCK_N: 64 or 128 (inside one 128-wide B scale block), 192 (straddles two) or "
                "256 (two 128-wide slabs, one scale block each)");
  static_assert(!(kWgrad && kBlockN == 192), "the 1x128 x 1x128 kernel is built for 64/128 only");
  static_assert(!(kSplitK && (kWgrad || kBlockN > 128)), "split-K: 1x128 x 128x128, N <= 128");
  static_assert(!kTail || kSplitK, "the tail split is a split-K kernel form");
  static_assert(kMode == 0 || kMode == kModeGroupedRows || kMode == kModeGatherA ||
                    (kBlockM <= 128 && kBlockN <= 128 && !kWgrad && !kTail),
                "the B-scale prefetch is built for the 1d2d kernels up to 128x128 (no tail split)");
  static_assert(kMode != kModeGroupedRows || (kBlockM == 256 && !kSplitK),
                "kModeGroupedRows: the grouped 256x128 kernel (no split-K, no tail split)");
  static_assert(kMode != kModeGatherA ||
                    (kBlockM == 128 && (kBlockN == 128 || kBlockN == 256) && !kWgrad && !kSplitK),
                "kModeGatherA: the gathered contiguous kernels, 128x128 and 128x256");
  static_assert(kMode != kModeMaskedCursor || !kSplitK,
                "kModeMaskedCursor: the masked form's plain kernels up to 128x128");
  constexpr int kNumMathThreads = math_warpgroups(kBlockM) * 128;
  extern __shared__ __align__(1024) uint8_t smem[];
  using Layout = SmemLayout<kBlockM, kBlockN, kWgrad>;
  const Layout sm{smem, p.num_stages, p.tma_store ? Layout::kDBytes : 0};

  if (threadIdx.x == 0) {
    for (int s = 0; s < p.num_stages; ++s) {
      mbar_init(sm.full(s), kMode == kModeGatherA ? kGatherFullArrivals : 1);
      mbar_init(sm.empty(s), p.cluster * kNumMathThreads / 32);
    }
    fence_barrier_init();
  }
  if (threadIdx.x == kNumMathThreads) {
    if constexpr (kMode != kModeGatherA) tma_prefetch_desc(&map_a);  // (gathered: no map)
    tma_prefetch_desc(&map_b);
    tma_prefetch_desc(&map_sa);
    if constexpr (kWgrad) tma_prefetch_desc(&map_sb);
    if constexpr (!kWgrad) tma_prefetch_desc(&map_d);
  }
  if (p.cluster == 2)
    cluster_sync();
  else
    __syncthreads();
  // Programmatic dependent launch (GemmTileConfig::pdl): this grid may have started while the
  // previous kernel of the stream was finishing, so its prologue above (barrier init, descriptor
  // prefetch: no global memory) overlapped that kernel's tail. Every global access comes after
  // the wait. Then the next grid may be scheduled: its CTAs take the SMs as ours exit (one CTA
  // of this size per SM) and run their prologue under our last tiles. Both are no-ops in a
  // launch without the attribute.
  griddep_wait();
  griddep_launch_dependents();

  if (threadIdx.x >= kNumMathThreads) {
    if constexpr (kBlockM >= 128) setmaxnreg_dec<40>();
    if constexpr (kMode == kModeGatherA) {
      const auto& src_rows = *reinterpret_cast<const GatherSource*>(&map_a);
      if (sm.stages >= 4)
        produce_gathered<kBlockM, kBlockN, 2>(p, sm, src_rows, &map_b, &map_sa);
      else
        produce_gathered<kBlockM, kBlockN, 1>(p, sm, src_rows, &map_b, &map_sa);
    } else if (threadIdx.x == kNumMathThreads) {
      produce<kBlockM, kBlockN, kWgrad, kTail, kMode>(p, sm, &map_a, &map_b, &map_sa, &map_sb);
    }
  } else {
    if constexpr (kBlockM >= 128) setmaxnreg_inc<232>();
    if constexpr (kBlockM == 256 || kBlockN == 256)
      compute_wide<kBlockM, kBlockN, kTail, kMode>(p, sm, &map_d);
    else
      compute<kBlockM, kBlockN, kWgrad, kSplitK, kTail, kMode>(p, sm, &map_d);
  }
  // NOTE: the peer may still multicast into this CTA's stages or arrive on its barriers.
  if (p.cluster == 2) {
    __syncwarp();
    cluster_sync();
  }
}

}  // namespace fp8moe::kernels::sm90
