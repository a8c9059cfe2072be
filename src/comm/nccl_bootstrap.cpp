// NCCL communicator bootstrap through the launcher's store (fp8moe/comm/nccl_bootstrap.h).
// Test: tests/comm/device_ep_multiprocess_gpu_test.cu (EpMultiProcess*, 2 GPUs).
#include "fp8moe/comm/nccl_bootstrap.h"

#if defined(FP8MOE_HAVE_NCCL)

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdlib>
#include <cstring>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"

namespace fp8moe::comm {

void* nccl_comm_init_rank(Store& store, int device, const std::string& name, double timeout_s) {
  // NOTE: NVLink multicast can take the host's GPUs out of service; off unless the user chose.
  ::setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
  const std::string key = "nccl/" + name + "/unique_id";
  ncclUniqueId id;
  if (store.rank() == 0) {
    const ncclResult_t r = ncclGetUniqueId(&id);
    if (r != ncclSuccess)
      FM_THROW(ErrorKind::kNccl, "rank 0: ncclGetUniqueId for communicator '", name,
               "' failed: ", ncclGetErrorString(r));
    store.set(key, std::string_view(reinterpret_cast<const char*>(&id), sizeof(id)));
  } else {
    const std::string bytes = store.get(key, timeout_s);
    FM_CHECK(bytes.size() == sizeof(id), "rank ", store.rank(), ": store key '", key, "' holds ",
             bytes.size(), " bytes, an ncclUniqueId has ", sizeof(id));
    std::memcpy(&id, bytes.data(), sizeof(id));
  }
  FM_CHECK_CUDA(cudaSetDevice(device));
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRank(&comm, store.world_size(), id, store.rank());
  if (r != ncclSuccess)
    FM_THROW(ErrorKind::kNccl, "rank ", store.rank(), " (device ", device,
             "): ncclCommInitRank for communicator '", name, "' of ", store.world_size(),
             " ranks failed: ", ncclGetErrorString(r));
  return comm;
}

void nccl_comm_destroy(void* comm) {
  if (comm) ncclCommDestroy(static_cast<ncclComm_t>(comm));
}

}  // namespace fp8moe::comm

#endif  // FP8MOE_HAVE_NCCL
