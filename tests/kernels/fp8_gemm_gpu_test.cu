// sm_90a FP8 GEMMs against the CPU reference gemm_fp8_reference (default AccumulatorModel:
// promotion every 128 K into FP32), on fresh random inputs with poisoned outputs. Prints one line
// per shape with the relative error.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <numeric>

#include "fp8moe/fp8/gemm_reference.h"
#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/fp8_gemm.h"
#include "gpu_test_util.cuh"

namespace fp8moe {
namespace {

using kernels::GemmTileConfig;
using test::DeviceBuffer;

// BF16 output: rounding alone is up to 2^-9 relative; the tensor cores' own summation inside a
// 128-K window differs from the reference's float lanes by far less.
constexpr double kBf16NormTol = 3e-3;
// FP32 output: what remains is the tensor cores' in-window summation.
constexpr double kF32NormTol = 1e-3;

struct ErrorStats {
  double rel_norm = 0;  // ||got - want|| / ||want||
  double max_rel = 0;   // max |got - want| / (|want| + rms(want))
  int64_t nonfinite = 0;
};

ErrorStats compare(const float* got, const float* want, int64_t count) {
  ErrorStats s;
  double num = 0, den = 0;
  for (int64_t i = 0; i < count; ++i) den += double(want[i]) * want[i];
  const double rms = std::sqrt(den / std::max<int64_t>(count, 1));
  for (int64_t i = 0; i < count; ++i) {
    if (!std::isfinite(got[i])) {
      ++s.nonfinite;
      continue;
    }
    const double e = double(got[i]) - want[i];
    num += e * e;
    s.max_rel = std::max(s.max_rel, std::fabs(e) / (std::fabs(want[i]) + rms + 1e-30));
  }
  s.rel_norm = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return s;
}

void report(const char* kind, int64_t m, int64_t n, int64_t k, int64_t groups, const ErrorStats& s,
            double tol) {
  std::printf(
      "%-18s m=%-6lld n=%-6lld k=%-6lld g=%-3lld rel_err=%.3e max_rel=%.3e nonfinite=%lld\n", kind,
      (long long)m, (long long)n, (long long)k, (long long)groups, s.rel_norm, s.max_rel,
      (long long)s.nonfinite);
  EXPECT_EQ(s.nonfinite, 0) << kind << " m=" << m << " n=" << n << " k=" << k;
  EXPECT_LT(s.rel_norm, tol) << kind << " m=" << m << " n=" << n << " k=" << k;
  EXPECT_LT(s.max_rel, 8 * tol) << kind << " m=" << m << " n=" << n << " k=" << k;
}

// A view of rows [r0, r0+rows) and columns [c0, c0+cols) of a 1x128 or 128x128 quantised matrix
// (offsets on tile boundaries).
Fp8MatrixRef sub_ref(const QuantizedMatrix& q, int64_t r0, int64_t rows, int64_t c0, int64_t cols) {
  Fp8MatrixRef ref = q.ref();
  const int64_t tr = ref.tile_rows();
  ref.codes += r0 * q.cols + c0;
  ref.scales += (r0 / tr) * ref.scale_row_stride + (c0 / 128) * ref.scale_col_stride;
  ref.rows = rows;
  ref.cols = cols;
  return ref;
}

QuantizedMatrix random_quantized(int64_t rows, int64_t cols, ScaleGranularity g, uint64_t seed) {
  const std::vector<float> x = test::random_matrix(rows, cols, seed);
  return quantize(x.data(), rows, cols, cols, g, {});
}

// ---- dense ----
void run_dense(int64_t m, int64_t n, int64_t k, const GemmTileConfig* force, uint64_t seed) {
  const QuantizedMatrix qa = random_quantized(m, k, ScaleGranularity::k1x128, seed);
  const QuantizedMatrix qb = random_quantized(n, k, ScaleGranularity::k128x128, seed + 1);
  DeviceBuffer<uint8_t> a(qa.codes), b(qb.codes);
  DeviceBuffer<float> sa(scales_mn_major(qa)), sb(qb.scales);
  DeviceBuffer<bf16> d(static_cast<size_t>(m * n));
  d.poison();
  kernels::fp8_gemm_nt(a.get(), sa.get(), b.get(), sb.get(), d.get(), m, n, k, nullptr, force);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<float> want(static_cast<size_t>(m * n));
  gemm_fp8_reference(qa.ref(), qb.ref(), want.data(), n, {}, false, test::test_threads());
  const std::vector<float> got = test::bf16_to_float(d.download());
  report(force ? kernels::describe_tile_config(*force).c_str() : "dense", m, n, k, 1,
         compare(got.data(), want.data(), m * n), kBf16NormTol);
}

TEST(Fp8GemmGpu, DenseDeepSeekShapesSmallM) {
  const int64_t nk[][2] = {{2112, 7168},  {24576, 1536}, {32768, 512},
                           {7168, 16384}, {4096, 7168},  {7168, 2048}};
  uint64_t seed = 10;
  for (int64_t m : {64, 128})
    for (const auto& s : nk) run_dense(m, s[0], s[1], nullptr, seed += 2);
}

TEST(Fp8GemmGpu, DenseAwkwardShapes) {
  uint64_t seed = 100;
  run_dense(1, 2112, 7168, nullptr, seed += 2);
  run_dense(1, 64, 128, nullptr, seed += 2);
  run_dense(100, 2112, 1024, nullptr, seed += 2);
  run_dense(200, 136, 384, nullptr, seed += 2);
  run_dense(333, 7168, 256, nullptr, seed += 2);
}

TEST(Fp8GemmGpu, DenseEveryTileShape) {
  uint64_t seed = 200;
  for (GemmTileConfig c : {GemmTileConfig{128, 192, 0, 0, 1}, GemmTileConfig{128, 192, 0, 0, 2},
                           GemmTileConfig{128, 192, 3, 5, 2}, GemmTileConfig{128, 128, 0, 0, 2},
                           GemmTileConfig{64, 128, 0, 0, 2}, GemmTileConfig{64, 64, 0, 0, 2},
                           GemmTileConfig{128, 128, 0, 0}, GemmTileConfig{64, 128, 0, 0},
                           GemmTileConfig{64, 64, 0, 0}, GemmTileConfig{128, 128, 3, 7}}) {
    run_dense(300, 2112, 1024, &c, seed += 2);
    run_dense(513, 384, 7168, &c, seed += 2);
    // 15 K blocks: the single first block and the runs of 8, 4 and 2 of the overlapped loop.
    run_dense(130, 256, 1920, &c, seed += 2);
  }
}

TEST(Fp8GemmGpu, DenseZeroRowsIsANoOp) {
  DeviceBuffer<uint8_t> a(128), b(64 * 128);
  DeviceBuffer<float> sa(4), sb(1);
  DeviceBuffer<bf16> d(64);
  d.poison(0x11);
  kernels::fp8_gemm_nt(a.get(), sa.get(), b.get(), sb.get(), d.get(), 0, 64, 128, nullptr);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  for (bf16 v : d.download()) EXPECT_EQ(v.bits, 0x1111);
}

TEST(Fp8GemmGpu, RejectsWhatItCannotTake) {
  DeviceBuffer<uint8_t> a(64 * 256), b(64 * 256);
  DeviceBuffer<float> sa(64 * 2), sb(4);
  DeviceBuffer<bf16> d(64 * 64);
  auto gemm = [&](const uint8_t* pa, int64_t m, int64_t n, int64_t k) {
    kernels::fp8_gemm_nt(pa, sa.get(), b.get(), sb.get(), d.get(), m, n, k, nullptr);
  };
  EXPECT_THROW(gemm(a.get(), 64, 64, 200), Error);      // K not a multiple of 128
  EXPECT_THROW(gemm(a.get(), 64, 60, 256), Error);      // N not a multiple of 8
  EXPECT_THROW(gemm(a.get() + 1, 64, 64, 256), Error);  // misaligned A
  EXPECT_THROW(gemm(a.get(), -1, 64, 256), Error);
  EXPECT_THROW(kernels::fp8_gemm_nt_grouped_contiguous(a.get(), sa.get(), b.get(), sb.get(),
                                                       d.get(), nullptr, 64, 64, 256, 1, nullptr),
               Error);  // M not a multiple of 128
  const GemmTileConfig bad{32, 128, 0, 0};
  EXPECT_THROW(kernels::fp8_gemm_nt(a.get(), sa.get(), b.get(), sb.get(), d.get(), 64, 64, 256,
                                    nullptr, &bad),
               Error);
  try {
    gemm(a.get(), 64, 64, 200);
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    EXPECT_NE(e.message().find("K=200"), std::string::npos) << e.message();
  }
}

// ---- grouped contiguous ----
void run_contiguous(const std::vector<int64_t>& rows_per_group, int64_t n, int64_t k, uint64_t seed,
                    const GemmTileConfig* force = nullptr) {
  const int64_t groups = static_cast<int64_t>(rows_per_group.size());
  std::vector<int64_t> starts;
  std::vector<int32_t> layout;
  for (int64_t g = 0; g < groups; ++g) {
    starts.push_back(static_cast<int64_t>(layout.size()));
    const int64_t padded = (rows_per_group[g] + 127) / 128 * 128;
    for (int64_t r = 0; r < padded; ++r) layout.push_back(r < rows_per_group[g] ? int32_t(g) : -1);
  }
  const int64_t m = static_cast<int64_t>(layout.size());
  const QuantizedMatrix qa =
      random_quantized(std::max<int64_t>(m, 1), k, ScaleGranularity::k1x128, seed);
  std::vector<QuantizedMatrix> qb;
  std::vector<uint8_t> b_codes;
  std::vector<float> b_scales;
  for (int64_t g = 0; g < groups; ++g) {
    qb.push_back(random_quantized(n, k, ScaleGranularity::k128x128, seed + 1 + g));
    b_codes.insert(b_codes.end(), qb.back().codes.begin(), qb.back().codes.end());
    b_scales.insert(b_scales.end(), qb.back().scales.begin(), qb.back().scales.end());
  }
  DeviceBuffer<uint8_t> a(qa.codes), b(b_codes);
  DeviceBuffer<float> sa(scales_mn_major(qa)), sb(b_scales);
  DeviceBuffer<int32_t> dl(layout);
  DeviceBuffer<bf16> d(static_cast<size_t>(std::max<int64_t>(m, 1) * n));
  d.poison();
  kernels::fp8_gemm_nt_grouped_contiguous(a.get(), sa.get(), b.get(), sb.get(), d.get(), dl.get(),
                                          m, n, k, groups, nullptr, force);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<bf16> got_bits = d.download();
  std::vector<float> got, want;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t rows = rows_per_group[g];
    std::vector<float> w(static_cast<size_t>(rows * n));
    if (rows > 0)
      gemm_fp8_reference(sub_ref(qa, starts[g], rows, 0, k), qb[g].ref(), w.data(), n, {}, false,
                         test::test_threads());
    want.insert(want.end(), w.begin(), w.end());
    for (int64_t r = 0; r < rows * n; ++r) got.push_back(to_float(got_bits[starts[g] * n + r]));
    // Padding rows are left untouched.
    const int64_t padded = (rows + 127) / 128 * 128;
    for (int64_t r = rows; r < padded; ++r)
      for (int64_t c = 0; c < n; ++c)
        ASSERT_EQ(got_bits[(starts[g] + r) * n + c].bits, 0xFFFF) << "padding row written";
  }
  report("grouped_contiguous", m, n, k, groups,
         compare(got.data(), want.data(), static_cast<int64_t>(got.size())), kBf16NormTol);
}

TEST(Fp8GemmGpu, GroupedContiguous) {
  run_contiguous({130, 0, 1, 256}, 2112, 512, 300);
  run_contiguous({200, 77}, 4096, 1024, 310);
  run_contiguous({0, 0, 128}, 384, 7168, 320);
  for (GemmTileConfig c : {GemmTileConfig{128, 192, 0, 0, 2}, GemmTileConfig{64, 64, 0, 0, 2},
                           GemmTileConfig{128, 128, 0, 0, 1}})
    run_contiguous({130, 0, 1, 256, 64}, 2112, 512, 330, &c);
}

// ---- grouped masked ----
void run_masked(const std::vector<int32_t>& masked, int64_t max_m, int64_t n, int64_t k,
                uint64_t seed, const GemmTileConfig* force = nullptr) {
  const int64_t groups = static_cast<int64_t>(masked.size());
  const int64_t kb = k / 128;
  std::vector<QuantizedMatrix> qa, qb;
  std::vector<uint8_t> a_codes, b_codes;
  std::vector<float> a_scales, b_scales;
  for (int64_t g = 0; g < groups; ++g) {
    qa.push_back(random_quantized(max_m, k, ScaleGranularity::k1x128, seed + 2 * g));
    qb.push_back(random_quantized(n, k, ScaleGranularity::k128x128, seed + 2 * g + 1));
    a_codes.insert(a_codes.end(), qa.back().codes.begin(), qa.back().codes.end());
    const std::vector<float> s = scales_mn_major(qa.back());
    EXPECT_EQ(static_cast<int64_t>(s.size()), kb * padded_rows(max_m));
    a_scales.insert(a_scales.end(), s.begin(), s.end());
    b_codes.insert(b_codes.end(), qb.back().codes.begin(), qb.back().codes.end());
    b_scales.insert(b_scales.end(), qb.back().scales.begin(), qb.back().scales.end());
  }
  DeviceBuffer<uint8_t> a(a_codes), b(b_codes);
  DeviceBuffer<float> sa(a_scales), sb(b_scales);
  DeviceBuffer<int32_t> mm(masked);
  DeviceBuffer<bf16> d(static_cast<size_t>(groups * max_m * n));
  d.poison();
  kernels::fp8_gemm_nt_grouped_masked(a.get(), sa.get(), b.get(), sb.get(), d.get(), mm.get(),
                                      groups, max_m, n, k, nullptr, force);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<bf16> got_bits = d.download();
  std::vector<float> got, want;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t rows = masked[g];
    std::vector<float> w(static_cast<size_t>(rows * n));
    if (rows > 0)
      gemm_fp8_reference(sub_ref(qa[g], 0, rows, 0, k), qb[g].ref(), w.data(), n, {}, false,
                         test::test_threads());
    want.insert(want.end(), w.begin(), w.end());
    for (int64_t r = 0; r < rows * n; ++r) got.push_back(to_float(got_bits[g * max_m * n + r]));
    for (int64_t r = rows; r < max_m; ++r)
      for (int64_t c = 0; c < n; ++c)
        ASSERT_EQ(got_bits[(g * max_m + r) * n + c].bits, 0xFFFF) << "masked row written";
  }
  report("grouped_masked", max_m, n, k, groups,
         compare(got.data(), want.data(), static_cast<int64_t>(got.size())), kBf16NormTol);
}

TEST(Fp8GemmGpu, GroupedMasked) {
  run_masked({0, 200, 37}, 200, 2112, 512, 400);
  run_masked({1, 64, 128, 0}, 128, 4096, 1024, 410);
  run_masked({5}, 16, 7168, 2048, 420);
  for (GemmTileConfig c : {GemmTileConfig{128, 192, 0, 0, 2}, GemmTileConfig{64, 128, 0, 0, 2},
                           GemmTileConfig{128, 128, 0, 0, 1}})
    run_masked({0, 200, 37, 192}, 200, 2112, 512, 430, &c);
}

// ---- weight gradient ----
TEST(Fp8WgradGpu, AccumulatesIntoC) {
  uint64_t seed = 500;
  for (const auto& s :
       {std::array<int64_t, 3>{256, 384, 512}, std::array<int64_t, 3>{100, 2112, 1024},
        std::array<int64_t, 3>{64, 136, 128}}) {
    const int64_t m = s[0], n = s[1], k = s[2];
    const QuantizedMatrix qa = random_quantized(m, k, ScaleGranularity::k1x128, seed++);
    const QuantizedMatrix qb = random_quantized(n, k, ScaleGranularity::k1x128, seed++);
    const std::vector<float> c0 = test::random_matrix(m, n, seed++);
    DeviceBuffer<uint8_t> a(qa.codes), b(qb.codes);
    DeviceBuffer<float> sa(scales_mn_major(qa)), sb(scales_mn_major(qb)), d(c0);
    kernels::fp8_gemm_nt_wgrad(a.get(), sa.get(), b.get(), sb.get(), d.get(), m, n, k, nullptr);
    FM_CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<float> want = c0;
    gemm_fp8_reference(qa.ref(), qb.ref(), want.data(), n, {}, true, test::test_threads());
    const std::vector<float> got = d.download();
    report("wgrad", m, n, k, 1, compare(got.data(), want.data(), m * n), kF32NormTol);
  }
}

TEST(Fp8WgradGpu, KGroupedAccumulatesEachExpert) {
  const std::vector<int64_t> ks = {128, 0, 384, 256};
  const int64_t m = 192, n = 256, groups = static_cast<int64_t>(ks.size());
  const int64_t k_total = std::accumulate(ks.begin(), ks.end(), int64_t{0});
  const QuantizedMatrix qa = random_quantized(m, k_total, ScaleGranularity::k1x128, 600);
  const QuantizedMatrix qb = random_quantized(n, k_total, ScaleGranularity::k1x128, 601);
  const std::vector<float> c0 = test::random_matrix(groups * m, n, 602);
  DeviceBuffer<uint8_t> a(qa.codes), b(qb.codes);
  DeviceBuffer<float> sa(scales_mn_major(qa)), sb(scales_mn_major(qb)), d(c0);
  kernels::fp8_gemm_nt_kgrouped_wgrad(a.get(), sa.get(), b.get(), sb.get(), d.get(), m, n, ks,
                                      nullptr);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<float> want = c0;
  int64_t k0 = 0;
  for (int64_t g = 0; g < groups; ++g) {
    if (ks[g] > 0)
      gemm_fp8_reference(sub_ref(qa, 0, m, k0, ks[g]), sub_ref(qb, 0, n, k0, ks[g]),
                         want.data() + g * m * n, n, {}, true, test::test_threads());
    k0 += ks[g];
  }
  const std::vector<float> got = d.download();
  report("kgrouped_wgrad", m, n, k_total, groups, compare(got.data(), want.data(), groups * m * n),
         kF32NormTol);
}

// CTA pairs sharing B tiles through TMA multicast (dense, even number of 128-row blocks).
TEST(Fp8GemmGpuPairs, DenseCtaPairs) {
  uint64_t seed = 700;
  for (GemmTileConfig c :
       {GemmTileConfig{128, 192, 0, 0, 2, 2}, GemmTileConfig{128, 128, 0, 0, 1, 2},
        GemmTileConfig{128, 128, 3, 6, 2, 2}}) {
    run_dense(1024, 2112, 1024, &c, seed += 2);
    run_dense(256, 384, 7168, &c, seed += 2);
    run_dense(200, 7168, 512, &c, seed += 2);  // 2 M-blocks, the second partial
    run_dense(300, 1024, 256, &c, seed += 2);  // 3 M-blocks: falls back to single CTAs
  }
}

}  // namespace
}  // namespace fp8moe
