// EPLB: hierarchical and global expert placement, bit-compatible with the public reference
// (github.com/deepseek-ai/EPLB). See include/fp8moe/eplb/eplb.h for the algorithm and the rules
// that make decisions identical (float32 loads, torch.sort's tie order, first-index arg-max).
#include "fp8moe/eplb/eplb.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

#include "fp8moe/core/error.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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
  // One branch-free pass; the loop that names the first bad load runs only when it fails.
  const float* w = p.weight.data();
  const size_t n = p.weight.size();
  size_t i = 0;
  bool ok = true;
#if defined(__SSE2__)
  // NOTE: written out; both comparisons fail for NaN, and -0 passes as `w >= 0` lets it.
  __m128 ok4 = _mm_castsi128_ps(_mm_set1_epi32(-1));
  const __m128 zero = _mm_setzero_ps(), largest = _mm_set1_ps(std::numeric_limits<float>::max());
  for (; i + 4 <= n; i += 4) {
    const __m128 x = _mm_loadu_ps(w + i);
    ok4 = _mm_and_ps(ok4, _mm_and_ps(_mm_cmpge_ps(x, zero), _mm_cmple_ps(x, largest)));
  }
  ok = _mm_movemask_ps(ok4) == 0xf;
#endif
  for (; i < n; ++i) ok &= w[i] >= 0.0f && w[i] <= std::numeric_limits<float>::max();
  if (ok) return;
  for (size_t j = 0; j < n; ++j)
    FM_CHECK_ARG(std::isfinite(w[j]) && w[j] >= 0.0f, "weight[", j / p.num_experts, "][",
                 j % p.num_experts, "]=", w[j], " is not a finite non-negative load");
}

namespace {

// torch.sort(descending=True) on the CPU is std::sort over (key, index) pairs with a comparator
// on the key alone; the same call on the same sequence yields the same order. `items` is
// scratch of n pairs.
void sort_descending_like_torch(const float* keys, int n, std::pair<float, int32_t>* items,
                                int32_t* order) {
  for (int i = 0; i < n; ++i) items[i] = {keys[i], i};
  std::sort(items, items + n, [](const auto& a, const auto& b) { return a.first > b.first; });
  for (int i = 0; i < n; ++i) order[i] = items[i].second;
}

}  // namespace

std::vector<int32_t> sort_descending_like_torch(const float* keys, int n) {
  std::vector<std::pair<float, int32_t>> items(n);
  std::vector<int32_t> order(n);
  sort_descending_like_torch(keys, n, items.data(), order.data());
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
  thread_local std::vector<std::pair<float, int32_t>> items_storage;
  thread_local std::vector<int32_t> order_storage, pack_items_storage;
  thread_local std::vector<float> pack_weight_storage;
  thread_local std::vector<uint32_t> pack_key_storage;
  if (items_storage.size() < static_cast<size_t>(n)) {
    items_storage.resize(n);
    order_storage.resize(n);
  }
  pack_items_storage.assign(num_packs, 0);
  pack_weight_storage.assign(num_packs, 0.0f);
  pack_key_storage.assign(num_packs, 0u);
  int32_t* order = order_storage.data();
  int32_t* pack_items = pack_items_storage.data();
  float* pack_weight = pack_weight_storage.data();
  // NOTE: the lightest pack with room as a branch-free arg-min over one integer per pack: the
  // load's bits (monotonic for loads >= 0, +inf included) while the pack has room, all ones
  // once it is full. Strict < keeps the lowest index on ties, as the reference's min() does.
  uint32_t* pack_key = pack_key_storage.data();
  sort_descending_like_torch(weight, n, items_storage.data(), order);
  for (int i = 0; i < n; ++i) {
    const int32_t item = order[i];
    int best = 0;
    uint32_t best_key = pack_key[0];
    for (int p = 1; p < num_packs; ++p) {
      const bool lighter = pack_key[p] < best_key;
      best = lighter ? p : best;
      best_key = lighter ? pack_key[p] : best_key;
    }
    pack_index[item] = best;
    rank_in_pack[item] = pack_items[best]++;
    pack_weight[best] += weight[item];
    pack_key[best] = pack_items[best] < per_pack ? float_bits(pack_weight[best]) : ~0u;
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

int32_t pick_id(uint64_t key) {
  return static_cast<int32_t>(~static_cast<uint32_t>(key));
}

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
// num_extra (and not many more) keys >= t by counting, list those keys, and sort them (a
// counting sort on an estimate of each key's place, then an insertion pass). Writes the picked
// experts in order; returns false, writing nothing, where the shortcut does not apply.
bool replicate_by_threshold(const float* weight, int num_log, int num_extra, int32_t* picks) {
  // NOTE: the floor counts below stay exact in int for num_log * 2^20 < 2^31.
  if (num_log > 1024) return false;
  float w_max = 0.0f, total = 0.0f;
  int e0 = 0;
#if defined(__SSE2__)
  // NOTE: written out: the compiler keeps a float max and sum scalar (it may not reorder them).
  __m128 max4 = _mm_setzero_ps(), sum4 = _mm_setzero_ps();
  for (; e0 + 4 <= num_log; e0 += 4) {
    const __m128 w = _mm_loadu_ps(weight + e0);
    max4 = _mm_max_ps(max4, w);
    sum4 = _mm_add_ps(sum4, w);
  }
  float lanes[8];
  _mm_storeu_ps(lanes, max4);
  _mm_storeu_ps(lanes + 4, sum4);
  for (int i = 0; i < 4; ++i) {
    w_max = std::max(w_max, lanes[i]);
    total += lanes[4 + i];
  }
#endif
  for (; e0 < num_log; ++e0) {
    w_max = std::max(w_max, weight[e0]);
    total += weight[e0];
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

  // Threshold: the count falls as t rises, roughly as a power of t. Start from a guess and
  // take secant steps on log(count) over log(t) (the first with an exponent of 1.5, typical of
  // these loads), bisecting geometrically where a step leaves the bracket.
  const int slack = std::max(16, num_extra / 4);
  const float target = static_cast<float>(num_extra) + 0.5f * static_cast<float>(slack);
  const float mean = total / static_cast<float>(num_log + num_extra);
  // NOTE: the last call's threshold over its mean is a good first guess for the next layer of
  // a similar load distribution; only the number of counting passes depends on the guess.
  thread_local float last_ratio = 0.0f;
  float t = last_ratio > 0.0f ? mean * last_ratio : mean;
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
      if (exponent > 0.0f) next = t * std::pow(static_cast<float>(count) / target, 1.0f / exponent);
    }
    if (!(next > lo && next < hi)) next = lo > 0.0f ? std::sqrt(lo * hi) : 0.5f * hi;
    prev_t = t;
    prev_count = count;
    t = next;
  }
  if (!found) return false;
  last_ratio = t / mean;

  // Every key >= t, per expert in falling order. Branch-free where the branches would be
  // unpredictable (which experts qualify, how many keys each has): those mispredictions cost
  // more than the listing itself.
  const int capacity = num_extra + slack + num_log;
  thread_local std::vector<uint64_t> storage;
  thread_local std::vector<int32_t> listed_storage;
  thread_local std::vector<uint8_t> bucket_storage;
  if (storage.size() < static_cast<size_t>(2 * capacity + 4)) storage.resize(2 * capacity + 4);
  if (listed_storage.size() < static_cast<size_t>(num_log)) listed_storage.resize(num_log);
  if (bucket_storage.size() < static_cast<size_t>(capacity + 4))
    bucket_storage.resize(capacity + 4);
  uint64_t* keys = storage.data();
  uint64_t* sorted = keys + capacity + 4;
  int32_t* listed = listed_storage.data();
  int num_listed = 0;
  int e_done = 0;
#if defined(__SSE2__)
  // NOTE: 64 comparisons at a time into a bit mask, then one step per qualifying expert (about
  // one in six at V3 scale) instead of one per expert.
  const __m128 t4 = _mm_set1_ps(t);
  for (; e_done + 64 <= num_log; e_done += 64) {
    uint64_t mask = 0;
    for (int i = 0; i < 64; i += 4)
      mask |= static_cast<uint64_t>(
                  _mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(weight + e_done + i), t4)))
              << i;
    for (; mask != 0; mask &= mask - 1) listed[num_listed++] = e_done + std::countr_zero(mask);
  }
#endif
  for (int e = e_done; e < num_log; ++e) {
    listed[num_listed] = e;
    num_listed += weight[e] >= t;
  }
  // Each key also gets a bucket for the sort below: its position between 1/w_max and 1/t in
  // reciprocal space, where an expert's keys w/k are evenly spaced (k/w), so the keys spread
  // evenly over the buckets. The bucket only speeds the sort up; the insertion pass after it
  // orders the keys exactly whatever the buckets say.
  constexpr int kBuckets = 128;
  const float inv_top = 1.0f / w_max;
  const float bucket_scale = (kBuckets - 1) / std::max(1.0f / t - inv_top, 1e-30f);
  uint8_t* bucket = bucket_storage.data();
#if defined(__SSE2__)
  const __m128 inv_top4 = _mm_set1_ps(inv_top), scale4 = _mm_set1_ps(bucket_scale);
  const __m128 zero4 = _mm_setzero_ps(), max_bucket4 = _mm_set1_ps(kBuckets - 1.0f);
#endif
  int n = 0;
  for (int j = 0; j < num_listed; ++j) {
    const int32_t e = listed[j];
    const float w = weight[e];
    const float inv_w = 1.0f / w;
    // Four k at a time; the keys >= t are a prefix of each four (values fall with k).
    for (int k = 1;; k += 4) {
      if (n + 4 > capacity + 4) return false;
      int taken = 0;
#if defined(__SSE2__)
      const __m128 kf = _mm_add_ps(_mm_set1_ps(static_cast<float>(k)), _mm_setr_ps(0, 1, 2, 3));
      const __m128 value = _mm_div_ps(_mm_set1_ps(w), kf);
      // The mask is a prefix (0, 1, 3, 7 or 15): its trailing ones count the keys taken.
      taken = std::countr_one(static_cast<unsigned>(_mm_movemask_ps(_mm_cmpge_ps(value, t4))));
      // Keys: value bits (+0.0f turns -0 into +0) above ~e, two per 128-bit store.
      const __m128i bits = _mm_castps_si128(_mm_add_ps(value, _mm_setzero_ps()));
      const __m128i id = _mm_set1_epi32(~e);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(keys + n), _mm_unpacklo_epi32(id, bits));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(keys + n + 2), _mm_unpackhi_epi32(id, bits));
      const __m128 pos =
          _mm_mul_ps(_mm_sub_ps(_mm_mul_ps(kf, _mm_set1_ps(inv_w)), inv_top4), scale4);
      const __m128i b32 = _mm_cvttps_epi32(_mm_min_ps(_mm_max_ps(pos, zero4), max_bucket4));
      const __m128i b16 = _mm_packs_epi32(b32, b32);
      const int packed = _mm_cvtsi128_si32(_mm_packus_epi16(b16, b16));
      std::memcpy(bucket + n, &packed, 4);
#else
      for (int i = 0; i < 4; ++i) {
        const float value = w / static_cast<float>(k + i);
        keys[n + i] = pick_key(value, e);
        const float pos = (static_cast<float>(k + i) * inv_w - inv_top) * bucket_scale;
        bucket[n + i] = static_cast<uint8_t>(std::clamp(pos, 0.0f, kBuckets - 1.0f));
        taken += value >= t;
      }
#endif
      n += taken;
      if (taken < 4) break;
    }
  }
  if (n > capacity) return false;
  if (n < num_extra) return false;

  // Counting sort by bucket, then an insertion pass.
  int start[kBuckets] = {};
  for (int i = 0; i < n; ++i) ++start[bucket[i]];
  // NOTE: the running sum stays in a register (an in-place prefix would chain every step
  // through a store and a reload).
  for (int b = 0, sum = 0; b < kBuckets; ++b) {
    const int count = start[b];
    start[b] = sum;
    sum += count;
  }
  for (int i = 0; i < n; ++i) sorted[start[bucket[i]]++] = keys[i];
  for (int i = 1; i < n; ++i) {
    const uint64_t key = sorted[i];
    int j = i;
    for (; j > 0 && sorted[j - 1] < key; --j) sorted[j] = sorted[j - 1];
    sorted[j] = key;
  }
  for (int i = 0; i < num_extra; ++i) picks[i] = pick_id(sorted[i]);
  return true;
}

void init_replicas(int num_log, int num_phy, int32_t* phy2log, int32_t* rank, int32_t* logcnt) {
  FM_CHECK(num_phy >= num_log, "num_phy=", num_phy, " num_log=", num_log);
  // NOTE: three loops, not one: each is a plain fill the compiler vectorises.
  for (int i = 0; i < num_log; ++i) phy2log[i] = i;
  for (int i = 0; i < num_log; ++i) rank[i] = 0;
  for (int i = 0; i < num_log; ++i) logcnt[i] = 1;
}

}  // namespace

void replicate_experts_greedy(const float* weight, int num_log, int num_phy, int32_t* phy2log,
                              int32_t* rank, int32_t* logcnt) {
  init_replicas(num_log, num_phy, phy2log, rank, logcnt);
  if (num_phy > num_log) replicate_by_tree(weight, num_log, num_phy, phy2log, rank, logcnt);
}

bool replicate_experts_batched(const float* weight, int num_log, int num_phy, int32_t* phy2log,
                               int32_t* rank, int32_t* logcnt) {
  FM_CHECK(num_phy >= num_log, "num_phy=", num_phy, " num_log=", num_log);
  if (num_phy > num_log &&
      !replicate_by_threshold(weight, num_log, num_phy - num_log, phy2log + num_log))
    return false;
  init_replicas(num_log, num_phy, phy2log, rank, logcnt);
  // The picks' ranks follow from their order.
  for (int i = num_log; i < num_phy; ++i) rank[i] = logcnt[phy2log[i]]++;
  return true;
}

void replicate_experts(const float* weight, int num_log, int num_phy, int32_t* phy2log,
                       int32_t* rank, int32_t* logcnt) {
  // NOTE: for a few picks the tree is cheaper than finding a threshold.
  if (num_phy - num_log >= kThresholdMinPicks &&
      replicate_experts_batched(weight, num_log, num_phy, phy2log, rank, logcnt))
    return;
  replicate_experts_greedy(weight, num_log, num_phy, phy2log, rank, logcnt);
}

namespace {

// The largest entry (0 for none). NOTE: SSE2 has no packed 32-bit max, so the compiler leaves a
// plain loop scalar; this one compares and blends four at a time.
int32_t max_of(const int32_t* v, size_t n) {
  size_t i = 0;
  int32_t best = 0;
#if defined(__SSE2__)
  __m128i m = _mm_setzero_si128();
  for (; i + 4 <= n; i += 4) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + i));
    const __m128i greater = _mm_cmpgt_epi32(x, m);
    m = _mm_or_si128(_mm_and_si128(greater, x), _mm_andnot_si128(greater, m));
  }
  int32_t lanes[4];
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lanes), m);
  for (const int32_t lane : lanes) best = std::max(best, lane);
#endif
  for (; i < n; ++i) best = std::max(best, v[i]);
  return best;
}

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
  const int32_t X = max_of(plan.logcnt.data(), plan.logcnt.size());
  plan.max_replicas = X;
  // log2phy one layer at a time: append the layer's block of -1 (E * X entries, small enough to
  // stay in L1) and fill its slots while the block is still there.
  const size_t block = static_cast<size_t>(E) * X;
  plan.log2phy.reserve(static_cast<size_t>(L) * block);
  // With one group, one node and one slot per GPU, slot e < E is expert e's first copy (the
  // replication keeps it there and no packing moves it): a plain strided loop writes those.
  const bool first_copies_in_order = G == 1 && N == 1 && R == p.num_gpus;
  for (int l = 0; l < L; ++l) {
    plan.log2phy.insert(plan.log2phy.end(), block, -1);
    int32_t* rows = plan.log2phy.data() + static_cast<size_t>(l) * block;
    const int32_t* phy2log = plan.phy2log.data() + static_cast<size_t>(l) * R;
    const int32_t* phyrank = plan.phyrank.data() + static_cast<size_t>(l) * R;
    int i = 0;
    if (first_copies_in_order)
      for (; i < E; ++i) rows[static_cast<size_t>(i) * X] = i;
    for (; i < R; ++i) rows[static_cast<size_t>(phy2log[i]) * X + phyrank[i]] = i;
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
