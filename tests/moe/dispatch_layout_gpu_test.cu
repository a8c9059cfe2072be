// The GPU dispatch layout against the CPU reference, array for array, on random, skewed,
// empty-expert and dropped-slot inputs; outputs poisoned before each launch.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/moe/dispatch_layout.h"
#include "fp8moe/moe/dispatch_layout_cuda.h"

namespace fp8moe {
namespace {

template <typename T>
struct DeviceArray {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceArray(size_t count) : n(count) {
    FM_CHECK_CUDA(cudaMalloc(&ptr, sizeof(T) * std::max<size_t>(1, n)));
    FM_CHECK_CUDA(cudaMemset(ptr, 0x7b, sizeof(T) * std::max<size_t>(1, n)));  // poison
  }
  explicit DeviceArray(const std::vector<T>& v) : DeviceArray(v.size()) {
    if (n) FM_CHECK_CUDA(cudaMemcpy(ptr, v.data(), sizeof(T) * n, cudaMemcpyHostToDevice));
  }
  ~DeviceArray() { cudaFree(ptr); }
  std::vector<T> host() const {
    std::vector<T> v(n);
    if (n) FM_CHECK_CUDA(cudaMemcpy(v.data(), ptr, sizeof(T) * n, cudaMemcpyDeviceToHost));
    return v;
  }
};

enum class Dist { kUniform, kSkewed, kEmptyExperts, kDropped };
const char* dist_name(Dist d) {
  switch (d) {
    case Dist::kUniform:
      return "uniform";
    case Dist::kSkewed:
      return "skewed";
    case Dist::kEmptyExperts:
      return "empty_experts";
    case Dist::kDropped:
      return "dropped";
  }
  return "?";
}

// Distinct expert ids per token, drawn from the distribution.
std::vector<int32_t> make_ids(int64_t T, int K, int E, Dist dist, uint64_t seed) {
  PhiloxStream rng(seed, 0);
  std::vector<int32_t> ids(T * K);
  for (int64_t t = 0; t < T; ++t) {
    for (int k = 0; k < K; ++k) {
      int32_t e;
      bool fresh;
      do {
        const float u = rng.uniform();
        switch (dist) {
          case Dist::kUniform:
            e = static_cast<int32_t>(u * E);
            break;
          case Dist::kSkewed:
            e = static_cast<int32_t>(std::pow(u, 4.0f) * E);
            break;
          case Dist::kEmptyExperts:
            e = static_cast<int32_t>(u * (E / 4)) * 4 + 1;
            break;
          default:
            e = static_cast<int32_t>(u * E);
            break;
        }
        e = std::min(e, E - 1);
        fresh = true;
        for (int j = 0; j < k; ++j) fresh &= ids[t * K + j] != e;
      } while (!fresh);
      ids[t * K + k] = e;
    }
    if (dist == Dist::kDropped)
      for (int k = 0; k < K; ++k)
        if (rng.uniform() < 0.2f) ids[t * K + k] = -1;
  }
  return ids;
}

TEST(LayoutGpu, MatchesCpuReference) {
  struct Shape {
    int64_t tokens;
    int top_k, experts, ranks;
  };
  const Shape shapes[] = {{4096, 8, 256, 8}, {1000, 6, 64, 4},   {3, 8, 256, 32},
                          {0, 8, 256, 8},    {20000, 8, 256, 1}, {777, 2, 16, 2}};
  uint64_t seed = 77;
  for (const Shape& sh : shapes)
    for (Dist dist : {Dist::kUniform, Dist::kSkewed, Dist::kEmptyExperts, Dist::kDropped}) {
      const std::vector<int32_t> ids = make_ids(sh.tokens, sh.top_k, sh.experts, dist, seed++);
      const ExpertSharding sharding{sh.experts, sh.ranks};
      const int64_t slots = sh.tokens * sh.top_k;
      DeviceArray<int32_t> d_ids(ids);
      bool ok = true;

      // Counts.
      const DispatchCounts ref_counts = dispatch_counts(ids.data(), sh.tokens, sh.top_k, sharding);
      DeviceArray<int32_t> per_expert(sh.experts), per_rank(sh.ranks);
      DeviceArray<uint8_t> in_rank(sh.tokens * sh.ranks);
      dispatch_counts_cuda(d_ids.ptr, sh.tokens, sh.top_k, sharding,
                           {per_expert.ptr, per_rank.ptr, in_rank.ptr}, nullptr);
      FM_CHECK_CUDA(cudaDeviceSynchronize());
      EXPECT_EQ(per_expert.host(), ref_counts.tokens_per_expert);
      EXPECT_EQ(per_rank.host(), ref_counts.tokens_per_rank);
      EXPECT_EQ(in_rank.host(), ref_counts.token_in_rank);
      ok &= per_expert.host() == ref_counts.tokens_per_expert &&
            in_rank.host() == ref_counts.token_in_rank;

      // Grouped-contiguous and masked layouts for every rank.
      float total_ms = 0;
      for (int r = 0; r < sh.ranks; ++r) {
        const int b = sharding.first_expert(r), e = sharding.end_expert(r), L = e - b;
        const GroupedLayout ref = grouped_layout(ids.data(), sh.tokens, sh.top_k, b, e);
        const int64_t cap = grouped_layout_max_rows(sh.tokens, sh.top_k, L);
        DeviceArray<int32_t> counts(L), offsets(L + 1), m_idx(cap), row_src(cap), s2r(slots);
        const size_t ws_bytes = layout_cuda_workspace_bytes(sh.tokens, sh.top_k, L);
        DeviceArray<uint8_t> ws(ws_bytes);
        cudaEvent_t start, stop;
        FM_CHECK_CUDA(cudaEventCreate(&start));
        FM_CHECK_CUDA(cudaEventCreate(&stop));
        FM_CHECK_CUDA(cudaEventRecord(start));
        grouped_layout_cuda(d_ids.ptr, sh.tokens, sh.top_k, b, e, kGroupedLayoutAlign,
                            {counts.ptr, offsets.ptr, m_idx.ptr, row_src.ptr, s2r.ptr, cap}, ws.ptr,
                            ws_bytes, nullptr);
        FM_CHECK_CUDA(cudaEventRecord(stop));
        FM_CHECK_CUDA(cudaEventSynchronize(stop));
        float ms = 0;
        FM_CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
        total_ms += ms;
        cudaEventDestroy(start);
        cudaEventDestroy(stop);
        const int64_t rows = ref.num_rows();
        std::vector<int32_t> got_m = m_idx.host(), got_src = row_src.host();
        EXPECT_EQ(counts.host(), ref.expert_counts) << "rank " << r;
        EXPECT_EQ(offsets.host(), ref.expert_offsets) << "rank " << r;
        EXPECT_EQ(std::vector<int32_t>(got_m.begin(), got_m.begin() + rows), ref.m_indices);
        EXPECT_EQ(std::vector<int32_t>(got_src.begin(), got_src.begin() + rows), ref.row_src);
        for (int64_t i = rows; i < cap; ++i) {
          EXPECT_EQ(got_m[i], -1);
          EXPECT_EQ(got_src[i], -1);
        }
        EXPECT_EQ(s2r.host(), ref.src_to_row) << "rank " << r;
        ok &= s2r.host() == ref.src_to_row &&
              std::vector<int32_t>(got_src.begin(), got_src.begin() + rows) == ref.row_src;

        int max_count = 0;
        for (int32_t c : ref.expert_counts) max_count = std::max(max_count, c);
        const MaskedLayout mref = masked_layout(ids.data(), sh.tokens, sh.top_k, b, e, max_count);
        DeviceArray<int32_t> masked_m(L), mrow(static_cast<size_t>(L) * max_count), ms2r(slots);
        masked_layout_cuda(d_ids.ptr, sh.tokens, sh.top_k, b, e, max_count,
                           {masked_m.ptr, mrow.ptr, ms2r.ptr}, ws.ptr, ws_bytes, nullptr);
        FM_CHECK_CUDA(cudaDeviceSynchronize());
        EXPECT_EQ(masked_m.host(), mref.masked_m);
        EXPECT_EQ(mrow.host(), mref.row_src);
        EXPECT_EQ(ms2r.host(), mref.src_to_row);
        ok &= mrow.host() == mref.row_src && ms2r.host() == mref.src_to_row;
      }
      std::printf("layout_gpu T=%-6lld K=%d E=%-3d ranks=%-2d %-13s %s grouped_us_per_rank=%.1f\n",
                  static_cast<long long>(sh.tokens), sh.top_k, sh.experts, sh.ranks,
                  dist_name(dist), ok ? "exact" : "MISMATCH", 1e3 * total_ms / sh.ranks);
    }
}

TEST(LayoutGpu, MaskedOverflowIsReportedNotWritten) {
  // 10 tokens all to expert 0 with capacity 4: four rows kept (the first four tokens),
  // masked_m = 10 so the caller sees the overflow.
  std::vector<int32_t> ids(10, 0);
  DeviceArray<int32_t> d_ids(ids), masked_m(1), rows(4), s2r(10);
  const size_t ws_bytes = layout_cuda_workspace_bytes(10, 1, 1);
  DeviceArray<uint8_t> ws(ws_bytes);
  masked_layout_cuda(d_ids.ptr, 10, 1, 0, 1, 4, {masked_m.ptr, rows.ptr, s2r.ptr}, ws.ptr, ws_bytes,
                     nullptr);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  EXPECT_EQ(masked_m.host(), std::vector<int32_t>{10});
  EXPECT_EQ(rows.host(), (std::vector<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(s2r.host(), (std::vector<int32_t>{0, 1, 2, 3, -1, -1, -1, -1, -1, -1}));
}

}  // namespace
}  // namespace fp8moe
