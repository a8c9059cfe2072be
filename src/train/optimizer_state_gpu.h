// The per-element training state of one rank of the GPU trainer beside the model's values: the
// optimizer's BF16 moments and the weights' EMA, kept over "slots" — each of the rank's
// parameters whole or, with the optimizer sharded over the ranks (ZeRO-1: GpuTrainOptions::
// shard_optimizer), the part of each replicated tensor inside this rank's share of the replicated
// run (ModelGpu::replicated_grads) and its routed experts whole — the AdamW over those slots, and
// the checkpoint (the one-GPU format) saved from and loaded into them. Internal to the train
// module (trainer_gpu.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "fp8moe/model/model_gpu.h"
#include "fp8moe/train/adamw_gpu.h"
#include "fp8moe/train/train_state_gpu.h"
#include "fp8moe/train/trainer.h"
#include "train_group_gpu.h"

namespace fp8moe::train_detail {

struct StateSlot {
  size_t param = 0;       // index in ModelGpu::parameters()
  int64_t offset = 0;     // the slot's first element of the tensor
  int64_t count = 0;      // elements
  uint16_t* m = nullptr;  // device BF16 [count]
  uint16_t* v = nullptr;
};

class OptimizerStateGpu {
 public:
  // Moments zero, the EMA equal to the values now; o.adam with its total_steps set. shard needs
  // several ranks. With several ranks the grad norm is reduced over them (each element counted
  // once).
  OptimizerStateGpu(ModelGpu& model, TrainGroup& group, bool shard, const TrainOptions& o,
                    cudaStream_t stream);
  ~OptimizerStateGpu();
  OptimizerStateGpu(const OptimizerStateGpu&) = delete;
  OptimizerStateGpu& operator=(const OptimizerStateGpu&) = delete;

  AdamWGpu& adam() { return *adam_; }
  WeightEmaGpu& ema() { return *ema_; }
  bool sharded() const { return shard_; }
  const std::vector<StateSlot>& slots() const { return slots_; }
  // With a sharded optimizer, after adam().step: every rank's share of the replicated values to
  // every rank (capturable; every rank in the same order).
  void gather_values(cudaStream_t stream);

  // Every rank calls both (they meet at barriers). save: rank 0 writes `path` (the other ranks
  // first write what only they hold to part files beside it, which rank 0 merges and removes).
  void save(const std::string& path, const TrainOptions& o, int64_t step);
  // Each rank reads its values and slots by name; returns the checkpoint's step.
  int64_t load(const std::string& path, const TrainOptions& o);

 private:
  ModelGpu& model_;
  TrainGroup& group_;
  bool shard_ = false;
  std::vector<StateSlot> slots_;
  void* moments_ = nullptr;
  std::unique_ptr<WeightEmaGpu> ema_;
  std::unique_ptr<AdamWGpu> adam_;
};

}  // namespace fp8moe::train_detail
