// The gathered grouped contiguous FP8 GEMM (fp8_gemm_nt_grouped_contiguous_gathered) against
// fp8_gemm_nt_grouped_contiguous on the materialised rows, bit for bit over the whole poisoned D
// (padding rows untouched in both), and its scale gather against a CPU loop (see
// scale_layout_gpu_test.cu). The source rows sit in records with their scales behind the codes,
// as the EP dispatch receives them; each is used by ~4 logical rows in random order.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/fp8_gemm.h"
#include "fp8moe/kernels/scale_layout.h"
#include "gpu_test_util.cuh"

namespace fp8moe {
namespace {

using kernels::GemmTileConfig;
using test::DeviceBuffer;

uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// One gathered problem: records, index, layout, and the same rows materialised.
struct GatheredCase {
  int64_t m = 0, n = 0, k = 0, groups = 0, src_rows = 0, stride = 0, offset = 0;
  std::vector<int32_t> layout, index;
  std::vector<uint8_t> records;  // offset bytes, then src_rows records of stride bytes
  std::vector<uint8_t> a_mat;    // [m, k], padding rows NaN codes
  std::vector<float> sa_mat;     // [kb][pad(m)], padding entries 0
  std::vector<uint8_t> b;        // [groups, n, k]
  std::vector<float> sb;         // [groups][ceil(n/128)][kb]
};

// rows_per_group[g] valid rows, padded to 128, plus pad_blocks[g] whole padding blocks.
GatheredCase make_case(const std::vector<int64_t>& rows_per_group, int64_t n, int64_t k,
                       uint64_t seed, const std::vector<int64_t>& pad_blocks = {}) {
  GatheredCase c;
  c.n = n;
  c.k = k;
  c.groups = static_cast<int64_t>(rows_per_group.size());
  const int64_t kb = k / 128;
  int64_t valid = 0;
  for (int64_t r : rows_per_group) valid += r;
  c.src_rows = std::max<int64_t>(1, (valid + 3) / 4);
  // Records: codes, the kb scales, then a few spare bytes (not a multiple of 128 apart).
  c.stride = (k + 4 * kb + 48 + 15) / 16 * 16;
  c.offset = 16 * (1 + seed % 5);
  std::mt19937_64 rng(seed);
  // Each source row about 4 times, in random order.
  std::vector<int32_t> pool;
  for (int rep = 0; rep < 4; ++rep)
    for (int64_t i = 0; i < c.src_rows; ++i) pool.push_back(static_cast<int32_t>(i));
  std::shuffle(pool.begin(), pool.end(), rng);
  size_t next = 0;
  for (int64_t g = 0; g < c.groups; ++g) {
    const int64_t padded = (rows_per_group[g] + 127) / 128 * 128 +
                           (static_cast<size_t>(g) < pad_blocks.size() ? pad_blocks[g] * 128 : 0);
    for (int64_t r = 0; r < padded; ++r) {
      const bool real = r < rows_per_group[g];
      c.layout.push_back(real ? static_cast<int32_t>(g) : -1);
      // Padding indices of several negative values (any < 0 is padding).
      c.index.push_back(real ? pool[next++ % pool.size()] : -1 - static_cast<int32_t>(r % 3));
    }
  }
  c.m = static_cast<int64_t>(c.layout.size());
  c.records.assign(static_cast<size_t>(c.offset + c.src_rows * c.stride), 0xAB);
  for (int64_t i = 0; i < c.src_rows; ++i) {
    uint8_t* rec = c.records.data() + c.offset + i * c.stride;
    for (int64_t j = 0; j < k; ++j) {
      const uint8_t v = static_cast<uint8_t>(mix(seed * 1000003 + i * k + j));
      rec[j] = (v & 0x7F) == 0x7F ? 0x3C : v;  // E4M3 without NaN codes
    }
    for (int64_t j = 0; j < kb; ++j) {
      const float s = std::ldexp(1.0f + float(mix(seed + 7 * i + j) % 1000) / 1000.0f,
                                 int(mix(seed + i) % 7) - 10);
      std::memcpy(rec + k + 4 * j, &s, 4);
    }
  }
  const int64_t pm = padded_rows(c.m);
  c.a_mat.assign(static_cast<size_t>(c.m * k), 0xFF);
  c.sa_mat.assign(static_cast<size_t>(kb * pm), 0.0f);
  for (int64_t r = 0; r < c.m; ++r) {
    if (c.index[r] < 0) continue;
    const uint8_t* rec = c.records.data() + c.offset + c.index[r] * c.stride;
    std::memcpy(c.a_mat.data() + r * k, rec, static_cast<size_t>(k));
    for (int64_t j = 0; j < kb; ++j) std::memcpy(&c.sa_mat[j * pm + r], rec + k + 4 * j, 4);
  }
  const int64_t nb = (n + 127) / 128;
  c.b.resize(static_cast<size_t>(c.groups * n * k));
  for (size_t i = 0; i < c.b.size(); ++i) {
    const uint8_t v = static_cast<uint8_t>(mix(seed * 31 + i));
    c.b[i] = (v & 0x7F) == 0x7F ? 0x38 : v;
  }
  c.sb.resize(static_cast<size_t>(c.groups * nb * kb));
  for (size_t i = 0; i < c.sb.size(); ++i)
    c.sb[i] = std::ldexp(1.0f + float(mix(seed * 17 + i) % 1000) / 1000.0f, -6);
  return c;
}

struct DeviceCase {
  DeviceBuffer<uint8_t> records, a_mat, b;
  DeviceBuffer<float> sa_mat, sa_gathered, sb;
  DeviceBuffer<int32_t> layout, index;
  explicit DeviceCase(const GatheredCase& c)
      : records(c.records),
        a_mat(c.a_mat),
        b(c.b),
        sa_mat(c.sa_mat),
        sa_gathered(c.sa_mat.size()),
        sb(c.sb),
        layout(c.layout),
        index(c.index) {}
  kernels::GatheredRows rows(const GatheredCase& c) const {
    return {records.get() + c.offset, c.src_rows, c.stride, index.get()};
  }
};

void expect_gathered_equals_contiguous(const GatheredCase& c, const GemmTileConfig* force) {
  SCOPED_TRACE(testing::Message() << "m=" << c.m << " n=" << c.n << " k=" << c.k
                                  << " g=" << c.groups << " force="
                                  << (force ? kernels::describe_tile_config(*force) : "pick"));
  DeviceCase dc(c);
  // The scales: gathered from the records on the device, as the CPU materialised them.
  dc.sa_gathered.poison();
  kernels::gather_scales_to_mn_major(
      reinterpret_cast<const float*>(dc.records.get() + c.offset + c.k), c.stride / 4,
      dc.index.get(), c.m, c.k / 128, dc.sa_gathered.get(), nullptr);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<float> sa_got = dc.sa_gathered.download();
  ASSERT_EQ(std::memcmp(sa_got.data(), c.sa_mat.data(), c.sa_mat.size() * 4), 0);

  DeviceBuffer<bf16> d_want(static_cast<size_t>(c.m * c.n)), d_got(static_cast<size_t>(c.m * c.n));
  d_want.poison();
  d_got.poison();
  kernels::fp8_gemm_nt_grouped_contiguous(dc.a_mat.get(), dc.sa_mat.get(), dc.b.get(), dc.sb.get(),
                                          d_want.get(), dc.layout.get(), c.m, c.n, c.k, c.groups,
                                          nullptr, force);
  kernels::fp8_gemm_nt_grouped_contiguous_gathered(dc.rows(c), dc.sa_gathered.get(), dc.b.get(),
                                                   dc.sb.get(), d_got.get(), dc.layout.get(), c.m,
                                                   c.n, c.k, c.groups, nullptr, force);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<bf16> want = d_want.download(), got = d_got.download();
  int64_t written = 0, padding_untouched = 0, mismatches = 0, first_bad = -1;
  for (int64_t r = 0; r < c.m; ++r)
    for (int64_t j = 0; j < c.n; ++j) {
      const size_t i = static_cast<size_t>(r * c.n + j);
      if (want[i].bits != got[i].bits && mismatches++ == 0) first_bad = static_cast<int64_t>(i);
      if (c.layout[r] >= 0)
        written += want[i].bits != 0xFFFF;
      else
        padding_untouched += got[i].bits == 0xFFFF;
    }
  int64_t valid_rows = 0, padding_rows = 0;
  for (int32_t g : c.layout) (g >= 0 ? valid_rows : padding_rows) += 1;
  std::printf(
      "gathered          m=%-6lld n=%-6lld k=%-6lld g=%-3lld src=%-5lld %-28s mismatches=%lld\n",
      (long long)c.m, (long long)c.n, (long long)c.k, (long long)c.groups, (long long)c.src_rows,
      force ? kernels::describe_tile_config(*force).c_str() : "pick", (long long)mismatches);
  EXPECT_EQ(mismatches, 0) << "first at row " << first_bad / c.n << " col " << first_bad % c.n;
  // Every real row was written (a poisoned pair of outputs would compare equal too).
  EXPECT_EQ(written, valid_rows * c.n);
  EXPECT_EQ(padding_untouched, padding_rows * c.n);
}

TEST(Fp8GemmGatheredGpu, EqualsContiguousOnMaterialisedRows) {
  // Awkward N (the last 256-wide tile column mostly empty), a 1-row and an empty group, a padded
  // 130-row group, every compiled tile and both epilogues.
  const GatheredCase awkward = make_case({130, 0, 1, 256, 64}, 2112, 512, 400);
  expect_gathered_equals_contiguous(awkward, nullptr);
  for (GemmTileConfig f : {GemmTileConfig{128, 256, 0, 0, 2}, GemmTileConfig{128, 256, 0, 0, 1},
                           GemmTileConfig{128, 128, 0, 0, 2}, GemmTileConfig{128, 128, 0, 0, 1}})
    expect_gathered_equals_contiguous(awkward, &f);
  // The two grouped bench shapes (N x K = 4096 x 7168 and 7168 x 2048), several waves, with whole
  // padding blocks between experts (skipped tiles) and few stages.
  const GatheredCase wide = make_case({900, 512, 0, 129, 2000}, 4096, 7168, 410, {0, 1, 0, 2});
  expect_gathered_equals_contiguous(wide, nullptr);
  const GemmTileConfig few_stages{128, 256, 3, 0, 2};
  expect_gathered_equals_contiguous(wide, &few_stages);
  const GatheredCase deep = make_case({384, 200, 640, 1, 1500, 0, 300, 77}, 7168, 2048, 420);
  expect_gathered_equals_contiguous(deep, nullptr);
  const GemmTileConfig narrow{128, 128, 0, 0, 2};
  expect_gathered_equals_contiguous(deep, &narrow);
}

// The producer's tile walk and TMA issue (session 13: B's and the A scales' TMA from two warps,
// each posting its own bytes) at tile starts: 2-3 CTAs, so each runs several tiles (the next
// tile's loads ahead), at 3 stages (arrivals one block late) and 4 or more (two); one K block a
// tile (a tile's only block right after its start); the last tile column past N; the 7168 x 2048
// shape at the 128x256 tile with both epilogues.
TEST(Fp8GemmGatheredGpu, EqualsContiguousAcrossTileStarts) {
  const GatheredCase awkward = make_case({130, 0, 1, 256, 64}, 2112, 512, 470);
  for (const GemmTileConfig& f :
       {GemmTileConfig{128, 128, 3, 0, 1}, GemmTileConfig{128, 256, 3, 2, 2},
        GemmTileConfig{128, 128, 4, 2, 1}})
    expect_gathered_equals_contiguous(awkward, &f);
  const GatheredCase one_block = make_case({200, 130, 0, 5}, 384, 128, 475, {1, 0, 0, 0});
  for (const GemmTileConfig& f :
       {GemmTileConfig{128, 256, 3, 3, 2}, GemmTileConfig{128, 128, 0, 0, 2}})
    expect_gathered_equals_contiguous(one_block, &f);
  const GatheredCase deep = make_case({384, 200, 640, 1, 1500, 0, 300, 77}, 7168, 2048, 490);
  const GemmTileConfig pick_like{128, 256, 0, 0, 2}, many_stages{128, 256, 0, 0, 1};
  expect_gathered_equals_contiguous(deep, &pick_like);
  expect_gathered_equals_contiguous(deep, &many_stages);
}

TEST(Fp8GemmGatheredGpu, RejectsBadInput) {
  const GatheredCase c = make_case({128, 64}, 256, 256, 430);
  DeviceCase dc(c);
  DeviceBuffer<bf16> d(static_cast<size_t>(c.m * c.n));
  const auto call = [&](kernels::GatheredRows a, int64_t k, const GemmTileConfig* force,
                        int64_t m) {
    kernels::fp8_gemm_nt_grouped_contiguous_gathered(a, dc.sa_mat.get(), dc.b.get(), dc.sb.get(),
                                                     d.get(), dc.layout.get(), m, c.n, k, c.groups,
                                                     nullptr, force);
  };
  const kernels::GatheredRows good = dc.rows(c);
  EXPECT_NO_THROW(call(good, c.k, nullptr, c.m));
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  kernels::GatheredRows bad = good;
  bad.stride = c.stride + 8;  // not a multiple of 16
  EXPECT_THROW(call(bad, c.k, nullptr, c.m), Error);
  bad = good;
  bad.stride = c.k - 16;  // shorter than a row
  EXPECT_THROW(call(bad, c.k, nullptr, c.m), Error);
  bad = good;
  bad.base = good.base + 8;  // misaligned
  EXPECT_THROW(call(bad, c.k, nullptr, c.m), Error);
  bad = good;
  bad.index = nullptr;
  EXPECT_THROW(call(bad, c.k, nullptr, c.m), Error);
  bad = good;
  bad.rows = -1;
  EXPECT_THROW(call(bad, c.k, nullptr, c.m), Error);
  EXPECT_THROW(call(good, 200, nullptr, c.m), Error);       // K % 128
  EXPECT_THROW(call(good, c.k, nullptr, c.m - 64), Error);  // M % 128
  for (GemmTileConfig f : {GemmTileConfig{256, 128, 0, 0, 2}, GemmTileConfig{64, 128, 0, 0, 2},
                           GemmTileConfig{128, 192, 0, 0, 2}, GemmTileConfig{128, 128, 2, 0, 2}})
    EXPECT_THROW(call(good, c.k, &f, c.m), Error) << kernels::describe_tile_config(f);
  // Scale gather: in_stride below kb, null index.
  DeviceBuffer<float> out(c.sa_mat.size());
  const float* in = reinterpret_cast<const float*>(dc.records.get() + c.offset + c.k);
  EXPECT_THROW(
      kernels::gather_scales_to_mn_major(in, 1, dc.index.get(), c.m, 2, out.get(), nullptr), Error);
  EXPECT_THROW(
      kernels::gather_scales_to_mn_major(in, c.stride / 4, nullptr, c.m, 2, out.get(), nullptr),
      Error);
  EXPECT_THROW(kernels::gather_scales_to_mn_major(in, c.stride / 4, dc.index.get(), -1, 2,
                                                  out.get(), nullptr),
               Error);
}

}  // namespace
}  // namespace fp8moe
