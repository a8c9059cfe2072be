// The training loop of trainer.h on one GPU: ModelGpu (model/model_gpu.h) in the FP8 recipe,
// AdamWGpu (FP32 masters, BF16 moments, clipping), the routers' bias update, the weights' EMA and
// the FP8 weight forms refreshed after each step, all on the device; the batches, metrics and
// checkpoints are the CPU trainer's (run_common), so the same options give the same data order,
// a GPU checkpoint resumes on the CPU and back, and `fp8moe generate` samples from it.
// The initial weights are Model(config, seed)'s (train_state_gpu.h), so a CPU run and a GPU run
// start from the same point; their losses then differ by the GPU's BF16 activations and FP8
// requantisation (docs/train/README.md measures it).
// One forward + backward a step, captured once as a CUDA graph and replayed (the batch is copied
// into the same device buffer each step); the optimizer's launches follow it eagerly (the learning
// rate changes each step). One host synchronisation a step reads the losses, the grad norm and
// the error bits.
//
// Several GPUs: started as the ranks of `fp8moe launch -n R -- fp8moe train --device gpu ...`
// (comm/launcher.h; one process per GPU on one host, NCCL), the job trains the same model on the
// same global batch (--batch, split evenly over the ranks) as one GPU would: rank r holds the
// routed experts [r E / R, (r + 1) E / R) of every MoE block (expert parallelism: the MoE blocks
// exchange tokens over DeviceEpRank, CUDA IPC) and a copy of everything else (data parallelism:
// gradients averaged by an NCCL all-reduce inside the step's CUDA graph); the expert loads, the
// losses and the grad norm are reduced over the ranks, so the router biases, the clipping and the
// metrics are the job's. Rank 0 writes the metrics and the checkpoint (the one-GPU format: the
// other ranks' experts reach it through part files beside it), which any rank count, the one-GPU
// trainer and the CPU trainer resume from. Needs E % R == 0, batch % R == 0 and one GPU per rank.
#pragma once

#include "fp8moe/train/trainer.h"

namespace fp8moe {

struct GpuTrainOptions {
  int device = 0;          // one-GPU runs; a launched rank drives comm::rank_device's GPU
  bool cuda_graph = true;  // false: every step launches eagerly (debugging)
  // Each step's metrics line gains its phases' device times (CUDA events, ms): "fb_ms" forward +
  // backward, "reduce_ms" the ranks' reductions (several GPUs), "adam_ms" the optimizer (with the
  // grad norm's reduction), "state_ms" the router bias update and the EMA, "refresh_ms" the FP8
  // weight forms. Costs one host wait a step more (already there: the step's results are read).
  bool phase_times = false;
  // Several GPUs: each decoder block's gradient average runs on a second stream as soon as the
  // block's backward is done, beside the backward of the blocks below (false: one all-reduce of
  // every replicated gradient after the backward). The same sums either way.
  bool overlap_reduce = true;
  // Several GPUs: ZeRO-1 over the ranks — each rank keeps the moments and the EMA of a 1 / R share
  // of the replicated tensors (their gradients reduce-scattered, AdamW on the share, the new
  // values all-gathered) instead of all of them; the routed experts' state stays whole on their
  // rank. Less memory and optimizer time a rank (V3-width layers on 2 x H200: 60.6 against 62.3 ms
  // a step); the gradient average is then not overlapped with the backward (overlap_reduce
  // applies to the replicated optimizer only).
  bool shard_optimizer = true;
};

// o.precision must be fp8 (the recipe; the GPU path has no bf16 / fp32 model). Throws as train()
// does, and kInvalidArgument for a model the GPU path cannot take (ModelGpu's checks).
TrainResult train_gpu(const TrainOptions& o, const GpuTrainOptions& gpu = {});

}  // namespace fp8moe
