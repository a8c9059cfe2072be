// The ranks of a one-host GPU job (`fp8moe launch -n R -- fp8moe <command> --device gpu`; one
// process per GPU) as a command sees them: this rank's device, the job's rendezvous store
// (comm/launcher.h), an NCCL communicator, and the MoE blocks' EP endpoints connected over CUDA
// IPC. The GPU trainer (train/trainer_gpu.h) and the GPU generator's CLI (serve/generator_gpu.h)
// both stand on it. A process not started as a rank, or a job of one rank, is a job of one: no
// store, no communicator.
#pragma once

#include <memory>
#include <string>

#include "fp8moe/comm/device_ep.h"
#include "fp8moe/comm/launcher.h"

namespace fp8moe::comm {

struct GpuJob {
  int rank = 0, world = 1, device = 0;
  std::unique_ptr<Store> store;
  void* nccl = nullptr;  // NCCL communicator (world > 1)
  // Every store key and barrier of this job starts with it ("<kind><k>/" for the process's k-th
  // job of that kind), so that jobs one after another in the same ranks never read each other's
  // keys (the same on every rank: each rank makes the same jobs in the same order).
  std::string prefix;
  // Waits of a rendezvous: a checkpoint of a large model may take minutes.
  static constexpr double kStoreWaitS = 600;

  GpuJob() = default;
  GpuJob(const GpuJob&) = delete;
  GpuJob& operator=(const GpuJob&) = delete;
  ~GpuJob();
  bool lead() const { return rank == 0; }
  void barrier(const std::string& name) const;
};

// Joins this process's job: alone on `device`, or, started as a rank of a launched job of
// several, that job (its device, store, NCCL communicator). `who` names the command in errors
// ("the GPU trainer"); `kind` starts the prefix ("train"). kInvalidArgument when ranks share a
// GPU (NCCL takes one GPU a rank), span hosts, or the build has no NCCL.
void join_gpu_job(int device, const std::string& who, const std::string& kind, GpuJob& job);

// The EP endpoint of MoE block `block`, connected to the other ranks' over CUDA IPC (every rank
// calls it for the same blocks in the same order).
std::unique_ptr<DeviceEpRank> make_job_ep_rank(GpuJob& job, int block, const EpConfig& cfg);

}  // namespace fp8moe::comm
