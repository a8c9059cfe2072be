// Redundant experts on the GPU: a placement's tables on a device and the logical -> physical map
// of the router's choices (moe/expert_placement.h has the contract and the CPU reference).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fp8moe/moe/expert_placement.h"

namespace fp8moe {

// The placement's tables on a device, for map_to_physical_cuda.
class ExpertPlacementGpu {
 public:
  // On the current device.
  explicit ExpertPlacementGpu(const ExpertPlacement& placement);
  ~ExpertPlacementGpu();
  ExpertPlacementGpu(const ExpertPlacementGpu&) = delete;
  ExpertPlacementGpu& operator=(const ExpertPlacementGpu&) = delete;
  const ExpertPlacement& host() const { return host_; }
  const int32_t* logcnt() const { return logcnt_; }
  const int32_t* log2phy() const { return log2phy_; }

 private:
  ExpertPlacement host_;
  int32_t* logcnt_ = nullptr;  // [E] then log2phy [E, max_replicas]: one allocation
  int32_t* log2phy_ = nullptr;
};

// map_to_physical_reference on device arrays (enqueue only: capturable). topk_physical may not
// alias topk_logical.
void map_to_physical_cuda(const ExpertPlacementGpu& placement, const int32_t* topk_logical,
                          const int32_t* pos, int64_t tokens, int top_k, int32_t* topk_physical,
                          cudaStream_t stream);

}  // namespace fp8moe
