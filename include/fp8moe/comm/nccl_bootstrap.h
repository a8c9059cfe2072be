// NCCL communicators for ranks started one process per GPU (fp8moe/comm/launcher.h): rank 0 makes
// the ncclUniqueId, it travels through the job's rendezvous store, and every rank joins with
// ncclCommInitRank on its device. The communicator is returned as void* so that callers need no
// NCCL header (DeviceEpOptions::nccl_comm takes it as is).
//
// Only in builds with NCCL (FP8MOE_HAVE_NCCL, cmake/Fp8moeNccl.cmake). NVLink multicast stays off:
// NCCL_NVLS_ENABLE is set to 0 before the communicator is made unless the environment already
// sets it (the launcher sets it for its ranks).
// Tested in tests/comm/device_ep_multiprocess_gpu_test.cu (2 processes, 2 GPUs).
#pragma once

#if defined(FP8MOE_HAVE_NCCL)

#include <string>

#include "fp8moe/comm/launcher.h"

namespace fp8moe::comm {

// Collective over the store's ranks: every rank calls it with the same `name` (one name per
// communicator of the job). `device` is this rank's CUDA device (made current). Errors name the
// rank; a rank 0 that never publishes the id ends in the store's timeout naming the key.
void* nccl_comm_init_rank(Store& store, int device, const std::string& name = "nccl",
                          double timeout_s = 60);
// Destroys a communicator of nccl_comm_init_rank (nullptr is ignored).
void nccl_comm_destroy(void* comm);

}  // namespace fp8moe::comm

#endif  // FP8MOE_HAVE_NCCL
