// Internal to the comm module: combine backward on the NVLink kernels (sm90_device_ep_backward.cu),
// run by DeviceEpRank::combine_backward_send / combine_backward_recv (sm90_device_ep.cu) on one
// node with the normal kernels' layout (grouped, or masked without the low-latency kernels).
// It reads the last dispatch's fields of the workspace (handle, received slots, layout) and
// stages the grad_out rows in the combine stage: a combine backward is one more epoch of the
// forward's combine sequence (its counter and acknowledgements), so combine and combine backward
// share that buffer safely in any order. Only its arrival flags and the returned gate-weight
// gradients are its own (a region of the workspace, `bwd`).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "sm90_device_ep_ll.h"

namespace fp8moe::comm::bwd {

// Error-record counter ids, after the normal kernels' (sm90_device_ep_kernels.cuh) and the ll ones.
enum Counter : int {
  kRows = 24,   // [rank][src]: grad_out rows of src staged at rank
  kGradW = 25,  // [rank][src]: src's gate-weight gradients of rank's tokens returned
};
// "combine_bwd.rows" etc., nullptr for other ids.
const char* counter_name(int counter);

// Bytes of the `bwd` region: R row flags, R gradient flags, then block counters.
size_t region_bytes(int num_ranks);

// Byte offsets of the workspace fields these kernels use (identical on every rank).
struct Fields {
  size_t comb_stage;  // [R src][Tmax][H] BF16: grad_out rows by (source, slot)
  size_t ack;         // the forward's combine acknowledgements: R u64 (FlagGroup kCombineAck)
  size_t gw;          // [R][Tmax][K] float: returned gradients by (expert rank, slot)
  size_t gw_mask;     // [R][Tmax] u32: bit k set where that rank owns slot k
  size_t bwd;         // region_bytes(R)
  size_t peer_table, slot, status, recv_count, row_weight, token_rows;
};

struct Params {
  Fields f;
  char* my = nullptr;  // this rank's workspace
  ll::ErrRecord* err = nullptr;
  int rank = 0, R = 0, K = 0;
  int64_t H = 0, Tmax = 0, bound = 0;
  int send_blocks = 1, recv_blocks = 1;
  unsigned long long timeout_ns = 0;
  // status[] slots: the combine epoch, the dispatch overflow, and the combine send blocks done
  // ever (combine_recv checks epoch x send_blocks of them, so the send counts its blocks too).
  int st_seq = 0, st_overflow = 0, st_sent = 0;
  int ctr_ack = 0;  // error id of the combine acknowledgement counter
  // per call
  int64_t T = 0;  // tokens of the last dispatch_send
  const uint16_t* grad_out = nullptr;
  const uint16_t* y = nullptr;
  uint16_t* grad_y = nullptr;
  float* grad_w = nullptr;
};

// Loads the kernels now (a lazy first launch could wait on a device that a peer's spinning
// kernel keeps busy).
void prepare();
// Stages grad_out [T, H] at every rank that received each token (after the previous combine
// epoch's acknowledgements), then raises the row flags.
void send(const Params& p, cudaStream_t stream);
// Zeroes grad_y, computes every received slot's grad_y row and gate-weight gradient, returns the
// gradients to their sources, then gathers grad_w [T, K] from them.
void recv(const Params& p, cudaStream_t stream);

}  // namespace fp8moe::comm::bwd
