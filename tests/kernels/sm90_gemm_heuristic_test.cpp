#include "fp8moe/kernels/sm90_gemm_heuristic.h"

#include <gtest/gtest.h>

#include <utility>

#include "fp8moe/core/error.h"

namespace fp8moe::kernels {
namespace {

constexpr int kH100Sms = 132;
constexpr int64_t kH100Smem = 232448;

GemmShape with_split(GemmShape s, int max_split) {
  s.max_split_k = max_split;
  return s;
}

TEST(Sm90GemmHeuristic, EveryChoiceFitsSharedMemory) {
  for (GemmKind kind : {GemmKind::kDense, GemmKind::kGroupedContiguous, GemmKind::kGroupedMasked,
                        GemmKind::kWgrad, GemmKind::kKGroupedWgrad})
    for (int64_t m : {1, 64, 128, 4096})
      for (int64_t n : {2112, 7168, 32768}) {
        const GemmTileConfig c = choose_gemm_tile({kind, m, n, 7168, 1}, kH100Sms, kH100Smem);
        EXPECT_GE(c.num_stages, 3);
        EXPECT_LE(gemm_smem_bytes(kind, c.block_m, c.block_n, c.num_stages, c.epilogue == 2),
                  kH100Smem);
        EXPECT_TRUE(c.epilogue == 1 || c.epilogue == 2);
        EXPECT_EQ(c.num_sms, kH100Sms);
        EXPECT_TRUE(gemm_tile_compiled(kind, c.block_m, c.block_n))
            << gemm_kind_name(kind) << " " << describe_tile_config(c);
      }
}

TEST(Sm90GemmHeuristic, LargeProblemsTakeTheLargestTile) {
  const GemmTileConfig c =
      choose_gemm_tile({GemmKind::kDense, 4096, 7168, 16384, 1}, kH100Sms, kH100Smem);
  EXPECT_EQ(c.block_m, 256);
  EXPECT_EQ(c.block_n, 128);
  EXPECT_EQ(c.epilogue, 2);
  // The contiguous form keeps 128-row tiles (256-row ones measured no faster, session 8).
  const GemmTileConfig g =
      choose_gemm_tile({GemmKind::kGroupedContiguous, 32768, 4096, 7168, 4}, kH100Sms, kH100Smem);
  EXPECT_EQ(g.block_m, 128);
  EXPECT_GE(g.block_n, 128);
}

TEST(Sm90GemmHeuristic, WideTilesOnlyForLargeDenseShapes) {
  // Measured on H100 (dev/gemm/NOTES.md session 5): 256x128 with the TMA store beat every other
  // configuration at M = 4096 on five of the six V3 shapes (2-16%), and lost at N = 2112 unsplit
  // (272 tiles = 2.06 waves).
  for (int64_t n : {24576, 32768, 7168, 4096})
    for (int64_t k : {512, 1536, 2048, 7168, 16384}) {
      const GemmTileConfig t =
          choose_gemm_tile({GemmKind::kDense, 4096, n, k, 1}, kH100Sms, kH100Smem);
      EXPECT_EQ(t.block_m, 256) << n << "x" << k;
      EXPECT_EQ(t.epilogue, 2) << n << "x" << k;
      EXPECT_LE(gemm_smem_bytes(GemmKind::kDense, 256, 128, t.num_stages, true), kH100Smem);
    }
  // N = 2112: 272 tiles of 256x128 are 2.06 waves, but the half-empty 17th tile column runs as
  // 64-wide half tiles two to a unit: 256 + 8 units, exactly 2 waves.
  const GemmTileConfig h =
      choose_gemm_tile({GemmKind::kDense, 4096, 2112, 7168, 1}, kH100Sms, kH100Smem);
  EXPECT_EQ(h.block_m, 256);
  EXPECT_TRUE(gemm_half_column(GemmKind::kDense, 4096, 2112, h));
  EXPECT_EQ(gemm_half_column_units(4096, 2112, h), 264);
  EXPECT_EQ(h.tail_split, 1);
  for (int64_t m :
       {int64_t{1}, int64_t{64}, int64_t{128}, int64_t{256}, int64_t{512}, kWideMinM - 1})
    for (int64_t n : {2112, 7168, 32768})
      for (int max_split : {1, 8})
        EXPECT_NE(choose_gemm_tile(with_split({GemmKind::kDense, m, n, 7168, 1}, max_split),
                                   kH100Sms, kH100Smem)
                      .block_m,
                  256)
            << m << "x" << n;
  for (GemmKind kind : {GemmKind::kGroupedContiguous, GemmKind::kWgrad, GemmKind::kKGroupedWgrad})
    EXPECT_NE(choose_gemm_tile({kind, 8192, 7168, 7168, 4}, kH100Sms, kH100Smem).block_m, 256)
        << gemm_kind_name(kind);
}

TEST(Sm90GemmHeuristic, GroupedFormsTakeWideColumnTiles) {
  // Measured on H100 (dev/gemm/NOTES.md session 5b): 128x256 with the TMA store beat the 128x128
  // pick by 2-18% on every grouped bench shape (contiguous 4 x 8192 and 8 x 4096 rows, masked
  // 1 x 1024, 2 x 512, 4 x 256; N x K = 4096 x 7168 and 7168 x 2048).
  for (const auto& [n, k] : {std::pair<int64_t, int64_t>{4096, 7168}, {7168, 2048}}) {
    for (int64_t groups : {4, 8}) {
      const GemmTileConfig c = choose_gemm_tile({GemmKind::kGroupedContiguous, 32768, n, k, groups},
                                                kH100Sms, kH100Smem);
      EXPECT_EQ(c.block_m, 128) << n << "x" << k;
      EXPECT_EQ(c.block_n, 256) << n << "x" << k;
      EXPECT_EQ(c.epilogue, 2);
      EXPECT_GE(c.num_stages, 3);
      EXPECT_LE(gemm_smem_bytes(GemmKind::kGroupedContiguous, 128, 256, c.num_stages, true),
                kH100Smem);
    }
    // Masked groups of >= 256 rows take 256x128 instead (session 8: 0.3-2.3% faster on 5 of these
    // 6 shapes); 128x256 below 256 rows.
    for (const auto& [groups, max_m] : {std::pair<int64_t, int64_t>{1, 1024}, {2, 512}, {4, 256}}) {
      const GemmTileConfig c =
          choose_gemm_tile({GemmKind::kGroupedMasked, max_m, n, k, groups}, kH100Sms, kH100Smem);
      EXPECT_EQ(c.block_m, 256) << groups << "x" << max_m << " " << n << "x" << k;
      EXPECT_EQ(c.block_n, 128) << groups << "x" << max_m << " " << n << "x" << k;
      EXPECT_EQ(c.epilogue, 2);
      EXPECT_GE(c.num_stages, 3);
    }
    const GemmTileConfig narrow =
        choose_gemm_tile({GemmKind::kGroupedMasked, 192, n, k, 8}, kH100Sms, kH100Smem);
    EXPECT_EQ(narrow.block_m, 128) << n << "x" << k;
  }
  // Not where 64-row tiles fit thin groups better, where 128x256 tiles leave SMs idle (two
  // experts of 128 rows: 112 tiles of 128x128, 56 of 128x256), nor with a mostly empty last
  // tile column (N = 2112); dense never (slower at M = 64 / 128, 256x128 above).
  EXPECT_EQ(
      choose_gemm_tile({GemmKind::kGroupedMasked, 64, 4096, 7168, 8}, kH100Sms, kH100Smem).block_m,
      64);
  EXPECT_EQ(
      choose_gemm_tile({GemmKind::kGroupedMasked, 128, 7168, 2048, 1}, kH100Sms, kH100Smem).block_m,
      64);
  EXPECT_EQ(
      choose_gemm_tile({GemmKind::kGroupedContiguous, 256, 7168, 2048, 2}, kH100Sms, kH100Smem)
          .block_n,
      128);
  EXPECT_NE(
      choose_gemm_tile({GemmKind::kGroupedMasked, 256, 2112, 7168, 4}, kH100Sms, kH100Smem).block_n,
      256);
  for (int64_t m : {1, 64, 128, 256, 512, 1024, 4096})
    for (int64_t n : {2112, 4096, 7168, 24576, 32768})
      for (int max_split : {1, 8})
        EXPECT_NE(choose_gemm_tile(with_split({GemmKind::kDense, m, n, 2048, 1}, max_split),
                                   kH100Sms, kH100Smem)
                      .block_n,
                  256)
            << m << "x" << n;
  // The weight-gradient kernels have no 128x256 tile.
  for (GemmKind kind : {GemmKind::kWgrad, GemmKind::kKGroupedWgrad})
    for (const TileCandidate& t : gemm_tile_candidates(kind)) EXPECT_NE(t.block_n, 256);
}

TEST(Sm90GemmHeuristic, GatheredFormKeepsTo128RowTiles) {
  // The gathered contiguous kernels exist for 128x256 and 128x128: the contiguous pick where it
  // is one of them (the bench shapes: 128x256), else 128x128 that fits shared memory.
  for (const auto& [n, k] : {std::pair<int64_t, int64_t>{4096, 7168}, {7168, 2048}, {2112, 512}})
    for (int64_t m : {128, 256, 1024, 4096, 32768})
      for (int64_t groups : {1, 4, 8}) {
        const GemmShape shape{GemmKind::kGroupedContiguous, m, n, k, groups};
        const GemmTileConfig pick = choose_gemm_tile(shape, kH100Sms, kH100Smem);
        const GemmTileConfig c = gemm_gathered_tile(shape, kH100Sms, kH100Smem);
        EXPECT_EQ(c.block_m, 128) << m << " " << n << "x" << k;
        EXPECT_TRUE(c.block_n == 128 || c.block_n == 256) << m << " " << n << "x" << k;
        if (pick.block_m == 128 && pick.block_n >= 128 && pick.block_n != 192) {
          EXPECT_EQ(describe_tile_config(c), describe_tile_config(pick));
        }
        EXPECT_GE(c.num_stages, 3);
        EXPECT_LE(gemm_smem_bytes(shape.kind, 128, c.block_n, c.num_stages, c.epilogue == 2),
                  kH100Smem);
        EXPECT_EQ(c.num_sms, kH100Sms);
      }
  EXPECT_EQ(
      gemm_gathered_tile({GemmKind::kGroupedContiguous, 32768, 4096, 7168, 4}, kH100Sms, kH100Smem)
          .block_n,
      256);
  EXPECT_THROW(gemm_gathered_tile({GemmKind::kDense, 128, 4096, 7168, 1}, kH100Sms, kH100Smem),
               Error);
}

TEST(Sm90GemmHeuristic, SmallMUsesNarrowTilesToFillTheChip) {
  // M=64: 128-row tiles would waste half of every tile.
  for (int64_t n : {2112, 4096, 7168, 24576, 32768}) {
    const GemmTileConfig c =
        choose_gemm_tile({GemmKind::kDense, 64, n, 7168, 1}, kH100Sms, kH100Smem);
    EXPECT_EQ(c.block_m, 64) << "n=" << n;
  }
  // 2112/128 = 17 tiles leave most SMs idle; 64-wide tiles double that.
  const GemmTileConfig d =
      choose_gemm_tile({GemmKind::kDense, 64, 2112, 7168, 1}, kH100Sms, kH100Smem);
  EXPECT_EQ(d.block_n, 64);
}

TEST(Sm90GemmHeuristic, Picks192WideTilesOnlyWhereTheyMakeOneWaveAtSmallM) {
  // The cost model alone prefers 128x192 at N = 2112 (3 waves instead of 5); measured, 128x128
  // with overlapped promotion is faster there (dev/gemm/NOTES.md v11), and 256x128 with its
  // half-tile last column (session 5) faster still.
  const GemmTileConfig c =
      choose_gemm_tile({GemmKind::kDense, 4096, 2112, 7168, 1}, kH100Sms, kH100Smem);
  EXPECT_EQ(c.block_m, 256);
  EXPECT_EQ(c.block_n, 128);
  // M = 128 N = 24576: 128 tiles of 128x192 in one wave against 192 of 128x128 (measured faster,
  // sessions 2b and 3, H200); N = 32768 needs 171 of them, M = 64 keeps 64-row tiles. With the
  // H100's DRAM rate 128x64 takes that shape instead (session 17).
  const double h200 = gemm_dram_bytes_per_s(3201000, 6144);
  for (double dram : {kDefaultDramBytesPerS, h200})
    for (int64_t m : {1, 64, 100, 128, 512, 1024, 4096})
      for (int64_t n : {2112, 4096, 7168, 24576, 32768})
        for (int64_t k : {512, 1536, 7168}) {
          const GemmTileConfig t =
              choose_gemm_tile({GemmKind::kDense, m, n, k, 1}, kH100Sms, kH100Smem, dram);
          const bool one_wave = m > 64 && m <= 128 && n == 24576;
          if (!one_wave) {
            EXPECT_NE(t.block_n, 192) << m << "x" << n << "x" << k;
            continue;
          }
          EXPECT_EQ(t.block_n, dram == h200 ? 192 : 64) << m << "x" << n << "x" << k;
          EXPECT_EQ(t.block_m, 128);
          EXPECT_EQ(t.split_k, 1);
          if (dram == h200) {
            EXPECT_EQ(t.epilogue, 2);
          }
        }
}

TEST(Sm90GemmHeuristic, EpilogueStagesWhereItWasMeasuredToPay) {
  EXPECT_EQ(gemm_choose_epilogue({GemmKind::kDense, 4096, 32768, 512, 1}, 128), 2);
  // Dense, >= kWideMinM rows: TMA store at every K (H100, session 5); elsewhere registers at
  // K >= 7168 for 128-wide tiles (H200, v3 / v5).
  EXPECT_EQ(gemm_choose_epilogue({GemmKind::kDense, 4096, 7168, 16384, 1}, 128), 2);
  EXPECT_EQ(gemm_choose_epilogue({GemmKind::kDense, 128, 7168, 16384, 1}, 128), 1);
  EXPECT_EQ(gemm_choose_epilogue({GemmKind::kGroupedContiguous, 32768, 4096, 7168, 4}, 128), 1);
  EXPECT_EQ(gemm_choose_epilogue({GemmKind::kDense, 4096, 2112, 7168, 1}, 192), 2);
  // Weight gradient: FP32 reduce-adds through TMA (H100, session 7), both forms.
  EXPECT_EQ(gemm_choose_epilogue({GemmKind::kWgrad, 4096, 7168, 512, 1}, 128), 2);
  EXPECT_EQ(gemm_choose_epilogue({GemmKind::kKGroupedWgrad, 7168, 2048, 4096, 4}, 128), 2);
}

TEST(Sm90GemmHeuristic, CostGrowsWithWaves) {
  const TileCandidate t{128, 128};
  const double one = gemm_tile_cost({GemmKind::kDense, 128 * 12, 128 * 11, 4096, 1}, t, kH100Sms);
  const double two = gemm_tile_cost({GemmKind::kDense, 128 * 12, 128 * 12, 4096, 1}, t, kH100Sms);
  EXPECT_GT(two, one * 1.5);  // 132 tiles fit one wave, 144 need two
}

TEST(Sm90GemmHeuristic, SplitsKWhereItWasMeasuredToPay) {
  // H200, dev/gemm/NOTES.md session 2b (same-run cuBLASLt blockwise ratio, unsplit -> split):
  // M = 128 2112x7168 64x64 1.06x -> split 2 1.32x; M = 64 2112x7168 1.00x -> split 4 1.53x;
  // M = 64 4096x7168 1.06x -> split 2 1.25x.
  struct Case {
    int64_t m, n, k;
    int split;
  };
  for (const Case& c :
       {Case{128, 2112, 7168, 2}, Case{64, 2112, 7168, 4}, Case{64, 4096, 7168, 2}}) {
    const GemmShape s{GemmKind::kDense, c.m, c.n, c.k, 1};
    EXPECT_EQ(choose_gemm_tile(s, kH100Sms, kH100Smem).split_k, 1);  // no workspace, no split
    const GemmTileConfig t = choose_gemm_tile(with_split(s, 8), kH100Sms, kH100Smem);
    EXPECT_EQ(t.block_m, 64) << c.m << "x" << c.n << "x" << c.k;
    EXPECT_EQ(t.block_n, 64) << c.m << "x" << c.n << "x" << c.k;
    EXPECT_EQ(t.split_k, c.split) << c.m << "x" << c.n << "x" << c.k;
    EXPECT_EQ(t.epilogue, 1);  // split launches store from registers
    EXPECT_LE(gemm_smem_bytes(GemmKind::kDense, t.block_m, t.block_n, t.num_stages, false),
              kH100Smem);
  }
}

TEST(Sm90GemmHeuristic, SplitsKOnlyInOneWaveOfUnderfilledSmallMDenseGrids) {
  // Measured losses (H200): every split with more units than SMs (2-6x slower at K <= 2048),
  // 128x128 with 7-8 slices, and splits where the unsplit 64x64 grid is already full.
  for (int64_t m : {1, 64, 100, 128, 256, 4096})
    for (int64_t n : {576, 1536, 2112, 4096, 7168, 24576, 32768})
      for (int64_t k : {512, 1536, 2048, 7168, 16384}) {
        const GemmShape s = with_split({GemmKind::kDense, m, n, k, 1}, 8);
        const GemmTileConfig t = choose_gemm_tile(s, kH100Sms, kH100Smem);
        if (t.split_k == 1) {
          // The unsplit pick is the one without a workspace (up to a tail split, M > 128 only).
          const GemmTileConfig u =
              choose_gemm_tile({GemmKind::kDense, m, n, k, 1}, kH100Sms, kH100Smem);
          if (t.tail_split > 1) {
            // With its tail split a tile may beat the unsplit pick (256x128 at N = 2112).
            EXPECT_GT(m, 128) << m << "x" << n << "x" << k;
            continue;
          }
          EXPECT_EQ(describe_tile_config(t), describe_tile_config(u));
          continue;
        }
        const int64_t units =
            (m + t.block_m - 1) / t.block_m * ((n + t.block_n - 1) / t.block_n) * t.split_k;
        EXPECT_LE(m, 128) << m << "x" << n << "x" << k;
        EXPECT_LE(units, kH100Sms) << m << "x" << n << "x" << k << " " << describe_tile_config(t);
        EXPECT_LE(4 * t.split_k, k / 128) << m << "x" << n << "x" << k;
        EXPECT_NE(t.block_n, 192);
      }
  // Measured no gain: M = 128 4096x7168 (64x64, 128 tiles), 7168x2048, 7168x16384 at M = 64.
  for (const GemmShape& s : {GemmShape{GemmKind::kDense, 128, 4096, 7168, 1},
                             GemmShape{GemmKind::kDense, 128, 7168, 2048, 1},
                             GemmShape{GemmKind::kDense, 64, 7168, 16384, 1}})
    EXPECT_EQ(choose_gemm_tile(with_split(s, 8), kH100Sms, kH100Smem).split_k, 1)
        << s.m << "x" << s.n << "x" << s.k;
  // The other forms never split.
  for (GemmKind kind : {GemmKind::kGroupedContiguous, GemmKind::kGroupedMasked, GemmKind::kWgrad})
    EXPECT_EQ(
        choose_gemm_tile(with_split({kind, 128, 2112, 7168, 1}, 8), kH100Sms, kH100Smem).split_k, 1)
        << gemm_kind_name(kind);
}

TEST(Sm90GemmHeuristic, HalfColumnUnits) {
  const GemmTileConfig wide{256, 128, 3, 132, 2};
  EXPECT_EQ(gemm_half_column_units(4096, 2112, wide), 16 * 16 + 8);  // 2112 = 16 x 128 + 64
  EXPECT_EQ(gemm_half_column_units(300, 2112, wide), 2 * 16 + 1);
  EXPECT_EQ(gemm_half_column_units(513, 192, wide), 3 * 1 + 2);  // odd rows: a lone half tile
  // 4096x2112 on 132 SMs: CTAs 124-131 run a full tile and a pair (2.25) against 3 padded waves;
  // 2048x2112: 132 units in one wave, 4 of them pairs (1.25 against 2).
  EXPECT_DOUBLE_EQ(gemm_half_column_load(4096, 2112, wide), 2.25);
  EXPECT_TRUE(gemm_half_column(GemmKind::kDense, 4096, 2112, wide));
  EXPECT_TRUE(gemm_half_column(GemmKind::kDense, 2048, 2112, wide));
  // 1024x2112: 68 padded tiles fit one wave; the pairs would lengthen it (measured, call 3).
  EXPECT_FALSE(gemm_half_column(GemmKind::kDense, 1024, 2112, wide));
  EXPECT_FALSE(gemm_half_column(GemmKind::kDense, 4096, 2200, wide));  // 72 valid: more than half
  EXPECT_FALSE(gemm_half_column(GemmKind::kDense, 4096, 4096, wide));  // no partial column
  GemmTileConfig tail = wide;
  tail.tail_split = 4;
  EXPECT_FALSE(gemm_half_column(GemmKind::kDense, 4096, 2112, tail));
  EXPECT_FALSE(gemm_half_column(GemmKind::kDense, 4096, 2112, GemmTileConfig{128, 128, 5, 132, 2}));
  EXPECT_FALSE(gemm_half_column(GemmKind::kGroupedMasked, 4096, 2112, wide));
  // The GPU tests' half-tile launches (fp8_gemm_gpu_test.cu DenseWideTiles) do take that form.
  GemmTileConfig one = wide, five = wide;
  one.num_sms = 1;
  five.num_sms = 5;
  EXPECT_TRUE(gemm_half_column(GemmKind::kDense, 513, 192, one));
  EXPECT_TRUE(gemm_half_column(GemmKind::kDense, 300, 136, one));
  EXPECT_TRUE(gemm_half_column(GemmKind::kDense, 1000, 1088, five));
  EXPECT_FALSE(gemm_half_column(GemmKind::kDense, 513, 200, wide));
}

TEST(Sm90GemmHeuristic, TailSplitPlan) {
  // 4096x2112 in 128x128 tiles: 544 = 4 x 132 + 16; 16 tails x 8 slices fill 128 of 132 SMs.
  TailSplitPlan p = gemm_tail_split_plan(544, 132, 56, 8);
  EXPECT_EQ(p.full_units, 528);
  EXPECT_EQ(p.tail_tiles, 16);
  EXPECT_EQ(p.slices, 8);
  EXPECT_EQ(gemm_tail_split_plan(544, 132, 56, 16).slices, 8);  // 132 / 16 SMs a tail tile
  EXPECT_EQ(gemm_tail_split_plan(544, 132, 3, 8).slices, 3);    // one K block a slice at least
  EXPECT_EQ(gemm_tail_split_plan(528, 132, 56, 8).slices, 1);   // no tail
  EXPECT_EQ(gemm_tail_split_plan(100, 132, 56, 8).slices, 1);   // less than one wave
  EXPECT_EQ(gemm_tail_split_plan(192, 132, 12, 8).slices, 2);   // 60 tail tiles: 2 slices
  EXPECT_EQ(gemm_tail_split_plan(256, 132, 4, 8).slices, 1);    // 124 tail tiles: no room
  EXPECT_EQ(gemm_tail_split_plan(544, 132, 56, 1).slices, 1);
  EXPECT_EQ(gemm_tail_split_workspace_bytes(gemm_tail_split_plan(544, 132, 56, 4), 128, 128),
            kSplitKCounterBytes + 16 * 4 * 128 * 128 * 4);
  EXPECT_EQ(gemm_tail_split_workspace_bytes(gemm_tail_split_plan(528, 132, 56, 4), 128, 128), 0);
  GemmTileConfig c;
  c.tail_split = 4;
  EXPECT_NE(describe_tile_config(c).find("/tail4"), std::string::npos);
}

TEST(Sm90GemmHeuristic, TailSplitWhereTheLastWaveIsSmall) {
  // 1024x2112x7168: 136 tiles of 128x128 = 1.03 waves; the tail split needs a workspace
  // (measured on H100, session 5: 38.6 us against 46.2 unsplit and 41.8 for 256x128).
  const GemmShape s{GemmKind::kDense, 1024, 2112, 7168, 1};
  EXPECT_LE(choose_gemm_tile(s, kH100Sms, kH100Smem).tail_split, 1);
  const GemmTileConfig t = choose_gemm_tile(with_split(s, 8), kH100Sms, kH100Smem);
  EXPECT_EQ(t.block_m, 128);
  EXPECT_EQ(t.block_n, 128);
  EXPECT_EQ(t.epilogue, 2);
  EXPECT_GE(t.tail_split, 2);
  EXPECT_LE(4 * t.tail_split, 7168 / 128);
  EXPECT_EQ(t.split_k, 1);
  EXPECT_LT(gemm_tail_split_cost(s, {128, 128}, kH100Sms, t.tail_split),
            0.95 * gemm_tile_cost(s, {128, 128}, kH100Sms));
  // 4096x2112x7168 (4.12 waves of 128x128): 256x128 with half tiles fills exactly 2 waves.
  EXPECT_LE(
      choose_gemm_tile(with_split({GemmKind::kDense, 4096, 2112, 7168, 1}, 8), kH100Sms, kH100Smem)
          .tail_split,
      1);
  // Many waves (the tail is a small part) or no room for two slices a tail tile: no split.
  for (const GemmShape& u : {GemmShape{GemmKind::kDense, 4096, 7168, 16384, 1},
                             GemmShape{GemmKind::kDense, 4096, 4096, 7168, 1},
                             GemmShape{GemmKind::kDense, 4096, 24576, 1536, 1},
                             GemmShape{GemmKind::kDense, 4096, 32768, 512, 1},
                             GemmShape{GemmKind::kDense, 4096, 7168, 2048, 1},
                             // 448 tiles = 3 waves + 52: a last wave over a quarter of the SMs
                             GemmShape{GemmKind::kDense, 1024, 7168, 16384, 1}})
    EXPECT_LE(choose_gemm_tile(with_split(u, 8), kH100Sms, kH100Smem).tail_split, 1)
        << u.m << "x" << u.n << "x" << u.k;
  // Not for the other forms.
  EXPECT_LE(choose_gemm_tile(with_split({GemmKind::kGroupedContiguous, 4096, 2112, 7168, 1}, 8),
                             kH100Sms, kH100Smem)
                .tail_split,
            1);
}

TEST(Sm90GemmHeuristic, SplitKWorkspaceSize) {
  EXPECT_EQ(gemm_split_k_workspace_bytes(128, 7168, 128, 128, 1), 0);
  // 56 tiles x 4 slices x 128 x 128 floats, after the fixed counter region.
  EXPECT_EQ(gemm_split_k_workspace_bytes(128, 7168, 128, 128, 4),
            kSplitKCounterBytes + 56 * 4 * 128 * 128 * 4);
  // Partial tiles count whole: M = 100 -> 2 64-row tiles, N = 136 -> 3 64-wide tiles.
  EXPECT_EQ(gemm_split_k_workspace_bytes(100, 136, 64, 64, 2),
            kSplitKCounterBytes + 6 * 2 * 64 * 64 * 4);
  EXPECT_EQ(gemm_split_k_strips(100, 136, 64, 64), 6 * 4);
  GemmTileConfig c{128, 128, 5, 132, 1, 1, 3};
  EXPECT_NE(describe_tile_config(c).find("/split3"), std::string::npos);
}

TEST(Sm90GemmHeuristic, DramRateFromTheDevice) {
  // H100 SXM (2619 MHz x 5120 bits) gives the model's old constant back within 1%; the H200
  // (3201 MHz x 6144 bits) 1.47x that.
  const double h100 = gemm_dram_bytes_per_s(2619000, 5120);
  const double h200 = gemm_dram_bytes_per_s(3201000, 6144);
  EXPECT_NEAR(h100 / kDefaultDramBytesPerS, 1.0, 0.01);
  EXPECT_NEAR(h200 / h100, 1.467, 0.01);
  EXPECT_THROW(gemm_dram_bytes_per_s(0, 5120), Error);
  EXPECT_THROW(choose_gemm_tile({GemmKind::kDense, 64, 64, 128, 1}, kH100Sms, kH100Smem, 0.0),
               Error);
  // Measured on H200 (dev/gemm/NOTES.md session 2b): 128x7168x16384 ran 43.1 us with
  // 128x128/split2 against 48.5 with the 64x128 the H100 rate picks; with the H200's rate the
  // DRAM floor no longer hides the difference.
  const GemmShape s = with_split({GemmKind::kDense, 128, 7168, 16384, 1}, 8);
  const GemmTileConfig on_h100 = choose_gemm_tile(s, kH100Sms, kH100Smem, h100);
  const GemmTileConfig on_h200 = choose_gemm_tile(s, kH100Sms, kH100Smem, h200);
  // (and session 17's 128x64 replaces the H100's 64x128 there: 47.0 against 52.4 us)
  EXPECT_EQ(on_h100.block_m, 128);
  EXPECT_EQ(on_h100.block_n, 64);
  EXPECT_EQ(on_h100.split_k, 1);
  EXPECT_EQ(on_h200.block_m, 128);
  EXPECT_EQ(on_h200.block_n, 128);
  EXPECT_EQ(on_h200.split_k, 2);
  // Compute-bound shapes do not move.
  for (const GemmShape& c : {GemmShape{GemmKind::kDense, 4096, 7168, 16384, 1},
                             GemmShape{GemmKind::kGroupedContiguous, 32768, 4096, 7168, 1},
                             GemmShape{GemmKind::kWgrad, 7168, 2048, 4096, 1}})
    EXPECT_EQ(describe_tile_config(choose_gemm_tile(c, kH100Sms, kH100Smem, h100)),
              describe_tile_config(choose_gemm_tile(c, kH100Sms, kH100Smem, h200)))
        << gemm_kind_name(c.kind);
}

TEST(Sm90GemmHeuristic, DefaultScalePrefetch) {
  const GemmShape m128{GemmKind::kDense, 128, 32768, 512, 1};
  // On: dense, M <= 128, 128x128 tiles or split-K (the heuristic's 128x32768x512 pick among them).
  EXPECT_EQ(gemm_default_scale_prefetch(m128, {128, 128}), kGemmDefaultScalePrefetch);
  EXPECT_EQ(
      gemm_default_scale_prefetch({GemmKind::kDense, 1, 2112, 7168, 1}, {64, 64, 0, 0, 1, 1, 2}),
      kGemmDefaultScalePrefetch);
  EXPECT_EQ(
      gemm_default_scale_prefetch(m128, choose_gemm_tile(with_split(m128, 8), kH100Sms, kH100Smem)),
      kGemmDefaultScalePrefetch);
  // Off: 64x128 / 64x64 without split-K, M > 128, the tail split, the grouped forms.
  EXPECT_EQ(gemm_default_scale_prefetch(m128, {64, 128}), 1);
  EXPECT_EQ(gemm_default_scale_prefetch(m128, {64, 64}), 1);
  EXPECT_EQ(gemm_default_scale_prefetch({GemmKind::kDense, 129, 32768, 512, 1}, {128, 128}), 1);
  EXPECT_EQ(gemm_default_scale_prefetch(m128, {128, 128, 0, 0, 2, 1, 1, 2}), 1);
  EXPECT_EQ(gemm_default_scale_prefetch({GemmKind::kGroupedMasked, 128, 4096, 7168, 4}, {128, 128}),
            1);
}

// 128x64 (dense) is compiled for forced configurations only: never a candidate, never picked
// (with or without a workspace, H100 and H200 DRAM rates), refused for the other forms.
TEST(Sm90GemmHeuristic, Tile128x64IsCompiledForDenseOnly) {
  EXPECT_TRUE(gemm_tile_compiled(GemmKind::kDense, 128, 64));
  for (GemmKind kind : {GemmKind::kGroupedContiguous, GemmKind::kGroupedMasked, GemmKind::kWgrad,
                        GemmKind::kKGroupedWgrad}) {
    EXPECT_FALSE(gemm_tile_compiled(kind, 128, 64)) << gemm_kind_name(kind);
    for (const TileCandidate& t : gemm_tile_candidates(kind))
      EXPECT_TRUE(gemm_tile_compiled(kind, t.block_m, t.block_n)) << gemm_kind_name(kind);
  }
  for (const TileCandidate& t : gemm_tile_candidates(GemmKind::kDense)) {
    EXPECT_FALSE(t.block_m == 128 && t.block_n == 64);
    EXPECT_TRUE(gemm_tile_compiled(GemmKind::kDense, t.block_m, t.block_n));
  }
  EXPECT_FALSE(gemm_tile_compiled(GemmKind::kDense, 64, 256));
  EXPECT_FALSE(gemm_tile_compiled(GemmKind::kDense, 256, 64));
}

// Session 17 (gemm28, dev/gemm/NOTES.md): 128x64 where it measured faster than the model's pick
// on both cards, and the 128x192 rule's shape on the H100's DRAM rate only.
TEST(Sm90GemmHeuristic, Tile128x64WhereMeasuredFaster) {
  const double h100 = kDefaultDramBytesPerS, h200 = gemm_dram_bytes_per_s(3201000, 6144);
  const auto pick = [](int64_t m, int64_t n, int64_t k, double dram, int max_split = 8) {
    GemmShape shape{GemmKind::kDense, m, n, k, 1};
    shape.max_split_k = max_split;
    return choose_gemm_tile(shape, kH100Sms, kH100Smem, dram);
  };
  const auto is_128x64 = [](const GemmTileConfig& c) {
    return c.block_m == 128 && c.block_n == 64 && c.split_k <= 1 && c.tail_split <= 1;
  };
  for (double dram : {h100, h200})
    for (int max_split : {1, 8}) {
      EXPECT_TRUE(is_128x64(pick(128, 7168, 2048, dram, max_split)));
      EXPECT_TRUE(is_128x64(pick(100, 7168, 2048, dram, max_split)));
    }
  EXPECT_TRUE(is_128x64(pick(128, 7168, 16384, h100)));
  // H200: the model's 128x128 split2 stays (128x64 measured 1.02-1.03x its time).
  const GemmTileConfig h200_long = pick(128, 7168, 16384, h200);
  EXPECT_EQ(h200_long.split_k, 2) << describe_tile_config(h200_long);
  EXPECT_TRUE(is_128x64(pick(128, 24576, 1536, h100)));
  EXPECT_EQ(pick(128, 24576, 1536, h200).block_n, 192);
  const GemmTileConfig e = pick(128, 7168, 2048, h200);
  EXPECT_EQ(e.epilogue, 2);  // K <= 3072: the TMA store, as measured (e0)
  EXPECT_GE(e.num_stages, 3);
  // Measured slower: fewer 64-wide tiles than 3/4 of the SMs, several waves at short K, M = 64.
  for (double dram : {h100, h200}) {
    EXPECT_FALSE(is_128x64(pick(128, 4096, 7168, dram)));
    EXPECT_FALSE(is_128x64(pick(128, 2112, 7168, dram)));
    EXPECT_FALSE(is_128x64(pick(128, 32768, 512, dram)));
  }
  for (double dram : {h100, h200})
    for (int max_split : {1, 8})
      for (int64_t m : {1, 64, 129, 256, 300, 1024, 4096})
        for (int64_t n : {64, 576, 2112, 4096, 7168, 24576, 32768})
          for (int64_t k : {128, 512, 1536, 2048, 7168, 16384})
            EXPECT_FALSE(is_128x64(pick(m, n, k, dram, max_split)))
                << m << "x" << n << "x" << k << " " << describe_tile_config(pick(m, n, k, dram));
  for (GemmKind kind : {GemmKind::kGroupedContiguous, GemmKind::kGroupedMasked})
    for (int64_t m : {128, 1024})
      EXPECT_NE(choose_gemm_tile({kind, m, 7168, 2048, 4}, kH100Sms, kH100Smem).block_n, 64);
}

TEST(Sm90GemmHeuristic, MaskedTilesAreChosenForTheMeanPlusItsSpread) {
  EXPECT_EQ(gemm_masked_plan_rows(0, 256), 256);  // no hint: the capacity
  EXPECT_EQ(gemm_masked_plan_rows(1, 256), 3);
  EXPECT_EQ(gemm_masked_plan_rows(8, 256), 8 + 6);  // ceil(2 sqrt(8)) = 6
  EXPECT_EQ(gemm_masked_plan_rows(64, 256), 64 + 16);
  EXPECT_EQ(gemm_masked_plan_rows(250, 256), 256);  // never past the capacity
  EXPECT_EQ(gemm_masked_plan_rows(0, 0), 0);
  EXPECT_THROW(gemm_masked_plan_rows(-1, 256), Error);
  EXPECT_THROW(gemm_masked_plan_rows(257, 256), Error);
  // V3's widths at a mean of 64 rows an expert (16 experts a rank): 64-row tiles for the mean
  // alone, 128-row tiles for the rows most experts hold; a mean of 8 keeps 64-row tiles.
  const auto pick = [](int64_t rows, int64_t n, int64_t k) {
    return choose_gemm_tile({GemmKind::kGroupedMasked, rows, n, k, 16}, kH100Sms, kH100Smem);
  };
  for (const auto& [n, k] : {std::pair<int64_t, int64_t>{4096, 7168}, {7168, 2048}}) {
    EXPECT_EQ(pick(64, n, k).block_m, 64) << n << "x" << k;
    EXPECT_EQ(pick(gemm_masked_plan_rows(64, 256), n, k).block_m, 128) << n << "x" << k;
    EXPECT_EQ(pick(gemm_masked_plan_rows(8, 256), n, k).block_m, 64) << n << "x" << k;
  }
}

TEST(Sm90GemmHeuristic, RejectsImpossibleSettings) {
  EXPECT_THROW(choose_gemm_tile({GemmKind::kDense, 64, 64, 128, 1}, 0, kH100Smem), Error);
  EXPECT_THROW(choose_gemm_tile({GemmKind::kDense, 64, 64, 128, 1}, kH100Sms, 40 * 1024), Error);
  EXPECT_THROW(choose_gemm_tile({GemmKind::kDense, 64, 0, 128, 1}, kH100Sms, kH100Smem), Error);
}

}  // namespace
}  // namespace fp8moe::kernels
