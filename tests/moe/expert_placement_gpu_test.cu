// map_to_physical_cuda against map_to_physical_reference on fresh random routings, positions and
// placements (dropped slots included), the output poisoned before each launch: equal id for id.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/moe/expert_placement_cuda.h"

namespace fp8moe {
namespace {

TEST(ExpertPlacementGpu, MapEqualsTheReference) {
  struct Case {
    int experts, slots, top_k;
    int64_t tokens;
  };
  const Case cases[] = {{256, 288, 8, 4096}, {64, 64, 6, 777}, {16, 48, 4, 1}, {8, 12, 2, 0}};
  uint64_t seed = 2511;
  for (const Case& c : cases) {
    PhiloxStream rng(seed++, 0);
    // Slots: every expert once, the rest to random experts (EPLB's shape of output).
    std::vector<int32_t> phy2log(static_cast<size_t>(c.slots));
    for (int s = 0; s < c.slots; ++s)
      phy2log[s] = s < c.experts ? s : static_cast<int32_t>(rng.next_u32() % c.experts);
    for (int s = c.slots - 1; s > 0; --s) std::swap(phy2log[s], phy2log[rng.next_u32() % (s + 1)]);
    const ExpertPlacement p = ExpertPlacement::from_phy2log(c.experts, phy2log);
    std::vector<int32_t> logical(static_cast<size_t>(c.tokens * c.top_k)), pos(c.tokens);
    for (auto& id : logical)
      id = rng.next_u32() % 50 == 0 ? -1 : static_cast<int32_t>(rng.next_u32() % c.experts);
    for (auto& x : pos) x = static_cast<int32_t>(rng.next_u32() % 163840);
    std::vector<int32_t> want(logical.size());
    map_to_physical_reference(p, logical.data(), pos.data(), c.tokens, c.top_k, want.data());

    ExpertPlacementGpu dp(p);
    int32_t *d_in = nullptr, *d_pos = nullptr, *d_out = nullptr;
    const size_t n = std::max<size_t>(1, logical.size());
    FM_CHECK_CUDA(cudaMalloc(&d_in, n * 4));
    FM_CHECK_CUDA(cudaMalloc(&d_out, n * 4));
    FM_CHECK_CUDA(cudaMalloc(&d_pos, std::max<size_t>(1, pos.size()) * 4));
    FM_CHECK_CUDA(cudaMemcpy(d_in, logical.data(), logical.size() * 4, cudaMemcpyHostToDevice));
    FM_CHECK_CUDA(cudaMemcpy(d_pos, pos.data(), pos.size() * 4, cudaMemcpyHostToDevice));
    FM_CHECK_CUDA(cudaMemset(d_out, 0x7b, n * 4));  // poison
    map_to_physical_cuda(dp, d_in, d_pos, c.tokens, c.top_k, d_out, nullptr);
    std::vector<int32_t> got(logical.size());
    FM_CHECK_CUDA(cudaMemcpy(got.data(), d_out, got.size() * 4, cudaMemcpyDeviceToHost));
    int64_t mismatches = 0;
    for (size_t i = 0; i < got.size(); ++i) mismatches += got[i] != want[i];
    std::printf("[ map ] E %d, P %d, K %d, T %lld: %lld of %zu ids differ\n", c.experts, c.slots,
                c.top_k, static_cast<long long>(c.tokens), static_cast<long long>(mismatches),
                got.size());
    EXPECT_EQ(mismatches, 0);
    cudaFree(d_in);
    cudaFree(d_pos);
    cudaFree(d_out);
  }
}

}  // namespace
}  // namespace fp8moe
