// The GPU trainer's state beside the optimizer (train/train_state_gpu.h): the initial weights,
// the weights' moving average and the routers' bias update, each the CPU trainer's arithmetic.
// Tables of tensors are walked as AdamWGpu walks them: a block per chunk, a binary search over
// the tensors' first chunks.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/train/train_state_gpu.h"

namespace fp8moe {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 4096;                       // elements of one block
constexpr uint64_t kNormalStream = uint64_t{1} << 63;  // PhiloxStream::normal's stream offset

struct TensorRecord {
  float* dst;
  const float* src;  // the weights (EMA); unused by the init
  int64_t numel;
  int64_t index;  // the parameter's index (its Philox stream)
  int32_t first_chunk;
  int32_t kind;  // init: 0 normal, 1 ones (a norm), 2 zeros (a buffer)
};

__device__ int find_tensor(const TensorRecord* recs, int n, int32_t chunk) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (recs[mid].first_chunk <= chunk)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

__global__ void __launch_bounds__(kThreads)
    init_kernel(const TensorRecord* recs, int n, uint64_t seed, double init_std) {
  const int32_t chunk = static_cast<int32_t>(blockIdx.x);
  const TensorRecord r = recs[find_tensor(recs, n, chunk)];
  const int64_t c0 = static_cast<int64_t>(chunk - r.first_chunk) * kChunk;
  const int64_t c1 = min(r.numel, c0 + kChunk);
  for (int64_t i = c0 + threadIdx.x; i < c1; i += kThreads) {
    float v = 0.0f;
    if (r.kind == 0)
      v = static_cast<float>(__dmul_rn(
          init_std,
          static_cast<double>(philox_normal(seed, kNormalStream + static_cast<uint64_t>(r.index),
                                            static_cast<uint64_t>(i)))));
    else if (r.kind == 1)
      v = 1.0f;
    r.dst[i] = v;
  }
}

__global__ void __launch_bounds__(kThreads)
    ema_kernel(const TensorRecord* recs, int n, float d, float one_minus) {
  const int32_t chunk = static_cast<int32_t>(blockIdx.x);
  const TensorRecord r = recs[find_tensor(recs, n, chunk)];
  const int64_t c0 = static_cast<int64_t>(chunk - r.first_chunk) * kChunk;
  const int64_t c1 = min(r.numel, c0 + kChunk);
  // WeightEma: ema = d * ema + one_minus * w, each product rounded (no FMA on the CPU either).
  for (int64_t i = c0 + threadIdx.x; i < c1; i += kThreads)
    r.dst[i] = __fadd_rn(__fmul_rn(d, r.dst[i]), __fmul_rn(one_minus, __ldg(r.src + i)));
}

struct BiasRecord {
  float* bias;
  const int32_t* load;
  int32_t experts;
};

__global__ void __launch_bounds__(kThreads) bias_kernel(const BiasRecord* recs, float gamma) {
  const BiasRecord r = recs[blockIdx.x];
  __shared__ long long warp_sums[kThreads / 32];
  long long s = 0;
  for (int i = threadIdx.x; i < r.experts; i += kThreads) s += __ldg(r.load + i);
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = s;
  __syncthreads();
  long long total = 0;
  for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  // update_bias: compare load * E with the total (exact in integers), bias += gamma * sign.
  for (int i = threadIdx.x; i < r.experts; i += kThreads) {
    const long long scaled = static_cast<long long>(__ldg(r.load + i)) * r.experts;
    const float sign = scaled < total ? 1.0f : (scaled > total ? -1.0f : 0.0f);
    r.bias[i] = __fadd_rn(r.bias[i], __fmul_rn(gamma, sign));
  }
}

// Chunks of every record, their first chunk set; returns the total.
int64_t assign_chunks(std::vector<TensorRecord>& recs) {
  int64_t chunks = 0;
  for (TensorRecord& r : recs) {
    r.first_chunk = static_cast<int32_t>(chunks);
    chunks += (r.numel + kChunk - 1) / kChunk;
    FM_CHECK_ARG(chunks < (int64_t{1} << 31), "train state: more than 2^31 chunks of ", kChunk);
  }
  return chunks;
}

void* upload_table(const void* data, size_t bytes) {
  void* p = nullptr;
  FM_CHECK_CUDA(cudaMalloc(&p, bytes == 0 ? 1 : bytes));
  if (bytes > 0) FM_CHECK_CUDA(cudaMemcpy(p, data, bytes, cudaMemcpyHostToDevice));
  return p;
}

}  // namespace

namespace {
__global__ void scale_kernel(float* x, int64_t n, float factor) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = __fmul_rn(x[i], factor);
}
}  // namespace

void scale_f32_gpu(float* x, int64_t n, float factor, cudaStream_t stream) {
  FM_CHECK_ARG(n >= 0 && (n == 0 || x != nullptr), "scale_f32_gpu: ", n, " elements at ", x);
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 4096);
  scale_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(x, n, factor);
  FM_CHECK_LAUNCH();
}

void init_parameters_gpu(const std::vector<ParameterGpu>& params,
                         const std::vector<ParameterGpu>& buffers, uint64_t seed, double init_std,
                         cudaStream_t stream) {
  std::vector<TensorRecord> recs;
  for (size_t i = 0; i < params.size(); ++i) {
    const ParameterGpu& p = params[i];
    FM_CHECK_ARG(p.value != nullptr && p.numel > 0, "init_parameters_gpu: parameter '", p.name,
                 "' has no storage");
    // NOTE: ParamStore::add: a parameter without weight decay is a norm (filled with ones).
    recs.push_back({p.value, nullptr, p.numel, p.index, 0, p.weight_decay ? 0 : 1});
  }
  for (const ParameterGpu& b : buffers)
    if (b.numel > 0) recs.push_back({b.value, nullptr, b.numel, 0, 0, 2});
  if (recs.empty()) return;
  const int64_t chunks = assign_chunks(recs);
  void* table = upload_table(recs.data(), recs.size() * sizeof(TensorRecord));
  init_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
      static_cast<const TensorRecord*>(table), static_cast<int>(recs.size()), seed, init_std);
  FM_CHECK_LAUNCH();
  // The table is small and this runs once: wait rather than keep it.
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  cudaFree(table);
}

WeightEmaGpu::WeightEmaGpu(const std::vector<ParameterGpu>& params, double decay,
                           cudaStream_t stream)
    : decay_(decay) {
  FM_CHECK_ARG(decay >= 0 && decay < 1, "WeightEmaGpu: decay ", decay, " outside [0, 1)");
  std::vector<size_t> offsets;
  size_t bytes = 0;
  for (const ParameterGpu& p : params) {
    offsets.push_back(bytes);
    bytes += (static_cast<size_t>(p.numel) * sizeof(float) + 255) / 256 * 256;
  }
  FM_CHECK_CUDA(cudaMalloc(&arena_, bytes == 0 ? 1 : bytes));
  std::vector<TensorRecord> recs;
  for (size_t i = 0; i < params.size(); ++i) {
    float* dst = reinterpret_cast<float*>(static_cast<char*>(arena_) + offsets[i]);
    values_.push_back(dst);
    FM_CHECK_CUDA(cudaMemcpyAsync(dst, params[i].value, params[i].numel * sizeof(float),
                                  cudaMemcpyDeviceToDevice, stream));
    if (params[i].numel > 0)
      recs.push_back({dst, params[i].value, params[i].numel, static_cast<int64_t>(i), 0, 0});
  }
  chunks_ = assign_chunks(recs);
  tensors_ = static_cast<int64_t>(recs.size());
  table_ = upload_table(recs.data(), recs.size() * sizeof(TensorRecord));
}

WeightEmaGpu::~WeightEmaGpu() {
  cudaFree(arena_);
  cudaFree(table_);
}

void WeightEmaGpu::update(cudaStream_t stream) {
  if (chunks_ == 0) return;
  ema_kernel<<<static_cast<unsigned>(chunks_), kThreads, 0, stream>>>(
      static_cast<const TensorRecord*>(table_), static_cast<int>(tensors_),
      static_cast<float>(decay_), static_cast<float>(1.0 - decay_));
  FM_CHECK_LAUNCH();
}

RouterBiasUpdateGpu::RouterBiasUpdateGpu(const std::vector<ParameterGpu>& biases,
                                         const std::vector<const int32_t*>& loads) {
  FM_CHECK_ARG(biases.size() == loads.size(), "router biases (", biases.size(),
               ") do not match the MoE blocks (", loads.size(), ")");
  std::vector<BiasRecord> recs;
  for (size_t b = 0; b < biases.size(); ++b) {
    FM_CHECK_ARG(biases[b].value != nullptr && loads[b] != nullptr && biases[b].numel > 0 &&
                     biases[b].numel < (int64_t{1} << 31),
                 "RouterBiasUpdateGpu: block ", b, " ('", biases[b].name,
                 "') lacks its bias or load");
    recs.push_back({biases[b].value, loads[b], static_cast<int32_t>(biases[b].numel)});
  }
  blocks_ = static_cast<int64_t>(recs.size());
  table_ = upload_table(recs.data(), recs.size() * sizeof(BiasRecord));
}

RouterBiasUpdateGpu::~RouterBiasUpdateGpu() {
  cudaFree(table_);
}

void RouterBiasUpdateGpu::update(double speed, cudaStream_t stream) {
  if (blocks_ == 0) return;
  bias_kernel<<<static_cast<unsigned>(blocks_), kThreads, 0, stream>>>(
      static_cast<const BiasRecord*>(table_), static_cast<float>(speed));
  FM_CHECK_LAUNCH();
}

}  // namespace fp8moe
