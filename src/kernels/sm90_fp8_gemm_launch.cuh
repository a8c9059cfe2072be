// Host side of the sm_90a FP8 GEMMs: input validation, TMA descriptors, tile choice, launch.
// Included by sm90_fp8_gemm_1d2d.cu and sm90_fp8_gemm_1d1d.cu.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/kernels/sm90_gemm_heuristic.h"
#include "sm90_fp8_gemm.cuh"

namespace fp8moe::kernels::sm90 {

struct DeviceInfo {
  int num_sms = 0;
  int64_t smem_optin = 0;
  int cc_major = 0, cc_minor = 0;
  double dram_bytes_per_s = kDefaultDramBytesPerS;  // the heuristic's DRAM floor
};
const DeviceInfo& current_device_info();

enum class TmaElem { kU8, kF32, kBF16 };
// A 2D row-major tensor [rows, cols] (cols contiguous, `row_stride_bytes` apart), loaded in boxes
// of box_rows x box_cols; 128-byte swizzle for the operand tiles, none for scales.
CUtensorMap make_tma_2d(const void* ptr, TmaElem elem, uint64_t rows, uint64_t cols,
                        uint64_t row_stride_bytes, uint32_t box_rows, uint32_t box_cols,
                        bool swizzle_128b);

inline int64_t pad4(int64_t x) {
  return (x + 3) / 4 * 4;
}

inline void check_aligned(const void* p, const char* what, int64_t bytes = 16) {
  FM_CHECK_ARG(p != nullptr, "fp8 gemm: ", what, " is null");
  FM_CHECK_ARG(reinterpret_cast<uintptr_t>(p) % bytes == 0, "fp8 gemm: ", what, " (", p,
               ") is not ", bytes, "-byte aligned");
}

inline void check_common_shape(const char* name, int64_t m, int64_t n, int64_t k) {
  FM_CHECK_ARG(m >= 0 && n > 0 && k > 0, name, ": bad shape M=", m, " N=", n, " K=", k);
  FM_CHECK_ARG(k % 128 == 0, name, ": K=", k, " is not a multiple of 128 (the scale block)");
  FM_CHECK_ARG(n % 8 == 0, name, ": N=", n, " is not a multiple of 8");
  FM_CHECK_ARG(m < (int64_t{1} << 31) && n < (int64_t{1} << 31) && k < (int64_t{1} << 31), name,
               ": shape M=", m, " N=", n, " K=", k, " too large");
}

struct LaunchMaps {
  CUtensorMap a, b, sa, sb, d;
};

template <int kBlockM, int kBlockN, bool kWgrad, bool kSplitK = false, bool kTail = false,
          int kMode = 0>
void launch_gemm(const LaunchMaps& maps, const GemmParams& params, const GemmTileConfig& cfg,
                 int max_tiles, cudaStream_t stream) {
  constexpr int kThreads = 128 * (math_warpgroups(kBlockM) + 1);
  const GemmKind kind = kWgrad ? GemmKind::kWgrad : GemmKind::kDense;
  const int64_t smem =
      gemm_smem_bytes(kind, kBlockM, kBlockN, cfg.num_stages, params.tma_store != 0);
  auto kernel = fp8_gemm_kernel<kBlockM, kBlockN, kWgrad, kSplitK, kTail, kMode>;
  FM_CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(smem)));
  cudaLaunchConfig_t launch{};
  cudaLaunchAttribute attr[2];
  int num_attrs = 0;
  if (cfg.pdl == 2) {
    // The kernel waits for the previous grid (griddepcontrol.wait) before any global access.
    attr[num_attrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[num_attrs].val.programmaticStreamSerializationAllowed = 1;
    ++num_attrs;
  }
  launch.blockDim = dim3(kThreads);
  launch.dynamicSmemBytes = static_cast<size_t>(smem);
  launch.stream = stream;
  launch.attrs = attr;
  if (params.cluster == 1) {
    launch.gridDim = dim3(static_cast<unsigned>(std::max(1, std::min(cfg.num_sms, max_tiles))));
    launch.numAttrs = static_cast<unsigned>(num_attrs);
    FM_CHECK_CUDA(
        cudaLaunchKernelEx(&launch, kernel, maps.a, maps.b, maps.sa, maps.sb, maps.d, params));
    FM_CHECK_LAUNCH();
    return;
  }
  attr[num_attrs].id = cudaLaunchAttributeClusterDimension;
  attr[num_attrs].val.clusterDim.x = 2;
  attr[num_attrs].val.clusterDim.y = 1;
  attr[num_attrs].val.clusterDim.z = 1;
  ++num_attrs;
  launch.numAttrs = static_cast<unsigned>(num_attrs);
  // NOTE: not every SM can pair up (GPCs of odd size): ask how many pairs fit at once.
  launch.gridDim = dim3(static_cast<unsigned>(cfg.num_sms / 2 * 2));
  static int max_clusters = 0;  // one per instantiation; the device does not change under us
  if (max_clusters == 0) {
    FM_CHECK_CUDA(cudaOccupancyMaxActiveClusters(&max_clusters, kernel, &launch));
    if (std::getenv("FP8MOE_GEMM_VERBOSE") != nullptr)
      std::fprintf(stderr, "fp8 gemm %dx%d: %d CTA pairs can be resident\n", kBlockM, kBlockN,
                   max_clusters);
  }
  const int pairs = std::max(1, std::min({max_clusters, cfg.num_sms / 2, (max_tiles + 1) / 2}));
  launch.gridDim = dim3(static_cast<unsigned>(2 * pairs));
  FM_CHECK_CUDA(
      cudaLaunchKernelEx(&launch, kernel, maps.a, maps.b, maps.sa, maps.sb, maps.d, params));
  FM_CHECK_LAUNCH();
}

// Fills stages and SMs of a forced configuration, or asks the heuristic.
GemmTileConfig resolve_config(const GemmShape& shape, const GemmTileConfig* force);

}  // namespace fp8moe::kernels::sm90
