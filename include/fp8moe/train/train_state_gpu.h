// The GPU trainer's per-step state beside the optimizer (AdamWGpu, train/adamw_gpu.h), on the
// device, each the same arithmetic as its CPU counterpart in the CPU trainer:
//   init_parameters_gpu   Model(config, seed)'s initial weights: norms 1, every other parameter
//                         float(init_std * philox_normal(seed, 2^63 + index, i)) (the CPU
//                         ParamStore's stream per parameter index), buffers 0. The normal is
//                         computed in double with the device's log / cos, so an element can differ
//                         from the CPU's by one float ulp where those differ from glibc's in the
//                         last double bit (none seen in the test's ~1e6 elements);
//   WeightEmaGpu          WeightEma's average: ema = float(d) * ema + float(1 - d) * w in FP32,
//                         no FMA contraction: bit for bit;
//   RouterBiasUpdateGpu   update_router_bias (moe/balance.h update_bias): bias += gamma * sign(
//                         total - load * E) per MoE block, the comparison exact in integers: bit
//                         for bit.
// Tables of tensors are built once (construction); each call is one launch, stream-ordered,
// allocation-free, capturable. Test: test_train_gpu --gtest_filter='TrainStateGpu*'.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "fp8moe/model/parameter_gpu.h"

namespace fp8moe {

// ParameterGpu::index picks each tensor's stream, so a rank that holds part of the table gets its
// part of the same weights.
void init_parameters_gpu(const std::vector<ParameterGpu>& params,
                         const std::vector<ParameterGpu>& buffers, uint64_t seed, double init_std,
                         cudaStream_t stream);

// x[i] = float(x[i] * factor), i < n (device FP32; exact for a power-of-two factor). The
// expert-parallel trainer's sharded gradients: each rank's loss is a mean over its own tokens, so
// an expert's gradient, summed over every rank's tokens, is `world` times the job's mean.
void scale_f32_gpu(float* x, int64_t n, float factor, cudaStream_t stream);

class WeightEmaGpu {
 public:
  // The average starts at the parameters' current values (copied on `stream`).
  WeightEmaGpu(const std::vector<ParameterGpu>& params, double decay, cudaStream_t stream);
  ~WeightEmaGpu();
  WeightEmaGpu(const WeightEmaGpu&) = delete;
  WeightEmaGpu& operator=(const WeightEmaGpu&) = delete;

  void update(cudaStream_t stream);
  // Device FP32 [numel] of parameter i.
  float* values(size_t i) const { return values_[i]; }
  double decay() const { return decay_; }

 private:
  double decay_;
  std::vector<float*> values_;
  void* arena_ = nullptr;
  void* table_ = nullptr;  // device records
  int64_t tensors_ = 0, chunks_ = 0;
};

class RouterBiasUpdateGpu {
 public:
  // biases[b] (FP32 [E]) with loads[b] (device int32 [E], the last forward's tokens per expert).
  RouterBiasUpdateGpu(const std::vector<ParameterGpu>& biases,
                      const std::vector<const int32_t*>& loads);
  ~RouterBiasUpdateGpu();
  RouterBiasUpdateGpu(const RouterBiasUpdateGpu&) = delete;
  RouterBiasUpdateGpu& operator=(const RouterBiasUpdateGpu&) = delete;

  void update(double speed, cudaStream_t stream);

 private:
  void* table_ = nullptr;
  int64_t blocks_ = 0;
};

}  // namespace fp8moe
