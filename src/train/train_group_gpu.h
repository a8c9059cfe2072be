// The ranks of a GPU training job (`fp8moe launch -n R -- fp8moe train --device gpu`; one process
// per GPU, one host) as the GPU trainer sees them, and what they do together each step. Internal
// to the train module (trainer_gpu.cu, optimizer_state_gpu.cu).
//
// Rank r holds the routed experts [r E / R, (r + 1) E / R) of every MoE block and a copy of every
// other tensor; it runs forward and backward on its share of the global batch (rows [r B / R,
// (r + 1) B / R) of the batch the one-GPU run would take), the MoE blocks exchanging tokens over
// EP (DeviceEpRank, CUDA IPC); then the copies' gradients are averaged (NCCL), the experts'
// scaled by 1 / R (each rank's loss is a mean over its own tokens), the expert loads summed and
// the losses averaged, and the grad norm reduced, so every rank takes the same optimizer step and
// the job computes what one GPU computes on the whole batch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "fp8moe/comm/device_ep.h"
#include "fp8moe/comm/gpu_job.h"
#include "fp8moe/model/model_gpu.h"
#include "fp8moe/train/trainer_gpu.h"

namespace fp8moe::train_detail {

// The trainer's job (comm/gpu_job.h): its store keys start with "train<k>/".
using TrainGroup = comm::GpuJob;

// This process alone (g.device), or, started as a rank of a launched job of several, that job:
// its device, store and NCCL communicator. kInvalidArgument when ranks share a GPU, span hosts,
// or the build has no NCCL.
void join_group(const GpuTrainOptions& g, TrainGroup& group);

// This rank's rows of a global batch of whole windows.
std::vector<int32_t> rank_rows(const std::vector<int32_t>& batch, const TrainGroup& group,
                               int64_t window);

// The job's mean of each rank's losses (equal token counts, so the mean over all tokens).
void reduce_loss(TrainGroup& group, LossGpu* loss, cudaStream_t s);

// How the replicated tensors' gradients are averaged.
enum class GradAverage {
  kAllReduce,      // all of them, after the backward
  kBesideBlocks,   // the decoder blocks' already (OverlappedReduce), the rest after the backward
  kReduceScatter,  // a sharded optimizer's: each rank gets its share's average only
};

// After forward_backward, on every rank in the same order (capturable): the job's gradients,
// expert loads and losses.
void reduce_step(TrainGroup& group, ModelGpu& model, LossGpu* loss, GradAverage how,
                 cudaStream_t s);

// The decoder blocks' gradient averages on a second stream while the backward goes on
// (GpuTrainOptions::overlap_reduce): ModelGpu::set_grad_ready enqueues each block's all-reduce
// behind an event of the main stream; join() makes the main stream wait for all of them.
class OverlappedReduce {
 public:
  OverlappedReduce(TrainGroup& group, ModelGpu& model);
  ~OverlappedReduce();
  OverlappedReduce(const OverlappedReduce&) = delete;
  OverlappedReduce& operator=(const OverlappedReduce&) = delete;
  void join(cudaStream_t s);

 private:
  void reduce(FloatSpan grads, cudaStream_t s);
  TrainGroup& group_;
  cudaStream_t side_ = nullptr;
  cudaEvent_t ready_ = nullptr, done_ = nullptr;
};

}  // namespace fp8moe::train_detail
