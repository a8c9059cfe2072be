// Host helpers of the sm_90a FP8 GEMMs: device properties, TMA descriptor encoding (through the
// driver entry point, so nothing links libcuda directly), tile configuration.
// Checked through tests/kernels/fp8_gemm_gpu_test.cu (`build-device/tests/test_kernels_gpu`).
#include <cuda.h>
#include <cuda_runtime.h>

#include <mutex>

#include "sm90_fp8_gemm_launch.cuh"
#include "sm90_tma_encode.h"

namespace fp8moe::kernels::sm90 {

const DeviceInfo& current_device_info() {
  // NOTE: one entry per device id; the GEMMs run on whichever device is current.
  static DeviceInfo infos[64];
  static std::once_flag once[64];
  int dev = 0;
  FM_CHECK_CUDA(cudaGetDevice(&dev));
  FM_CHECK(dev >= 0 && dev < 64, "device id ", dev);
  std::call_once(once[dev], [dev] {
    DeviceInfo& info = infos[dev];
    int v = 0;
    FM_CHECK_CUDA(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
    info.num_sms = v;
    FM_CHECK_CUDA(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    info.smem_optin = v;
    FM_CHECK_CUDA(cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor, dev));
    FM_CHECK_CUDA(cudaDeviceGetAttribute(&info.cc_minor, cudaDevAttrComputeCapabilityMinor, dev));
    int mem_khz = 0, bus_bits = 0;
    FM_CHECK_CUDA(cudaDeviceGetAttribute(&mem_khz, cudaDevAttrMemoryClockRate, dev));
    FM_CHECK_CUDA(cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, dev));
    // NOTE: a device that reports no memory clock (some virtualised ones) keeps the H100 figure.
    if (mem_khz > 0 && bus_bits > 0)
      info.dram_bytes_per_s = gemm_dram_bytes_per_s(mem_khz, bus_bits);
  });
  const DeviceInfo& info = infos[dev];
  FM_CHECK_ARG(info.cc_major == 9 && info.cc_minor == 0,
               "fp8 gemm: needs an sm_90 (Hopper) GPU, device ", dev, " is sm_", info.cc_major,
               info.cc_minor);
  return info;
}

EncodeTiledFn encode_tiled_fn() {
  static EncodeTiledFn fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult status{};
    FM_CHECK_CUDA(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000,
                                                   cudaEnableDefault, &status));
    FM_CHECK(status == cudaDriverEntryPointSuccess && p != nullptr,
             "cuTensorMapEncodeTiled not found in the driver");
    return reinterpret_cast<EncodeTiledFn>(p);
  }();
  return fn;
}

CUtensorMap make_tma_2d(const void* ptr, TmaElem elem, uint64_t rows, uint64_t cols,
                        uint64_t row_stride_bytes, uint32_t box_rows, uint32_t box_cols,
                        bool swizzle_128b) {
  CUtensorMap map{};
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {row_stride_bytes};
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode_tiled_fn()(
      &map,
      elem == TmaElem::kU8    ? CU_TENSOR_MAP_DATA_TYPE_UINT8
      : elem == TmaElem::kF32 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32
                              : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
      2, const_cast<void*>(ptr), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      swizzle_128b ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  FM_CHECK_ARG(r == CUDA_SUCCESS, "cuTensorMapEncodeTiled failed (", static_cast<int>(r),
               ") for a [", rows, ",", cols, "] tensor, row stride ", row_stride_bytes,
               " bytes, box ", box_rows, "x", box_cols);
  return map;
}

GemmTileConfig resolve_config(const GemmShape& shape, const GemmTileConfig* force) {
  const DeviceInfo& info = current_device_info();
  if (force == nullptr) {
    GemmTileConfig c =
        choose_gemm_tile(shape, info.num_sms, info.smem_optin, info.dram_bytes_per_s);
    if (c.pdl == 0) c.pdl = kGemmDefaultPdl;
    if (c.scale_prefetch == 0) c.scale_prefetch = gemm_default_scale_prefetch(shape, c);
    return c;
  }
  GemmTileConfig c = *force;
  if (c.pdl == 0) c.pdl = kGemmDefaultPdl;
  FM_CHECK_ARG(c.pdl == 1 || c.pdl == 2, "fp8 gemm: pdl ", c.pdl,
               " (0 = default, 1 = off, 2 = on)");
  FM_CHECK_ARG(c.scale_prefetch >= 0 && c.scale_prefetch <= 2, "fp8 gemm: scale_prefetch ",
               c.scale_prefetch, " (0 = default, 1 = off, 2 = on)");
  FM_CHECK_ARG(gemm_tile_compiled(shape.kind, c.block_m, c.block_n), "fp8 gemm (",
               gemm_kind_name(shape.kind), "): tile ", c.block_m, "x", c.block_n,
               " is not compiled for this form");
  if (c.split_k <= 1) c.split_k = 1;
  FM_CHECK_ARG(c.split_k == 1 || shape.kind == GemmKind::kDense, "fp8 gemm (",
               gemm_kind_name(shape.kind), "): split_k=", c.split_k,
               " (split-K is for the dense fp8_gemm_nt only)");
  FM_CHECK_ARG(c.split_k <= kMaxSplitK, "fp8 gemm: split_k=", c.split_k, " (at most ", kMaxSplitK,
               ")");
  if (c.tail_split <= 1) c.tail_split = 1;
  FM_CHECK_ARG(c.tail_split == 1 || shape.kind == GemmKind::kDense, "fp8 gemm (",
               gemm_kind_name(shape.kind), "): tail_split=", c.tail_split,
               " (the tail split is for the dense fp8_gemm_nt only)");
  FM_CHECK_ARG(c.tail_split <= kMaxSplitK, "fp8 gemm: tail_split=", c.tail_split, " (at most ",
               kMaxSplitK, ")");
  // NOTE: a split launch stores from registers (only the last slice of a strip stores, without
  // the warpgroup-wide barrier the TMA store needs), so it has no output staging.
  if (c.split_k > 1) c.epilogue = 1;
  if (c.epilogue == 0) c.epilogue = gemm_choose_epilogue(shape, c.block_n);
  FM_CHECK_ARG(c.epilogue == 1 || c.epilogue == 2, "fp8 gemm: epilogue ", c.epilogue,
               " (0 = choose, 1 = registers, 2 = TMA store)");
  const int max_stages =
      gemm_max_stages(shape.kind, c.block_m, c.block_n, info.smem_optin, c.epilogue == 2);
  if (c.num_stages <= 0) c.num_stages = max_stages;
  FM_CHECK_ARG(c.num_stages >= 2 && c.num_stages <= max_stages, "fp8 gemm: ", c.num_stages,
               " stages do not fit (at most ", max_stages, ")");
  if (c.num_sms <= 0 || c.num_sms > info.num_sms) c.num_sms = info.num_sms;
  if (c.scale_prefetch == 0) c.scale_prefetch = gemm_default_scale_prefetch(shape, c);
  return c;
}

}  // namespace fp8moe::kernels::sm90
