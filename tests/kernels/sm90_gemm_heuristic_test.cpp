#include "fp8moe/kernels/sm90_gemm_heuristic.h"

#include <gtest/gtest.h>

#include "fp8moe/core/error.h"

namespace fp8moe::kernels {
namespace {

constexpr int kH100Sms = 132;
constexpr int64_t kH100Smem = 232448;

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
        bool compiled = false;
        for (const TileCandidate& t : gemm_tile_candidates(kind))
          compiled |= t.block_m == c.block_m && t.block_n == c.block_n;
        EXPECT_TRUE(compiled) << gemm_kind_name(kind) << " " << describe_tile_config(c);
      }
}

TEST(Sm90GemmHeuristic, LargeProblemsTakeTheLargestTile) {
  const GemmTileConfig c =
      choose_gemm_tile({GemmKind::kDense, 4096, 7168, 16384, 1}, kH100Sms, kH100Smem);
  EXPECT_EQ(c.block_m, 128);
  EXPECT_GE(c.block_n, 128);
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

TEST(Sm90GemmHeuristic, NeverPicksTheSlower192WideTile) {
  // The cost model alone prefers 128x192 at N = 2112 (3 waves instead of 5); measured, 128x128
  // with overlapped promotion is faster there (dev/gemm/NOTES.md v11).
  const GemmTileConfig c =
      choose_gemm_tile({GemmKind::kDense, 4096, 2112, 7168, 1}, kH100Sms, kH100Smem);
  EXPECT_EQ(c.block_m, 128);
  EXPECT_EQ(c.block_n, 128);
  for (int64_t m : {1, 64, 128, 512, 1024, 4096})
    for (int64_t n : {2112, 4096, 7168, 24576, 32768})
      for (int64_t k : {512, 1536, 7168})
        EXPECT_NE(choose_gemm_tile({GemmKind::kDense, m, n, k, 1}, kH100Sms, kH100Smem).block_n,
                  192)
            << m << "x" << n << "x" << k;
}

TEST(Sm90GemmHeuristic, EpilogueStagesWhereItWasMeasuredToPay) {
  EXPECT_EQ(gemm_choose_epilogue({GemmKind::kDense, 4096, 32768, 512, 1}, 128), 2);
  EXPECT_EQ(gemm_choose_epilogue({GemmKind::kDense, 4096, 7168, 16384, 1}, 128), 1);
  EXPECT_EQ(gemm_choose_epilogue({GemmKind::kDense, 4096, 2112, 7168, 1}, 192), 2);
  EXPECT_EQ(gemm_choose_epilogue({GemmKind::kWgrad, 4096, 7168, 512, 1}, 128), 1);
}

TEST(Sm90GemmHeuristic, CostGrowsWithWaves) {
  const TileCandidate t{128, 128};
  const double one = gemm_tile_cost({GemmKind::kDense, 128 * 12, 128 * 11, 4096, 1}, t, kH100Sms);
  const double two = gemm_tile_cost({GemmKind::kDense, 128 * 12, 128 * 12, 4096, 1}, t, kH100Sms);
  EXPECT_GT(two, one * 1.5);  // 132 tiles fit one wave, 144 need two
}

TEST(Sm90GemmHeuristic, RejectsImpossibleSettings) {
  EXPECT_THROW(choose_gemm_tile({GemmKind::kDense, 64, 64, 128, 1}, 0, kH100Smem), Error);
  EXPECT_THROW(choose_gemm_tile({GemmKind::kDense, 64, 64, 128, 1}, kH100Sms, 40 * 1024), Error);
  EXPECT_THROW(choose_gemm_tile({GemmKind::kDense, 64, 0, 128, 1}, kH100Sms, kH100Smem), Error);
}

}  // namespace
}  // namespace fp8moe::kernels
