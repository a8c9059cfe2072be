#include "fp8moe/kernels/sm90_gemm_heuristic.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

#include "fp8moe/core/error.h"

namespace fp8moe::kernels {

const char* gemm_kind_name(GemmKind kind) {
  switch (kind) {
    case GemmKind::kDense:
      return "dense";
    case GemmKind::kGroupedContiguous:
      return "grouped_contiguous";
    case GemmKind::kGroupedMasked:
      return "grouped_masked";
    case GemmKind::kWgrad:
      return "wgrad";
    case GemmKind::kKGroupedWgrad:
      return "kgrouped_wgrad";
  }
  return "?";
}

namespace {
bool is_wgrad(GemmKind kind) {
  return kind == GemmKind::kWgrad || kind == GemmKind::kKGroupedWgrad;
}
int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// NOTE: H100 SXM figures per multiprocessor, only their ratios matter: dense FP8 tensor-core
// rate ~1500 TFLOPS / 132, L2 -> SM ~10 TB/s / 132 (the H200 has the same SMs and L2); the DRAM
// rate is an input (gemm_dram_bytes_per_s), since the H200's is 1.47x the H100's.
constexpr double kFlopsPerSm = 1500e12 / 132;
constexpr double kL2BytesPerSm = 10e12 / 132;
// Sustained fraction of the peak DRAM rate: 3.0 TB/s of the H100's 3.35, the model's old constant.
constexpr double kDramEfficiency = 0.9;
constexpr int kMaxStages = 8;
}  // namespace

std::vector<TileCandidate> gemm_tile_candidates(GemmKind kind) {
  if (is_wgrad(kind)) return {{128, 128}, {64, 128}};
  // NOTE: 256-row tiles for every 1x128 x 128x128 form; a contiguous expert segment starts at a
  // multiple of 128 rows only, so the grouped kernel runs a 256-row tile whose halves belong to
  // different experts as two 128-row tiles (session 8). 128x256 tiles (two 128-wide column slabs
  // per math warpgroup) for the dense and both grouped forms.
  return {{256, 128}, {128, 256}, {128, 192}, {128, 128}, {64, 128}, {64, 64}};
}

bool gemm_tile_compiled(GemmKind kind, int block_m, int block_n) {
  if (kind == GemmKind::kDense && block_m == 128 && block_n == 64) return true;
  for (const TileCandidate& t : gemm_tile_candidates(kind))
    if (t.block_m == block_m && t.block_n == block_n) return true;
  return false;
}

int64_t gemm_stage_bytes(GemmKind kind, int block_m, int block_n) {
  // A and B tiles (128 K bytes a row), the A scales, the B scales for 1x128 B, two mbarriers.
  return int64_t{block_m} * 128 + int64_t{block_n} * 128 + block_m * 4 +
         (is_wgrad(kind) ? block_n * 4 : 0) + 16;
}

namespace {
// Output staging for the TMA epilogue: BF16 stores, or FP32 reduce-adds for the weight gradient.
int64_t output_staging_bytes(GemmKind kind, int block_m, int block_n, bool tma_store) {
  return tma_store ? int64_t{block_m} * block_n * (is_wgrad(kind) ? 4 : 2) : 0;
}
constexpr int64_t kSmemSlack = 1024;  // alignment of the dynamic shared memory base
}  // namespace

int64_t gemm_smem_bytes(GemmKind kind, int block_m, int block_n, int num_stages, bool tma_store) {
  return output_staging_bytes(kind, block_m, block_n, tma_store) +
         num_stages * gemm_stage_bytes(kind, block_m, block_n) + kSmemSlack;
}

int gemm_choose_epilogue(const GemmShape& shape, int block_n) {
  // NOTE: measured on H200 (dev/gemm/NOTES.md v3, v5): staging wins at K <= 2048 (K = 512:
  // +30-40%) and for 192-wide tiles; for 128-wide tiles at K >= 7168 the stage it costs
  // mattered more (4-10% slower, timed without alternation). On H100, in the rotated
  // alternation, the TMA store is 3-7% faster at K >= 7168 for dense M = 4096 (session 5 call 1:
  // 4096x7168 225.6 vs 240.7 us, 7168x16384 946.9 vs 977.2, 2112x7168 tail4 131.1 vs 140.2), so
  // dense shapes of >= kWideMinM rows stage at every K.
  // Weight gradient: the FP32 reduce-add through TMA (H100, session 7: 7168x2048x4096 168.7 vs
  // 185.5 us from registers, k-grouped 661 vs 713, same call; dev/gemm/NOTES.md "Session 7").
  if (is_wgrad(shape.kind)) return 2;
  if (shape.kind == GemmKind::kDense && shape.m >= kWideMinM) return 2;
  return (shape.k <= 3072 || block_n > 128) ? 2 : 1;
}

int gemm_max_stages(GemmKind kind, int block_m, int block_n, int64_t smem_limit, bool tma_store) {
  const int64_t stages =
      (smem_limit - kSmemSlack - output_staging_bytes(kind, block_m, block_n, tma_store)) /
      gemm_stage_bytes(kind, block_m, block_n);
  return static_cast<int>(std::min<int64_t>(stages, kMaxStages));
}

int64_t gemm_split_k_strips(int64_t m, int64_t n, int block_m, int block_n) {
  return ceil_div(std::max<int64_t>(m, 1), block_m) * ceil_div(n, block_n) * (block_m / 16);
}

int64_t gemm_split_k_workspace_bytes(int64_t m, int64_t n, int block_m, int block_n, int split_k) {
  if (split_k <= 1) return 0;
  const int64_t tiles = ceil_div(std::max<int64_t>(m, 1), block_m) * ceil_div(n, block_n);
  return kSplitKCounterBytes + tiles * split_k * int64_t{block_m} * block_n * 4;
}

TailSplitPlan gemm_tail_split_plan(int64_t tiles, int64_t grid, int64_t k_blocks, int requested) {
  TailSplitPlan plan;
  if (grid <= 0 || tiles < grid || k_blocks < 2 || requested < 2) return plan;
  const int64_t tail = tiles % grid;
  if (tail == 0) return plan;
  const int64_t slices = std::min<int64_t>({requested, grid / tail, k_blocks, int64_t{kMaxSplitK}});
  if (slices < 2) return plan;
  plan.full_units = tiles - tail;
  plan.tail_tiles = tail;
  plan.slices = static_cast<int>(slices);
  return plan;
}

int64_t gemm_tail_split_workspace_bytes(const TailSplitPlan& plan, int block_m, int block_n) {
  if (plan.slices <= 1) return 0;
  return kSplitKCounterBytes + plan.tail_tiles * plan.slices * int64_t{block_m} * block_n * 4;
}

namespace {
// A pair of 64-wide half tiles costs this many full-tile times (H100, session 5 call 3: 64-wide
// wgmmas read A at twice the bytes per FLOP; 4096x2112x7168 read 119.1 us where 2 waves of full
// tiles take ~105, 1024x2112 51.5 us for one wave holding a pair against 41.8 padded).
constexpr double kHalfPairCost = 1.25;
int64_t wide_tiles(int64_t m, int64_t n, const GemmTileConfig& c) {
  return ceil_div(std::max<int64_t>(m, 1), c.block_m) * ceil_div(n, c.block_n);
}
}  // namespace

int64_t gemm_half_column_units(int64_t m, int64_t n, const GemmTileConfig& c) {
  const int64_t tiles_m = ceil_div(std::max<int64_t>(m, 1), c.block_m);
  return tiles_m * (ceil_div(n, c.block_n) - 1) + ceil_div(tiles_m, 2);
}

double gemm_half_column_load(int64_t m, int64_t n, const GemmTileConfig& c) {
  const int64_t units = gemm_half_column_units(m, n, c);
  const int64_t pairs = ceil_div(ceil_div(std::max<int64_t>(m, 1), c.block_m), 2);
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(c.num_sms, units));
  // CTA u % grid runs unit u; the pair units are the last ones.
  std::vector<int64_t> pairs_of(static_cast<size_t>(grid), 0);
  for (int64_t u = units - pairs; u < units; ++u) ++pairs_of[static_cast<size_t>(u % grid)];
  double load = 0.0;
  for (int64_t b = 0; b < grid; ++b) {
    const int64_t count = units / grid + (b < units % grid ? 1 : 0);
    load = std::max(load, double(count) + (kHalfPairCost - 1.0) * double(pairs_of[size_t(b)]));
  }
  return load;
}

bool gemm_half_column(GemmKind kind, int64_t m, int64_t n, const GemmTileConfig& c) {
  if (kind != GemmKind::kDense || c.block_m != 256 || c.block_n != 128 || c.tail_split > 1 ||
      c.split_k > 1 || n % 128 == 0 || n % 128 > 64 || c.num_sms <= 0)
    return false;
  // Only where it shortens the launch: padded, the last column's tiles are whole units.
  const int64_t tiles = wide_tiles(m, n, c);
  const int64_t grid = std::min<int64_t>(c.num_sms, tiles);
  return gemm_half_column_load(m, n, c) < double(ceil_div(tiles, grid)) - 0.1;
}

int gemm_default_scale_prefetch(const GemmShape& shape, const GemmTileConfig& c) {
  const bool kernel = (c.block_m == 128 && c.block_n == 128) || c.split_k > 1;
  return shape.kind == GemmKind::kDense && shape.m <= kScalePrefetchMaxM && kernel &&
                 c.tail_split <= 1
             ? kGemmDefaultScalePrefetch
             : 1;
}

double gemm_dram_bytes_per_s(int64_t memory_clock_khz, int bus_width_bits) {
  FM_CHECK_ARG(memory_clock_khz > 0 && bus_width_bits > 0, "gemm_dram_bytes_per_s: memory clock ",
               memory_clock_khz, " kHz, bus width ", bus_width_bits, " bits");
  return kDramEfficiency * 2.0 * double(memory_clock_khz) * 1e3 * double(bus_width_bits) / 8.0;
}

double gemm_tile_cost(const GemmShape& s, const TileCandidate& t, int num_sms, int split_k,
                      double dram_bytes_per_s) {
  const int64_t tiles_m = ceil_div(std::max<int64_t>(s.m, 1), t.block_m);
  const int64_t tiles_n = ceil_div(s.n, t.block_n);
  const int64_t groups = s.kind == GemmKind::kGroupedContiguous ? 1 : s.num_groups;
  const int64_t tiles = tiles_m * tiles_n * groups;
  const int64_t units = tiles * std::max(split_k, 1);
  const int64_t waves = ceil_div(units, num_sms);
  // The longest slice sets the unit's time.
  const double k_unit = 128.0 * ceil_div(s.k / 128, std::max(split_k, 1));
  // One math warpgroup (block_m 64) overlaps promotion with the tensor cores less well.
  const double efficiency = (t.block_m >= 128 ? 1.0 : 0.8) * (t.block_n == 128 ? 1.0 : 0.85);
  const double compute = 2.0 * t.block_m * t.block_n * k_unit / (kFlopsPerSm * efficiency);
  const double l2 = double(t.block_m + t.block_n) * k_unit / kL2BytesPerSm;
  const double per_tile = std::max(compute, l2);
  // Split-K: the slices of a tile finish together, then one SM writes its partial tile and reads
  // all split_k back: a tail on the critical path that grows with split_k (measured on H200,
  // dev/gemm/NOTES.md session 2b: 128x128 tiles at 2112x7168 read 15.2 us with 4 slices, 17.0
  // with 7).
  const double fixup =
      split_k > 1 ? double(1 + split_k) * t.block_m * t.block_n * 4 / kL2BytesPerSm : 0.0;
  // Fewer units than multiprocessors: each unit still takes per_tile, but the DRAM floor is
  // shared by fewer readers, so the floor below dominates.
  const double dram = double(s.m * s.k + s.n * s.k * groups) / dram_bytes_per_s;
  const double dram_per_sm_limit =
      double(std::min<int64_t>(units, num_sms)) / num_sms;  // fraction of the chip pulling data
  // NOTE: the small second term breaks ties when the DRAM floor dominates (small M) in favour of
  // the tile that wastes the least tensor-core work (no 128-row tiles for M = 64).
  return std::max(double(waves) * per_tile, dram / std::max(dram_per_sm_limit, 1e-3)) +
         0.05 * double(waves) * per_tile + fixup;
}

double gemm_tail_split_cost(const GemmShape& s, const TileCandidate& t, int num_sms, int slices,
                            double dram_bytes_per_s) {
  const int64_t tiles = ceil_div(std::max<int64_t>(s.m, 1), t.block_m) * ceil_div(s.n, t.block_n);
  const TailSplitPlan plan = gemm_tail_split_plan(tiles, num_sms, s.k / 128, slices);
  if (plan.slices <= 1) return gemm_tile_cost(s, t, num_sms, 1, dram_bytes_per_s);
  // The full waves cost what the unsplit launch's do; the tail wave one slice, then the fix-up.
  const GemmShape whole{s.kind, s.m, s.n, s.k, s.num_groups};
  const double full_waves = double(plan.full_units / num_sms);
  const double unsplit = gemm_tile_cost(whole, t, num_sms, 1, dram_bytes_per_s);
  const double per_wave = unsplit / (full_waves + 1.0);
  const double slice_k = 128.0 * ceil_div(s.k / 128, plan.slices);
  const double efficiency = (t.block_m >= 128 ? 1.0 : 0.8) * (t.block_n == 128 ? 1.0 : 0.85);
  const double slice = std::max(2.0 * t.block_m * t.block_n * slice_k / (kFlopsPerSm * efficiency),
                                double(t.block_m + t.block_n) * slice_k / kL2BytesPerSm);
  const double fixup = double(1 + plan.slices) * t.block_m * t.block_n * 4 / kL2BytesPerSm;
  return full_waves * per_wave + slice + fixup;
}

namespace {
// The tail split must beat the unsplit launch by this factor in the model (its fix-up is charged
// at the model's per-SM L2 rate, which the idle chip of a tail wave exceeds).
constexpr double kTailSplitMargin = 0.95;
// Split-K must beat the best unsplit tile by this factor in the model: of the fix-up only its
// L2 bytes are modelled, not its latency (fences, an atomic, ceil(S/2) L2 round trips).
constexpr double kSplitKMargin = 0.85;
constexpr int64_t kSplitKMaxM = 128;
// A modelled DRAM rate between the H100's (3.0e12 B/s) and the H200's (4.4e12): below it the
// 128x64 tile replaces the 128x192 rule (choose_gemm_tile).
constexpr double kTile128x64DramBelow = 3.6e12;
// A 128x256 tile's time against two 128x128 tiles' (TMA store both) in the grouped forms on H100
// (session 5b call 1, rotated alternation): contiguous 4 x 8192 rows 4096x7168 1693 vs 1885 us,
// 8 x 4096 1699 vs 1925, 7168x2048 838 vs 930 and 850 vs 935: 0.88-0.91.
constexpr double kWideColumnTileTime = 0.9;
}  // namespace

namespace {
// The pick before the 128x64 rule below (choose_gemm_tile).
GemmTileConfig choose_gemm_tile_from_model(const GemmShape& shape, int num_sms, int64_t smem_limit,
                                           double dram_bytes_per_s) {
  FM_CHECK_ARG(num_sms > 0, "choose_gemm_tile: num_sms=", num_sms);
  FM_CHECK_ARG(dram_bytes_per_s > 0, "choose_gemm_tile: dram_bytes_per_s=", dram_bytes_per_s);
  FM_CHECK_ARG(shape.n > 0 && shape.k > 0, "choose_gemm_tile: empty shape n=", shape.n,
               " k=", shape.k);
  GemmTileConfig best;
  double best_cost = std::numeric_limits<double>::infinity();
  // NOTE: 128x192 keeps the loop without overlapped promotion (three register sets do not fit)
  // and measured slower than 128x128 at every M = 4096 shape on H200, 4-13% at N = 2112 where
  // the cost model preferred it for its fewer waves (dev/gemm/NOTES.md v11). It is taken only
  // where it turns 128x128's more-than-one wave into one at 64 < M <= 128 (memory-bound, B
  // streamed once by every SM): M = 128 N = 24576 K = 1536 read 16.0 vs 17.5 us (session 2b) and
  // 608 vs 551 TFLOPS (session 3) on H200.
  if (shape.kind == GemmKind::kDense && shape.m > 64 && shape.m <= 128 &&
      ceil_div(shape.n, 192) <= num_sms && ceil_div(shape.n, 128) > num_sms) {
    const int stages = gemm_max_stages(shape.kind, 128, 192, smem_limit, true);
    if (stages >= 3) return GemmTileConfig{128, 192, stages, num_sms, 2, 1, 1, 1};
  }
  for (const TileCandidate& t : gemm_tile_candidates(shape.kind)) {
    if (t.block_n >= 192 || t.block_m == 256) continue;
    const int epilogue = gemm_choose_epilogue(shape, t.block_n);
    const int stages = gemm_max_stages(shape.kind, t.block_m, t.block_n, smem_limit, epilogue == 2);
    if (stages < 3) continue;
    const double cost = gemm_tile_cost(shape, t, num_sms, 1, dram_bytes_per_s);
    // NOTE: strict '<' with the candidates listed largest first keeps the larger tile on ties.
    if (cost < best_cost * (1.0 - 1e-9)) {
      best_cost = cost;
      best = GemmTileConfig{t.block_m, t.block_n, stages, num_sms, epilogue, 1, 1};
    }
  }
  FM_CHECK_ARG(best_cost < std::numeric_limits<double>::infinity(),
               "choose_gemm_tile: no tile fits in ", smem_limit, " bytes of shared memory");
  if (shape.kind == GemmKind::kDense && shape.max_split_k > 1 && shape.m > kSplitKMaxM &&
      best.block_n <= 128) {
    // Tail split: the slices of the last partial wave's tiles take the idle SMs. >= 4 K blocks a
    // slice, as for split-K. Split launches store from registers only in the tail units (the
    // full waves keep the pick's epilogue).
    const TileCandidate t{best.block_m, best.block_n};
    const int64_t max_slices = std::min<int64_t>(shape.max_split_k, shape.k / 128 / 4);
    const int64_t tiles =
        ceil_div(std::max<int64_t>(shape.m, 1), t.block_m) * ceil_div(shape.n, t.block_n);
    // NOTE: measured only with a last wave of <= 1/4 of the SMs (4096x2112x7168 on H100: 16 tail
    // tiles, tail4 140.8-143.6 us vs 151.0 unsplit, dev/gemm/NOTES.md session 4); a fuller last
    // wave gains less against the fix-up and was not measured.
    double tail_best = best_cost * kTailSplitMargin;
    for (int slices = 2; slices <= max_slices && 4 * (tiles % num_sms) <= num_sms; ++slices) {
      const TailSplitPlan plan = gemm_tail_split_plan(tiles, num_sms, shape.k / 128, slices);
      if (plan.slices != slices) break;
      const double c = gemm_tail_split_cost(shape, t, num_sms, slices, dram_bytes_per_s);
      if (c < tail_best * (1.0 - 1e-9)) {
        tail_best = c;
        best.tail_split = slices;
      }
    }
  }
  // 256x128 tiles with the TMA-store epilogue (dense, >= kWideMinM rows): a quarter fewer
  // shared-memory and L2 bytes per FLOP than 128x128 (dev/gemm/NOTES.md session 5). The model's
  // L2 term already gives them that edge; their coarser waves count against them (N = 2112:
  // 272 tiles = 2.06 waves, 2.25 with the half-tile last column, or a tail split). Measured on
  // H100 at M = 1024-4096 (session 5 calls 1-3): 1.05-1.18x cuBLASLt blockwise but M = 2048
  // 7168x16384 (0.95-1.01x, 3.39 waves).
  if (shape.kind == GemmKind::kDense && shape.m >= kWideMinM) {
    const double chosen = best.tail_split > 1
                              ? gemm_tail_split_cost(shape, {best.block_m, best.block_n}, num_sms,
                                                     best.tail_split, dram_bytes_per_s)
                              : best_cost;
    const TileCandidate w{256, 128};
    const int stages = gemm_max_stages(shape.kind, 256, 128, smem_limit, true);
    if (stages >= 3) {
      double wide = gemm_tile_cost(shape, w, num_sms, 1, dram_bytes_per_s);
      const GemmTileConfig probe{256, 128, stages, num_sms, 2, 1, 1, 1};
      if (gemm_half_column(shape.kind, shape.m, shape.n, probe)) {
        // The half tiles of the last column go two to a unit: the most loaded CTA's work.
        const int64_t tiles = wide_tiles(shape.m, shape.n, probe);
        wide *= gemm_half_column_load(shape.m, shape.n, probe) /
                double(ceil_div(tiles, std::min<int64_t>(num_sms, tiles)));
      }
      int wide_tail = 1;
      if (shape.max_split_k > 1) {
        const int64_t tiles = ceil_div(shape.m, 256) * ceil_div(shape.n, 128);
        const int64_t max_slices = std::min<int64_t>(shape.max_split_k, shape.k / 128 / 4);
        double tail_best = wide * kTailSplitMargin;
        for (int slices = 2; slices <= max_slices && 4 * (tiles % num_sms) <= num_sms; ++slices) {
          const TailSplitPlan plan = gemm_tail_split_plan(tiles, num_sms, shape.k / 128, slices);
          if (plan.slices != slices) break;
          const double c = gemm_tail_split_cost(shape, w, num_sms, slices, dram_bytes_per_s);
          if (c < tail_best * (1.0 - 1e-9)) {
            tail_best = c;
            wide_tail = slices;
          }
        }
        if (wide_tail > 1) wide = tail_best;
      }
      if (wide < chosen * (1.0 - 1e-9)) {
        best = GemmTileConfig{256, 128, stages, num_sms, 2, 1, 1, wide_tail};
      }
    }
  }
  // 128x256 tiles with the TMA-store epilogue for the grouped forms (dense keeps its pick: at
  // M = 64 / 128 they measured slower than the pick on all six V3 shapes, H100 session 5b), where
  // the 128-row pick is 128x128 (not where the groups are thin enough for 64-row tiles) and the
  // model, with a 128x256 tile timed at kWideColumnTileTime of two 128x128 tiles, prefers them.
  // The model's tensor and L2 terms see no difference between the two per FLOP; the shared-memory
  // bound (~160 vs ~140 B/cycle, dev/gemm/NOTES.md session 5) is what the factor carries.
  // NOTE: measured at N = 4096 and 7168 only; not taken where the last tile column would be
  // mostly empty (N % 256 in (0, 128], e.g. N = 2112: 64 valid columns of 256).
  if ((shape.kind == GemmKind::kGroupedContiguous || shape.kind == GemmKind::kGroupedMasked) &&
      best.block_m == 128 && best.block_n == 128 && (shape.n % 256 == 0 || shape.n % 256 > 128)) {
    const int stages = gemm_max_stages(shape.kind, 128, 256, smem_limit, true);
    const double wide =
        kWideColumnTileTime * gemm_tile_cost(shape, {128, 256}, num_sms, 1, dram_bytes_per_s);
    if (stages >= 3 && wide < best_cost * (1.0 - 1e-9))
      best = GemmTileConfig{128, 256, stages, num_sms, 2, 1, 1, 1};
  }
  // The masked form takes 256x128 instead where it took 128x256 and a group holds at least 256
  // rows: the same tiles' work, measured 1.3-7.5% faster on all 6 masked bench shapes on H100
  // in two plain sweeps (dev/gemm/NOTES.md session 8). The contiguous form keeps 128x256 (equal
  // there, and an expert boundary inside a 256-row tile costs it a second, half-empty pass).
  if (shape.kind == GemmKind::kGroupedMasked && best.block_m == 128 && best.block_n == 256 &&
      shape.m >= 256) {
    const int stages = gemm_max_stages(shape.kind, 256, 128, smem_limit, true);
    if (stages >= 3) best = GemmTileConfig{256, 128, stages, num_sms, 2, 1, 1, 1};
  }
  // NOTE: split-K was measured at M = 64 and 128 only; larger M keeps the unsplit pick.
  if (shape.kind != GemmKind::kDense || shape.max_split_k <= 1 || shape.m > kSplitKMaxM)
    return best;
  // Split-K: only while all units (tiles x slices) fit in one wave, with >= 4 K blocks a slice,
  // and only where the model gains kSplitKMargin over the best unsplit tile. Measured on H200
  // (dev/gemm/NOTES.md session 2b): every split with more units than SMs lost, by 2-6x at
  // K <= 2048. Split launches store from registers (the last slice of a strip does the sum), so
  // their stages fill shared memory.
  const int64_t k_blocks = shape.k / 128;
  double split_best = best_cost * kSplitKMargin;
  for (const TileCandidate& t : gemm_tile_candidates(shape.kind)) {
    // No split-K kernel for 192-wide or 256-row tiles.
    if (t.block_n > 128 || t.block_m > 128) continue;
    const int64_t tiles =
        ceil_div(std::max<int64_t>(shape.m, 1), t.block_m) * ceil_div(shape.n, t.block_n);
    if (2 * tiles > num_sms ||
        gemm_split_k_strips(shape.m, shape.n, t.block_m, t.block_n) > kSplitKMaxStrips)
      continue;
    const int stages = gemm_max_stages(shape.kind, t.block_m, t.block_n, smem_limit, false);
    if (stages < 3) continue;
    for (int split = 2; split <= std::min(shape.max_split_k, kMaxSplitK) &&
                        k_blocks >= 4 * int64_t{split} && tiles * split <= num_sms;
         ++split) {
      const double c = gemm_tile_cost(shape, t, num_sms, split, dram_bytes_per_s);
      if (c < split_best * (1.0 - 1e-9)) {
        split_best = c;
        best = GemmTileConfig{t.block_m, t.block_n, stages, num_sms, 1, 1, split};
      }
    }
  }
  return best;
}

}  // namespace

// 128x64 tiles (dense, 64 < M <= 128; session 17, gemm28): two math warpgroups over 64 columns,
// so a CTA streams half as many B rows as a 128-wide tile does, over the whole K. Measured in
// two runs on each card (dev/gemm/NOTES.md session 17) against the model's pick where that pick
// is an unsplit 64-row tile and the 64-wide tiles fill 3/4 to all of the SMs in one wave: M = 128
// N = 7168 K = 2048 0.85x the pick's time on H200 and 0.90x on H100, K = 16384 0.90x on H100
// (on H200 the model takes 128x128 split-K there, which 128x64 does not beat: 1.02-1.03x). With
// the H100's DRAM rate it also replaces the 128x192 rule (N = 24576 K = 1536: 0.92x on H100,
// 1.04-1.08x on H200). Everywhere else measured it lost (fewer tiles than 3/4 of the SMs, more
// than one wave at short K, M = 64).
GemmTileConfig choose_gemm_tile(const GemmShape& shape, int num_sms, int64_t smem_limit,
                                double dram_bytes_per_s) {
  GemmTileConfig best = choose_gemm_tile_from_model(shape, num_sms, smem_limit, dram_bytes_per_s);
  if (shape.kind != GemmKind::kDense || shape.m <= 64 || shape.m > 128 || best.split_k > 1 ||
      best.tail_split > 1)
    return best;
  const int64_t tiles = ceil_div(shape.n, 64);
  const bool fills_one_wave =
      best.block_m == 64 && 4 * tiles >= 3 * int64_t{num_sms} && tiles <= num_sms;
  const bool slow_dram_wide = best.block_n == 192 && dram_bytes_per_s < kTile128x64DramBelow;
  if (!fills_one_wave && !slow_dram_wide) return best;
  const int epilogue = gemm_choose_epilogue(shape, 64);
  const int stages = gemm_max_stages(shape.kind, 128, 64, smem_limit, epilogue == 2);
  if (stages < 3) return best;
  return GemmTileConfig{128, 64, stages, num_sms, epilogue, 1, 1, 1};
}

GemmTileConfig gemm_gathered_tile(const GemmShape& shape, int num_sms, int64_t smem_limit,
                                  double dram_bytes_per_s) {
  FM_CHECK_ARG(shape.kind == GemmKind::kGroupedContiguous,
               "gemm_gathered_tile: a grouped contiguous shape, not ", gemm_kind_name(shape.kind));
  GemmTileConfig c = choose_gemm_tile(shape, num_sms, smem_limit, dram_bytes_per_s);
  if (c.block_m == 128 && (c.block_n == 256 || c.block_n == 128)) return c;
  // NOTE: the 256-row grouped kernel and the 64-row / 192-wide ones have no gathered form.
  const int epilogue = gemm_choose_epilogue(shape, 128);
  return GemmTileConfig{128, 128, gemm_max_stages(shape.kind, 128, 128, smem_limit, epilogue == 2),
                        num_sms, epilogue};
}

std::string describe_tile_config(const GemmTileConfig& c) {
  std::ostringstream out;
  out << c.block_m << "x" << c.block_n << "x128/s" << c.num_stages << "/sm" << c.num_sms
      << (c.epilogue == 2 ? "/tma_store" : "") << (c.cluster == 2 ? "/pair" : "");
  if (c.split_k > 1) out << "/split" << c.split_k;
  if (c.tail_split > 1) out << "/tail" << c.tail_split;
  if (c.pdl == 2) out << "/pdl";
  if (c.scale_prefetch != 0) out << (c.scale_prefetch == 2 ? "/sbpf" : "/nosbpf");
  return out.str();
}

int64_t gemm_masked_plan_rows(int64_t expected_m, int64_t max_m) {
  FM_CHECK_ARG(max_m >= 0 && expected_m >= 0 && expected_m <= max_m,
               "gemm_masked_plan_rows: expected_m=", expected_m, " outside [0, max_m=", max_m, "]");
  if (expected_m == 0) return max_m;
  const auto spread = static_cast<int64_t>(std::ceil(2.0 * std::sqrt(double(expected_m))));
  return std::min(max_m, expected_m + spread);
}

}  // namespace fp8moe::kernels
