// sm_90a FP8 GEMMs against the CPU reference gemm_fp8_reference (default AccumulatorModel:
// promotion every 128 K into FP32), on fresh random inputs with poisoned outputs. Prints one line
// per shape with the relative error.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <string>

#include "fp8moe/fp8/gemm_reference.h"
#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/fp8_gemm.h"
#include "fp8moe/kernels/sm90_gemm_heuristic.h"
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

// 256-row tiles (dense only): two math warpgroups holding two 64-row slabs each. Partial first
// and last M tiles, the half-empty 17th tile column of N = 2112 (run as 64-wide half tiles),
// odd block counts, one K block a tile on 5 CTAs (the stage ring and the staging buffer reused
// across many tiles per CTA), 3 stages, M = 1, and CTA pairs asked for (not built for these
// tiles: single CTAs run).
TEST(Fp8GemmGpu, DenseWideTiles) {
  uint64_t seed = 260;
  for (GemmTileConfig c : {GemmTileConfig{256, 128, 0, 0, 1}, GemmTileConfig{256, 128, 0, 0, 2},
                           GemmTileConfig{256, 128, 3, 0, 1}, GemmTileConfig{256, 128, 0, 7, 2},
                           GemmTileConfig{256, 128, 0, 0, 2, 2}}) {
    run_dense(300, 2112, 1024, &c, seed += 2);
    run_dense(513, 384, 7168, &c, seed += 2);
    run_dense(130, 256, 1920, &c, seed += 2);
    GemmTileConfig five = c;
    five.num_sms = 5;
    run_dense(1024, 1024, 128, &five, seed += 2);
    run_dense(1, 2112, 384, &c, seed += 2);
    // Last tile column at most half full, on grids where the launch runs it as 64-wide half
    // tiles two to a unit (sm90_gemm_heuristic_test.cpp HalfColumnUnits checks that these do):
    // odd tile rows (a lone half tile last) and 8 valid columns on one CTA, 34 units on 5 CTAs;
    // 72 valid columns: padded tiles.
    GemmTileConfig one = c;
    one.num_sms = 1;
    run_dense(513, 192, 384, &one, seed += 2);
    run_dense(300, 136, 1024, &one, seed += 2);
    run_dense(1000, 1088, 512, &five, seed += 2);
    run_dense(513, 200, 1920, &c, seed += 2);
  }
  // The V3 shape's form on the full grid (4096x2112 on 132 SMs: 256 full units + 8 pairs).
  const GemmTileConfig wide{256, 128, 0, 0, 2};
  run_dense(4096, 2112, 256, &wide, seed += 2);
}

// 128x256 tiles (dense and grouped): two math warpgroups of 64 rows, each holding two 128-wide
// column slabs (one B scale block each). N = 2112 and 384: the last tile column's second slab
// lies past N (computed, not stored); N = 448: it is partly inside (64 of 128 columns); 15 K
// blocks; one K block a tile on 5 CTAs (the ring and the staging buffer reused over many
// tiles); 3 stages; registers epilogue; M = 1 and 64; CTA pairs asked for (single CTAs run).
TEST(Fp8GemmGpu, DenseWideColumnTiles) {
  uint64_t seed = 2600;
  for (GemmTileConfig c :
       {GemmTileConfig{128, 256, 0, 0, 2}, GemmTileConfig{128, 256, 0, 0, 1},
        GemmTileConfig{128, 256, 3, 7, 2}, GemmTileConfig{128, 256, 0, 0, 2, 2}}) {
    run_dense(300, 2112, 1024, &c, seed += 2);
    run_dense(513, 384, 7168, &c, seed += 2);
    run_dense(130, 448, 1920, &c, seed += 2);
    GemmTileConfig five = c;
    five.num_sms = 5;
    run_dense(1024, 1024, 128, &five, seed += 2);
    run_dense(1, 2112, 384, &c, seed += 2);
    run_dense(64, 7168, 2048, &c, seed += 2);
  }
  // An M = 128 V3 shape on the full grid (128 tiles: one wave).
  const GemmTileConfig wide{128, 256, 0, 0, 2};
  run_dense(128, 32768, 512, &wide, seed += 2);
}

TEST(Fp8GemmGpu, WideTilesRejectedWhereNotBuilt) {
  DeviceBuffer<uint8_t> a(256 * 1024), b(256 * 1024);
  DeviceBuffer<float> sa(256 * 8), sb(2 * 8);
  DeviceBuffer<bf16> d(256 * 256);
  DeviceBuffer<int32_t> layout(std::vector<int32_t>(256, 0));
  // 256-row grouped tiles: no split-K, no tail split (the dense fp8_gemm_nt's only).
  for (const GemmTileConfig& c :
       {GemmTileConfig{256, 128, 0, 0, 2, 1, 2}, GemmTileConfig{256, 128, 0, 0, 2, 1, 1, 2}})
    EXPECT_THROW(
        kernels::fp8_gemm_nt_grouped_contiguous(a.get(), sa.get(), b.get(), sb.get(), d.get(),
                                                layout.get(), 256, 256, 1024, 1, nullptr, &c),
        Error);
  DeviceBuffer<uint8_t> ws(size_t(8) << 20);
  const GemmTileConfig split{256, 128, 0, 0, 1, 1, 2};
  EXPECT_THROW(kernels::fp8_gemm_nt(a.get(), sa.get(), b.get(), sb.get(), d.get(), 256, 256, 1024,
                                    nullptr, &split, kernels::GemmWorkspace{ws.get(), ws.size()}),
               Error);
  // 128x256: no split-K, no tail split (a plan exists: 3 tiles on 2 CTAs), no weight gradient.
  for (const GemmTileConfig& c :
       {GemmTileConfig{128, 256, 0, 0, 1, 1, 2}, GemmTileConfig{128, 256, 0, 2, 2, 1, 1, 2}})
    EXPECT_THROW(kernels::fp8_gemm_nt(a.get(), sa.get(), b.get(), sb.get(), d.get(), 128, 768, 1024,
                                      nullptr, &c, kernels::GemmWorkspace{ws.get(), ws.size()}),
                 Error);
  DeviceBuffer<float> c32(256 * 256);
  const GemmTileConfig wide_n{128, 256, 0, 0, 1};
  EXPECT_THROW(kernels::fp8_gemm_nt_wgrad(a.get(), sa.get(), b.get(), sb.get(), c32.get(), 256, 256,
                                          128, nullptr, &wide_n),
               Error);
  // Values outside the documented ranges: epilogue 3, pdl 3.
  for (const GemmTileConfig& c :
       {GemmTileConfig{128, 128, 0, 0, 3}, GemmTileConfig{128, 256, 0, 0, 2, 1, 1, 1, 3}})
    EXPECT_THROW(kernels::fp8_gemm_nt(a.get(), sa.get(), b.get(), sb.get(), d.get(), 256, 256, 1024,
                                      nullptr, &c),
                 Error);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
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

// ---- dense split-K ----
// One (M, N, K) problem on fresh random inputs, its CPU reference computed once; every split-K
// configuration is run on it with a poisoned output and checked against the reference (same
// bound as without split: the split changes only the FP32 summation order), then run again and
// compared bit for bit (the fix-up adds the slices in a fixed order, whichever finishes last).
// B (the weights) on the host and the device, shared by the problems of several M.
struct SplitKWeights {
  QuantizedMatrix q;
  DeviceBuffer<uint8_t> b;
  DeviceBuffer<float> sb;
  SplitKWeights(int64_t n, int64_t k, uint64_t seed)
      : q(random_quantized(n, k, ScaleGranularity::k128x128, seed)), b(q.codes), sb(q.scales) {}
};

struct SplitKProblem {
  int64_t m, n, k;
  QuantizedMatrix qa;
  const SplitKWeights& w;
  DeviceBuffer<uint8_t> a;
  DeviceBuffer<float> sa;
  std::vector<float> want;
  SplitKProblem(int64_t m_, const SplitKWeights& w_, uint64_t seed)
      : m(m_),
        n(w_.q.rows),
        k(w_.q.cols),
        qa(random_quantized(m_, k, ScaleGranularity::k1x128, seed)),
        w(w_),
        a(qa.codes),
        sa(scales_mn_major(qa)),
        want(static_cast<size_t>(m * n)) {
    gemm_fp8_reference(qa.ref(), w.q.ref(), want.data(), n, {}, false, test::test_threads());
  }
  // Runs fp8_gemm_nt (force null: the heuristic, with the workspace) twice.
  void check(const GemmTileConfig* force, kernels::GemmWorkspace ws, const char* what) {
    DeviceBuffer<bf16> d(static_cast<size_t>(m * n));
    d.poison();
    kernels::fp8_gemm_nt(a.get(), sa.get(), w.b.get(), w.sb.get(), d.get(), m, n, k, nullptr, force,
                         ws);
    FM_CHECK_CUDA(cudaDeviceSynchronize());
    const std::vector<bf16> first = d.download();
    const std::vector<float> got = test::bf16_to_float(first);
    report(what, m, n, k, 1, compare(got.data(), want.data(), m * n), kBf16NormTol);
    d.poison(0x7F);
    kernels::fp8_gemm_nt(a.get(), sa.get(), w.b.get(), w.sb.get(), d.get(), m, n, k, nullptr, force,
                         ws);
    FM_CHECK_CUDA(cudaDeviceSynchronize());
    const std::vector<bf16> second = d.download();
    int64_t differ = 0;
    for (size_t i = 0; i < first.size(); ++i) differ += first[i].bits != second[i].bits;
    EXPECT_EQ(differ, 0) << what << " m=" << m << " n=" << n << " k=" << k
                         << ": not bit-reproducible";
  }
};

// A zero-filled workspace big enough for every configuration tried on (m, n).
DeviceBuffer<uint8_t> split_k_workspace(int64_t m, int64_t n) {
  int64_t bytes = 0;
  for (const auto& t : {std::array<int, 2>{128, 128}, {64, 128}, {64, 64}})
    bytes = std::max(bytes, kernels::gemm_split_k_workspace_bytes(m, n, t[0], t[1], 8));
  DeviceBuffer<uint8_t> ws(static_cast<size_t>(bytes));
  ws.poison(0);
  return ws;
}

void expect_counters_zero(const DeviceBuffer<uint8_t>& ws) {
  const std::vector<uint8_t> bytes = ws.download();
  for (int64_t i = 0; i < kernels::kSplitKCounterBytes; ++i)
    ASSERT_EQ(bytes[static_cast<size_t>(i)], 0) << "split-K counter byte " << i << " left non-zero";
}

TEST(Fp8GemmGpuSplitK, MatchesReferenceOnDeepSeekShapes) {
  const int64_t nk[][2] = {{2112, 7168},  {24576, 1536}, {32768, 512},
                           {7168, 16384}, {4096, 7168},  {7168, 2048}};
  uint64_t seed = 900;
  for (const auto& s : nk) {
    const SplitKWeights weights(s[0], s[1], seed += 2);
    for (int64_t m : {1, 64, 100, 128}) {
      SplitKProblem pr(m, weights, seed += 2);
      DeviceBuffer<uint8_t> ws = split_k_workspace(m, s[0]);
      const kernels::GemmWorkspace w{ws.get(), ws.size()};
      // The heuristic with a workspace (it may or may not split this shape).
      const int64_t need = kernels::fp8_gemm_workspace_bytes(m, s[0], s[1]);
      EXPECT_LE(need, static_cast<int64_t>(ws.size()));
      pr.check(nullptr, w, need > 0 ? "splitk_heuristic" : "splitk_heur_nosplit");
      // Forced splits; 128x128 for every S, the narrower tiles for a few.
      const int64_t kb = s[1] / 128;
      for (int split = 2; split <= 8 && split <= kb; ++split) {
        const GemmTileConfig c{128, 128, 0, 0, 0, 1, split};
        pr.check(&c, w, kernels::describe_tile_config(c).c_str());
      }
      for (const GemmTileConfig c :
           {GemmTileConfig{64, 128, 0, 0, 0, 1, 2}, GemmTileConfig{64, 64, 0, 0, 0, 1, 3}}) {
        if (c.split_k <= kb) pr.check(&c, w, kernels::describe_tile_config(c).c_str());
      }
      expect_counters_zero(ws);
    }
  }
}

TEST(Fp8GemmGpuSplitK, UnevenSlicesAndPartialTiles) {
  // K blocks not divisible by S (uneven slices, down to one block), M and N not multiples of the
  // tile, and 7 CTAs walking many units each.
  uint64_t seed = 950;
  for (const auto& shape :
       {std::array<int64_t, 3>{100, 2112, 1024}, std::array<int64_t, 3>{333, 136, 896},
        std::array<int64_t, 3>{1, 64, 128 * 7}}) {
    const SplitKWeights weights(shape[1], shape[2], seed += 2);
    SplitKProblem pr(shape[0], weights, seed += 2);
    DeviceBuffer<uint8_t> ws = split_k_workspace(shape[0], shape[1]);
    const kernels::GemmWorkspace w{ws.get(), ws.size()};
    for (const GemmTileConfig c :
         {GemmTileConfig{128, 128, 0, 0, 0, 1, 3}, GemmTileConfig{128, 128, 3, 7, 0, 1, 7},
          GemmTileConfig{64, 128, 0, 0, 0, 1, 5}, GemmTileConfig{64, 64, 0, 0, 2, 1, 2}})
      pr.check(&c, w, kernels::describe_tile_config(c).c_str());
    expect_counters_zero(ws);
  }
}

// Session 3 saw one failure of MatchesReferenceOnDeepSeekShapes in six device runs: 128x128/split8
// at m=1 n=24576 k=1536 read rel_err 7.1e-3 and differed between its two runs; five reruns passed.
// Session 4's first run of this test: 3 of 149 runs of that configuration differed from the first;
// at K = 2048 (two K blocks a slice) up to 35 of 299 did (fixed: split-K launches no longer use the
// overlapped promotion, see compute()). The test repeats those, split 4, the heuristic's split
// picks and a launch without split whose tiles are one K block each, on one input, and counts the
// runs whose output differs in any bit from the first (itself checked against the reference). A
// differing run is described (how many elements, which 16-row strips and 128-column tiles, how far
// from the reference) so that the pattern points at the fault. FP8MOE_REPEAT_RUNS sets the repeat
// count.
struct RunDiff {
  int64_t elements = 0, strips = 0, tiles = 0;
  int64_t first_row = -1, first_col = -1;
  double err_first = 0, err_this = 0;  // ||x - want|| / ||want|| over the differing elements
};

RunDiff diff_runs(const std::vector<bf16>& first, const std::vector<bf16>& got,
                  const std::vector<float>& want, int64_t n) {
  RunDiff d;
  std::vector<int64_t> strips, tiles;
  double num_first = 0, num_this = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i].bits == first[i].bits) continue;
    const int64_t row = static_cast<int64_t>(i) / n, col = static_cast<int64_t>(i) % n;
    if (d.elements++ == 0) d.first_row = row, d.first_col = col;
    strips.push_back((row / 16) * ((n + 127) / 128) + col / 128);
    tiles.push_back((row / 128) * ((n + 127) / 128) + col / 128);
    const double w = want[i], a = to_float(first[i]), b = to_float(got[i]);
    num_first += (a - w) * (a - w);
    num_this += (b - w) * (b - w);
    den += w * w;
  }
  for (auto* v : {&strips, &tiles}) {
    std::sort(v->begin(), v->end());
    v->erase(std::unique(v->begin(), v->end()), v->end());
  }
  d.strips = static_cast<int64_t>(strips.size());
  d.tiles = static_cast<int64_t>(tiles.size());
  d.err_first = std::sqrt(num_first / std::max(den, 1e-30));
  d.err_this = std::sqrt(num_this / std::max(den, 1e-30));
  return d;
}

TEST(Fp8GemmGpuSplitK, RepeatedRunsAreBitIdentical) {
  struct Case {
    int64_t m, n, k;
    GemmTileConfig config;
  };
  std::vector<Case> cases = {
      {1, 24576, 1536, {128, 128, 0, 0, 0, 1, 8}},   {1, 24576, 2048, {128, 128, 0, 0, 0, 1, 8}},
      {128, 24576, 2048, {128, 128, 0, 0, 0, 1, 8}}, {1, 24576, 1536, {128, 128, 0, 0, 0, 1, 4}},
      {128, 7168, 16384, {128, 128, 0, 0, 0, 1, 2}}, {64, 2112, 7168, {64, 64, 0, 0, 0, 1, 4}},
      {100, 2112, 1024, {128, 128, 0, 0, 0, 1, 8}},  {1024, 8192, 128, {128, 128, 0, 0, 1, 1, 1}}};
  // FP8MOE_REPEAT_CASES="m,n,k,block_m,block_n,split;..." replaces the list (for diagnosis).
  if (const char* list = std::getenv("FP8MOE_REPEAT_CASES")) {
    cases.clear();
    for (const char* c = list; *c != '\0';) {
      long long v[6] = {};
      int used = 0;
      ASSERT_EQ(std::sscanf(c, "%lld,%lld,%lld,%lld,%lld,%lld%n", &v[0], &v[1], &v[2], &v[3], &v[4],
                            &v[5], &used),
                6)
          << "FP8MOE_REPEAT_CASES entry: " << c;
      GemmTileConfig config{static_cast<int>(v[3]), static_cast<int>(v[4]), 0, 0, 0, 1,
                            static_cast<int>(v[5])};
      if (config.split_k <= 1) config.epilogue = 1;
      cases.push_back({v[0], v[1], v[2], config});
      c += used;
      if (*c == ';') ++c;
    }
  }
  const char* env = std::getenv("FP8MOE_REPEAT_RUNS");
  const int repeats = env != nullptr ? std::max(2, std::atoi(env)) : 150;
  uint64_t seed = 990;
  for (const Case& c : cases) {
    const SplitKWeights weights(c.n, c.k, seed += 2);
    SplitKProblem pr(c.m, weights, seed += 2);
    DeviceBuffer<uint8_t> ws = split_k_workspace(c.m, c.n);
    const kernels::GemmWorkspace w{ws.get(), ws.size()};
    const std::string what = kernels::describe_tile_config(c.config);
    pr.check(&c.config, w, what.c_str());
    DeviceBuffer<bf16> d(static_cast<size_t>(c.m * c.n));
    std::vector<bf16> first;
    int bad_runs = 0;
    for (int r = 0; r < repeats; ++r) {
      d.poison(static_cast<uint8_t>(r % 2 ? 0x7F : 0xFF));
      kernels::fp8_gemm_nt(pr.a.get(), pr.sa.get(), weights.b.get(), weights.sb.get(), d.get(), c.m,
                           c.n, c.k, nullptr, &c.config, w);
      FM_CHECK_CUDA(cudaDeviceSynchronize());
      std::vector<bf16> got = d.download();
      if (r == 0) {
        first = std::move(got);
        continue;
      }
      const RunDiff diff = diff_runs(first, got, pr.want, c.n);
      if (diff.elements == 0) continue;
      if (++bad_runs <= 4)
        std::printf(
            "  run %d of %s m=%lld n=%lld k=%lld differs: %lld elements in %lld strips of "
            "16 rows, %lld tiles; first (%lld, %lld); rel err of those elements: first "
            "run %.3e, this run %.3e\n",
            r, what.c_str(), static_cast<long long>(c.m), static_cast<long long>(c.n),
            static_cast<long long>(c.k), static_cast<long long>(diff.elements),
            static_cast<long long>(diff.strips), static_cast<long long>(diff.tiles),
            static_cast<long long>(diff.first_row), static_cast<long long>(diff.first_col),
            diff.err_first, diff.err_this);
    }
    std::printf("%s m=%lld n=%lld k=%lld: %d of %d runs differ from the first\n", what.c_str(),
                static_cast<long long>(c.m), static_cast<long long>(c.n),
                static_cast<long long>(c.k), bad_runs, repeats - 1);
    EXPECT_EQ(bad_runs, 0) << what << " m=" << c.m << " n=" << c.n << " k=" << c.k << ": "
                           << bad_runs << " of " << repeats - 1 << " runs differ from the first";
    if (c.config.split_k > 1) expect_counters_zero(ws);
  }
}

TEST(Fp8GemmGpuSplitK, RejectsBadWorkspaceAndSplits) {
  const int64_t m = 128, n = 256, k = 1024;
  DeviceBuffer<uint8_t> a(m * k), b(n * k);
  DeviceBuffer<float> sa(m * 8), sb(2 * 8);
  DeviceBuffer<bf16> d(m * n);
  const GemmTileConfig split4{128, 128, 0, 0, 0, 1, 4};
  const int64_t need = kernels::fp8_gemm_workspace_bytes(m, n, k, &split4);
  EXPECT_EQ(need, kernels::gemm_split_k_workspace_bytes(m, n, 128, 128, 4));
  DeviceBuffer<uint8_t> ws(static_cast<size_t>(need));
  ws.poison(0);
  auto gemm = [&](const GemmTileConfig* c, kernels::GemmWorkspace w) {
    kernels::fp8_gemm_nt(a.get(), sa.get(), b.get(), sb.get(), d.get(), m, n, k, nullptr, c, w);
  };
  EXPECT_EQ(kernels::fp8_gemm_workspace_bytes(4096, 7168, 7168), 0);  // a full grid: no split
  // One byte short: a clear error naming the sizes.
  try {
    gemm(&split4, {ws.get(), static_cast<size_t>(need - 1)});
    ADD_FAILURE() << "a short workspace was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    EXPECT_NE(e.message().find("workspace of " + std::to_string(need - 1) + " bytes"),
              std::string::npos)
        << e.message();
    EXPECT_NE(e.message().find("needs " + std::to_string(need)), std::string::npos) << e.message();
  }
  EXPECT_THROW(gemm(&split4, {}), Error);  // no workspace
  EXPECT_THROW(gemm(&split4, {ws.get() + 16, static_cast<size_t>(need) - 16}), Error);  // align
  const GemmTileConfig too_many{128, 128, 0, 0, 0, 1, 9};  // K = 1024 has 8 blocks
  EXPECT_THROW(gemm(&too_many, {ws.get(), ws.size()}), Error);
  const GemmTileConfig wide{128, 192, 0, 0, 0, 1, 2};  // no split-K kernel for 192-wide tiles
  EXPECT_THROW(gemm(&wide, {ws.get(), ws.size()}), Error);
  const GemmTileConfig over{128, 128, 0, 0, 0, 1, kernels::kMaxSplitK + 1};
  EXPECT_THROW(gemm(&over, {ws.get(), ws.size()}), Error);
  // Split-K is for the dense form only.
  DeviceBuffer<int32_t> layout(std::vector<int32_t>(m, 0));
  EXPECT_THROW(
      kernels::fp8_gemm_nt_grouped_contiguous(a.get(), sa.get(), b.get(), sb.get(), d.get(),
                                              layout.get(), m, n, k, 1, nullptr, &split4),
      Error);
  // Nothing was launched by the rejected calls: the counters are still zero.
  expect_counters_zero(ws);
}

// ---- dense tail split (stream-K of the last partial wave) ----
// Forced small grids (num_sms) give cheap shapes a tail: e.g. 51 tiles on 7 CTAs = 7 full waves
// and 2 tail tiles in 3 slices. Each configuration on fresh random inputs, poisoned outputs, the
// same bound as unsplit (only the FP32 summation order changes), run twice and compared bit for
// bit; the counters are back to zero afterwards.
DeviceBuffer<uint8_t> tail_split_workspace(int64_t m, int64_t n, int64_t k,
                                           std::initializer_list<GemmTileConfig> configs) {
  int64_t bytes = kernels::fp8_gemm_workspace_bytes(m, n, k);
  for (const GemmTileConfig& c : configs)
    bytes = std::max(bytes, kernels::fp8_gemm_workspace_bytes(m, n, k, &c));
  DeviceBuffer<uint8_t> ws(
      static_cast<size_t>(std::max<int64_t>(bytes, kernels::kSplitKCounterBytes)));
  ws.poison(0);
  return ws;
}

TEST(Fp8GemmGpuTailSplit, MatchesReferenceAndIsBitReproducible) {
  struct Case {
    int64_t m, n, k;
    GemmTileConfig config;
  };
  const Case cases[] = {
      // 3 x 17 tiles on 7 CTAs: 49 whole, 2 tail tiles x 3 slices; registers / TMA-store epilogue
      // (the whole tiles keep it, the tail strips store from registers).
      {300, 2112, 1024, {128, 128, 0, 7, 1, 1, 1, 3}},
      {300, 2112, 1024, {128, 128, 0, 7, 2, 1, 1, 3}},
      // 64-row tiles, 56 K blocks: 25 whole, 2 tail tiles x 2 slices of 28 blocks.
      {513, 384, 7168, {64, 128, 0, 5, 0, 1, 1, 4}},
      // The last tile is partial in M (rows 128-129) and N (8 of 64 columns): 11 whole, 1 tail
      // tile x 8 uneven slices of 15 K blocks (1 or 2 blocks each).
      {130, 200, 1920, {64, 64, 0, 11, 0, 1, 1, 8}},
      // The full grid: 5 x 27 tiles on 132 SMs (H100 / H200), 3 tail tiles x 8 one-block slices.
      {600, 3400, 1024, {128, 128, 0, 0, 0, 1, 1, 8}},
      // 256-row tiles (two 16-row strips per warp): 3 x 17 on 7 CTAs, 2 tail tiles x 3 slices,
      // TMA-store whole tiles, the last M tile partial (88 rows); 2 x 17 on 8 CTAs, 2 tail tiles
      // x 4 slices of 2 blocks, registers; 8 x 17 on 132 SMs, 4 tail tiles x 4 one-block slices.
      {600, 2112, 1024, {256, 128, 0, 7, 2, 1, 1, 3}},
      {300, 2112, 1024, {256, 128, 0, 8, 1, 1, 1, 4}},
      {2048, 2112, 512, {256, 128, 0, 0, 2, 1, 1, 4}},
  };
  uint64_t seed = 1200;
  for (const Case& c : cases) {
    const SplitKWeights weights(c.n, c.k, seed += 2);
    SplitKProblem pr(c.m, weights, seed += 2);
    DeviceBuffer<uint8_t> ws = tail_split_workspace(c.m, c.n, c.k, {c.config});
    ASSERT_GT(kernels::fp8_gemm_workspace_bytes(c.m, c.n, c.k, &c.config), 0)
        << kernels::describe_tile_config(c.config) << " has no tail at " << c.m << "x" << c.n;
    pr.check(&c.config, {ws.get(), ws.size()}, kernels::describe_tile_config(c.config).c_str());
    expect_counters_zero(ws);
  }
}

TEST(Fp8GemmGpuTailSplit, HeuristicPickAndRepeatedRuns) {
  // 1024x2112x7168: 8 x 17 = 136 tiles on 132 SMs; the heuristic cuts the 4 tail tiles along K
  // when given a workspace (on a 132-SM device; elsewhere it may not, and the test says so).
  const int64_t m = 1024, n = 2112, k = 7168;
  const SplitKWeights weights(n, k, 1300);
  SplitKProblem pr(m, weights, 1302);
  DeviceBuffer<uint8_t> ws = tail_split_workspace(m, n, k, {});
  const kernels::GemmWorkspace w{ws.get(), ws.size()};
  if (kernels::fp8_gemm_workspace_bytes(m, n, k) == 0)
    std::printf("tail split not picked for %lldx%lldx%lld on this device\n", (long long)m,
                (long long)n, (long long)k);
  pr.check(nullptr, w, "tail_heuristic");
  // Many runs on one input: any output differing in a bit from the first is an ordering fault.
  DeviceBuffer<bf16> d(static_cast<size_t>(m * n));
  std::vector<bf16> first;
  int bad_runs = 0;
  for (int r = 0; r < 30; ++r) {
    d.poison(static_cast<uint8_t>(r % 2 ? 0x7F : 0xFF));
    kernels::fp8_gemm_nt(pr.a.get(), pr.sa.get(), weights.b.get(), weights.sb.get(), d.get(), m, n,
                         k, nullptr, nullptr, w);
    FM_CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<bf16> got = d.download();
    if (r == 0) {
      first = std::move(got);
      continue;
    }
    for (size_t i = 0; i < got.size(); ++i)
      if (got[i].bits != first[i].bits) {
        ++bad_runs;
        break;
      }
  }
  EXPECT_EQ(bad_runs, 0) << bad_runs << " of 29 runs differ from the first";
  expect_counters_zero(ws);
}

TEST(Fp8GemmGpuTailSplit, RejectsWhatItCannotTake) {
  const int64_t m = 300, n = 2112, k = 1024;
  DeviceBuffer<uint8_t> a(m * k), b(n * k);
  DeviceBuffer<float> sa(8 * 300), sb(17 * 8);
  DeviceBuffer<bf16> d(m * n);
  const GemmTileConfig tail3{128, 128, 0, 7, 1, 1, 1, 3};
  const int64_t need = kernels::fp8_gemm_workspace_bytes(m, n, k, &tail3);
  ASSERT_GT(need, 0);
  DeviceBuffer<uint8_t> ws(static_cast<size_t>(need));
  ws.poison(0);
  auto gemm = [&](const GemmTileConfig* c, kernels::GemmWorkspace w) {
    kernels::fp8_gemm_nt(a.get(), sa.get(), b.get(), sb.get(), d.get(), m, n, k, nullptr, c, w);
  };
  EXPECT_THROW(gemm(&tail3, {}), Error);                                               // none
  EXPECT_THROW(gemm(&tail3, {ws.get(), static_cast<size_t>(need - 1)}), Error);        // short
  EXPECT_THROW(gemm(&tail3, {ws.get() + 16, static_cast<size_t>(need) - 16}), Error);  // align
  const GemmTileConfig both{128, 128, 0, 7, 1, 1, 2, 3};
  EXPECT_THROW(gemm(&both, {ws.get(), ws.size()}), Error);  // not with split-K
  const GemmTileConfig wide{128, 192, 0, 8, 2, 1, 1, 3};    // 33 tiles on 8 CTAs: 1 tail tile
  EXPECT_THROW(gemm(&wide, {ws.get(), ws.size()}), Error);
  DeviceBuffer<int32_t> layout(std::vector<int32_t>(m, 0));
  EXPECT_THROW(
      kernels::fp8_gemm_nt_grouped_contiguous(a.get(), sa.get(), b.get(), sb.get(), d.get(),
                                              layout.get(), m, n, k, 1, nullptr, &tail3),
      Error);
  expect_counters_zero(ws);
}

// ---- grouped contiguous ----
// pad_blocks[g]: whole 128-row blocks of padding (-1) after group g's rows (a caller may align
// experts to more than 128 rows).
void run_contiguous(const std::vector<int64_t>& rows_per_group, int64_t n, int64_t k, uint64_t seed,
                    const GemmTileConfig* force = nullptr,
                    const std::vector<int64_t>& pad_blocks = {}) {
  const int64_t groups = static_cast<int64_t>(rows_per_group.size());
  std::vector<int64_t> starts;
  std::vector<int32_t> layout;
  for (int64_t g = 0; g < groups; ++g) {
    starts.push_back(static_cast<int64_t>(layout.size()));
    const int64_t padded = (rows_per_group[g] + 127) / 128 * 128 +
                           (static_cast<size_t>(g) < pad_blocks.size() ? pad_blocks[g] * 128 : 0);
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
    const int64_t padded = (g + 1 < groups ? starts[g + 1] : m) - starts[g];
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
                uint64_t seed, const GemmTileConfig* force = nullptr, int64_t expected_m = 0) {
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
                                      groups, max_m, n, k, nullptr, force, expected_m);
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
  // The tile-choice hint (decoding: a worst-case capacity, a few rows expected): groups past the
  // hint are still computed in full.
  for (int64_t expected : {1, 8, 64, 256})
    run_masked({0, 3, 256, 1, 77}, 256, 4096, 1024, 440 + expected, nullptr, expected);
  EXPECT_THROW(run_masked({1}, 16, 2112, 512, 450, nullptr, 17), Error);
}

// Many groups (a decoding step's experts: the tiles are looked up from a cursor carried along
// each CTA's tiles, sm90::kModeMaskedCursor): empty groups between full ones, runs of empty
// groups, a last group of 1 row; every cursor tile, 5 CTAs (many tiles each) and the full grid.
TEST(Fp8GemmGpu, GroupedMaskedManyGroups) {
  std::vector<int32_t> masked;
  for (int g = 0; g < 70; ++g)
    masked.push_back(g % 7 == 3 || (g >= 40 && g < 50) ? 0 : (g * 37) % 97);
  masked.back() = 1;
  uint64_t seed = 460;
  run_masked(masked, 96, 512, 256, seed += 10);
  run_masked(masked, 96, 512, 256, seed += 10, nullptr, 4);
  for (GemmTileConfig c : {GemmTileConfig{64, 64, 0, 0, 2}, GemmTileConfig{64, 128, 0, 5, 2},
                           GemmTileConfig{128, 128, 0, 0, 1}, GemmTileConfig{128, 128, 0, 5, 2}})
    run_masked(masked, 96, 384, 256, seed += 10, &c);
}

TEST(Fp8GemmGpu, GroupedWideColumnTiles) {
  uint64_t seed = 2700;
  for (GemmTileConfig c : {GemmTileConfig{128, 256, 0, 0, 2}, GemmTileConfig{128, 256, 0, 0, 1},
                           GemmTileConfig{128, 256, 0, 5, 2}}) {
    // Groups of 0 rows, 1 row, partial last blocks (130, 64: -1 padding rows left untouched).
    run_contiguous({130, 0, 1, 256, 64}, 2112, 512, seed += 10, &c);
    run_contiguous({200, 77}, 448, 1920, seed += 10, &c);
    // Masked: empty groups, partial 64-row slabs (37, 200 of max 200), full groups.
    run_masked({0, 200, 37, 192}, 200, 2112, 512, seed += 10, &c);
    run_masked({1, 64, 128, 0}, 128, 448, 1024, seed += 10, &c);
  }
}

// 256x128 tiles of the grouped forms (session 8): a 256-row tile of one expert, tiles whose halves
// belong to two experts, to an expert and padding, or lie half past M (run as 128-row tiles),
// whole padding blocks before an expert's block, 0-row and 1-row groups, N = 2112 (a partial last
// tile column), 15 K blocks; masked groups with full, partial (> 128 and <= 128 rows) and empty
// tiles. Both epilogues, 5 CTAs (several tiles each), and a larger launch on the full grid.
TEST(Fp8GemmGpu, GroupedRowPairTiles) {
  uint64_t seed = 2900;
  for (GemmTileConfig c : {GemmTileConfig{256, 128, 0, 0, 2}, GemmTileConfig{256, 128, 0, 0, 1},
                           GemmTileConfig{256, 128, 0, 5, 2}}) {
    // Blocks: g0 g0 | g2 g3 | g3 g4: one whole tile (half padding rows), two split tiles.
    run_contiguous({130, 0, 1, 256, 64}, 2112, 512, seed += 10, &c);
    // g0 g0 | g0 -1 | g1 g1 | g1 g1 | g1: an expert beside a padding block, a last tile half
    // past M (an odd block count); then g0 g0 | -1 g1 | g1 g1 | g1 g1: a padding block before an
    // expert's first block.
    run_contiguous({300, 600}, 448, 1920, seed += 10, &c, {1, 0});
    run_contiguous({256, 600}, 448, 640, seed += 10, &c, {1, 0});
    // g0 g0 | g1 g1 | g1 g1 | g3 g3 | g3 (past M).
    run_contiguous({256, 512, 0, 384}, 256, 640, seed += 10, &c);
    run_masked({0, 200, 37, 192}, 200, 2112, 512, seed += 10, &c);
    run_masked({512, 0, 300, 77}, 512, 448, 1024, seed += 10, &c);
    run_masked({1, 64, 128, 0}, 128, 448, 1024, seed += 10, &c);
  }
  const GemmTileConfig wide{256, 128, 0, 0, 2};
  run_contiguous({1000, 2048, 130, 3000}, 4096, 1024, seed += 10, &wide);
  run_masked({1024, 700, 0, 129}, 1024, 2112, 1024, seed += 10, &wide);
}

// The heuristic's own pick on grouped shapes where it takes 128x256 (checked against the
// device's SM count and shared memory), with partial last blocks, padding rows and empty groups.
TEST(Fp8GemmGpu, GroupedHeuristicWideColumnTiles) {
  cudaDeviceProp prop{};
  FM_CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  const auto pick = [&](kernels::GemmKind kind, int64_t m, int64_t n, int64_t k, int64_t g) {
    return kernels::choose_gemm_tile({kind, m, n, k, g}, prop.multiProcessorCount,
                                     static_cast<int64_t>(prop.sharedMemPerBlockOptin));
  };
  EXPECT_EQ(pick(kernels::GemmKind::kGroupedContiguous, 2304, 3584, 512, 4).block_n, 256);
  run_contiguous({700, 0, 1000, 512}, 3584, 512, 2800);
  // Masked groups of >= 256 rows: 256x128 (session 8).
  EXPECT_EQ(pick(kernels::GemmKind::kGroupedMasked, 512, 4096, 512, 4).block_m, 256);
  run_masked({512, 0, 300, 77}, 512, 4096, 512, 2810);
  EXPECT_EQ(pick(kernels::GemmKind::kGroupedMasked, 192, 4096, 512, 8).block_n, 256);
  run_masked({192, 0, 100, 77, 1, 192, 150, 64}, 192, 4096, 512, 2820);
}

// ---- weight gradient ----
// D (random, not zeros) += A B^T with both operands 1x128-scaled, against the reference.
void run_wgrad(int64_t m, int64_t n, int64_t k, uint64_t seed, const GemmTileConfig* force,
               const char* label) {
  const QuantizedMatrix qa = random_quantized(m, k, ScaleGranularity::k1x128, seed);
  const QuantizedMatrix qb = random_quantized(n, k, ScaleGranularity::k1x128, seed + 1);
  const std::vector<float> c0 = test::random_matrix(m, n, seed + 2);
  DeviceBuffer<uint8_t> a(qa.codes), b(qb.codes);
  DeviceBuffer<float> sa(scales_mn_major(qa)), sb(scales_mn_major(qb)), d(c0);
  kernels::fp8_gemm_nt_wgrad(a.get(), sa.get(), b.get(), sb.get(), d.get(), m, n, k, nullptr,
                             force);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<float> want = c0;
  gemm_fp8_reference(qa.ref(), qb.ref(), want.data(), n, {}, true, test::test_threads());
  const std::vector<float> got = d.download();
  report(label, m, n, k, 1, compare(got.data(), want.data(), m * n), kF32NormTol);
}

// The k-grouped form: expert g's D[g] += its K-slice's product (ks[g] may be 0).
void run_kgrouped_wgrad(const std::vector<int64_t>& ks, int64_t m, int64_t n, uint64_t seed,
                        const GemmTileConfig* force, const char* label) {
  const int64_t groups = static_cast<int64_t>(ks.size());
  const int64_t k_total = std::accumulate(ks.begin(), ks.end(), int64_t{0});
  const QuantizedMatrix qa = random_quantized(m, k_total, ScaleGranularity::k1x128, seed);
  const QuantizedMatrix qb = random_quantized(n, k_total, ScaleGranularity::k1x128, seed + 1);
  const std::vector<float> c0 = test::random_matrix(groups * m, n, seed + 2);
  DeviceBuffer<uint8_t> a(qa.codes), b(qb.codes);
  DeviceBuffer<float> sa(scales_mn_major(qa)), sb(scales_mn_major(qb)), d(c0);
  kernels::fp8_gemm_nt_kgrouped_wgrad(a.get(), sa.get(), b.get(), sb.get(), d.get(), m, n, ks,
                                      nullptr, force);
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
  report(label, m, n, k_total, groups, compare(got.data(), want.data(), groups * m * n),
         kF32NormTol);
}

// The device-layout form: the groups' K ranges come from a grouped layout on the device (the
// first row of each 128-row block names its group; the last rows of each group's last block are
// -1 padding inside the group, summed like real rows; `tail` trailing -1 blocks of random values
// are skipped). Against the reference, and (no tail) bit for bit against the host-ks form.
void run_kgrouped_wgrad_layout(const std::vector<int64_t>& ks, int64_t tail, int64_t m, int64_t n,
                               uint64_t seed, const GemmTileConfig* force, const char* label) {
  const int64_t groups = static_cast<int64_t>(ks.size());
  const int64_t k_total = std::accumulate(ks.begin(), ks.end(), int64_t{0});
  const int64_t k_rows = k_total + 128 * tail;
  std::vector<int32_t> layout(static_cast<size_t>(k_rows), -1);
  int64_t k0 = 0;
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t r = 0; r < ks[g]; ++r)
      layout[static_cast<size_t>(k0 + r)] = r + 5 < ks[g] ? static_cast<int32_t>(g) : -1;
    k0 += ks[g];
  }
  const QuantizedMatrix qa = random_quantized(m, k_rows, ScaleGranularity::k1x128, seed);
  const QuantizedMatrix qb = random_quantized(n, k_rows, ScaleGranularity::k1x128, seed + 1);
  const std::vector<float> c0 = test::random_matrix(groups * m, n, seed + 2);
  DeviceBuffer<uint8_t> a(qa.codes), b(qb.codes);
  DeviceBuffer<float> sa(scales_mn_major(qa)), sb(scales_mn_major(qb)), d(c0);
  DeviceBuffer<int32_t> dev_layout(layout);
  kernels::fp8_gemm_nt_kgrouped_wgrad(a.get(), sa.get(), b.get(), sb.get(), d.get(), m, n, groups,
                                      dev_layout.get(), k_rows, nullptr, force);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<float> got = d.download();
  std::vector<float> want = c0;
  k0 = 0;
  for (int64_t g = 0; g < groups; ++g) {
    if (ks[g] > 0)
      gemm_fp8_reference(sub_ref(qa, 0, m, k0, ks[g]), sub_ref(qb, 0, n, k0, ks[g]),
                         want.data() + g * m * n, n, {}, true, test::test_threads());
    k0 += ks[g];
  }
  report(label, m, n, k_rows, groups, compare(got.data(), want.data(), groups * m * n),
         kF32NormTol);
  if (tail != 0) return;
  DeviceBuffer<float> d_ks(c0);
  kernels::fp8_gemm_nt_kgrouped_wgrad(a.get(), sa.get(), b.get(), sb.get(), d_ks.get(), m, n, ks,
                                      nullptr, force);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<float> want_bits = d_ks.download();
  ASSERT_EQ(std::memcmp(got.data(), want_bits.data(), got.size() * 4), 0)
      << label << ": the layout form differs from the ks form";
}

TEST(Fp8WgradGpu, KGroupedFromDeviceLayout) {
  run_kgrouped_wgrad_layout({128, 0, 384, 256}, 0, 192, 256, 630, nullptr, "kgrouped_layout");
  run_kgrouped_wgrad_layout({0, 256, 0, 0, 128}, 2, 100, 520, 640, nullptr, "kgrouped_layout");
  run_kgrouped_wgrad_layout({0, 0, 0}, 1, 128, 256, 650, nullptr, "kgrouped_layout");
  const GemmTileConfig c{128, 128, 0, 3, 2};
  run_kgrouped_wgrad_layout({256, 0, 128, 384}, 1, 100, 520, 660, &c, "kgrouped_layout_e2");
  const GemmTileConfig c1{64, 128, 0, 5, 1};
  run_kgrouped_wgrad_layout({384, 128, 0, 128, 256, 0, 0, 128}, 0, 256, 384, 670, &c1,
                            "kgrouped_layout_e1");
  EXPECT_THROW(kernels::fp8_gemm_nt_kgrouped_wgrad(nullptr, nullptr, nullptr, nullptr, nullptr, 128,
                                                   128, 2, nullptr, 200, nullptr),
               Error);
}

// WgradOutput::kOverwrite: D poisoned (NaN) beforehand ends bit for bit as accumulating into
// zeros; groups with no K get zeros. Dense (both epilogues, forced tiles, CTA pairs), k-grouped
// with host ks and with a device layout (a trailing -1 block).
TEST(Fp8WgradGpu, OverwriteEqualsAccumulatingIntoZeros) {
  using kernels::WgradOutput;
  const auto check = [](const char* what, int64_t count,
                        const std::function<void(float*, WgradOutput)>& run) {
    DeviceBuffer<float> zeros(std::vector<float>(static_cast<size_t>(count), 0.0f)), over(count);
    over.poison();
    run(zeros.get(), WgradOutput::kAccumulate);
    run(over.get(), WgradOutput::kOverwrite);
    FM_CHECK_CUDA(cudaDeviceSynchronize());
    const std::vector<float> a = zeros.download(), b = over.download();
    ASSERT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0) << what;
  };
  {
    const int64_t m = 300, n = 520, k = 384;
    const QuantizedMatrix qa = random_quantized(m, k, ScaleGranularity::k1x128, 680);
    const QuantizedMatrix qb = random_quantized(n, k, ScaleGranularity::k1x128, 681);
    DeviceBuffer<uint8_t> a(qa.codes), b(qb.codes);
    DeviceBuffer<float> sa(scales_mn_major(qa)), sb(scales_mn_major(qb));
    for (GemmTileConfig c :
         {GemmTileConfig{128, 128, 0, 5, 1}, GemmTileConfig{128, 128, 0, 5, 2},
          GemmTileConfig{64, 128, 0, 0, 2}, GemmTileConfig{128, 128, 0, 0, 2, 2}})
      check(kernels::describe_tile_config(c).c_str(), m * n, [&](float* d, WgradOutput o) {
        kernels::fp8_gemm_nt_wgrad(a.get(), sa.get(), b.get(), sb.get(), d, m, n, k, nullptr, &c,
                                   o);
      });
  }
  {
    const std::vector<int64_t> ks = {256, 0, 128, 384, 0};
    const int64_t m = 100, n = 264, groups = 5, k_total = 768, k_rows = k_total + 128;
    const QuantizedMatrix qa = random_quantized(m, k_rows, ScaleGranularity::k1x128, 690);
    const QuantizedMatrix qb = random_quantized(n, k_rows, ScaleGranularity::k1x128, 691);
    DeviceBuffer<uint8_t> a(qa.codes), b(qb.codes);
    DeviceBuffer<float> sa(scales_mn_major(qa)), sb(scales_mn_major(qb));
    std::vector<int32_t> layout(static_cast<size_t>(k_rows), -1);
    int64_t k0 = 0;
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t r = 0; r < ks[g]; ++r) layout[k0 + r] = static_cast<int32_t>(g);
      k0 += ks[g];
    }
    DeviceBuffer<int32_t> dev_layout(layout);
    for (int epilogue : {1, 2}) {
      const GemmTileConfig c{128, 128, 0, 3, epilogue};
      check("kgrouped layout", groups * m * n, [&](float* d, WgradOutput o) {
        kernels::fp8_gemm_nt_kgrouped_wgrad(a.get(), sa.get(), b.get(), sb.get(), d, m, n, groups,
                                            dev_layout.get(), k_rows, nullptr, &c, o);
      });
    }
    // The host-ks form on the first k_total columns (A and B at the k_rows stride do not fit
    // it): its own operands.
    const QuantizedMatrix qa2 = random_quantized(m, k_total, ScaleGranularity::k1x128, 692);
    const QuantizedMatrix qb2 = random_quantized(n, k_total, ScaleGranularity::k1x128, 693);
    DeviceBuffer<uint8_t> a2(qa2.codes), b2(qb2.codes);
    DeviceBuffer<float> sa2(scales_mn_major(qa2)), sb2(scales_mn_major(qb2));
    check("kgrouped ks", groups * m * n, [&](float* d, WgradOutput o) {
      kernels::fp8_gemm_nt_kgrouped_wgrad(a2.get(), sa2.get(), b2.get(), sb2.get(), d, m, n, ks,
                                          nullptr, nullptr, o);
    });
    const std::vector<int64_t> none = {0, 0};
    check("kgrouped, every group empty", 2 * m * n, [&](float* d, WgradOutput o) {
      kernels::fp8_gemm_nt_kgrouped_wgrad(a2.get(), sa2.get(), b2.get(), sb2.get(), d, m, n, none,
                                          nullptr, nullptr, o);
    });
  }
}

TEST(Fp8WgradGpu, AccumulatesIntoC) {
  run_wgrad(256, 384, 512, 500, nullptr, "wgrad");
  run_wgrad(100, 2112, 1024, 503, nullptr, "wgrad");
  run_wgrad(64, 136, 128, 506, nullptr, "wgrad");
}

// Both compiled tiles and both epilogues, forced, on 5 and 7 CTAs (several tiles each, so a
// tile's epilogue runs beside the next tile's loads), partial last rows and columns. Epilogue 1:
// registers, every load of D before any store; 2: TMA reduce-add from shared memory.
TEST(Fp8WgradGpu, ForcedTilesAccumulateIntoC) {
  uint64_t seed = 540;
  for (GemmTileConfig c : {GemmTileConfig{64, 128, 0, 5, 1}, GemmTileConfig{128, 128, 0, 7, 1},
                           GemmTileConfig{64, 128, 0, 5, 2}, GemmTileConfig{128, 128, 0, 7, 2}}) {
    run_wgrad(1000, 1000, 512, seed += 3, &c, "wgrad_forced");
    run_wgrad(72, 2056, 256, seed += 3, &c, "wgrad_forced");
  }
}

// CTA pairs sharing B tiles through TMA multicast (dense; an even number of 128-row blocks, else
// single CTAs): both epilogues, 3 stages, several tiles per pair, partial last rows and columns.
TEST(Fp8WgradGpu, CtaPairsAccumulateIntoC) {
  uint64_t seed = 560;
  for (GemmTileConfig c :
       {GemmTileConfig{128, 128, 0, 7, 2, 2}, GemmTileConfig{128, 128, 3, 6, 1, 2},
        GemmTileConfig{128, 128, 0, 0, 2, 2}}) {
    run_wgrad(1000, 1000, 512, seed += 3, &c, "wgrad_pair");  // 8 M-blocks: pairs
    run_wgrad(300, 2056, 384, seed += 3, &c, "wgrad_pair");   // 3 M-blocks: single CTAs
    run_wgrad(256, 136, 1152, seed += 3, &c, "wgrad_pair");   // one pair, 9 K blocks (odd)
  }
}

TEST(Fp8WgradGpu, KGroupedReduceAddEpilogue) {
  // M = 100: each expert's second 64-row slab is partial (registers), the first goes through TMA.
  const GemmTileConfig c{128, 128, 0, 3, 2};
  run_kgrouped_wgrad({256, 0, 128, 384}, 100, 520, 610, &c, "kgrouped_wgrad_e2");
  run_kgrouped_wgrad({256, 0, 128, 384}, 128, 520, 620, &c, "kgrouped_wgrad_e2");
}

// Forced configurations of one shape give the same bits: both epilogues, stage counts, tiles and
// CTA pairs add the same FP32 products in the same order (D += tile, one addition an element).
TEST(Fp8WgradGpu, ForcedVariantsBitIdentical) {
  const int64_t m = 640, n = 768, k = 1536;
  const QuantizedMatrix qa = random_quantized(m, k, ScaleGranularity::k1x128, 660);
  const QuantizedMatrix qb = random_quantized(n, k, ScaleGranularity::k1x128, 661);
  const std::vector<float> c0 = test::random_matrix(m, n, 662);
  DeviceBuffer<uint8_t> a(qa.codes), b(qb.codes);
  DeviceBuffer<float> sa(scales_mn_major(qa)), sb(scales_mn_major(qb));
  std::vector<float> first;
  for (GemmTileConfig c : {GemmTileConfig{128, 128, 0, 0, 2}, GemmTileConfig{128, 128, 0, 0, 1},
                           GemmTileConfig{128, 128, 3, 9, 2}, GemmTileConfig{128, 128, 0, 0, 2, 2},
                           GemmTileConfig{128, 128, 3, 0, 1, 2}, GemmTileConfig{64, 128, 0, 0, 2},
                           GemmTileConfig{64, 128, 0, 7, 1}}) {
    DeviceBuffer<float> d(c0);
    kernels::fp8_gemm_nt_wgrad(a.get(), sa.get(), b.get(), sb.get(), d.get(), m, n, k, nullptr, &c);
    FM_CHECK_CUDA(cudaDeviceSynchronize());
    const std::vector<float> got = d.download();
    if (first.empty()) {
      first = got;
      continue;
    }
    ASSERT_EQ(std::memcmp(got.data(), first.data(), got.size() * 4), 0)
        << kernels::describe_tile_config(c) << " differs from the first configuration";
  }
}

TEST(Fp8WgradGpu, KGroupedAccumulatesEachExpert) {
  run_kgrouped_wgrad({128, 0, 384, 256}, 192, 256, 600, nullptr, "kgrouped_wgrad");
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

// The B-scale prefetch (GemmTileConfig::scale_prefetch 2: B scales prefetched into L2 at the start
// and loaded one K block ahead) of the dense kernels with the overlapped promotion, and the same
// kernels without it (1): both epilogues, CTA pairs, many tiles a CTA, odd and single K-block
// counts, partial tiles; and the split-K kernels (only the L2 prefetch: their loop loads ahead).
TEST(Fp8GemmGpu, DenseScalePrefetch) {
  uint64_t seed = 820;
  for (GemmTileConfig c :
       {GemmTileConfig{128, 128, 0, 0, 2, 1}, GemmTileConfig{128, 128, 0, 0, 1, 1},
        GemmTileConfig{128, 128, 3, 5, 2, 1}, GemmTileConfig{128, 128, 0, 0, 2, 2},
        GemmTileConfig{64, 128, 0, 0, 2, 1}, GemmTileConfig{64, 128, 0, 7, 1, 1},
        GemmTileConfig{64, 64, 0, 0, 2, 1}, GemmTileConfig{64, 64, 0, 0, 1, 1}}) {
    for (int v : {2, 1}) {
      c.scale_prefetch = v;
      run_dense(128, 32768, 512, &c, seed += 2);
      run_dense(100, 2304, 1664, &c, seed += 2);  // 13 K blocks (odd: one alone, then 8, 4)
      run_dense(1, 768, 128, &c, seed += 2);      // one K block
      run_dense(300, 2112, 7168, &c, seed += 2);
    }
  }
  for (const auto& shape :
       {std::array<int64_t, 3>{128, 7168, 2048}, std::array<int64_t, 3>{100, 2048, 1664},
        std::array<int64_t, 3>{64, 2112, 7168}}) {
    const SplitKWeights weights(shape[1], shape[2], seed += 2);
    SplitKProblem pr(shape[0], weights, seed += 2);
    DeviceBuffer<uint8_t> ws = split_k_workspace(shape[0], shape[1]);
    const kernels::GemmWorkspace w{ws.get(), ws.size()};
    for (GemmTileConfig c :
         {GemmTileConfig{128, 128, 0, 0, 0, 1, 2}, GemmTileConfig{128, 128, 3, 7, 0, 1, 3},
          GemmTileConfig{64, 128, 0, 0, 0, 1, 2}, GemmTileConfig{64, 64, 0, 0, 0, 1, 4}}) {
      for (int v : {2, 1}) {
        c.scale_prefetch = v;
        pr.check(&c, w, kernels::describe_tile_config(c).c_str());
      }
    }
    expect_counters_zero(ws);
  }
}

// ---- programmatic dependent launch (GemmTileConfig::pdl = 2) ----
// A slow copy kernel: the launch right after it (with the PDL attribute) may start early and must
// not read its inputs before this kernel has finished writing them.
__global__ void slow_copy(const uint8_t* src, uint8_t* dst, int64_t bytes, int rounds) {
  for (int r = 0; r < rounds; ++r)
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < bytes;
         i += int64_t(gridDim.x) * blockDim.x)
      dst[i] = r + 1 < rounds ? uint8_t(0xFF) : src[i];
}

// Each configuration on one stream: a kernel writes A (NaN codes until its last round), then the
// GEMM with pdl reads it; then two PDL GEMMs write the same D back to back (the first from other
// inputs), so D must hold the second's result. Poison or a stale A gives NaN, a late write of the
// first GEMM gives wrong values.
void chained_launches(int64_t n, const std::vector<GemmTileConfig>& configs) {
  const int64_t m = 1000, k = 1024;
  const QuantizedMatrix qa = random_quantized(m, k, ScaleGranularity::k1x128, 900);
  const QuantizedMatrix qb = random_quantized(n, k, ScaleGranularity::k128x128, 901);
  const QuantizedMatrix qa2 = random_quantized(m, k, ScaleGranularity::k1x128, 902);
  std::vector<float> want(static_cast<size_t>(m * n));
  gemm_fp8_reference(qa.ref(), qb.ref(), want.data(), n, {}, false, test::test_threads());
  DeviceBuffer<uint8_t> a_src(qa.codes), a(qa.codes.size()), a2(qa2.codes), b(qb.codes);
  DeviceBuffer<float> sa(scales_mn_major(qa)), sa2(scales_mn_major(qa2)), sb(qb.scales);
  DeviceBuffer<bf16> d(static_cast<size_t>(m * n));
  int64_t ws_bytes = 256;
  for (const GemmTileConfig& c : configs)
    ws_bytes = std::max(ws_bytes, kernels::fp8_gemm_workspace_bytes(m, n, k, &c));
  DeviceBuffer<uint8_t> ws(static_cast<size_t>(ws_bytes));
  FM_CHECK_CUDA(cudaMemset(ws.get(), 0, ws.size()));
  const kernels::GemmWorkspace workspace{ws.get(), ws.size()};
  cudaStream_t stream;
  FM_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  for (const GemmTileConfig& c : configs) {
    const std::string name = kernels::describe_tile_config(c);
    EXPECT_NE(name.find("/pdl"), std::string::npos) << name;
    a.poison();
    d.poison();
    FM_CHECK_CUDA(cudaDeviceSynchronize());
    slow_copy<<<8, 256, 0, stream>>>(a_src.get(), a.get(), static_cast<int64_t>(a.size()), 4);
    FM_CHECK_LAUNCH();
    kernels::fp8_gemm_nt(a.get(), sa.get(), b.get(), sb.get(), d.get(), m, n, k, stream, &c,
                         workspace);
    FM_CHECK_CUDA(cudaStreamSynchronize(stream));
    std::vector<float> got = test::bf16_to_float(d.download());
    report((name + " after a kernel").c_str(), m, n, k, 1, compare(got.data(), want.data(), m * n),
           kBf16NormTol);
    // Write-after-write: other inputs first, then the checked ones, into the same D.
    for (int rep = 0; rep < 3; ++rep) {
      kernels::fp8_gemm_nt(a2.get(), sa2.get(), b.get(), sb.get(), d.get(), m, n, k, stream, &c,
                           workspace);
      kernels::fp8_gemm_nt(a.get(), sa.get(), b.get(), sb.get(), d.get(), m, n, k, stream, &c,
                           workspace);
    }
    FM_CHECK_CUDA(cudaStreamSynchronize(stream));
    got = test::bf16_to_float(d.download());
    report((name + " after GEMMs").c_str(), m, n, k, 1, compare(got.data(), want.data(), m * n),
           kBf16NormTol);
  }
  FM_CHECK_CUDA(cudaStreamDestroy(stream));
}

TEST(Fp8GemmGpuPdl, ChainedLaunchesWaitForTheirInputs) {
  // Every tile shape, both epilogues, CTA pairs (8 M-blocks), split-K and the tail split (their
  // counters and partials), and 20 CTAs (many tiles each).
  chained_launches(2112, {{128, 128, 0, 0, 2, 1, 1, 1, 2},
                          {128, 128, 0, 0, 1, 1, 1, 1, 2},
                          {64, 128, 0, 0, 2, 1, 1, 1, 2},
                          {256, 128, 0, 0, 2, 1, 1, 1, 2},
                          {128, 256, 0, 0, 2, 1, 1, 1, 2},
                          {128, 192, 0, 0, 2, 1, 1, 1, 2},
                          {128, 128, 0, 0, 2, 2, 1, 1, 2},
                          {128, 128, 0, 0, 0, 1, 4, 1, 2},
                          {128, 128, 0, 0, 2, 1, 1, 4, 2},
                          {128, 128, 0, 20, 2, 1, 1, 1, 2}});
  // The kernels with and without the B-scale prefetch (scale_prefetch 2 / 1).
  chained_launches(2048, {{128, 128, 0, 0, 2, 1, 1, 1, 2, 2},
                          {128, 128, 0, 0, 1, 1, 1, 1, 2, 1},
                          {64, 128, 0, 0, 2, 1, 1, 1, 2, 2},
                          {64, 64, 0, 0, 2, 1, 1, 1, 2, 2},
                          {128, 128, 0, 0, 2, 2, 1, 1, 2, 2}});
}

}  // namespace
}  // namespace fp8moe
