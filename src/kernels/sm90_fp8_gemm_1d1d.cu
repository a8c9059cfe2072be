// FP8 weight-gradient GEMM on sm_90a: D(fp32) += A * B^T with 1x128 scales on both operands
// (each promotion multiplies by sa[row] * sb[col]); dense and k-grouped (experts side by side
// along K). Kernel in sm90_fp8_gemm.cuh. Checked against gemm_fp8_reference(accumulate = true):
// `build-device/tests/test_kernels_gpu --gtest_filter='Fp8Wgrad*'`.
#include "sm90_fp8_gemm_launch.cuh"

namespace fp8moe::kernels {

using sm90::Form;
using sm90::GemmParams;
using sm90::LaunchMaps;
using sm90::TmaElem;

namespace {

void dispatch_1d1d(const LaunchMaps& maps, const GemmParams& p, const GemmTileConfig& c,
                   int max_tiles, cudaStream_t stream) {
  if (c.block_m == 128 && c.block_n == 128)
    sm90::launch_gemm<128, 128, true>(maps, p, c, max_tiles, stream);
  else if (c.block_m == 64 && c.block_n == 128)
    sm90::launch_gemm<64, 128, true>(maps, p, c, max_tiles, stream);
  else
    FM_THROW(ErrorKind::kInvalidArgument, "fp8 wgrad gemm: tile ", c.block_m, "x", c.block_n,
             " not compiled");
}

// `d_rows`: the rows of D (M, or G x M for the k-grouped form), for the reduce-add epilogue's map.
LaunchMaps make_maps(const uint8_t* a, const uint8_t* b, const float* sa, const float* sb, float* d,
                     int64_t m, int64_t n, int64_t k, int64_t d_rows, const GemmTileConfig& c) {
  LaunchMaps maps{};
  maps.a = sm90::make_tma_2d(a, TmaElem::kU8, m, k, k, c.block_m, 128, true);
  // CTA pairs: each CTA loads half of the B tile and multicasts it to both.
  maps.b = sm90::make_tma_2d(b, TmaElem::kU8, n, k, k, c.block_n / c.cluster, 128, true);
  maps.sa = sm90::make_tma_2d(sa, TmaElem::kF32, k / 128, sm90::pad4(m), sm90::pad4(m) * 4, 1,
                              c.block_m, false);
  maps.sb = sm90::make_tma_2d(sb, TmaElem::kF32, k / 128, sm90::pad4(n), sm90::pad4(n) * 4, 1,
                              c.block_n, false);
  // Epilogue 2: 64-row x 32-column FP32 boxes (128-byte rows, swizzled) reduce-added into D;
  // epilogue 1 stores from registers and never reads the map.
  maps.d = c.epilogue == 2 ? sm90::make_tma_2d(d, TmaElem::kF32, d_rows, n, n * 4, 64, 32, true)
                           : maps.a;
  return maps;
}

void check_pointers(const uint8_t* a, const float* sa, const uint8_t* b, const float* sb,
                    const float* d) {
  sm90::check_aligned(a, "A");
  sm90::check_aligned(b, "B");
  sm90::check_aligned(sa, "A scales");
  sm90::check_aligned(sb, "B scales");
  sm90::check_aligned(d, "D");
}

}  // namespace

void fp8_gemm_nt_wgrad(const uint8_t* a, const float* sa, const uint8_t* b, const float* sb,
                       float* d, int64_t m, int64_t n, int64_t k, cudaStream_t stream,
                       const GemmTileConfig* force, WgradOutput output) {
  sm90::check_common_shape("fp8_gemm_nt_wgrad", m, n, k);
  if (m == 0) return;
  check_pointers(a, sa, b, sb, d);
  GemmTileConfig c = sm90::resolve_config(GemmShape{GemmKind::kWgrad, m, n, k, 1}, force);
  // CTA pairs (B multicast): 128-row tiles and an even number of them, else single CTAs.
  if (c.cluster != 2 || c.block_m != 128 || (m + 127) / 128 % 2 != 0) c.cluster = 1;
  GemmParams p{};
  p.form = Form::kDense;
  p.cluster = c.cluster;
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.num_groups = 1;
  p.num_stages = c.num_stages;
  p.tma_store = c.epilogue == 2 ? 1 : 0;
  p.overwrite = output == WgradOutput::kOverwrite ? 1 : 0;
  p.d = d;
  const int64_t tiles = (m + c.block_m - 1) / c.block_m * ((n + c.block_n - 1) / c.block_n);
  dispatch_1d1d(make_maps(a, b, sa, sb, d, m, n, k, m, c), p, c,
                static_cast<int>(std::min<int64_t>(tiles, 1 << 30)), stream);
}

namespace {

// Both k-grouped entry points: p carries the groups (host offsets or the device layout);
// k_total is the K extent of A, B and the scales (the bound for the layout form).
void launch_kgrouped(const uint8_t* a, const float* sa, const uint8_t* b, const float* sb, float* d,
                     int64_t m, int64_t n, int64_t groups, int64_t k_total, GemmParams& p,
                     cudaStream_t stream, const GemmTileConfig* force, WgradOutput output) {
  const char* what = "fp8_gemm_nt_kgrouped_wgrad";
  FM_CHECK_ARG(groups * m < (int64_t{1} << 31), what, ": G*M too large");
  if (m == 0) return;
  if (k_total == 0) {  // every group empty: an overwritten D is all zeros
    if (output == WgradOutput::kOverwrite) {
      FM_CHECK_ARG(d != nullptr, what, ": null D");
      FM_CHECK_CUDA(
          cudaMemsetAsync(d, 0, static_cast<size_t>(groups * m * n) * sizeof(float), stream));
    }
    return;
  }
  sm90::check_common_shape(what, m, n, k_total);
  check_pointers(a, sa, b, sb, d);
  GemmTileConfig c = sm90::resolve_config(
      GemmShape{GemmKind::kKGroupedWgrad, m, n, k_total / groups, groups}, force);
  c.cluster = 1;
  p.form = Form::kKGrouped;
  p.cluster = 1;
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k_total);
  p.num_groups = static_cast<int>(groups);
  p.num_stages = c.num_stages;
  p.tma_store = c.epilogue == 2 ? 1 : 0;
  p.overwrite = output == WgradOutput::kOverwrite ? 1 : 0;
  p.d = d;
  const int64_t tiles =
      groups * ((m + c.block_m - 1) / c.block_m) * ((n + c.block_n - 1) / c.block_n);
  dispatch_1d1d(make_maps(a, b, sa, sb, d, m, n, k_total, groups * m, c), p, c,
                static_cast<int>(std::min<int64_t>(tiles, 1 << 30)), stream);
}

void check_group_count(int64_t groups) {
  FM_CHECK_ARG(groups >= 1 && groups <= kMaxKGroups, "fp8_gemm_nt_kgrouped_wgrad: ", groups,
               " groups (1..", kMaxKGroups, " supported)");
}

}  // namespace

void fp8_gemm_nt_kgrouped_wgrad(const uint8_t* a, const float* sa, const uint8_t* b,
                                const float* sb, float* d, int64_t m, int64_t n,
                                std::span<const int64_t> ks, cudaStream_t stream,
                                const GemmTileConfig* force, WgradOutput output) {
  const int64_t groups = static_cast<int64_t>(ks.size());
  check_group_count(groups);
  GemmParams p{};
  int64_t k_total = 0;
  for (int64_t g = 0; g < groups; ++g) {
    FM_CHECK_ARG(ks[g] >= 0 && ks[g] % 128 == 0, "fp8_gemm_nt_kgrouped_wgrad: group ", g,
                 " has K=", ks[g], ", not a multiple of 128");
    p.k_block_offsets[g] = static_cast<int>(k_total / 128);
    k_total += ks[g];
  }
  p.k_block_offsets[groups] = static_cast<int>(k_total / 128);
  launch_kgrouped(a, sa, b, sb, d, m, n, groups, k_total, p, stream, force, output);
}

void fp8_gemm_nt_kgrouped_wgrad(const uint8_t* a, const float* sa, const uint8_t* b,
                                const float* sb, float* d, int64_t m, int64_t n, int64_t groups,
                                const int32_t* k_layout, int64_t k_rows, cudaStream_t stream,
                                const GemmTileConfig* force, WgradOutput output) {
  check_group_count(groups);
  FM_CHECK_ARG(k_rows >= 0 && k_rows % 128 == 0, "fp8_gemm_nt_kgrouped_wgrad: k_rows=", k_rows,
               ", not a multiple of 128");
  FM_CHECK_ARG(k_layout != nullptr || k_rows == 0, "fp8_gemm_nt_kgrouped_wgrad: null k_layout");
  GemmParams p{};
  p.grouped_layout = k_layout;
  launch_kgrouped(a, sa, b, sb, d, m, n, groups, k_rows, p, stream, force, output);
}

}  // namespace fp8moe::kernels
