// FP8 GEMM D(bf16) = A * B^T with 1x128 activation scales and 128x128 weight scales (dense,
// MoE grouped contiguous, MoE grouped masked) on sm_90a; kernel in sm90_fp8_gemm.cuh.
// Checked against gemm_fp8_reference (promoted, default AccumulatorModel):
// `build-device/tests/test_kernels_gpu --gtest_filter='Fp8Gemm*'`.
#include "sm90_fp8_gemm_launch.cuh"

namespace fp8moe::kernels {

using sm90::Form;
using sm90::GemmParams;
using sm90::LaunchMaps;
using sm90::TmaElem;

namespace {

void dispatch_1d2d(const LaunchMaps& maps, const GemmParams& p, const GemmTileConfig& c,
                   int max_tiles, cudaStream_t stream) {
  // The B-scale prefetch (sm90::kModeScalePrefetch) of the dense kernels up to 128x128, with or
  // without split-K (resolve_config has filled in the default).
  if (c.scale_prefetch == 2 && p.form == Form::kDense && p.tail_split == 1) {
    constexpr int kPf = sm90::kModeScalePrefetch;
    const bool split = p.split_k > 1;
    if (c.block_m == 128 && c.block_n == 128) {
      if (split)
        sm90::launch_gemm<128, 128, false, true, false, kPf>(maps, p, c, max_tiles, stream);
      else
        sm90::launch_gemm<128, 128, false, false, false, kPf>(maps, p, c, max_tiles, stream);
      return;
    }
    if (c.block_m == 64 && c.block_n == 128) {
      if (split)
        sm90::launch_gemm<64, 128, false, true, false, kPf>(maps, p, c, max_tiles, stream);
      else
        sm90::launch_gemm<64, 128, false, false, false, kPf>(maps, p, c, max_tiles, stream);
      return;
    }
    if (c.block_m == 64 && c.block_n == 64) {
      if (split)
        sm90::launch_gemm<64, 64, false, true, false, kPf>(maps, p, c, max_tiles, stream);
      else
        sm90::launch_gemm<64, 64, false, false, false, kPf>(maps, p, c, max_tiles, stream);
      return;
    }
    if (c.block_m == 128 && c.block_n == 64) {  // forced only (gemm_tile_compiled)
      if (split)
        sm90::launch_gemm<128, 64, false, true, false, kPf>(maps, p, c, max_tiles, stream);
      else
        sm90::launch_gemm<128, 64, false, false, false, kPf>(maps, p, c, max_tiles, stream);
      return;
    }
  }
  if (p.tail_split > 1) {
    // Tail-split kernels (tail_split_reduce in their epilogue) for the tiles up to 128 wide.
    if (c.block_m == 256 && c.block_n == 128 && p.form == Form::kDense)
      sm90::launch_gemm<256, 128, false, true, true>(maps, p, c, max_tiles, stream);
    else if (c.block_m == 128 && c.block_n == 128)
      sm90::launch_gemm<128, 128, false, true, true>(maps, p, c, max_tiles, stream);
    else if (c.block_m == 64 && c.block_n == 128)
      sm90::launch_gemm<64, 128, false, true, true>(maps, p, c, max_tiles, stream);
    else if (c.block_m == 64 && c.block_n == 64)
      sm90::launch_gemm<64, 64, false, true, true>(maps, p, c, max_tiles, stream);
    else
      FM_THROW(ErrorKind::kInvalidArgument, "fp8_gemm_nt: the tail split is not compiled for tile ",
               c.block_m, "x", c.block_n);
    return;
  }
  if (p.split_k > 1) {
    // Split-K kernels (the fix-up in their epilogue) for the tiles up to 128 wide.
    if (c.block_m == 128 && c.block_n == 128)
      sm90::launch_gemm<128, 128, false, true>(maps, p, c, max_tiles, stream);
    else if (c.block_m == 64 && c.block_n == 128)
      sm90::launch_gemm<64, 128, false, true>(maps, p, c, max_tiles, stream);
    else if (c.block_m == 64 && c.block_n == 64)
      sm90::launch_gemm<64, 64, false, true>(maps, p, c, max_tiles, stream);
    else if (c.block_m == 128 && c.block_n == 64 && p.form == Form::kDense)
      sm90::launch_gemm<128, 64, false, true>(maps, p, c, max_tiles, stream);
    else
      FM_THROW(ErrorKind::kInvalidArgument, "fp8_gemm_nt: split-K is not compiled for tile ",
               c.block_m, "x", c.block_n);
    return;
  }
  // The masked form's plain tiles up to 128x128 walk their tiles with a cursor
  // (sm90::kModeMaskedCursor).
  if (p.form == Form::kMasked && c.block_n <= 128 && c.block_m <= 128) {
    constexpr int kCursor = sm90::kModeMaskedCursor;
    if (c.block_m == 128 && c.block_n == 128)
      sm90::launch_gemm<128, 128, false, false, false, kCursor>(maps, p, c, max_tiles, stream);
    else if (c.block_m == 64 && c.block_n == 128)
      sm90::launch_gemm<64, 128, false, false, false, kCursor>(maps, p, c, max_tiles, stream);
    else if (c.block_m == 64 && c.block_n == 64)
      sm90::launch_gemm<64, 64, false, false, false, kCursor>(maps, p, c, max_tiles, stream);
    else
      FM_THROW(ErrorKind::kInvalidArgument, "fp8_gemm_nt_grouped_masked: tile ", c.block_m, "x",
               c.block_n, " not compiled");
    return;
  }
  if (c.block_m == 256 && c.block_n == 128 && p.form == Form::kDense)
    sm90::launch_gemm<256, 128, false>(maps, p, c, max_tiles, stream);
  else if (c.block_m == 256 && c.block_n == 128)
    sm90::launch_gemm<256, 128, false, false, false, sm90::kModeGroupedRows>(maps, p, c, max_tiles,
                                                                             stream);
  else if (c.block_m == 128 && c.block_n == 256)
    sm90::launch_gemm<128, 256, false>(maps, p, c, max_tiles, stream);
  else if (c.block_m == 128 && c.block_n == 192)
    sm90::launch_gemm<128, 192, false>(maps, p, c, max_tiles, stream);
  else if (c.block_m == 128 && c.block_n == 128)
    sm90::launch_gemm<128, 128, false>(maps, p, c, max_tiles, stream);
  else if (c.block_m == 64 && c.block_n == 128)
    sm90::launch_gemm<64, 128, false>(maps, p, c, max_tiles, stream);
  else if (c.block_m == 64 && c.block_n == 64)
    sm90::launch_gemm<64, 64, false>(maps, p, c, max_tiles, stream);
  else if (c.block_m == 128 && c.block_n == 64 && p.form == Form::kDense)
    sm90::launch_gemm<128, 64, false>(maps, p, c, max_tiles, stream);
  else
    FM_THROW(ErrorKind::kInvalidArgument, "fp8 gemm: tile ", c.block_m, "x", c.block_n,
             " not compiled");
}

// A [a_rows, K] operand tiles, B [b_rows, K], sa [sa_rows][sa_cols] M-major; sb read directly.
LaunchMaps make_maps(const uint8_t* a, int64_t a_rows, const uint8_t* b, int64_t b_rows,
                     const float* sa, int64_t sa_rows, int64_t sa_cols, int64_t k, bf16* d,
                     int64_t d_rows, int64_t n, const GemmTileConfig& c) {
  LaunchMaps maps{};
  maps.a = sm90::make_tma_2d(a, TmaElem::kU8, a_rows, k, k, c.block_m, 128, true);
  // With CTA pairs each CTA loads half of the B tile (for both).
  maps.b = sm90::make_tma_2d(b, TmaElem::kU8, b_rows, k, k, c.block_n / c.cluster, 128, true);
  maps.sa =
      sm90::make_tma_2d(sa, TmaElem::kF32, sa_rows, sa_cols, sa_cols * 4, 1, c.block_m, false);
  maps.sb = maps.sa;  // unused by the 1x128 x 128x128 kernel
  // D in 64 x 64 boxes, 128-byte swizzled, as the epilogue stages it.
  maps.d = sm90::make_tma_2d(d, TmaElem::kBF16, d_rows, n, n * 2, 64, 64, true);
  return maps;
}

void check_pointers(const uint8_t* a, const float* sa, const uint8_t* b, const float* sb,
                    const void* d) {
  sm90::check_aligned(a, "A");
  sm90::check_aligned(b, "B");
  sm90::check_aligned(sa, "A scales");
  sm90::check_aligned(sb, "B scales", 4);
  sm90::check_aligned(d, "D");
}

}  // namespace

namespace {
// The heuristic's largest split (the forced ones may go to kMaxSplitK).
constexpr int kHeuristicMaxSplitK = 8;

GemmShape dense_shape(int64_t m, int64_t n, int64_t k, bool has_workspace) {
  GemmShape shape{GemmKind::kDense, m, n, k, 1};
  shape.max_split_k = has_workspace ? kHeuristicMaxSplitK : 1;
  return shape;
}

// The tail split a resolved configuration gets on this shape (slices 1: none). Single CTAs: the
// grid is min(SMs, tiles), as launch_gemm makes it.
TailSplitPlan tail_plan(int64_t m, int64_t n, int64_t k, const GemmTileConfig& c) {
  if (c.tail_split <= 1) return {};
  const int64_t tiles = (m + c.block_m - 1) / c.block_m * ((n + c.block_n - 1) / c.block_n);
  return gemm_tail_split_plan(tiles, std::min<int64_t>(c.num_sms, tiles), k / 128, c.tail_split);
}
}  // namespace

int64_t fp8_gemm_workspace_bytes(int64_t m, int64_t n, int64_t k, const GemmTileConfig* force) {
  sm90::check_common_shape("fp8_gemm_workspace_bytes", m, n, k);
  if (m == 0) return 0;
  const GemmTileConfig c = sm90::resolve_config(dense_shape(m, n, k, true), force);
  if (c.tail_split > 1)
    return gemm_tail_split_workspace_bytes(tail_plan(m, n, k, c), c.block_m, c.block_n);
  return gemm_split_k_workspace_bytes(m, n, c.block_m, c.block_n, c.split_k);
}

void fp8_gemm_nt(const uint8_t* a, const float* sa, const uint8_t* b, const float* sb, bf16* d,
                 int64_t m, int64_t n, int64_t k, cudaStream_t stream, const GemmTileConfig* force,
                 GemmWorkspace workspace) {
  sm90::check_common_shape("fp8_gemm_nt", m, n, k);
  if (m == 0) return;
  check_pointers(a, sa, b, sb, d);
  GemmTileConfig c = sm90::resolve_config(dense_shape(m, n, k, workspace.ptr != nullptr), force);
  FM_CHECK_ARG(
      c.block_n != 256 || (c.split_k <= 1 && c.tail_split <= 1),
      "fp8_gemm_nt: 128x256 tiles are not compiled with split-K or the tail split (split_k=",
      c.split_k, ", tail_split=", c.tail_split, ")");
  // CTA pairs need 128-row tiles 128 or 192 wide (not built for 128x256 or 128x64) and an even
  // number of them.
  const int64_t tiles_m = (m + c.block_m - 1) / c.block_m;
  if (c.cluster != 1 && (c.cluster != 2 || c.block_m != 128 || c.block_n > 192 || c.block_n < 128 ||
                         tiles_m % 2 != 0))
    c.cluster = 1;
  GemmParams p{};
  p.split_k = 1;
  p.tail_split = 1;
  FM_CHECK_ARG(c.split_k <= 1 || c.tail_split <= 1, "fp8_gemm_nt: split_k=", c.split_k,
               " and tail_split=", c.tail_split, " cannot be combined");
  const TailSplitPlan tail = tail_plan(m, n, k, c);
  if (tail.slices > 1) {
    FM_CHECK_ARG(c.block_n <= 128 && !(c.block_m == 128 && c.block_n == 64),
                 "fp8_gemm_nt: the tail split is not compiled for tile ", c.block_m, "x",
                 c.block_n);
    FM_CHECK_ARG(workspace.ptr != nullptr, "fp8_gemm_nt: tail_split=", c.tail_split,
                 " needs a workspace (fp8_gemm_workspace_bytes)");
    sm90::check_aligned(workspace.ptr, "tail-split workspace", 256);
    FM_CHECK_ARG(tail.tail_tiles * (c.block_m / 16) <= kSplitKMaxStrips,
                 "fp8_gemm_nt: ", tail.tail_tiles, " tail tiles of ", c.block_m, " rows exceed ",
                 kSplitKMaxStrips, " 16-row strips");
    const int64_t need = gemm_tail_split_workspace_bytes(tail, c.block_m, c.block_n);
    FM_CHECK_ARG(static_cast<int64_t>(workspace.bytes) >= need, "fp8_gemm_nt: workspace of ",
                 workspace.bytes, " bytes, but tail_split=", c.tail_split, " with ", c.block_m, "x",
                 c.block_n, " tiles at M=", m, " N=", n, " needs ", need,
                 " (fp8_gemm_workspace_bytes)");
    c.cluster = 1;
    p.tail_split = tail.slices;
    p.tail_begin = static_cast<int>(tail.full_units);
    p.counters = static_cast<int*>(workspace.ptr);
    p.partials =
        reinterpret_cast<float*>(static_cast<uint8_t*>(workspace.ptr) + kSplitKCounterBytes);
  }
  if (c.split_k > 1) {
    FM_CHECK_ARG(workspace.ptr != nullptr, "fp8_gemm_nt: split_k=", c.split_k,
                 " needs a workspace (fp8_gemm_workspace_bytes)");
    FM_CHECK_ARG(c.split_k <= k / 128, "fp8_gemm_nt: split_k=", c.split_k, " but K=", k, " has ",
                 k / 128, " blocks of 128");
    sm90::check_aligned(workspace.ptr, "split-K workspace", 256);
    const int64_t strips = gemm_split_k_strips(m, n, c.block_m, c.block_n);
    FM_CHECK_ARG(strips <= kSplitKMaxStrips, "fp8_gemm_nt: split-K of M=", m, " N=", n, " with ",
                 c.block_m, "x", c.block_n, " tiles has ", strips, " 16-row strips, at most ",
                 kSplitKMaxStrips);
    const int64_t need = gemm_split_k_workspace_bytes(m, n, c.block_m, c.block_n, c.split_k);
    FM_CHECK_ARG(static_cast<int64_t>(workspace.bytes) >= need, "fp8_gemm_nt: workspace of ",
                 workspace.bytes, " bytes, but split_k=", c.split_k, " with ", c.block_m, "x",
                 c.block_n, " tiles at M=", m, " N=", n, " needs ", need,
                 " (fp8_gemm_workspace_bytes)");
    c.cluster = 1;
    p.split_k = c.split_k;
    p.counters = static_cast<int*>(workspace.ptr);
    p.partials =
        reinterpret_cast<float*>(static_cast<uint8_t*>(workspace.ptr) + kSplitKCounterBytes);
  }
  p.form = Form::kDense;
  p.cluster = c.cluster;
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.num_groups = 1;
  p.num_stages = c.num_stages;
  p.tma_store = c.epilogue == 2 ? 1 : 0;
  p.sb = sb;
  p.d = d;
  const LaunchMaps maps = make_maps(a, m, b, n, sa, k / 128, sm90::pad4(m), k, d, m, n, c);
  int64_t tiles = (m + c.block_m - 1) / c.block_m * ((n + c.block_n - 1) / c.block_n) * p.split_k;
  if (tail.slices > 1) tiles = tail.full_units + tail.tail_tiles * tail.slices;
  if (gemm_half_column(GemmKind::kDense, m, n, c)) {
    // 256-row tiles over a last tile column of <= 64 valid columns: its tiles run 64 wide, two
    // to a unit (sm90_fp8_gemm.cuh, get_wide_tile).
    p.half_col = 1;
    tiles = gemm_half_column_units(m, n, c);
  }
  dispatch_1d2d(maps, p, c, static_cast<int>(std::min<int64_t>(tiles, 1 << 30)), stream);
}

void fp8_gemm_nt_grouped_contiguous(const uint8_t* a, const float* sa, const uint8_t* b,
                                    const float* sb, bf16* d, const int32_t* grouped_layout,
                                    int64_t m, int64_t n, int64_t k, int64_t num_groups,
                                    cudaStream_t stream, const GemmTileConfig* force) {
  sm90::check_common_shape("fp8_gemm_nt_grouped_contiguous", m, n, k);
  FM_CHECK_ARG(num_groups >= 1 && num_groups * n < (int64_t{1} << 31),
               "fp8_gemm_nt_grouped_contiguous: bad group count ", num_groups, " (N=", n, ")");
  FM_CHECK_ARG(m % 128 == 0, "fp8_gemm_nt_grouped_contiguous: M=", m,
               " is not a multiple of 128 (each expert's rows start at a multiple of 128)");
  if (m == 0) return;
  check_pointers(a, sa, b, sb, d);
  sm90::check_aligned(grouped_layout, "grouped_layout", 4);
  // NOTE: 64-row tiles work too: every expert segment starts at a multiple of 128. 256-row
  // tiles run where both 128-row halves start with the same expert, else as two 128-row tiles
  // (sm90_fp8_gemm.cuh, get_grouped_wide_tile): the units below are 256-row tiles.
  GemmTileConfig c =
      sm90::resolve_config(GemmShape{GemmKind::kGroupedContiguous, m, n, k, num_groups}, force);
  c.cluster = 1;
  GemmParams p{};
  p.form = Form::kContiguous;
  p.cluster = 1;
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.num_groups = static_cast<int>(num_groups);
  p.num_stages = c.num_stages;
  p.tma_store = c.epilogue == 2 ? 1 : 0;
  p.grouped_layout = grouped_layout;
  p.sb = sb;
  p.d = d;
  const LaunchMaps maps =
      make_maps(a, m, b, num_groups * n, sa, k / 128, sm90::pad4(m), k, d, m, n, c);
  const int64_t tiles = (m + c.block_m - 1) / c.block_m * ((n + c.block_n - 1) / c.block_n);
  dispatch_1d2d(maps, p, c, static_cast<int>(std::min<int64_t>(tiles, 1 << 30)), stream);
}

void fp8_gemm_nt_grouped_masked(const uint8_t* a, const float* sa, const uint8_t* b,
                                const float* sb, bf16* d, const int32_t* masked_m,
                                int64_t num_groups, int64_t max_m, int64_t n, int64_t k,
                                cudaStream_t stream, const GemmTileConfig* force,
                                int64_t expected_m) {
  sm90::check_common_shape("fp8_gemm_nt_grouped_masked", max_m, n, k);
  FM_CHECK_ARG(expected_m >= 0 && expected_m <= max_m,
               "fp8_gemm_nt_grouped_masked: expected_m=", expected_m, " outside [0, max_m=", max_m,
               "]");
  FM_CHECK_ARG(num_groups >= 1 && num_groups * max_m < (int64_t{1} << 31) &&
                   num_groups * n < (int64_t{1} << 31),
               "fp8_gemm_nt_grouped_masked: bad group count ", num_groups, " (max_m=", max_m,
               ", N=", n, ")");
  if (max_m == 0) return;
  check_pointers(a, sa, b, sb, d);
  sm90::check_aligned(masked_m, "masked_m", 4);
  GemmTileConfig c =
      sm90::resolve_config(GemmShape{GemmKind::kGroupedMasked,
                                     gemm_masked_plan_rows(expected_m, max_m), n, k, num_groups},
                           force);
  c.cluster = 1;
  GemmParams p{};
  p.form = Form::kMasked;
  p.cluster = 1;
  p.m = static_cast<int>(max_m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.num_groups = static_cast<int>(num_groups);
  p.num_stages = c.num_stages;
  p.tma_store = c.epilogue == 2 ? 1 : 0;
  p.masked_m = masked_m;
  p.sb = sb;
  p.d = d;
  const LaunchMaps maps =
      make_maps(a, num_groups * max_m, b, num_groups * n, sa, num_groups * (k / 128),
                sm90::pad4(max_m), k, d, num_groups * max_m, n, c);
  const int64_t tiles =
      num_groups * ((max_m + c.block_m - 1) / c.block_m) * ((n + c.block_n - 1) / c.block_n);
  dispatch_1d2d(maps, p, c, static_cast<int>(std::min<int64_t>(tiles, 1 << 30)), stream);
}

}  // namespace fp8moe::kernels
