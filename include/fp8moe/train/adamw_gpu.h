// AdamW on the GPU over many parameter tensors in one launch: FP32 master weights, FP32 grads,
// BF16 moments (DeepSeek-V3's recipe), the global gradient norm as a deterministic GPU reduction,
// clipping folded into the update. Element for element the SAME update as fp8moe::AdamW::step
// (train/optimizer.h) after clip_gradients, bit for bit:
//   g  = clipped ? g * float(clip_norm / norm) : g                              (FP32)
//   m' = bf16(float(b1) * m + float(1 - b1) * g)                               (FP32, RN to BF16)
//   v' = bf16(float(b2) * v + float(1 - b2) * g * g)
//   w' = float(w - lr * ((m' / c1) / (sqrt(v' / c2) + eps) + wd * w))          (FP64, IEEE ops)
//   with c1 = 1 - b1^(step+1), c2 = 1 - b2^(step+1), lr = learning_rate(config, step), wd =
//   config.weight_decay for tensors with weight_decay, else 0; no FMA contraction anywhere.
// The grad norm: sqrt of the FP64 sum of g*g (each product exact in FP64) summed in a fixed order
// (per 8192-element chunk: per-thread, warp butterfly, warp order; then the chunks in order), so
// it is bit-reproducible run to run but not the CPU's sequential double sum (relative difference
// ~1e-15 * sqrt(n)); clipped iff clip_norm > 0 and norm > clip_norm, as clip_gradients.
// Non-finite gradients: with skip_nonfinite (default) a NaN/inf norm skips the whole step on the
// device (weights and moments untouched, skipped_steps() counts it); the CPU AdamW would instead
// write NaN into the weights. With skip_nonfinite off and clip_norm == 0 the norm pass is not run
// at all (20 instead of 24 bytes a parameter).
// Optionally each tensor's new weight is also written as BF16 (value_bf16), for the next forward.
// Device pointers; step() is stream-ordered and allocation-free (the tensor table and the small
// state are allocated by the constructor). Test: test_train_gpu --gtest_filter='AdamWGpu*'.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "fp8moe/core/dtypes.h"
#include "fp8moe/train/optimizer.h"

namespace fp8moe {

struct AdamWGpuTensor {
  float* value = nullptr;       // FP32 master weight [numel]
  const float* grad = nullptr;  // FP32 [numel]
  uint16_t* m = nullptr;        // BF16 bits [numel] (zero before the first step)
  uint16_t* v = nullptr;        // BF16 bits [numel]
  int64_t numel = 0;
  bool weight_decay = true;    // false for norms and biases (Parameter::weight_decay)
  bf16* value_bf16 = nullptr;  // optional BF16 copy of the new weight
  // Counted in the grad norm. Data-parallel ranks that hold identical copies of a tensor count
  // it on one rank only, so that the reduced norm (set_norm_reduction) counts it once.
  bool in_norm = true;
};

// The small device state a step leaves behind.
struct AdamWGpuState {
  double grad_norm;  // of the last step's gradients (before clipping)
  float clip_scale;  // applied factor (1 when not clipped)
  int clipped;       // 1 if the last step clipped
  int skipped;       // 1 if the last step was skipped (non-finite norm)
  int unused;
  unsigned long long skipped_total;
};

class AdamWGpu {
 public:
  static constexpr int kThreads = 256;
  static constexpr int64_t kChunk = 8192;  // elements of one block (a tensor's last chunk: fewer)

  AdamWGpu(const AdamWConfig& config, const std::vector<AdamWGpuTensor>& tensors,
           bool skip_nonfinite = true);
  ~AdamWGpu();
  AdamWGpu(const AdamWGpu&) = delete;
  AdamWGpu& operator=(const AdamWGpu&) = delete;

  // One update with the learning rate of `step` (0-based; bias correction uses step + 1).
  void step(int64_t step, cudaStream_t stream);
  // The global grad norm of the current gradients alone (no update), into state().grad_norm.
  void grad_norm(cudaStream_t stream);
  // Ranks of a job that each hold part of the parameters: `reduce` is enqueued on the norm's
  // stream with a device double holding this rank's sum of squares (the tensors with in_norm)
  // and must leave there the sum over the ranks (e.g. an NCCL all-reduce); the clip and skip
  // decisions then read it, so every rank takes the same ones. Not set: the local norm.
  void set_norm_reduction(std::function<void(double* sum_of_squares, cudaStream_t)> reduce);
  // Synchronises `stream` and reads the state.
  AdamWGpuState state(cudaStream_t stream) const;
  const AdamWGpuState* device_state() const { return state_; }

  int64_t total_chunks() const { return total_chunks_; }
  int64_t total_numel() const { return total_numel_; }
  const AdamWConfig& config() const { return config_; }

 private:
  void launch_norm(cudaStream_t stream);

  AdamWConfig config_;
  bool skip_nonfinite_;
  int64_t num_tensors_ = 0, total_chunks_ = 0, total_numel_ = 0;
  void* table_ = nullptr;           // device: tensor records
  int32_t* chunk_begin_ = nullptr;  // device: [num_tensors + 1] first chunk of each tensor
  double* partial_ = nullptr;       // device: [total_chunks] norm partials
  AdamWGpuState* state_ = nullptr;  // device
  double* norm_sum_ = nullptr;      // device: the sum of squares a norm reduction reduces
  std::function<void(double*, cudaStream_t)> norm_reduction_;
};

}  // namespace fp8moe
