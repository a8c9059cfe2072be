// AdamW over a table of parameter tensors in one launch (train/adamw_gpu.h): a block per
// 8192-element chunk (a binary search over the tensors' first chunks finds its tensor), 4 elements
// a thread per step (16-byte FP32, 8-byte BF16 accesses where the tensor's pointers allow), the
// update in AdamW::step's exact FP32/FP64 operations; the grad norm by per-chunk FP64 partials and
// one ordered final block. Checked bit for bit against fp8moe::AdamW::step
// (src/train/optimizer.cpp): `test_train_gpu --gtest_filter='AdamWGpu*'`.
#include <cuda_runtime.h>

#include <cmath>
#include <utility>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/train/adamw_gpu.h"

namespace fp8moe {
namespace {

constexpr int kThreads = AdamWGpu::kThreads;
constexpr int64_t kChunk = AdamWGpu::kChunk;
constexpr int kFinalThreads = 1024;
static_assert(kChunk % (4 * kThreads) == 0, "a chunk is whole quads of every thread");

struct Record {  // device copy of AdamWGpuTensor
  float* value;
  const float* grad;
  uint16_t* m;
  uint16_t* v;
  bf16* value_bf16;
  int64_t numel;
  int weight_decay;
  int vec;      // all pointers aligned for the 4-wide accesses
  int in_norm;  // counted in the grad norm (AdamWGpuTensor::in_norm)
};

struct StepArgs {
  float b1, omb1, b2, omb2;  // float(b1), float(1 - b1), ...
  double lr, c1, c2, eps, wd;
  double clip_norm;  // 0: no clipping
  int use_norm;      // a norm pass ran before (state_->grad_norm is current)
  int skip_nonfinite;
};

__device__ __forceinline__ int find_tensor(const int32_t* chunk_begin, int n, int32_t chunk) {
  int lo = 0, hi = n - 1;  // the last t with chunk_begin[t] <= chunk
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (__ldg(chunk_begin + mid) <= chunk)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Block sum of `acc` (FP64): warp butterfly, then the warps in order (every thread gets it).
template <int kBlock>
__device__ __forceinline__ double block_sum(double acc) {
  __shared__ double ws[kBlock / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc = __dadd_rn(acc, __shfl_xor_sync(0xFFFFFFFFu, acc, o));
  if (threadIdx.x % 32 == 0) ws[threadIdx.x / 32] = acc;
  __syncthreads();
  double s = 0.0;
#pragma unroll
  for (int i = 0; i < kBlock / 32; ++i) s = __dadd_rn(s, ws[i]);
  return s;
}

// ---- grad norm, stage 1: a block per chunk, FP64 sum of g * g ----
__global__ void __launch_bounds__(kThreads)
    adamw_norm_kernel(const Record* table, const int32_t* chunk_begin, int n, double* partial) {
  const int32_t chunk = blockIdx.x;
  const int ti = find_tensor(chunk_begin, n, chunk);
  const Record rec = table[ti];
  const int64_t c0 = static_cast<int64_t>(chunk - __ldg(chunk_begin + ti)) * kChunk;
  const int64_t c1 = min(rec.numel, c0 + kChunk);
  double acc = 0.0;
  for (int64_t i = c0 + 4 * threadIdx.x; rec.in_norm && i < c1; i += 4 * kThreads) {
    float g[4];
    if (rec.vec && i + 4 <= c1) {
      const float4 q = __ldg(reinterpret_cast<const float4*>(rec.grad + i));
      g[0] = q.x, g[1] = q.y, g[2] = q.z, g[3] = q.w;
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) g[e] = i + e < c1 ? __ldg(rec.grad + i + e) : 0.0f;
    }
#pragma unroll
    for (int e = 0; e < 4; ++e)
      acc = __dadd_rn(acc, __dmul_rn(static_cast<double>(g[e]), static_cast<double>(g[e])));
  }
  const double s = block_sum<kThreads>(acc);
  if (threadIdx.x == 0) partial[chunk] = s;
}

// ---- grad norm, stage 2: one block, the partials in a fixed order; the clip decision ----
// With a norm reduction (AdamWGpu::set_norm_reduction) it runs twice: first with sum_out (the
// rank's sum of squares written there, nothing decided), then, after the reduction, with sum_in
// (the reduced sum read from there instead of the partials).
__global__ void __launch_bounds__(kFinalThreads)
    adamw_norm_final_kernel(const double* partial, int64_t chunks, double clip_norm,
                            int skip_nonfinite, AdamWGpuState* state, double* sum_out,
                            const double* sum_in) {
  double total = 0.0;
  if (sum_in != nullptr) {
    total = *sum_in;
  } else {
    double acc = 0.0;
    for (int64_t i = threadIdx.x; i < chunks; i += kFinalThreads) acc = __dadd_rn(acc, partial[i]);
    total = block_sum<kFinalThreads>(acc);
  }
  if (threadIdx.x != 0) return;
  if (sum_out != nullptr) {
    *sum_out = total;
    return;
  }
  const double norm = __dsqrt_rn(total);
  state->grad_norm = norm;
  const bool clip = clip_norm > 0 && norm > clip_norm;  // as clip_gradients (false for NaN)
  state->clipped = clip ? 1 : 0;
  state->clip_scale = clip ? __double2float_rn(__ddiv_rn(clip_norm, norm)) : 1.0f;
  const bool skip = skip_nonfinite && !isfinite(norm);
  state->skipped = skip ? 1 : 0;
  if (skip) state->skipped_total += 1;
}

// AdamW::step's arithmetic for one element; returns the new weight.
__device__ __forceinline__ float update(float w, float g, uint16_t& m, uint16_t& v,
                                        const StepArgs& a, double wd) {
  const float mj = __fadd_rn(__fmul_rn(a.b1, bf16_bits_to_float(m)), __fmul_rn(a.omb1, g));
  const float vj =
      __fadd_rn(__fmul_rn(a.b2, bf16_bits_to_float(v)), __fmul_rn(__fmul_rn(a.omb2, g), g));
  m = float_to_bf16_bits(mj);
  v = float_to_bf16_bits(vj);
  const double mh = __ddiv_rn(static_cast<double>(bf16_bits_to_float(m)), a.c1);
  const double vh = __ddiv_rn(static_cast<double>(bf16_bits_to_float(v)), a.c2);
  const double wd_ = static_cast<double>(w);
  const double upd = __dadd_rn(__ddiv_rn(mh, __dadd_rn(__dsqrt_rn(vh), a.eps)), __dmul_rn(wd, wd_));
  return __double2float_rn(__dsub_rn(wd_, __dmul_rn(a.lr, upd)));
}

// ---- the update: a block per chunk ----
__global__ void __launch_bounds__(kThreads)
    adamw_step_kernel(const Record* table, const int32_t* chunk_begin, int n, StepArgs a,
                      const AdamWGpuState* state) {
  bool clip = false;
  float scale = 1.0f;
  if (a.use_norm) {
    if (state->skipped) return;
    clip = state->clipped != 0;
    scale = state->clip_scale;
  }
  const int32_t chunk = blockIdx.x;
  const int ti = find_tensor(chunk_begin, n, chunk);
  const Record rec = table[ti];
  const double wd = rec.weight_decay ? a.wd : 0.0;
  const int64_t c0 = static_cast<int64_t>(chunk - __ldg(chunk_begin + ti)) * kChunk;
  const int64_t c1 = min(rec.numel, c0 + kChunk);
  for (int64_t i = c0 + 4 * threadIdx.x; i < c1; i += 4 * kThreads) {
    if (rec.vec && i + 4 <= c1) {
      const float4 wq = *reinterpret_cast<const float4*>(rec.value + i);
      const float4 gq = __ldg(reinterpret_cast<const float4*>(rec.grad + i));
      const uint2 mq = *reinterpret_cast<const uint2*>(rec.m + i);
      const uint2 vq = *reinterpret_cast<const uint2*>(rec.v + i);
      float w[4] = {wq.x, wq.y, wq.z, wq.w}, g[4] = {gq.x, gq.y, gq.z, gq.w};
      uint16_t m[4] = {static_cast<uint16_t>(mq.x), static_cast<uint16_t>(mq.x >> 16),
                       static_cast<uint16_t>(mq.y), static_cast<uint16_t>(mq.y >> 16)};
      uint16_t v[4] = {static_cast<uint16_t>(vq.x), static_cast<uint16_t>(vq.x >> 16),
                       static_cast<uint16_t>(vq.y), static_cast<uint16_t>(vq.y >> 16)};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (clip) g[e] = __fmul_rn(g[e], scale);
        w[e] = update(w[e], g[e], m[e], v[e], a, wd);
      }
      *reinterpret_cast<float4*>(rec.value + i) = make_float4(w[0], w[1], w[2], w[3]);
      *reinterpret_cast<uint2*>(rec.m + i) = make_uint2(m[0] | (static_cast<uint32_t>(m[1]) << 16),
                                                        m[2] | (static_cast<uint32_t>(m[3]) << 16));
      *reinterpret_cast<uint2*>(rec.v + i) = make_uint2(v[0] | (static_cast<uint32_t>(v[1]) << 16),
                                                        v[2] | (static_cast<uint32_t>(v[3]) << 16));
      if (rec.value_bf16 != nullptr)
        *reinterpret_cast<uint2*>(rec.value_bf16 + i) = make_uint2(
            float_to_bf16_bits(w[0]) | (static_cast<uint32_t>(float_to_bf16_bits(w[1])) << 16),
            float_to_bf16_bits(w[2]) | (static_cast<uint32_t>(float_to_bf16_bits(w[3])) << 16));
    } else {
      for (int64_t j = i; j < min(c1, i + 4); ++j) {
        float g = rec.grad[j];
        if (clip) g = __fmul_rn(g, scale);
        const float w = update(rec.value[j], g, rec.m[j], rec.v[j], a, wd);
        rec.value[j] = w;
        if (rec.value_bf16 != nullptr) rec.value_bf16[j] = bf16{float_to_bf16_bits(w)};
      }
    }
  }
}

bool aligned(const void* p, uintptr_t a) {
  return reinterpret_cast<uintptr_t>(p) % a == 0;
}

}  // namespace

AdamWGpu::AdamWGpu(const AdamWConfig& config, const std::vector<AdamWGpuTensor>& tensors,
                   bool skip_nonfinite)
    : config_(config), skip_nonfinite_(skip_nonfinite) {
  FM_CHECK_ARG(!tensors.empty(), "AdamWGpu: no tensors");
  FM_CHECK_ARG(config.beta1 >= 0 && config.beta1 < 1 && config.beta2 >= 0 && config.beta2 < 1 &&
                   config.eps > 0 && config.clip_norm >= 0,
               "AdamWGpu: beta1=", config.beta1, ", beta2=", config.beta2,
               " must be in [0, 1), eps=", config.eps, " > 0, clip_norm=", config.clip_norm,
               " >= 0");
  std::vector<Record> recs;
  std::vector<int32_t> begin;
  int64_t chunks = 0;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const AdamWGpuTensor& x = tensors[t];
    FM_CHECK_ARG(x.numel > 0, "AdamWGpu: tensor ", t, " has numel ", x.numel);
    FM_CHECK_ARG(x.value != nullptr && x.grad != nullptr && x.m != nullptr && x.v != nullptr,
                 "AdamWGpu: tensor ", t, " lacks a value, grad, m or v pointer");
    FM_CHECK_ARG(aligned(x.value, 4) && aligned(x.grad, 4) && aligned(x.m, 2) && aligned(x.v, 2) &&
                     aligned(x.value_bf16, 2),
                 "AdamWGpu: tensor ", t, " has a misaligned pointer");
    const bool vec = aligned(x.value, 16) && aligned(x.grad, 16) && aligned(x.m, 8) &&
                     aligned(x.v, 8) && aligned(x.value_bf16, 8);
    recs.push_back(Record{x.value, x.grad, x.m, x.v, x.value_bf16, x.numel, x.weight_decay ? 1 : 0,
                          vec ? 1 : 0, x.in_norm ? 1 : 0});
    begin.push_back(static_cast<int32_t>(chunks));
    chunks += (x.numel + kChunk - 1) / kChunk;
    total_numel_ += x.numel;
    FM_CHECK_ARG(chunks < (int64_t{1} << 31), "AdamWGpu: ", total_numel_,
                 " elements are more than 2^31 chunks of ", kChunk);
  }
  begin.push_back(static_cast<int32_t>(chunks));
  num_tensors_ = static_cast<int64_t>(tensors.size());
  total_chunks_ = chunks;
  FM_CHECK_CUDA(cudaMalloc(&table_, recs.size() * sizeof(Record)));
  FM_CHECK_CUDA(cudaMalloc(&chunk_begin_, begin.size() * sizeof(int32_t)));
  FM_CHECK_CUDA(cudaMalloc(&partial_, chunks * sizeof(double)));
  FM_CHECK_CUDA(cudaMalloc(&state_, sizeof(AdamWGpuState)));
  FM_CHECK_CUDA(cudaMalloc(&norm_sum_, sizeof(double)));
  FM_CHECK_CUDA(
      cudaMemcpy(table_, recs.data(), recs.size() * sizeof(Record), cudaMemcpyHostToDevice));
  FM_CHECK_CUDA(cudaMemcpy(chunk_begin_, begin.data(), begin.size() * sizeof(int32_t),
                           cudaMemcpyHostToDevice));
  FM_CHECK_CUDA(cudaMemset(state_, 0, sizeof(AdamWGpuState)));
  FM_CHECK_CUDA(cudaDeviceSynchronize());
}

AdamWGpu::~AdamWGpu() {
  for (void* p : {table_, static_cast<void*>(chunk_begin_), static_cast<void*>(partial_),
                  static_cast<void*>(state_), static_cast<void*>(norm_sum_)})
    if (p != nullptr) cudaFree(p);
}

void AdamWGpu::launch_norm(cudaStream_t stream) {
  adamw_norm_kernel<<<static_cast<unsigned>(total_chunks_), kThreads, 0, stream>>>(
      static_cast<const Record*>(table_), chunk_begin_, static_cast<int>(num_tensors_), partial_);
  FM_CHECK_LAUNCH();
  const int skip = skip_nonfinite_ ? 1 : 0;
  if (!norm_reduction_) {
    adamw_norm_final_kernel<<<1, kFinalThreads, 0, stream>>>(
        partial_, total_chunks_, config_.clip_norm, skip, state_, nullptr, nullptr);
    FM_CHECK_LAUNCH();
    return;
  }
  adamw_norm_final_kernel<<<1, kFinalThreads, 0, stream>>>(
      partial_, total_chunks_, config_.clip_norm, skip, state_, norm_sum_, nullptr);
  FM_CHECK_LAUNCH();
  norm_reduction_(norm_sum_, stream);
  adamw_norm_final_kernel<<<1, kFinalThreads, 0, stream>>>(
      partial_, total_chunks_, config_.clip_norm, skip, state_, nullptr, norm_sum_);
  FM_CHECK_LAUNCH();
}

void AdamWGpu::set_norm_reduction(std::function<void(double*, cudaStream_t)> reduce) {
  norm_reduction_ = std::move(reduce);
}

void AdamWGpu::grad_norm(cudaStream_t stream) {
  launch_norm(stream);
}

void AdamWGpu::step(int64_t step, cudaStream_t stream) {
  FM_CHECK_ARG(step >= 0, "AdamWGpu::step: negative step ", step);
  const bool use_norm = skip_nonfinite_ || config_.clip_norm > 0;
  if (use_norm) launch_norm(stream);
  // NOTE: the host constants exactly as AdamW::step computes them.
  const double b1 = config_.beta1, b2 = config_.beta2;
  StepArgs a{};
  a.b1 = static_cast<float>(b1);
  a.omb1 = static_cast<float>(1 - b1);
  a.b2 = static_cast<float>(b2);
  a.omb2 = static_cast<float>(1 - b2);
  a.lr = learning_rate(config_, step);
  a.c1 = 1.0 - std::pow(b1, static_cast<double>(step + 1));
  a.c2 = 1.0 - std::pow(b2, static_cast<double>(step + 1));
  a.eps = config_.eps;
  a.wd = config_.weight_decay;
  a.clip_norm = config_.clip_norm;
  a.use_norm = use_norm ? 1 : 0;
  a.skip_nonfinite = skip_nonfinite_ ? 1 : 0;
  adamw_step_kernel<<<static_cast<unsigned>(total_chunks_), kThreads, 0, stream>>>(
      static_cast<const Record*>(table_), chunk_begin_, static_cast<int>(num_tensors_), a, state_);
  FM_CHECK_LAUNCH();
}

AdamWGpuState AdamWGpu::state(cudaStream_t stream) const {
  AdamWGpuState s{};
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  FM_CHECK_CUDA(cudaMemcpy(&s, state_, sizeof s, cudaMemcpyDeviceToHost));
  return s;
}

}  // namespace fp8moe
