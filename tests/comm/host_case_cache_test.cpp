// The GPU EP tests' host case cache (host_case_cache.h) on the CPU: one case per key, the inputs,
// expert outputs and references it keeps equal bit for bit to freshly made ones, fresh references
// for inputs a test changed, the overflow rule of check_against_reference, and the LRU budget.
#include "host_case_cache.h"

#include <gtest/gtest.h>

#include <vector>

namespace fp8moe::comm {
namespace {

using testing::batches_of;
using testing::config;
using testing::expect_same_dispatch;
using testing::expert_outputs;
using testing::HostCase;
using testing::HostCaseCache;
using testing::make_inputs;
using testing::RankData;
using testing::Routing;

// The expert outputs and per-slot rows as the harness drew them before the cache.
void expect_drawn_as_before(const EpConfig& cfg, const HostCase& hc, uint64_t seed) {
  for (int r = 0; r < cfg.num_ranks; ++r) {
    EXPECT_EQ(hc.ys[r], expert_outputs(cfg, r, seed)) << "rank " << r;
    EpConfig rows_cfg = cfg;
    rows_cfg.masked_capacity = 0;
    rows_cfg.max_rows = (cfg.max_recv_tokens() + 127) / 128 * 128;
    EXPECT_EQ(hc.grads[r], expert_outputs(rows_cfg, r, seed + 1)) << "rank " << r;
  }
}

TEST(HostCaseCache, OneCasePerKeyWithTheReferencesOfItsInputs) {
  HostCaseCache cache;
  for (Payload p : {Payload::kBF16, Payload::kFP8}) {
    SCOPED_TRACE(payload_name(p));
    EpConfig cfg = config(4, 0, 32, 4, 256, 64, p);
    const std::vector<int64_t> tokens = {64, 64, 50, 64};
    const auto a = cache.get(cfg, tokens, Routing::kSkewed, 44);
    EXPECT_EQ(cache.get(cfg, tokens, Routing::kSkewed, 44).get(), a.get());
    // Any part of the key gives another case.
    EXPECT_NE(cache.get(cfg, tokens, Routing::kSkewed, 45).get(), a.get());
    EXPECT_NE(cache.get(cfg, tokens, Routing::kRandom, 44).get(), a.get());
    EXPECT_NE(cache.get(cfg, {64, 64, 49, 64}, Routing::kSkewed, 44).get(), a.get());
    EpConfig masked = cfg;
    masked.masked_capacity = 256;
    EXPECT_NE(cache.get(masked, tokens, Routing::kSkewed, 44).get(), a.get());
    EpConfig bounded = cfg;
    bounded.max_rows = 512;
    EXPECT_NE(cache.get(bounded, tokens, Routing::kSkewed, 44).get(), a.get());

    const auto data = make_inputs(cfg, tokens, Routing::kSkewed, 44);
    for (int r = 0; r < cfg.num_ranks; ++r) {
      EXPECT_EQ(a->data[r].x, data[r].x);
      EXPECT_EQ(a->data[r].idx, data[r].idx);
      EXPECT_EQ(a->data[r].w, data[r].w);
    }
    expect_drawn_as_before(cfg, *a, 44);

    // References of a harness's unchanged copy: made once, then the same object.
    const std::vector<RankData> copy = a->data;
    const auto refs = cache.references(cfg, *a, copy);
    EXPECT_EQ(cache.references(cfg, *a, copy).get(), refs.get());
    const auto want = dispatch_reference(cfg, batches_of(data));
    std::vector<const uint16_t*> y, g;
    for (int r = 0; r < cfg.num_ranks; ++r) {
      expect_same_dispatch(cfg, want[r], refs->want[r], r);
      EXPECT_EQ(refs->want[r].handle.slot, want[r].handle.slot);
      y.push_back(a->ys[r].data());
      g.push_back(a->grads[r].data());
    }
    EXPECT_FALSE(refs->overflow);
    EXPECT_EQ(refs->want_out, combine_reference(cfg, want, y));
    EXPECT_EQ(refs->want_combine, refs->want_out);
    EXPECT_EQ(refs->want_back, combine_tokens_reference(cfg, want, g));

    // A changed id or token count (as BadExpertIdIsReported and the LL rows-change test do): the
    // references of the changed inputs, made anew, and the cached ones untouched.
    std::vector<RankData> changed = a->data;
    changed[1].idx[5] = (changed[1].idx[5] + 1) % cfg.num_experts;
    const auto other = cache.references(cfg, *a, changed);
    EXPECT_NE(other.get(), refs.get());
    const auto want_changed = dispatch_reference(cfg, batches_of(changed));
    bool differs = false;
    for (int r = 0; r < cfg.num_ranks; ++r) {
      expect_same_dispatch(cfg, want_changed[r], other->want[r], r);
      differs = differs || other->want[r].recv.topk_local != refs->want[r].recv.topk_local;
    }
    EXPECT_TRUE(differs);
    EXPECT_EQ(cache.references(cfg, *a, copy).get(), refs.get());
    changed = a->data;
    changed[0].tokens = 20;
    const auto fewer = cache.references(cfg, *a, changed);
    EXPECT_NE(fewer.get(), refs.get());
    EXPECT_EQ(fewer->want[0].handle.tokens, 20);
  }
}

TEST(HostCaseCache, OverflowGivesZerosAsCheckAgainstReferenceDid) {
  HostCaseCache cache;
  EpConfig cfg = config(2, 0, 4, 2, 256, 200, Payload::kFP8);
  cfg.max_rows = 256;
  const auto a = cache.get(cfg, {200, 200}, Routing::kRandom, 5);
  const auto refs = cache.references(cfg, *a, a->data);
  EXPECT_TRUE(refs->overflow);
  EXPECT_TRUE(refs->want_combine.empty());
  ASSERT_EQ(refs->want_out.size(), 2u);
  for (const auto& out : refs->want_out) EXPECT_EQ(out, std::vector<uint16_t>(200 * 256, 0));
}

TEST(HostCaseCache, LeastRecentlyUsedCasesLeaveOverTheBudget) {
  const EpConfig cfg = config(2, 0, 8, 2, 256, 64, Payload::kBF16);
  size_t one = 0;
  {
    HostCaseCache probe;
    one = probe.get(cfg, {64, 64}, Routing::kRandom, 1)->bytes;
  }
  HostCaseCache cache(3 * one + one / 2);  // three cases fit
  const auto first = cache.get(cfg, {64, 64}, Routing::kRandom, 1);
  std::vector<std::shared_ptr<HostCase>> held;
  for (uint64_t seed = 2; seed <= 4; ++seed)
    held.push_back(cache.get(cfg, {64, 64}, Routing::kRandom, seed));
  // Seed 1 left (least recently used); its holder still has it whole.
  const auto again = cache.get(cfg, {64, 64}, Routing::kRandom, 1);
  EXPECT_NE(again.get(), first.get());
  EXPECT_EQ(again->data[0].x, first->data[0].x);
  EXPECT_EQ(again->ys, first->ys);
  // Seeds 3 and 4 stayed; 2 left for seed 1's return.
  EXPECT_EQ(cache.get(cfg, {64, 64}, Routing::kRandom, 4).get(), held[2].get());
  EXPECT_EQ(cache.get(cfg, {64, 64}, Routing::kRandom, 3).get(), held[1].get());
  EXPECT_NE(cache.get(cfg, {64, 64}, Routing::kRandom, 2).get(), held[0].get());
  // An evicted case still gives its references (kept with it, not counted by the cache).
  const auto refs = cache.references(cfg, *first, first->data);
  EXPECT_EQ(first->refs, refs);
  EXPECT_EQ(cache.references(cfg, *first, first->data).get(), refs.get());
}

}  // namespace
}  // namespace fp8moe::comm
