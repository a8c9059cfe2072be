// The routed experts' FP8 FFN on the GPU (moe/expert_ffn_gpu.h): up GEMM (N = 2I) ->
// swiglu_quantize_1x128 (M-major scales) -> down GEMM (K = I), each a grouped FP8 GEMM of the
// same form (contiguous, gathered up GEMM + contiguous rest, masked).
// Reference: expert_ffn_reference (src/moe/expert_ffn_reference.cpp).
// Test: build/tests/test_moe_gpu --gtest_filter='ExpertFfn*'.
#include "fp8moe/moe/expert_ffn_gpu.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/kernels/requantize.h"
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

// dst row r = src row r where grouped_layout[r] >= 0, else zeros; 8 BF16 (16 bytes) a thread.
__global__ void copy_real_rows_kernel(const bf16* src, const int32_t* grouped_layout,
                                      int64_t vectors_per_row, int64_t vectors, bf16* dst) {
  const int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v >= vectors) return;
  const bool real = __ldg(grouped_layout + v / vectors_per_row) >= 0;
  reinterpret_cast<uint4*>(dst)[v] =
      real ? __ldg(reinterpret_cast<const uint4*>(src) + v) : make_uint4(0, 0, 0, 0);
}

}  // namespace

// ---- ExpertWeightsDevice ----

ExpertWeightsDevice::ExpertWeightsDevice(const ExpertWeightsHost& host, bool with_transposed) {
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
  ExpertWeightsTransposedHost t;
  if (with_transposed) t = transpose_expert_weights(host);
  // (host source, bytes) in buffer order: w13 | s13 | w2 | s2 [| w13t | s13t | w2t | s2t].
  struct Part {
    const void* src;
    int64_t bytes;
  };
  std::vector<Part> parts = {{host.w13.data(), static_cast<int64_t>(host.w13.size())},
                             {host.s13.data(), static_cast<int64_t>(host.s13.size() * 4)},
                             {host.w2.data(), static_cast<int64_t>(host.w2.size())},
                             {host.s2.data(), static_cast<int64_t>(host.s2.size() * 4)}};
  if (with_transposed) {
    parts.push_back({t.w13t.data(), static_cast<int64_t>(t.w13t.size())});
    parts.push_back({t.s13t.data(), static_cast<int64_t>(t.s13t.size() * 4)});
    parts.push_back({t.w2t.data(), static_cast<int64_t>(t.w2t.size())});
    parts.push_back({t.s2t.data(), static_cast<int64_t>(t.s2t.size() * 4)});
  }
  int64_t total = 0;
  for (const Part& part : parts) total += align256(part.bytes);
  FM_CHECK_CUDA(cudaMalloc(&buffer_, total));
  char* p = static_cast<char*>(buffer_);
  std::vector<char*> at;
  for (const Part& part : parts) {
    at.push_back(p);
    p += align256(part.bytes);
  }
  view_.groups = G;
  view_.hidden = H;
  view_.inter = I;
  view_.w13 = reinterpret_cast<const uint8_t*>(at[0]);
  view_.s13 = reinterpret_cast<const float*>(at[1]);
  view_.w2 = reinterpret_cast<const uint8_t*>(at[2]);
  view_.s2 = reinterpret_cast<const float*>(at[3]);
  if (with_transposed) {
    view_.w13t = reinterpret_cast<const uint8_t*>(at[4]);
    view_.s13t = reinterpret_cast<const float*>(at[5]);
    view_.w2t = reinterpret_cast<const uint8_t*>(at[6]);
    view_.s2t = reinterpret_cast<const float*>(at[7]);
  }
  try {
    for (size_t i = 0; i < parts.size(); ++i)
      FM_CHECK_CUDA(cudaMemcpy(at[i], parts[i].src, parts[i].bytes, cudaMemcpyHostToDevice));
  } catch (...) {
    release();
    throw;
  }
}

ExpertWeightsDevice::ExpertWeightsDevice(const float* gate, const float* up, const float* down,
                                         int64_t groups, int64_t hidden, int64_t inter,
                                         QuantizeOptions options, bool with_transposed)
    : ExpertWeightsDevice(quantize_expert_weights(gate, up, down, groups, hidden, inter, options),
                          with_transposed) {}

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
    if (options.backward) allocate_backward();
  } catch (...) {
    cudaFree(gate_up_);
    cudaFree(h_codes_);
    cudaFree(h_scales_);
    cudaFree(bwd_);
    throw;
  }
}

void ExpertFfnGpu::allocate_backward() {
  const int64_t R = (std::max<int64_t>(max_rows_, 1) + 127) / 128 * 128, H = hidden_, I = inter_,
                I2 = 2 * inter_, pR = padded_rows(R);
  const int64_t sizes[] = {R * H * 2,
                           R * H,
                           (H / 128) * pR * 4,
                           H * R,
                           (R / 128) * padded_rows(H) * 4,
                           R * I * 2,
                           R * I2 * 2,
                           R * I2,
                           (I2 / 128) * pR * 4,
                           I2 * R,
                           (R / 128) * padded_rows(I2) * 4,
                           I * R,
                           (R / 128) * padded_rows(I) * 4,
                           H * R,
                           (R / 128) * padded_rows(H) * 4};
  int64_t total = 0;
  for (int64_t b : sizes) total += align256(b);
  FM_CHECK_CUDA(cudaMalloc(&bwd_, total));
  char* p = static_cast<char*>(bwd_);
  char* at[15];
  for (int i = 0; i < 15; ++i) {
    at[i] = p;
    p += align256(sizes[i]);
  }
  b_.dy = reinterpret_cast<bf16*>(at[0]);
  b_.dy8 = reinterpret_cast<uint8_t*>(at[1]);
  b_.dy8_s = reinterpret_cast<float*>(at[2]);
  b_.dyt = reinterpret_cast<uint8_t*>(at[3]);
  b_.dyt_s = reinterpret_cast<float*>(at[4]);
  b_.dh = reinterpret_cast<bf16*>(at[5]);
  b_.dgu = reinterpret_cast<bf16*>(at[6]);
  b_.dgu8 = reinterpret_cast<uint8_t*>(at[7]);
  b_.dgu8_s = reinterpret_cast<float*>(at[8]);
  b_.dgut = reinterpret_cast<uint8_t*>(at[9]);
  b_.dgut_s = reinterpret_cast<float*>(at[10]);
  b_.ht = reinterpret_cast<uint8_t*>(at[11]);
  b_.ht_s = reinterpret_cast<float*>(at[12]);
  b_.xt = reinterpret_cast<uint8_t*>(at[13]);
  b_.xt_s = reinterpret_cast<float*>(at[14]);
}

ExpertFfnGpu::~ExpertFfnGpu() {
  cudaFree(gate_up_);
  cudaFree(h_codes_);
  cudaFree(h_scales_);
  cudaFree(bwd_);
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
void ExpertFfnGpu::activation_and_down(const bf16* gate_up, const int32_t* grouped_layout,
                                       int64_t rows, const ExpertWeightsGpu& w, bf16* y,
                                       cudaStream_t stream, const float* row_scale) {
  kernels::SwigluRows which;
  which.grouped_layout = grouped_layout;
  kernels::swiglu_quantize_1x128(gate_up, 2 * inter_, rows, inter_, row_scale, which,
                                 options_.pow2_scales, h_codes_, inter_, h_scales_,
                                 kernels::ScaleLayout::kMnMajor, stream);
  kernels::fp8_gemm_nt_grouped_contiguous(h_codes_, h_scales_, w.w2, w.s2, y, grouped_layout, rows,
                                          hidden_, inter_, w.groups, stream);
}

void ExpertFfnGpu::forward_contiguous(const uint8_t* x, const float* sa,
                                      const int32_t* grouped_layout, int64_t rows,
                                      const ExpertWeightsGpu& w, bf16* y, cudaStream_t stream,
                                      const float* row_scale, bf16* gate_up_out) {
  constexpr const char* kWhat = "ExpertFfnGpu::forward_contiguous";
  check_call(kWhat, rows, w, sa, grouped_layout, y);
  FM_CHECK_ARG(rows % 128 == 0, kWhat, ": rows=", rows,
               " is not a multiple of 128 (each expert's rows start at a multiple of 128)");
  FM_CHECK_ARG(x != nullptr, kWhat, ": null x");
  FM_CHECK_ARG(reinterpret_cast<uintptr_t>(gate_up_out) % 16 == 0, kWhat,
               ": gate_up_out must be 16-byte aligned");
  if (rows == 0) return;
  bf16* gate_up = gate_up_out != nullptr ? gate_up_out : gate_up_;
  kernels::fp8_gemm_nt_grouped_contiguous(x, sa, w.w13, w.s13, gate_up, grouped_layout, rows,
                                          2 * inter_, hidden_, w.groups, stream);
  activation_and_down(gate_up, grouped_layout, rows, w, y, stream, row_scale);
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
  activation_and_down(gate_up_, grouped_layout, rows, w, y, stream, row_scale);
}

void ExpertFfnGpu::forward_masked(const uint8_t* x, const float* sa, const int32_t* masked_m,
                                  int64_t max_m, const ExpertWeightsGpu& w, bf16* y,
                                  cudaStream_t stream, const float* row_scale, int64_t expected_m) {
  constexpr const char* kWhat = "ExpertFfnGpu::forward_masked";
  FM_CHECK_ARG(max_m >= 0 && max_m < (int64_t{1} << 31), kWhat, ": max_m=", max_m);
  FM_CHECK_ARG(expected_m >= 0 && expected_m <= max_m, kWhat, ": expected_m=", expected_m,
               " outside [0, max_m=", max_m, "]");
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
                                      hidden_, stream, nullptr, expected_m);
  kernels::SwigluRows which;
  which.masked_m = masked_m;
  which.group_rows = max_m;
  kernels::swiglu_quantize_1x128(gate_up_, 2 * inter_, rows, inter_, row_scale, which,
                                 options_.pow2_scales, h_codes_, inter_, h_scales_,
                                 kernels::ScaleLayout::kMnMajor, stream);
  kernels::fp8_gemm_nt_grouped_masked(h_codes_, h_scales_, w.w2, w.s2, y, masked_m, G, max_m,
                                      hidden_, inter_, stream, nullptr, expected_m);
}

void ExpertFfnGpu::backward_contiguous(const uint8_t* x, const float* sa, const bf16* gate_up,
                                       const int32_t* grouped_layout,
                                       std::span<const int64_t> expert_rows, int64_t rows,
                                       const ExpertWeightsGpu& w, const bf16* dy, bf16* dx,
                                       float* dw13, float* dw2, cudaStream_t stream,
                                       const float* row_scale, float* d_row_scale,
                                       kernels::WgradOutput dw_output) {
  constexpr const char* kWhat = "ExpertFfnGpu::backward_contiguous";
  FM_CHECK_ARG(static_cast<int64_t>(expert_rows.size()) == w.groups, kWhat, ": ",
               expert_rows.size(), " expert row counts for ", w.groups, " experts");
  int64_t sum = 0;
  for (size_t g = 0; g < expert_rows.size(); ++g) {
    FM_CHECK_ARG(expert_rows[g] >= 0 && expert_rows[g] % 128 == 0, kWhat, ": expert ", g, " has ",
                 expert_rows[g], " rows, not a multiple of 128");
    sum += expert_rows[g];
  }
  FM_CHECK_ARG(sum == rows, kWhat, ": expert rows sum to ", sum, ", rows=", rows);
  backward(x, sa, gate_up, grouped_layout, expert_rows, rows, w, dy, dx, dw13, dw2, stream,
           row_scale, d_row_scale, dw_output);
}

void ExpertFfnGpu::backward_contiguous(const uint8_t* x, const float* sa, const bf16* gate_up,
                                       const int32_t* grouped_layout, int64_t rows,
                                       const ExpertWeightsGpu& w, const bf16* dy, bf16* dx,
                                       float* dw13, float* dw2, cudaStream_t stream,
                                       const float* row_scale, float* d_row_scale,
                                       kernels::WgradOutput dw_output) {
  FM_CHECK_ARG(rows % 128 == 0, "ExpertFfnGpu::backward_contiguous: rows=", rows,
               " must be a multiple of 128 with the experts' rows read from the layout");
  backward(x, sa, gate_up, grouped_layout, {}, rows, w, dy, dx, dw13, dw2, stream, row_scale,
           d_row_scale, dw_output);
}

// Both forms: expert_rows empty = the k-grouped wgrads read the experts' ranges from the layout.
void ExpertFfnGpu::backward(const uint8_t* x, const float* sa, const bf16* gate_up,
                            const int32_t* grouped_layout, std::span<const int64_t> expert_rows,
                            int64_t rows, const ExpertWeightsGpu& w, const bf16* dy, bf16* dx,
                            float* dw13, float* dw2, cudaStream_t stream, const float* row_scale,
                            float* d_row_scale, kernels::WgradOutput dw_output) {
  constexpr const char* kWhat = "ExpertFfnGpu::backward_contiguous";
  check_call(kWhat, rows, w, sa, grouped_layout, dx);
  FM_CHECK_ARG(bwd_ != nullptr, kWhat, ": no backward workspace (ExpertFfnOptions::backward)");
  FM_CHECK_ARG(w.w13t != nullptr && w.s13t != nullptr && w.w2t != nullptr && w.s2t != nullptr,
               kWhat, ": weights without transposes (ExpertWeightsDevice with_transposed)");
  FM_CHECK_ARG(w.groups <= kernels::kMaxKGroups, kWhat, ": ", w.groups, " experts (at most ",
               kernels::kMaxKGroups, " for the k-grouped wgrad)");
  FM_CHECK_ARG(
      x != nullptr && gate_up != nullptr && dy != nullptr && dw13 != nullptr && dw2 != nullptr,
      kWhat, ": null x, gate_up, dy, dw13 or dw2");
  FM_CHECK_ARG(reinterpret_cast<uintptr_t>(dy) % 16 == 0, kWhat, ": dy must be 16-byte aligned");
  const int64_t H = hidden_, I = inter_, I2 = 2 * inter_;
  if (rows == 0) {  // no rows: an overwritten gradient is zeros
    if (dw_output == kernels::WgradOutput::kOverwrite) {
      FM_CHECK_CUDA(cudaMemsetAsync(dw13, 0, static_cast<size_t>(w.groups * I2 * H) * 4, stream));
      FM_CHECK_CUDA(cudaMemsetAsync(dw2, 0, static_cast<size_t>(w.groups * H * I) * 4, stream));
    }
    return;
  }
  const bool pow2 = options_.pow2_scales;
  constexpr auto kMn = kernels::ScaleLayout::kMnMajor;
  kernels::SwigluRows which;
  which.grouped_layout = grouped_layout;

  // 1. dy with padding rows zeroed, quantised along H and (transposed) along rows.
  {
    const int64_t vectors = rows * H / 8;
    const int64_t blocks = (vectors + 255) / 256;
    FM_CHECK_ARG(blocks < (int64_t{1} << 31), kWhat, ": too many rows (", rows, ")");
    copy_real_rows_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(dy, grouped_layout,
                                                                             H / 8, vectors, b_.dy);
    FM_CHECK_LAUNCH();
  }
  kernels::quantize_1x128_transpose(b_.dy, rows, H, H, pow2, b_.dy8, b_.dy8_s, b_.dyt, b_.dyt_s,
                                    kMn, stream);
  // 2. dh = dy8 * w2t[e]^T.
  kernels::fp8_gemm_nt_grouped_contiguous(b_.dy8, b_.dy8_s, w.w2t, w.s2t, b_.dh, grouped_layout,
                                          rows, I, H, w.groups, stream);
  // 3. d_gate_up (+ d_row_scale).
  kernels::swiglu_backward(gate_up, I2, b_.dh, I, rows, I, row_scale, which, b_.dgu, I2,
                           d_row_scale, stream);
  // 4., 5. d_gate_up quantised both ways; dx = dgu8 * w13t[e]^T.
  kernels::quantize_1x128_transpose(b_.dgu, rows, I2, I2, pow2, b_.dgu8, b_.dgu8_s, b_.dgut,
                                    b_.dgut_s, kMn, stream);
  kernels::fp8_gemm_nt_grouped_contiguous(b_.dgu8, b_.dgu8_s, w.w13t, w.s13t, dx, grouped_layout,
                                          rows, H, I2, w.groups, stream);
  // 6. h recomputed, transposed; dW2[e] += dy^T h.
  kernels::swiglu_quantize_1x128(gate_up, I2, rows, I, row_scale, which, pow2, h_codes_, I,
                                 h_scales_, kMn, stream);
  kernels::requantize_1x128_transpose(h_codes_, I, h_scales_, kMn, rows, I, grouped_layout, pow2,
                                      b_.ht, b_.ht_s, stream);
  const auto kgrouped_wgrad = [&](const uint8_t* a, const float* a_s, const uint8_t* b,
                                  const float* b_s, float* dw, int64_t m, int64_t n) {
    if (expert_rows.empty())
      kernels::fp8_gemm_nt_kgrouped_wgrad(a, a_s, b, b_s, dw, m, n, w.groups, grouped_layout, rows,
                                          stream, nullptr, dw_output);
    else
      kernels::fp8_gemm_nt_kgrouped_wgrad(a, a_s, b, b_s, dw, m, n, expert_rows, stream, nullptr,
                                          dw_output);
  };
  kgrouped_wgrad(b_.dyt, b_.dyt_s, b_.ht, b_.ht_s, dw2, H, I);
  // 7. x transposed; dW13[e] += d_gate_up^T x.
  kernels::requantize_1x128_transpose(x, H, sa, kMn, rows, H, grouped_layout, pow2, b_.xt, b_.xt_s,
                                      stream);
  kgrouped_wgrad(b_.dgut, b_.dgut_s, b_.xt, b_.xt_s, dw13, I2, H);
}

}  // namespace fp8moe
