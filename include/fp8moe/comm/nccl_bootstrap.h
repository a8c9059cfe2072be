// NCCL communicators for ranks started one process per GPU (fp8moe/comm/launcher.h): rank 0 makes
// the ncclUniqueId, it travels through the job's rendezvous store, and every rank joins with
// ncclCommInitRank on its device. The communicator is returned as void* so that callers need no
// NCCL header (DeviceEpOptions::nccl_comm takes it as is).
//
// Only in builds with NCCL (FP8MOE_HAVE_NCCL, cmake/Fp8moeNccl.cmake). NVLink multicast stays off:
// NCCL_NVLS_ENABLE is set to 0 before the communicator is made unless the environment already
// sets it (the launcher sets it for its ranks).
// Tested in tests/comm/device_ep_multiprocess_gpu_test.cu (one process per GPU, one node and
// two-stage topologies).
#pragma once

#if defined(FP8MOE_HAVE_NCCL)

#include <string>

#include "fp8moe/comm/ep.h"
#include "fp8moe/comm/launcher.h"

namespace fp8moe::comm {

// Collective over the store's ranks: every rank calls it with the same `name` (one name per
// communicator of the job). `device` is this rank's CUDA device (made current). Errors name the
// rank; a rank 0 that never publishes the id ends in the store's timeout naming the key.
void* nccl_comm_init_rank(Store& store, int device, const std::string& name = "nccl",
                          double timeout_s = 60);
// A communicator over some of the store's ranks: each member calls it with the group's own
// `name` (distinct per group), its rank in the group and the group's size; the member of group
// rank 0 makes the id. Ranks outside the group do not call it.
void* nccl_comm_init_group(Store& store, int device, const std::string& name, int group_rank,
                           int group_size, double timeout_s = 60);
// The communicator DeviceEpOptions::nccl_comm takes for Wire::kNccl, for the rank store.rank()
// of `cfg` (store ranks = EP ranks): one node, over all ranks; several nodes, over the ranks of
// this rank's local index, comm rank = node (the network hop of the two-stage route), as
// DeviceEpGroup makes them in one process. Every rank of the store calls it with the same cfg and
// name; only num_ranks and gpus_per_node are read. kInvalidArgument when the store's size is not
// cfg.num_ranks or gpus_per_node does not divide it.
void* ep_nccl_comm_init(Store& store, const EpConfig& cfg, int device,
                        const std::string& name = "ep", double timeout_s = 60);
// Destroys a communicator of nccl_comm_init_rank (nullptr is ignored).
void nccl_comm_destroy(void* comm);

}  // namespace fp8moe::comm

#endif  // FP8MOE_HAVE_NCCL
