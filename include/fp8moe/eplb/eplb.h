// Expert-parallel load balancing (EPLB): replicate heavy experts into redundant physical slots
// and place the slots on GPUs so that GPU loads are even, following DeepSeek's published
// algorithm (github.com/deepseek-ai/EPLB) with identical phy2log and logcnt for identical inputs.
//
// Policies, chosen as the reference chooses (num_groups % num_nodes == 0 -> hierarchical):
//   hierarchical  1. pack expert groups onto nodes (balanced packing, equal group counts);
//                 2. inside each node, replicate experts greedily (each new replica goes to the
//                    expert with the largest load per replica);
//                 3. pack each node's replicas onto its GPUs (balanced packing).
//   global        the same with one group and one node: replicate over all experts, pack the
//                 replicas onto all GPUs.
// Balanced packing: items in descending load order go to the lightest pack that still has room
// (ties: the lower pack). Loads are float32 as in the reference (its `.float()`), and pack
// loads accumulate in float32 in the same order, so decisions match bit for bit.
// With 16 or more extra slots the replication runs in one batch (replicate_experts_batched): the
// same picks in the same order, checked against the greedy in tests/eplb/eplb_test.cpp.
// Ties between equal loads: the reference sorts with torch.sort (not stable), which is
// std::sort on (load, index) pairs; we sort the same pairs with std::sort, which reproduces
// torch's order exactly (tests/eplb/fixtures/sort_probe.json pins this). Replica order inside
// a log2phy row therefore matches too, though the contract only requires phy2log and logcnt.
#pragma once

#include <cstdint>
#include <vector>

#include "fp8moe/core/json.h"

namespace fp8moe::eplb {

enum class Policy { kHierarchical, kGlobal };
const char* policy_name(Policy policy);
Policy choose_policy(int num_groups, int num_nodes);

struct Problem {
  int num_layers = 0;
  int num_experts = 0;        // logical experts per layer
  std::vector<float> weight;  // [num_layers, num_experts] load statistics (>= 0)
  int num_replicas = 0;       // physical slots per layer
  int num_groups = 1;
  int num_nodes = 1;
  int num_gpus = 1;
};

// Throws kInvalidArgument naming the first violated condition: non-negative finite loads,
// num_replicas >= num_experts, num_replicas % num_gpus == 0, and for the hierarchical policy
// num_experts % num_groups == 0 and num_gpus % num_nodes == 0.
void validate(const Problem& problem);

struct Plan {
  int num_layers = 0;
  int num_experts = 0;
  int num_replicas = 0;
  int max_replicas = 0;  // max over logcnt
  Policy policy = Policy::kGlobal;
  std::vector<int32_t> phy2log;  // [L, R] logical expert of each physical slot
  std::vector<int32_t> phyrank;  // [L, R] replica rank of each slot (0 = the first copy)
  std::vector<int32_t> logcnt;   // [L, E] replicas of each logical expert
  std::vector<int32_t> log2phy;  // [L, E, max_replicas] slots of each expert by rank, -1 padded
};

Plan rebalance_experts(const Problem& problem);

// Building blocks (exposed for tests). Rows are independent.
// Packs n items into num_packs packs of n / num_packs items each.
void balanced_packing(const float* weight, int n, int num_packs, int32_t* pack_index,
                      int32_t* rank_in_pack);
// Replicates num_log experts into num_phy slots: slot i < num_log holds expert i; each further
// slot goes to the expert with the largest weight / count (ties: the lower id).
// Runs the batched form where it applies (16 or more extra slots), the greedy otherwise.
void replicate_experts(const float* weight, int num_log, int num_phy, int32_t* phy2log,
                       int32_t* rank, int32_t* logcnt);
// The greedy itself, one slot at a time (a winner tree over the experts): the definition.
void replicate_experts_greedy(const float* weight, int num_log, int num_phy, int32_t* phy2log,
                              int32_t* rank, int32_t* logcnt);
// The same result in one batch: the extra slots go to the num_phy - num_log largest values of
// weight[e] / k (k >= 1; ties: the lower id) in descending order, since the greedy merges these
// falling sequences. Finds a threshold by counting, lists the values above it and sorts them.
// Returns false, writing nothing, where it does not apply (no positive load, more than 1024
// experts, a threshold below 2^-20 of the largest load, the threshold search not settling).
bool replicate_experts_batched(const float* weight, int num_log, int num_phy, int32_t* phy2log,
                               int32_t* rank, int32_t* logcnt);
// The reference's order for a descending, non-stable sort of `keys` (torch.sort on the CPU).
std::vector<int32_t> sort_descending_like_torch(const float* keys, int n);

// Per-GPU load of a plan for the given loads [L, E]: slot i of a layer is on GPU
// i / (R / num_gpus) and carries weight[e] / logcnt[e]. Returns [L, num_gpus].
std::vector<double> gpu_loads(const Plan& plan, const std::vector<float>& weight, int num_gpus);

// JSON as DESIGN.md's `fp8moe eplb` specifies. Input errors (ragged rows, wrong types, unknown
// keys, negative loads, ...) throw kInvalidArgument.
Problem problem_from_json(const Json& input);
OrderedJson plan_to_json(const Plan& plan);

}  // namespace fp8moe::eplb
