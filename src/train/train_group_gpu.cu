// The GPU trainer's job of several ranks (train_group_gpu.h).
#include "train_group_gpu.h"

#include "fp8moe/comm/nccl_collectives.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/train/train_state_gpu.h"

namespace fp8moe::train_detail {

void join_group(const GpuTrainOptions& g, TrainGroup& group) {
  comm::join_gpu_job(g.device, "the GPU trainer", "train", group);
}

std::vector<int32_t> rank_rows(const std::vector<int32_t>& batch, const TrainGroup& group,
                               int64_t window) {
  const size_t per = batch.size() / static_cast<size_t>(group.world);
  FM_CHECK(per * static_cast<size_t>(group.world) == batch.size() &&
               per % static_cast<size_t>(window) == 0,
           "a batch of ", batch.size(), " tokens does not split into ", group.world, " ranks");
  const auto first = batch.begin() + static_cast<std::ptrdiff_t>(per * group.rank);
  return std::vector<int32_t>(first, first + static_cast<std::ptrdiff_t>(per));
}

void reduce_loss(TrainGroup& group, LossGpu* loss, cudaStream_t s) {
  if (group.world == 1) return;
#if defined(FP8MOE_HAVE_NCCL)
  static_assert(sizeof(LossGpu) % sizeof(double) == 0, "LossGpu is doubles only");
  comm::nccl_all_reduce(group.nccl, reinterpret_cast<double*>(loss),
                        static_cast<int64_t>(sizeof(LossGpu) / sizeof(double)),
                        comm::ReduceOp::kAvg, s);
#endif
}

OverlappedReduce::OverlappedReduce(TrainGroup& group, ModelGpu& model) : group_(group) {
  FM_CHECK_CUDA(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking));
  FM_CHECK_CUDA(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
  FM_CHECK_CUDA(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
  model.set_grad_ready([this](FloatSpan grads, cudaStream_t s) { reduce(grads, s); });
}

OverlappedReduce::~OverlappedReduce() {
  cudaEventDestroy(ready_);
  cudaEventDestroy(done_);
  cudaStreamDestroy(side_);
}

void OverlappedReduce::join(cudaStream_t s) {
  FM_CHECK_CUDA(cudaEventRecord(done_, side_));
  FM_CHECK_CUDA(cudaStreamWaitEvent(s, done_, 0));
}

void OverlappedReduce::reduce(FloatSpan grads, cudaStream_t s) {
  FM_CHECK_CUDA(cudaEventRecord(ready_, s));
  FM_CHECK_CUDA(cudaStreamWaitEvent(side_, ready_, 0));
#if defined(FP8MOE_HAVE_NCCL)
  comm::nccl_all_reduce(group_.nccl, grads.data, grads.count, comm::ReduceOp::kAvg, side_);
#endif
}

void reduce_step(TrainGroup& group, ModelGpu& model, LossGpu* loss, GradAverage how,
                 cudaStream_t s) {
  if (group.world == 1) return;
#if defined(FP8MOE_HAVE_NCCL)
  const FloatSpan rep = model.replicated_grads(), own = model.sharded_grads();
  if (how == GradAverage::kReduceScatter) {
    comm::nccl_reduce_scatter(group.nccl, rep.data, rep.count / group.world, comm::ReduceOp::kAvg,
                              group.rank, s);
  } else {
    const std::vector<FloatSpan> spans =
        how == GradAverage::kBesideBlocks ? model.replicated_rest() : std::vector<FloatSpan>{rep};
    for (const FloatSpan& span : spans)
      comm::nccl_all_reduce(group.nccl, span.data, span.count, comm::ReduceOp::kAvg, s);
  }
  scale_f32_gpu(own.data, own.count, 1.0f / static_cast<float>(group.world), s);
  const int64_t E = model.config().n_routed_experts;
  for (int b = 0; b < model.moe_blocks(); ++b)
    comm::nccl_all_reduce(group.nccl, model.expert_load(b), E, comm::ReduceOp::kSum, s);
  reduce_loss(group, loss, s);
#endif
}

}  // namespace fp8moe::train_detail
