// LinearFp8Gpu and LinearWeightsDevice (fp8moe/model/linear_gpu.h): the FP8 linear layer as a
// composition of the kernels module's quantisers and GEMMs, plus the one kernel of its own, the
// 128x128 blocks' transpose.
#include "fp8moe/model/linear_gpu.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/kernels/fp8_gemm.h"
#include "fp8moe/kernels/quantize.h"
#include "fp8moe/kernels/requantize.h"
#include "fp8moe/kernels/scale_layout.h"

namespace fp8moe {
namespace {

constexpr int64_t kTile = 128;

int64_t round_up(int64_t v, int64_t to) {
  return (v + to - 1) / to * to;
}
int64_t pad4(int64_t v) {
  return round_up(v, 4);
}
// Sub-allocations start at 256 bytes (TMA wants 16, kernels' vector loads 16).
int64_t slot(int64_t bytes) {
  return round_up(bytes, 256);
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// wt[c, r] = w[r, c] for r < n, 0 for n <= r < np (a 32 x 32 byte tile through shared memory);
// swt[kb][nb] = sw[nb][kb] by the first block row.
__global__ void transpose_blocks_kernel(const uint8_t* w, const float* sw, int64_t n, int64_t k,
                                        int64_t np, uint8_t* wt, float* swt) {
  __shared__ uint8_t tile[32][33];
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * 32,
                c0 = static_cast<int64_t>(blockIdx.x) * 32;
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int64_t r = r0 + i, c = c0 + threadIdx.x;
    tile[i][threadIdx.x] = r < n && c < k ? w[r * k + c] : uint8_t{0};
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int64_t c = c0 + i, r = r0 + threadIdx.x;
    if (c < k && r < np) wt[c * np + r] = tile[threadIdx.x][i];
  }
  if (blockIdx.x == 0 && blockIdx.y == 0) {
    const int64_t nb = (n + kTile - 1) / kTile, kb = k / kTile;
    for (int64_t i = threadIdx.y * 32 + threadIdx.x; i < nb * kb; i += 32 * blockDim.y)
      swt[(i % kb) * nb + i / kb] = sw[i];
  }
}

void check_shape(const char* what, int64_t n, int64_t k) {
  FM_CHECK_ARG(n > 0 && k > 0, what, ": empty weight [", n, ", ", k, "]");
  FM_CHECK_ARG(k % kTile == 0, what, ": K=", k,
               " must be a multiple of 128 (the Fprop GEMM's "
               "reduction)");
  FM_CHECK_ARG(n % 8 == 0, what, ": N=", n, " must be a multiple of 8");
}

}  // namespace

void transpose_fp8_weight_blocks(const uint8_t* w, const float* sw, int64_t n, int64_t k,
                                 uint8_t* wt, float* swt, cudaStream_t stream) {
  check_shape("transpose_fp8_weight_blocks", n, k);
  const int64_t np = round_up(n, kTile);
  const dim3 grid(static_cast<unsigned>((k + 31) / 32), static_cast<unsigned>((np + 31) / 32));
  transpose_blocks_kernel<<<grid, dim3(32, 8), 0, stream>>>(w, sw, n, k, np, wt, swt);
  FM_CHECK_LAUNCH();
}

// ---- LinearWeightsDevice ----

LinearWeightsDevice::LinearWeightsDevice(int64_t n, int64_t k) : n_(n), k_(k) {
  check_shape("LinearWeightsDevice", n, k);
  const int64_t np = round_up(n, kTile), nb = np / kTile, kb = k / kTile;
  const int64_t bytes = slot(n * k) + slot(k * np) + slot(nb * kb * 4) * 2;
  FM_CHECK_CUDA(cudaMalloc(&buffer_, static_cast<size_t>(bytes)));
  auto* base = static_cast<char*>(buffer_);
  w_ = reinterpret_cast<uint8_t*>(base);
  base += slot(n * k);
  wt_ = reinterpret_cast<uint8_t*>(base);
  base += slot(k * np);
  sw_ = reinterpret_cast<float*>(base);
  base += slot(nb * kb * 4);
  swt_ = reinterpret_cast<float*>(base);
  FM_CHECK_CUDA(cudaMemset(buffer_, 0, static_cast<size_t>(bytes)));
}

LinearWeightsDevice::~LinearWeightsDevice() {
  cudaFree(buffer_);
}

void LinearWeightsDevice::refresh(const float* master, cudaStream_t stream) {
  FM_CHECK_ARG(master != nullptr, "LinearWeightsDevice::refresh: null master weight");
  if (master != quantizer_master_) {
    const int64_t np = round_up(n_, kTile);
    kernels::WeightQuantJob j;
    j.master = master;
    j.n = n_;
    j.k = k_;
    j.w = w_;
    j.sw = sw_;
    j.wt = wt_;
    j.ldt = np;
    j.swt = swt_;
    j.ldst = np / kTile;
    quantizer_ =
        std::make_unique<kernels::WeightQuantizer>(std::vector<kernels::WeightQuantJob>{j});
    quantizer_master_ = master;
  }
  quantizer_->run(stream);
}

LinearWeightsGpu LinearWeightsDevice::view() const {
  return LinearWeightsGpu{w_, sw_, wt_, swt_, n_, k_};
}

// ---- LinearFp8Gpu ----

LinearFp8Gpu::LinearFp8Gpu(int64_t max_rows, int64_t n, int64_t k, LinearGpuOptions options)
    : max_rows_(max_rows), n_(n), k_(k), options_(options) {
  check_shape("LinearFp8Gpu", n, k);
  FM_CHECK_ARG(max_rows >= 0, "LinearFp8Gpu: max_rows=", max_rows);
  np_ = round_up(n, kTile);
  mp_max_ = round_up(std::max<int64_t>(max_rows, 1), kTile);
  const int64_t M = mp_max_, kb = k / kTile;
  const int64_t sizes[] = {
      M * k,                        // x8
      M * kb * 4,                   // xs
      kb * pad4(M) * 4,             // sa
      M * n * 2,                    // dy_pad
      M * np_,                      // dy8
      (np_ / kTile) * pad4(M) * 4,  // sdy
      n * M,                        // dyt
      (M / kTile) * pad4(n) * 4,    // sdyt
      k * M,                        // xt
      (M / kTile) * pad4(k) * 4,    // sxt
  };
  int64_t bytes = 0;
  for (int64_t s : sizes) bytes += slot(s);
  FM_CHECK_CUDA(cudaMalloc(&buffer_, static_cast<size_t>(bytes)));
  // NOTE: zero once: dy8's columns >= N and the padding rows are never written by the kernels,
  // and must read as zero codes.
  FM_CHECK_CUDA(cudaMemset(buffer_, 0, static_cast<size_t>(bytes)));
  char* base = static_cast<char*>(buffer_);
  void* parts[10];
  for (int i = 0; i < 10; ++i) {
    parts[i] = base;
    base += slot(sizes[i]);
  }
  // Split-K (M <= 128) and the tail split (the last partial wave) need a workspace whose size
  // depends on M through the tile heuristic: the largest over every M up to 256 and every 64th
  // beyond (a call that needs more is checked in gemm_workspace and runs unsplit).
  std::vector<int64_t> sampled;
  for (int64_t m = 1; m <= std::min<int64_t>(max_rows, 256); ++m) sampled.push_back(m);
  for (int64_t m = 320; m < max_rows; m += 64) sampled.push_back(m);
  if (max_rows > 256) sampled.push_back(max_rows);
  for (const int64_t m : sampled)
    gemm_ws_bytes_ = std::max({gemm_ws_bytes_, kernels::fp8_gemm_workspace_bytes(m, n, k),
                               kernels::fp8_gemm_workspace_bytes(m, k, np_)});
  if (gemm_ws_bytes_ > 0) {
    FM_CHECK_CUDA(cudaMalloc(&gemm_ws_, static_cast<size_t>(gemm_ws_bytes_)));
    FM_CHECK_CUDA(cudaMemset(gemm_ws_, 0, static_cast<size_t>(gemm_ws_bytes_)));
  }
  x8_ = static_cast<uint8_t*>(parts[0]);
  xs_ = static_cast<float*>(parts[1]);
  sa_ = static_cast<float*>(parts[2]);
  dy_pad_ = static_cast<bf16*>(parts[3]);
  dy8_ = static_cast<uint8_t*>(parts[4]);
  sdy_ = static_cast<float*>(parts[5]);
  dyt_ = static_cast<uint8_t*>(parts[6]);
  sdyt_ = static_cast<float*>(parts[7]);
  xt_ = static_cast<uint8_t*>(parts[8]);
  sxt_ = static_cast<float*>(parts[9]);
}

LinearFp8Gpu::~LinearFp8Gpu() {
  cudaFree(buffer_);
  cudaFree(gemm_ws_);
}

kernels::GemmWorkspace LinearFp8Gpu::gemm_workspace(int64_t m, int64_t n, int64_t k) const {
  if (gemm_ws_ == nullptr || kernels::fp8_gemm_workspace_bytes(m, n, k) > gemm_ws_bytes_) return {};
  return kernels::GemmWorkspace{gemm_ws_, static_cast<size_t>(gemm_ws_bytes_)};
}

void LinearFp8Gpu::check_weights(const char* what, const LinearWeightsGpu& w) const {
  FM_CHECK_ARG(w.n == n_ && w.k == k_, what, ": weight [", w.n, ", ", w.k, "] for a layer [", n_,
               ", ", k_, "]");
  FM_CHECK_ARG(w.w != nullptr && w.sw != nullptr && w.wt != nullptr && w.swt != nullptr, what,
               ": weight view with a null pointer");
}

void LinearFp8Gpu::forward(const bf16* x, int64_t m, const LinearWeightsGpu& w, bf16* y,
                           cudaStream_t stream) {
  constexpr const char* kWhat = "LinearFp8Gpu::forward";
  check_weights(kWhat, w);
  FM_CHECK_ARG(m >= 0 && m <= max_rows_, kWhat, ": M=", m, " rows (max_rows ", max_rows_, ")");
  FM_CHECK_ARG(m == 0 || (x != nullptr && y != nullptr), kWhat, ": null x or y");
  FM_CHECK_ARG(aligned16(x) && aligned16(y), kWhat, ": x and y must be 16-byte aligned");
  m_ = m;
  const int64_t mp = round_up(m, kTile), kb = k_ / kTile;
  // The cache's rows m..mp must read as zeros in backward (a longer earlier call wrote them).
  if (mp > m) {
    FM_CHECK_CUDA(cudaMemsetAsync(x8_ + m * k_, 0, static_cast<size_t>((mp - m) * k_), stream));
    FM_CHECK_CUDA(cudaMemsetAsync(xs_ + m * kb, 0, static_cast<size_t>((mp - m) * kb * 4), stream));
  }
  if (m == 0) return;
  if (m % kTile == 0) {
    // The GEMM's M-major scales are the backward's requantise input as they are (its rows are
    // whole 128-row blocks): one kernel.
    kernels::quantize_1x128(x, m, k_, k_, options_.pow2_activation_scales, x8_, k_, sa_,
                            kernels::ScaleLayout::kMnMajor, stream);
  } else {
    // The requantise reads whole 128-row blocks, zero past M: row-major scales with zeroed
    // padding rows, and an M-major copy (padded to 4 rows) for the GEMM.
    kernels::quantize_1x128(x, m, k_, k_, options_.pow2_activation_scales, x8_, k_, xs_,
                            kernels::ScaleLayout::kRowMajor, stream);
    kernels::scales_to_mn_major(xs_, 1, m, kb, sa_, stream);
  }
  kernels::fp8_gemm_nt(x8_, sa_, w.w, w.sw, y, m, n_, k_, stream, nullptr,
                       gemm_workspace(m, n_, k_));
}

void LinearFp8Gpu::backward(const bf16* dy, const LinearWeightsGpu& w, bf16* dx, float* dw,
                            cudaStream_t stream, kernels::WgradOutput dw_output) {
  constexpr const char* kWhat = "LinearFp8Gpu::backward";
  check_weights(kWhat, w);
  FM_CHECK_ARG(m_ >= 0, kWhat, ": no forward to take the gradient of");
  FM_CHECK_ARG(dw != nullptr, kWhat, ": null dw");
  const int64_t m = m_;
  if (m == 0) {  // no tokens: an overwritten gradient is zeros
    if (dw_output == kernels::WgradOutput::kOverwrite)
      FM_CHECK_CUDA(cudaMemsetAsync(dw, 0, static_cast<size_t>(n_ * k_) * 4, stream));
    return;
  }
  FM_CHECK_ARG(dy != nullptr, kWhat, ": null dy");
  FM_CHECK_ARG(aligned16(dy) && aligned16(dx) && aligned16(dw), kWhat,
               ": dy, dx and dw must be 16-byte aligned");
  const int64_t mp = round_up(m, kTile);
  constexpr auto kMn = kernels::ScaleLayout::kMnMajor;
  // dy's token axis padded with zero rows for the transposed copy (Wgrad reduces over tokens in
  // 128-row blocks); when M is a multiple of 128 dy itself.
  const bf16* dy_rows = dy;
  if (mp > m) {
    FM_CHECK_CUDA(cudaMemcpyAsync(dy_pad_, dy, static_cast<size_t>(m * n_ * 2),
                                  cudaMemcpyDeviceToDevice, stream));
    FM_CHECK_CUDA(
        cudaMemsetAsync(dy_pad_ + m * n_, 0, static_cast<size_t>((mp - m) * n_ * 2), stream));
    dy_rows = dy_pad_;
  }
  if (dx != nullptr && mp == m && np_ == n_) {
    // One pass: dy 1x128 for Dgrad and dy^T for Wgrad (the common shapes).
    kernels::quantize_1x128_transpose(dy, m, n_, n_, false, dy8_, sdy_, dyt_, sdyt_, kMn, stream);
  } else {
    if (dx != nullptr) kernels::quantize_1x128(dy, m, n_, n_, false, dy8_, np_, sdy_, kMn, stream);
    kernels::quantize_1x128_transpose(dy_rows, mp, n_, n_, false, nullptr, nullptr, dyt_, sdyt_,
                                      kMn, stream);
  }
  if (dx != nullptr)
    kernels::fp8_gemm_nt(dy8_, sdy_, w.wt, w.swt, dx, m, k_, np_, stream, nullptr,
                         gemm_workspace(m, k_, np_));
  // x^T from the FP8 cache (the report's dequantise, transpose, requantise), then dW += dy^T x.
  if (mp == m)
    kernels::requantize_1x128_transpose(x8_, k_, sa_, kernels::ScaleLayout::kMnMajor, m, k_,
                                        nullptr, options_.pow2_activation_scales, xt_, sxt_,
                                        stream);
  else
    kernels::requantize_1x128_transpose(x8_, k_, xs_, kernels::ScaleLayout::kRowMajor, mp, k_,
                                        nullptr, options_.pow2_activation_scales, xt_, sxt_,
                                        stream);
  kernels::fp8_gemm_nt_wgrad(dyt_, sdyt_, xt_, sxt_, dw, n_, k_, mp, stream, nullptr, dw_output);
}

}  // namespace fp8moe
