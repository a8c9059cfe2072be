// Redundant experts (V3's serving deployments; EPLB's output, fp8moe/eplb/eplb.h): a MoE layer's
// E logical experts held in P >= E physical slots, a heavy expert in several. Slot s lives on EP
// rank s / (P / ranks), as the plain layout's expert e lives on rank e / (E / ranks). The router
// still chooses logical experts (its scores, bias and load statistics are logical); each chosen
// expert is then mapped to one of its replicas, and the dispatch, the experts' GEMMs and the
// combine run over the P slots.
//
// The replica a token takes depends only on its position and the expert (replica_index), not on
// its row in the batch nor on the other tokens: a request's tokens then do not depend on what it
// is batched with (serving's batch invariance), the map needs no counters (capturable in a CUDA
// graph), and an expert's tokens spread evenly over its replicas when positions vary. A replica
// computes bit for bit what its original does (the same weights, the same kernels), so on one
// rank the layer's output does not change; over several, only the order of the combine's sum
// over ranks can (the copies may sit on other ranks than the original).
#pragma once

#include <cstdint>
#include <vector>

#include "fp8moe/core/host_device.h"

namespace fp8moe {

class ExpertPlacement {
 public:
  ExpertPlacement() = default;
  // Slot s holds logical expert e = s (no replicas).
  static ExpertPlacement identity(int experts);
  // phy2log[s]: the logical expert of slot s (EPLB's phy2log row). Throws kInvalidArgument
  // naming the problem: an id outside [0, experts), an expert with no slot, P < experts.
  static ExpertPlacement from_phy2log(int experts, std::vector<int32_t> phy2log);

  int logical() const { return logical_; }
  int physical() const { return static_cast<int>(phy2log_.size()); }
  int max_replicas() const { return max_replicas_; }
  bool is_identity() const;
  const std::vector<int32_t>& phy2log() const { return phy2log_; }
  // [E]: slots of each expert; [E, max_replicas()]: its slots ascending, -1 padded.
  const std::vector<int32_t>& logcnt() const { return logcnt_; }
  const std::vector<int32_t>& log2phy() const { return log2phy_; }
  // The slots rank r of `ranks` holds: [r * P / ranks, (r + 1) * P / ranks). Throws
  // kInvalidArgument unless P % ranks == 0.
  std::vector<int32_t> rank_slots(int rank, int ranks) const;

 private:
  int logical_ = 0;
  int max_replicas_ = 0;
  std::vector<int32_t> phy2log_, logcnt_, log2phy_;
};

// Which of `count` replicas of `expert` a token at position `pos` takes, in [0, count): a hash of
// both (host and device compute the same).
FM_HD_INLINE int32_t replica_index(int32_t pos, int32_t expert, int32_t count) {
  uint32_t h =
      static_cast<uint32_t>(pos) * 0x9E3779B1u ^ static_cast<uint32_t>(expert) * 0x85EBCA77u;
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x846CA68Bu;
  h ^= h >> 16;
  return count <= 1 ? 0 : static_cast<int32_t>(h % static_cast<uint32_t>(count));
}

// topk_logical [T, K] (ids outside [0, E) pass through unchanged: the router's dropped slots),
// pos [T] -> topk_physical [T, K]: row t's expert e becomes log2phy[e][replica_index(pos[t], e,
// logcnt[e])].
void map_to_physical_reference(const ExpertPlacement& placement, const int32_t* topk_logical,
                               const int32_t* pos, int64_t tokens, int top_k,
                               int32_t* topk_physical);

}  // namespace fp8moe
