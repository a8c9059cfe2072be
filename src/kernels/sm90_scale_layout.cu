// Row-major -> M-major 1x128 scales, plain or gathered through a row index
// (fp8moe/kernels/scale_layout.h). A 32x32 tile per block through shared memory, so that both the
// reads (along kb) and the writes (along rows) coalesce.
#include <cuda_runtime.h>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/scale_layout.h"

namespace fp8moe::kernels {
namespace {

constexpr int kTile = 32;

__global__ void __launch_bounds__(kTile * 8)
    scales_to_mn_major_kernel(const float* in, int64_t rows, int64_t kb, int64_t padded,
                              float* out) {
  __shared__ float tile[kTile][kTile + 1];
  const int64_t batch = blockIdx.z;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const float* src = in + batch * rows * kb;
  float* dst = out + batch * kb * padded;
  for (int i = threadIdx.y; i < kTile; i += blockDim.y) {
    const int64_t r = r0 + i, j = j0 + threadIdx.x;
    tile[i][threadIdx.x] = (r < rows && j < kb) ? src[r * kb + j] : 0.0f;
  }
  __syncthreads();
  for (int i = threadIdx.y; i < kTile; i += blockDim.y) {
    const int64_t j = j0 + i, r = r0 + threadIdx.x;
    if (j < kb && r < padded) dst[j * padded + r] = tile[threadIdx.x][i];
  }
}

// The same tile transposition with the source row of each output row read through `index`
// (gather_scales_to_mn_major): each row's read along kb stays contiguous.
__global__ void __launch_bounds__(kTile * 8)
    gather_scales_kernel(const float* in, int64_t in_stride, const int32_t* index, int64_t rows,
                         int64_t kb, int64_t padded, float* out) {
  __shared__ float tile[kTile][kTile + 1];
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  for (int i = threadIdx.y; i < kTile; i += blockDim.y) {
    const int64_t r = r0 + i, j = j0 + threadIdx.x;
    const int64_t src = r < rows ? __ldg(index + r) : -1;
    tile[i][threadIdx.x] = (src >= 0 && j < kb) ? in[src * in_stride + j] : 0.0f;
  }
  __syncthreads();
  for (int i = threadIdx.y; i < kTile; i += blockDim.y) {
    const int64_t j = j0 + i, r = r0 + threadIdx.x;
    if (j < kb && r < padded) out[j * padded + r] = tile[threadIdx.x][i];
  }
}

}  // namespace

void gather_scales_to_mn_major(const float* in, int64_t in_stride, const int32_t* index,
                               int64_t rows, int64_t kb, float* out, cudaStream_t stream) {
  FM_CHECK_ARG(rows >= 0 && kb >= 0, "gather_scales_to_mn_major: negative shape [", rows, ",", kb,
               "]");
  FM_CHECK_ARG(in_stride >= kb, "gather_scales_to_mn_major: in_stride ", in_stride,
               " floats is less than kb=", kb);
  FM_CHECK_ARG(rows < (int64_t{1} << 31) / kTile * kTile && kb < 65536 * kTile,
               "gather_scales_to_mn_major: shape [", rows, ",", kb, "] too large");
  const int64_t padded = padded_rows(rows);
  if (padded == 0 || kb == 0) return;
  FM_CHECK_ARG(in != nullptr && out != nullptr && index != nullptr,
               "gather_scales_to_mn_major: null pointer (in, index or out)");
  const dim3 grid(static_cast<unsigned>((padded + kTile - 1) / kTile),
                  static_cast<unsigned>((kb + kTile - 1) / kTile));
  gather_scales_kernel<<<grid, dim3(kTile, 8), 0, stream>>>(in, in_stride, index, rows, kb, padded,
                                                            out);
  FM_CHECK_LAUNCH();
}

void scales_to_mn_major(const float* in, int64_t batches, int64_t rows, int64_t kb, float* out,
                        cudaStream_t stream) {
  FM_CHECK_ARG(batches >= 0 && rows >= 0 && kb >= 0, "scales_to_mn_major: negative shape [",
               batches, ",", rows, ",", kb, "]");
  FM_CHECK_ARG(batches < 65536, "scales_to_mn_major: too many batches (", batches, ")");
  const int64_t padded = padded_rows(rows);
  if (batches == 0 || padded == 0 || kb == 0) return;
  FM_CHECK_ARG(in != nullptr && out != nullptr, "scales_to_mn_major: null pointer");
  const dim3 grid(static_cast<unsigned>((padded + kTile - 1) / kTile),
                  static_cast<unsigned>((kb + kTile - 1) / kTile), static_cast<unsigned>(batches));
  scales_to_mn_major_kernel<<<grid, dim3(kTile, 8), 0, stream>>>(in, rows, kb, padded, out);
  FM_CHECK_LAUNCH();
}

}  // namespace fp8moe::kernels
