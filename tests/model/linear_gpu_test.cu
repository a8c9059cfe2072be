// LinearFp8Gpu and LinearWeightsDevice (model/linear_gpu.h) against the CPU reference,
// linear_forward / linear_backward with Precision::kFp8 (model/linear.h): fresh random inputs,
// outputs poisoned, ||out - ref|| / ||ref|| reported and bounded; the weights' FP8 forms bit for
// bit the CPU's; a CUDA graph of forward + backward replays to the eager bits.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../kernels/gpu_test_util.cuh"
#include "../support/expect_invalid.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/fp8/quantize.h"
#include "fp8moe/model/linear.h"
#include "fp8moe/model/linear_gpu.h"

namespace fp8moe {
namespace {

using test::DeviceBuffer;

// BF16 outputs against an FP32 reference rounded to BF16: the GPU's tensor cores sum each
// 128-deep block in another order than the reference's emulated accumulator, and a sum that
// lands near a BF16 rounding boundary flips one ulp (2^-8 relative): norm-wise ~1e-3 (the GEMM
// tests' BF16 rows measure 4e-4..2e-3). dW is FP32 (the wgrad tests: ~1e-4).
constexpr double kBf16Tol = 5e-3;
constexpr double kF32Tol = 1e-3;

double rel(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

std::vector<bf16> to_bf16_vector(const std::vector<float>& x) {
  std::vector<bf16> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = to_bf16(x[i]);
  return out;
}

double rel_bf16(const std::vector<bf16>& got, const std::vector<float>& want) {
  std::vector<double> g(got.size()), w(got.size());
  for (size_t i = 0; i < got.size(); ++i) {
    g[i] = to_float(got[i]);
    w[i] = want[i];
  }
  return rel(g, w);
}

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

struct Shape {
  int64_t m, n, k;
  bool pow2;
};

void run_case(const Shape& s, uint64_t seed) {
  const int64_t M = s.m, N = s.n, K = s.k;
  // Inputs as BF16 values (the GPU layer's dtype); the reference gets the same values as floats.
  std::vector<float> x = test::random_matrix(M, K, seed), dy = test::random_matrix(M, N, seed + 1);
  const std::vector<bf16> xb = to_bf16_vector(x), dyb = to_bf16_vector(dy);
  for (size_t i = 0; i < x.size(); ++i) x[i] = to_float(xb[i]);
  for (size_t i = 0; i < dy.size(); ++i) dy[i] = to_float(dyb[i]);
  std::mt19937_64 rng(seed + 2);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> w(static_cast<size_t>(N * K)), dw0(static_cast<size_t>(N * K));
  for (float& v : w) v = normal(rng) / std::sqrt(static_cast<float>(K));
  for (float& v : dw0) v = normal(rng);

  LinearOptions opt;
  opt.precision = Precision::kFp8;
  opt.pow2_activation_scales = s.pow2;
  opt.threads = test::test_threads();
  std::vector<float> y_ref(static_cast<size_t>(M * N)), dx_ref(static_cast<size_t>(M * K));
  std::vector<float> dw_ref = dw0;
  LinearCache cache;
  linear_forward(opt, x.data(), M, w.data(), N, K, y_ref.data(), &cache);
  linear_backward(opt, cache, w.data(), dy.data(), dx_ref.data(), dw_ref.data());

  cudaStream_t stream;
  FM_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  DeviceBuffer<float> master(w), dw(dw0);
  DeviceBuffer<bf16> xd(xb), dyd(dyb), y(M * N), dx(M * K);
  y.poison();
  dx.poison();
  LinearWeightsDevice weights(N, K);
  weights.refresh(master.get(), stream);
  LinearFp8Gpu layer(M + 37, N, K, LinearGpuOptions{s.pow2});
  // A longer call first, so that the cache's padding rows hold stale codes the layer must clear.
  {
    std::vector<float> big = test::random_matrix(M + 37, K, seed + 3);
    DeviceBuffer<bf16> xbig(to_bf16_vector(big)), ybig((M + 37) * N);
    layer.forward(xbig.get(), M + 37, weights.view(), ybig.get(), stream);
    FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  }
  layer.forward(xd.get(), M, weights.view(), y.get(), stream);
  layer.backward(dyd.get(), weights.view(), dx.get(), dw.get(), stream);
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));

  // The weight's FP8 forms: the CPU's quantisation and block transpose, bit for bit.
  const LinearWeightsGpu v = weights.view();
  const int64_t np = (N + 127) / 128 * 128;
  std::vector<uint8_t> wc(static_cast<size_t>(N * K)), wtc(static_cast<size_t>(K * np));
  FM_CHECK_CUDA(cudaMemcpy(wc.data(), v.w, wc.size(), cudaMemcpyDeviceToHost));
  FM_CHECK_CUDA(cudaMemcpy(wtc.data(), v.wt, wtc.size(), cudaMemcpyDeviceToHost));
  EXPECT_TRUE(same_bits(wc, cache.wq.codes)) << "W codes";
  const QuantizedMatrix wt = transpose_block_quantized(cache.wq);
  int64_t wt_wrong = 0;
  for (int64_t c = 0; c < K; ++c)
    for (int64_t r = 0; r < np; ++r)
      wt_wrong += wtc[c * np + r] != (r < N ? wt.codes[c * N + r] : uint8_t{0});
  EXPECT_EQ(wt_wrong, 0) << "W^T codes (zero past N)";

  const std::vector<bf16> got_y = y.download(), got_dx = dx.download();
  const std::vector<float> got_dw = dw.download();
  std::vector<double> gi(got_dw.size()), wi(got_dw.size());
  for (size_t i = 0; i < got_dw.size(); ++i) {
    gi[i] = double(got_dw[i]) - dw0[i];
    wi[i] = double(dw_ref[i]) - dw0[i];
  }
  const double e_y = rel_bf16(got_y, y_ref), e_dx = rel_bf16(got_dx, dx_ref), e_dw = rel(gi, wi);
  std::printf("linear fp8 M=%-5lld N=%-5lld K=%-5lld pow2=%d rel y %.2e dx %.2e dW %.2e\n",
              static_cast<long long>(M), static_cast<long long>(N), static_cast<long long>(K),
              s.pow2 ? 1 : 0, e_y, e_dx, e_dw);
  EXPECT_LT(e_y, kBf16Tol) << "seed " << seed;
  EXPECT_LT(e_dx, kBf16Tol) << "seed " << seed;
  EXPECT_LT(e_dw, kF32Tol) << "seed " << seed;

  // Forward + backward captured in a CUDA graph replay to the eager bits.
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  FM_CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  layer.forward(xd.get(), M, weights.view(), y.get(), stream);
  layer.backward(dyd.get(), weights.view(), dx.get(), dw.get(), stream);
  FM_CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
  FM_CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  dw.upload(dw0);
  y.poison();
  dx.poison();
  FM_CHECK_CUDA(cudaGraphLaunch(exec, stream));
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  EXPECT_TRUE(same_bits(y.download(), got_y)) << "y, graph";
  EXPECT_TRUE(same_bits(dx.download(), got_dx)) << "dx, graph";
  EXPECT_TRUE(same_bits(dw.download(), got_dw)) << "dW, graph";
  // dW overwritten (NaN beforehand) == accumulated into zeros.
  DeviceBuffer<float> dw_zero(std::vector<float>(dw0.size(), 0.0f)), dw_over(dw0.size());
  dw_over.poison();
  layer.backward(dyd.get(), weights.view(), nullptr, dw_zero.get(), stream);
  layer.backward(dyd.get(), weights.view(), nullptr, dw_over.get(), stream,
                 kernels::WgradOutput::kOverwrite);
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  EXPECT_TRUE(same_bits(dw_over.download(), dw_zero.download())) << "dW overwritten";
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  FM_CHECK_CUDA(cudaStreamDestroy(stream));
}

// Multiples of 128 both ways (the one-pass dy quantisation), M not (zero-padded token blocks),
// N not (2112 = the fused q_a + kv_a projection, 576 = kv_a alone: Dgrad over N rounded up),
// one row, pow2 activation scales.
TEST(LinearFp8Gpu, MatchesReferenceAndReplaysInAGraph) {
  const uint64_t seed = std::random_device{}();
  for (const Shape s :
       {Shape{256, 512, 1024, false}, Shape{200, 2112, 1024, false}, Shape{130, 576, 512, true},
        Shape{1, 256, 128, false}, Shape{384, 1536, 768, true}})
    run_case(s, seed + 10 * static_cast<uint64_t>(s.m));
}

// The BF16 form against linear_forward / linear_backward with Precision::kBf16: the same BF16
// operands, FP32 sums in cuBLASLt's order against the CPU's, y and dx rounded to BF16 (a sum
// near a rounding boundary flips one BF16 ulp: ~1e-3 norm-wise at most), dW FP32 (~1e-6).
TEST(LinearBf16Gpu, MatchesReferenceAndReplaysInAGraph) {
  const uint64_t seed = std::random_device{}();
  for (const Shape s : {Shape{256, 512, 1024, false}, Shape{200, 2112, 1024, false},
                        Shape{1, 256, 128, false}, Shape{130, 576, 520, false}}) {
    const int64_t M = s.m, N = s.n, K = s.k;
    std::vector<float> x = test::random_matrix(M, K, seed + M),
                       dy = test::random_matrix(M, N, seed + M + 1);
    const std::vector<bf16> xb = to_bf16_vector(x), dyb = to_bf16_vector(dy);
    for (size_t i = 0; i < x.size(); ++i) x[i] = to_float(xb[i]);
    for (size_t i = 0; i < dy.size(); ++i) dy[i] = to_float(dyb[i]);
    std::mt19937_64 rng(seed + M + 2);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> w(static_cast<size_t>(N * K)), dw0(static_cast<size_t>(N * K));
    for (float& v : w) v = normal(rng) / std::sqrt(static_cast<float>(K));
    for (float& v : dw0) v = normal(rng);
    LinearOptions opt;
    opt.precision = Precision::kBf16;
    opt.threads = test::test_threads();
    std::vector<float> y_ref(static_cast<size_t>(M * N)), dx_ref(static_cast<size_t>(M * K));
    std::vector<float> dw_ref = dw0;
    LinearCache cache;
    linear_forward(opt, x.data(), M, w.data(), N, K, y_ref.data(), &cache);
    linear_backward(opt, cache, w.data(), dy.data(), dx_ref.data(), dw_ref.data());

    cudaStream_t stream;
    FM_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    DeviceBuffer<float> master(w), dw(dw0);
    DeviceBuffer<bf16> xd(xb), dyd(dyb), y(M * N), dx(M * K);
    y.poison();
    dx.poison();
    LinearBf16Gpu layer(M, N, K);
    layer.refresh_weight(master.get(), stream);
    layer.forward(xd.get(), M, y.get(), stream);
    layer.backward(dyd.get(), dx.get(), dw.get(), stream);
    FM_CHECK_CUDA(cudaStreamSynchronize(stream));
    std::vector<bf16> wb(static_cast<size_t>(N * K));
    FM_CHECK_CUDA(
        cudaMemcpy(wb.data(), layer.weight(), wb.size() * sizeof(bf16), cudaMemcpyDeviceToHost));
    int64_t w_wrong = 0;
    for (int64_t i = 0; i < N * K; ++i) w_wrong += wb[i].bits != to_bf16(w[i]).bits;
    EXPECT_EQ(w_wrong, 0) << "the BF16 weight copy";
    const std::vector<bf16> got_y = y.download(), got_dx = dx.download();
    const std::vector<float> got_dw = dw.download();
    std::vector<double> gi(got_dw.size()), wi(got_dw.size());
    for (size_t i = 0; i < got_dw.size(); ++i) {
      gi[i] = double(got_dw[i]) - dw0[i];
      wi[i] = double(dw_ref[i]) - dw0[i];
    }
    const double e_y = rel_bf16(got_y, y_ref), e_dx = rel_bf16(got_dx, dx_ref), e_dw = rel(gi, wi);
    std::printf("linear bf16 M=%-5lld N=%-5lld K=%-5lld rel y %.2e dx %.2e dW %.2e\n",
                static_cast<long long>(M), static_cast<long long>(N), static_cast<long long>(K),
                e_y, e_dx, e_dw);
    EXPECT_LT(e_y, 2e-3) << "seed " << seed;
    EXPECT_LT(e_dx, 2e-3) << "seed " << seed;
    EXPECT_LT(e_dw, 1e-4) << "seed " << seed;

    cudaGraph_t graph;
    cudaGraphExec_t exec;
    FM_CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    layer.forward(xd.get(), M, y.get(), stream);
    layer.backward(dyd.get(), dx.get(), dw.get(), stream);
    FM_CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
    FM_CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    dw.upload(dw0);
    y.poison();
    dx.poison();
    FM_CHECK_CUDA(cudaGraphLaunch(exec, stream));
    FM_CHECK_CUDA(cudaStreamSynchronize(stream));
    EXPECT_TRUE(same_bits(y.download(), got_y)) << "y, graph";
    EXPECT_TRUE(same_bits(dx.download(), got_dx)) << "dx, graph";
    EXPECT_TRUE(same_bits(dw.download(), got_dw)) << "dW, graph";
    DeviceBuffer<float> dw_zero(std::vector<float>(dw0.size(), 0.0f)), dw_over(dw0.size());
    dw_over.poison();
    layer.backward(dyd.get(), nullptr, dw_zero.get(), stream);
    layer.backward(dyd.get(), nullptr, dw_over.get(), stream, kernels::WgradOutput::kOverwrite);
    FM_CHECK_CUDA(cudaStreamSynchronize(stream));
    EXPECT_TRUE(same_bits(dw_over.download(), dw_zero.download())) << "dW overwritten";
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    FM_CHECK_CUDA(cudaStreamDestroy(stream));
  }
  using test::expect_invalid;
  expect_invalid([] { LinearBf16Gpu l(16, 100, 128); }, "multiples of 8");
  LinearBf16Gpu layer(16, 128, 128);
  DeviceBuffer<bf16> a(32 * 128), b(32 * 128);
  DeviceBuffer<float> d(128 * 128);
  expect_invalid([&] { layer.backward(a.get(), b.get(), d.get(), nullptr); }, "no forward");
  expect_invalid([&] { layer.forward(a.get(), 17, b.get(), nullptr); }, "max_rows");
}

TEST(LinearFp8Gpu, BadArgumentsThrow) {
  using test::expect_invalid;
  expect_invalid([] { LinearWeightsDevice w(256, 200); }, "multiple of 128");
  expect_invalid([] { LinearFp8Gpu l(64, 100, 256); }, "multiple of 8");
  LinearWeightsDevice w(256, 256), other(128, 256);
  LinearFp8Gpu layer(64, 256, 256);
  DeviceBuffer<bf16> x(128 * 256), y(128 * 256);
  DeviceBuffer<float> dw(256 * 256);
  expect_invalid([&] { layer.backward(y.get(), w.view(), x.get(), dw.get(), nullptr); },
                 "no forward");
  expect_invalid([&] { layer.forward(x.get(), 65, w.view(), y.get(), nullptr); }, "max_rows");
  expect_invalid([&] { layer.forward(x.get(), 64, other.view(), y.get(), nullptr); }, "weight");
  expect_invalid([&] { layer.forward(x.get() + 1, 64, w.view(), y.get(), nullptr); },
                 "16-byte aligned");
  expect_invalid([&] { w.refresh(nullptr, nullptr); }, "null master");
}

}  // namespace
}  // namespace fp8moe
