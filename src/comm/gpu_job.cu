// GpuJob (comm/gpu_job.h).
#include "fp8moe/comm/gpu_job.h"

#include <cstring>
#include <map>
#include <string_view>
#include <vector>

#include "fp8moe/comm/nccl_bootstrap.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"

namespace fp8moe::comm {

GpuJob::~GpuJob() {
#if defined(FP8MOE_HAVE_NCCL)
  if (nccl != nullptr) nccl_comm_destroy(nccl);
#endif
}

void GpuJob::barrier(const std::string& name) const {
  if (world > 1) store->barrier(prefix + name, kStoreWaitS);
}

void join_gpu_job(int device, const std::string& who, const std::string& kind, GpuJob& job) {
  static std::map<std::string, int> jobs;  // per kind: this process's jobs so far
  job.device = device;
  job.prefix = kind + std::to_string(jobs[kind]++) + "/";
  if (!launched_as_rank()) return;
  const RankEnv env = rank_env();
  if (env.world_size == 1) return;
#if defined(FP8MOE_HAVE_NCCL)
  FM_CHECK_ARG(env.local_world_size == env.world_size, who, " runs on one host: ", env.world_size,
               " ranks, ", env.local_world_size, " on this host");
  int count = 0;
  FM_CHECK_CUDA(cudaGetDeviceCount(&count));
  job.rank = env.rank;
  job.world = env.world_size;
  job.device = rank_device(env, count);
  job.store = std::make_unique<Store>(Store::from_env());
  const std::vector<std::string> devices =
      job.store->all_gather(job.prefix + "device", std::to_string(job.device), GpuJob::kStoreWaitS);
  for (int r = 0; r < job.world; ++r)
    for (int q = 0; q < r; ++q)
      FM_CHECK_ARG(devices[q] != devices[r], who, " takes one GPU per rank (NCCL): ", "ranks ", q,
                   " and ", r, " both drive device ", devices[r], " (", count, " visible)");
  job.nccl = nccl_comm_init_rank(*job.store, job.device, job.prefix + "nccl", GpuJob::kStoreWaitS);
#else
  FM_THROW(ErrorKind::kInvalidArgument, who, " over ", env.world_size,
           " ranks needs NCCL: this build has none (cmake/Fp8moeNccl.cmake)");
#endif
}

std::unique_ptr<DeviceEpRank> make_job_ep_rank(GpuJob& job, int block, const EpConfig& cfg) {
  auto ep = std::make_unique<DeviceEpRank>(cfg, job.rank, job.device);
  const cudaIpcMemHandle_t mine = ep->ipc_handle();
  const std::string key = job.prefix + "ep/" + std::to_string(block);
  const std::vector<std::string> all = job.store->all_gather(
      key, std::string_view(reinterpret_cast<const char*>(&mine), sizeof mine),
      GpuJob::kStoreWaitS);
  std::vector<cudaIpcMemHandle_t> handles(all.size());
  for (size_t r = 0; r < all.size(); ++r) {
    FM_CHECK(all[r].size() == sizeof(cudaIpcMemHandle_t), "store key ", key, " of rank ", r,
             " holds ", all[r].size(), " bytes");
    std::memcpy(&handles[r], all[r].data(), sizeof(cudaIpcMemHandle_t));
  }
  ep->connect_ipc(handles);
  job.barrier("ep/" + std::to_string(block) + "/connected");
  return ep;
}

}  // namespace fp8moe::comm
