// ExpertFfnGpu::backward_contiguous (moe/expert_ffn_gpu.h) against expert_ffn_backward_reference
// on fresh random inputs. gate_up comes from forward_contiguous's gate_up_out (poisoned first:
// its padding rows stay NaN), x's and dy's padding rows are NaN, dx and d_row_scale are poisoned,
// dW13 / dW2 start from random values (accumulated into):
//   - ||got - ref|| / ||ref|| of dx (real rows), d_row_scale (real rows) and of the weight
//     gradients' increments (dW - initial), bounded by kBwdTol; dx's padding rows still poison,
//     d_row_scale's 0, expert 0 (no rows) keeps its initial dW;
//   - a CUDA graph of the backward replays to the eager bits (dW reset before each replay), and
//     its replay time is printed (H 7168 x I 2048, 768 rows: the PREDICTIONS in docs/moe/README);
//   - bad arguments throw kInvalidArgument before any launch.
// G = 4 experts with {0, 1, 130, 300} rows padded to 128 (768 rows); H in {256, 7168}, I in
// {256, 2048}. Run: build/tests/test_moe_gpu --gtest_filter='ExpertFfnBackward*'
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../kernels/gpu_test_util.cuh"
#include "../support/expect_invalid.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/moe/expert_ffn_gpu.h"

namespace fp8moe {
namespace {

using test::DeviceBuffer;

// Bound on the relative errors. Both sides run the same FP8 steps; they differ by the tensor
// cores' summation order inside each 128-K window (GEMM outputs ~1e-4 relative), which moves a
// few BF16 roundings of dh and dx and, through dh, a few E4M3 codes of d_gate_up (2^-3 relative
// each). The forward, with the same mechanism, measured 2.0e-3..1.09e-2 on H200; dW2's inputs
// (dy, h) do not pass through a GEMM first, so it should sit near 1e-3 (expf ulps in h only).
// 3e-2 as for the forward: a wrong expert, transpose, row or scale gives O(1).
constexpr double kBwdTol = 3e-2;
constexpr uint16_t kPoison = 0xFFFF;

double rel(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

struct Case {
  int64_t G = 4, H = 0, I = 0, rows = 0;
  std::vector<int32_t> layout;
  std::vector<int64_t> expert_rows;
  QuantizedMatrix xq;
  std::vector<float> sa_mn, row_scale, dw13_init, dw2_init;
  std::vector<bf16> dy;
  ExpertWeightsHost host;
};

Case make_case(int64_t H, int64_t I, uint64_t seed) {
  Case s;
  s.H = H;
  s.I = I;
  const int64_t counts[4] = {0, 1, 130, 300};
  for (int64_t e = 0; e < s.G; ++e) {
    const int64_t padded = (counts[e] + 127) / 128 * 128;
    s.expert_rows.push_back(padded);
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
  s.dy.resize(s.rows * H);
  for (int64_t r = 0; r < s.rows; ++r) {
    const float mag = std::exp2(rng.uniform(-3.0f, 3.0f));
    for (int64_t c = 0; c < H; ++c) s.dy[r * H + c] = to_bf16(mag * rng.normal());
    if (s.layout[r] >= 0) continue;
    std::fill_n(s.xq.codes.begin() + r * H, H, uint8_t{0xFF});
    std::fill_n(s.xq.scales.begin() + r * (H / 128), H / 128, std::nanf(""));
    std::fill_n(s.dy.begin() + r * H, H, bf16{0x7FC0});
  }
  s.sa_mn = scales_mn_major(s.xq);
  s.row_scale.resize(s.rows);
  for (float& v : s.row_scale) v = rng.uniform(0.05f, 2.5f);
  std::vector<float> gate(s.G * I * H), up(s.G * I * H), down(s.G * H * I);
  for (float& v : gate) v = rng.normal() / std::sqrt(float(H));
  for (float& v : up) v = rng.normal() / std::sqrt(float(H));
  for (float& v : down) v = rng.normal() / std::sqrt(float(I));
  s.host = quantize_expert_weights(gate.data(), up.data(), down.data(), s.G, H, I);
  s.dw13_init.resize(s.G * 2 * I * H);
  s.dw2_init.resize(s.G * H * I);
  for (float& v : s.dw13_init) v = rng.normal();
  for (float& v : s.dw2_init) v = rng.normal();
  return s;
}

// Increments got - init against want - init.
double rel_increment(const std::vector<float>& got, const std::vector<float>& want,
                     const std::vector<float>& init) {
  std::vector<double> g(got.size()), w(got.size());
  for (size_t i = 0; i < got.size(); ++i) {
    g[i] = double(got[i]) - init[i];
    w[i] = double(want[i]) - init[i];
  }
  return rel(g, w);
}

TEST(ExpertFfnBackwardGpu, MatchesReferenceAndGraphReplays) {
  struct Shape {
    int64_t H, I;
  };
  for (const Shape sh : {Shape{256, 256}, Shape{256, 2048}, Shape{7168, 256}, Shape{7168, 2048}}) {
    const int64_t H = sh.H, I = sh.I, I2 = 2 * I;
    const uint64_t seed = std::random_device{}();
    const Case s = make_case(H, I, seed);
    const int64_t R = s.rows;
    const ExpertWeightsDevice wd(s.host, /*with_transposed=*/true);
    ExpertFfnOptions opt;
    opt.backward = true;
    ExpertFfnGpu ffn(R, H, I, opt);
    cudaStream_t stream;
    FM_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

    DeviceBuffer<uint8_t> x(s.xq.codes);
    DeviceBuffer<float> sa(s.sa_mn), ws(s.row_scale), dw13(s.dw13_init), dw2(s.dw2_init), drs(R);
    DeviceBuffer<int32_t> layout(s.layout);
    DeviceBuffer<bf16> dy(s.dy), y(R * H), gate_up(R * I2), dx(R * H);
    gate_up.poison();
    dx.poison();
    drs.poison();
    // NOTE: cudaMemset runs on the legacy stream, which a non-blocking stream does not wait for.
    FM_CHECK_CUDA(cudaDeviceSynchronize());
    ffn.forward_contiguous(x.get(), sa.get(), layout.get(), R, wd.view(), y.get(), stream, ws.get(),
                           gate_up.get());
    ffn.backward_contiguous(x.get(), sa.get(), gate_up.get(), layout.get(), s.expert_rows, R,
                            wd.view(), dy.get(), dx.get(), dw13.get(), dw2.get(), stream, ws.get(),
                            drs.get());
    FM_CHECK_CUDA(cudaStreamSynchronize(stream));
    const std::vector<bf16> gu = gate_up.download(), got_dx = dx.download();
    const std::vector<float> got13 = dw13.download(), got2 = dw2.download(),
                             got_rs = drs.download();

    std::vector<bf16> want_dx(R * H, bf16{kPoison});
    std::vector<float> want13 = s.dw13_init, want2 = s.dw2_init, want_rs(R, std::nanf(""));
    expert_ffn_backward_reference(s.xq.ref(), s.layout.data(), s.expert_rows, s.host, gu.data(),
                                  s.dy.data(), s.row_scale.data(), false, want_dx.data(),
                                  want13.data(), want2.data(), want_rs.data(),
                                  test::test_threads());

    std::vector<double> gdx, wdx, grs, wrs;
    int64_t padding_written = 0, nonfinite = 0;
    for (int64_t r = 0; r < R; ++r) {
      if (s.layout[r] < 0) {
        for (int64_t c = 0; c < H; ++c) padding_written += got_dx[r * H + c].bits != kPoison;
        EXPECT_EQ(got_rs[r], 0.0f) << "padding row " << r;
        continue;
      }
      for (int64_t c = 0; c < H; ++c) {
        const float g = to_float(got_dx[r * H + c]);
        nonfinite += !std::isfinite(g);
        gdx.push_back(g);
        wdx.push_back(to_float(want_dx[r * H + c]));
      }
      grs.push_back(got_rs[r]);
      wrs.push_back(want_rs[r]);
    }
    for (float v : got13) nonfinite += !std::isfinite(v);
    for (float v : got2) nonfinite += !std::isfinite(v);
    const double e_dx = rel(gdx, wdx), e_rs = rel(grs, wrs),
                 e13 = rel_increment(got13, want13, s.dw13_init),
                 e2 = rel_increment(got2, want2, s.dw2_init);
    EXPECT_EQ(nonfinite, 0);
    EXPECT_EQ(padding_written, 0);
    EXPECT_LT(e_dx, kBwdTol) << "H=" << H << " I=" << I << " seed=" << seed;
    EXPECT_LT(e_rs, kBwdTol) << "H=" << H << " I=" << I << " seed=" << seed;
    EXPECT_LT(e13, kBwdTol) << "H=" << H << " I=" << I << " seed=" << seed;
    EXPECT_LT(e2, kBwdTol) << "H=" << H << " I=" << I << " seed=" << seed;
    for (int64_t i = 0; i < I2 * H; ++i) ASSERT_EQ(got13[i], s.dw13_init[i]) << "expert 0";
    for (int64_t i = 0; i < H * I; ++i) ASSERT_EQ(got2[i], s.dw2_init[i]) << "expert 0";

    // A CUDA graph of the backward replays to the eager bits.
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    FM_CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    ffn.backward_contiguous(x.get(), sa.get(), gate_up.get(), layout.get(), s.expert_rows, R,
                            wd.view(), dy.get(), dx.get(), dw13.get(), dw2.get(), stream, ws.get(),
                            drs.get());
    FM_CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
    FM_CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    for (int replay = 0; replay < 2; ++replay) {
      dw13.upload(s.dw13_init);
      dw2.upload(s.dw2_init);
      dx.poison();
      drs.poison();
      FM_CHECK_CUDA(cudaDeviceSynchronize());
      FM_CHECK_CUDA(cudaGraphLaunch(exec, stream));
      FM_CHECK_CUDA(cudaStreamSynchronize(stream));
      EXPECT_TRUE(same_bits(dx.download(), got_dx)) << "dx, replay " << replay;
      EXPECT_TRUE(same_bits(dw13.download(), got13)) << "dW13, replay " << replay;
      EXPECT_TRUE(same_bits(dw2.download(), got2)) << "dW2, replay " << replay;
      EXPECT_TRUE(same_bits(drs.download(), got_rs)) << "d_row_scale, replay " << replay;
    }
    cudaEvent_t e0, e1;
    FM_CHECK_CUDA(cudaEventCreate(&e0));
    FM_CHECK_CUDA(cudaEventCreate(&e1));
    FM_CHECK_CUDA(cudaGraphLaunch(exec, stream));  // warm
    FM_CHECK_CUDA(cudaEventRecord(e0, stream));
    constexpr int kReplays = 20;
    for (int i = 0; i < kReplays; ++i) FM_CHECK_CUDA(cudaGraphLaunch(exec, stream));
    FM_CHECK_CUDA(cudaEventRecord(e1, stream));
    FM_CHECK_CUDA(cudaEventSynchronize(e1));
    float ms = 0;
    FM_CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    std::printf(
        "expert_ffn backward H=%-5lld I=%-5lld rows=%lld rel dx %.2e dW13 %.2e dW2 %.2e "
        "d_row_scale %.2e | graph replays bit-identical, us=%.1f\n",
        static_cast<long long>(H), static_cast<long long>(I), static_cast<long long>(R), e_dx, e13,
        e2, e_rs, ms * 1000.0 / kReplays);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    FM_CHECK_CUDA(cudaStreamDestroy(stream));
  }
}

// The device-layout form (no host counts) on a bound with two trailing padding blocks (x codes,
// scales and dy poisoned there) equals the host-counts form on the exact rows, bit for bit.
TEST(ExpertFfnBackwardGpu, LayoutFormEqualsHostCounts) {
  for (const int64_t I : {256, 2048}) {
    const int64_t H = 7168, I2 = 2 * I;
    const uint64_t seed = std::random_device{}();
    Case s = make_case(H, I, seed);
    const int64_t R = s.rows, bound = R + 256;
    s.layout.resize(bound, -1);
    s.xq.codes.resize(bound * H, uint8_t{0xFF});
    s.xq.scales.resize(bound * (H / 128), std::nanf(""));
    s.xq.rows = bound;
    s.dy.resize(bound * H, bf16{0x7FC0});
    s.row_scale.resize(bound, 1.0f);
    const ExpertWeightsDevice wd(s.host, /*with_transposed=*/true);
    ExpertFfnOptions opt;
    opt.backward = true;
    ExpertFfnGpu ffn(bound, H, I, opt);
    cudaStream_t stream;
    FM_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    DeviceBuffer<uint8_t> x(s.xq.codes);
    DeviceBuffer<float> sa(scales_mn_major(s.xq)), ws(s.row_scale), dw13(s.dw13_init),
        dw2(s.dw2_init), drs(bound);
    DeviceBuffer<int32_t> layout(s.layout);
    DeviceBuffer<bf16> dy(s.dy), y(bound * H), gate_up(bound * I2), dx(bound * H);
    gate_up.poison();
    ffn.forward_contiguous(x.get(), sa.get(), layout.get(), bound, wd.view(), y.get(), stream,
                           ws.get(), gate_up.get());
    FM_CHECK_CUDA(cudaStreamSynchronize(stream));
    // The host form reads sa as [H/128][pad(R)]: its own copy on the exact rows.
    QuantizedMatrix exact = s.xq;
    exact.codes.resize(R * H);
    exact.scales.resize(R * (H / 128));
    exact.rows = R;
    DeviceBuffer<float> sa_exact(scales_mn_major(exact));
    struct Result {
      std::vector<bf16> dx;
      std::vector<float> dw13, dw2, drs;
    };
    // init: the dW start (the test's random one; zeros; or NaN for an overwrite).
    enum class Init { kRandom, kZeros, kPoison };
    const auto run = [&](bool from_layout, Init init = Init::kRandom,
                         kernels::WgradOutput output = kernels::WgradOutput::kAccumulate) {
      if (init == Init::kPoison) {
        dw13.poison();
        dw2.poison();
      } else {
        dw13.upload(init == Init::kZeros ? std::vector<float>(s.dw13_init.size(), 0.0f)
                                         : s.dw13_init);
        dw2.upload(init == Init::kZeros ? std::vector<float>(s.dw2_init.size(), 0.0f) : s.dw2_init);
      }
      dx.poison();
      drs.poison();
      FM_CHECK_CUDA(cudaDeviceSynchronize());
      if (from_layout)
        ffn.backward_contiguous(x.get(), sa.get(), gate_up.get(), layout.get(), bound, wd.view(),
                                dy.get(), dx.get(), dw13.get(), dw2.get(), stream, ws.get(),
                                drs.get(), output);
      else
        ffn.backward_contiguous(x.get(), sa_exact.get(), gate_up.get(), layout.get(), s.expert_rows,
                                R, wd.view(), dy.get(), dx.get(), dw13.get(), dw2.get(), stream,
                                ws.get(), drs.get(), output);
      FM_CHECK_CUDA(cudaStreamSynchronize(stream));
      Result r{dx.download(), dw13.download(), dw2.download(), drs.download()};
      r.dx.resize(R * H);
      r.drs.resize(R);
      return r;
    };
    const Result host = run(false), dev = run(true);
    // Overwriting NaN-filled gradients == accumulating into zeros (expert 0 has no rows: zeros).
    const Result zeroed = run(true, Init::kZeros),
                 over = run(true, Init::kPoison, kernels::WgradOutput::kOverwrite);
    EXPECT_TRUE(same_bits(over.dw13, zeroed.dw13)) << "dW13 overwritten, I=" << I;
    EXPECT_TRUE(same_bits(over.dw2, zeroed.dw2)) << "dW2 overwritten, I=" << I;
    EXPECT_TRUE(same_bits(dev.dx, host.dx)) << "dx, I=" << I << " seed=" << seed;
    EXPECT_TRUE(same_bits(dev.dw13, host.dw13)) << "dW13, I=" << I << " seed=" << seed;
    EXPECT_TRUE(same_bits(dev.dw2, host.dw2)) << "dW2, I=" << I << " seed=" << seed;
    EXPECT_TRUE(same_bits(dev.drs, host.drs)) << "d_row_scale, I=" << I << " seed=" << seed;
    std::printf(
        "expert_ffn backward H=%lld I=%lld: layout form on %lld rows == host counts on "
        "%lld rows, bit for bit\n",
        static_cast<long long>(H), static_cast<long long>(I), static_cast<long long>(bound),
        static_cast<long long>(R));
    FM_CHECK_CUDA(cudaStreamDestroy(stream));
  }
}

using test::expect_invalid;

TEST(ExpertFfnBackwardGpu, BadArgumentsThrow) {
  const int64_t G = 2, H = 128, I = 128, R = 256;
  std::vector<float> gate(G * I * H, 0.1f), up(G * I * H, 0.1f), down(G * H * I, 0.1f);
  const ExpertWeightsHost host =
      quantize_expert_weights(gate.data(), up.data(), down.data(), G, H, I);
  const ExpertWeightsDevice plain(host), wt(host, true);
  ExpertFfnOptions opt;
  opt.backward = true;
  ExpertFfnGpu fwd_only(R, H, I), ffn(R, H, I, opt);
  DeviceBuffer<uint8_t> x(R * H);
  DeviceBuffer<float> sa(R), dw13(G * 2 * I * H), dw2(G * H * I);
  DeviceBuffer<int32_t> layout(R);
  DeviceBuffer<bf16> gu(R * 2 * I), dy(R * H), dx(R * H);
  const std::vector<int64_t> ok = {128, 128};
  auto call = [&](ExpertFfnGpu& f, const ExpertWeightsDevice& w, std::vector<int64_t> rows,
                  int64_t n, const bf16* dyp) {
    f.backward_contiguous(x.get(), sa.get(), gu.get(), layout.get(), rows, n, w.view(), dyp,
                          dx.get(), dw13.get(), dw2.get(), nullptr);
  };
  expect_invalid([&] { call(fwd_only, wt, ok, R, dy.get()); }, "backward workspace");
  expect_invalid([&] { call(ffn, plain, ok, R, dy.get()); }, "transposes");
  expect_invalid([&] { call(ffn, wt, {256}, R, dy.get()); }, "expert row counts");
  expect_invalid([&] { call(ffn, wt, {128, 0}, R, dy.get()); }, "sum to");
  expect_invalid([&] { call(ffn, wt, {100, 156}, R, dy.get()); }, "not a multiple of 128");
  expect_invalid([&] { call(ffn, wt, ok, R, nullptr); }, "null x, gate_up, dy");
  expect_invalid([&] { call(ffn, wt, {256, 256}, 512, dy.get()); }, "max_rows");
  FM_CHECK_CUDA(cudaDeviceSynchronize());
}

}  // namespace
}  // namespace fp8moe
