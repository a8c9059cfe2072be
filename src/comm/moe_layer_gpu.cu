// MoeLayerGpu: one routed + shared MoE FFN layer on an EP rank (fp8moe/comm/moe_layer_gpu.h):
// dispatch -> the routed experts' FP8 FFN on the received rows (+ the shared expert on the rank's
// tokens) -> combine, + shared, y = bf16(routed + shared).
// Reference: moe_layer_reference (src/comm/moe_layer_reference.cpp).
// Test: build-*/tests/test_comm_gpu --gtest_filter='MoeLayerApi*'.
#include "fp8moe/comm/moe_layer_gpu.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <string>
#include <vector>

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

// Backward, gathered path: x_rows[row] = the H codes of the row's record (row_record >= 0;
// other rows untouched), 16 bytes a thread; vpr = H / 16 vectors a row.
__global__ void gather_record_codes_kernel(const uint8_t* records, int64_t stride,
                                           const int32_t* row_record, int64_t vpr, int64_t vectors,
                                           uint8_t* x_rows) {
  const int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v >= vectors) return;
  const int64_t row = v / vpr, c = v - row * vpr;
  const int32_t q = __ldg(row_record + row);
  if (q < 0) return;
  reinterpret_cast<uint4*>(x_rows)[v] =
      __ldg(reinterpret_cast<const uint4*>(records + static_cast<int64_t>(q) * stride) + c);
}

// Backward: row_of[row_src[row]] = row for the layout's rows (m_indices >= 0); row_src = i * K + k
// (i: the received token's compact index). row_of starts at -1.
__global__ void index_token_rows_kernel(const int32_t* m_indices, const int32_t* row_src,
                                        int64_t bound, int32_t* row_of) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= bound || __ldg(m_indices + row) < 0) return;
  row_of[__ldg(row_src + row)] = static_cast<int32_t>(row);
}

// Backward (dispatch's): one block a slot q = s * Tmax + j (j < recv_count[s]; other slots
// untouched): out[q] = bf16(sum over k ascending of float(dx[row_of[i * K + k]])), i = the
// compact index (regions in source order), the sum from +0.0f, never fused; 8 columns a thread.
__global__ void sum_token_rows_kernel(const __nv_bfloat16* dx, const int32_t* row_of,
                                      const int32_t* recv_count, int64_t Tmax, int K, int64_t H,
                                      __nv_bfloat16* out) {
  const int64_t slot = blockIdx.x;
  const int s = static_cast<int>(slot / Tmax);
  const int64_t j = slot - s * Tmax;
  if (j >= recv_count[s]) return;
  int64_t i = j;
  for (int r = 0; r < s; ++r) i += recv_count[r];
  const int32_t* rows = row_of + i * K;
  for (int64_t c = threadIdx.x; c < H / 8; c += blockDim.x) {
    float acc[8];
#pragma unroll
    for (int x = 0; x < 8; ++x) acc[x] = 0.0f;
    for (int k = 0; k < K; ++k) {
      const int32_t row = __ldg(rows + k);
      if (row < 0) continue;
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(dx + static_cast<int64_t>(row) * H) + c);
      const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const float2 f = __bfloat1622float2(p[x]);
        acc[2 * x] = __fadd_rn(acc[2 * x], f.x);
        acc[2 * x + 1] = __fadd_rn(acc[2 * x + 1], f.y);
      }
    }
    uint4 o;
    __nv_bfloat162* po = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
    for (int x = 0; x < 4; ++x) po[x] = __floats2bfloat162_rn(acc[2 * x], acc[2 * x + 1]);
    reinterpret_cast<uint4*>(out + slot * H)[c] = o;
  }
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
  FM_CHECK_ARG(!(cfg.masked_capacity > 0 && options.backward), who,
               ": MoeLayerOptions::backward runs on the grouped layout; the config is masked "
               "(masked_capacity=",
               cfg.masked_capacity, ")");
  FM_CHECK_ARG(routed.w13 != nullptr && routed.s13 != nullptr && routed.w2 != nullptr &&
                   routed.s2 != nullptr,
               who, ": null routed weight pointers");
  FM_CHECK_ARG(shared.w13 != nullptr && shared.s13 != nullptr && shared.w2 != nullptr &&
                   shared.s2 != nullptr,
               who, ": null shared weight pointers");
  if (options.backward) {
    FM_CHECK_ARG(routed.w13t != nullptr && routed.s13t != nullptr && routed.w2t != nullptr &&
                     routed.s2t != nullptr,
                 who,
                 ": MoeLayerOptions::backward needs the routed weights uploaded with_transposed");
    FM_CHECK_ARG(shared.w13t != nullptr && shared.s13t != nullptr && shared.w2t != nullptr &&
                     shared.s2t != nullptr,
                 who,
                 ": MoeLayerOptions::backward needs the shared weights uploaded with_transposed");
  }
  const DeviceRecvView view = ep.view();
  masked_ = cfg.masked_capacity > 0;
  gathered_ = view.row_record != nullptr;
  FM_CHECK_ARG(!(masked_ && gathered_), who,
               ": the masked layout needs the received rows placed in it (the low-latency "
               "kernels, or DeviceEpOptions::expand_payload on); this EP rank leaves them in its "
               "records");
  FM_CHECK_ARG(gathered_ || view.x != nullptr, who,
               ": the EP rank provides neither records nor expanded rows");
  device_ = ep.device();
  hidden_ = cfg.hidden;
  bound_ = cfg.row_bound();
  max_tokens_ = cfg.max_tokens_per_rank;
  shared_rows_ = (max_tokens_ + 127) / 128 * 128;
  if (masked_) {
    const bool fits = cfg.masked_capacity % 128 == 0;
    FM_CHECK_ARG(fits || options.masked_experts != MaskedExperts::kContiguousGemm, who,
                 ": MaskedExperts::kContiguousGemm needs masked_capacity a multiple of 128, it is ",
                 cfg.masked_capacity);
    masked_contiguous_ = options.masked_experts == MaskedExperts::kContiguousGemm;
  }
  FM_CHECK_ARG(masked_ || bound_ % 128 == 0, who, ": row bound ", bound_,
               " is not a multiple of 128");
  // The masked GEMMs' A scales: [L][H/128][pad(capacity)].
  const int64_t routed_rows =
      masked_gemms() ? std::max(bound_, cfg.experts_per_rank() * padded_rows(cfg.masked_capacity))
                     : bound_;

  DeviceGuard guard(device_);
  ExpertFfnOptions ffn;
  ffn.pow2_scales = options.pow2_scales;
  ffn.backward = options.backward;
  routed_ffn_ = std::make_unique<ExpertFfnGpu>(routed_rows, hidden_, routed.inter, ffn);
  if (shared_rows_ > 0)
    shared_ffn_ = std::make_unique<ExpertFfnGpu>(shared_rows_, hidden_, shared.inter, ffn);

  const int64_t H = hidden_, KB = H / 128, S = shared_rows_;
  const int64_t sizes[] = {KB * padded_rows(routed_rows) * 4, bound_ * H * 2, S * H,    S * KB * 4,
                           KB * padded_rows(S) * 4,           S * 4,          S * H * 2};
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
  if (options.backward) allocate_backward();
}

void MoeLayerGpu::allocate_backward() {
  const EpConfig& cfg = ep_.config();
  const int64_t H = hidden_, KB = H / 128, S = shared_rows_, slots = cfg.max_recv_tokens();
  const int64_t sizes[] = {
      bound_ * H * 2,        bound_ * H * 2, gathered_ ? bound_ * H : 0,  slots * H * 2,
      slots * cfg.top_k * 4, S * H * 2,      KB * padded_rows(bound_) * 4};
  int64_t total = 0;
  for (int64_t s : sizes) total += align256(s);
  FM_CHECK_CUDA(cudaMalloc(&bwd_buffer_, total));
  FM_CHECK_CUDA(cudaMemset(bwd_buffer_, 0, total));
  char* p = static_cast<char*>(bwd_buffer_);
  void* part[7];
  for (int i = 0; i < 7; ++i) {
    part[i] = p;
    p += align256(sizes[i]);
  }
  grad_rows_ = static_cast<bf16*>(part[0]);
  dx_rows_ = static_cast<bf16*>(part[1]);
  x_rows_ = gathered_ ? static_cast<uint8_t*>(part[2]) : nullptr;
  token_rows_ = static_cast<bf16*>(part[3]);
  row_of_ = static_cast<int32_t*>(part[4]);
  shared_dx_ = static_cast<bf16*>(part[5]);
  bwd_sa_ = static_cast<float*>(part[6]);
  FM_CHECK_CUDA(cudaMallocHost(&host_offsets_, (cfg.experts_per_rank() + 1) * sizeof(int32_t)));
  FM_CHECK_CUDA(cudaEventCreateWithFlags(&offsets_ready_, cudaEventDisableTiming));
}

MoeLayerGpu::~MoeLayerGpu() {
  int prev = 0;
  cudaGetDevice(&prev);
  cudaSetDevice(device_);
  routed_ffn_.reset();
  shared_ffn_.reset();
  cudaFree(buffer_);
  if (offsets_ready_ != nullptr) cudaEventDestroy(offsets_ready_);
  cudaFreeHost(host_offsets_);
  cudaFree(bwd_buffer_);
  cudaSetDevice(prev);
}

void MoeLayerGpu::set_weights(const ExpertWeightsGpu& routed, const ExpertWeightsGpu& shared) {
  const std::string who = "MoeLayerGpu rank " + std::to_string(ep_.rank()) + ": set_weights";
  FM_CHECK_ARG(phase_ == Phase::kIdle, who, " between a dispatch and its combine");
  const auto same = [&](const ExpertWeightsGpu& now, const ExpertWeightsGpu& was,
                        const char* what) {
    FM_CHECK_ARG(now.groups == was.groups && now.hidden == was.hidden && now.inter == was.inter,
                 who, ": ", what, " weights of ", now.groups, " groups, hidden ", now.hidden,
                 ", inter ", now.inter, " (the layer was made for ", was.groups, ", ", was.hidden,
                 ", ", was.inter, ")");
    FM_CHECK_ARG(now.w13 != nullptr && now.s13 != nullptr && now.w2 != nullptr && now.s2 != nullptr,
                 who, ": null ", what, " weight pointers");
    if (options_.backward)
      FM_CHECK_ARG(
          now.w13t != nullptr && now.s13t != nullptr && now.w2t != nullptr && now.s2t != nullptr,
          who, ": MoeLayerOptions::backward needs the ", what, " weights uploaded with_transposed");
  };
  same(routed, routed_, "routed");
  same(shared, shared_, "shared");
  routed_ = routed;
  shared_ = shared;
  bwd_phase_ = BwdPhase::kNone;
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
  bwd_phase_ = BwdPhase::kNone;
}

void MoeLayerGpu::experts(cudaStream_t stream) {
  FM_CHECK_ARG(phase_ == Phase::kDispatched, "MoeLayerGpu rank ", ep_.rank(),
               ": experts() needs dispatch() first");
  DeviceGuard guard(device_);
  const int64_t H = hidden_, KB = H / 128;
  const DeviceRecvView v = ep_.view();
  // Routed experts on the received rows: the masked layout's groups (expert_counts as masked_m),
  // or m_indices as the grouped layout (the masked layout's too, MaskedExperts::kContiguousGemm).
  if (masked_gemms()) {
    const EpConfig& c = ep_.config();
    const int64_t L = c.experts_per_rank(), cap = c.masked_capacity;
    // The GEMMs' tile choice for the rows an expert holds when every rank sends as many tokens
    // as this one, spread evenly (the capacity is the worst case: all on one expert).
    const int64_t expected = std::clamp<int64_t>(
        (c.num_ranks * tokens_ * c.top_k + c.num_experts - 1) / c.num_experts, 1, cap);
    kernels::scales_to_mn_major(v.x_scales, L, cap, KB, routed_sa_, stream);
    routed_ffn_->forward_masked(static_cast<const uint8_t*>(v.x), routed_sa_, v.expert_counts, cap,
                                routed_, expert_rows_, stream, nullptr, expected);
  } else if (gathered_) {
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
  bwd_phase_ = options_.backward ? BwdPhase::kReady : BwdPhase::kNone;
}

// ---- backward ----

void MoeLayerGpu::backward(const bf16* grad_y, bf16* grad_x, float* grad_topk_w,
                           const MoeLayerGrads& grads, cudaStream_t stream) {
  combine_backward(grad_y, grad_topk_w, stream);
  experts_backward(grads, stream);
  dispatch_backward(grad_x, stream);
}

void MoeLayerGpu::combine_backward(const bf16* grad_y, float* grad_topk_w, cudaStream_t stream) {
  const int rank = ep_.rank();
  FM_CHECK_ARG(options_.backward, "MoeLayerGpu rank ", rank,
               ": combine_backward() needs MoeLayerOptions::backward");
  FM_CHECK_ARG(bwd_phase_ == BwdPhase::kReady, "MoeLayerGpu rank ", rank,
               ": combine_backward() needs a whole forward (dispatch, experts, combine) first, "
               "and one backward per forward");
  FM_CHECK_ARG(grad_y != nullptr && grad_topk_w != nullptr, "MoeLayerGpu rank ", rank,
               ": null grad_y or grad_topk_w");
  FM_CHECK_ARG(reinterpret_cast<uintptr_t>(grad_y) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(grad_topk_w) % 16 == 0,
               "MoeLayerGpu rank ", rank, ": grad_y and grad_topk_w must be 16-byte aligned");
  DeviceGuard guard(device_);
  const DeviceRecvView v = ep_.view();
  if (options_.backward_host_counts) {
    // The layout's per-expert row offsets to the host first (experts_backward waits for them),
    // so that the wait does not include the exchange below.
    FM_CHECK_CUDA(cudaMemcpyAsync(host_offsets_, v.expert_offsets,
                                  (ep_.config().experts_per_rank() + 1) * sizeof(int32_t),
                                  cudaMemcpyDeviceToHost, stream));
    FM_CHECK_CUDA(cudaEventRecord(offsets_ready_, stream));
  }
  ep_.combine_backward_send(reinterpret_cast<const uint16_t*>(grad_y),
                            reinterpret_cast<const uint16_t*>(expert_rows_), stream);
  ep_.combine_backward_recv(reinterpret_cast<uint16_t*>(grad_rows_), grad_topk_w, stream);
  grad_y_ = grad_y;
  bwd_phase_ = BwdPhase::kCombined;
}

void MoeLayerGpu::experts_backward(const MoeLayerGrads& grads, cudaStream_t stream) {
  const int rank = ep_.rank();
  FM_CHECK_ARG(bwd_phase_ == BwdPhase::kCombined, "MoeLayerGpu rank ", rank,
               ": experts_backward() needs combine_backward() first");
  FM_CHECK_ARG(grads.routed_dw13 != nullptr && grads.routed_dw2 != nullptr &&
                   grads.shared_dw13 != nullptr && grads.shared_dw2 != nullptr,
               "MoeLayerGpu rank ", rank, ": null weight gradient (MoeLayerGrads)");
  DeviceGuard guard(device_);
  const int L = ep_.config().experts_per_rank();
  const int64_t H = hidden_, KB = H / 128;
  // The routed rows the backward covers: the received rows' count from the host
  // (backward_host_counts: the one host synchronisation of the backward), or the bound rounded
  // down to 128 (every expert's 128-aligned blocks lie below it), the experts' ranges then read
  // from the layout on the device.
  std::vector<int64_t> expert_rows;
  int64_t rows = bound_ / 128 * 128;
  if (options_.backward_host_counts) {
    FM_CHECK_CUDA(cudaEventSynchronize(offsets_ready_));
    expert_rows.resize(L);
    for (int e = 0; e < L; ++e) {
      expert_rows[e] = int64_t{host_offsets_[e + 1]} - host_offsets_[e];
      FM_CHECK_ARG(expert_rows[e] >= 0 && expert_rows[e] % 128 == 0, "MoeLayerGpu rank ", rank,
                   ": expert ", e, " has ", expert_rows[e], " grouped rows (layout corrupted?)");
    }
    rows = host_offsets_[L];
    FM_CHECK_ARG(host_offsets_[0] == 0 && rows <= bound_, "MoeLayerGpu rank ", rank,
                 ": the dispatch needs ", rows, " grouped rows, the bound is ", bound_,
                 " (overflowed)");
  }
  const DeviceRecvView v = ep_.view();
  const uint8_t* x = gathered_ ? x_rows_ : static_cast<const uint8_t*>(v.x);
  if (rows > 0) {
    // The forward's A scales re-laid for `rows` rows (M-major, [H/128][pad(rows)]): the
    // backward reads them at that stride.
    if (gathered_) {
      kernels::gather_scales_to_mn_major(reinterpret_cast<const float*>(v.records + H),
                                         v.record_stride / 4, v.row_record, rows, KB, bwd_sa_,
                                         stream);
      constexpr int kThreads = 256;
      const int64_t vectors = rows * H / 16;
      gather_record_codes_kernel<<<static_cast<unsigned>((vectors + kThreads - 1) / kThreads),
                                   kThreads, 0, stream>>>(v.records, v.record_stride, v.row_record,
                                                          H / 16, vectors, x_rows_);
      FM_CHECK_CUDA(cudaGetLastError());
    } else {
      kernels::scales_to_mn_major(v.x_scales, 1, rows, KB, bwd_sa_, stream);
    }
  }
  const kernels::WgradOutput dw_output =
      grads.overwrite ? kernels::WgradOutput::kOverwrite : kernels::WgradOutput::kAccumulate;
  if (options_.backward_host_counts)
    routed_ffn_->backward_contiguous(x, bwd_sa_, routed_ffn_->gate_up(), v.m_indices, expert_rows,
                                     rows, routed_, grad_rows_, dx_rows_, grads.routed_dw13,
                                     grads.routed_dw2, stream, nullptr, nullptr, dw_output);
  else
    routed_ffn_->backward_contiguous(x, bwd_sa_, routed_ffn_->gate_up(), v.m_indices, rows, routed_,
                                     grad_rows_, dx_rows_, grads.routed_dw13, grads.routed_dw2,
                                     stream, nullptr, nullptr, dw_output);
  // The shared expert's backward on its token rows (none: an overwritten gradient is zeros).
  const int64_t srows = (tokens_ + 127) / 128 * 128;
  const int64_t one[1] = {srows};
  shared_ffn_->backward_contiguous(shared_x_, shared_sa_, shared_ffn_->gate_up(), shared_layout_,
                                   one, srows, shared_, grad_y_, shared_dx_, grads.shared_dw13,
                                   grads.shared_dw2, stream, nullptr, nullptr, dw_output);
  bwd_phase_ = BwdPhase::kExperts;
}

void MoeLayerGpu::dispatch_backward(bf16* grad_x, cudaStream_t stream) {
  const int rank = ep_.rank();
  FM_CHECK_ARG(bwd_phase_ == BwdPhase::kExperts, "MoeLayerGpu rank ", rank,
               ": dispatch_backward() needs combine_backward() and experts_backward() first");
  FM_CHECK_ARG(grad_x != nullptr, "MoeLayerGpu rank ", rank, ": null grad_x");
  FM_CHECK_ARG(reinterpret_cast<uintptr_t>(grad_x) % 16 == 0, "MoeLayerGpu rank ", rank,
               ": grad_x must be 16-byte aligned");
  DeviceGuard guard(device_);
  const EpConfig& cfg = ep_.config();
  const int64_t slots = cfg.max_recv_tokens();
  const DeviceRecvView v = ep_.view();
  // Each received token's rows summed (k ascending) into its slot's row.
  FM_CHECK_CUDA(cudaMemsetAsync(row_of_, 0xFF, slots * cfg.top_k * sizeof(int32_t), stream));
  constexpr int kThreads = 256;
  index_token_rows_kernel<<<static_cast<unsigned>((bound_ + kThreads - 1) / kThreads), kThreads, 0,
                            stream>>>(v.m_indices, v.row_src, bound_, row_of_);
  FM_CHECK_CUDA(cudaGetLastError());
  if (slots > 0) {
    sum_token_rows_kernel<<<static_cast<unsigned>(slots), 128, 0, stream>>>(
        reinterpret_cast<const __nv_bfloat16*>(dx_rows_), row_of_, v.recv_count,
        cfg.max_tokens_per_rank, cfg.top_k, hidden_, reinterpret_cast<__nv_bfloat16*>(token_rows_));
    FM_CHECK_CUDA(cudaGetLastError());
  }
  // Dispatch's backward: the slot rows back to their tokens, summed over ranks; + the shared dx.
  ep_.combine_tokens_send(reinterpret_cast<const uint16_t*>(token_rows_), stream);
  ep_.combine_recv(reinterpret_cast<uint16_t*>(grad_x), stream);
  add_bf16(grad_x, shared_dx_, tokens_ * hidden_, grad_x, stream);
  bwd_phase_ = BwdPhase::kNone;
}

}  // namespace fp8moe::comm
