// Peer access between the GPUs of one process's serving pieces (GeneratorGroup,
// DisaggregatedGeneratorGpu): internal to the serve module.
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"

namespace fp8moe::serve::detail {

// Every device of `devices` may read and write every other's memory; kInvalidArgument naming
// `who` and the pair when a path is missing. Leaves the current device changed.
inline void enable_peer_access(const std::vector<int>& devices, const std::string& who) {
  for (int a : devices)
    for (int b : devices) {
      if (a == b) continue;
      int ok = 0;
      FM_CHECK_CUDA(cudaDeviceCanAccessPeer(&ok, a, b));
      FM_CHECK_ARG(ok, who, ": device ", a, " cannot access device ", b, " (no peer path)");
      FM_CHECK_CUDA(cudaSetDevice(a));
      const cudaError_t st = cudaDeviceEnablePeerAccess(b, 0);
      if (st == cudaErrorPeerAccessAlreadyEnabled)
        cudaGetLastError();
      else
        FM_CHECK_CUDA(st);
    }
}

}  // namespace fp8moe::serve::detail
