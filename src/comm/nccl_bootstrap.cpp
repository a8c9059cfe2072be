// NCCL communicator bootstrap through the launcher's store (fp8moe/comm/nccl_bootstrap.h).
// Test: tests/comm/device_ep_multiprocess_gpu_test.cu (EpMultiProcess*, 2 GPUs).
#include "fp8moe/comm/nccl_bootstrap.h"

#if defined(FP8MOE_HAVE_NCCL)

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"

namespace fp8moe::comm {

void* nccl_comm_init_group(Store& store, int device, const std::string& name, int group_rank,
                           int group_size, double timeout_s) {
  FM_CHECK_ARG(group_size >= 1 && group_rank >= 0 && group_rank < group_size, "rank ", store.rank(),
               ": group rank ", group_rank, " of ", group_size, " for communicator '", name, "'");
  // NOTE: NVLink multicast can take the host's GPUs out of service; off unless the user chose.
  ::setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
  const std::string key = "nccl/" + name + "/unique_id";
  ncclUniqueId id;
  if (group_rank == 0) {
    const ncclResult_t r = ncclGetUniqueId(&id);
    if (r != ncclSuccess)
      FM_THROW(ErrorKind::kNccl, "rank ", store.rank(), ": ncclGetUniqueId for communicator '",
               name, "' failed: ", ncclGetErrorString(r));
    store.set(key, std::string_view(reinterpret_cast<const char*>(&id), sizeof(id)));
  } else {
    const std::string bytes = store.get(key, timeout_s);
    FM_CHECK(bytes.size() == sizeof(id), "rank ", store.rank(), ": store key '", key, "' holds ",
             bytes.size(), " bytes, an ncclUniqueId has ", sizeof(id));
    std::memcpy(&id, bytes.data(), sizeof(id));
  }
  FM_CHECK_CUDA(cudaSetDevice(device));
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRank(&comm, group_size, id, group_rank);
  if (r != ncclSuccess)
    FM_THROW(ErrorKind::kNccl, "rank ", store.rank(), " (device ", device, ", rank ", group_rank,
             " of ", group_size, " in communicator '", name,
             "'): ncclCommInitRank failed: ", ncclGetErrorString(r));
  return comm;
}

void* nccl_comm_init_rank(Store& store, int device, const std::string& name, double timeout_s) {
  return nccl_comm_init_group(store, device, name, store.rank(), store.world_size(), timeout_s);
}

void* ep_nccl_comm_init(Store& store, const EpConfig& cfg, int device, const std::string& name,
                        double timeout_s) {
  // NOTE: only the topology matters here (num_ranks, gpus_per_node).
  FM_CHECK_ARG(
      cfg.num_ranks > 0 && cfg.gpus_per_node >= 0 && cfg.num_ranks % cfg.ranks_per_node() == 0,
      "gpus_per_node=", cfg.gpus_per_node, " does not divide num_ranks=", cfg.num_ranks);
  FM_CHECK_ARG(store.world_size() == cfg.num_ranks, "rank ", store.rank(), ": the store has ",
               store.world_size(), " ranks, the EP config ", cfg.num_ranks);
  if (cfg.nodes() == 1) return nccl_comm_init_rank(store, device, name, timeout_s);
  // The network hop of the two-stage route: the ranks of one local index, one per node.
  const int rank = store.rank();
  return nccl_comm_init_group(store, device, name + "/local" + std::to_string(cfg.local_of(rank)),
                              cfg.node_of(rank), cfg.nodes(), timeout_s);
}

void nccl_comm_destroy(void* comm) {
  if (comm) ncclCommDestroy(static_cast<ncclComm_t>(comm));
}

}  // namespace fp8moe::comm

#endif  // FP8MOE_HAVE_NCCL
