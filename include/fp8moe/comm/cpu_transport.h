// The CPU-threads back end: R ranks as threads of one process, talking only through shared
// mailboxes (per-region slots, an "arrived" counter the writer releases and a "consumed" counter
// the reader releases). It implements the two-stage route of fp8moe/comm/ep.h literally: a
// token goes once to the forwarder of each node it touches (the rank of that node with the
// sender's local index; for the sender's own node that is the sender itself), which hands it to
// the ranks of its node; combine reduces per node at the forwarder. Combine backward takes the
// same route: the output gradient rows go out as dispatch sends tokens (through the forwarders,
// into the dispatch's slots), and each slot's K gate-weight gradients come back through the
// forwarder of the token's node (which picks, per k, the one rank that owns it). It is the
// reference the GPU back ends are checked against, and it must itself equal the reference
// functions of ep.h bit for bit.
//
// Every wait is bounded by EpConfig::timeout_s; a peer that never answers raises
// Error(kRuntime) naming this rank, the peer, the counter and the expected vs seen values.
#pragma once

#include <memory>
#include <span>
#include <string>
#include <vector>

#include "fp8moe/comm/ep.h"

namespace fp8moe::comm {

class CpuGroupState;

// The collective interface every back end offers to one rank (host data). Calls are collective:
// every rank of the group makes the same sequence of calls.
class EpRank {
 public:
  virtual ~EpRank() = default;
  virtual int rank() const = 0;
  virtual const EpConfig& config() const = 0;
  virtual DispatchResult dispatch(const TokenBatch& batch) = 0;
  // y: this rank's expert outputs [row bound, H] in its grouped layout; returns [T, H] BF16.
  virtual std::vector<uint16_t> combine(const DispatchResult& d, const uint16_t* y) = 0;
  // rows: one BF16 row per received slot [R * Tmax, H] (dispatch's backward).
  virtual std::vector<uint16_t> combine_tokens(const DispatchResult& d, const uint16_t* rows) = 0;
  // Combine backward (ep.h): grad_out [T, H] BF16 for this rank's tokens, y this rank's expert
  // outputs of the forward [row bound, H]; d must be this back end's dispatch result. Returns
  // grad_y of this rank's expert rows and grad_w [T, K] of its tokens. Sizes are checked
  // (kInvalidArgument naming the rank).
  virtual RankCombineBackward combine_backward(const DispatchResult& d,
                                               std::span<const uint16_t> grad_out,
                                               std::span<const uint16_t> y) = 0;
};

class CpuThreadGroup {
 public:
  explicit CpuThreadGroup(const EpConfig& cfg);
  ~CpuThreadGroup();
  const EpConfig& config() const;
  // The endpoint of rank r (one per thread; the group must outlive it).
  std::unique_ptr<EpRank> rank(int r);

 private:
  std::shared_ptr<CpuGroupState> state_;
};

}  // namespace fp8moe::comm
