// Row-major -> M-major scale conversion (plain and gathered through a row index) against a CPU
// loop, outputs poisoned first.
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/scale_layout.h"
#include "gpu_test_util.cuh"

namespace fp8moe {
namespace {

TEST(ScaleLayoutGpu, RowMajorToMnMajorMatchesCpuWithZeroPadding) {
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<float> u(1e-3f, 10.0f);
  for (int64_t batches : {1, 3})
    for (int64_t rows : {1, 3, 4, 130, 4101})
      for (int64_t kb : {1, 4, 33, 56}) {
        SCOPED_TRACE(testing::Message() << batches << "x" << rows << "x" << kb);
        std::vector<float> in(batches * rows * kb);
        for (float& v : in) v = u(rng);
        const int64_t padded = padded_rows(rows);
        std::vector<float> want(batches * kb * padded, 0.0f);
        for (int64_t b = 0; b < batches; ++b)
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < kb; ++j)
              want[(b * kb + j) * padded + r] = in[(b * rows + r) * kb + j];
        test::DeviceBuffer<float> din(in), dout(want.size());
        dout.poison();
        kernels::scales_to_mn_major(din.get(), batches, rows, kb, dout.get(), nullptr);
        FM_CHECK_CUDA(cudaDeviceSynchronize());
        const std::vector<float> got = dout.download();
        ASSERT_EQ(std::memcmp(got.data(), want.data(), want.size() * sizeof(float)), 0);
      }
}

TEST(ScaleLayoutGpu, GatherMatchesCpuLoopWithZeroPaddingRows) {
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<float> u(1e-3f, 10.0f);
  for (int64_t rows : {1, 3, 4, 130, 4101})
    for (int64_t kb : {1, 4, 33, 56})
      for (int64_t extra : {0, 5}) {
        SCOPED_TRACE(testing::Message() << rows << "x" << kb << " stride " << kb + extra);
        const int64_t in_stride = kb + extra, src_rows = rows / 2 + 1;
        std::vector<float> in(src_rows * in_stride);
        for (float& v : in) v = u(rng);
        std::vector<int32_t> index(rows);
        for (int64_t r = 0; r < rows; ++r)
          index[r] = r % 7 == 3 ? -1 - int32_t(r % 2) : int32_t(rng() % src_rows);
        const int64_t padded = padded_rows(rows);
        std::vector<float> want(kb * padded, 0.0f);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < kb; ++c)
            if (index[r] >= 0) want[c * padded + r] = in[index[r] * in_stride + c];
        test::DeviceBuffer<float> din(in), dout(want.size());
        test::DeviceBuffer<int32_t> dindex(index);
        dout.poison();
        kernels::gather_scales_to_mn_major(din.get(), in_stride, dindex.get(), rows, kb, dout.get(),
                                           nullptr);
        FM_CHECK_CUDA(cudaDeviceSynchronize());
        const std::vector<float> got = dout.download();
        ASSERT_EQ(std::memcmp(got.data(), want.data(), want.size() * sizeof(float)), 0);
      }
}

TEST(ScaleLayoutGpu, RejectsBadShapes) {
  EXPECT_THROW(kernels::scales_to_mn_major(nullptr, 1, -1, 4, nullptr, nullptr), Error);
  EXPECT_THROW(kernels::scales_to_mn_major(nullptr, 1, 8, 4, nullptr, nullptr), Error);
}

}  // namespace
}  // namespace fp8moe
