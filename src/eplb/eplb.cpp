// EPLB: hierarchical and global expert placement, bit-compatible with the public reference
// (github.com/deepseek-ai/EPLB). See include/fp8moe/eplb/eplb.h for the algorithm and the rules
// that make decisions identical (float32 loads, torch.sort's tie order, first-index arg-max).
#include "fp8moe/eplb/eplb.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <utility>

#include "fp8moe/core/error.h"

namespace fp8moe::eplb {
namespace {

uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

}  // namespace

const char* policy_name(Policy policy) {
  return policy == Policy::kHierarchical ? "hierarchical" : "global";
}

Policy choose_policy(int num_groups, int num_nodes) {
  FM_CHECK_ARG(num_groups > 0 && num_nodes > 0, "num_groups=", num_groups,
               " and num_nodes=", num_nodes, " must be > 0");
  return num_groups % num_nodes == 0 ? Policy::kHierarchical : Policy::kGlobal;
}

void validate(const Problem& p) {
  FM_CHECK_ARG(p.num_layers > 0, "weight has no layers");
  FM_CHECK_ARG(p.num_experts > 0, "weight rows are empty");
  FM_CHECK_ARG(p.weight.size() == static_cast<size_t>(p.num_layers) * p.num_experts,
               "weight holds ", p.weight.size(), " values, expected layers*experts=",
               static_cast<int64_t>(p.num_layers) * p.num_experts);
  FM_CHECK_ARG(p.num_gpus > 0, "num_gpus=", p.num_gpus, " must be > 0");
  const Policy policy = choose_policy(p.num_groups, p.num_nodes);
  FM_CHECK_ARG(p.num_replicas >= p.num_experts, "num_replicas=", p.num_replicas,
               " is less than the number of experts (", p.num_experts, ")");
  FM_CHECK_ARG(p.num_replicas % p.num_gpus == 0, "num_replicas=", p.num_replicas,
               " is not divisible by num_gpus=", p.num_gpus);
  if (policy == Policy::kHierarchical) {
    FM_CHECK_ARG(p.num_experts % p.num_groups == 0, "the number of experts (", p.num_experts,
                 ") is not divisible by num_groups=", p.num_groups);
    FM_CHECK_ARG(p.num_gpus % p.num_nodes == 0, "num_gpus=", p.num_gpus,
                 " is not divisible by num_nodes=", p.num_nodes);
  }
  // NOTE: one branch-free pass (the compiler vectorises it); the loop that names the first bad
  // load runs only when the pass fails. NaN fails both comparisons.
  // On the bits: finite and non-negative is below +inf's pattern, or exactly -0 (which
  // `w >= 0` accepts too).
  uint32_t bad = 0;
  for (const float w : p.weight) {
    const uint32_t bits = float_bits(w);
    bad |= static_cast<uint32_t>(bits >= 0x7f800000u) & static_cast<uint32_t>(bits != 0x80000000u);
  }
  if (bad == 0) return;
  for (size_t i = 0; i < p.weight.size(); ++i) {
    const float w = p.weight[i];
    FM_CHECK_ARG(std::isfinite(w) && w >= 0.0f, "weight[", i / p.num_experts, "][",
                 i % p.num_experts, "]=", w, " is not a finite non-negative load");
  }
}

std::vector<int32_t> sort_descending_like_torch(const float* keys, int n) {
  // torch.sort(descending=True) on the CPU is std::sort over (key, index) pairs with a
  // comparator on the key alone; the same call on the same sequence yields the same order.
  std::vector<std::pair<float, int32_t>> items(n);
  for (int i = 0; i < n; ++i) items[i] = {keys[i], i};
  std::sort(items.begin(), items.end(),
            [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<int32_t> order(n);
  for (int i = 0; i < n; ++i) order[i] = items[i].second;
  return order;
}

void balanced_packing(const float* weight, int n, int num_packs, int32_t* pack_index,
                      int32_t* rank_in_pack) {
  FM_CHECK(num_packs > 0 && n % num_packs == 0, "n=", n, " packs=", num_packs);
  const int per_pack = n / num_packs;
  if (per_pack == 1) {
    for (int i = 0; i < n; ++i) {
      pack_index[i] = i;
      rank_in_pack[i] = 0;
    }
    return;
  }
  const std::vector<int32_t> order = sort_descending_like_torch(weight, n);
  std::vector<float> pack_weight(num_packs, 0.0f);
  std::vector<int32_t> pack_items(num_packs, 0);
  for (const int32_t item : order) {
    // The lightest pack with room; strict < keeps the lowest index on ties.
    int best = -1;
    for (int p = 0; p < num_packs; ++p) {
      if (pack_items[p] >= per_pack) continue;
      if (best < 0 || pack_weight[p] < pack_weight[best]) best = p;
    }
    pack_index[item] = best;
    rank_in_pack[item] = pack_items[best]++;
    pack_weight[best] += weight[item];
  }
}

namespace {

// Below this many extra slots the winner tree is cheaper than finding a threshold (measured on
// the V3 cases: 8 extra slots per node in the hierarchical ones, 64 in the global one).
constexpr int kThresholdMinPicks = 16;

// One integer per (value, expert): the float's bits (monotonic for values >= 0) above the
// complemented id, so that a plain integer max picks the largest value and, on ties, the lower
// id, as the reference's first-index arg-max does.
uint64_t pick_key(float value, int32_t id) {
  return (static_cast<uint64_t>(float_bits(value + 0.0f)) << 32) |  // -0 -> +0
         static_cast<uint32_t>(~id);
}

int32_t pick_id(uint64_t key) { return static_cast<int32_t>(~static_cast<uint32_t>(key)); }

// The greedy one pick at a time: a winner tree over the experts finds the arg-max of
// weight / count in log2(num_log) steps per slot. Fills phy2log/rank/logcnt from num_log on.
void replicate_by_tree(const float* weight, int num_log, int num_phy, int32_t* phy2log,
                       int32_t* rank, int32_t* logcnt) {
  int leaves = 1;
  while (leaves < num_log) leaves *= 2;
  thread_local std::vector<uint64_t> tree_storage;
  if (tree_storage.size() < static_cast<size_t>(2 * leaves)) tree_storage.resize(2 * leaves);
  // NOTE: a raw pointer, so the loops do not go through the thread_local access wrapper.
  uint64_t* tree = tree_storage.data();
  // Padding leaves are 0, below every key.
  for (int i = 0; i < num_log; ++i) tree[leaves + i] = pick_key(weight[i], i);
  std::fill(tree + leaves + num_log, tree + 2 * leaves, uint64_t{0});
  for (int node = leaves - 1; node >= 1; --node)
    tree[node] = std::max(tree[2 * node], tree[2 * node + 1]);
  for (int i = num_log; i < num_phy; ++i) {
    const int32_t e = pick_id(tree[1]);
    phy2log[i] = e;
    rank[i] = logcnt[e];
    ++logcnt[e];
    // Walk up carrying the running winner in a register; only siblings are loaded.
    int node = leaves + e;
    uint64_t carried = pick_key(weight[e] / static_cast<float>(logcnt[e]), e);
    tree[node] = carried;
    for (; node > 1; node /= 2) {
      carried = std::max(carried, tree[node ^ 1]);
      tree[node / 2] = carried;
    }
  }
}

// The same picks in one batch. Expert e's k-th extra replica is picked while its load per
// replica is weight[e] / k; those values fall strictly with k (weight > 0), so the greedy merge
// of these falling sequences picks exactly the num_extra largest keys (value, then lower id)
// over all experts and k >= 1, in descending key order. So: find a threshold t with at least
// num_extra (and not many more) keys >= t, list those keys, and sort them by bucketing the
// float bits (monotonic) and one insertion pass. Writes the picked experts in order; returns
// false (nothing decided) where the shortcut does not apply, and the caller runs the tree.
bool replicate_by_threshold(const float* weight, int num_log, int num_extra, int32_t* picks) {
  // NOTE: the floor counts below stay exact in int for num_log * 2^20 < 2^31.
  if (num_log > 1024) return false;
  // NOTE: eight independent lanes, so that neither sum nor max is one long dependency chain.
  float lane_max[8] = {}, lane_sum[8] = {};
  int e0 = 0;
  for (; e0 + 8 <= num_log; e0 += 8)
    for (int i = 0; i < 8; ++i) {
      const float w = weight[e0 + i];
      lane_max[i] = lane_max[i] < w ? w : lane_max[i];
      lane_sum[i] += w;
    }
  for (int i = 0; e0 + i < num_log; ++i) {
    lane_max[i] = std::max(lane_max[i], weight[e0 + i]);
    lane_sum[i] += weight[e0 + i];
  }
  float w_max = 0.0f, total = 0.0f;
  for (int i = 0; i < 8; ++i) {
    w_max = std::max(w_max, lane_max[i]);
    total += lane_sum[i];
  }
  if (!(w_max > 0.0f)) return false;
  const float t_min = w_max * 0x1p-20f;
  // Keys >= t of expert e number about floor(weight[e] / t) (float rounding may move a
  // boundary key; the exact listing below decides).
  const auto approx_keys = [&](float t) {
    const float inv = 1.0f / t;
    int count = 0;
    for (int e = 0; e < num_log; ++e) count += static_cast<int>(weight[e] * inv);
    return count;
  };

  // Threshold: the count falls as t rises, roughly as a power of t. Start from the mean load
  // per slot (the greedy's last pick is never below it) and take secant steps on log(count)
  // over log(t) (the first with an exponent of 1.5, typical of these loads), bisecting
  // geometrically where a step leaves the bracket. Two or three counts on the V3 loads.
  const int slack = std::max(16, num_extra / 4);
  const float target = static_cast<float>(num_extra) + 0.5f * static_cast<float>(slack);
  float t = total / static_cast<float>(num_log + num_extra);
  float lo = 0.0f, hi = w_max * 2.0f;  // count(lo) >= num_extra, count(hi) < num_extra
  float prev_t = 0.0f;
  int prev_count = 0;
  bool found = false;
  for (int iter = 0; iter < 32; ++iter) {
    if (!(t >= t_min)) return false;
    const int count = approx_keys(t);
    if (count >= num_extra && count <= num_extra + slack) {
      found = true;
      break;
    }
    (count < num_extra ? hi : lo) = t;
    float next = 0.0f;
    if (count > 0) {
      float exponent = 1.5f;
      if (prev_count > 0 && prev_count != count)
        exponent = std::log(static_cast<float>(prev_count) / static_cast<float>(count)) /
                   std::log(t / prev_t);
      if (exponent > 0.0f)
        next = t * std::pow(static_cast<float>(count) / target, 1.0f / exponent);
    }
    if (!(next > lo && next < hi)) next = lo > 0.0f ? std::sqrt(lo * hi) : 0.5f * hi;
    prev_t = t;
    prev_count = count;
    t = next;
  }
  if (!found) return false;

  // Every key >= t, per expert in falling order. Branch-free where the branches would be
  // unpredictable (which experts qualify, how many keys each has): those mispredictions cost
  // more than the listing itself.
  const int capacity = num_extra + slack + num_log;
  thread_local std::vector<uint64_t> storage;
  thread_local std::vector<int32_t> listed_storage;
  if (storage.size() < static_cast<size_t>(2 * capacity + 4)) storage.resize(2 * capacity + 4);
  if (listed_storage.size() < static_cast<size_t>(num_log)) listed_storage.resize(num_log);
  uint64_t* keys = storage.data();
  uint64_t* sorted = keys + capacity + 4;
  int32_t* listed = listed_storage.data();
  int num_listed = 0;
  for (int e = 0; e < num_log; ++e) {
    listed[num_listed] = e;
    num_listed += weight[e] >= t;
  }
  int n = 0;
  for (int j = 0; j < num_listed; ++j) {
    const int32_t e = listed[j];
    const float w = weight[e];
    // Four k at a time; the keys >= t are a prefix of each four (values fall with k).
    for (int k = 1;; k += 4) {
      if (n + 4 > capacity + 4) return false;
      float value[4];
      for (int i = 0; i < 4; ++i) value[i] = w / static_cast<float>(k + i);
      int taken = 0;
      for (int i = 0; i < 4; ++i) {
        keys[n + i] = pick_key(value[i], e);
        taken += value[i] >= t;
      }
      n += taken;
      if (taken < 4) break;
    }
  }
  if (n > capacity) return false;
  if (n < num_extra) return false;

  // Counting sort on the value bits (descending), then an insertion pass for keys that share
  // a bucket. All values lie in [t, w_max].
  constexpr int kBuckets = 128;
  const uint32_t top = float_bits(w_max);
  const uint32_t span = top - float_bits(t);
  int shift = 0;
  while ((span >> shift) >= kBuckets) ++shift;
  int start[kBuckets + 1] = {};
  for (int i = 0; i < n; ++i)
    ++start[((top - static_cast<uint32_t>(keys[i] >> 32)) >> shift) + 1];
  for (int b = 0; b < kBuckets; ++b) start[b + 1] += start[b];
  for (int i = 0; i < n; ++i)
    sorted[start[(top - static_cast<uint32_t>(keys[i] >> 32)) >> shift]++] = keys[i];
  for (int i = 1; i < n; ++i) {
    const uint64_t key = sorted[i];
    int j = i;
    for (; j > 0 && sorted[j - 1] < key; --j) sorted[j] = sorted[j - 1];
    sorted[j] = key;
  }
  for (int i = 0; i < num_extra; ++i) picks[i] = pick_id(sorted[i]);
  return true;
}

}  // namespace

void replicate_experts(const float* weight, int num_log, int num_phy, int32_t* phy2log,
                       int32_t* rank, int32_t* logcnt) {
  FM_CHECK(num_phy >= num_log, "num_phy=", num_phy, " num_log=", num_log);
  for (int i = 0; i < num_log; ++i) {
    phy2log[i] = i;
    rank[i] = 0;
    logcnt[i] = 1;
  }
  const int num_extra = num_phy - num_log;
  if (num_extra == 0) return;
  // NOTE: for a few picks the tree is cheaper than finding a threshold.
  if (num_extra >= kThresholdMinPicks &&
      replicate_by_threshold(weight, num_log, num_extra, phy2log + num_log)) {
    for (int i = num_log; i < num_phy; ++i) rank[i] = logcnt[phy2log[i]]++;
    return;
  }
  replicate_by_tree(weight, num_log, num_phy, phy2log, rank, logcnt);
}

namespace {

// One layer of the hierarchical policy (the global policy calls it with groups = nodes = 1).
struct LayerWorkspace {
  std::vector<float> group_weight, mlog_weight, phy_weight;
  std::vector<int32_t> group_pack, group_rank, log2mlog, mlog2log;
  std::vector<int32_t> phy2mlog, phyrank, mlogcnt, pack, rank_in_pack, pphy2phy;
  std::vector<int32_t> out_phy2log, out_phyrank, out_logcnt;
};

void rebalance_layer(const float* w, int E, int R, int G, int N, int P, LayerWorkspace& ws,
                     int32_t* out_phy2log, int32_t* out_phyrank, int32_t* out_logcnt) {
  const int group_size = E / G, groups_per_node = G / N;
  const int log_per_node = E / N, phy_per_node = R / N, gpus_per_node = P / N;
  const int phy_per_gpu = R / P;

  // Step 1: pack groups onto nodes by their total load.
  ws.group_weight.assign(G, 0.0f);
  if (groups_per_node > 1) {  // one group per node: the packing ignores the loads
    for (int g = 0; g < G; ++g) {
      // NOTE: summed in double and rounded once; torch's float32 sum may differ in the last
      // bit for non-integer loads, which matters only for exact ties between groups.
      double s = 0.0;
      for (int j = 0; j < group_size; ++j) s += w[g * group_size + j];
      ws.group_weight[g] = static_cast<float>(s);
    }
  }
  ws.group_pack.resize(G);
  ws.group_rank.resize(G);
  balanced_packing(ws.group_weight.data(), G, N, ws.group_pack.data(), ws.group_rank.data());
  // "mlog": experts renumbered so that node n holds [n * E/N, (n + 1) * E/N).
  ws.log2mlog.resize(E);
  ws.mlog2log.resize(E);
  for (int g = 0; g < G; ++g) {
    const int base = (ws.group_pack[g] * groups_per_node + ws.group_rank[g]) * group_size;
    for (int j = 0; j < group_size; ++j) {
      ws.log2mlog[g * group_size + j] = base + j;
      ws.mlog2log[base + j] = g * group_size + j;
    }
  }
  ws.mlog_weight.resize(E);
  for (int m = 0; m < E; ++m) ws.mlog_weight[m] = w[ws.mlog2log[m]];

  ws.phy2mlog.resize(R);
  ws.phyrank.resize(R);
  ws.mlogcnt.resize(E);
  ws.phy_weight.resize(phy_per_node);
  ws.pack.resize(phy_per_node);
  ws.rank_in_pack.resize(phy_per_node);
  ws.pphy2phy.resize(phy_per_node);
  for (int n = 0; n < N; ++n) {
    // Step 2: replicate inside the node.
    const float* node_w = ws.mlog_weight.data() + n * log_per_node;
    int32_t* phy2mlog = ws.phy2mlog.data() + n * phy_per_node;
    int32_t* phyrank = ws.phyrank.data() + n * phy_per_node;
    int32_t* mlogcnt = ws.mlogcnt.data() + n * log_per_node;
    replicate_experts(node_w, log_per_node, phy_per_node, phy2mlog, phyrank, mlogcnt);
    // Step 3: pack the node's replicas onto its GPUs by load per replica (with one slot per
    // GPU the packing is the identity and needs no loads).
    if (phy_per_gpu == 1) {
      for (int i = 0; i < phy_per_node; ++i) ws.pphy2phy[i] = i;
    } else {
      for (int i = 0; i < phy_per_node; ++i)
        ws.phy_weight[i] = node_w[phy2mlog[i]] / static_cast<float>(mlogcnt[phy2mlog[i]]);
      balanced_packing(ws.phy_weight.data(), phy_per_node, gpus_per_node, ws.pack.data(),
                       ws.rank_in_pack.data());
      for (int i = 0; i < phy_per_node; ++i)
        ws.pphy2phy[ws.pack[i] * phy_per_gpu + ws.rank_in_pack[i]] = i;
    }
    for (int k = 0; k < phy_per_node; ++k) {
      const int i = ws.pphy2phy[k];
      out_phy2log[n * phy_per_node + k] = ws.mlog2log[phy2mlog[i] + n * log_per_node];
      out_phyrank[n * phy_per_node + k] = phyrank[i];
    }
  }
  for (int e = 0; e < E; ++e) out_logcnt[e] = ws.mlogcnt[ws.log2mlog[e]];
}

// One group on one node (the global policy): no renumbering, so replicate straight into the
// outputs and permute them only where a GPU holds several slots.
void rebalance_layer_flat(const float* w, int E, int R, int P, LayerWorkspace& ws,
                          int32_t* out_phy2log, int32_t* out_phyrank, int32_t* out_logcnt) {
  replicate_experts(w, E, R, out_phy2log, out_phyrank, out_logcnt);
  const int phy_per_gpu = R / P;
  if (phy_per_gpu == 1) return;  // one slot per GPU: the packing is the identity
  ws.phy_weight.resize(R);
  ws.pack.resize(R);
  ws.rank_in_pack.resize(R);
  ws.phy2mlog.resize(R);
  ws.phyrank.resize(R);
  for (int i = 0; i < R; ++i)
    ws.phy_weight[i] = w[out_phy2log[i]] / static_cast<float>(out_logcnt[out_phy2log[i]]);
  balanced_packing(ws.phy_weight.data(), R, P, ws.pack.data(), ws.rank_in_pack.data());
  std::copy(out_phy2log, out_phy2log + R, ws.phy2mlog.begin());
  std::copy(out_phyrank, out_phyrank + R, ws.phyrank.begin());
  for (int i = 0; i < R; ++i) {
    const int k = ws.pack[i] * phy_per_gpu + ws.rank_in_pack[i];
    out_phy2log[k] = ws.phy2mlog[i];
    out_phyrank[k] = ws.phyrank[i];
  }
}

}  // namespace

Plan rebalance_experts(const Problem& p) {
  validate(p);
  Plan plan;
  plan.num_layers = p.num_layers;
  plan.num_experts = p.num_experts;
  plan.num_replicas = p.num_replicas;
  plan.policy = choose_policy(p.num_groups, p.num_nodes);
  const int L = p.num_layers, E = p.num_experts, R = p.num_replicas;
  const bool hier = plan.policy == Policy::kHierarchical;
  const int G = hier ? p.num_groups : 1, N = hier ? p.num_nodes : 1;
  // NOTE: the outputs grow by appending each layer's rows from small scratch rows, so that every
  // output byte is written once (a resize would first zero them all, and log2phy at V3 scale
  // is 1.5 MB: that pass alone costs as much as the placement).
  plan.phy2log.reserve(static_cast<size_t>(L) * R);
  plan.phyrank.reserve(static_cast<size_t>(L) * R);
  plan.logcnt.reserve(static_cast<size_t>(L) * E);
  LayerWorkspace ws;
  ws.out_phy2log.resize(R);
  ws.out_phyrank.resize(R);
  ws.out_logcnt.resize(E);
  for (int l = 0; l < L; ++l) {
    const float* w = p.weight.data() + static_cast<size_t>(l) * E;
    int32_t* phy2log = ws.out_phy2log.data();
    int32_t* phyrank = ws.out_phyrank.data();
    int32_t* logcnt = ws.out_logcnt.data();
    if (G == 1 && N == 1)
      rebalance_layer_flat(w, E, R, p.num_gpus, ws, phy2log, phyrank, logcnt);
    else
      rebalance_layer(w, E, R, G, N, p.num_gpus, ws, phy2log, phyrank, logcnt);
    plan.phy2log.insert(plan.phy2log.end(), phy2log, phy2log + R);
    plan.phyrank.insert(plan.phyrank.end(), phyrank, phyrank + R);
    plan.logcnt.insert(plan.logcnt.end(), logcnt, logcnt + E);
  }
  plan.max_replicas = *std::max_element(plan.logcnt.begin(), plan.logcnt.end());
  const int X = plan.max_replicas;
  // log2phy one layer at a time: append the layer's block of -1 (E * X entries, small enough to
  // stay in L1) and fill its slots while the block is still there.
  const size_t block = static_cast<size_t>(E) * X;
  plan.log2phy.reserve(static_cast<size_t>(L) * block);
  for (int l = 0; l < L; ++l) {
    plan.log2phy.insert(plan.log2phy.end(), block, -1);
    int32_t* rows = plan.log2phy.data() + static_cast<size_t>(l) * block;
    const int32_t* phy2log = plan.phy2log.data() + static_cast<size_t>(l) * R;
    const int32_t* phyrank = plan.phyrank.data() + static_cast<size_t>(l) * R;
    for (int i = 0; i < R; ++i) rows[static_cast<size_t>(phy2log[i]) * X + phyrank[i]] = i;
  }
  return plan;
}

std::vector<double> gpu_loads(const Plan& plan, const std::vector<float>& weight, int num_gpus) {
  FM_CHECK_ARG(num_gpus > 0 && plan.num_replicas % num_gpus == 0, "num_gpus=", num_gpus,
               " does not divide num_replicas=", plan.num_replicas);
  FM_CHECK_ARG(weight.size() == static_cast<size_t>(plan.num_layers) * plan.num_experts,
               "weight holds ", weight.size(), " values, expected ",
               static_cast<int64_t>(plan.num_layers) * plan.num_experts);
  const int R = plan.num_replicas, E = plan.num_experts, per_gpu = R / num_gpus;
  std::vector<double> out(static_cast<size_t>(plan.num_layers) * num_gpus, 0.0);
  for (int l = 0; l < plan.num_layers; ++l)
    for (int i = 0; i < R; ++i) {
      const int e = plan.phy2log[static_cast<size_t>(l) * R + i];
      out[static_cast<size_t>(l) * num_gpus + i / per_gpu] +=
          static_cast<double>(weight[static_cast<size_t>(l) * E + e]) /
          plan.logcnt[static_cast<size_t>(l) * E + e];
    }
  return out;
}

namespace {
int get_int(const Json& obj, const char* key, const std::string& ctx) {
  FM_CHECK_ARG(obj.contains(key), ctx, ": missing key '", key, "'");
  const Json& v = obj.at(key);
  FM_CHECK_ARG(v.is_number_integer(), ctx, ": '", key, "' must be an integer");
  const int64_t x = v.get<int64_t>();
  FM_CHECK_ARG(x > 0 && x <= (int64_t{1} << 24), ctx, ": '", key, "'=", x, " is out of range");
  return static_cast<int>(x);
}
}  // namespace

Problem problem_from_json(const Json& in) {
  const std::string ctx = "eplb input";
  FM_CHECK_ARG(in.is_object(), ctx, ": expected a JSON object");
  check_known_keys(in, {"weight", "num_replicas", "num_groups", "num_nodes", "num_gpus"}, ctx);
  Problem p;
  p.num_replicas = get_int(in, "num_replicas", ctx);
  p.num_groups = get_int(in, "num_groups", ctx);
  p.num_nodes = get_int(in, "num_nodes", ctx);
  p.num_gpus = get_int(in, "num_gpus", ctx);
  FM_CHECK_ARG(in.contains("weight"), ctx, ": missing key 'weight'");
  const Json& w = in.at("weight");
  FM_CHECK_ARG(w.is_array() && !w.empty(), ctx, ": 'weight' must be a non-empty array of rows");
  p.num_layers = static_cast<int>(w.size());
  for (size_t l = 0; l < w.size(); ++l) {
    const Json& row = w[l];
    FM_CHECK_ARG(row.is_array(), ctx, ": weight[", l, "] is not an array");
    if (l == 0) p.num_experts = static_cast<int>(row.size());
    FM_CHECK_ARG(row.size() == static_cast<size_t>(p.num_experts), ctx, ": weight[", l, "] has ",
                 row.size(), " entries but weight[0] has ", p.num_experts, " (ragged rows)");
    for (size_t e = 0; e < row.size(); ++e) {
      FM_CHECK_ARG(row[e].is_number(), ctx, ": weight[", l, "][", e, "] is not a number");
      const double v = row[e].get<double>();
      FM_CHECK_ARG(std::isfinite(v) && v >= 0.0, ctx, ": weight[", l, "][", e, "]=", v,
                   " is negative or not finite");
      // NOTE: the reference converts loads to float32 (`weight.float()`) before deciding.
      p.weight.push_back(static_cast<float>(v));
    }
  }
  validate(p);
  return p;
}

OrderedJson plan_to_json(const Plan& plan) {
  const int L = plan.num_layers, E = plan.num_experts, R = plan.num_replicas;
  const int X = plan.max_replicas;
  OrderedJson phy2log = OrderedJson::array(), log2phy = OrderedJson::array(),
              logcnt = OrderedJson::array();
  for (int l = 0; l < L; ++l) {
    phy2log.push_back(std::vector<int32_t>(plan.phy2log.begin() + static_cast<size_t>(l) * R,
                                           plan.phy2log.begin() + static_cast<size_t>(l + 1) * R));
    logcnt.push_back(std::vector<int32_t>(plan.logcnt.begin() + static_cast<size_t>(l) * E,
                                          plan.logcnt.begin() + static_cast<size_t>(l + 1) * E));
    OrderedJson rows = OrderedJson::array();
    for (int e = 0; e < E; ++e) {
      const auto begin = plan.log2phy.begin() + (static_cast<size_t>(l) * E + e) * X;
      rows.push_back(std::vector<int32_t>(begin, begin + X));
    }
    log2phy.push_back(std::move(rows));
  }
  OrderedJson out;
  out["phy2log"] = std::move(phy2log);
  out["log2phy"] = std::move(log2phy);
  out["logcnt"] = std::move(logcnt);
  return out;
}

}  // namespace fp8moe::eplb
