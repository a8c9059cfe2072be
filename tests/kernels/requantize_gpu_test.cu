// requantize_1x128_transpose (kernels/requantize.h) against its CPU reference, bit for bit, on
// fresh random inputs: both input scale layouts, pow2 on and off, padding rows holding NaN codes
// and scales, outputs poisoned (0xFF) first; bad shapes throw. Prints the kernel's time at the
// backward's shapes (768 x 7168 and 768 x 2048) and at 8192 x 7168.
// Run: build/tests/test_kernels_gpu --gtest_filter='Requant*'
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/requantize.h"
#include "gpu_test_util.cuh"

namespace fp8moe::kernels {
namespace {

using test::DeviceBuffer;

TEST(RequantizeGpu, MatchesReferenceBitForBit) {
  struct Shape {
    int64_t rows, cols;
  };
  // 8192 x 7168 (the CPU reference takes seconds): one variant, timed.
  for (const Shape sh :
       {Shape{256, 128}, Shape{768, 2048}, Shape{768, 7168}, Shape{1024, 384}, Shape{8192, 7168}}) {
    for (bool pow2 : {false, true}) {
      for (ScaleLayout layout : {ScaleLayout::kRowMajor, ScaleLayout::kMnMajor}) {
        if (sh.rows == 8192 && (pow2 || layout == ScaleLayout::kRowMajor)) continue;
        const int64_t rows = sh.rows, cols = sh.cols;
        const uint64_t seed = std::random_device{}();
        std::vector<float> x = test::random_matrix(rows, cols, seed);
        QuantizedMatrix q = quantize(x.data(), rows, cols, cols, ScaleGranularity::k1x128);
        std::mt19937_64 rng(seed);
        std::vector<int32_t> lay(rows);
        for (int64_t r = 0; r < rows; ++r) {
          lay[r] = rng() % 5 == 0 ? -1 : static_cast<int32_t>(r / 256);
          if (lay[r] >= 0) continue;
          std::fill_n(q.codes.begin() + r * cols, cols, uint8_t{0x7F});
          std::fill_n(q.scales.begin() + r * (cols / 128), cols / 128, std::nanf(""));
        }
        const std::vector<float> sc =
            layout == ScaleLayout::kMnMajor ? scales_mn_major(q) : q.scales;
        std::vector<uint8_t> want(cols * rows);
        std::vector<float> want_s((rows / 128) * cols);
        requantize_1x128_transpose_reference(q.codes.data(), cols, sc.data(), layout, rows, cols,
                                             lay.data(), pow2, want.data(), want_s.data());
        DeviceBuffer<uint8_t> d_codes(q.codes), d_t(cols * rows);
        DeviceBuffer<float> d_sc(sc), d_ts(want_s.size());
        DeviceBuffer<int32_t> d_lay(lay);
        d_t.poison();
        d_ts.poison();
        requantize_1x128_transpose(d_codes.get(), cols, d_sc.get(), layout, rows, cols, d_lay.get(),
                                   pow2, d_t.get(), d_ts.get(), nullptr);
        FM_CHECK_CUDA(cudaDeviceSynchronize());
        const std::vector<uint8_t> got = d_t.download();
        const std::vector<float> got_s = d_ts.download();
        int64_t differ = 0, sdiffer = 0;
        for (size_t i = 0; i < got.size(); ++i) differ += got[i] != want[i];
        for (size_t i = 0; i < got_s.size(); ++i)
          sdiffer += std::memcmp(&got_s[i], &want_s[i], 4) != 0;
        EXPECT_EQ(differ, 0) << rows << "x" << cols << " pow2=" << pow2 << " seed=" << seed;
        EXPECT_EQ(sdiffer, 0) << rows << "x" << cols << " pow2=" << pow2 << " seed=" << seed;
        if (!pow2 && layout == ScaleLayout::kMnMajor && rows >= 768) {
          cudaEvent_t e0, e1;
          FM_CHECK_CUDA(cudaEventCreate(&e0));
          FM_CHECK_CUDA(cudaEventCreate(&e1));
          FM_CHECK_CUDA(cudaEventRecord(e0, nullptr));
          for (int i = 0; i < 20; ++i)
            requantize_1x128_transpose(d_codes.get(), cols, d_sc.get(), layout, rows, cols,
                                       d_lay.get(), pow2, d_t.get(), d_ts.get(), nullptr);
          FM_CHECK_CUDA(cudaEventRecord(e1, nullptr));
          FM_CHECK_CUDA(cudaEventSynchronize(e1));
          float ms = 0;
          FM_CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
          std::printf("requantize_1x128_transpose %lldx%lld: %.2f us (%.0f GB/s)\n",
                      static_cast<long long>(rows), static_cast<long long>(cols), ms * 50.0,
                      2.0 * rows * cols / (ms * 50.0) / 1e3);
          cudaEventDestroy(e0);
          cudaEventDestroy(e1);
        }
      }
    }
  }
}

TEST(RequantizeGpu, BadShapesThrow) {
  DeviceBuffer<uint8_t> c(256 * 256);
  DeviceBuffer<float> s(1024);
  auto call = [&](int64_t rows, int64_t cols, int64_t ld) {
    requantize_1x128_transpose(c.get(), ld, s.get(), ScaleLayout::kRowMajor, rows, cols, nullptr,
                               false, c.get(), s.get(), nullptr);
  };
  EXPECT_THROW(call(100, 128, 128), Error);
  EXPECT_THROW(call(128, 200, 208), Error);
  EXPECT_THROW(call(128, 128, 100), Error);
  EXPECT_THROW(requantize_1x128_transpose(nullptr, 128, s.get(), ScaleLayout::kRowMajor, 128, 128,
                                          nullptr, false, c.get(), s.get(), nullptr),
               Error);
}

}  // namespace
}  // namespace fp8moe::kernels
