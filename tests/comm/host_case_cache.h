// Host inputs and CPU references of the GPU EP tests, made once per case and reused across kernel
// variants (tt1, session 15 late). A sweep of device_ep_gpu_test.cu runs every case of its cases()
// under many kernel variants, and a case's inputs, expert outputs and references depend on the
// case alone (config, tokens, routing, seed), never on the DeviceEpOptions: at hidden 7168 and 256
// experts (row bounds of 18816 and 32768 rows) drawing the expert outputs and the reference took
// most of a test's time, remade for every variant. They are now drawn once per test binary run
// and shared read-only; each harness keeps its own copy of the (small) token inputs, which some
// tests change in place, and the references are reused only while those inputs are byte for byte
// the ones drawn. Host code only (the CPU test host_case_cache_test.cpp checks it).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <list>
#include <memory>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "ep_test_util.h"
#include "fp8moe/comm/ep.h"

namespace fp8moe::comm::testing {

struct References {
  std::vector<DispatchResult> want;
  bool overflow = false;                            // some rank's layout overflowed its bound
  std::vector<std::vector<uint16_t>> want_out;      // combine (+0 everywhere on overflow)
  std::vector<std::vector<uint16_t>> want_combine;  // combine_reference itself (no overflow only)
  std::vector<std::vector<uint16_t>> want_back;     // combine_tokens
};

struct HostCase {
  std::vector<RankData> data;
  std::vector<std::vector<uint16_t>> ys, grads;
  std::shared_ptr<const References> refs;  // of `data` as drawn; made on first use
  std::string key;                         // HostCaseCache's
  size_t bytes = 0;                        // for the cache's budget (inputs and outputs)
};

template <typename T>
size_t bytes_of(const std::vector<T>& v) {
  return v.size() * sizeof(T);
}

inline size_t bytes_of(const DispatchResult& d) {
  return bytes_of(d.recv.count) + bytes_of(d.recv.src_token) + bytes_of(d.recv.topk_local) +
         bytes_of(d.recv.topk_weight) + bytes_of(d.recv.x_bf16) + bytes_of(d.recv.x_fp8) +
         bytes_of(d.recv.x_scales) + bytes_of(d.grouped.expert_counts) +
         bytes_of(d.grouped.expert_offsets) + bytes_of(d.grouped.m_indices) +
         bytes_of(d.grouped.row_src) + bytes_of(d.grouped.token_rows) + bytes_of(d.grouped.x_bf16) +
         bytes_of(d.grouped.x_fp8) + bytes_of(d.grouped.x_scales) + bytes_of(d.handle.slot) +
         bytes_of(d.handle.node_slot);
}

// Least recently used cases leave once the cache passes its budget (a shard of the whole binary
// keeps about 6 GB, tt1's count; a Harness still holding an evicted case keeps it alive).
class HostCaseCache {
 public:
  static constexpr size_t kBudget = size_t{12} << 30;
  // report: the one line at exit (the test binary's cache; not the CPU tests' own).
  explicit HostCaseCache(size_t budget = kBudget, bool report = false)
      : budget_(budget), report_(report) {}

  ~HostCaseCache() {
    // One line at exit, so that a run shows what was reused (the comparison with session 15's
    // per-test times reads it); none from the launcher's child ranks, which make no case.
    // The time spent making them, beside tt1's on its machine, gives the device host's speed.
    if (!report_ || made_ == 0) return;
    std::fprintf(stderr,
                 "host case cache: %zu cases made, %zu reuses, %zu references made, %zu "
                 "reused, %.0f ms making them, peak %.1f MB\n",
                 made_, reused_, refs_made_, refs_reused_, make_ms_, peak_ / 1e6);
  }

  std::shared_ptr<HostCase> get(const EpConfig& cfg, const std::vector<int64_t>& tokens,
                                Routing routing, uint64_t seed) {
    const std::string k = key(cfg, tokens, routing, seed);
    if (auto it = index_.find(k); it != index_.end()) {
      lru_.splice(lru_.begin(), lru_, it->second);
      ++reused_;
      return it->second->second;
    }
    const auto t0 = std::chrono::steady_clock::now();
    auto hc = std::make_shared<HostCase>();
    hc->key = k;
    hc->data = make_inputs(cfg, tokens, routing, seed);
    for (int r = 0; r < cfg.num_ranks; ++r) {
      hc->ys.push_back(expert_outputs(cfg, r, seed));
      // One row per received slot, drawn on their own: the row bound can be smaller than that.
      EpConfig rows_cfg = cfg;
      rows_cfg.masked_capacity = 0;
      rows_cfg.max_rows = (cfg.max_recv_tokens() + 127) / 128 * 128;
      hc->grads.push_back(expert_outputs(rows_cfg, r, seed + 1));
    }
    for (const auto& d : hc->data) hc->bytes += bytes_of(d.x) + bytes_of(d.idx) + bytes_of(d.w);
    for (int r = 0; r < cfg.num_ranks; ++r)
      hc->bytes += bytes_of(hc->ys[r]) + bytes_of(hc->grads[r]);
    ++made_;
    make_ms_ += ms_since(t0);
    lru_.emplace_front(k, hc);
    index_[k] = lru_.begin();
    add(hc->bytes);
    return hc;
  }

  // The references of inputs `data` (a Harness's copy) whose case is `hc`.
  std::shared_ptr<const References> references(const EpConfig& cfg, HostCase& hc,
                                               const std::vector<RankData>& data) {
    const bool as_drawn = same_inputs(data, hc.data);
    if (as_drawn && hc.refs) {
      ++refs_reused_;
      return hc.refs;
    }
    const auto t0 = std::chrono::steady_clock::now();
    auto refs = std::make_shared<References>();
    refs->want = dispatch_reference(cfg, batches_of(data));
    std::vector<const uint16_t*> y, g;
    for (int r = 0; r < cfg.num_ranks; ++r) {
      y.push_back(hc.ys[r].data());
      g.push_back(hc.grads[r].data());
    }
    for (const auto& w : refs->want) refs->overflow = refs->overflow || w.grouped.overflow;
    if (refs->overflow) {  // every layout row is dropped: the expert step sums nothing
      for (int r = 0; r < cfg.num_ranks; ++r)
        refs->want_out.emplace_back(data[r].tokens * cfg.hidden, 0);
    } else {
      refs->want_combine = combine_reference(cfg, refs->want, y);
      refs->want_out = refs->want_combine;
    }
    refs->want_back = combine_tokens_reference(cfg, refs->want, g);
    ++refs_made_;
    if (as_drawn) {
      make_ms_ += ms_since(t0);
      size_t bytes = 0;
      for (const auto& w : refs->want) bytes += bytes_of(w);
      for (const auto* v : {&refs->want_out, &refs->want_combine, &refs->want_back})
        for (const auto& x : *v) bytes += bytes_of(x);
      hc.refs = refs;
      // Counted only while the case is in the cache (an evicted one lives on in its Harness).
      if (auto it = index_.find(hc.key); it != index_.end() && it->second->second.get() == &hc) {
        hc.bytes += bytes;
        add(bytes);
      }
    }
    return refs;
  }

 private:
  using Entry = std::pair<std::string, std::shared_ptr<HostCase>>;

  // Everything the inputs, the expert outputs and the references depend on: every field of
  // EpConfig but timeout_s (a field added to EpConfig must be added here, hence the assert).
  static_assert(sizeof(EpConfig) == 72, "EpConfig changed: update HostCaseCache::key");
  static std::string key(const EpConfig& c, const std::vector<int64_t>& tokens, Routing routing,
                         uint64_t seed) {
    std::ostringstream o;
    o << c.num_ranks << ' ' << c.gpus_per_node << ' ' << c.num_experts << ' ' << c.top_k << ' '
      << c.hidden << ' ' << c.max_tokens_per_rank << ' ' << c.max_rows << ' '
      << c.max_nodes_per_token << ' ' << c.masked_capacity << ' ' << payload_name(c.payload)
      << " | " << static_cast<int>(routing) << ' ' << seed << " |";
    for (int64_t t : tokens) o << ' ' << t;
    return o.str();
  }

  template <typename T>
  static bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), bytes_of(a)) == 0);
  }
  static bool same_inputs(const std::vector<RankData>& a, const std::vector<RankData>& b) {
    if (a.size() != b.size()) return false;
    for (size_t r = 0; r < a.size(); ++r)
      if (a[r].tokens != b[r].tokens || !same_bytes(a[r].x, b[r].x) ||
          !same_bytes(a[r].idx, b[r].idx) || !same_bytes(a[r].w, b[r].w))
        return false;
    return true;
  }

  static double ms_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  }

  void add(size_t bytes) {
    total_ += bytes;
    peak_ = std::max(peak_, total_);
    while (total_ > budget_ && lru_.size() > 1) {
      total_ -= lru_.back().second->bytes;
      index_.erase(lru_.back().first);
      lru_.pop_back();
    }
  }

  size_t budget_;
  bool report_;
  std::list<Entry> lru_;
  std::unordered_map<std::string, std::list<Entry>::iterator> index_;
  size_t total_ = 0, peak_ = 0;
  size_t made_ = 0, reused_ = 0, refs_made_ = 0, refs_reused_ = 0;
  double make_ms_ = 0;  // cases and the references of cases as drawn
};

inline HostCaseCache& host_cases() {
  static HostCaseCache cache(HostCaseCache::kBudget, true);
  return cache;
}

}  // namespace fp8moe::comm::testing
