// Inputs and comparisons shared by the CPU and GPU tests of expert-parallel dispatch/combine.
// Payloads carry their origin: element 0 of a row is the source rank, elements 1 and 2 the token
// index (low and high 7 bits), all exact in BF16, so a misplaced row is caught bit for bit.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <exception>
#include <functional>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "fp8moe/comm/ep.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/codec.h"

namespace fp8moe::comm::testing {

enum class Routing {
  kRandom,          // k distinct uniform experts
  kSkewed,          // 3/4 of the slots on the first ranks' experts
  kOneRank,         // all k experts of a token on one (random) rank
  kNoneToLastRank,  // nobody routes to the last rank
  kHoles,           // random, with about a quarter of the slots -1
  kExact,           // random experts, small integer payloads and dyadic weights (exact sums)
};

struct RankData {
  int64_t tokens = 0;
  std::vector<uint16_t> x;
  std::vector<int32_t> idx;
  std::vector<float> w;
  TokenBatch batch() const { return {tokens, x.data(), idx.data(), w.data()}; }
};

// One back-end case: R ranks in nodes of G (0: one node), E experts, top-K, hidden H, Tmax tokens
// per rank, the tokens of each rank, how they route, and the masked capacity (0: grouped layout).
struct EpCase {
  const char* name;
  int R, G, E, K;
  int64_t H, Tmax;
  std::vector<int64_t> tokens;
  Routing routing;
  int64_t masked_capacity = 0;
};

// R ranks in nodes of G (0: one node), E experts, top-K, hidden H, Tmax tokens per rank.
inline EpConfig config(int R, int G, int E, int K, int64_t H, int64_t Tmax, Payload p) {
  EpConfig c;
  c.num_ranks = R;
  c.gpus_per_node = G;
  c.num_experts = E;
  c.top_k = K;
  c.hidden = H;
  c.max_tokens_per_rank = Tmax;
  c.payload = p;
  c.timeout_s = 20.0;
  return c;
}

inline std::vector<RankData> make_inputs(const EpConfig& cfg, const std::vector<int64_t>& tokens,
                                         Routing routing, uint64_t seed) {
  const int R = cfg.num_ranks, K = cfg.top_k, E = cfg.num_experts, L = cfg.experts_per_rank();
  const int64_t H = cfg.hidden;
  std::vector<RankData> out(R);
  for (int s = 0; s < R; ++s) {
    RankData& d = out[s];
    d.tokens = tokens[s];
    d.x.resize(d.tokens * H);
    d.idx.assign(d.tokens * K, -1);
    d.w.assign(d.tokens * K, 0.0f);
    uint64_t n = 0;
    auto u32 = [&] { return philox_u32(seed, 1000 + s, n++); };
    for (int64_t t = 0; t < d.tokens; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        float v;
        if (h == 0)
          v = static_cast<float>(s);
        else if (h == 1)
          v = static_cast<float>(t & 127);
        else if (h == 2)
          v = static_cast<float>(t >> 7);
        else if (routing == Routing::kExact)
          v = static_cast<float>(static_cast<int>(u32() % 5) - 2);
        else
          v = philox_normal(seed, 2000 + s, t * H + h) * 3.0f;
        d.x[t * H + h] = float_to_bf16_bits(v);
      }
      std::vector<int32_t> chosen;
      const int home = static_cast<int>(u32() % R);
      while (static_cast<int>(chosen.size()) < K) {
        int32_t e;
        switch (routing) {
          case Routing::kSkewed:
            e = (u32() % 4 != 0) ? static_cast<int32_t>(u32() % std::max(L, K + 1) % E)
                                 : static_cast<int32_t>(u32() % E);
            break;
          case Routing::kOneRank:
            e = (L >= K) ? home * L + static_cast<int32_t>(u32() % L)
                         : static_cast<int32_t>(u32() % E);
            break;
          case Routing::kNoneToLastRank:
            e = static_cast<int32_t>(u32() % (E - L));
            break;
          default:
            e = static_cast<int32_t>(u32() % E);
        }
        if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) chosen.push_back(e);
      }
      for (int k = 0; k < K; ++k) {
        int32_t e = chosen[k];
        if (routing == Routing::kHoles && u32() % 4 == 0) e = -1;
        d.idx[t * K + k] = e;
        d.w[t * K + k] = routing == Routing::kExact ? 0.125f * static_cast<float>(1 + u32() % 2)
                                                    : philox_uniform(seed, 3000 + s, t * K + k);
      }
    }
  }
  return out;
}

inline std::vector<TokenBatch> batches_of(const std::vector<RankData>& data) {
  std::vector<TokenBatch> b;
  for (const auto& d : data) b.push_back(d.batch());
  return b;
}

// Run fn(rank) on R threads; rethrows the first exception (after joining all).
inline void run_ranks(int R, const std::function<void(int)>& fn) {
  std::vector<std::exception_ptr> errors(R);
  std::vector<std::thread> threads;
  for (int r = 0; r < R; ++r)
    threads.emplace_back([&, r] {
      try {
        fn(r);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// Received regions and the grouped layout, compared field by field over the valid entries.
inline void expect_same_dispatch(const EpConfig& cfg, const DispatchResult& want,
                                 const DispatchResult& got, int rank) {
  SCOPED_TRACE("rank " + std::to_string(rank));
  const int R = cfg.num_ranks, K = cfg.top_k;
  const int64_t H = cfg.hidden, SC = cfg.scale_cols(), Tmax = cfg.max_tokens_per_rank;
  ASSERT_EQ(want.recv.count, got.recv.count);
  for (int s = 0; s < R; ++s)
    for (int64_t j = 0; j < want.recv.count[s]; ++j) {
      const int64_t at = s * Tmax + j;
      ASSERT_EQ(want.recv.src_token[at], got.recv.src_token[at]) << "src " << s << " slot " << j;
      for (int k = 0; k < K; ++k) {
        ASSERT_EQ(want.recv.topk_local[at * K + k], got.recv.topk_local[at * K + k]);
        ASSERT_EQ(want.recv.topk_weight[at * K + k], got.recv.topk_weight[at * K + k]);
      }
      if (cfg.payload == Payload::kBF16) {
        ASSERT_TRUE(std::equal(&want.recv.x_bf16[at * H], &want.recv.x_bf16[at * H] + H,
                               &got.recv.x_bf16[at * H]))
            << "src " << s << " slot " << j;
      } else {
        ASSERT_TRUE(std::equal(&want.recv.x_fp8[at * H], &want.recv.x_fp8[at * H] + H,
                               &got.recv.x_fp8[at * H]))
            << "src " << s << " slot " << j;
        for (int64_t c = 0; c < SC; ++c)
          ASSERT_EQ(float_to_bits(want.recv.x_scales[at * SC + c]),
                    float_to_bits(got.recv.x_scales[at * SC + c]));
      }
    }
  const GroupedRecv& a = want.grouped;
  const GroupedRecv& b = got.grouped;
  ASSERT_EQ(a.overflow, b.overflow);
  ASSERT_EQ(a.rows_needed, b.rows_needed);
  ASSERT_EQ(a.num_rows, b.num_rows);
  if (a.overflow) return;
  ASSERT_EQ(a.expert_counts, b.expert_counts);
  ASSERT_EQ(a.expert_offsets, b.expert_offsets);
  ASSERT_EQ(a.m_indices, b.m_indices);
  for (int64_t row = 0; row < a.num_rows; ++row) {
    ASSERT_EQ(a.row_src[row], b.row_src[row]) << "row " << row;
    if (a.row_src[row] < 0) continue;
    if (cfg.payload == Payload::kBF16) {
      ASSERT_TRUE(std::equal(&a.x_bf16[row * H], &a.x_bf16[row * H] + H, &b.x_bf16[row * H]))
          << "row " << row;
    } else {
      ASSERT_TRUE(std::equal(&a.x_fp8[row * H], &a.x_fp8[row * H] + H, &b.x_fp8[row * H]))
          << "row " << row;
      for (int64_t c = 0; c < SC; ++c)
        ASSERT_EQ(float_to_bits(a.x_scales[row * SC + c]), float_to_bits(b.x_scales[row * SC + c]));
    }
  }
  for (int s = 0; s < R; ++s)
    for (int64_t j = 0; j < want.recv.count[s]; ++j)
      for (int k = 0; k < K; ++k)
        ASSERT_EQ(a.token_rows[(s * Tmax + j) * K + k], b.token_rows[(s * Tmax + j) * K + k]);
}

// SendHandle::node_slot of the two-stage route as it must be: node_slot[t * N + m] = index of
// token t among the tokens of its rank that touch node m (-1 if t touches none of m's ranks).
inline std::vector<int32_t> expected_node_slot(const EpConfig& cfg, const SendHandle& h) {
  const int R = cfg.num_ranks, G = cfg.ranks_per_node(), N = cfg.nodes();
  std::vector<int32_t> ns(h.tokens * N, -1);
  for (int m = 0; m < N; ++m) {
    int32_t q = 0;
    for (int64_t t = 0; t < h.tokens; ++t) {
      bool hit = false;
      for (int d = m * G; d < (m + 1) * G; ++d) hit = hit || h.slot[t * R + d] >= 0;
      if (hit) ns[t * N + m] = q++;
    }
  }
  return ns;
}

// Deterministic pseudo expert outputs for the grouped rows of rank d (BF16 values of either sign
// in [0.5, 2) and their binades, cheap enough for large row bounds).
inline std::vector<uint16_t> expert_outputs(const EpConfig& cfg, int rank, uint64_t seed) {
  const int64_t n = cfg.row_bound() * cfg.hidden;
  std::vector<uint16_t> y(n);
  for (int64_t i = 0; i < n; i += 2) {
    const uint32_t u = philox_u32(seed, 5000 + rank, i / 2);
    y[i] = static_cast<uint16_t>(0x3F00u | (u & 0x80FFu));
    if (i + 1 < n) y[i + 1] = static_cast<uint16_t>(0x3F00u | ((u >> 16) & 0x80FFu));
  }
  return y;
}

}  // namespace fp8moe::comm::testing
