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
// rate ~1500 TFLOPS / 132, L2 -> SM ~10 TB/s / 132, DRAM 3.35 TB/s for the whole chip.
constexpr double kFlopsPerSm = 1500e12 / 132;
constexpr double kL2BytesPerSm = 10e12 / 132;
constexpr double kDramBytes = 3.0e12;
constexpr int kMaxStages = 8;
}  // namespace

std::vector<TileCandidate> gemm_tile_candidates(GemmKind kind) {
  if (is_wgrad(kind)) return {{128, 128}, {64, 128}};
  return {{128, 192}, {128, 128}, {64, 128}, {64, 64}};
}

int64_t gemm_stage_bytes(GemmKind kind, int block_m, int block_n) {
  // A and B tiles (128 K bytes a row), the A scales, the B scales for 1x128 B, two mbarriers.
  return int64_t{block_m} * 128 + int64_t{block_n} * 128 + block_m * 4 +
         (is_wgrad(kind) ? block_n * 4 : 0) + 16;
}

namespace {
// BF16 output staging for the TMA-store epilogue: one 64 x 64 box per 64 rows, whatever block_n
// (the FP32 wgrad epilogue stores from registers).
int64_t output_staging_bytes(GemmKind kind, int block_m, int /*block_n*/, bool tma_store) {
  return (is_wgrad(kind) || !tma_store) ? 0 : int64_t{block_m} * 64 * 2;
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
  // matters more (4-10% slower).
  if (is_wgrad(shape.kind)) return 1;
  return (shape.k <= 3072 || block_n > 128) ? 2 : 1;
}

int gemm_max_stages(GemmKind kind, int block_m, int block_n, int64_t smem_limit, bool tma_store) {
  const int64_t stages =
      (smem_limit - kSmemSlack - output_staging_bytes(kind, block_m, block_n, tma_store)) /
      gemm_stage_bytes(kind, block_m, block_n);
  return static_cast<int>(std::min<int64_t>(stages, kMaxStages));
}

double gemm_tile_cost(const GemmShape& s, const TileCandidate& t, int num_sms) {
  const int64_t tiles_m = ceil_div(std::max<int64_t>(s.m, 1), t.block_m);
  const int64_t tiles_n = ceil_div(s.n, t.block_n);
  const int64_t groups = s.kind == GemmKind::kGroupedContiguous ? 1 : s.num_groups;
  const int64_t tiles = tiles_m * tiles_n * groups;
  const int64_t waves = ceil_div(tiles, num_sms);
  // One math warpgroup (block_m 64) overlaps promotion with the tensor cores less well.
  const double efficiency = (t.block_m == 128 ? 1.0 : 0.8) * (t.block_n == 128 ? 1.0 : 0.85);
  const double compute = 2.0 * t.block_m * t.block_n * s.k / (kFlopsPerSm * efficiency);
  const double l2 = double(t.block_m + t.block_n) * s.k / kL2BytesPerSm;
  const double per_tile = std::max(compute, l2);
  // Fewer tiles than multiprocessors: each tile still takes per_tile, but the DRAM floor is
  // shared by fewer readers, so the floor below dominates.
  const double dram = double(s.m * s.k + s.n * s.k * groups) / kDramBytes;
  const double dram_per_sm_limit =
      double(std::min<int64_t>(tiles, num_sms)) / num_sms;  // fraction of the chip pulling data
  // NOTE: the small second term breaks ties when the DRAM floor dominates (small M) in favour of
  // the tile that wastes the least tensor-core work (no 128-row tiles for M = 64).
  return std::max(double(waves) * per_tile, dram / std::max(dram_per_sm_limit, 1e-3)) +
         0.05 * double(waves) * per_tile;
}

GemmTileConfig choose_gemm_tile(const GemmShape& shape, int num_sms, int64_t smem_limit) {
  FM_CHECK_ARG(num_sms > 0, "choose_gemm_tile: num_sms=", num_sms);
  FM_CHECK_ARG(shape.n > 0 && shape.k > 0, "choose_gemm_tile: empty shape n=", shape.n,
               " k=", shape.k);
  GemmTileConfig best;
  double best_cost = std::numeric_limits<double>::infinity();
  for (const TileCandidate& t : gemm_tile_candidates(shape.kind)) {
    // NOTE: 128x192 stays compiled (and can be forced) but is not picked: it keeps the loop
    // without overlapped promotion (three register sets do not fit), and measured slower than
    // 128x128 at every M = 4096 shape on H200, 4-13% at N = 2112 where the cost model preferred
    // it for its fewer waves (dev/gemm/NOTES.md v11).
    if (t.block_n == 192) continue;
    const int epilogue = gemm_choose_epilogue(shape, t.block_n);
    const int stages = gemm_max_stages(shape.kind, t.block_m, t.block_n, smem_limit, epilogue == 2);
    if (stages < 3) continue;
    const double cost = gemm_tile_cost(shape, t, num_sms);
    // NOTE: strict '<' with the candidates listed largest first keeps the larger tile on ties.
    if (cost < best_cost * (1.0 - 1e-9)) {
      best_cost = cost;
      best = GemmTileConfig{t.block_m, t.block_n, stages, num_sms, epilogue, 1};
    }
  }
  FM_CHECK_ARG(best_cost < std::numeric_limits<double>::infinity(),
               "choose_gemm_tile: no tile fits in ", smem_limit, " bytes of shared memory");
  return best;
}

std::string describe_tile_config(const GemmTileConfig& c) {
  std::ostringstream out;
  out << c.block_m << "x" << c.block_n << "x128/s" << c.num_stages << "/sm" << c.num_sms
      << (c.epilogue == 2 ? "/tma_store" : "") << (c.cluster == 2 ? "/pair" : "");
  return out.str();
}

}  // namespace fp8moe::kernels
