// MoeLayerGpu: one routed + shared MoE FFN layer on an EP rank (fp8moe/comm/moe_layer_gpu.h):
// dispatch -> the routed experts' FP8 FFN on the received rows (+ the shared expert on the rank's
// tokens) -> combine, + shared, y = bf16(routed + shared).
// Reference: moe_layer_reference (src/comm/moe_layer_reference.cpp).
// Test: build-*/tests/test_comm_gpu --gtest_filter='MoeLayerApi*'.
#include "fp8moe/comm/moe_layer_gpu.h"

#include <cuda_bf16.h>

#include <string>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/quantize.h"
#include "fp8moe/kernels/scale_layout.h"

namespace fp8moe::comm {

namespace {

int64_t align256(int64_t bytes) {
  return (bytes + 255) / 256 * 256;
}

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    FM_CHECK_CUDA(cudaGetDevice(&prev_));
    if (prev_ != device) FM_CHECK_CUDA(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(prev_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

// y = bf16(float(a) + float(b)), 8 BF16 (16 bytes) a thread; n8 = n / 8.
__global__ void add_bf16_x8_kernel(const uint4* a, const uint4* b, int64_t n8, uint4* y) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n8) return;
  uint4 va = a[i], vb = b[i], vy;
  const __nv_bfloat162* pa = reinterpret_cast<const __nv_bfloat162*>(&va);
  const __nv_bfloat162* pb = reinterpret_cast<const __nv_bfloat162*>(&vb);
  __nv_bfloat162* py = reinterpret_cast<__nv_bfloat162*>(&vy);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    // NOTE: the sum in FP32 (exact inputs), one rounding to BF16; never a fused or BF16 add.
    const float2 fa = __bfloat1622float2(pa[j]), fb = __bfloat1622float2(pb[j]);
    py[j] = __floats2bfloat162_rn(__fadd_rn(fa.x, fb.x), __fadd_rn(fa.y, fb.y));
  }
  y[i] = vy;
}

// The tail (n % 8 elements) one a thread.
__global__ void add_bf16_tail_kernel(const __nv_bfloat16* a, const __nv_bfloat16* b, int64_t n,
                                     __nv_bfloat16* y) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  y[i] = __float2bfloat16_rn(__fadd_rn(__bfloat162float(a[i]), __bfloat162float(b[i])));
}

}  // namespace

void add_bf16(const bf16* a, const bf16* b, int64_t n, bf16* y, cudaStream_t stream) {
  FM_CHECK_ARG(n >= 0, "add_bf16: n=", n);
  if (n == 0) return;
  FM_CHECK_ARG(a != nullptr && b != nullptr && y != nullptr, "add_bf16: null pointer");
  for (const void* p :
       {static_cast<const void*>(a), static_cast<const void*>(b), static_cast<const void*>(y)})
    FM_CHECK_ARG(reinterpret_cast<uintptr_t>(p) % 16 == 0,
                 "add_bf16: pointers must be 16-byte "
                 "aligned");
  constexpr int kThreads = 256;
  const int64_t n8 = n / 8;
  if (n8 > 0) {
    add_bf16_x8_kernel<<<static_cast<unsigned>((n8 + kThreads - 1) / kThreads), kThreads, 0,
                         stream>>>(reinterpret_cast<const uint4*>(a),
                                   reinterpret_cast<const uint4*>(b), n8,
                                   reinterpret_cast<uint4*>(y));
    FM_CHECK_CUDA(cudaGetLastError());
  }
  const int64_t tail = n - n8 * 8;
  if (tail > 0) {
    add_bf16_tail_kernel<<<1, kThreads, 0, stream>>>(
        reinterpret_cast<const __nv_bfloat16*>(a) + n8 * 8,
        reinterpret_cast<const __nv_bfloat16*>(b) + n8 * 8, tail,
        reinterpret_cast<__nv_bfloat16*>(y) + n8 * 8);
    FM_CHECK_CUDA(cudaGetLastError());
  }
}

MoeLayerGpu::MoeLayerGpu(DeviceEpRank& ep, const ExpertWeightsGpu& routed,
                         const ExpertWeightsGpu& shared, MoeLayerOptions options)
    : ep_(ep), routed_(routed), shared_(shared), options_(options) {
  const EpConfig& cfg = ep.config();
  const std::string who = "MoeLayerGpu rank " + std::to_string(ep.rank());
  validate_moe_layer(cfg, {routed.groups, routed.hidden, routed.inter},
                     {shared.groups, shared.hidden, shared.inter}, who.c_str());
  FM_CHECK_ARG(routed.w13 != nullptr && routed.s13 != nullptr && routed.w2 != nullptr &&
                   routed.s2 != nullptr,
               who, ": null routed weight pointers");
  FM_CHECK_ARG(shared.w13 != nullptr && shared.s13 != nullptr && shared.w2 != nullptr &&
                   shared.s2 != nullptr,
               who, ": null shared weight pointers");
  const DeviceRecvView view = ep.view();
  gathered_ = view.row_record != nullptr;
  FM_CHECK_ARG(gathered_ || view.x != nullptr, who,
               ": the EP rank provides neither records nor "
               "expanded rows");
  device_ = ep.device();
  hidden_ = cfg.hidden;
  bound_ = cfg.row_bound();
  max_tokens_ = cfg.max_tokens_per_rank;
  shared_rows_ = (max_tokens_ + 127) / 128 * 128;
  FM_CHECK_ARG(bound_ % 128 == 0, who, ": row bound ", bound_, " is not a multiple of 128");

  DeviceGuard guard(device_);
  ExpertFfnOptions ffn;
  ffn.pow2_scales = options.pow2_scales;
  routed_ffn_ = std::make_unique<ExpertFfnGpu>(bound_, hidden_, routed.inter, ffn);
  if (shared_rows_ > 0)
    shared_ffn_ = std::make_unique<ExpertFfnGpu>(shared_rows_, hidden_, shared.inter, ffn);

  const int64_t H = hidden_, KB = H / 128, S = shared_rows_;
  const int64_t sizes[] = {KB * padded_rows(bound_) * 4, bound_ * H * 2, S * H,    S * KB * 4,
                           KB * padded_rows(S) * 4,      S * 4,          S * H * 2};
  int64_t total = 0;
  for (int64_t s : sizes) total += align256(s);
  FM_CHECK_CUDA(cudaMalloc(&buffer_, total));
  // Zeros: the shared rows past T start finite (their scales are read by the scale transpose).
  FM_CHECK_CUDA(cudaMemset(buffer_, 0, total));
  char* p = static_cast<char*>(buffer_);
  void* part[7];
  for (int i = 0; i < 7; ++i) {
    part[i] = p;
    p += align256(sizes[i]);
  }
  routed_sa_ = static_cast<float*>(part[0]);
  expert_rows_ = static_cast<bf16*>(part[1]);
  shared_x_ = static_cast<uint8_t*>(part[2]);
  shared_scales_ = static_cast<float*>(part[3]);
  shared_sa_ = static_cast<float*>(part[4]);
  shared_layout_ = static_cast<int32_t*>(part[5]);
  shared_out_ = static_cast<bf16*>(part[6]);
}

MoeLayerGpu::~MoeLayerGpu() {
  int prev = 0;
  cudaGetDevice(&prev);
  cudaSetDevice(device_);
  routed_ffn_.reset();
  shared_ffn_.reset();
  cudaFree(buffer_);
  cudaSetDevice(prev);
}

void MoeLayerGpu::forward(const bf16* x, const int32_t* topk_idx, const float* topk_w,
                          int64_t tokens, bf16* y, cudaStream_t stream) {
  dispatch(x, topk_idx, topk_w, tokens, stream);
  experts(stream);
  combine(y, stream);
}

void MoeLayerGpu::dispatch(const bf16* x, const int32_t* topk_idx, const float* topk_w,
                           int64_t tokens, cudaStream_t stream) {
  const int rank = ep_.rank();
  FM_CHECK_ARG(tokens >= 0 && tokens <= max_tokens_, "MoeLayerGpu rank ", rank, ": tokens=", tokens,
               " outside [0, max_tokens_per_rank=", max_tokens_, "]");
  FM_CHECK_ARG(x != nullptr && topk_idx != nullptr && topk_w != nullptr, "MoeLayerGpu rank ", rank,
               ": null x, topk_idx or topk_w");
  FM_CHECK_ARG(reinterpret_cast<uintptr_t>(x) % 16 == 0, "MoeLayerGpu rank ", rank,
               ": x must be 16-byte aligned");
  DeviceGuard guard(device_);
  ep_.dispatch_send({tokens, reinterpret_cast<const uint16_t*>(x), topk_idx, topk_w}, stream);
  ep_.dispatch_recv(stream);
  x_ = x;
  tokens_ = tokens;
  phase_ = Phase::kDispatched;
}

void MoeLayerGpu::experts(cudaStream_t stream) {
  FM_CHECK_ARG(phase_ == Phase::kDispatched, "MoeLayerGpu rank ", ep_.rank(),
               ": experts() needs dispatch() first");
  DeviceGuard guard(device_);
  const int64_t H = hidden_, KB = H / 128;
  const DeviceRecvView v = ep_.view();
  // Routed experts on the received rows, m_indices as the grouped layout.
  if (gathered_) {
    // NOTE: each record holds its H/128 scales after its H codes.
    kernels::gather_scales_to_mn_major(reinterpret_cast<const float*>(v.records + H),
                                       v.record_stride / 4, v.row_record, bound_, KB, routed_sa_,
                                       stream);
    routed_ffn_->forward_gathered({v.records, v.record_rows, v.record_stride, v.row_record},
                                  routed_sa_, v.m_indices, bound_, routed_, expert_rows_, stream);
  } else {
    kernels::scales_to_mn_major(v.x_scales, 1, bound_, KB, routed_sa_, stream);
    routed_ffn_->forward_contiguous(static_cast<const uint8_t*>(v.x), routed_sa_, v.m_indices,
                                    bound_, routed_, expert_rows_, stream);
  }
  // The shared expert on the rank's tokens: one group, rows padded to 128, layout 0 on the T
  // rows and -1 on the padding (so the GEMMs skip it and a backward never reads dy there).
  if (tokens_ > 0) {
    const int64_t rows = (tokens_ + 127) / 128 * 128;
    FM_CHECK_CUDA(cudaMemsetAsync(shared_layout_, 0, tokens_ * 4, stream));
    if (rows > tokens_)
      FM_CHECK_CUDA(cudaMemsetAsync(shared_layout_ + tokens_, 0xFF, (rows - tokens_) * 4, stream));
    kernels::quantize_1x128(x_, tokens_, H, H, false, shared_x_, H, shared_scales_,
                            kernels::ScaleLayout::kRowMajor, stream);
    kernels::scales_to_mn_major(shared_scales_, 1, rows, KB, shared_sa_, stream);
    shared_ffn_->forward_contiguous(shared_x_, shared_sa_, shared_layout_, rows, shared_,
                                    shared_out_, stream);
  }
  phase_ = Phase::kExperts;
}

void MoeLayerGpu::combine(bf16* y, cudaStream_t stream) {
  const int rank = ep_.rank();
  FM_CHECK_ARG(phase_ == Phase::kExperts, "MoeLayerGpu rank ", rank,
               ": combine() needs dispatch() and experts() first");
  FM_CHECK_ARG(y != nullptr, "MoeLayerGpu rank ", rank, ": null y");
  FM_CHECK_ARG(reinterpret_cast<uintptr_t>(y) % 16 == 0, "MoeLayerGpu rank ", rank,
               ": y must be 16-byte aligned");
  DeviceGuard guard(device_);
  ep_.combine_send(reinterpret_cast<const uint16_t*>(expert_rows_), stream);
  ep_.combine_recv(reinterpret_cast<uint16_t*>(y), stream);
  add_bf16(y, shared_out_, tokens_ * hidden_, y, stream);
  phase_ = Phase::kIdle;
}

}  // namespace fp8moe::comm
