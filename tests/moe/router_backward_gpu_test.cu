// route_backward_cuda against route_backward (router.h) bit for bit, on fresh random logits and
// gate gradients (the forward by route()), output poisoned; bad indices flagged; bad configs
// thrown.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "../kernels/gpu_test_util.cuh"
#include "../support/expect_invalid.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/moe/router.h"
#include "fp8moe/moe/router_backward_cuda.h"

namespace fp8moe {
namespace {

using test::DeviceBuffer;

RouterConfig make_config(int E, int K, int G, int TG, float scale, bool norm) {
  RouterConfig c;
  c.n_routed_experts = E;
  c.num_experts_per_tok = K;
  c.n_group = G;
  c.topk_group = TG;
  c.routed_scaling_factor = scale;
  c.norm_topk_prob = norm;
  return c;
}

TEST(RouterBackwardGpu, MatchesCpuBitForBit) {
  struct Case {
    const char* name;
    RouterConfig config;
    int64_t tokens;
  };
  const Case cases[] = {
      {"v3", make_config(256, 8, 8, 4, 2.5f, true), 8192},
      {"v3_nonorm", make_config(256, 8, 8, 4, 2.5f, false), 1000},
      {"e64_k6", make_config(64, 6, 8, 3, 1.0f, true), 3001},
      {"k1", make_config(32, 1, 4, 2, 1.0f, true), 777},
      {"e1024_k32", make_config(1024, 32, 16, 8, 2.5f, true), 300},
      {"e20_k3", make_config(20, 3, 1, 1, 16.0f, true), 50},
  };
  uint64_t seed = 4242;
  for (const Case& c : cases) {
    const int E = c.config.n_routed_experts, K = c.config.num_experts_per_tok;
    const int64_t T = c.tokens;
    PhiloxStream rng(seed++, 0);
    std::vector<float> logits(T * E), bias(E), grad(T * K);
    for (auto& v : logits) v = rng.normal() * 2.0f;
    for (auto& v : bias) v = rng.uniform(-0.3f, 0.3f);
    for (auto& v : grad) v = rng.normal() * 1e-3f;
    const RouterOutput fwd = route(c.config, logits.data(), T, bias.data());
    std::vector<float> ref(T * E);
    route_backward(c.config, fwd, grad.data(), ref.data());
    DeviceBuffer<float> ds(fwd.scores), dg(grad), out(T * E);
    DeviceBuffer<int32_t> di(fwd.topk_idx);
    DeviceBuffer<uint32_t> status(std::vector<uint32_t>{0});
    out.poison();
    route_backward_cuda(c.config, ds.get(), di.get(), dg.get(), T, out.get(), status.get(),
                        nullptr);
    const std::vector<float> got = out.download();
    size_t diff = 0;
    for (size_t i = 0; i < got.size(); ++i) diff += std::memcmp(&got[i], &ref[i], 4) != 0;
    EXPECT_EQ(diff, 0u) << c.name;
    EXPECT_EQ(status.download()[0], 0u) << c.name;
    std::printf("router backward %s (T %lld): %zu of %zu values differ\n", c.name,
                static_cast<long long>(T), diff, got.size());
  }
}

TEST(RouterBackwardGpu, RepeatedAndBadIndices) {
  const RouterConfig config = make_config(16, 4, 1, 1, 2.0f, true);
  const int64_t T = 3;
  RouterOutput fwd;
  fwd.tokens = T;
  fwd.top_k = 4;
  fwd.topk_idx = {0, 3, 3, 9, /* bad */ 1, 2, 16, 4, 5, 6, 7, 8};
  fwd.scores.resize(T * 16);
  for (size_t i = 0; i < fwd.scores.size(); ++i) fwd.scores[i] = 0.05f + 0.05f * (i % 17);
  const std::vector<float> grad = {0.1f, -0.2f, 0.3f, 0.4f, 1, 1, 1, 1, 0.5f, -0.5f, 0.25f, 2};
  DeviceBuffer<float> ds(fwd.scores), dg(grad), out(T * 16);
  DeviceBuffer<int32_t> di(fwd.topk_idx);
  DeviceBuffer<uint32_t> status(std::vector<uint32_t>{0});
  out.poison();
  route_backward_cuda(config, ds.get(), di.get(), dg.get(), T, out.get(), status.get(), nullptr);
  const std::vector<float> got = out.download();
  EXPECT_EQ(status.download()[0], kRouterBackwardBadIndex);
  for (int e = 0; e < 16; ++e) EXPECT_EQ(got[16 + e], 0.0f) << "bad token's row, expert " << e;
  // Rows 0 and 2 as the CPU computes them (token 1 replaced by a valid one for the reference).
  RouterOutput ok = fwd;
  ok.topk_idx[6] = 10;
  std::vector<float> ref(T * 16);
  route_backward(config, ok, grad.data(), ref.data());
  for (const int t : {0, 2})
    for (int e = 0; e < 16; ++e)
      EXPECT_EQ(std::memcmp(&got[t * 16 + e], &ref[t * 16 + e], 4), 0) << t << " " << e;
  test::expect_invalid(
      [&] {
        route_backward_cuda(make_config(16, 40, 1, 1, 1.0f, true), ds.get(), di.get(), dg.get(), T,
                            out.get(), nullptr, nullptr);
      },
      "num_experts_per_tok");
}

}  // namespace
}  // namespace fp8moe
