// ExpertPlacement (fp8moe/moe/expert_placement.h): the tables of a placement with redundant
// experts, and the CPU map from logical to physical expert ids.
#include "fp8moe/moe/expert_placement.h"

#include <algorithm>
#include <utility>

#include "fp8moe/core/error.h"

namespace fp8moe {

ExpertPlacement ExpertPlacement::identity(int experts) {
  std::vector<int32_t> phy2log(static_cast<size_t>(std::max(experts, 0)));
  for (int e = 0; e < experts; ++e) phy2log[static_cast<size_t>(e)] = e;
  return from_phy2log(experts, std::move(phy2log));
}

ExpertPlacement ExpertPlacement::from_phy2log(int experts, std::vector<int32_t> phy2log) {
  FM_CHECK_ARG(experts >= 1, "ExpertPlacement: ", experts, " logical experts");
  FM_CHECK_ARG(static_cast<int64_t>(phy2log.size()) >= experts, "ExpertPlacement: ", phy2log.size(),
               " physical slots for ", experts, " logical experts");
  ExpertPlacement p;
  p.logical_ = experts;
  p.logcnt_.assign(static_cast<size_t>(experts), 0);
  for (size_t s = 0; s < phy2log.size(); ++s) {
    const int32_t e = phy2log[s];
    FM_CHECK_ARG(e >= 0 && e < experts, "ExpertPlacement: slot ", s, " holds expert ", e,
                 ", outside [0, ", experts, ")");
    ++p.logcnt_[static_cast<size_t>(e)];
  }
  for (int e = 0; e < experts; ++e)
    FM_CHECK_ARG(p.logcnt_[static_cast<size_t>(e)] > 0, "ExpertPlacement: expert ", e,
                 " has no physical slot");
  p.max_replicas_ = *std::max_element(p.logcnt_.begin(), p.logcnt_.end());
  p.log2phy_.assign(static_cast<size_t>(experts) * p.max_replicas_, -1);
  std::vector<int32_t> filled(static_cast<size_t>(experts), 0);
  for (size_t s = 0; s < phy2log.size(); ++s) {
    const auto e = static_cast<size_t>(phy2log[s]);
    p.log2phy_[e * p.max_replicas_ + filled[e]++] = static_cast<int32_t>(s);
  }
  p.phy2log_ = std::move(phy2log);
  return p;
}

bool ExpertPlacement::is_identity() const {
  if (physical() != logical_) return false;
  for (int s = 0; s < physical(); ++s)
    if (phy2log_[static_cast<size_t>(s)] != s) return false;
  return true;
}

std::vector<int32_t> ExpertPlacement::rank_slots(int rank, int ranks) const {
  FM_CHECK_ARG(ranks >= 1 && rank >= 0 && rank < ranks, "ExpertPlacement: rank ", rank, " of ",
               ranks);
  FM_CHECK_ARG(physical() % ranks == 0, "ExpertPlacement: ", physical(),
               " physical slots do not split evenly over ", ranks, " EP ranks");
  const int per = physical() / ranks;
  return {phy2log_.begin() + rank * per, phy2log_.begin() + (rank + 1) * per};
}

void map_to_physical_reference(const ExpertPlacement& placement, const int32_t* topk_logical,
                               const int32_t* pos, int64_t tokens, int top_k,
                               int32_t* topk_physical) {
  const int E = placement.logical(), R = placement.max_replicas();
  for (int64_t t = 0; t < tokens; ++t) {
    for (int k = 0; k < top_k; ++k) {
      const int32_t e = topk_logical[t * top_k + k];
      int32_t out = e;
      if (e >= 0 && e < E) {
        const int32_t c = placement.logcnt()[static_cast<size_t>(e)];
        out = placement.log2phy()[static_cast<size_t>(e) * R + replica_index(pos[t], e, c)];
      }
      topk_physical[t * top_k + k] = out;
    }
  }
}

}  // namespace fp8moe
