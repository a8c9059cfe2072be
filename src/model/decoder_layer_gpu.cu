// DecoderLayerGpu (fp8moe/model/decoder_layer_gpu.h): one V3 decoder layer on the GPU, composed
// from MlaBlockGpu, the RMSNorm kernels, ExpertFfnGpu (the dense FFN: one group, as MoeLayerGpu's
// shared expert), the router (route_cuda / route_backward_cuda) and MoeLayerGpu over a one-rank EP
// group; plus this file's small kernels: the router's FP32 logits and their two backward
// products, the sequence-wise balance loss (forward and gradient), the expert load count, and the
// expert weights' gradient scatter. docs/model/README.md, "DecoderLayerGpu (s21-dl)".
#include "fp8moe/model/decoder_layer_gpu.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

#include "fp8moe/comm/device_ep.h"
#include "fp8moe/comm/moe_layer_gpu.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/kernels/quantize.h"
#include "fp8moe/kernels/rmsnorm.h"
#include "fp8moe/kernels/scale_layout.h"
#include "fp8moe/model/linear_gpu.h"
#include "fp8moe/model/mla_block_gpu.h"
#include "fp8moe/moe/expert_ffn_gpu.h"
#include "fp8moe/moe/expert_placement_cuda.h"
#include "fp8moe/moe/router_backward_cuda.h"
#include "fp8moe/moe/router_cuda.h"

namespace fp8moe {
namespace {

constexpr int64_t kTile = 128;

__host__ __device__ int64_t round_up(int64_t v, int64_t to) {
  return (v + to - 1) / to * to;
}
int64_t slot(int64_t bytes) {
  return round_up(std::max<int64_t>(bytes, 1), 256);
}

__device__ __forceinline__ float widen(bf16 v) {
  return __uint_as_float(static_cast<uint32_t>(v.bits) << 16);
}
__device__ __forceinline__ bf16 round_bf16(float v) {
  return bf16{__bfloat16_as_ushort(__float2bfloat16_rn(v))};
}

// ---- Router logits: logits[t, e] = sum_h float(f[t, h]) * gate[e, h], FP32 ----
// Block: 8 warps; tokens [t0, t0 + 8), experts [e0, e0 + 32), warp w owns experts e0 + 4w ..
// e0 + 4w + 3. Lane l sums h = l, l + 32, ... in order (FMA), then a butterfly over the lanes.
constexpr int kLogitTokens = 8, kLogitExpertsPerWarp = 4, kLogitWarps = 8;
__global__ void router_logits_kernel(const bf16* f, const float* gate, int64_t tokens,
                                     int64_t experts, int64_t hidden, float* logits) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kLogitTokens;
  const int64_t e0 = static_cast<int64_t>(blockIdx.y) * kLogitWarps * kLogitExpertsPerWarp +
                     warp * kLogitExpertsPerWarp;
  float acc[kLogitExpertsPerWarp][kLogitTokens] = {};
  for (int64_t h = lane; h < hidden; h += 32) {
    float x[kLogitTokens], g[kLogitExpertsPerWarp];
#pragma unroll
    for (int i = 0; i < kLogitTokens; ++i)
      x[i] = t0 + i < tokens ? widen(f[(t0 + i) * hidden + h]) : 0.0f;
#pragma unroll
    for (int j = 0; j < kLogitExpertsPerWarp; ++j)
      g[j] = e0 + j < experts ? gate[(e0 + j) * hidden + h] : 0.0f;
#pragma unroll
    for (int j = 0; j < kLogitExpertsPerWarp; ++j)
#pragma unroll
      for (int i = 0; i < kLogitTokens; ++i) acc[j][i] = fmaf(x[i], g[j], acc[j][i]);
  }
#pragma unroll
  for (int j = 0; j < kLogitExpertsPerWarp; ++j)
#pragma unroll
    for (int i = 0; i < kLogitTokens; ++i) {
      float v = acc[j][i];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0 && t0 + i < tokens && e0 + j < experts) logits[(t0 + i) * experts + e0 + j] = v;
    }
}

// ---- Router backward products ----
// df[t, h] = bf16(float(gx[t, h]) + sum_e dl[t, e] * gate[e, h]) (the sum FP32 from 0 in e order,
// FMA). Block: 256 threads over h, 8 tokens; dl rows staged in shared memory.
constexpr int kDfTokens = 8, kDfThreads = 256;
__global__ void router_dx_kernel(const float* dl, const float* gate, const bf16* gx, int64_t tokens,
                                 int64_t experts, int64_t hidden, bf16* df) {
  extern __shared__ float sdl[];  // [kDfTokens][experts]
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * kDfTokens;
  for (int64_t i = threadIdx.x; i < kDfTokens * experts; i += blockDim.x) {
    const int64_t t = t0 + i / experts;
    sdl[i] = t < tokens ? dl[t * experts + i % experts] : 0.0f;
  }
  __syncthreads();
  const int64_t h = static_cast<int64_t>(blockIdx.x) * kDfThreads + threadIdx.x;
  if (h >= hidden) return;
  float acc[kDfTokens] = {};
  for (int64_t e = 0; e < experts; ++e) {
    const float g = gate[e * hidden + h];
#pragma unroll
    for (int i = 0; i < kDfTokens; ++i) acc[i] = fmaf(sdl[i * experts + e], g, acc[i]);
  }
#pragma unroll
  for (int i = 0; i < kDfTokens; ++i) {
    const int64_t t = t0 + i;
    if (t < tokens) df[t * hidden + h] = round_bf16(__fadd_rn(widen(gx[t * hidden + h]), acc[i]));
  }
}

// dgate[e, h] (+)= sum_t dl[t, e] * float(f[t, h]) (FP32 from 0 in t order, FMA). Block: 256
// threads over h, 8 experts; dl staged 64 tokens at a time.
constexpr int kDgExperts = 8, kDgThreads = 256, kDgChunk = 64;
__global__ void router_dgate_kernel(const float* dl, const bf16* f, int64_t tokens, int64_t experts,
                                    int64_t hidden, float* dgate, bool accumulate) {
  __shared__ float sdl[kDgChunk][kDgExperts];
  const int64_t e0 = static_cast<int64_t>(blockIdx.y) * kDgExperts;
  const int64_t h = static_cast<int64_t>(blockIdx.x) * kDgThreads + threadIdx.x;
  float acc[kDgExperts] = {};
  for (int64_t c = 0; c < tokens; c += kDgChunk) {
    __syncthreads();
    for (int i = threadIdx.x; i < kDgChunk * kDgExperts; i += blockDim.x) {
      const int64_t t = c + i / kDgExperts, e = e0 + i % kDgExperts;
      sdl[i / kDgExperts][i % kDgExperts] = t < tokens && e < experts ? dl[t * experts + e] : 0.0f;
    }
    __syncthreads();
    if (h < hidden) {
      const int64_t n = min(static_cast<int64_t>(kDgChunk), tokens - c);
      for (int64_t i = 0; i < n; ++i) {
        const float x = widen(f[(c + i) * hidden + h]);
#pragma unroll
        for (int j = 0; j < kDgExperts; ++j) acc[j] = fmaf(sdl[i][j], x, acc[j]);
      }
    }
  }
  if (h >= hidden) return;
#pragma unroll
  for (int j = 0; j < kDgExperts; ++j) {
    const int64_t e = e0 + j;
    if (e >= experts) continue;
    float* d = dgate + e * hidden + h;
    *d = accumulate ? __fadd_rn(*d, acc[j]) : acc[j];
  }
}

// ---- The sequence-wise balance loss (moe/balance.h sequence_balance_loss, operation for
// operation in double with round-to-nearest intrinsics, no contraction) ----
// One block per sequence q: S_t = sum_e s[t, e] (e order) for its tokens, counts f_e, P_e = sum_t
// s[t, e] / S_t (t order); f_e *= E / (K * T); P_e /= T; contrib[q] = (alpha * sum_e f_e P_e (e
// order)) / num_seq. fscaled [num_seq, E] and S [tokens] kept for the backward.
__global__ void balance_forward_kernel(const float* scores, const int32_t* topk_idx, int64_t seq,
                                       int experts, int top_k, double alpha, int64_t num_seq,
                                       double* s_sum, double* fscaled, double* contrib) {
  extern __shared__ unsigned char smem[];
  int* cnt = reinterpret_cast<int*>(smem);                                    // [E]
  double* prod = reinterpret_cast<double*>(smem + round_up(experts * 4, 8));  // [E]
  const int64_t q = blockIdx.x, t0 = q * seq;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) cnt[e] = 0;
  __syncthreads();
  for (int64_t t = t0 + threadIdx.x; t < t0 + seq; t += blockDim.x) {
    const float* s = scores + t * experts;
    double S = 0.0;
    for (int e = 0; e < experts; ++e) S = __dadd_rn(S, static_cast<double>(s[e]));
    s_sum[t] = S;
    for (int k = 0; k < top_k; ++k) {
      const int32_t id = topk_idx[t * top_k + k];
      if (id >= 0 && id < experts) atomicAdd(&cnt[id], 1);
    }
  }
  __syncthreads();
  const double T = static_cast<double>(seq);
  const double ratio = __ddiv_rn(static_cast<double>(experts), __dmul_rn(top_k, T));
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    double P = 0.0;
    for (int64_t t = t0; t < t0 + seq; ++t)
      P = __dadd_rn(P, __ddiv_rn(static_cast<double>(scores[t * experts + e]), s_sum[t]));
    const double fe = __dmul_rn(static_cast<double>(cnt[e]), ratio);
    P = __ddiv_rn(P, T);
    fscaled[q * experts + e] = fe;
    prod[e] = __dmul_rn(fe, P);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double l = 0.0;
    for (int e = 0; e < experts; ++e) l = __dadd_rn(l, prod[e]);
    contrib[q] = __ddiv_rn(__dmul_rn(alpha, l), static_cast<double>(num_seq));
  }
}

// *loss += sum_q contrib[q] (from 0.0, q order): the CPU's `loss` then the caller's add.
__global__ void balance_sum_kernel(const double* contrib, int64_t num_seq, double* loss) {
  double l = 0.0;
  for (int64_t q = 0; q < num_seq; ++q) l = __dadd_rn(l, contrib[q]);
  *loss = __dadd_rn(*loss, l);
}

// dlogits[t, e] += float(g * s * (1 - s)), g = c * (f_e / S - fs / (S * S)), fs = sum_e f_e s_e
// (e order), c = alpha / (T * num_seq). One block per token.
__global__ void balance_backward_kernel(const float* scores, const double* s_sum,
                                        const double* fscaled, int64_t seq, int experts,
                                        double alpha, int64_t num_seq, float* dlogits) {
  __shared__ double sfs;
  const int64_t t = blockIdx.x, q = t / seq;
  const float* s = scores + t * experts;
  const double* fq = fscaled + q * experts;
  if (threadIdx.x == 0) {
    double fs = 0.0;
    for (int e = 0; e < experts; ++e)
      fs = __dadd_rn(fs, __dmul_rn(fq[e], static_cast<double>(s[e])));
    sfs = fs;
  }
  __syncthreads();
  const double S = s_sum[t], fs = sfs;
  const double c =
      __ddiv_rn(alpha, __dmul_rn(static_cast<double>(seq), static_cast<double>(num_seq)));
  const double b = __ddiv_rn(fs, __dmul_rn(S, S));
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    const double se = static_cast<double>(s[e]);
    const double g = __dmul_rn(c, __dsub_rn(__ddiv_rn(fq[e], S), b));
    const double v = __dmul_rn(__dmul_rn(g, se), __dsub_rn(1.0, se));
    float* d = dlogits + t * experts + e;
    *d = __fadd_rn(*d, static_cast<float>(v));
  }
}

// load[e] += 1 per slot routed to e (ids outside [0, E) skipped). load zeroed before; total
// (the serving statistics EPLB reads) never zeroed here.
__global__ void expert_load_kernel(const int32_t* topk_idx, int64_t slots, int experts,
                                   int32_t* load, unsigned long long* total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < slots;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t id = topk_idx[i];
    if (id >= 0 && id < experts) {
      atomicAdd(&load[id], 1);
      atomicAdd(&total[id], 1ull);
    }
  }
}

// ---- Gradient scatter: dst[i] (+)= src[i] per segment ----
struct Segment {
  const float* src;
  float* dst;
  int64_t n;
};
__global__ void scatter_kernel(const Segment* segments, bool accumulate) {
  const Segment sg = segments[blockIdx.y];
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < sg.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    sg.dst[i] = accumulate ? __fadd_rn(sg.dst[i], sg.src[i]) : sg.src[i];
}

void check_launch_dims(int64_t blocks, const char* what) {
  FM_CHECK_ARG(blocks > 0 && blocks <= 65535, "DecoderLayerGpu: ", what, " needs ", blocks,
               " blocks in grid y (at most 65535)");
}

}  // namespace

// ---- Expert weights refreshed from per-expert FP32 masters on the device ----
// The layouts of ExpertWeightsGpu (w13 rows [0, I) the gate, [I, 2I) the up projection; 128x128
// blocks never straddle the two since I % 128 == 0), each expert quantised as the CPU's
// quantize_expert_weights (kernels::quantize_128x128, bit for bit fp8moe::quantize), transposes
// by transpose_fp8_weight_blocks (LinearWeightsDevice's kernel).
class ExpertWeightsFromMasters {
 public:
  ExpertWeightsFromMasters(int64_t groups, int64_t hidden, int64_t inter)
      : g_(groups), h_(hidden), i_(inter) {
    const int64_t w13 = 2 * inter * hidden, s13 = (2 * inter / kTile) * (hidden / kTile);
    const int64_t w2 = hidden * inter, s2 = (hidden / kTile) * (inter / kTile);
    const int64_t sizes[8] = {w13 * g_, s13 * g_ * 4, w2 * g_, s2 * g_ * 4,
                              w13 * g_, s13 * g_ * 4, w2 * g_, s2 * g_ * 4};
    int64_t bytes = 0;
    for (int64_t b : sizes) bytes += slot(b);
    FM_CHECK_CUDA(cudaMalloc(&buffer_, static_cast<size_t>(bytes)));
    FM_CHECK_CUDA(cudaMemset(buffer_, 0, static_cast<size_t>(bytes)));
    char* p = static_cast<char*>(buffer_);
    void* part[8];
    for (int k = 0; k < 8; ++k) {
      part[k] = p;
      p += slot(sizes[k]);
    }
    v_.groups = g_;
    v_.hidden = h_;
    v_.inter = i_;
    for (int k = 0; k < 4; ++k) {
      w_[k] = static_cast<uint8_t*>(part[2 * k]);
      s_[k] = static_cast<float*>(part[2 * k + 1]);
    }
    v_.w13 = w_[0];
    v_.s13 = s_[0];
    v_.w2 = w_[1];
    v_.s2 = s_[1];
    v_.w13t = w_[2];
    v_.s13t = s_[2];
    v_.w2t = w_[3];
    v_.s2t = s_[3];
  }
  ~ExpertWeightsFromMasters() { cudaFree(buffer_); }
  ExpertWeightsFromMasters(const ExpertWeightsFromMasters&) = delete;
  ExpertWeightsFromMasters& operator=(const ExpertWeightsFromMasters&) = delete;

  // gate[e], up[e] FP32 [I, H], down[e] FP32 [H, I] on the device. One launch for every expert
  // (kernels::WeightQuantizer: gate and up fill the halves of w13 and of its transpose); the job
  // table is made on the first call with these masters (synchronously: not inside a graph).
  void refresh(const std::vector<const float*>& gate, const std::vector<const float*>& up,
               const std::vector<const float*>& down, cudaStream_t stream) {
    FM_CHECK_ARG(static_cast<int64_t>(gate.size()) == g_ && static_cast<int64_t>(up.size()) == g_ &&
                     static_cast<int64_t>(down.size()) == g_,
                 "ExpertWeightsFromMasters::refresh: ", g_, " experts, masters for ", gate.size(),
                 " / ", up.size(), " / ", down.size());
    std::vector<const float*> masters = gate;
    masters.insert(masters.end(), up.begin(), up.end());
    masters.insert(masters.end(), down.begin(), down.end());
    if (masters != masters_) {
      const int64_t H = h_, I = i_, w13 = 2 * I * H, s13 = (2 * I / kTile) * (H / kTile);
      const int64_t w2 = H * I, s2 = (H / kTile) * (I / kTile), half = (I / kTile) * (H / kTile);
      std::vector<kernels::WeightQuantJob> jobs;
      for (int64_t e = 0; e < g_; ++e) {
        // w13 [2I, H]: gate rows [0, I), up rows [I, 2I); its transpose [H, 2I] likewise by
        // columns.
        jobs.push_back({gate[e], I, H, w_[0] + e * w13, s_[0] + e * s13, w_[2] + e * w13, 2 * I,
                        s_[2] + e * s13, 2 * I / kTile});
        jobs.push_back({up[e], I, H, w_[0] + e * w13 + I * H, s_[0] + e * s13 + half,
                        w_[2] + e * w13 + I, 2 * I, s_[2] + e * s13 + I / kTile, 2 * I / kTile});
        jobs.push_back({down[e], H, I, w_[1] + e * w2, s_[1] + e * s2, w_[3] + e * w2, H,
                        s_[3] + e * s2, H / kTile});
      }
      quantizer_ = std::make_unique<kernels::WeightQuantizer>(std::move(jobs));
      masters_ = std::move(masters);
    }
    quantizer_->run(stream);
  }
  const ExpertWeightsGpu& view() const { return v_; }

 private:
  int64_t g_ = 0, h_ = 0, i_ = 0;
  void* buffer_ = nullptr;
  uint8_t* w_[4] = {};  // w13, w2, w13t, w2t
  float* s_[4] = {};    // s13, s2, s13t, s2t
  ExpertWeightsGpu v_;
  std::unique_ptr<kernels::WeightQuantizer> quantizer_;
  std::vector<const float*> masters_;  // the quantizer's: gate, then up, then down
};

// One FFN's parameters: per group (expert) the gate / up / down masters and gradients.
struct FfnParams {
  std::vector<const float*> gate, up, down;
  std::vector<float*> dgate, dup, ddown;
};

struct DecoderLayerGpu::Impl {
  ModelConfig config;
  int64_t batch = 0, seq = 0, T = 0, R = 0, H = 0, E = 0, K = 0, num_seq = 0;
  double alpha = 0.0;  // the balance loss's weight as the CPU's float alpha (0: off)
  RouterConfig rc;
  int device = 0;

  // Parameters.
  const float *ln1 = nullptr, *ln2 = nullptr;
  float *dln1 = nullptr, *dln2 = nullptr;
  MlaBlockMastersGpu mla_masters;
  MlaBlockGradsGpu mla_grads;
  const float *gate = nullptr, *bias = nullptr;  // MoE router
  float* dgate = nullptr;
  FfnParams dense, routed, shared;

  std::unique_ptr<MlaBlockGpu> mla;
  // Dense FFN.
  std::unique_ptr<ExpertWeightsFromMasters> dense_w;
  std::unique_ptr<ExpertFfnGpu> dense_ffn;
  bool dense_direct = false;  // gate/up grads adjacent: dW13 written straight into them
  // MoE.
  std::unique_ptr<ExpertWeightsFromMasters> routed_w, shared_w;
  std::unique_ptr<comm::DeviceEpGroup> ep;      // one rank: the layer's own group
  std::unique_ptr<comm::DeviceEpRank> ep_rank;  // several ranks: the maker's endpoint
  // The physical slots this rank holds: [first_expert, first_expert + local_experts); without
  // redundant experts slot = logical expert.
  int64_t local_experts = 0, first_expert = 0;
  std::unique_ptr<comm::MoeLayerGpu> moe;
  // Decoding over the low-latency kernels (use_low_latency_moe): not owned, maybe shared with
  // the model's other MoE layers (its weights set to this layer's before each forward).
  comm::MoeLayerGpu* moe_ll = nullptr;
  std::unique_ptr<ExpertPlacementGpu> placement;  // redundant experts (serving); null: none

  // Device memory: one allocation.
  void* buffer = nullptr;
  bf16 *a = nullptr, *attn = nullptr, *h1 = nullptr, *f = nullptr, *mlp_out = nullptr;
  float *rstd1 = nullptr, *rstd2 = nullptr, *norm_ws = nullptr;
  bf16 *df = nullptr, *dh1 = nullptr, *da = nullptr, *gx = nullptr;
  // Dense: x codes [R, H], row-major scales [R, H/128], M-major [H/128][pad4(R)], layout [R].
  uint8_t* x8 = nullptr;
  float *xs = nullptr, *sa = nullptr;
  int32_t* layout = nullptr;
  // MoE.
  float *logits = nullptr, *scores = nullptr, *topk_w = nullptr, *gtopk = nullptr,
        *dlogits = nullptr;
  int32_t *topk_idx = nullptr, *load = nullptr;
  int32_t* topk_phys = nullptr;              // with a placement: the slots [T, K] of topk_idx
  unsigned long long* load_total = nullptr;  // [E], summed over every forward since reset
  const int32_t* pos = nullptr;              // the running forward's positions
  double *s_sum = nullptr, *fscaled = nullptr, *contrib = nullptr;
  // Gradient scratch (FP32, overwritten) and the scatter's segments.
  float *scratch13 = nullptr, *scratch2 = nullptr, *sscratch13 = nullptr, *sscratch2 = nullptr;
  Segment* segments = nullptr;
  int64_t n_segments = 0;

  const bf16* h = nullptr;  // the last forward's input
  bool forwarded = false;

  Impl() = default;
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
  ~Impl() {
    moe.reset();  // before its EP endpoint
    ep.reset();
    ep_rank.reset();
    cudaFree(buffer);
  }
};

namespace {

const float* value_of(ParameterGpu& p, int64_t numel) {
  FM_CHECK_ARG(p.value != nullptr, "DecoderLayerGpu: parameter ", p.name, " has no value");
  FM_CHECK_ARG(p.numel == numel, "DecoderLayerGpu: parameter ", p.name, " has ", p.numel,
               " elements, the config says ", numel);
  return p.value;
}
float* grad_of(ParameterGpu& p) {
  FM_CHECK_ARG(p.grad != nullptr, "DecoderLayerGpu: parameter ", p.name, " has no gradient");
  return p.grad;
}

void check_dims(const ModelConfig& c, bool is_moe, int64_t batch, int64_t seq) {
  auto mult128 = [](int64_t v, const char* name) {
    FM_CHECK_ARG(v > 0 && v % 128 == 0, "DecoderLayerGpu: ", name, "=", v,
                 " must be a positive multiple of 128");
  };
  FM_CHECK_ARG(batch > 0 && seq > 0, "DecoderLayerGpu: batch=", batch, " seq=", seq,
               " must be positive");
  mult128(c.hidden_size, "hidden_size");
  if (c.q_lora_rank > 0) mult128(c.q_lora_rank, "q_lora_rank");
  mult128(c.kv_lora_rank, "kv_lora_rank");
  FM_CHECK_ARG(c.qk_nope_head_dim == 128, "DecoderLayerGpu: qk_nope_head_dim=", c.qk_nope_head_dim,
               " (the attention kernel takes 128)");
  FM_CHECK_ARG(c.qk_rope_head_dim == 64, "DecoderLayerGpu: qk_rope_head_dim=", c.qk_rope_head_dim,
               " (the attention kernel takes 64)");
  FM_CHECK_ARG(c.v_head_dim == 128, "DecoderLayerGpu: v_head_dim=", c.v_head_dim,
               " (the attention kernel takes 128)");
  if (!is_moe) {
    mult128(c.intermediate_size, "intermediate_size");
    return;
  }
  mult128(c.moe_intermediate_size, "moe_intermediate_size");
  FM_CHECK_ARG(c.n_shared_experts >= 1, "DecoderLayerGpu: n_shared_experts=", c.n_shared_experts,
               " (MoeLayerGpu runs one shared expert group; 0 is not supported)");
  FM_CHECK_ARG(c.n_routed_experts >= 1 && c.n_routed_experts <= kRouterCudaMaxExperts,
               "DecoderLayerGpu: n_routed_experts=", c.n_routed_experts, " (1..",
               kRouterCudaMaxExperts, ")");
  FM_CHECK_ARG(c.num_experts_per_tok >= 1 && c.num_experts_per_tok <= kRouterCudaMaxTopK,
               "DecoderLayerGpu: num_experts_per_tok=", c.num_experts_per_tok, " (1..",
               kRouterCudaMaxTopK, ")");
  FM_CHECK_ARG(c.n_group <= kRouterCudaMaxGroups, "DecoderLayerGpu: n_group=", c.n_group,
               " (at most ", kRouterCudaMaxGroups, ")");
  validate_router_config(c.router_config());
}

}  // namespace

DecoderLayerGpu::DecoderLayerGpu(const ModelConfig& config, const std::string& prefix, bool is_moe,
                                 int64_t batch, int64_t seq, const RopeTableView& rope,
                                 const ParameterLookup& params, int ep_ranks,
                                 const EpRankMaker& make_ep, float* grad_scratch,
                                 const ExpertPlacement* placement)
    : impl_(std::make_unique<Impl>()), is_moe_(is_moe) {
  check_dims(config, is_moe, batch, seq);
  FM_CHECK_ARG(ep_ranks >= 1, "DecoderLayerGpu: ep_ranks=", ep_ranks, " must be positive");
  FM_CHECK_ARG(ep_ranks == 1 || !is_moe || make_ep, "DecoderLayerGpu: ", ep_ranks,
               " EP ranks need an endpoint maker");
  FM_CHECK_ARG(!is_moe || config.n_routed_experts % ep_ranks == 0,
               "DecoderLayerGpu: ", config.n_routed_experts,
               " routed experts do not split evenly over ", ep_ranks, " EP ranks");
  Impl& m = *impl_;
  m.config = config;
  m.batch = batch;
  m.seq = seq;
  m.T = batch * seq;
  m.R = round_up(m.T, kTile);
  m.H = config.hidden_size;
  m.num_seq = batch;
  FM_CHECK_CUDA(cudaGetDevice(&m.device));
  const int64_t T = m.T, R = m.R, H = m.H, KB = H / kTile;

  // Parameters by the CPU model's names.
  auto P = [&](const std::string& suffix) -> ParameterGpu& { return params(prefix + suffix); };
  m.ln1 = value_of(P(".input_layernorm.weight"), H);
  m.dln1 = grad_of(P(".input_layernorm.weight"));
  m.ln2 = value_of(P(".post_attention_layernorm.weight"), H);
  m.dln2 = grad_of(P(".post_attention_layernorm.weight"));
  {
    const MlaBlockDims d = MlaBlockDims::from(config);
    const int64_t heads = d.heads, qr = d.q_lora_rank, kvr = d.kv_lora_rank;
    const std::string a = ".self_attn.";
    auto mw = [&](const char* n, int64_t numel, const float** v, float** g) {
      ParameterGpu& p = P(a + n);
      *v = value_of(p, numel);
      *g = grad_of(p);
    };
    if (qr > 0) {
      mw("q_a_proj.weight", qr * H, &m.mla_masters.q_a, &m.mla_grads.q_a);
      mw("q_a_layernorm.weight", qr, &m.mla_masters.q_a_norm, &m.mla_grads.q_a_norm);
      mw("q_b_proj.weight", heads * d.qd() * qr, &m.mla_masters.q_b, &m.mla_grads.q_b);
    } else {
      mw("q_proj.weight", heads * d.qd() * H, &m.mla_masters.q_proj, &m.mla_grads.q_proj);
    }
    mw("kv_a_proj_with_mqa.weight", (kvr + d.dr) * H, &m.mla_masters.kv_a, &m.mla_grads.kv_a);
    mw("kv_a_layernorm.weight", kvr, &m.mla_masters.kv_a_norm, &m.mla_grads.kv_a_norm);
    mw("kv_b_proj.weight", heads * d.kvd() * kvr, &m.mla_masters.kv_b, &m.mla_grads.kv_b);
    mw("o_proj.weight", H * heads * d.dv, &m.mla_masters.o, &m.mla_grads.o);
    m.mla = std::make_unique<MlaBlockGpu>(d, T, rope);
  }
  auto ffn_params = [&](const std::string& pre, int64_t inter, FfnParams& fp) {
    ParameterGpu& g = P(pre + ".gate_proj.weight");
    ParameterGpu& u = P(pre + ".up_proj.weight");
    ParameterGpu& d = P(pre + ".down_proj.weight");
    fp.gate.push_back(value_of(g, inter * H));
    fp.up.push_back(value_of(u, inter * H));
    fp.down.push_back(value_of(d, H * inter));
    fp.dgate.push_back(grad_of(g));
    fp.dup.push_back(grad_of(u));
    fp.ddown.push_back(grad_of(d));
  };

  // Activations.
  const int64_t b2 = 2, b4 = 4, b8 = 8;
  const int64_t norm_ws = kernels::rmsnorm_plan(T, H).workspace_floats;
  std::vector<std::pair<void**, int64_t>> slots = {
      {reinterpret_cast<void**>(&m.a), T * H * b2},
      {reinterpret_cast<void**>(&m.attn), T * H * b2},
      {reinterpret_cast<void**>(&m.h1), T * H * b2},
      {reinterpret_cast<void**>(&m.f), T * H * b2},
      {reinterpret_cast<void**>(&m.mlp_out), R * H * b2},
      {reinterpret_cast<void**>(&m.rstd1), T * b4},
      {reinterpret_cast<void**>(&m.rstd2), T * b4},
      {reinterpret_cast<void**>(&m.norm_ws), norm_ws * b4},
      {reinterpret_cast<void**>(&m.df), R * H * b2},
      {reinterpret_cast<void**>(&m.dh1), T * H * b2},
      {reinterpret_cast<void**>(&m.da), T * H * b2},
  };
  const ModelConfig& c = config;
  if (!is_moe) {
    const int64_t I = c.intermediate_size;
    ffn_params(".mlp", I, m.dense);
    m.dense_direct = m.dense.dup[0] == m.dense.dgate[0] + I * H;
    slots.push_back({reinterpret_cast<void**>(&m.x8), R * H});
    slots.push_back({reinterpret_cast<void**>(&m.xs), R * KB * b4});
    slots.push_back({reinterpret_cast<void**>(&m.sa), KB * round_up(R, 4) * b4});
    slots.push_back({reinterpret_cast<void**>(&m.layout), R * b4});
    if (!m.dense_direct) {
      slots.push_back({reinterpret_cast<void**>(&m.scratch13), 2 * I * H * b4});
      slots.push_back({reinterpret_cast<void**>(&m.scratch2), H * I * b4});
    }
  } else {
    m.rc = c.router_config();
    m.E = c.n_routed_experts;
    m.K = c.num_experts_per_tok;
    m.alpha = c.seq_aux ? static_cast<double>(static_cast<float>(c.aux_loss_alpha)) : 0.0;
    const int64_t E = m.E, K = m.K, I = c.moe_intermediate_size;
    const int64_t Is = I * c.n_shared_experts;
    if (placement != nullptr && !placement->is_identity()) {
      FM_CHECK_ARG(placement->logical() == E, "DecoderLayerGpu: the expert placement is for ",
                   placement->logical(), " logical experts, the config has ", E);
      FM_CHECK_ARG(placement->physical() % ep_ranks == 0,
                   "DecoderLayerGpu: ", placement->physical(),
                   " physical expert slots do not split evenly over ", ep_ranks, " EP ranks");
      m.placement = std::make_unique<ExpertPlacementGpu>(*placement);
    }
    const int64_t slots_n = m.placement ? m.placement->host().physical() : E;
    comm::EpConfig ec;
    ec.num_ranks = ep_ranks;
    ec.num_experts = static_cast<int>(slots_n);
    ec.top_k = static_cast<int>(K);
    ec.hidden = H;
    ec.max_tokens_per_rank = T;
    ec.payload = comm::Payload::kFP8;
    if (ep_ranks == 1) {
      m.ep = std::make_unique<comm::DeviceEpGroup>(ec, std::vector<int>{m.device});
    } else {
      m.ep_rank = make_ep(ec);
      FM_CHECK_ARG(m.ep_rank != nullptr && m.ep_rank->config().num_ranks == ep_ranks &&
                       m.ep_rank->device() == m.device,
                   "DecoderLayerGpu: the EP maker returned no endpoint, or one of another size or ",
                   "device");
    }
    comm::DeviceEpRank& ep_rank = m.ep ? m.ep->rank(0) : *m.ep_rank;
    m.local_experts = slots_n / ep_ranks;
    m.first_expert = static_cast<int64_t>(ep_rank.rank()) * m.local_experts;
    const int64_t El = m.local_experts;
    // A slot's weights are its logical expert's masters (a replica reads the same ones).
    auto logical_of = [&](int64_t s) {
      return m.placement ? static_cast<int64_t>(m.placement->host().phy2log()[s]) : s;
    };
    ParameterGpu& g = P(".mlp.gate.weight");
    m.gate = value_of(g, E * H);
    m.dgate = grad_of(g);
    m.bias = value_of(P(".mlp.gate.e_score_correction_bias"), E);
    for (int64_t s = m.first_expert; s < m.first_expert + El; ++s)
      ffn_params(".mlp.experts." + std::to_string(logical_of(s)), I, m.routed);
    ffn_params(".mlp.shared_experts", Is, m.shared);
    slots.push_back({reinterpret_cast<void**>(&m.logits), T * E * b4});
    slots.push_back({reinterpret_cast<void**>(&m.scores), T * E * b4});
    slots.push_back({reinterpret_cast<void**>(&m.topk_w), T * K * b4});
    slots.push_back({reinterpret_cast<void**>(&m.gtopk), T * K * b4});
    slots.push_back({reinterpret_cast<void**>(&m.dlogits), T * E * b4});
    slots.push_back({reinterpret_cast<void**>(&m.topk_idx), T * K * b4});
    slots.push_back({reinterpret_cast<void**>(&m.load), E * b4});
    slots.push_back({reinterpret_cast<void**>(&m.load_total), E * b8});
    if (m.placement) slots.push_back({reinterpret_cast<void**>(&m.topk_phys), T * K * b4});
    slots.push_back({reinterpret_cast<void**>(&m.s_sum), T * b8});
    slots.push_back({reinterpret_cast<void**>(&m.fscaled), m.num_seq * E * b8});
    slots.push_back({reinterpret_cast<void**>(&m.contrib), m.num_seq * b8});
    slots.push_back({reinterpret_cast<void**>(&m.gx), T * H * b2});
    if (m.placement) {
      // No backward with redundant experts (a replica's gradient would have to reach its
      // original's master on another rank): no gradient scratch, no segments.
    } else if (grad_scratch == nullptr) {
      slots.push_back({reinterpret_cast<void**>(&m.scratch13), El * 2 * I * H * b4});
      slots.push_back({reinterpret_cast<void**>(&m.scratch2), El * H * I * b4});
      slots.push_back({reinterpret_cast<void**>(&m.sscratch13), 2 * Is * H * b4});
      slots.push_back({reinterpret_cast<void**>(&m.sscratch2), H * Is * b4});
    } else {  // grad_scratch_floats()' parts, in this order
      m.scratch13 = grad_scratch;
      m.scratch2 = m.scratch13 + slot(El * 2 * I * H * b4) / b4;
      m.sscratch13 = m.scratch2 + slot(El * H * I * b4) / b4;
      m.sscratch2 = m.sscratch13 + slot(2 * Is * H * b4) / b4;
    }
  }
  // The scatter's segments (FFN grads that do not sit in ExpertWeightsHost's layout).
  slots.push_back({reinterpret_cast<void**>(&m.segments),
                   static_cast<int64_t>(sizeof(Segment)) * 3 * (is_moe ? m.local_experts + 1 : 1)});
  int64_t bytes = 0;
  for (auto& s : slots) bytes += slot(s.second);
  FM_CHECK_CUDA(cudaMalloc(&m.buffer, static_cast<size_t>(bytes)));
  // Zeros: the dense FFN's padding rows (codes, scales) start finite.
  FM_CHECK_CUDA(cudaMemset(m.buffer, 0, static_cast<size_t>(bytes)));
  char* p = static_cast<char*>(m.buffer);
  for (auto& s : slots) {
    *s.first = p;
    p += slot(s.second);
  }
  std::vector<Segment> segs;
  if (!is_moe) {
    const int64_t I = c.intermediate_size;
    if (!m.dense_direct) {
      segs.push_back({m.scratch13, m.dense.dgate[0], I * H});
      segs.push_back({m.scratch13 + I * H, m.dense.dup[0], I * H});
      segs.push_back({m.scratch2, m.dense.ddown[0], H * I});
    }
    m.dense_w = std::make_unique<ExpertWeightsFromMasters>(1, H, I);
    ExpertFfnOptions fo;
    fo.backward = true;
    m.dense_ffn = std::make_unique<ExpertFfnGpu>(R, H, I, fo);
    // The layout: 0 on the T rows, -1 on the padding (fixed: T is the constructor's).
    std::vector<int32_t> lay(static_cast<size_t>(R), -1);
    std::fill(lay.begin(), lay.begin() + T, 0);
    FM_CHECK_CUDA(cudaMemcpy(m.layout, lay.data(), R * 4, cudaMemcpyHostToDevice));
  } else {
    const int64_t El = m.local_experts, I = c.moe_intermediate_size, Is = I * c.n_shared_experts;
    if (!m.placement) {  // (with a placement: no backward, above)
      for (int64_t e = 0; e < El; ++e) {
        segs.push_back({m.scratch13 + e * 2 * I * H, m.routed.dgate[e], I * H});
        segs.push_back({m.scratch13 + e * 2 * I * H + I * H, m.routed.dup[e], I * H});
        segs.push_back({m.scratch2 + e * H * I, m.routed.ddown[e], H * I});
      }
      segs.push_back({m.sscratch13, m.shared.dgate[0], Is * H});
      segs.push_back({m.sscratch13 + Is * H, m.shared.dup[0], Is * H});
      segs.push_back({m.sscratch2, m.shared.ddown[0], H * Is});
    }
    m.routed_w = std::make_unique<ExpertWeightsFromMasters>(El, H, I);
    m.shared_w = std::make_unique<ExpertWeightsFromMasters>(1, H, Is);
    comm::MoeLayerOptions lo;
    lo.backward = !m.placement;
    comm::DeviceEpRank& ep_rank = m.ep ? m.ep->rank(0) : *m.ep_rank;
    m.moe =
        std::make_unique<comm::MoeLayerGpu>(ep_rank, m.routed_w->view(), m.shared_w->view(), lo);
  }
  if (is_moe) check_launch_dims((T + kDfTokens - 1) / kDfTokens, "the router's df kernel");
  m.n_segments = static_cast<int64_t>(segs.size());
  check_launch_dims(std::max<int64_t>(m.n_segments, 1), "the gradient scatter");
  if (!segs.empty())
    FM_CHECK_CUDA(
        cudaMemcpy(m.segments, segs.data(), segs.size() * sizeof(Segment), cudaMemcpyHostToDevice));
}

DecoderLayerGpu::~DecoderLayerGpu() = default;

int64_t DecoderLayerGpu::grad_scratch_floats(const ModelConfig& config, int ep_ranks) {
  const int64_t H = config.hidden_size, I = config.moe_intermediate_size;
  const int64_t Is = I * config.n_shared_experts, El = config.n_routed_experts / ep_ranks;
  const int64_t b4 = 4;
  return (slot(El * 2 * I * H * b4) + slot(El * H * I * b4) + slot(2 * Is * H * b4) +
          slot(H * Is * b4)) /
         b4;
}

void DecoderLayerGpu::refresh(cudaStream_t stream) {
  Impl& m = *impl_;
  m.mla->refresh(m.mla_masters, stream);
  if (!is_moe_) {
    m.dense_w->refresh(m.dense.gate, m.dense.up, m.dense.down, stream);
  } else {
    m.routed_w->refresh(m.routed.gate, m.routed.up, m.routed.down, stream);
    m.shared_w->refresh(m.shared.gate, m.shared.up, m.shared.down, stream);
  }
}

// The FFN of the post-attention-norm rows m.f [T, H] into m.mlp_out: the dense SwiGLU over R rows
// of its contiguous layout, or the router, the expert load and the MoE layer; with `balance`, the
// sequence-wise balance loss (training).
void DecoderLayerGpu::ffn_forward(int64_t T, int64_t R, bool balance, double* balance_loss,
                                  cudaStream_t stream, bool low_latency_ep) {
  Impl& m = *impl_;
  const int64_t H = m.H;
  if (!is_moe_) {
    const int64_t KB = H / kTile;
    kernels::quantize_1x128(m.f, T, H, H, false, m.x8, H, m.xs, kernels::ScaleLayout::kRowMajor,
                            stream);
    kernels::scales_to_mn_major(m.xs, 1, R, KB, m.sa, stream);
    m.dense_ffn->forward_contiguous(m.x8, m.sa, m.layout, R, m.dense_w->view(), m.mlp_out, stream);
  } else {
    const int64_t E = m.E, K = m.K;
    const dim3 lg(static_cast<unsigned>((T + kLogitTokens - 1) / kLogitTokens),
                  static_cast<unsigned>((E + kLogitWarps * kLogitExpertsPerWarp - 1) /
                                        (kLogitWarps * kLogitExpertsPerWarp)));
    router_logits_kernel<<<lg, 32 * kLogitWarps, 0, stream>>>(m.f, m.gate, T, E, H, m.logits);
    FM_CHECK_LAUNCH();
    route_cuda(m.rc, m.logits, T, m.bias, m.topk_idx, m.topk_w, m.scores, stream);
    if (balance && m.alpha > 0) {
      const size_t sm = static_cast<size_t>(round_up(E * 4, 8) + E * 8);
      balance_forward_kernel<<<static_cast<unsigned>(m.num_seq), 256, sm, stream>>>(
          m.scores, m.topk_idx, m.seq, static_cast<int>(E), static_cast<int>(K), m.alpha, m.num_seq,
          m.s_sum, m.fscaled, m.contrib);
      FM_CHECK_LAUNCH();
      if (balance_loss) {
        balance_sum_kernel<<<1, 1, 0, stream>>>(m.contrib, m.num_seq, balance_loss);
        FM_CHECK_LAUNCH();
      }
    }
    FM_CHECK_CUDA(cudaMemsetAsync(m.load, 0, E * 4, stream));
    expert_load_kernel<<<static_cast<unsigned>(std::min<int64_t>((T * K + 255) / 256, 1024)), 256,
                         0, stream>>>(m.topk_idx, T * K, static_cast<int>(E), m.load, m.load_total);
    FM_CHECK_LAUNCH();
    const int32_t* slots = m.topk_idx;
    if (m.placement) {
      map_to_physical_cuda(*m.placement, m.topk_idx, m.pos, T, static_cast<int>(K), m.topk_phys,
                           stream);
      slots = m.topk_phys;
    }
    if (low_latency_ep) {
      m.moe_ll->set_weights(m.routed_w->view(), m.shared_w->view());
      m.moe_ll->forward(m.f, slots, m.topk_w, T, m.mlp_out, stream);
    } else {
      m.moe->forward(m.f, slots, m.topk_w, T, m.mlp_out, stream);
    }
  }
}

void DecoderLayerGpu::forward(const bf16* h, const int32_t* pos, bf16* out, double* balance_loss,
                              uint32_t* status, cudaStream_t stream) {
  Impl& m = *impl_;
  FM_CHECK_ARG(h != nullptr && pos != nullptr && out != nullptr,
               "DecoderLayerGpu::forward: null h, pos or out");
  FM_CHECK_ARG(out != h, "DecoderLayerGpu::forward: out may not alias h");
  const int64_t T = m.T, H = m.H, n = T * H;
  const double eps = m.config.rms_norm_eps;
  kernels::rmsnorm_forward(h, H, m.ln1, T, H, eps, m.a, H, m.rstd1, stream);
  m.mla->forward(m.a, pos, m.batch, m.seq, m.attn, status, stream);
  comm::add_bf16(h, m.attn, n, m.h1, stream);
  kernels::rmsnorm_forward(m.h1, H, m.ln2, T, H, eps, m.f, H, m.rstd2, stream);
  m.pos = pos;
  ffn_forward(T, m.R, true, balance_loss, stream);
  comm::add_bf16(m.h1, m.mlp_out, n, out, stream);
  m.h = h;
  m.forwarded = true;
}

void DecoderLayerGpu::reserve_decode(int64_t max_tokens, bool tensor_core_products) {
  impl_->mla->reserve_decode(max_tokens, tensor_core_products);
}

comm::EpConfig DecoderLayerGpu::low_latency_ep_config(int64_t max_tokens) const {
  const Impl& m = *impl_;
  FM_CHECK_ARG(is_moe_, "DecoderLayerGpu::low_latency_ep_config: a dense layer has no EP group");
  // NOTE: the low-latency kernels take at most 1024 tokens a rank (comm/device_ep.h).
  FM_CHECK_ARG(max_tokens >= 1 && max_tokens <= std::min<int64_t>(m.T, 1024),
               "DecoderLayerGpu::low_latency_ep_config: max_tokens=", max_tokens, " outside [1, ",
               std::min<int64_t>(m.T, 1024), "]");
  comm::EpConfig ec = (m.ep ? m.ep->rank(0) : *m.ep_rank).config();
  ec.max_tokens_per_rank = max_tokens;
  ec.max_rows = 0;
  // Every token of every rank (no overflow), rounded up to 128 rows so that the experts may run
  // the grouped-contiguous GEMMs over the masked layout (comm::MaskedExperts).
  ec.masked_capacity = (ec.num_ranks * max_tokens + 127) / 128 * 128;
  return ec;
}

std::unique_ptr<comm::MoeLayerGpu> DecoderLayerGpu::make_low_latency_moe(
    comm::DeviceEpRank& ep) const {
  const Impl& m = *impl_;
  FM_CHECK_ARG(is_moe_, "DecoderLayerGpu::make_low_latency_moe: a dense layer");
  return std::make_unique<comm::MoeLayerGpu>(ep, m.routed_w->view(), m.shared_w->view());
}

void DecoderLayerGpu::use_low_latency_moe(comm::MoeLayerGpu* moe) {
  Impl& m = *impl_;
  FM_CHECK_ARG(is_moe_, "DecoderLayerGpu::use_low_latency_moe: a dense layer");
  FM_CHECK_ARG(moe != nullptr && moe->masked(),
               "DecoderLayerGpu::use_low_latency_moe: needs a masked MoeLayerGpu");
  const comm::DeviceEpRank& main = m.ep ? m.ep->rank(0) : *m.ep_rank;
  comm::DeviceEpRank& ep = moe->ep();
  FM_CHECK_ARG(ep.config().num_experts == main.config().num_experts &&
                   ep.config().num_ranks == main.config().num_ranks && ep.rank() == main.rank() &&
                   ep.device() == m.device,
               "DecoderLayerGpu::use_low_latency_moe: the endpoint's ", ep.config().num_experts,
               " experts over ", ep.config().num_ranks, " ranks (rank ", ep.rank(), ", device ",
               ep.device(), ") are not this layer's ", main.config().num_experts, " over ",
               main.config().num_ranks, " (rank ", main.rank(), ", device ", m.device, ")");
  m.moe_ll = moe;
}

bool DecoderLayerGpu::has_low_latency_ep() const {
  return impl_->moe_ll != nullptr;
}

const MlaBlockGpu& DecoderLayerGpu::attention() const {
  return *impl_->mla;
}

void DecoderLayerGpu::forward_decode(const bf16* h, const int32_t* pos, int64_t batch,
                                     int64_t queries, const MlaLatentCacheView& cache,
                                     const kernels::MlaDecodePlan& plan, void* workspace, bf16* out,
                                     uint32_t* status, cudaStream_t stream, bool low_latency_ep) {
  Impl& m = *impl_;
  FM_CHECK_ARG(!low_latency_ep || !is_moe_ || m.moe_ll != nullptr,
               "DecoderLayerGpu::forward_decode: low_latency_ep without use_low_latency_moe");
  FM_CHECK_ARG(h != nullptr && pos != nullptr && out != nullptr && out != h,
               "DecoderLayerGpu::forward_decode: null h, pos or out, or out aliasing h");
  FM_CHECK_ARG(batch > 0 && queries > 0 && batch <= m.T / queries,
               "DecoderLayerGpu::forward_decode: batch * queries = ", batch, " * ", queries,
               " outside [1, ", m.T, "]");
  const int64_t T = batch * queries, H = m.H, n = T * H;
  const double eps = m.config.rms_norm_eps;
  kernels::rmsnorm_forward(h, H, m.ln1, T, H, eps, m.a, H, m.rstd1, stream);
  m.mla->forward_decode(m.a, pos, batch, queries, cache, plan, workspace, m.attn, status, stream);
  comm::add_bf16(h, m.attn, n, m.h1, stream);
  kernels::rmsnorm_forward(m.h1, H, m.ln2, T, H, eps, m.f, H, m.rstd2, stream);
  // Rows [T, R) of the constructor's dense layout are real rows there: they compute on stale
  // inputs here, row by row apart from the step's, and nobody reads them.
  m.pos = pos;
  ffn_forward(T, std::min(m.R, round_up(T, kTile)), false, nullptr, stream,
              low_latency_ep && is_moe_);
  comm::add_bf16(m.h1, m.mlp_out, n, out, stream);
  m.forwarded = false;  // no backward through a decode step
}

void DecoderLayerGpu::backward(const bf16* dout, bf16* dh, uint32_t* status, cudaStream_t stream,
                               kernels::WgradOutput grad_output) {
  Impl& m = *impl_;
  FM_CHECK_ARG(m.forwarded, "DecoderLayerGpu::backward: needs a forward first");
  FM_CHECK_ARG(!m.placement,
               "DecoderLayerGpu::backward: a layer with redundant experts (ExpertPlacement) is for "
               "serving; its replicas' gradients are not reduced");
  FM_CHECK_ARG(dout != nullptr && dh != nullptr, "DecoderLayerGpu::backward: null dout or dh");
  FM_CHECK_ARG(dout != dh && dh != m.h, "DecoderLayerGpu::backward: dh may not alias dout or h");
  const int64_t T = m.T, H = m.H, n = T * H;
  const bool acc = grad_output == kernels::WgradOutput::kAccumulate;
  const unsigned seg_y = static_cast<unsigned>(std::max<int64_t>(m.n_segments, 1));
  if (!is_moe_) {
    // gate_proj's and up_proj's gradients adjacent (gate then up): dW13 [2I, H] and dW2 straight
    // into them with grad_output's mode; else both into the scratch (overwritten), then scattered.
    const int64_t one[1] = {m.R};
    float* dw13 = m.dense_direct ? m.dense.dgate[0] : m.scratch13;
    float* dw2 = m.dense_direct ? m.dense.ddown[0] : m.scratch2;
    m.dense_ffn->backward_contiguous(
        m.x8, m.sa, m.dense_ffn->gate_up(), m.layout, one, m.R, m.dense_w->view(), dout, m.df, dw13,
        dw2, stream, nullptr, nullptr,
        m.dense_direct ? grad_output : kernels::WgradOutput::kOverwrite);
    if (!m.dense_direct) {
      scatter_kernel<<<dim3(64, seg_y), 256, 0, stream>>>(m.segments, acc);
      FM_CHECK_LAUNCH();
    }
  } else {
    const int64_t E = m.E;
    comm::MoeLayerGrads g;
    g.routed_dw13 = m.scratch13;
    g.routed_dw2 = m.scratch2;
    g.shared_dw13 = m.sscratch13;
    g.shared_dw2 = m.sscratch2;
    g.overwrite = true;
    m.moe->backward(dout, m.gx, m.gtopk, g, stream);
    route_backward_cuda(m.rc, m.scores, m.topk_idx, m.gtopk, T, m.dlogits, status, stream);
    if (m.alpha > 0) {
      balance_backward_kernel<<<static_cast<unsigned>(T), 128, 0, stream>>>(
          m.scores, m.s_sum, m.fscaled, m.seq, static_cast<int>(E), m.alpha, m.num_seq, m.dlogits);
      FM_CHECK_LAUNCH();
    }
    const dim3 dg(static_cast<unsigned>((H + kDgThreads - 1) / kDgThreads),
                  static_cast<unsigned>((E + kDgExperts - 1) / kDgExperts));
    router_dgate_kernel<<<dg, kDgThreads, 0, stream>>>(m.dlogits, m.f, T, E, H, m.dgate, acc);
    FM_CHECK_LAUNCH();
    const dim3 dx(static_cast<unsigned>((H + kDfThreads - 1) / kDfThreads),
                  static_cast<unsigned>((T + kDfTokens - 1) / kDfTokens));
    router_dx_kernel<<<dx, kDfThreads, static_cast<size_t>(kDfTokens * E * 4), stream>>>(
        m.dlogits, m.gate, m.gx, T, E, H, m.df);
    FM_CHECK_LAUNCH();
    scatter_kernel<<<dim3(64, seg_y), 256, 0, stream>>>(m.segments, acc);
    FM_CHECK_LAUNCH();
  }
  // dh1 = ln2'(df) + dout; da = MLA'(dh1); dh = ln1'(da) + dh1.
  kernels::rmsnorm_backward(m.df, H, m.h1, H, m.ln2, m.rstd2, T, H, m.dh1, H, m.dln2, acc,
                            m.norm_ws, stream);
  comm::add_bf16(m.dh1, dout, n, m.dh1, stream);
  m.mla->backward(m.dh1, m.da, m.mla_grads, status, stream, grad_output);
  kernels::rmsnorm_backward(m.da, H, m.h, H, m.ln1, m.rstd1, T, H, dh, H, m.dln1, acc, m.norm_ws,
                            stream);
  comm::add_bf16(dh, m.dh1, n, dh, stream);
}

int32_t* DecoderLayerGpu::expert_load() const {
  return is_moe_ ? impl_->load : nullptr;
}

unsigned long long* DecoderLayerGpu::expert_load_total() const {
  return is_moe_ ? impl_->load_total : nullptr;
}

DecoderLayerSavedGpu DecoderLayerGpu::saved() const {
  const Impl& m = *impl_;
  DecoderLayerSavedGpu s;
  s.tokens = m.T;
  s.a = m.a;
  s.attn = m.attn;
  s.h1 = m.h1;
  s.f = m.f;
  s.rstd1 = m.rstd1;
  s.rstd2 = m.rstd2;
  s.mlp_out = m.mlp_out;
  s.df = m.df;
  s.dh1 = m.dh1;
  s.da = m.da;
  if (is_moe_) {
    s.logits = m.logits;
    s.scores = m.scores;
    s.topk_idx = m.topk_idx;
    s.topk_w = m.topk_w;
    s.grad_topk_w = m.gtopk;
    s.dlogits = m.dlogits;
    s.moe_dx = m.gx;
  }
  return s;
}

}  // namespace fp8moe
