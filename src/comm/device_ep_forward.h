// Internal to the comm module: the two-stage (cross-node) route of the device back end
// (src/comm/sm90_device_ep_forward.cu). DeviceEpRank hands every call to a ForwardEpRank when its
// config has more than one node (EpConfig::gpus_per_node < num_ranks); DeviceEpGroup makes the
// network hop's NCCL communicators with forward_network_comms.
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <string>
#include <vector>

#include "fp8moe/comm/device_ep.h"

namespace fp8moe::comm::detail {

class ForwardEpRank {
 public:
  ForwardEpRank(const EpConfig& cfg, int rank, int device, const DeviceEpOptions& opt);
  ~ForwardEpRank();
  ForwardEpRank(const ForwardEpRank&) = delete;
  ForwardEpRank& operator=(const ForwardEpRank&) = delete;

  void* workspace() const;
  cudaIpcMemHandle_t ipc_handle() const;
  void connect(const std::vector<void*>& bases);
  void connect_ipc(const std::vector<cudaIpcMemHandle_t>& handles);
  void dispatch_send(const DeviceBatch& batch, cudaStream_t stream);
  void dispatch_recv(cudaStream_t stream);
  void combine_send(const uint16_t* y, bool weighted, cudaStream_t stream);
  void combine_recv(uint16_t* out, cudaStream_t stream);
  DeviceRecvView view() const;
  void check() const;
  DispatchResult download() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Wire::kNccl across nodes: one communicator per local index, over the ranks of that index (one
// per node, comm rank = node), made with ncclCommInitAll; returned per rank (ncclComm_t as void*).
// kInvalidArgument when two ranks of one such group share a device (NCCL takes one rank per GPU).
std::vector<void*> forward_network_comms(const EpConfig& cfg, const std::vector<int>& devices);

// Diagnostics (tests): a rank's epochs, block counters, flags and error record, copied on a
// stream of its own while its kernels may still run (ws: DeviceEpRank::workspace()).
std::string forward_debug_state(const EpConfig& cfg, int rank, int device, const void* ws);

}  // namespace fp8moe::comm::detail
