// MoE grouped contiguous FP8 GEMM with A's rows gathered through a row index
// (fp8_gemm_nt_grouped_contiguous_gathered; kernel: sm90_fp8_gemm.cuh, kModeGatherA).
// Checked bit for bit against fp8_gemm_nt_grouped_contiguous on the materialised rows:
// `build-device/tests/test_kernels_gpu --gtest_filter='Fp8GemmGathered*'`.
#include <cstring>

#include "sm90_fp8_gemm_launch.cuh"

namespace fp8moe::kernels {

void fp8_gemm_nt_grouped_contiguous_gathered(GatheredRows a, const float* sa, const uint8_t* b,
                                             const float* sb, bf16* d,
                                             const int32_t* grouped_layout, int64_t m, int64_t n,
                                             int64_t k, int64_t num_groups, cudaStream_t stream,
                                             const GemmTileConfig* force) {
  constexpr const char* kName = "fp8_gemm_nt_grouped_contiguous_gathered";
  sm90::check_common_shape(kName, m, n, k);
  FM_CHECK_ARG(num_groups >= 1 && num_groups * n < (int64_t{1} << 31), kName, ": bad group count ",
               num_groups, " (N=", n, ")");
  FM_CHECK_ARG(m % 128 == 0, kName, ": M=", m,
               " is not a multiple of 128 (each expert's rows start at a multiple of 128)");
  FM_CHECK_ARG(a.rows >= 0 && a.rows < (int64_t{1} << 31), kName, ": source rows ", a.rows);
  FM_CHECK_ARG(a.stride % 16 == 0 && a.stride >= k && a.stride < (int64_t{1} << 40), kName,
               ": source row stride ", a.stride, " bytes (a multiple of 16, >= K=", k, ")");
  // The producer addresses source rows in 16-byte units with 32 bits (0xffffffff: padding).
  FM_CHECK_ARG(a.rows * (a.stride / 16) < (int64_t{1} << 32) - 1, kName, ": ", a.rows,
               " source rows of ", a.stride, " bytes (at most 64 GiB)");
  if (m == 0) return;
  FM_CHECK_ARG(a.index != nullptr, kName, ": null row index");
  sm90::check_aligned(a.index, "row index", 4);
  sm90::check_aligned(sa, "A scales");
  sm90::check_aligned(b, "B");
  sm90::check_aligned(sb, "B scales", 4);
  sm90::check_aligned(d, "D");
  sm90::check_aligned(grouped_layout, "grouped_layout", 4);
  // No source rows: every logical row is padding, nothing is written.
  if (a.rows == 0) return;
  sm90::check_aligned(a.base, "gathered A base");

  const GemmShape shape{GemmKind::kGroupedContiguous, m, n, k, num_groups};
  GemmTileConfig c;
  if (force == nullptr) {
    const sm90::DeviceInfo& info = sm90::current_device_info();
    GemmTileConfig pick =
        gemm_gathered_tile(shape, info.num_sms, info.smem_optin, info.dram_bytes_per_s);
    c = sm90::resolve_config(shape, &pick);
  } else {
    FM_CHECK_ARG(force->block_m == 128 && (force->block_n == 128 || force->block_n == 256), kName,
                 ": tile ", force->block_m, "x", force->block_n,
                 " has no gathered kernel (128x128, 128x256)");
    c = sm90::resolve_config(shape, force);
  }
  c.cluster = 1;
  sm90::GemmParams p{};
  p.form = sm90::Form::kContiguous;
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
  p.split_k = 1;
  p.tail_split = 1;
  FM_CHECK_ARG(c.num_stages >= 3, kName, ": ", c.num_stages,
               " stages (the gathered producer keeps two stages' copies in flight: at least 3)");
  sm90::LaunchMaps maps{};
  // No TMA map of A: its bytes carry the gather source (produce_gathered's cp.async).
  const sm90::GatherSource source{a.base, a.stride, a.index};
  std::memcpy(&maps.a, &source, sizeof source);
  maps.b = sm90::make_tma_2d(b, sm90::TmaElem::kU8, num_groups * n, k, k, c.block_n, 128, true);
  maps.sa = sm90::make_tma_2d(sa, sm90::TmaElem::kF32, k / 128, sm90::pad4(m), sm90::pad4(m) * 4, 1,
                              c.block_m, false);
  maps.sb = maps.sa;  // unused by the 1x128 x 128x128 kernel
  maps.d = sm90::make_tma_2d(d, sm90::TmaElem::kBF16, m, n, n * 2, 64, 64, true);
  const int64_t tiles = m / c.block_m * ((n + c.block_n - 1) / c.block_n);
  const int max_tiles = static_cast<int>(std::min<int64_t>(tiles, 1 << 30));
  constexpr int kGather = sm90::kModeGatherA;
  if (c.block_n == 256)
    sm90::launch_gemm<128, 256, false, false, false, kGather>(maps, p, c, max_tiles, stream);
  else
    sm90::launch_gemm<128, 128, false, false, false, kGather>(maps, p, c, max_tiles, stream);
}

}  // namespace fp8moe::kernels
