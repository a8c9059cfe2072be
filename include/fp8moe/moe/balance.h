// Load balancing for the DeepSeek-V3 gate.
//  - Auxiliary-loss-free balancing: after each step, b_i += gamma * sign(mean load - load_i)
//    (the bias feeds selection only, see router.h). sign(0) = 0.
//  - Complementary sequence-wise balance loss (DeepSeek-V3 report, eqs. 17-20), per sequence
//    of T tokens:  L = alpha * sum_i f_i * P_i,
//      f_i = E / (K * T) * #{tokens of the sequence that chose expert i}   (held constant)
//      P_i = 1/T * sum_t s_{i,t} / sum_j s_{j,t}                            (s = sigmoid scores)
//    The indicator uses the router's actual choice (bias and group limits included). Over a
//    batch of several sequences the loss is the mean of the per-sequence losses.
//  - Metrics: per-expert and per-rank load, MaxVio = max_i load_i / mean load - 1 (0 when there
//    is no load).
#pragma once

#include <cstdint>
#include <vector>

#include "fp8moe/moe/dispatch_layout.h"
#include "fp8moe/moe/router.h"

namespace fp8moe {

// Slots routed to each expert (ids of -1 are skipped). [E]
std::vector<int64_t> expert_load(const int32_t* topk_idx, int64_t tokens, int top_k,
                                 int num_experts);
// Sum of expert loads per rank under a contiguous sharding. [R]
std::vector<int64_t> rank_load(const std::vector<int64_t>& expert_load,
                               const ExpertSharding& sharding);
double max_violation(const std::vector<int64_t>& load);
double max_violation(const std::vector<double>& load);

// b_i += gamma * sign(mean(load) - load_i). bias [E], load [E].
void update_bias(std::vector<float>& bias, const std::vector<int64_t>& load, float gamma);

// The sequence-wise balance loss over a batch of `forward.tokens / seq_len` sequences (tokens
// must be a multiple of seq_len) and, when grad_logits is not null, its gradient w.r.t. the
// logits [T, E], ADDED to grad_logits (so it composes with route_backward's output).
double sequence_balance_loss(const RouterConfig& config, const RouterOutput& forward,
                             int64_t seq_len, float alpha, float* grad_logits);

}  // namespace fp8moe
