// The dense FP8 GEMM with 128x64 tiles (forced only: two math warpgroups of m64n64, the plain,
// B-scale prefetch and split-K kernels; dev/gemm/NOTES.md session 17, gemm28) against the CPU
// reference gemm_fp8_reference (promoted, default AccumulatorModel), and bit for bit against 64x64
// tiles of the same form: each 64-row half runs the 64x64 kernel's loop (same wgmmas, same K
// blocks in the same order, same promotion, same split slices added in slice order), so the sums
// are the same. Fresh random inputs, outputs poisoned.
// `build-device/tests/test_kernels_gpu --gtest_filter='Fp8GemmGpu128x64.*'`.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/gemm_reference.h"
#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/fp8_gemm.h"
#include "fp8moe/kernels/sm90_gemm_heuristic.h"
#include "gpu_test_util.cuh"

namespace fp8moe {
namespace {

using kernels::GemmTileConfig;
using test::DeviceBuffer;

constexpr double kBf16NormTol = 3e-3;  // as fp8_gemm_gpu_test.cu

QuantizedMatrix random_quantized(int64_t rows, int64_t cols, ScaleGranularity g, uint64_t seed) {
  const std::vector<float> x = test::random_matrix(rows, cols, seed);
  return quantize(x.data(), rows, cols, cols, g, {});
}

// Rows of the output checked against the reference: all of them for small problems, else the
// first and last two, both sides of the 64- and 128-row tile boundaries, and one in between.
std::vector<int64_t> checked_rows(int64_t m, int64_t n, int64_t k) {
  std::vector<int64_t> rows;
  if (m * n * k <= (int64_t{1} << 31)) {
    for (int64_t r = 0; r < m; ++r) rows.push_back(r);
    return rows;
  }
  for (int64_t r : {int64_t{0}, int64_t{1}, int64_t{63}, int64_t{64}, int64_t{127}, int64_t{128},
                    m / 2 + 5, m - 2, m - 1})
    if (r >= 0 && r < m && std::find(rows.begin(), rows.end(), r) == rows.end()) rows.push_back(r);
  return rows;
}

struct Weights {
  QuantizedMatrix q;
  DeviceBuffer<uint8_t> b;
  DeviceBuffer<float> sb;
  Weights(int64_t n, int64_t k, uint64_t seed)
      : q(random_quantized(n, k, ScaleGranularity::k128x128, seed)), b(q.codes), sb(q.scales) {}
};

// A zero-filled workspace for splits 2 and 3 of 128x64 and 64x64.
size_t workspace_bytes(int64_t m, int64_t n) {
  int64_t bytes = 256;
  for (const int bm : {128, 64})
    for (const int split : {2, 3})
      bytes = std::max(bytes, kernels::gemm_split_k_workspace_bytes(m, n, bm, 64, split));
  return static_cast<size_t>(bytes);
}

struct Problem {
  int64_t m, n, k;
  const Weights& w;
  QuantizedMatrix qa;
  DeviceBuffer<uint8_t> a;
  DeviceBuffer<float> sa;
  std::vector<int64_t> rows;
  std::vector<float> want;  // rows.size() x n
  DeviceBuffer<uint8_t> ws;
  Problem(int64_t m_, const Weights& w_, uint64_t seed)
      : m(m_),
        n(w_.q.rows),
        k(w_.q.cols),
        w(w_),
        qa(random_quantized(m_, k, ScaleGranularity::k1x128, seed)),
        a(qa.codes),
        sa(scales_mn_major(qa)),
        rows(checked_rows(m, n, k)),
        want(rows.size() * static_cast<size_t>(n)),
        ws(workspace_bytes(m, n)) {
    // One reference row at a time (1x128 scales: any row is a whole scale row).
    for (size_t i = 0; i < rows.size(); ++i) {
      Fp8MatrixRef ref = qa.ref();
      ref.codes += rows[i] * k;
      ref.scales += rows[i] * ref.scale_row_stride;
      ref.rows = 1;
      gemm_fp8_reference(ref, w.q.ref(), want.data() + i * n, n, {}, false, test::test_threads());
    }
    FM_CHECK_CUDA(cudaMemset(ws.get(), 0, ws.size()));
  }
  std::vector<bf16> run(const GemmTileConfig& c, int poison) {
    DeviceBuffer<bf16> d(static_cast<size_t>(m * n));
    d.poison(poison);
    kernels::fp8_gemm_nt(a.get(), sa.get(), w.b.get(), w.sb.get(), d.get(), m, n, k, nullptr, &c,
                         kernels::GemmWorkspace{ws.get(), ws.size()});
    FM_CHECK_CUDA(cudaDeviceSynchronize());
    return d.download();
  }
  // Relative Frobenius error and the largest |got - want| / (|want| + rms(want)) over the checked
  // rows; a poisoned element never written shows as non-finite.
  void expect_close(const std::vector<bf16>& got, const std::string& what) const {
    double num = 0, den = 0, max_rel = 0;
    int64_t nonfinite = 0;
    for (float v : want) den += double(v) * v;
    const double rms = std::sqrt(den / std::max<size_t>(want.size(), 1));
    for (size_t i = 0; i < rows.size(); ++i)
      for (int64_t c = 0; c < n; ++c) {
        const float g = to_float(got[rows[i] * n + c]);
        const float v = want[i * n + c];
        if (!std::isfinite(g)) {
          ++nonfinite;
          continue;
        }
        const double e = double(g) - v;
        num += e * e;
        max_rel = std::max(max_rel, std::fabs(e) / (std::fabs(v) + rms + 1e-30));
      }
    const double rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
    std::printf("%-60s rows=%-4zu rel_err=%.3e max_rel=%.3e nonfinite=%lld\n", what.c_str(),
                rows.size(), rel, max_rel, static_cast<long long>(nonfinite));
    EXPECT_EQ(nonfinite, 0) << what;
    EXPECT_LT(rel, kBf16NormTol) << what;
    EXPECT_LT(max_rel, 8 * kBf16NormTol) << what;
  }
};

int64_t count_differing(const std::vector<bf16>& a, const std::vector<bf16>& b) {
  int64_t differ = 0;
  for (size_t i = 0; i < a.size(); ++i) differ += a[i].bits != b[i].bits;
  return differ;
}

std::string name(const Problem& pr, const GemmTileConfig& c) {
  return "m=" + std::to_string(pr.m) + " n=" + std::to_string(pr.n) + " k=" + std::to_string(pr.k) +
         " " + kernels::describe_tile_config(c);
}

// Each form of 128x64 (registers and TMA-store epilogues; B-scale prefetch off and on; split 2
// and 3 with and without it where K has the blocks) against the reference, and bit for bit
// against 64x64 of the same epilogue and split (the twin), itself checked first; `sms`: the
// grid's SMs (0 = all).
void check_problem(Problem& pr, int sms) {
  struct Form {
    int epilogue, split, prefetch;
  };
  const Form forms[] = {{1, 1, 1}, {1, 1, 2}, {2, 1, 1}, {2, 1, 2},
                        {1, 2, 1}, {1, 2, 2}, {1, 3, 1}, {1, 3, 2}};
  for (const Form& f : forms) {
    if (f.split > pr.k / 128) continue;
    GemmTileConfig twin{64, 64};
    twin.epilogue = f.epilogue;
    twin.split_k = f.split;
    twin.scale_prefetch = 1;
    twin.pdl = 2;
    twin.num_sms = sms;
    GemmTileConfig c = twin;
    c.block_m = 128;
    c.scale_prefetch = f.prefetch;
    const std::vector<bf16> base = pr.run(twin, 0xFF);
    pr.expect_close(base, name(pr, twin));
    const std::string what = name(pr, c);
    const std::vector<bf16> got = pr.run(c, 0x7F);
    pr.expect_close(got, what);
    EXPECT_EQ(count_differing(got, base), 0) << what << ": not the 64x64 tile's bits";
  }
}

// The six DeepSeek-V3 dense (N, K) at K <= 2048 (the CPU reference's time), M from 1 to 300
// (partial 64- and 128-row tiles), and N = 2112 (a last tile column of 64: 33 columns of 64)
// and 7168 x 16384 at full K and M = 128 (sampled rows).
TEST(Fp8GemmGpu128x64, MatchesReferenceAnd64x64BitForBit) {
  const int64_t nk[][2] = {{2112, 7168},  {24576, 1536}, {32768, 512},
                           {7168, 16384}, {4096, 7168},  {7168, 2048}};
  uint64_t seed = 2800;
  for (const auto& s : nk) {
    const Weights w(s[0], std::min<int64_t>(s[1], 2048), seed += 2);
    for (int64_t m : {1, 64, 100, 128, 256, 300}) {
      Problem pr(m, w, seed += 2);
      check_problem(pr, 0);
    }
  }
  for (const auto& s : {std::array<int64_t, 2>{2112, 7168}, std::array<int64_t, 2>{7168, 16384}}) {
    const Weights w(s[0], s[1], seed += 2);
    Problem pr(128, w, seed += 2);
    check_problem(pr, 0);
  }
}

// Grids smaller than the work (8 or 12 SMs): each CTA runs several tiles (and split slices) in
// turn; K of 15 blocks (odd: the overlapped loop's lone first block; split 2 and 3 uneven).
TEST(Fp8GemmGpu128x64, SmallGrids) {
  uint64_t seed = 2900;
  const Weights w(2112, 1920, seed);
  for (int64_t m : {100, 256})
    for (int sms : {8, 12}) {
      Problem pr(m, w, seed += 2);
      check_problem(pr, sms);
    }
}

// 128x64 is never the heuristic's, and is refused where it is not built: the grouped forms and
// the tail split. CTA pairs fall back to single CTAs (the same bits as without).
TEST(Fp8GemmGpu128x64, RejectsWhatIsNotBuilt) {
  const int64_t m = 256, n = 512, k = 512;
  DeviceBuffer<uint8_t> a(m * k), b(2 * n * k);
  DeviceBuffer<float> sa(4 * m * 2), sb(2 * 4 * 4);
  DeviceBuffer<bf16> d(2 * m * n);
  DeviceBuffer<int32_t> layout(m), masked(2);
  FM_CHECK_CUDA(cudaMemset(layout.get(), 0, layout.size() * 4));
  FM_CHECK_CUDA(cudaMemset(masked.get(), 0, masked.size() * 4));
  const GemmTileConfig c{128, 64};
  const auto expect_rejected = [](auto&& launch, const char* why, const char* word) {
    try {
      launch();
      FM_CHECK_CUDA(cudaDeviceSynchronize());
      ADD_FAILURE() << why << ": not rejected";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument) << why;
      EXPECT_NE(e.message().find(word), std::string::npos) << why << ": " << e.message();
    }
  };
  expect_rejected(
      [&] {
        kernels::fp8_gemm_nt_grouped_contiguous(a.get(), sa.get(), b.get(), sb.get(), d.get(),
                                                layout.get(), m, n, k, 2, nullptr, &c);
      },
      "grouped contiguous", "128x64");
  expect_rejected(
      [&] {
        kernels::fp8_gemm_nt_grouped_masked(a.get(), sa.get(), b.get(), sb.get(), d.get(),
                                            masked.get(), 2, m / 2, n, k, nullptr, &c);
      },
      "grouped masked", "128x64");
  GemmTileConfig tail = c;
  tail.tail_split = 2;
  tail.num_sms = 3;  // 16 tiles on 3 CTAs: a tail of 1 tile, cut in 2
  DeviceBuffer<uint8_t> ws(static_cast<size_t>(
      std::max<int64_t>(256, kernels::fp8_gemm_workspace_bytes(m, n, k, &tail))));
  expect_rejected(
      [&] {
        kernels::fp8_gemm_nt(a.get(), sa.get(), b.get(), sb.get(), d.get(), m, n, k, nullptr, &tail,
                             kernels::GemmWorkspace{ws.get(), ws.size()});
      },
      "tail split", "tail split");
}

TEST(Fp8GemmGpu128x64, PairsRunAsSingleCtas) {
  uint64_t seed = 3000;
  const Weights w(640, 1024, seed);
  Problem pr(256, w, seed + 1);
  GemmTileConfig single{128, 64};
  single.pdl = 2;
  GemmTileConfig pair = single;
  pair.cluster = 2;
  const std::vector<bf16> base = pr.run(single, 0xFF);
  pr.expect_close(base, name(pr, single));
  const std::vector<bf16> got = pr.run(pair, 0x7F);
  EXPECT_EQ(count_differing(got, base), 0) << "cluster 2 requested";
}

}  // namespace
}  // namespace fp8moe
