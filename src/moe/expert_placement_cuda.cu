// ExpertPlacementGpu and map_to_physical_cuda (fp8moe/moe/expert_placement.h).
#include <algorithm>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/moe/expert_placement_cuda.h"

namespace fp8moe {
namespace {

__global__ void map_to_physical_kernel(const int32_t* logcnt, const int32_t* log2phy, int experts,
                                       int max_replicas, const int32_t* topk_logical,
                                       const int32_t* pos, int64_t slots, int top_k,
                                       int32_t* topk_physical) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < slots;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t e = topk_logical[i];
    int32_t out = e;
    if (e >= 0 && e < experts) {
      const int32_t r = replica_index(pos[i / top_k], e, logcnt[e]);
      out = log2phy[static_cast<int64_t>(e) * max_replicas + r];
    }
    topk_physical[i] = out;
  }
}

}  // namespace

ExpertPlacementGpu::ExpertPlacementGpu(const ExpertPlacement& placement) : host_(placement) {
  FM_CHECK_ARG(placement.logical() >= 1, "ExpertPlacementGpu: an empty placement");
  const size_t n = host_.logcnt().size() + host_.log2phy().size();
  FM_CHECK_CUDA(cudaMalloc(&logcnt_, n * sizeof(int32_t)));
  log2phy_ = logcnt_ + host_.logcnt().size();
  FM_CHECK_CUDA(cudaMemcpy(logcnt_, host_.logcnt().data(), host_.logcnt().size() * sizeof(int32_t),
                           cudaMemcpyHostToDevice));
  FM_CHECK_CUDA(cudaMemcpy(log2phy_, host_.log2phy().data(),
                           host_.log2phy().size() * sizeof(int32_t), cudaMemcpyHostToDevice));
}

ExpertPlacementGpu::~ExpertPlacementGpu() {
  if (logcnt_ != nullptr) cudaFree(logcnt_);
}

void map_to_physical_cuda(const ExpertPlacementGpu& placement, const int32_t* topk_logical,
                          const int32_t* pos, int64_t tokens, int top_k, int32_t* topk_physical,
                          cudaStream_t stream) {
  FM_CHECK_ARG(tokens >= 0 && top_k >= 1, "map_to_physical_cuda: tokens ", tokens, ", top_k ",
               top_k);
  FM_CHECK_ARG(topk_physical != topk_logical, "map_to_physical_cuda: the output aliases the input");
  const int64_t slots = tokens * top_k;
  if (slots == 0) return;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((slots + 255) / 256, 1024));
  const ExpertPlacement& h = placement.host();
  map_to_physical_kernel<<<blocks, 256, 0, stream>>>(placement.logcnt(), placement.log2phy(),
                                                     h.logical(), h.max_replicas(), topk_logical,
                                                     pos, slots, top_k, topk_physical);
  FM_CHECK_LAUNCH();
}

}  // namespace fp8moe
