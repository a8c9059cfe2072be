// The routed experts' FP8 FFN on the GPU (moe/expert_ffn_gpu.h): up GEMM (N = 2I) ->
// swiglu_quantize_1x128 (M-major scales) -> down GEMM (K = I), each a grouped FP8 GEMM of the
// same form (contiguous, gathered up GEMM + contiguous rest, masked).
// Reference: expert_ffn_reference (src/moe/expert_ffn_reference.cpp).
// Test: build/tests/test_moe_gpu --gtest_filter='ExpertFfn*'.
#include "fp8moe/moe/expert_ffn_gpu.h"

#include <algorithm>
#include <utility>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/kernels/swiglu.h"

namespace fp8moe {

namespace {

int64_t align256(int64_t bytes) {
  return (bytes + 255) / 256 * 256;
}

void check_ffn_dims(int64_t hidden, int64_t inter, const char* what) {
  FM_CHECK_ARG(hidden > 0 && hidden % 128 == 0, what, ": hidden=", hidden,
               " is not a positive multiple of 128 (the scale block)");
  FM_CHECK_ARG(inter > 0 && inter % 128 == 0, what, ": inter=", inter,
               " is not a positive multiple of 128 (the scale block)");
}

}  // namespace

// ---- ExpertWeightsDevice ----

ExpertWeightsDevice::ExpertWeightsDevice(const ExpertWeightsHost& host) {
  const int64_t G = host.groups, H = host.hidden, I = host.inter;
  FM_CHECK_ARG(G >= 1, "ExpertWeightsDevice: groups=", G);
  check_ffn_dims(H, I, "ExpertWeightsDevice");
  FM_CHECK_ARG(host.w13.size() == static_cast<size_t>(G * 2 * I * H) &&
                   host.s13.size() == static_cast<size_t>(G * (2 * I / 128) * (H / 128)) &&
                   host.w2.size() == static_cast<size_t>(G * H * I) &&
                   host.s2.size() == static_cast<size_t>(G * (H / 128) * (I / 128)),
               "ExpertWeightsDevice: host arrays (w13 ", host.w13.size(), ", s13 ", host.s13.size(),
               ", w2 ", host.w2.size(), ", s2 ", host.s2.size(), ") do not match groups=", G,
               " hidden=", H, " inter=", I);
  const int64_t b_w13 = align256(G * 2 * I * H), b_s13 = align256(host.s13.size() * 4),
                b_w2 = align256(G * H * I), b_s2 = align256(host.s2.size() * 4);
  FM_CHECK_CUDA(cudaMalloc(&buffer_, b_w13 + b_s13 + b_w2 + b_s2));
  char* p = static_cast<char*>(buffer_);
  view_.groups = G;
  view_.hidden = H;
  view_.inter = I;
  view_.w13 = reinterpret_cast<const uint8_t*>(p);
  view_.s13 = reinterpret_cast<const float*>(p + b_w13);
  view_.w2 = reinterpret_cast<const uint8_t*>(p + b_w13 + b_s13);
  view_.s2 = reinterpret_cast<const float*>(p + b_w13 + b_s13 + b_w2);
  try {
    FM_CHECK_CUDA(cudaMemcpy(p, host.w13.data(), host.w13.size(), cudaMemcpyHostToDevice));
    FM_CHECK_CUDA(
        cudaMemcpy(p + b_w13, host.s13.data(), host.s13.size() * 4, cudaMemcpyHostToDevice));
    FM_CHECK_CUDA(
        cudaMemcpy(p + b_w13 + b_s13, host.w2.data(), host.w2.size(), cudaMemcpyHostToDevice));
    FM_CHECK_CUDA(cudaMemcpy(p + b_w13 + b_s13 + b_w2, host.s2.data(), host.s2.size() * 4,
                             cudaMemcpyHostToDevice));
  } catch (...) {
    release();
    throw;
  }
}

ExpertWeightsDevice::ExpertWeightsDevice(const float* gate, const float* up, const float* down,
                                         int64_t groups, int64_t hidden, int64_t inter,
                                         QuantizeOptions options)
    : ExpertWeightsDevice(quantize_expert_weights(gate, up, down, groups, hidden, inter, options)) {
}

ExpertWeightsDevice::~ExpertWeightsDevice() {
  release();
}

ExpertWeightsDevice::ExpertWeightsDevice(ExpertWeightsDevice&& other) noexcept
    : view_(std::exchange(other.view_, {})), buffer_(std::exchange(other.buffer_, nullptr)) {}

ExpertWeightsDevice& ExpertWeightsDevice::operator=(ExpertWeightsDevice&& other) noexcept {
  if (this != &other) {
    release();
    view_ = std::exchange(other.view_, {});
    buffer_ = std::exchange(other.buffer_, nullptr);
  }
  return *this;
}

void ExpertWeightsDevice::release() {
  if (buffer_ != nullptr) cudaFree(buffer_);
  buffer_ = nullptr;
  view_ = {};
}

// ---- ExpertFfnGpu ----

ExpertFfnGpu::ExpertFfnGpu(int64_t max_rows, int64_t hidden, int64_t inter,
                           ExpertFfnOptions options)
    : max_rows_(max_rows), hidden_(hidden), inter_(inter), options_(options) {
  check_ffn_dims(hidden, inter, "ExpertFfnGpu");
  FM_CHECK_ARG(max_rows >= 0 && max_rows < (int64_t{1} << 31), "ExpertFfnGpu: max_rows=", max_rows);
  FM_CHECK_CUDA(cudaGetDevice(&device_));
  const int64_t rows = std::max<int64_t>(max_rows, 1);
  try {
    FM_CHECK_CUDA(cudaMalloc(&gate_up_, rows * 2 * inter * sizeof(bf16)));
    FM_CHECK_CUDA(cudaMalloc(&h_codes_, rows * inter));
    FM_CHECK_CUDA(cudaMalloc(&h_scales_, (inter / 128) * padded_rows(rows) * sizeof(float)));
  } catch (...) {
    cudaFree(gate_up_);
    cudaFree(h_codes_);
    cudaFree(h_scales_);
    throw;
  }
}

ExpertFfnGpu::~ExpertFfnGpu() {
  cudaFree(gate_up_);
  cudaFree(h_codes_);
  cudaFree(h_scales_);
}

// Everything a call can get wrong, checked before its first launch.
void ExpertFfnGpu::check_call(const char* what, int64_t rows, const ExpertWeightsGpu& w,
                              const void* sa, const void* layout, const bf16* y) const {
  int device = -1;
  FM_CHECK_CUDA(cudaGetDevice(&device));
  FM_CHECK_ARG(device == device_, what, ": current device ", device,
               ", the workspace is on device ", device_);
  FM_CHECK_ARG(rows >= 0 && rows <= max_rows_, what, ": ", rows,
               " rows, more than max_rows=", max_rows_, " the workspace holds");
  FM_CHECK_ARG(w.hidden == hidden_ && w.inter == inter_, what, ": weights of hidden=", w.hidden,
               " inter=", w.inter, ", the FFN was built for hidden=", hidden_, " inter=", inter_);
  FM_CHECK_ARG(w.groups >= 1 && w.groups * 2 * inter_ < (int64_t{1} << 31) &&
                   w.groups * hidden_ < (int64_t{1} << 31),
               what, ": weights of ", w.groups, " groups (hidden=", hidden_, " inter=", inter_,
               ")");
  FM_CHECK_ARG(w.w13 != nullptr && w.s13 != nullptr && w.w2 != nullptr && w.s2 != nullptr, what,
               ": null weight pointer (w13, s13, w2 or s2)");
  FM_CHECK_ARG(sa != nullptr, what, ": null x scales (sa)");
  FM_CHECK_ARG(layout != nullptr, what, ": null grouped_layout / masked_m");
  FM_CHECK_ARG(y != nullptr, what, ": null y");
}

// Steps 2 and 3 of the contiguous and gathered forms (gate_up_ holds the up GEMM's rows).
void ExpertFfnGpu::activation_and_down(const int32_t* grouped_layout, int64_t rows,
                                       const ExpertWeightsGpu& w, bf16* y, cudaStream_t stream,
                                       const float* row_scale) {
  kernels::SwigluRows which;
  which.grouped_layout = grouped_layout;
  kernels::swiglu_quantize_1x128(gate_up_, 2 * inter_, rows, inter_, row_scale, which,
                                 options_.pow2_scales, h_codes_, inter_, h_scales_,
                                 kernels::ScaleLayout::kMnMajor, stream);
  kernels::fp8_gemm_nt_grouped_contiguous(h_codes_, h_scales_, w.w2, w.s2, y, grouped_layout, rows,
                                          hidden_, inter_, w.groups, stream);
}

void ExpertFfnGpu::forward_contiguous(const uint8_t* x, const float* sa,
                                      const int32_t* grouped_layout, int64_t rows,
                                      const ExpertWeightsGpu& w, bf16* y, cudaStream_t stream,
                                      const float* row_scale) {
  constexpr const char* kWhat = "ExpertFfnGpu::forward_contiguous";
  check_call(kWhat, rows, w, sa, grouped_layout, y);
  FM_CHECK_ARG(rows % 128 == 0, kWhat, ": rows=", rows,
               " is not a multiple of 128 (each expert's rows start at a multiple of 128)");
  FM_CHECK_ARG(x != nullptr, kWhat, ": null x");
  if (rows == 0) return;
  kernels::fp8_gemm_nt_grouped_contiguous(x, sa, w.w13, w.s13, gate_up_, grouped_layout, rows,
                                          2 * inter_, hidden_, w.groups, stream);
  activation_and_down(grouped_layout, rows, w, y, stream, row_scale);
}

void ExpertFfnGpu::forward_gathered(kernels::GatheredRows x, const float* sa,
                                    const int32_t* grouped_layout, int64_t rows,
                                    const ExpertWeightsGpu& w, bf16* y, cudaStream_t stream,
                                    const float* row_scale) {
  constexpr const char* kWhat = "ExpertFfnGpu::forward_gathered";
  check_call(kWhat, rows, w, sa, grouped_layout, y);
  FM_CHECK_ARG(rows % 128 == 0, kWhat, ": rows=", rows,
               " is not a multiple of 128 (each expert's rows start at a multiple of 128)");
  FM_CHECK_ARG(x.index != nullptr, kWhat, ": null row index");
  FM_CHECK_ARG(x.base != nullptr || x.rows == 0, kWhat, ": null source rows (", x.rows, ")");
  FM_CHECK_ARG(x.stride >= hidden_ && x.stride % 16 == 0, kWhat, ": source row stride ", x.stride,
               " bytes (a multiple of 16, >= hidden=", hidden_, ")");
  if (rows == 0) return;
  kernels::fp8_gemm_nt_grouped_contiguous_gathered(x, sa, w.w13, w.s13, gate_up_, grouped_layout,
                                                   rows, 2 * inter_, hidden_, w.groups, stream);
  activation_and_down(grouped_layout, rows, w, y, stream, row_scale);
}

void ExpertFfnGpu::forward_masked(const uint8_t* x, const float* sa, const int32_t* masked_m,
                                  int64_t max_m, const ExpertWeightsGpu& w, bf16* y,
                                  cudaStream_t stream, const float* row_scale) {
  constexpr const char* kWhat = "ExpertFfnGpu::forward_masked";
  FM_CHECK_ARG(max_m >= 0 && max_m < (int64_t{1} << 31), kWhat, ": max_m=", max_m);
  const int64_t G = w.groups;
  // NOTE: the h scales are [G][I/128][pad(max_m)]: G * pad(max_m) rows of workspace.
  FM_CHECK_ARG(G >= 1 && G * padded_rows(max_m) <= max_rows_, kWhat, ": ", G,
               " groups x max_m=", max_m, " (padded to ", padded_rows(max_m),
               ") need more than max_rows=", max_rows_, " rows of workspace");
  check_call(kWhat, G * padded_rows(max_m), w, sa, masked_m, y);
  FM_CHECK_ARG(x != nullptr, kWhat, ": null x");
  if (max_m == 0) return;
  const int64_t rows = G * max_m;
  kernels::fp8_gemm_nt_grouped_masked(x, sa, w.w13, w.s13, gate_up_, masked_m, G, max_m, 2 * inter_,
                                      hidden_, stream);
  kernels::SwigluRows which;
  which.masked_m = masked_m;
  which.group_rows = max_m;
  kernels::swiglu_quantize_1x128(gate_up_, 2 * inter_, rows, inter_, row_scale, which,
                                 options_.pow2_scales, h_codes_, inter_, h_scales_,
                                 kernels::ScaleLayout::kMnMajor, stream);
  kernels::fp8_gemm_nt_grouped_masked(h_codes_, h_scales_, w.w2, w.s2, y, masked_m, G, max_m,
                                      hidden_, inter_, stream);
}

}  // namespace fp8moe
