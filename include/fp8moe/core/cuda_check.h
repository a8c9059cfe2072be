// FM_CHECK_CUDA / FM_CHECK_LAUNCH for .cu files: a failed CUDA call becomes an fp8moe::Error
// naming the call, the CUDA error and the source line.
#pragma once

#include <cuda_runtime.h>

#include "fp8moe/core/error.h"

#define FM_CHECK_CUDA(call)                                                                       \
  do {                                                                                            \
    cudaError_t fm_status_ = (call);                                                              \
    if (fm_status_ != cudaSuccess) [[unlikely]]                                                   \
      FM_THROW(::fp8moe::ErrorKind::kCuda, #call " failed: ", cudaGetErrorName(fm_status_), " (", \
               cudaGetErrorString(fm_status_), ")");                                              \
  } while (0)

// After every kernel launch: catches bad launch configurations at once.
#define FM_CHECK_LAUNCH() FM_CHECK_CUDA(cudaGetLastError())
