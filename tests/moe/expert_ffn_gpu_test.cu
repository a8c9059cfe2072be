// ExpertFfnGpu (moe/expert_ffn_gpu.h) against expert_ffn_reference on fresh random inputs, y
// poisoned (0xFF: BF16 NaN) before every call:
//   - contiguous: ||y - ref|| / ||ref|| over the real rows, bounded by kFfnTol (below); padding
//     rows of y still poison; with and without row_scale;
//   - gathered (x's rows read from shuffled records with an index, sa from the records' scales by
//     gather_scales_to_mn_major): equal to the contiguous y bit for bit (poisoned rows included);
//   - masked (masked_m {0, 1, 50, 96} of max_m 96) against the reference;
//   - a CUDA graph of forward_contiguous replays to the eager bits;
//   - bad shapes throw kInvalidArgument naming the problem, and launch nothing.
// G = 4 experts with {0, 1, 130, 300} rows, each padded to a multiple of 128 (768 rows); H in
// {256, 7168}, I in {256, 2048}. One line per shape: the errors and the eager call's time.
// Run: build/tests/test_moe_gpu --gtest_filter='ExpertFfn*'
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../kernels/gpu_test_util.cuh"
#include "../support/expect_invalid.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/scale_layout.h"
#include "fp8moe/moe/expert_ffn_gpu.h"

namespace fp8moe {
namespace {

using test::DeviceBuffer;

// Bound on ||y_gpu - ref|| / ||ref||. Both sides run the same FP8 math (same codes, scales,
// promotion every 128 K elements, BF16 gate_up, the same SwiGLU + E4M3 rounding); they differ by
// the tensor cores' summation inside each 128-K window (FP32 GEMM outputs differ by ~1.3e-4 rel.,
// tests/kernels' wgrad rows). That moves a few per cent of gate_up's BF16 roundings by one ulp
// (2^-8), a few per cent of those move an E4M3 code of h by one ulp (2^-3 relative), and y's BF16
// rounding by one ulp where it lands near a boundary. Predicted ~1e-3..4e-3 (the CPU estimate with
// a 14-bit truncating accumulator, ExpertFfn.TensorCoreAccumulatorEstimate); measured on 2 x H200
// (session 19): 2.0e-3..7.2e-3, and 1.01e-2 / 1.09e-2 for the masked H = I = 256 case (two
// 128-K blocks a GEMM: fewer terms average the flipped E4M3 codes of h). 3e-2 leaves room and
// still fails a wrong expert, row or scale (those give O(1)).
constexpr double kFfnTol = 3e-2;
constexpr uint16_t kPoison = 0xFFFF;

struct FfnCase {
  int64_t G = 4, H = 0, I = 0, rows = 0;
  std::vector<int32_t> layout;  // [rows] expert or -1
  QuantizedMatrix xq;           // [rows, H] 1x128 (padding rows: codes and scales poisoned)
  std::vector<float> sa_mn;     // [H/128][pad(rows)]
  std::vector<float> row_scale;
  ExpertWeightsHost host;
};

FfnCase make_case(int64_t H, int64_t I, uint64_t seed) {
  FfnCase s;
  s.H = H;
  s.I = I;
  const int64_t counts[4] = {0, 1, 130, 300};
  for (int64_t e = 0; e < s.G; ++e) {
    const int64_t padded = (counts[e] + 127) / 128 * 128;
    for (int64_t i = 0; i < padded; ++i) s.layout.push_back(i < counts[e] ? int32_t(e) : -1);
  }
  s.rows = static_cast<int64_t>(s.layout.size());
  PhiloxStream rng(seed, 0);
  std::vector<float> x(s.rows * H);
  for (int64_t r = 0; r < s.rows; ++r) {
    const float mag = std::exp2(rng.uniform(-4.0f, 4.0f));
    for (int64_t c = 0; c < H; ++c) x[r * H + c] = mag * rng.normal();
  }
  s.xq = quantize(x.data(), s.rows, H, H, ScaleGranularity::k1x128);
  for (int64_t r = 0; r < s.rows; ++r) {  // padding rows: whatever the dispatch left there
    if (s.layout[r] >= 0) continue;
    std::fill_n(s.xq.codes.begin() + r * H, H, uint8_t{0xFF});
    std::fill_n(s.xq.scales.begin() + r * (H / 128), H / 128, std::nanf(""));
  }
  s.sa_mn = scales_mn_major(s.xq);
  s.row_scale.resize(s.rows);
  for (float& v : s.row_scale) v = rng.uniform(0.05f, 2.5f);
  std::vector<float> gate(s.G * I * H), up(s.G * I * H), down(s.G * H * I);
  for (float& v : gate) v = rng.normal() / std::sqrt(float(H));
  for (float& v : up) v = rng.normal() / std::sqrt(float(H));
  for (float& v : down) v = rng.normal() / std::sqrt(float(I));
  s.host = quantize_expert_weights(gate.data(), up.data(), down.data(), s.G, H, I);
  return s;
}

// ||got - want|| / ||want|| over rows with layout >= 0; counts non-finite and written-padding.
struct Compare {
  double rel = 0;
  int64_t nonfinite = 0, padding_written = 0, differ = 0;
};
Compare compare(const std::vector<bf16>& got, const std::vector<bf16>& want,
                const std::vector<int32_t>& layout, int64_t H) {
  Compare c;
  double num = 0, den = 0;
  for (size_t r = 0; r < layout.size(); ++r)
    for (int64_t j = 0; j < H; ++j) {
      const uint16_t g = got[r * H + j].bits;
      if (layout[r] < 0) {
        c.padding_written += g != kPoison;
        continue;
      }
      const double gv = bf16_bits_to_float(g), wv = to_float(want[r * H + j]);
      if (!std::isfinite(gv)) {
        ++c.nonfinite;
        continue;
      }
      c.differ += g != want[r * H + j].bits;
      num += (gv - wv) * (gv - wv);
      den += wv * wv;
    }
  c.rel = std::sqrt(num / std::max(den, 1e-300));
  return c;
}

bool same_bits(const std::vector<bf16>& a, const std::vector<bf16>& b) {
  return a.size() == b.size() &&
         std::equal(a.begin(), a.end(), b.begin(), [](bf16 x, bf16 y) { return x.bits == y.bits; });
}

using test::expect_invalid;

struct Shape {
  int64_t H, I;
};
const Shape kShapes[] = {{256, 256}, {256, 2048}, {7168, 256}, {7168, 2048}};

TEST(ExpertFfnGpu, ContiguousGatheredAndGraphMatchReference) {
  cudaStream_t stream;
  FM_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  uint64_t seed = 20261127;
  for (const Shape shape : kShapes) {
    const FfnCase s = make_case(shape.H, shape.I, seed++);
    const int64_t H = s.H, I = s.I, rows = s.rows, KB = H / 128;
    const ExpertWeightsDevice weights(s.host);
    ExpertFfnGpu ffn(rows, H, I);
    DeviceBuffer<uint8_t> x(s.xq.codes);
    DeviceBuffer<float> sa(s.sa_mn), row_scale(s.row_scale);
    DeviceBuffer<int32_t> layout(s.layout);
    DeviceBuffer<bf16> y(rows * H);

    for (const bool scaled : {false, true}) {
      // Reference (x read through its M-major scales, as the GPU reads them).
      Fp8MatrixRef xr = s.xq.ref();
      xr.scales = s.sa_mn.data();
      xr.scale_row_stride = 1;
      xr.scale_col_stride = padded_rows(rows);
      std::vector<bf16> ref(rows * H, bf16{kPoison});
      expert_ffn_reference(xr, s.layout.data(), s.host, scaled ? s.row_scale.data() : nullptr,
                           false, ref.data(), {}, test::test_threads());

      y.poison();
      cudaEvent_t t0, t1;
      FM_CHECK_CUDA(cudaEventCreate(&t0));
      FM_CHECK_CUDA(cudaEventCreate(&t1));
      FM_CHECK_CUDA(cudaEventRecord(t0, stream));
      ffn.forward_contiguous(x.get(), sa.get(), layout.get(), rows, weights.view(), y.get(), stream,
                             scaled ? row_scale.get() : nullptr);
      FM_CHECK_CUDA(cudaEventRecord(t1, stream));
      FM_CHECK_CUDA(cudaStreamSynchronize(stream));
      float ms = 0;
      FM_CHECK_CUDA(cudaEventElapsedTime(&ms, t0, t1));
      cudaEventDestroy(t0);
      cudaEventDestroy(t1);
      const std::vector<bf16> y_contig = y.download();
      const Compare c = compare(y_contig, ref, s.layout, H);
      std::printf(
          "expert_ffn contiguous H=%-5lld I=%-5lld rows=%lld row_scale=%d rel_err=%.3e "
          "differ=%lld nonfinite=%lld padding_written=%lld us=%.1f (first call)\n",
          (long long)H, (long long)I, (long long)rows, scaled, c.rel, (long long)c.differ,
          (long long)c.nonfinite, (long long)c.padding_written, ms * 1e3);
      EXPECT_LT(c.rel, kFfnTol) << "H=" << H << " I=" << I;
      EXPECT_EQ(c.nonfinite, 0) << "H=" << H << " I=" << I;
      EXPECT_EQ(c.padding_written, 0) << "H=" << H << " I=" << I;

      // Gathered: the real rows in shuffled records [codes H | scales KB | pad], stride 16-aligned.
      std::vector<int64_t> order;
      for (int64_t r = 0; r < rows; ++r)
        if (s.layout[r] >= 0) order.push_back(r);
      std::shuffle(order.begin(), order.end(), std::mt19937_64(seed));
      const int64_t stride = (H + 4 * KB + 16 + 15) / 16 * 16, records = order.size();
      std::vector<uint8_t> rec(std::max<int64_t>(records, 1) * stride, 0xEE);
      std::vector<int32_t> index(rows, -1);
      for (int64_t i = 0; i < records; ++i) {
        const int64_t r = order[i];
        index[r] = static_cast<int32_t>(i);
        std::copy_n(s.xq.codes.begin() + r * H, H, rec.begin() + i * stride);
        std::memcpy(rec.data() + i * stride + H, s.xq.scales.data() + r * KB, 4 * KB);
      }
      DeviceBuffer<uint8_t> d_rec(rec);
      DeviceBuffer<int32_t> d_index(index);
      DeviceBuffer<float> sa_g(KB * padded_rows(rows));
      sa_g.poison();
      kernels::gather_scales_to_mn_major(reinterpret_cast<const float*>(d_rec.get() + H),
                                         stride / 4, d_index.get(), rows, KB, sa_g.get(), stream);
      y.poison();
      ffn.forward_gathered({d_rec.get(), records, stride, d_index.get()}, sa_g.get(), layout.get(),
                           rows, weights.view(), y.get(), stream,
                           scaled ? row_scale.get() : nullptr);
      FM_CHECK_CUDA(cudaStreamSynchronize(stream));
      const bool gathered_same = same_bits(y.download(), y_contig);
      std::printf("expert_ffn gathered   H=%-5lld I=%-5lld records=%lld bit-identical=%d\n",
                  (long long)H, (long long)I, (long long)records, gathered_same);
      EXPECT_TRUE(gathered_same) << "gathered vs contiguous, H=" << H << " I=" << I;

      if (!scaled) continue;
      // A CUDA graph of forward_contiguous replays to the eager bits.
      cudaGraph_t graph;
      cudaGraphExec_t exec;
      FM_CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      ffn.forward_contiguous(x.get(), sa.get(), layout.get(), rows, weights.view(), y.get(), stream,
                             row_scale.get());
      FM_CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
      FM_CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
      for (int replay = 0; replay < 2; ++replay) {
        y.poison();
        FM_CHECK_CUDA(cudaGraphLaunch(exec, stream));
        FM_CHECK_CUDA(cudaStreamSynchronize(stream));
        EXPECT_TRUE(same_bits(y.download(), y_contig))
            << "graph replay " << replay << " H=" << H << " I=" << I;
      }
      // Time of a replay (warm), for the record.
      cudaEvent_t e0, e1;
      FM_CHECK_CUDA(cudaEventCreate(&e0));
      FM_CHECK_CUDA(cudaEventCreate(&e1));
      FM_CHECK_CUDA(cudaEventRecord(e0, stream));
      for (int i = 0; i < 5; ++i) FM_CHECK_CUDA(cudaGraphLaunch(exec, stream));
      FM_CHECK_CUDA(cudaEventRecord(e1, stream));
      FM_CHECK_CUDA(cudaStreamSynchronize(stream));
      FM_CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
      const double real = 431, flops = 2.0 * real * (2 * I * H + H * I);
      std::printf(
          "expert_ffn graph      H=%-5lld I=%-5lld replays bit-identical, us=%.1f "
          "(%.1f TFLOPS on the 431 real rows)\n",
          (long long)H, (long long)I, ms * 1e3 / 5, flops / (ms * 1e-3 / 5) / 1e12);
      cudaEventDestroy(e0);
      cudaEventDestroy(e1);
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
    }
  }
  FM_CHECK_CUDA(cudaStreamDestroy(stream));
}

TEST(ExpertFfnGpu, MaskedMatchesReference) {
  cudaStream_t stream;
  FM_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const int64_t G = 4, max_m = 96;
  const std::vector<int32_t> masked_m = {0, 1, 50, 96};
  uint64_t seed = 777;
  for (const Shape shape : kShapes) {
    const int64_t H = shape.H, I = shape.I, rows = G * max_m, KB = H / 128;
    PhiloxStream rng(seed++, 0);
    std::vector<int32_t> layout(rows);
    std::vector<float> x(rows * H), row_scale(rows);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t g = r / max_m;
      layout[r] = r % max_m < masked_m[g] ? int32_t(g) : -1;
      const float mag = std::exp2(rng.uniform(-4.0f, 4.0f));
      for (int64_t c = 0; c < H; ++c) x[r * H + c] = mag * rng.normal();
      row_scale[r] = rng.uniform(0.05f, 2.5f);
    }
    QuantizedMatrix xq = quantize(x.data(), rows, H, H, ScaleGranularity::k1x128);
    for (int64_t r = 0; r < rows; ++r)
      if (layout[r] < 0) std::fill_n(xq.codes.begin() + r * H, H, uint8_t{0xFF});
    // sa [G][KB][pad(max_m)]: each group's rows M-major.
    std::vector<float> sa_host(G * KB * padded_rows(max_m), 0.0f);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < max_m; ++i)
        for (int64_t b = 0; b < KB; ++b)
          sa_host[(g * KB + b) * padded_rows(max_m) + i] = xq.scales[(g * max_m + i) * KB + b];
    std::vector<float> gate(G * I * H), up(G * I * H), down(G * H * I);
    for (float& v : gate) v = rng.normal() / std::sqrt(float(H));
    for (float& v : up) v = rng.normal() / std::sqrt(float(H));
    for (float& v : down) v = rng.normal() / std::sqrt(float(I));
    const ExpertWeightsHost host =
        quantize_expert_weights(gate.data(), up.data(), down.data(), G, H, I);
    // The FP32 constructor (quantises the same way).
    const ExpertWeightsDevice weights(gate.data(), up.data(), down.data(), G, H, I);

    ExpertFfnGpu ffn(G * padded_rows(max_m), H, I);
    DeviceBuffer<uint8_t> d_x(xq.codes);
    DeviceBuffer<float> d_sa(sa_host), d_rs(row_scale);
    DeviceBuffer<int32_t> d_mm(masked_m);
    DeviceBuffer<bf16> y(rows * H);
    for (const bool scaled : {false, true}) {
      std::vector<bf16> ref(rows * H, bf16{kPoison});
      expert_ffn_reference(xq.ref(), layout.data(), host, scaled ? row_scale.data() : nullptr,
                           false, ref.data(), {}, test::test_threads());
      y.poison();
      ffn.forward_masked(d_x.get(), d_sa.get(), d_mm.get(), max_m, weights.view(), y.get(), stream,
                         scaled ? d_rs.get() : nullptr);
      FM_CHECK_CUDA(cudaStreamSynchronize(stream));
      const Compare c = compare(y.download(), ref, layout, H);
      std::printf(
          "expert_ffn masked     H=%-5lld I=%-5lld max_m=%lld masked_m={0,1,50,96} row_scale=%d "
          "rel_err=%.3e differ=%lld nonfinite=%lld padding_written=%lld\n",
          (long long)H, (long long)I, (long long)max_m, scaled, c.rel, (long long)c.differ,
          (long long)c.nonfinite, (long long)c.padding_written);
      EXPECT_LT(c.rel, kFfnTol) << "H=" << H << " I=" << I;
      EXPECT_EQ(c.nonfinite, 0);
      EXPECT_EQ(c.padding_written, 0);
    }
  }
  FM_CHECK_CUDA(cudaStreamDestroy(stream));
}

TEST(ExpertFfnGpu, BadShapesThrowBeforeLaunching) {
  expect_invalid([] { ExpertFfnGpu(256, 200, 256); }, "hidden=200");
  expect_invalid([] { ExpertFfnGpu(256, 256, 100); }, "inter=100");
  expect_invalid([] { ExpertFfnGpu(-1, 256, 256); }, "max_rows=-1");

  const int64_t H = 256, I = 256, rows = 256;
  std::vector<float> w(2 * I * H, 0.01f);
  const ExpertWeightsDevice weights(w.data(), w.data(), w.data(), 2, H, I);
  const ExpertWeightsDevice other(w.data(), w.data(), w.data(), 1, H, 128);
  ExpertFfnGpu ffn(rows, H, I);
  DeviceBuffer<uint8_t> x(2 * rows * H);
  DeviceBuffer<float> sa(2 * rows * (H / 128));
  DeviceBuffer<int32_t> layout(std::vector<int32_t>(2 * rows, 0));
  DeviceBuffer<bf16> y(2 * rows * H);
  y.poison();
  auto contiguous = [&](int64_t r, const ExpertWeightsGpu& wv, const uint8_t* xp, bf16* yp) {
    ffn.forward_contiguous(xp, sa.get(), layout.get(), r, wv, yp, nullptr);
  };
  expect_invalid([&] { contiguous(384, weights.view(), x.get(), y.get()); },
                 "384 rows, more than max_rows=256");
  expect_invalid([&] { contiguous(130, weights.view(), x.get(), y.get()); },
                 "rows=130 is not a multiple of 128");
  expect_invalid([&] { contiguous(rows, other.view(), x.get(), y.get()); },
                 "weights of hidden=256 inter=128");
  expect_invalid([&] { contiguous(rows, weights.view(), nullptr, y.get()); }, "null x");
  expect_invalid([&] { contiguous(rows, weights.view(), x.get(), nullptr); }, "null y");
  ExpertWeightsGpu no_s2 = weights.view();
  no_s2.s2 = nullptr;
  expect_invalid([&] { contiguous(rows, no_s2, x.get(), y.get()); }, "null weight pointer");
  expect_invalid(
      [&] {
        ffn.forward_contiguous(x.get(), nullptr, layout.get(), rows, weights.view(), y.get(),
                               nullptr);
      },
      "null x scales");
  expect_invalid(
      [&] {
        ffn.forward_gathered({x.get(), rows, H, nullptr}, sa.get(), layout.get(), rows,
                             weights.view(), y.get(), nullptr);
      },
      "null row index");
  expect_invalid(
      [&] {
        ffn.forward_gathered({x.get(), rows, 200, layout.get()}, sa.get(), layout.get(), rows,
                             weights.view(), y.get(), nullptr);
      },
      "source row stride 200");
  expect_invalid(
      [&] {
        ffn.forward_masked(x.get(), sa.get(), layout.get(), 129, weights.view(), y.get(), nullptr);
      },
      "2 groups x max_m=129 (padded to 132) need more than max_rows=256");
  expect_invalid(
      [&] { ffn.forward_masked(x.get(), sa.get(), nullptr, 64, weights.view(), y.get(), nullptr); },
      "null grouped_layout / masked_m");
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  for (const bf16 v : y.download()) ASSERT_EQ(v.bits, kPoison) << "a rejected call wrote y";
}

}  // namespace
}  // namespace fp8moe
